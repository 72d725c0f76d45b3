//! KVM's own per-vCPU statistics (the binary stats interface, `KVM_GET_STATS_FD`, Linux 5.14
//! and later): exits KVM handles without the VMM — HLT, interrupt windows, host interrupts,
//! signals — which are most of what explains a slow guest. Read with `pread`, so a running
//! vCPU is never disturbed. Hosts without the interface simply report no KVM counters.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;
/// Descriptor flag bits 0-3: the statistic's type (0 cumulative, 1 instant, 2 peak, ...).
const TYPE_MASK: u32 = 0xf;
const TYPE_CUMULATIVE: u32 = 0;

/// One vCPU's statistics file and where each counter is in it.
pub struct KvmStats {
    file: File,
    data_offset: u64,
    /// (name, offset in the data block) of every single-value cumulative counter.
    counters: Vec<(String, u64)>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl KvmStats {
    /// Opens the statistics of the vCPU behind `vcpu_fd`; `None` when the host has none.
    pub fn open(vcpu_fd: &impl AsRawFd) -> Option<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu_fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0).ok()?;
        let name_size = u32_at(&header, 4)? as usize;
        let num_desc = u32_at(&header, 8)? as usize;
        let desc_offset = u32_at(&header, 16)? as u64;
        let data_offset = u32_at(&header, 20)? as u64;
        let desc_len = DESC_FIXED_LEN + name_size;
        if name_size > 4096 || num_desc > 4096 {
            return None;
        }
        let mut descs = vec![0u8; desc_len * num_desc];
        file.read_exact_at(&mut descs, desc_offset).ok()?;
        let mut counters = Vec::new();
        for desc in descs.chunks_exact(desc_len) {
            let flags = u32_at(desc, 0)?;
            let size = u16::from_le_bytes([desc[6], desc[7]]);
            let offset = u32_at(desc, 8)? as u64;
            let name = &desc[DESC_FIXED_LEN..];
            let name =
                String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())]);
            if flags & TYPE_MASK == TYPE_CUMULATIVE && size == 1 {
                counters.push((name.into_owned(), offset));
            }
        }
        Some(Self { file, data_offset, counters })
    }

    /// Every counter's current value, by name.
    pub fn read(&self) -> Vec<(String, u64)> {
        self.counters
            .iter()
            .filter_map(|(name, offset)| {
                let mut value = [0u8; 8];
                self.file.read_exact_at(&mut value, self.data_offset + offset).ok()?;
                Some((name.clone(), u64::from_le_bytes(value)))
            })
            .collect()
    }
}
