//! Inclusion and consistency proofs from the stored log; the text format and its verification
//! are in `uapk_tlog::proof`.

use super::merkle::{self, Hash};
use super::store::{CHECKPOINTS, ENTRIES, NODE_MIN_LEVEL, NODES, node_key};
use super::{AuditError, storage};
use redb::{ReadTransaction, ReadableTable};
pub use uapk_tlog::proof::Proof;

/// The log's stored tree: the roots of its large complete subtrees (the node index), and the
/// entries for the rest. A proof reads O(log n) nodes and hashes at most a few hundred entries per
/// level of its path; without the index (an older log not yet reopened) it hashes every entry.
struct StoredTree {
    entries: redb::ReadOnlyTable<u64, &'static [u8]>,
    nodes: Option<redb::ReadOnlyTable<u64, &'static [u8]>>,
}

impl StoredTree {
    /// The entries, checked to be at least `n`.
    fn open(tx: &ReadTransaction, n: u64) -> Result<StoredTree, AuditError> {
        let entries = tx.open_table(ENTRIES).map_err(storage)?;
        let held = entries.last().map_err(storage)?.map_or(0, |(k, _)| k.value() + 1);
        if held < n {
            return Err(AuditError::Integrity(format!("the log holds {held} entries, fewer than {n}")));
        }
        let nodes = tx.open_table(NODES).ok();
        Ok(StoredTree { entries, nodes })
    }

    /// The stored root of the complete subtree `[index << level, (index + 1) << level)`.
    fn node(&self, level: u32, index: u64) -> Result<Option<Hash>, AuditError> {
        let Some(t) = &self.nodes else { return Ok(None) };
        match t.get(node_key(level, index)).map_err(storage)? {
            Some(v) => Ok(Some(
                v.value().try_into().map_err(|_| AuditError::Integrity("a stored node is not 32 bytes".into()))?,
            )),
            None => Ok(None),
        }
    }

    /// MTH of entries `[start, end)`, hashed one by one.
    fn streamed_root(&self, start: u64, end: u64) -> Result<Hash, AuditError> {
        let mut tree = merkle::Frontier::new();
        for item in self.entries.range(start..end).map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            tree.push(merkle::leaf_hash(v.value()));
        }
        if tree.size() != end - start {
            return Err(AuditError::Integrity(format!("entries {start}..{end} are not all stored")));
        }
        Ok(tree.root())
    }

    fn leaf(&self, i: u64) -> Result<Hash, AuditError> {
        let v = self
            .entries
            .get(i)
            .map_err(storage)?
            .ok_or_else(|| AuditError::Integrity(format!("entry {i} is missing")))?;
        Ok(merkle::leaf_hash(v.value()))
    }
}

impl merkle::LeafSource for StoredTree {
    type Error = AuditError;
    fn range_root(&mut self, start: u64, end: u64) -> Result<Hash, AuditError> {
        let len = end - start;
        if len <= 1 << NODE_MIN_LEVEL {
            return self.streamed_root(start, end);
        }
        if len.is_power_of_two() && start.is_multiple_of(len) {
            let level = len.trailing_zeros();
            return match self.node(level, start >> level)? {
                Some(h) => Ok(h),
                None => self.streamed_root(start, end),
            };
        }
        // MTH(D[start:end]) = H(MTH of the first k, MTH of the rest), k the largest power of two
        // below the length (RFC 9162 §2.1.1).
        let k = merkle::split(len);
        let left = self.range_root(start, start + k)?;
        let right = self.range_root(start + k, end)?;
        Ok(merkle::node_hash(&left, &right))
    }
}

/// The signed checkpoint at size `n`, if the log has one.
fn checkpoint_at(tx: &ReadTransaction, n: u64) -> Result<Option<String>, AuditError> {
    let cps = tx.open_table(CHECKPOINTS).map_err(storage)?;
    Ok(cps.get(n).map_err(storage)?.map(|v| v.value().to_string()))
}

/// The size of the latest checkpoint.
pub(crate) fn latest_size(tx: &ReadTransaction) -> Result<u64, AuditError> {
    let cps = tx.open_table(CHECKPOINTS).map_err(storage)?;
    Ok(cps.last().map_err(storage)?.map_or(0, |(k, _)| k.value()))
}

/// Proves entry `index` is in the tree of `size` entries (default: the latest checkpoint).
pub fn inclusion(tx: &ReadTransaction, index: u64, size: Option<u64>) -> Result<Proof, AuditError> {
    let size = match size {
        Some(s) => s,
        None => latest_size(tx)?,
    };
    if index >= size {
        return Err(AuditError::Integrity(format!("index {index} is not below tree size {size}")));
    }
    let mut leaves = StoredTree::open(tx, size)?;
    Ok(Proof::Inclusion {
        index,
        size,
        leaf: leaves.leaf(index)?,
        root: merkle::LeafSource::range_root(&mut leaves, 0, size)?,
        path: merkle::inclusion_path(&mut leaves, index, size)?,
        checkpoint: checkpoint_at(tx, size)?,
    })
}

/// Proves the tree of `old` entries is a prefix of the tree of `new` entries.
pub fn consistency(tx: &ReadTransaction, old: u64, new: u64) -> Result<Proof, AuditError> {
    if old == 0 || old > new {
        return Err(AuditError::Integrity(format!("need 0 < old <= new (got {old}, {new})")));
    }
    let mut leaves = StoredTree::open(tx, new)?;
    Ok(Proof::Consistency {
        old,
        new,
        old_root: merkle::LeafSource::range_root(&mut leaves, 0, old)?,
        new_root: merkle::LeafSource::range_root(&mut leaves, 0, new)?,
        path: merkle::consistency_path(&mut leaves, old, new)?,
        checkpoint: checkpoint_at(tx, new)?,
    })
}
