//! Local disks copied in the migration (`with_disks`): the destination has disk files of its
//! own (same sizes). The source logs the guest's writes from the start, sends every disk whole
//! while the guest runs (data as `Blocks`, holes and all-zero stretches as `BlockZeros`), then
//! in every dirty round the blocks written since, and the last ones with the guest paused.
//! Read-only disks are not copied: the guest cannot have changed them, and the destination is
//! given its own (often a base image other VMs share, which must not be written).
//!
//! ```text
//! Blocks       disk u32, offset u64, data (whole sectors)
//! BlockZeros   disk u32, offset u64, length u64
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use stratus_virtio::block::WriteLog;

use super::stream::{write_frame, Kind};
use super::{MigrationError, Sender};
use crate::vm::Vm;

/// Bytes per `Blocks` frame at most.
const CHUNK: u64 = 1 << 20;
const SECTOR: u64 = 512;

struct SourceDisk {
    file: File,
    size: u64,
    log: Arc<WriteLog>,
}

/// The source's disks in disk order (`None`: read-only, not copied), their write logs running.
pub(super) struct SourceDisks(Vec<Option<SourceDisk>>);

impl Drop for SourceDisks {
    fn drop(&mut self) {
        for disk in self.0.iter().flatten() {
            disk.log.stop();
        }
    }
}

/// Which blocks of each disk are to be sent (bit i of word w: block 64w + i).
pub(super) type DirtyBlocks = Vec<Vec<u64>>;

impl SourceDisks {
    /// Starts logging what the guest writes to `vm`'s writable disks, read through the files
    /// the VM has open (not by path: the file there may have been replaced).
    pub(super) fn open(vm: &Vm) -> Result<Self, MigrationError> {
        let handles = vm.handles();
        // Built as it goes: a failure part way stops the logs already started (Drop).
        let mut disks = Self(Vec::new());
        let all = vm.config().disks.iter().zip(&handles.disk_logs).zip(&handles.disk_locks);
        for ((disk, log), lock) in all {
            if disk.readonly {
                disks.0.push(None);
                continue;
            }
            let failed =
                |e: std::io::Error| MigrationError::Vm(format!("reading disk {}: {e}", disk.path.display()));
            let file = lock.reader().map_err(failed)?;
            let size = file.metadata().map_err(failed)?.len();
            log.start();
            disks.0.push(Some(SourceDisk { file, size, log: log.clone() }));
        }
        Ok(disks)
    }

    /// Each disk's size in bytes (`None`: not copied).
    pub(super) fn sizes(&self) -> Vec<Option<u64>> {
        self.0.iter().map(|d| d.as_ref().map(|d| d.size)).collect()
    }

    /// An empty set of blocks to send, one bitmap per disk.
    pub(super) fn no_blocks(&self) -> DirtyBlocks {
        self.0.iter().map(|d| vec![0; d.as_ref().map_or(0, |d| d.log.words())]).collect()
    }

    /// Sends every disk whole: data where the file has data, zeros for its holes.
    pub(super) fn full_pass(&self, sender: &mut Sender<'_>) -> Result<(), MigrationError> {
        let mut buf = vec![0u8; CHUNK as usize];
        for (index, disk) in self.0.iter().enumerate() {
            let Some(disk) = disk else { continue };
            let mut pos = 0;
            while pos < disk.size {
                // Where data starts, in whole sectors: ENXIO says there is none after `pos`;
                // after any other error the rest is read as data.
                let data = match seek(&disk.file, pos, libc::SEEK_DATA) {
                    Ok(at) => (at / SECTOR * SECTOR).clamp(pos, disk.size),
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => disk.size,
                    Err(_) => pos,
                };
                if data > pos {
                    zeros(sender, index, pos, data - pos)?;
                }
                if data >= disk.size {
                    break;
                }
                let hole = seek(&disk.file, data, libc::SEEK_HOLE)
                    .ok()
                    .map(|h| h.div_ceil(SECTOR) * SECTOR)
                    .filter(|&h| h > data)
                    .unwrap_or(disk.size)
                    .min(disk.size);
                let mut at = data;
                while at < hole {
                    let len = (hole - at).min(CHUNK);
                    self.send(sender, index, at, len, &mut buf)?;
                    at += len;
                }
                pos = hole;
            }
        }
        Ok(())
    }

    /// Blocks written since the last take, ORed into `into`; returns how many bytes that is.
    pub(super) fn take_dirty(&self, into: &mut DirtyBlocks) -> u64 {
        for (disk, bits) in self.0.iter().zip(into.iter_mut()) {
            let Some(disk) = disk else { continue };
            for (word, new) in bits.iter_mut().zip(disk.log.take()) {
                *word |= new;
            }
        }
        into.iter().flatten().map(|w| u64::from(w.count_ones())).sum::<u64>() * WriteLog::BLOCK
    }

    /// Sends the blocks in `dirty` and clears them.
    pub(super) fn send_dirty(
        &self,
        sender: &mut Sender<'_>,
        dirty: &mut DirtyBlocks,
    ) -> Result<(), MigrationError> {
        let mut buf = vec![0u8; CHUNK as usize];
        for (index, (disk, bits)) in self.0.iter().zip(dirty.iter_mut()).enumerate() {
            let Some(disk) = disk else { continue };
            let blocks = disk.size.div_ceil(WriteLog::BLOCK);
            let set =
                |bits: &[u64], b: u64| bits.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0);
            let mut b = 0;
            while b < blocks {
                if !set(bits, b) {
                    b += 1;
                    continue;
                }
                let start = b;
                while b < blocks && (b - start) * WriteLog::BLOCK < CHUNK && set(bits, b) {
                    b += 1;
                }
                let offset = start * WriteLog::BLOCK;
                let len = (b * WriteLog::BLOCK).min(disk.size) - offset;
                self.send(sender, index, offset, len, &mut buf)?;
            }
            bits.iter_mut().for_each(|w| *w = 0);
        }
        Ok(())
    }

    /// Sends `len` bytes of disk `index` at `offset`: as zeros if that is all they are.
    fn send(
        &self,
        sender: &mut Sender<'_>,
        index: usize,
        offset: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<(), MigrationError> {
        let Some(disk) = self.0.get(index).and_then(Option::as_ref) else {
            return Ok(());
        };
        sender.check_cancel()?;
        let data = &mut buf[..len as usize];
        disk.file
            .read_exact_at(data, offset)
            .map_err(|e| MigrationError::Vm(format!("reading disk {index} at {offset}: {e}")))?;
        if data.iter().all(|&b| b == 0) {
            return zeros(sender, index, offset, len);
        }
        sender.frame.clear();
        sender.frame.extend_from_slice(&(index as u32).to_le_bytes());
        sender.frame.extend_from_slice(&offset.to_le_bytes());
        sender.frame.extend_from_slice(data);
        write_frame(&mut sender.out, Kind::Blocks, &sender.frame)?;
        sender.report.bytes_sent += 9 + sender.frame.len() as u64;
        sender.report.disk_bytes_sent += len;
        sender.pace();
        Ok(())
    }
}

fn zeros(sender: &mut Sender<'_>, index: usize, offset: u64, len: u64) -> Result<(), MigrationError> {
    let mut payload = [0u8; 20];
    payload[..4].copy_from_slice(&(index as u32).to_le_bytes());
    payload[4..12].copy_from_slice(&offset.to_le_bytes());
    payload[12..].copy_from_slice(&len.to_le_bytes());
    write_frame(&mut sender.out, Kind::BlockZeros, &payload)?;
    sender.report.bytes_sent += 29;
    Ok(())
}

fn seek(file: &File, offset: u64, whence: i32) -> std::io::Result<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(at as u64)
}

/// The destination's copies of the disks (`None`: read-only, not copied), written as the
/// blocks arrive.
pub(super) struct DestinationDisks(Vec<Option<(File, PathBuf, u64)>>);

impl DestinationDisks {
    /// Opens this host's disks (`paths`) for the copy; each copied one must be as large as the
    /// source's (`sizes`). The error is the reason to refuse the migration.
    pub(super) fn open(paths: &[PathBuf], sizes: &[Option<u64>]) -> Result<Self, String> {
        if paths.len() != sizes.len() {
            return Err(format!("the VM has {} disks; this VMM was given {}", sizes.len(), paths.len()));
        }
        let mut disks = Vec::new();
        for (path, size) in paths.iter().zip(sizes) {
            let Some(size) = *size else {
                disks.push(None);
                continue;
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("opening disk {} to copy into: {e}", path.display()))?;
            let here = file.metadata().map_err(|e| format!("disk {}: {e}", path.display()))?.len();
            if here != size {
                return Err(format!(
                    "disk {} is {here} bytes here and {size} at the source: make it the same size \
                     (truncate -s {size} {})",
                    path.display(),
                    path.display()
                ));
            }
            disks.push(Some((file, path.clone(), size)));
        }
        Ok(Self(disks))
    }

    /// Where a frame's range goes; `Err` for one outside the disks.
    fn target(&self, payload: &[u8], len: u64) -> Result<(&File, &PathBuf, u64), MigrationError> {
        let index = u32::from_le_bytes(payload[..4].try_into().unwrap_or_default()) as usize;
        let offset = u64::from_le_bytes(payload[4..12].try_into().unwrap_or_default());
        let (file, path, size) = self.0.get(index).and_then(Option::as_ref).ok_or_else(|| {
            MigrationError::Protocol(format!("blocks for disk {index}, which is not copied"))
        })?;
        if offset % SECTOR != 0 || offset.checked_add(len).is_none_or(|end| end > *size) {
            return Err(MigrationError::Protocol(format!("blocks {offset}+{len} outside disk {index}")));
        }
        Ok((file, path, offset))
    }

    /// A `Blocks` frame. A failed write (a full disk) is `Vm` with the cause.
    pub(super) fn write(&self, payload: &[u8]) -> Result<(), MigrationError> {
        if payload.len() < 12 {
            return Err(MigrationError::Protocol("a malformed Blocks frame".into()));
        }
        let data = &payload[12..];
        let (file, path, offset) = self.target(payload, data.len() as u64)?;
        file.write_all_at(data, offset).map_err(|e| written(path, e))
    }

    /// A `BlockZeros` frame: the range reads as zeros (a hole where the file system can).
    pub(super) fn zero(&self, payload: &[u8]) -> Result<(), MigrationError> {
        if payload.len() != 20 {
            return Err(MigrationError::Protocol("a malformed BlockZeros frame".into()));
        }
        let len = u64::from_le_bytes(payload[12..20].try_into().unwrap_or_default());
        let (file, path, offset) = self.target(payload, len)?;
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let zero = vec![0u8; CHUNK.min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(CHUNK) as usize;
            file.write_all_at(&zero[..n], at).map_err(|e| written(path, e))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Everything written is on stable storage (a full disk may only show here).
    pub(super) fn sync(&self) -> Result<(), MigrationError> {
        for (file, path, _) in self.0.iter().flatten() {
            file.sync_data().map_err(|e| written(path, e))?;
        }
        Ok(())
    }
}

fn written(path: &std::path::Path, e: std::io::Error) -> MigrationError {
    MigrationError::Vm(format!("writing the copy of disk {} at the destination: {e}", path.display()))
}
