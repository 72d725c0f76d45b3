//! The Stratus control plane and host agent (`stratus serve`): a REST API over an embedded
//! store, a reconciler that drives the host agent until each instance is as asked, and the
//! agent that runs one `stratus vmm` process per instance with its disk, tap and address.
//! `client` is the API's client, used by the CLI.

pub mod agent;
pub mod api;
pub mod bell;
pub mod client;
pub mod cluster;
pub mod console;
pub mod dashboard;
pub mod db;
pub mod disk;
pub mod hostd;
pub mod hostimages;
pub mod hosts;
pub mod image;
pub mod leader;
pub mod maintenance;
pub mod metrics;
pub mod model;
pub mod moves;
pub mod netsync;
pub mod network;
pub mod openapi;
pub mod reconciler;
pub mod remote;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod wire;
