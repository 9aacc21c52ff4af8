//! The audit log: an append-only, hash-chained, Merkle-checkpointed record of every decision,
//! kept in redb. It depends on nothing else in the crate (it takes plain values). Its storage-free
//! core (canonical JSON, Merkle tree, signed notes, proofs, verification) is the `uapk-tlog`
//! crate (crates/tlog); this module adds the redb store, export and the redb reader verification
//! walks.
//!
//! An entry is one RFC 8785 canonical JSON object (`canonical`), chained to the previous entry by
//! `prev` (the previous leaf hash) and hashed into an RFC 6962 tree (`merkle`). One writer thread
//! drains a bounded queue and commits whatever is queued as one redb transaction, together with a
//! C2SP signed checkpoint of the new tree (`note`): every acknowledged entry is covered by a signed
//! checkpoint. With `Durability::Sync` an append resolves only after an fsynced commit.

pub(crate) use uapk_tlog::{canonical, merkle, note};
mod file;
pub mod proof;
pub(crate) mod store;
pub mod tar;
mod verify;

pub use canonical::{Fields, canonical_json};
pub use merkle::{Frontier, leaf_hash};
pub use note::{Checkpoint, key_id, parse_checkpoint, parse_unverified};
pub use proof::Proof;
pub use store::{AuditConfig, AuditHandle, AuditLog, Durability, Precondition, rotate_key};
pub use uapk_tlog::Error as AuditError;
pub use verify::{
    LogReader, MANIFEST_CONTEXT, Snapshot, VerifyFailure, VerifyOptions, VerifyReport, export_bundle, fetch_failure,
    verify_bundle_with, verify_db, verify_db_with, verify_served,
};

pub(crate) use merkle::Hash;
pub(crate) use note::valid_key_name;
pub(crate) use store::{Checker, SharedDb};
pub(crate) use uapk_tlog::{MAX_ENTRY_BYTES, storage};
pub(crate) use verify::{ExportReport, export_from, first_index_at_or_after, read_entries};

#[cfg(test)]
mod test_support;
