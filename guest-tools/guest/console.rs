// Ring-3 port I/O (IOPL=3) and the COM1 console: whole lines under a spinlock, so that lines
// of different vCPUs never interleave.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::protocol::{COM1_LSR_PORT, COM1_PORT};

/// 8-bit `out`.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O is allowed at CPL3 (IOPL=3 and an all-zero I/O permission bitmap, set up
    // by the boot code); the guest's ports have no effect on its memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// 8-bit `in`.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`; reading a UART register has no effect on guest memory.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags));
    }
    value
}

/// 32-bit `out`. Not `nomem`: the host may read guest memory at this exit (the report), so the
/// compiler must have finished every store before it.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags));
    }
}

/// Held while one vCPU writes one whole line.
static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);

/// Polls the line status register at most this many times per byte, then sends anyway: a
/// UART whose LSR never reports "empty" must not hang the guest.
const LSR_SPIN_LIMIT: u32 = 100_000;

/// LSR bit 5: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Sends one byte to COM1 once the transmitter is ready (bounded wait).
fn put_byte(b: u8) {
    let mut spins = 0;
    while inb(COM1_LSR_PORT) & LSR_THR_EMPTY == 0 && spins < LSR_SPIN_LIMIT {
        spins += 1;
        core::hint::spin_loop();
    }
    outb(COM1_PORT, b);
}

/// Writes `bytes` then `\n` to COM1 as one unit.
fn write_line(bytes: &[u8]) {
    while CONSOLE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    for &b in bytes {
        put_byte(b);
    }
    put_byte(b'\n');
    CONSOLE_LOCK.store(false, Ordering::Release);
}

/// Longest console line (longer lines are cut).
const LINE_MAX: usize = 240;

/// A console line being built (no `core::fmt`: small, and no surprises).
pub struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Line {
    pub const fn new() -> Line {
        Line {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    fn byte(&mut self, b: u8) {
        if self.len < LINE_MAX {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Appends a string as it is.
    pub fn str(&mut self, s: &str) -> &mut Line {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }

    /// Appends bytes, printable ASCII as is, anything else (and `"`) as `?`.
    pub fn bytes_sanitized(&mut self, s: &[u8]) -> &mut Line {
        for &b in s {
            self.byte(if (0x20..0x7f).contains(&b) && b != b'"' {
                b
            } else {
                b'?'
            });
        }
        self
    }

    /// Appends `v` in decimal.
    pub fn u64(&mut self, v: u64) -> &mut Line {
        let mut digits = [0u8; 20];
        let mut n = 0;
        let mut v = v;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.byte(digits[n]);
        }
        self
    }

    /// Writes the line (and its `\n`) to the console.
    pub fn emit(&self) {
        write_line(&self.buf[..self.len]);
    }
}
