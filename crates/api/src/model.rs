//! The cloud's resources as the API shows them and the store keeps them: instances, images,
//! networks, hosts, operations and events. Every resource belongs to a project (`default` for
//! now), so that tenants later are a new value, not a new schema.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The project every resource belongs to until projects can be created.
pub const DEFAULT_PROJECT: &str = "default";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A new random id (hex).
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // getrandom cannot fail for 8 bytes once the pool is ready; fall back to time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = ((t as u64) ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a resource name: 1-63 of `a-z`, `0-9` and `-`, starting with a letter, not ending
/// with `-` (it becomes a guest hostname and part of device names).
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name '{name}': use 1-63 lowercase letters, digits and '-', starting with a letter"
        ))
    }
}

/// What a user asks for when launching an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Image name.
    pub image: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Root disk size in MiB (at least the image's root filesystem).
    pub disk_mib: u64,
    /// Network name.
    pub network: String,
    /// What to do when the VMM exits without being asked to.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Its anti-affinity group: no two instances of one group run on one host ("" for none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub anti_affinity: String,
    /// Where its disk lives.
    #[serde(default)]
    pub pool: Pool,
    /// Restarted on another host when its host fails (its disk on the shared pool).
    #[serde(default)]
    pub ha: bool,
}

/// Where an instance's disk lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// On its host's own storage: moves copy it.
    #[default]
    Local,
    /// On the storage every host of the cluster mounts (NFS, say): it stays where it is when
    /// the instance moves, and another host can start the instance when its host fails.
    Shared,
}

/// When the reconciler starts an instance again after its VMM went away on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After a crash or a guest power-off alike.
    Always,
    /// After a crash (VMM killed or errored, guest panic), not after the guest powered off.
    #[default]
    OnFailure,
    /// Never: the instance shows as stopped or failed.
    Never,
}

/// The state the user wants an instance in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Booted and answering.
    Running,
    /// Powered off, disk kept.
    Stopped,
    /// Gone, with its disk, tap and address.
    Deleted,
}

/// The state an instance is observed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Recorded, not yet acted on.
    Pending,
    /// Disk, tap and VMM being set up, guest booting.
    Starting,
    /// The guest agent answers.
    Running,
    /// Being shut down.
    Stopping,
    /// Not running; disk kept.
    Stopped,
    /// Being removed.
    Deleting,
    /// Failed; `message` says why.
    Error,
    /// Its host failed and it cannot be started elsewhere (not `ha`): nothing is known of
    /// it until the host is back.
    Lost,
}

impl InstanceState {
    /// The lowercase name the API and CLI show.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Deleting => "deleting",
            InstanceState::Error => "error",
            InstanceState::Lost => "lost",
        }
    }
}

/// What the control plane has observed of an instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InstanceStatus {
    /// Observed state.
    pub state: InstanceState,
    /// Why it is in that state, for errors and exits.
    #[serde(default)]
    pub message: String,
    /// The host it is placed on.
    #[serde(default)]
    pub host: String,
    /// Its IPv4 address (from the network's IPAM).
    #[serde(default)]
    pub ip: String,
    /// Its MAC address.
    #[serde(default)]
    pub mac: String,
    /// Its vsock context id: its IPv4 address as a number, so no two instances on a host
    /// share one (0 in records from before it was kept: the agent then uses 3).
    #[serde(default)]
    pub cid: u32,
    /// The VMM's process id while it runs.
    #[serde(default)]
    pub pid: u32,
    /// When the VMM was last started (Unix seconds).
    #[serde(default)]
    pub started_at: u64,
    /// How many failed attempts in a row (drives the retry backoff).
    #[serde(default)]
    pub failures: u32,
    /// Unix seconds before which the reconciler does not retry.
    #[serde(default)]
    pub retry_at: u64,
    /// Milliseconds from VMM start to the guest agent answering, last boot.
    #[serde(default)]
    pub boot_ms: u64,
    /// How the last boot was done: "cold" or "warm".
    #[serde(default)]
    pub boot: String,
    /// The host it is being moved to (live); the reconciler leaves it alone meanwhile.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub moving: String,
    /// The host an evacuation moved it off ("" when none): `host restore` brings it back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub home: String,
}

/// An instance: a VM with its disk, address and VMM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Instance {
    /// Stable id (hex), names its directory, tap and VMM.
    pub id: String,
    /// User-chosen name, unique in its project.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// What was asked for.
    pub spec: InstanceSpec,
    /// The state the user wants.
    pub desired: Desired,
    /// The state observed.
    pub status: InstanceStatus,
    /// Unix seconds.
    pub created_at: u64,
    /// The operation working towards `desired`, if any.
    #[serde(default)]
    pub operation: Option<String>,
    /// A restart was asked for and the VMM has not been stopped for it yet.
    #[serde(default)]
    pub restart_pending: bool,
}

/// A guest image: what an instance boots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Image {
    /// Image name.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// Kernel (ELF vmlinux or bzImage).
    pub kernel: String,
    /// Initial ramdisk, if the image boots through one.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Root filesystem (raw ext4), cloned per instance.
    pub rootfs: String,
    /// Kernel command line; the instance's root, address and hostname are appended.
    pub cmdline: String,
    /// Root filesystem size in bytes (the smallest disk an instance can have).
    pub rootfs_bytes: u64,
    /// Where it came from (e.g. the build's input hash).
    #[serde(default)]
    pub source: String,
    /// Unix seconds.
    pub created_at: u64,
    /// A snapshot of this image booted until its guest agent answered, which launches of
    /// the same size restore instead of booting.
    #[serde(default)]
    pub warm: Option<WarmSnapshot>,
}

/// A booted image saved for warm launches: VM state, memory and the disk as they were.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WarmSnapshot {
    /// The VMM state file.
    pub state: String,
    /// The memory file.
    pub memory: String,
    /// The disk at the moment of the snapshot; instances start from a copy of it.
    pub disk: String,
    /// vCPUs it was booted with (a launch must ask for the same).
    pub cpus: u32,
    /// Memory in MiB it was booted with.
    pub memory_mib: u64,
    /// Disk size in MiB.
    pub disk_mib: u64,
    /// The VMM version that wrote it (another version boots cold).
    pub vmm_version: String,
    /// How long the cold boot it saves took, in milliseconds.
    pub boot_ms: u64,
    /// Unix seconds.
    pub created_at: u64,
}

impl WarmSnapshot {
    /// Whether an instance of this size can start from the snapshot.
    pub fn fits(&self, spec: &InstanceSpec) -> bool {
        self.cpus == spec.cpus
            && self.memory_mib == spec.memory_mib
            && self.disk_mib == spec.disk_mib
            && self.vmm_version == VMM_VERSION
    }
}

/// The version of the VMM in this build: snapshots of other versions are not restored.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A network: a Linux bridge with an IPv4 subnet, NATed to the host's uplink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Network {
    /// Network name.
    pub name: String,
    /// Owning project.
    pub project: String,
    /// The bridge device on each host.
    pub bridge: String,
    /// Subnet, e.g. `10.210.0.0/24`.
    pub cidr: String,
    /// The bridge's own address, the guests' default gateway.
    pub gateway: String,
    /// Whether guests reach the outside through the host (masquerade).
    pub nat: bool,
    /// Unix seconds.
    pub created_at: u64,
    /// The underlay addresses of every host of the cluster, when it has more than one: each
    /// host joins its bridge to the others' by a VXLAN (VNI from the name) to them. Worked out
    /// when the networks are handed to hosts, never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

/// A host that runs instances, with its capacity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Host {
    /// Host name.
    pub name: String,
    /// CPU threads.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// Memory instances may use in MiB (physical minus the host's reserve).
    pub allocatable_mib: u64,
    /// Memory given to instances in MiB.
    pub allocated_mib: u64,
    /// Virtual CPUs given to instances.
    pub allocated_cpus: u32,
    /// Instances placed here.
    pub instances: u32,
    /// `/dev/kvm` flavour: "kvm" or "pvm".
    pub hypervisor: String,
    /// Last heartbeat, Unix seconds.
    pub seen_at: u64,
    /// Where its agent listens (`HOST:PORT`); empty for the control plane's own host.
    #[serde(default)]
    pub address: String,
    /// "online", "offline" (its heartbeat lease expired) or "joining" (never heard from).
    #[serde(default)]
    pub state: String,
    /// Kept free of new instances (drained for maintenance).
    #[serde(default)]
    pub maintenance: bool,
    /// Its instances' CPU use over the rebalancer's window, in percent of its CPUs (absent
    /// until measured over a whole window, or with rebalancing off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// It mounts the cluster's shared storage pool.
    #[serde(default)]
    pub shared_pool: bool,
}

/// The progress of an asynchronous request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    /// Still working.
    Running,
    /// Done.
    Succeeded,
    /// Gave up; `error` says why.
    Failed,
}

/// An asynchronous request: launch, start, stop, delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Operation {
    /// Operation id.
    pub id: String,
    /// What it does: "launch", "start", "stop", "restart", "delete".
    pub kind: String,
    /// The instance it acts on.
    pub instance: String,
    /// Owning project.
    pub project: String,
    /// Progress.
    pub state: OperationState,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, once finished.
    #[serde(default)]
    pub finished_at: u64,
    /// The hosts it acts on (an evacuation's, a consolidation's hosts to empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// How it was asked for ("keep-stopped"), for a leader that carries it on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Operation {
    /// A new operation of `kind` on `instance` ("" for none), running from now.
    pub fn started(kind: &str, instance: &str) -> Operation {
        Operation {
            id: new_id(),
            kind: kind.into(),
            instance: instance.into(),
            project: DEFAULT_PROJECT.into(),
            state: OperationState::Running,
            error: String::new(),
            created_at: now(),
            finished_at: 0,
            hosts: Vec::new(),
            options: Vec::new(),
        }
    }
}

/// One line of an instance's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// Instance name ("" for host events).
    pub instance: String,
    /// Owning project.
    pub project: String,
    /// "info" or "error".
    pub level: String,
    /// What happened.
    pub message: String,
}

/// One move of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedMove {
    /// The instance.
    pub instance: String,
    /// The host it leaves.
    pub from: String,
    /// The host it goes to.
    pub to: String,
    /// Why there: "512 MiB to h2, the fullest host it fits on (1.2 GiB free after)".
    pub reason: String,
}

/// A host the plan keeps, with its load once the plan is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeptHost {
    /// Host name.
    pub name: String,
    /// Memory allocated after the plan, MiB.
    pub allocated_mib: u64,
    /// Its allocatable memory, MiB.
    pub allocatable_mib: u64,
    /// vCPUs allocated after the plan.
    pub vcpus: u32,
    /// Why it is kept ("takes web3, db1", "web2 (3 GiB) fits nowhere else", ...).
    pub why: String,
}

/// What consolidation would do (`GET /v1/consolidation`): the moves that pack the instances
/// onto as few hosts as fit, and the hosts left empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ConsolidationPlan {
    /// The moves, host by host in the order the hosts are emptied.
    pub moves: Vec<PlannedMove>,
    /// The hosts emptied by the moves, which may then be switched off.
    pub emptied: Vec<String>,
    /// The hosts that keep running instances.
    pub kept: Vec<KeptHost>,
    /// Hosts left out (offline or in maintenance), with the reason.
    pub skipped: Vec<String>,
}

/// The cluster's settings (`stratus config show`, `stratus config set KEY=VALUE`), kept in the
/// store; every key has a default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Load balancing by live migration.
    pub rebalance: RebalanceConfig,
}

/// How the rebalancer moves instances from busy hosts to idle ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceConfig {
    /// Whether it runs (it does unless turned off).
    pub enabled: bool,
    /// Seconds of measured CPU use a decision looks at: a host must be busy over all of it.
    pub window_s: u64,
    /// Points of CPU use between the busiest host and the idlest that start a move.
    pub threshold_percent: u32,
    /// Points a move must narrow that gap by; a move that gains less is not worth its cost.
    pub min_gain_percent: u32,
    /// Seconds an instance that was moved stays where it went.
    pub cooldown_s: u64,
    /// Moves at most per round (each between two hosts no other move of the round touches).
    pub max_moves: u32,
    /// Percent of a host's memory for instances that its guests, measured over the window,
    /// may use before instances move off it (to the host using the least).
    pub memory_percent: u32,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            enabled: true,
            window_s: 300,
            threshold_percent: 25,
            min_gain_percent: 10,
            cooldown_s: 1800,
            max_moves: 2,
            memory_percent: 90,
        }
    }
}

/// The keys `ClusterConfig::set` takes, with what each means.
pub const CONFIG_KEYS: &[(&str, &str)] = &[
    ("rebalance.enabled", "true or false: move instances from busy hosts to idle ones"),
    ("rebalance.window_s", "seconds of measured CPU use a decision looks at (2 to 86400)"),
    (
        "rebalance.threshold_percent",
        "points of CPU use between busiest and idlest host that start a move (1 to 100)",
    ),
    ("rebalance.min_gain_percent", "points a move must narrow that gap by (1 to 100)"),
    ("rebalance.cooldown_s", "seconds a moved instance stays put (0 to 604800)"),
    ("rebalance.max_moves", "moves at most per round (1 to 16)"),
    (
        "rebalance.memory_percent",
        "percent of a host's memory its guests may use, measured, before one moves off (50 to 100)",
    ),
];

impl ClusterConfig {
    /// Sets `key` to `value` (as the user wrote it), or says why not.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
            key: &str,
            value: &str,
            low: T,
            high: T,
        ) -> Result<T, String> {
            match value.trim().parse::<T>() {
                Ok(n) if n >= low && n <= high => Ok(n),
                _ => Err(format!("{key} takes a whole number from {low} to {high}, not '{value}'")),
            }
        }
        let r = &mut self.rebalance;
        match key {
            "rebalance.enabled" => {
                r.enabled = match value.trim() {
                    "true" | "on" | "yes" => true,
                    "false" | "off" | "no" => false,
                    _ => return Err(format!("{key} takes true or false, not '{value}'")),
                }
            }
            "rebalance.window_s" => r.window_s = number(key, value, 2, 86_400)?,
            "rebalance.threshold_percent" => r.threshold_percent = number(key, value, 1, 100)?,
            "rebalance.min_gain_percent" => r.min_gain_percent = number(key, value, 1, 100)?,
            "rebalance.cooldown_s" => r.cooldown_s = number(key, value, 0, 604_800)?,
            "rebalance.max_moves" => r.max_moves = number(key, value, 1, 16)?,
            "rebalance.memory_percent" => r.memory_percent = number(key, value, 50, 100)?,
            _ => {
                let known: Vec<&str> = CONFIG_KEYS.iter().map(|(k, _)| *k).collect();
                return Err(format!("unknown setting '{key}': known are {}", known.join(", ")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_known_keys_and_sane_values_only() {
        let mut config = ClusterConfig::default();
        assert!(config.rebalance.enabled, "rebalancing is on by default");
        config.set("rebalance.enabled", "false").unwrap();
        config.set("rebalance.window_s", "60").unwrap();
        assert_eq!((config.rebalance.enabled, config.rebalance.window_s), (false, 60));
        assert!(config.set("rebalance.window_s", "0").unwrap_err().contains("from 2 to 86400"));
        assert!(config.set("rebalance.enabled", "maybe").unwrap_err().contains("true or false"));
        assert!(config.set("rebalance.speed", "9").unwrap_err().contains("known are rebalance.enabled"));
        assert_eq!(config.rebalance.window_s, 60, "a refused value changes nothing");
        let stored: ClusterConfig = serde_json::from_str(r#"{"rebalance": {"enabled": false}}"#).unwrap();
        assert_eq!(stored.rebalance.window_s, 300, "a key left out keeps its default");
    }

    #[test]
    fn names_are_hostname_safe() {
        for good in ["a", "web1", "web-1", "x23456789012345678901234567890123456789012345678901234567890123"]
        {
            assert!(check_name("instance", good).is_ok(), "{good}");
        }
        for bad in ["", "1web", "Web", "web_1", "web-", "we b", "web.1", &"a".repeat(64)] {
            assert!(check_name("instance", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn specs_refuse_unknown_fields() {
        let json =
            r#"{"image":"default","cpus":1,"memory_mib":128,"disk_mib":64,"network":"default","gpu":1}"#;
        assert!(serde_json::from_str::<InstanceSpec>(json).is_err());
    }
}
