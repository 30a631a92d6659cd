//! Loading a decompressed x86-64 kernel as its own decompressor would, KASLR included, so a
//! bzImage boots without running the decompressor in the guest.
//!
//! Why: the decompressor's XZ pass over ~60 MB of kernel is the largest single cost of a boot
//! where guest ring 0 is slow (8.7 s of a 20 s boot in the nested tier, `docs/linux-guests.md`),
//! and the VMM already holds the decompressed image in its cache for patching. What the
//! decompressor does after decompressing (`arch/x86/boot/compressed/misc.c`,
//! `kaslr.c`) is small and is done here:
//!
//! - **Placement**: a physical address and a virtual offset for the kernel, each chosen at
//!   random among the slots the decompressor would consider: physical, every
//!   `kernel_alignment`-aligned start in the memory map's RAM (at or above the kernel's link
//!   address, clear of the initrd) that holds the whole image; virtual, every aligned offset
//!   that keeps the image inside the 1 GiB kernel-text mapping. `nokaslr` on the command line
//!   keeps both at the link address, as the kernel documents.
//! - **Segments**: each `PT_LOAD` copied to its offset from the link address.
//! - **Relocations**: the table `arch/x86/tools/relocs` appends after the ELF (64-bit
//!   relocations, inverse 32-bit, 32-bit, each list ended by a zero, read from the end), applied
//!   with the virtual delta. Every field must lie inside the image's file-backed bytes, and the
//!   lists must end before the ELF does: a table that does not parse cleanly is refused, never
//!   half-applied.
//!
//! The physical move needs no relocation: the kernel's `startup_64` fixes its own page tables
//! for wherever it runs (`arch/x86/kernel/head64.c`, `__startup_64`), the entry the boot protocol
//! documents for a 64-bit loader of the decompressed kernel.

use thiserror::Error;

/// `__START_KERNEL_map`: the base of the kernel-text mapping on x86-64.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// `KERNEL_IMAGE_SIZE` with `CONFIG_RANDOMIZE_BASE`: the kernel text mapping's size.
const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
const PT_LOAD: u32 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KaslrError {
    #[error("the decompressed kernel is not a 64-bit little-endian x86-64 ELF ({0})")]
    NotElf(&'static str),
    #[error(
        "the decompressed kernel's program header {index} is outside the file or inconsistent ({why})"
    )]
    BadSegment { index: usize, why: &'static str },
    #[error("the decompressed kernel has no loadable segment")]
    NoSegments,
    #[error("the decompressed kernel's relocation table is malformed: {0}")]
    BadRelocations(String),
    #[error(
        "no {align:#x}-aligned RAM range of {size:#x} bytes is free for the kernel at or above {min:#x}; raise --memory"
    )]
    NoRoom { size: u64, align: u64, min: u64 },
    #[error("cannot write the kernel into guest memory: {0}")]
    Sink(String),
    #[error(
        "the kernel alignment {0:#x} in the setup header is not a power of two of at least 2 MiB"
    )]
    BadAlignment(u64),
}

/// A decompressed kernel, parsed: where its segments go relative to the link address, and
/// its relocation table.
#[derive(Debug, Clone)]
pub struct Kernel<'a> {
    blob: &'a [u8],
    /// `LOAD_PHYSICAL_ADDR`: the physical address the kernel is linked to load at.
    pub link_phys: u64,
    /// The offset of `startup_64` from the link address.
    pub entry_offset: u64,
    /// Bytes from the link address to the end of the last segment (`_end`).
    pub span: u64,
    /// Bytes from the link address to the end of the last file-backed byte: relocated fields
    /// lie below this.
    file_backed: u64,
    segments: Vec<Segment>,
    relocs: Relocations,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Offset from the link address.
    at: u64,
    file_offset: usize,
    file_size: usize,
}

/// The three relocation lists: each entry a field's link-time virtual address, sign-extended
/// from 32 bits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Relocations {
    r64: Vec<i32>,
    inverse32: Vec<i32>,
    r32: Vec<i32>,
}

/// Where the kernel goes: its physical start, and the virtual offset (`_text` runs at
/// `__START_KERNEL_map + virt`); `virt == link_phys` means no virtual randomisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub phys: u64,
    pub virt: u64,
    /// Whether either was randomised (the kernel learns it from `KASLR_FLAG`).
    pub randomized: bool,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl<'a> Kernel<'a> {
    /// Parses the decompressor's output: the ELF `vmlinux.bin` with the relocation table
    /// appended (what the image cache of the `linux-guest` crate holds).
    pub fn parse(blob: &'a [u8]) -> Result<Kernel<'a>, KaslrError> {
        if !blob.starts_with(b"\x7fELF") {
            return Err(KaslrError::NotElf("no ELF magic"));
        }
        if blob.get(4) != Some(&2) || blob.get(5) != Some(&1) {
            return Err(KaslrError::NotElf("not ELF64 little-endian"));
        }
        if u16_at(blob, 0x12) != Some(62) {
            return Err(KaslrError::NotElf("not x86-64"));
        }
        let entry = u64_at(blob, 0x18).ok_or(KaslrError::NotElf("truncated header"))?;
        let phoff = u64_at(blob, 0x20).ok_or(KaslrError::NotElf("truncated header"))?;
        let shoff = u64_at(blob, 0x28).ok_or(KaslrError::NotElf("truncated header"))?;
        let phentsize = u16_at(blob, 0x36).ok_or(KaslrError::NotElf("truncated header"))?;
        let phnum = u16_at(blob, 0x38).ok_or(KaslrError::NotElf("truncated header"))?;
        let shentsize = u16_at(blob, 0x3a).ok_or(KaslrError::NotElf("truncated header"))?;
        let shnum = u16_at(blob, 0x3c).ok_or(KaslrError::NotElf("truncated header"))?;
        if phentsize < 56 {
            return Err(KaslrError::NotElf("program headers too small"));
        }
        // Where the ELF ends in the blob: the relocation table starts no earlier.
        let mut elf_end = shoff.saturating_add(u64::from(shnum) * u64::from(shentsize));
        let ph_end = phoff.saturating_add(u64::from(phnum) * u64::from(phentsize));
        elf_end = elf_end.max(ph_end);
        let mut raw = Vec::new();
        for index in 0..usize::from(phnum) {
            let at = usize::try_from(phoff)
                .ok()
                .and_then(|o| o.checked_add(index * usize::from(phentsize)))
                .ok_or(KaslrError::BadSegment {
                    index,
                    why: "header offset",
                })?;
            let field = |o: usize| u64_at(blob, at + o);
            let bad = |why| KaslrError::BadSegment { index, why };
            if u32_at(blob, at) != Some(PT_LOAD) {
                if u32_at(blob, at).is_none() {
                    return Err(bad("truncated"));
                }
                continue;
            }
            let (offset, paddr, filesz, memsz) = (
                field(8).ok_or(bad("truncated"))?,
                field(24).ok_or(bad("truncated"))?,
                field(32).ok_or(bad("truncated"))?,
                field(40).ok_or(bad("truncated"))?,
            );
            let file_end = offset.checked_add(filesz).ok_or(bad("file range"))?;
            if file_end > blob.len() as u64 {
                return Err(bad("its bytes run past the file"));
            }
            if memsz < filesz {
                return Err(bad("memory size below file size"));
            }
            paddr.checked_add(memsz).ok_or(bad("memory range"))?;
            elf_end = elf_end.max(file_end);
            raw.push((paddr, offset, filesz, memsz));
        }
        let link_phys = raw
            .iter()
            .map(|s| s.0)
            .min()
            .ok_or(KaslrError::NoSegments)?;
        let mut segments = Vec::with_capacity(raw.len());
        let (mut span, mut file_backed) = (0u64, 0u64);
        for (index, &(paddr, offset, filesz, memsz)) in raw.iter().enumerate() {
            let at = paddr - link_phys;
            span = span.max(at + memsz);
            file_backed = file_backed.max(at + filesz);
            segments.push(Segment {
                at,
                file_offset: usize::try_from(offset).map_err(|_| KaslrError::BadSegment {
                    index,
                    why: "file offset",
                })?,
                file_size: usize::try_from(filesz).map_err(|_| KaslrError::BadSegment {
                    index,
                    why: "file size",
                })?,
            });
        }
        // A kernel far larger than the text mapping is not one this loader understands.
        if span > KERNEL_IMAGE_SIZE {
            return Err(KaslrError::BadSegment {
                index: 0,
                why: "the segments span more than the 1 GiB kernel mapping",
            });
        }
        let entry_offset = entry
            .checked_sub(link_phys)
            .filter(|&e| e < span)
            .ok_or(KaslrError::NotElf("its entry lies outside its segments"))?;
        let relocs = parse_relocations(blob, usize::try_from(elf_end).unwrap_or(usize::MAX))?;
        Ok(Kernel {
            blob,
            link_phys,
            entry_offset,
            span,
            file_backed,
            segments,
            relocs,
        })
    }

    /// What the decompressor reserves for the kernel (`needed_size`): the whole decompressed
    /// output or the kernel's span, whichever is larger, aligned.
    pub fn needed(&self, align: u64) -> u64 {
        (self.blob.len() as u64)
            .max(self.span)
            .next_multiple_of(align)
    }

    /// Whether the image carries relocations (without them only the physical address moves).
    pub fn relocatable(&self) -> bool {
        !self.relocs.r64.is_empty() || !self.relocs.r32.is_empty()
    }

    /// The offset of a relocated field (a link-time virtual address, sign-extended from 32
    /// bits) in the image, when the whole field lies in its file-backed bytes (the
    /// decompressor's `extended + map`, bounds-checked).
    fn field(&self, r: i32, width: u64) -> Option<u64> {
        let offset =
            (i64::from(r) as u64).wrapping_sub(START_KERNEL_MAP.wrapping_add(self.link_phys));
        offset
            .checked_add(width)
            .is_some_and(|end| end <= self.file_backed)
            .then_some(offset)
    }

    /// Every relocation names a field inside the image; checked before anything is written.
    fn check_relocations(&self) -> Result<(), KaslrError> {
        let lists = [
            (&self.relocs.r32, 4),
            (&self.relocs.inverse32, 4),
            (&self.relocs.r64, 8),
        ];
        for (list, width) in lists {
            if let Some(&r) = list.iter().find(|&&r| self.field(r, width).is_none()) {
                return Err(KaslrError::BadRelocations(format!(
                    "a field at {:#x} lies outside the kernel's {:#x} bytes",
                    i64::from(r) as u64,
                    self.file_backed
                )));
            }
        }
        Ok(())
    }

    /// Writes the kernel's memory image (from its link address, `span` bytes) into `dst`,
    /// which must be zero (the bss is not written), relocated for `virt`. A relocation table
    /// naming a field outside the image is refused before the first write.
    pub fn load_into<S: Sink + ?Sized>(&self, dst: &mut S, virt: u64) -> Result<(), KaslrError> {
        self.check_relocations()?;
        let sink = |e: String| KaslrError::Sink(e);
        for s in &self.segments {
            dst.write(s.at, &self.blob[s.file_offset..s.file_offset + s.file_size])
                .map_err(sink)?;
        }
        let delta = virt.wrapping_sub(self.link_phys);
        if delta == 0 {
            return Ok(());
        }
        let mut word = [0u8; 4];
        for &r in &self.relocs.r32 {
            let at = self.field(r, 4).unwrap_or_default();
            dst.read(at, &mut word).map_err(sink)?;
            let v = u32::from_le_bytes(word).wrapping_add(delta as u32);
            dst.write(at, &v.to_le_bytes()).map_err(sink)?;
        }
        for &r in &self.relocs.inverse32 {
            let at = self.field(r, 4).unwrap_or_default();
            dst.read(at, &mut word).map_err(sink)?;
            let v = u32::from_le_bytes(word).wrapping_sub(delta as u32);
            dst.write(at, &v.to_le_bytes()).map_err(sink)?;
        }
        let mut quad = [0u8; 8];
        for &r in &self.relocs.r64 {
            let at = self.field(r, 8).unwrap_or_default();
            dst.read(at, &mut quad).map_err(sink)?;
            let v = u64::from_le_bytes(quad).wrapping_add(delta);
            dst.write(at, &v.to_le_bytes()).map_err(sink)?;
        }
        Ok(())
    }

    /// The relocated memory image as a buffer (`span` bytes, bss zero): what the tests read.
    #[cfg(test)]
    pub fn image(&self, virt: u64) -> Result<Vec<u8>, KaslrError> {
        let mut image = vec![0u8; self.span as usize];
        self.load_into(image.as_mut_slice(), virt)?;
        Ok(image)
    }
}

/// Where [`Kernel::load_into`] writes: byte offsets from the kernel's start.
pub trait Sink {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<(), String>;
    fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// The kernel's bytes as one slice (guest memory viewed plainly before the first vCPU runs, or
/// a test's buffer).
impl Sink for [u8] {
    fn write(&mut self, at: u64, bytes: &[u8]) -> Result<(), String> {
        let at = usize::try_from(at).map_err(|e| e.to_string())?;
        at.checked_add(bytes.len())
            .and_then(|end| self.get_mut(at..end))
            .ok_or_else(|| format!("{at:#x} is past the image"))?
            .copy_from_slice(bytes);
        Ok(())
    }
    fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), String> {
        let at = usize::try_from(at).map_err(|e| e.to_string())?;
        buf.copy_from_slice(
            at.checked_add(buf.len())
                .and_then(|end| self.get(at..end))
                .ok_or_else(|| format!("{at:#x} is past the image"))?,
        );
        Ok(())
    }
}

/// Reads the table from the end of `blob` back to `elf_end`: 32-bit relocations, a zero, the
/// inverse 32-bit ones, a zero, the 64-bit ones, a zero, which must be the first word after the
/// ELF (the build concatenates `vmlinux.bin` and `vmlinux.relocs`). An image with nothing after
/// its ELF has no table (it is not relocatable); anything else must be exactly that shape.
fn parse_relocations(blob: &[u8], elf_end: usize) -> Result<Relocations, KaslrError> {
    let tail = blob.get(elf_end..).unwrap_or_default();
    if tail.is_empty() {
        return Ok(Relocations::default());
    }
    if tail.len() % 4 != 0 {
        return Err(KaslrError::BadRelocations(format!(
            "{} bytes follow the ELF, not a whole number of 4-byte entries",
            tail.len()
        )));
    }
    let mut words = tail
        .chunks_exact(4)
        .rev()
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let mut list = |what: &str| -> Result<Vec<i32>, KaslrError> {
        let mut v = Vec::new();
        loop {
            match words.next() {
                Some(0) => return Ok(v),
                Some(r) => v.push(r),
                None => {
                    return Err(KaslrError::BadRelocations(format!(
                        "the {what} list has no terminating zero before the ELF ends"
                    )));
                }
            }
        }
    };
    let r32 = list("32-bit")?;
    let inverse32 = list("inverse 32-bit")?;
    let r64 = list("64-bit")?;
    let left = words.count();
    if left != 0 {
        return Err(KaslrError::BadRelocations(format!(
            "{left} entries lie between the ELF and the table"
        )));
    }
    Ok(Relocations {
        r64,
        inverse32,
        r32,
    })
}

/// Chooses where the kernel goes, as the decompressor's `choose_random_location`: `random`
/// supplies the two random numbers (physical, virtual); `ram` lists free RAM ranges
/// (`start..end`, the initrd and anything else the kernel must not overwrite already taken
/// out); `needed` bytes at an `align`ed start, at or above `min`.
pub fn choose(
    random: [u64; 2],
    ram: &[std::ops::Range<u64>],
    needed: u64,
    align: u64,
    min: u64,
    kaslr: bool,
    relocatable: bool,
) -> Result<Placement, KaslrError> {
    if !align.is_power_of_two() || align < (2 << 20) {
        return Err(KaslrError::BadAlignment(align));
    }
    let no_room = KaslrError::NoRoom {
        size: needed,
        align,
        min,
    };
    let fits_at = |start: u64| {
        ram.iter()
            .any(|r| start >= r.start && start.checked_add(needed).is_some_and(|e| e <= r.end))
    };
    if !kaslr {
        return if fits_at(min) {
            Ok(Placement {
                phys: min,
                virt: min,
                randomized: false,
            })
        } else {
            Err(no_room)
        };
    }
    // Every aligned start in each range, counted, then the `random`-th one.
    let slots: Vec<(u64, u64)> = ram
        .iter()
        .filter_map(|r| {
            let first = r.start.max(min).next_multiple_of(align);
            let last = r.end.checked_sub(needed)?;
            (first <= last).then(|| (first, (last - first) / align + 1))
        })
        .collect();
    let total: u64 = slots.iter().map(|s| s.1).sum();
    if total == 0 {
        return Err(no_room);
    }
    let mut pick = random[0] % total;
    let mut phys = min;
    for (first, count) in slots {
        if pick < count {
            phys = first + pick * align;
            break;
        }
        pick -= count;
    }
    let virt = if relocatable && KERNEL_IMAGE_SIZE > min + needed {
        let virt_slots = (KERNEL_IMAGE_SIZE - min - needed) / align + 1;
        min + (random[1] % virt_slots) * align
    } else {
        min
    };
    Ok(Placement {
        phys,
        virt,
        randomized: true,
    })
}

/// Two random numbers for [`choose`], from the kernel's random pool.
pub fn random_pair() -> std::io::Result<[u64; 2]> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    let (lo, hi) = b.split_at(8);
    Ok([
        u64::from_le_bytes(lo.try_into().unwrap_or_default()),
        u64::from_le_bytes(hi.try_into().unwrap_or_default()),
    ])
}

/// The two numbers [`choose`] takes, derived from a seed (splitmix64), to reproduce a placement.
pub fn from_seed(seed: u64) -> [u64; 2] {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let a = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    [mix(a), mix(a.wrapping_add(0x9e37_79b9_7f4a_7c15))]
}

/// Whether a kernel command line asks for no KASLR (`nokaslr` as a whole word).
pub fn cmdline_says_nokaslr(cmdline: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == "nokaslr")
}

/// A small kernel-shaped ELF for tests here and in [`crate::boot`].
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;

    pub(crate) const LINK: u64 = 0x100_0000;
    pub(crate) const VBASE: u64 = START_KERNEL_MAP + LINK;

    /// A two-segment ELF: text at the link address (with a 64-bit pointer to itself at +0x10, a
    /// 32-bit sign-extended one at +0x20 and an inverse 32-bit one at +0x30), data 0x3000 on with
    /// 0x1000 of bss; relocations appended.
    pub(crate) fn kernel(relocs: Option<(&[i32], &[i32], &[i32])>) -> Vec<u8> {
        let phoff = 64u64;
        let text_off = 0x1000u64;
        let data_off = 0x3000u64;
        let mut b = vec![0u8; 0x4000];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[0x10..0x12].copy_from_slice(&2u16.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&(LINK + 0x40).to_le_bytes());
        b[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        let ph = |b: &mut Vec<u8>, i: usize, off: u64, at: u64, filesz: u64, memsz: u64| {
            let p = phoff as usize + i * 56;
            b[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            b[p + 16..p + 24].copy_from_slice(&(VBASE + at).to_le_bytes());
            b[p + 24..p + 32].copy_from_slice(&(LINK + at).to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(&mut b, 0, text_off, 0, 0x1000, 0x1000);
        ph(&mut b, 1, data_off, 0x2000, 0x1000, 0x2000);
        let t = text_off as usize;
        b[t + 0x10..t + 0x18].copy_from_slice(&(VBASE + 0x100).to_le_bytes());
        b[t + 0x20..t + 0x24].copy_from_slice(&((VBASE + 0x200) as u32).to_le_bytes());
        b[t + 0x30..t + 0x34].copy_from_slice(&0x5000u32.to_le_bytes());
        b[t..t + 4].copy_from_slice(b"TEXT");
        b[data_off as usize..data_off as usize + 4].copy_from_slice(b"DATA");
        if let Some((r64, inv, r32)) = relocs {
            let mut push = |v: i32| b.extend_from_slice(&v.to_le_bytes());
            push(0);
            r64.iter().for_each(|&r| push(r));
            push(0);
            inv.iter().for_each(|&r| push(r));
            push(0);
            r32.iter().for_each(|&r| push(r));
        }
        b
    }

    pub(crate) fn va(offset: u64) -> i32 {
        (VBASE + offset) as i64 as i32
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    fn std_relocs() -> Vec<u8> {
        kernel(Some((&[va(0x10)], &[va(0x30)], &[va(0x20)])))
    }

    #[test]
    fn segments_land_at_their_offsets_and_relocations_follow_the_virtual_delta() {
        let blob = std_relocs();
        let k = Kernel::parse(&blob).unwrap();
        assert_eq!((k.link_phys, k.entry_offset, k.span), (LINK, 0x40, 0x4000));
        assert!(k.relocatable());
        let unmoved = k.image(LINK).unwrap();
        assert_eq!(&unmoved[0..4], b"TEXT");
        assert_eq!(&unmoved[0x2000..0x2004], b"DATA");
        assert!(unmoved[0x3000..].iter().all(|&b| b == 0), "bss is zero");
        let delta = 0x2a0_0000u64;
        let moved = k.image(LINK + delta).unwrap();
        let q = |i: &[u8], at: usize| u64::from_le_bytes(i[at..at + 8].try_into().unwrap());
        let d = |i: &[u8], at: usize| u32::from_le_bytes(i[at..at + 4].try_into().unwrap());
        assert_eq!(q(&moved, 0x10), VBASE + 0x100 + delta);
        assert_eq!(d(&moved, 0x20), (VBASE + 0x200 + delta) as u32);
        assert_eq!(d(&moved, 0x30), 0x5000u32.wrapping_sub(delta as u32));
        // Nothing else changed.
        let changed: Vec<usize> = (0..moved.len())
            .filter(|&i| moved[i] != unmoved[i])
            .collect();
        assert!(changed.iter().all(|&i| (0x10..0x18).contains(&i)
            || (0x20..0x24).contains(&i)
            || (0x30..0x34).contains(&i)));
    }

    #[test]
    fn malformed_relocation_tables_are_refused_not_half_applied() {
        // A field past the file-backed bytes (into bss).
        let blob = kernel(Some((&[va(0x3800)], &[], &[])));
        let k = Kernel::parse(&blob).unwrap();
        assert!(matches!(
            k.image(LINK + 0x20_0000),
            Err(KaslrError::BadRelocations(_))
        ));
        // Straddling the end.
        let blob = kernel(Some((&[va(0x2ffc)], &[], &[])));
        let k = Kernel::parse(&blob).unwrap();
        assert!(k.image(LINK + 0x20_0000).is_err());
        // Lists without their terminators: the table runs into the ELF.
        let mut blob = kernel(None);
        blob.extend_from_slice(&va(0x10).to_le_bytes());
        assert!(matches!(
            Kernel::parse(&blob),
            Err(KaslrError::BadRelocations(_))
        ));
        // Words before the table's first zero, or a ragged tail.
        let mut blob = kernel(None);
        blob.extend_from_slice(&7i32.to_le_bytes());
        blob.extend_from_slice(&std_relocs()[0x4000..]);
        assert!(Kernel::parse(&blob).is_err());
        let mut blob = std_relocs();
        blob.insert(0x4000, 0);
        assert!(Kernel::parse(&blob).is_err());
        // Garbage kernels never panic.
        for n in [0, 4, 63, 64, 100, 0x1000, 0x3fff] {
            let blob = std_relocs();
            let _ = Kernel::parse(&blob[..n]);
        }
        let mut blob = std_relocs();
        blob[0x20] = 0xff; // program headers far away
        assert!(Kernel::parse(&blob).is_err());
    }

    #[test]
    fn a_kernel_without_a_table_is_not_relocatable_and_unrelocated_images_are_exact() {
        let blob = kernel(None);
        let k = Kernel::parse(&blob).unwrap();
        assert!(!k.relocatable());
        assert_eq!(
            &k.image(LINK).unwrap()[0x10..0x18],
            &(VBASE + 0x100).to_le_bytes()
        );
    }

    #[test]
    // One free range is what these cases need; a list of ranges is the API.
    #[allow(clippy::single_range_in_vec_init)]
    fn placement_is_random_aligned_inside_ram_and_clear_of_what_is_taken() {
        let align = 2 << 20;
        let needed = 60 << 20;
        // RAM 1 MiB..512 MiB with an initrd at 500 MiB taken out.
        let ram = [0x10_0000..500 << 20];
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..2000u64 {
            let r = [
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                i.wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
            ];
            let p = choose(r, &ram, needed, align, LINK, true, true).unwrap();
            assert_eq!(p.phys % align, 0);
            assert!(p.phys >= LINK && p.phys + needed <= 500 << 20, "{p:x?}");
            assert_eq!(p.virt % align, 0);
            assert!(
                p.virt >= LINK && p.virt + needed <= KERNEL_IMAGE_SIZE,
                "{p:x?}"
            );
            assert!(p.randomized);
            seen.insert((p.phys, p.virt));
        }
        assert!(
            seen.len() > 1000,
            "only {} placements in 2000 draws",
            seen.len()
        );
        // Every physical slot is reachable, the last included.
        let slots = ((500u64 << 20) - needed - LINK) / align + 1;
        let last = choose([slots - 1, 0], &ram, needed, align, LINK, true, true).unwrap();
        assert_eq!(last.phys + needed, 500 << 20);
        // nokaslr: the link address, or a clear refusal when it is not free.
        let p = choose([7, 7], &ram, needed, align, LINK, false, true).unwrap();
        assert_eq!((p.phys, p.virt, p.randomized), (LINK, LINK, false));
        assert!(
            choose(
                [0, 0],
                &[0..LINK + needed - 1],
                needed,
                align,
                LINK,
                false,
                true
            )
            .is_err()
        );
        // Not relocatable: only the physical address moves.
        let p = choose([5, 5], &ram, needed, align, LINK, true, false).unwrap();
        assert_eq!(p.virt, LINK);
        // No room anywhere; a bad alignment.
        assert!(matches!(
            choose([0, 0], &[0..needed], needed, align, LINK, true, true),
            Err(KaslrError::NoRoom { .. })
        ));
        assert!(matches!(
            choose([0, 0], &ram, needed, 0x1000, LINK, true, true),
            Err(KaslrError::BadAlignment(0x1000))
        ));
    }

    #[test]
    fn nokaslr_is_a_whole_word() {
        assert!(cmdline_says_nokaslr("console=ttyS0 nokaslr quiet"));
        assert!(!cmdline_says_nokaslr("console=ttyS0 nokaslrx"));
        assert!(!cmdline_says_nokaslr(""));
    }
}
