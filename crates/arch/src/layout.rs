//! Where things live in a Stratus guest's physical address space and I/O port space.
//!
//! The layout follows what Linux expects of a PC: low RAM below the EBDA, the BIOS area
//! (where the ACPI RSDP is found by a legacy scan), the kernel at 1 MiB, and a hole below
//! 4 GiB for device MMIO, the IOAPIC and the local APICs.

/// Boot GDT (four descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (a single empty descriptor: the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, then four page directories.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages, the first 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we accept, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, RSDP first, in the BIOS read-only area where a legacy scan finds it.
pub const ACPI_START: u64 = 0xe0000;
/// End of the area reserved for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM beyond this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows start here, one `VIRTIO_MMIO_SIZE` window per device.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (below are the legacy ISA interrupts).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1: 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 command/status port: writing 0xFE pulses the reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// ACPI sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (FADT `SLEEP_STATUS_REG`).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT `RESET_REG`).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to `ACPI_RESET_PORT` to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The S5 (soft off) sleep type the DSDT's `_S5_` object announces.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// pvpanic I/O port (ACPI device `QEMU0001`).
pub const PVPANIC_PORT: u16 = 0x505;

/// Generic Event Device register (ACPI `ACPI0013`): the guest's `_EVT` method reads, and so
/// clears, the pending event bits (`GED_EVENT_*`).
pub const GED_PORT: u16 = 0x610;
/// The GED's interrupt (the IOAPIC's last pin; virtio devices use 5 to 22).
pub const GED_IRQ: u32 = 23;
/// GED event: the ACPI power button was pressed (graceful shutdown request).
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// GED event: the VM generation id changed (a restore: the guest reseeds its RNG).
pub const GED_EVENT_GENERATION: u8 = 1 << 1;
/// The 16-byte VM generation id (ACPI `VMGENCTR`), in the reserved BIOS area after the ACPI
/// tables.
pub const VMGENID_ADDR: u64 = 0xf_f000;
