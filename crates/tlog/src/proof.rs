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

use crate::Error as AuditError;
use crate::merkle::{self, Hash};
use crate::note::{parse_checkpoint, signer_names};
use crate::verify::VerifyFailure;
use ed25519_dalek::VerifyingKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    Inclusion { index: u64, size: u64, leaf: Hash, root: Hash, path: Vec<Hash>, checkpoint: Option<String> },
    Consistency { old: u64, new: u64, old_root: Hash, new_root: Hash, path: Vec<Hash>, checkpoint: Option<String> },
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

/// A 32-byte hash from hex (surrounding whitespace ignored).
pub fn hash(h: &str) -> Option<Hash> {
    hex::decode(h.trim()).ok()?.try_into().ok()
}
