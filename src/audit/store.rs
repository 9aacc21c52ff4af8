//! redb storage and the single writer thread with group commit.

use super::canonical::{Fields, write_str};
use super::merkle::{Frontier, Hash, leaf_hash};
use super::note::{Checkpoint, parse_checkpoint};
use super::{AuditError, MAX_ENTRY_BYTES, storage};
use ed25519_dalek::{Signer, SigningKey};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub(crate) const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_entries");
pub(crate) const CHECKPOINTS: TableDefinition<u64, &str> = TableDefinition::new("audit_checkpoints");
pub(crate) const SIGS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_entry_sigs");
/// Roots of the tree's complete subtrees of 2^NODE_MIN_LEVEL leaves and more (`node_key`): an
/// index that lets a proof read O(log n) nodes and a few hundred leaves instead of every leaf.
/// Not evidence: a proof built from a wrong node does not verify against the signed checkpoint.
pub(crate) const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_nodes");
pub(crate) const NODE_MIN_LEVEL: u32 = 8;

/// Key of the subtree of leaves `[index << level, (index + 1) << level)`.
pub(crate) fn node_key(level: u32, index: u64) -> u64 {
    (u64::from(level) << 56) | index
}

/// How many nodes a tree of `size` leaves has at `NODE_MIN_LEVEL` and above.
fn nodes_expected(size: u64) -> u64 {
    (NODE_MIN_LEVEL..64).map(|l| size >> l).sum()
}

/// Writes the node index from the entries when it does not match the tree (a log written before
/// the index existed).
fn ensure_nodes(db: &redb::Database, size: u64) -> Result<(), AuditError> {
    let stored = {
        let tx = db.begin_read().map_err(storage)?;
        let t = tx.open_table(NODES).map_err(storage)?;
        redb::ReadableTableMetadata::len(&t).map_err(storage)?
    };
    if stored == nodes_expected(size) {
        return Ok(());
    }
    tracing::info!(entries = size, "building the audit log's proof index");
    let tx = db.begin_write().map_err(storage)?;
    tx.delete_table(NODES).map_err(storage)?;
    {
        let entries = tx.open_table(ENTRIES).map_err(storage)?;
        let mut nodes = tx.open_table(NODES).map_err(storage)?;
        let mut tree = Frontier::new();
        let mut failed = None;
        for item in entries.range(0..size).map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            tree.push_nodes(leaf_hash(v.value()), |level, index, h| {
                if level >= NODE_MIN_LEVEL && failed.is_none() {
                    failed = nodes.insert(node_key(level, index), h.as_slice()).err();
                }
            });
        }
        if let Some(e) = failed {
            return Err(storage(e));
        }
    }
    tx.commit().map_err(storage)
}

pub(crate) use uapk_tlog::GENESIS_PREV;

const MAX_BATCH: usize = 4096;
const WRITER_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Async mode's durability window: a commit is fsynced at most this long after it.
pub(crate) const ASYNC_SYNC_EVERY: Duration = Duration::from_millis(25);
/// A group at least this large means the queue is busy: see `Writer::run`.
const YIELD_ABOVE_BATCH: usize = 16;
/// How long opening the file waits for another process to let go of it.
const OPEN_WAIT: Duration = Duration::from_secs(5);
/// After a failed write, how often the writer tries to reopen the database.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// When an append resolves relative to fsync (`audit.durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each batch is fsynced before its appends resolve.
    Sync,
    /// Batches commit without fsync; an fsync follows within `ASYNC_SYNC_EVERY` (25 ms).
    Async,
}

/// How the audit log's writer is set up, from the `audit` keys of `gateway.yaml`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The redb file of the log (`audit.path`).
    pub path: PathBuf,
    /// Log name, the first line of every checkpoint.
    pub origin: String,
    /// Whether appends wait for fsync (`audit.durability`).
    pub durability: Durability,
    /// Also sign every entry (table `audit_entry_sigs`).
    pub sign_each_entry: bool,
    /// Entries that may wait for the writer (`audit.queue_capacity`); an append to a full queue
    /// fails at once with `AuditError::QueueFull`.
    pub queue_capacity: usize,
    /// Name of the checkpoint signing key.
    pub key_name: String,
}

pub(crate) enum Msg {
    Append(Fields, Option<oneshot::Sender<Result<u64, AuditError>>>, Option<Precondition>),
    Stop,
}

/// What must still hold when an entry is appended, checked in the entry's own transaction: the
/// entry is appended only if it holds, and the change it names commits with the entry or not
/// at all. A value, so every backend checks it its own way (SPEC §15.3: an override is consumed
/// in the transaction of the `decision` entry that accepts it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    /// Move this approval from approved to consumed, as of this Unix time.
    pub consume_approval: Option<(String, i64)>,
    /// Keep this request's budget reservation: it is forwarded (`true`: its action counts).
    /// Backends whose counters live elsewhere settle it after the commit instead.
    pub keep_budget: Option<(String, bool)>,
}

/// How the embedded writer checks a [`Precondition`] inside its redb transaction: `Err(why)`
/// leaves the entry out (its appender gets `AuditError::Refused(why)`) and must leave the
/// transaction as it found it.
pub(crate) type Checker = Arc<dyn Fn(&redb::WriteTransaction, &Precondition) -> Result<(), String> + Send + Sync>;

#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) size: AtomicU64,
    /// The committed size again, for those who wait for new entries (the record stream): one
    /// value, so a subscriber costs the writer nothing and a slow one holds nothing back.
    pub(crate) committed: CommittedSize,
    pub(crate) entries_total: AtomicU64,
    pub(crate) commits_total: AtomicU64,
    pub(crate) last_batch: AtomicU64,
    /// A write failed and the database has not been reopened since.
    pub(crate) failed: std::sync::atomic::AtomicBool,
    pub(crate) checkpoint: RwLock<Option<String>>,
}

/// A `watch` channel of the committed tree size (`Default` for `Shared`).
pub(crate) struct CommittedSize(tokio::sync::watch::Sender<u64>);

impl Default for CommittedSize {
    fn default() -> Self {
        CommittedSize(tokio::sync::watch::channel(0).0)
    }
}

impl Shared {
    /// Publishes a new committed size: to the atomic readers, then wakes the waiters.
    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::SeqCst);
        self.committed.0.send_replace(size);
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditStats {
    pub entries_total: u64,
    /// Group commits (one redb transaction and one signed checkpoint each).
    pub commits_total: u64,
    pub last_batch_size: u64,
}

/// A cheap, cloneable way to append.
#[derive(Clone)]
pub struct AuditHandle {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl AuditHandle {
    /// Appends an entry (`fields` holds `kind` and the kind's fields; the writer adds `v`, `log`,
    /// `idx`, `ts`, `prev`) and resolves with its index once committed.
    pub async fn append(&self, fields: Map<String, Value>) -> Result<u64, AuditError> {
        self.append_fields(Fields::from_map(fields)?).await
    }

    /// Queues an entry without waiting for its commit.
    pub(crate) fn append_nowait(&self, fields: Map<String, Value>) -> Result<(), AuditError> {
        self.append_fields_nowait(Fields::from_map(fields)?)
    }

    /// `append` for fields already in canonical form (the request path's entries).
    pub async fn append_fields(&self, fields: Fields) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx.try_send(Msg::Append(fields, Some(tx), None)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => AuditError::Stopped,
        })?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// `append_fields` whose entry is appended only if `guard` holds, together with its change
    /// (see [`Precondition`]).
    pub async fn append_guarded(&self, fields: Fields, guard: Precondition) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx.try_send(Msg::Append(fields, Some(tx), Some(guard))).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => AuditError::Stopped,
        })?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// `append_nowait` for fields already in canonical form.
    pub(crate) fn append_fields_nowait(&self, fields: Fields) -> Result<(), AuditError> {
        self.tx.try_send(Msg::Append(fields, None, None)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => AuditError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => AuditError::Stopped,
        })
    }

    /// A handle on a queue drained by another writer (the fleet's database writer).
    pub(crate) fn from_parts(tx: mpsc::Sender<Msg>, shared: Arc<Shared>) -> AuditHandle {
        AuditHandle { tx, shared }
    }

    /// The queue (the fleet writer's stop message).
    pub(crate) fn sender(&self) -> &mpsc::Sender<Msg> {
        &self.tx
    }

    pub(crate) fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Committed entries.
    pub fn tree_size(&self) -> u64 {
        self.shared.size.load(Ordering::SeqCst)
    }

    /// The committed size, updated after every commit: `changed()` wakes a reader when new
    /// entries are readable (no polling).
    pub(crate) fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.committed.0.subscribe()
    }

    /// The latest signed checkpoint note.
    pub(crate) fn latest_checkpoint(&self) -> Option<String> {
        self.shared.checkpoint.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True while the log cannot write (a failed write, not yet recovered by reopening).
    pub(crate) fn storage_failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// The writer's counters so far: entries appended, group commits and the size of the last
    /// batch.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            entries_total: self.shared.entries_total.load(Ordering::Relaxed),
            commits_total: self.shared.commits_total.load(Ordering::Relaxed),
            last_batch_size: self.shared.last_batch.load(Ordering::Relaxed),
        }
    }
}

/// The gateway's redb database, shared by the audit writer, the approvals store and the admin
/// API. redb refuses every write after one failed I/O (a full disk) until the file is reopened;
/// the writer does that here, so everyone takes the current database for each use instead of
/// keeping one.
#[derive(Clone)]
pub(crate) struct SharedDb(Arc<RwLock<Option<Arc<redb::Database>>>>);

impl SharedDb {
    pub(crate) fn new(db: redb::Database) -> SharedDb {
        SharedDb(Arc::new(RwLock::new(Some(Arc::new(db)))))
    }

    /// The open database; an error while the writer is reopening it.
    pub(crate) fn get(&self) -> Result<Arc<redb::Database>, AuditError> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| AuditError::Storage("the database is being reopened after a storage failure".into()))
    }
}

/// Opens (or creates) the database file and its tables.
fn open_database(path: &std::path::Path) -> Result<redb::Database, AuditError> {
    // A reader of a stopped gateway's file (`tail --follow`, `verify`) holds it for a moment:
    // wait that moment out rather than fail the start.
    let deadline = crate::clock::instant() + OPEN_WAIT;
    let file = loop {
        match super::file::PrefilledFile::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && crate::clock::instant() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => break r.map_err(|e| AuditError::Storage(format!("{}: {e}", path.display())))?,
        }
    };
    // A bounded page cache: the log only grows, and a sidecar must not grow with it.
    let db = redb::Builder::new()
        .set_cache_size(WRITER_CACHE_BYTES)
        .create_with_backend(file)
        .map_err(|e| AuditError::Storage(format!("{}: {e}", path.display())))?;
    create_tables(db)
}

/// Creates the log's tables (if missing) in a newly opened database.
fn create_tables(db: redb::Database) -> Result<redb::Database, AuditError> {
    let tx = db.begin_write().map_err(storage)?;
    tx.open_table(ENTRIES).map_err(storage)?;
    tx.open_table(CHECKPOINTS).map_err(storage)?;
    tx.open_table(SIGS).map_err(storage)?;
    tx.open_table(NODES).map_err(storage)?;
    tx.commit().map_err(storage)?;
    Ok(db)
}

/// A read copy of a log kept elsewhere (the fleet's database): the same tables as the
/// gateway's own file, so every reader (records, proofs, export, verify) works on it
/// unchanged. Not evidence by itself: it is filled from the database and re-verified.
pub(crate) fn open_copy(path: &std::path::Path) -> Result<redb::Database, AuditError> {
    let db = redb::Builder::new()
        .set_cache_size(WRITER_CACHE_BYTES)
        .create(path)
        .map_err(|e| AuditError::Storage(format!("{}: {e}", path.display())))?;
    create_tables(db)
}

/// An entry for a read copy: index, bytes, and its own signature if the log signs each entry.
pub(crate) type CopiedEntry = (u64, Vec<u8>, Option<Vec<u8>>);

/// Adds entries (with their signatures, if any) and checkpoints to a read copy; entries must
/// continue it densely. Not fsynced: the copy is rebuilt from its source after a crash.
pub(crate) fn copy_append(
    db: &redb::Database,
    entries: &[CopiedEntry],
    checkpoints: &[(u64, String)],
) -> Result<(), AuditError> {
    let mut tx = db.begin_write().map_err(storage)?;
    tx.set_durability(redb::Durability::None).map_err(storage)?;
    {
        let mut t = tx.open_table(ENTRIES).map_err(storage)?;
        let mut sigs = tx.open_table(SIGS).map_err(storage)?;
        for (idx, body, sig) in entries {
            t.insert(*idx, body.as_slice()).map_err(storage)?;
            if let Some(sig) = sig {
                sigs.insert(*idx, sig.as_slice()).map_err(storage)?;
            }
        }
        let mut cps = tx.open_table(CHECKPOINTS).map_err(storage)?;
        for (size, note) in checkpoints {
            cps.insert(*size, note.as_str()).map_err(storage)?;
        }
    }
    tx.commit().map_err(storage)
}

/// The open log and its writer thread.
pub struct AuditLog {
    db: SharedDb,
    handle: AuditHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The writer's view of the tree.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) size: u64,
    pub(crate) prev: Hash,
    pub(crate) frontier: Frontier,
    pub(crate) last_ts: time::OffsetDateTime,
}

/// Recomputes the tree from the stored entries and checks it against the latest checkpoint.
pub(crate) fn recover(
    db: &redb::Database,
    cfg: &AuditConfig,
    key: &SigningKey,
) -> Result<(State, Option<String>), AuditError> {
    let tx = db.begin_read().map_err(storage)?;
    let entries = tx.open_table(ENTRIES).map_err(storage)?;
    let mut frontier = Frontier::new();
    let mut prev = [0u8; 32];
    let mut last_ts = time::OffsetDateTime::UNIX_EPOCH;
    let mut active_key: Option<String> = None;
    for (expected, item) in entries.iter().map_err(storage)?.enumerate() {
        let (k, v) = item.map_err(storage)?;
        let idx = k.value();
        if idx != expected as u64 {
            return Err(AuditError::Integrity(format!("entry {expected} is missing from the log")));
        }
        let bytes = v.value();
        let parsed: Value = serde_json::from_slice(bytes)
            .map_err(|_| AuditError::Integrity(format!("entry {idx} is not valid JSON")))?;
        let want_prev = if idx == 0 { GENESIS_PREV.to_string() } else { hex::encode(prev) };
        if parsed["prev"].as_str() != Some(want_prev.as_str()) {
            return Err(AuditError::Integrity(format!(
                "entry {idx} does not chain to entry {}",
                idx.saturating_sub(1)
            )));
        }
        if let Some(ts) = parsed["ts"]
            .as_str()
            .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
        {
            last_ts = ts;
        }
        if parsed["kind"] == "key"
            && let Some(k) = parsed["new_key"].as_str()
        {
            active_key = Some(k.to_string());
        }
        prev = leaf_hash(bytes);
        frontier.push(prev);
    }
    if let Some(active) = active_key
        && active != hex::encode(key.verifying_key().as_bytes())
    {
        return Err(AuditError::Integrity(format!(
            "the gateway key was rotated: the log's active key is {active}; configure keys.gateway with it"
        )));
    }
    let cps = tx.open_table(CHECKPOINTS).map_err(storage)?;
    let latest = cps.last().map_err(storage)?.map(|(_, v)| v.value().to_string());
    if let Some(note) = &latest {
        let keys = [(cfg.key_name.clone(), key.verifying_key())];
        let cp = parse_checkpoint(note, &keys).map_err(|e| {
            AuditError::Integrity(format!("the latest checkpoint does not verify under this gateway key: {e}"))
        })?;
        if frontier.size() < cp.size {
            return Err(AuditError::Integrity(format!(
                "the database holds {} entries but its latest checkpoint covers {}: it was truncated",
                frontier.size(),
                cp.size
            )));
        }
        if frontier.size() > cp.size {
            return Err(AuditError::Integrity(format!(
                "the database holds {} entries beyond its latest checkpoint ({}): entries were added outside the writer",
                frontier.size() - cp.size,
                cp.size
            )));
        }
        if frontier.root() != cp.root {
            return Err(AuditError::Integrity("the entries do not hash to the latest checkpoint's root".into()));
        }
    } else if frontier.size() > 0 {
        return Err(AuditError::Integrity("the log has entries but no checkpoint".into()));
    }
    Ok((State { size: frontier.size(), prev, frontier, last_ts }, latest))
}

impl AuditLog {
    /// Opens (or creates) the log, re-verifies it against its latest checkpoint (refusing a
    /// truncated or altered database) and starts the writer.
    pub fn open(cfg: AuditConfig, key: SigningKey) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(
            cfg,
            key,
            Arc::new(|_: &redb::WriteTransaction, p: &Precondition| match p.consume_approval {
                Some(_) => Err("no approval store".into()),
                None => Ok(()),
            }),
        )
    }

    /// `open`, with the way the writer checks an entry's [`Precondition`] in its transaction.
    pub(crate) fn open_with(cfg: AuditConfig, key: SigningKey, checker: Checker) -> Result<AuditLog, AuditError> {
        super::note::valid_key_name(&cfg.origin)
            .map_err(|e| AuditError::Checkpoint(format!("the log origin {:?} {e}", cfg.origin)))?;
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| AuditError::Io(format!("{}: {e}", dir.display())))?;
        }
        let db = open_database(&cfg.path)?;
        let (state, latest) = recover(&db, &cfg, &key)?;
        ensure_nodes(&db, state.size)?;
        let db = SharedDb::new(db);
        let shared = Arc::new(Shared::default());
        shared.set_size(state.size);
        *shared.checkpoint.write().unwrap_or_else(|e| e.into_inner()) = latest;
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let writer = Writer::new(db.clone(), cfg, key, state, shared.clone(), None, checker);
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| AuditError::Io(format!("audit writer timer: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("uapk-audit-writer".into())
            .spawn(move || {
                batch_scheduling();
                writer.run(rx, clock)
            })
            .map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(AuditLog { db, handle: AuditHandle { tx, shared }, thread: Some(thread) })
    }

    /// A handle that appends to this log and reads its state; clones share the one writer.
    pub fn handle(&self) -> AuditHandle {
        self.handle.clone()
    }

    pub(crate) fn database(&self) -> SharedDb {
        self.db.clone()
    }

    /// Commits everything queued before this call, makes it durable, and stops the writer.
    pub fn shutdown(mut self) {
        let _ = self.handle.tx.blocking_send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    db: SharedDb,
    cfg: AuditConfig,
    key: SigningKey,
    state: State,
    shared: Arc<Shared>,
    /// A second key that co-signs the next checkpoint (key rotation).
    cosign: Option<SigningKey>,
    /// Since a write failed: redb takes no more writes until the file is reopened.
    failed_at: Option<Instant>,
    /// Reopen attempts since the failure (for logging once, then every 30th).
    reopen_attempts: u32,
    /// `cfg.origin` as a canonical JSON string: every entry's `log`.
    log_json: Vec<u8>,
    /// The runtime of the request tasks (when the log was opened on one): see `acknowledge`.
    runtime: Option<tokio::runtime::Handle>,
    checker: Checker,
}

type Ack = oneshot::Sender<Result<u64, AuditError>>;
type Reply = Option<Ack>;

impl Writer {
    fn new(
        db: SharedDb,
        cfg: AuditConfig,
        key: SigningKey,
        state: State,
        shared: Arc<Shared>,
        cosign: Option<SigningKey>,
        checker: Checker,
    ) -> Writer {
        let log_json = log_json(&cfg.origin);
        let runtime = tokio::runtime::Handle::try_current().ok();
        Writer { db, cfg, key, state, shared, cosign, failed_at: None, reopen_attempts: 0, log_json, runtime, checker }
    }

    /// `clock` only waits on the queue with a deadline (async mode's fsync timer).
    fn run(mut self, mut rx: mpsc::Receiver<Msg>, clock: tokio::runtime::Runtime) {
        let mut unsynced = false;
        let mut last_sync = crate::clock::instant();
        let mut last_batch = 0usize;
        loop {
            // Wait on the queue, at most until a timed duty is due: after a storage failure the
            // next reopen attempt (so the log, and readiness, come back by themselves once the
            // disk takes writes again, even with nothing queued); in async mode the next fsync.
            let due = match self.failed_at {
                Some(failed) => Some(REOPEN_EVERY.saturating_sub(crate::clock::since(failed))),
                None if unsynced => Some(ASYNC_SYNC_EVERY.saturating_sub(crate::clock::since(last_sync))),
                None => None,
            };
            let first = match due {
                None => rx.blocking_recv(),
                Some(wait) => match clock.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                    Ok(m) => m,
                    Err(_elapsed) if self.failed_at.is_some() => {
                        let _ = self.ensure_writable();
                        continue;
                    }
                    Err(_elapsed) => {
                        self.sync();
                        unsynced = false;
                        last_sync = crate::clock::instant();
                        continue;
                    }
                },
            };
            // Under load (the last group was large), let a request-serving thread that is ready
            // to run on this core queue what it has first: the group fills up and commits are
            // fewer. At low load nothing waits, so latency stays that of one commit.
            if last_batch >= YIELD_ABOVE_BATCH {
                std::thread::yield_now();
            }
            let (batch, stop) = gather(first, &mut rx, MAX_BATCH);
            last_batch = batch.len();
            if !batch.is_empty() {
                let durable = self.cfg.durability == Durability::Sync;
                self.commit(batch, durable);
                if !durable {
                    unsynced = true;
                    if crate::clock::since(last_sync) >= ASYNC_SYNC_EVERY {
                        self.sync();
                        unsynced = false;
                        last_sync = crate::clock::instant();
                    }
                }
            }
            if stop {
                if unsynced {
                    self.sync();
                }
                rx.close();
                // Anything that raced in before the close is still committed.
                let mut rest = Vec::new();
                while let Ok(Msg::Append(f, r, g)) = rx.try_recv() {
                    rest.push((f, r, g));
                }
                if !rest.is_empty() {
                    self.commit(rest, true);
                }
                return;
            }
        }
    }

    /// An empty fsynced commit makes every earlier non-durable commit durable.
    fn sync(&mut self) {
        if self.failed_at.is_some() {
            return;
        }
        let r = (|| -> Result<(), AuditError> {
            let mut tx = self.db.get()?.begin_write().map_err(storage)?;
            tx.set_durability(redb::Durability::Immediate).map_err(storage)?;
            tx.commit().map_err(storage)
        })();
        if let Err(e) = r {
            tracing::error!(error = %e, "audit fsync failed");
            self.failed();
        }
    }

    fn failed(&mut self) {
        self.failed_at = Some(crate::clock::instant());
        self.shared.failed.store(true, Ordering::SeqCst);
    }

    /// After a failed write, reopens the database (at most once per `REOPEN_EVERY`): the writer
    /// records again as soon as the storage takes writes again (space freed on a full disk).
    fn ensure_writable(&mut self) -> Result<(), AuditError> {
        let Some(at) = self.failed_at else {
            return Ok(());
        };
        if crate::clock::since(at) < REOPEN_EVERY {
            return Err(AuditError::Commit("the audit log's storage failed; it is reopened shortly".into()));
        }
        self.reopen_attempts += 1;
        match self.reopen() {
            Ok(()) => {
                self.failed_at = None;
                self.shared.failed.store(false, Ordering::SeqCst);
                tracing::warn!(
                    tree_size = self.state.size,
                    attempts = self.reopen_attempts,
                    "audit log reopened after a storage failure; recording again"
                );
                self.reopen_attempts = 0;
                Ok(())
            }
            Err(e) => {
                self.failed_at = Some(crate::clock::instant());
                // Once, then every 30th attempt: a disk that stays full must not flood the logs.
                if self.reopen_attempts % 30 == 1 {
                    tracing::error!(
                        error = %e,
                        attempts = self.reopen_attempts,
                        "reopening the audit log failed; retrying every second"
                    );
                }
                Err(AuditError::Commit(e.to_string()))
            }
        }
    }

    /// The stored latest checkpoint, if it is the writer's current tree (same size and root,
    /// and no entry past it).
    fn matches_stored(&self, db: &redb::Database) -> Result<Option<String>, AuditError> {
        let tx = db.begin_read().map_err(storage)?;
        let Some(note) =
            tx.open_table(CHECKPOINTS).map_err(storage)?.last().map_err(storage)?.map(|(_, v)| v.value().to_string())
        else {
            return Ok(None);
        };
        let keys = [(self.cfg.key_name.clone(), self.key.verifying_key())];
        let Ok(cp) = parse_checkpoint(&note, &keys) else {
            return Ok(None);
        };
        let last = tx.open_table(ENTRIES).map_err(storage)?.last().map_err(storage)?.map(|(k, _)| k.value());
        let same = cp.size == self.state.size
            && cp.root == self.state.frontier.root()
            && last == self.state.size.checked_sub(1);
        Ok(same.then_some(note))
    }

    /// Closes the database (once nobody else holds it), opens it again and re-verifies the
    /// stored tree against its latest checkpoint, exactly as at start.
    fn reopen(&mut self) -> Result<(), AuditError> {
        {
            let mut slot = self.db.0.write().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = slot.take() {
                match Arc::try_unwrap(old) {
                    Ok(db) => drop(db),
                    Err(in_use) => {
                        *slot = Some(in_use);
                        return Err(AuditError::Storage("the database is still in use".into()));
                    }
                }
            }
        }
        // Not under the lock: meanwhile readers are told the database is unavailable instead of
        // waiting (a full re-verification of a large log takes seconds).
        let db = open_database(&self.cfg.path)?;
        // Usually the file holds exactly what the writer last committed: its latest checkpoint
        // is the writer's own tree. Otherwise (commits lost with the file) recompute the tree.
        let recovered = match self.matches_stored(&db) {
            Ok(Some(note)) => Ok((self.state.clone(), Some(note))),
            Ok(None) => recover(&db, &self.cfg, &self.key),
            Err(e) => Err(e),
        };
        *self.db.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
        let (state, latest) = recovered?;
        if state.size < self.state.size {
            tracing::error!(
                lost = self.state.size - state.size,
                "entries committed but not yet fsynced (durability: async) were lost with the failed write"
            );
        }
        self.state = State { last_ts: self.state.last_ts.max(state.last_ts), ..state };
        self.shared.set_size(self.state.size);
        *self.shared.checkpoint.write().unwrap_or_else(|e| e.into_inner()) = latest;
        Ok(())
    }

    /// The entry's canonical bytes: `fields` and the writer's own `v`, `log`, `idx`, `ts`, `prev`.
    fn entry_bytes(&mut self, fields: &Fields, idx: u64) -> Vec<u8> {
        let now = crate::clock::now_utc().max(self.state.last_ts);
        self.state.last_ts = now;
        entry_bytes(fields, idx, &self.state.prev, now, &self.log_json, None)
    }

    /// Tells the waiters of a committed group their indexes. Waking request tasks one by one from
    /// this thread would let each wake-up preempt the writer (a context switch per waiter on a busy
    /// core); one task on the runtime wakes them all from there instead.
    fn acknowledge(&self, waiters: Vec<(u64, Ack)>) {
        fn send(waiters: Vec<(u64, Ack)>) {
            for (idx, r) in waiters {
                let _ = r.send(Ok(idx));
            }
        }
        match &self.runtime {
            Some(rt) if waiters.len() > 1 => drop(rt.spawn(async move { send(waiters) })),
            _ => send(waiters),
        }
    }

    fn commit(&mut self, batch: Vec<(Fields, Reply, Option<Precondition>)>, durable: bool) {
        if let Err(e) = self.ensure_writable() {
            for (_, reply, _) in batch {
                reply_err(reply, e.clone());
            }
            return;
        }
        let started = self.state.clone();
        let mut rows: Vec<(u64, Vec<u8>, Reply)> = Vec::with_capacity(batch.len());
        let mut nodes: Vec<(u64, Hash)> = Vec::new();
        // Guards need the transaction, so it is opened before the entries are laid out.
        let tx = self.db.get().and_then(|db| db.begin_write().map_err(storage)).and_then(|mut tx| {
            tx.set_durability(if durable { redb::Durability::Immediate } else { redb::Durability::None })
                .map_err(storage)?;
            Ok(tx)
        });
        let tx = match tx {
            Ok(tx) => tx,
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "audit commit failed");
                self.failed();
                for (_, reply, _) in batch {
                    reply_err(reply, AuditError::Commit(e.to_string()));
                }
                return;
            }
        };
        for (fields, reply, guard) in batch {
            let idx = self.state.size;
            let bytes = self.entry_bytes(&fields, idx);
            if bytes.len() > MAX_ENTRY_BYTES {
                reply_err(reply, AuditError::EntryTooLarge(bytes.len()));
                continue;
            }
            // The guard runs last, once its entry is sure to be appended with it.
            if let Some(guard) = guard
                && let Err(why) = (self.checker)(&tx, &guard)
            {
                reply_err(reply, AuditError::Refused(why));
                continue;
            }
            let leaf = leaf_hash(&bytes);
            self.state.frontier.push_nodes(leaf, |level, index, h| {
                if level >= NODE_MIN_LEVEL {
                    nodes.push((node_key(level, index), *h));
                }
            });
            self.state.prev = leaf;
            self.state.size += 1;
            rows.push((idx, bytes, reply));
        }
        if rows.is_empty() {
            // Nothing to append: whatever a refusing guard left is not committed either.
            drop(tx);
            return;
        }
        let cp =
            Checkpoint { origin: self.cfg.origin.clone(), size: self.state.size, root: self.state.frontier.root() };
        let mut note = cp.sign(&self.cfg.key_name, &self.key);
        if let Some(k) = &self.cosign {
            note = super::note::cosign(&note, &self.cfg.key_name, k);
        }
        let result = (|| -> Result<(), AuditError> {
            {
                let mut entries = tx.open_table(ENTRIES).map_err(storage)?;
                for (idx, bytes, _) in &rows {
                    entries.insert(*idx, bytes.as_slice()).map_err(storage)?;
                }
                if !nodes.is_empty() {
                    let mut t = tx.open_table(NODES).map_err(storage)?;
                    for (key, h) in &nodes {
                        t.insert(*key, h.as_slice()).map_err(storage)?;
                    }
                }
                if self.cfg.sign_each_entry {
                    let mut sigs = tx.open_table(SIGS).map_err(storage)?;
                    for (idx, bytes, _) in &rows {
                        let sig = self.key.sign(bytes).to_bytes();
                        sigs.insert(*idx, sig.as_slice()).map_err(storage)?;
                    }
                }
                let mut cps = tx.open_table(CHECKPOINTS).map_err(storage)?;
                cps.insert(cp.size, note.as_str()).map_err(storage)?;
            }
            tx.commit().map_err(storage)
        })();
        match result {
            Ok(()) => {
                self.shared.set_size(self.state.size);
                self.shared.entries_total.fetch_add(rows.len() as u64, Ordering::Relaxed);
                self.shared.commits_total.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch.store(rows.len() as u64, Ordering::Relaxed);
                *self.shared.checkpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(note);
                let waiters: Vec<_> = rows.into_iter().filter_map(|(idx, _, reply)| reply.map(|r| (idx, r))).collect();
                self.acknowledge(waiters);
            }
            Err(e) => {
                // Nothing of this batch is in the log: roll the tree back and tell every waiter.
                tracing::error!(error = %e, entries = rows.len(), "audit commit failed");
                self.state = State { last_ts: self.state.last_ts, ..started };
                self.failed();
                for (_, _, reply) in rows {
                    reply_err(reply, AuditError::Commit(e.to_string()));
                }
            }
        }
    }
}

fn reply_err(reply: Reply, e: AuditError) {
    match reply {
        Some(r) => {
            let _ = r.send(Err(e));
        }
        None => tracing::error!(error = %e, "queued audit entry dropped"),
    }
}

/// One queued append: the entry's fields, who waits for its index, its precondition.
pub(crate) type Queued = (Fields, Option<oneshot::Sender<Result<u64, AuditError>>>, Option<Precondition>);

/// A group for one commit: `first` (what the writer woke up with) and whatever else is queued,
/// up to `max`; `true` when a stop was asked for (or the queue closed).
pub(crate) fn gather(first: Option<Msg>, rx: &mut mpsc::Receiver<Msg>, max: usize) -> (Vec<Queued>, bool) {
    let mut stop = false;
    let mut batch = Vec::new();
    match first {
        None | Some(Msg::Stop) => stop = true,
        Some(Msg::Append(f, r, g)) => batch.push((f, r, g)),
    }
    while !stop && batch.len() < max {
        match rx.try_recv() {
            Ok(Msg::Append(f, r, g)) => batch.push((f, r, g)),
            Ok(Msg::Stop) => stop = true,
            Err(_) => break,
        }
    }
    (batch, stop)
}

/// An entry's canonical bytes: `fields` and the writer's `v`, `log` (`log_json`, the origin as a
/// JSON string), `idx`, `ts` (`now`), `prev` (the previous leaf hash; ignored for entry 0).
pub(crate) fn entry_bytes(
    fields: &Fields,
    idx: u64,
    prev: &Hash,
    now: time::OffsetDateTime,
    log_json: &[u8],
    gateway: Option<&[u8]>,
) -> Vec<u8> {
    use std::io::Write as _;
    let mut prev_json = [b'"'; 66];
    if idx == 0 {
        prev_json[1..65].copy_from_slice(GENESIS_PREV.as_bytes());
    } else {
        let _ = hex::encode_to_slice(prev, &mut prev_json[1..65]);
    }
    let mut idx_s = Vec::with_capacity(22);
    let _ = write!(idx_s, "\"{idx}\"");
    let ts = timestamp(now);
    let mut out = Vec::with_capacity(fields.len_hint() + 256);
    // Long strings are already cut; an entry still above the limit drops whole fields into
    // its `truncated` map (SPEC §14.8) rather than go unrecorded.
    let own: [(&'static str, &[u8]); 5] =
        [("idx", &idx_s), ("log", log_json), ("prev", &prev_json), ("ts", &ts), ("v", b"\"1\"")];
    match gateway {
        None => fields.join_within(&own, MAX_ENTRY_BYTES, &mut out),
        Some(g) => {
            let mut with = Vec::with_capacity(6);
            with.push(("gateway", g));
            with.extend_from_slice(&own);
            fields.join_within(&with, MAX_ENTRY_BYTES, &mut out)
        }
    }
    out
}

/// An entry time, quoted: RFC 3339 UTC with microseconds.
fn timestamp(now: time::OffsetDateTime) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(30);
    let _ = write!(
        out,
        "\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\"",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    );
    out
}

/// The origin as a canonical JSON string: every entry's `log`.
pub(crate) fn log_json(origin: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(origin.len() + 2);
    write_str(origin, &mut out);
    out
}

pub(crate) use uapk_tlog::rotation_message;

/// The `key` entry announcing `new` (signed by `old`) in the log `origin`.
pub(crate) fn rotation_fields(origin: &str, key_name: &str, old: &SigningKey, new: &SigningKey) -> Map<String, Value> {
    let new_hex = hex::encode(new.verifying_key().as_bytes());
    let announcement = old.sign(rotation_message(origin, &new_hex).as_bytes());
    let mut fields = Map::new();
    fields.insert("kind".into(), Value::String("key".into()));
    fields.insert("event".into(), Value::String("rotate".into()));
    fields.insert("key_name".into(), Value::String(key_name.to_string()));
    fields.insert("old_key".into(), Value::String(hex::encode(old.verifying_key().as_bytes())));
    fields.insert("new_key".into(), Value::String(new_hex));
    fields.insert("announcement_sig".into(), Value::String(hex::encode(announcement.to_bytes())));
    fields
}

/// Rotates the gateway key of a stopped gateway's log: appends a `key` entry announcing `new`
/// (signed by `old`), in a batch whose checkpoint both keys sign. From then on only `new` may
/// sign checkpoints and entries; `verify` follows the rotation from the original key.
pub fn rotate_key(cfg: AuditConfig, old: SigningKey, new: SigningKey) -> Result<u64, AuditError> {
    let db =
        redb::Database::create(&cfg.path).map_err(|e| AuditError::Storage(format!("{}: {e}", cfg.path.display())))?;
    let (state, _) = recover(&db, &cfg, &old)?;
    let fields = rotation_fields(&cfg.origin, &cfg.key_name, &old, &new);
    let shared = Arc::new(Shared::default());
    let checker: Checker = Arc::new(|_: &redb::WriteTransaction, _: &Precondition| Ok(()));
    let mut w = Writer::new(SharedDb::new(db), cfg, old, state, shared, Some(new), checker);
    let (tx, mut rx) = oneshot::channel();
    w.commit(vec![(Fields::from_map(fields)?, Some(tx), None)], true);
    rx.try_recv().map_err(|_| AuditError::Stopped)?
}

/// Marks the writer thread SCHED_BATCH: the kernel then does not preempt a request-serving
/// thread to run it at each wake-up, so the writer wakes less often and commits bigger groups
/// (fewer transactions and checkpoint signatures per entry). Its nice value stays 0.
fn batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy, thread_native_id,
        };
        let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        let nice0 = thread_priority::ThreadPriority::Os(thread_priority::ThreadPriorityOsValue::default());
        if let Err(e) = set_thread_priority_and_policy(thread_native_id(), nice0, policy) {
            tracing::debug!(error = ?e, "audit writer keeps the default scheduling policy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::{append_concurrently, entry, open, pubkey};
    use crate::audit::{Checkpoint, Hash, read_entries, verify_db};
    use serde_json::{Value, json};

    fn hexh(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_async_log_becomes_durable_by_its_timer() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Async, 64);
        let h = log.handle();
        // Two waves back to back: if the first wave's commit happened to sync (the writer also syncs
        // at a commit when the window has passed), the second follows within the fresh window, so
        // only the timer can make it durable.
        append_concurrently(&h, 10).await;
        append_concurrently(&h, 10).await;
        // No further appends and no shutdown. What a crash would leave is the file as written so far:
        // copy it (the log itself stays open). Polled rather than timed once, so a slow machine does
        // not fail it; without the timer it never gets there.
        let copy = dir.path().join("copy.redb");
        let mut seen = None;
        for _ in 0..40 {
            tokio::time::sleep(ASYNC_SYNC_EVERY * 2).await;
            std::fs::copy(dir.path().join("audit.redb"), &copy).unwrap();
            seen = verify_db(&copy, &[pubkey()]).ok().map(|r| r.entries);
            if seen == Some(20) {
                break;
            }
        }
        assert_eq!(seen, Some(20), "the copy never held the 20 acknowledged entries");
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_get_distinct_indexes_and_verify_then_reopen_continues() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 4096);
        let h = log.handle();
        let idx = append_concurrently(&h, 1000).await;
        // Every task was told the index of its own entry (groups are acknowledged together).
        {
            let db = log.database().get().unwrap();
            let rows = read_entries(&db, 0, 1000).unwrap();
            for (task, &i) in idx.iter().enumerate() {
                let e: Value = serde_json::from_slice(&rows[i as usize].1).unwrap();
                assert_eq!(e["n"], task.to_string(), "task {task} was told index {i}");
            }
        }
        let mut sorted = idx.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(h.tree_size(), 1000);
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        let report = verify_db(&dir.path().join("audit.redb"), &[pubkey()]).unwrap();
        assert_eq!(report.entries, 1000);
        assert!(report.checkpoints >= 1);
        // Reopen: continues at 1000, chained to 999.
        let log = open(dir.path(), Durability::Async, 16);
        assert_eq!(log.handle().append(entry(1000)).await.unwrap(), 1000);
        let db = log.database().get().unwrap();
        let rows = read_entries(&db, 999, 2).unwrap();
        let last: Value = serde_json::from_slice(&rows[1].1).unwrap();
        assert_eq!(last["prev"], hex::encode(leaf_hash(&rows[0].1)));
        assert_eq!(
            (last["v"].as_str(), last["log"].as_str(), last["idx"].as_str()),
            (Some("1"), Some("test/log"), Some("1000"))
        );
        // RFC 3339 UTC with exactly six fractional digits, now, and not before the entry it follows.
        let ts = last["ts"].as_str().unwrap();
        assert!(ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        let rfc3339 = &time::format_description::well_known::Rfc3339;
        let at = time::OffsetDateTime::parse(ts, rfc3339).unwrap();
        assert!((crate::clock::now_utc() - at).abs() < time::Duration::seconds(30), "{ts}");
        let before: Value = serde_json::from_slice(&rows[0].1).unwrap();
        assert!(time::OffsetDateTime::parse(before["ts"].as_str().unwrap(), rfc3339).unwrap() <= at);
        drop(db);
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        assert_eq!(verify_db(&dir.path().join("audit.redb"), &[pubkey()]).unwrap().entries, 1001);
    }

    #[tokio::test]
    async fn a_full_queue_fails_fast() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 1);
        let h = log.handle();
        let mut full = 0;
        for i in 0..200 {
            if matches!(h.append_nowait(entry(i)), Err(AuditError::QueueFull)) {
                full += 1;
            }
        }
        assert!(full > 0, "a queue of 1 must refuse some of 200 immediate appends");
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    }

    #[tokio::test]
    async fn long_strings_are_cut_unfit_entries_refused_and_nothing_else_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 16);
        let h = log.handle();
        // A long string is cut (its hash kept), not refused.
        let mut big = entry(0);
        big.insert("blob".into(), json!("x".repeat(20_000)));
        assert_eq!(h.append(big).await.unwrap(), 0);
        // An entry that fits by no cutting or dropping (field names are never cut) is refused.
        let mut unfit = entry(1);
        for i in 0..20 {
            unfit.insert(format!("{i:02}{}", "k".repeat(1000)), json!("v"));
        }
        assert!(matches!(h.append(unfit).await, Err(AuditError::EntryTooLarge(_))));
        assert_eq!(h.append(entry(2)).await.unwrap(), 1);
        let db = log.database().get().unwrap();
        let stored: Value = serde_json::from_slice(&read_entries(&db, 0, 1).unwrap()[0].1).unwrap();
        assert_eq!(stored["truncated"]["blob"]["len"], "20000");
        drop(db);
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_rotation_is_followed_by_verify_and_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), Durability::Sync, 64);
        for i in 0..5 {
            log.handle().append(entry(i)).await.unwrap();
        }
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        let cfg = |key_name: &str| AuditConfig {
            path: dir.path().join("audit.redb"),
            origin: "test/log".into(),
            durability: Durability::Sync,
            sign_each_entry: true,
            queue_capacity: 16,
            key_name: key_name.into(),
        };
        let (old, new) = (SigningKey::from_bytes(&[5u8; 32]), SigningKey::from_bytes(&[8u8; 32]));
        assert_eq!(rotate_key(cfg("test/log"), old.clone(), new.clone()).unwrap(), 5);
        // The old key may no longer run the log; the new one continues it.
        let refused = AuditLog::open(cfg("test/log"), old.clone()).err().unwrap().to_string();
        assert!(refused.contains("rotated"), "{refused}");
        let log = AuditLog::open(cfg("test/log"), new.clone()).unwrap();
        for i in 0..5 {
            log.handle().append(entry(i)).await.unwrap();
        }
        tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
        // Verification from the original key crosses the rotation.
        let db = dir.path().join("audit.redb");
        let r = verify_db(&db, &[old.verifying_key()]).unwrap();
        assert_eq!(r.entries, 11);
        // A later checkpoint signed by the retired key only is rejected.
        let copy = dir.path().join("forged.redb");
        std::fs::copy(&db, &copy).unwrap();
        {
            use redb::ReadableTable;
            let d = redb::Database::open(&copy).unwrap();
            let tx = d.begin_write().unwrap();
            {
                let mut t = tx.open_table(CHECKPOINTS).unwrap();
                let (size, note) = {
                    let (k, v) = t.last().unwrap().unwrap();
                    (k.value(), v.value().to_string())
                };
                let body = note.split_once("\n\n").unwrap().0;
                let cp = Checkpoint {
                    origin: "test/log".into(),
                    size,
                    root: hexh(&hex::encode(
                        base64::Engine::decode(
                            &base64::engine::general_purpose::STANDARD,
                            body.lines().nth(2).unwrap(),
                        )
                        .unwrap(),
                    )),
                };
                t.insert(size, cp.sign("test/log", &old).as_str()).unwrap();
            }
            tx.commit().unwrap();
        }
        let err = verify_db(&copy, &[old.verifying_key()]).unwrap_err();
        assert!(err.reason.contains("trusted key"), "{}", err.reason);
    }
}
