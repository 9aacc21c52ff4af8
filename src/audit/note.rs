//! C2SP signed notes carrying `tlog-checkpoint` bodies:
//! `<origin>\n<size>\n<base64 root>\n`, a blank line, then `— <key name> <base64(key id ‖ sig)>`.
//! The key id is the first four bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key).

use super::AuditError;
use super::merkle::Hash;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

pub fn key_id(key_name: &str, vk: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(key_name.as_bytes());
    h.update([0x0A, 0x01]);
    h.update(vk.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

impl Checkpoint {
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    pub fn sign(&self, key_name: &str, key: &SigningKey) -> String {
        let body = self.body();
        let sig = key.sign(body.as_bytes());
        let mut blob = key_id(key_name, &key.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n\u{2014} {key_name} {}\n", B64.encode(blob))
    }
}

fn bad(m: &str) -> AuditError {
    AuditError::Checkpoint(m.to_string())
}

/// Parses a signed checkpoint and checks that at least one signature line verifies under one of
/// `keys` (name, key). Unknown signature lines are ignored, as C2SP allows.
pub fn parse_checkpoint(note: &str, keys: &[(String, VerifyingKey)]) -> Result<Checkpoint, AuditError> {
    let (body, sigs) = note.split_once("\n\n").ok_or_else(|| bad("no blank line between body and signatures"))?;
    let body = format!("{body}\n");
    let mut lines = body.lines();
    let origin = lines.next().filter(|l| !l.is_empty()).ok_or_else(|| bad("no origin line"))?.to_string();
    let size: u64 = lines.next().and_then(|l| l.parse().ok()).ok_or_else(|| bad("bad tree size line"))?;
    let root_b = lines.next().and_then(|l| B64.decode(l).ok()).ok_or_else(|| bad("bad root hash line"))?;
    let root: Hash = root_b.try_into().map_err(|_| bad("root hash is not 32 bytes"))?;
    let mut verified = false;
    for line in sigs.lines().filter(|l| !l.is_empty()) {
        let rest =
            line.strip_prefix("\u{2014} ").ok_or_else(|| bad("signature line does not start with an em dash"))?;
        let (name, blob) = rest.rsplit_once(' ').ok_or_else(|| bad("malformed signature line"))?;
        let blob = B64.decode(blob).map_err(|_| bad("signature is not base64"))?;
        if blob.len() != 68 {
            continue;
        }
        for (kname, vk) in keys {
            if kname == name && blob[..4] == key_id(kname, vk) {
                let sig = Signature::from_slice(&blob[4..]).map_err(|_| bad("malformed signature"))?;
                if vk.verify(body.as_bytes(), &sig).is_ok() {
                    verified = true;
                } else {
                    return Err(bad("signature does not verify"));
                }
            }
        }
    }
    if !verified {
        return Err(bad("no signature by a trusted key"));
    }
    Ok(Checkpoint { origin, size, root })
}

/// The key names a note is signed with (to pair trusted keys with names).
pub fn signer_names(note: &str) -> Vec<String> {
    note.split_once("\n\n")
        .map(|(_, sigs)| {
            sigs.lines()
                .filter_map(|l| l.strip_prefix("\u{2014} "))
                .filter_map(|r| r.rsplit_once(' ').map(|(n, _)| n.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Adds a signature line by `key` to a signed note.
pub fn cosign(note: &str, key_name: &str, key: &SigningKey) -> String {
    let body = note.split_once("\n\n").map_or(note, |(b, _)| b).to_string() + "\n";
    let sig = key.sign(body.as_bytes());
    let mut blob = key_id(key_name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&sig.to_bytes());
    format!("{note}\u{2014} {key_name} {}\n", B64.encode(blob))
}
