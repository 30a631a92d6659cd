//! Fuzz target: what a client sends the control API, through the server's own code: the
//! request reader (`control_api::http::read_request`: head, bounds, `Content-Length` body,
//! `Expect: 100-continue`), the whole exchange (`http::serve`: read, route, write the reply),
//! the route table (`server::resolve`) and the one body the router parses itself
//! (`server::protect_range`). All in memory: no socket, no /dev/kvm, no VM (the handler
//! stands in for `route`, which needs one).
//!
//! Input: one control byte, then the bytes of the connection. Control bits: `0x80` the client
//! stalls at the end (a read timeout) instead of closing; `0x40` small limits (so the header
//! bounds are reachable within libFuzzer's input size); `0x3f` the most bytes one read returns
//! (0: as many as asked; never under 1/64 of the input), so a request arrives split.
//!
//! Checked, beyond "never panics": whether a request is read, and which, does not depend on how
//! its bytes arrive (at once, or split); every resolved route is in `ROUTES` with its `{id}`;
//! every refusal is 404 or 405; every answer written is one HTTP/1.1 response with its status
//! and an exact `Content-Length`.
#![no_main]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use control_api::http::{self, Handler, Limits, ReadFailure, Request};
use control_api::server::{Endpoint, ErrorKind, ROUTES, Reply, protect_range, resolve};
use libfuzzer_sys::fuzz_target;

/// A client connection in memory: reads return at most `cap` bytes of `input` (0: any), then
/// end (or time out, `stall`); what the server writes is kept.
struct Conn<'a> {
    input: &'a [u8],
    cap: usize,
    stall: bool,
    written: Vec<u8>,
}

impl<'a> Conn<'a> {
    fn new(input: &'a [u8], cap: usize, stall: bool) -> Self {
        Conn {
            input,
            cap,
            stall,
            written: Vec::new(),
        }
    }
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.input.is_empty() {
            return if self.stall {
                Err(std::io::ErrorKind::TimedOut.into())
            } else {
                Ok(0)
            };
        }
        let mut n = buf.len().min(self.input.len());
        if self.cap > 0 {
            n = n.min(self.cap);
        }
        let (now, later) = self.input.split_at(n);
        buf[..n].copy_from_slice(now);
        self.input = later;
        Ok(n)
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stands in for the server's `route`: resolves the request and checks what the table says.
fn handle(method: &str, url: &str, body: &[u8]) -> Reply {
    match resolve(method, url) {
        Ok((endpoint, id)) => {
            let route = ROUTES
                .iter()
                .find(|r| r.endpoint == endpoint && r.method.eq_ignore_ascii_case(method))
                .unwrap_or_else(|| panic!("{method} {url} resolved to {endpoint:?}, not a route"));
            let path = url.split(['?', '#']).next().unwrap_or("");
            if route.path.contains("{id}") {
                assert!(!id.is_empty(), "{method} {url}: empty id");
                assert!(!id.contains(['/', '?', '#']), "{method} {url}: id {id:?}");
                assert!(
                    path.split('/').any(|s| s == id),
                    "{method} {url}: id {id:?}"
                );
            } else {
                assert!(id.is_empty(), "{method} {url}: id {id:?} on {}", route.path);
            }
            if endpoint == Endpoint::Protect {
                match protect_range(body) {
                    Ok((start, end)) => assert!(start < end, "{start:#x}-{end:#x}"),
                    Err(f) => assert_eq!(f.kind, ErrorKind::BadRequest, "{}", f.message),
                }
            }
            Reply {
                status: 200,
                body: serde_json::json!({"endpoint": format!("{endpoint:?}"), "id": id}),
                retry_after: None,
            }
        }
        Err(fault) => {
            assert!(
                matches!(
                    fault.kind,
                    ErrorKind::NotFound | ErrorKind::MethodNotAllowed
                ),
                "{method} {url}: {:?}",
                fault.kind
            );
            fault.into()
        }
    }
}

/// Checks that `out` is what `serve` says it wrote: nothing, or (after an optional
/// `100 Continue`) one response with that status and exactly `Content-Length` body bytes.
fn check_answer(out: &[u8], status: Option<u16>) {
    let Some(status) = status else {
        assert!(
            out.is_empty() || out == b"HTTP/1.1 100 Continue\r\n\r\n",
            "{out:?}"
        );
        return;
    };
    let out = out
        .strip_prefix(b"HTTP/1.1 100 Continue\r\n\r\n".as_slice())
        .unwrap_or(out);
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("answer not UTF-8: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head: {text:?}"));
    assert!(
        head.starts_with(&format!("HTTP/1.1 {status} ")),
        "status {status}: {head:?}"
    );
    let length = head
        .split("\r\n")
        .find_map(|h| h.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
    assert_eq!(length, body.len(), "{text:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let stall = control & 0x80 != 0;
    let limits = if control & 0x40 != 0 {
        Limits {
            max_header_bytes: 256,
            max_headers: 4,
            ..Limits::default()
        }
    } else {
        Limits::default()
    };
    // Never reached in memory (reads do not wait), but keep the deadline out of the way.
    let limits = Limits {
        request_deadline: Duration::from_secs(3600),
        ..limits
    };
    // The server parses the whole head again after each read, so reads of a byte or two make
    // a long input cost quadratic time; at least 1/64 of the input per read keeps an execution
    // at most 65 reads (split points stay arbitrary in short inputs, where bounds are crossed).
    let cap = match usize::from(control & 0x3f) {
        0 => 0,
        c => c.max(input.len() / 64),
    };

    // The whole exchange, the request arriving split every `cap` bytes; the handler keeps
    // what it was given.
    let seen: Arc<Mutex<Option<Request>>> = Arc::default();
    let keep = seen.clone();
    let handler: Handler = Arc::new(move |method: &str, url: &str, body: &[u8]| {
        let reply = handle(method, url, body);
        *keep.lock().unwrap_or_else(PoisonError::into_inner) = Some(Request {
            method: method.to_string(),
            url: url.to_string(),
            body: body.to_vec(),
        });
        reply
    });
    let mut conn = Conn::new(input, cap, stall);
    let status = http::serve(&mut conn, &handler, &limits);
    check_answer(&conn.written, status);
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).take();

    // The same bytes read at once: the same request, or both refused, or both gone.
    let whole = http::read_request(&mut Conn::new(input, 0, stall), &limits, Instant::now());
    match (&whole, &seen, status) {
        (Ok(a), Some(b), Some(_)) => assert_eq!(a, b),
        (Err(ReadFailure::Answer(_)), None, Some(_)) | (Err(ReadFailure::Gone), None, None) => {}
        _ => panic!(
            "read at once: {whole:?}; split every {cap} bytes: {seen:?}, answered {status:?}"
        ),
    }
});
