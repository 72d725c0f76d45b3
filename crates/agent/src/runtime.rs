//! The host agent's side of the protocol: [`AgentRuntime`] takes level-triggered orders
//! ([`InstanceOrder`]) and works towards each on a thread of its own through the host's
//! [`HostAgent`] (the VMMs, disks and taps of this machine), keeping what it observed.
//!
//! Orders and observations are kept in `DIR/ID.json`, so an agent restarted (or killed) finds
//! its instances again: it re-adopts the VMMs still running (they live in their own sessions)
//! and reports the ones that died meanwhile as down. It never starts a second VMM for an
//! instance: a start finds a VMM left over by an interrupted start and replaces it.

use base64::Engine;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stratus_protocol::{
    Agent, AgentError as WireError, AgentEvent, BootReport, ExecOutput, ExecRequest, HostInfo, Incoming,
    InstanceOrder, MoveReport, NetworkConfig, Observed, Phase, Wanted,
};

use crate::wire;
use crate::{AgentError, HostAgent, Probe};

/// Events kept per instance for the control plane to collect.
const EVENTS_KEPT: usize = 200;

/// What the runtime keeps of one instance, and writes down.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    order: InstanceOrder,
    phase: Phase,
    #[serde(default)]
    message: String,
    #[serde(default)]
    clean: bool,
    #[serde(default)]
    pid: u32,
    /// Unix seconds of the last successful start (0: never).
    #[serde(default)]
    started_at: u64,
    #[serde(default)]
    boot: Option<BootReport>,
    /// A VMM waits here for the instance's migration (its disk is empty until it arrives).
    #[serde(default)]
    receiving: bool,
}

struct Slot {
    record: Record,
    events: VecDeque<AgentEvent>,
    /// A worker thread is on it.
    busy: bool,
}

/// The host agent: orders in, work done through `driver`, observations out.
pub struct AgentRuntime {
    driver: Arc<dyn HostAgent>,
    address: String,
    dir: PathBuf,
    slots: Mutex<HashMap<String, Slot>>,
    networks: Mutex<Vec<NetworkConfig>>,
    seq: AtomicU64,
    /// Held across a record's snapshot, write and rename: writes never cross.
    writing: Mutex<()>,
    /// This host's copies of images (`None`: boot from the paths orders give, as `serve`'s
    /// own host and tests do).
    images: std::sync::OnceLock<Arc<crate::images::HostImages>>,
}

impl AgentRuntime {
    /// A runtime keeping its records in `dir` (created), working through `driver`, reachable
    /// at `address` (reported in [`HostInfo`]). Records of an earlier run are loaded and each
    /// instance's VMM re-adopted, or reported down.
    pub fn new(driver: Arc<dyn HostAgent>, dir: &Path, address: &str) -> Result<Arc<AgentRuntime>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // Sequence numbers grow across restarts: they start from the clock.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64 * 1000);
        let runtime = Arc::new(AgentRuntime {
            driver,
            address: address.to_string(),
            dir: dir.to_path_buf(),
            slots: Mutex::default(),
            networks: Mutex::default(),
            seq: AtomicU64::new(start),
            writing: Mutex::default(),
            images: std::sync::OnceLock::new(),
        });
        let networks: Vec<NetworkConfig> = std::fs::read(dir.join("networks.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        *runtime.networks.lock().unwrap_or_else(|p| p.into_inner()) = networks;
        for entry in std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?.flatten()
        {
            let path = entry.path();
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
            if path.extension().is_none_or(|e| e != "json") || stratus_protocol::check_id(&id).is_err() {
                continue;
            }
            let Some(mut record) =
                std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
            else {
                eprintln!("stratus agent: ignoring unreadable record {}", path.display());
                continue;
            };
            // Work cut short by the restart is done again; a VMM that ran is looked for. A
            // migration that was arriving is not started from its empty disk: it arrived (its
            // VMM runs the guest) or it failed.
            record.phase = match record.phase {
                _ if record.receiving => {
                    let instance = wire::instance_record(&record.order, record.pid, record.started_at);
                    let arrived =
                        record.pid != 0 && runtime.driver.arrived(&instance, Duration::ZERO).is_ok();
                    record.receiving = false;
                    if arrived {
                        Phase::Running
                    } else {
                        record.message = "the migration was cut short by an agent restart".into();
                        Phase::Failed
                    }
                }
                Phase::Running | Phase::Starting if record.pid != 0 => {
                    let instance = wire::instance_record(&record.order, record.pid, record.started_at);
                    match runtime.driver.probe(&instance) {
                        Probe::Running => Phase::Running,
                        Probe::Down { cause, clean } => {
                            record.message = cause;
                            record.clean = clean;
                            record.pid = 0;
                            Phase::Down
                        }
                    }
                }
                Phase::Starting => Phase::Stopped,
                Phase::Stopping => Phase::Running,
                other => other,
            };
            let slot = Slot { record, events: VecDeque::new(), busy: false };
            runtime.slots().insert(id.clone(), slot);
            runtime.persist(&id);
            runtime.kick(&id);
        }
        Ok(runtime)
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds an event to instance `id`'s log.
    fn event(&self, id: &str, level: &str, message: impl Into<String>) {
        let seq = self.next_seq();
        if let Some(slot) = self.slots().get_mut(id) {
            if slot.events.len() == EVENTS_KEPT {
                slot.events.pop_front();
            }
            slot.events.push_back(AgentEvent { seq, level: level.into(), message: message.into() });
        }
    }

    /// Writes instance `id`'s record (or removes it once the instance is absent for good).
    fn persist(&self, id: &str) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(format!("{id}.json"));
        let record = self.slots().get(id).map(|slot| slot.record.clone());
        match record {
            Some(record) if !(record.phase == Phase::Absent && record.order.wanted == Wanted::Absent) => {
                let temporary = self.dir.join(format!(".{id}.json.new"));
                let written = serde_json::to_vec(&record)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| std::fs::write(&temporary, bytes))
                    .and_then(|()| std::fs::rename(&temporary, &path));
                if let Err(e) = written {
                    eprintln!("stratus agent: writing {}: {e}", path.display());
                }
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Starts a worker for instance `id` unless one is on it already.
    fn kick(self: &Arc<Self>, id: &str) {
        {
            let mut slots = self.slots();
            let Some(slot) = slots.get_mut(id) else { return };
            if slot.busy || settled(&slot.record, None) {
                return;
            }
            slot.busy = true;
        }
        let this = Arc::clone(self);
        let id = id.to_string();
        let spawned = std::thread::Builder::new().name(format!("agent-{}", &id[..id.len().min(8)])).spawn({
            let id = id.clone();
            move || this.work(&id)
        });
        if let Err(e) = spawned {
            eprintln!("stratus agent: cannot start a worker: {e}");
            if let Some(slot) = self.slots().get_mut(&id) {
                slot.busy = false;
            }
        }
    }

    /// Works on instance `id` until its record matches its order (or the order failed).
    fn work(self: &Arc<Self>, id: &str) {
        let mut attempted = None;
        loop {
            let record = {
                let mut slots = self.slots();
                let Some(slot) = slots.get_mut(id) else { return };
                if settled(&slot.record, attempted) {
                    slot.busy = false;
                    let gone =
                        slot.record.phase == Phase::Absent && slot.record.order.wanted == Wanted::Absent;
                    if gone {
                        // Forgotten under the same lock: a newer order cannot slip in between.
                        slots.remove(id);
                        drop(slots);
                        self.persist(id);
                    }
                    return;
                }
                slot.record.clone()
            };
            attempted = Some(record.order.generation);
            let order = &record.order;
            let instance = wire::instance_record(order, record.pid, record.started_at);
            match order.wanted {
                Wanted::Running => self.start(id, &record, &instance),
                Wanted::Stopped => {
                    self.set_phase(id, order.generation, Phase::Stopping, |_| {});
                    let result = self.driver.stop(&instance);
                    self.finish(id, order.generation, result.map(|()| Phase::Stopped), "stopped");
                }
                Wanted::Absent => {
                    self.set_phase(id, order.generation, Phase::Stopping, |_| {});
                    let result = self.driver.remove(&instance);
                    self.finish(id, order.generation, result.map(|()| Phase::Absent), "removed");
                }
            }
        }
    }

    /// Boots instances from this host's own copies of their images, fetched on first use.
    pub fn use_images(&self, images: Arc<crate::images::HostImages>) {
        let _ = self.images.set(images);
    }

    fn start(self: &Arc<Self>, id: &str, record: &Record, instance: &stratus_api::model::Instance) {
        let order = &record.order;
        let generation = order.generation;
        self.set_phase(id, generation, Phase::Starting, |_| {});
        let image = wire::image_record(&order.image);
        let network = wire::network_record(&order.network);
        let mut progress = |message: String| self.event(id, "info", message);
        // A newer order (a stop, a delete) calls the boot off.
        let cancelled = || self.slots().get(id).is_none_or(|slot| slot.record.order.generation != generation);
        let local = match self.images.get() {
            Some(images) => images.local(&image, &network, &mut progress).map_err(AgentError::Io),
            None => Ok(image),
        };
        let result =
            local.and_then(|image| self.driver.start(instance, &image, &network, &mut progress, &cancelled));
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(id) else { return };
        let record = &mut slot.record;
        match result {
            Ok(started) => {
                record.phase = Phase::Running;
                record.pid = started.pid;
                record.started_at = stratus_api::model::now();
                record.message.clear();
                record.clean = false;
                record.boot = Some(BootReport {
                    ms: started.boot.as_millis() as u64,
                    kind: started.kind.to_string(),
                    detail: started.detail,
                });
            }
            Err(AgentError::Cancelled) => {
                record.phase = Phase::Stopped;
                record.pid = 0;
            }
            Err(error) => {
                record.phase = Phase::Failed;
                record.pid = 0;
                record.message = error.to_string();
            }
        }
        drop(slots);
        self.persist(id);
    }

    /// Sets the phase if the order is still `generation`'s.
    fn set_phase(&self, id: &str, generation: u64, phase: Phase, also: impl FnOnce(&mut Record)) {
        if let Some(slot) = self.slots().get_mut(id) {
            if slot.record.order.generation == generation {
                slot.record.phase = phase;
                also(&mut slot.record);
            }
        }
        self.persist(id);
    }

    /// Records how a stop or remove ended.
    fn finish(&self, id: &str, generation: u64, result: Result<Phase, AgentError>, done: &str) {
        match result {
            Ok(phase) => {
                self.set_phase(id, generation, phase, |record| {
                    record.pid = 0;
                    record.message.clear();
                });
                self.event(id, "info", done);
            }
            Err(error) => {
                let message = error.to_string();
                self.event(id, "error", format!("{done} failed: {message}"));
                self.set_phase(id, generation, Phase::Failed, |record| record.message = message);
            }
        }
    }

    fn observed(&self, id: &str, after: u64) -> Observed {
        match self.slots().get(id) {
            None => Observed::absent(id),
            Some(slot) => {
                let record = &slot.record;
                Observed {
                    id: id.to_string(),
                    generation: record.order.generation,
                    wanted: Some(record.order.wanted),
                    phase: record.phase,
                    message: record.message.clone(),
                    clean: record.clean,
                    pid: record.pid,
                    boot: record.boot.clone(),
                    events: slot.events.iter().filter(|e| e.seq > after).cloned().collect(),
                    last_seq: slot.events.back().map_or(0, |e| e.seq),
                }
            }
        }
    }

    /// Looks at a running instance's VMM: a VMM gone or a guest stopped turns it `Down`.
    fn probe(&self, id: &str) {
        let record = match self.slots().get(id) {
            Some(slot) if slot.record.phase == Phase::Running && !slot.busy => slot.record.clone(),
            _ => return,
        };
        let instance = wire::instance_record(&record.order, record.pid, record.started_at);
        let Probe::Down { cause, clean } = self.driver.probe(&instance) else { return };
        let changed = {
            let mut slots = self.slots();
            match slots.get_mut(id) {
                Some(slot)
                    if slot.record.phase == Phase::Running
                        && slot.record.order.generation == record.order.generation =>
                {
                    slot.record.phase = Phase::Down;
                    slot.record.message = cause.clone();
                    slot.record.clean = clean;
                    slot.record.pid = 0;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.persist(id);
        }
    }

    /// The instance as the driver's calls need it, if it runs.
    /// Instance `id`, held here stopped (its disk neither in use nor being made).
    fn stopped_instance(&self, id: &str) -> Result<stratus_api::model::Instance, WireError> {
        stratus_protocol::check_id(id)?;
        match self.slots().get(id) {
            // Absent under a stop order: held here, never started (a cold move's destination).
            Some(slot)
                if slot.record.order.wanted == Wanted::Stopped
                    && matches!(slot.record.phase, Phase::Stopped | Phase::Absent)
                    && !slot.busy =>
            {
                Ok(wire::instance_record(&slot.record.order, 0, slot.record.started_at))
            }
            Some(slot) => Err(WireError::Refused(format!(
                "instance {} is {:?} here, not stopped",
                slot.record.order.name, slot.record.phase
            ))),
            None => Err(WireError::Refused(format!("no instance {id} here"))),
        }
    }

    fn running_instance(&self, id: &str) -> Result<stratus_api::model::Instance, WireError> {
        match self.slots().get(id) {
            Some(slot) if slot.record.phase == Phase::Running => {
                Ok(wire::instance_record(&slot.record.order, slot.record.pid, slot.record.started_at))
            }
            _ => Err(WireError::NotRunning),
        }
    }
}

/// Whether `record` needs no (more) work: it matches its order, or the order's one attempt
/// (`attempted` generation) failed and waits for a newer order.
fn settled(record: &Record, attempted: Option<u64>) -> bool {
    let phase = record.phase;
    match record.order.wanted {
        Wanted::Running => {
            phase == Phase::Running
                || (phase == Phase::Failed && attempted == Some(record.order.generation))
                // Went down on its own: the control plane decides whether it starts again.
                || (phase == Phase::Down && attempted.is_none())
        }
        Wanted::Stopped => {
            matches!(phase, Phase::Stopped | Phase::Absent)
                || (phase == Phase::Failed && attempted == Some(record.order.generation))
        }
        Wanted::Absent => {
            phase == Phase::Absent || (phase == Phase::Failed && attempted == Some(record.order.generation))
        }
    }
}

/// The driver's error as the protocol's.
fn wire_error(error: AgentError) -> WireError {
    match error {
        AgentError::NotRunning => WireError::NotRunning,
        other => WireError::Failed(other.to_string()),
    }
}

/// The runtime as the protocol's [`Agent`]; an `Arc` because workers outlive the call.
pub struct RuntimeAgent(pub Arc<AgentRuntime>);

impl Agent for RuntimeAgent {
    fn host(&self) -> Result<HostInfo, WireError> {
        Ok(wire::host_info(&self.0.driver.host(), &self.0.address))
    }

    fn set_networks(&self, networks: &[NetworkConfig]) -> Result<(), WireError> {
        let runtime = &self.0;
        let mut held = runtime.networks.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: Vec<_> = networks.iter().map(wire::network_record).collect();
        for old in held.iter().filter(|old| !networks.iter().any(|n| n.name == old.name)) {
            runtime.driver.remove_network(&wire::network_record(old), &wanted).map_err(wire_error)?;
        }
        runtime.driver.prepare_networks(&wanted).map_err(wire_error)?;
        *held = networks.to_vec();
        let bytes = serde_json::to_vec(networks).map_err(|e| WireError::Failed(e.to_string()))?;
        std::fs::write(runtime.dir.join("networks.json"), bytes)
            .map_err(|e| WireError::Failed(format!("recording the networks: {e}")))
    }

    fn ensure(&self, order: &InstanceOrder) -> Result<Observed, WireError> {
        stratus_protocol::check_id(&order.id)?;
        let runtime = &self.0;
        {
            let mut slots = runtime.slots();
            if let Some(slot) = slots.get(&order.id) {
                if slot.record.order.generation >= order.generation {
                    drop(slots);
                    return Ok(runtime.observed(&order.id, u64::MAX));
                }
            }
            let slot = slots.entry(order.id.clone()).or_insert_with(|| Slot {
                record: Record {
                    order: order.clone(),
                    phase: Phase::Absent,
                    message: String::new(),
                    clean: false,
                    pid: 0,
                    started_at: 0,
                    boot: None,
                    receiving: false,
                },
                events: VecDeque::new(),
                busy: false,
            });
            slot.record.order = order.clone();
            // A new order to run what failed or went down starts it again (a start replaces
            // a VMM left behind); to stop or remove it, the VMM left behind is stopped.
            if matches!(slot.record.phase, Phase::Failed | Phase::Down) && order.wanted == Wanted::Running {
                slot.record.phase = Phase::Stopped;
                slot.record.message.clear();
            }
            // Work is under way from now on, as the answer and the next observation say.
            if !settled(&slot.record, None) {
                slot.record.phase = match order.wanted {
                    Wanted::Running => Phase::Starting,
                    Wanted::Stopped | Wanted::Absent => Phase::Stopping,
                };
            }
        }
        runtime.persist(&order.id);
        runtime.kick(&order.id);
        Ok(runtime.observed(&order.id, u64::MAX))
    }

    fn observe(&self, id: &str, after: u64) -> Result<Observed, WireError> {
        stratus_protocol::check_id(id)?;
        self.0.probe(id);
        Ok(self.0.observed(id, after))
    }

    fn instances(&self) -> Result<Vec<Observed>, WireError> {
        let ids: Vec<String> = self.0.slots().keys().cloned().collect();
        Ok(ids.iter().map(|id| self.0.observed(id, u64::MAX)).collect())
    }

    fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecOutput, WireError> {
        let instance = self.0.running_instance(id)?;
        let output = self
            .0
            .driver
            .exec(
                &instance,
                request.argv.clone(),
                request.stdin.clone(),
                Duration::from_millis(request.timeout_ms),
            )
            .map_err(wire_error)?;
        Ok(ExecOutput { code: output.code, stdout: output.stdout, stderr: output.stderr })
    }

    fn disk_layout(&self, id: &str) -> Result<stratus_protocol::DiskLayout, WireError> {
        let instance = self.0.stopped_instance(id)?;
        self.0.driver.disk_layout(&instance).map_err(wire_error)
    }

    fn read_disk(
        &self,
        id: &str,
        offset: u64,
        length: u64,
    ) -> Result<stratus_protocol::DiskChunk, WireError> {
        let instance = self.0.stopped_instance(id)?;
        let data = self.0.driver.read_disk(&instance, offset, length).map_err(wire_error)?;
        Ok(stratus_protocol::DiskChunk {
            offset,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        })
    }

    fn write_disk(&self, id: &str, size: u64, chunk: &stratus_protocol::DiskChunk) -> Result<(), WireError> {
        let instance = self.0.stopped_instance(id)?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(&chunk.data)
            .map_err(|e| WireError::Refused(format!("a disk chunk that is not base64: {e}")))?;
        if data.len() as u64 > stratus_protocol::DISK_CHUNK {
            return Err(WireError::Refused(format!(
                "at most {} bytes a chunk",
                stratus_protocol::DISK_CHUNK
            )));
        }
        self.0.driver.write_disk(&instance, size, chunk.offset, &data).map_err(wire_error)
    }

    fn console(&self, id: &str) -> Result<Box<dyn stratus_protocol::console::ConsoleStream>, WireError> {
        let instance = self.0.running_instance(id)?;
        self.0.driver.console(&instance).map_err(wire_error)
    }

    fn metrics(&self, id: &str) -> Result<serde_json::Value, WireError> {
        let instance = self.0.running_instance(id)?;
        self.0.driver.metrics(&instance).map_err(wire_error)
    }

    fn usage(&self) -> Result<Vec<stratus_protocol::InstanceUsage>, WireError> {
        let running: Vec<stratus_api::model::Instance> = self
            .0
            .slots()
            .values()
            .filter(|slot| slot.record.phase == Phase::Running)
            .map(|slot| wire::instance_record(&slot.record.order, slot.record.pid, slot.record.started_at))
            .collect();
        Ok(self.0.driver.usage(&running))
    }

    fn receive(&self, order: &InstanceOrder) -> Result<Incoming, WireError> {
        stratus_protocol::check_id(&order.id)?;
        let runtime = &self.0;
        {
            let mut slots = runtime.slots();
            if slots.get(&order.id).is_some_and(|slot| slot.record.phase != Phase::Absent) {
                return Err(WireError::Failed(format!("instance {} is on this host already", order.name)));
            }
            // Busy: no worker and no probe touches it until it has arrived (or not).
            slots.insert(
                order.id.clone(),
                Slot {
                    record: Record {
                        order: order.clone(),
                        phase: Phase::Starting,
                        message: String::new(),
                        clean: false,
                        pid: 0,
                        started_at: 1,
                        boot: None,
                        receiving: true,
                    },
                    events: VecDeque::new(),
                    busy: true,
                },
            );
        }
        let instance = wire::instance_record(order, 0, 1);
        let image = wire::image_record(&order.image);
        let network = wire::network_record(&order.network);
        let incoming = match runtime.driver.receive(&instance, &image, &network) {
            Ok(incoming) => incoming,
            Err(error) => {
                runtime.slots().remove(&order.id);
                return Err(wire_error(error));
            }
        };
        if let Some(slot) = runtime.slots().get_mut(&order.id) {
            slot.record.pid = incoming.pid;
        }
        runtime.persist(&order.id);
        runtime.event(&order.id, "info", format!("waiting for the migration on {}", incoming.to));
        let (waiting, id, pid, order) = (Arc::clone(runtime), order.id.clone(), incoming.pid, order.clone());
        let _ = std::thread::Builder::new().name("arrival".into()).spawn(move || {
            let instance = wire::instance_record(&order, pid, 1);
            // Waited for in short steps: a newer order (a removal after a failed move) ends it.
            let deadline = std::time::Instant::now() + Duration::from_secs(1800);
            let current =
                || waiting.slots().get(&id).is_some_and(|s| s.record.order.generation == order.generation);
            let arrived = loop {
                match waiting.driver.arrived(&instance, Duration::from_secs(1)) {
                    Err(AgentError::NotRunning) if current() && std::time::Instant::now() < deadline => {}
                    Err(AgentError::NotRunning) => {
                        break Err(AgentError::Io("the migration never arrived".into()))
                    }
                    done => break done,
                }
            };
            if let Some(slot) = waiting.slots().get_mut(&id) {
                slot.busy = false;
                slot.record.receiving = false;
                // A newer order (a removal after a failed move) is carried out instead.
                let current = slot.record.order.generation == order.generation;
                match &arrived {
                    _ if !current => {}
                    Ok(pid) => {
                        slot.record.phase = Phase::Running;
                        slot.record.pid = *pid;
                        slot.record.started_at = stratus_api::model::now();
                        slot.record.boot =
                            Some(BootReport { ms: 0, kind: "moved".into(), detail: String::new() });
                    }
                    Err(error) => {
                        slot.record.phase = Phase::Failed;
                        slot.record.message = error.to_string();
                    }
                }
            }
            waiting.persist(&id);
            match arrived {
                Ok(_) => waiting.event(&id, "info", "arrived by live migration; running here"),
                Err(error) => waiting.event(&id, "error", format!("the migration did not arrive: {error}")),
            }
            // Orders that came while it was busy are carried out now.
            waiting.kick(&id);
        });
        Ok(Incoming { to: incoming.to, pid: incoming.pid, secret: incoming.secret })
    }

    fn send(&self, id: &str, to: &str, secret: &str) -> Result<MoveReport, WireError> {
        let runtime = &self.0;
        let instance = {
            let mut slots = runtime.slots();
            match slots.get_mut(id) {
                Some(slot) if slot.record.phase == Phase::Running && !slot.busy => {
                    slot.busy = true;
                    wire::instance_record(&slot.record.order, slot.record.pid, slot.record.started_at)
                }
                Some(_) => return Err(WireError::Failed("the instance is busy or not running here".into())),
                None => return Err(WireError::NotRunning),
            }
        };
        let moved = runtime.driver.send(&instance, to, secret);
        match moved {
            Ok(moved) => {
                // It runs at the destination now: this host holds nothing of it.
                runtime.slots().remove(id);
                let _ = std::fs::remove_file(runtime.dir.join(format!("{id}.json")));
                Ok(MoveReport {
                    total_ms: moved.total_ms,
                    downtime_ms: moved.downtime_ms,
                    bytes: moved.bytes,
                })
            }
            Err(error) => {
                if let Some(slot) = runtime.slots().get_mut(id) {
                    slot.busy = false;
                }
                runtime.kick(id);
                Err(wire_error(error))
            }
        }
    }
}
