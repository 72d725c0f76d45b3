//! The guest's RAM regions and the e820 map that describes them.

use crate::layout::{ACPI_END, ACPI_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// An e820 entry type, as the BIOS interface defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not to be used by the OS.
    Reserved = 2,
}

/// One entry of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte of the range.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The guest-physical ranges backed by RAM for a guest of `mem_size` bytes.
///
/// RAM fills the space from 0 up to the MMIO hole below 4 GiB; whatever does not fit there
/// continues at 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

/// The e820 map a guest of `mem_size` bytes sees: RAM below the EBDA, the BIOS area holding
/// the ACPI tables reserved, and RAM from 1 MiB to the end of each RAM region.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820Type::Ram },
        E820Entry { addr: ACPI_START, size: ACPI_END - ACPI_START, kind: E820Type::Reserved },
    ];
    for (start, size) in ram_regions(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START { size } else { start + size };
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820Type::Ram });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_end(map: &[E820Entry]) -> u64 {
        map.iter().filter(|e| e.kind == E820Type::Ram).map(|e| e.addr + e.size).max().unwrap()
    }

    #[test]
    fn small_guest_has_one_region_and_exact_top() {
        let mem = 128 << 20;
        assert_eq!(ram_regions(mem), vec![(0, mem)]);
        let map = e820_map(mem);
        assert_eq!(ram_end(&map), mem);
        assert!(map.contains(&E820Entry { addr: 0x10_0000, size: mem - 0x10_0000, kind: E820Type::Ram }));
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let mem = 4u64 << 30;
        let regions = ram_regions(mem);
        assert_eq!(regions, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]);
        let map = e820_map(mem);
        let total: u64 = map.iter().filter(|e| e.kind == E820Type::Ram).map(|e| e.size).sum();
        // All RAM is announced except the 384 KiB legacy hole between the EBDA and 1 MiB.
        assert_eq!(total, mem - (HIMEM_START - EBDA_START));
        for e in &map {
            let overlaps_hole = e.addr < MMIO_GAP_END && e.addr + e.size > MMIO_GAP_START;
            assert!(!(overlaps_hole && e.kind == E820Type::Ram), "RAM in the MMIO hole: {e:?}");
        }
    }

    #[test]
    fn entries_do_not_overlap() {
        for mem in [64u64 << 20, 3 << 30, 5 << 30] {
            let mut map = e820_map(mem);
            map.sort_by_key(|e| e.addr);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{:?} overlaps {:?}", w[0], w[1]);
            }
        }
    }
}
