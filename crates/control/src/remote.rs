//! [`RemoteHost`]: a host the control plane drives through the agent protocol. It gives the
//! reconciler the same [`HostAgent`] calls as the local host (start, stop, remove, probe,
//! exec, ...) and makes each one an order of a new generation, then follows what the agent
//! observes until the order is carried out, passing the agent's events on as progress.

use base64::Engine;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stratus_protocol::{Agent, AgentError as WireError, ExecRequest, HostInfo, Observed, Phase, Wanted};

use stratus_agent::wire;
use stratus_agent::{AgentError, ExecOutput, HostAgent, Incoming, Moved, Probe, Started};
use stratus_api::model::{Host, Image, Instance, Network, WarmSnapshot};

/// How often an order's progress is asked for.
const POLL: Duration = Duration::from_millis(200);
/// How often a moved guest's arrival is asked for: the move's end waits on it.
const ARRIVAL_POLL: Duration = Duration::from_millis(5);
/// How long a start may take, the guest's boot included (the local agent gives the guest
/// agent 300 s), and how long the host may stay unreachable meanwhile.
const START_LIMIT: Duration = Duration::from_secs(360);
/// How long a stop or removal may take (the guest gets 30 s to power off).
const STOP_LIMIT: Duration = Duration::from_secs(90);

/// A host behind the agent protocol.
pub struct RemoteHost {
    name: String,
    agent: Arc<dyn Agent>,
    /// The last host report, for when the agent cannot be reached.
    known: Mutex<Option<HostInfo>>,
}

impl RemoteHost {
    /// Host `name`, reached through `agent`.
    pub fn new(name: &str, agent: Arc<dyn Agent>) -> RemoteHost {
        RemoteHost { name: name.to_string(), agent, known: Mutex::new(None) }
    }

    /// The protocol client underneath.
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }

    fn error(&self, error: WireError) -> AgentError {
        match error {
            WireError::NotRunning => AgentError::NotRunning,
            WireError::Unreachable(why) => {
                AgentError::Io(format!("host {} is unreachable ({why})", self.name))
            }
            WireError::Refused(why) => AgentError::Io(format!("host {} refused: {why}", self.name)),
            WireError::Failed(why) => AgentError::Io(why),
        }
    }

    /// Sends the order to make `instance` `wanted` at the next generation, then follows it
    /// until the agent has carried it out, `cancelled` says to give up waiting, or `limit`
    /// passes. Progress events go to `progress`.
    fn order(
        &self,
        instance: &Instance,
        (image, network, wanted): (&Image, &Network, Wanted),
        progress: &mut dyn FnMut(String),
        cancelled: &dyn Fn() -> bool,
        limit: Duration,
    ) -> Result<Observed, AgentError> {
        let current = self.agent.observe(&instance.id, u64::MAX).map_err(|e| self.error(e))?;
        let generation = current.generation + 1;
        let order = wire::order(instance, image, network, wanted, generation);
        let mut seen = current.last_seq;
        let deadline = Instant::now() + limit;
        let mut sent = false;
        loop {
            if !sent {
                match self.agent.ensure(&order) {
                    // Another order took this generation first (a concurrent stop, another
                    // replica): ours was ignored, and not carried out is not done.
                    Ok(observed) if observed.generation > generation || observed.wanted != Some(wanted) => {
                        return Err(AgentError::Io(format!(
                            "host {} took another order for {} at generation {}; try again",
                            self.name, instance.name, observed.generation
                        )))
                    }
                    Ok(_) => sent = true,
                    Err(WireError::Unreachable(_)) if Instant::now() < deadline => {}
                    Err(error) => return Err(self.error(error)),
                }
            }
            if sent {
                match self.agent.observe(&instance.id, seen) {
                    Ok(observed) => {
                        for event in &observed.events {
                            progress(event.message.clone());
                        }
                        seen = seen.max(observed.last_seq);
                        // An agent forgets an instance once it is gone: absent is done.
                        let gone = wanted == Wanted::Absent && observed.phase == Phase::Absent;
                        let ours = observed.wanted == Some(wanted);
                        if gone || (ours && observed.settled_at(generation)) {
                            return Ok(observed);
                        }
                    }
                    Err(WireError::Unreachable(why)) if Instant::now() >= deadline => {
                        return Err(self.error(WireError::Unreachable(why)))
                    }
                    Err(WireError::Unreachable(_)) => {}
                    Err(error) => return Err(self.error(error)),
                }
            }
            if cancelled() {
                return Err(AgentError::Cancelled);
            }
            if Instant::now() >= deadline {
                return Err(AgentError::Vmm(format!(
                    "host {} did not carry out the order within {} s",
                    self.name,
                    limit.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops or removes, with the instance's own image and network unknown here: an order to
    /// stop or remove needs neither, so placeholders stand in.
    fn order_down(&self, instance: &Instance, wanted: Wanted) -> Result<Observed, AgentError> {
        let image = placeholder_image(&instance.spec.image);
        let network = placeholder_network(&instance.spec.network);
        let observed =
            self.order(instance, (&image, &network, wanted), &mut |_| {}, &|| false, STOP_LIMIT)?;
        match observed.phase {
            Phase::Failed => Err(AgentError::Io(observed.message)),
            _ => Ok(observed),
        }
    }
}

/// An image record carrying only a name (for orders that stop or remove).
fn placeholder_image(name: &str) -> Image {
    Image {
        name: name.to_string(),
        project: stratus_api::model::DEFAULT_PROJECT.into(),
        kernel: String::new(),
        initrd: None,
        rootfs: String::new(),
        cmdline: String::new(),
        rootfs_bytes: 0,
        source: String::new(),
        created_at: 0,
        warm: None,
    }
}

/// A network record carrying only a name (for orders that stop or remove).
fn placeholder_network(name: &str) -> Network {
    Network {
        name: name.to_string(),
        project: stratus_api::model::DEFAULT_PROJECT.into(),
        bridge: String::new(),
        cidr: String::new(),
        gateway: String::new(),
        nat: false,
        created_at: 0,
        peers: Vec::new(),
    }
}

impl HostAgent for RemoteHost {
    fn host(&self) -> Host {
        match self.agent.host() {
            Ok(info) => {
                let host = wire::host_record(&info);
                *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                host
            }
            Err(_) => {
                let known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut host = known.as_ref().map(wire::host_record).unwrap_or_else(|| {
                    wire::host_record(&HostInfo {
                        name: self.name.clone(),
                        address: String::new(),
                        cpus: 0,
                        memory_mib: 0,
                        allocatable_mib: 0,
                        hypervisor: String::new(),
                        version: String::new(),
                        shared_pool: false,
                    })
                });
                host.seen_at = 0;
                host
            }
        }
    }

    fn prepare_networks(&self, networks: &[Network]) -> Result<(), AgentError> {
        let configs: Vec<_> = networks.iter().map(wire::network_config).collect();
        self.agent.set_networks(&configs).map_err(|e| self.error(e))
    }

    fn remove_network(&self, _network: &Network, remaining: &[Network]) -> Result<(), AgentError> {
        self.prepare_networks(remaining)
    }

    fn start(
        &self,
        instance: &Instance,
        image: &Image,
        network: &Network,
        progress: &mut dyn FnMut(String),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Started, AgentError> {
        let observed =
            self.order(instance, (image, network, Wanted::Running), progress, cancelled, START_LIMIT)?;
        match observed.phase {
            Phase::Running => {
                let boot = observed.boot.unwrap_or(stratus_protocol::BootReport {
                    ms: 0,
                    kind: "cold".into(),
                    detail: String::new(),
                });
                Ok(Started {
                    pid: observed.pid,
                    boot: Duration::from_millis(boot.ms),
                    kind: if boot.kind == "warm" { "warm" } else { "cold" },
                    detail: boot.detail,
                })
            }
            Phase::Stopped => Err(AgentError::Cancelled),
            _ => Err(AgentError::Io(observed.message)),
        }
    }

    fn warm(
        &self,
        image: &Image,
        _network: &Network,
        _progress: &mut dyn FnMut(String),
    ) -> Result<WarmSnapshot, AgentError> {
        Err(AgentError::Io(format!(
            "image {}: warm snapshots are made on the control plane's own host",
            image.name
        )))
    }

    fn stop(&self, instance: &Instance) -> Result<(), AgentError> {
        self.order_down(instance, Wanted::Stopped).map(drop)
    }

    fn remove(&self, instance: &Instance) -> Result<(), AgentError> {
        self.order_down(instance, Wanted::Absent).map(drop)
    }

    fn probe(&self, instance: &Instance) -> Probe {
        match self.agent.observe(&instance.id, u64::MAX) {
            Ok(observed) => match observed.phase {
                Phase::Running | Phase::Starting | Phase::Stopping => Probe::Running,
                Phase::Down => Probe::Down { cause: observed.message, clean: observed.clean },
                other => Probe::Down {
                    cause: format!(
                        "host {} reports it {}{}",
                        self.name,
                        format!("{other:?}").to_lowercase(),
                        if observed.message.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", observed.message)
                        }
                    ),
                    clean: false,
                },
            },
            // Nothing is known: not a reason to start it anywhere else (that is for the HA
            // policy, after the host's lease has expired).
            Err(_) => Probe::Running,
        }
    }

    fn exec(
        &self,
        instance: &Instance,
        argv: Vec<String>,
        stdin: Vec<u8>,
        limit: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let request =
            ExecRequest { argv, stdin, timeout_ms: limit.as_millis().try_into().unwrap_or(u64::MAX) };
        let output = self.agent.exec(&instance.id, &request).map_err(|e| self.error(e))?;
        Ok(ExecOutput { code: output.code, stdout: output.stdout, stderr: output.stderr })
    }

    fn console(
        &self,
        instance: &Instance,
    ) -> Result<Box<dyn stratus_protocol::console::ConsoleStream>, AgentError> {
        self.agent.console(&instance.id).map_err(|e| self.error(e))
    }

    fn metrics(&self, instance: &Instance) -> Result<serde_json::Value, AgentError> {
        self.agent.metrics(&instance.id).map_err(|e| self.error(e))
    }

    fn usage(&self, _instances: &[Instance]) -> Vec<stratus_protocol::InstanceUsage> {
        // The agent knows what runs there; a host that does not answer has no usage to give.
        self.agent.usage().unwrap_or_default()
    }

    fn receive(&self, instance: &Instance, image: &Image, network: &Network) -> Result<Incoming, AgentError> {
        let current = self.agent.observe(&instance.id, u64::MAX).map_err(|e| self.error(e))?;
        let order = wire::order(instance, image, network, Wanted::Running, current.generation + 1);
        let incoming = self.agent.receive(&order).map_err(|e| self.error(e))?;
        Ok(Incoming { to: incoming.to, pid: incoming.pid, secret: incoming.secret })
    }

    fn send(&self, instance: &Instance, to: &str, secret: &str) -> Result<Moved, AgentError> {
        let report = self.agent.send(&instance.id, to, secret).map_err(|e| self.error(e))?;
        Ok(Moved { total_ms: report.total_ms, downtime_ms: report.downtime_ms, bytes: report.bytes })
    }

    fn arrived(&self, instance: &Instance, limit: Duration) -> Result<u32, AgentError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.agent.observe(&instance.id, u64::MAX) {
                Ok(observed) if observed.phase == Phase::Running => return Ok(observed.pid),
                Ok(observed) if observed.phase == Phase::Failed => {
                    return Err(AgentError::Io(observed.message))
                }
                Ok(observed) if observed.phase == Phase::Absent => {
                    return Err(AgentError::Io(format!("host {} holds nothing of the instance", self.name)))
                }
                Ok(_) | Err(WireError::Unreachable(_)) => {}
                Err(error) => return Err(self.error(error)),
            }
            if Instant::now() >= deadline {
                return Err(AgentError::NotRunning);
            }
            std::thread::sleep(ARRIVAL_POLL);
        }
    }

    fn leftovers(&self, instance: &Instance) -> Vec<String> {
        match self.agent.observe(&instance.id, u64::MAX) {
            Ok(observed) if observed.phase == Phase::Absent => Vec::new(),
            Ok(observed) => {
                vec![format!("instance {} on host {} ({:?})", instance.name, self.name, observed.phase)]
            }
            Err(e) => vec![format!("host {}: {e}", self.name)],
        }
    }

    fn disk_layout(&self, instance: &Instance) -> Result<stratus_protocol::DiskLayout, AgentError> {
        self.agent.disk_layout(&instance.id).map_err(|e| self.error(e))
    }

    fn read_disk(&self, instance: &Instance, offset: u64, length: u64) -> Result<Vec<u8>, AgentError> {
        let chunk = self.agent.read_disk(&instance.id, offset, length).map_err(|e| self.error(e))?;
        base64::engine::general_purpose::STANDARD
            .decode(&chunk.data)
            .map_err(|e| AgentError::Io(format!("host {}: a disk chunk that is not base64: {e}", self.name)))
    }

    fn write_disk(&self, instance: &Instance, size: u64, offset: u64, data: &[u8]) -> Result<(), AgentError> {
        let chunk = stratus_protocol::DiskChunk {
            offset,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        };
        self.agent.write_disk(&instance.id, size, &chunk).map_err(|e| self.error(e))
    }
}
