//! A client for QEMU's gdbstub (the GDB remote serial protocol over TCP or a Unix socket),
//! all-stop mode.
//!
//! Only what the patch engine needs: halt every vCPU (`0x03` → a stop reply), read the
//! registers of each vCPU (`Hg` + `g`, laid out by the target description QEMU sends), set RIP
//! (`P`), read and write guest-physical memory (QEMU's `Qqemu.PhyMemMode:1` — sic), continue
//! (`c`). QEMU 7.2 does not offer no-ack mode, so every packet is acknowledged with `+`.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use thiserror::Error;

/// Largest memory transfer per packet: QEMU's packet buffer is 4 KiB of hex.
const MAX_CHUNK: usize = 1024;
/// Longest packet accepted: far above anything QEMU sends (its buffer is 4 KiB), so a stub
/// that never ends a packet cannot make us buffer without bound.
const MAX_PACKET: usize = 1 << 20;
/// How often a packet is sent (or its retransmission awaited) before a NAKing link is given up.
const MAX_TRANSMISSIONS: usize = 3;

#[derive(Debug, Error)]
pub enum RspError {
    #[error(
        "cannot connect to QEMU's gdbstub at {addr}: start QEMU with -gdb tcp:{addr} (or -s for :1234)"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot connect to QEMU's gdbstub at unix:{path}: start QEMU with -gdb unix:{path},server=on,wait=off (or give only --qmp: vmm then starts a gdbstub itself)"
    )]
    ConnectUnix {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gdbstub connection failed")]
    Io(#[from] std::io::Error),
    #[error("the gdbstub sent a malformed packet: {0}")]
    Malformed(String),
    #[error("the gdbstub refused {request}: {reply}")]
    Refused { request: String, reply: String },
    #[error(
        "the gdbstub's target description {annex} is not well-formed XML: QEMU or the stub is \
         broken, report it with the QEMU version"
    )]
    TargetXml {
        annex: String,
        #[source]
        source: quick_xml::Error,
    },
    #[error("QEMU's gdbstub lacks {0}, which the patch engine needs (QEMU 7.2 or newer has it)")]
    Unsupported(&'static str),
    #[error("the guest exited while attached ({0})")]
    Exited(String),
}

/// Register layout from the target description: byte offsets of what we need in a `g` reply,
/// and register numbers for `P`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegLayout {
    pub regs: Vec<(
        String,
        usize, /* regnum */
        usize, /* offset */
        usize, /* bytes */
    )>,
}

/// How deep `<xi:include>`s may nest (QEMU uses one level: target.xml includes the rest).
const MAX_INCLUDE_DEPTH: usize = 4;

impl RegLayout {
    /// Parses one target description: its `<reg name=… bitsize=… [regnum=…]/>` elements in
    /// document order (a `regnum` sets the number, later registers count on from it). XML
    /// comments are skipped; an `<xi:include>` is refused (use [`RegLayout::from_target`]).
    pub fn parse(xml: &str) -> Result<RegLayout, RspError> {
        Self::from_target(xml, |href| {
            Err(RspError::Malformed(format!(
                "the target description includes {href:?}, which cannot be fetched here"
            )))
        })
    }

    /// Parses the target description `target` (QEMU's target.xml), expanding each
    /// `<xi:include href=…/>` in place with the document `fetch` returns for it.
    pub fn from_target(
        target: &str,
        mut fetch: impl FnMut(&str) -> Result<String, RspError>,
    ) -> Result<RegLayout, RspError> {
        let mut regs = Vec::new();
        let mut next = 0usize;
        collect_regs(target, "target.xml", 0, &mut fetch, &mut regs, &mut next)?;
        regs.sort_by_key(|r| r.1);
        let mut offset = 0;
        Ok(RegLayout {
            regs: regs
                .into_iter()
                .map(|(name, num, bytes)| {
                    let r = (name, num, offset, bytes);
                    offset += bytes;
                    r
                })
                .collect(),
        })
    }

    pub fn find(&self, name: &str) -> Option<(usize, usize, usize)> {
        self.regs
            .iter()
            .find(|r| r.0 == name)
            .map(|r| (r.1, r.2, r.3))
    }
}

/// Appends the registers of the XML document `xml` (named `annex`) to `regs` as
/// `(name, regnum, bytes)`, expanding includes through `fetch`.
fn collect_regs(
    xml: &str,
    annex: &str,
    depth: usize,
    fetch: &mut dyn FnMut(&str) -> Result<String, RspError>,
    regs: &mut Vec<(String, usize, usize)>,
    next: &mut usize,
) -> Result<(), RspError> {
    use quick_xml::events::{BytesStart, Event};
    let bad = |source: quick_xml::Error| RspError::TargetXml {
        annex: annex.to_string(),
        source,
    };
    let attr = |e: &BytesStart<'_>, key: &str| -> Result<Option<String>, RspError> {
        match e.try_get_attribute(key) {
            Ok(Some(a)) => Ok(Some(
                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .map_err(bad)?
                    .into_owned(),
            )),
            Ok(None) => Ok(None),
            Err(err) => Err(bad(err.into())),
        }
    };
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        let e = match reader.read_event().map_err(bad)? {
            Event::Start(e) | Event::Empty(e) => e,
            Event::Eof => return Ok(()),
            _ => continue,
        };
        match e.name().as_ref() {
            "reg" => {
                let name = attr(&e, "name")?;
                let bits = attr(&e, "bitsize")?;
                let (Some(name), Some(bits)) = (name, bits) else {
                    return Err(RspError::Malformed(format!(
                        "{annex}: a <reg> without name or bitsize"
                    )));
                };
                let bits: usize = bits.parse().map_err(|_| {
                    RspError::Malformed(format!("{annex}: register {name} has bitsize {bits:?}"))
                })?;
                let num = match attr(&e, "regnum")? {
                    Some(n) => n.parse().map_err(|_| {
                        RspError::Malformed(format!("{annex}: register {name} has regnum {n:?}"))
                    })?,
                    None => *next,
                };
                *next = num + 1;
                regs.push((name, num, bits.div_ceil(8)));
            }
            "xi:include" => {
                let Some(href) = attr(&e, "href")? else {
                    return Err(RspError::Malformed(format!(
                        "{annex}: an <xi:include> without href"
                    )));
                };
                if depth >= MAX_INCLUDE_DEPTH {
                    return Err(RspError::Malformed(format!(
                        "{annex}: includes nest deeper than {MAX_INCLUDE_DEPTH} levels at {href:?}"
                    )));
                }
                let included = fetch(&href)?;
                collect_regs(&included, &href, depth + 1, fetch, regs, next)?;
            }
            _ => {}
        }
    }
}

/// The connection to the stub: TCP (`HOST:PORT`) or a Unix socket (`unix:PATH`).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `unix:PATH` or `HOST:PORT`.
    pub fn connect(addr: &str) -> Result<Stream, RspError> {
        match addr.strip_prefix("unix:") {
            Some(path) => UnixStream::connect(path)
                .map(Stream::Unix)
                .map_err(|source| RspError::ConnectUnix {
                    path: path.to_string(),
                    source,
                }),
            None => {
                let s = TcpStream::connect(addr).map_err(|source| RspError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
                // Every packet waits for its ack: do not let Nagle hold the small ones.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An all-stop gdbstub session.
pub struct Rsp {
    stream: Stream,
    reader: BufReader<Stream>,
    pub layout: RegLayout,
    /// Thread ids as the stub names them (one per vCPU, in vCPU order).
    pub threads: Vec<String>,
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

impl Rsp {
    /// Connects, learns the register layout and the vCPU threads, and switches memory access
    /// to guest-physical addresses. QEMU halts the guest when a debugger attaches: the guest is
    /// left halted; call [`Rsp::cont`] to let it run.
    ///
    /// `addr` is `HOST:PORT` (`-gdb tcp:HOST:PORT`) or `unix:PATH` (`-gdb unix:PATH,server=on`).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Rsp, RspError> {
        let stream = Stream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut rsp = Rsp {
            stream,
            reader,
            layout: RegLayout::default(),
            threads: Vec::new(),
        };
        match rsp.setup() {
            Ok(()) => Ok(rsp),
            Err(e) => {
                // Attaching halted the guest: never leave it halted because we gave up.
                let _ = rsp.send("c");
                Err(e)
            }
        }
    }

    fn setup(&mut self) -> Result<(), RspError> {
        let rsp = self;
        let supported = rsp.request("qSupported:xmlRegisters=i386")?;
        if !supported.contains("qXfer:features:read+") {
            return Err(RspError::Unsupported(
                "target descriptions (qXfer:features:read)",
            ));
        }
        // Whatever stopped the guest on attach, ask for the stop reason so the next reply we
        // read answers our next request.
        rsp.request("?")?;
        // Reading the target description also makes QEMU serve `p`/`P` and the full `g`.
        let target = rsp.xfer("target.xml")?;
        let layout = RegLayout::from_target(&target, |href| rsp.xfer(href))?;
        rsp.layout = layout;
        for needed in ["rip", "rsp", "cs", "cr0", "cr3", "cr4", "efer"] {
            if rsp.layout.find(needed).is_none() {
                return Err(RspError::Malformed(format!(
                    "the target description has no register {needed}"
                )));
            }
        }
        let mut threads = Vec::new();
        let mut reply = rsp.request("qfThreadInfo")?;
        while let Some(list) = reply.strip_prefix('m') {
            threads.extend(
                list.split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            );
            reply = rsp.request("qsThreadInfo")?;
        }
        if threads.is_empty() {
            return Err(RspError::Malformed(
                "the gdbstub lists no vCPU threads".into(),
            ));
        }
        rsp.threads = threads;
        let modes = rsp.request("qqemu.Supported")?;
        if !modes.contains("PhyMemMode") {
            return Err(RspError::Unsupported(
                "physical memory access (qemu.PhyMemMode)",
            ));
        }
        rsp.expect_ok("Qqemu.PhyMemMode:1")?;
        Ok(())
    }

    /// Sends a packet and waits for the stub's ack, retransmitting on a NAK (`-`). A packet
    /// start (`$`) instead of an ack is left unread for [`Rsp::receive`]: QEMU may send a stop
    /// notice on its own when a debugger attaches.
    fn send(&mut self, data: &str) -> Result<(), RspError> {
        use std::io::BufRead;
        let packet = format!("${data}#{:02x}", checksum(data.as_bytes()));
        for _ in 0..MAX_TRANSMISSIONS {
            self.stream.write_all(packet.as_bytes())?;
            loop {
                let next = match self.reader.fill_buf()? {
                    [] => {
                        return Err(RspError::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the gdbstub closed the connection",
                        )));
                    }
                    [b, ..] => *b,
                };
                if next == b'$' {
                    return Ok(());
                }
                self.reader.consume(1);
                match next {
                    b'+' => return Ok(()),
                    b'-' => break,
                    _ => continue,
                }
            }
        }
        Err(RspError::Malformed(format!(
            "the stub refused {:?} {MAX_TRANSMISSIONS} times (NAK)",
            data.split(':').next().unwrap_or(data)
        )))
    }

    fn byte(&mut self) -> Result<u8, RspError> {
        let mut b = [0u8; 1];
        self.reader.read_exact(&mut b)?;
        Ok(b[0])
    }

    /// Reads the next packet (skipping stray bytes), acknowledges it, decodes run-length
    /// encoding. A packet with a bad checksum is NAKed (`-`) and its retransmission awaited.
    fn receive(&mut self) -> Result<String, RspError> {
        for _ in 0..MAX_TRANSMISSIONS {
            if let Some(raw) = self.receive_raw()? {
                return decode_rle(&raw);
            }
        }
        Err(RspError::Malformed(format!(
            "{MAX_TRANSMISSIONS} packets in a row had a bad checksum"
        )))
    }

    /// One packet's raw payload, acknowledged; `None` (after a NAK) if its checksum is wrong.
    fn receive_raw(&mut self) -> Result<Option<Vec<u8>>, RspError> {
        loop {
            match self.byte()? {
                b'$' => break,
                b'+' | b'-' => continue,
                _ => continue,
            }
        }
        let mut raw = Vec::new();
        loop {
            match self.byte()? {
                b'#' => break,
                _ if raw.len() >= MAX_PACKET => {
                    return Err(RspError::Malformed(format!(
                        "a packet longer than {MAX_PACKET} bytes"
                    )));
                }
                b => raw.push(b),
            }
        }
        let sum = [self.byte()?, self.byte()?];
        let sum = std::str::from_utf8(&sum)
            .ok()
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .ok_or_else(|| RspError::Malformed("bad checksum digits".into()))?;
        if sum != checksum(&raw) {
            self.stream.write_all(b"-")?;
            return Ok(None);
        }
        self.stream.write_all(b"+")?;
        Ok(Some(raw))
    }

    /// Sends a request and returns its reply. `W`/`X` replies (the guest exited) are errors.
    /// Stop replies are only answers to `?`: any other time they are the notice QEMU sends
    /// on its own when a debugger attaches, and are skipped.
    pub fn request(&mut self, data: &str) -> Result<String, RspError> {
        self.send(data)?;
        loop {
            let reply = self.receive()?;
            if reply.starts_with('W') || reply.starts_with('X') {
                return Err(RspError::Exited(reply));
            }
            let stop_reply = reply.starts_with('T') || reply.starts_with('S');
            if stop_reply && data != "?" {
                continue;
            }
            return Ok(reply);
        }
    }

    fn expect_ok(&mut self, data: &str) -> Result<(), RspError> {
        let reply = self.request(data)?;
        if reply == "OK" {
            Ok(())
        } else {
            Err(RspError::Refused {
                request: data.split(':').next().unwrap_or(data).to_string(),
                reply,
            })
        }
    }

    fn xfer(&mut self, annex: &str) -> Result<String, RspError> {
        let mut out = String::new();
        loop {
            let reply =
                self.request(&format!("qXfer:features:read:{annex}:{:x},ffb", out.len()))?;
            let (more, data) = match reply.split_at_checked(1) {
                Some(("m", d)) => (true, d),
                Some(("l", d)) => (false, d),
                _ => {
                    return Err(RspError::Refused {
                        request: format!("qXfer:features:read:{annex}"),
                        reply,
                    });
                }
            };
            out.push_str(data);
            if !more {
                return Ok(out);
            }
        }
    }

    /// Halts every vCPU (all-stop) and waits for the stop reply.
    pub fn interrupt(&mut self) -> Result<String, RspError> {
        self.stream.write_all(&[0x03])?;
        let reply = self.receive()?;
        if reply.starts_with('W') || reply.starts_with('X') {
            return Err(RspError::Exited(reply));
        }
        Ok(reply)
    }

    /// Lets every vCPU run. There is no reply until the next stop.
    pub fn cont(&mut self) -> Result<(), RspError> {
        // `send` waits for the ack.
        self.send("c")
    }

    /// Closes the connection (QEMU leaves the guest as it is: let it run first). Any later
    /// request fails.
    pub fn close(&mut self) -> Result<(), RspError> {
        match self.stream.shutdown() {
            // Already closed by the other end.
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            r => Ok(r?),
        }
    }

    /// All registers of thread `thread` as the raw `g` bytes.
    pub fn registers(&mut self, thread: &str) -> Result<Vec<u8>, RspError> {
        self.expect_ok(&format!("Hg{thread}"))?;
        let reply = self.request("g")?;
        hex::decode(&reply).map_err(|_| RspError::Refused {
            request: "g".into(),
            reply,
        })
    }

    /// Reads register `name` out of a `g` reply (`None` if the reply is too short for it).
    pub fn reg(&self, g: &[u8], name: &str) -> Option<u64> {
        let (_, offset, bytes) = self.layout.find(name)?;
        let b = g.get(offset..offset + bytes.min(8))?;
        let mut v = [0u8; 8];
        v[..b.len()].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    }

    /// Sets register `name` of `thread`.
    pub fn set_reg(&mut self, thread: &str, name: &str, value: u64) -> Result<(), RspError> {
        let (num, _, bytes) = self
            .layout
            .find(name)
            .ok_or_else(|| RspError::Malformed(format!("no register {name}")))?;
        self.expect_ok(&format!("Hg{thread}"))?;
        let mut v = value.to_le_bytes().to_vec();
        v.resize(bytes, 0);
        self.expect_ok(&format!("P{num:x}={}", hex::encode(v)))
    }

    /// Reads guest-physical memory (the guest must be halted).
    pub fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), RspError> {
        for (i, chunk) in buf.chunks_mut(MAX_CHUNK).enumerate() {
            let at = gpa + (i * MAX_CHUNK) as u64;
            let request = format!("m{at:x},{:x}", chunk.len());
            let reply = self.request(&request)?;
            let bytes = hex::decode(&reply).ok().filter(|b| b.len() == chunk.len());
            match bytes {
                Some(b) => chunk.copy_from_slice(&b),
                None => {
                    return Err(RspError::Refused { request, reply });
                }
            }
        }
        Ok(())
    }

    /// Writes guest-physical memory (the guest must be halted).
    pub fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), RspError> {
        for (i, chunk) in data.chunks(MAX_CHUNK).enumerate() {
            let at = gpa + (i * MAX_CHUNK) as u64;
            let request = format!("M{at:x},{:x}:{}", chunk.len(), hex::encode(chunk));
            self.expect_ok(&request)?;
        }
        Ok(())
    }
}

/// Expands the run-length encoding of a packet payload (`X*n`: `n - 29` more copies of `X`).
/// Public for the fuzzer: the payload is whatever the stub sent.
pub fn decode_rle(raw: &[u8]) -> Result<String, RspError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'*' && i + 1 < raw.len() {
            let last = *out
                .last()
                .ok_or_else(|| RspError::Malformed("RLE at start".into()))?;
            // The count byte is printable (32..=126), so a run adds at most 97 bytes.
            let n = usize::from(raw[i + 1]).saturating_sub(29).min(97);
            out.extend(std::iter::repeat_n(last, n));
            i += 2;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| RspError::Malformed("non-UTF-8 packet".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_skips_comments_and_follows_regnums() {
        let xml = r#"<feature><reg name="rax" bitsize="64"/><reg name="rip" bitsize="64"/>
            <reg name="cs" bitsize="32"/><!-- <reg name="ss_base" bitsize="64"/> -->
            <reg name="cr0" bitsize="64"/><reg name="st0" bitsize="80" regnum="10"/>
            <reg name="efer" bitsize="64"/></feature>"#;
        let l = RegLayout::parse(xml).expect("parses");
        assert_eq!(l.find("rip"), Some((1, 8, 8)));
        assert_eq!(l.find("cs"), Some((2, 16, 4)));
        assert_eq!(l.find("cr0"), Some((3, 20, 8)));
        assert_eq!(l.find("st0"), Some((10, 28, 10)));
        assert_eq!(l.find("efer"), Some((11, 38, 8)));
        assert_eq!(l.find("ss_base"), None);
    }

    /// QEMU's gdb-xml/i386-64bit.xml (QEMU 7.2), in the form its gdbstub serves it.
    const I386_64BIT_XML: &str = r#"<?xml version="1.0"?>
<!-- Copyright (C) 2010-2017 Free Software Foundation, Inc.

     Copying and distribution of this file, with or without modification,
     are permitted in any medium without royalty provided the copyright
     notice and this notice are preserved.  -->

<!-- x86_64 64bit -->

<!-- X86_64 register set as QEMU's gdbstub serves it (gdb-xml/i386-64bit.xml) -->

<!DOCTYPE feature SYSTEM "gdb-target.dtd">
<feature name="org.gnu.gdb.i386.core">
  <flags id="i386_eflags" size="4">
    <field name="" start="22" end="31"/>
    <field name="CF" start="0" end="0"/>
    <field name="" start="1" end="1"/>
    <field name="ZF" start="6" end="6"/>
  </flags>

  <reg name="rax" bitsize="64" type="int64" regnum="0"/>
  <reg name="rbx" bitsize="64" type="int64"/>
  <reg name="rcx" bitsize="64" type="int64"/>
  <reg name="rdx" bitsize="64" type="int64"/>
  <reg name="rsi" bitsize="64" type="int64"/>
  <reg name="rdi" bitsize="64" type="int64"/>
  <reg name="rbp" bitsize="64" type="data_ptr"/>
  <reg name="rsp" bitsize="64" type="data_ptr"/>
  <reg name="r8" bitsize="64" type="int64"/>
  <reg name="r9" bitsize="64" type="int64"/>
  <reg name="r10" bitsize="64" type="int64"/>
  <reg name="r11" bitsize="64" type="int64"/>
  <reg name="r12" bitsize="64" type="int64"/>
  <reg name="r13" bitsize="64" type="int64"/>
  <reg name="r14" bitsize="64" type="int64"/>
  <reg name="r15" bitsize="64" type="int64"/>
  <reg name="rip" bitsize="64" type="code_ptr" regnum="16"/>
  <reg name="eflags" bitsize="32" type="i386_eflags"/>
  <reg name="cs" bitsize="32" type="int32"/>
  <reg name="ss" bitsize="32" type="int32"/>
  <reg name="ds" bitsize="32" type="int32"/>
  <reg name="es" bitsize="32" type="int32"/>
  <reg name="fs" bitsize="32" type="int32"/>
  <reg name="gs" bitsize="32" type="int32"/>
  <reg name="st0" bitsize="80" type="i387_ext"/>
  <reg name="st1" bitsize="80" type="i387_ext"/>
  <reg name="st2" bitsize="80" type="i387_ext"/>
  <reg name="st3" bitsize="80" type="i387_ext"/>
  <reg name="st4" bitsize="80" type="i387_ext"/>
  <reg name="st5" bitsize="80" type="i387_ext"/>
  <reg name="st6" bitsize="80" type="i387_ext"/>
  <reg name="st7" bitsize="80" type="i387_ext"/>
  <reg name="fctrl" bitsize="32" type="int" group="float"/>
  <reg name="fstat" bitsize="32" type="int" group="float"/>
  <reg name="ftag" bitsize="32" type="int" group="float"/>
  <reg name="fiseg" bitsize="32" type="int" group="float"/>
  <reg name="fioff" bitsize="32" type="int" group="float"/>
  <reg name="foseg" bitsize="32" type="int" group="float"/>
  <reg name="fooff" bitsize="32" type="int" group="float"/>
  <reg name="fop" bitsize="32" type="int" group="float"/>

  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/>
  </flags>

  <reg name="xmm0" bitsize="128" type="vec128"/>
  <reg name="xmm1" bitsize="128" type="vec128"/>
  <reg name="xmm2" bitsize="128" type="vec128"/>
  <reg name="xmm3" bitsize="128" type="vec128"/>
  <reg name="xmm4" bitsize="128" type="vec128"/>
  <reg name="xmm5" bitsize="128" type="vec128"/>
  <reg name="xmm6" bitsize="128" type="vec128"/>
  <reg name="xmm7" bitsize="128" type="vec128"/>
  <reg name="xmm8" bitsize="128" type="vec128"/>
  <reg name="xmm9" bitsize="128" type="vec128"/>
  <reg name="xmm10" bitsize="128" type="vec128"/>
  <reg name="xmm11" bitsize="128" type="vec128"/>
  <reg name="xmm12" bitsize="128" type="vec128"/>
  <reg name="xmm13" bitsize="128" type="vec128"/>
  <reg name="xmm14" bitsize="128" type="vec128"/>
  <reg name="xmm15" bitsize="128" type="vec128"/>
  <reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
  <reg name="fs_base" bitsize="64" type="int64"/>
  <reg name="gs_base" bitsize="64" type="int64"/>
  <reg name="k_gs_base" bitsize="64" type="int64"/>
  <reg name="cr0" bitsize="64" type="i386_cr0"/>
  <reg name="cr2" bitsize="64" type="int64"/>
  <reg name="cr3" bitsize="64" type="i386_cr3"/>
  <reg name="cr4" bitsize="64" type="i386_cr4"/>
  <reg name="cr8" bitsize="64" type="int64"/>
  <reg name="efer" bitsize="64" type="i386_efer"/>
</feature>
"#;

    /// What QEMU's gdbstub generates as target.xml for x86_64 (no xmlns:xi declaration).
    const TARGET_XML: &str = r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>i386:x86-64</architecture><xi:include href="i386-64bit.xml"/></target>"#;

    #[test]
    fn layout_of_qemus_x86_64_target_description() {
        let mut fetched = Vec::new();
        let l = RegLayout::from_target(TARGET_XML, |href| {
            fetched.push(href.to_string());
            Ok(I386_64BIT_XML.to_string())
        })
        .expect("parses");
        assert_eq!(fetched, ["i386-64bit.xml"]);
        assert_eq!(l.regs.len(), 66, "{:?}", l.regs);
        // (regnum, offset in the `g` reply, bytes)
        assert_eq!(l.find("rax"), Some((0, 0, 8)));
        assert_eq!(l.find("rsp"), Some((7, 56, 8)));
        assert_eq!(l.find("rip"), Some((16, 128, 8)));
        assert_eq!(l.find("eflags"), Some((17, 136, 4)));
        assert_eq!(l.find("cs"), Some((18, 140, 4)));
        assert_eq!(l.find("st0"), Some((24, 164, 10)));
        assert_eq!(l.find("xmm0"), Some((40, 276, 16)));
        assert_eq!(l.find("mxcsr"), Some((56, 532, 4)));
        assert_eq!(l.find("fs_base"), Some((57, 536, 8)));
        assert_eq!(l.find("cr0"), Some((60, 560, 8)));
        assert_eq!(l.find("cr3"), Some((62, 576, 8)));
        assert_eq!(l.find("cr4"), Some((63, 584, 8)));
        assert_eq!(l.find("efer"), Some((65, 600, 8)));
        // <field>s of flags/unions are not registers.
        assert_eq!(l.find("CF"), None);
        assert_eq!(l.find("v4_float"), None);
    }

    #[test]
    fn broken_target_descriptions_are_errors() {
        // Unclosed tags, a register without bitsize, a bad regnum, includes without a fetcher.
        let err = RegLayout::parse("<feature><reg name=\"rax\" bitsize=\"64\"></feature>")
            .expect_err("mismatched end tag");
        assert!(matches!(err, RspError::TargetXml { .. }), "{err}");
        let err =
            RegLayout::parse(r#"<feature><reg name="rax"/></feature>"#).expect_err("no bitsize");
        assert!(err.to_string().contains("bitsize"), "{err}");
        let err =
            RegLayout::parse(r#"<reg name="rax" bitsize="64" regnum="x"/>"#).expect_err("regnum");
        assert!(err.to_string().contains("regnum"), "{err}");
        assert!(RegLayout::parse(TARGET_XML).is_err());
        // A stub whose includes include themselves is stopped.
        let err = RegLayout::from_target(TARGET_XML, |_| Ok(TARGET_XML.to_string()))
            .expect_err("include loop");
        assert!(err.to_string().contains("nest"), "{err}");
    }

    #[test]
    fn checksums_are_mod_256() {
        assert_eq!(checksum(b"g"), 0x67);
        assert_eq!(checksum(b"OK"), 0x9a);
    }
}

/// The client against a fake gdbstub on a local TCP or Unix socket, speaking RSP byte for byte.
#[cfg(test)]
mod fake_stub {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// Runs `stub` on its own thread with the server's side of the first connection to a new
    /// socket: TCP on loopback, or a Unix socket when `unix`. Returns the address to give
    /// [`Rsp::connect`] (the Unix socket lives as long as the returned directory).
    fn start_stub<T: Send + 'static>(
        unix: bool,
        stub: impl FnOnce(&mut Stream) -> T + Send + 'static,
    ) -> (String, Option<tempfile::TempDir>, thread::JoinHandle<T>) {
        let accept: Box<dyn FnOnce() -> Stream + Send>;
        let (addr, dir) = if unix {
            let dir = tempfile::Builder::new()
                .prefix("rsp-test-")
                .tempdir()
                .expect("temp dir");
            let path = dir.path().join("gdb.sock");
            let listener = UnixListener::bind(&path).expect("bind");
            accept = Box::new(move || Stream::Unix(listener.accept().expect("accept").0));
            (format!("unix:{}", path.display()), Some(dir))
        } else {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            accept = Box::new(move || Stream::Tcp(listener.accept().expect("accept").0));
            (addr, None)
        };
        let server = thread::spawn(move || {
            let mut s = accept();
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            stub(&mut s)
        });
        (addr, dir, server)
    }

    /// A client connected to `stub` over TCP, without the setup [`Rsp::connect`] does.
    fn with_stub<T: Send + 'static>(
        stub: impl FnOnce(&mut Stream) -> T + Send + 'static,
    ) -> (Rsp, thread::JoinHandle<T>) {
        let (addr, _, server) = start_stub(false, stub);
        let stream = Stream::connect(&addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let rsp = Rsp {
            stream,
            reader,
            layout: RegLayout::default(),
            threads: Vec::new(),
        };
        (rsp, server)
    }

    fn byte(s: &mut Stream) -> u8 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("stub read");
        b[0]
    }

    /// Reads one packet from the client (checking its checksum) and acks it.
    fn read_packet(s: &mut Stream) -> String {
        while byte(s) != b'$' {}
        let mut data = Vec::new();
        loop {
            match byte(s) {
                b'#' => break,
                b => data.push(b),
            }
        }
        let sum = [byte(s), byte(s)];
        let sum = u8::from_str_radix(std::str::from_utf8(&sum).expect("ascii"), 16).expect("hex");
        assert_eq!(sum, checksum(&data), "the client's checksum");
        s.write_all(b"+").expect("ack");
        String::from_utf8(data).expect("utf-8")
    }

    /// Sends `raw` framed as a packet (checksum over `raw` as sent) and returns the ack.
    fn send_packet(s: &mut Stream, raw: &str) -> u8 {
        write!(s, "${raw}#{:02x}", checksum(raw.as_bytes())).expect("send");
        byte(s)
    }

    /// A stub that answers every request through `answer` until the client hangs up; `c`
    /// (continue) gets no reply, as from QEMU until the guest stops. Returns the requests seen.
    fn answering(
        answer: impl Fn(&str) -> String + Send + 'static,
    ) -> impl FnOnce(&mut Stream) -> Vec<String> + Send + 'static {
        move |s| {
            let mut seen = Vec::new();
            loop {
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(1) if b[0] == b'$' => {}
                    Ok(1) => continue,
                    _ => return seen,
                }
                let mut data = Vec::new();
                loop {
                    match byte(s) {
                        b'#' => break,
                        b => data.push(b),
                    }
                }
                let _ = [byte(s), byte(s)];
                s.write_all(b"+").expect("ack");
                let request = String::from_utf8(data).expect("utf-8");
                if request == "c" {
                    seen.push(request);
                    continue;
                }
                let reply = answer(&request);
                seen.push(request);
                assert_eq!(send_packet(s, &reply), b'+', "client acks {reply:?}");
            }
        }
    }

    /// A TCP client of a stub that answers through `answer` (see [`answering`]).
    fn serve(
        answer: impl Fn(&str) -> String + Send + 'static,
    ) -> (Rsp, thread::JoinHandle<Vec<String>>) {
        with_stub(answering(answer))
    }

    #[test]
    fn connects_over_a_unix_socket() {
        // What QEMU answers during the setup, for two vCPUs with a minimal register set.
        const REGS: &str = r#"<feature><reg name="rip" bitsize="64"/><reg name="rsp" bitsize="64"/><reg name="cs" bitsize="32"/><reg name="cr0" bitsize="64"/><reg name="cr3" bitsize="64"/><reg name="cr4" bitsize="64"/><reg name="efer" bitsize="64"/></feature>"#;
        let (addr, _dir, stub) = start_stub(
            true,
            answering(|req| {
                match req {
                    r if r.starts_with("qSupported") => "PacketSize=1000;qXfer:features:read+",
                    "?" => "T05thread:01;",
                    r if r.starts_with("qXfer:features:read:target.xml:0,") => {
                        r#"l<target><xi:include href="regs.xml"/></target>"#
                    }
                    r if r.starts_with("qXfer:features:read:regs.xml:0,") => {
                        return format!("l{REGS}");
                    }
                    "qfThreadInfo" => "m1,2",
                    "qsThreadInfo" => "l",
                    "qqemu.Supported" => "sstepbits;sstep;PhyMemMode",
                    "Qqemu.PhyMemMode:1" | "Hg2" => "OK",
                    // rip, rsp = 0x1000, cs = 0x33, the rest 0.
                    "g" => {
                        return format!(
                            "{}{}{}{}",
                            hex::encode(0xffff_ffff_8100_0000u64.to_le_bytes()),
                            hex::encode(0x1000u64.to_le_bytes()),
                            hex::encode(0x33u32.to_le_bytes()),
                            "00".repeat(32)
                        );
                    }
                    _ => "",
                }
                .to_string()
            }),
        );
        assert!(addr.starts_with("unix:"), "{addr}");
        let mut rsp = Rsp::connect(&addr, Duration::from_secs(10)).expect("connect over unix:");
        assert_eq!(rsp.threads, ["1", "2"]);
        let g = rsp.registers("2").expect("g");
        assert_eq!(rsp.reg(&g, "rip"), Some(0xffff_ffff_8100_0000));
        assert_eq!(rsp.reg(&g, "rsp"), Some(0x1000));
        assert_eq!(rsp.reg(&g, "cs"), Some(0x33));
        rsp.cont().expect("c");
        rsp.close().expect("close");
        assert!(
            rsp.request("?").is_err(),
            "a closed session refuses requests"
        );
        let seen = stub.join().expect("stub");
        assert_eq!(seen.first().map(|s| &s[..10]), Some("qSupported"));
        assert!(seen.iter().any(|r| r == "Qqemu.PhyMemMode:1"), "{seen:?}");
        assert_eq!(seen.last().map(String::as_str), Some("c"), "{seen:?}");
    }

    #[test]
    fn a_unix_socket_nobody_serves_names_the_path_and_the_qemu_option() {
        let dir = tempfile::Builder::new()
            .prefix("rsp-test-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("none.sock");
        let err = Rsp::connect(&format!("unix:{}", path.display()), Duration::from_secs(1))
            .err()
            .expect("nothing listens there");
        assert!(matches!(err, RspError::ConnectUnix { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("-gdb unix:{},server=on", path.display())),
            "{text}"
        );
    }

    #[test]
    fn receives_and_acks_a_packet() {
        let (mut rsp, stub) = with_stub(|s| {
            // Stray bytes and acks before the packet are skipped.
            s.write_all(b"++\x00").expect("noise");
            send_packet(s, "OK")
        });
        assert_eq!(rsp.receive().expect("packet"), "OK");
        assert_eq!(stub.join().expect("stub"), b'+');
    }

    #[test]
    fn run_length_encoding_is_expanded() {
        // "0* " = four '0's (' ' is 32: 3 more copies); "f*!" = 'f' + 4 more ('!' is 33).
        let (mut rsp, stub) = with_stub(|s| send_packet(s, "0* 1f*!2"));
        assert_eq!(rsp.receive().expect("packet"), "00001fffff2");
        stub.join().expect("stub");
        // The longest run ('~', 126) adds 97 copies; a run at the start is malformed.
        assert_eq!(decode_rle(b"a*~").expect("run"), "a".repeat(98));
        assert!(matches!(decode_rle(b"*!"), Err(RspError::Malformed(_))));
    }

    #[test]
    fn a_bad_checksum_is_naked_and_the_retransmission_accepted() {
        let (mut rsp, stub) = with_stub(|s| {
            write!(s, "$OK#00").expect("corrupt packet");
            let nak = byte(s);
            let ack = send_packet(s, "OK");
            (nak, ack)
        });
        assert_eq!(rsp.receive().expect("retransmitted packet"), "OK");
        assert_eq!(stub.join().expect("stub"), (b'-', b'+'));
    }

    #[test]
    fn a_link_that_keeps_corrupting_packets_is_given_up() {
        let (mut rsp, stub) = with_stub(|s| {
            (0..MAX_TRANSMISSIONS)
                .map(|_| {
                    write!(s, "$OK#00").expect("corrupt packet");
                    byte(s)
                })
                .collect::<Vec<_>>()
        });
        let err = rsp.receive().expect_err("bad checksums");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(stub.join().expect("stub"), vec![b'-'; MAX_TRANSMISSIONS]);
    }

    #[test]
    fn a_naked_request_is_retransmitted() {
        let (mut rsp, stub) = with_stub(|s| {
            while byte(s) != b'#' {}
            let _ = [byte(s), byte(s)];
            s.write_all(b"-").expect("nak");
            let again = read_packet(s);
            assert_eq!(send_packet(s, "OK"), b'+');
            again
        });
        rsp.expect_ok("Hg1").expect("OK after a retransmission");
        assert_eq!(stub.join().expect("stub"), "Hg1");
    }

    #[test]
    fn a_packet_instead_of_an_ack_is_kept_for_the_reply() {
        // Seen with QEMU on re-attach: the next packet arrives where the ack was expected.
        let (mut rsp, stub) = with_stub(|s| {
            while byte(s) != b'#' {}
            let _ = [byte(s), byte(s)];
            send_packet(s, "OK")
        });
        rsp.expect_ok("Hg1").expect("the reply is not lost");
        assert_eq!(stub.join().expect("stub"), b'+');
    }

    #[test]
    fn packets_are_bounded() {
        let (mut rsp, stub) = with_stub(|s| {
            s.write_all(b"$").expect("start");
            let chunk = vec![b'0'; 64 * 1024];
            // Never ends the packet; stops once the client hangs up.
            for _ in 0..(MAX_PACKET / chunk.len() + 2) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let err = rsp.receive().expect_err("unbounded packet");
        assert!(err.to_string().contains("longer than"), "{err}");
        drop(rsp);
        stub.join().expect("stub");
    }

    #[test]
    fn stop_reason_registers_and_memory_round_trip() {
        // 16 eight-byte GPRs then rip (regnum 16): set rip and read it back through `g`.
        let regs = std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; 17 * 8]));
        let mem = std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; 4096]));
        let (r, m) = (regs.clone(), mem.clone());
        let (mut rsp, stub) = serve(move |req| {
            let mut regs = r.lock().expect("regs");
            let mut mem = m.lock().expect("mem");
            if req == "?" {
                "T05thread:01;".into()
            } else if req.starts_with("Hg") {
                "OK".into()
            } else if req == "g" {
                hex::encode(&*regs)
            } else if let Some(p) = req.strip_prefix('P') {
                let (num, val) = p.split_once('=').expect("P n=v");
                let num = usize::from_str_radix(num, 16).expect("regnum");
                let val = hex::decode(val).expect("value");
                regs[num * 8..num * 8 + val.len()].copy_from_slice(&val);
                "OK".into()
            } else if let Some(a) = req.strip_prefix('m') {
                let (at, len) = a.split_once(',').expect("m a,l");
                let at = usize::from_str_radix(at, 16).expect("addr");
                let len = usize::from_str_radix(len, 16).expect("len");
                hex::encode(&mem[at..at + len])
            } else if let Some(a) = req.strip_prefix('M') {
                let (head, data) = a.split_once(':').expect("M a,l:d");
                let (at, len) = head.split_once(',').expect("M a,l");
                let at = usize::from_str_radix(at, 16).expect("addr");
                let len = usize::from_str_radix(len, 16).expect("len");
                let data = hex::decode(data).expect("data");
                assert_eq!(data.len(), len);
                mem[at..at + len].copy_from_slice(&data);
                "OK".into()
            } else {
                String::new()
            }
        });
        rsp.layout = RegLayout::parse(
            &(0..16)
                .map(|i| format!(r#"<reg name="r{i}" bitsize="64"/>"#))
                .chain([r#"<reg name="rip" bitsize="64" type="code_ptr" regnum="16"/>"#.into()])
                .collect::<String>(),
        )
        .expect("layout");

        assert_eq!(rsp.request("?").expect("stop reason"), "T05thread:01;");
        rsp.set_reg("1", "rip", 0xffff_ffff_8100_0000).expect("P");
        let g = rsp.registers("1").expect("g");
        assert_eq!(g.len(), 17 * 8);
        assert_eq!(rsp.reg(&g, "rip"), Some(0xffff_ffff_8100_0000));
        assert_eq!(rsp.reg(&g, "r0"), Some(0));

        // More than one packet's worth, at an odd address: split into MAX_CHUNK pieces.
        let data: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        rsp.write_phys(0x123, &data).expect("M");
        let mut back = vec![0u8; data.len()];
        rsp.read_phys(0x123, &mut back).expect("m");
        assert_eq!(back, data);
        assert_eq!(mem.lock().expect("mem")[0x123..0x123 + 2500], data[..]);

        drop(rsp);
        let seen = stub.join().expect("stub");
        let ms: Vec<&String> = seen.iter().filter(|r| r.starts_with('M')).collect();
        assert_eq!(
            ms.len(),
            3,
            "{:?}",
            seen.iter()
                .map(|r| &r[..r.len().min(20)])
                .collect::<Vec<_>>()
        );
        assert!(ms[0].starts_with("M123,400:"), "{}", &ms[0][..12]);
        assert!(
            seen.iter().any(|r| r == "P10=00000081ffffffff"),
            "P as the client sends it"
        );
    }
}
