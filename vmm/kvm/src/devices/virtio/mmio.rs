//! The virtio-MMIO transport, version 2 (virtio 1.x "modern" devices only; no legacy
//! version-1 registers such as `QueuePFN`).
//!
//! The guest configures the device through 32-bit registers in a 4 KiB window (magic,
//! version, device id, feature negotiation, queue set-up, notify, interrupt status/ack,
//! device status) and reads the device's configuration space from offset 0x100. Everything
//! the guest writes is checked here: features it accepts must have been offered, queue
//! addresses must lie in guest memory before a queue becomes ready, and a notify is served
//! only once the driver said DRIVER_OK. Nothing a guest writes makes this code panic.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::MmioDevice;
use crate::memory::GuestMemory;

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern virtio-MMIO layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id: "KVMV" (the spec leaves the value to the device).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"KVMV");

/// What a virtio device behind the transport provides.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 for a block device).
    fn device_type(&self) -> u32;
    /// Every feature bit the device offers (transport bits such as VERSION_1 included).
    fn features(&self) -> u64;
    /// The largest size of each queue (powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver accepted `features` and set DRIVER_OK.
    fn activate(&mut self, features: u64);
    /// Serves queue `index` after a notify; returns whether the used ring was updated.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
    /// Back to the state before the driver found the device.
    fn reset(&mut self);
}

/// A virtio device behind its MMIO registers, with its queues and interrupt.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport for `device`; `irq` is the eventfd registered with KVM as its irqfd.
    pub fn new(device: D, mem: GuestMemory, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&max| match Queue::new(max) {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::error!(max, error = %e, "a virtio device asked for an invalid queue size");
                    None
                }
            })
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, ...).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.is_some_and(|q| q.ready()) as u32,
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared-memory regions: a length of all ones says so.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => {
                tracing::debug!(
                    offset = format_args!("{offset:#x}"),
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.set_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.configure_queue(offset, value),
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value == 1),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => tracing::debug!(
                offset = format_args!("{offset:#x}"),
                value,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        // Features are negotiated between DRIVER and FEATURES_OK only.
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            tracing::warn!(
                status = self.status,
                "virtio-mmio: driver features written outside feature negotiation; ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => tracing::warn!(
                sel,
                value,
                "virtio-mmio: driver features beyond bit 63; ignored"
            ),
        }
    }

    fn configure_queue(&mut self, offset: u32, value: u32) {
        // Queue registers change only while the driver sets the device up and the queue is not
        // live yet.
        let setting_up = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            tracing::warn!(
                queue = sel,
                "virtio-mmio: set-up of a queue the device does not have"
            );
            return;
        };
        if !setting_up || q.ready() {
            tracing::warn!(
                queue = sel,
                offset = format_args!("{offset:#x}"),
                "virtio-mmio: queue set-up outside device set-up or on a ready queue; ignored"
            );
            return;
        }
        match offset {
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if q.try_set_size(size).is_ok() => {}
                _ => tracing::warn!(queue = sel, size = value, "virtio-mmio: invalid queue size"),
            },
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn set_queue_ready(&mut self, ready: bool) {
        let sel = self.queue_sel;
        let status = self.status;
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else {
            tracing::warn!(
                queue = sel,
                "virtio-mmio: QueueReady for a queue the device does not have"
            );
            return;
        };
        if !ready {
            q.set_ready(false);
            return;
        }
        if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            tracing::warn!(
                queue = sel,
                "virtio-mmio: QueueReady before FEATURES_OK; ignored"
            );
            return;
        }
        q.set_ready(true);
        // The rings must lie in guest memory; a queue that does not stays not ready (the
        // driver reads QueueReady back as 0).
        if !q.is_valid(&mem) {
            tracing::warn!(
                queue = sel,
                size = q.size(),
                desc = format_args!("{:#x}", q.desc_table()),
                avail = format_args!("{:#x}", q.avail_ring()),
                used = format_args!("{:#x}", q.used_ring()),
                "virtio-mmio: the guest's queue is not in guest memory; not ready"
            );
            q.set_ready(false);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            tracing::warn!(
                old,
                new = value,
                "virtio-mmio: the driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let mut value = value;
        let newly = value & !old;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let unknown = self.driver_features & !offered;
            let modern = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if unknown != 0 || !modern || old & VIRTIO_CONFIG_S_DRIVER == 0 {
                tracing::warn!(
                    accepted = format_args!("{:#x}", self.driver_features),
                    offered = format_args!("{offered:#x}"),
                    "virtio-mmio: the driver's features are not acceptable (not offered, or no VERSION_1): FEATURES_OK refused"
                );
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if value & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK; ignored");
                value &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                tracing::debug!(
                    device = self.device.device_type(),
                    features = format_args!("{:#x}", self.driver_features),
                    "virtio-mmio: driver ready"
                );
                self.device.activate(self.driver_features);
            }
        }
        if newly & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!(
                device = self.device.device_type(),
                "virtio-mmio: the driver gave up on the device (FAILED)"
            );
        }
        self.status = value;
    }

    /// Device reset (status 0): the device forgets the driver, its features and queues.
    fn reset(&mut self) {
        tracing::debug!(device = self.device.device_type(), "virtio-mmio: reset");
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn notify(&mut self, value: u32) {
        let index = value as usize;
        let live = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0;
        let Some(q) = self.queues.get_mut(index) else {
            tracing::warn!(
                queue = value,
                "virtio-mmio: notify of a queue the device does not have"
            );
            return;
        };
        if !live || !q.ready() {
            tracing::warn!(
                queue = value,
                status = self.status,
                "virtio-mmio: notify before the driver is ready or on a queue that is not ready; ignored"
            );
            return;
        }
        if self.device.process_queue(index, q, &self.mem) {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            if let Err(e) = self.irq.write(1) {
                tracing::error!(error = %e, "virtio-mmio: could not raise the interrupt");
            }
        }
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio: register read that is not 32 bits wide and aligned"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // No writable configuration field is offered (no WCE).
            tracing::debug!(
                offset = format_args!("{offset:#x}"),
                "virtio-mmio: write to the configuration space; ignored"
            );
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                len = data.len(),
                "virtio-mmio: register write that is not 32 bits wide; ignored"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                "virtio-mmio: unaligned register write; ignored"
            );
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

/// Status bits a driver sets on the way to DRIVER_OK, in order (for tests and callers).
pub const STATUS_DRIVER_STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];
