//! vCPU threads: set up the architectural state, then run `KVM_RUN` and dispatch each exit —
//! port and MMIO accesses to the buses, power events to the exit signal, and on PVM hosts the
//! instructions KVM could not emulate to `pvm`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use stratus_arch::cpu_state::{self, EntryMode};
use stratus_devices::{Bus, ExitSignal, GuestExit};
use stratus_virtio::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::pvm;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM call failed.
    #[error("vCPU {id}: {what}: {source}")]
    Kvm {
        /// Which vCPU.
        id: u32,
        /// What was being done.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// KVM would not take back a saved MSR (the state comes from another host or is damaged).
    #[error("vCPU {id}: KVM refused saved MSR {index:#x}")]
    MsrRefused {
        /// Which vCPU.
        id: u32,
        /// The MSR.
        index: u32,
    },
}

/// `KVM_INTERNAL_ERROR_EMULATION`: KVM's emulator failed on an instruction.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// MXCSR's place in the legacy region of the XSAVE area (byte 24), in 32-bit words.
const XSAVE_MXCSR_INDEX: usize = 6;
/// XSTATE_BV, the XSAVE header's first word (byte 512), in 32-bit words.
const XSAVE_XSTATE_BV_INDEX: usize = 128;
/// XSTATE_BV bit for SSE state (XMM registers and MXCSR).
const XFEATURE_SSE: u32 = 1 << 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// VM exits of one vCPU that reached the VMM, by reason (exits KVM handles itself, such as
/// HLT with the in-kernel interrupt controller, are in KVM's own statistics).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// `KVM_RUN` interrupted by a signal (a pause, a kick).
    pub interrupted: AtomicU64,
    /// Instructions KVM could not emulate, completed by the VMM (PVM hosts).
    pub emulation: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

impl ExitCounters {
    /// Every counter with its name, for metrics.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("io_in", get(&self.io_in)),
            ("io_out", get(&self.io_out)),
            ("mmio_read", get(&self.mmio_read)),
            ("mmio_write", get(&self.mmio_write)),
            ("interrupted", get(&self.interrupted)),
            ("emulation", get(&self.emulation)),
            ("other", get(&self.other)),
        ]
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One virtual CPU and what it needs to handle its exits.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    mem: GuestRam,
    /// Present on PVM hosts: completion counters.
    pvm: Option<Arc<pvm::Counters>>,
    /// Exits by reason.
    pub exits: Arc<ExitCounters>,
    /// KVM's own counters for this vCPU, when the host has them.
    pub kvm_stats: Option<Arc<crate::kvm_stats::KvmStats>>,
}

impl Vcpu {
    /// Creates vCPU `id` of `vm` with CPUID made for it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &VmFd,
        id: u32,
        cpuid: &kvm_bindings::CpuId,
        vcpus: u32,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        mem: GuestRam,
        pvm: Option<Arc<pvm::Counters>>,
    ) -> Result<Self, VcpuError> {
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm.create_vcpu(id as u64).map_err(kvm_err("creating the vCPU"))?;
        let mut cpuid = cpuid.clone();
        stratus_arch::cpuid::filter(&mut cpuid, id, vcpus);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
        let msrs = Msrs::from_entries(&cpu_state::boot_msrs()).map_err(|_| VcpuError::Kvm {
            id,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        fd.set_msrs(&msrs).map_err(kvm_err("setting boot MSRs"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("reading the local APIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(kvm_err("setting the local APIC"))?;
        let kvm_stats = crate::kvm_stats::KvmStats::open(&fd).map(Arc::new);
        Ok(Self { id, fd, pio, mmio, exit, mem, pvm, exits: Arc::default(), kvm_stats })
    }

    /// Puts the boot CPU at the kernel's entry point.
    pub fn set_boot_state(&self, mode: EntryMode) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let sregs = self.fd.get_sregs().map_err(kvm_err("reading special registers"))?;
        self.fd
            .set_sregs(&cpu_state::sregs_for(mode, sregs))
            .map_err(kvm_err("setting special registers"))?;
        self.fd.set_regs(&cpu_state::regs_for(mode)).map_err(kvm_err("setting registers"))?;
        let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(kvm_err("setting FPU state"))?;
        Ok(())
    }

    /// Runs vCPU `vcpu` until the guest stops or the VMM cannot go on, parking at `control`'s
    /// checkpoint whenever the VM is paused; the reason it stopped goes to the exit signal,
    /// which wakes the VMM's main loop. The caller has joined `control` for this thread.
    pub fn run_thread(vcpu: Arc<Mutex<Vcpu>>, control: Arc<crate::control::RunControl>) {
        let exit = stratus_devices::bus::lock(&vcpu).exit.clone();
        loop {
            // The pending access is completed once the pause is seen, inside the checkpoint:
            // a pause asked for between a check here and the checkpoint would otherwise park
            // the vCPU with it unfinished (repeated or lost after a restore).
            control.checkpoint_with(|| stratus_devices::bus::lock(&vcpu).complete_pending_io());
            let outcome = stratus_devices::bus::lock(&vcpu).run_once();
            if let Some(reason) = outcome {
                exit.raise(reason);
                control.leave();
                return;
            }
        }
    }

    /// Lets KVM finish an instruction whose port or MMIO access the VMM just handled (an IN's
    /// result goes into RAX, RIP moves past it) without running the guest further: KVM does
    /// that at the start of the next `KVM_RUN`, which `immediate_exit` makes return at once.
    /// A vCPU saved before that would repeat (or lose) the access after a restore.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// One `KVM_RUN` and the handling of its exit; `Some` when the VM must stop.
    fn run_once(&mut self) -> Option<GuestExit> {
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    count(&self.exits.io_out);
                    self.pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::IoIn(port, data) => {
                    count(&self.exits.io_in);
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    count(&self.exits.mmio_read);
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    count(&self.exits.mmio_write);
                    self.mmio.write(addr, data);
                    None
                }
                VcpuExit::Shutdown => Some(GuestExit::Reset("triple fault")),
                VcpuExit::SystemEvent(kind, _) => Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => GuestExit::Reset("system reset"),
                    KVM_SYSTEM_EVENT_CRASH => GuestExit::Panic,
                    other => GuestExit::Error(format!("vCPU {}: unknown system event {other}", self.id)),
                }),
                VcpuExit::Hlt => Some(GuestExit::Error(format!(
                    "vCPU {} halted with no interrupt controller to wake it",
                    self.id
                ))),
                VcpuExit::FailEntry(reason, cpu) => Some(GuestExit::Error(format!(
                    "vCPU {}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})",
                    self.id
                ))),
                VcpuExit::InternalError => {
                    count(&self.exits.emulation);
                    self.internal_error()
                }
                other => {
                    count(&self.exits.other);
                    Some(GuestExit::Error(format!("vCPU {}: unexpected exit {other:?}", self.id)))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&self.exits.interrupted);
                None
            }
            Err(e) => Some(GuestExit::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.id))),
        }
    }

    /// This vCPU's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The vCPU's whole architectural state; the vCPU must not be running. `msrs` lists the
    /// MSRs to save (`savable_msrs`).
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let mp_state = self.fd.get_mp_state().map_err(kvm_err("reading the MP state"))?;
        let regs = self.fd.get_regs().map_err(kvm_err("reading registers"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err("reading special registers"))?;
        let xsave = self.fd.get_xsave().map_err(kvm_err("reading the XSAVE area"))?;
        let xcrs = self.fd.get_xcrs().map_err(kvm_err("reading XCRs"))?;
        let debugregs = self.fd.get_debug_regs().map_err(kvm_err("reading debug registers"))?;
        let lapic = self.fd.get_lapic().map_err(kvm_err("reading the local APIC"))?;
        let msr_values = self.read_msrs(msrs)?;
        let events = self.fd.get_vcpu_events().map_err(kvm_err("reading pending events"))?;
        Ok(VcpuState { id, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs: msr_values, events })
    }

    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let read = self.read_msrs_until_refused(indices)?;
        if read.len() != indices.len() {
            return Err(VcpuError::Kvm {
                id: self.id,
                what: "reading MSRs (KVM refused one it listed)",
                source: kvm_ioctls::Error::new(libc::EIO),
            });
        }
        Ok(read)
    }

    /// Reads `indices` in one `KVM_GET_MSRS`, which stops at the first MSR KVM refuses: the
    /// values read before it.
    fn read_msrs_until_refused(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let id = self.id;
        let entries: Vec<kvm_bindings::kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
            id,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let read = self.fd.get_msrs(&mut msrs).map_err(|source| VcpuError::Kvm {
            id,
            what: "reading MSRs",
            source,
        })?;
        Ok(msrs.as_slice().iter().take(read).map(|e| (e.index, e.data)).collect())
    }

    /// Which of `candidates` (KVM's MSR index list) this vCPU can save and restore: read
    /// together, leaving out each one KVM refuses and going on after it. An ioctl per refusal
    /// rather than per MSR: a migration learns this while the guest is paused.
    pub fn savable_msrs(&self, candidates: &[u32]) -> Vec<u32> {
        let mut kept = Vec::with_capacity(candidates.len());
        let mut rest = candidates;
        while let Some(&first) = rest.first() {
            match self.read_msrs_until_refused(rest) {
                Ok(read) => {
                    kept.extend(read.iter().map(|&(index, _)| index));
                    // The one after those read is refused.
                    rest = rest.get(read.len() + 1..).unwrap_or_default();
                }
                // The whole call failed: this one alone decides for itself.
                Err(_) => {
                    if self.read_msrs(&[first]).is_ok() {
                        kept.push(first);
                    }
                    rest = &rest[1..];
                }
            }
        }
        kept
    }

    /// Puts the vCPU in a saved state (hostile input: KVM checks the values, and a refusal
    /// is an error naming the part).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        self.fd.set_mp_state(state.mp_state).map_err(kvm_err("restoring the MP state"))?;
        self.fd.set_regs(&state.regs).map_err(kvm_err("restoring registers"))?;
        self.fd.set_sregs(&state.sregs).map_err(kvm_err("restoring special registers"))?;
        // SAFETY: the area is a whole kvm_xsave of the size KVM_GET_XSAVE fills; KVM checks
        // its contents.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(kvm_err("restoring the XSAVE area"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(kvm_err("restoring XCRs"))?;
        self.fd.set_debug_regs(&state.debugregs).map_err(kvm_err("restoring debug registers"))?;
        self.fd.set_lapic(&state.lapic).map_err(kvm_err("restoring the local APIC"))?;
        let entries: Vec<kvm_bindings::kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
            id,
            what: "restoring MSRs (too many)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let written = self.fd.set_msrs(&msrs).map_err(kvm_err("restoring MSRs"))?;
        if let Some(&(index, _)) = state.msrs.get(written) {
            return Err(VcpuError::MsrRefused { id, index });
        }
        self.fd.set_vcpu_events(&state.events).map_err(kvm_err("restoring pending events"))?;
        Ok(())
    }

    /// Tells the guest's kvmclock that the vCPU was stopped (so its watchdogs do not take the
    /// pause for a lockup); hosts without kvmclock control ignore it.
    pub fn notify_paused(&self) {
        let _ = self.fd.kvmclock_ctrl();
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: on PVM hosts, complete the instruction KVM's emulator gave up
    /// on; anything else ends the VM with the instruction named.
    fn internal_error(&mut self) -> Option<GuestExit> {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let id = self.id;
        let fail =
            |detail: String| Some(GuestExit::Error(format!("vCPU {id}: KVM internal error: {detail}")));
        if suberror != INTERNAL_ERROR_EMULATION {
            return fail(format!("suberror {suberror}"));
        }
        let (mut regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => {
                return fail(format!("emulation failure, and reading registers failed: {e}"))
            }
        };
        let mode = pvm::Mode {
            long: sregs.efer & 0x400 != 0 && sregs.cs.l == 1,
            fs_base: sregs.fs.base,
            gs_base: sregs.gs.base,
        };
        let rip_linear = if mode.long { regs.rip } else { sregs.cs.base.wrapping_add(regs.rip) };
        let mut access = PvmVcpu { fd: &self.fd, mem: &self.mem };
        let bytes = access.fetch(rip_linear);
        let Some(counters) = self.pvm.clone() else {
            return fail(format!(
                "instruction {} at RIP {:#x} could not be emulated",
                pvm::HexBytes(bytes),
                regs.rip
            ));
        };
        let result = pvm::decode(&bytes, &mode, &regs).and_then(|insn| {
            pvm::complete(&insn, &mut regs, &mut access)?;
            Ok(insn.kind)
        });
        match result {
            Ok(kind) => {
                if let Err(e) = self.fd.set_regs(&regs) {
                    return fail(format!("completing {}: setting registers: {e}", kind.name()));
                }
                if counters.record(kind) {
                    eprintln!(
                        "[stratus] PVM: completing `{}` in the VMM (KVM cannot emulate it here; logged once)",
                        kind.name()
                    );
                }
                None
            }
            Err(e) => fail(e.to_string()),
        }
    }
}

/// The architectural state of one vCPU, as a snapshot keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// The vCPU's id (its APIC id).
    pub id: u32,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_bindings::kvm_mp_state,
    /// General registers.
    pub regs: kvm_bindings::kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_bindings::kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_bindings::kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_bindings::kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_bindings::kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_bindings::kvm_lapic_state,
    /// Model-specific registers, (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_bindings::kvm_vcpu_events,
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// The vCPU seen by the PVM completion code.
struct PvmVcpu<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestRam,
}

impl PvmVcpu<'_> {
    /// The guest-physical address of a linear address, through the guest's page tables.
    fn translate(&self, linear: u64) -> Result<u64, pvm::PvmError> {
        match self.fd.translate_gva(linear) {
            Ok(t) if t.valid != 0 => Ok(t.physical_address),
            _ => Err(pvm::PvmError::Memory(linear)),
        }
    }

    /// Walks `len` bytes from linear `addr` one guest page at a time, handing `access` each
    /// piece's guest-physical address and its range within the caller's buffer.
    fn for_each_page(
        &self,
        addr: u64,
        len: usize,
        mut access: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> Result<(), pvm::PvmError> {
        let mut done = 0;
        while done < len {
            let linear = addr.wrapping_add(done as u64);
            let gpa = self.translate(linear)?;
            let n = ((4096 - (linear & 0xfff)) as usize).min(len - done);
            if !access(gpa, done..done + n) {
                return Err(pvm::PvmError::Memory(linear));
            }
            done += n;
        }
        Ok(())
    }

    /// Up to 15 instruction bytes at `addr`, fewer if a page is not mapped.
    fn fetch(&mut self, addr: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(15);
        let mut byte = [0u8; 1];
        for i in 0..15 {
            if pvm::VcpuAccess::read_linear(self, addr.wrapping_add(i), &mut byte).is_err() {
                break;
            }
            out.push(byte[0]);
        }
        out
    }
}

impl pvm::VcpuAccess for PvmVcpu<'_> {
    fn read_linear(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), pvm::PvmError> {
        let mem = self.mem;
        self.for_each_page(addr, buf.len(), |gpa, range| {
            mem.read_slice(&mut buf[range], GuestAddress(gpa)).is_ok()
        })
    }

    fn write_linear(&mut self, addr: u64, data: &[u8]) -> Result<(), pvm::PvmError> {
        let mem = self.mem;
        self.for_each_page(addr, data.len(), |gpa, range| {
            mem.write_slice(&data[range], GuestAddress(gpa)).is_ok()
        })
    }

    // MXCSR goes through the XSAVE area: on this kernel KVM_GET_FPU/KVM_SET_FPU ignore the
    // mxcsr field (seen on kvm_pvm).
    fn mxcsr(&mut self) -> Result<u32, pvm::PvmError> {
        let xsave = self.fd.get_xsave().map_err(|e| pvm::PvmError::Kvm(e.to_string()))?;
        Ok(xsave.region[XSAVE_MXCSR_INDEX])
    }

    fn set_mxcsr(&mut self, value: u32) -> Result<(), pvm::PvmError> {
        let mut xsave = self.fd.get_xsave().map_err(|e| pvm::PvmError::Kvm(e.to_string()))?;
        xsave.region[XSAVE_MXCSR_INDEX] = value;
        // KVM copies MXCSR in only when the header says SSE state is present; when the guest's
        // SSE registers are in their init state the bit is clear (their saved image is zeros,
        // which is what setting it loads).
        xsave.region[XSAVE_XSTATE_BV_INDEX] |= XFEATURE_SSE;
        // SAFETY: the area was read from this vCPU by KVM_GET_XSAVE; only MXCSR and the SSE
        // present bit changed.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(|e| pvm::PvmError::Kvm(e.to_string()))
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), pvm::PvmError> {
        let mut events = self.fd.get_vcpu_events().map_err(|e| pvm::PvmError::Kvm(e.to_string()))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        self.fd.set_vcpu_events(&events).map_err(|e| pvm::PvmError::Kvm(e.to_string()))
    }
}
