//! Building a VM from its configuration: KVM VM and memory, interrupt controllers, platform
//! devices on their buses, the kernel loaded, vCPUs at the entry point — then running it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use stratus_arch::acpi::VirtioMmioDevice;
use stratus_arch::layout::*;
use stratus_devices::acpi_pm::AcpiPowerManagement;
use stratus_devices::i8042::I8042;
use stratus_devices::pvpanic::PvPanic;
use stratus_devices::serial::Serial;
use stratus_devices::{Bus, ExitSignal};
use stratus_virtio::block::Block;
use stratus_virtio::mmio::MmioTransport;
use stratus_virtio::net::Net;
use stratus_virtio::rng::Rng;
use stratus_virtio::tap::Tap;
use stratus_virtio::vsock::Vsock;
use stratus_virtio::{Interrupt, VirtioDevice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::{KvmError, KvmFlavor};
use crate::loader::{BootSource, LoadError};
use crate::memory::MemoryError;
use crate::pvm;
use crate::vcpu::{Vcpu, VcpuError};

/// The most vCPUs a VM may have (8-bit xAPIC ids in the MADT, and a sane bound).
pub const MAX_VCPUS: u32 = 64;

/// A disk given to the guest as a virtio block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw disk image file.
    pub path: std::path::PathBuf,
    /// Refuse guest writes.
    pub readonly: bool,
}

/// What a VM is made of.
#[derive(Clone, Debug)]
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
}

/// A virtio-vsock device whose host side is a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host programs connect here; guest connections to host port P go to `<socket>_P`.
    pub socket: std::path::PathBuf,
}

/// A network card on a host tap device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The existing tap interface.
    pub tap: String,
    /// The card's address; a random 52:54:00 one when absent.
    pub mac: Option<stratus_virtio::net::Mac>,
}

/// The most virtio devices a VM may have: one IOAPIC pin each from GSI 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

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
    /// Too many devices.
    #[error("{0} virtio devices: a VM has at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    /// Raised once when the guest stops, with the reason.
    pub exit: Arc<ExitSignal>,
    /// The console UART, for feeding it input.
    pub serial: Arc<Mutex<Serial>>,
    /// PVM completions, when the profile is on.
    pub pvm: Option<Arc<pvm::Counters>>,
    _vcpu_threads: Vec<JoinHandle<()>>,
    _event_loop: Option<JoinHandle<()>>,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
}

/// Where virtio device `index` lives: its MMIO window and its GSI.
fn virtio_slot(index: usize) -> VirtioMmioDevice {
    VirtioMmioDevice {
        base: VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        irq: VIRTIO_IRQ_BASE + index as u32,
    }
}

/// Creates the configured virtio devices behind their transports, with interrupts (irqfd) and
/// queue notifications (ioeventfd) wired into KVM.
fn virtio_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, VmError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for disk in &config.disks {
        devices.push(Box::new(Block::open(&disk.path, disk.readonly)?));
    }
    for net in &config.nets {
        let tap = Tap::open(&net.tap)?;
        devices.push(Box::new(Net::new(tap, net.mac.unwrap_or_else(stratus_virtio::net::random_mac))));
    }
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        devices.push(Box::new(Vsock::new(vsock.cid, &vsock.socket)?));
    }
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices(devices.len()));
    }
    let mut transports = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let slot = virtio_slot(index);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| VmError::Os { what: "creating an eventfd", source })?;
        vm.register_irqfd(&irqfd, slot.irq).map_err(kvm_call("wiring a virtio interrupt"))?;
        let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(slot.base + stratus_virtio::mmio::reg::QUEUE_NOTIFY);
            vm.register_ioevent(evt, &notify, queue as u32)
                .map_err(kvm_call("wiring a virtio queue notification"))?;
        }
        transports.push(Arc::new(Mutex::new(transport)));
    }
    Ok(transports)
}

/// Builds the VM described by `config` and starts its vCPUs; guest serial output goes to
/// `console_out`.
pub fn start(config: &VmConfig, console_out: Box<dyn Write + Send>) -> Result<RunningVm, VmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(config.vcpus));
    }
    let kvm = crate::kvm::open()?;
    let flavor = KvmFlavor::detect();
    let mem = crate::memory::create(config.memory)?;
    let vm = kvm.create_vm().map_err(kvm_call("creating the VM"))?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping belongs to `mem`, which `RunningVm` keeps alive as long as the VM.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_call("registering guest memory"))?;
    }
    vm.set_tss_address(0xfffb_d000).map_err(kvm_call("setting the TSS address"))?;
    vm.create_irq_chip().map_err(kvm_call("creating the interrupt controllers"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_call("creating the PIT"))?;

    let transports = virtio_devices(config, &vm, &mem)?;
    let acpi_devices: Vec<VirtioMmioDevice> = (0..transports.len()).map(virtio_slot).collect();
    let entry = crate::loader::load(&mem, &config.boot, config.vcpus, &acpi_devices)?;

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
    let pio = Arc::new(pio);
    let mut mmio = Bus::new();
    for (slot, transport) in acpi_devices.iter().zip(&transports) {
        mmio.insert(transport.clone(), slot.base, slot.size).map_err(bus_err)?;
    }
    let mmio = Arc::new(mmio);
    let event_loop = crate::event_loop::spawn(transports)
        .map_err(|source| VmError::Os { what: "starting the device event loop", source })?;

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
    vcpus[0].set_boot_state(entry)?;

    let mut threads = Vec::with_capacity(vcpus.len());
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(128 << 10)
            .spawn(move || vcpu.run())
            .map_err(|source| VmError::Os { what: "starting a vCPU thread", source })?;
        threads.push(handle);
    }
    Ok(RunningVm {
        exit,
        serial,
        pvm: pvm_counters,
        _vcpu_threads: threads,
        _event_loop: event_loop,
        _vm: vm,
        _mem: mem,
    })
}
