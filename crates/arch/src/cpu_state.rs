//! The state a vCPU starts in: registers, segments, page tables and MSRs for each entry
//! protocol (64-bit Linux boot, PVH 32-bit entry).

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, paging on, RSI = zero page.
    Linux64 {
        /// Entry point.
        entry: u64,
        /// Zero page address.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// Entry point (from the ELF note).
        entry: u64,
        /// Start info address.
        start_info: u64,
    },
}

/// A GDT descriptor from flags, base and limit (the packed layout of the x86 manual).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS — selectors 0x8, 0x10, 0x18. The PVH entry uses
/// a 32-bit code segment at 0x8 instead (index 1 is rewritten by `gdt_for`).
pub fn gdt_for(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [gdt_entry(0, 0, 0), code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

/// Decodes a GDT entry into the segment KVM wants.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Identity page tables for the first 4 GiB with 2 MiB pages: (address, 4 KiB table) pairs.
pub fn identity_page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = vec![0u8; 4096];
    pml4[0..8].copy_from_slice(&(PDPTE_START | 0x3).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    let mut out = Vec::new();
    for dir in 0..4u64 {
        let pd_addr = PDE_START + dir * 0x1000;
        pdpt[dir as usize * 8..dir as usize * 8 + 8].copy_from_slice(&(pd_addr | 0x3).to_le_bytes());
        let mut pd = vec![0u8; 4096];
        for i in 0..512u64 {
            let phys = ((dir * 512 + i) << 21) | 0x83; // present, writable, 2 MiB page
            pd[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&phys.to_le_bytes());
        }
        out.push((pd_addr, pd));
    }
    out.push((PML4_START, pml4));
    out.push((PDPTE_START, pdpt));
    out
}

/// Special registers for `mode`, layered on the vCPU's current `sregs`.
pub fn sregs_for(mode: EntryMode, mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = gdt_for(mode);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers for `mode`.
pub fn regs_for(mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match mode {
        EntryMode::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        EntryMode::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    regs
}

/// MSR indexes used at boot.
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// MSR values every vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs enabled
/// with write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        entry(msr::SYSENTER_CS, 0),
        entry(msr::SYSENTER_ESP, 0),
        entry(msr::SYSENTER_EIP, 0),
        entry(msr::STAR, 0),
        entry(msr::CSTAR, 0),
        entry(msr::KERNEL_GS_BASE, 0),
        entry(msr::SYSCALL_MASK, 0),
        entry(msr::LSTAR, 0),
        entry(msr::TSC, 0),
        entry(msr::MISC_ENABLE, 1),
        entry(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_decodes() {
        let cs = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_, cs.g), (1, 0, 1, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 8);
        let pvh_cs = segment_from_gdt(gdt_for(EntryMode::Pvh { entry: 0, start_info: 0 })[1], 1);
        assert_eq!((pvh_cs.l, pvh_cs.db), (0, 1));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let tables = identity_page_tables();
        let get = |addr| &tables.iter().find(|(a, _)| *a == addr).unwrap().1;
        let pde = |dir: u64, i: usize| {
            u64::from_le_bytes(get(PDE_START + dir * 0x1000)[i * 8..i * 8 + 8].try_into().unwrap())
        };
        assert_eq!(pde(0, 0), 0x83);
        assert_eq!(pde(0, 1), (1 << 21) | 0x83);
        assert_eq!(pde(3, 511) & !0xfff, 0xffe0_0000);
        assert_eq!(u64::from_le_bytes(get(PML4_START)[0..8].try_into().unwrap()), PDPTE_START | 3);
    }

    #[test]
    fn entry_registers() {
        let r = regs_for(EntryMode::Linux64 { entry: 0x100_0000, zero_page: 0x7000 });
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, 0x7000, 2));
        let r = regs_for(EntryMode::Pvh { entry: 0x100_0200, start_info: 0x6000 });
        assert_eq!((r.rip, r.rbx), (0x100_0200, 0x6000));
        let s = sregs_for(EntryMode::Linux64 { entry: 0, zero_page: 0 }, kvm_sregs::default());
        assert_eq!(s.efer & (EFER_LMA | EFER_LME), EFER_LMA | EFER_LME);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        let s = sregs_for(EntryMode::Pvh { entry: 0, start_info: 0 }, kvm_sregs::default());
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
    }
}
