//! Snapshots: a paused VM becomes a state file (`format`: versioned, checksummed, holding
//! `VmState`) and a memory file (`memory`: guest RAM, sparse, mapped rather than read on
//! restore), and comes back to life in another process exactly where it stopped.

pub mod format;
pub mod memory;
mod v1;

use std::path::Path;

use stratus_devices::serial::SerialState;
use stratus_virtio::mmio::TransportState;
pub use stratus_vmm_api::MemoryKind;

use crate::vcpu::VcpuState;
use crate::vm::VmConfig;

/// The in-kernel interrupt controllers, timer and clock of a VM.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// The two 8259 PICs and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_bindings::kvm_irqchip>,
    /// The 8254 PIT.
    pub pit: kvm_bindings::kvm_pit_state2,
    /// kvmclock's time base.
    pub clock: kvm_bindings::kvm_clock_data,
}

/// Everything of a VM but its memory.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// The configuration the VM was built from (a restore may change host-side identities:
    /// taps, MACs, vsock CID and socket).
    pub config: VmConfig,
    /// How long the guest had run when saved, in milliseconds.
    pub uptime_ms: u64,
    /// Interrupt controllers, PIT, clock.
    pub machine: MachineState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The console UART.
    pub serial: SerialState,
    /// Every virtio device, in slot order.
    pub devices: Vec<TransportState>,
    /// What the memory file written with this state holds.
    pub memory: MemoryKind,
    /// The VM generation id the guest saw (a restore as a clone gives it a new one).
    pub generation_id: [u8; 16],
}

/// Errors saving or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file cannot be read back.
    #[error(transparent)]
    Format(#[from] format::FormatError),
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause (kept out of the error chain: the message carries it).
        cause: std::io::Error,
    },
    /// The memory files do not fit the state.
    #[error("{0}")]
    Memory(String),
}

/// The temporary file a snapshot file is written to before a rename gives it its name, so
/// that a crash or a failure never leaves a half-written file under the real one.
fn partial(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    name.into()
}

/// Writes `state` to `path` (through a temporary file and a rename: a crash never leaves a
/// half-written state file under the real name).
pub fn write_state(path: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let bytes = format::encode(state)?;
    let io = |source| SnapshotError::Io { path: path.to_owned(), cause: source };
    let tmp = partial(path);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<VmState, SnapshotError> {
    let bytes =
        std::fs::read(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), cause: source })?;
    Ok(format::decode(&bytes)?)
}
