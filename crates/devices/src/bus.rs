//! Address-range dispatch: a guest access at an address goes to the device whose range holds
//! it, with the offset inside that range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable on a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} is empty")]
    Empty(u64),
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `[base, base + len)` to `device`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((b, r)) = before {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, access_len: usize) -> Option<(&Range, u64)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + access_len as u64 <= range.len).then_some((range, offset))
    }

    /// Routes a read. Returns false when no device owns the address (the caller decides what
    /// an unclaimed read returns).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write. Returns false when no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking thread is still used, since
/// its registers are plain data and the VM is about to report the panic anyway.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x600, 3).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert!(bus.write(0x602, &[1]));
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert_eq!(a.lock().unwrap().writes, vec![(3, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(2, vec![1])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_are_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 4).unwrap();
        assert!(!bus.write(0xff, &[0]));
        assert!(!bus.write(0x104, &[0]));
        assert!(!bus.write(0x103, &[0, 0]), "an access running past the end is not the device's");
        assert!(!bus.read(u64::MAX, &mut [0u8; 8]));
    }

    #[test]
    fn overlaps_are_rejected() {
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(dev(), 0x10f, 1), Err(BusError::Overlap { base: 0x10f, len: 1 }));
        assert_eq!(bus.insert(dev(), 0xf8, 0x10), Err(BusError::Overlap { base: 0xf8, len: 0x10 }));
        assert_eq!(bus.insert(dev(), 0x200, 0), Err(BusError::Empty(0x200)));
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
        bus.insert(dev(), 0x110, 1).unwrap();
    }
}
