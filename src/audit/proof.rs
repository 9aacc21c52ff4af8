//! Inclusion and consistency proofs in a small, documented text format, so that anyone can
//! check offline that an entry is in the log and that the log only ever grew.
//!
//! ```text
//! uapk-gateway proof v1
//! type inclusion            | type consistency
//! index <i>                 | old <m>
//! size <n>                  | new <n>
//! leaf <hex>                | old-root <hex>
//! root <hex>                | new-root <hex>
//! path <hex>   (0 or more, leaf to root order)
//!
//! <signed checkpoint of size n, when the log has one at that size>
//! ```

use super::merkle::{self, Hash};
use super::note::{parse_checkpoint, signer_names};
use super::store::{CHECKPOINTS, ENTRIES, NODE_MIN_LEVEL, NODES, node_key};
use super::verify::VerifyFailure;
use super::{AuditError, storage};
use ed25519_dalek::VerifyingKey;
use redb::{ReadTransaction, ReadableTable};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    Inclusion { index: u64, size: u64, leaf: Hash, root: Hash, path: Vec<Hash>, checkpoint: Option<String> },
    Consistency { old: u64, new: u64, old_root: Hash, new_root: Hash, path: Vec<Hash>, checkpoint: Option<String> },
}

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
pub fn latest_size(tx: &ReadTransaction) -> Result<u64, AuditError> {
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

impl Proof {
    pub fn to_text(&self) -> String {
        let mut out = String::from("uapk-gateway proof v1\n");
        let (path, cp) = match self {
            Proof::Inclusion { index, size, leaf, root, path, checkpoint } => {
                out += &format!(
                    "type inclusion\nindex {index}\nsize {size}\nleaf {}\nroot {}\n",
                    hex::encode(leaf),
                    hex::encode(root)
                );
                (path, checkpoint)
            }
            Proof::Consistency { old, new, old_root, new_root, path, checkpoint } => {
                out += &format!(
                    "type consistency\nold {old}\nnew {new}\nold-root {}\nnew-root {}\n",
                    hex::encode(old_root),
                    hex::encode(new_root)
                );
                (path, checkpoint)
            }
        };
        for h in path {
            out += &format!("path {}\n", hex::encode(h));
        }
        if let Some(note) = cp {
            out.push('\n');
            out += note;
        }
        out
    }

    pub fn parse(text: &str) -> Result<Proof, AuditError> {
        let bad = |m: &str| AuditError::Integrity(format!("proof: {m}"));
        let (head, checkpoint) = match text.split_once("\n\n") {
            Some((h, c)) => (h, Some(c.to_string()).filter(|c| !c.trim().is_empty())),
            None => (text, None),
        };
        let mut lines = head.lines();
        if lines.next() != Some("uapk-gateway proof v1") {
            return Err(bad("not a uapk-gateway proof v1"));
        }
        let mut fields = std::collections::HashMap::new();
        let mut path = Vec::new();
        for l in lines {
            let (k, v) = l.split_once(' ').ok_or_else(|| bad("malformed line"))?;
            if k == "path" {
                path.push(hash(v).ok_or_else(|| bad("bad path hash"))?);
            } else {
                fields.insert(k, v);
            }
        }
        let num =
            |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| bad(&format!("missing {k}")));
        let h = |k: &str| fields.get(k).and_then(|v| hash(v)).ok_or_else(|| bad(&format!("missing {k}")));
        match fields.get("type").copied() {
            Some("inclusion") => Ok(Proof::Inclusion {
                index: num("index")?,
                size: num("size")?,
                leaf: h("leaf")?,
                root: h("root")?,
                path,
                checkpoint,
            }),
            Some("consistency") => Ok(Proof::Consistency {
                old: num("old")?,
                new: num("new")?,
                old_root: h("old-root")?,
                new_root: h("new-root")?,
                path,
                checkpoint,
            }),
            _ => Err(bad("unknown type")),
        }
    }

    /// Checks the proof, and that its root is signed by a trusted key (the embedded checkpoint,
    /// or `trusted_new` given by the auditor). `trusted_old` (a checkpoint the auditor kept)
    /// pins the old root of a consistency proof.
    pub fn verify(
        &self,
        keys: &[VerifyingKey],
        trusted_new: Option<&str>,
        trusted_old: Option<&str>,
    ) -> Result<String, VerifyFailure> {
        let fail = |m: String| VerifyFailure { index: None, reason: m, io: false };
        let signed = |note: &str| {
            let named: Vec<(String, VerifyingKey)> =
                signer_names(note).into_iter().flat_map(|n| keys.iter().map(move |k| (n.clone(), *k))).collect();
            parse_checkpoint(note, &named).map_err(|e| fail(format!("checkpoint: {e}")))
        };
        let (size, root, cp) = match self {
            Proof::Inclusion { size, root, checkpoint, .. } => (*size, *root, checkpoint),
            Proof::Consistency { new, new_root, checkpoint, .. } => (*new, *new_root, checkpoint),
        };
        let note = trusted_new
            .map(str::to_string)
            .or_else(|| cp.clone())
            .ok_or_else(|| fail(format!("no signed checkpoint at size {size}: pass one with --trusted-checkpoint")))?;
        let cp = signed(&note)?;
        if cp.size != size || cp.root != root {
            return Err(fail(format!("the proof's root does not match the signed checkpoint (size {})", cp.size)));
        }
        match self {
            Proof::Inclusion { index, size, leaf, root, path, .. } => {
                if !merkle::verify_inclusion(*index, *size, leaf, path, root) {
                    return Err(VerifyFailure {
                        index: Some(*index),
                        reason: "the inclusion proof does not verify".into(),
                        io: false,
                    });
                }
                Ok(format!("entry {index} is included in the signed tree of size {size}"))
            }
            Proof::Consistency { old, new, old_root, new_root, path, .. } => {
                if let Some(t) = trusted_old {
                    let o = signed(t)?;
                    if o.size != *old || o.root != *old_root {
                        return Err(fail(format!(
                            "the trusted checkpoint (size {}) is not the proof's old tree",
                            o.size
                        )));
                    }
                }
                if !merkle::verify_consistency(*old, *new, old_root, new_root, path) {
                    return Err(fail("the consistency proof does not verify".into()));
                }
                Ok(format!("the tree of size {old} is a prefix of the signed tree of size {new}"))
            }
        }
    }
}

pub(crate) fn hash(h: &str) -> Option<Hash> {
    hex::decode(h.trim()).ok()?.try_into().ok()
}
