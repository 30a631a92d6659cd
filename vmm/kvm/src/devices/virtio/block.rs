//! virtio-blk: a raw disk image file as the guest's block device (`vmm run --disk`).
//!
//! One request queue. Requests: IN (read sectors), OUT (write sectors; IOERR on a read-only
//! disk), FLUSH (fdatasync of the image), GET_ID (a 20-byte serial); anything else is
//! answered UNSUPP. Every request is checked before the image or guest memory is touched:
//! the chain must end within [`MAX_DESCRIPTORS`] descriptors, put device-readable
//! descriptors before device-writable ones, and name only guest memory the device may
//! write; a chain that fails these checks is returned with nothing written (used length 0).
//! A well-formed request for sectors beyond the capacity, or whose data is not a whole
//! number of sectors, gets IOERR.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::mmio::VirtioDevice;
use crate::memory::GuestMemory;

/// Sector size of the virtio-blk protocol (sector numbers are always in 512-byte units).
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors of one queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request offered to the driver (VIRTIO_BLK_F_SEG_MAX).
pub const SEG_MAX: u32 = 126;
/// The longest chain served: header + `SEG_MAX` data segments + status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Bytes copied between the image and guest memory at a time.
const CHUNK: usize = 64 << 10;
/// Request status bytes.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// The request header: type u32, reserved u32, sector u64.
const HEADER_LEN: usize = 16;

/// One `--disk`: an image file and whether the guest may write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl DiskConfig {
    /// Parses `PATH` or `PATH,ro` (read-only) or `PATH,rw` (the command line's `--disk`).
    pub fn parse(text: &str) -> Result<DiskConfig, DiskError> {
        let (path, read_only) = if let Some(p) = text.strip_suffix(",ro") {
            (p, true)
        } else if let Some(p) = text.strip_suffix(",rw") {
            (p, false)
        } else {
            (text, false)
        };
        if path.is_empty() {
            return Err(DiskError::EmptyPath {
                text: text.to_string(),
            });
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("--disk {text:?}: no file named (expected FILE or FILE,ro)")]
    EmptyPath { text: String },
    #[error("disk image {path} does not exist")]
    Missing { path: String },
    #[error("disk image {path} is not a regular file (it is {kind})")]
    NotAFile { path: String, kind: &'static str },
    #[error("cannot open disk image {path} for {access}{hint}")]
    Open {
        path: String,
        access: &'static str,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {path} is {size} bytes, not a non-zero multiple of 512 (the sector size); resize it (truncate -s) rather than let the tail go unseen"
    )]
    BadSize { path: String, size: u64 },
    #[error("{count} disks asked for: at most {max} fit in the device layout")]
    TooMany { count: usize, max: usize },
}

/// Whether the device may write guest memory `[start, end)` (IN data, GET_ID, status): the
/// VM refuses the patch arena and, under code integrity, protected code.
pub type DmaFilter = Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// An opened disk image, checked and sized.
#[derive(Debug)]
pub struct DiskImage {
    pub file: File,
    pub path: PathBuf,
    pub read_only: bool,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

impl DiskImage {
    /// Opens `config.path` for reading (and writing, unless read-only) and checks that it is a
    /// regular file whose size is a non-zero multiple of 512 bytes.
    pub fn open(config: &DiskConfig) -> Result<DiskImage, DiskError> {
        let path = config.path.display().to_string();
        let meta = match std::fs::metadata(&config.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(DiskError::Missing { path });
            }
            Err(source) => {
                return Err(DiskError::Open {
                    path,
                    access: "reading",
                    hint: "",
                    source,
                });
            }
        };
        if !meta.is_file() {
            let kind = if meta.is_dir() {
                "a directory"
            } else {
                "a device, socket or pipe"
            };
            return Err(DiskError::NotAFile { path, kind });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                access: if config.read_only {
                    "reading"
                } else {
                    "reading and writing"
                },
                hint: if config.read_only {
                    ""
                } else {
                    " (append ,ro to --disk to give the guest a read-only disk)"
                },
                source,
            })?;
        // The size of the opened file, not of whatever the path named a moment ago.
        let size = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                access: "reading",
                hint: "",
                source,
            })?
            .len();
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadSize { path, size });
        }
        tracing::info!(
            path = %config.path.display(),
            read_only = config.read_only,
            sectors = size / SECTOR_SIZE,
            "disk image opened"
        );
        Ok(DiskImage {
            file,
            path: config.path.clone(),
            read_only: config.read_only,
            sectors: size / SECTOR_SIZE,
        })
    }
}

/// Opens every disk of `configs`, in order, refusing more than the layout has room for.
pub fn open_all(configs: &[DiskConfig]) -> Result<Vec<DiskImage>, DiskError> {
    let max = crate::layout::VIRTIO_MMIO_MAX_DEVICES;
    if configs.len() > max {
        return Err(DiskError::TooMany {
            count: configs.len(),
            max,
        });
    }
    configs.iter().map(DiskImage::open).collect()
}

/// The virtio-blk device.
pub struct Block {
    image: DiskImage,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    dma: DmaFilter,
    queue_sizes: [u16; 1],
    /// Requests served, by outcome (for logs and tests).
    pub stats: BlockStats,
}

/// Counters of served requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    pub ok: u64,
    pub ioerr: u64,
    pub unsupported: u64,
    /// Chains returned untouched (malformed, or naming memory the device may not write).
    pub refused: u64,
}

/// Why a chain is returned without a status byte.
#[derive(Debug)]
enum Refusal {
    Empty,
    TooLong,
    Unterminated,
    ReadableAfterWritable,
    NoStatus,
    Forbidden { start: u64, len: u32 },
    Memory(virtio_queue::Error),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Empty => write!(f, "the head descriptor cannot be read"),
            Refusal::TooLong => write!(f, "longer than {MAX_DESCRIPTORS} descriptors"),
            Refusal::Unterminated => write!(
                f,
                "the chain does not end (it loops, names a descriptor outside the table, or runs past the queue size)"
            ),
            Refusal::ReadableAfterWritable => {
                write!(
                    f,
                    "a device-readable descriptor follows a device-writable one"
                )
            }
            Refusal::NoStatus => write!(f, "no device-writable byte for the status"),
            Refusal::Forbidden { start, len } => write!(
                f,
                "a device-writable buffer at {start:#x} (+{len:#x}) lies in memory the device may not write"
            ),
            Refusal::Memory(e) => write!(f, "a buffer is not in guest memory: {e}"),
        }
    }
}

impl Block {
    /// The device for `image`; `index` names it in GET_ID (`vmm-disk0`, ...).
    pub fn new(image: DiskImage, index: usize, dma: DmaFilter) -> Block {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = format!("vmm-disk{index}");
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Block {
            image,
            id,
            dma,
            queue_sizes: [QUEUE_SIZE],
            stats: BlockStats::default(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.image.sectors
    }

    fn config_space(&self) -> [u8; 24] {
        // struct virtio_blk_config: capacity u64 @0, size_max u32 @8, seg_max u32 @12,
        // geometry (cylinders u16, heads u8, sectors u8) @16, blk_size u32 @20.
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.image.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// The descriptors of `chain`, checked for shape (see the module documentation).
    fn check_chain(
        &self,
        chain: &DescriptorChain<&GuestMemory>,
    ) -> Result<Vec<Descriptor>, Refusal> {
        let mut descs = Vec::new();
        for d in chain.clone() {
            if descs.len() == MAX_DESCRIPTORS {
                return Err(Refusal::TooLong);
            }
            descs.push(d);
        }
        let last = descs.last().ok_or(Refusal::Empty)?;
        // The iterator stops early (loop guard, bad index, unreadable descriptor) on a
        // descriptor that still says NEXT.
        if last.has_next() {
            return Err(Refusal::Unterminated);
        }
        let first_writable = descs
            .iter()
            .position(|d| d.is_write_only())
            .ok_or(Refusal::NoStatus)?;
        if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
            return Err(Refusal::ReadableAfterWritable);
        }
        for d in &descs[first_writable..] {
            let start = d.addr().0;
            let end = start.checked_add(u64::from(d.len()));
            if d.len() > 0 && !end.is_some_and(|end| (self.dma)(start, end)) {
                return Err(Refusal::Forbidden {
                    start,
                    len: d.len(),
                });
            }
        }
        Ok(descs)
    }

    /// Serves one chain; returns the bytes written into its device-writable buffers.
    fn serve(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let head = chain.head_index();
        match self.try_serve(chain, mem) {
            Ok((status, len)) => {
                match status {
                    S_OK => self.stats.ok += 1,
                    S_UNSUPP => self.stats.unsupported += 1,
                    _ => self.stats.ioerr += 1,
                }
                len
            }
            Err(why) => {
                self.stats.refused += 1;
                tracing::warn!(
                    disk = %self.image.path.display(),
                    head,
                    reason = %why,
                    "virtio-blk: malformed request returned untouched"
                );
                0
            }
        }
    }

    fn try_serve(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<(u8, u32), Refusal> {
        self.check_chain(&chain)?;
        let mut reader = chain.clone().reader(mem).map_err(Refusal::Memory)?;
        let mut writer = chain.writer(mem).map_err(Refusal::Memory)?;
        let data_len = writer
            .available_bytes()
            .checked_sub(1)
            .ok_or(Refusal::NoStatus)?;
        let mut status_writer = writer.split_at(data_len).map_err(Refusal::Memory)?;
        let (status, written) = self.execute(&mut reader, &mut writer);
        status_writer
            .write_all(&[status])
            .map_err(|_| Refusal::NoStatus)?;
        // `written` is at most the writable bytes of the chain, whose sum fits a u32 of
        // descriptor lengths only when the chain is short; saturate rather than wrap.
        Ok((
            status,
            u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1),
        ))
    }

    /// Executes the request in `reader` (header, then OUT data) into `writer` (IN data or
    /// GET_ID); returns the status and the bytes written to `writer`.
    fn execute(
        &mut self,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> (u8, usize) {
        let mut header = [0u8; HEADER_LEN];
        if reader.read_exact(&mut header).is_err() {
            tracing::warn!(disk = %self.image.path.display(), "virtio-blk: request shorter than its header");
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                match self.range(sector, len) {
                    Some(offset) => self.read_into(offset, len, writer),
                    None => (S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.image.read_only {
                    tracing::debug!(disk = %self.image.path.display(), sector, "virtio-blk: write to a read-only disk refused");
                    return (S_IOERR, 0);
                }
                let len = reader.available_bytes();
                match self.range(sector, len) {
                    Some(offset) => (self.write_from(offset, len, reader), 0),
                    None => (S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.image.read_only {
                    return (S_OK, 0);
                }
                match self.image.file.sync_data() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        tracing::error!(disk = %self.image.path.display(), error = %e, "virtio-blk: flush failed");
                        (S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            other => {
                tracing::debug!(disk = %self.image.path.display(), kind = other, "virtio-blk: unsupported request");
                (S_UNSUPP, 0)
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors within the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let ok = len.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.image.sectors);
        if !ok {
            tracing::debug!(
                disk = %self.image.path.display(),
                sector,
                len,
                capacity = self.image.sectors,
                "virtio-blk: request outside the disk or not whole sectors"
            );
        }
        ok.then(|| sector * SECTOR_SIZE)
    }

    fn read_into(
        &self,
        offset: u64,
        len: usize,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> (u8, usize) {
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = offset + done as u64;
            if let Err(e) = self.image.file.read_exact_at(&mut buf[..n], at) {
                tracing::error!(disk = %self.image.path.display(), offset = at, error = %e, "virtio-blk: read failed");
                return (S_IOERR, done);
            }
            if writer.write_all(&buf[..n]).is_err() {
                return (S_IOERR, done);
            }
            done += n;
        }
        (S_OK, done)
    }

    fn write_from(&self, offset: u64, len: usize, reader: &mut virtio_queue::Reader<'_>) -> u8 {
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = offset + done as u64;
            if reader.read_exact(&mut buf[..n]).is_err() {
                return S_IOERR;
            }
            if let Err(e) = self.image.file.write_all_at(&buf[..n], at) {
                tracing::error!(disk = %self.image.path.display(), offset = at, error = %e, "virtio-blk: write failed");
                return S_IOERR;
            }
            done += n;
        }
        S_OK
    }

    pub fn path(&self) -> &Path {
        &self.image.path
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.image.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, features: u64) {
        tracing::info!(
            disk = %self.image.path.display(),
            read_only = self.image.read_only,
            sectors = self.image.sectors,
            features = format_args!("{features:#x}"),
            "virtio-blk: the guest's driver is ready"
        );
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.serve(chain, mem);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(disk = %self.image.path.display(), head, error = %e, "virtio-blk: could not return a request to the used ring");
                continue;
            }
            used = true;
        }
        match queue.needs_notification(mem) {
            Ok(needed) => used && needed,
            // When in doubt, interrupt: a spurious interrupt is harmless, a lost one hangs I/O.
            Err(_) => used,
        }
    }

    fn reset(&mut self) {}
}
