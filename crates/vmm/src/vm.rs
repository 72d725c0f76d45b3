//! Building a VM from its configuration: KVM VM and memory, interrupt controllers, platform
//! devices on their buses, the kernel loaded, vCPUs at the entry point — then running it.

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use stratus_arch::acpi::VirtioMmioDevice;
use stratus_arch::layout::*;
use stratus_devices::acpi_pm::AcpiPowerManagement;
use stratus_devices::bus::lock;
use stratus_devices::ged::Ged;
use stratus_devices::i8042::I8042;
use stratus_devices::pvpanic::PvPanic;
use stratus_devices::serial::Serial;
use stratus_devices::{Bus, ExitSignal};
use stratus_virtio::balloon::{Balloon, BalloonControl};
use stratus_virtio::block::Block;
use stratus_virtio::mmio::MmioTransport;
use stratus_virtio::net::{Announcer, Net};
use stratus_virtio::rate_limiter::{RateLimit, SharedLimiter};
use stratus_virtio::rng::Rng;
use stratus_virtio::tap::Tap;
use stratus_virtio::vsock::Vsock;
use stratus_virtio::GuestRam;
use stratus_virtio::{Interrupt, VirtioDevice};
pub use stratus_vmm_api::VsockConfig;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::control::RunControl;
use crate::kvm::{KvmError, KvmFlavor};
use crate::kvm_stats::KvmStats;
use crate::loader::{BootSource, LoadError};
use crate::memory::MemoryError;
use crate::pvm;
use crate::snapshot::memory::DirtyPages;
use crate::snapshot::{MachineState, MemoryKind, SnapshotError, VmState};
use crate::vcpu::{ExitCounters, Vcpu, VcpuError};

/// The most vCPUs a VM may have (8-bit xAPIC ids in the MADT, and a sane bound).
pub const MAX_VCPUS: u32 = 64;

/// A disk given to the guest as a virtio block device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The raw disk image file.
    pub path: std::path::PathBuf,
    /// Refuse guest writes.
    pub readonly: bool,
    /// Bandwidth and operation limits.
    pub rate_limit: RateLimit,
}

/// What a VM is made of.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM in bytes.
    pub memory: u64,
    /// Kernel, initrd, command line.
    pub boot: BootSource,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Network cards, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// Whether the guest gets a virtio entropy device.
    pub rng: bool,
    /// A vsock device: the guest's address and the host-side Unix socket.
    pub vsock: Option<VsockConfig>,
    /// A memory balloon.
    pub balloon: Option<BalloonConfig>,
}

/// A virtio-balloon device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// How much memory the guest should give back at first, in MiB.
    pub target_mib: u64,
    /// Let the guest take memory back from the balloon when it runs out.
    #[serde(default)]
    pub deflate_on_oom: bool,
}

/// A network card on a host tap device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The existing tap interface.
    pub tap: String,
    /// The card's address; a random 52:54:00 one when absent.
    pub mac: Option<stratus_virtio::net::Mac>,
    /// Bandwidth and frame limits, each way.
    pub rate_limit: RateLimit,
}

/// The most virtio devices a VM may have: one IOAPIC pin each from GSI 5 to 22 (23 is the
/// Generic Event Device's).
pub const MAX_VIRTIO_DEVICES: usize = (GED_IRQ - VIRTIO_IRQ_BASE) as usize;

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM could not be opened.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or boot data could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A VM-level KVM call failed.
    #[error("{what}: {source}")]
    KvmCall {
        /// What was being done.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// An eventfd or thread could not be created.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The vCPU count is out of range.
    #[error("--cpus {0}: a VM has between 1 and {MAX_VCPUS} vCPUs")]
    VcpuCount(u32),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] stratus_virtio::block::BlockError),
    /// A tap device could not be used.
    #[error(transparent)]
    Tap(#[from] stratus_virtio::tap::TapError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] stratus_virtio::vsock::VsockError),
    /// A virtio transport could not be set up.
    #[error(transparent)]
    Virtio(#[from] stratus_virtio::mmio::MmioError),
    /// A snapshot's files could not be used.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A snapshot does not fit this VM, or the VM is not in a state to be saved.
    #[error("{0}")]
    Restore(String),
    /// The configuration cannot work.
    #[error("{0}")]
    BadConfig(String),
    /// Too many devices.
    #[error("{0} virtio devices: a VM has at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// Where a new VM's memory and state come from.
pub enum Launch<'a> {
    /// Fresh memory, the kernel loaded, vCPU 0 at its entry point.
    Boot,
    /// A snapshot: its state, its full memory file and the diff files laid over it, in order.
    Restore {
        /// The saved state (its configuration is ignored: the one passed to `create` rules,
        /// which lets a clone change taps, MACs and its vsock CID).
        state: &'a VmState,
        /// The full memory file.
        memory: &'a Path,
        /// Diff memory files, oldest first.
        diffs: &'a [&'a Path],
    },
}

/// A VM: built by `create`, running after `run`, pausable, and saved by `save_state` when
/// paused.
pub struct Vm {
    /// Raised once when the guest stops, with the reason.
    pub exit: Arc<ExitSignal>,
    /// The console UART, for feeding it input.
    pub serial: Arc<Mutex<Serial>>,
    /// PVM completions, when the profile is on.
    pub pvm: Option<Arc<pvm::Counters>>,
    ged: Arc<Mutex<Ged>>,
    handles: DeviceHandles,
    config: VmConfig,
    vm: VmFd,
    mem: GuestRam,
    slots: Vec<kvm_userspace_memory_region>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    exits: Vec<Arc<ExitCounters>>,
    kvm_stats: Vec<Option<Arc<KvmStats>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    control: Arc<RunControl>,
    vcpu_threads: Vec<JoinHandle<()>>,
    device_thread: Option<crate::event_loop::DeviceThread>,
    /// MSRs worth saving, found at the first save (`savable_msrs`).
    savable_msrs: Mutex<Option<Vec<u32>>>,
    /// Guest run time before this process (a restored VM).
    uptime_before: Duration,
    started: Option<Instant>,
    generation_id: [u8; 16],
    dirty_tracking: bool,
    /// Built from a snapshot or a migration rather than booted.
    restored: bool,
    /// A restore (not a migration): the guest is told it is a new generation.
    new_generation: bool,
}

/// The name `stratus vm run` knows a started VM by.
pub type RunningVm = Vm;

/// Where virtio device `index` lives: its MMIO window and its GSI.
fn virtio_slot(index: usize) -> VirtioMmioDevice {
    VirtioMmioDevice {
        base: VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_BASE + index as u32,
    }
}

/// The virtio devices behind their transports, in slot order.
pub type Transports = Vec<Arc<Mutex<MmioTransport>>>;

/// The host's handles on devices whose behaviour changes while the VM runs.
#[derive(Default)]
pub struct DeviceHandles {
    /// Each disk's limiter, in disk order.
    pub disk_limiters: Vec<SharedLimiter>,
    /// Each network card's receive and transmit limiters, in card order.
    pub net_limiters: Vec<[SharedLimiter; 2]>,
    /// The balloon, if configured.
    pub balloon: Option<Arc<BalloonControl>>,
    /// What announces each network card where the VM runs now (after a migration).
    pub net_announcers: Vec<Announcer>,
    /// Each disk's lock, in disk order (a migration hands them over).
    pub disk_locks: Vec<stratus_virtio::block::DiskLock>,
    /// Each disk's write log, in disk order (a migration that copies disks reads it).
    pub disk_logs: Vec<Arc<stratus_virtio::block::WriteLog>>,
}

fn set_limit(limiter: &SharedLimiter, limit: RateLimit) {
    lock(limiter).set(limit);
}

/// Creates the configured virtio devices behind their transports, with interrupts (irqfd) and
/// queue notifications (ioeventfd) wired into KVM.
fn virtio_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestRam,
    disks: Disks,
) -> Result<(Transports, DeviceHandles), VmError> {
    let os = |what| move |source| VmError::Os { what, source };
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut handles = DeviceHandles::default();
    for disk in &config.disks {
        let block = match disks {
            Disks::Locked => Block::open(&disk.path, disk.readonly)?,
            Disks::LockedAtFinish => Block::open_unlocked(&disk.path, disk.readonly)?,
        };
        handles.disk_locks.push(block.lock_handle().map_err(os("opening a disk twice"))?);
        handles.disk_logs.push(block.write_log());
        set_limit(&block.limiter(), disk.rate_limit);
        handles.disk_limiters.push(block.limiter());
        devices.push(Box::new(block));
    }
    for net in &config.nets {
        let tap = Tap::open(&net.tap)?;
        let card = Net::new(tap, net.mac.unwrap_or_else(stratus_virtio::net::random_mac))
            .map_err(os("creating a network card's rate limiters"))?;
        let limiters = card.limiters();
        for l in &limiters {
            set_limit(l, net.rate_limit);
        }
        handles.net_limiters.push(limiters);
        handles.net_announcers.push(card.announcer().map_err(os("opening a network card's tap twice"))?);
        devices.push(Box::new(card));
    }
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        devices.push(Box::new(Vsock::new(vsock.cid, &vsock.socket)?));
    }
    if let Some(balloon) = &config.balloon {
        let pages = balloon_pages(balloon.target_mib, config.memory)?;
        let (device, control) =
            Balloon::new(pages, balloon.deflate_on_oom).map_err(os("creating the balloon"))?;
        handles.balloon = Some(control);
        devices.push(Box::new(device));
    }
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices(devices.len()));
    }
    let mut transports = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let slot = virtio_slot(index);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating an eventfd"))?;
        vm.register_irqfd(&irqfd, slot.irq).map_err(kvm_call("wiring a virtio interrupt"))?;
        let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(slot.base + stratus_virtio::mmio::reg::QUEUE_NOTIFY);
            vm.register_ioevent(evt, &notify, queue as u32)
                .map_err(kvm_call("wiring a virtio queue notification"))?;
        }
        transports.push(Arc::new(Mutex::new(transport)));
    }
    Ok((transports, handles))
}

/// A balloon target in 4 KiB pages, refused when it is more than the guest has.
pub fn balloon_pages(target_mib: u64, memory: u64) -> Result<u32, VmError> {
    if target_mib.saturating_mul(1 << 20) > memory {
        return Err(VmError::BadConfig(format!(
            "balloon target {target_mib} MiB is more than the guest's {} MiB",
            memory >> 20
        )));
    }
    Ok((target_mib * 256) as u32)
}

/// Builds the VM described by `config` and starts its vCPUs; guest serial output goes to
/// `console_out`.
pub fn start(config: &VmConfig, console_out: Box<dyn Write + Send>) -> Result<Vm, VmError> {
    let mut vm = create(config, console_out, Launch::Boot)?;
    vm.run(false)?;
    Ok(vm)
}

fn register_memory(
    vm: &VmFd,
    mem: &GuestRam,
    flags: u32,
) -> Result<Vec<kvm_userspace_memory_region>, VmError> {
    let mut slots = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which the `Vm` keeps alive as long as the VM.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_call("registering guest memory"))?;
        slots.push(region_desc);
    }
    Ok(slots)
}

/// Builds the VM described by `config`, booting or restoring as `launch` says; nothing runs
/// until `Vm::run`. Guest serial output goes to `console_out`.
pub fn create(config: &VmConfig, console_out: Box<dyn Write + Send>, launch: Launch) -> Result<Vm, VmError> {
    let (mem, start) = match launch {
        Launch::Boot => (crate::memory::create(config.memory)?, Start::Boot),
        Launch::Restore { state, memory, diffs } => {
            check_fits(state, config)?;
            let ranges = stratus_arch::memory_map::ram_regions(config.memory);
            (crate::snapshot::memory::map(&ranges, memory, diffs)?, Start::Restore(state))
        }
    };
    build(config, console_out, mem, Disks::Locked)?.finish(start)
}

/// Refuses a saved VM whose size differs from `config`'s.
fn check_fits(state: &VmState, config: &VmConfig) -> Result<(), VmError> {
    if state.config.memory != config.memory || state.config.vcpus != config.vcpus {
        return Err(VmError::Restore(format!(
            "the saved VM has {} vCPUs and {} MiB; it cannot be restored as {} vCPUs and {} MiB",
            state.config.vcpus,
            state.config.memory >> 20,
            config.vcpus,
            config.memory >> 20
        )));
    }
    Ok(())
}

/// When a VM's disks are locked (see `stratus_virtio::block::DiskLock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disks {
    /// At once, as they are opened.
    Locked,
    /// In `Shell::finish`: a migration's source holds them until the guest is paused there.
    LockedAtFinish,
}

/// What a built VM starts from (see `Shell::finish`).
pub enum Start<'a> {
    /// The kernel loaded, vCPU 0 at its entry point.
    Boot,
    /// A snapshot's state: the guest is told it is a new generation (a clone).
    Restore(&'a VmState),
    /// A live migration's state: the same VM goes on (its generation id stays).
    Arrive(&'a VmState),
}

/// A VM with its KVM objects, memory, devices and vCPUs but no state yet: the first half of
/// `create`. A migration's destination builds it when the source says what is coming, so
/// that a configuration this host cannot give (a missing tap or disk) is refused before any
/// page moves, and the guest's pause covers only `finish`.
pub struct Shell {
    config: VmConfig,
    vm: VmFd,
    mem: GuestRam,
    slots: Vec<kvm_userspace_memory_region>,
    transports: Transports,
    handles: DeviceHandles,
    acpi_devices: Vec<VirtioMmioDevice>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<Serial>>,
    ged: Arc<Mutex<Ged>>,
    vcpus: Vec<Vcpu>,
    pvm: Option<Arc<pvm::Counters>>,
    disks: Disks,
}

/// Builds the VM of `config` on `mem` up to its state (see `Shell`).
pub fn build(
    config: &VmConfig,
    console_out: Box<dyn Write + Send>,
    mem: GuestRam,
    disks: Disks,
) -> Result<Shell, VmError> {
    // A card given no address gets one now, kept in the VM's configuration: its snapshots and
    // migrations carry the address the guest knows the card by.
    let mut config = config.clone();
    for net in &mut config.nets {
        net.mac.get_or_insert_with(stratus_virtio::net::random_mac);
    }
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(config.vcpus));
    }
    let kvm = crate::kvm::open()?;
    let flavor = KvmFlavor::detect();
    let vm = kvm.create_vm().map_err(kvm_call("creating the VM"))?;
    let slots = register_memory(&vm, &mem, 0)?;
    vm.set_tss_address(0xfffb_d000).map_err(kvm_call("setting the TSS address"))?;
    vm.create_irq_chip().map_err(kvm_call("creating the interrupt controllers"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_call("creating the PIT"))?;

    let (transports, handles) = virtio_devices(&config, &vm, &mem, disks)?;
    let acpi_devices: Vec<VirtioMmioDevice> = (0..transports.len()).map(virtio_slot).collect();

    let exit = Arc::new(
        ExitSignal::new().map_err(|source| VmError::Os { what: "creating the exit event", source })?,
    );
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|source| VmError::Os { what: "creating an eventfd", source })?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_call("wiring the serial interrupt"))?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console_out)));
    let mut pio = Bus::new();
    let bus_err = |e| VmError::Os { what: "placing a device", source: std::io::Error::other(e) };
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8).map_err(bus_err)?;
    pio.insert(Arc::new(Mutex::new(I8042::new(exit.clone()))), u64::from(I8042_DATA_PORT), 5)
        .map_err(bus_err)?;
    let pm = AcpiPowerManagement::new(exit.clone(), ACPI_S5_SLEEP_TYPE, ACPI_RESET_VALUE);
    pio.insert(Arc::new(Mutex::new(pm)), u64::from(ACPI_SLEEP_CONTROL_PORT), 3).map_err(bus_err)?;
    pio.insert(Arc::new(Mutex::new(PvPanic::new(exit.clone()))), u64::from(PVPANIC_PORT), 1)
        .map_err(bus_err)?;
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|source| VmError::Os { what: "creating an eventfd", source })?;
    vm.register_irqfd(&ged_irq, GED_IRQ).map_err(kvm_call("wiring the GED interrupt"))?;
    let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
    pio.insert(ged.clone(), u64::from(GED_PORT), 1).map_err(bus_err)?;
    let pio = Arc::new(pio);
    let mut mmio = Bus::new();
    for (slot, transport) in acpi_devices.iter().zip(&transports) {
        mmio.insert(transport.clone(), slot.base, slot.size).map_err(bus_err)?;
    }
    let mmio = Arc::new(mmio);

    let pvm_counters = (flavor == KvmFlavor::Pvm).then(|| Arc::new(pvm::Counters::default()));
    let cpuid =
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_call("reading supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::new(
            &vm,
            id,
            &cpuid,
            config.vcpus,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
            mem.clone(),
            pvm_counters.clone(),
        )?);
    }
    Ok(Shell {
        config,
        vm,
        mem,
        slots,
        transports,
        handles,
        acpi_devices,
        exit,
        serial,
        ged,
        vcpus,
        pvm: pvm_counters,
        disks,
    })
}

impl Shell {
    /// The second half of `create`: the VM takes its state (or its kernel) and is ready to run.
    pub fn finish(self, start: Start) -> Result<Vm, VmError> {
        let Shell {
            config,
            vm,
            mem,
            slots,
            transports,
            handles,
            acpi_devices,
            exit,
            serial,
            ged,
            vcpus,
            pvm,
            disks,
        } = self;
        if disks == Disks::LockedAtFinish {
            for lock in &handles.disk_locks {
                lock.acquire()?;
            }
        }
        let mut uptime_before = Duration::ZERO;
        let generation_id;
        let (restored, new_generation) = match start {
            Start::Boot => {
                let entry = crate::loader::load(&mem, &config.boot, config.vcpus, &acpi_devices)?;
                vcpus[0].set_boot_state(entry)?;
                generation_id = random_id();
                mem.write_slice(&generation_id, vm_memory::GuestAddress(VMGENID_ADDR))
                    .map_err(|e| VmError::Restore(format!("writing the VM generation id: {e}")))?;
                (false, false)
            }
            Start::Restore(state) | Start::Arrive(state) => {
                check_fits(state, &config)?;
                lock(&serial)
                    .restore(&state.serial)
                    .map_err(|source| VmError::Os { what: "restoring the serial port", source })?;
                restore_machine(&vm, &state.machine)?;
                if state.vcpus.len() != vcpus.len() {
                    return Err(VmError::Restore(format!(
                        "{} vCPU states for {} vCPUs",
                        state.vcpus.len(),
                        vcpus.len()
                    )));
                }
                for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
                    vcpu.restore_state(saved)?;
                }
                if state.devices.len() != transports.len() {
                    return Err(VmError::Restore(format!(
                        "the snapshot has {} virtio devices, the configuration {}",
                        state.devices.len(),
                        transports.len()
                    )));
                }
                for (slot, (transport, saved)) in transports.iter().zip(&state.devices).enumerate() {
                    lock(transport).restore(slot, saved)?;
                }
                uptime_before = Duration::from_millis(state.uptime_ms);
                generation_id = state.generation_id;
                (true, matches!(start, Start::Restore(_)))
            }
        };
        let exits = vcpus.iter().map(|v| v.exits.clone()).collect();
        let kvm_stats = vcpus.iter().map(|v| v.kvm_stats.clone()).collect();
        Ok(Vm {
            exit,
            serial,
            pvm,
            ged,
            handles,
            config,
            vm,
            mem,
            slots,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            exits,
            kvm_stats,
            transports,
            control: Arc::new(RunControl::default()),
            vcpu_threads: Vec::new(),
            device_thread: None,
            savable_msrs: Mutex::new(None),
            uptime_before,
            started: None,
            generation_id,
            dirty_tracking: false,
            restored,
            new_generation,
        })
    }
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // Not secret, only distinct: fall back on time and pid.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        id[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

fn restore_machine(vm: &VmFd, machine: &MachineState) -> Result<(), VmError> {
    vm.set_pit2(&machine.pit).map_err(kvm_call("restoring the PIT"))?;
    let mut clock = machine.clock;
    // Only the time itself is settable; the flags describe the source host.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm_call("restoring kvmclock"))?;
    if machine.irqchips.len() != 3 {
        return Err(VmError::Restore(format!(
            "{} interrupt controller states, 3 expected",
            machine.irqchips.len()
        )));
    }
    for (chip, expected) in
        machine.irqchips.iter().zip([IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC])
    {
        if chip.chip_id != expected {
            return Err(VmError::Restore(format!(
                "interrupt controller {} saved where {expected} belongs",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(kvm_call("restoring an interrupt controller"))?;
    }
    Ok(())
}

impl Vm {
    /// Starts the vCPU threads and the device thread; with `paused`, they park before the
    /// guest runs an instruction, and `resume` lets them go.
    pub fn run(&mut self, paused: bool) -> Result<(), VmError> {
        if paused {
            self.control.request_pause();
        }
        crate::control::install_kick_handler()
            .map_err(|source| VmError::Os { what: "installing the vCPU kick signal", source })?;
        self.device_thread = crate::event_loop::spawn(self.transports.clone(), self.control.clone())
            .map_err(|source| VmError::Os { what: "starting the device event loop", source })?;
        for vcpu in &self.vcpus {
            let id = lock(vcpu).id();
            let (vcpu, control) = (vcpu.clone(), self.control.clone());
            // Joined before it starts (a pause must wait for it), left again if it cannot.
            self.control.join();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .stack_size(128 << 10)
                .spawn(move || Vcpu::run_thread(vcpu, control));
            match spawned {
                Ok(handle) => self.vcpu_threads.push(handle),
                Err(source) => {
                    self.control.leave();
                    return Err(VmError::Os { what: "starting a vCPU thread", source });
                }
            }
        }
        if self.restored {
            for transport in &self.transports {
                lock(transport).restored();
            }
        }
        if self.new_generation {
            // A restored VM is a new generation: its RNG must not repeat what the snapshot's
            // other restores produce.
            self.generation_id = random_id();
            self.mem
                .write_slice(&self.generation_id, vm_memory::GuestAddress(VMGENID_ADDR))
                .map_err(|e| VmError::Restore(format!("writing the VM generation id: {e}")))?;
            lock(&self.ged).raise(GED_EVENT_GENERATION);
        }
        self.started = Some(Instant::now());
        if paused {
            self.pause();
        }
        Ok(())
    }

    /// Presses the ACPI power button: a guest that listens powers itself off.
    pub fn press_power_button(&self) {
        lock(&self.ged).raise(GED_EVENT_POWER_BUTTON);
    }

    /// Stops every vCPU and the device thread at a safe point; returns when all have.
    pub fn pause(&self) {
        let kick = || {
            for handle in &self.vcpu_threads {
                // SAFETY: the thread handle is neither joined nor detached, so its pthread_t is
                // valid; the kick signal's handler does nothing.
                unsafe { libc::pthread_kill(handle.as_pthread_t(), crate::control::kick_signal()) };
            }
            if let Some(device) = &self.device_thread {
                device.wake();
            }
        };
        self.control.pause(kick);
        for vcpu in &self.vcpus {
            lock(vcpu).notify_paused();
        }
    }

    /// Lets a paused VM go on.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// How long the guest has existed (across snapshots), paused time included.
    pub fn uptime(&self) -> Duration {
        self.uptime_before + self.started.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// Exit counters per vCPU.
    pub fn exit_counters(&self) -> &[Arc<ExitCounters>] {
        &self.exits
    }

    /// Rate limiters and the balloon.
    pub fn handles(&self) -> &DeviceHandles {
        &self.handles
    }

    /// Puts the disks' writes on stable storage and lets go of their locks: a paused VM hands
    /// its disks to a migration's destination.
    pub fn release_disks(&self) -> Result<(), VmError> {
        for lock in &self.handles.disk_locks {
            lock.release().map_err(|source| VmError::Os { what: "handing a disk over", source })?;
        }
        Ok(())
    }

    /// Takes the disks' locks back after `release_disks` (the migration failed). Fails when
    /// another process took one meanwhile: the guest may be running there.
    pub fn reacquire_disks(&self) -> Result<(), VmError> {
        for lock in &self.handles.disk_locks {
            lock.acquire()?;
        }
        Ok(())
    }

    /// Tells the network where the VM's cards are now (after a migration brought it here):
    /// five RARP broadcasts from each, 50, 100, 100 and 100 ms apart as QEMU spaces them,
    /// from a thread of their own. Once per VM.
    pub fn announce(&mut self) {
        let mut announcers = std::mem::take(&mut self.handles.net_announcers);
        if announcers.is_empty() {
            return;
        }
        let _ = std::thread::Builder::new().name("announce".into()).spawn(move || {
            for pause in [0, 50, 100, 100, 100] {
                std::thread::sleep(Duration::from_millis(pause));
                for announcer in &mut announcers {
                    if let Err(e) = announcer.announce() {
                        eprintln!("[stratus] announcing a network card after migration: {e}");
                    }
                }
            }
        });
    }

    /// KVM's own counters per vCPU (absent on hosts without binary stats).
    pub fn kvm_stats(&self) -> &[Option<Arc<KvmStats>>] {
        &self.kvm_stats
    }

    /// The virtio devices in slot order.
    pub fn devices(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// The whole state of a paused VM (everything but memory).
    pub fn save_state(&self, memory: MemoryKind) -> Result<VmState, VmError> {
        if !self.is_paused() {
            return Err(VmError::Restore("the VM must be paused to be saved".into()));
        }
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC] {
            let mut chip = kvm_bindings::kvm_irqchip { chip_id, ..Default::default() };
            self.vm.get_irqchip(&mut chip).map_err(kvm_call("reading an interrupt controller"))?;
            irqchips.push(chip);
        }
        let machine = MachineState {
            irqchips,
            pit: self.vm.get_pit2().map_err(kvm_call("reading the PIT"))?,
            clock: self.vm.get_clock().map_err(kvm_call("reading kvmclock"))?,
        };
        let msrs = self.savable_msrs()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            vcpus.push(lock(vcpu).save_state(&msrs)?);
        }
        Ok(VmState {
            config: self.config.clone(),
            uptime_ms: self.uptime().as_millis() as u64,
            machine,
            vcpus,
            serial: lock(&self.serial).state(),
            devices: self.transports.iter().map(|t| lock(t).state()).collect(),
            memory,
            generation_id: self.generation_id,
        })
    }

    /// The MSRs worth saving, learnt at the first save.
    fn savable_msrs(&self) -> Result<Vec<u32>, VmError> {
        let mut cached = lock(&self.savable_msrs);
        if cached.is_none() {
            let kvm = crate::kvm::open()?;
            let list = kvm.get_msr_index_list().map_err(kvm_call("listing MSRs"))?;
            *cached = Some(lock(&self.vcpus[0]).savable_msrs(list.as_slice()));
        }
        Ok(cached.clone().unwrap_or_default())
    }

    /// Starts logging the pages the guest (KVM's dirty log) and the VMM's devices (the
    /// memory bitmap) write; `take_dirty_pages` then returns them.
    pub fn start_dirty_tracking(&mut self) -> Result<(), VmError> {
        if !self.dirty_tracking {
            for slot in &mut self.slots {
                slot.flags |= KVM_MEM_LOG_DIRTY_PAGES;
                // SAFETY: the same mapping as registered before, only the flags change.
                unsafe { self.vm.set_user_memory_region(*slot) }
                    .map_err(kvm_call("turning on dirty page logging"))?;
            }
            self.dirty_tracking = true;
        }
        self.take_dirty_pages()?;
        Ok(())
    }

    /// The pages written since tracking started or since the last call, which resets them.
    pub fn take_dirty_pages(&self) -> Result<DirtyPages, VmError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (slot, region) in self.slots.iter().zip(self.mem.iter()) {
            let mut bits = self
                .vm
                .get_dirty_log(slot.slot, slot.memory_size as usize)
                .map_err(kvm_call("reading the dirty page log"))?;
            let vmm_bits = (**region).bitmap().get_and_reset();
            for (b, v) in bits.iter_mut().zip(vmm_bits) {
                *b |= v;
            }
            out.push(bits);
        }
        Ok(out)
    }
}
