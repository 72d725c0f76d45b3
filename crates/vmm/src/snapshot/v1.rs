//! Format version 1, as it was written, and how it becomes the current `VmState`: version 2
//! added rate limits to disks and network cards and the balloon to the configuration.
//! Keep this module as long as version 1 is readable (`format::OLDEST_READABLE`).

use std::path::PathBuf;

use stratus_devices::serial::SerialState;
use stratus_virtio::mmio::TransportState;

use super::{MachineState, MemoryKind, VmState};
use crate::vcpu::VcpuState;
use crate::vm::{DiskConfig, NetConfig, VmConfig, VsockConfig};
use crate::{BootSource, RateLimit};

#[derive(serde::Deserialize)]
struct Disk {
    path: PathBuf,
    readonly: bool,
}

#[derive(serde::Deserialize)]
struct Net {
    tap: String,
    mac: Option<[u8; 6]>,
}

#[derive(serde::Deserialize)]
struct Config {
    vcpus: u32,
    memory: u64,
    boot: BootSource,
    disks: Vec<Disk>,
    nets: Vec<Net>,
    rng: bool,
    vsock: Option<VsockConfig>,
}

/// `VmState` of format version 1.
#[derive(serde::Deserialize)]
pub struct State {
    config: Config,
    uptime_ms: u64,
    machine: MachineState,
    vcpus: Vec<VcpuState>,
    serial: SerialState,
    devices: Vec<TransportState>,
    memory: MemoryKind,
    generation_id: [u8; 16],
}

impl From<State> for VmState {
    fn from(old: State) -> Self {
        let c = old.config;
        VmState {
            config: VmConfig {
                vcpus: c.vcpus,
                memory: c.memory,
                boot: c.boot,
                disks: c
                    .disks
                    .into_iter()
                    .map(|d| DiskConfig {
                        path: d.path,
                        readonly: d.readonly,
                        rate_limit: RateLimit::default(),
                    })
                    .collect(),
                nets: c
                    .nets
                    .into_iter()
                    .map(|n| NetConfig { tap: n.tap, mac: n.mac, rate_limit: RateLimit::default() })
                    .collect(),
                rng: c.rng,
                vsock: c.vsock,
                balloon: None,
            },
            uptime_ms: old.uptime_ms,
            machine: old.machine,
            vcpus: old.vcpus,
            serial: old.serial,
            devices: old.devices,
            memory: old.memory,
            generation_id: old.generation_id,
        }
    }
}
