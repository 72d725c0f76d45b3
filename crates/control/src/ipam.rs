//! Address management: each network's addresses are leased in the store, one key per address,
//! so that every control plane replica hands out each address once, and an instance keeps its
//! address wherever it moves.

use std::net::Ipv4Addr;

use stratus_agent::network::Subnet;
use stratus_api::model::Network;

use crate::db::{lease_key, Db, DbError};

/// Errors of address management.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The network's subnet does not parse.
    #[error(transparent)]
    Subnet(#[from] stratus_agent::network::NetworkError),
    /// Every address of the subnet is leased.
    #[error("network '{0}' has no free address left")]
    Exhausted(String),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Leases the lowest free address of `network` to instance `id` (compare-and-swap per
/// address, so two launches at once never get the same one).
pub fn lease(db: &Db, network: &Network, id: &str) -> Result<Ipv4Addr, IpamError> {
    let subnet = Subnet::parse(&network.cidr)?;
    let taken: std::collections::HashSet<String> = db
        .store()
        .list(&format!("/leases/{}/", network.name))
        .map_err(DbError::from)?
        .into_iter()
        .map(|e| e.key)
        .collect();
    for ip in subnet.guest_addresses() {
        let key = lease_key(&network.name, ip);
        if taken.contains(&key) {
            continue;
        }
        match db.create(&key, &id) {
            Ok(_) => return Ok(ip),
            Err(DbError::Exists(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IpamError::Exhausted(network.name.clone()))
}

/// Gives back the address `ip` of `network` if `id` holds it.
pub fn release(db: &Db, network: &str, ip: &str, id: &str) -> Result<(), IpamError> {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else { return Ok(()) };
    let key = lease_key(network, ip);
    if let Some((holder, _)) = db.get::<String>(&key)? {
        if holder == id {
            db.delete(&key)?;
        }
    }
    Ok(())
}
