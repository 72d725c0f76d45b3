//! The Stratus virtual machine monitor: one process per VM, KVM underneath.
//!
//! `vm::start` builds a VM from a `VmConfig` — guest memory, interrupt controllers, the
//! platform devices of `stratus_devices`, the kernel placed by `loader` — and runs one thread
//! per vCPU (`vcpu`). `console` connects the guest's serial port to a terminal. On PVM hosts
//! `pvm` completes the instructions KVM's emulator cannot.

pub mod api;
pub mod console;
pub mod control;
pub mod event_loop;
pub mod kvm;
pub mod kvm_stats;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod pvm;
pub mod service;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use loader::BootSource;
pub use stratus_devices::serial::Serial;
pub use stratus_devices::GuestExit;
pub use stratus_virtio::net::{format_mac, parse_mac};
pub use stratus_virtio::rate_limiter::RateLimit;
pub use vm::{
    create, start, BalloonConfig, DiskConfig, Launch, NetConfig, RunningVm, Vm, VmConfig, VmError,
    VsockConfig,
};
