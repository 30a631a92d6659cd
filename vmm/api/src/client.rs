//! A small HTTP/1.1 client for the control API over its Unix socket (used by the CLI, tests and
//! benchmarks). One request per connection, `Connection: close`, responses parsed with httparse.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

/// Responses larger than this are refused.
const MAX_RESPONSE: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no VMM is listening on {path}; start one with `vmm run --api-sock {path}`")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the VMM on {path} failed; is it still running?")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM sent a malformed response: {0}")]
    Malformed(String),
    #[error("the VMM refused the request (HTTP {status}): {message}")]
    Refused {
        status: u16,
        /// The error body's `kind` (absent from servers older than the `fault_message` body).
        kind: Option<String>,
        message: String,
    },
}

/// The API as a client sees it.
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

/// Decodes an HTTP/1.1 chunked body (other servers than ours may send one).
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, ClientError> {
    let bad = || ClientError::Malformed("bad chunked encoding".into());
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&b[..line_end]).map_err(|_| bad())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad())?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or_else(bad)?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or_else(bad)?;
    }
}

/// A 2xx answer's body, or the error it carries: `{"fault_message", "kind"}`, or the older
/// `{"error", "kind"?}` of servers before that body.
fn answer(status: u16, value: Value) -> Result<Value, ClientError> {
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let message = value
        .get("fault_message")
        .or_else(|| value.get("error"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string());
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .map(str::to_string);
    Err(ClientError::Refused {
        status,
        kind,
        message,
    })
}

impl ApiClient {
    pub fn new(path: &Path) -> Self {
        ApiClient {
            path: path.to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends one request (a JSON body, if any) and returns the status and the JSON body.
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Value), ClientError> {
        self.raw_typed(method, path, "application/json", body)
    }

    /// Sends one request with the given `Content-Type` and returns the status and JSON body.
    pub fn raw_typed(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<(u16, Value), ClientError> {
        let shown = self.path.display().to_string();
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: shown.clone(),
                source,
            })?;
        let io = |source| ClientError::Io {
            path: shown.clone(),
            source,
        };
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .map_err(io)?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let header_len = match resp.parse(&raw) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(ClientError::Malformed("truncated response".into()));
            }
            Err(e) => return Err(ClientError::Malformed(e.to_string())),
        };
        let status = resp
            .code
            .ok_or_else(|| ClientError::Malformed("no status code".into()))?;
        let chunked = resp.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && String::from_utf8_lossy(h.value)
                    .to_ascii_lowercase()
                    .contains("chunked")
        });
        let body = if chunked {
            dechunk(&raw[header_len..])?
        } else {
            raw[header_len..].to_vec()
        };
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ClientError::Malformed(format!("body is not JSON: {e}")))?
        };
        Ok((status, value))
    }

    /// Sends a request; a non-2xx answer becomes `ClientError::Refused` with the server's message.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Value, ClientError> {
        let (status, value) = self.raw(method, path, body)?;
        answer(status, value)
    }

    /// `GET /v1/version`: the VMM's version, the patch-format versions it accepts, features.
    pub fn version(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/version", b"")
    }

    pub fn status(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/vm", b"")
    }

    pub fn pause(&self) -> Result<Value, ClientError> {
        self.call("POST", "/v1/vm/pause", b"")
    }

    pub fn resume(&self) -> Result<Value, ClientError> {
        self.call("POST", "/v1/vm/resume", b"")
    }

    /// Parks and releases the vCPUs at once; the reply has the blackout (the patching floor).
    pub fn pause_resume(&self) -> Result<Value, ClientError> {
        self.call("POST", "/v1/vm/pause-resume", b"")
    }

    pub fn metrics(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/metrics", b"")
    }

    /// Applies a patch file (its bytes, as read from disk).
    pub fn apply(&self, patch: &[u8]) -> Result<Value, ClientError> {
        let (status, value) =
            self.raw_typed("POST", "/v1/patches", "application/octet-stream", patch)?;
        answer(status, value)
    }

    pub fn patches(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/patches", b"")
    }

    /// Reverts a patch by id or unique id prefix.
    pub fn revert(&self, id: &str) -> Result<Value, ClientError> {
        let id: String = id.chars().filter(char::is_ascii_hexdigit).collect();
        self.call("POST", &format!("/v1/patches/{id}/revert"), b"")
    }

    pub fn integrity(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/integrity", b"")
    }

    /// Protects one more guest-physical range (`START-END` or `START+LENGTH`).
    pub fn protect(&self, range: &str) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "range": range }).to_string();
        self.call("POST", "/v1/integrity/ranges", body.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_and_refuses_broken_chunks() {
        let body = b"4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).ok(), Some(b"{\"a\":1}".to_vec()));
        assert!(dechunk(b"zz\r\nabc").is_err());
        assert!(dechunk(b"10\r\nshort").is_err());
        assert!(dechunk(b"").is_err());
    }

    #[test]
    fn parses_the_fault_body_and_the_old_error_body() {
        let new = serde_json::json!({"fault_message": "no patch ab", "kind": "not_found"});
        match answer(404, new) {
            Err(ClientError::Refused {
                status,
                kind,
                message,
            }) => {
                assert_eq!((status, kind.as_deref()), (404, Some("not_found")));
                assert_eq!(message, "no patch ab");
            }
            other => panic!("{other:?}"),
        }
        let old = serde_json::json!({"error": "busy: try again"});
        match answer(503, old) {
            Err(ClientError::Refused {
                status,
                kind,
                message,
            }) => {
                assert_eq!((status, kind), (503, None));
                assert_eq!(message, "busy: try again");
            }
            other => panic!("{other:?}"),
        }
        let ok = serde_json::json!({"state": "running"});
        assert_eq!(answer(200, ok.clone()).ok(), Some(ok));
    }
}
