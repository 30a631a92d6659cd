//! virtio devices over the virtio-MMIO (version 2, "modern") transport: [`mmio`] is the
//! register interface and the queues, [`block`] the block device behind `vmm run --disk`.
//!
//! Queues and descriptor chains come from rust-vmm's `virtio-queue`, constants from
//! `virtio-bindings`. Requests are served on the vCPU thread that wrote the queue-notify
//! register, synchronously; the device's interrupt goes to KVM through an irqfd. See
//! `docs/devices.md`.

pub mod block;
#[cfg(test)]
mod block_tests;
pub mod mmio;

use std::sync::Mutex;

pub use block::{Block, DiskConfig, DiskError, DiskImage};
pub use mmio::{MmioTransport, VirtioDevice};

use crate::layout;

/// A device in the MMIO window: reads and writes at offsets into its register window.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct MmioSlot {
    base: u64,
    size: u64,
    device: Mutex<Box<dyn MmioDevice>>,
}

/// Every MMIO device of one VM, found by address. vCPUs reach it on `KVM_EXIT_MMIO`.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<MmioSlot>,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at `[base, base + size)`; the caller picks non-overlapping windows
    /// (from [`layout`]).
    pub fn add(&mut self, base: u64, size: u64, device: Box<dyn MmioDevice>) {
        self.slots.push(MmioSlot {
            base,
            size,
            device: Mutex::new(device),
        });
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&MmioSlot, u64)> {
        self.slots.iter().find_map(|s| {
            let offset = addr.checked_sub(s.base)?;
            (offset.checked_add(len as u64)? <= s.size).then_some((s, offset))
        })
    }

    /// Serves a guest read at `addr`; `false` if no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                slot.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Serves a guest write at `addr`; `false` if no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => {
                slot.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// The register window and interrupt line of virtio-MMIO device `index`, or `None` past the
/// last one the layout has room for.
pub fn device_window(index: usize) -> Option<(u64, u32)> {
    (index < layout::VIRTIO_MMIO_MAX_DEVICES).then(|| {
        (
            layout::VIRTIO_MMIO_START + index as u64 * layout::VIRTIO_MMIO_SIZE,
            layout::VIRTIO_MMIO_GSI_START + index as u32,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn the_bus_dispatches_by_window_and_refuses_straddling_accesses() {
        let mut bus = MmioBus::new();
        let (base, _) = device_window(0).unwrap_or_default();
        bus.add(base, 0x1000, Box::new(Echo(Vec::new())));
        let mut b = [0u8; 4];
        assert!(bus.read(base + 0x10, &mut b));
        assert_eq!(b, [0x10; 4]);
        assert!(!bus.read(base - 4, &mut b));
        // The last 4 bytes are inside; 4 bytes at 0xffe straddle the end.
        assert!(bus.read(base + 0xffc, &mut b));
        assert!(!bus.read(base + 0xffe, &mut b));
        assert!(!bus.write(u64::MAX - 1, &b));
        assert!(bus.write(base, &b));
    }

    #[test]
    fn each_device_has_its_own_window_and_line() {
        assert_eq!(device_window(0), Some((0xd000_0000, 5)));
        assert_eq!(device_window(1), Some((0xd000_1000, 6)));
        assert_eq!(device_window(layout::VIRTIO_MMIO_MAX_DEVICES), None);
    }
}
