//! The operator's control API: HTTP/1.1 + JSON on a Unix socket (so `curl --unix-socket` works).
//!
//! Routes (all JSON):
//! - `GET  /v1/vm`          status: state, vCPUs (phase, registers when paused, guest reports)
//! - `POST /v1/vm/pause`    park every vCPU; returns the park latency and each vCPU's registers
//! - `POST /v1/vm/resume`   release them; returns the blackout
//! - `GET  /v1/metrics`     pause/resume latency percentiles and patch engine counters
//! - `POST /v1/patches`     apply a patch (body = the `.hpatch` file); idempotent
//! - `GET  /v1/patches`     every patch this VMM has seen: id, name, state, sites, blackout
//! - `GET  /v1/patches/ID`  one patch (ID = full id or a unique prefix)
//! - `POST /v1/patches/ID/revert` (or `DELETE /v1/patches/ID`) revert it
//! - `GET  /v1/integrity`   code integrity: mode, protected ranges, KVM slots, violations
//! - `POST /v1/integrity/ranges`  protect one more range: `{"range": "0x100000-0x106000"}`
//!
//! Errors are `{"error": "..."}` with a 4xx/5xx status. The socket is created mode 0600: whoever
//! can connect can pause the guest, so only its owner may.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{Value, json};
use thiserror::Error;

use kvm_vmm::integrity::{IntegrityError, RangeError};
use kvm_vmm::vcpu::ControlError;
use kvm_vmm::vm::{Vm, VmControlError};
use patch_engine::{Engine, EngineError};

/// Request bodies larger than this are refused: the largest patch file the format allows.
pub const MAX_BODY: usize = 16 << 20;

/// What the API serves: the VM and, when patching is enabled, its patch engine.
#[derive(Clone)]
pub struct ApiContext {
    pub vm: Arc<Vm>,
    pub engine: Option<Arc<Mutex<Engine<Vm>>>>,
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("another process is already serving {0}; choose another --api-sock path or stop it")]
    InUse(String),
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API server on {path}: {message}")]
    Server { path: String, message: String },
}

/// A running API server; dropping it stops the server and removes the socket.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    pub fn start(path: &Path, ctx: ApiContext) -> Result<ApiServer, ApiError> {
        let shown = path.display().to_string();
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(shown));
            }
            // A socket left by a VMM that died: nobody listens, so it is safe to replace.
            std::fs::remove_file(path).map_err(|source| ApiError::Bind {
                path: shown.clone(),
                source,
            })?;
        }
        // Create the socket with no group/other permissions from the start (no window where
        // another user could connect), then make the mode explicit.
        // SAFETY: umask only changes this process's file-creation mask; restored right after.
        let old = unsafe { libc::umask(0o177) };
        let server = tiny_http::Server::http_unix(path);
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(old) };
        let server = Arc::new(server.map_err(|e| ApiError::Server {
            path: shown.clone(),
            message: e.to_string(),
        })?);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ApiError::Bind {
                path: shown.clone(),
                source,
            },
        )?;
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                raise_priority();
                serve(&s, &ctx)
            })
            .map_err(|source| ApiError::Bind {
                path: shown,
                source,
            })?;
        tracing::info!(socket = %path.display(), "control API listening");
        Ok(ApiServer {
            server,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Nice value of the API thread when the process may raise it.
const API_NICE: i32 = -10;

/// Gives the API thread (which runs the patch engine) precedence over the vCPU threads.
///
/// Why: an apply pauses and resumes every vCPU; when the vCPUs keep every host CPU busy (as the
/// test guest's workload does), a control thread at the same priority waits a whole scheduler
/// slice (milliseconds) to run after each wake-up, and an apply takes milliseconds although the
/// guest's blackout is tens of microseconds. The thread works in short bursts, so this costs the
/// guest nothing measurable. Without CAP_SYS_NICE it stays at the default and says so.
fn raise_priority() {
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

fn serve(server: &tiny_http::Server, ctx: &ApiContext) {
    for mut request in server.incoming_requests() {
        let started = std::time::Instant::now();
        let method = request.method().clone();
        let url = request.url().to_string();
        let (status, body) = match read_body(&mut request) {
            Ok(body) => route(ctx, &method, &url, &body),
            Err(resp) => resp,
        };
        let text = body.to_string();
        // Always a Content-Length body: tiny_http would switch large ones (a long violation
        // list) to chunked encoding, which simple clients mishandle.
        let mut response = tiny_http::Response::from_string(text)
            .with_status_code(status)
            .with_chunked_threshold(usize::MAX);
        if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        {
            response.add_header(h);
        }
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "API client went away");
        }
        tracing::debug!(%method, url, status, us = started.elapsed().as_micros() as u64, "API request");
    }
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, (u16, Value)> {
    if let Some(len) = request.body_length()
        && len > MAX_BODY
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            (
                400,
                json!({"error": format!("could not read the request body: {e}")}),
            )
        })?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

fn too_large() -> (u16, Value) {
    (
        413,
        json!({"error": format!("request body larger than {} bytes", MAX_BODY)}),
    )
}

fn control_error(e: ControlError) -> (u16, Value) {
    let status = match e {
        ControlError::AlreadyPaused | ControlError::NotPaused => 409,
        ControlError::Stopped => 410,
        ControlError::ParkTimeout { .. } => 503,
        ControlError::NoSuchVcpu(_) => 404,
    };
    (status, json!({"error": e.to_string()}))
}

fn engine_error(e: &EngineError) -> (u16, Value) {
    let status = match e.kind() {
        "malformed" => 400,
        "signature" => 403,
        "not_found" => 404,
        "conflict" | "tampered" => 409,
        "wrong_target" | "refused" => 422,
        "busy" => 503,
        "arena_full" => 507,
        _ => 500,
    };
    (status, json!({"error": e.to_string(), "kind": e.kind()}))
}

fn no_engine() -> (u16, Value) {
    (
        404,
        json!({"error": "patching is not enabled on this VM (start it with --trusted-key KEY.pub or --allow-unsigned)"}),
    )
}

/// The patch routes: the engine's mutex serialises applies and reverts.
fn route_patches(
    ctx: &ApiContext,
    method: &tiny_http::Method,
    path: &str,
    body: &[u8],
) -> (u16, Value) {
    use tiny_http::Method::{Delete, Get, Post};
    let Some(engine) = &ctx.engine else {
        return no_engine();
    };
    let rest = path.strip_prefix("/v1/patches").unwrap_or("");
    let lock = || {
        engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let paused = || {
        ctx.vm.is_paused().then(|| {
            (
                409,
                json!({"error": EngineError::OperatorPaused.to_string(), "kind": "busy"}),
            )
        })
    };
    match (rest, method) {
        ("", Get) => (200, json!({"patches": lock().records()})),
        ("", Post) => {
            if let Some(r) = paused() {
                return r;
            }
            if body.is_empty() {
                return (
                    400,
                    json!({"error": "the request body must be the patch file (curl --data-binary @fix.hpatch)"}),
                );
            }
            match lock().apply(body) {
                Ok(out) => (if out.already_applied { 200 } else { 201 }, json!(out)),
                Err(e) => engine_error(&e),
            }
        }
        (id, Get) if id.len() > 1 && !id[1..].contains('/') => match lock().find(&id[1..]) {
            Ok(r) => (200, json!(r)),
            Err(e) => engine_error(&e),
        },
        (id, m)
            if (*m == Delete && !id[1..].contains('/'))
                || (*m == Post && id.ends_with("/revert")) =>
        {
            if let Some(r) = paused() {
                return r;
            }
            let id = id.trim_start_matches('/').trim_end_matches("/revert");
            match lock().revert(id) {
                Ok(r) => (200, json!(r)),
                Err(e) => engine_error(&e),
            }
        }
        _ => (
            405,
            json!({"error": format!("method {method} is not allowed on {path}; use GET/POST /v1/patches, GET /v1/patches/ID, POST /v1/patches/ID/revert")}),
        ),
    }
}

fn integrity_error(e: VmControlError) -> (u16, Value) {
    let status = match &e {
        VmControlError::Control(_) => match e {
            VmControlError::Control(c) => return control_error(c),
            _ => 500,
        },
        VmControlError::Integrity(IntegrityError::Off) => 409,
        VmControlError::Integrity(IntegrityError::Range(
            RangeError::Syntax(_) | RangeError::Empty { .. },
        )) => 400,
        VmControlError::Integrity(IntegrityError::Range(_) | IntegrityError::Slots(_)) => 422,
        _ => 500,
    };
    (status, json!({"error": e.to_string()}))
}

/// `POST /v1/integrity/ranges`.
fn protect(vm: &Vm, body: &[u8]) -> (u16, Value) {
    let range = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("range").and_then(|r| r.as_str()).map(str::to_string));
    let Some(range) = range else {
        return (
            400,
            json!({"error": "the body must be JSON like {\"range\": \"0x100000-0x106000\"} (START-END or START+LENGTH)"}),
        );
    };
    let (start, end) = match kvm_vmm::integrity::ranges::parse(&range) {
        Ok(r) => r,
        Err(e) => return integrity_error(IntegrityError::from(e).into()),
    };
    match vm.protect_code(start, end) {
        Ok(r) => (201, json!({"protected": r, "integrity": vm.integrity()})),
        Err(e) => integrity_error(e),
    }
}

/// Maps one request to its response; pure apart from the VM calls, so tests can drive it.
pub fn route(ctx: &ApiContext, method: &tiny_http::Method, url: &str, body: &[u8]) -> (u16, Value) {
    use tiny_http::Method::{Get, Post};
    let vm = &ctx.vm;
    let path = url.split('?').next().unwrap_or(url).trim_end_matches('/');
    if path == "/v1/patches" || path.starts_with("/v1/patches/") {
        return route_patches(ctx, method, path, body);
    }
    match (path, method) {
        ("/v1/vm", Get) => (200, json!(vm.status())),
        ("/v1/vm/pause", Post) => match vm.pause() {
            Ok((info, _)) => (
                200,
                json!({"state": "paused", "park_us": info.park_us, "vcpus": info.vcpus}),
            ),
            Err(e) => control_error(e),
        },
        ("/v1/vm/resume", Post) => match vm.resume() {
            Ok(info) => (
                200,
                json!({"state": "running", "blackout_us": info.blackout_us}),
            ),
            Err(e) => control_error(e),
        },
        ("/v1/integrity", Get) => (200, json!(vm.integrity())),
        ("/v1/integrity/ranges", Post) => protect(vm, body),
        ("/v1/metrics", Get) => {
            let patches = ctx.engine.as_ref().map(|e| {
                e.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .metrics()
            });
            (
                200,
                json!({"pause": vm.pause_metrics(), "patches": patches, "integrity": vm.integrity_metrics()}),
            )
        }
        (
            "/v1/vm"
            | "/v1/vm/pause"
            | "/v1/vm/resume"
            | "/v1/metrics"
            | "/v1/integrity"
            | "/v1/integrity/ranges",
            _,
        ) => (
            405,
            json!({"error": format!("method {method} is not allowed on {path}")}),
        ),
        _ => (
            404,
            json!({"error": format!("no such endpoint {path}; try GET /v1/vm, POST /v1/vm/pause, POST /v1/vm/resume, GET /v1/metrics, GET/POST /v1/patches, GET /v1/integrity")}),
        ),
    }
}
