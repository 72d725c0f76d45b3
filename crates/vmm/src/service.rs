//! The VMM as a service: one VM's lifecycle behind operations an API (or the `stratus vm run`
//! command line) calls. Configuration is gathered before start; then start, pause, resume,
//! graceful shutdown, hard stop, snapshot, restore. Every refusal is an `ApiError` carrying
//! the HTTP status it maps to, and leaves the VM as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use stratus_devices::bus::lock;
pub use stratus_vmm_api::{Phase, RestoreReport, SnapshotReport, VmInfo};

use crate::console::{ConsoleConfig, ConsoleInput};
use crate::snapshot::{self, MemoryKind};
use crate::vm::{BalloonConfig, DiskConfig, Launch, NetConfig, Vm, VmConfig, VsockConfig};
use crate::{BootSource, RateLimit};

/// A kind of device with an id in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// A disk.
    Drive,
    /// A network card.
    Net,
}

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// Not possible in the VM's current state (409).
    #[error("{0}")]
    Conflict(String),
    /// No such thing (404).
    #[error("{0}")]
    NotFound(String),
    /// The operation failed on the host's side (500).
    #[error("{0}")]
    Failed(String),
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Conflict(_) => 409,
            ApiError::NotFound(_) => 404,
            ApiError::Failed(_) => 500,
        }
    }
}

/// A restore request.
#[derive(Debug, Default)]
pub struct RestoreRequest {
    /// The state file.
    pub state: PathBuf,
    /// The full memory file, then diffs in order.
    pub memory: Vec<PathBuf>,
    /// New network cards (same number as saved): taps and MACs of a clone.
    pub nets: Option<Vec<NetConfig>>,
    /// New disks (same number as saved): a clone's own copies of the saved VM's disks.
    pub disks: Option<Vec<DiskConfig>>,
    /// A new vsock device identity: CID and host socket of a clone.
    pub vsock: Option<VsockConfig>,
    /// Keep the VM paused after restore.
    pub paused: bool,
    /// Track the pages written from the restore on, so that a diff snapshot can follow.
    /// Costs some milliseconds per GiB at restore (KVM write-protects the memory), so it is
    /// asked for, not given.
    pub track_dirty_pages: bool,
}

/// The host-side identity a restored or arriving VM takes instead of the saved one: its own
/// taps and MACs, disks, vsock CID and socket.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// Network cards, one per saved card.
    pub nets: Option<Vec<NetConfig>>,
    /// Disks, one per saved disk.
    pub disks: Option<Vec<DiskConfig>>,
    /// The vsock device.
    pub vsock: Option<VsockConfig>,
}

impl Identity {
    /// `config` with this identity in place of the saved one.
    pub fn apply(self, mut config: VmConfig) -> Result<VmConfig, ApiError> {
        // A card given without an address keeps the saved one: the guest knows it by it.
        let nets = self.nets.map(|mut nets| {
            for (given, saved) in nets.iter_mut().zip(&config.nets) {
                given.mac = given.mac.or(saved.mac);
            }
            nets
        });
        replace_each("network cards", &mut config.nets, nets)?;
        replace_each("disks", &mut config.disks, self.disks)?;
        if let Some(vsock) = self.vsock {
            if config.vsock.is_none() {
                return Err(ApiError::BadRequest("the VM has no vsock device".into()));
            }
            config.vsock = Some(vsock);
        }
        Ok(config)
    }
}

/// Puts `given` in place of `saved`, one for one.
fn replace_each<T>(what: &str, saved: &mut Vec<T>, given: Option<Vec<T>>) -> Result<(), ApiError> {
    let Some(given) = given else { return Ok(()) };
    if given.len() != saved.len() {
        return Err(ApiError::BadRequest(format!(
            "the VM has {} {what}, {} given",
            saved.len(),
            given.len()
        )));
    }
    *saved = given;
    Ok(())
}

/// One VM and the configuration it is (or will be) built from.
pub struct Vmm {
    config: VmConfig,
    boot_set: bool,
    drive_ids: Vec<String>,
    net_ids: Vec<String>,
    console: ConsoleConfig,
    /// Where console input goes once the UART exists (the socket console's thread reads it).
    console_input: ConsoleInput,
    vm: Option<Vm>,
    /// Set when the API stopped the VM.
    stopped: Option<String>,
    /// A diff snapshot needs one before it, in this process.
    has_base_snapshot: bool,
    /// The last (or current) migration's progress.
    migration: Arc<crate::migration::Progress>,
    /// Pages a post-copy arrival has still to bring.
    arriving: Option<crate::migration::postcopy::Pending>,
}

fn conflict(what: &str, phase: Phase) -> ApiError {
    ApiError::Conflict(format!("cannot {what}: the VM is {}", phase_name(phase)))
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::NotStarted => "not started",
        Phase::Running => "running",
        Phase::Paused => "paused",
        Phase::Stopped => "stopped",
    }
}

impl Vmm {
    /// A VMM waiting for configuration, with its console going to `console`.
    pub fn new(console: ConsoleConfig) -> Self {
        Self {
            config: VmConfig {
                vcpus: 1,
                memory: 256 << 20,
                boot: BootSource { kernel: PathBuf::new(), initrd: None, cmdline: String::new() },
                disks: Vec::new(),
                nets: Vec::new(),
                rng: false,
                vsock: None,
                balloon: None,
            },
            boot_set: false,
            drive_ids: Vec::new(),
            net_ids: Vec::new(),
            console,
            console_input: Arc::default(),
            vm: None,
            stopped: None,
            has_base_snapshot: false,
            migration: Arc::default(),
            arriving: None,
        }
    }

    /// Refuses `what` while a post-copy arrival is still bringing guest memory: a snapshot or
    /// a further migration would take missing pages for zeros.
    fn memory_complete(&self, what: &str) -> Result<(), ApiError> {
        match self.arriving.as_ref().map(|p| p.pages()).filter(|&n| n > 0) {
            Some(n) => Err(ApiError::Conflict(format!(
                "cannot {what}: {n} pages of guest memory are still arriving by post-copy; try again when it completes"
            ))),
            None => Ok(()),
        }
    }

    /// The migration progress, readable without this VMM's lock (`GET /migration`).
    pub fn migration_progress(&self) -> Arc<crate::migration::Progress> {
        self.migration.clone()
    }

    /// A VMM configured with `config` in one go (the command line's way).
    pub fn with_config(config: VmConfig, console: ConsoleConfig) -> Self {
        let mut vmm = Self::new(console);
        vmm.take_config(config);
        vmm
    }

    /// Takes `config` whole (from the command line, a snapshot or a migration): devices get
    /// the guest's names as ids (vda.., eth0..).
    fn take_config(&mut self, config: VmConfig) {
        self.drive_ids = (0..config.disks.len()).map(disk_name).collect();
        self.net_ids = (0..config.nets.len()).map(|i| format!("eth{i}")).collect();
        self.config = config;
        self.boot_set = true;
    }

    /// Where the VM is in its life.
    pub fn phase(&self) -> Phase {
        match &self.vm {
            None => Phase::NotStarted,
            Some(vm) if self.stopped.is_some() || vm.exit.reason().is_some() => Phase::Stopped,
            Some(vm) if vm.is_paused() => Phase::Paused,
            Some(_) => Phase::Running,
        }
    }

    /// Where console input goes: the UART, once the VM exists.
    pub fn console_input(&self) -> ConsoleInput {
        self.console_input.clone()
    }

    /// The VM, once started.
    pub fn vm(&self) -> Option<&Vm> {
        self.vm.as_ref()
    }

    /// Why the VM stopped, once it has.
    pub fn exit_reason(&self) -> Option<String> {
        if let Some(reason) = &self.stopped {
            return Some(reason.clone());
        }
        self.vm.as_ref()?.exit.reason().map(|r| match r {
            crate::GuestExit::PowerOff => "guest powered off".to_owned(),
            crate::GuestExit::Reset(how) => format!("guest rebooted ({how})"),
            crate::GuestExit::Panic => "guest kernel panicked".to_owned(),
            crate::GuestExit::Error(e) => format!("error: {e}"),
        })
    }

    fn configurable(&self, what: &str) -> Result<(), ApiError> {
        match self.phase() {
            Phase::NotStarted => Ok(()),
            phase => Err(conflict(what, phase)),
        }
    }

    /// Sets vCPUs and memory.
    pub fn set_machine(&mut self, vcpus: u32, memory: u64) -> Result<(), ApiError> {
        self.configurable("change the machine")?;
        if vcpus == 0 || vcpus > crate::vm::MAX_VCPUS {
            return Err(ApiError::BadRequest(format!(
                "vcpus {vcpus}: a VM has between 1 and {} vCPUs",
                crate::vm::MAX_VCPUS
            )));
        }
        if memory < (2 << 20) {
            return Err(ApiError::BadRequest(format!(
                "memory {} MiB: a guest needs at least 2 MiB",
                memory >> 20
            )));
        }
        if let Some(host) = crate::memory::host_ram_bytes() {
            if memory > host {
                return Err(ApiError::BadRequest(format!(
                    "memory {} MiB is more than this host's {} MiB",
                    memory >> 20,
                    host >> 20
                )));
            }
        }
        self.config.vcpus = vcpus;
        self.config.memory = memory;
        Ok(())
    }

    /// Sets the kernel, initrd and command line.
    pub fn set_boot(&mut self, boot: BootSource) -> Result<(), ApiError> {
        self.configurable("change the boot source")?;
        for path in std::iter::once(&boot.kernel).chain(boot.initrd.as_ref()) {
            if !path.is_file() {
                return Err(ApiError::BadRequest(format!("{}: no such file", path.display())));
            }
        }
        self.config.boot = boot;
        self.boot_set = true;
        Ok(())
    }

    /// Adds or replaces the drive called `id`.
    pub fn put_drive(&mut self, id: &str, disk: DiskConfig) -> Result<(), ApiError> {
        self.configurable("change drives")?;
        if !disk.path.is_file() {
            return Err(ApiError::BadRequest(format!("{}: no such file", disk.path.display())));
        }
        match self.drive_ids.iter().position(|d| d == id) {
            Some(i) => self.config.disks[i] = disk,
            None => {
                self.drive_ids.push(id.to_owned());
                self.config.disks.push(disk);
            }
        }
        Ok(())
    }

    /// Adds or replaces the network card called `id`.
    pub fn put_net(&mut self, id: &str, net: NetConfig) -> Result<(), ApiError> {
        self.configurable("change network cards")?;
        if net.tap.is_empty() || net.tap.len() > 15 {
            return Err(ApiError::BadRequest(format!(
                "'{}' is not a tap device name (1 to 15 characters)",
                net.tap
            )));
        }
        match self.net_ids.iter().position(|n| n == id) {
            Some(i) => self.config.nets[i] = net,
            None => {
                self.net_ids.push(id.to_owned());
                self.config.nets.push(net);
            }
        }
        Ok(())
    }

    /// Sets (or removes) the vsock device.
    pub fn set_vsock(&mut self, vsock: Option<VsockConfig>) -> Result<(), ApiError> {
        self.configurable("change the vsock device")?;
        if let Some(v) = &vsock {
            if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                return Err(ApiError::BadRequest(format!(
                    "vsock cid {} is reserved or too large: use 3 to 2^32-1",
                    v.cid
                )));
            }
        }
        self.config.vsock = vsock;
        Ok(())
    }

    /// Adds or removes the entropy device.
    pub fn set_rng(&mut self, rng: bool) -> Result<(), ApiError> {
        self.configurable("change the entropy device")?;
        self.config.rng = rng;
        Ok(())
    }

    /// Changes a drive's or network card's rate limits, before start or while it runs.
    pub fn set_rate_limit(&mut self, kind: Device, id: &str, limit: RateLimit) -> Result<(), ApiError> {
        if limit.bytes_per_sec == Some(0) || limit.ops_per_sec == Some(0) {
            return Err(ApiError::BadRequest(
                "a rate of 0 would stop the device: leave the limit out instead".into(),
            ));
        }
        let (ids, what) = match kind {
            Device::Drive => (&self.drive_ids, "drive"),
            Device::Net => (&self.net_ids, "network card"),
        };
        let index = ids
            .iter()
            .position(|d| d == id)
            .ok_or_else(|| ApiError::NotFound(format!("no {what} '{id}'")))?;
        match kind {
            Device::Drive => self.config.disks[index].rate_limit = limit,
            Device::Net => self.config.nets[index].rate_limit = limit,
        }
        if let Some(vm) = &self.vm {
            let handles = vm.handles();
            match kind {
                Device::Drive => lock(&handles.disk_limiters[index]).set(limit),
                Device::Net => {
                    for l in &handles.net_limiters[index] {
                        lock(l).set(limit);
                    }
                }
            }
        }
        Ok(())
    }

    /// Configures the balloon before start, or sets its target while the VM runs.
    pub fn set_balloon(&mut self, target_mib: u64, deflate_on_oom: Option<bool>) -> Result<(), ApiError> {
        let pages = crate::vm::balloon_pages(target_mib, self.config.memory)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if self.phase() == Phase::NotStarted {
            self.config.balloon =
                Some(BalloonConfig { target_mib, deflate_on_oom: deflate_on_oom.unwrap_or(true) });
            return Ok(());
        }
        let vm = self.running_vm("change the balloon", &[Phase::Running, Phase::Paused])?;
        let Some(balloon) = &vm.handles().balloon else {
            return Err(ApiError::Conflict("this VM has no balloon (configure one before start)".into()));
        };
        if deflate_on_oom.is_some() {
            return Err(ApiError::Conflict("deflate_on_oom is fixed once the VM runs".into()));
        }
        balloon.set_target(pages);
        if let Some(b) = &mut self.config.balloon {
            b.target_mib = target_mib;
        }
        Ok(())
    }

    /// The balloon: target, what the guest gave, its memory statistics.
    pub fn balloon(&self) -> Result<serde_json::Value, ApiError> {
        let Some(config) = self.config.balloon else {
            return Err(ApiError::NotFound("this VM has no balloon".into()));
        };
        let Some(control) = self.vm.as_ref().and_then(|vm| vm.handles().balloon.clone()) else {
            return Ok(
                serde_json::json!({ "target_mib": config.target_mib, "actual_mib": null, "stats": null }),
            );
        };
        let stats = control.stats();
        Ok(serde_json::json!({
            "target_mib": control.target() as u64 / 256,
            "actual_mib": control.actual() as u64 / 256,
            "deflate_on_oom": config.deflate_on_oom,
            "stats": stats.values.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
            "stats_age_ms": stats.at.map(|t| t.elapsed().as_millis() as u64),
        }))
    }

    /// Sets where the console goes.
    pub fn set_console(&mut self, console: ConsoleConfig) -> Result<(), ApiError> {
        self.configurable("change the console")?;
        self.console = console;
        Ok(())
    }

    /// The configuration, as the API shows it.
    pub fn config_view(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "machine": { "vcpus": c.vcpus, "memory_mib": c.memory >> 20 },
            "boot": if self.boot_set { serde_json::json!({
                "kernel": c.boot.kernel, "initrd": c.boot.initrd, "cmdline": c.boot.cmdline,
            }) } else { serde_json::Value::Null },
            "drives": self.drive_ids.iter().zip(&c.disks).map(|(id, d)| serde_json::json!({
                "id": id, "path": d.path, "readonly": d.readonly, "rate_limit": d.rate_limit,
            })).collect::<Vec<_>>(),
            "nets": self.net_ids.iter().zip(&c.nets).map(|(id, n)| serde_json::json!({
                "id": id, "tap": n.tap, "mac": n.mac.map(|m| crate::format_mac(&m)), "rate_limit": n.rate_limit,
            })).collect::<Vec<_>>(),
            "vsock": c.vsock,
            "rng": c.rng,
            "balloon": c.balloon,
            "console": self.console,
        })
    }

    /// The configuration the VM is built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Name of drive `index`.
    pub fn drive_id(&self, index: usize) -> Option<&str> {
        self.drive_ids.get(index).map(String::as_str)
    }

    /// Name of network card `index`.
    pub fn net_id(&self, index: usize) -> Option<&str> {
        self.net_ids.get(index).map(String::as_str)
    }

    fn open_console(&self) -> Result<Box<dyn std::io::Write + Send>, ApiError> {
        crate::console::open(&self.console, self.console_input.clone())
            .map_err(|e| ApiError::Failed(format!("opening the console ({:?}): {e}", self.console)))
    }

    fn adopt(&mut self, vm: Vm) {
        self.console_input.fill(vm.serial.clone());
        self.vm = Some(vm);
    }

    /// Builds and boots the VM.
    pub fn start(&mut self) -> Result<(), ApiError> {
        self.configurable("start")?;
        if !self.boot_set {
            return Err(ApiError::Conflict("cannot start: no boot source (PUT /vm/boot first)".into()));
        }
        let mut config = self.config.clone();
        if crate::pvm::host_is_pvm() && !config.boot.cmdline.contains(crate::pvm::GUEST_CMDLINE) {
            config.boot.cmdline = format!("{} {}", config.boot.cmdline, crate::pvm::GUEST_CMDLINE);
        }
        let out = self.open_console()?;
        let mut vm =
            crate::vm::create(&config, out, Launch::Boot).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        vm.run(false).map_err(|e| ApiError::Failed(e.to_string()))?;
        self.config = config;
        self.adopt(vm);
        Ok(())
    }

    fn running_vm(&self, what: &str, allowed: &[Phase]) -> Result<&Vm, ApiError> {
        let phase = self.phase();
        match &self.vm {
            Some(vm) if allowed.contains(&phase) => Ok(vm),
            _ => Err(conflict(what, phase)),
        }
    }

    /// Pauses the VM (a paused VM stays paused).
    pub fn pause(&self) -> Result<(), ApiError> {
        self.running_vm("pause", &[Phase::Running, Phase::Paused])?.pause();
        Ok(())
    }

    /// Resumes a paused VM (a running VM keeps running).
    pub fn resume(&self) -> Result<(), ApiError> {
        self.running_vm("resume", &[Phase::Running, Phase::Paused])?.resume();
        Ok(())
    }

    /// Asks the guest to power itself off (the ACPI power button); it may take its time.
    pub fn shutdown(&self) -> Result<(), ApiError> {
        let vm = self.running_vm("shut down", &[Phase::Running])?;
        vm.press_power_button();
        Ok(())
    }

    /// Stops the VM at once: its vCPUs never run again.
    pub fn stop(&mut self) -> Result<(), ApiError> {
        let vm = self.running_vm("stop", &[Phase::Running, Phase::Paused])?;
        vm.pause();
        self.stopped = Some("stopped through the API".into());
        Ok(())
    }

    /// Saves the paused VM: state to `state`, memory to `memory` (all of it, or with `diff`
    /// only what changed since the previous snapshot of this process).
    pub fn snapshot(&mut self, state: &Path, memory: &Path, diff: bool) -> Result<SnapshotReport, ApiError> {
        let t = Instant::now();
        self.memory_complete("snapshot")?;
        let phase = self.phase();
        let Some(vm) = self.vm.as_mut().filter(|_| phase == Phase::Paused) else {
            return Err(if phase == Phase::Running {
                ApiError::Conflict("cannot snapshot a running VM: pause it first".into())
            } else {
                conflict("snapshot", phase)
            });
        };
        if diff && !self.has_base_snapshot {
            return Err(ApiError::Conflict(
                "a diff snapshot needs a full snapshot of this VM before it, or a restore with dirty page tracking (track_dirty_pages, --track-dirty)".into(),
            ));
        }
        let failed = |e: &dyn std::fmt::Display| ApiError::Failed(e.to_string());
        let kind = if diff { MemoryKind::Diff } else { MemoryKind::Full };
        let saved = vm.save_state(kind).map_err(|e| failed(&e))?;
        // Whatever fails from here on, the dirty log may have been taken: the next snapshot
        // must be a full one.
        self.has_base_snapshot = false;
        let memory_bytes = if diff {
            let dirty = vm.take_dirty_pages().map_err(|e| failed(&e))?;
            snapshot::memory::write_diff(vm.memory(), &dirty, memory).map_err(|e| failed(&e))?
        } else {
            let written = snapshot::memory::write_full(vm.memory(), memory).map_err(|e| failed(&e))?;
            // From here on, the pages written are what the next diff carries.
            vm.start_dirty_tracking().map_err(|e| failed(&e))?;
            written
        };
        snapshot::write_state(state, &saved).map_err(|e| failed(&e))?;
        self.has_base_snapshot = true;
        let state_bytes = std::fs::metadata(state).map(|m| m.len()).unwrap_or(0);
        Ok(SnapshotReport { kind, memory_bytes, state_bytes, duration_ms: t.elapsed().as_secs_f64() * 1e3 })
    }

    /// Builds the VM from a snapshot instead of booting it.
    pub fn restore(&mut self, request: RestoreRequest) -> Result<RestoreReport, ApiError> {
        let t = Instant::now();
        self.configurable("restore")?;
        let Some((full, diffs)) = request.memory.split_first() else {
            return Err(ApiError::BadRequest("restore needs a memory file".into()));
        };
        let saved = snapshot::read_state(&request.state).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if saved.memory == MemoryKind::Diff && diffs.is_empty() {
            return Err(ApiError::BadRequest(
                "this state goes with a diff snapshot: give the full memory file, then the diff files in order".into(),
            ));
        }
        let identity = Identity { nets: request.nets, disks: request.disks, vsock: request.vsock };
        let config = identity.apply(saved.config.clone())?;
        let out = self.open_console()?;
        let diffs: Vec<&Path> = diffs.iter().map(PathBuf::as_path).collect();
        let launch = Launch::Restore { state: &saved, memory: full, diffs: &diffs };
        let mut vm =
            crate::vm::create(&config, out, launch).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if request.track_dirty_pages {
            vm.start_dirty_tracking().map_err(|e| ApiError::Failed(e.to_string()))?;
        }
        vm.run(request.paused).map_err(|e| ApiError::Failed(e.to_string()))?;
        self.take_config(config);
        self.has_base_snapshot = request.track_dirty_pages;
        self.adopt(vm);
        Ok(RestoreReport { duration_ms: t.elapsed().as_secs_f64() * 1e3, running: !request.paused })
    }

    /// Migrates the running VM to the VMM waiting at `to` (`tcp:HOST:PORT` or a Unix socket),
    /// with the destination's `secret` if it has one. On success this VMM's copy is stopped;
    /// on failure the guest runs on here.
    pub fn migrate(
        &mut self,
        to: &str,
        options: crate::migration::Options,
        secret: &[u8],
    ) -> Result<crate::migration::Report, ApiError> {
        self.memory_complete("migrate")?;
        let phase = self.phase();
        let info = self.info();
        let Some(vm) = self.vm.as_mut().filter(|_| phase == Phase::Running) else {
            return Err(conflict("migrate", phase));
        };
        self.migration.begin(to, options.postcopy, info);
        // Migration takes the dirty log: a diff snapshot after it would miss pages.
        self.has_base_snapshot = false;
        let result = crate::migration::connect(to)
            .map_err(|e| crate::migration::MigrationError::Vm(format!("connecting to {to}: {e}")))
            .and_then(|conn| crate::migration::send(vm, conn, options, secret, &self.migration));
        self.migration.end(result.as_ref().map_err(ToString::to_string));
        let report = result.map_err(|e| match e {
            crate::migration::MigrationError::Stranded(why) => {
                ApiError::Failed(format!("migration failed: {why}"))
            }
            crate::migration::MigrationError::Cancelled(why) => {
                ApiError::Conflict(format!("migration {why}"))
            }
            e => ApiError::Failed(format!("migration failed; the VM runs here still: {e}")),
        })?;
        self.stopped = Some(format!("migrated to {to}"));
        Ok(report)
    }

    /// Builds the VM a migration is bringing as far as it can go before its state arrives:
    /// `identity` gives it this host's taps, disks and vsock socket. What this host cannot give
    /// is the error, and the migration is refused before any page moves.
    pub fn prepare_incoming(
        &mut self,
        config: &VmConfig,
        memory: stratus_virtio::GuestRam,
        identity: Identity,
        copied_disks: bool,
    ) -> Result<(VmConfig, crate::vm::Shell), ApiError> {
        self.configurable("receive a migration")?;
        let config = identity.apply(config.clone())?;
        let out = self.open_console()?;
        // Disks copied in are this host's own files, locked from the start (a file the source
        // itself holds is refused); shared ones are locked once the source lets go.
        let disks = if copied_disks { crate::vm::Disks::Locked } else { crate::vm::Disks::LockedAtFinish };
        let shell =
            crate::vm::build(&config, out, memory, disks).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok((config, shell))
    }

    /// Gives the VM a migration brought its state, runs it, and tells the source it runs here.
    /// After a post-copy, what is still coming must be waited on.
    pub fn adopt_incoming(
        &mut self,
        arrival: crate::migration::Arrival<(VmConfig, crate::vm::Shell)>,
    ) -> Result<Option<crate::migration::postcopy::Arriving>, ApiError> {
        let crate::migration::Arrival {
            state,
            prepared: (config, shell),
            conn,
            postcopy,
            arrived_at,
            buffers,
        } = arrival;
        self.arriving = postcopy.as_ref().map(|p| p.pending());
        let started = shell
            .finish(crate::vm::Start::Arrive(&state))
            .map_err(|e| ApiError::BadRequest(e.to_string()))
            .and_then(|mut vm| vm.run(false).map(|()| vm).map_err(|e| ApiError::Failed(e.to_string())));
        let mut vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                // The source resumes its copy.
                let _ = crate::migration::decline(&conn, &e.to_string());
                return Err(e);
            }
        };
        crate::migration::confirm(&conn, arrived_at).map_err(|e| ApiError::Failed(e.to_string()))?;
        vm.announce();
        drop(buffers);
        self.take_config(config);
        self.adopt(vm);
        Ok(postcopy)
    }

    /// `GET /vm`: state, exit reason, uptime, configuration.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: self.phase(),
            exit_reason: self.exit_reason(),
            uptime_ms: self.vm.as_ref().map(|vm| vm.uptime().as_millis() as u64),
            pid: std::process::id(),
            config: self.config_view(),
            migration: None,
        }
    }

    /// `GET /metrics`: counters per vCPU and per device.
    pub fn metrics(&self) -> serde_json::Value {
        let Some(vm) = &self.vm else {
            return serde_json::json!({ "state": self.phase(), "vcpus": [], "devices": [] });
        };
        crate::metrics::collect(vm, self.phase(), |kind, index| match kind {
            stratus_virtio::device_type::BLOCK => self.drive_id(index).map(str::to_owned),
            stratus_virtio::device_type::NET => self.net_id(index).map(str::to_owned),
            _ => None,
        })
    }
}

/// The guest's name for disk `index`: vda, vdb, ...
fn disk_name(index: usize) -> String {
    format!("vd{}", (b'a' + (index % 26) as u8) as char)
}
