//! Verification. It trusts nothing stored except the entry bytes: every leaf, chain link and root
//! is recomputed, streaming, in bounded memory. One walk (`walk`) checks a log from any
//! `EntrySource`: a database file (the gateway's redb adapter), an exported bundle (`verify_bundle`)
//! or a log served by a running gateway (`verify_served`).

use crate::GENESIS_PREV;
use crate::merkle::{Frontier, Hash, leaf_hash};
use crate::note::{Checkpoint, parse_checkpoint, parse_unverified, signer_names};
use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::Path;

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries: u64,
    pub checkpoints: u64,
    pub size: u64,
    pub root_hex: String,
    /// The first index checked (0 for a whole log; a bundle's `from`).
    pub from: u64,
    /// The size of the trusted checkpoint the log was checked to extend, when one was given.
    pub trusted_size: Option<u64>,
    /// Key rotations followed.
    pub rotations: u64,
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    pub index: Option<u64>,
    pub reason: String,
    /// The evidence could not be read (a missing or locked file): nothing was found wrong with
    /// it, but nothing was verified either (exit 2, not 1).
    pub io: bool,
}

impl VerifyFailure {
    /// Something wrong with the evidence (exit 1).
    pub fn new(index: Option<u64>, reason: impl Into<String>) -> VerifyFailure {
        VerifyFailure { index, reason: reason.into(), io: false }
    }

    /// Evidence that could not be read (exit 2).
    pub fn io(reason: impl Into<String>) -> VerifyFailure {
        VerifyFailure { index: None, reason: reason.into(), io: true }
    }
}

/// The domain-separation prefix of the export manifest's signature: the manifest's Ed25519
/// signature is over `MANIFEST_CONTEXT ‖ manifest.json`. Its first line has spaces, so it can
/// never be a checkpoint body (whose first line is the origin, a key name without spaces), and
/// it differs from the first line of a key rotation message.
pub const MANIFEST_CONTEXT: &[u8] = b"uapk-gateway export manifest v2\n";
/// The bundle format written by the gateway's export.
pub const BUNDLE_FORMAT: &str = "uapk-audit-bundle/2";
/// The files of a bundle, in the order the manifest lists them.
pub const BUNDLE_FILES: [&str; 4] = ["checkpoint", "entries.jsonl", "prefix.json", "gateway.pub.pem"];

fn fail(index: Option<u64>, reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure::new(index, reason)
}

fn io_fail(reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure::io(reason)
}

/// A failure to fetch evidence (exit 2).
pub fn fetch_failure(reason: impl Into<String>) -> VerifyFailure {
    io_fail(reason)
}

/// What the manifest's signature covers.
pub fn manifest_message(manifest: &[u8]) -> Vec<u8> {
    [MANIFEST_CONTEXT, manifest].concat()
}

/// What else verification checks and reports.
#[derive(Default)]
pub struct VerifyOptions<'a> {
    /// A checkpoint the auditor kept: the log must extend it (catches truncation, rollback and
    /// a swapped database file).
    pub trusted_checkpoint: Option<&'a str>,
    /// Called with the number of entries checked so far, every 100,000 entries.
    pub progress: Option<&'a dyn Fn(u64)>,
}

/// A log as verification reads it: its entries in index order, the checkpoints stored with them,
/// and the signatures stored with single entries. Only `next_entry` is required; a source
/// without stored checkpoints is checked against one final checkpoint (see `verify_served`).
pub trait EntrySource {
    /// Fills `buf` (empty) with the bytes of entry `idx`, the next one in index order; false
    /// after the last entry.
    fn next_entry(&mut self, idx: u64, buf: &mut Vec<u8>) -> Result<bool, VerifyFailure>;

    /// The size of the next stored checkpoint not yet taken.
    fn peek_checkpoint(&mut self) -> Option<u64> {
        None
    }

    /// Takes the stored checkpoint `peek_checkpoint` sized: its signed note.
    fn take_checkpoint(&mut self) -> Result<String, VerifyFailure> {
        Err(fail(None, "no stored checkpoint"))
    }

    /// The signature stored with entry `idx`, if any.
    fn entry_signature(&mut self, _idx: u64) -> Option<Vec<u8>> {
        None
    }

    /// Diagnosis only (cold path): the first stored checkpoint of size at least `size`.
    fn checkpoint_at_or_after(&self, _size: u64) -> Option<(u64, String)> {
        None
    }

    /// Diagnosis only (cold path): calls `visit(index, bytes)` for the stored entries below `size`,
    /// in order; false when they cannot be read again.
    fn reread(&self, _size: u64, _visit: &mut dyn FnMut(u64, &[u8])) -> bool {
        false
    }
}

/// An `EntrySource` from a function yielding the entries in order (`next(index, buffer)`, false
/// at the end), without stored checkpoints.
pub struct Entries<F>(pub F);

impl<F: FnMut(u64, &mut Vec<u8>) -> Result<bool, VerifyFailure>> EntrySource for Entries<F> {
    fn next_entry(&mut self, idx: u64, buf: &mut Vec<u8>) -> Result<bool, VerifyFailure> {
        (self.0)(idx, buf)
    }
}

type Rotation = Result<(VerifyingKey, String, Signature), String>;

/// A `key` entry at `idx` that announces a rotation, signed by a key active before it, makes
/// its new key the only active one (and a known one); returns how many rotations it made (0 or 1).
fn follow_rotation(
    idx: u64,
    bytes: &[u8],
    active: &mut Vec<VerifyingKey>,
    known: &mut Vec<VerifyingKey>,
) -> Result<u64, VerifyFailure> {
    let Some(new) = rotation(bytes) else { return Ok(0) };
    let (new_key, message, sig) = new.map_err(|why| fail(Some(idx), why))?;
    if !active.iter().any(|k| k.verify(message.as_bytes(), &sig).is_ok()) {
        return Err(fail(Some(idx), "a key rotation not signed by the key active before it"));
    }
    *active = vec![new_key];
    known.push(new_key);
    Ok(1)
}

/// For a `key` rotation entry: the announced key, the signed message and its signature.
fn rotation(entry: &[u8]) -> Option<Rotation> {
    let v: Value = serde_json::from_slice(entry).ok()?;
    if v["kind"] != "key" {
        return None;
    }
    Some(
        (|| {
            let new_hex = v["new_key"].as_str().ok_or("a key entry without new_key")?;
            let bytes: [u8; 32] =
                hex::decode(new_hex).ok().and_then(|b| b.try_into().ok()).ok_or("new_key is not 32 bytes")?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|_| "new_key is not an Ed25519 key")?;
            let sig = v["announcement_sig"]
                .as_str()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| Signature::from_slice(&b).ok())
                .ok_or("announcement_sig is not a signature")?;
            let origin = v["log"].as_str().unwrap_or_default();
            Ok((key, crate::rotation_message(origin, new_hex), sig))
        })()
        .map_err(|e: &str| e.to_string()),
    )
}

fn origin_of(entry: &[u8]) -> String {
    serde_json::from_slice::<Value>(entry).ok().and_then(|v| v["log"].as_str().map(str::to_string)).unwrap_or_default()
}

/// Pairs trusted keys with the key names a note is signed with.
fn named_keys(note: &str, keys: &[VerifyingKey]) -> Vec<(String, VerifyingKey)> {
    signer_names(note).into_iter().flat_map(|n| keys.iter().map(move |k| (n.clone(), *k))).collect()
}

/// The fields verification reads from every entry; the rest is skipped without building it.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    idx: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    log: Option<std::borrow::Cow<'a, str>>,
}

/// Checks one entry's index and chain link (its bytes are covered by the leaf hash, so any
/// change to them shows in the chain or the signed roots). Returns its leaf hash and whether it
/// is a key rotation.
fn check_entry(expected: u64, bytes: &[u8], prev: &Hash, origin: Option<&str>) -> Result<(Hash, bool), VerifyFailure> {
    let head: Head = serde_json::from_slice(bytes).map_err(|_| fail(Some(expected), "the entry is not valid JSON"))?;
    if let Some(o) = origin
        && head.log.as_deref() != Some(o)
    {
        return Err(fail(Some(expected), format!("the entry is not of log {o:?}")));
    }
    if head.idx.parse::<u64>().ok() != Some(expected) {
        return Err(fail(Some(expected), format!("the entry says idx {:?} (reordered or replaced)", head.idx)));
    }
    let mut want = [0u8; 64];
    let want_prev: &[u8] = if expected == 0 {
        GENESIS_PREV.as_bytes()
    } else {
        hex::encode_to_slice(prev, &mut want).map_err(|_| fail(Some(expected), "hex"))?;
        &want
    };
    if head.prev.as_bytes() != want_prev {
        return Err(fail(Some(expected), "the entry's prev does not match the previous entry's leaf hash"));
    }
    Ok((leaf_hash(bytes), head.kind.as_deref() == Some("key")))
}

/// Diagnosis only (cold path), for a broken link at `at`: was entry `at - 1` changed, rather
/// than the link? Entry `at`'s prev claims the hash entry `at - 1` had. If the tree with that
/// hash in its place matches the next signed checkpoint, the claim is what was signed: the
/// entry changed. Only a signed root is trusted here.
fn changed_before(source: &dyn EntrySource, at: u64, bytes: &[u8], active: &[VerifyingKey]) -> bool {
    let Some(claimed) = serde_json::from_slice::<Head>(bytes).ok().and_then(|h| crate::proof::hash(&h.prev)) else {
        return false;
    };
    let Some((size, note)) = source.checkpoint_at_or_after(at) else { return false };
    let Ok(cp) = parse_checkpoint(&note, &named_keys(&note, active)) else { return false };
    let mut tree = Frontier::new();
    if !source.reread(size, &mut |k, v| tree.push(if k == at - 1 { claimed } else { leaf_hash(v) })) {
        return false;
    }
    tree.size() == size && tree.root() == cp.root
}

/// A checkpoint the auditor kept. It is parsed strictly before anything else; its signature is
/// checked when the log reaches its size (by then every key rotation before it has been
/// followed), or at the end when the log is shorter.
pub struct Trusted<'a> {
    note: &'a str,
    cp: Checkpoint,
    signed: bool,
}

impl<'a> Trusted<'a> {
    /// The trusted checkpoint of `opts`, parsed (not yet its signature).
    pub fn parse(note: Option<&'a str>) -> Result<Option<Trusted<'a>>, VerifyFailure> {
        let Some(note) = note else { return Ok(None) };
        let cp = parse_unverified(note).map_err(|e| fail(None, format!("trusted {e}")))?;
        Ok(Some(Trusted { note, cp, signed: false }))
    }

    fn check_signature(&mut self, known: &[VerifyingKey]) -> Result<(), VerifyFailure> {
        if !self.signed {
            parse_checkpoint(self.note, &named_keys(self.note, known))
                .map_err(|e| fail(None, format!("trusted {e}")))?;
            self.signed = true;
        }
        Ok(())
    }

    /// At tree size `size` (`tree` the tree of that size): the log must hold the trusted tree.
    fn check_at(
        &mut self,
        size: u64,
        tree: &Frontier,
        origin: Option<&str>,
        known: &[VerifyingKey],
    ) -> Result<(), VerifyFailure> {
        if size != self.cp.size {
            return Ok(());
        }
        self.check_signature(known)?;
        if origin.is_some_and(|o| o != self.cp.origin) {
            return Err(fail(
                size.checked_sub(1),
                format!(
                    "the trusted checkpoint is of log {:?}, not of log {:?}",
                    self.cp.origin,
                    origin.unwrap_or_default()
                ),
            ));
        }
        if tree.root() != self.cp.root {
            return Err(fail(
                size.checked_sub(1),
                format!(
                    "the log is not an extension of the trusted checkpoint of size {}: its tree of that size has \
                     another root (rolled back, forked or replaced)",
                    self.cp.size
                ),
            ));
        }
        Ok(())
    }

    /// After the last entry (`size` entries): a log shorter than the trusted tree was rolled back.
    fn finish(&self, size: u64, known: &[VerifyingKey]) -> Result<(), VerifyFailure> {
        if size < self.cp.size {
            // A forged "newer" checkpoint is named as such, not as a rollback.
            parse_checkpoint(self.note, &named_keys(self.note, known))
                .map_err(|e| fail(None, format!("trusted {e}")))?;
            return Err(fail(
                Some(size),
                format!(
                    "the log holds {size} entries but the trusted checkpoint covers {}: it was truncated, rolled \
                     back or replaced by an older copy",
                    self.cp.size
                ),
            ));
        }
        Ok(())
    }

    fn starts_before(&self, from: u64) -> Result<(), VerifyFailure> {
        if self.cp.size < from {
            return Err(fail(
                None,
                format!(
                    "the bundle starts at entry {from}, after the trusted checkpoint's size {}: its consistency with \
                     that checkpoint cannot be checked (export from {} or earlier)",
                    self.cp.size, self.cp.size
                ),
            ));
        }
        Ok(())
    }
}

/// The signed checkpoints a walk checks the entries against.
enum Signed<'a> {
    /// The source's stored checkpoints, each checked when the tree reaches its size; every entry
    /// must be covered by one (a database file).
    Stored,
    /// One checkpoint the entries end at (a bundle's, a served log's); every entry must be of its
    /// log.
    Final { note: &'a str, cp: &'a Checkpoint },
}

/// What `walk` verified.
/// The report of a walk that ended on one final checkpoint `cp` (a bundle, a served log), after
/// the trusted checkpoint, if any, is checked against it.
fn finish(w: Walked, cp: &Checkpoint, from: u64, trusted: Option<Trusted<'_>>) -> Result<VerifyReport, VerifyFailure> {
    if let Some(t) = &trusted {
        t.finish(cp.size, &w.known)?;
    }
    Ok(VerifyReport {
        entries: w.entries,
        checkpoints: w.checkpoints,
        size: cp.size,
        root_hex: hex::encode(cp.root),
        from,
        trusted_size: trusted.map(|t| t.cp.size),
        rotations: w.rotations,
    })
}

struct Walked {
    entries: u64,
    checkpoints: u64,
    rotations: u64,
    tree: Frontier,
    /// The keys active after the last entry.
    active: Vec<VerifyingKey>,
    /// Every key active at some point.
    known: Vec<VerifyingKey>,
}

/// The one verification walk. From the tree `frontier` (whose last leaf is `prev`), checks the
/// source's entries in order: each entry's index, chain link (and log, against a final
/// checkpoint), its stored signature, key rotations, the trusted checkpoint when the tree passes
/// its size, and the signed checkpoints (`signed`) with their roots.
fn walk(
    source: &mut dyn EntrySource,
    mut frontier: Frontier,
    mut prev: Hash,
    signed: Signed,
    keys: &[VerifyingKey],
    trusted: &mut Option<Trusted>,
    progress: Option<&dyn Fn(u64)>,
) -> Result<Walked, VerifyFailure> {
    let from = frontier.size();
    let origin = match &signed {
        Signed::Stored => None,
        Signed::Final { cp, .. } => Some(cp.origin.as_str()),
    };
    if let Some(t) = &*trusted {
        t.starts_before(from)?;
    }
    // The keys that may sign at this point of the log: the trusted keys, then whatever key a
    // rotation entry (signed by the key active before it) announces.
    let mut active: Vec<VerifyingKey> = keys.to_vec();
    // Every key trusted at some point of the log (a trusted checkpoint may be from any of them).
    let mut known: Vec<VerifyingKey> = keys.to_vec();
    let mut rotations = 0u64;
    let mut checkpoints = 0u64;
    let mut last_cp_size = 0u64;
    if let Some(t) = trusted.as_mut() {
        t.check_at(from, &frontier, origin, &known)?;
    }
    let check_cp = |size: u64, note: &str, frontier: &Frontier, active: &[VerifyingKey]| -> Result<(), VerifyFailure> {
        let cp = parse_checkpoint(note, &named_keys(note, active))
            .map_err(|e| fail(None, format!("checkpoint at size {size}: {e}")))?;
        if cp.size != size {
            return Err(fail(None, format!("checkpoint stored at size {size} claims size {}", cp.size)));
        }
        if cp.root != frontier.root() {
            // The chain holds up to here, so the last entry changed, or the entries after the
            // last checkpoint that matched were all rewritten and re-linked.
            let at = size.saturating_sub(1);
            return Err(fail(
                Some(at),
                format!("the entries do not hash to the signed root of the checkpoint at size {size}"),
            ));
        }
        Ok(())
    };
    let mut buf = Vec::with_capacity(4096);
    loop {
        buf.clear();
        let idx = frontier.size();
        if !source.next_entry(idx, &mut buf)? {
            break;
        }
        let bytes = buf.as_slice();
        let (leaf, is_key) = match check_entry(idx, bytes, &prev, origin) {
            Ok(l) => l,
            Err(f) => {
                // A broken link at `idx`: if the signed root confirms the hash this link claims
                // for the previous entry, the change is in that entry, not in the link.
                if idx > 0 && f.reason.contains("prev") && changed_before(&*source, idx, bytes, &active) {
                    return Err(fail(Some(idx - 1), "the entry was changed (its hash no longer matches the chain)"));
                }
                return Err(f);
            }
        };
        if let Some(sig) = source.entry_signature(idx) {
            let ok = Signature::from_slice(&sig).is_ok_and(|s| active.iter().any(|k| k.verify(bytes, &s).is_ok()));
            if !ok {
                return Err(fail(Some(idx), "the entry's own signature is not by the key active at this index"));
            }
        }
        if is_key {
            rotations += follow_rotation(idx, bytes, &mut active, &mut known)?;
        }
        frontier.push(leaf);
        prev = leaf;
        if let Some(t) = trusted.as_mut() {
            let of_entry;
            let o = match origin {
                Some(o) => o,
                None => {
                    of_entry = origin_of(bytes);
                    &of_entry
                }
            };
            t.check_at(frontier.size(), &frontier, Some(o), &known)?;
        }
        if let Some(p) = progress
            && frontier.size().is_multiple_of(100_000)
        {
            p(frontier.size());
        }
        while let Some(size) = source.peek_checkpoint() {
            if size > frontier.size() {
                break;
            }
            let note = source.take_checkpoint()?;
            if size < frontier.size() {
                return Err(fail(None, format!("checkpoint at size {size} was skipped")));
            }
            check_cp(size, &note, &frontier, &active)?;
            checkpoints += 1;
            last_cp_size = size;
        }
    }
    match signed {
        Signed::Stored => {
            if let Some(size) = source.peek_checkpoint() {
                return Err(fail(
                    Some(frontier.size()),
                    format!(
                        "the log holds {} entries but a checkpoint covers {size}: entries were removed (truncated)",
                        frontier.size()
                    ),
                ));
            }
            if frontier.size() > last_cp_size {
                return Err(fail(Some(last_cp_size), "entries after the last checkpoint are covered by no signature"));
            }
        }
        Signed::Final { note, cp } => {
            if frontier.size() != cp.size {
                return Err(fail(
                    Some(frontier.size().min(cp.size)),
                    format!("the entries end at {} but the checkpoint covers {}", frontier.size(), cp.size),
                ));
            }
            parse_checkpoint(note, &named_keys(note, &active)).map_err(|e| fail(None, e.to_string()))?;
            if frontier.root() != cp.root {
                return Err(fail(
                    Some(cp.size.saturating_sub(1)),
                    "the entries do not hash to the signed checkpoint (an entry was changed, dropped, added or moved)",
                ));
            }
            checkpoints = 1;
        }
    }
    Ok(Walked { entries: frontier.size() - from, checkpoints, rotations, tree: frontier, active, known })
}

/// Verifies a whole stored log (a database file): every entry, chain link, stored checkpoint root
/// and signature, every stored entry signature, and (given one) that it extends the trusted
/// checkpoint. `trusted` is `Trusted::parse(opts.trusted_checkpoint)`, parsed before the source
/// is opened.
pub fn verify_log(
    source: &mut dyn EntrySource,
    keys: &[VerifyingKey],
    mut trusted: Option<Trusted>,
    progress: Option<&dyn Fn(u64)>,
) -> Result<VerifyReport, VerifyFailure> {
    let w = walk(source, Frontier::new(), [0u8; 32], Signed::Stored, keys, &mut trusted, progress)?;
    if let Some(t) = &trusted {
        t.finish(w.tree.size(), &w.known)?;
    }
    if w.checkpoints == 0 && w.tree.size() == 0 {
        return Err(fail(None, "the log is empty"));
    }
    Ok(VerifyReport {
        entries: w.tree.size(),
        checkpoints: w.checkpoints,
        size: w.tree.size(),
        root_hex: hex::encode(w.tree.root()),
        from: 0,
        trusted_size: trusted.map(|t| t.cp.size),
        rotations: w.rotations,
    })
}

/// Verifies a log served by a running gateway: its latest signed checkpoint `note` and the
/// entries `0..size` of that checkpoint, as `next(index, buffer)` yields them (the checkpoint pins
/// a consistent snapshot whatever the writer appends meanwhile).
pub fn verify_served(
    note: &str,
    keys: &[VerifyingKey],
    opts: &VerifyOptions,
    next: impl FnMut(u64, &mut Vec<u8>) -> Result<bool, VerifyFailure>,
) -> Result<VerifyReport, VerifyFailure> {
    let mut trusted = Trusted::parse(opts.trusted_checkpoint)?;
    let cp = parse_unverified(note).map_err(|e| fail(None, format!("the served {e}")))?;
    let signed = Signed::Final { note, cp: &cp };
    let w = walk(&mut Entries(next), Frontier::new(), [0u8; 32], signed, keys, &mut trusted, None)?;
    finish(w, &cp, 0, trusted)
}

/// SHA-256 of a file, streamed.
fn sha_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Verifies a bundle with nothing but its files and the trusted key(s).
pub fn verify_bundle(dir: &Path, keys: &[VerifyingKey]) -> Result<VerifyReport, VerifyFailure> {
    verify_bundle_with(dir, keys, &VerifyOptions::default())
}

/// `verify_bundle`, and (given a trusted checkpoint) that the bundle's tree extends it.
///
/// `keys` are the keys trusted at the bundle's first entry; key rotations inside the bundle are
/// followed as in a log file. The bundle's checkpoint must be signed by the key active at its
/// end, and the manifest by a trusted key (one of `keys`, or the key active at the end).
pub fn verify_bundle_with(
    dir: &Path,
    keys: &[VerifyingKey],
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyFailure> {
    let mut trusted = Trusted::parse(opts.trusted_checkpoint)?;
    if !dir.is_dir() {
        return Err(io_fail(format!("{}: not a bundle directory", dir.display())));
    }
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => fail(None, format!("the bundle has no {name} (incomplete or altered)")),
            _ => io_fail(format!("{name}: {e}")),
        })
    };
    let manifest = read("manifest.json")?;
    let sig_text = read("manifest.json.sig")?;
    let sig = std::str::from_utf8(&sig_text)
        .ok()
        .and_then(|t| t.strip_suffix('\n'))
        .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or_else(|| fail(None, "manifest.json.sig is not a base64 Ed25519 signature line"))?;
    let signed_manifest = manifest_message(&manifest);
    let manifest_by = |ks: &[VerifyingKey]| ks.iter().any(|k| k.verify(&signed_manifest, &sig).is_ok());
    let manifest_signed_early = manifest_by(keys);
    let m: Value = serde_json::from_slice(&manifest).map_err(|_| fail(None, "manifest.json is not JSON"))?;
    if m["format"] != BUNDLE_FORMAT {
        return Err(fail(None, format!("manifest.json: format is not {BUNDLE_FORMAT:?}")));
    }
    let num = |v: &Value, what: &str| {
        v.as_str()
            .filter(|s| s == &"0" || (!s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit())))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| fail(None, format!("{what} is not a decimal string")))
    };
    let (from, to) = (num(&m["from"], "manifest.json from")?, num(&m["to"], "manifest.json to")?);
    for name in BUNDLE_FILES {
        let want =
            m["files"][name].as_str().ok_or_else(|| fail(None, format!("manifest.json does not list {name}")))?;
        let got = sha_file(&dir.join(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => fail(None, format!("the bundle has no {name} (incomplete or altered)")),
            _ => io_fail(format!("{name}: {e}")),
        })?;
        if got != want {
            return Err(fail(None, format!("{name} does not match its SHA-256 in manifest.json")));
        }
    }
    let note = String::from_utf8(read("checkpoint")?).map_err(|_| fail(None, "checkpoint is not UTF-8 text"))?;
    let cp = parse_unverified(&note).map_err(|e| fail(None, e.to_string()))?;
    if m["origin"].as_str() != Some(cp.origin.as_str()) {
        return Err(fail(None, "manifest.json names another origin than the checkpoint"));
    }
    if cp.size != to {
        return Err(fail(
            None,
            format!("manifest.json says the bundle ends at {to}, its checkpoint covers {}", cp.size),
        ));
    }
    let prefix: Value =
        serde_json::from_slice(&read("prefix.json")?).map_err(|_| fail(None, "prefix.json is not JSON"))?;
    let frontier = prefix["frontier"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| Frontier::from_bytes(&b))
        .ok_or_else(|| fail(None, "prefix.json has no valid frontier"))?;
    if num(&prefix["size"], "prefix.json size")? != from || frontier.size() != from {
        return Err(fail(None, format!("prefix.json is not the tree of the {from} entries before the bundle")));
    }
    let prev: Hash = prefix["last_leaf"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| fail(None, "prefix.json has no valid last_leaf"))?;
    if from == 0 && prev != [0u8; 32] {
        return Err(fail(None, "prefix.json: last_leaf of an empty prefix must be the genesis value (64 zeros)"));
    }
    if let Some(t) = &trusted {
        t.starts_before(from)?;
    }
    let file = std::fs::File::open(dir.join("entries.jsonl")).map_err(|e| io_fail(format!("entries.jsonl: {e}")))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut lines = Entries(|idx: u64, line: &mut Vec<u8>| -> Result<bool, VerifyFailure> {
        let got = reader.read_until(b'\n', line).map_err(|e| io_fail(format!("entries.jsonl: {e}")))?;
        if got == 0 {
            return Ok(false);
        }
        if line.pop() != Some(b'\n') {
            return Err(fail(Some(idx), "entries.jsonl: the last line does not end in a newline"));
        }
        Ok(true)
    });
    let signed = Signed::Final { note: &note, cp: &cp };
    let w = walk(&mut lines, frontier, prev, signed, keys, &mut trusted, None)?;
    if !manifest_signed_early && !manifest_by(&w.active) {
        return Err(fail(None, "manifest.json is not signed by a trusted key"));
    }
    finish(w, &cp, from, trusted)
}
