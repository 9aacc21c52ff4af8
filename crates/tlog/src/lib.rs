//! The audit log's core, free of storage and transport: RFC 8785 canonical JSON (`canonical`),
//! the RFC 6962 Merkle tree (`merkle`), C2SP signed notes and checkpoints (`note`), the proof text
//! format (`proof`), and verification (`verify`). Verification reads a log through an
//! `EntrySource` (entries in index order, stored checkpoints, optional per-entry signatures), so
//! one walk checks a database file, an exported bundle and a log served over HTTP alike.

pub mod canonical;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod verify;

pub use canonical::{Fields, canonical_json};
pub use merkle::{Frontier, Hash, leaf_hash};
pub use note::{Checkpoint, key_id, parse_checkpoint, parse_unverified, valid_key_name};
pub use proof::Proof;
pub use verify::{
    BUNDLE_FORMAT, EntrySource, MANIFEST_CONTEXT, Trusted, VerifyFailure, VerifyOptions, VerifyReport, fetch_failure,
    verify_bundle, verify_bundle_with, verify_log, verify_served,
};

/// Largest canonical entry accepted, bytes.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;

/// The `prev` of entry 0.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The message a rotation's old key signs: the log, and the new public key.
pub fn rotation_message(origin: &str, new_key_hex: &str) -> String {
    format!("uapk-gateway key rotation\n{origin}\n{new_key_hex}\n")
}

/// The audit log's errors (the gateway's `audit::AuditError`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
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

/// A storage error, as `Error::Storage`.
pub fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

#[cfg(test)]
mod tests;
