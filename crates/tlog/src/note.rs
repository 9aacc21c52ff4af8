//! C2SP signed notes carrying `tlog-checkpoint` bodies:
//! `<origin>\n<size>\n<base64 root>\n`, a blank line, then `— <key name> <base64(key id ‖ sig)>\n`.
//! The key id is the first four bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key).
//!
//! Parsing is strict (C2SP signed-note): the note is UTF-8 without control characters other
//! than `\n`, every line (the last included) ends in `\n`, key names follow the key-name rules
//! (`valid_key_name`), and the body is a well-formed `tlog-checkpoint` (decimal size without
//! leading zeros, a 32-byte root in standard padded base64, optional non-empty extension lines).

use crate::Error as AuditError;
use crate::merkle::Hash;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// Most signature lines a note may carry (as in Go's `golang.org/x/mod/sumdb/note`).
const MAX_SIGNATURES: usize = 100;

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

/// C2SP signed-note key names (and so the log origin, which is also the checkpoint key name):
/// non-empty, printable ASCII, no spaces of any kind, no `+`.
pub fn valid_key_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    match name.chars().find(|c| !c.is_ascii_graphic() || *c == '+') {
        None => Ok(()),
        Some('+') => Err("must not contain '+' (C2SP signed-note key names)".into()),
        Some(c) => Err(format!(
            "must be printable ASCII without spaces (C2SP signed-note key names); found {:?} (U+{:04X})",
            c, c as u32
        )),
    }
}

impl Checkpoint {
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    pub fn sign(&self, key_name: &str, key: &SigningKey) -> String {
        sign_note(&self.body(), key_name, key)
    }
}

/// Signs the note text `body` (lines ending in `\n`) with `key` as `key_name`: the body, a blank
/// line and one signature line.
pub fn sign_note(body: &str, key_name: &str, key: &SigningKey) -> String {
    let sig = key.sign(body.as_bytes());
    let mut blob = key_id(key_name, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&sig.to_bytes());
    format!("{body}\n\u{2014} {key_name} {}\n", B64.encode(blob))
}

fn bad(m: &str) -> AuditError {
    AuditError::Checkpoint(m.to_string())
}

/// One signature line: key name, key id, signature bytes (64 for Ed25519; other lengths are
/// kept so that unknown signature types can be skipped).
struct SigLine<'a> {
    name: &'a str,
    blob: Vec<u8>,
}

/// A note split into its body (with its final `\n`) and signature lines, checked for syntax.
struct Note<'a> {
    body: &'a str,
    sigs: Vec<SigLine<'a>>,
}

fn split_note(note: &str) -> Result<Note<'_>, AuditError> {
    if let Some(c) = note.chars().find(|c| (c.is_control() && *c != '\n') || *c == '\u{FFFD}') {
        return Err(bad(&format!("the note contains a control character (U+{:04X})", c as u32)));
    }
    if !note.ends_with('\n') {
        return Err(bad("the note's last line does not end in a newline"));
    }
    let at = note.find("\n\n").ok_or_else(|| bad("no blank line between body and signatures"))?;
    let (body, rest) = (&note[..at + 1], &note[at + 2..]);
    if rest.is_empty() {
        return Err(bad("the note has no signature line"));
    }
    let mut sigs = Vec::new();
    // `rest` ends in '\n' (checked above): every line is terminated.
    for line in rest[..rest.len() - 1].split('\n') {
        let rest =
            line.strip_prefix("\u{2014} ").ok_or_else(|| bad("signature line does not start with an em dash"))?;
        let (name, b64) = rest.split_once(' ').ok_or_else(|| bad("malformed signature line"))?;
        valid_key_name(name).map_err(|e| bad(&format!("signature key name {name:?} {e}")))?;
        let blob = B64.decode(b64).map_err(|_| bad("signature is not base64"))?;
        if blob.len() < 5 {
            return Err(bad("signature is too short to hold a key id"));
        }
        sigs.push(SigLine { name, blob });
        if sigs.len() > MAX_SIGNATURES {
            return Err(bad("too many signature lines"));
        }
    }
    Ok(Note { body, sigs })
}

/// The `tlog-checkpoint` body, without checking any signature.
fn parse_body(body: &str) -> Result<Checkpoint, AuditError> {
    let mut lines = body[..body.len() - 1].split('\n');
    let origin = lines.next().unwrap_or_default();
    valid_key_name(origin).map_err(|e| bad(&format!("origin {origin:?} {e}")))?;
    let size_s = lines.next().ok_or_else(|| bad("no tree size line"))?;
    let canonical_decimal =
        !size_s.is_empty() && size_s.bytes().all(|b| b.is_ascii_digit()) && (size_s == "0" || !size_s.starts_with('0'));
    let size: u64 = size_s.parse().ok().filter(|_| canonical_decimal).ok_or_else(|| bad("bad tree size line"))?;
    let root_s = lines.next().ok_or_else(|| bad("no root hash line"))?;
    let root_b = B64.decode(root_s).map_err(|_| bad("bad root hash line"))?;
    let root: Hash = root_b.try_into().map_err(|_| bad("root hash is not 32 bytes"))?;
    if lines.any(str::is_empty) {
        return Err(bad("empty extension line in the checkpoint body"));
    }
    Ok(Checkpoint { origin: origin.to_string(), size, root })
}

/// Parses a checkpoint strictly, without checking its signatures (for diagnostics and to read
/// a trusted checkpoint before the keys that signed it are known).
pub fn parse_unverified(note: &str) -> Result<Checkpoint, AuditError> {
    parse_body(split_note(note)?.body)
}

/// Parses a signed checkpoint and checks that at least one signature line verifies under one of
/// `keys` (name, key). Unknown signature lines are ignored, as C2SP allows; a line that names a
/// trusted key (name and key id) but does not verify is an error.
pub fn parse_checkpoint(note: &str, keys: &[(String, VerifyingKey)]) -> Result<Checkpoint, AuditError> {
    let n = split_note(note)?;
    let cp = parse_body(n.body)?;
    check_signatures(&n, keys)?;
    Ok(cp)
}

/// Opens a signed note of any text: checks its syntax and that at least one signature line
/// verifies under one of `keys` (as `parse_checkpoint`), and returns its text (the body, with its
/// final newline).
pub fn open_note<'a>(note: &'a str, keys: &[(String, VerifyingKey)]) -> Result<&'a str, AuditError> {
    let n = split_note(note)?;
    check_signatures(&n, keys)?;
    Ok(n.body)
}

fn check_signatures(n: &Note, keys: &[(String, VerifyingKey)]) -> Result<(), AuditError> {
    let mut verified = false;
    for s in &n.sigs {
        for (kname, vk) in keys {
            if kname == s.name && s.blob[..4] == key_id(kname, vk) {
                let sig = Signature::from_slice(&s.blob[4..]).map_err(|_| bad("malformed signature"))?;
                if vk.verify(n.body.as_bytes(), &sig).is_ok() {
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
    Ok(())
}

/// The key names a note is signed with (to pair trusted keys with names).
pub fn signer_names(note: &str) -> Vec<String> {
    note.split_once("\n\n")
        .map(|(_, sigs)| {
            sigs.lines()
                .filter_map(|l| l.strip_prefix("\u{2014} "))
                .filter_map(|r| r.split_once(' ').map(|(n, _)| n.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3u8; 32])
    }

    fn signed() -> String {
        Checkpoint { origin: "example.com/log".into(), size: 12, root: [9u8; 32] }.sign("example.com/log", &key())
    }

    fn keys() -> Vec<(String, VerifyingKey)> {
        vec![("example.com/log".into(), key().verifying_key())]
    }

    #[test]
    fn a_signed_checkpoint_parses() {
        let cp = parse_checkpoint(&signed(), &keys()).unwrap();
        assert_eq!((cp.origin.as_str(), cp.size, cp.root), ("example.com/log", 12, [9u8; 32]));
    }

    #[test]
    fn every_line_must_end_in_a_newline() {
        let note = signed();
        let cut = note.strip_suffix('\n').unwrap();
        let e = parse_checkpoint(cut, &keys()).unwrap_err().to_string();
        assert!(e.contains("does not end in a newline"), "{e}");
        assert!(parse_unverified(cut).is_err());
    }

    #[test]
    fn malformed_bodies_and_signature_lines_are_refused() {
        let note = signed();
        let root = B64.encode([9u8; 32]);
        for (what, bad_note) in [
            ("leading zero size", note.replacen("\n12\n", "\n012\n", 1)),
            ("plus size", note.replacen("\n12\n", "\n+12\n", 1)),
            ("no signatures", note.split_once("\n\n").unwrap().0.to_string() + "\n\n"),
            ("CR", note.replacen("example.com/log\n", "example.com/log\r\n", 1)),
            ("origin with a space", note.replacen("example.com/log\n12", "example.com log\n12", 1)),
            ("origin with a plus", note.replacen("example.com/log\n12", "example.com+log\n12", 1)),
            ("short root", note.replacen(&root, &B64.encode([9u8; 31]), 1)),
            ("double blank", note.replacen("\n\n", "\n\n\n", 1)),
            ("text", "garbage".to_string()),
        ] {
            assert!(parse_checkpoint(&bad_note, &keys()).is_err(), "{what} was accepted: {bad_note:?}");
        }
    }

    #[test]
    fn a_signature_by_another_key_does_not_verify() {
        let other = SigningKey::from_bytes(&[4u8; 32]);
        let forged =
            Checkpoint { origin: "example.com/log".into(), size: 12, root: [9u8; 32] }.sign("example.com/log", &other);
        let e = parse_checkpoint(&forged, &keys()).unwrap_err().to_string();
        assert!(e.contains("no signature by a trusted key"), "{e}");
        // The right key id with a wrong signature is an error, not an unknown line.
        let good = signed();
        let (head, sigline) = good.split_once("\u{2014} ").unwrap();
        let (name, b64) = sigline.trim_end().split_once(' ').unwrap();
        let mut blob = B64.decode(b64).unwrap();
        blob[10] ^= 1;
        let tampered = format!("{head}\u{2014} {name} {}\n", B64.encode(blob));
        assert!(parse_checkpoint(&tampered, &keys()).unwrap_err().to_string().contains("does not verify"));
    }

    /// The published example of Go's `golang.org/x/mod/sumdb/note` (note_test.go, `TestSign` and
    /// `TestOpen`): key `PeterNeumann+c74f20a3+ARpc…`, its private key, and the note it signs.
    #[test]
    fn go_sumdb_note_known_answer() {
        const VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        const SKEY: &str = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        const TEXT: &str =
            "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
        const SIGNED: &str = "If you think cryptography is the answer to your problem,\n\
            then you don't know what your problem is.\n\
            \n\
            \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
        const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

        // Verifier key: <name>+<hex key id>+base64(0x01 (Ed25519) ‖ public key).
        let parts: Vec<&str> = VKEY.splitn(3, '+').collect();
        let (name, id_hex) = (parts[0], parts[1]);
        let raw = B64.decode(parts[2]).unwrap();
        assert_eq!(raw[0], 0x01, "Ed25519");
        let vk = VerifyingKey::from_bytes(&raw[1..].try_into().unwrap()).unwrap();
        assert_eq!(hex::encode(key_id(name, &vk)), id_hex);

        // The note verifies, with and without an unknown second signature, and yields its text.
        let keys = vec![(name.to_string(), vk)];
        assert_eq!(open_note(SIGNED, &keys).unwrap(), TEXT);
        assert_eq!(open_note(&format!("{SIGNED}{ENOCH_SIG}"), &keys).unwrap(), TEXT);
        assert_eq!(signer_names(SIGNED), vec![name.to_string()]);
        // Not a checkpoint body, so not a checkpoint.
        assert!(parse_checkpoint(SIGNED, &keys).is_err());
        // A changed text or a changed signature does not verify; another key is not trusted.
        let changed = SIGNED.replacen("problem,", "problem;", 1);
        assert!(open_note(&changed, &keys).unwrap_err().to_string().contains("does not verify"));
        let at = SIGNED.find("x08go").unwrap() + 20;
        let mut forged = SIGNED.to_string();
        forged.replace_range(at..at + 1, if &SIGNED[at..at + 1] == "A" { "B" } else { "A" });
        assert!(open_note(&forged, &keys).is_err());
        let other = vec![(name.to_string(), key().verifying_key())];
        assert!(open_note(SIGNED, &other).unwrap_err().to_string().contains("no signature by a trusted key"));

        // Signing the text with the private key (Ed25519 is deterministic) gives the same note.
        let parts: Vec<&str> = SKEY.splitn(5, '+').collect();
        assert_eq!((parts[2], parts[3]), (name, id_hex));
        let raw = B64.decode(parts[4]).unwrap();
        assert_eq!(raw[0], 0x01, "Ed25519");
        let sk = SigningKey::from_bytes(&raw[1..].try_into().unwrap());
        assert_eq!(sk.verifying_key(), vk);
        assert_eq!(sign_note(TEXT, name, &sk), SIGNED);
    }

    #[test]
    fn key_names_follow_the_c2sp_rules() {
        for ok in ["example.com/log", "a", "uapk-gateway/host-1", "x~!@#$%^&*()_=[]{}|;:'\",.<>?/"] {
            assert!(valid_key_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a+b", "a\tb", "a\u{a0}b", "a\u{2003}b", "é", "a\nb", "a\u{7f}"] {
            assert!(valid_key_name(bad).is_err(), "{bad:?}");
        }
    }
}
