//! The virtio-blk device driven as a guest driver would: through its MMIO registers, with
//! the split queue laid out in guest memory and requests against a real temporary file.

use std::io::Write;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::MmioDevice;
use super::block::{self, Block, DiskConfig, DiskError, DiskImage, DmaFilter, S_IOERR, S_OK};
use super::mmio::{MMIO_MAGIC, MmioTransport, VENDOR_ID};
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x1_0000;
const STATUS: u64 = 0x9000;
/// What the status byte holds before the device writes it.
const SENTINEL: u8 = 0xee;
const SECTORS: u64 = 64;

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Driver {
    mem: GuestMemory,
    dev: MmioTransport<Block>,
    irq: EventFd,
    file: tempfile::NamedTempFile,
    avail_idx: u16,
    used_seen: u16,
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn image(read_only: bool) -> (tempfile::NamedTempFile, DiskImage) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&pattern((SECTORS * 512) as usize))
        .expect("fill the image");
    let img = DiskImage::open(&DiskConfig {
        path: file.path().to_path_buf(),
        read_only,
    })
    .expect("open the image");
    (file, img)
}

fn allow_all() -> DmaFilter {
    Arc::new(|_, _| true)
}

impl Driver {
    fn new(read_only: bool) -> Driver {
        Driver::with_filter(read_only, allow_all())
    }

    fn with_filter(read_only: bool, dma: DmaFilter) -> Driver {
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let (file, img) = image(read_only);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dev = MmioTransport::new(
            Block::new(img, 0, dma),
            mem.clone(),
            irq.try_clone().expect("eventfd clone"),
        );
        Driver {
            mem,
            dev,
            irq,
            file,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn r(&mut self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, offset: u32, value: u32) {
        self.dev.write(u64::from(offset), &value.to_le_bytes());
    }

    fn device_features(&mut self) -> u64 {
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = self.r(VIRTIO_MMIO_DEVICE_FEATURES);
        self.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = self.r(VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns whether the device kept
    /// FEATURES_OK.
    fn negotiate(&mut self, features: u64) -> bool {
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    fn setup_queue(&mut self, desc: u64, avail: u64, used: u64) {
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        self.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.w(VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        self.w(VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn driver_ok(&mut self) {
        let s = self.r(VIRTIO_MMIO_STATUS);
        self.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// A device ready for requests, as Linux leaves it.
    fn ready(read_only: bool) -> Driver {
        let mut d = Driver::new(read_only);
        d.bring_up();
        d
    }

    fn bring_up(&mut self) {
        let f = self.device_features();
        assert!(self.negotiate(f));
        self.setup_queue(DESC, AVAIL, USED);
        assert_eq!(self.r(VIRTIO_MMIO_QUEUE_READY), 1);
        self.driver_ok();
        assert_ne!(self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    }

    fn put_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + u64::from(index) * 16;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("descriptor");
    }

    /// Offers the chain starting at `head` and notifies queue 0.
    fn offer(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    /// Writes `descs` (addr, len, flags) as one chain at descriptors 0.., linked with NEXT,
    /// and offers it.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            self.put_desc(i as u16, addr, len, flags, i as u16 + 1);
        }
        self.offer(0);
    }

    /// The used entries added since the last call: (head, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = USED + 4 + u64::from(self.used_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).expect("header");
        self.mem
            .write_obj(SENTINEL, GuestAddress(STATUS))
            .expect("status");
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("guest read");
        v
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).expect("read the image")
    }

    /// IN of `count` sectors at `sector` into DATA; returns (status, used len).
    fn read_sectors(&mut self, sector: u64, count: u32) -> (u8, u32) {
        self.header(VIRTIO_BLK_T_IN, sector);
        self.submit(&[(HDR, 16, R), (DATA, count * 512, W), (STATUS, 1, W)]);
        let used = self.take_used();
        assert_eq!(used.len(), 1, "{used:?}");
        (self.status(), used[0].1)
    }

    /// OUT of `data` at `sector` from DATA; returns (status, used len).
    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
        self.mem
            .write_slice(data, GuestAddress(DATA))
            .expect("data");
        self.header(VIRTIO_BLK_T_OUT, sector);
        self.submit(&[(HDR, 16, R), (DATA, data.len() as u32, R), (STATUS, 1, W)]);
        let used = self.take_used();
        assert_eq!(used.len(), 1, "{used:?}");
        (self.status(), used[0].1)
    }

    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

#[test]
fn registers_identify_a_modern_block_device_and_config_gives_its_capacity() {
    let mut d = Driver::new(false);
    assert_eq!(d.r(VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(d.r(VIRTIO_MMIO_MAGIC_VALUE).to_le_bytes(), *b"virt");
    assert_eq!(d.r(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.r(VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(d.r(VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(block::QUEUE_SIZE));
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), 0);
    // A queue the device does not have.
    d.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // Capacity in 512-byte sectors, read whole and in halves as Linux does.
    let mut cap = [0u8; 8];
    d.dev.read(u64::from(VIRTIO_MMIO_CONFIG), &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG), SECTORS as u32);
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG + 4), 0);
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG + 12), block::SEG_MAX);
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG + 20), 512);
    // Past the config structure, and at the very end of the window: zeros, no panic.
    assert_eq!(d.r(VIRTIO_MMIO_CONFIG + 0x100), 0);
    let mut b = [0xffu8; 4];
    d.dev.read(0xffc, &mut b);
    assert_eq!(b, [0; 4]);
    d.dev.read(u64::MAX - 8, &mut b);
    // Registers are 32-bit: other widths and unaligned offsets read 0 and change nothing.
    let mut one = [0xffu8; 1];
    d.dev.read(0, &mut one);
    assert_eq!(one, [0]);
    d.dev.read(2, &mut b);
    assert_eq!(b, [0; 4]);
    d.dev.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
    d.dev
        .write(u64::from(VIRTIO_MMIO_STATUS) + 1, &1u32.to_le_bytes());
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn features_offer_version_1_flush_and_ro_only_for_read_only_disks() {
    let mut rw = Driver::new(false);
    let f = rw.device_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    // Features past bit 63 read 0.
    rw.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(rw.r(VIRTIO_MMIO_DEVICE_FEATURES), 0);
    let mut ro = Driver::new(true);
    assert_ne!(ro.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn feature_negotiation_keeps_features_ok_only_for_offered_features_with_version_1() {
    let mut d = Driver::new(false);
    let offered = d.device_features();
    // A subset that includes VERSION_1 is fine.
    assert!(d.negotiate((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH)));
    assert_eq!(
        d.dev.driver_features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH)
    );
    // Once FEATURES_OK is set, the driver's features are frozen.
    d.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
    assert_eq!(
        d.dev.driver_features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH)
    );

    // A feature that was not offered (indirect descriptors, bit 28): FEATURES_OK refused.
    d.w(VIRTIO_MMIO_STATUS, 0);
    assert!(!d.negotiate(offered | (1 << 28)));
    // And the driver cannot go on to DRIVER_OK.
    d.driver_ok();
    assert_eq!(d.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);

    // A legacy driver (no VERSION_1): refused.
    d.w(VIRTIO_MMIO_STATUS, 0);
    assert!(!d.negotiate(offered & !(1 << VIRTIO_F_VERSION_1)));

    // Features written before DRIVER are ignored; clearing status bits without a reset too.
    d.w(VIRTIO_MMIO_STATUS, 0);
    d.w(VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
    assert_eq!(d.dev.driver_features(), 0);
    assert!(d.negotiate(offered));
    d.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_ne!(d.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn read_returns_the_image_bytes_and_raises_the_interrupt() {
    let mut d = Driver::ready(false);
    let (status, len) = d.read_sectors(3, 2);
    assert_eq!(status, S_OK);
    assert_eq!(len, 2 * 512 + 1);
    let image = d.image_bytes();
    assert_eq!(d.guest(DATA, 1024), image[3 * 512..5 * 512]);
    // The last sector too.
    let (status, _) = d.read_sectors(SECTORS - 1, 1);
    assert_eq!(status, S_OK);
    assert_eq!(d.guest(DATA, 512), image[(SECTORS as usize - 1) * 512..]);
    // One interrupt per notify, with the used-ring bit; acknowledging clears it.
    assert_eq!(d.interrupts(), 2);
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    d.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn read_scatters_into_several_buffers_and_header_and_data_may_share_a_descriptor() {
    let mut d = Driver::ready(false);
    d.header(VIRTIO_BLK_T_IN, 10);
    // Data in three writable pieces, the last of which also holds the status byte.
    d.submit(&[
        (HDR, 16, R),
        (DATA, 100, W),
        (DATA + 0x1000, 400, W),
        (DATA + 0x2000, 12 + 512 + 1, W),
    ]);
    let used = d.take_used();
    assert_eq!(used, vec![(0, 1024 + 1)]);
    let image = d.image_bytes();
    let mut got = d.guest(DATA, 100);
    got.extend(d.guest(DATA + 0x1000, 400));
    got.extend(d.guest(DATA + 0x2000, 524));
    assert_eq!(got, image[10 * 512..12 * 512]);
    assert_eq!(d.guest(DATA + 0x2000 + 524, 1), [S_OK]);
}

#[test]
fn write_lands_in_the_image_and_nowhere_else() {
    let mut d = Driver::ready(false);
    let before = d.image_bytes();
    let data: Vec<u8> = (0..1024).map(|i| (255 - i % 251) as u8).collect();
    let (status, len) = d.write_sectors(7, &data);
    assert_eq!(status, S_OK);
    assert_eq!(len, 1, "only the status byte is written for an OUT");
    let after = d.image_bytes();
    assert_eq!(after.len(), before.len());
    assert_eq!(after[7 * 512..9 * 512], data[..]);
    assert_eq!(after[..7 * 512], before[..7 * 512]);
    assert_eq!(after[9 * 512..], before[9 * 512..]);
    // And reads see it.
    let (status, _) = d.read_sectors(7, 2);
    assert_eq!(status, S_OK);
    assert_eq!(d.guest(DATA, 1024), data);
}

#[test]
fn flush_get_id_and_unsupported_requests() {
    let mut d = Driver::ready(false);
    d.header(VIRTIO_BLK_T_FLUSH, 0);
    d.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(d.take_used(), vec![(0, 1)]);
    assert_eq!(d.status(), S_OK);

    d.header(VIRTIO_BLK_T_GET_ID, 0);
    d.submit(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!(d.take_used(), vec![(0, 21)]);
    assert_eq!(d.status(), S_OK);
    let mut id = b"vmm-disk0".to_vec();
    id.resize(20, 0);
    assert_eq!(d.guest(DATA, 20), id);

    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 0xdead_beef] {
        d.header(kind, 0);
        d.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
        assert_eq!(d.take_used(), vec![(0, 1)]);
        assert_eq!(d.status(), VIRTIO_BLK_S_UNSUPP as u8, "type {kind:#x}");
    }
    assert_eq!(d.dev.device().stats.unsupported, 3);
    assert_eq!(d.dev.device().stats.ok, 2);
}

#[test]
fn a_read_only_disk_refuses_writes_but_reads_and_flushes() {
    let mut d = Driver::ready(true);
    let before = d.image_bytes();
    let (status, len) = d.write_sectors(0, &[0x55; 512]);
    assert_eq!(status, S_IOERR);
    assert_eq!(len, 1);
    assert_eq!(d.image_bytes(), before);
    let (status, _) = d.read_sectors(0, 1);
    assert_eq!(status, S_OK);
    assert_eq!(d.guest(DATA, 512), before[..512]);
    d.header(VIRTIO_BLK_T_FLUSH, 0);
    d.submit(&[(HDR, 16, R), (STATUS, 1, W)]);
    d.take_used();
    assert_eq!(d.status(), S_OK);
}

#[test]
fn sectors_beyond_the_capacity_and_partial_sectors_get_ioerr() {
    let mut d = Driver::ready(false);
    let before = d.image_bytes();
    // The last sector plus one more.
    assert_eq!(d.read_sectors(SECTORS - 1, 2).0, S_IOERR);
    assert_eq!(d.read_sectors(SECTORS, 1).0, S_IOERR);
    // Sector numbers whose end or byte offset would overflow.
    assert_eq!(d.read_sectors(u64::MAX, 1).0, S_IOERR);
    assert_eq!(d.read_sectors(u64::MAX / 512, 1).0, S_IOERR);
    assert_eq!(d.write_sectors(SECTORS - 1, &[1; 1024]).0, S_IOERR);
    assert_eq!(d.write_sectors(u64::MAX - 1, &[1; 512]).0, S_IOERR);
    // Data that is not a whole number of sectors.
    assert_eq!(d.write_sectors(0, &[1; 100]).0, S_IOERR);
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, R), (DATA, 513, W), (STATUS, 1, W)]);
    d.take_used();
    assert_eq!(d.status(), S_IOERR);
    // A header shorter than 16 bytes.
    d.header(VIRTIO_BLK_T_OUT, 0);
    d.submit(&[(HDR, 8, R), (STATUS, 1, W)]);
    d.take_used();
    assert_eq!(d.status(), S_IOERR);
    // The image did not change, not even its size.
    assert_eq!(d.image_bytes(), before);
    assert_eq!(d.dev.device().stats.ioerr, 9);
}

/// Runs `build` (which writes descriptors and offers a chain), then checks that the chain
/// came back with length 0, the status byte and the image untouched, and that the device
/// still serves a good request afterwards.
fn assert_refused(d: &mut Driver, what: &str, build: impl FnOnce(&mut Driver)) {
    let before = d.image_bytes();
    let refused = d.dev.device().stats.refused;
    build(d);
    let used = d.take_used();
    assert_eq!(used.len(), 1, "{what}: {used:?}");
    assert_eq!(used[0].1, 0, "{what}");
    assert_eq!(d.status(), SENTINEL, "{what}: status written");
    assert_eq!(d.image_bytes(), before, "{what}: image changed");
    assert_eq!(d.dev.device().stats.refused, refused + 1, "{what}");
    let (status, _) = d.read_sectors(1, 1);
    assert_eq!(status, S_OK, "{what}: the device no longer serves requests");
}

#[test]
fn malformed_chains_are_returned_untouched_and_the_device_goes_on() {
    let mut d = Driver::ready(false);
    d.mem
        .write_slice(&[0x77; 512], GuestAddress(DATA))
        .expect("data");

    assert_refused(&mut d, "a loop", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.put_desc(0, HDR, 16, R | VRING_DESC_F_NEXT as u16, 1);
        d.put_desc(1, DATA, 512, R | VRING_DESC_F_NEXT as u16, 2);
        d.put_desc(2, STATUS, 1, W | VRING_DESC_F_NEXT as u16, 0);
        d.offer(0);
    });
    assert_refused(&mut d, "a self loop", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.put_desc(0, HDR, 16, R | VRING_DESC_F_NEXT as u16, 0);
        d.offer(0);
    });
    assert_refused(&mut d, "a next index outside the table", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.put_desc(0, HDR, 16, R | VRING_DESC_F_NEXT as u16, 1);
        d.put_desc(1, DATA, 512, R | VRING_DESC_F_NEXT as u16, 60_000);
        d.offer(0);
    });
    assert_refused(&mut d, "a chain longer than SEG_MAX + 2", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![(HDR, 16, R)];
        descs.extend((0..block::MAX_DESCRIPTORS).map(|_| (DATA, 512, R)));
        descs.push((STATUS, 1, W));
        d.submit(&descs);
    });
    assert_refused(&mut d, "no device-writable status", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.submit(&[(HDR, 16, R), (DATA, 512, R)]);
    });
    assert_refused(&mut d, "a readable descriptor after a writable one", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.submit(&[(HDR, 16, R), (STATUS, 1, W), (DATA, 512, R)]);
    });
    assert_refused(&mut d, "data outside guest memory", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.submit(&[(HDR, 16, R), (0xffff_ffff_0000, 512, R), (STATUS, 1, W)]);
    });
    assert_refused(&mut d, "data running past the end of guest memory", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.submit(&[
            (HDR, 16, R),
            (MEM_SIZE as u64 - 256, 512, R),
            (STATUS, 1, W),
        ]);
    });
    assert_refused(&mut d, "a 4 GiB descriptor", |d| {
        d.header(VIRTIO_BLK_T_IN, 0);
        d.submit(&[(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)]);
    });
    assert_refused(&mut d, "an address that wraps", |d| {
        d.header(VIRTIO_BLK_T_IN, 0);
        d.submit(&[(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)]);
    });
    assert_refused(&mut d, "a header outside guest memory", |d| {
        d.header(VIRTIO_BLK_T_OUT, 0);
        d.submit(&[(u64::MAX - 8, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    });
    // A head index beyond the queue cannot even be returned: it is dropped.
    d.offer(QSIZE + 5);
    assert!(d.take_used().is_empty());
    assert_eq!(d.read_sectors(1, 1).0, S_OK);
}

#[test]
fn an_avail_index_far_ahead_of_the_device_is_ignored_without_panic() {
    let mut d = Driver::ready(false);
    // The driver claims 1000 new chains in a 256-entry queue.
    d.mem
        .write_obj(1000u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    d.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(d.take_used().is_empty());
    // Notifying a queue that does not exist.
    d.w(VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    d.w(VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn device_writes_to_memory_the_vm_forbids_are_refused() {
    // As the VM does for the patch arena: no device write into one page of guest memory.
    const FORBIDDEN: u64 = DATA + 0x4000;
    let forbid: DmaFilter = Arc::new(|start, end| end <= FORBIDDEN || start >= FORBIDDEN + 0x1000);
    let mut d = Driver::with_filter(false, forbid);
    d.bring_up();
    d.mem
        .write_slice(&[0x42; 512], GuestAddress(FORBIDDEN))
        .expect("data");
    assert_refused(&mut d, "IN into forbidden memory", |d| {
        d.header(VIRTIO_BLK_T_IN, 0);
        d.submit(&[(HDR, 16, R), (FORBIDDEN, 512, W), (STATUS, 1, W)]);
    });
    assert_refused(&mut d, "IN partly into forbidden memory", |d| {
        d.header(VIRTIO_BLK_T_IN, 0);
        d.submit(&[(HDR, 16, R), (FORBIDDEN - 256, 512, W), (STATUS, 1, W)]);
    });
    assert_eq!(d.guest(FORBIDDEN, 512), vec![0x42; 512]);
    // Reading *from* there (OUT) is fine: the filter is about device writes.
    let before = d.image_bytes();
    d.header(VIRTIO_BLK_T_OUT, 2);
    d.submit(&[(HDR, 16, R), (FORBIDDEN, 512, R), (STATUS, 1, W)]);
    d.take_used();
    assert_eq!(d.status(), S_OK);
    assert_eq!(d.image_bytes()[2 * 512..3 * 512], [0x42; 512]);
    assert_eq!(d.image_bytes()[..2 * 512], before[..2 * 512]);
}

#[test]
fn queues_must_be_in_guest_memory_and_set_up_in_order() {
    let mut d = Driver::new(false);
    // Queue registers before FEATURES_OK are ignored; so is QueueReady.
    d.setup_queue(DESC, AVAIL, USED);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    let f = d.device_features();
    assert!(d.negotiate(f));
    // Rings outside guest memory: the queue stays not ready.
    d.setup_queue(MEM_SIZE as u64 + 0x1000, AVAIL, USED);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    d.setup_queue(DESC, AVAIL, 0xffff_ffff_ffff_f000);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    // Invalid sizes are refused (not a power of two, beyond the maximum).
    d.w(VIRTIO_MMIO_QUEUE_NUM, 100);
    d.w(VIRTIO_MMIO_QUEUE_NUM, 1024);
    d.w(VIRTIO_MMIO_QUEUE_NUM, 0x1_0000 + 16);
    // A queue the device does not have.
    d.w(VIRTIO_MMIO_QUEUE_SEL, 3);
    d.w(VIRTIO_MMIO_QUEUE_NUM, 16);
    d.w(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    // Notify before DRIVER_OK is ignored.
    d.setup_queue(DESC, AVAIL, USED);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 1);
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert!(d.take_used().is_empty());
    // A ready queue cannot be moved.
    d.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    d.driver_ok();
    // DRIVER_OK does not serve what was offered before it; the next notify does.
    d.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(d.take_used(), vec![(0, 513)]);
    assert_eq!(d.status(), S_OK);
}

#[test]
fn reset_returns_the_device_to_its_initial_state() {
    let mut d = Driver::ready(false);
    assert_eq!(d.read_sectors(0, 1).0, S_OK);
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    d.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.r(VIRTIO_MMIO_STATUS), 0);
    assert_eq!(d.r(VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(d.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(d.dev.driver_features(), 0);
    // A notify after reset is not served.
    d.header(VIRTIO_BLK_T_IN, 0);
    d.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert!(d.take_used().is_empty());
    assert_eq!(d.status(), SENTINEL);
    // A fresh driver start works from clean rings: the device's ring indices restart at 0.
    d.mem
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .expect("clear rings");
    d.avail_idx = 0;
    d.used_seen = 0;
    d.bring_up();
    let (status, len) = d.read_sectors(4, 1);
    assert_eq!((status, len), (S_OK, 513));
    assert_eq!(d.guest(DATA, 512), d.image_bytes()[4 * 512..5 * 512]);
    let used_idx: u16 = d.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
    assert_eq!(used_idx, 1);
}

#[test]
fn disk_images_are_checked_when_opened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let open = |path: &std::path::Path, read_only| {
        DiskImage::open(&DiskConfig {
            path: path.to_path_buf(),
            read_only,
        })
    };
    let missing = dir.path().join("nope.img");
    assert!(matches!(
        open(&missing, false),
        Err(DiskError::Missing { .. })
    ));
    let e = open(dir.path(), true).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            e,
            DiskError::NotAFile {
                kind: "a directory",
                ..
            }
        ),
        "{e}"
    );
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).expect("write");
    let e = open(&odd, false).map(|_| ()).unwrap_err();
    assert!(matches!(e, DiskError::BadSize { size: 1000, .. }), "{e}");
    assert!(e.to_string().contains("multiple of 512"), "{e}");
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, []).expect("write");
    assert!(matches!(
        open(&empty, true),
        Err(DiskError::BadSize { size: 0, .. })
    ));
    let good = dir.path().join("good.img");
    std::fs::write(&good, [0u8; 4096]).expect("write");
    let img = open(&good, false).expect("a good image");
    assert_eq!((img.sectors, img.read_only), (8, false));
    let too_many = vec![
        DiskConfig {
            path: good.clone(),
            read_only: true
        };
        crate::layout::VIRTIO_MMIO_MAX_DEVICES + 1
    ];
    assert!(matches!(
        block::open_all(&too_many),
        Err(DiskError::TooMany { .. })
    ));
}

#[test]
fn disk_arguments_parse_with_an_optional_ro_suffix() {
    let p = |t: &str| DiskConfig::parse(t).map(|c| (c.path.display().to_string(), c.read_only));
    assert_eq!(p("a.img").ok(), Some(("a.img".into(), false)));
    assert_eq!(p("/x/a.img,ro").ok(), Some(("/x/a.img".into(), true)));
    assert_eq!(p("a,b.img,rw").ok(), Some(("a,b.img".into(), false)));
    assert!(p(",ro").is_err());
    assert!(p("").is_err());
}
