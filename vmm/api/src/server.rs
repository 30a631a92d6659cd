//! The operator's control API: HTTP/1.1 + JSON on a Unix socket (so `curl --unix-socket` works).
//! An existing socket path is replaced only if it is a socket nobody listens on.
//!
//! Routes (all JSON answers; the table is [`ROUTES`], matched on `/`-separated path segments,
//! so a trailing slash or a query string does not change the route):
//! - `GET  /v1/vm`          status: state, vCPUs (phase, registers when paused, guest reports)
//! - `POST /v1/vm/pause`    park every vCPU; returns the park latency and each vCPU's registers
//! - `POST /v1/vm/resume`   release them; returns the blackout
//! - `POST /v1/vm/pause-resume` park and release at once: the patching floor (its blackout)
//! - `GET  /v1/metrics`     pause/resume latency percentiles and patch engine counters
//! - `GET  /v1/version`     crate version, accepted patch-format versions, features
//! - `POST /v1/patches`     apply a patch (body = the `.hpatch` file, `application/octet-stream`;
//!   a missing or other Content-Type is accepted too); idempotent
//! - `GET  /v1/patches`     every patch this VMM has seen: id, name, state, sites, blackout
//! - `GET  /v1/patches/ID`  one patch (ID = full id or a unique prefix)
//! - `POST /v1/patches/ID/revert` (or `DELETE /v1/patches/ID`) revert it
//! - `GET  /v1/integrity`   code integrity: mode, protected ranges, KVM slots, violations
//! - `POST /v1/integrity/ranges`  protect one more range: `{"range": "0x100000-0x106000"}`
//!
//! Errors are `{"fault_message": "...", "kind": "..."}` (as Firecracker's API), the kind one of
//! [`ErrorKind`], which alone chooses the HTTP status; `busy` answers (503) carry
//! `Retry-After`. A handler that panics answers 500 `internal` and the server keeps serving.
//!
//! Connections are served by [`crate::http`]: a thread per connection (capped), one request
//! per connection, read/write timeouts, bounded headers and body (docs/control-api.md).
//! The socket is created mode 0600: whoever can connect can pause the guest, so only its owner
//! may.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use serde::Serialize;
use serde_json::{Value, json};
use thiserror::Error;

use guest_control::GuestError;
use kvm_vmm::integrity::{IntegrityError, RangeError};
use kvm_vmm::vcpu::ControlError;
use kvm_vmm::vm::{Vm, VmControlError};
use patch_engine::EngineError;
use patch_engine::shared::SharedEngine;

/// Request bodies larger than this are refused: the largest patch file the format allows.
pub const MAX_BODY: usize = 16 << 20;

/// What the API serves: the VM and, when patching is enabled, its patch engine.
#[derive(Clone)]
pub struct ApiContext {
    pub vm: Arc<Vm>,
    pub engine: EngineSlot,
}

/// Where the API finds the patch engine. A Linux guest gets its engine only once its kernel
/// has booted (the VMM attaches to it then: slide, arena, identity), so until then requests
/// that need it are told to retry, and if attaching fails they are told why.
#[derive(Clone)]
pub struct EngineSlot(Arc<std::sync::RwLock<SlotState>>);

#[derive(Clone)]
enum SlotState {
    Disabled,
    Attaching(String),
    Failed(String),
    Ready(Arc<SharedEngine<Vm>>),
}

impl EngineSlot {
    /// Patching is not enabled on this VM.
    pub fn disabled() -> Self {
        Self::with(SlotState::Disabled)
    }

    /// The engine is ready now.
    pub fn ready(engine: Arc<SharedEngine<Vm>>) -> Self {
        Self::with(SlotState::Ready(engine))
    }

    /// The engine comes later; `waiting_for` says what for (shown to callers meanwhile).
    pub fn attaching(waiting_for: &str) -> Self {
        Self::with(SlotState::Attaching(waiting_for.to_string()))
    }

    fn with(state: SlotState) -> Self {
        EngineSlot(Arc::new(std::sync::RwLock::new(state)))
    }

    fn set(&self, state: SlotState) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    /// The engine has arrived.
    pub fn set_ready(&self, engine: Arc<SharedEngine<Vm>>) {
        self.set(SlotState::Ready(engine));
    }

    /// Attaching failed for good; `why` is what callers are told.
    pub fn set_failed(&self, why: String) {
        self.set(SlotState::Failed(why));
    }

    fn state(&self) -> SlotState {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The engine, if it is ready.
    pub fn engine(&self) -> Option<Arc<SharedEngine<Vm>>> {
        match self.state() {
            SlotState::Ready(e) => Some(e),
            _ => None,
        }
    }

    /// Whether patching is enabled (ready, or coming).
    pub fn enabled(&self) -> bool {
        !matches!(self.state(), SlotState::Disabled | SlotState::Failed(_))
    }

    /// The engine, or the fault that tells the caller why there is none (yet).
    fn get(&self) -> Result<Arc<SharedEngine<Vm>>, Fault> {
        match self.state() {
            SlotState::Ready(e) => Ok(e),
            SlotState::Disabled => Err(no_engine()),
            SlotState::Attaching(what) => Err(Fault::new(
                ErrorKind::Busy,
                format!("patching is not ready yet: the VMM is waiting for {what}; retry shortly"),
            )),
            SlotState::Failed(why) => Err(Fault::new(
                ErrorKind::Internal,
                format!("patching is unavailable on this VM: {why}"),
            )),
        }
    }
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("another process is already serving {0}; choose another --api-sock path or stop it")]
    InUse(String),
    #[error("cannot create the API socket {path}; check that its directory exists and is writable")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists and is {what}, not a stale API socket; refusing to delete it (choose another --api-sock path, or remove it yourself)"
    )]
    NotASocket { path: String, what: &'static str },
}

/// A running API server; dropping it stops accepting, and removes the socket.
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    pub fn start(path: &Path, ctx: ApiContext) -> Result<ApiServer, ApiError> {
        let shown = path.display().to_string();
        remove_stale_socket(path)?;
        // Create the socket with no group/other permissions from the start (no window where
        // another user could connect), then make the mode explicit.
        // SAFETY: umask only changes this process's file-creation mask; restored right after.
        let old = unsafe { libc::umask(0o177) };
        let listener = std::os::unix::net::UnixListener::bind(path);
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(|source| ApiError::Bind {
            path: shown.clone(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ApiError::Bind {
                path: shown.clone(),
                source,
            },
        )?;
        let handler: crate::http::Handler =
            Arc::new(move |method: &str, url: &str, body: &[u8]| {
                route_guarded(&ctx, method, url, body)
            });
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::http::accept_loop(listener, handler, crate::http::Limits::default(), s)
            })
            .map_err(|source| ApiError::Bind {
                path: shown,
                source,
            })?;
        tracing::info!(socket = %path.display(), "control API listening");
        Ok(ApiServer {
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

/// Removes `path` only if it is a socket nobody listens on (left by a VMM that died). Any
/// other file (a regular file, a directory, a symlink, dangling or not) is refused, never
/// deleted; a live socket is `InUse`.
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Bind {
                path: shown,
                source,
            });
        }
    };
    let t = meta.file_type();
    if !t.is_socket() {
        let what = if t.is_symlink() {
            if std::fs::metadata(path).is_err() {
                "a dangling symbolic link"
            } else {
                "a symbolic link"
            }
        } else if t.is_file() {
            "a regular file"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else {
            "a device or other special file"
        };
        return Err(ApiError::NotASocket { path: shown, what });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ApiError::InUse(shown));
    }
    tracing::info!(socket = %path.display(), "removing a stale API socket nobody listens on");
    std::fs::remove_file(path).map_err(|source| ApiError::Bind {
        path: shown,
        source,
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Nice value of the API connection threads when the process may raise it.
const API_NICE: i32 = -10;

/// Gives an API connection thread (which runs the patch engine) precedence over the vCPU threads.
///
/// Why: an apply pauses and resumes every vCPU; when the vCPUs keep every host CPU busy (as the
/// test guest's workload does), a control thread at the same priority waits a whole scheduler
/// slice (milliseconds) to run after each wake-up, and an apply takes milliseconds although the
/// guest's blackout is tens of microseconds. The thread works in short bursts, so this costs the
/// guest nothing measurable. Without CAP_SYS_NICE it stays at the default and says so.
pub(crate) fn raise_priority() {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes this
    // thread's nice value.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, API_NICE)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "API thread keeps the default priority");
    }
}

/// The class of every error the API answers with: the `kind` of the error body, and the one
/// place that chooses its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The patch file (or a request body) does not parse.
    Malformed,
    /// The patch is unsigned or its signature is not from a trusted key.
    Signature,
    /// The patch was built for another guest image.
    WrongTarget,
    /// The patch's content cannot be applied to this guest (its sites, relocations, mappings).
    Refused,
    /// The request conflicts with the current state (already paused, overlaps, not applied).
    Conflict,
    /// The patch arena has no room left.
    ArenaFull,
    /// Transient: try again (see the `Retry-After` header).
    Busy,
    /// No such patch, vCPU or endpoint; or patching is not enabled.
    NotFound,
    /// The guest rewrote patched code; the VMM refuses to revert over it.
    Tampered,
    /// The request is missing something or is not well-formed.
    BadRequest,
    /// The endpoint exists but not with this method.
    MethodNotAllowed,
    /// The request body is too large.
    PayloadTooLarge,
    /// The request line and headers are too large, or too many.
    HeaderTooLarge,
    /// The request did not arrive in time.
    RequestTimeout,
    /// The VM has stopped.
    Gone,
    /// A failure inside the VMM, not caused by the request.
    Internal,
}

impl ErrorKind {
    /// Every kind, for documentation and tests.
    pub const ALL: &[ErrorKind] = &[
        ErrorKind::Malformed,
        ErrorKind::Signature,
        ErrorKind::WrongTarget,
        ErrorKind::Refused,
        ErrorKind::Conflict,
        ErrorKind::ArenaFull,
        ErrorKind::Busy,
        ErrorKind::NotFound,
        ErrorKind::Tampered,
        ErrorKind::BadRequest,
        ErrorKind::MethodNotAllowed,
        ErrorKind::PayloadTooLarge,
        ErrorKind::HeaderTooLarge,
        ErrorKind::RequestTimeout,
        ErrorKind::Gone,
        ErrorKind::Internal,
    ];

    /// The HTTP status of an answer of this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Malformed | ErrorKind::BadRequest => 400,
            ErrorKind::Signature => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict | ErrorKind::Tampered => 409,
            ErrorKind::Gone => 410,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::WrongTarget | ErrorKind::Refused => 422,
            ErrorKind::Internal => 500,
            ErrorKind::Busy => 503,
            ErrorKind::ArenaFull => 507,
        }
    }

    /// The `kind` string of the error body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::Signature => "signature",
            ErrorKind::WrongTarget => "wrong_target",
            ErrorKind::Refused => "refused",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ArenaFull => "arena_full",
            ErrorKind::Busy => "busy",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Tampered => "tampered",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Gone => "gone",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Seconds a client is asked to wait (`Retry-After`) before retrying a `busy` answer.
pub const RETRY_AFTER_SECS: u64 = 1;

/// An error answer: `{"fault_message": "...", "kind": "..."}` with the kind's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: ErrorKind,
    pub message: String,
}

impl Fault {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Fault {
            kind,
            message: message.into(),
        }
    }
}

/// One answer of the router: status, JSON body and, for `busy`, a `Retry-After` in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl Reply {
    fn ok(status: u16, body: Value) -> Self {
        Reply {
            status,
            body,
            retry_after: None,
        }
    }
}

impl From<Fault> for Reply {
    fn from(f: Fault) -> Self {
        Reply {
            status: f.kind.status(),
            body: json!({"fault_message": f.message, "kind": f.kind.as_str()}),
            retry_after: (f.kind == ErrorKind::Busy).then_some(RETRY_AFTER_SECS),
        }
    }
}

fn control_fault(e: ControlError) -> Fault {
    let kind = match e {
        ControlError::AlreadyPaused | ControlError::NotPaused => ErrorKind::Conflict,
        ControlError::Stopped => ErrorKind::Gone,
        ControlError::ParkTimeout { .. } => ErrorKind::Busy,
        ControlError::NoSuchVcpu(_) => ErrorKind::NotFound,
    };
    Fault::new(kind, chain(&e))
}

/// The kind of an engine error, from its variant (not from its `kind()` string).
///
/// Guest errors split by cause: a site that translates outside guest memory or through an
/// unmapped/reserved page-table entry is the patch's fault (`refused`, 422); a guest that is
/// being paused by someone else is `busy`; failing ioctls and the like are `internal`.
pub fn engine_kind(e: &EngineError) -> ErrorKind {
    match e {
        EngineError::Malformed(_) => ErrorKind::Malformed,
        EngineError::Unsigned | EngineError::Signature(_) => ErrorKind::Signature,
        EngineError::Target(_) | EngineError::Image(_) => ErrorKind::WrongTarget,
        EngineError::Plan(_)
        | EngineError::Reloc { .. }
        | EngineError::Unmapped { .. }
        | EngineError::Discontiguous { .. }
        | EngineError::SelfOverlap { .. }
        | EngineError::NotInCode { .. }
        | EngineError::InArena { .. } => ErrorKind::Refused,
        EngineError::Overlap { .. }
        | EngineError::NotApplied { .. }
        | EngineError::Unvouched { .. } => ErrorKind::Conflict,
        // Retrying does not help until the operator resumes the VM.
        EngineError::OperatorPaused => ErrorKind::Conflict,
        EngineError::ArenaFull { .. } | EngineError::LedgerFull(_) => ErrorKind::ArenaFull,
        EngineError::Busy { .. } | EngineError::Raced { .. } | EngineError::Stale => {
            ErrorKind::Busy
        }
        EngineError::NoSuchPatch(_) | EngineError::AmbiguousId(_) => ErrorKind::NotFound,
        EngineError::Tampered { .. } => ErrorKind::Tampered,
        EngineError::Guest(g) => match g {
            GuestError::OutsideMemory { .. }
            | GuestError::WrapsAround { .. }
            | GuestError::Walk(_) => ErrorKind::Refused,
            GuestError::AlreadyPaused => ErrorKind::Busy,
            GuestError::Pause(_)
            | GuestError::Resume(_)
            | GuestError::Registers { .. }
            | GuestError::SetRip { .. }
            | GuestError::NotPaused
            | GuestError::NoSuchVcpu(_) => ErrorKind::Internal,
        },
        EngineError::NoVcpu
        | EngineError::Journal(_)
        | EngineError::Stranded { .. }
        | EngineError::DataPlacement { .. } => ErrorKind::Internal,
    }
}

/// The message of an error with its whole `source()` chain (each cause once).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = c.source();
    }
    text
}

fn engine_fault(e: &EngineError) -> Fault {
    Fault::new(engine_kind(e), chain(e))
}

fn no_engine() -> Fault {
    Fault::new(
        ErrorKind::NotFound,
        "patching is not enabled on this VM (start it with --trusted-key KEY.pub or --allow-unsigned)",
    )
}

fn integrity_fault(e: VmControlError) -> Fault {
    let kind = match &e {
        VmControlError::Control(_) => match e {
            VmControlError::Control(c) => return control_fault(c),
            _ => ErrorKind::Internal,
        },
        VmControlError::Integrity(IntegrityError::Off) => ErrorKind::Conflict,
        VmControlError::Integrity(IntegrityError::Range(
            RangeError::Syntax(_) | RangeError::Empty { .. },
        )) => ErrorKind::BadRequest,
        VmControlError::Integrity(IntegrityError::Range(_) | IntegrityError::Slots(_)) => {
            ErrorKind::Refused
        }
        _ => ErrorKind::Internal,
    };
    Fault::new(kind, chain(&e))
}

/// What a route does; the router's table maps (method, path pattern) to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Status,
    Pause,
    Resume,
    /// Park every vCPU and release them at once: the patching floor, measured as an apply's
    /// blackout is (what `vmm bench` compares a patch's blackout with).
    PauseResume,
    Metrics,
    Version,
    ListPatches,
    ApplyPatch,
    GetPatch,
    RevertPatch,
    Integrity,
    Protect,
}

/// One row of the route table: method, path pattern (`{id}` matches one non-empty segment).
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub endpoint: Endpoint,
}

const fn r(method: &'static str, path: &'static str, endpoint: Endpoint) -> Route {
    Route {
        method,
        path,
        endpoint,
    }
}

/// Every route the server answers. Paths are matched on `/`-separated segments; a trailing
/// slash, empty segments and a query string are ignored.
pub const ROUTES: &[Route] = &[
    r("GET", "/v1/vm", Endpoint::Status),
    r("POST", "/v1/vm/pause", Endpoint::Pause),
    r("POST", "/v1/vm/resume", Endpoint::Resume),
    r("POST", "/v1/vm/pause-resume", Endpoint::PauseResume),
    r("GET", "/v1/metrics", Endpoint::Metrics),
    r("GET", "/v1/version", Endpoint::Version),
    r("GET", "/v1/patches", Endpoint::ListPatches),
    r("POST", "/v1/patches", Endpoint::ApplyPatch),
    r("GET", "/v1/patches/{id}", Endpoint::GetPatch),
    r("DELETE", "/v1/patches/{id}", Endpoint::RevertPatch),
    r("POST", "/v1/patches/{id}/revert", Endpoint::RevertPatch),
    r("GET", "/v1/integrity", Endpoint::Integrity),
    r("POST", "/v1/integrity/ranges", Endpoint::Protect),
];

/// What this server offers, as `GET /v1/version` lists it.
pub const FEATURES: &[&str] = &[
    "pause_resume",
    "metrics",
    "integrity",
    "patches",
    "fault_body",
    "octet_stream_patches",
];

/// The non-empty segments of a URL's path (query string dropped).
fn segments(url: &str) -> Vec<&str> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// Matches a pattern against segments; returns the `{id}` segment if the pattern has one.
fn matches<'a>(pattern: &str, segs: &[&'a str]) -> Option<Option<&'a str>> {
    let pat = segments(pattern);
    if pat.len() != segs.len() {
        return None;
    }
    let mut id = None;
    for (p, s) in pat.iter().zip(segs) {
        if *p == "{id}" {
            id = Some(*s);
        } else if p != s {
            return None;
        }
    }
    Some(id)
}

/// [`route`], with a panic in a handler turned into a 500 so the server keeps serving.
pub fn route_guarded(ctx: &ApiContext, method: &str, url: &str, body: &[u8]) -> Reply {
    guard(method, url, || route(ctx, method, url, body))
}

/// Runs a handler; a panic becomes an `internal` fault instead of killing the API thread.
fn guard(method: &str, url: &str, handler: impl FnOnce() -> Reply) -> Reply {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) {
        Ok(reply) => reply,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(%method, url, panic = what, "API handler panicked");
            Fault::new(
                ErrorKind::Internal,
                format!("the VMM failed while handling {method} {url} ({what}); this is a bug, please report it"),
            )
            .into()
        }
    }
}

/// Finds the route of a request: its endpoint and `{id}` segment (empty if none), or the
/// `not_found` / `method_not_allowed` fault. Pure, so the route table can be tested alone.
pub fn resolve<'a>(method: &str, url: &'a str) -> Result<(Endpoint, &'a str), Fault> {
    let segs = segments(url);
    let mut allowed: Vec<&str> = Vec::new();
    for route in ROUTES {
        if let Some(id) = matches(route.path, &segs) {
            if route.method.eq_ignore_ascii_case(method) {
                return Ok((route.endpoint, id.unwrap_or("")));
            }
            allowed.push(route.method);
        }
    }
    let path = url.split('?').next().unwrap_or(url);
    if allowed.is_empty() {
        Err(Fault::new(
            ErrorKind::NotFound,
            format!(
                "no such endpoint {path}; try GET /v1/vm, POST /v1/vm/pause, POST /v1/vm/resume, GET /v1/metrics, GET /v1/version, GET/POST /v1/patches, GET /v1/integrity"
            ),
        ))
    } else {
        Err(Fault::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "method {method} is not allowed on {path}; use {}",
                allowed.join(" or ")
            ),
        ))
    }
}

/// Maps one request to its reply; pure apart from the VM calls, so tests can drive it.
pub fn route(ctx: &ApiContext, method: &str, url: &str, body: &[u8]) -> Reply {
    match resolve(method, url).and_then(|(endpoint, id)| handle(ctx, endpoint, id, body)) {
        Ok(reply) => reply,
        Err(fault) => fault.into(),
    }
}

fn handle(ctx: &ApiContext, endpoint: Endpoint, id: &str, body: &[u8]) -> Result<Reply, Fault> {
    let vm = &ctx.vm;
    let engine = || ctx.engine.get();
    let not_paused = || {
        if vm.is_paused() {
            Err(engine_fault(&EngineError::OperatorPaused))
        } else {
            Ok(())
        }
    };
    Ok(match endpoint {
        Endpoint::Status => Reply::ok(200, json!(vm.status())),
        Endpoint::Pause => {
            let (info, _) = vm.pause().map_err(control_fault)?;
            Reply::ok(
                200,
                json!({"state": "paused", "park_us": info.park_us, "vcpus": info.vcpus}),
            )
        }
        Endpoint::Resume => {
            let info = vm.resume().map_err(control_fault)?;
            Reply::ok(
                200,
                json!({"state": "running", "blackout_us": info.blackout_us}),
            )
        }
        Endpoint::PauseResume => {
            not_paused()?;
            let (info, _) = vm.pause().map_err(control_fault)?;
            let resumed = vm.resume().map_err(control_fault)?;
            Reply::ok(
                200,
                json!({"state": "running", "park_us": info.park_us, "blackout_us": resumed.blackout_us}),
            )
        }
        Endpoint::Metrics => {
            let patches = ctx.engine.engine().map(|e| e.read().metrics());
            Reply::ok(
                200,
                json!({"pause": vm.pause_metrics(), "patches": patches, "integrity": vm.integrity_metrics()}),
            )
        }
        Endpoint::Version => Reply::ok(
            200,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "patch_format_versions": patch_format::SUPPORTED_VERSIONS,
                "patching_enabled": ctx.engine.enabled(),
                "features": FEATURES,
            }),
        ),
        Endpoint::ListPatches => Reply::ok(200, json!({"patches": engine()?.read().records()})),
        Endpoint::ApplyPatch => {
            let engine = engine()?;
            not_paused()?;
            if body.is_empty() {
                return Err(Fault::new(
                    ErrorKind::BadRequest,
                    "the request body must be the patch file (curl --data-binary @fix.hpatch -H 'Content-Type: application/octet-stream')",
                ));
            }
            // Parsed, verified and planned while status, metrics and the patch list answer;
            // only the writing excludes them (patch_engine::shared).
            let out = engine.apply(body).map_err(|e| engine_fault(&e))?;
            Reply::ok(if out.already_applied { 200 } else { 201 }, json!(out))
        }
        Endpoint::GetPatch => {
            let shared = engine()?;
            let engine = shared.read();
            let r = engine.find(id).map_err(|e| engine_fault(&e))?;
            Reply::ok(200, json!(r))
        }
        Endpoint::RevertPatch => {
            let engine = engine()?;
            not_paused()?;
            let r = engine.revert(id).map_err(|e| engine_fault(&e))?;
            Reply::ok(200, json!(r))
        }
        Endpoint::Integrity => Reply::ok(200, json!(vm.integrity())),
        Endpoint::Protect => protect(vm, body)?,
    })
}

/// `POST /v1/integrity/ranges`.
fn protect(vm: &Vm, body: &[u8]) -> Result<Reply, Fault> {
    let (start, end) = protect_range(body)?;
    let r = vm.protect_code(start, end).map_err(integrity_fault)?;
    Ok(Reply::ok(
        201,
        json!({"protected": r, "integrity": vm.integrity()}),
    ))
}

/// The range a `POST /v1/integrity/ranges` body asks for, `[start, end)`, or the 400 that
/// answers it. Apart from the VM, so the fuzz target `api` can feed it request bodies.
pub fn protect_range(body: &[u8]) -> Result<(u64, u64), Fault> {
    let range = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("range").and_then(|r| r.as_str()).map(str::to_string));
    let Some(range) = range else {
        return Err(Fault::new(
            ErrorKind::BadRequest,
            "the body must be JSON like {\"range\": \"0x100000-0x106000\"} (START-END or START+LENGTH)",
        ));
    };
    kvm_vmm::integrity::ranges::parse(&range)
        .map_err(|e| integrity_fault(IntegrityError::from(e).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_status_and_busy_asks_to_retry() {
        for kind in ErrorKind::ALL {
            let reply = Reply::from(Fault::new(*kind, "m"));
            assert_eq!(reply.status, kind.status());
            assert_eq!(reply.body["fault_message"], "m");
            assert_eq!(reply.body["kind"], kind.as_str());
            // The serde name and the body's kind are the same string.
            assert_eq!(json!(kind), json!(kind.as_str()));
            assert_eq!(reply.retry_after.is_some(), *kind == ErrorKind::Busy);
        }
        assert_eq!(ErrorKind::Refused.status(), 422);
        assert_eq!(ErrorKind::Busy.status(), 503);
        assert_eq!(ErrorKind::Internal.status(), 500);
    }

    #[test]
    fn guest_errors_from_patch_content_are_refusals() {
        let outside = EngineError::Guest(GuestError::OutsideMemory {
            gpa: 0xdead_0000,
            len: 5,
        });
        assert_eq!(engine_kind(&outside), ErrorKind::Refused);
        assert_eq!(engine_fault(&outside).kind.status(), 422);
        let walk = EngineError::Guest(GuestError::Walk(
            guest_control::paging::WalkError::NotPresent {
                gva: 0xffff_8000_0000_0000,
                level: 4,
                entry_gpa: 0x1000,
            },
        ));
        assert_eq!(engine_kind(&walk), ErrorKind::Refused);
        assert_eq!(
            engine_kind(&EngineError::Guest(GuestError::NotPaused)),
            ErrorKind::Internal
        );
        assert_eq!(engine_kind(&EngineError::NoVcpu), ErrorKind::Internal);
        let busy = EngineError::Busy {
            attempts: 3,
            why: "rip".into(),
        };
        assert_eq!(Reply::from(engine_fault(&busy)).retry_after, Some(1));
        assert_eq!(
            engine_kind(&EngineError::OperatorPaused),
            ErrorKind::Conflict
        );
    }

    #[test]
    fn method_by_path_table() {
        use Endpoint::*;
        let ok: &[(&str, &str, Endpoint, &str)] = &[
            ("GET", "/v1/vm", Status, ""),
            ("GET", "/v1/vm/", Status, ""),
            ("GET", "/v1/vm?verbose=1", Status, ""),
            ("POST", "/v1/vm/pause", Pause, ""),
            ("POST", "/v1/vm/resume/", Resume, ""),
            ("POST", "/v1/vm/pause-resume", PauseResume, ""),
            ("GET", "/v1/metrics", Metrics, ""),
            ("GET", "/v1/version", Version, ""),
            ("GET", "/v1/patches", ListPatches, ""),
            ("GET", "/v1/patches/", ListPatches, ""),
            ("GET", "/v1/patches?x", ListPatches, ""),
            ("POST", "/v1/patches", ApplyPatch, ""),
            ("GET", "/v1/patches/ab12", GetPatch, "ab12"),
            ("GET", "/v1/patches/ab12/", GetPatch, "ab12"),
            ("DELETE", "/v1/patches/ab12", RevertPatch, "ab12"),
            ("POST", "/v1/patches/ab12/revert", RevertPatch, "ab12"),
            ("POST", "/v1/patches/ab12/revert?now", RevertPatch, "ab12"),
            ("GET", "/v1/integrity", Integrity, ""),
            ("POST", "/v1/integrity/ranges", Protect, ""),
            ("get", "/v1/vm", Status, ""),
        ];
        for (method, url, endpoint, id) in ok {
            assert_eq!(resolve(method, url), Ok((*endpoint, *id)), "{method} {url}");
        }
        let refused: &[(&str, &str, ErrorKind)] = &[
            // Used to slice an empty id and panic the API thread.
            ("DELETE", "/v1/patches", ErrorKind::MethodNotAllowed),
            ("DELETE", "/v1/patches/", ErrorKind::MethodNotAllowed),
            ("DELETE", "/v1/patches?x", ErrorKind::MethodNotAllowed),
            ("DELETE", "/v1/patches//", ErrorKind::MethodNotAllowed),
            ("PUT", "/v1/patches/ab12", ErrorKind::MethodNotAllowed),
            (
                "GET",
                "/v1/patches/ab12/revert",
                ErrorKind::MethodNotAllowed,
            ),
            ("POST", "/v1/vm", ErrorKind::MethodNotAllowed),
            ("GET", "/v1/vm/pause", ErrorKind::MethodNotAllowed),
            ("POST", "/v1/version", ErrorKind::MethodNotAllowed),
            ("GET", "/v1/integrity/ranges", ErrorKind::MethodNotAllowed),
            ("GET", "/", ErrorKind::NotFound),
            ("GET", "", ErrorKind::NotFound),
            ("GET", "/v2/vm", ErrorKind::NotFound),
            ("GET", "/v1/patches/ab12/revert/x", ErrorKind::NotFound),
            ("POST", "/v1/patches/ab12/undo", ErrorKind::NotFound),
            ("GET", "/v1/vmx", ErrorKind::NotFound),
        ];
        for (method, url, kind) in refused {
            match resolve(method, url) {
                Err(f) => assert_eq!(f.kind, *kind, "{method} {url}: {}", f.message),
                Ok(r) => panic!("{method} {url} resolved to {r:?}"),
            }
        }
        let Err(f) = resolve("DELETE", "/v1/patches") else {
            panic!("DELETE /v1/patches resolved");
        };
        assert!(f.message.contains("GET or POST"), "{}", f.message);
    }

    #[test]
    fn a_protect_body_is_one_range_or_a_400() {
        let want = Ok((0x10_0000, 0x10_6000));
        assert_eq!(protect_range(br#"{"range": "0x100000-0x106000"}"#), want);
        assert_eq!(protect_range(br#"{"range": "0x100000+0x6000"}"#), want);
        let bad: &[&[u8]] = &[
            b"",
            b"{}",
            b"[\"0x1000-0x2000\"]",
            br#"{"range": 4096}"#,
            br#"{"range": "0x2000-0x1000"}"#,
            br#"{"range": "0x1000"}"#,
            br#"{"range": "0xffffffffffffffff+0x2"}"#,
        ];
        for body in bad {
            match protect_range(body) {
                Err(f) => assert_eq!(f.kind, ErrorKind::BadRequest, "{}", f.message),
                Ok(r) => panic!("{} read as {r:x?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn every_route_in_the_table_resolves_to_itself() {
        for route in ROUTES {
            let url = route.path.replace("{id}", "0123abcd");
            let (endpoint, _) = resolve(route.method, &url).expect(route.path);
            assert_eq!(endpoint, route.endpoint, "{} {}", route.method, route.path);
        }
    }

    /// The OpenAPI document (JSON, so serde_json reads it: no YAML crate needed).
    const OPENAPI: &str = include_str!("../../../docs/api/openapi.json");

    #[test]
    fn the_openapi_document_and_the_router_agree() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("docs/api/openapi.json is JSON");
        assert!(
            doc["openapi"].as_str().unwrap_or("").starts_with("3.0"),
            "{}",
            doc["openapi"]
        );
        let paths = doc["paths"].as_object().expect("paths");
        let mut documented = Vec::new();
        for (path, item) in paths {
            let item = item.as_object().expect("path item");
            for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
                if item.contains_key(method) {
                    documented.push((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        assert!(!documented.is_empty());
        // Every documented (method, path) is served: never 404/405 from the router.
        for (method, path) in &documented {
            let url = path.replace("{id}", "0123abcd");
            if let Err(f) = resolve(method, &url) {
                panic!("documented {method} {path} is not served: {}", f.message);
            }
            let op = &paths[path.as_str()][method.to_ascii_lowercase().as_str()];
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path} documents no responses"
            );
        }
        // Every served route is documented.
        for route in ROUTES {
            assert!(
                documented
                    .iter()
                    .any(|(m, p)| m == route.method && p == route.path),
                "{} {} is served but not in docs/api/openapi.json",
                route.method,
                route.path
            );
        }
        assert_eq!(documented.len(), ROUTES.len());
        // The error schema lists exactly the kinds the server answers with.
        let kinds: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["kind"]["enum"]
            .as_array()
            .expect("Error.kind enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let ours: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ours);
    }

    #[test]
    fn a_panicking_handler_becomes_a_500_and_the_next_request_is_served() {
        let reply = guard("GET", "/v1/vm", || panic!("slice index out of range"));
        assert_eq!(reply.status, 500);
        assert_eq!(reply.body["kind"], "internal");
        let text = reply.body["fault_message"].as_str().unwrap_or("");
        assert!(text.contains("slice index out of range"), "{text}");
        let next = guard("GET", "/v1/vm", || Reply::ok(200, json!({"ok": true})));
        assert_eq!(next.status, 200);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("api-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn only_a_stale_socket_is_removed() {
        let dir = scratch("stale");
        // A regular file is kept, with an accurate error.
        let file = dir.join("file");
        std::fs::write(&file, b"precious").expect("write");
        match remove_stale_socket(&file) {
            Err(ApiError::NotASocket { what, .. }) => assert_eq!(what, "a regular file"),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&file).ok().as_deref(), Some(&b"precious"[..]));
        // A dangling symlink and a symlink to a file are kept.
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).expect("symlink");
        match remove_stale_socket(&dangling) {
            Err(ApiError::NotASocket { what, .. }) => assert_eq!(what, "a dangling symbolic link"),
            other => panic!("{other:?}"),
        }
        assert!(std::fs::symlink_metadata(&dangling).is_ok());
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        match remove_stale_socket(&link) {
            Err(ApiError::NotASocket { what, .. }) => assert_eq!(what, "a symbolic link"),
            other => panic!("{other:?}"),
        }
        // A directory is kept.
        match remove_stale_socket(&dir) {
            Err(ApiError::NotASocket { what, .. }) => assert_eq!(what, "a directory"),
            other => panic!("{other:?}"),
        }
        // A live socket is in use and kept.
        let live = dir.join("live");
        let listener = std::os::unix::net::UnixListener::bind(&live).expect("bind");
        assert!(matches!(
            remove_stale_socket(&live),
            Err(ApiError::InUse(_))
        ));
        assert!(std::fs::symlink_metadata(&live).is_ok());
        // Once nobody listens, it is stale and removed.
        drop(listener);
        remove_stale_socket(&live).expect("stale socket removed");
        assert!(std::fs::symlink_metadata(&live).is_err());
        // Nothing there: nothing to do.
        remove_stale_socket(&live).expect("absent path");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
