//! Fixtures for the audit module's unit tests: a log in a temporary directory and entries to
//! append to it.

use super::{AuditConfig, AuditHandle, AuditLog, Durability};
use ed25519_dalek::SigningKey;
use serde_json::{Map, Value, json};

pub(super) fn open(dir: &std::path::Path, durability: Durability, cap: usize) -> AuditLog {
    AuditLog::open(
        AuditConfig {
            path: dir.join("audit.redb"),
            origin: "test/log".into(),
            durability,
            sign_each_entry: true,
            queue_capacity: cap,
            key_name: "test/log".into(),
        },
        SigningKey::from_bytes(&[5u8; 32]),
    )
    .unwrap()
}

pub(super) fn entry(i: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!("decision"));
    m.insert("n".into(), json!(i.to_string()));
    m
}

/// Appends entries 0..n from n concurrent tasks; the indexes, in task order.
pub(super) async fn append_concurrently(h: &AuditHandle, n: usize) -> Vec<u64> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move { h.append(entry(i)).await.unwrap() })
        })
        .collect();
    let mut idx = Vec::with_capacity(n);
    for t in tasks {
        idx.push(t.await.unwrap());
    }
    idx
}

/// A closed log of `n` entries appended concurrently: its directory and file.
pub(super) async fn filled_log(durability: Durability, n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), durability, 4096);
    append_concurrently(&log.handle(), n).await;
    tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    let path = dir.path().join("audit.redb");
    (dir, path)
}

pub(super) fn pubkey() -> ed25519_dalek::VerifyingKey {
    SigningKey::from_bytes(&[5u8; 32]).verifying_key()
}
