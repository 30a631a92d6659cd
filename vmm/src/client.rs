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
    #[error("no VMM is listening on {path} ({source}); start one with `vmm run --api-sock {path}`")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the VMM on {path} failed: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM sent a malformed response: {0}")]
    Malformed(String),
    #[error("the VMM refused the request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
}

/// The API as a client sees it.
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(path: &Path) -> Self {
        ApiClient {
            path: path.to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends one request and returns the status and the JSON body.
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Value), ClientError> {
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
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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
        let body = &raw[header_len..];
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ClientError::Malformed(format!("body is not JSON: {e}")))?
        };
        Ok((status, value))
    }

    /// Sends a request; a non-2xx answer becomes `ClientError::Refused` with the server's message.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Value, ClientError> {
        let (status, value) = self.raw(method, path, body)?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            Err(ClientError::Refused { status, message })
        }
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

    pub fn metrics(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/metrics", b"")
    }

    /// Applies a patch file (its bytes, as read from disk).
    pub fn apply(&self, patch: &[u8]) -> Result<Value, ClientError> {
        self.call("POST", "/v1/patches", patch)
    }

    pub fn patches(&self) -> Result<Value, ClientError> {
        self.call("GET", "/v1/patches", b"")
    }

    /// Reverts a patch by id or unique id prefix.
    pub fn revert(&self, id: &str) -> Result<Value, ClientError> {
        let id: String = id.chars().filter(char::is_ascii_hexdigit).collect();
        self.call("POST", &format!("/v1/patches/{id}/revert"), b"")
    }
}
