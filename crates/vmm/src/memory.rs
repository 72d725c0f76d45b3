//! Guest RAM: anonymous mappings laid out by `stratus_arch::memory_map`, refused up front when
//! the host cannot hold them.

use stratus_virtio::GuestRam;
use vm_memory::GuestAddress;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Too small to boot anything.
    #[error("--memory {0} MiB is too small: a guest needs at least 2 MiB")]
    TooSmall(u64),
    /// More than the host has.
    #[error("--memory {requested_mib} MiB is more than this host's {host_mib} MiB of RAM")]
    MoreThanHost {
        /// What was asked for.
        requested_mib: u64,
        /// What the host has.
        host_mib: u64,
    },
    /// The mapping failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// Size asked for.
        mib: u64,
        /// The cause.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Total RAM of this host in bytes, from /proc/meminfo.
pub fn host_ram_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Maps `size` bytes of guest RAM.
pub fn create(size: u64) -> Result<GuestRam, MemoryError> {
    let mib = size >> 20;
    if size < (2 << 20) {
        return Err(MemoryError::TooSmall(mib));
    }
    if let Some(host) = host_ram_bytes() {
        if size > host {
            return Err(MemoryError::MoreThanHost { requested_mib: mib, host_mib: host >> 20 });
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = stratus_arch::memory_map::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestRam::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn rejects_what_cannot_work() {
        assert!(matches!(create(1 << 20), Err(MemoryError::TooSmall(1))));
        let huge = host_ram_bytes().unwrap() * 2;
        let err = create(huge).unwrap_err();
        assert!(err.to_string().contains("more than this host's"), "{err}");
    }

    #[test]
    fn maps_the_requested_size() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
