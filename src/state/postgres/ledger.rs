//! The fleet log (SPEC §15.2): every gateway with the same `audit.origin` appends to one log in
//! the database — one chain, dense indexes, each group of entries committed in one transaction
//! with the signed checkpoint of the tree it makes and the state changes its entries' preconditions
//! name (an override consumed, a budget reservation kept). Appends serialize on the log's row
//! in `uapk_logs` (`SELECT … FOR UPDATE`), which holds the tree's frontier, so any gateway can
//! continue the tree without reading it. An append resolves only after the commit (synchronous
//! commit): the request is forwarded after its `decision` entry is durable in the database.
//!
//! Readers (records, proofs, export, the record stream) use a read copy of the log in the
//! `crate::audit` file format, filled from the database by a follower and verified at start
//! against the stored checkpoint exactly like a gateway's own file.

use super::budgets::keep_in;
use super::{CallError, Db, DbError};
use crate::audit::store::{
    Msg, Precondition, Shared, SharedDb, copy_append, entry_bytes, gather, log_json, open_copy, recover,
};
use crate::audit::{AuditConfig, AuditError, AuditHandle, Checkpoint, Frontier, Hash, leaf_hash};
use ed25519_dalek::{Signer, SigningKey};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const MAX_BATCH: usize = 1024;
/// How often the follower copies new entries (of every gateway, this one's too) into the read
/// copy: readers see an entry at most this long after its commit. Not on the request path.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);
const FOLLOW_CHUNK: i64 = 4096;

/// The fleet log of this gateway: its writer and follower tasks and its read copy.
pub struct FleetLog {
    handle: AuditHandle,
    copy: SharedDb,
    writer: Option<tokio::task::JoinHandle<()>>,
    follower: tokio::task::JoinHandle<()>,
    copy_path: std::path::PathBuf,
}

impl FleetLog {
    /// Opens the log of `cfg.origin` (creating it), refusing to start when `key` is not the
    /// log's active key or when the stored entries do not hash to the stored checkpoint; starts
    /// the writer and the follower. `gateway` is written into every entry (`gateway`).
    pub async fn open(db: Db, cfg: AuditConfig, key: SigningKey, gateway: &str) -> Result<FleetLog, DbError> {
        let origin = cfg.origin.clone();
        let our_key = hex::encode(key.verifying_key().as_bytes());
        let zero: Vec<u8> = vec![0u8; 32];
        let empty = Frontier::new().to_bytes();
        let (o, k) = (origin.clone(), our_key.clone());
        let active: String = db
            .call("open", |c| async move {
                c.execute(
                    "INSERT INTO uapk_logs (origin, size, prev, frontier, last_ts_us, active_key)
                     VALUES ($1, 0, $2, $3, 0, $4) ON CONFLICT (origin) DO NOTHING",
                    &[&o, &zero, &empty, &k],
                )
                .await?;
                Ok(c.query_one("SELECT active_key FROM uapk_logs WHERE origin = $1", &[&o]).await?.get(0))
            })
            .await?;
        if active != our_key {
            return Err(format!("keys.gateway is not the active key of log {origin}"));
        }
        // Beside where the embedded log would be (`data_dir`, writable in the chart's pods whose
        // root file system is read-only); rebuilt at every start.
        let dir = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let copy_path = dir.join("fleet-log-copy.redb");
        let _ = std::fs::remove_file(&copy_path);
        let copy = open_copy(&copy_path).map_err(|e| e.to_string())?;
        let size = fill_copy(&db, &origin, &copy, 0, 0, None).await?;
        let (state, latest) =
            recover(&copy, &cfg, &key).map_err(|e| format!("the log {origin} in PostgreSQL does not verify: {e}"))?;
        if state.size != size {
            return Err(format!(
                "the log {origin} in PostgreSQL does not verify: the read copy holds {} of {size} entries",
                state.size
            ));
        }
        let shared = Arc::new(Shared::default());
        shared.set_size(size);
        *shared.checkpoint.write().unwrap_or_else(|e| e.into_inner()) = latest.clone();
        let copy = SharedDb::new(copy);
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let writer = Writer {
            db: db.clone(),
            log_json: log_json(&origin),
            gateway: {
                let mut g = Vec::new();
                crate::audit::canonical::write_str(gateway, &mut g);
                g
            },
            our_key,
            cfg,
            key,
            shared: shared.clone(),
        };
        let follower = Follower {
            db,
            our_key: hex::encode(writer.key.verifying_key().as_bytes()),
            failing: false,
            origin,
            copy: copy.clone(),
            shared: shared.clone(),
            last_checkpoint: latest
                .as_deref()
                .and_then(|n| crate::audit::parse_unverified(n).ok())
                .map_or(0, |c| c.size),
        };
        Ok(FleetLog {
            handle: AuditHandle::from_parts(tx, shared),
            copy,
            writer: Some(tokio::spawn(writer.run(rx))),
            follower: tokio::spawn(follower.run()),
            copy_path,
        })
    }

    pub(crate) fn handle(&self) -> AuditHandle {
        self.handle.clone()
    }

    /// The read copy (records, proofs, export).
    pub(crate) fn database(&self) -> SharedDb {
        self.copy.clone()
    }

    /// Commits everything queued, then stops the tasks and removes the read copy.
    pub(crate) async fn shutdown(mut self) {
        let _ = self.handle.sender().send(Msg::Stop).await;
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
        self.follower.abort();
        let _ = std::fs::remove_file(&self.copy_path);
    }
}

/// Copies entries `[from, …)` (up to `max` entries when given, else to the end of a consistent
/// snapshot) and the checkpoints past `last_checkpoint` they cover into `copy`; returns the size
/// of the copy.
async fn fill_copy(
    db: &Db,
    origin: &str,
    copy: &redb::Database,
    from: u64,
    last_checkpoint: u64,
    max: Option<i64>,
) -> Result<u64, DbError> {
    let mut at = from as i64;
    let mut cp_after = last_checkpoint as i64;
    loop {
        let o = origin.to_string();
        let chunk = max.unwrap_or(FOLLOW_CHUNK).min(FOLLOW_CHUNK);
        let (rows, cps) = db
            .call("read", |mut c| async move {
                let tx = c
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let rows = tx
                    .query(
                        "SELECT idx, body, sig FROM uapk_entries WHERE origin = $1 AND idx >= $2 ORDER BY idx LIMIT $3",
                        &[&o, &at, &chunk],
                    )
                    .await?;
                let end = rows.last().map_or(at, |r| r.get::<_, i64>(0) + 1);
                let cps = tx
                    .query(
                        "SELECT size, note FROM uapk_checkpoints WHERE origin = $1 AND size > $2 AND size <= $3 ORDER BY size",
                        &[&o, &cp_after, &end],
                    )
                    .await?;
                tx.commit().await?;
                Ok((rows, cps))
            })
            .await?;
        if rows.is_empty() {
            return Ok(at as u64);
        }
        let mut entries = Vec::with_capacity(rows.len());
        for r in &rows {
            let idx: i64 = r.get(0);
            if idx != at {
                return Err(format!("the log {origin} in PostgreSQL is missing entry {at}"));
            }
            entries.push((idx as u64, r.get::<_, Vec<u8>>(1), r.get::<_, Option<Vec<u8>>>(2)));
            at += 1;
        }
        let cps: Vec<(u64, String)> = cps.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, String>(1))).collect();
        copy_append(copy, &entries, &cps).map_err(|e| e.to_string())?;
        cp_after = at;
        if max.is_some() {
            return Ok(at as u64);
        }
    }
}

/// Copies the whole log of `origin` into a new file at `path` in the gateway's own format (a
/// consistent snapshot, so `verify`, `export` and `proof` read it like a gateway's file).
pub async fn snapshot_copy(db: &Db, origin: &str, path: &std::path::Path) -> Result<u64, DbError> {
    let copy = open_copy(path).map_err(|e| e.to_string())?;
    let o = origin.to_string();
    let exists = db
        .call("read", |c| async move {
            Ok(c.query_opt("SELECT 1 FROM uapk_logs WHERE origin = $1", &[&o]).await?.is_some())
        })
        .await?;
    if !exists {
        return Err(format!("the database holds no log {origin} (audit.origin)"));
    }
    fill_copy(db, origin, &copy, 0, 0, None).await
}

struct Follower {
    db: Db,
    origin: String,
    /// This gateway's key (hex): a failed writer is writable again once the database answers
    /// and this is still the log's active key.
    our_key: String,
    /// The last attempt failed (its warning is logged once).
    failing: bool,
    copy: SharedDb,
    shared: Arc<Shared>,
    last_checkpoint: u64,
}

impl Follower {
    async fn run(mut self) {
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            if self.shared.failed.load(Ordering::SeqCst) {
                // Readiness comes back without waiting for an append (none comes while the
                // gateway is out of its Service): the database answers and the key is active.
                let o = self.origin.clone();
                let active = self
                    .db
                    .call("ping", |c| async move {
                        Ok(c.query_opt("SELECT active_key FROM uapk_logs WHERE origin = $1", &[&o])
                            .await?
                            .map(|r| r.get::<_, String>(0)))
                    })
                    .await;
                if matches!(active, Ok(Some(k)) if k == self.our_key) {
                    self.shared.failed.store(false, Ordering::SeqCst);
                }
            }
            loop {
                let size = self.shared.size.load(Ordering::SeqCst);
                let Ok(copy) = self.copy.get() else { break };
                match fill_copy(&self.db, &self.origin, &copy, size, self.last_checkpoint, Some(FOLLOW_CHUNK)).await {
                    Ok(n) if n > size => {
                        if let Ok(Some(note)) = latest_checkpoint(&copy) {
                            if let Ok(cp) = crate::audit::parse_unverified(&note) {
                                self.last_checkpoint = cp.size;
                            }
                            *self.shared.checkpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(note);
                        }
                        self.shared.set_size(n);
                    }
                    Ok(_) => {
                        if std::mem::take(&mut self.failing) {
                            tracing::info!("following the fleet log again");
                        }
                        break;
                    }
                    Err(e) => {
                        // Once per outage, not five times a second.
                        if !self.failing {
                            tracing::warn!(error = %e, "following the fleet log failed; retrying every 200 ms");
                        }
                        self.failing = true;
                        break;
                    }
                }
            }
        }
    }
}

fn latest_checkpoint(db: &redb::Database) -> Result<Option<String>, AuditError> {
    use redb::{ReadableDatabase, ReadableTable};
    let tx = db.begin_read().map_err(crate::audit::storage)?;
    let t = tx.open_table(crate::audit::store::CHECKPOINTS).map_err(crate::audit::storage)?;
    Ok(t.last().map_err(crate::audit::storage)?.map(|(_, v)| v.value().to_string()))
}

type Reply = Option<oneshot::Sender<Result<u64, AuditError>>>;

struct Writer {
    db: Db,
    cfg: AuditConfig,
    key: SigningKey,
    our_key: String,
    log_json: Vec<u8>,
    gateway: Vec<u8>,
    shared: Arc<Shared>,
}

/// What one group commit did for each of its entries.
enum Appended {
    At(u64),
    Refused(String),
    /// Too large even after its fields were cut (as the embedded writer says it).
    TooLarge(usize),
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            let first = rx.recv().await;
            let (batch, stop) = gather(first, &mut rx, MAX_BATCH);
            if !batch.is_empty() {
                self.commit(batch).await;
            }
            if stop {
                rx.close();
                let mut rest = Vec::new();
                while let Ok(Msg::Append(f, r, g)) = rx.try_recv() {
                    rest.push((f, r, g));
                }
                if !rest.is_empty() {
                    self.commit(rest).await;
                }
                return;
            }
        }
    }

    fn job(&self) -> Job {
        Job {
            origin: self.cfg.origin.clone(),
            our_key: self.our_key.clone(),
            log_json: self.log_json.clone(),
            gateway: self.gateway.clone(),
            key: self.key.clone(),
            key_name: self.cfg.key_name.clone(),
            sign_each: self.cfg.sign_each_entry,
            rotate_to: None,
        }
    }

    async fn commit(&self, batch: Vec<(crate::audit::Fields, Reply, Option<Precondition>)>) {
        let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|(f, r, g)| ((f, g), r)).unzip();
        let job = self.job();
        let result = self.db.call("append", move |mut c| async move { append_in(&mut c, &job, &items).await }).await;
        let failure = match result {
            Ok(Ok((out, note))) => {
                self.shared.failed.store(false, Ordering::SeqCst);
                let mut appended = 0u64;
                for (r, reply) in out.into_iter().zip(replies) {
                    let v = match r {
                        Appended::At(i) => {
                            appended += 1;
                            Ok(i)
                        }
                        Appended::Refused(why) => Err(AuditError::Refused(why)),
                        Appended::TooLarge(n) => Err(AuditError::EntryTooLarge(n)),
                    };
                    match reply {
                        Some(tx) => {
                            let _ = tx.send(v);
                        }
                        None => {
                            if let Err(e) = v {
                                tracing::error!(error = %e, "queued audit entry dropped");
                            }
                        }
                    }
                }
                if note.is_some() {
                    self.shared.entries_total.fetch_add(appended, Ordering::Relaxed);
                    self.shared.commits_total.fetch_add(1, Ordering::Relaxed);
                    self.shared.last_batch.store(appended, Ordering::Relaxed);
                }
                return;
            }
            Ok(Err(why)) => why,
            Err(e) => e,
        };
        tracing::error!(error = %failure, entries = replies.len(), "fleet log commit failed; nothing was forwarded");
        self.shared.failed.store(true, Ordering::SeqCst);
        for reply in replies {
            match reply {
                Some(tx) => {
                    let _ = tx.send(Err(AuditError::Commit(failure.clone())));
                }
                None => tracing::error!("queued audit entry dropped: the fleet log cannot commit"),
            }
        }
    }
}

/// What one append transaction needs besides its entries.
struct Job {
    origin: String,
    /// The key this gateway signs with (hex): must be the log's active key.
    our_key: String,
    log_json: Vec<u8>,
    gateway: Vec<u8>,
    key: SigningKey,
    key_name: String,
    sign_each: bool,
    /// A key rotation: the new key co-signs the checkpoint and becomes the active key.
    rotate_to: Option<SigningKey>,
}

/// One group commit: under the log's row lock, each entry's precondition (in a savepoint), the
/// entries continuing the chain and the tree, their signed checkpoint, the new head; all in one
/// transaction. `Ok(Err(why))` refuses the whole group (this gateway's key is not the log's).
async fn append_in(
    c: &mut deadpool_postgres::Object,
    job: &Job,
    work: &[(crate::audit::Fields, Option<Precondition>)],
) -> Result<Result<(Vec<Appended>, Option<String>), String>, CallError> {
    let origin = &job.origin;
    let mut tx = c.transaction().await?;
    // Prepared once per connection (the pool keeps them): one round trip per statement.
    let head = tx.prepare_cached(
        "SELECT size, prev, frontier, last_ts_us, active_key FROM uapk_logs WHERE origin = $1 FOR UPDATE",
    );
    let head = tx.query_one(&head.await?, &[origin]).await?;
    let active: String = head.get(4);
    if active != job.our_key {
        return Ok(Err(format!(
            "keys.gateway is not the active key of log {origin} (it was rotated): restart this gateway with the new key"
        )));
    }
    let mut size = head.get::<_, i64>(0) as u64;
    let mut prev: Hash = head.get::<_, Vec<u8>>(1).try_into().unwrap_or([0u8; 32]);
    let Some(mut frontier) = Frontier::from_bytes(&head.get::<_, Vec<u8>>(2)) else {
        return Ok(Err(format!("the log {origin} in PostgreSQL has an unreadable frontier")));
    };
    let last_us: i64 = head.get(3);
    let last = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(last_us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let now = crate::clock::now_utc().max(last);
    let mut out = Vec::with_capacity(work.len());
    let (mut idxs, mut bodies, mut sigs) = (Vec::new(), Vec::new(), Vec::new());
    for (fields, guard) in work {
        if let Some(g) = guard {
            // Only an approval can refuse; keeping a reservation cannot (an error fails the
            // whole group), so it needs no savepoint of its own.
            if g.consume_approval.is_some() {
                let sp = tx.savepoint("pre").await?;
                match check(&sp, origin, g).await? {
                    Ok(()) => sp.commit().await?,
                    Err(why) => {
                        sp.rollback().await?;
                        out.push(Appended::Refused(why));
                        continue;
                    }
                }
            } else if let Err(why) = check(&tx, origin, g).await? {
                out.push(Appended::Refused(why));
                continue;
            }
        }
        let bytes = entry_bytes(fields, size, &prev, now, &job.log_json, Some(&job.gateway));
        if bytes.len() > crate::audit::MAX_ENTRY_BYTES {
            out.push(Appended::TooLarge(bytes.len()));
            continue;
        }
        let leaf = leaf_hash(&bytes);
        frontier.push(leaf);
        prev = leaf;
        out.push(Appended::At(size));
        idxs.push(size as i64);
        sigs.push(job.sign_each.then(|| job.key.sign(&bytes).to_bytes().to_vec()));
        bodies.push(bytes);
        size += 1;
    }
    if idxs.is_empty() {
        tx.rollback().await?;
        return Ok(Ok((out, None)));
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO uapk_entries (origin, idx, body, sig)
             SELECT $1, i, b, s FROM unnest($2::bigint[], $3::bytea[], $4::bytea[]) AS t(i, b, s)",
        )
        .await?;
    tx.execute(&insert, &[origin, &idxs, &bodies, &sigs]).await?;
    let cp = Checkpoint { origin: origin.clone(), size, root: frontier.root() };
    let mut note = cp.sign(&job.key_name, &job.key);
    if let Some(new) = &job.rotate_to {
        note = crate::audit::note::cosign(&note, &job.key_name, new);
    }
    let insert = tx.prepare_cached("INSERT INTO uapk_checkpoints (origin, size, note) VALUES ($1, $2, $3)").await?;
    tx.execute(&insert, &[origin, &(size as i64), &note]).await?;
    let now_us = (now.unix_timestamp_nanos() / 1000) as i64;
    let active = match &job.rotate_to {
        Some(new) => hex::encode(new.verifying_key().as_bytes()),
        None => active,
    };
    let update = tx
        .prepare_cached(
            "UPDATE uapk_logs SET size = $2, prev = $3, frontier = $4, last_ts_us = $5, active_key = $6 WHERE origin = $1",
        )
        .await?;
    tx.execute(&update, &[origin, &(size as i64), &prev.to_vec(), &frontier.to_bytes(), &now_us, &active]).await?;
    tx.commit().await?;
    Ok(Ok((out, Some(note))))
}

/// Rotates the fleet log's key (SPEC §15.2): appends the `key` entry announcing `new` (signed
/// by `old`) with a checkpoint both sign, and makes `new` the active key in the same commit.
/// Gateways still holding `old` fail closed on their next append until restarted with `new`.
pub async fn rotate(
    db: &Db,
    cfg: &AuditConfig,
    old: &SigningKey,
    new: &SigningKey,
    gateway: &str,
) -> Result<u64, DbError> {
    let fields =
        crate::audit::Fields::from_map(crate::audit::store::rotation_fields(&cfg.origin, &cfg.key_name, old, new))
            .map_err(|e| e.to_string())?;
    let mut g = Vec::new();
    crate::audit::canonical::write_str(gateway, &mut g);
    let job = Job {
        origin: cfg.origin.clone(),
        our_key: hex::encode(old.verifying_key().as_bytes()),
        log_json: log_json(&cfg.origin),
        gateway: g,
        key: old.clone(),
        key_name: cfg.key_name.clone(),
        sign_each: cfg.sign_each_entry,
        rotate_to: Some(new.clone()),
    };
    let items = vec![(fields, None)];
    match db.call("rotate", move |mut c| async move { append_in(&mut c, &job, &items).await }).await? {
        Ok((out, _)) => match out.into_iter().next() {
            Some(Appended::At(i)) => Ok(i),
            Some(Appended::Refused(why)) => Err(why),
            Some(Appended::TooLarge(n)) => Err(format!("the key entry of {n} bytes is too large")),
            None => Err("nothing appended".into()),
        },
        Err(why) => Err(why),
    }
}

/// Checks an entry's precondition inside its transaction (under a savepoint the caller rolls
/// back on `Err`).
async fn check(
    tx: &deadpool_postgres::Transaction<'_>,
    origin: &str,
    p: &Precondition,
) -> Result<Result<(), String>, CallError> {
    if let Some((id, now)) = &p.consume_approval {
        match super::approvals::consume_in(tx, origin, id, *now).await? {
            Ok(()) => {}
            Err(why) => return Ok(Err(why)),
        }
    }
    if let Some((request_id, counted)) = &p.keep_budget {
        keep_in(tx, origin, request_id, *counted).await?;
    }
    Ok(Ok(()))
}
