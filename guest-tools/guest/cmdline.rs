// The kernel command line: found through the PVH `hvm_start_info`, parsed into `Options`.
//
// The parser is plain `core` code; the host crate compiles this file too (`#[cfg(test)]`) to
// unit-test it.

use crate::protocol::{DEFAULT_BATCH, DEFAULT_SPIN, MAX_CPUS, PVH_START_MAGIC};

/// Longest command line read (bytes before the NUL).
pub const CMDLINE_MAX: usize = 4096;

/// `mode=`: what each vCPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `mode=normal`: `compute` in a loop.
    Normal,
    /// `mode=probe`: the assembly `probe` in a loop instead of `compute`.
    Probe,
    /// `mode=spin`: `spin_wait(spin)` once, then the normal workload.
    Spin,
    /// `mode=tamper`: before every batch, `writes` attempts to overwrite the start of `compute`
    /// (as malware or a buggy driver would), then the normal workload on whatever `compute` is.
    Tamper,
    /// `mode=spam`: before every batch, `writes` invalid reports (pointing outside RAM), as a
    /// hostile guest flooding the VMM would; then the normal workload.
    Spam,
}

impl Mode {
    /// The name on the command line and the console.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Probe => "probe",
            Mode::Spin => "spin",
            Mode::Tamper => "tamper",
            Mode::Spam => "spam",
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `reports=N`: each vCPU stops after N reports (0: never).
    pub reports: u64,
    /// `batch=N`: `compute` calls between two reports (>= 1).
    pub batch: u64,
    /// `cpus=N`: power off only once N vCPUs came online and finished (0: whoever came online).
    pub cpus: u64,
    /// `mode=normal|probe|spin|tamper|spam`.
    pub mode: Mode,
    /// `spin=N`: `spin_wait` iterations in `mode=spin` (>= 1).
    pub spin: u64,
    /// `writes=N`: overwrite attempts per batch in `mode=tamper`, invalid reports in `mode=spam`.
    pub writes: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            reports: 0,
            batch: DEFAULT_BATCH,
            cpus: 0,
            mode: Mode::Normal,
            spin: DEFAULT_SPIN,
            writes: 1,
        }
    }
}

/// Why a command line was refused, and the offending token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError<'a> {
    pub what: &'static str,
    pub token: &'a [u8],
}

/// Largest address the guest's identity map covers.
const IDENTITY_MAP_END: u64 = 1 << 32;

/// The command line of the PVH `hvm_start_info` at guest-physical `start_info` (an empty line if
/// `cmdline_paddr` is 0).
pub fn from_start_info(start_info: u64) -> Result<&'static [u8], &'static str> {
    // hvm_start_info: magic u32 @0, version u32 @4, flags u32 @8, nr_modules u32 @12,
    // modlist_paddr u64 @16, cmdline_paddr u64 @24, rsdp_paddr u64 @32, ...
    if start_info == 0 || start_info & 7 != 0 || start_info + 32 > IDENTITY_MAP_END {
        return Err("no usable PVH hvm_start_info (ebx at entry)");
    }
    // SAFETY: the address is 8-aligned, below 4 GiB and so identity-mapped and readable; the
    // loader wrote the structure before the vCPUs started and nothing writes it afterwards.
    let (magic, cmdline_paddr) = unsafe {
        let p = start_info as *const u8;
        (
            core::ptr::read_volatile(p.cast::<u32>()),
            core::ptr::read_volatile(p.add(24).cast::<u64>()),
        )
    };
    if magic != PVH_START_MAGIC {
        return Err("bad PVH hvm_start_info magic");
    }
    if cmdline_paddr == 0 {
        return Ok(&[]);
    }
    if cmdline_paddr >= IDENTITY_MAP_END {
        return Err("PVH cmdline_paddr above 4 GiB");
    }
    let limit = core::cmp::min(CMDLINE_MAX as u64, IDENTITY_MAP_END - cmdline_paddr) as usize;
    let base = cmdline_paddr as *const u8;
    let mut len = 0;
    // SAFETY: every byte read is below 4 GiB (`limit`), identity-mapped and readable.
    while len < limit && unsafe { core::ptr::read_volatile(base.add(len)) } != 0 {
        len += 1;
    }
    if len == limit {
        return Err("command line not NUL-terminated within 4096 bytes");
    }
    // SAFETY: `len` bytes at `base` were just read; the boot data is never written again, so a
    // shared 'static view of it is sound.
    Ok(unsafe { core::slice::from_raw_parts(base, len) })
}

/// Parses a decimal `u64` (digits only, no sign, no overflow).
fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// Parses a command line: whitespace-separated `key=value` options, later ones win.
pub fn parse(raw: &[u8]) -> Result<Options, ParseError<'_>> {
    let mut opts = Options::default();
    for token in raw.split(|c| c.is_ascii_whitespace()) {
        if token.is_empty() {
            continue;
        }
        let Some(eq) = token.iter().position(|&c| c == b'=') else {
            return Err(ParseError {
                what: "expected key=value",
                token,
            });
        };
        let (key, value) = (&token[..eq], &token[eq + 1..]);
        let bad_number = ParseError {
            what: "bad number",
            token,
        };
        match key {
            b"reports" => opts.reports = parse_u64(value).ok_or(bad_number)?,
            b"batch" => {
                opts.batch = match parse_u64(value) {
                    Some(n) if n >= 1 => n,
                    _ => return Err(bad_number),
                }
            }
            b"cpus" => {
                opts.cpus = match parse_u64(value) {
                    Some(n) if n <= MAX_CPUS as u64 => n,
                    _ => return Err(bad_number),
                }
            }
            b"mode" => {
                opts.mode = match value {
                    b"normal" => Mode::Normal,
                    b"probe" => Mode::Probe,
                    b"spin" => Mode::Spin,
                    b"tamper" => Mode::Tamper,
                    b"spam" => Mode::Spam,
                    _ => {
                        return Err(ParseError {
                            what: "unknown mode (mode=normal, probe, spin, tamper or spam)",
                            token,
                        });
                    }
                }
            }
            b"spin" => {
                // 0 would not mean "no spin": `spin_wait`'s `dec; jnz` would wrap to 2^64 - 1.
                opts.spin = match parse_u64(value) {
                    Some(n) if n >= 1 => n,
                    _ => return Err(bad_number),
                }
            }
            b"writes" => opts.writes = parse_u64(value).ok_or(bad_number)?,
            _ => {
                return Err(ParseError {
                    what: "unknown option",
                    token,
                });
            }
        }
    }
    Ok(opts)
}
