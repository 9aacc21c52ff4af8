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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::{self, consistency_proof, inclusion_proof, root_from_leaves};
    use crate::audit::test_support::{filled_log, open, pubkey};
    use crate::audit::{Durability, Hash, parse_checkpoint, store};

    /// Proofs built from the stored node index equal the reference proofs over all leaves, and an
    /// index that is missing (a log written before it existed) is rebuilt at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proofs_from_the_node_index_match_proofs_over_all_leaves() {
        let (dir, path) = filled_log(Durability::Async, 1300).await;
        let check = |db: &redb::Database| {
            use redb::{ReadableDatabase, ReadableTable};
            let tx = db.begin_read().unwrap();
            let leaves: Vec<Hash> = tx
                .open_table(store::ENTRIES)
                .unwrap()
                .iter()
                .unwrap()
                .map(|r| merkle::leaf_hash(r.unwrap().1.value()))
                .collect();
            let n = leaves.len() as u64;
            assert_eq!(Some(root_from_leaves(&leaves)), latest_checkpoint_root(&tx));
            assert_eq!(redb::ReadableTableMetadata::len(&tx.open_table(store::NODES).unwrap()).unwrap(), 5 + 2 + 1);
            for (index, size) in [(0, n), (255, 256), (256, 513), (700, 1024), (1023, 1025), (1299, n), (5, 300)] {
                let Proof::Inclusion { root, path, leaf, .. } = inclusion(&tx, index, Some(size)).unwrap() else {
                    panic!()
                };
                let part = &leaves[..size as usize];
                assert_eq!(root, root_from_leaves(part), "root at {size}");
                assert_eq!(leaf, leaves[index as usize]);
                assert_eq!(path, inclusion_proof(part, index as usize), "inclusion {index} in {size}");
            }
            for (old, new) in [(1, n), (256, 1024), (257, 1300), (1024, 1025), (600, 1299)] {
                let Proof::Consistency { old_root, new_root, path, .. } = consistency(&tx, old, new).unwrap() else {
                    panic!()
                };
                let part = &leaves[..new as usize];
                assert_eq!((old_root, new_root), (root_from_leaves(&part[..old as usize]), root_from_leaves(part)));
                assert_eq!(path, consistency_proof(part, old as usize), "consistency {old} -> {new}");
            }
        };
        {
            let db = redb::Database::open(&path).unwrap();
            check(&db);
            // Drop the index, as a log from before it would have none.
            let tx = db.begin_write().unwrap();
            tx.delete_table(store::NODES).unwrap();
            tx.commit().unwrap();
        }
        let log = open(dir.path(), Durability::Sync, 16);
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        let db = redb::Database::open(&path).unwrap();
        check(&db);
        // The proof really reads the index: a wrong node gives a root the checkpoint will not match.
        let tx = db.begin_write().unwrap();
        tx.open_table(store::NODES).unwrap().insert(store::node_key(10, 0), [0u8; 32].as_slice()).unwrap();
        tx.commit().unwrap();
        let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
        let Proof::Inclusion { root, .. } = inclusion(&tx, 1299, Some(1300)).unwrap() else { panic!() };
        assert_ne!(Some(root), latest_checkpoint_root(&tx));
    }

    fn latest_checkpoint_root(tx: &redb::ReadTransaction) -> Option<Hash> {
        use redb::ReadableTable;
        let note = tx.open_table(store::CHECKPOINTS).unwrap().last().unwrap()?.1.value().to_string();
        Some(parse_checkpoint(&note, &[("test/log".to_string(), pubkey())]).unwrap().root)
    }
}
