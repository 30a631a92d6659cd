//! A client for QEMU's machine protocol (QMP) on a Unix socket: the VM's run state and its
//! vCPUs, its character devices, HMP commands (`human-monitor-command`), and `stop`/`cont` (the
//! peer floor the benchmarks compare against).
//!
//! A QMP socket serves one client at a time. QEMU leaves later clients waiting in the socket's
//! queue, without a greeting, until the first one leaves; once the queue is full a connect
//! fails at once. Both are reported as [`QmpError::Busy`].

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
    #[error(
        "QEMU's QMP socket {path} is held by another client: QEMU serves one client per QMP \
         socket, and {why}. Close the other client (or start QEMU with a second -qmp socket for \
         vmm) and try again"
    )]
    Busy { path: String, why: String },
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

/// One character device as `query-chardev` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpChardev {
    /// Its id: `gdb` for the gdbstub's socket (`-gdb`, HMP `gdbserver`).
    pub label: String,
    /// What it is connected to, e.g. `disconnected:unix:/run/x/gdb.sock,server=on`.
    pub filename: String,
}

/// Events from an earlier client tolerated before the greeting.
const MAX_STALE_EVENTS: usize = 64;

/// How long the greeting may take. QEMU greets a client as soon as it accepts it, so a
/// connection without one is queued behind another client.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refused connect is retried. QEMU creates its socket file (`bind`) a moment
/// before it listens on it, and a connect in between is refused; on a loaded host that moment
/// has reached CI. A socket file nobody listens on (QEMU gone) fails after this wait.
pub const LISTEN_SETTLE: Duration = Duration::from_secs(1);

/// Between the retries of a refused connect.
const LISTEN_POLL: Duration = Duration::from_millis(10);

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let busy = |why: String| QmpError::Busy {
            path: path.display().to_string(),
            why,
        };
        let stream = connect_when_listening(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                busy("its queue of waiting clients is full".into())
            } else {
                QmpError::Connect {
                    path: path.display().to_string(),
                    source,
                }
            }
        })?;
        let greeting = timeout.min(GREETING_TIMEOUT);
        stream.set_read_timeout(Some(greeting))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut qmp = Qmp { stream, reader };
        // QEMU's monitor socket serves one client at a time and may still flush an event meant
        // for the previous one (seen: a RESUME) before the new client's greeting: skip events.
        let mut skipped = 0;
        loop {
            let line = match qmp.line() {
                Err(QmpError::Io(e)) if is_timeout(&e) => {
                    return Err(busy(format!(
                        "it sent this connection no greeting within {greeting:?} (or QEMU is hung)"
                    )));
                }
                r => r?,
            };
            if line.get("QMP").is_some() {
                break;
            }
            skipped += 1;
            if line.get("event").is_none() || skipped > MAX_STALE_EVENTS {
                return Err(QmpError::Malformed(line.to_string()));
            }
        }
        qmp.stream.set_read_timeout(Some(timeout))?;
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

    /// Every character device (`query-chardev`).
    pub fn chardevs(&mut self) -> Result<Vec<QmpChardev>, QmpError> {
        let r = self.execute("query-chardev", json!({}))?;
        let list = r
            .as_array()
            .ok_or_else(|| QmpError::Malformed(r.to_string()))?;
        list.iter()
            .map(|c| {
                let text = |k: &str| {
                    c.get(k)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| QmpError::Malformed(c.to_string()))
                };
                Ok(QmpChardev {
                    label: text("label")?,
                    filename: text("filename")?,
                })
            })
            .collect()
    }

    /// Runs one HMP command (`human-monitor-command`) and returns its output. HMP reports most
    /// failures only in that text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let r = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        r.as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Malformed(r.to_string()))
    }

    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", json!({})).map(|_| ())
    }

    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", json!({})).map(|_| ())
    }
}

/// A blocking connection to the Unix socket `path`, made without blocking: when the listener's
/// queue is full a blocking connect would wait for a free slot without end; this one fails at
/// once with `WouldBlock`.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    // A Unix stream connect completes at once or fails (EAGAIN: the queue is full).
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// [`connect_nonblocking`], retried for [`LISTEN_SETTLE`] while the socket file exists and the
/// connect is refused (bound, not yet listening).
fn connect_when_listening(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = std::time::Instant::now() + LISTEN_SETTLE;
    loop {
        match connect_nonblocking(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && path.exists()
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(LISTEN_POLL);
            }
            r => return r,
        }
    }
}

/// Whether a read failed because its timeout passed (`EAGAIN` on Linux).
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake QMP server: writes `before` lines, the greeting, then answers each command.
    fn serve(before: &'static [&'static str]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("qmp-test-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            for l in before {
                writeln!(s, "{l}").expect("write");
            }
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).expect("greet");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let reply = if line.contains("query-status") {
                    r#"{"event": "STOP"}
{"return": {"status": "running"}}"#
                } else {
                    r#"{"return": {}}"#
                };
                writeln!(s, "{reply}").expect("reply");
                line.clear();
            }
        });
        (dir, path)
    }

    #[test]
    fn events_before_the_greeting_and_between_replies_are_skipped() {
        let (_dir, path) = serve(&[r#"{"event": "RESUME", "timestamp": {"seconds": 1}}"#]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        assert_eq!(q.status().expect("status"), "running");
    }

    #[test]
    fn a_socket_held_by_another_client_is_named_as_busy() {
        // A listener that never accepts: the connection waits in its queue without a greeting,
        // as behind QEMU's current QMP client.
        let dir = tempfile::Builder::new()
            .prefix("qmp-test-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).expect("bind");
        let err = Qmp::connect(&path, Duration::from_millis(200))
            .err()
            .expect("no greeting");
        assert!(matches!(err, QmpError::Busy { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&path.display().to_string())
                && text.contains("held by another client")
                && text.contains("Close the other client"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_socket_is_a_connect_error() {
        let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1))
            .err()
            .expect("no socket");
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    }

    /// A socket bound but not yet listening, as QEMU's is for a moment after its file appears.
    fn bound_only(path: &Path) -> rustix::fd::OwnedFd {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
        let fd =
            rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).expect("socket");
        rustix::net::bind(&fd, &SocketAddrUnix::new(path).expect("address")).expect("bind");
        fd
    }

    #[test]
    fn a_socket_that_starts_listening_a_moment_after_its_file_appears_is_connected() {
        let dir = tempfile::Builder::new()
            .prefix("qmp-test-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let fd = bound_only(&path);
        assert_eq!(
            connect_nonblocking(&path).err().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused),
            "a bound socket refuses until it listens"
        );
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            rustix::net::listen(&fd, 1).expect("listen");
            let listener = UnixListener::from(fd);
            let (mut s, _) = listener.accept().expect("accept");
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).expect("greet");
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            r.read_line(&mut line).expect("qmp_capabilities");
            writeln!(s, r#"{{"return": {{}}}}"#).expect("reply");
        });
        Qmp::connect(&path, Duration::from_secs(5)).expect("connected once it listens");
        server.join().expect("server");
    }

    #[test]
    fn a_socket_file_nobody_listens_on_is_a_connect_error_after_the_settle_time() {
        let dir = tempfile::Builder::new()
            .prefix("qmp-test-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("qmp.sock");
        drop(bound_only(&path));
        assert!(path.exists(), "the stale file stays");
        let t = std::time::Instant::now();
        let err = Qmp::connect(&path, Duration::from_secs(5))
            .err()
            .expect("nobody listens");
        assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
        assert!(
            t.elapsed() >= LISTEN_SETTLE,
            "retried for {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn anything_else_before_the_greeting_is_refused() {
        let (_dir, path) = serve(&[r#"{"hello": 1}"#]);
        assert!(matches!(
            Qmp::connect(&path, Duration::from_secs(5)),
            Err(QmpError::Malformed(_))
        ));
    }
}
