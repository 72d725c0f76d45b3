//! The host agent: owns this host's instances — their disks, taps and `stratus vmm` processes —
//! and answers for them. The control plane talks to it through the `HostAgent` trait; `serve`
//! runs the local implementation in-process, and a remote agent will implement the same trait
//! over HTTP.
//!
//! Each instance lives in `DATA/instances/ID/`: `disk.raw`, the VMM's `api.sock`,
//! `console.sock` and `vsock.sock`, and `vmm.log` (the VMM's own output). The VMM runs in its
//! own session, so it outlives the agent: after a restart the agent finds it again by its pid
//! and API socket, which are the truth about what runs.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use stratus_api::model::{Desired, Host, Image, Instance, Network, Pool, WarmSnapshot, VMM_VERSION};
use stratus_guest_agent::{Client, ExecRequest, Identity};
use stratus_protocol::console::{ConsoleStream, UnixConsole};
use stratus_protocol::{DiskLayout, InstanceUsage};
use stratus_vmm_api::{
    Boot, ConsoleConfig, Drive, Machine, Migrate, Net, Phase, Restore, Rng, Snapshot, VmmClient, VmmError,
    VsockConfig,
};

use crate::disk::{self, CloneKind};
use crate::network::{self, Subnet};

/// The guest agent's answer must come within this after the VMM starts.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest gets to power off after the power button before it is stopped hard.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The size a warm snapshot is made at: the launch defaults.
const WARM_CPUS: u32 = 1;
const WARM_MEMORY_MIB: u64 = 256;
const WARM_DISK_MIB: u64 = 1024;
/// Memory kept for the host itself, not given to instances.
const HOST_RESERVE_MIB: u64 = 1024;

/// Errors of host work.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Preparing the disk failed.
    #[error("disk: {0}")]
    Disk(#[from] disk::DiskError),
    /// Network set-up failed.
    #[error("network: {0}")]
    Network(#[from] network::NetworkError),
    /// The VMM could not be started or configured.
    #[error("vmm: {0}")]
    Vmm(String),
    /// The guest did not come up.
    #[error("guest: {0}")]
    Guest(String),
    /// The instance does not run here.
    #[error("instance is not running")]
    NotRunning,
    /// The start was called off (the instance is to be stopped or deleted).
    #[error("start called off")]
    Cancelled,
    /// Local file work failed.
    #[error("{0}")]
    Io(String),
}

impl From<VmmError> for AgentError {
    fn from(e: VmmError) -> Self {
        AgentError::Vmm(e.to_string())
    }
}

/// What a started instance looks like.
#[derive(Clone, Debug)]
pub struct Started {
    /// The VMM's pid.
    pub pid: u32,
    /// VMM start to guest agent answering.
    pub boot: Duration,
    /// "cold" or "warm".
    pub kind: &'static str,
    /// Where the time went, for the event log.
    pub detail: String,
}

/// What the agent sees of an instance's VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The VMM runs the guest.
    Running,
    /// The VMM is gone or its guest stopped; why.
    Down {
        /// The cause, for the user.
        cause: String,
        /// Whether it was the guest's own doing (power-off), not a failure.
        clean: bool,
    },
}

/// The output of a command run in a guest.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed).
    pub code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// A VMM waiting for a live migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// Where the source sends the migration: `tcp:IP:PORT`.
    pub to: String,
    /// The waiting VMM's pid.
    pub pid: u32,
    /// The secret it takes the migration with, made for this migration alone.
    pub secret: String,
}

/// How a live migration went, as the source VMM measured it.
#[derive(Clone, Debug, PartialEq)]
pub struct Moved {
    /// Start to the destination running the guest, ms.
    pub total_ms: f64,
    /// The source's pause to the destination running the guest, ms.
    pub downtime_ms: f64,
    /// Bytes sent (memory, disks, state).
    pub bytes: u64,
}

/// The seam between the control plane and a host.
pub trait HostAgent: Send + Sync {
    /// The host's name and capacity (allocation is filled in by the control plane).
    fn host(&self) -> Host;
    /// Creates the bridges of `networks` and applies NAT for them.
    fn prepare_networks(&self, networks: &[Network]) -> Result<(), AgentError>;
    /// Removes `network`'s bridge and leaves NAT for the `remaining` ones only.
    fn remove_network(&self, network: &Network, remaining: &[Network]) -> Result<(), AgentError>;
    /// Makes the disk if missing, the tap, starts the VMM and waits for the guest agent.
    /// `cancelled` is asked while the guest boots: when it says so, the VMM is stopped and
    /// the start ends with `Cancelled`.
    fn start(
        &self,
        instance: &Instance,
        image: &Image,
        network: &Network,
        progress: &mut dyn FnMut(String),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Started, AgentError>;
    /// Boots `image` once (1 vCPU, 256 MiB, 1 GiB disk: the launch defaults), waits for its
    /// guest agent and saves it, for warm launches of that size.
    fn warm(
        &self,
        image: &Image,
        network: &Network,
        progress: &mut dyn FnMut(String),
    ) -> Result<WarmSnapshot, AgentError>;
    /// Stops the VMM: power button, then hard after a grace period. The disk stays.
    fn stop(&self, instance: &Instance) -> Result<(), AgentError>;
    /// Stops the VMM if it runs and removes the tap, disk and directory.
    fn remove(&self, instance: &Instance) -> Result<(), AgentError>;
    /// Whether the instance's VMM still runs its guest.
    fn probe(&self, instance: &Instance) -> Probe;
    /// Runs a command in the guest through its agent.
    /// Runs `argv` in the guest; past `limit` it is killed (exit code 137).
    fn exec(
        &self,
        instance: &Instance,
        argv: Vec<String>,
        stdin: Vec<u8>,
        limit: Duration,
    ) -> Result<ExecOutput, AgentError>;
    /// The instance's serial console, as a byte stream.
    fn console(&self, instance: &Instance) -> Result<Box<dyn ConsoleStream>, AgentError>;
    /// The instance's usage (`cpu_seconds`, `memory_bytes` of its VMM process) and the VMM's
    /// own metrics document (`vmm`).
    fn metrics(&self, instance: &Instance) -> Result<serde_json::Value, AgentError>;
    /// The usage of those of `instances` that run here (the host's own list, for a host that
    /// keeps one).
    fn usage(&self, instances: &[Instance]) -> Vec<InstanceUsage>;
    /// Whether the instance's files and devices are all gone (for delete's no-leftovers check).
    fn leftovers(&self, instance: &Instance) -> Vec<String>;
    /// The stopped instance's disk: size and data ranges (a cold move's source).
    fn disk_layout(&self, instance: &Instance) -> Result<DiskLayout, AgentError>;
    /// `length` bytes of the stopped instance's disk from `offset`.
    fn read_disk(&self, instance: &Instance, offset: u64, length: u64) -> Result<Vec<u8>, AgentError>;
    /// Writes `data` at `offset` into the disk of an instance held stopped here (a cold
    /// move's destination), made `size` bytes first if it has none.
    fn write_disk(&self, instance: &Instance, size: u64, offset: u64, data: &[u8]) -> Result<(), AgentError>;
    /// Readies this host to receive `instance` by live migration: an empty disk of its size,
    /// its tap, and a VMM waiting for the stream on this host's address.
    fn receive(&self, instance: &Instance, image: &Image, network: &Network) -> Result<Incoming, AgentError>;
    /// Moves the running `instance` live to the VMM waiting at `to`, its disk copied in the same
    /// session. On success its VMM here has stopped and its tap and files are gone; on failure
    /// it runs on here.
    fn send(&self, instance: &Instance, to: &str, secret: &str) -> Result<Moved, AgentError>;
    /// Waits (up to `limit`) until a received instance runs here; its VMM's pid.
    /// [`AgentError::NotRunning`] when it has not arrived (yet) and the VMM still waits.
    fn arrived(&self, instance: &Instance, limit: Duration) -> Result<u32, AgentError>;
}

/// The agent of the machine `serve` runs on.
pub struct LocalAgent {
    data_dir: PathBuf,
    vmm_binary: PathBuf,
    hostname: String,
    /// This host's address on the network between hosts (VXLAN underlay, migrations).
    address: Option<String>,
    /// VMMs this process started, to reap them; VMMs adopted after a restart are not our
    /// children (init reaps them).
    children: Arc<Mutex<HashMap<u32, Child>>>,
    /// Exit statuses of reaped children, by pid.
    exits: Arc<Mutex<HashMap<u32, std::process::ExitStatus>>>,
    /// Image directories whose warm snapshot is being made (one at a time per image).
    warming: Mutex<std::collections::HashSet<PathBuf>>,
    /// The cluster's shared storage pool as this host mounts it, and the fence file its
    /// VMMs stop by ([`crate::fence`]).
    shared: Option<SharedPool>,
}

/// The shared storage pool of a host.
#[derive(Clone, Debug)]
struct SharedPool {
    dir: PathBuf,
    fence: PathBuf,
}

impl LocalAgent {
    /// An agent keeping instances under `data_dir/instances`, running `vmm_binary vmm`.
    pub fn new(data_dir: &Path, vmm_binary: PathBuf) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        let agent = LocalAgent {
            data_dir: data_dir.to_owned(),
            vmm_binary,
            hostname,
            address: None,
            children: Arc::default(),
            exits: Arc::default(),
            warming: Mutex::default(),
            shared: None,
        };
        agent.start_reaper();
        agent
    }

    fn start_reaper(&self) {
        let children = Arc::clone(&self.children);
        let exits = Arc::clone(&self.exits);
        let _ = std::thread::Builder::new().name("reaper".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let mut children = children.lock().unwrap_or_else(|p| p.into_inner());
            let mut done = Vec::new();
            for (pid, child) in children.iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    done.push((*pid, status));
                }
            }
            for (pid, status) in done {
                children.remove(&pid);
                exits.lock().unwrap_or_else(|p| p.into_inner()).insert(pid, status);
            }
        });
    }

    /// The same agent, reporting its host as `name` (a cluster's name for it) instead of the
    /// machine's hostname.
    pub fn named(mut self, name: &str) -> Self {
        self.hostname = name.to_string();
        self
    }

    /// The same agent, reached by other hosts at `address` (an IP): its networks' VXLANs start
    /// there and migrations arrive there.
    pub fn with_address(mut self, address: &str) -> Self {
        self.address = Some(address.to_string());
        self
    }

    /// The same agent, mounting the cluster's shared storage pool at `dir`: disks of
    /// shared-pool instances live there as `ID.raw`, and their VMMs run only while `fence`
    /// holds a deadline to come ([`crate::fence`]).
    pub fn with_shared_pool(mut self, dir: &Path, fence: &Path) -> Self {
        self.shared = Some(SharedPool { dir: dir.to_owned(), fence: fence.to_owned() });
        self
    }

    /// Where `instance`'s disk is: its directory here, or the shared pool.
    pub fn disk_path(&self, instance: &Instance) -> Result<PathBuf, AgentError> {
        match (instance.spec.pool, &self.shared) {
            (Pool::Local, _) => Ok(self.instance_dir(&instance.id).join("disk.raw")),
            (Pool::Shared, Some(shared)) => Ok(shared.dir.join(format!("{}.raw", instance.id))),
            (Pool::Shared, None) => Err(AgentError::Io(format!(
                "host {} has no shared storage pool (stratus agent --shared-pool DIR), which instance {}'s disk is on",
                self.hostname, instance.name
            ))),
        }
    }

    /// What `stratus vmm` is given for `instance`: the fence file when its disk is shared.
    fn fence_args(&self, instance: &Instance) -> Vec<String> {
        match (&self.shared, instance.spec.pool) {
            (Some(shared), Pool::Shared) => vec!["--fence".into(), shared.fence.display().to_string()],
            _ => Vec::new(),
        }
    }

    /// The directory of instance `id`.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("instances").join(id)
    }

    /// Spawns `stratus vmm` for the VM kept in `dir` (its API socket, log, disk) and waits
    /// for its API socket.
    fn spawn_vmm(&self, dir: &Path) -> Result<u32, AgentError> {
        self.spawn_vmm_with(dir, &[])
    }

    /// [`LocalAgent::spawn_vmm`] with more arguments for `stratus vmm`.
    fn spawn_vmm_with(&self, dir: &Path, extra: &[String]) -> Result<u32, AgentError> {
        let log_path = dir.join("vmm.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| AgentError::Io(format!("opening {}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(|e| AgentError::Io(e.to_string()))?;
        let api = api_sock(dir);
        let _ = std::fs::remove_file(&api);
        let mut command = Command::new(&self.vmm_binary);
        command
            .arg("vmm")
            .arg("--api-sock")
            .arg(&api)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid is async-signal-safe; it puts the VMM in its own session so that a
        // signal to the server's process group (Ctrl-C) does not reach the guests.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| AgentError::Vmm(format!("cannot run {}: {e}", self.vmm_binary.display())))?;
        let pid = child.id();
        self.children.lock().unwrap_or_else(|p| p.into_inner()).insert(pid, child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if stratus_unix::connect(&api).is_ok() {
                return Ok(pid);
            }
            if !is_vmm_of(pid, dir) {
                return Err(AgentError::Vmm(format!("the VMM exited at start: {}", log_tail(dir))));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if is_vmm_of(pid, dir) {
            kill(pid);
        }
        Err(AgentError::Vmm("the VMM did not open its API socket within 10 s".into()))
    }

    /// Configures a fresh VMM to boot `image` with the instance's disk, tap, vsock and console.
    fn boot_vmm(&self, dir: &Path, spec: &BootSpec) -> Result<(), AgentError> {
        let vmm = vmm(dir);
        vmm.set_machine(&Machine { vcpus: spec.cpus, memory_mib: spec.memory_mib })?;
        vmm.set_boot(&Boot {
            kernel: spec.image.kernel.clone().into(),
            initrd: spec.image.initrd.clone().map(Into::into),
            cmdline: Some(spec.cmdline.clone()),
        })?;
        vmm.put_drive("vda", &drive(&spec.disk))?;
        vmm.put_net(
            "eth0",
            &Net { tap: spec.tap.clone(), mac: Some(spec.mac.clone()), rate_limit: Default::default() },
        )?;
        vmm.set_vsock(&VsockConfig { cid: spec.cid.into(), socket: dir.join("vsock.sock") })?;
        vmm.set_rng(&Rng { enabled: true })?;
        vmm.set_console(&ConsoleConfig::Socket { path: dir.join("console.sock") })?;
        vmm.start()?;
        Ok(())
    }

    /// Waits until the guest agent of the VM in `dir` (VMM `pid`) answers.
    fn wait_for_guest(
        &self,
        dir: &Path,
        pid: u32,
        started: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), AgentError> {
        // A guest that has no listener yet refuses at once; one too busy to answer (many
        // VMs on few cores) gets longer each time, or no attempt would ever outlast its answer.
        let mut patience = Duration::from_secs(2);
        loop {
            let client = Client::new(dir.join("vsock.sock"), patience);
            let attempt = Instant::now();
            match client.info() {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if attempt.elapsed() >= patience {
                        patience = (patience * 2).min(Duration::from_secs(30));
                    }
                    if cancelled() {
                        return Err(AgentError::Cancelled);
                    }
                    if let Probe::Down { cause, .. } = self.probe_vmm(dir, pid) {
                        return Err(AgentError::Guest(format!("the VM stopped while booting: {cause}")));
                    }
                    if started.elapsed() > BOOT_TIMEOUT {
                        return Err(AgentError::Guest(format!(
                            "the guest agent did not answer within {} s ({e})",
                            BOOT_TIMEOUT.as_secs()
                        )));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn probe_vmm(&self, dir: &Path, pid: u32) -> Probe {
        if !is_vmm_of(pid, dir) {
            let status = self.exits.lock().unwrap_or_else(|p| p.into_inner()).get(&pid).copied();
            let how = match status {
                Some(s) => format!("the VMM exited ({s})"),
                None => "the VMM process is gone".to_owned(),
            };
            return Probe::Down { cause: format!("{how}; its last words: {}", log_tail(dir)), clean: false };
        }
        match vmm_phase(dir) {
            Ok((Phase::Running | Phase::Paused, _)) => Probe::Running,
            Ok((_, reason)) => {
                let reason = reason.unwrap_or_else(|| "stopped".into());
                Probe::Down { clean: reason == "guest powered off", cause: reason }
            }
            // Alive but not answering (busy): not a reason to declare it dead.
            Err(_) => Probe::Running,
        }
    }

    /// Boots the warm snapshot's template VM of `image` in `dir` and saves it once its
    /// agent answers. The disk it booted from stays beside the snapshot.
    fn make_warm(
        &self,
        image: &Image,
        network: &Network,
        dir: &Path,
        progress: &mut dyn FnMut(String),
    ) -> Result<WarmSnapshot, AgentError> {
        let io = |what: &str, e: std::io::Error| AgentError::Io(format!("{what} {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| io("creating", e))?;
        disk::clone_image(Path::new(&image.rootfs), &dir.join("disk.raw"), WARM_DISK_MIB)?;
        // Named after the template's directory: templates of two images may boot at once.
        let tap = format!("stw{:012x}", fnv1a(dir.as_os_str().as_encoded_bytes()) & 0xffff_ffff_ffff);
        network::ensure_tap(&tap, &network.bridge)?;
        let spec = BootSpec {
            image,
            disk: dir.join("disk.raw"),
            cpus: WARM_CPUS,
            memory_mib: WARM_MEMORY_MIB,
            cmdline: format!("{} root=/dev/vda rw", image.cmdline),
            tap: tap.clone(),
            mac: "52:54:00:00:00:01".into(),
            cid: GUEST_CID,
        };
        let started = Instant::now();
        let result = self.spawn_vmm(dir).and_then(|pid| {
            let saved = (|| {
                self.boot_vmm(dir, &spec)?;
                progress(format!("image {}: template VM booting (pid {pid})", image.name));
                self.wait_for_guest(dir, pid, started, &|| false)?;
                let boot_ms = started.elapsed().as_millis() as u64;
                // The agent answers before init has finished (it is started first); a clone
                // of a busy guest would redo that work. Save it once it idles.
                wait_until_quiet(pid, Duration::from_secs(120));
                let vmm = vmm(dir);
                vmm.pause()?;
                vmm.snapshot(&Snapshot {
                    state_file: dir.join("state"),
                    memory_file: dir.join("memory"),
                    diff: false,
                })?;
                Ok(boot_ms)
            })();
            let _ = vmm(dir).stop();
            quit_vmm(dir, pid);
            saved
        });
        let _ = network::remove_tap(&tap);
        let boot_ms = result?;
        for leftover in ["api.sock", "console.sock", "vsock.sock"] {
            let _ = std::fs::remove_file(dir.join(leftover));
        }
        Ok(WarmSnapshot {
            state: dir.join("state").display().to_string(),
            memory: dir.join("memory").display().to_string(),
            disk: dir.join("disk.raw").display().to_string(),
            cpus: WARM_CPUS,
            memory_mib: WARM_MEMORY_MIB,
            disk_mib: WARM_DISK_MIB,
            vmm_version: VMM_VERSION.into(),
            boot_ms,
            created_at: stratus_api::model::now(),
        })
    }

    /// Restores the instance from its image's warm snapshot and gives the clone its identity.
    fn restore_warm(
        &self,
        instance: &Instance,
        network: &Network,
        warm: &WarmSnapshot,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(u32, String), AgentError> {
        let dir = self.instance_dir(&instance.id);
        let disk = self.disk_path(instance)?;
        let t = Instant::now();
        let pid = self.spawn_vmm_with(&dir, &self.fence_args(instance))?;
        let restored = (|| {
            let vmm = vmm(&dir);
            vmm.set_console(&ConsoleConfig::Socket { path: dir.join("console.sock") })?;
            let report = vmm.restore(&Restore {
                state_file: warm.state.clone().into(),
                memory_files: vec![warm.memory.clone().into()],
                drives: Some(vec![drive(&disk)]),
                nets: Some(vec![Net {
                    tap: network::tap_name(&instance.id),
                    mac: Some(instance.status.mac.clone()),
                    rate_limit: Default::default(),
                }]),
                vsock: Some(VsockConfig { cid: guest_cid(instance).into(), socket: dir.join("vsock.sock") }),
                ..Default::default()
            })?;
            let restore_ms = report.duration_ms;
            let spawned = t.elapsed();
            self.wait_for_guest(&dir, pid, Instant::now(), cancelled)?;
            let answered = t.elapsed();
            let subnet = Subnet::parse(&network.cidr)?;
            let identity = Identity {
                hostname: Some(instance.name.clone()),
                mac: Some(instance.status.mac.clone()),
                address: Some(format!("{}/{}", instance.status.ip, subnet.prefix)),
                gateway: Some(network.gateway.clone()),
                interface: None,
            };
            let client = Client::new(dir.join("vsock.sock"), Duration::from_secs(120));
            client
                .configure(&identity)
                .map_err(|e| AgentError::Guest(format!("giving the clone its identity: {e}")))?;
            check_cid(&client, guest_cid(instance))?;
            Ok(format!(
                "VMM up and restored in {} ms (restore itself {restore_ms:.1} ms), agent answered at {} ms, identity set at {} ms",
                spawned.as_millis(),
                answered.as_millis(),
                t.elapsed().as_millis()
            ))
        })();
        match restored {
            Ok(detail) => Ok((pid, detail)),
            Err(e) => {
                let _ = vmm(&dir).stop();
                quit_vmm(&dir, pid);
                Err(e)
            }
        }
    }
}

/// Checks that a clone took its new vsock CID: the guest re-reads it when the restored device
/// resets its transport, which the guest handles on its own time, so it may take a moment.
fn check_cid(client: &Client, wanted: u32) -> Result<(), AgentError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = client.info().map_err(|e| AgentError::Guest(format!("asking the clone its CID: {e}")))?;
        match info.cid {
            // An agent that cannot read its CID (no /dev/vsock node) is not held against the clone.
            None => return Ok(()),
            Some(cid) if cid == wanted => return Ok(()),
            Some(cid) if Instant::now() >= deadline => {
                return Err(AgentError::Guest(format!(
                    "the clone kept vsock CID {cid} (it was given {wanted}): its kernel did not take the transport reset"
                )))
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Most output of one stream that exec keeps: the output is guest data held in the server's
/// memory (and answered base64 in one JSON document), so a guest cannot make it unbounded.
const EXEC_OUTPUT_LIMIT: usize = 16 << 20;

/// A buffer that refuses to grow past `EXEC_OUTPUT_LIMIT`.
#[derive(Default)]
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + data.len() > EXEC_OUTPUT_LIMIT {
            return Err(std::io::Error::other(format!(
                "the command wrote more than {} MiB to one stream; run it with its output redirected to a file",
                EXEC_OUTPUT_LIMIT >> 20
            )));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a cold boot needs.
struct BootSpec<'a> {
    image: &'a Image,
    disk: PathBuf,
    cpus: u32,
    memory_mib: u64,
    cmdline: String,
    tap: String,
    mac: String,
    cid: u32,
}

/// How long exec waits for the guest agent to start the program.
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a VMM API call may take (a snapshot of a large VM writes its memory).
const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The vsock CID of the warm template and of instances recorded without one. Each VMM's vsock
/// device is a Unix socket of its own, not the host kernel's vsock, so CIDs never meet; still
/// every instance gets its own (its address as a number), as a guest may report or log it.
const GUEST_CID: u32 = 3;

/// The instance's vsock CID.
fn guest_cid(instance: &Instance) -> u32 {
    if instance.status.cid >= 3 {
        instance.status.cid
    } else {
        GUEST_CID
    }
}

/// FNV-1a: a short, stable hash for device names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn api_sock(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

/// The VMM serving `dir`: the recorded pid if it still is, else whichever process answers on
/// the API socket (a start the server died in the middle of left its pid unrecorded).
/// The largest disk a cold move writes (as launches allow).
const MAX_DISK_BYTES: u64 = 16 << 40;

impl LocalAgent {
    /// The disk of `instance`, which must not be running here (a disk in use changes while
    /// it is read).
    fn stopped_disk(&self, instance: &Instance) -> Result<PathBuf, AgentError> {
        let dir = self.instance_dir(&instance.id);
        if find_vmm(&dir, instance.status.pid).is_some() {
            return Err(AgentError::Io(format!("instance {} runs: stop it to move it cold", instance.name)));
        }
        let path = self.disk_path(instance)?;
        if !path.exists() {
            return Err(AgentError::Io(format!("instance {} has no disk here", instance.name)));
        }
        Ok(path)
    }
}

fn find_vmm(dir: &Path, recorded: u32) -> Option<u32> {
    if is_vmm_of(recorded, dir) {
        return Some(recorded);
    }
    let pid = vmm(dir).info().ok()?.pid;
    is_vmm_of(pid, dir).then_some(pid)
}

/// Whether `pid` is the VMM serving `dir` (not a recycled pid, not a zombie).
fn is_vmm_of(pid: u32, dir: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let want = api_sock(dir);
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = state.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
    !zombie && cmdline.split(|b| *b == 0).any(|arg| arg == want.as_os_str().as_encoded_bytes())
}

/// The API of the VMM in `dir`; each call bounded by [`VMM_CALL_TIMEOUT`] (a wedged VMM must
/// not hold a reconciler worker, and with it the instance, forever).
fn vmm(dir: &Path) -> VmmClient {
    VmmClient::new(api_sock(dir)).within(VMM_CALL_TIMEOUT)
}

/// Makes `instance`'s tap on `network`'s bridge, guarded: it sends only as the instance
/// (`network::guard_tap`). Its name.
fn guest_tap(instance: &Instance, network: &Network) -> Result<String, AgentError> {
    let tap = network::tap_name(&instance.id);
    network::ensure_tap(&tap, &network.bridge)?;
    network::guard_tap(&tap, &instance.status.mac, &instance.status.ip)?;
    Ok(tap)
}

/// The disk at `path`, as the VMM takes it.
fn drive(path: &Path) -> Drive {
    Drive { path: path.to_owned(), readonly: false, rate_limit: Default::default() }
}

/// The last line the VMM in `dir` printed, for error messages.
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_owned()
}

/// Asks the VMM in `dir` to exit, and kills it if it does not.
fn quit_vmm(dir: &Path, pid: u32) {
    let _ = vmm(dir).quit();
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_vmm_of(pid, dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if is_vmm_of(pid, dir) {
        kill(pid);
    }
}

/// Waits until process `pid` (a VMM) uses under a tenth of a CPU for two half-second
/// intervals in a row: its guest is idle. Gives up after `limit`.
fn wait_until_quiet(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    let interval = Duration::from_millis(500);
    let mut quiet = 0;
    let mut last = process_usage(pid).0;
    while quiet < 2 && Instant::now() < deadline {
        std::thread::sleep(interval);
        let now = process_usage(pid).0;
        quiet = if now - last < 0.1 * interval.as_secs_f64() { quiet + 1 } else { 0 };
        last = now;
    }
}

/// CPU time (user + system, seconds) and resident memory (bytes) of process `pid`.
fn process_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let fields: Vec<&str> =
        stat.rsplit_once(") ").map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    ((field(14) + field(15)) as f64 / ticks, field(24) * page)
}

fn vmm_phase(dir: &Path) -> Result<(Phase, Option<String>), AgentError> {
    let info = vmm(dir).info()?;
    Ok((info.state, info.exit_reason))
}

fn kill(pid: u32) {
    if pid > 1 {
        // SAFETY: sending a signal reads no memory of ours.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

impl HostAgent for LocalAgent {
    fn host(&self) -> Host {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()))
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let hypervisor = if Path::new("/sys/module/kvm_pvm").exists() { "pvm" } else { "kvm" };
        Host {
            name: self.hostname.clone(),
            cpus,
            memory_mib,
            allocatable_mib: memory_mib.saturating_sub(HOST_RESERVE_MIB),
            allocated_mib: 0,
            allocated_cpus: 0,
            instances: 0,
            hypervisor: hypervisor.into(),
            seen_at: stratus_api::model::now(),
            address: self.address.clone().unwrap_or_default(),
            state: String::new(),
            maintenance: false,
            cpu_percent: None,
            shared_pool: self.shared.is_some(),
        }
    }

    fn prepare_networks(&self, networks: &[Network]) -> Result<(), AgentError> {
        for net in networks {
            network::ensure_bridge_on(net, self.address.as_deref())?;
        }
        network::apply_nat(networks)?;
        Ok(())
    }

    fn remove_network(&self, net: &Network, remaining: &[Network]) -> Result<(), AgentError> {
        network::remove_bridge(net)?;
        network::apply_nat(remaining)?;
        Ok(())
    }

    fn start(
        &self,
        instance: &Instance,
        image: &Image,
        network: &Network,
        progress: &mut dyn FnMut(String),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Started, AgentError> {
        let id = &instance.id;
        let dir = self.instance_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Io(format!("creating {}: {e}", dir.display())))?;
        // A VMM left from an interrupted start: begin again from a clean process.
        if let Ok(info) = vmm(&dir).info() {
            quit_vmm(&dir, info.pid);
        }
        guest_tap(instance, network)?;
        let disk_path = self.disk_path(instance)?;
        // The disk of an instance that never ran holds nothing of its user's: a first start cut
        // short (the server killed mid-launch, a failed boot) begins again from a fresh clone,
        // so it can still restore the warm snapshot.
        let fresh = instance.status.started_at == 0 || !disk_path.exists();
        if fresh {
            let _ = std::fs::remove_file(&disk_path);
        }
        // A first start of the warm snapshot's size restores it instead of booting.
        if let Some(warm) = image.warm.as_ref().filter(|w| fresh && w.fits(&instance.spec)) {
            let started = Instant::now();
            let cloned = disk::clone_image(Path::new(&warm.disk), &disk_path, warm.disk_mib);
            match cloned
                .map_err(AgentError::from)
                .and_then(|_| self.restore_warm(instance, network, warm, cancelled))
            {
                Ok((pid, detail)) => {
                    return Ok(Started { pid, boot: started.elapsed(), kind: "warm", detail })
                }
                Err(AgentError::Cancelled) => return Err(AgentError::Cancelled),
                Err(e) => {
                    progress(format!("warm launch failed ({e}); booting cold"));
                    let _ = std::fs::remove_file(&disk_path);
                }
            }
        }
        if !disk_path.exists() {
            let t = Instant::now();
            let kind = disk::clone_image(Path::new(&image.rootfs), &disk_path, instance.spec.disk_mib)?;
            let how = match kind {
                CloneKind::Reflink => "reflink",
                CloneKind::Sparse => "sparse copy",
            };
            progress(format!(
                "disk cloned from image {} ({how}, {} MiB, {} ms)",
                image.name,
                instance.spec.disk_mib,
                t.elapsed().as_millis()
            ));
        }
        let subnet = Subnet::parse(&network.cidr)?;
        let spec = BootSpec {
            image,
            disk: disk_path.clone(),
            cpus: instance.spec.cpus,
            memory_mib: instance.spec.memory_mib,
            cmdline: format!(
                "{} root=/dev/vda rw stratus.hostname={} stratus.ip={}/{} stratus.gw={}",
                image.cmdline, instance.name, instance.status.ip, subnet.prefix, network.gateway
            ),
            tap: network::tap_name(id),
            mac: instance.status.mac.clone(),
            cid: guest_cid(instance),
        };
        let started = Instant::now();
        let pid = self.spawn_vmm_with(&dir, &self.fence_args(instance))?;
        if let Err(e) = self.boot_vmm(&dir, &spec) {
            quit_vmm(&dir, pid);
            return Err(e);
        }
        progress(format!("VMM started (pid {pid}), booting"));
        if let Err(e) = self.wait_for_guest(&dir, pid, started, cancelled) {
            quit_vmm(&dir, pid);
            return Err(e);
        }
        Ok(Started { pid, boot: started.elapsed(), kind: "cold", detail: String::new() })
    }

    fn warm(
        &self,
        image: &Image,
        network: &Network,
        progress: &mut dyn FnMut(String),
    ) -> Result<WarmSnapshot, AgentError> {
        let image_dir = Path::new(&image.rootfs).parent().unwrap_or(&self.data_dir).to_owned();
        if !self.warming.lock().unwrap_or_else(|p| p.into_inner()).insert(image_dir.clone()) {
            return Err(AgentError::Io(format!(
                "image {}: its warm snapshot is being made already",
                image.name
            )));
        }
        // Earlier attempts' leftovers go first: a template VM of a server that stopped while
        // it booted, snapshots of another VMM version. A current snapshot stays (launches
        // may be restoring from it); the new one is made beside it, never over it.
        let keep = image
            .warm
            .as_ref()
            .filter(|_| crate::images::warm_is_current(image))
            .and_then(|w| Path::new(&w.state).parent().map(Path::to_owned));
        for entry in std::fs::read_dir(&image_dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with("warm") && Some(&path) != keep.as_ref() {
                if let Some(pid) = find_vmm(&path, 0) {
                    quit_vmm(&path, pid);
                }
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        let dir = image_dir.join(format!("warm-{}", &stratus_api::model::new_id()[..8]));
        let made = self.make_warm(image, network, &dir, progress);
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        self.warming.lock().unwrap_or_else(|p| p.into_inner()).remove(&image_dir);
        made
    }

    fn stop(&self, instance: &Instance) -> Result<(), AgentError> {
        let dir = self.instance_dir(&instance.id);
        let Some(pid) = find_vmm(&dir, instance.status.pid) else { return Ok(()) };
        if let Ok((phase, _)) = vmm_phase(&dir) {
            if phase == Phase::Running && vmm(&dir).shutdown().is_ok() {
                let deadline = Instant::now() + SHUTDOWN_GRACE;
                while Instant::now() < deadline {
                    match vmm_phase(&dir) {
                        Ok((Phase::Running, _)) => std::thread::sleep(Duration::from_millis(100)),
                        _ => break,
                    }
                }
            }
        }
        let _ = vmm(&dir).stop();
        quit_vmm(&dir, pid);
        Ok(())
    }

    fn remove(&self, instance: &Instance) -> Result<(), AgentError> {
        let dir = self.instance_dir(&instance.id);
        if let Some(pid) = find_vmm(&dir, instance.status.pid) {
            let _ = vmm(&dir).stop();
            quit_vmm(&dir, pid);
        }
        network::remove_tap(&network::tap_name(&instance.id))?;
        // A shared disk goes only with the instance: a host that forgets an instance which
        // moved on, or was restarted elsewhere, leaves it to the host running it.
        if instance.spec.pool == Pool::Shared && instance.desired == Desired::Deleted {
            let disk = self.disk_path(instance)?;
            match std::fs::remove_file(&disk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AgentError::Io(format!("removing {}: {e}", disk.display()))),
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::Io(format!("removing {}: {e}", dir.display()))),
        }
    }

    fn probe(&self, instance: &Instance) -> Probe {
        self.probe_vmm(&self.instance_dir(&instance.id), instance.status.pid)
    }

    fn exec(
        &self,
        instance: &Instance,
        argv: Vec<String>,
        stdin: Vec<u8>,
        limit: Duration,
    ) -> Result<ExecOutput, AgentError> {
        if !is_vmm_of(instance.status.pid, &self.instance_dir(&instance.id)) {
            return Err(AgentError::NotRunning);
        }
        // Patience for the program to start: a guest on a busy host (or an emulating one, PVM)
        // may take seconds to fork and exec; once it runs, only `limit` bounds it.
        let client = Client::new(self.instance_dir(&instance.id).join("vsock.sock"), EXEC_START_TIMEOUT);
        let timeout_ms = Some(limit.as_millis().try_into().unwrap_or(u64::MAX));
        let request = ExecRequest { argv, timeout_ms, ..Default::default() };
        let (mut stdout, mut stderr) = (Capped::default(), Capped::default());
        let input: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(stdin));
        let code = client
            .exec(&request, input, &mut stdout, &mut stderr)
            .map_err(|e| AgentError::Guest(e.to_string()))?;
        Ok(ExecOutput { code, stdout: stdout.0, stderr: stderr.0 })
    }

    fn console(&self, instance: &Instance) -> Result<Box<dyn ConsoleStream>, AgentError> {
        let path = self.instance_dir(&instance.id).join("console.sock");
        let stream = stratus_unix::connect(&path)
            .map_err(|e| AgentError::Io(format!("cannot reach the console {}: {e}", path.display())))?;
        Ok(Box::new(UnixConsole::from(stream)))
    }

    fn usage(&self, instances: &[Instance]) -> Vec<InstanceUsage> {
        instances
            .iter()
            .filter(|i| is_vmm_of(i.status.pid, &self.instance_dir(&i.id)))
            .map(|i| {
                let (cpu_seconds, memory_bytes) = process_usage(i.status.pid);
                InstanceUsage { id: i.id.clone(), cpu_seconds, memory_bytes }
            })
            .collect()
    }

    fn metrics(&self, instance: &Instance) -> Result<serde_json::Value, AgentError> {
        let dir = self.instance_dir(&instance.id);
        if !is_vmm_of(instance.status.pid, &dir) {
            return Err(AgentError::NotRunning);
        }
        let vmm = vmm(&dir).metrics()?;
        let (cpu_seconds, memory_bytes) = process_usage(instance.status.pid);
        Ok(json!({
            "cpu_seconds": cpu_seconds,
            "memory_bytes": memory_bytes,
            "guest_memory_bytes": instance.spec.memory_mib << 20,
            "vmm": vmm,
        }))
    }

    fn receive(
        &self,
        instance: &Instance,
        _image: &Image,
        network: &Network,
    ) -> Result<Incoming, AgentError> {
        let Some(address) = self.address.clone() else {
            return Err(AgentError::Io(format!(
                "host {} has no address other hosts reach it at (serve --listen on a non-loopback address)",
                self.hostname
            )));
        };
        let dir = self.instance_dir(&instance.id);
        if let Some(pid) = find_vmm(&dir, 0) {
            return Err(AgentError::Io(format!(
                "instance {} already has a VMM here (pid {pid})",
                instance.name
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Io(format!("creating {}: {e}", dir.display())))?;
        let disk = self.disk_path(instance)?;
        if instance.spec.pool == Pool::Shared {
            // The disk stays where it is, in use by the source until the guest pauses there.
            if !disk.exists() {
                return Err(AgentError::Io(format!(
                    "instance {}'s disk {} is not on this host's shared pool: do the hosts mount the same one?",
                    instance.name,
                    disk.display()
                )));
            }
        } else {
            // The source copies its disk into a file of the same size (holes stay holes).
            let file = std::fs::File::create(&disk)
                .map_err(|e| AgentError::Io(format!("creating {}: {e}", disk.display())))?;
            file.set_len(instance.spec.disk_mib << 20)
                .map_err(|e| AgentError::Io(format!("sizing {}: {e}", disk.display())))?;
        }
        let tap = guest_tap(instance, network)?;
        let port = std::net::TcpListener::bind((address.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| AgentError::Io(format!("finding a port on {address}: {e}")))?
            .port();
        let to = format!("tcp:{address}:{port}");
        let mut args = vec![
            "--incoming".to_string(),
            to.clone(),
            "--console".into(),
            format!("socket:{}", dir.join("console.sock").display()),
            "--net".into(),
            format!("tap={tap},mac={}", instance.status.mac),
            "--disk".into(),
            disk.display().to_string(),
            "--vsock".into(),
            format!("cid={},socket={}", guest_cid(instance), dir.join("vsock.sock").display()),
        ];
        args.extend(self.fence_args(instance));
        // Only the source this migration is for may send it: anyone else reaching the port
        // is refused, and the VMM waits on.
        let secret = format!("{}{}", stratus_api::model::new_id(), stratus_api::model::new_id());
        let secret_file = dir.join("migration.secret");
        crate::process::write_private(&secret_file, secret.as_bytes())
            .map_err(|e| AgentError::Io(format!("writing {}: {e}", secret_file.display())))?;
        args.extend(["--migration-secret-file".into(), secret_file.display().to_string()]);
        let pid = self.spawn_vmm_with(&dir, &args)?;
        Ok(Incoming { to, pid, secret })
    }

    fn send(&self, instance: &Instance, to: &str, secret: &str) -> Result<Moved, AgentError> {
        let dir = self.instance_dir(&instance.id);
        let Some(pid) = find_vmm(&dir, instance.status.pid) else { return Err(AgentError::NotRunning) };
        // A migration's length is the guest's memory and disk over the link: minutes at worst.
        let report = VmmClient::new(api_sock(&dir))
            .within(Duration::from_secs(1800))
            .migrate(&Migrate {
                to: to.to_owned(),
                // A shared disk is the destination's already.
                with_disks: Some(instance.spec.pool == Pool::Local),
                secret: (!secret.is_empty()).then(|| secret.to_owned()),
                ..Default::default()
            })
            .map_err(|e| AgentError::Vmm(format!("migrating to {to}: {e}")))?;
        // The guest runs at the destination: this copy is done with.
        quit_vmm(&dir, pid);
        let _ = network::remove_tap(&network::tap_name(&instance.id));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Moved { total_ms: report.total_ms, downtime_ms: report.downtime_ms, bytes: report.bytes_sent })
    }

    fn arrived(&self, instance: &Instance, limit: Duration) -> Result<u32, AgentError> {
        let dir = self.instance_dir(&instance.id);
        let deadline = Instant::now() + limit;
        loop {
            let Some(pid) = find_vmm(&dir, instance.status.pid) else {
                return Err(AgentError::Vmm(format!("the receiving VMM exited: {}", log_tail(&dir))));
            };
            if matches!(vmm_phase(&dir), Ok((Phase::Running, _))) {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                // Not (yet): the VMM still waits.
                return Err(AgentError::NotRunning);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn disk_layout(&self, instance: &Instance) -> Result<DiskLayout, AgentError> {
        let path = self.stopped_disk(instance)?;
        disk::layout(&path).map_err(|e| AgentError::Io(format!("reading {}: {e}", path.display())))
    }

    fn read_disk(&self, instance: &Instance, offset: u64, length: u64) -> Result<Vec<u8>, AgentError> {
        let path = self.stopped_disk(instance)?;
        disk::read_chunk(&path, offset, length.min(stratus_protocol::DISK_CHUNK))
            .map_err(|e| AgentError::Io(format!("reading {}: {e}", path.display())))
    }

    fn write_disk(&self, instance: &Instance, size: u64, offset: u64, data: &[u8]) -> Result<(), AgentError> {
        if size > MAX_DISK_BYTES || size == 0 {
            return Err(AgentError::Io(format!("a disk of {size} bytes is not taken")));
        }
        let dir = self.instance_dir(&instance.id);
        if find_vmm(&dir, instance.status.pid).is_some() {
            return Err(AgentError::Io(format!("instance {} runs here: its disk is in use", instance.name)));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Io(format!("creating {}: {e}", dir.display())))?;
        let path = self.disk_path(instance)?;
        disk::write_chunk(&path, size, offset, data)
            .map_err(|e| AgentError::Io(format!("writing {}: {e}", path.display())))
    }

    fn leftovers(&self, instance: &Instance) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(pid) = find_vmm(&self.instance_dir(&instance.id), instance.status.pid) {
            left.push(format!("VMM process {pid}"));
        }
        let tap = network::tap_name(&instance.id);
        if network::tap_exists(&tap) {
            left.push(format!("tap {tap}"));
        }
        let dir = self.instance_dir(&instance.id);
        if dir.exists() {
            left.push(format!("directory {}", dir.display()));
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn exec_output_is_capped() {
        let mut out = Capped::default();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(EXEC_OUTPUT_LIMIT >> 20) {
            out.write_all(&chunk).unwrap();
        }
        let err = out.write_all(b"one more").unwrap_err();
        assert!(err.to_string().contains("more than 16 MiB"), "{err}");
        assert_eq!(out.0.len(), EXEC_OUTPUT_LIMIT);
    }
}
