//! [`SimAgent`]: a host agent in memory, with no KVM, VMM or root: it keeps orders and plays
//! the phases a real host goes through, so that the scheduler, reconcilers and policies can be
//! tested in milliseconds and benchmarked at thousands of hosts. Faults are injected by hand:
//! an unreachable host, failing starts, a VMM that dies, a guest that powers off.

use std::collections::HashMap;

use base64::Engine;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{
    Agent, AgentError, AgentEvent, BootReport, ExecOutput, ExecRequest, HostInfo, Incoming, InstanceOrder,
    InstanceUsage, MoveReport, NetworkConfig, Observed, Phase, Wanted,
};

/// A simulated host.
pub struct SimAgent {
    info: HostInfo,
    state: Mutex<SimState>,
}

#[derive(Default)]
struct SimState {
    instances: HashMap<String, SimInstance>,
    networks: Vec<NetworkConfig>,
    unreachable: bool,
    /// Starts that fail (with this message) before any succeeds again.
    failing_starts: Vec<String>,
    boot_delay: Duration,
    /// How long a migration sent from here takes.
    move_delay: Duration,
    next_seq: u64,
    next_pid: u32,
}

/// Migrations that reached a simulated host waiting for them and are not yet taken up (by
/// `to/id`): a received instance runs only once its migration has come over the loopback
/// connection its host listened on, from whichever process sent it.
static DELIVERED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Migrations a simulated host waits for (by `to/id`): one whose instance is removed meanwhile
/// is no longer awaited, and its sender finds nobody listening, as it would a VMM killed.
static AWAITED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The CPUs each instance's guest keeps busy (by instance id), wherever it runs: a load moves
/// with its guest.
static CPU_LOAD: Mutex<Option<HashMap<String, f64>>> = Mutex::new(None);

struct SimInstance {
    /// CPU seconds used so far here, as of when.
    cpu: (f64, Instant),
    /// For a received instance: where its migration is to arrive.
    incoming: Option<String>,
    /// Its disk: size, and the pieces written (at their offsets; the rest reads as zeros).
    disk: (u64, std::collections::BTreeMap<u64, Vec<u8>>),
    /// A cold move's copy has begun arriving here (it replaced the fresh disk).
    disk_arriving: bool,
    order: InstanceOrder,
    phase: Phase,
    message: String,
    clean: bool,
    pid: u32,
    ready_at: Option<Instant>,
    boot: Option<BootReport>,
    events: Vec<AgentEvent>,
}

impl SimAgent {
    /// A host named `name` with `cpus` CPUs and `memory_mib` of memory, 1 GiB of it reserved.
    pub fn new(name: &str, cpus: u32, memory_mib: u64) -> SimAgent {
        SimAgent {
            info: HostInfo {
                name: name.to_string(),
                // A documentation address (TEST-NET-1) of its own per name.
                address: format!("192.0.2.{}:7441", 1 + name.bytes().map(u32::from).sum::<u32>() % 250),
                cpus,
                memory_mib,
                allocatable_mib: memory_mib.saturating_sub(1024),
                hypervisor: "sim".to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                shared_pool: false,
            },
            state: Mutex::new(SimState { next_pid: 1000, ..SimState::default() }),
        }
    }

    /// The same host, reached at `address` (`IP:PORT`).
    pub fn at(mut self, address: &str) -> SimAgent {
        self.info.address = address.to_string();
        self
    }

    /// The same host, mounting the cluster's shared storage pool.
    pub fn with_shared_pool(mut self) -> SimAgent {
        self.info.shared_pool = true;
        self
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every call fail as unreachable (or answer again).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().unreachable = unreachable;
    }

    /// Migrations sent from here take `delay` from now on (before they connect).
    pub fn set_move_delay(&self, delay: Duration) {
        self.state().move_delay = delay;
    }

    /// Starts from now on take `delay` before the guest answers.
    pub fn set_boot_delay(&self, delay: Duration) {
        self.state().boot_delay = delay;
    }

    /// The next `count` starts fail with `message`.
    pub fn fail_starts(&self, count: usize, message: &str) {
        self.state().failing_starts = vec![message.to_string(); count];
    }

    /// The instance's VMM dies (as `kill -9` would).
    pub fn kill(&self, id: &str) {
        self.go_down(id, "the VMM process is gone", false);
    }

    /// The instance's guest powers itself off.
    pub fn power_off(&self, id: &str) {
        self.go_down(id, "guest powered off", true);
    }

    fn go_down(&self, id: &str, message: &str, clean: bool) {
        let mut state = self.state();
        let seq = state.seq();
        if let Some(instance) = state.instances.get_mut(id) {
            if instance.phase == Phase::Running {
                instance.phase = Phase::Down;
                instance.message = message.to_string();
                instance.clean = clean;
                instance.pid = 0;
                instance.event(seq, "error", message);
            }
        }
    }

    /// The guest of instance `id` keeps `cpus` CPUs busy from now on, on whichever host runs it.
    pub fn set_cpu_load(id: &str, cpus: f64) {
        CPU_LOAD
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(id.to_string(), cpus);
    }

    /// How many instances run here now.
    pub fn running(&self) -> usize {
        let mut state = self.state();
        state.advance();
        state.instances.values().filter(|i| i.phase == Phase::Running).count()
    }

    /// The networks last set.
    pub fn networks(&self) -> Vec<NetworkConfig> {
        self.state().networks.clone()
    }

    fn reachable(&self) -> Result<MutexGuard<'_, SimState>, AgentError> {
        let mut state = self.state();
        if state.unreachable {
            return Err(AgentError::Unreachable(format!(
                "{}: connection refused (simulated)",
                self.info.name
            )));
        }
        state.advance();
        Ok(state)
    }
}

/// Instance `id`, held stopped on this simulated host.
fn stopped<'a>(state: &'a SimState, id: &str) -> Result<&'a SimInstance, AgentError> {
    match state.instances.get(id) {
        Some(instance) if instance.phase == Phase::Stopped => Ok(instance),
        Some(instance) => {
            Err(AgentError::Refused(format!("instance {id} is {:?} here, not stopped", instance.phase)))
        }
        None => Err(AgentError::Refused(format!("no instance {id} here"))),
    }
}

impl SimState {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Finishes the boots whose time has come.
    fn advance(&mut self) {
        let now = Instant::now();
        let mut seqs = Vec::new();
        let mut delivered = DELIVERED.lock().unwrap_or_else(|p| p.into_inner());
        for instance in self.instances.values_mut() {
            if let Some(to) = &instance.incoming {
                if let Some(at) = delivered.iter().position(|d| d == to) {
                    delivered.remove(at);
                    instance.incoming = None;
                    instance.ready_at = Some(now);
                }
            }
            if instance.phase == Phase::Starting && instance.ready_at.is_some_and(|at| at <= now) {
                seqs.push(instance.order.id.clone());
            }
        }
        drop(delivered);
        for id in seqs {
            let seq = self.seq();
            let pid = self.next_pid;
            self.next_pid += 1;
            let instance = self.instances.get_mut(&id).expect("listed above");
            instance.phase = Phase::Running;
            instance.pid = pid;
            instance.ready_at = None;
            instance.boot = Some(BootReport { ms: 1, kind: "cold".into(), detail: String::new() });
            instance.event(seq, "info", "booted (simulated)");
        }
    }
}

impl SimInstance {
    /// An instance of `order`, in `phase`, awaiting its migration at `incoming` if given.
    fn new(order: &InstanceOrder, phase: Phase, incoming: Option<String>) -> SimInstance {
        // A fresh disk holds one block naming its instance, as a real one holds its image.
        let mut blocks = std::collections::BTreeMap::new();
        blocks.insert(0, format!("disk of {} made on its first host", order.name).into_bytes());
        SimInstance {
            cpu: (0.0, Instant::now()),
            incoming,
            disk: (order.disk_mib << 20, blocks),
            disk_arriving: false,
            order: order.clone(),
            phase,
            message: String::new(),
            clean: false,
            pid: 0,
            ready_at: None,
            boot: None,
            events: Vec::new(),
        }
    }

    fn event(&mut self, seq: u64, level: &str, message: &str) {
        self.events.push(AgentEvent { seq, level: level.to_string(), message: message.to_string() });
    }

    fn observed(&self, after: u64) -> Observed {
        Observed {
            id: self.order.id.clone(),
            generation: self.order.generation,
            wanted: Some(self.order.wanted),
            phase: self.phase,
            message: self.message.clone(),
            clean: self.clean,
            pid: self.pid,
            boot: self.boot.clone(),
            events: self.events.iter().filter(|e| e.seq > after).cloned().collect(),
            last_seq: self.events.last().map_or(0, |e| e.seq),
        }
    }
}

/// Waits (up to an hour) for the one migration `awaited` names on `listener`, and records it
/// delivered once it has come, answering the sender.
fn await_migration(listener: std::net::TcpListener, awaited: &str) {
    use std::io::{BufRead, Write};
    let deadline = Instant::now() + Duration::from_secs(3600);
    let still_awaited = |take: bool| {
        let mut all = AWAITED.lock().unwrap_or_else(|p| p.into_inner());
        let at = all.iter().position(|k| k == awaited);
        if take {
            at.map(|at| all.remove(at));
        }
        at.is_some()
    };
    while Instant::now() < deadline && still_awaited(false) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut line = String::new();
                let mut reader = std::io::BufReader::new(&stream);
                let named =
                    reader.read_line(&mut line).is_ok() && awaited.ends_with(&format!("/{}", line.trim()));
                if named && still_awaited(true) {
                    DELIVERED.lock().unwrap_or_else(|p| p.into_inner()).push(awaited.to_string());
                    let _ = (&stream).write_all(b"ok\n");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return,
        }
    }
}

/// Sends instance `id`'s (simulated) migration to `to` (`tcp:IP:PORT`) and waits for the
/// destination to take it.
fn send_migration(to: &str, id: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let address = to.strip_prefix("tcp:").unwrap_or(to);
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{id}\n").as_bytes())?;
    let mut answer = [0u8; 3];
    stream.read_exact(&mut answer)?;
    if &answer != b"ok\n" {
        return Err(std::io::Error::other("the destination did not take the migration"));
    }
    Ok(())
}

impl Agent for SimAgent {
    fn host(&self) -> Result<HostInfo, AgentError> {
        let _reachable = self.reachable()?;
        Ok(self.info.clone())
    }

    fn set_networks(&self, networks: &[NetworkConfig]) -> Result<(), AgentError> {
        self.reachable()?.networks = networks.to_vec();
        Ok(())
    }

    fn ensure(&self, order: &InstanceOrder) -> Result<Observed, AgentError> {
        let mut state = self.reachable()?;
        if let Some(held) = state.instances.get(&order.id) {
            if held.order.generation >= order.generation {
                return Ok(held.observed(u64::MAX));
            }
        }
        let seq = state.seq();
        let delay = state.boot_delay;
        let failure = if order.wanted == Wanted::Running
            && state.instances.get(&order.id).is_none_or(|i| i.phase != Phase::Running)
        {
            state.failing_starts.pop()
        } else {
            None
        };
        let instance = state
            .instances
            .entry(order.id.clone())
            .or_insert_with(|| SimInstance::new(order, Phase::Absent, None));
        instance.order = order.clone();
        match (order.wanted, instance.phase) {
            (Wanted::Running, Phase::Running) => {}
            (Wanted::Running, _) => match failure {
                Some(message) => {
                    instance.phase = Phase::Failed;
                    instance.message = message.clone();
                    instance.event(seq, "error", &message);
                }
                None => {
                    instance.phase = Phase::Starting;
                    instance.message.clear();
                    instance.ready_at = Some(Instant::now() + delay);
                    instance.event(seq, "info", "VMM started (simulated), booting");
                }
            },
            (Wanted::Stopped, _) => {
                instance.phase = Phase::Stopped;
                instance.pid = 0;
                instance.ready_at = None;
            }
            (Wanted::Absent, _) => {
                if let Some(key) = state.instances.remove(&order.id).and_then(|gone| gone.incoming) {
                    AWAITED.lock().unwrap_or_else(|p| p.into_inner()).retain(|k| *k != key);
                }
                let mut gone = Observed::absent(&order.id);
                gone.generation = order.generation;
                gone.wanted = Some(Wanted::Absent);
                return Ok(gone);
            }
        }
        state.advance();
        Ok(state.instances[&order.id].observed(u64::MAX))
    }

    fn observe(&self, id: &str, after: u64) -> Result<Observed, AgentError> {
        let state = self.reachable()?;
        Ok(state.instances.get(id).map_or_else(|| Observed::absent(id), |i| i.observed(after)))
    }

    fn instances(&self) -> Result<Vec<Observed>, AgentError> {
        let state = self.reachable()?;
        Ok(state.instances.values().map(|i| i.observed(u64::MAX)).collect())
    }

    fn disk_layout(&self, id: &str) -> Result<crate::DiskLayout, AgentError> {
        let state = self.reachable()?;
        let instance = stopped(&state, id)?;
        let (size, blocks) = &instance.disk;
        let extents = blocks.iter().map(|(at, data)| (*at, data.len() as u64)).collect();
        Ok(crate::DiskLayout { size: *size, extents })
    }

    fn read_disk(&self, id: &str, offset: u64, length: u64) -> Result<crate::DiskChunk, AgentError> {
        let state = self.reachable()?;
        let (size, blocks) = &stopped(&state, id)?.disk;
        let mut data = vec![0; length.min(size.saturating_sub(offset)) as usize];
        for (at, block) in blocks {
            for (i, byte) in block.iter().enumerate() {
                if let Some(slot) = (at + i as u64).checked_sub(offset).and_then(|i| data.get_mut(i as usize))
                {
                    *slot = *byte;
                }
            }
        }
        Ok(crate::DiskChunk { offset, data: base64::engine::general_purpose::STANDARD.encode(data) })
    }

    fn write_disk(&self, id: &str, size: u64, chunk: &crate::DiskChunk) -> Result<(), AgentError> {
        let mut state = self.reachable()?;
        stopped(&state, id)?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(&chunk.data)
            .map_err(|e| AgentError::Refused(format!("a disk chunk that is not base64: {e}")))?;
        if chunk.offset + data.len() as u64 > size {
            return Err(AgentError::Refused(format!("a write past the disk's {size} bytes")));
        }
        let instance = state.instances.get_mut(id).expect("checked above");
        if !instance.disk_arriving {
            // The fresh disk it was given gives way to the one arriving.
            instance.disk = (size, std::collections::BTreeMap::new());
            instance.disk_arriving = true;
        }
        if !data.is_empty() {
            instance.disk.1.insert(chunk.offset, data);
        }
        Ok(())
    }

    fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecOutput, AgentError> {
        let state = self.reachable()?;
        match state.instances.get(id) {
            Some(instance) if instance.phase == Phase::Running => Ok(ExecOutput {
                code: 0,
                stdout: format!("{} on {}\n", request.argv.join(" "), self.info.name).into_bytes(),
                stderr: Vec::new(),
            }),
            _ => Err(AgentError::NotRunning),
        }
    }

    fn receive(&self, order: &InstanceOrder) -> Result<Incoming, AgentError> {
        let mut state = self.reachable()?;
        if state.instances.get(&order.id).is_some_and(|i| i.phase != Phase::Absent) {
            return Err(AgentError::Failed(format!("instance {} is here already", order.name)));
        }
        let seq = state.seq();
        // A real listener, so that a sender in another process reaches it as a VMM's would.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| AgentError::Failed(format!("listening for the migration: {e}")))?;
        let port = listener.local_addr().map_err(|e| AgentError::Failed(e.to_string()))?.port();
        let to = format!("tcp:127.0.0.1:{port}");
        let awaited = format!("{to}/{}", order.id);
        let arriving = awaited.clone();
        AWAITED.lock().unwrap_or_else(|p| p.into_inner()).push(awaited.clone());
        std::thread::spawn(move || await_migration(listener, &arriving));
        let mut instance = SimInstance::new(order, Phase::Starting, Some(awaited));
        instance.event(seq, "info", "waiting for the migration (simulated)");
        state.instances.insert(order.id.clone(), instance);
        Ok(Incoming { to, pid: 0, secret: String::new() })
    }

    fn send(&self, id: &str, to: &str, _secret: &str) -> Result<MoveReport, AgentError> {
        let mut state = self.reachable()?;
        match state.instances.get(id) {
            Some(instance) if instance.phase == Phase::Running => {}
            _ => return Err(AgentError::NotRunning),
        }
        if let Some(message) = state.failing_starts.pop() {
            return Err(AgentError::Failed(format!("migrating to {to}: {message}")));
        }
        let delay = state.move_delay;
        drop(state);
        let started = Instant::now();
        std::thread::sleep(delay);
        send_migration(to, id).map_err(|e| AgentError::Failed(format!("migrating to {to}: {e}")))?;
        // Sent: the guest runs there now.
        self.state().instances.remove(id);
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(MoveReport { total_ms, downtime_ms: 0.1, bytes: 0 })
    }

    fn usage(&self) -> Result<Vec<InstanceUsage>, AgentError> {
        let mut state = self.reachable()?;
        let loads = CPU_LOAD.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
        let now = Instant::now();
        Ok(state
            .instances
            .iter_mut()
            .filter(|(_, i)| i.phase == Phase::Running)
            .map(|(id, instance)| {
                let (seconds, since) = instance.cpu;
                let rate = loads.get(id).copied().unwrap_or(0.0);
                instance.cpu = (seconds + rate * now.duration_since(since).as_secs_f64(), now);
                InstanceUsage {
                    id: id.clone(),
                    cpu_seconds: instance.cpu.0,
                    memory_bytes: instance.order.memory_mib << 20,
                }
            })
            .collect())
    }

    fn metrics(&self, id: &str) -> Result<serde_json::Value, AgentError> {
        let state = self.reachable()?;
        match state.instances.get(id) {
            Some(instance) if instance.phase == Phase::Running => Ok(serde_json::json!({
                "cpu_seconds": 0.0,
                "memory_bytes": instance.order.memory_mib << 20,
                "guest_memory_bytes": instance.order.memory_mib << 20,
            })),
            _ => Err(AgentError::NotRunning),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{ImageFiles, NetworkConfig};

    pub(crate) fn order(id: &str, generation: u64, wanted: Wanted) -> InstanceOrder {
        InstanceOrder {
            id: id.to_string(),
            name: format!("vm-{id}"),
            generation,
            wanted,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            image: ImageFiles {
                name: "default".into(),
                kernel: "/k".into(),
                initrd: None,
                rootfs: "/r".into(),
                cmdline: String::new(),
                rootfs_bytes: 1,
                warm: None,
            },
            network: NetworkConfig {
                name: "default".into(),
                bridge: "br0".into(),
                cidr: "10.0.0.0/24".into(),
                gateway: "10.0.0.1".into(),
                nat: true,
                peers: Vec::new(),
            },
            ip: "10.0.0.2".into(),
            mac: "52:54:00:00:00:02".into(),
            cid: 3,
            first_start: true,
            shared: false,
            purge: false,
        }
    }

    #[test]
    fn orders_are_level_triggered_and_generations_only_grow() {
        let host = SimAgent::new("h1", 2, 4096);
        let started = host.ensure(&order("a1", 5, Wanted::Running)).unwrap();
        assert_eq!((started.generation, started.phase), (5, Phase::Running));
        // The same order again, and an older one, change nothing.
        assert_eq!(host.ensure(&order("a1", 5, Wanted::Running)).unwrap().pid, started.pid);
        let stale = host.ensure(&order("a1", 4, Wanted::Stopped)).unwrap();
        assert_eq!((stale.generation, stale.phase), (5, Phase::Running));
        let stopped = host.ensure(&order("a1", 6, Wanted::Stopped)).unwrap();
        assert_eq!(stopped.phase, Phase::Stopped);
        let gone = host.ensure(&order("a1", 7, Wanted::Absent)).unwrap();
        assert_eq!(gone.phase, Phase::Absent);
        assert!(host.instances().unwrap().is_empty());
    }

    #[test]
    fn faults_are_answers() {
        let host = SimAgent::new("h1", 2, 4096);
        host.fail_starts(1, "disk: no space");
        let failed = host.ensure(&order("a1", 1, Wanted::Running)).unwrap();
        assert_eq!((failed.phase, failed.message.as_str()), (Phase::Failed, "disk: no space"));
        host.ensure(&order("a1", 2, Wanted::Running)).unwrap();
        host.kill("a1");
        let down = host.observe("a1", 0).unwrap();
        assert_eq!((down.phase, down.clean), (Phase::Down, false));
        assert!(down.events.iter().any(|e| e.message.contains("VMM process is gone")));
        host.set_unreachable(true);
        assert!(matches!(host.observe("a1", 0), Err(AgentError::Unreachable(_))));
    }

    #[test]
    fn boots_take_their_time() {
        let host = SimAgent::new("h1", 2, 4096);
        host.set_boot_delay(Duration::from_millis(30));
        assert_eq!(host.ensure(&order("a1", 1, Wanted::Running)).unwrap().phase, Phase::Starting);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(host.observe("a1", 0).unwrap().phase, Phase::Running);
        assert_eq!(host.running(), 1);
    }
}
