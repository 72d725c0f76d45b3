//! The Stratus state store.
//!
//! The control plane keeps all of its durable state (instances, hosts, volumes, ...) in a
//! key-value [`Store`]: string keys, byte values and a store-wide [`Revision`] that every change
//! bumps by one, like etcd's `mod_revision`. Revisions give optimistic concurrency through
//! [`Store::compare_and_swap`] and multi-key [`Txn`]s; [`Store::range`] returns the revision a
//! listing was read at and [`Store::watch_from`] streams every change after it, so controllers
//! list once and then react without polling (an informer, as Kubernetes calls it). Leases
//! ([`Store::grant_lease`]) attach keys to a holder that must keep renewing them: an agent's
//! heartbeat, a leader's claim.
//!
//! [`SqliteStore`] is the single-node backend, [`EtcdStore`] the cluster one. Every backend must
//! pass [`conformance::run_all`], which is what keeps them interchangeable.

pub mod conformance;
mod etcd;
pub mod etcd_server;
mod sqlite;

use std::sync::mpsc::Receiver;
use std::time::Duration;

pub use etcd::{EtcdConfig, EtcdStore};
pub use sqlite::SqliteStore;

/// A store-wide, strictly increasing change counter. A new SQLite store starts at 0; a new etcd
/// cluster at 1 (etcd counts its own creation). Only "later means greater" is promised across
/// backends, and "each change adds one" while nobody else writes.
pub type Revision = u64;

/// A lease: keys put with it vanish when its holder stops renewing it in time.
pub type LeaseId = i64;

/// One key with its value and the revision of its last change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key, as given to [`Store::put`].
    pub key: String,
    /// The stored bytes; the store never interprets them.
    pub value: Vec<u8>,
    /// The store revision at which this key was last created or replaced.
    pub revision: Revision,
}

/// What [`Store::range`] read, and the store revision it was read at: a watch from that
/// revision misses nothing and repeats nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The entries under the prefix, sorted by key.
    pub entries: Vec<Entry>,
    /// The store revision the listing reflects.
    pub revision: Revision,
}

/// A change delivered to a [`Watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or replaced; the entry carries the new value and revision.
    Put(Entry),
    /// The key was removed at `revision` (by a delete, a transaction or its lease's expiry).
    Delete {
        /// The removed key.
        key: String,
        /// The store revision of the removal.
        revision: Revision,
    },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(entry) => &entry.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The store revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(entry) => entry.revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// One write of a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or replace `key`, attached to `lease` if given.
    Put {
        /// The key to write.
        key: String,
        /// Its new value.
        value: Vec<u8>,
        /// The lease the key lives and dies with.
        lease: Option<LeaseId>,
    },
    /// Remove `key` if it exists.
    Delete {
        /// The key to remove.
        key: String,
    },
}

/// A multi-key transaction: if every key is at its expected revision, all writes happen at one
/// new store revision; otherwise nothing does. Build it with [`Txn::new`] and its methods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// `(key, expected revision)`: `None` means the key must be absent.
    pub compares: Vec<(String, Option<Revision>)>,
    /// The writes, applied in order; a key may be written at most once.
    pub ops: Vec<Op>,
}

impl Txn {
    /// An empty transaction (it changes nothing and succeeds).
    pub fn new() -> Txn {
        Txn::default()
    }

    /// Requires `key` to be at `revision` (`None`: absent) for the transaction to apply.
    pub fn expect(mut self, key: &str, revision: Option<Revision>) -> Txn {
        self.compares.push((key.to_string(), revision));
        self
    }

    /// Creates or replaces `key`.
    pub fn put(mut self, key: &str, value: &[u8]) -> Txn {
        self.ops.push(Op::Put { key: key.to_string(), value: value.to_vec(), lease: None });
        self
    }

    /// Creates or replaces `key`, attached to `lease`: the key is deleted when the lease ends.
    pub fn put_leased(mut self, key: &str, value: &[u8], lease: LeaseId) -> Txn {
        self.ops.push(Op::Put { key: key.to_string(), value: value.to_vec(), lease: Some(lease) });
        self
    }

    /// Removes `key` if it exists.
    pub fn delete(mut self, key: &str) -> Txn {
        self.ops.push(Op::Delete { key: key.to_string() });
        self
    }

    /// Checks the keys and that no key is written twice (etcd refuses that too).
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        for (key, _) in &self.compares {
            validate_key(key)?;
        }
        let mut written = std::collections::HashSet::new();
        for op in &self.ops {
            let key = match op {
                Op::Put { key, .. } | Op::Delete { key } => key,
            };
            validate_key(key)?;
            if !written.insert(key.as_str()) {
                return Err(StoreError::Invalid(format!("transaction writes key {key:?} twice")));
            }
        }
        Ok(())
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap found the key at a different revision than expected; nothing changed.
    #[error(
        "conflict on key {key:?}: expected {}, found {}",
        describe_revision(*.expected),
        describe_revision(*.actual)
    )]
    Conflict {
        /// The contended key.
        key: String,
        /// The revision the caller expected (`None`: the key should have been absent).
        expected: Option<Revision>,
        /// The key's revision at the time of the check (`None`: the key was absent).
        actual: Option<Revision>,
    },
    /// A watch asked for changes the store no longer keeps: list again and watch from there.
    #[error("revision {requested} is compacted (history starts at {compacted}): list again")]
    Compacted {
        /// The first revision the watch needed.
        requested: Revision,
        /// The oldest revision the store still has history for.
        compacted: Revision,
    },
    /// The lease expired or was revoked (or never existed); its keys are gone.
    #[error("lease {0:x} has expired or does not exist")]
    LeaseExpired(LeaseId),
    /// The backend failed (I/O, corruption, locking, an unreachable cluster); the text carries the
    /// backend's cause. A write that fails this way may or may not have been applied.
    #[error("store backend failed: {0}")]
    Backend(String),
    /// The key (or prefix) is not acceptable: keys must be non-empty and contain no NUL.
    #[error("invalid key {0:?}: keys must be non-empty and must not contain NUL")]
    InvalidKey(String),
    /// The request is malformed in another way (a transaction writing a key twice, a zero TTL).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Renders one side of a conflict for [`StoreError::Conflict`]'s message.
fn describe_revision(revision: Option<Revision>) -> String {
    match revision {
        Some(revision) => format!("revision {revision}"),
        None => "no key".to_string(),
    }
}

/// A versioned key-value store: the control plane's source of truth.
///
/// Keys are non-empty strings without NUL, conventionally `/`-separated paths such as
/// `instances/i-1234`. All methods are safe to call from many threads at once.
pub trait Store: Send + Sync {
    /// Returns the key's entry, or `None` if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Creates or replaces; returns the new revision.
    fn put(&self, key: &str, value: &[u8]) -> Result<Revision, StoreError> {
        self.txn(&Txn::new().put(key, value))
    }
    /// Returns whether the key existed.
    fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Atomically: if the key's current revision equals `expected` (None = key must be absent),
    /// store `value` (None = delete the key) and return the new store revision; otherwise Conflict with the actual revision.
    ///
    /// Deleting a key that is absent, as expected, changes nothing: it succeeds with the
    /// current store revision and emits no event, just as [`Store::delete`] of a missing key.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: Option<&[u8]>,
    ) -> Result<Revision, StoreError> {
        let txn = Txn::new().expect(key, expected);
        self.txn(&match value {
            Some(value) => txn.put(key, value),
            None => txn.delete(key),
        })
    }
    /// Applies `txn` as one write: every compare holds and all its writes happen at one new
    /// revision (returned), or the first failing compare is returned as
    /// [`StoreError::Conflict`] and nothing changes. A transaction whose writes change nothing
    /// (deletes of absent keys) succeeds at the current revision without an event.
    fn txn(&self, txn: &Txn) -> Result<Revision, StoreError>;
    /// Every key starting with `prefix`, sorted by key ("" lists all).
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self.range(prefix)?.entries)
    }
    /// Like [`Store::list`], with the store revision the listing was read at.
    fn range(&self, prefix: &str) -> Result<Listing, StoreError>;
    /// Changes to keys under `prefix` from now on, in revision order.
    fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        self.watch_from(prefix, self.revision()?)
    }
    /// Every change under `prefix` after revision `after` (usually a [`Listing`]'s), then every
    /// later one as it happens, in revision order. Fails with [`StoreError::Compacted`] when
    /// that history is gone; a watch that breaks later delivers one error and ends.
    fn watch_from(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError>;
    /// The store's current revision.
    fn revision(&self) -> Result<Revision, StoreError>;
    /// A new lease that lives `ttl` (whole seconds, at least one) unless renewed.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews the lease for its whole TTL; [`StoreError::LeaseExpired`] if it already ended.
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends the lease now, deleting its keys. Revoking an unknown lease is not an error.
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Forgets the history of changes before `revision`: watches from earlier fail with
    /// [`StoreError::Compacted`]. Live keys are untouched.
    fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}

/// What a [`Watch`] delivers: a change, or the error that ended the watch.
pub type WatchItem = Result<Event, StoreError>;

/// A stream of [`Event`]s from [`Store::watch`], in revision order.
///
/// Events queue without bound until received; dropping the `Watch` unsubscribes it. A watch
/// that breaks (its history compacted, the cluster unreachable) delivers one error and ends:
/// the watcher lists again and watches from that listing's revision.
pub struct Watch {
    events: Receiver<WatchItem>,
    cancel: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// Wraps the receiving end of a backend's event channel.
    ///
    /// Backends keep the sender and drop it when the store goes away, which ends the stream.
    pub fn new(events: Receiver<WatchItem>) -> Watch {
        Watch { events, cancel: None }
    }

    /// Like [`Watch::new`], with `cancel` run when the watch is dropped (to close a stream).
    pub fn with_cancel(events: Receiver<WatchItem>, cancel: impl FnOnce() + Send + 'static) -> Watch {
        Watch { events, cancel: Some(Box::new(cancel)) }
    }

    /// Waits up to `timeout` for the next item; `None` on timeout or once the stream ended.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<WatchItem> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Returns the next item if one is already queued.
    pub fn try_recv(&self) -> Option<WatchItem> {
        self.events.try_recv().ok()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel();
        }
    }
}

/// A lease's TTL in whole seconds, as both backends keep it; zero is refused.
pub(crate) fn ttl_seconds(ttl: Duration) -> Result<i64, StoreError> {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if seconds == 0 {
        return Err(StoreError::Invalid("a lease needs a TTL of at least one second".to_string()));
    }
    i64::try_from(seconds).map_err(|_| StoreError::Invalid(format!("lease TTL {ttl:?} is too long")))
}

/// Rejects keys the contract forbids, before any backend sees them.
pub(crate) fn validate_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.contains('\0') {
        return Err(StoreError::InvalidKey(key.to_string()));
    }
    Ok(())
}

/// Rejects prefixes that could never match a valid key; "" is allowed and matches everything.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.contains('\0') {
        return Err(StoreError::InvalidKey(prefix.to_string()));
    }
    Ok(())
}

/// The smallest string greater than every string that starts with `prefix`, or `None` if no
/// such bound exists (empty prefix, or only `char::MAX`).
///
/// Working on chars rather than bytes keeps the bound valid UTF-8 (SQLite TEXT must be), and
/// is still exact because UTF-8 byte order equals code point order.
pub(crate) fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // Skipping the surrogate gap is exact: no char lies between U+D7FF and U+E000.
        let next = match last as u32 {
            0xD7FF => Some('\u{E000}'),
            code => char::from_u32(code + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_increments_last_char() {
        assert_eq!(prefix_successor("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_successor("a%").as_deref(), Some("a&"));
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{10FFFF}\u{10FFFF}"), None);
    }

    #[test]
    fn conflict_message_is_one_line() {
        let error = StoreError::Conflict { key: "counter".to_string(), expected: None, actual: Some(7) };
        assert_eq!(error.to_string(), "conflict on key \"counter\": expected no key, found revision 7");
    }

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("a").is_ok());
        assert!(matches!(validate_key(""), Err(StoreError::InvalidKey(_))));
        assert!(matches!(validate_key("a\0b"), Err(StoreError::InvalidKey(_))));
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("a\0").is_err());
    }
}
