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
use stratus_guest_agent::{Client, ExecRequest};
use stratus_vmm::api::http;

use crate::disk::{self, CloneKind};
use crate::model::{Host, Image, Instance, Network};
use crate::network::{self, Subnet};

/// The guest agent's answer must come within this after the VMM starts.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest gets to power off after the power button before it is stopped hard.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
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

/// What a started instance looks like.
#[derive(Clone, Debug)]
pub struct Started {
    /// The VMM's pid.
    pub pid: u32,
    /// VMM start to guest agent answering.
    pub boot: Duration,
    /// "cold" or "warm".
    pub kind: &'static str,
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

/// The seam between the control plane and a host.
pub trait HostAgent: Send + Sync {
    /// The host's name and capacity (allocation is filled in by the control plane).
    fn host(&self) -> Host;
    /// Creates the bridges of `networks` and applies NAT for them.
    fn prepare_networks(&self, networks: &[Network]) -> Result<(), AgentError>;
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
    /// Stops the VMM: power button, then hard after a grace period. The disk stays.
    fn stop(&self, instance: &Instance) -> Result<(), AgentError>;
    /// Stops the VMM if it runs and removes the tap, disk and directory.
    fn remove(&self, instance: &Instance) -> Result<(), AgentError>;
    /// Whether the instance's VMM still runs its guest.
    fn probe(&self, instance: &Instance) -> Probe;
    /// Runs a command in the guest through its agent.
    fn exec(&self, instance: &Instance, argv: Vec<String>, stdin: Vec<u8>) -> Result<ExecOutput, AgentError>;
    /// The Unix socket of the instance's serial console.
    fn console_socket(&self, instance: &Instance) -> PathBuf;
    /// The VMM's metrics document.
    fn metrics(&self, instance: &Instance) -> Result<serde_json::Value, AgentError>;
    /// Whether the instance's files and devices are all gone (for delete's no-leftovers check).
    fn leftovers(&self, instance: &Instance) -> Vec<String>;
}

/// The agent of the machine `serve` runs on.
pub struct LocalAgent {
    data_dir: PathBuf,
    vmm_binary: PathBuf,
    hostname: String,
    /// VMMs this process started, to reap them; VMMs adopted after a restart are not our
    /// children (init reaps them).
    children: Arc<Mutex<HashMap<u32, Child>>>,
    /// Exit statuses of reaped children, by pid.
    exits: Arc<Mutex<HashMap<u32, std::process::ExitStatus>>>,
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
            children: Arc::default(),
            exits: Arc::default(),
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

    /// The directory of instance `id`.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("instances").join(id)
    }

    fn api_sock(&self, id: &str) -> PathBuf {
        self.instance_dir(id).join("api.sock")
    }

    /// Whether `pid` is the VMM of instance `id` (not a recycled pid).
    fn is_our_vmm(&self, pid: u32, id: &str) -> bool {
        if pid == 0 {
            return false;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        let want = self.api_sock(id);
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // A zombie (state Z) has exited.
        let zombie = state.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
        !zombie && cmdline.split(|b| *b == 0).any(|arg| arg == want.as_os_str().as_encoded_bytes())
    }

    fn vmm_call(
        &self,
        id: &str,
        method: &str,
        target: &str,
        body: Option<String>,
    ) -> Result<serde_json::Value, AgentError> {
        let response = http::call(&self.api_sock(id), method, target, body.as_deref())
            .map_err(|e| AgentError::Vmm(e.to_string()))?;
        let value: serde_json::Value = if response.body.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&response.body).unwrap_or(serde_json::Value::String(response.body.clone()))
        };
        if response.status >= 300 {
            let message = value.get("error").and_then(|e| e.as_str()).unwrap_or(&response.body).to_owned();
            return Err(AgentError::Vmm(format!("{method} {target}: {message}")));
        }
        Ok(value)
    }

    fn spawn_vmm(&self, id: &str) -> Result<u32, AgentError> {
        let dir = self.instance_dir(id);
        let log_path = dir.join("vmm.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| AgentError::Io(format!("opening {}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(|e| AgentError::Io(e.to_string()))?;
        let api = self.api_sock(id);
        let _ = std::fs::remove_file(&api);
        let mut command = Command::new(&self.vmm_binary);
        command.arg("vmm").arg("--api-sock").arg(&api).stdin(Stdio::null()).stdout(log).stderr(log2);
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
            if std::os::unix::net::UnixStream::connect(&api).is_ok() {
                return Ok(pid);
            }
            if !self.is_our_vmm(pid, id) {
                return Err(AgentError::Vmm(format!("the VMM exited at start: {}", self.log_tail(id))));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        kill(pid);
        Err(AgentError::Vmm("the VMM did not open its API socket within 10 s".into()))
    }

    /// The last line the VMM printed, for error messages.
    fn log_tail(&self, id: &str) -> String {
        let text = std::fs::read_to_string(self.instance_dir(id).join("vmm.log")).unwrap_or_default();
        text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_owned()
    }

    fn configure_vmm(&self, instance: &Instance, image: &Image, network: &Network) -> Result<(), AgentError> {
        let id = &instance.id;
        let dir = self.instance_dir(id);
        let subnet = Subnet::parse(&network.cidr)?;
        let cmdline = format!(
            "{} root=/dev/vda rw stratus.hostname={} stratus.ip={}/{} stratus.gw={}",
            image.cmdline, instance.name, instance.status.ip, subnet.prefix, network.gateway
        );
        let calls = [
            ("/vm/machine", json!({"vcpus": instance.spec.cpus, "memory_mib": instance.spec.memory_mib})),
            ("/vm/boot", json!({"kernel": image.kernel, "initrd": image.initrd, "cmdline": cmdline})),
            ("/vm/drives/vda", json!({"path": dir.join("disk.raw")})),
            ("/vm/nets/eth0", json!({"tap": network::tap_name(id), "mac": instance.status.mac})),
            ("/vm/vsock", json!({"cid": 3, "socket": dir.join("vsock.sock")})),
            ("/vm/rng", json!({"enabled": true})),
            ("/vm/console", json!({"kind": "socket", "path": dir.join("console.sock")})),
        ];
        for (target, body) in calls {
            self.vmm_call(id, "PUT", target, Some(body.to_string()))?;
        }
        self.vmm_call(id, "POST", "/vm/start", None)?;
        Ok(())
    }

    fn wait_for_guest(
        &self,
        instance: &Instance,
        started: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), AgentError> {
        let client = Client::new(self.instance_dir(&instance.id).join("vsock.sock"), Duration::from_secs(2));
        loop {
            match client.info() {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if cancelled() {
                        return Err(AgentError::Cancelled);
                    }
                    if let Probe::Down { cause, .. } = self.probe(instance) {
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
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn quit_vmm(&self, instance: &Instance) {
        let pid = instance.status.pid;
        let _ = self.vmm_call(&instance.id, "POST", "/vmm/quit", None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_our_vmm(pid, &instance.id) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.is_our_vmm(pid, &instance.id) {
            kill(pid);
        }
    }

    fn vmm_phase(&self, id: &str) -> Result<(String, Option<String>), AgentError> {
        let info = self.vmm_call(id, "GET", "/vm", None)?;
        let phase = info.get("state").and_then(|s| s.as_str()).unwrap_or("unknown").to_owned();
        let reason = info.get("exit_reason").and_then(|s| s.as_str()).map(str::to_owned);
        Ok((phase, reason))
    }
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
            seen_at: crate::model::now(),
        }
    }

    fn prepare_networks(&self, networks: &[Network]) -> Result<(), AgentError> {
        for net in networks {
            network::ensure_bridge(net)?;
        }
        network::apply_nat(networks)?;
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
        if self.is_our_vmm(instance.status.pid, id) {
            // A VMM left from an interrupted start: begin again from a clean process.
            self.quit_vmm(instance);
        }
        let disk_path = dir.join("disk.raw");
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
        network::ensure_tap(&network::tap_name(id), &network.bridge)?;
        let started = Instant::now();
        let pid = self.spawn_vmm(id)?;
        if let Err(e) = self.configure_vmm(instance, image, network) {
            kill(pid);
            return Err(e);
        }
        progress(format!("VMM started (pid {pid}), booting"));
        let mut running = instance.clone();
        running.status.pid = pid;
        if let Err(e) = self.wait_for_guest(&running, started, cancelled) {
            self.quit_vmm(&running);
            return Err(e);
        }
        Ok(Started { pid, boot: started.elapsed(), kind: "cold" })
    }

    fn stop(&self, instance: &Instance) -> Result<(), AgentError> {
        if !self.is_our_vmm(instance.status.pid, &instance.id) {
            return Ok(());
        }
        if let Ok((phase, _)) = self.vmm_phase(&instance.id) {
            if phase == "running" && self.vmm_call(&instance.id, "POST", "/vm/shutdown", None).is_ok() {
                let deadline = Instant::now() + SHUTDOWN_GRACE;
                while Instant::now() < deadline {
                    match self.vmm_phase(&instance.id) {
                        Ok((phase, _)) if phase == "running" => {
                            std::thread::sleep(Duration::from_millis(100))
                        }
                        _ => break,
                    }
                }
            }
        }
        let _ = self.vmm_call(&instance.id, "POST", "/vm/stop", None);
        self.quit_vmm(instance);
        Ok(())
    }

    fn remove(&self, instance: &Instance) -> Result<(), AgentError> {
        if self.is_our_vmm(instance.status.pid, &instance.id) {
            let _ = self.vmm_call(&instance.id, "POST", "/vm/stop", None);
            self.quit_vmm(instance);
        }
        network::remove_tap(&network::tap_name(&instance.id))?;
        let dir = self.instance_dir(&instance.id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AgentError::Io(format!("removing {}: {e}", dir.display()))),
        }
    }

    fn probe(&self, instance: &Instance) -> Probe {
        let pid = instance.status.pid;
        if !self.is_our_vmm(pid, &instance.id) {
            let status = self.exits.lock().unwrap_or_else(|p| p.into_inner()).get(&pid).copied();
            let how = match status {
                Some(s) => format!("the VMM exited ({s})"),
                None => "the VMM process is gone".to_owned(),
            };
            return Probe::Down {
                cause: format!("{how}; its last words: {}", self.log_tail(&instance.id)),
                clean: false,
            };
        }
        match self.vmm_phase(&instance.id) {
            Ok((phase, _)) if phase == "running" || phase == "paused" => Probe::Running,
            Ok((_, reason)) => {
                let reason = reason.unwrap_or_else(|| "stopped".into());
                Probe::Down { clean: reason == "guest powered off", cause: reason }
            }
            // Alive but not answering (busy): not a reason to declare it dead.
            Err(_) => Probe::Running,
        }
    }

    fn exec(&self, instance: &Instance, argv: Vec<String>, stdin: Vec<u8>) -> Result<ExecOutput, AgentError> {
        if !self.is_our_vmm(instance.status.pid, &instance.id) {
            return Err(AgentError::NotRunning);
        }
        let client = Client::new(self.instance_dir(&instance.id).join("vsock.sock"), Duration::from_secs(10));
        let request = ExecRequest { argv, env: Vec::new(), cwd: None };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let input: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(stdin));
        let code = client
            .exec(&request, input, &mut stdout, &mut stderr)
            .map_err(|e| AgentError::Guest(e.to_string()))?;
        Ok(ExecOutput { code, stdout, stderr })
    }

    fn console_socket(&self, instance: &Instance) -> PathBuf {
        self.instance_dir(&instance.id).join("console.sock")
    }

    fn metrics(&self, instance: &Instance) -> Result<serde_json::Value, AgentError> {
        if !self.is_our_vmm(instance.status.pid, &instance.id) {
            return Err(AgentError::NotRunning);
        }
        self.vmm_call(&instance.id, "GET", "/metrics", None)
    }

    fn leftovers(&self, instance: &Instance) -> Vec<String> {
        let mut left = Vec::new();
        if self.is_our_vmm(instance.status.pid, &instance.id) {
            left.push(format!("VMM process {}", instance.status.pid));
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
