use super::merkle::*;
use super::*;
use ed25519_dalek::SigningKey;
use serde_json::{Map, Value, json};
use uapk_tlog::verify::verify_bundle;

fn hexh(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

// ---------------------------------------------------------------- the log itself

fn open(dir: &std::path::Path, durability: Durability, cap: usize) -> AuditLog {
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

fn entry(i: usize) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!("decision"));
    m.insert("n".into(), json!(i.to_string()));
    m
}

/// Appends entries 0..n from n concurrent tasks; the indexes, in task order.
async fn append_concurrently(h: &AuditHandle, n: usize) -> Vec<u64> {
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
async fn filled_log(durability: Durability, n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), durability, 4096);
    append_concurrently(&log.handle(), n).await;
    tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    let path = dir.path().join("audit.redb");
    (dir, path)
}

fn pubkey() -> ed25519_dalek::VerifyingKey {
    SigningKey::from_bytes(&[5u8; 32]).verifying_key()
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
        tokio::time::sleep(store::ASYNC_SYNC_EVERY * 2).await;
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

/// Proofs built from the stored node index equal the reference proofs over all leaves, and an
/// index that is missing (a log written before it existed) is rebuilt at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_from_the_node_index_match_proofs_over_all_leaves() {
    let (dir, path) = filled_log(Durability::Async, 1300).await;
    let check = |db: &redb::Database| {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = db.begin_read().unwrap();
        let leaves: Vec<Hash> = tx
            .open_table(store::ENTRIES)
            .unwrap()
            .iter()
            .unwrap()
            .map(|r| merkle::leaf_hash(r.unwrap().1.value()))
            .collect();
        let n = leaves.len() as u64;
        assert_eq!(Some(root_from_leaves(&leaves)), latest_checkpoint_root(&tx));
        assert_eq!(redb::ReadableTableMetadata::len(&tx.open_table(store::NODES).unwrap()).unwrap(), 5 + 2 + 1);
        for (index, size) in [(0, n), (255, 256), (256, 513), (700, 1024), (1023, 1025), (1299, n), (5, 300)] {
            let Proof::Inclusion { root, path, leaf, .. } = proof::inclusion(&tx, index, Some(size)).unwrap() else {
                panic!()
            };
            let part = &leaves[..size as usize];
            assert_eq!(root, root_from_leaves(part), "root at {size}");
            assert_eq!(leaf, leaves[index as usize]);
            assert_eq!(path, inclusion_proof(part, index as usize), "inclusion {index} in {size}");
        }
        for (old, new) in [(1, n), (256, 1024), (257, 1300), (1024, 1025), (600, 1299)] {
            let Proof::Consistency { old_root, new_root, path, .. } = proof::consistency(&tx, old, new).unwrap() else {
                panic!()
            };
            let part = &leaves[..new as usize];
            assert_eq!((old_root, new_root), (root_from_leaves(&part[..old as usize]), root_from_leaves(part)));
            assert_eq!(path, consistency_proof(part, old as usize), "consistency {old} -> {new}");
        }
    };
    {
        let db = redb::Database::open(&path).unwrap();
        check(&db);
        // Drop the index, as a log from before it would have none.
        let tx = db.begin_write().unwrap();
        tx.delete_table(store::NODES).unwrap();
        tx.commit().unwrap();
    }
    let log = open(dir.path(), Durability::Sync, 16);
    tokio::task::spawn_blocking(move || log.shutdown()).await.unwrap();
    let db = redb::Database::open(&path).unwrap();
    check(&db);
    // The proof really reads the index: a wrong node gives a root the checkpoint will not match.
    let tx = db.begin_write().unwrap();
    tx.open_table(store::NODES).unwrap().insert(store::node_key(10, 0), [0u8; 32].as_slice()).unwrap();
    tx.commit().unwrap();
    let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
    let Proof::Inclusion { root, .. } = proof::inclusion(&tx, 1299, Some(1300)).unwrap() else { panic!() };
    assert_ne!(Some(root), latest_checkpoint_root(&tx));
}

fn latest_checkpoint_root(tx: &redb::ReadTransaction) -> Option<Hash> {
    use redb::ReadableTable;
    let note = tx.open_table(store::CHECKPOINTS).unwrap().last().unwrap()?.1.value().to_string();
    Some(parse_checkpoint(&note, &[("test/log".to_string(), pubkey())]).unwrap().root)
}

/// Where the file's first hole (never-written space) starts.
fn first_hole(path: &std::path::Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_file_grows_into_written_space_not_holes() {
    let (_dir, path) = filled_log(Durability::Sync, 3000).await;
    let bytes = std::fs::read(&path).unwrap();
    // The file grew several times (redb leaves new space sparse); every byte redb wrote lies
    // below the first hole, so no commit's fdatasync had to allocate blocks for its pages.
    assert!(bytes.len() > 256 * 1024, "the file grew: {} bytes", bytes.len());
    let last_data = bytes.iter().rposition(|b| *b != 0).unwrap() as u64;
    let hole = first_hole(&path);
    assert!(hole > last_data, "first hole at {hole}, data up to {last_data}");
    assert_eq!(verify_db(&path, &[pubkey()]).unwrap().entries, 3000);
}

/// The file backend fills holes just ahead of the writes, and never writes zeros over data,
/// including data it did not write itself (a file written before, with holes around its data).
#[test]
fn holes_ahead_of_writes_are_filled_and_data_is_never_zeroed() {
    use redb::StorageBackend;
    const MB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    // An older file: 64 MiB, sparse except a block of data at 10 MiB and one at 30 MiB.
    {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 * MB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB; 8192], 10 * MB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xCD; 4096], 30 * MB).unwrap();
    }
    let file = super::file::PrefilledFile::open(&path).unwrap();
    // Writes below, at, and jumping past the old data.
    file.write(9 * MB, &[1; 4096]).unwrap();
    file.write(9 * MB + 4096, &[2; 4096]).unwrap();
    file.write(29 * MB + 8192, &[3; 4096]).unwrap();
    let read = |at: u64, n: usize| {
        let mut out = vec![0u8; n];
        file.read(at, &mut out).unwrap();
        out
    };
    assert_eq!(read(10 * MB, 8192), vec![0xAB; 8192], "old data kept");
    assert_eq!(read(30 * MB, 4096), vec![0xCD; 4096], "old data kept");
    assert_eq!(read(9 * MB, 4096), vec![1; 4096]);
    assert_eq!(read(9 * MB + 4096, 4096), vec![2; 4096]);
    assert_eq!(read(29 * MB + 8192, 4096), vec![3; 4096]);
    // Ahead of the last write, at least 2 MiB are allocated (or dirty, about to be): no hole.
    let f = std::fs::File::open(&path).unwrap();
    let hole_after = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(29 * MB + 8192)).unwrap();
    assert!(hole_after >= 29 * MB + 8192 + 4096 + 2 * MB, "hole at {hole_after}");
    // ...and the space between the first writes and the old data was filled too.
    assert!(rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(9 * MB)).unwrap() >= 10 * MB + 8192);
    // Far beyond, the file is still sparse: zeros go out step by step, not all at once.
    assert_eq!(rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(50 * MB)).unwrap(), 50 * MB);
    // A shrink and a regrow keep it consistent.
    file.set_len(40 * MB).unwrap();
    file.set_len(64 * MB).unwrap();
    file.write(39 * MB, &[4; 4096]).unwrap();
    assert_eq!(read(39 * MB, 4096), vec![4; 4096]);
    assert_eq!(read(30 * MB, 4096), vec![0xCD; 4096]);
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

type Tamper = dyn Fn(&mut redb::Table<u64, &[u8]>);

fn tampered(dir: &std::path::Path, f: &Tamper) -> std::path::PathBuf {
    let src = dir.join("audit.redb");
    let dst = dir.join(format!("t{}.redb", rand::random::<u32>()));
    std::fs::copy(&src, &dst).unwrap();
    let db = redb::Database::open(&dst).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut t = tx.open_table(store::ENTRIES).unwrap();
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
    let err =
        verify_db(&dir.path().join("audit.redb"), &[SigningKey::from_bytes(&[6u8; 32]).verifying_key()]).unwrap_err();
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
            let mut t = tx.open_table(redb::TableDefinition::<u64, &str>::new("audit_checkpoints")).unwrap();
            let (size, note) = {
                let (k, v) = t.last().unwrap().unwrap();
                (k.value(), v.value().to_string())
            };
            let body = note.split_once("\n\n").unwrap().0;
            let cp = Checkpoint {
                origin: "test/log".into(),
                size,
                root: hexh(&hex::encode(
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body.lines().nth(2).unwrap())
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

#[test]
fn bundle_tars_round_trip_and_malformed_ones_are_refused() {
    use super::tar::{END, TAR_FILES, extract, header, padding};
    let mut t = Vec::new();
    for (i, name) in TAR_FILES.iter().enumerate() {
        let body = vec![b'a' + i as u8; 700 * i];
        t.extend_from_slice(&header(name, body.len() as u64, 1_700_000_000).unwrap());
        t.extend_from_slice(&body);
        t.extend(std::iter::repeat_n(0u8, padding(body.len() as u64)));
    }
    t.extend_from_slice(&END);
    let dir = tempfile::tempdir().unwrap();
    let names = extract(&t, &dir.path().join("out")).unwrap();
    assert_eq!(names, TAR_FILES.to_vec());
    assert_eq!(std::fs::read(dir.path().join("out/entries.jsonl")).unwrap(), vec![b'f'; 3500]);
    // Cut short, a bad checksum, an unexpected name: refused.
    assert!(extract(&t[..t.len() - 1100], &dir.path().join("a")).is_err());
    let mut bad = t.clone();
    bad[5] ^= 1;
    assert!(extract(&bad, &dir.path().join("b")).is_err());
    let mut evil = header("checkpoint", 0, 0).unwrap().to_vec();
    evil[..10].copy_from_slice(b"../escape\0");
    assert!(extract(&[evil, END.to_vec()].concat(), &dir.path().join("c")).is_err());
    assert!(header("a/b", 1, 0).is_err());
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
