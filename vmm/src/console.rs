//! `vmm run`'s stdin → the guest's COM1, so an interactive shell in the guest works.
//!
//! When stdin is a terminal it is put in raw mode (no local echo or line editing: the guest
//! echoes and edits, as on a serial line; Ctrl-C goes to the guest) and restored when the
//! returned guard drops, however `vmm run` ends. Stop a guest from the terminal by powering
//! it off inside, or with SIGTERM from elsewhere. A non-terminal stdin (a pipe, a file) is
//! forwarded as it is; at its end forwarding stops and the guest keeps running.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use kvm_vmm::vm::Vm;

/// Restores the terminal's settings when dropped.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: tcsetattr reads a termios we own, obtained from tcgetattr on the same fd.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
    }
}

fn make_raw() -> Option<libc::termios> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return None;
    }
    // SAFETY: termios is plain old data; zeroed is a valid value for tcgetattr to overwrite.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into the termios we pass, which lives for the call.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
        return None;
    }
    let mut raw = saved;
    // SAFETY: cfmakeraw only edits the termios we pass.
    unsafe { libc::cfmakeraw(&mut raw) };
    // Keep output processing so the VMM's own log lines still start at column 0.
    raw.c_oflag = saved.c_oflag;
    // SAFETY: tcsetattr reads the termios we pass.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
        return None;
    }
    Some(saved)
}

/// Starts forwarding stdin to `vm`'s console; the guard restores the terminal.
pub fn forward_stdin(vm: Arc<Vm>) -> RawTerminal {
    let saved = make_raw();
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    if vm.stop_reason().is_some() {
                        return;
                    }
                    let took = vm.console_input(pending);
                    pending = &pending[took..];
                    if took == 0 {
                        // The guest has not drained its receive FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "console input is unavailable: could not start its thread");
    }
    RawTerminal { saved }
}
