//! A client for QEMU's gdbstub (the GDB remote serial protocol over TCP), all-stop mode.
//!
//! Only what the patch engine needs: halt every vCPU (`0x03` → a stop reply), read the
//! registers of each vCPU (`Hg` + `g`, laid out by the target description QEMU sends), set RIP
//! (`P`), read and write guest-physical memory (QEMU's `Qqemu.PhyMemMode:1` — sic), continue
//! (`c`). QEMU 7.2 does not offer no-ack mode, so every packet is acknowledged with `+`.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use thiserror::Error;

/// Largest memory transfer per packet: QEMU's packet buffer is 4 KiB of hex.
const MAX_CHUNK: usize = 1024;
/// Longest packet accepted: far above anything QEMU sends (its buffer is 4 KiB), so a stub
/// that never ends a packet cannot make us buffer without bound.
const MAX_PACKET: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum RspError {
    #[error(
        "cannot connect to QEMU's gdbstub at {addr}: {source}; start QEMU with -gdb tcp:{addr} (or -s for :1234)"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gdbstub connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the gdbstub sent a malformed packet: {0}")]
    Malformed(String),
    #[error("the gdbstub refused {request}: {reply}")]
    Refused { request: String, reply: String },
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

impl RegLayout {
    /// Parses `<reg name=… bitsize=… [regnum=…]/>` tags in document order, skipping XML
    /// comments (QEMU comments some registers out).
    pub fn parse(xml: &str) -> RegLayout {
        let mut text = String::with_capacity(xml.len());
        let mut rest = xml;
        while let Some(i) = rest.find("<!--") {
            text.push_str(&rest[..i]);
            rest = match rest[i..].find("-->") {
                Some(j) => &rest[i + j + 3..],
                None => "",
            };
        }
        text.push_str(rest);
        let attr = |tag: &str, key: &str| -> Option<String> {
            let pat = format!("{key}=\"");
            let at = tag.find(&pat)? + pat.len();
            let end = tag[at..].find('"')? + at;
            Some(tag[at..end].to_string())
        };
        let mut regs: Vec<(String, usize, usize)> = Vec::new();
        let mut next = 0usize;
        for piece in text.split("<reg ").skip(1) {
            let tag = piece.split('>').next().unwrap_or("");
            let (Some(name), Some(bits)) = (attr(tag, "name"), attr(tag, "bitsize")) else {
                continue;
            };
            let Ok(bits) = bits.parse::<usize>() else {
                continue;
            };
            let num = attr(tag, "regnum")
                .and_then(|n| n.parse().ok())
                .unwrap_or(next);
            next = num + 1;
            regs.push((name, num, bits.div_ceil(8)));
        }
        regs.sort_by_key(|r| r.1);
        let mut offset = 0;
        RegLayout {
            regs: regs
                .into_iter()
                .map(|(name, num, bytes)| {
                    let r = (name, num, offset, bytes);
                    offset += bytes;
                    r
                })
                .collect(),
        }
    }

    pub fn find(&self, name: &str) -> Option<(usize, usize, usize)> {
        self.regs
            .iter()
            .find(|r| r.0 == name)
            .map(|r| (r.1, r.2, r.3))
    }
}

/// An all-stop gdbstub session.
pub struct Rsp {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
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
    pub fn connect(addr: &str, timeout: Duration) -> Result<Rsp, RspError> {
        let stream = TcpStream::connect(addr).map_err(|source| RspError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        stream.set_nodelay(true)?;
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
        let mut xml = target.clone();
        for part in target.split("href=\"").skip(1) {
            if let Some(name) = part.split('"').next() {
                xml.push_str(&rsp.xfer(name)?);
            }
        }
        rsp.layout = RegLayout::parse(&xml);
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

    fn send(&mut self, data: &str) -> Result<(), RspError> {
        let packet = format!("${data}#{:02x}", checksum(data.as_bytes()));
        self.stream.write_all(packet.as_bytes())?;
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, RspError> {
        let mut b = [0u8; 1];
        self.reader.read_exact(&mut b)?;
        Ok(b[0])
    }

    /// Reads the next packet (skipping acks), acknowledges it, decodes run-length encoding.
    fn receive(&mut self) -> Result<String, RspError> {
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
            return Err(RspError::Malformed("checksum mismatch".into()));
        }
        self.stream.write_all(b"+")?;
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
        self.send("c")?;
        // The ack.
        match self.byte()? {
            b'+' => Ok(()),
            b => Err(RspError::Malformed(format!(
                "expected an ack to 'c', got {:?}",
                b as char
            ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_skips_comments_and_follows_regnums() {
        let xml = r#"<feature><reg name="rax" bitsize="64"/><reg name="rip" bitsize="64"/>
            <reg name="cs" bitsize="32"/><!-- <reg name="ss_base" bitsize="64"/> -->
            <reg name="cr0" bitsize="64"/><reg name="st0" bitsize="80" regnum="10"/>
            <reg name="efer" bitsize="64"/></feature>"#;
        let l = RegLayout::parse(xml);
        assert_eq!(l.find("rip"), Some((1, 8, 8)));
        assert_eq!(l.find("cs"), Some((2, 16, 4)));
        assert_eq!(l.find("cr0"), Some((3, 20, 8)));
        assert_eq!(l.find("st0"), Some((10, 28, 10)));
        assert_eq!(l.find("efer"), Some((11, 38, 8)));
        assert_eq!(l.find("ss_base"), None);
    }

    #[test]
    fn checksums_are_mod_256() {
        assert_eq!(checksum(b"g"), 0x67);
        assert_eq!(checksum(b"OK"), 0x9a);
    }
}
