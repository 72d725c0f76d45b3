//! Putting a kernel, its initrd, command line, boot structures and ACPI tables into guest
//! memory, and choosing how the boot CPU enters the kernel.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{bzimage::BzImage, elf::Elf, elf::PvhBootCapability, KernelLoader};
use stratus_arch::boot::{self, BootInfo, InitrdPlacement};
use stratus_arch::cpu_state::{gdt_for, identity_page_tables, EntryMode};
use stratus_arch::layout::*;
use stratus_arch::memory_map::e820_map;
use stratus_virtio::GuestRam;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    File {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is neither format.
    #[error("{0} is not a kernel: neither an ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {reason}")]
    Kernel {
        /// Which file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The initrd does not fit in low memory above the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel; give the VM more --memory")]
    InitrdTooLarge {
        /// Which file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes, the limit is {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    /// Boot structures could not be built.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] stratus_arch::acpi::AcpiError),
    /// Writing guest memory failed (an address outside RAM).
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootSource {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd (cpio, plain or compressed: the kernel unpacks it).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

fn open(path: &Path) -> Result<File, LoadError> {
    File::open(path).map_err(|source| LoadError::File { path: path.to_owned(), source })
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, LoadError> {
    let io = |source| LoadError::File { path: path.to_owned(), source };
    let mut head = [0u8; 0x206];
    let n = file.read(&mut head).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    if n >= 4 && head[0..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(LoadError::NotAKernel(path.to_owned()))
    }
}

/// Reads the bzImage setup header (from offset 0x1f1 to its self-declared end).
fn read_setup_header(file: &mut File, path: &Path) -> Result<Vec<u8>, LoadError> {
    let io = |source| LoadError::File { path: path.to_owned(), source };
    let mut head = vec![0u8; 0x280];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut head).map_err(io)?;
    let end = (0x202 + head[0x201] as usize).min(0x280);
    Ok(head[0x1f1..end.max(0x1f1)].to_vec())
}

/// Loads everything for `source` into `mem` for a VM of `vcpus` CPUs whose ACPI tables name the
/// `virtio` devices, and returns how the boot CPU enters the kernel.
pub fn load(
    mem: &GuestRam,
    source: &BootSource,
    vcpus: u32,
    virtio: &[stratus_arch::acpi::VirtioMmioDevice],
) -> Result<EntryMode, LoadError> {
    let mut kernel = open(&source.kernel)?;
    let format = detect_format(&mut kernel, &source.kernel)?;
    let kernel_err = |e: linux_loader::loader::Error| LoadError::Kernel {
        path: source.kernel.clone(),
        reason: e.to_string(),
    };
    let (result, setup_header) = match format {
        KernelFormat::Elf => {
            (Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(kernel_err)?, None)
        }
        KernelFormat::BzImage => {
            let hdr = read_setup_header(&mut kernel, &source.kernel)?;
            let r =
                BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(kernel_err)?;
            (r, Some(hdr))
        }
    };

    // Command line.
    let cmdline_size = source.cmdline.len() + 1;
    if cmdline_size > CMDLINE_MAX_SIZE {
        return Err(LoadError::CmdlineTooLong(cmdline_size));
    }
    let mut cmdline = source.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))?;

    // Initrd at the top of the first RAM region, page aligned, above the kernel.
    let initrd = match &source.initrd {
        Some(path) => Some(load_initrd(mem, path, result.kernel_end)?),
        None => None,
    };

    let acpi = stratus_arch::acpi::build(ACPI_START, vcpus, virtio)?;
    mem.write_slice(&acpi.bytes, GuestAddress(acpi.base))?;

    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    let e820 = e820_map(mem_size);
    let info = BootInfo {
        e820: &e820,
        cmdline_addr: CMDLINE_START,
        cmdline_size: cmdline_size as u32,
        initrd,
        rsdp_addr: ACPI_START,
    };

    let mode = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            let pvh = boot::pvh_start_info(&info, PVH_MODLIST_START, PVH_MEMMAP_START);
            mem.write_slice(&pvh.start_info, GuestAddress(PVH_INFO_START))?;
            mem.write_slice(&pvh.modlist, GuestAddress(PVH_MODLIST_START))?;
            mem.write_slice(&pvh.memmap, GuestAddress(PVH_MEMMAP_START))?;
            EntryMode::Pvh { entry: entry.raw_value(), start_info: PVH_INFO_START }
        }
        (KernelFormat::Elf, _) => {
            let page = boot::zero_page(&info, None)?;
            mem.write_slice(&page, GuestAddress(ZERO_PAGE_START))?;
            // linux-loader reports the ELF entry point (physical for a vmlinux) as kernel_load.
            EntryMode::Linux64 { entry: result.kernel_load.raw_value(), zero_page: ZERO_PAGE_START }
        }
        (KernelFormat::BzImage, _) => {
            let page = boot::zero_page(&info, setup_header.as_deref())?;
            mem.write_slice(&page, GuestAddress(ZERO_PAGE_START))?;
            // The 64-bit entry sits 0x200 bytes into the protected-mode kernel.
            EntryMode::Linux64 { entry: result.kernel_load.raw_value() + 0x200, zero_page: ZERO_PAGE_START }
        }
    };

    for (i, entry) in gdt_for(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    if let EntryMode::Linux64 { .. } = mode {
        for (addr, table) in identity_page_tables() {
            mem.write_slice(&table, GuestAddress(addr))?;
        }
    }
    Ok(mode)
}

fn load_initrd(mem: &GuestRam, path: &Path, kernel_end: u64) -> Result<InitrdPlacement, LoadError> {
    let data = std::fs::read(path).map_err(|source| LoadError::File { path: path.to_owned(), source })?;
    let size = data.len() as u64;
    let too_large = || LoadError::InitrdTooLarge { path: path.to_owned(), size };
    let first_region_end =
        mem.iter().next().map(|r| r.start_addr().raw_value() + r.len()).ok_or_else(too_large)?;
    let addr = first_region_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.write_slice(&data, GuestAddress(addr))?;
    Ok(InitrdPlacement { addr, size })
}
