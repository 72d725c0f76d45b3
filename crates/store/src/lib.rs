//! The Stratus state store.
//!
//! The control plane keeps all of its durable state (instances, hosts, volumes, ...) in a
//! key-value [`Store`]: string keys, byte values and a store-wide [`Revision`] that every change
//! bumps by one, like etcd's `mod_revision`. Revisions give optimistic concurrency through
//! [`Store::compare_and_swap`], and [`Store::watch`] streams changes in revision order so
//! controllers can react without polling.
//!
//! [`SqliteStore`] is the single-node backend. Every backend must pass [`conformance::run_all`],
//! which is what keeps them interchangeable.

pub mod conformance;
mod sqlite;

use std::sync::mpsc::Receiver;
use std::time::Duration;

pub use sqlite::SqliteStore;

/// A store-wide, strictly increasing change counter; 0 means "nothing written yet".
pub type Revision = u64;

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

/// A change delivered to a [`Watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or replaced; the entry carries the new value and revision.
    Put(Entry),
    /// The key was removed at `revision`.
    Delete {
        /// The removed key.
        key: String,
        /// The store revision of the removal.
        revision: Revision,
    },
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
    /// The backend failed (I/O, corruption, locking); the text carries the backend's cause.
    #[error("store backend failed: {0}")]
    Backend(String),
    /// The key (or prefix) is not acceptable: keys must be non-empty and contain no NUL.
    #[error("invalid key {0:?}: keys must be non-empty and must not contain NUL")]
    InvalidKey(String),
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
    fn put(&self, key: &str, value: &[u8]) -> Result<Revision, StoreError>;
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
    ) -> Result<Revision, StoreError>;
    /// Every key starting with `prefix`, sorted by key ("" lists all).
    fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;
    /// Changes to keys under `prefix` from now on, in revision order.
    fn watch(&self, prefix: &str) -> Result<Watch, StoreError>;
    /// The store's current revision (0 for an empty new store).
    fn revision(&self) -> Result<Revision, StoreError>;
}

/// A stream of [`Event`]s from [`Store::watch`], in revision order.
///
/// Events queue without bound until received; dropping the `Watch` unsubscribes it.
#[derive(Debug)]
pub struct Watch {
    events: Receiver<Event>,
}

impl Watch {
    /// Wraps the receiving end of a backend's event channel.
    ///
    /// Backends keep the sender and drop it when the store goes away, which ends the stream.
    pub fn new(events: Receiver<Event>) -> Watch {
        Watch { events }
    }

    /// Waits up to `timeout` for the next event; `None` on timeout or once the store is dropped.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Returns the next event if one is already queued.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }
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
