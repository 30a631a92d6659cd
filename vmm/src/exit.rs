//! The `vmm` command's exit statuses, chosen from the typed errors in an anyhow chain.

use control_api::client::ClientError;
use patch_engine::EngineError;
use patch_engine::journal::JournalError;
use qemu_backend::{QemuError, QmpError, RspError};

/// Shown under `vmm --help`; README.md lists the same.
pub const HELP: &str = "\
Exit status:
  0  success
  1  failure (anything not listed below)
  2  usage error (bad arguments)
  3  refused: the patch was checked and not applied (signature, wrong target,
     plan refusal, conflict with an applied patch, arena full, tampered code)
  4  busy: try again later (vCPUs in the way, VM paused, state dir locked,
     QEMU's QMP socket held by another client)
  5  unreachable: no VMM on the API socket, or QEMU's gdbstub/QMP cannot be reached
  6  not found: no such patch (or a file named on the command line is missing)
`vmm run` exits with the guest's status instead.";

pub const FAILURE: u8 = 1;
pub const REFUSED: u8 = 3;
pub const BUSY: u8 = 4;
pub const UNREACHABLE: u8 = 5;
pub const NOT_FOUND: u8 = 6;

/// An error answer of the control API, with the server's machine-readable `kind` when it sent
/// one (`{"fault_message", "kind"}`; older servers sent `{"error"}`, with `kind` on engine
/// errors only).
#[derive(Debug, thiserror::Error)]
#[error("the VMM refused the request (HTTP {status}): {message}")]
pub struct ApiFailure {
    pub status: u16,
    pub kind: Option<String>,
    pub message: String,
}

impl ApiFailure {
    /// Reads an error answer's body.
    pub fn from_body(status: u16, body: &serde_json::Value) -> ApiFailure {
        let text = |k: &str| body.get(k).and_then(serde_json::Value::as_str);
        ApiFailure {
            status,
            kind: text("kind").map(str::to_string),
            message: text("fault_message")
                .or_else(|| text("error"))
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string()),
        }
    }
}

/// The class of an error kind (the API's `kind`, also `control_api::server::engine_kind`).
fn from_kind(kind: &str) -> Option<u8> {
    Some(match kind {
        "malformed" | "signature" | "wrong_target" | "refused" | "conflict" | "arena_full"
        | "tampered" => REFUSED,
        "busy" => BUSY,
        "not_found" => NOT_FOUND,
        "internal" => FAILURE,
        _ => return None,
    })
}

/// The class of an HTTP error status, when the body names no kind.
fn from_status(status: u16) -> u8 {
    match status {
        409 | 429 | 503 => BUSY,
        404 => NOT_FOUND,
        400..=499 => REFUSED,
        _ => FAILURE,
    }
}

fn from_io(e: &std::io::Error) -> Option<u8> {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | TimedOut => {
            Some(UNREACHABLE)
        }
        NotFound => Some(NOT_FOUND),
        _ => None,
    }
}

/// The exit status for `err`: the first error in its chain with a known class decides.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<ApiFailure>() {
            return f
                .kind
                .as_deref()
                .and_then(from_kind)
                .unwrap_or_else(|| from_status(f.status));
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return match e {
                ClientError::Connect { .. } | ClientError::Io { .. } => UNREACHABLE,
                ClientError::Malformed(_) => FAILURE,
                ClientError::Refused { status, kind, .. } => kind
                    .as_deref()
                    .and_then(from_kind)
                    .unwrap_or_else(|| from_status(*status)),
            };
        }
        if let Some(e) = cause.downcast_ref::<EngineError>() {
            return match e {
                EngineError::Journal(JournalError::Locked { .. }) => BUSY,
                EngineError::Guest(_) => continue,
                // The API's typed mapping: one table of engine errors to kinds.
                _ => from_kind(control_api::server::engine_kind(e).as_str()).unwrap_or(FAILURE),
            };
        }
        if let Some(kvm_vmm::vm::VmError::Disk(kvm_vmm::devices::virtio::DiskError::Missing {
            ..
        })) = cause.downcast_ref::<kvm_vmm::vm::VmError>()
        {
            return NOT_FOUND;
        }
        if let Some(JournalError::Locked { .. }) = cause.downcast_ref::<JournalError>() {
            return BUSY;
        }
        if let Some(e) = cause.downcast_ref::<QemuError>() {
            match e {
                QemuError::Gdb(RspError::Connect { .. } | RspError::ConnectUnix { .. })
                | QemuError::Qmp(QmpError::Connect { .. }) => {
                    return UNREACHABLE;
                }
                QemuError::NotRunning(_) | QemuError::Qmp(QmpError::Busy { .. }) => return BUSY,
                _ => {}
            }
        }
        if matches!(
            cause.downcast_ref::<qemu_backend::qmp::QmpError>(),
            Some(qemu_backend::qmp::QmpError::Busy { .. })
        ) {
            return BUSY;
        }
        if matches!(
            cause.downcast_ref::<qemu_backend::qmp::QmpError>(),
            Some(qemu_backend::qmp::QmpError::Connect { .. })
        ) || matches!(
            cause.downcast_ref::<qemu_backend::rsp::RspError>(),
            Some(
                qemu_backend::rsp::RspError::Connect { .. }
                    | qemu_backend::rsp::RspError::ConnectUnix { .. }
            )
        ) {
            return UNREACHABLE;
        }
        if let Some(code) = cause.downcast_ref::<std::io::Error>().and_then(from_io) {
            return code;
        }
    }
    FAILURE
}

/// `err` and its causes on one line, `what: why: root cause`, each cause once: a cause whose
/// text an outer message already quotes (some library errors still include their source in
/// their own message) is not repeated.
pub fn render(err: &anyhow::Error) -> String {
    join_causes(err.chain())
}

/// [`render`] for a typed error and its sources.
pub fn render_error(err: &(dyn std::error::Error + 'static)) -> String {
    join_causes(std::iter::successors(Some(err), |e| e.source()))
}

fn join_causes<'a>(causes: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut text = String::new();
    for cause in causes {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_prints_each_cause_once() {
        let gone = ClientError::Connect {
            path: "/nonexistent".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let text = render_error(&gone);
        assert_eq!(text.matches("os error 2").count(), 1, "{text}");
        assert!(text.contains("/nonexistent"), "{text}");
        assert_eq!(render(&anyhow::Error::new(gone)), text);
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOENT))
            .context("cannot read p.hpatch");
        assert_eq!(
            render(&e),
            format!(
                "cannot read p.hpatch: {}",
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
    }

    fn api(status: u16, body: serde_json::Value) -> anyhow::Error {
        anyhow::Error::new(ApiFailure::from_body(status, &body)).context("applying p.hpatch")
    }

    #[test]
    fn api_kind_decides_and_status_is_the_fallback() {
        assert_eq!(
            code(&api(
                403,
                serde_json::json!({"fault_message": "x", "kind": "signature"})
            )),
            REFUSED
        );
        assert_eq!(
            code(&api(
                409,
                serde_json::json!({"fault_message": "x", "kind": "conflict"})
            )),
            REFUSED
        );
        assert_eq!(
            code(&api(409, serde_json::json!({"error": "x", "kind": "busy"}))),
            BUSY
        );
        assert_eq!(
            code(&api(
                404,
                serde_json::json!({"fault_message": "x", "kind": "not_found"})
            )),
            NOT_FOUND
        );
        assert_eq!(
            code(&api(
                500,
                serde_json::json!({"fault_message": "x", "kind": "internal"})
            )),
            FAILURE
        );
        // No kind, or one this binary does not know: the status decides.
        assert_eq!(code(&api(503, serde_json::json!({"error": "x"}))), BUSY);
        assert_eq!(
            code(&api(
                429,
                serde_json::json!({"error": "x", "kind": "new_kind"})
            )),
            BUSY
        );
        assert_eq!(
            code(&api(404, serde_json::json!({"error": "x"}))),
            NOT_FOUND
        );
        assert_eq!(code(&api(422, serde_json::json!({"error": "x"}))), REFUSED);
        assert_eq!(code(&api(500, serde_json::json!({"error": "x"}))), FAILURE);
    }

    #[test]
    fn client_engine_and_io_errors() {
        let gone = ClientError::Connect {
            path: "/nonexistent".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            code(&anyhow::Error::new(gone).context("status")),
            UNREACHABLE
        );
        let refused = ClientError::Refused {
            status: 409,
            kind: None,
            message: "paused".into(),
        };
        assert_eq!(code(&anyhow::Error::new(refused)), BUSY);
        let typed = ClientError::Refused {
            status: 503,
            kind: Some("refused".into()),
            message: "site outside code".into(),
        };
        assert_eq!(code(&anyhow::Error::new(typed)), REFUSED);
        assert_eq!(code(&anyhow::Error::new(EngineError::Unsigned)), REFUSED);
        let busy = EngineError::Busy {
            attempts: 50,
            why: "rip in site".into(),
        };
        assert_eq!(code(&anyhow::Error::new(busy)), BUSY);
        assert_eq!(
            code(&anyhow::Error::new(EngineError::NoSuchPatch("abcd".into()))),
            NOT_FOUND
        );
        let locked = EngineError::Journal(JournalError::Locked {
            dir: "/s".into(),
            holder: Some(7),
        });
        assert_eq!(code(&anyhow::Error::new(locked)), BUSY);
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            code(&anyhow::Error::new(missing).context("cannot read p.hpatch")),
            NOT_FOUND
        );
        let qmp = QemuError::Qmp(QmpError::Connect {
            path: "/q".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(code(&anyhow::Error::new(qmp)), UNREACHABLE);
        assert_eq!(
            code(&anyhow::Error::new(QemuError::NotRunning("paused".into()))),
            BUSY
        );
        let held = QemuError::Qmp(QmpError::Busy {
            path: "/q".into(),
            why: "it sent no greeting".into(),
        });
        assert_eq!(code(&anyhow::Error::new(held)), BUSY);
        let gdb = QemuError::Gdb(RspError::ConnectUnix {
            path: "/g".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(code(&anyhow::Error::new(gdb)), UNREACHABLE);
        assert_eq!(code(&anyhow::anyhow!("something else")), FAILURE);
    }
}
