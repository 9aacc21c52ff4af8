//! Reading, verifying and exporting a log file. Verification itself is `uapk_tlog::verify`; this
//! is its reader of the redb tables (`TxSource`).

use super::merkle::{Frontier, leaf_hash};
use super::note::parse_unverified;
use super::store::{CHECKPOINTS, ENTRIES, GENESIS_PREV, SIGS};
use super::{AuditError, storage};
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use redb::{ReadableDatabase, ReadableTableMetadata};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
pub(crate) use uapk_tlog::verify::BUNDLE_FORMAT;
use uapk_tlog::verify::{EntrySource, Trusted, manifest_message, verify_log};
pub use uapk_tlog::verify::{
    MANIFEST_CONTEXT, VerifyFailure, VerifyOptions, VerifyReport, fetch_failure, verify_bundle_with, verify_served,
};

fn fail(index: Option<u64>, reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure::new(index, reason)
}

fn io_fail(reason: impl Into<String>) -> VerifyFailure {
    VerifyFailure::io(reason)
}

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
    /// Opens the log file at `path` without changing it; a file left by a crash is repaired on a
    /// temporary copy. `AuditError::Locked` when a running gateway holds the file.
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

    /// A read transaction on the snapshot, to read its tables directly.
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
    crate::clock::now_unix_nanos() as u64
}

/// Entries `[from, from + limit)`, as stored.
pub(crate) fn read_entries(db: &redb::Database, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
    read_in(db, from, limit)
}

/// Read-only access to a running gateway's log (the embedded log, or a fleet gateway's read
/// copy): consistent read transactions, never the writer's handle. What the admin API, the record
/// stream and the in-process test harness read.
#[derive(Clone)]
pub struct LogReader(crate::audit::SharedDb);

impl LogReader {
    pub(crate) fn new(db: crate::audit::SharedDb) -> LogReader {
        LogReader(db)
    }

    /// One consistent snapshot; an error while the writer reopens the file after a storage failure.
    pub(crate) fn read(&self) -> Result<redb::ReadTransaction, AuditError> {
        self.0.get()?.begin_read().map_err(storage)
    }

    /// Entries `[from, from + limit)` of one snapshot, as stored.
    pub fn entries(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        entries_in(&self.read()?, from, limit)
    }
}

fn read_in(db: &impl ReadableDatabase, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
    entries_in(&db.begin_read().map_err(storage)?, from, limit)
}

fn entries_in(tx: &redb::ReadTransaction, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
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
pub(crate) fn first_index_at_or_after(db: &redb::Database, ts: &str) -> Result<Option<u64>, AuditError> {
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
pub(crate) fn verify_tx(
    tx: &redb::ReadTransaction,
    keys: &[VerifyingKey],
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyFailure> {
    let trusted = Trusted::parse(opts.trusted_checkpoint)?;
    let mut source = TxSource::open(tx)?;
    verify_log(&mut source, keys, trusted, opts.progress)
}

type Table = redb::ReadOnlyTable<u64, &'static [u8]>;
type Notes = redb::ReadOnlyTable<u64, &'static str>;

/// The log in a read transaction, as verification reads it.
struct TxSource {
    entries: Table,
    cps: Notes,
    sigs: Option<Table>,
    rows: Option<redb::Range<'static, u64, &'static [u8]>>,
    cp_rows: std::iter::Peekable<redb::Range<'static, u64, &'static str>>,
}

impl TxSource {
    fn open(tx: &redb::ReadTransaction) -> Result<TxSource, VerifyFailure> {
        let entries = tx.open_table(ENTRIES).map_err(|e| fail(None, format!("no audit entries table: {e}")))?;
        let cps = tx.open_table(CHECKPOINTS).map_err(|e| fail(None, format!("no checkpoints table: {e}")))?;
        let sigs = tx.open_table(SIGS).ok();
        let cp_rows = cps.range::<u64>(..).map_err(|e| fail(None, e.to_string()))?.peekable();
        Ok(TxSource { entries, cps, sigs, rows: None, cp_rows })
    }
}

impl EntrySource for TxSource {
    fn next_entry(&mut self, idx: u64, buf: &mut Vec<u8>) -> Result<bool, VerifyFailure> {
        if self.rows.is_none() {
            self.rows = Some(self.entries.range::<u64>(..).map_err(|e| fail(None, e.to_string()))?);
        }
        let Some(item) = self.rows.as_mut().and_then(Iterator::next) else { return Ok(false) };
        let (k, v) = item.map_err(|e| fail(Some(idx), e.to_string()))?;
        if k.value() != idx {
            return Err(fail(Some(idx), "the entry is missing (deleted)"));
        }
        buf.extend_from_slice(v.value());
        Ok(true)
    }

    fn peek_checkpoint(&mut self) -> Option<u64> {
        match self.cp_rows.peek() {
            Some(Ok((size, _))) => Some(size.value()),
            _ => None,
        }
    }

    fn take_checkpoint(&mut self) -> Result<String, VerifyFailure> {
        match self.cp_rows.next() {
            Some(Ok((_, note))) => Ok(note.value().to_string()),
            Some(Err(e)) => Err(fail(None, e.to_string())),
            None => Err(fail(None, "no stored checkpoint")),
        }
    }

    fn entry_signature(&mut self, idx: u64) -> Option<Vec<u8>> {
        match self.sigs.as_ref()?.get(idx) {
            Ok(Some(sig)) => Some(sig.value().to_vec()),
            _ => None,
        }
    }

    fn checkpoint_at_or_after(&self, size: u64) -> Option<(u64, String)> {
        let (k, v) = self.cps.range(size..).ok()?.next()?.ok()?;
        Some((k.value(), v.value().to_string()))
    }

    fn reread(&self, size: u64, visit: &mut dyn FnMut(u64, &[u8])) -> bool {
        let Ok(range) = self.entries.range(0..size) else { return false };
        for item in range {
            let Ok((k, v)) = item else { return false };
            visit(k.value(), v.value());
        }
        true
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub entries: u64,
    pub from: u64,
    pub to: u64,
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
pub(crate) fn export_from(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::{entry, open, pubkey};
    use crate::audit::{AuditConfig, AuditLog, Durability};
    use uapk_tlog::verify::verify_bundle;

    type Tamper = dyn Fn(&mut redb::Table<u64, &[u8]>);

    fn tampered(dir: &std::path::Path, f: &Tamper) -> std::path::PathBuf {
        let src = dir.join("audit.redb");
        let dst = dir.join(format!("t{}.redb", rand::random::<u32>()));
        std::fs::copy(&src, &dst).unwrap();
        let db = redb::Database::open(&dst).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(ENTRIES).unwrap();
            f(&mut t);
        }
        tx.commit().unwrap();
        dst
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tampering_is_detected_and_the_first_bad_index_named() {
        use redb::ReadableTable;
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 64);
        let h = log.handle();
        for i in 0..20 {
            h.append(entry(i)).await.unwrap();
        }
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        let get = |t: &redb::Table<u64, &[u8]>, i: u64| t.get(i).unwrap().unwrap().value().to_vec();
        let cases: Vec<(Box<Tamper>, u64)> = vec![
            (
                Box::new(move |t| {
                    let mut e = get(t, 7);
                    let n = e.len() - 5;
                    e[n] ^= 1;
                    t.insert(7, e.as_slice()).unwrap();
                }),
                7,
            ),
            (
                Box::new(|t| {
                    t.remove(4).unwrap();
                }),
                4,
            ),
            (
                // The link changed, not the entry before it: the signed root says which.
                Box::new(move |t| {
                    let e = String::from_utf8(get(t, 12)).unwrap();
                    let at = e.find("\"prev\":\"").unwrap() + 8;
                    let flipped = if &e[at..at + 1] == "0" { "1" } else { "0" };
                    let e = format!("{}{flipped}{}", &e[..at], &e[at + 1..]);
                    t.insert(12, e.as_bytes()).unwrap();
                }),
                12,
            ),
            (
                Box::new(move |t| {
                    let (a, b) = (get(t, 10), get(t, 11));
                    t.insert(10, b.as_slice()).unwrap();
                    t.insert(11, a.as_slice()).unwrap();
                }),
                10,
            ),
            (
                Box::new(|t| {
                    for i in 17..20 {
                        t.remove(i).unwrap();
                    }
                }),
                17,
            ),
            (
                Box::new(move |t| {
                    let mut e = get(t, 19);
                    let n = e.len() - 5;
                    e[n] ^= 1;
                    t.insert(19, e.as_slice()).unwrap();
                }),
                19,
            ),
        ];
        for (f, want) in cases {
            let path = tampered(dir.path(), &*f);
            let err = verify_db(&path, &[pubkey()]).unwrap_err();
            assert_eq!(err.index, Some(want), "{}", err.reason);
            // And the gateway refuses to start on it.
            let cfg = AuditConfig {
                path,
                origin: "test/log".into(),
                durability: Durability::Sync,
                sign_each_entry: false,
                queue_capacity: 4,
                key_name: "test/log".into(),
            };
            assert!(AuditLog::open(cfg, SigningKey::from_bytes(&[5u8; 32])).is_err());
        }
        // A foreign key does not verify the untouched log.
        let err = verify_db(&dir.path().join("audit.redb"), &[SigningKey::from_bytes(&[6u8; 32]).verifying_key()])
            .unwrap_err();
        assert!(err.reason.contains("trusted key") || err.reason.contains("key active"), "{}", err.reason);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bundles_verify_and_detect_edits() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 64);
        let h = log.handle();
        for i in 0..30 {
            h.append(entry(i)).await.unwrap();
        }
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        let key = SigningKey::from_bytes(&[5u8; 32]);
        let db = dir.path().join("audit.redb");
        let out = dir.path().join("bundle");
        let r = export_bundle(&db, &out, None, None, &key).unwrap();
        assert_eq!(r.entries, 30);
        assert_eq!(verify_bundle(&out, &[pubkey()]).unwrap().size, 30);
        // A middle range verifies too.
        let mid = dir.path().join("mid");
        let r = export_bundle(&db, &mid, Some(10), Some(20), &key).unwrap();
        assert_eq!(r.from, 10);
        assert!(verify_bundle(&mid, &[pubkey()]).is_ok());
        // Any edit is caught.
        let p = out.join("entries.jsonl");
        let mut text = std::fs::read(&p).unwrap();
        text[100] ^= 1;
        std::fs::write(&p, text).unwrap();
        assert!(verify_bundle(&out, &[pubkey()]).is_err());
        assert!(verify_bundle(&mid, &[SigningKey::from_bytes(&[6u8; 32]).verifying_key()]).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bundles_are_checked_against_a_trusted_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 64);
        let h = log.handle();
        for i in 0..10 {
            h.append(entry(i)).await.unwrap();
        }
        let kept = h.latest_checkpoint().unwrap();
        for i in 10..20 {
            h.append(entry(i)).await.unwrap();
        }
        let newest = h.latest_checkpoint().unwrap();
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        let key = SigningKey::from_bytes(&[5u8; 32]);
        let db = dir.path().join("audit.redb");
        let (full, old) = (dir.path().join("full"), dir.path().join("old"));
        export_bundle(&db, &full, None, None, &key).unwrap();
        export_bundle(&db, &old, None, Some(10), &key).unwrap();
        fn with(t: &str) -> VerifyOptions<'_> {
            VerifyOptions { trusted_checkpoint: Some(t), progress: None }
        }
        let r = verify_bundle_with(&full, &[pubkey()], &with(&kept)).unwrap();
        assert_eq!((r.size, r.trusted_size), (20, Some(10)));
        assert!(verify_bundle_with(&old, &[pubkey()], &with(&kept)).is_ok());
        let e = verify_bundle_with(&old, &[pubkey()], &with(&newest)).unwrap_err();
        assert!(e.reason.contains("rolled back") && e.index == Some(10) && !e.io, "{e:?}");
        let e = verify_bundle_with(&full, &[pubkey()], &with("garbage")).unwrap_err();
        assert!(e.reason.contains("trusted checkpoint") && !e.io, "{e:?}");
        let e = verify_bundle_with(&dir.path().join("nowhere"), &[pubkey()], &VerifyOptions::default()).unwrap_err();
        assert!(e.io, "{e:?}");
    }
}
