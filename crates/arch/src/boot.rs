//! Boot information handed to the kernel: the Linux zero page (`struct boot_params`) for the
//! 64-bit and bzImage entries, and `hvm_start_info` for the PVH entry.
//!
//! Both are built as plain bytes at the offsets the protocols define, so they can be checked
//! without a guest and written into guest memory in one call.

use crate::memory_map::E820Entry;

/// Offsets into `struct boot_params` (Documentation/x86/zero-page.rst).
mod zp {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const SETUP_HEADER: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER: usize = 0x202;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const E820_TABLE: usize = 0x2d0;
    pub const E820_MAX: usize = 128;
    pub const SIZE: usize = 4096;
}

/// `HdrS`: the setup header magic.
pub const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// PVH start info magic (`xen/include/public/arch-x86/hvm/start_info.h`).
pub const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;

/// Errors building boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The memory map does not fit the structure that carries it.
    #[error("the memory map has {0} entries, more than the boot protocol can carry")]
    TooManyE820Entries(usize),
}

/// An initrd already placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitrdPlacement {
    /// Guest-physical address of its first byte.
    pub addr: u64,
    /// Its length in bytes.
    pub size: u64,
}

/// Everything the boot protocols need to know about where the VMM put things.
#[derive(Clone, Debug)]
pub struct BootInfo<'a> {
    /// The e820 map.
    pub e820: &'a [E820Entry],
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command line length including the NUL.
    pub cmdline_size: u32,
    /// The initrd, if any.
    pub initrd: Option<InitrdPlacement>,
    /// Guest-physical address of the ACPI RSDP.
    pub rsdp_addr: u64,
}

fn put_u8(buf: &mut [u8], off: usize, v: u8) {
    buf[off] = v;
}
fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Builds the Linux zero page.
///
/// `setup_header` is the kernel's own setup header (bytes from offset 0x1f1 of a bzImage), or
/// `None` for an ELF vmlinux, which has none: then the fields the kernel checks are made up.
pub fn zero_page(info: &BootInfo, setup_header: Option<&[u8]>) -> Result<Vec<u8>, BootError> {
    if info.e820.len() > zp::E820_MAX {
        return Err(BootError::TooManyE820Entries(info.e820.len()));
    }
    let mut page = vec![0u8; zp::SIZE];
    if let Some(hdr) = setup_header {
        let len = hdr.len().min(zp::E820_TABLE - zp::SETUP_HEADER);
        page[zp::SETUP_HEADER..zp::SETUP_HEADER + len].copy_from_slice(&hdr[..len]);
    } else {
        put_u16(&mut page, zp::BOOT_FLAG, 0xaa55);
        put_u32(&mut page, zp::HEADER, SETUP_HEADER_MAGIC);
    }
    // 0xff: a boot loader without an assigned id.
    put_u8(&mut page, zp::TYPE_OF_LOADER, 0xff);
    // CAN_USE_HEAP, with the heap ending below the command line.
    page[zp::LOADFLAGS] |= 0x80;
    put_u16(&mut page, zp::HEAP_END_PTR, 0xfe00);
    put_u32(&mut page, zp::CMD_LINE_PTR, info.cmdline_addr as u32);
    put_u32(&mut page, zp::CMDLINE_SIZE, info.cmdline_size);
    if let Some(initrd) = info.initrd {
        put_u32(&mut page, zp::RAMDISK_IMAGE, initrd.addr as u32);
        put_u32(&mut page, zp::RAMDISK_SIZE, initrd.size as u32);
    }
    put_u64(&mut page, zp::ACPI_RSDP_ADDR, info.rsdp_addr);
    put_u8(&mut page, zp::E820_ENTRIES, info.e820.len() as u8);
    for (i, e) in info.e820.iter().enumerate() {
        let off = zp::E820_TABLE + i * 20;
        put_u64(&mut page, off, e.addr);
        put_u64(&mut page, off + 8, e.size);
        put_u32(&mut page, off + 16, e.kind as u32);
    }
    Ok(page)
}

/// The PVH boot structures: start info, module list and memory map, each with the
/// guest-physical address it must be written to.
pub struct PvhStartInfo {
    /// `hvm_start_info`, for `start_info_addr`.
    pub start_info: Vec<u8>,
    /// `hvm_modlist_entry` array, for `modlist_addr`.
    pub modlist: Vec<u8>,
    /// `hvm_memmap_table_entry` array, for `memmap_addr`.
    pub memmap: Vec<u8>,
}

/// Builds the PVH start info. Addresses are where the caller will place the module list and
/// memory map (they are recorded inside the start info).
pub fn pvh_start_info(info: &BootInfo, modlist_addr: u64, memmap_addr: u64) -> PvhStartInfo {
    let mut start_info = vec![0u8; 56];
    put_u32(&mut start_info, 0, PVH_START_INFO_MAGIC);
    put_u32(&mut start_info, 4, 1); // version: has memmap fields
    let mut modlist = Vec::new();
    if let Some(initrd) = info.initrd {
        put_u32(&mut start_info, 12, 1); // nr_modules
        put_u64(&mut start_info, 16, modlist_addr);
        modlist = vec![0u8; 32];
        put_u64(&mut modlist, 0, initrd.addr);
        put_u64(&mut modlist, 8, initrd.size);
    }
    put_u64(&mut start_info, 24, info.cmdline_addr);
    put_u64(&mut start_info, 32, info.rsdp_addr);
    put_u64(&mut start_info, 40, memmap_addr);
    put_u32(&mut start_info, 48, info.e820.len() as u32);
    let mut memmap = vec![0u8; info.e820.len() * 24];
    for (i, e) in info.e820.iter().enumerate() {
        let off = i * 24;
        put_u64(&mut memmap, off, e.addr);
        put_u64(&mut memmap, off + 8, e.size);
        put_u32(&mut memmap, off + 16, e.kind as u32);
    }
    PvhStartInfo { start_info, modlist, memmap }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_map::e820_map;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn info(e820: &[E820Entry]) -> BootInfo<'_> {
        BootInfo {
            e820,
            cmdline_addr: 0x20000,
            cmdline_size: 12,
            initrd: Some(InitrdPlacement { addr: 0x700_0000, size: 0x1234 }),
            rsdp_addr: 0xe0000,
        }
    }

    #[test]
    fn zero_page_for_vmlinux_carries_map_cmdline_initrd_rsdp() {
        let map = e820_map(256 << 20);
        let page = zero_page(&info(&map), None).unwrap();
        assert_eq!(u32_at(&page, zp::HEADER), SETUP_HEADER_MAGIC);
        assert_eq!(page[zp::E820_ENTRIES] as usize, map.len());
        assert_eq!(u32_at(&page, zp::CMD_LINE_PTR), 0x20000);
        assert_eq!(u32_at(&page, zp::RAMDISK_IMAGE), 0x700_0000);
        assert_eq!(u32_at(&page, zp::RAMDISK_SIZE), 0x1234);
        assert_eq!(u64_at(&page, zp::ACPI_RSDP_ADDR), 0xe0000);
        let last = map.last().unwrap();
        let off = zp::E820_TABLE + (map.len() - 1) * 20;
        assert_eq!(u64_at(&page, off), last.addr);
        assert_eq!(u64_at(&page, off + 8), last.size);
        assert_eq!(u32_at(&page, off + 16), 1);
    }

    #[test]
    fn zero_page_keeps_the_kernels_setup_header() {
        let map = e820_map(64 << 20);
        let mut hdr = vec![0u8; 0x7f];
        hdr[0x202 - 0x1f1..0x206 - 0x1f1].copy_from_slice(&SETUP_HEADER_MAGIC.to_le_bytes());
        hdr[0x211 - 0x1f1] = 0x01; // LOADED_HIGH
        let page = zero_page(&info(&map), Some(&hdr)).unwrap();
        assert_eq!(page[zp::LOADFLAGS], 0x81);
        assert_eq!(u32_at(&page, zp::HEADER), SETUP_HEADER_MAGIC);
    }

    #[test]
    fn too_many_e820_entries_is_an_error() {
        let map = vec![E820Entry { addr: 0, size: 1, kind: crate::memory_map::E820Type::Ram }; 129];
        assert!(matches!(zero_page(&info(&map), None), Err(BootError::TooManyE820Entries(129))));
    }

    #[test]
    fn pvh_start_info_points_at_its_parts() {
        let map = e820_map(128 << 20);
        let pvh = pvh_start_info(&info(&map), 0x6040, 0x6100);
        assert_eq!(u32_at(&pvh.start_info, 0), PVH_START_INFO_MAGIC);
        assert_eq!(u32_at(&pvh.start_info, 12), 1);
        assert_eq!(u64_at(&pvh.start_info, 16), 0x6040);
        assert_eq!(u64_at(&pvh.start_info, 32), 0xe0000);
        assert_eq!(u64_at(&pvh.start_info, 40), 0x6100);
        assert_eq!(u32_at(&pvh.start_info, 48) as usize, map.len());
        assert_eq!(u64_at(&pvh.modlist, 0), 0x700_0000);
        assert_eq!(pvh.memmap.len(), map.len() * 24);
    }
}
