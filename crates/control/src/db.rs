//! Typed access to the store: where each kind of resource lives under which key, JSON values,
//! and read-modify-write with compare-and-swap so that the API and the reconciler never
//! overwrite each other's changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use stratus_store::{Revision, Store, StoreError};

use stratus_api::model::{Event, Image, Instance, Network, Operation};

/// Errors of typed store access.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value does not decode (written by another version, or damaged).
    #[error("stored value at {key} is unreadable: {cause}")]
    Corrupt {
        /// Its key.
        key: String,
        /// The decoder's message.
        cause: String,
    },
    /// Creating something that exists.
    #[error("{0} already exists")]
    Exists(String),
    /// Changing something that does not exist.
    #[error("{0} not found")]
    NotFound(String),
}

/// Key of an instance.
pub fn instance_key(project: &str, name: &str) -> String {
    format!("/instances/{project}/{name}")
}
/// Key of an image.
pub fn image_key(project: &str, name: &str) -> String {
    format!("/images/{project}/{name}")
}
/// Key of a network.
pub fn network_key(project: &str, name: &str) -> String {
    format!("/networks/{project}/{name}")
}
/// Key of an address lease on a network.
pub fn lease_key(network: &str, ip: std::net::Ipv4Addr) -> String {
    format!("/leases/{network}/{ip}")
}
/// Key of an operation.
pub fn operation_key(id: &str) -> String {
    format!("/operations/{id}")
}
/// Key of a host.
pub fn host_key(name: &str) -> String {
    format!("/hosts/{name}")
}

/// The typed store.
#[derive(Clone)]
pub struct Db {
    store: Arc<dyn Store>,
}

/// Keeps event keys unique within one millisecond.
static EVENT_SEQ: AtomicU64 = AtomicU64::new(0);
/// Events kept; older ones are dropped as new ones come.
const EVENTS_KEPT: usize = 2000;

impl Db {
    /// Wraps a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Db { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Reads and decodes one value with its revision.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, Revision)>, DbError> {
        match self.store.get(key)? {
            None => Ok(None),
            Some(entry) => Ok(Some((decode(key, &entry.value)?, entry.revision))),
        }
    }

    /// Every value under `prefix`, in key order.
    pub fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, DbError> {
        self.store.list(prefix)?.into_iter().map(|e| decode(&e.key, &e.value)).collect()
    }

    /// Stores `value` at `key` only if the key is free.
    pub fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<Revision, DbError> {
        match self.store.compare_and_swap(key, None, Some(&encode(value))) {
            Err(StoreError::Conflict { .. }) => Err(DbError::Exists(key.to_owned())),
            other => Ok(other?),
        }
    }

    /// Stores `value` at `key` whatever was there.
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<Revision, DbError> {
        Ok(self.store.put(key, &encode(value))?)
    }

    /// Removes `key`; whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool, DbError> {
        Ok(self.store.delete(key)?)
    }

    /// Read-modify-write: applies `change` to the current value and stores the result if
    /// nobody changed it meanwhile (else reads again and retries). `change` returns false to
    /// leave the value alone. Returns the value as stored.
    pub fn update<T, F>(&self, key: &str, mut change: F) -> Result<T, DbError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut T) -> bool,
    {
        loop {
            let Some((mut value, revision)) = self.get::<T>(key)? else {
                return Err(DbError::NotFound(key.to_owned()));
            };
            if !change(&mut value) {
                return Ok(value);
            }
            match self.store.compare_and_swap(key, Some(revision), Some(&encode(&value))) {
                Ok(_) => return Ok(value),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// [`Db::update`] of a value that may not exist yet: `change` starts from the default then.
    pub fn upsert<T, F>(&self, key: &str, mut change: F) -> Result<T, DbError>
    where
        T: Serialize + DeserializeOwned + Default,
        F: FnMut(&mut T),
    {
        loop {
            let (mut value, revision) = match self.get::<T>(key)? {
                Some((value, revision)) => (value, Some(revision)),
                None => (T::default(), None),
            };
            change(&mut value);
            match self.store.compare_and_swap(key, revision, Some(&encode(&value))) {
                Ok(_) => return Ok(value),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// An instance.
    pub fn instance(&self, project: &str, name: &str) -> Result<Option<Instance>, DbError> {
        Ok(self.get(&instance_key(project, name))?.map(|(v, _)| v))
    }

    /// Every instance of every project.
    pub fn instances(&self) -> Result<Vec<Instance>, DbError> {
        self.list("/instances/")
    }

    /// An image.
    pub fn image(&self, project: &str, name: &str) -> Result<Option<Image>, DbError> {
        Ok(self.get(&image_key(project, name))?.map(|(v, _)| v))
    }

    /// A network.
    pub fn network(&self, project: &str, name: &str) -> Result<Option<Network>, DbError> {
        Ok(self.get(&network_key(project, name))?.map(|(v, _)| v))
    }

    /// An operation.
    pub fn operation(&self, id: &str) -> Result<Option<Operation>, DbError> {
        Ok(self.get(&operation_key(id))?.map(|(v, _)| v))
    }

    /// Appends an event (and forgets the oldest beyond the last few thousand).
    pub fn event(&self, project: &str, instance: &str, level: &str, message: impl Into<String>) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let seq = EVENT_SEQ.fetch_add(1, Ordering::Relaxed);
        let event = Event {
            time_ms,
            instance: instance.to_owned(),
            project: project.to_owned(),
            level: level.to_owned(),
            message: message.into(),
        };
        let key = format!("/events/{time_ms:016}-{seq:08}");
        // Events are a log for people; failing to write one must not fail the work it describes.
        let _ = self.put(&key, &event);
        if seq.is_multiple_of(100) {
            if let Ok(all) = self.store.list("/events/") {
                for old in all.iter().take(all.len().saturating_sub(EVENTS_KEPT)) {
                    let _ = self.store.delete(&old.key);
                }
            }
        }
    }

    /// Events, oldest first, optionally only one instance's, only newer than `after_ms`.
    pub fn events(&self, instance: Option<&str>, after_ms: u64) -> Result<Vec<Event>, DbError> {
        let all: Vec<Event> = self.list("/events/")?;
        Ok(all
            .into_iter()
            .filter(|e| e.time_ms > after_ms && instance.is_none_or(|name| e.instance == name))
            .collect())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our model types always serialize (no maps with non-string keys, no failing impls).
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::Corrupt { key: key.to_owned(), cause: e.to_string() })
}
