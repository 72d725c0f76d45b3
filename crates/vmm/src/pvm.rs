//! The PVM compatibility profile.
//!
//! On hosts whose `/dev/kvm` is `kvm_pvm` (a shadow-paging KVM without VMX), guest kernel code
//! runs through KVM's instruction emulator, which stops with `KVM_EXIT_INTERNAL_ERROR` on
//! instructions it does not know. This module decodes the few such instructions a Linux kernel
//! executes and completes them on the vCPU's state, exactly as the CPU would have, so the guest
//! never notices. On hardware KVM none of this runs: those instructions never exit.
//!
//! The profile also names the command-line words that keep a Linux guest away from features
//! PVM cannot emulate at all (XSAVE, CMPXCHG16B, SMAP, ...): a VMM cannot hide them through
//! CPUID on such a host, only the guest's own command line can.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_regs;

/// Command-line words added to a Linux guest on a PVM host.
pub const GUEST_CMDLINE: &str =
    "noxsave clearcpuid=cx16,smap,popcnt,erms,fsrm stratus.no_int3_selftest stratus.pvm_syscall stratus.no_pv_hypercalls";

/// Whether this host's KVM is PVM.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The warning `stratus vm run` and `stratus serve` print on hosts where Linux guests are known
/// to compute wrong results now and then: PVM on an AMD CPU, where a busy guest was measured to
/// get SSE registers back with older contents (docs/pvm-sse-fault.md). On the Intel PVM host of
/// 2026-12-07 the same guest, kernel and VMM kept their registers in every run.
pub fn guest_fault_warning() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    fault_warning_for(host_is_pvm(), &cpuinfo)
}

/// Prints [`guest_fault_warning`] to stderr, if there is one.
pub fn warn_about_guest_faults() {
    if let Some(warning) = guest_fault_warning() {
        eprintln!("{warning}");
    }
}

fn fault_warning_for(pvm: bool, cpuinfo: &str) -> Option<String> {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    let vendor = field("vendor_id")?;
    if !pvm || !matches!(vendor.as_str(), "AuthenticAMD" | "HygonGenuine") {
        return None;
    }
    let family = field("cpu family").and_then(|f| f.parse::<u32>().ok()).unwrap_or(0);
    let model = field("model").and_then(|m| m.parse::<u32>().ok()).unwrap_or(0);
    Some(format!(
        "warning: this host's KVM is PVM on an AMD CPU (family {family:#x} model {model:#x}): there, busy Linux \
         guests were measured to get SSE registers back with older contents now and then (9 of 14 md5sum \
         runs wrong under load), so guests may compute wrong results silently; see docs/pvm-sse-fault.md"
    ))
}

/// The instructions the VMM completes for PVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `int3`: becomes an injected #BP with RIP past it.
    Int3,
    /// `fwait`: nothing to do (no pending x87 exceptions are modelled).
    Fwait,
    /// `lfence`/`mfence`/`sfence`: ordering is already given by the exit.
    Fence,
    /// `clac`: clears RFLAGS.AC.
    Clac,
    /// `stac`: sets RFLAGS.AC.
    Stac,
    /// `ldmxcsr m32`.
    Ldmxcsr,
    /// `stmxcsr m32`.
    Stmxcsr,
    /// `popcnt r, r/m`.
    Popcnt,
}

const KINDS: [Kind; 8] = [
    Kind::Int3,
    Kind::Fwait,
    Kind::Fence,
    Kind::Clac,
    Kind::Stac,
    Kind::Ldmxcsr,
    Kind::Stmxcsr,
    Kind::Popcnt,
];

impl Kind {
    /// The mnemonic shown in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Int3 => "int3",
            Kind::Fwait => "fwait",
            Kind::Fence => "fence",
            Kind::Clac => "clac",
            Kind::Stac => "stac",
            Kind::Ldmxcsr => "ldmxcsr",
            Kind::Stmxcsr => "stmxcsr",
            Kind::Popcnt => "popcnt",
        }
    }

    fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// Where an operand lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// A general register, 0 = RAX ... 15 = R15.
    Register(u8),
    /// Memory at this linear address.
    Memory(u64),
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// What it is.
    pub kind: Kind,
    /// Its length in bytes.
    pub len: u8,
    /// Destination register (popcnt).
    pub dest: u8,
    /// Source operand (popcnt, ldmxcsr).
    pub src: Option<Operand>,
    /// Operand size in bytes (popcnt: 2, 4 or 8).
    pub size: u8,
}

/// Why an instruction could not be completed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PvmError {
    /// Not one of the instructions this profile completes.
    #[error("instruction {bytes} at RIP {rip:#x} cannot be emulated")]
    Unsupported {
        /// The instruction bytes as fetched.
        bytes: HexBytes,
        /// Where they were.
        rip: u64,
    },
    /// The instruction's memory could not be read.
    #[error("cannot read guest memory at linear address {0:#x}")]
    Memory(u64),
    /// KVM refused a state change.
    #[error("KVM refused to update the vCPU: {0}")]
    Kvm(String),
}

/// Instruction bytes, shown as hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

impl fmt::Display for HexBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "(unreadable)");
        }
        let parts: Vec<String> = self.0.iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "[{}]", parts.join(" "))
    }
}

/// The execution mode that decoding depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    /// 64-bit code segment (CS.L=1 with EFER.LMA).
    pub long: bool,
    /// FS base (for an FS segment override).
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
}

fn reg(regs: &kvm_regs, n: u8) -> u64 {
    match n & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

fn reg_mut(regs: &mut kvm_regs, n: u8) -> &mut u64 {
    match n & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// A cursor over instruction bytes that never reads past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }
    fn i8(&mut self) -> Option<i64> {
        self.next().map(|b| b as i8 as i64)
    }
    fn i32(&mut self) -> Option<i64> {
        let b = self.bytes.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
    }
}

#[derive(Default, Clone, Copy)]
struct Prefixes {
    opsize: bool,
    addrsize: bool,
    rep: bool,
    repne: bool,
    segment_base: Option<u64>,
    rex: u8,
}

/// Decodes a ModRM (and SIB, displacement) into (reg field, operand). RIP-relative addresses
/// need the instruction's end, known only after any immediate; none of our instructions has one,
/// so the end is the cursor position after the displacement.
fn modrm(c: &mut Cursor, p: &Prefixes, mode: &Mode, regs: &kvm_regs) -> Option<(u8, Operand)> {
    let m = c.next()?;
    let md = m >> 6;
    let reg_field = ((m >> 3) & 7) | ((p.rex & 0x4) << 1);
    let rm = m & 7;
    if md == 3 {
        return Some((reg_field, Operand::Register(rm | ((p.rex & 0x1) << 3))));
    }
    let mut rip_relative = false;
    let mut addr: i64 = 0;
    if rm == 4 {
        let sib = c.next()?;
        let scale = sib >> 6;
        let index = ((sib >> 3) & 7) | ((p.rex & 0x2) << 2);
        let base = sib & 7;
        if index != 4 {
            addr = addr.wrapping_add((reg(regs, index) as i64).wrapping_shl(scale as u32));
        }
        if base == 5 && md == 0 {
            addr = addr.wrapping_add(c.i32()?);
        } else {
            addr = addr.wrapping_add(reg(regs, base | ((p.rex & 0x1) << 3)) as i64);
        }
    } else if rm == 5 && md == 0 {
        addr = c.i32()?;
        rip_relative = mode.long;
    } else {
        addr = reg(regs, rm | ((p.rex & 0x1) << 3)) as i64;
    }
    match md {
        1 => addr = addr.wrapping_add(c.i8()?),
        2 => addr = addr.wrapping_add(c.i32()?),
        _ => {}
    }
    if rip_relative {
        addr = addr.wrapping_add(regs.rip.wrapping_add(c.pos as u64) as i64);
    }
    let mut linear = addr as u64;
    if p.addrsize || !mode.long {
        linear &= 0xffff_ffff;
    }
    linear = linear.wrapping_add(p.segment_base.unwrap_or(0));
    Some((reg_field, Operand::Memory(linear)))
}

/// Decodes the instruction at the start of `bytes` (fetched at `regs.rip`).
pub fn decode(bytes: &[u8], mode: &Mode, regs: &kvm_regs) -> Result<Instruction, PvmError> {
    let unsupported = || PvmError::Unsupported { bytes: HexBytes(bytes.to_vec()), rip: regs.rip };
    let mut c = Cursor { bytes, pos: 0 };
    let mut p = Prefixes::default();
    loop {
        match c.peek().ok_or_else(unsupported)? {
            0x66 => p.opsize = true,
            0x67 => p.addrsize = true,
            0xf3 => p.rep = true,
            0xf2 => p.repne = true,
            0x64 => p.segment_base = Some(mode.fs_base),
            0x65 => p.segment_base = Some(mode.gs_base),
            0x26 | 0x2e | 0x36 | 0x3e | 0xf0 => {}
            _ => break,
        }
        c.pos += 1;
        if c.pos > 14 {
            return Err(unsupported());
        }
    }
    if mode.long && matches!(c.peek(), Some(0x40..=0x4f)) {
        p.rex = c.next().ok_or_else(unsupported)?;
    }
    let simple = |kind, c: &Cursor| Instruction { kind, len: c.pos as u8, dest: 0, src: None, size: 0 };
    let op = c.next().ok_or_else(unsupported)?;
    let insn = match op {
        0xcc => simple(Kind::Int3, &c),
        0x9b => simple(Kind::Fwait, &c),
        0x0f => match c.next().ok_or_else(unsupported)? {
            0x01 => match c.next().ok_or_else(unsupported)? {
                0xca => simple(Kind::Clac, &c),
                0xcb => simple(Kind::Stac, &c),
                _ => return Err(unsupported()),
            },
            0xae => {
                let m = c.peek().ok_or_else(unsupported)?;
                if m >> 6 == 3 {
                    c.pos += 1;
                    match (m >> 3) & 7 {
                        5..=7 => simple(Kind::Fence, &c),
                        _ => return Err(unsupported()),
                    }
                } else if matches!((m >> 3) & 7, 2 | 3) && !p.opsize && !p.rep && !p.repne {
                    let kind = if (m >> 3) & 7 == 2 { Kind::Ldmxcsr } else { Kind::Stmxcsr };
                    let (_, src) = modrm(&mut c, &p, mode, regs).ok_or_else(unsupported)?;
                    Instruction { kind, len: c.pos as u8, dest: 0, src: Some(src), size: 4 }
                } else {
                    return Err(unsupported());
                }
            }
            0xb8 if p.rep => {
                let (dest, src) = modrm(&mut c, &p, mode, regs).ok_or_else(unsupported)?;
                let size = if p.rex & 0x8 != 0 {
                    8
                } else if p.opsize {
                    2
                } else {
                    4
                };
                Instruction { kind: Kind::Popcnt, len: c.pos as u8, dest, src: Some(src), size }
            }
            _ => return Err(unsupported()),
        },
        _ => return Err(unsupported()),
    };
    Ok(insn)
}

/// What the completion needs from the vCPU beyond its general registers.
pub trait VcpuAccess {
    /// Reads guest memory at a linear address (through the guest's page tables).
    fn read_linear(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), PvmError>;
    /// Writes guest memory at a linear address.
    fn write_linear(&mut self, addr: u64, data: &[u8]) -> Result<(), PvmError>;
    /// Reads MXCSR.
    fn mxcsr(&mut self) -> Result<u32, PvmError>;
    /// Loads MXCSR.
    fn set_mxcsr(&mut self, value: u32) -> Result<(), PvmError>;
    /// Injects exception `vector` (with `error_code` when given) to be delivered on next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), PvmError>;
}

const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_AC: u64 = 1 << 18;
/// Bits of MXCSR that are defined (the mask every CPU since SSE2 reports).
const MXCSR_VALID: u32 = 0xffff;
const VECTOR_BP: u8 = 3;
const VECTOR_GP: u8 = 13;

/// Completes `insn` on `regs` (advancing RIP) and on the vCPU.
pub fn complete(insn: &Instruction, regs: &mut kvm_regs, vcpu: &mut dyn VcpuAccess) -> Result<(), PvmError> {
    let next_rip = regs.rip.wrapping_add(insn.len as u64);
    match insn.kind {
        Kind::Fwait | Kind::Fence => {}
        Kind::Clac => regs.rflags &= !RFLAGS_AC,
        Kind::Stac => regs.rflags |= RFLAGS_AC,
        Kind::Int3 => vcpu.inject_exception(VECTOR_BP, None)?,
        Kind::Ldmxcsr => {
            let mut buf = [0u8; 4];
            read_operand(insn.src, regs, vcpu, &mut buf)?;
            let value = u32::from_le_bytes(buf);
            if value & !MXCSR_VALID != 0 {
                // Reserved bits: the CPU raises #GP(0) and the instruction does not retire.
                return vcpu.inject_exception(VECTOR_GP, Some(0));
            }
            vcpu.set_mxcsr(value)?;
        }
        Kind::Stmxcsr => match insn.src {
            Some(Operand::Memory(addr)) => {
                let value = vcpu.mxcsr()?;
                vcpu.write_linear(addr, &value.to_le_bytes())?
            }
            _ => return Err(PvmError::Memory(0)),
        },
        Kind::Popcnt => {
            let mut buf = [0u8; 8];
            read_operand(insn.src, regs, vcpu, &mut buf[..insn.size as usize])?;
            let value = u64::from_le_bytes(buf);
            let count = value.count_ones() as u64;
            let dest = reg_mut(regs, insn.dest);
            *dest = match insn.size {
                2 => (*dest & !0xffff) | count,
                _ => count, // 32-bit results zero-extend into the full register.
            };
            regs.rflags &= !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
            if value == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
        }
    }
    regs.rip = next_rip;
    Ok(())
}

fn read_operand(
    src: Option<Operand>,
    regs: &kvm_regs,
    vcpu: &mut dyn VcpuAccess,
    buf: &mut [u8],
) -> Result<(), PvmError> {
    match src {
        Some(Operand::Register(r)) => {
            let v = reg(regs, r).to_le_bytes();
            buf.copy_from_slice(&v[..buf.len()]);
            Ok(())
        }
        Some(Operand::Memory(addr)) => vcpu.read_linear(addr, buf),
        None => Ok(()),
    }
}

/// How many times each kind was completed, for metrics and for logging each kind once.
#[derive(Default)]
pub struct Counters([AtomicU64; KINDS.len()]);

impl Counters {
    /// Counts one completion; true the first time this kind is seen (log it then).
    pub fn record(&self, kind: Kind) -> bool {
        self.0[kind.index()].fetch_add(1, Ordering::Relaxed) == 0
    }

    /// (mnemonic, count) for every kind.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        KINDS.iter().map(|k| (k.name(), self.0[k.index()].load(Ordering::Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Mode = Mode { long: true, fs_base: 0, gs_base: 0x1000_0000 };

    #[derive(Default)]
    struct FakeVcpu {
        memory: Vec<(u64, Vec<u8>)>,
        mxcsr: Option<u32>,
        injected: Vec<(u8, Option<u32>)>,
    }
    impl VcpuAccess for FakeVcpu {
        fn read_linear(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), PvmError> {
            let (base, bytes) = self
                .memory
                .iter()
                .find(|(b, m)| addr >= *b && addr < b + m.len() as u64)
                .ok_or(PvmError::Memory(addr))?;
            let off = (addr - base) as usize;
            buf.copy_from_slice(bytes.get(off..off + buf.len()).ok_or(PvmError::Memory(addr))?);
            Ok(())
        }
        fn write_linear(&mut self, addr: u64, data: &[u8]) -> Result<(), PvmError> {
            let (base, bytes) = self
                .memory
                .iter_mut()
                .find(|(b, m)| addr >= *b && addr < b + m.len() as u64)
                .ok_or(PvmError::Memory(addr))?;
            let off = (addr - *base) as usize;
            bytes.get_mut(off..off + data.len()).ok_or(PvmError::Memory(addr))?.copy_from_slice(data);
            Ok(())
        }
        fn mxcsr(&mut self) -> Result<u32, PvmError> {
            Ok(self.mxcsr.unwrap_or(0x1f80))
        }
        fn set_mxcsr(&mut self, value: u32) -> Result<(), PvmError> {
            self.mxcsr = Some(value);
            Ok(())
        }
        fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), PvmError> {
            self.injected.push((vector, error_code));
            Ok(())
        }
    }

    fn run(bytes: &[u8], regs: &mut kvm_regs, vcpu: &mut FakeVcpu) -> Instruction {
        let insn = decode(bytes, &LONG, regs).unwrap();
        complete(&insn, regs, vcpu).unwrap();
        insn
    }

    #[test]
    fn int3_injects_breakpoint_past_the_instruction() {
        let mut regs = kvm_regs { rip: 0x1000, ..Default::default() };
        let mut v = FakeVcpu::default();
        run(&[0xcc, 0x90], &mut regs, &mut v);
        assert_eq!(regs.rip, 0x1001);
        assert_eq!(v.injected, vec![(3, None)]);
    }

    #[test]
    fn fences_and_fwait_are_skipped() {
        for (bytes, len) in
            [(&[0x0f, 0xae, 0xe8][..], 3), (&[0x0f, 0xae, 0xf0], 3), (&[0x0f, 0xae, 0xf8], 3), (&[0x9b], 1)]
        {
            let mut regs = kvm_regs { rip: 0x2000, rax: 7, ..Default::default() };
            run(bytes, &mut regs, &mut FakeVcpu::default());
            assert_eq!(regs.rip, 0x2000 + len);
            assert_eq!(regs.rax, 7);
        }
    }

    #[test]
    fn clac_stac_flip_ac() {
        let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
        run(&[0x0f, 0x01, 0xcb], &mut regs, &mut FakeVcpu::default());
        assert_eq!(regs.rflags, 0x2 | RFLAGS_AC);
        run(&[0x0f, 0x01, 0xca], &mut regs, &mut FakeVcpu::default());
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rip, 6);
    }

    #[test]
    fn popcnt_register_forms_and_flags() {
        // popcnt rax, rbx (F3 48 0F B8 C3)
        let mut regs = kvm_regs {
            rbx: 0xf0f0_0000_0000_0001,
            rflags: 0x2 | RFLAGS_CF | RFLAGS_ZF,
            ..Default::default()
        };
        let insn = run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3], &mut regs, &mut FakeVcpu::default());
        assert_eq!((insn.len, insn.size), (5, 8));
        assert_eq!(regs.rax, 9);
        assert_eq!(regs.rflags, 0x2, "CF and ZF cleared");
        // popcnt r9d, ecx (F3 44 0F B8 C9): 32-bit zero-extends.
        let mut regs = kvm_regs { rcx: 0xffff_ffff_0000_0000, r9: u64::MAX, ..Default::default() };
        run(&[0xf3, 0x44, 0x0f, 0xb8, 0xc9], &mut regs, &mut FakeVcpu::default());
        assert_eq!(regs.r9, 0);
        assert_ne!(regs.rflags & RFLAGS_ZF, 0, "zero source sets ZF");
        // popcnt dx, ax (66 F3 0F B8 D0): 16-bit keeps the upper bits.
        let mut regs = kvm_regs { rax: 0x1_0007, rdx: 0xdead_0000, ..Default::default() };
        run(&[0x66, 0xf3, 0x0f, 0xb8, 0xd0], &mut regs, &mut FakeVcpu::default());
        assert_eq!(regs.rdx, 0xdead_0003);
    }

    #[test]
    fn popcnt_memory_forms() {
        let mut v = FakeVcpu {
            memory: vec![(0x5000, 0x0303_0303_0303_0303u64.to_le_bytes().to_vec())],
            ..Default::default()
        };
        // popcnt rcx, [rdi+rsi*2+0x10] (F3 48 0F B8 4C 77 10)
        let mut regs = kvm_regs { rdi: 0x4ff0 - 0x20, rsi: 0x10, ..Default::default() };
        run(&[0xf3, 0x48, 0x0f, 0xb8, 0x4c, 0x77, 0x10], &mut regs, &mut v);
        assert_eq!(regs.rcx, 16);
        // popcnt eax, [rip+0x0ff9] (F3 0F B8 05 F9 0F 00 00) at rip 0x4000: 0x4008 + 0xff9 = 0x5001
        let mut regs = kvm_regs { rip: 0x4000, ..Default::default() };
        run(&[0xf3, 0x0f, 0xb8, 0x05, 0xf9, 0x0f, 0x00, 0x00], &mut regs, &mut v);
        assert_eq!(regs.rax, 8);
        assert_eq!(regs.rip, 0x4008);
        // popcnt eax, gs:[0x10] via SIB with no base (65 F3 0F B8 04 25 10 00 00 00)
        let mut v = FakeVcpu { memory: vec![(0x1000_0010, vec![0xff, 0, 0, 0])], ..Default::default() };
        let mut regs = kvm_regs::default();
        run(&[0x65, 0xf3, 0x0f, 0xb8, 0x04, 0x25, 0x10, 0, 0, 0], &mut regs, &mut v);
        assert_eq!(regs.rax, 8);
    }

    #[test]
    fn ldmxcsr_loads_or_faults_on_reserved_bits() {
        let mut v =
            FakeVcpu { memory: vec![(0x3000, vec![0x80, 0x1f, 0, 0, 0, 0, 1, 0])], ..Default::default() };
        // ldmxcsr [rax] (0F AE 10)
        let mut regs = kvm_regs { rax: 0x3000, ..Default::default() };
        run(&[0x0f, 0xae, 0x10], &mut regs, &mut v);
        assert_eq!(v.mxcsr, Some(0x1f80));
        assert_eq!(regs.rip, 3);
        // ldmxcsr [rax+4] with bit 16 set: #GP(0), RIP unchanged.
        let mut regs = kvm_regs { rax: 0x3000, rip: 0x10, ..Default::default() };
        let insn = decode(&[0x0f, 0xae, 0x50, 0x04], &LONG, &regs).unwrap();
        complete(&insn, &mut regs, &mut v).unwrap();
        assert_eq!(v.injected, vec![(13, Some(0))]);
        assert_eq!(regs.rip, 0x10);
    }

    #[test]
    fn stmxcsr_stores_the_current_value() {
        let mut v =
            FakeVcpu { memory: vec![(0x3000, vec![0; 8])], mxcsr: Some(0x7f80), ..Default::default() };
        // stmxcsr [rsp+0x4] (0F AE 5C 24 04)
        let mut regs = kvm_regs { rsp: 0x3000, ..Default::default() };
        run(&[0x0f, 0xae, 0x5c, 0x24, 0x04], &mut regs, &mut v);
        assert_eq!(v.memory[0].1, vec![0, 0, 0, 0, 0x80, 0x7f, 0, 0]);
        assert_eq!(regs.rip, 5);
    }

    #[test]
    fn unknown_and_truncated_instructions_are_reported_with_their_bytes() {
        let regs = kvm_regs { rip: 0xffff_ffff_8100_0000, ..Default::default() };
        let err = decode(&[0x0f, 0xc7, 0x0f], &LONG, &regs).unwrap_err();
        assert_eq!(err.to_string(), "instruction [0f c7 0f] at RIP 0xffffffff81000000 cannot be emulated");
        for bytes in [&[][..], &[0xf3], &[0xf3, 0x0f, 0xb8], &[0x0f, 0xae], &[0x66; 15], &[0x0f, 0xae, 0x14]]
        {
            assert!(decode(bytes, &LONG, &regs).is_err(), "{bytes:x?}");
        }
    }

    #[test]
    fn decoding_random_bytes_never_panics() {
        // A small xorshift generator: deterministic, no extra dependency.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let regs = kvm_regs { rip: u64::MAX - 3, rsp: u64::MAX, ..Default::default() };
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 16) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i * 4)) as u8).collect();
            let _ = decode(&bytes, &LONG, &regs);
            let _ = decode(&bytes, &Mode { long: false, fs_base: 0, gs_base: 0 }, &regs);
        }
    }

    #[test]
    fn the_guest_fault_warning_is_for_pvm_on_amd_only() {
        let amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC\n";
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n";
        let warning = fault_warning_for(true, amd).unwrap();
        assert!(warning.contains("family 0x17 model 0x31"), "{warning}");
        assert!(warning.contains("docs/pvm-sse-fault.md"), "{warning}");
        assert_eq!(fault_warning_for(false, amd), None, "hardware KVM");
        assert_eq!(fault_warning_for(true, intel), None, "PVM on Intel");
        assert_eq!(fault_warning_for(true, ""), None, "no /proc/cpuinfo");
    }

    #[test]
    fn counters_say_first_time_once() {
        let c = Counters::default();
        assert!(c.record(Kind::Popcnt));
        assert!(!c.record(Kind::Popcnt));
        assert!(c.record(Kind::Int3));
        let snap = c.snapshot();
        assert!(snap.contains(&("popcnt", 2)) && snap.contains(&("int3", 1)) && snap.contains(&("clac", 0)));
    }
}
