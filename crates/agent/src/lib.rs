//! The Stratus host agent: owns one machine's instances — their `stratus vmm` processes, disks
//! and taps — and its share of the cluster's networks (bridges, VXLANs, NAT) and images.
//!
//! [`HostAgent`] is what the control plane asks of a host; [`LocalAgent`] does it on this
//! machine. `stratus serve` calls a `LocalAgent` in-process; `stratus agent` ([`daemon`])
//! serves the agent protocol of `stratus-protocol` over HTTP and carries out its orders through
//! [`runtime::AgentRuntime`] on a `LocalAgent`.

pub mod daemon;
pub mod disk;
pub mod fence;
pub mod images;
mod local;
pub mod network;
pub mod process;
pub mod runtime;
pub mod wire;

pub use local::{AgentError, ExecOutput, HostAgent, Incoming, LocalAgent, Moved, Probe, Started};
