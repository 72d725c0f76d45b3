//! The VMM's control API as data, shared by the VMM that serves it and the programs that call
//! it (the host agent, `stratus vm`): the body of every request ([`Machine`], [`Boot`],
//! [`Drive`], [`Net`], [`Migrate`], [`Restore`], ...), the answers ([`VmInfo`],
//! [`SnapshotReport`], [`RestoreReport`], [`MigrationReport`], [`MigrationProgress`]), the
//! HTTP/1.1 framing on a Unix socket ([`http`]) and [`VmmClient`], one typed method per route.
//!
//! Bodies are decoded strictly: a field the VMM does not know is an error, not ignored. This
//! crate links no KVM: a control plane or agent that drives VMMs needs only it.

pub mod client;
pub mod http;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use client::{VmmClient, VmmError};

/// `PUT /vm/machine`: the vCPUs and memory, before start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, in MiB.
    pub memory_mib: u64,
}

/// `PUT /vm/boot`: what to boot, before start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// The kernel (ELF, bzImage or PVH).
    pub kernel: PathBuf,
    /// An initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (the VMM's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// A device's limits; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes per second.
    #[serde(default)]
    pub bytes_per_sec: Option<u64>,
    /// Requests (or frames) per second.
    #[serde(default)]
    pub ops_per_sec: Option<u64>,
}

impl RateLimit {
    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.bytes_per_sec.is_some() || self.ops_per_sec.is_some()
    }
}

/// `PUT /vm/drives/{id}` (and a drive of [`Restore`]): a disk image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The image file.
    pub path: PathBuf,
    /// Read-only for the guest.
    #[serde(default)]
    pub readonly: bool,
    /// Its limits.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// `PUT /vm/nets/{id}` (and a card of [`Restore`]): a network card on a host tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    /// The tap device.
    pub tap: String,
    /// Its MAC address (`52:54:00:12:34:56`); one is made up when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its limits.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// `PATCH /vm/drives/{id}` and `/vm/nets/{id}`: new limits, at any time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPatch {
    /// The limits from now on.
    pub rate_limit: RateLimit,
}

/// `PUT /vm/balloon`: configures the balloon before start, sets its target after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Memory the guest should give back, in MiB.
    pub target_mib: u64,
    /// Whether the guest may take memory back from the balloon when it runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deflate_on_oom: Option<bool>,
}

/// `PUT /vm/vsock`: a virtio-vsock device whose host side is a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host programs connect here; guest connections to host port P go to `<socket>_P`.
    pub socket: PathBuf,
}

/// `PUT /vm/rng`: the virtio entropy device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rng {
    /// Whether the guest has one.
    pub enabled: bool,
}

/// `PUT /vm/console`: where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConsoleConfig {
    /// The VMM's standard output (input from its standard input).
    #[default]
    Stdout,
    /// Appended to a file; no input.
    File {
        /// The file.
        path: PathBuf,
    },
    /// A Unix socket: one client at a time reads the output and writes input; output while
    /// nobody is attached is kept (the last 64 KiB) and replayed to the next client.
    Socket {
        /// The socket's path.
        path: PathBuf,
    },
    /// Discarded.
    None,
}

/// `POST /vm/snapshot`: saves a paused VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Where the state goes.
    pub state_file: PathBuf,
    /// Where the memory goes.
    pub memory_file: PathBuf,
    /// Only the pages written since the last snapshot.
    #[serde(default)]
    pub diff: bool,
}

/// How the memory file that goes with a state file was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryKind {
    /// All of guest RAM (zero pages left as holes).
    Full,
    /// Only the pages written since the previous snapshot, at their place; it is laid over
    /// the full memory file (and the diffs before it) on restore.
    Diff,
}

/// What a snapshot wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// Full or diff.
    pub kind: MemoryKind,
    /// Bytes of memory data written (zero pages and clean pages are not).
    pub memory_bytes: u64,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Time spent, in milliseconds.
    pub duration_ms: f64,
}

/// `POST /vm/restore`: a VM from a snapshot, instead of a start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restore {
    /// The state file.
    pub state_file: PathBuf,
    /// The full memory file, then diffs in order.
    pub memory_files: Vec<PathBuf>,
    /// New network cards (as many as saved): the taps and MACs of a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nets: Option<Vec<Net>>,
    /// New disks (as many as saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drives: Option<Vec<Drive>>,
    /// A new vsock socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Leave the vCPUs parked.
    #[serde(default)]
    pub paused: bool,
    /// Track dirty pages from the start (a diff snapshot follows).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// From the call to the vCPUs running (or parked, when restored paused), in milliseconds.
    pub duration_ms: f64,
    /// Whether the VM runs.
    pub running: bool,
}

/// `POST /vm/migrate`: live migration to a VMM started with `--incoming`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migrate {
    /// `tcp:HOST:PORT`.
    pub to: String,
    /// The pause the guest may see, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Dirty rounds before the VMM throttles or stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
    /// Throttle the vCPUs when the guest dirties memory faster than it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
    /// May switch to post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<bool>,
    /// Copy the disks in the same session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_disks: Option<bool>,
    /// The secret the destination was started with (`--migration-secret-file`): a destination
    /// that has one refuses a migration without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// What a migration did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// From the start to the destination's `Running`, in milliseconds.
    pub total_ms: f64,
    /// From the source's pause to the destination's `Running`, in milliseconds.
    pub downtime_ms: f64,
    /// Dirty rounds after the first full pass.
    pub rounds: u32,
    /// Bytes put on the wire.
    pub bytes_sent: u64,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as "now zero".
    pub zero_pages: u64,
    /// Pages left for the stop-and-copy phase.
    pub last_round_pages: u64,
    /// The highest share of time the vCPUs were held to converge, in percent (0: never).
    pub throttle_percent: u32,
    /// Where the downtime went, in milliseconds: stopping the vCPUs,
    pub pause_ms: f64,
    /// sending the last dirty pages,
    pub last_pages_ms: f64,
    /// saving and encoding the VM's state,
    pub state_ms: f64,
    /// and from the end of the stream to the destination's `Running` (transfer, build, run),
    pub destination_ms: f64,
    /// of which the destination's own work once it had read the VM's state (decoding it,
    /// flushing copied disks, restoring the state, starting the vCPUs), as it measured it.
    pub destination_work_ms: f64,
    /// Whether the guest moved before all of its memory (post-copy).
    pub postcopy: bool,
    /// Pages sent after the guest moved.
    pub postcopy_pages: u64,
    /// Of those, pages the guest waited for at the destination (fetched on fault).
    pub postcopy_faults: u64,
    /// From the destination's `Running` to its last page, in milliseconds.
    pub postcopy_ms: f64,
    /// Bytes of disk data sent (with disks copied; zeros are not counted).
    pub disk_bytes_sent: u64,
}

/// `GET /migration`: the current or last migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// none (empty), connecting, disks, full pass, dirty rounds, stop and copy, completed,
    /// failed.
    pub phase: String,
    /// The destination.
    pub to: String,
    /// Dirty rounds done.
    pub round: u32,
    /// Bytes on the wire so far.
    pub bytes_sent: u64,
    /// Bytes of dirty pages still to send, as of the last round.
    pub remaining_bytes: u64,
    /// Bytes per second the last pass achieved.
    pub bandwidth: f64,
    /// Bytes per second the guest dirtied during the last round.
    pub dirty_rate: f64,
    /// Seconds the rest would take at the measured bandwidth.
    pub estimated_remaining_s: f64,
    /// The vCPU throttle in force, in percent.
    pub throttle_percent: u32,
    /// Whether it may switch to post-copy.
    pub postcopy_allowed: bool,
    /// The result, once completed.
    pub report: Option<MigrationReport>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The VM's life as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Being configured.
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs and devices stopped at a safe point; can resume or be snapshotted.
    Paused,
    /// Over: the guest powered off, rebooted, panicked, or was stopped.
    Stopped,
}

/// `GET /vm`: the VM's state, and the VMM's process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Where the VM is in its life.
    pub state: Phase,
    /// Why the guest stopped, once it did.
    pub exit_reason: Option<String>,
    /// Time since the vCPUs first ran, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// The VMM's process id.
    pub pid: u32,
    /// The configuration (as `GET /vm/config` shows it).
    pub config: serde_json::Value,
    /// While a migration runs: its progress (the rest describes the VM as it began, its
    /// uptime brought up to date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationProgress>,
}
