//! A client for QEMU's machine protocol (QMP) on a Unix socket: the VM's run state and its
//! vCPUs, and `stop`/`cont` (the peer floor the benchmarks compare against).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QMP at {path}; start QEMU with -qmp unix:{path},server=on,wait=off")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the QMP connection failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not a QMP message: {0}")]
    Malformed(String),
    #[error("QMP refused {command}: {message}")]
    Refused { command: String, message: String },
}

pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

/// One vCPU as `query-cpus-fast` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpCpu {
    pub index: u64,
    /// The host thread running it.
    pub thread_id: u64,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut qmp = Qmp { stream, reader };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Malformed(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value, QmpError> {
        let mut text = String::new();
        if self.reader.read_line(&mut text)? == 0 {
            return Err(QmpError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QEMU closed the QMP socket",
            )));
        }
        serde_json::from_str(&text).map_err(|_| QmpError::Malformed(text.trim().to_string()))
    }

    /// Runs one command and returns its `return` value; events in between are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = json!({"execute": command, "arguments": arguments});
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no description")
                        .to_string(),
                });
            }
        }
    }

    /// The run state (`running`, `paused`, `debug`, `shutdown`, ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", json!({}))?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Malformed(r.to_string()))
    }

    pub fn cpus(&mut self) -> Result<Vec<QmpCpu>, QmpError> {
        let r = self.execute("query-cpus-fast", json!({}))?;
        let list = r
            .as_array()
            .ok_or_else(|| QmpError::Malformed(r.to_string()))?;
        list.iter()
            .map(|c| {
                Ok(QmpCpu {
                    index: c
                        .get("cpu-index")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| QmpError::Malformed(c.to_string()))?,
                    thread_id: c.get("thread-id").and_then(Value::as_u64).unwrap_or(0),
                })
            })
            .collect()
    }

    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", json!({})).map(|_| ())
    }

    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", json!({})).map(|_| ())
    }
}
