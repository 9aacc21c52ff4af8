//! Offline verification, reading and export. Verification trusts nothing stored except the
//! entry bytes: every leaf, chain link and root is recomputed, streaming, in bounded memory.

use super::merkle::{Frontier, Hash, leaf_hash};
use super::note::{Checkpoint, parse_checkpoint, parse_unverified, signer_names};
use super::store::{CHECKPOINTS, ENTRIES, GENESIS_PREV, SIGS};
use super::{AuditError, storage};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Write};
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

/// The domain-separation prefix of the export manifest's signature: the manifest's Ed25519
/// signature is over `MANIFEST_CONTEXT ‖ manifest.json`. Its first line has spaces, so it can
/// never be a checkpoint body (whose first line is the origin, a key name without spaces), and
/// it differs from the first line of a key rotation message.
pub const MANIFEST_CONTEXT: &[u8] = b"uapk-gateway export manifest v2\n";
/// The bundle format written by `export_bundle`.
pub const BUNDLE_FORMAT: &str = "uapk-audit-bundle/2";

const READ_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A log file opened for reading without changing it. A file left by a crash needs redb's
/// repair before it can be read; the repair then runs on a temporary copy, so the evidence
/// itself is never written.
pub struct Snapshot {
    db: SnapshotDb,
    temp: Option<std::path::PathBuf>,
}

enum SnapshotDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(redb::Database),
}

impl Snapshot {
    pub fn open(path: &Path) -> Result<Snapshot, AuditError> {
        let io = |e: &dyn std::fmt::Display| AuditError::Io(format!("cannot open {}: {e}", path.display()));
        // A small page cache: verification streams once through the file, so memory stays
        // bounded whatever the log's size.
        let mut builder = redb::Builder::new();
        builder.set_cache_size(READ_CACHE_BYTES);
        match builder.open_read_only(path) {
            Ok(db) => Ok(Snapshot { db: SnapshotDb::ReadOnly(db), temp: None }),
            Err(redb::DatabaseError::RepairAborted) => {
                let temp =
                    std::env::temp_dir().join(format!("uapk-verify-{}-{}.redb", std::process::id(), rand_suffix()));
                std::fs::copy(path, &temp).map_err(|e| io(&e))?;
                let snap =
                    Snapshot { db: SnapshotDb::Repaired(builder.create(&temp).map_err(|e| io(&e))?), temp: Some(temp) };
                Ok(snap)
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(AuditError::Locked(format!(
                "cannot open {}: the database is open in a running gateway (it holds the file's lock); read \
                 the live log through the gateway's admin API with --admin URL, or stop the gateway",
                path.display()
            ))),
            Err(e) => Err(io(&e)),
        }
    }

    /// Entries `[from, from + limit)`, as stored.
    pub fn read_entries(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        match &self.db {
            SnapshotDb::ReadOnly(d) => read_in(d, from, limit),
            SnapshotDb::Repaired(d) => read_in(d, from, limit),
        }
    }

    /// Committed entries.
    pub fn size(&self) -> Result<u64, AuditError> {
        let tx = self.begin_read()?;
        let t = tx.open_table(ENTRIES).map_err(storage)?;
        redb::ReadableTableMetadata::len(&t).map_err(storage)
    }

    pub fn begin_read(&self) -> Result<redb::ReadTransaction, AuditError> {
        match &self.db {
            SnapshotDb::ReadOnly(d) => d.begin_read().map_err(storage),
            SnapshotDb::Repaired(d) => d.begin_read().map_err(storage),
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(t) = self.temp.take() {
            let _ = std::fs::remove_file(t);
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn fail(index: Option<u64>, reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure { index, reason: reason.into(), io: false }
}

fn io_fail(reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure { index: None, reason: reason.into(), io: true }
}

/// Entries `[from, from + limit)`, as stored.
pub fn read_entries(db: &redb::Database, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
    read_in(db, from, limit)
}

fn read_in(db: &impl ReadableDatabase, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
    let tx = db.begin_read().map_err(storage)?;
    let t = tx.open_table(ENTRIES).map_err(storage)?;
    let mut out = Vec::new();
    for item in t.range(from..).map_err(storage)?.take(limit) {
        let (k, v) = item.map_err(storage)?;
        out.push((k.value(), v.value().to_vec()));
    }
    Ok(out)
}

/// Index of the first entry whose `ts` is at or after `ts` (RFC 3339), by binary search: the
/// writer keeps timestamps monotonic.
pub fn first_index_at_or_after(db: &redb::Database, ts: &str) -> Result<Option<u64>, AuditError> {
    let want = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map_err(|e| AuditError::Io(format!("bad timestamp {ts}: {e}")))?;
    let tx = db.begin_read().map_err(storage)?;
    let t = tx.open_table(ENTRIES).map_err(storage)?;
    let len = t.len().map_err(storage)?;
    let ts_of = |i: u64| -> Result<time::OffsetDateTime, AuditError> {
        let v = t.get(i).map_err(storage)?.ok_or_else(|| AuditError::Integrity(format!("entry {i} is missing")))?;
        let parsed: Value =
            serde_json::from_slice(v.value()).map_err(|_| AuditError::Integrity(format!("entry {i} is not JSON")))?;
        parsed["ts"]
            .as_str()
            .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok())
            .ok_or_else(|| AuditError::Integrity(format!("entry {i} has no valid ts")))
    };
    let (mut lo, mut hi) = (0u64, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if ts_of(mid)? < want { lo = mid + 1 } else { hi = mid }
    }
    Ok((lo < len).then_some(lo))
}

type Rotation = Result<(VerifyingKey, String, Signature), String>;

/// For a `key` rotation entry: the announced key, the signed message and its signature.
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
            Ok((key, super::store::rotation_message(origin, new_hex), sig))
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

/// Checks one entry: canonical form, index, chain link. Returns its leaf hash.
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

/// What else `verify_db_with` checks and reports.
#[derive(Default)]
pub struct VerifyOptions<'a> {
    /// A checkpoint the auditor kept: the log must extend it (catches truncation, rollback and
    /// a swapped database file).
    pub trusted_checkpoint: Option<&'a str>,
    /// Called with the number of entries checked so far, every 100,000 entries.
    pub progress: Option<&'a dyn Fn(u64)>,
}

/// Verifies a log file: every entry, chain link, checkpoint root and signature.
pub fn verify_db(path: &Path, keys: &[VerifyingKey]) -> Result<VerifyReport, VerifyFailure> {
    verify_db_with(path, keys, &VerifyOptions::default())
}

/// `verify_db` with a trusted older checkpoint and progress reports.
pub fn verify_db_with(path: &Path, keys: &[VerifyingKey], opts: &VerifyOptions) -> Result<VerifyReport, VerifyFailure> {
    let db = Snapshot::open(path).map_err(|e| io_fail(e.to_string()))?;
    let tx = db.begin_read().map_err(|e| io_fail(e.to_string()))?;
    verify_tx(&tx, keys, opts)
}

/// `verify_db_with` over an open read transaction: a consistent snapshot of the log (also of a
/// running gateway's database, whose writer keeps committing meanwhile).
pub fn verify_tx(
    tx: &redb::ReadTransaction,
    keys: &[VerifyingKey],
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyFailure> {
    let mut trusted = Trusted::parse(opts.trusted_checkpoint)?;
    let entries = tx.open_table(ENTRIES).map_err(|e| fail(None, format!("no audit entries table: {e}")))?;
    let cps = tx.open_table(CHECKPOINTS).map_err(|e| fail(None, format!("no checkpoints table: {e}")))?;
    // Diagnosis only (cold path), for a broken link at `at`: was entry `at - 1` changed, rather
    // than the link? Entry `at`'s prev claims the hash entry `at - 1` had. If the tree with that
    // hash in its place matches the next signed checkpoint, the claim is what was signed: the
    // entry changed. Only a signed root is trusted here.
    let changed_before = |at: u64, bytes: &[u8], active: &[VerifyingKey]| -> bool {
        let Some(claimed) = serde_json::from_slice::<Head>(bytes).ok().and_then(|h| super::proof::hash(&h.prev)) else {
            return false;
        };
        let Some(Ok((size, note))) = cps.range(at..).ok().and_then(|mut r| r.next()) else { return false };
        let (size, note) = (size.value(), note.value());
        let Ok(cp) = parse_checkpoint(note, &named_keys(note, active)) else { return false };
        let Ok(range) = entries.range(0..size) else { return false };
        let mut tree = Frontier::new();
        for item in range {
            let Ok((k, v)) = item else { return false };
            tree.push(if k.value() == at - 1 { claimed } else { leaf_hash(v.value()) });
        }
        tree.size() == size && tree.root() == cp.root
    };
    let entry_sigs = tx.open_table(SIGS).ok();
    let mut cp_iter = cps.iter().map_err(|e| fail(None, e.to_string()))?.peekable();
    let mut frontier = Frontier::new();
    let mut prev = [0u8; 32];
    let mut checkpoints = 0u64;
    let mut last_cp_size = 0u64;
    // The keys that may sign at this point of the log: the trusted keys, then whatever key a
    // rotation entry (signed by the key active before it) announces.
    let mut active: Vec<VerifyingKey> = keys.to_vec();
    // Every key trusted at some point of the log (a trusted checkpoint may be from any of them).
    let mut known: Vec<VerifyingKey> = keys.to_vec();
    let mut rotations = 0u64;
    if let Some(t) = &mut trusted {
        t.check_at(0, &Frontier::new(), None, &known)?;
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
    for (expected, item) in entries.iter().map_err(|e| fail(None, e.to_string()))?.enumerate() {
        let expected = expected as u64;
        let (k, v) = item.map_err(|e| fail(Some(expected), e.to_string()))?;
        if k.value() != expected {
            return Err(fail(Some(expected), "the entry is missing (deleted)"));
        }
        let bytes = v.value();
        let (leaf, is_key) = match check_entry(expected, bytes, &prev, None) {
            Ok(l) => l,
            Err(f) => {
                // A broken link at `expected`: if the signed root confirms the hash this link
                // claims for the previous entry, the change is in that entry, not in the link.
                if expected > 0 && f.reason.contains("prev") && changed_before(expected, bytes, &active) {
                    return Err(fail(
                        Some(expected - 1),
                        "the entry was changed (its hash no longer matches the chain)",
                    ));
                }
                return Err(f);
            }
        };
        if let Some(t) = &entry_sigs
            && let Ok(Some(sig)) = t.get(expected)
        {
            let ok =
                Signature::from_slice(sig.value()).is_ok_and(|s| active.iter().any(|k| k.verify(bytes, &s).is_ok()));
            if !ok {
                return Err(fail(Some(expected), "the entry's own signature is not by the key active at this index"));
            }
        }
        if is_key {
            rotations += follow_rotation(expected, bytes, &mut active, &mut known)?;
        }
        frontier.push(leaf);
        prev = leaf;
        if let Some(t) = &mut trusted {
            t.check_at(frontier.size(), &frontier, Some(&origin_of(bytes)), &known)?;
        }
        if let Some(p) = opts.progress
            && frontier.size().is_multiple_of(100_000)
        {
            p(frontier.size());
        }
        while let Some(Ok((size, _))) = cp_iter.peek() {
            let size = size.value();
            if size > frontier.size() {
                break;
            }
            let (_, note) = cp_iter.next().expect("peeked").map_err(|e| fail(None, e.to_string()))?;
            if size < frontier.size() {
                return Err(fail(None, format!("checkpoint at size {size} was skipped")));
            }
            check_cp(size, note.value(), &frontier, &active)?;
            checkpoints += 1;
            last_cp_size = size;
        }
    }
    if let Some(Ok((size, _))) = cp_iter.peek() {
        let size = size.value();
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
    if let Some(t) = &trusted {
        t.finish(frontier.size(), &known)?;
    }
    if checkpoints == 0 && frontier.size() == 0 {
        return Err(fail(None, "the log is empty"));
    }
    Ok(VerifyReport {
        entries: frontier.size(),
        checkpoints,
        size: frontier.size(),
        root_hex: hex::encode(frontier.root()),
        from: 0,
        trusted_size: trusted.map(|t| t.cp.size),
        rotations,
    })
}

/// A checkpoint the auditor kept. It is parsed strictly before anything else; its signature is
/// checked when the log reaches its size (by then every key rotation before it has been
/// followed), or at the end when the log is shorter.
struct Trusted<'a> {
    note: &'a str,
    cp: Checkpoint,
    signed: bool,
}

impl<'a> Trusted<'a> {
    fn parse(note: Option<&'a str>) -> Result<Option<Trusted<'a>>, VerifyFailure> {
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
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub entries: u64,
    pub from: u64,
    pub to: u64,
}

/// SHA-256 of a file, streamed.
fn sha_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes an export bundle (format `uapk-audit-bundle/2`, documented in
/// `docs/evidence-format.md`): `checkpoint` (the signed note covering the range's end),
/// `entries.jsonl`, `prefix.json` (the tree state before `from`), `gateway.pub.pem`, and a
/// `manifest.json` with every file's SHA-256, signed in `manifest.json.sig` over
/// `MANIFEST_CONTEXT ‖ manifest.json`. The range is extended to the next checkpoint so that the
/// bundle proves itself against a signed root.
pub fn export_bundle(
    db_path: &Path,
    out: &Path,
    from: Option<u64>,
    to: Option<u64>,
    key: &SigningKey,
) -> Result<ExportReport, AuditError> {
    let db = Snapshot::open(db_path)?;
    let tx = db.begin_read()?;
    export_from(&tx, out, from, to, key)
}

/// `export_bundle` from an open read transaction (a consistent snapshot, e.g. of a running
/// gateway's database).
pub fn export_from(
    tx: &redb::ReadTransaction,
    out: &Path,
    from: Option<u64>,
    to: Option<u64>,
    key: &SigningKey,
) -> Result<ExportReport, AuditError> {
    use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
    let entries = tx.open_table(ENTRIES).map_err(storage)?;
    let cps = tx.open_table(CHECKPOINTS).map_err(storage)?;
    let size = entries.len().map_err(storage)?;
    let from = from.unwrap_or(0).min(size);
    let want_to = to.unwrap_or(size).clamp(from, size);
    let (cp_size, note) = match cps.range(want_to.max(1)..).map_err(storage)?.next() {
        Some(r) => {
            let (k, v) = r.map_err(storage)?;
            (k.value(), v.value().to_string())
        }
        None => return Err(AuditError::Integrity("no checkpoint covers the requested range".into())),
    };
    let origin = parse_unverified(&note).map_err(|e| AuditError::Integrity(format!("stored checkpoint: {e}")))?.origin;
    std::fs::create_dir_all(out).map_err(|e| AuditError::Io(format!("{}: {e}", out.display())))?;
    // The tree before `from`, recomputed from the entries.
    let mut prefix = Frontier::new();
    let mut last_leaf = [0u8; 32];
    for item in entries.range(..from).map_err(storage)? {
        let (_, v) = item.map_err(storage)?;
        last_leaf = leaf_hash(v.value());
        prefix.push(last_leaf);
    }
    let prefix_json = serde_json::to_vec_pretty(&json!({
        "size": from.to_string(),
        "frontier": hex::encode(prefix.to_bytes()),
        "last_leaf": if from == 0 { GENESIS_PREV.to_string() } else { hex::encode(last_leaf) },
    }))
    .map_err(|e| AuditError::Io(e.to_string()))?;
    let entries_path = out.join("entries.jsonl");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&entries_path).map_err(|e| AuditError::Io(format!("entries.jsonl: {e}")))?,
    );
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    for item in entries.range(from..cp_size).map_err(storage)? {
        let (_, v) = item.map_err(storage)?;
        f.write_all(v.value()).and_then(|_| f.write_all(b"\n")).map_err(|e| AuditError::Io(e.to_string()))?;
        hasher.update(v.value());
        hasher.update(b"\n");
        n += 1;
    }
    f.flush().map_err(|e| AuditError::Io(e.to_string()))?;
    let pub_pem = key.verifying_key().to_public_key_pem(LineEnding::LF).map_err(|e| AuditError::Io(e.to_string()))?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes).map_err(|e| AuditError::Io(format!("{name}: {e}")))
    };
    write("checkpoint", note.as_bytes())?;
    write("prefix.json", &prefix_json)?;
    write("gateway.pub.pem", pub_pem.as_bytes())?;
    let mut manifest = serde_json::to_vec_pretty(&json!({
        "format": BUNDLE_FORMAT,
        "origin": origin,
        "from": from.to_string(),
        "to": cp_size.to_string(),
        "files": {
            "checkpoint": sha_hex(note.as_bytes()),
            "entries.jsonl": hex::encode(hasher.finalize()),
            "prefix.json": sha_hex(&prefix_json),
            "gateway.pub.pem": sha_hex(pub_pem.as_bytes()),
        },
    }))
    .map_err(|e| AuditError::Io(e.to_string()))?;
    manifest.push(b'\n');
    write("manifest.json", &manifest)?;
    let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(&manifest_message(&manifest)).to_bytes());
    write("manifest.json.sig", format!("{sig}\n").as_bytes())?;
    Ok(ExportReport { entries: n, from, to: cp_size })
}

/// What the manifest's signature covers.
fn manifest_message(manifest: &[u8]) -> Vec<u8> {
    [MANIFEST_CONTEXT, manifest].concat()
}

/// The files of a bundle, in the order the manifest lists them.
const BUNDLE_FILES: [&str; 4] = ["checkpoint", "entries.jsonl", "prefix.json", "gateway.pub.pem"];

/// Verifies a bundle with nothing but its files and the trusted key(s).
pub fn verify_bundle(dir: &Path, keys: &[VerifyingKey]) -> Result<VerifyReport, VerifyFailure> {
    verify_bundle_with(dir, keys, &VerifyOptions::default())
}

/// `verify_bundle`, and (given a trusted checkpoint) that the bundle's tree extends it.
///
/// `keys` are the keys trusted at the bundle's first entry; key rotations inside the bundle are
/// followed as in `verify_db`. The bundle's checkpoint must be signed by the key active at its
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
    if let Some(t) = &trusted
        && t.cp.size < from
    {
        return Err(fail(
            None,
            format!(
                "the bundle starts at entry {from}, after the trusted checkpoint's size {}: its consistency with \
                 that checkpoint cannot be checked (export from {} or earlier)",
                t.cp.size, t.cp.size
            ),
        ));
    }
    let file = std::fs::File::open(dir.join("entries.jsonl")).map_err(|e| io_fail(format!("entries.jsonl: {e}")))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let next = |idx: u64, line: &mut Vec<u8>| -> Result<bool, VerifyFailure> {
        let got = reader.read_until(b'\n', line).map_err(|e| io_fail(format!("entries.jsonl: {e}")))?;
        if got == 0 {
            return Ok(false);
        }
        if line.pop() != Some(b'\n') {
            return Err(fail(Some(idx), "entries.jsonl: the last line does not end in a newline"));
        }
        Ok(true)
    };
    let range = check_range(&note, &cp, frontier, prev, keys, &mut trusted, next)?;
    let (n, rotations, active) = (range.entries, range.rotations, range.active);
    if !manifest_signed_early && !manifest_by(&active) {
        return Err(fail(None, "manifest.json is not signed by a trusted key"));
    }
    if let Some(t) = &trusted {
        t.finish(cp.size, &range.known)?;
    }
    Ok(VerifyReport {
        entries: n,
        checkpoints: 1,
        size: cp.size,
        root_hex: hex::encode(cp.root),
        from,
        trusted_size: trusted.map(|t| t.cp.size),
        rotations,
    })
}

/// What `check_range` verified.
struct Range {
    entries: u64,
    rotations: u64,
    /// The keys active after the last entry.
    active: Vec<VerifyingKey>,
    /// Every key active at some point.
    known: Vec<VerifyingKey>,
}

/// Checks the entries after the tree `frontier` (whose last leaf is `prev`) up to the signed
/// checkpoint `note` (`cp` parsed from it): each entry's index, chain link and log, key
/// rotations, the trusted checkpoint when the tree passes its size, and the final root and its
/// signature. `next(index, buffer)` fills `buffer` with the next entry's bytes, false at the end.
fn check_range(
    note: &str,
    cp: &Checkpoint,
    mut frontier: Frontier,
    mut prev: Hash,
    keys: &[VerifyingKey],
    trusted: &mut Option<Trusted>,
    mut next: impl FnMut(u64, &mut Vec<u8>) -> Result<bool, VerifyFailure>,
) -> Result<Range, VerifyFailure> {
    let from = frontier.size();
    if let Some(t) = &*trusted
        && t.cp.size < from
    {
        return Err(fail(
            None,
            format!(
                "the bundle starts at entry {from}, after the trusted checkpoint's size {}: its consistency with \
                 that checkpoint cannot be checked (export from {} or earlier)",
                t.cp.size, t.cp.size
            ),
        ));
    }
    let mut active: Vec<VerifyingKey> = keys.to_vec();
    let mut known: Vec<VerifyingKey> = keys.to_vec();
    let mut rotations = 0u64;
    if let Some(t) = trusted.as_mut() {
        t.check_at(from, &frontier, Some(&cp.origin), &known)?;
    }
    let mut line = Vec::with_capacity(4096);
    let mut n = 0u64;
    loop {
        line.clear();
        let idx = frontier.size();
        if !next(idx, &mut line)? {
            break;
        }
        let bytes = line.as_slice();
        let (leaf, is_key) = check_entry(idx, bytes, &prev, Some(&cp.origin))?;
        if is_key {
            rotations += follow_rotation(idx, bytes, &mut active, &mut known)?;
        }
        frontier.push(leaf);
        prev = leaf;
        n += 1;
        if let Some(t) = trusted.as_mut() {
            t.check_at(frontier.size(), &frontier, Some(&cp.origin), &known)?;
        }
    }
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
    Ok(Range { entries: n, rotations, active, known })
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
    let range = check_range(note, &cp, Frontier::new(), [0u8; 32], keys, &mut trusted, next)?;
    if let Some(t) = &trusted {
        t.finish(cp.size, &range.known)?;
    }
    Ok(VerifyReport {
        entries: range.entries,
        checkpoints: 1,
        size: cp.size,
        root_hex: hex::encode(cp.root),
        from: 0,
        trusted_size: trusted.map(|t| t.cp.size),
        rotations: range.rotations,
    })
}

/// A failure to fetch evidence (exit 2).
pub fn fetch_failure(reason: impl Into<String>) -> VerifyFailure {
    io_fail(reason)
}
