//! The Stratus control plane: the REST API ([`api`]) over the store ([`db`], SQLite or etcd),
//! reconcilers that drive each instance's host until it is as asked, the scheduler, address
//! management, image records, host membership and leader election among replicas.
//!
//! It reaches hosts through [`stratus_agent::HostAgent`]: in-process for the machine `stratus
//! serve` runs on, over the agent protocol ([`remote::RemoteHost`]) for hosts that joined. The
//! API's public types and client live in `stratus-api`.

// The OpenAPI document is one `json!` literal, deeper than the default limit.
#![recursion_limit = "256"]

pub mod api;
pub mod bell;
pub mod cluster;
pub mod consolidate;
pub mod db;
pub mod ha;
pub mod hosts;
pub mod image;
pub mod imagesync;
pub mod ipam;
pub mod leader;
pub mod maintenance;
pub mod moves;
pub mod netsync;
pub mod rebalance;
pub mod reconciler;
pub mod remote;
pub mod scheduler;
pub mod server;
pub mod state;
