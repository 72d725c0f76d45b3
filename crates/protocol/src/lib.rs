//! The protocol between the control plane and the host agents.
//!
//! It is level-triggered and idempotent, like Kubernetes' kubelet or Oxide's sled-agent: the
//! control plane says what one instance should look like ([`InstanceOrder`], with a
//! generation that only grows) and asks what it looks like now ([`Observed`], carrying the
//! generation it reflects). Sending the same order twice changes nothing; an older order
//! than the one held is ignored. "The agent cannot be reached" is an answer
//! ([`AgentError::Unreachable`]) the reconcilers handle, not an error string.
//!
//! Three implementations of [`Agent`]: the real host agent (`stratus-agent`), [`HttpAgent`]
//! (this protocol over HTTP/JSON, [`server::router`] on the agent's side) and [`SimAgent`]
//! (in memory, no KVM: for tests and the scheduler benchmark).

pub mod client;
pub mod console;
pub mod server;
pub mod sim;

use serde::{Deserialize, Serialize};

pub use client::HttpAgent;
pub use sim::SimAgent;

/// The protocol version this build speaks. Both sides send it (`Stratus-Protocol` header);
/// a request of another version is refused with both versions named.
pub const PROTOCOL_VERSION: u32 = 1;

/// The header carrying [`PROTOCOL_VERSION`].
pub const VERSION_HEADER: &str = "stratus-protocol";

/// How often an agent sends the control plane its heartbeat (its host's report).
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A host as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// The host's name in the cluster.
    pub name: String,
    /// Where the agent's API listens (`HOST:PORT`; empty for an in-process agent).
    pub address: String,
    /// CPU threads.
    pub cpus: u32,
    /// Physical memory, MiB.
    pub memory_mib: u64,
    /// Memory instances may use, MiB (physical minus the host's reserve).
    pub allocatable_mib: u64,
    /// `/dev/kvm` flavour: "kvm" or "pvm".
    pub hypervisor: String,
    /// The agent's build version.
    pub version: String,
    /// The host mounts the cluster's shared storage pool: instances whose disks live there
    /// (`--ha`) may run here, and its agent fences them ([`HeartbeatAnswer`]).
    #[serde(default)]
    pub shared_pool: bool,
}

/// The control plane's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    /// How long the host stays online from this heartbeat on, milliseconds: once that has
    /// passed without another, the control plane may declare the host failed and restart
    /// its shared-pool instances elsewhere, so the agent stops them before then (it fences
    /// itself).
    pub lease_ms: u64,
}

/// What the control plane wants of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wanted {
    /// Running, its guest agent answering.
    Running,
    /// Not running; disk kept.
    Stopped,
    /// Gone from the host: VMM, tap, disk, directory.
    Absent,
}

/// An image's files on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFiles {
    /// Image name.
    pub name: String,
    /// Kernel (ELF vmlinux or bzImage).
    pub kernel: String,
    /// Initial ramdisk, if any.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Root filesystem (raw ext4), cloned per instance.
    pub rootfs: String,
    /// Kernel command line; the instance's root, address and hostname are appended.
    pub cmdline: String,
    /// Root filesystem size in bytes.
    pub rootfs_bytes: u64,
    /// The image's warm snapshot, which first starts of its size restore.
    #[serde(default)]
    pub warm: Option<WarmFiles>,
}

/// A warm snapshot's files and the size it was made at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmFiles {
    /// VMM state file.
    pub state: String,
    /// Memory file.
    pub memory: String,
    /// The disk as it was.
    pub disk: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, MiB.
    pub disk_mib: u64,
    /// The VMM version that wrote it.
    pub vmm_version: String,
    /// How long the boot it saves took, ms.
    pub boot_ms: u64,
    /// Unix seconds.
    pub created_at: u64,
}

/// A network as each host builds it: a bridge with the gateway address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Network name.
    pub name: String,
    /// The bridge device.
    pub bridge: String,
    /// Subnet, e.g. `10.210.0.0/24`.
    pub cidr: String,
    /// The bridge's own address, the guests' gateway.
    pub gateway: String,
    /// Whether guests reach the outside through this host (masquerade).
    pub nat: bool,
    /// The underlay addresses of every host of the cluster (this one's included, which each
    /// host leaves out): the bridge joins theirs by a VXLAN, so the network is one segment.
    #[serde(default)]
    pub peers: Vec<String>,
}

/// The whole of what the control plane wants of one instance on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceOrder {
    /// Stable id (hex).
    pub id: String,
    /// Name (its guest's hostname).
    pub name: String,
    /// Grows with every change of what is wanted; an order older than the one held is ignored.
    pub generation: u64,
    /// The state wanted.
    pub wanted: Wanted,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Root disk, MiB.
    pub disk_mib: u64,
    /// What it boots.
    pub image: ImageFiles,
    /// Where it is plugged in.
    pub network: NetworkConfig,
    /// Its IPv4 address.
    pub ip: String,
    /// Its MAC address.
    pub mac: String,
    /// Its vsock context id.
    pub cid: u32,
    /// It never ran: its disk holds nothing of its user's, so a start may begin from a fresh
    /// clone (or the warm snapshot).
    pub first_start: bool,
    /// Its disk lives on the cluster's shared pool (`POOL/ID.raw`), not in the host's own
    /// directory: a move leaves it where it is, and only a `purge` removes it.
    #[serde(default)]
    pub shared: bool,
    /// With `wanted: absent`: the instance is deleted, its shared-pool disk with it. Without
    /// it the host only forgets the instance (it moved, or was restarted elsewhere).
    #[serde(default)]
    pub purge: bool,
}

/// Where an instance is, as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Nothing of it is on this host.
    Absent,
    /// Disk, tap and VMM being set up, guest booting.
    Starting,
    /// The guest agent answered.
    Running,
    /// Being stopped or removed.
    Stopping,
    /// Not running; disk kept.
    Stopped,
    /// It was running and went down without being asked (`message`, `clean`).
    Down,
    /// The last order could not be carried out (`message`).
    Failed,
}

/// How the last start went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// VMM start to the guest agent answering, ms.
    pub ms: u64,
    /// "cold" or "warm".
    pub kind: String,
    /// Where the time went.
    pub detail: String,
}

/// One step of the agent's work on an instance, for its event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Grows with every event of this agent (across its restarts).
    pub seq: u64,
    /// "info" or "error".
    pub level: String,
    /// What happened.
    pub message: String,
}

/// What the agent knows of an instance now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The instance's id.
    pub id: String,
    /// The generation of the order this reflects (0: no order held).
    pub generation: u64,
    /// The state wanted by that order.
    pub wanted: Option<Wanted>,
    /// Where the instance is.
    pub phase: Phase,
    /// Why (for `Down` and `Failed`).
    #[serde(default)]
    pub message: String,
    /// For `Down`: the guest's own doing (a power-off), not a failure.
    #[serde(default)]
    pub clean: bool,
    /// The VMM's pid while it runs.
    #[serde(default)]
    pub pid: u32,
    /// How the last start went.
    #[serde(default)]
    pub boot: Option<BootReport>,
    /// Events after the `after` the caller gave, oldest first.
    #[serde(default)]
    pub events: Vec<AgentEvent>,
    /// The sequence number of the agent's latest event (to ask for only newer ones later).
    #[serde(default)]
    pub last_seq: u64,
}

impl Observed {
    /// An instance the agent holds nothing of.
    pub fn absent(id: &str) -> Observed {
        Observed {
            id: id.to_string(),
            generation: 0,
            wanted: None,
            phase: Phase::Absent,
            message: String::new(),
            clean: false,
            pid: 0,
            boot: None,
            events: Vec::new(),
            last_seq: 0,
        }
    }

    /// Whether this reflects `generation` and has settled: the order is carried out, or it
    /// failed (no work under way, nothing left over from before the order).
    pub fn settled_at(&self, generation: u64) -> bool {
        use Phase::*;
        self.generation == generation
            && match self.wanted {
                Some(Wanted::Running) => matches!(self.phase, Running | Failed | Down | Stopped),
                Some(Wanted::Stopped) => matches!(self.phase, Stopped | Absent | Failed),
                Some(Wanted::Absent) => matches!(self.phase, Absent | Failed),
                None => false,
            }
    }
}

/// A command to run in a guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Standard input.
    #[serde(default)]
    pub stdin: Vec<u8>,
    /// Killed (exit 137) past this, ms.
    pub timeout_ms: u64,
}

/// What a command run in a guest did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed).
    pub code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// A VMM waiting for an instance's live migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// Where the source sends the migration: `tcp:IP:PORT`.
    pub to: String,
    /// The waiting VMM's pid.
    pub pid: u32,
    /// The secret the waiting VMM takes the migration with (the source's VMM sends it).
    #[serde(default)]
    pub secret: String,
}

/// A stopped instance's disk: its size and the ranges that hold data (the rest reads as
/// zeros), for a cold move to copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLayout {
    /// Bytes.
    pub size: u64,
    /// `(offset, length)` of each range holding data, in order.
    pub extents: Vec<(u64, u64)>,
}

/// A piece of a disk, at most [`DISK_CHUNK`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskChunk {
    /// Where it starts.
    pub offset: u64,
    /// Its bytes, base64.
    pub data: String,
}

/// The largest piece of a disk one call carries.
pub const DISK_CHUNK: u64 = 1 << 20;

/// Where to send an instance by live migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// `tcp:IP:PORT` of the waiting VMM ([`Incoming::to`]).
    pub to: String,
    /// Its secret ([`Incoming::secret`]).
    #[serde(default)]
    pub secret: String,
}

/// An instance's use of its host, as its VMM process shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceUsage {
    /// The instance.
    pub id: String,
    /// CPU time its VMM has used (user and system), in seconds: a counter, which starts again
    /// from zero when the VMM does.
    pub cpu_seconds: f64,
    /// Its VMM's resident memory, in bytes.
    pub memory_bytes: u64,
}

/// How a live migration went, as the source measured it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveReport {
    /// Start to the destination running the guest, ms.
    pub total_ms: f64,
    /// The source's pause to the destination running the guest, ms.
    pub downtime_ms: f64,
    /// Bytes sent (memory, disks, state).
    pub bytes: u64,
}

/// Why a call to an agent did not get its answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AgentError {
    /// The agent could not be reached (down, partitioned, not answering in time): nothing is
    /// known of the host, which is not the same as nothing running there.
    #[error("host agent unreachable: {0}")]
    Unreachable(String),
    /// The agent refused the request (bad credential, protocol version, malformed order).
    #[error("the host agent refused: {0}")]
    Refused(String),
    /// The instance is not running there (for exec and metrics).
    #[error("instance is not running")]
    NotRunning,
    /// The agent tried and failed.
    #[error("{0}")]
    Failed(String),
}

/// A host agent, as the control plane drives it.
pub trait Agent: Send + Sync {
    /// The host and its capacity.
    fn host(&self) -> Result<HostInfo, AgentError>;
    /// Makes the host's networks exactly `networks` (bridges, gateway addresses, NAT).
    fn set_networks(&self, networks: &[NetworkConfig]) -> Result<(), AgentError>;
    /// Takes `order` (unless an order of a later generation is held) and works towards it in
    /// the background; answers at once with what is observed.
    fn ensure(&self, order: &InstanceOrder) -> Result<Observed, AgentError>;
    /// What is observed of instance `id`, with the events after sequence number `after`.
    fn observe(&self, id: &str, after: u64) -> Result<Observed, AgentError>;
    /// Every instance the agent holds an order for (after a restart: the ones it re-adopted).
    fn instances(&self) -> Result<Vec<Observed>, AgentError>;
    /// Runs a command in a running instance's guest.
    fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecOutput, AgentError>;
    /// A running instance's usage (`cpu_seconds`, `memory_bytes`, the VMM's own `vmm` metrics).
    fn metrics(&self, id: &str) -> Result<serde_json::Value, AgentError>;
    /// The usage of every instance running here.
    fn usage(&self) -> Result<Vec<InstanceUsage>, AgentError>;
    /// Readies this host to receive the instance of `order` (wanted running) by live
    /// migration; once it has arrived, [`Agent::observe`] shows it running here.
    fn receive(&self, order: &InstanceOrder) -> Result<Incoming, AgentError>;
    /// Moves running instance `id` live to the VMM waiting at `to`, its disk copied in the same
    /// session; on success the agent forgets it, on failure it runs on here.
    fn send(&self, id: &str, to: &str, secret: &str) -> Result<MoveReport, AgentError>;
    /// The layout of stopped instance `id`'s disk (a cold move's source).
    fn disk_layout(&self, id: &str) -> Result<DiskLayout, AgentError> {
        Err(AgentError::Refused(format!("instance {id}: this host keeps no disks")))
    }
    /// `length` bytes (at most [`DISK_CHUNK`]) of stopped instance `id`'s disk from `offset`.
    fn read_disk(&self, id: &str, offset: u64, length: u64) -> Result<DiskChunk, AgentError> {
        let _ = (offset, length);
        Err(AgentError::Refused(format!("instance {id}: this host keeps no disks")))
    }
    /// Writes `chunk` into the disk of instance `id`, held stopped here (a cold move's
    /// destination), a disk of `size` bytes made first if it has none.
    fn write_disk(&self, id: &str, size: u64, chunk: &DiskChunk) -> Result<(), AgentError> {
        let _ = (size, chunk);
        Err(AgentError::Refused(format!("instance {id}: this host keeps no disks")))
    }
    /// The serial console of running instance `id`, as a byte stream.
    fn console(&self, id: &str) -> Result<Box<dyn console::ConsoleStream>, AgentError> {
        Err(AgentError::Refused(format!("instance {id}: this host has no consoles (it is simulated)")))
    }
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an instance id from a request: 1-64 hex digits (it names a directory and a tap).
pub fn check_id(id: &str) -> Result<(), AgentError> {
    if (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(AgentError::Refused(format!("'{}' is not an instance id", id.escape_default())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex() {
        assert!(check_id("0123abcd").is_ok());
        for bad in ["", "../etc", "g1", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn orders_refuse_unknown_fields() {
        let order = sim::tests::order("ab", 1, Wanted::Running);
        let mut value = serde_json::to_value(&order).unwrap();
        value["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<InstanceOrder>(value).is_err());
    }
}
