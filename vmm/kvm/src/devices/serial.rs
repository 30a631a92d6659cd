//! COM1: the guest console, a 16550A UART from vm-superio, forwarded to the VMM's stdout.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vm_superio::serial::{NoEvents, Serial};
use vmm_sys_util::eventfd::EventFd;

/// I/O base of COM1 and its 8 registers.
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt line through an irqfd registered with KVM.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go: whole lines to a sink (stdout in the VMM), so lines from the guest
/// come out intact even when several threads write to the same stdout, plus an optional tee
/// that keeps every line (the demo and the tests read it).
pub struct ConsoleOut {
    line: Vec<u8>,
    sink: Box<dyn Write + Send>,
    tee: Option<Arc<Mutex<Vec<String>>>>,
}

/// A guest that never sends a newline must not grow the buffer without bound.
const MAX_LINE: usize = 4096;

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>, tee: Option<Arc<Mutex<Vec<String>>>>) -> Self {
        ConsoleOut {
            line: Vec::with_capacity(256),
            sink,
            tee,
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        let r = self
            .sink
            .write_all(&self.line)
            .and_then(|_| self.sink.flush());
        if let Some(tee) = &self.tee {
            let text = String::from_utf8_lossy(&self.line)
                .trim_end_matches('\n')
                .to_string();
            tee.lock().unwrap_or_else(|e| e.into_inner()).push(text);
        }
        self.line.clear();
        r
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Partial lines stay buffered until their newline; `finish` emits the tail at exit.
        Ok(())
    }
}

impl Drop for ConsoleOut {
    fn drop(&mut self) {
        let _ = self.emit();
    }
}

/// The UART as the port bus sees it.
pub struct SerialConsole {
    uart: Mutex<Serial<IrqTrigger, NoEvents, ConsoleOut>>,
}

impl SerialConsole {
    pub fn new(trigger: IrqTrigger, out: ConsoleOut) -> Self {
        SerialConsole {
            uart: Mutex::new(Serial::new(trigger, out)),
        }
    }

    pub fn write(&self, offset: u8, value: u8) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = uart.write(offset, value) {
            tracing::warn!(error = ?e, "console write failed");
        }
    }

    /// A byte from the debugcon port: same console, no UART state.
    pub fn debugcon(&self, value: u8) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let _ = uart.writer_mut().write_all(&[value]);
    }

    pub fn read(&self, offset: u8) -> u8 {
        self.uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset)
    }

    /// Queues console input for the guest (raising the receive interrupt). Returns how many
    /// bytes the UART's FIFO took: 0 when it is full and the caller must retry later.
    pub fn input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Emits a partial last line, if the guest left one.
    pub fn finish(&self) {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let _ = uart.writer_mut().emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_forwarded_whole_and_teed() {
        let sink = Shared::default();
        let tee = Arc::new(Mutex::new(Vec::new()));
        let console = SerialConsole::new(
            IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
            ConsoleOut::new(Box::new(sink.clone()), Some(tee.clone())),
        );
        for b in b"hello\nwor" {
            console.write(0, *b);
        }
        assert_eq!(
            sink.0.lock().map(|v| v.clone()).unwrap_or_default(),
            b"hello\n"
        );
        console.finish();
        assert_eq!(
            sink.0.lock().map(|v| v.clone()).unwrap_or_default(),
            b"hello\nwor"
        );
        assert_eq!(
            *tee.lock().expect("tee"),
            vec!["hello".to_string(), "wor".to_string()]
        );
        // Line status register: transmitter empty, so a polling guest never waits.
        assert_ne!(console.read(5) & 0x20, 0);
    }

    #[test]
    fn input_reaches_the_receive_buffer_and_raises_the_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let seen = irq.try_clone().expect("eventfd clone");
        let console =
            SerialConsole::new(IrqTrigger(irq), ConsoleOut::new(Box::new(io::sink()), None));
        // The guest enables the receive interrupt (IER bit 0).
        console.write(1, 0x01);
        let _ = seen.read();
        assert_eq!(console.input(b"ls\n"), 3);
        assert!(seen.read().is_ok(), "receiving must raise the interrupt");
        // Data ready in LSR, then the bytes in order from the receive buffer.
        assert_ne!(console.read(5) & 0x01, 0);
        let got: Vec<u8> = (0..3).map(|_| console.read(0)).collect();
        assert_eq!(got, b"ls\n");
        assert_eq!(console.read(5) & 0x01, 0);
        // A full FIFO takes nothing more until the guest reads.
        let big = [b'x'; 200];
        let first = console.input(&big);
        assert!(first > 0 && first < big.len());
        assert_eq!(console.input(&big), 0);
    }
}
