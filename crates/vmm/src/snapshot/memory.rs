//! Memory files. Guest RAM regions are laid end to end in guest-physical order, so file offset
//! and guest address differ only by the holes between regions. A full file leaves all-zero
//! pages as holes (a 2 GiB guest that used 100 MiB writes ~100 MiB); a diff file holds only the
//! pages written since the previous snapshot, at their place, and every one of them is
//! written (even a zero page), so its data extents say exactly which pages it carries.
//!
//! Restore maps the full file copy-on-write (`MAP_PRIVATE`) instead of reading it: pages come
//! in on first touch, so restore time does not grow with memory size, and two VMs restored
//! from one file share its page cache until they write.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use stratus_virtio::GuestRam;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::{partial, SnapshotError};

/// Guest page size.
pub const PAGE: usize = 4096;

/// Pages written since tracking began, one bitmap per guest RAM region (bit i = page i).
pub type DirtyPages = Vec<Vec<u64>>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_owned(), cause: source }
}

/// Region `region`'s bytes, for a snapshot (the VM is paused) or a migration's pre-copy
/// rounds (the guest may be writing: a torn page is sent again, whole, in the next round,
/// because the write marked it dirty).
pub(crate) fn region_bytes(region: &GuestRegionMmap<AtomicBitmap>) -> &[u8] {
    // SAFETY: the mapping is `len` bytes and lives as long as the region borrowed here.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

/// Whether a page is all zeros (a word at a time).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bytes are a valid u64; align_to handles the unaligned ends.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes runs of pages to `file` at `base` + their offset in `bytes`, for which `keep` is
/// true; returns the bytes written.
fn write_pages(
    file: &File,
    path: &Path,
    base: u64,
    bytes: &[u8],
    mut keep: impl FnMut(usize, &[u8]) -> bool,
) -> Result<u64, SnapshotError> {
    let pages = bytes.len() / PAGE;
    let mut written = 0;
    let mut run_start = None;
    for i in 0..=pages {
        let kept = i < pages && keep(i, &bytes[i * PAGE..(i + 1) * PAGE]);
        match (kept, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(start)) => {
                let run = &bytes[start * PAGE..i * PAGE];
                file.write_all_at(run, base + (start * PAGE) as u64).map_err(io(path))?;
                written += run.len() as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Creates the memory file's temporary twin (see `partial`: the target may be the very file a
/// restored VM's memory is mapped from, which truncating in place would wipe under the guest).
fn create(path: &Path, size: u64) -> Result<File, SnapshotError> {
    let tmp = partial(path);
    let file = File::create(&tmp).map_err(io(&tmp))?;
    file.set_len(size).map_err(io(&tmp))?;
    Ok(file)
}

/// Flushes the temporary file and gives it its real name.
fn finish(file: File, path: &Path) -> Result<(), SnapshotError> {
    file.sync_all().map_err(io(path))?;
    std::fs::rename(partial(path), path).map_err(io(path))
}

/// The total RAM in `mem`, i.e. the size of its memory files.
pub fn ram_size(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Which pages of an anonymous mapping the guest ever touched (present or swapped out, from
/// /proc/self/pagemap); the others are zeros. Reading them to find that out would fault in
/// the zero page for each: ~0.5 s for an untouched 2 GiB. `None` when pagemap is unreadable.
pub(crate) fn touched_pages(bytes: &[u8]) -> Option<Vec<bool>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let first = bytes.as_ptr() as u64 / PAGE as u64;
    let mut entries = vec![0u8; bytes.len() / PAGE * 8];
    pagemap.read_exact_at(&mut entries, first * 8).ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()) & (PRESENT | SWAPPED) != 0)
            .collect(),
    )
}

/// Writes all of guest RAM to `path`; returns the bytes of data written (zero pages are
/// holes, not counted).
pub fn write_full(mem: &GuestRam, path: &Path) -> Result<u64, SnapshotError> {
    let file = create(path, ram_size(mem))?;
    let mut base = 0;
    let mut written = 0;
    for region in mem.iter() {
        let bytes = region_bytes(region);
        // Only anonymous memory: a page absent from a restored VM's file mapping is the
        // file's, not zeros.
        let touched = if region.file_offset().is_none() { touched_pages(bytes) } else { None };
        written += write_pages(&file, path, base, bytes, |i, page| {
            touched.as_ref().is_none_or(|t| t.get(i).copied().unwrap_or(true)) && !is_zero(page)
        })?;
        base += region.len();
    }
    finish(file, path)?;
    Ok(written)
}

/// Writes the pages marked in `dirty` to `path` (see the module notes); returns the bytes
/// written.
pub fn write_diff(mem: &GuestRam, dirty: &DirtyPages, path: &Path) -> Result<u64, SnapshotError> {
    let file = create(path, ram_size(mem))?;
    let mut base = 0;
    let mut written = 0;
    for (region, bits) in mem.iter().zip(dirty) {
        written += write_pages(&file, path, base, region_bytes(region), |i, _| {
            bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
        })?;
        base += region.len();
    }
    finish(file, path)?;
    Ok(written)
}

/// Maps `full` copy-on-write as guest RAM laid out in `ranges`, then reads the pages each of
/// `diffs` carries over it, in order.
pub fn map(ranges: &[(u64, u64)], full: &Path, diffs: &[&Path]) -> Result<GuestRam, SnapshotError> {
    let file = File::open(full).map_err(io(full))?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let len = file.metadata().map_err(io(full))?.len();
    if len != total {
        return Err(SnapshotError::Memory(format!(
            "{}: {len} bytes, but the VM has {total} bytes of RAM: not this snapshot's memory file",
            full.display()
        )));
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0;
    for &(start, size) in ranges {
        let mapping =
            MmapRegionBuilder::new_with_bitmap(size as usize, AtomicBitmap::with_len(size as usize))
                .with_file_offset(FileOffset::new(file.try_clone().map_err(io(full))?, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| SnapshotError::Memory(format!("mapping {}: {e}", full.display())))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| SnapshotError::Memory("guest memory range overflows".into()))?;
        regions.push(region);
        offset += size;
    }
    let mem = GuestRam::from_regions(regions)
        .map_err(|e| SnapshotError::Memory(format!("guest memory layout: {e}")))?;
    for diff in diffs {
        lay_over(&mem, diff, total)?;
    }
    Ok(mem)
}

/// Copies each data extent of the diff file at `path` into guest RAM.
fn lay_over(mem: &GuestRam, path: &Path, total: u64) -> Result<(), SnapshotError> {
    let file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    if len != total {
        return Err(SnapshotError::Memory(format!(
            "{}: {len} bytes, but the VM has {total} bytes of RAM: not a memory file of this VM",
            path.display()
        )));
    }
    let mut base = 0u64;
    for region in mem.iter() {
        let end = base + region.len();
        let mut pos = base;
        // SAFETY: as in region_bytes, but mutable: the VM has not started yet.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
        while pos < end {
            let Some(data) = seek(&file, pos, libc::SEEK_DATA).filter(|&d| d < end) else { break };
            let hole = seek(&file, data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            let range = (data - base) as usize..(hole - base) as usize;
            file.read_exact_at(&mut bytes[range], data).map_err(io(path))?;
            pos = hole;
        }
        base = end;
    }
    Ok(())
}

fn seek(file: &File, from: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    (at >= 0).then_some(at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn ram(ranges: &[(u64, u64)]) -> GuestRam {
        let r: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|&(s, l)| (GuestAddress(s), l as usize)).collect();
        GuestRam::from_ranges(&r).unwrap()
    }

    #[test]
    fn full_then_diff_restore_what_the_guest_had() {
        let dir = std::env::temp_dir().join(format!("stratus-memtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ranges = [(0u64, 1u64 << 20), (4 << 20, 2 << 20)];
        let mem = ram(&ranges);
        mem.write_slice(b"first region", GuestAddress(0x3000)).unwrap();
        mem.write_slice(b"second region", GuestAddress((4 << 20) + 0x5000)).unwrap();
        let full = dir.join("full.mem");
        let written = write_full(&mem, &full).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only non-zero pages are written");

        // After the full snapshot: change one page, zero another; the diff carries both.
        mem.write_slice(b"changed", GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[0u8; 13], GuestAddress((4 << 20) + 0x5000)).unwrap();
        let mut dirty: DirtyPages = vec![vec![0; 4], vec![0; 8]];
        dirty[0][0] |= 1 << 3;
        dirty[1][0] |= 1 << 5;
        let diff = dir.join("diff.mem");
        assert_eq!(write_diff(&mem, &dirty, &diff).unwrap(), 2 * PAGE as u64);

        let only_full = map(&ranges, &full, &[]).unwrap();
        let mut buf = [0u8; 13];
        only_full.read_slice(&mut buf, GuestAddress((4 << 20) + 0x5000)).unwrap();
        assert_eq!(&buf, b"second region");

        let layered = map(&ranges, &full, &[&diff]).unwrap();
        let mut buf = [0u8; 12];
        layered.read_slice(&mut buf, GuestAddress(0x3000)).unwrap();
        assert_eq!(&buf, b"changedegion");
        let mut buf = [0u8; 13];
        layered.read_slice(&mut buf, GuestAddress((4 << 20) + 0x5000)).unwrap();
        assert_eq!(buf, [0u8; 13], "a page zeroed after the full snapshot is zero again");

        // Writes to a restored VM never reach the file (copy-on-write).
        layered.write_slice(b"guest write", GuestAddress(0x8000)).unwrap();
        let again = map(&ranges, &full, &[]).unwrap();
        let mut buf = [0u8; 11];
        again.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert_eq!(buf, [0u8; 11]);

        let wrong = ram(&[(0, 1 << 20)]);
        drop(wrong);
        let err = map(&[(0, 1 << 20)], &full, &[]).unwrap_err();
        assert!(err.to_string().contains("not this snapshot's memory file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
