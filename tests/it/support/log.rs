//! Reading a gateway's log, and tampering with a stopped gateway's log file, the one way the
//! tests do either: a running gateway's database (`Log::live`) or the file a stopped one left
//! (`Log::file`, read without changing it: a file a crash left is repaired on a copy).

use serde_json::Value;
use std::path::{Path, PathBuf};
use uapk_gateway::audit::{LogReader, Snapshot};

const ENTRIES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit_entries");
const CHECKPOINTS: redb::TableDefinition<u64, &str> = redb::TableDefinition::new("audit_checkpoints");

/// Entries read per page.
const PAGE: usize = 1000;

/// Where a log is read from.
#[derive(Clone)]
pub(crate) enum Log {
    /// The log of a running gateway (or of a state backend a test opened), read through the
    /// state seam.
    Live(LogReader),
    /// The log file of a gateway that is not running.
    File(PathBuf),
}

impl Log {
    pub(crate) fn live(log: LogReader) -> Log {
        Log::Live(log)
    }

    pub(crate) fn file(path: impl Into<PathBuf>) -> Log {
        Log::File(path.into())
    }

    /// Every committed entry as stored (its canonical bytes), with its index.
    pub(crate) fn raw_entries(&self) -> Vec<(u64, Vec<u8>)> {
        match self {
            Log::Live(log) => all_pages(|from| log.entries(from, PAGE).unwrap()),
            Log::File(path) => {
                let snapshot = Snapshot::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                all_pages(|from| snapshot.read_entries(from, PAGE).unwrap())
            }
        }
    }

    /// Every committed entry, parsed.
    pub(crate) fn entries(&self) -> Vec<Value> {
        self.raw_entries().iter().map(|(_, b)| serde_json::from_slice(b).unwrap()).collect()
    }
}

/// Every entry `page(from)` returns, page after page, until one is empty.
fn all_pages(mut page: impl FnMut(u64) -> Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let batch = page(out.last().map_or(0, |(i, _)| i + 1));
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

/// The newest signed checkpoint of the log file `db` (of a stopped gateway).
pub(crate) fn newest_checkpoint(db: &Path) -> String {
    use redb::ReadableTable;
    let snapshot = Snapshot::open(db).unwrap();
    let tx = snapshot.begin_read().unwrap();
    let t = tx.open_table(CHECKPOINTS).unwrap();
    t.last().unwrap().expect("a checkpoint").1.value().to_string()
}

/// The log's tables, opened for writing by [`tamper`].
pub(crate) struct Tables<'t> {
    entries: redb::Table<'t, u64, &'static [u8]>,
    checkpoints: redb::Table<'t, u64, &'static str>,
}

impl Tables<'_> {
    /// The entry at `idx`, as stored.
    pub(crate) fn entry(&self, idx: u64) -> Vec<u8> {
        use redb::ReadableTable;
        self.entries.get(idx).unwrap().unwrap_or_else(|| panic!("no entry {idx}")).value().to_vec()
    }

    pub(crate) fn put_entry(&mut self, idx: u64, bytes: &[u8]) {
        self.entries.insert(idx, bytes).unwrap();
    }

    pub(crate) fn remove_entry(&mut self, idx: u64) {
        self.entries.remove(idx).unwrap();
    }

    /// Every stored checkpoint: (tree size, signed note).
    pub(crate) fn checkpoints(&self) -> Vec<(u64, String)> {
        use redb::ReadableTable;
        self.checkpoints
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value(), v.value().to_string())
            })
            .collect()
    }

    pub(crate) fn put_checkpoint(&mut self, size: u64, note: &str) {
        self.checkpoints.insert(size, note).unwrap();
    }

    pub(crate) fn remove_checkpoint(&mut self, size: u64) {
        self.checkpoints.remove(size).unwrap();
    }
}

/// Changes the log file `db` of a stopped gateway as an attacker with write access would: `f`
/// edits its tables, committed as one transaction.
pub(crate) fn tamper(db: &Path, f: impl FnOnce(&mut Tables)) {
    let d = redb::Database::open(db).unwrap();
    let tx = d.begin_write().unwrap();
    {
        let mut t =
            Tables { entries: tx.open_table(ENTRIES).unwrap(), checkpoints: tx.open_table(CHECKPOINTS).unwrap() };
        f(&mut t);
    }
    tx.commit().unwrap();
}
