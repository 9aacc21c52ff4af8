//! The audit log: an append-only, hash-chained, Merkle-checkpointed record of every decision,
//! kept in redb. It depends on nothing else in the crate (it takes plain values), so `verify`
//! needs only this module.
//!
//! An entry is one RFC 8785 canonical JSON object (`canonical`), chained to the previous entry by
//! `prev` (the previous leaf hash) and hashed into an RFC 6962 tree (`merkle`). One writer thread
//! drains a bounded queue and commits whatever is queued as one redb transaction, together with a
//! C2SP signed checkpoint of the new tree (`note`): every acknowledged entry is covered by a signed
//! checkpoint. With `Durability::Sync` an append resolves only after an fsynced commit.

pub mod canonical;
mod file;
pub mod merkle;
pub mod note;
pub mod proof;
pub(crate) mod store;
pub mod tar;
mod verify;

pub use canonical::{Fields, canonical_json};
pub use merkle::{Frontier, Hash, leaf_hash};
pub use note::{Checkpoint, key_id, parse_checkpoint, parse_unverified, valid_key_name};
pub use proof::Proof;
pub use store::{
    AuditConfig, AuditHandle, AuditLog, AuditStats, Checker, Durability, GENESIS_PREV, Precondition, SharedDb,
    rotate_key, rotation_message,
};
pub use verify::{
    BUNDLE_FORMAT, ExportReport, MANIFEST_CONTEXT, Snapshot, VerifyFailure, VerifyOptions, VerifyReport, export_bundle,
    export_from, fetch_failure, first_index_at_or_after, read_entries, verify_bundle, verify_bundle_with, verify_db,
    verify_db_with, verify_served, verify_tx,
};

/// Largest canonical entry accepted, bytes.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit queue is full")]
    QueueFull,
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the audit log cannot commit: {0}")]
    Commit(String),
    #[error("entry of {0} bytes is above the 16 KiB limit")]
    EntryTooLarge(usize),
    #[error("entry cannot be encoded: {0}")]
    Canonical(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("{0}")]
    Integrity(String),
    #[error("{0}")]
    Io(String),
    /// The database file is open in a running gateway (which holds its lock): read the live log
    /// through the gateway's admin API instead.
    #[error("{0}")]
    Locked(String),
    /// A guarded entry whose guard refused: nothing was appended (see `Guard`).
    #[error("{0}")]
    Refused(String),
}

pub fn storage(e: impl std::fmt::Display) -> AuditError {
    AuditError::Storage(e.to_string())
}

#[cfg(test)]
mod tests;
