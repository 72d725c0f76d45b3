//! The Stratus REST API as its users see it: the resources it shows ([`model`]: instances,
//! images, networks, hosts, operations, events) and the client the CLI calls it with
//! ([`client`]). The server is `stratus-control`; this crate links none of it.

pub mod client;
pub mod model;
