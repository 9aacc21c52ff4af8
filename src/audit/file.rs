//! The log's file: redb's own file backend, except that the space just ahead of what redb writes
//! is written with zeros before redb gets there.
//!
//! Space that has never been written (a hole: redb grows the file with `set_len`, which leaves the
//! new space sparse) is allocated block by block at writeback, so a group commit whose pages land
//! in a hole makes its fdatasync also write the filesystem's allocation metadata (inode, extent
//! blocks, a journal commit): +0.15 ms per commit on the development machine. Keeping the holes
//! just ahead of redb's writes filled means later commits overwrite allocated blocks and their
//! fdatasync flushes only the pages redb wrote. The zeros are what redb expects of new space
//! anyway ("new positions must be initialized to zero").
//!
//! Zeros only ever go into holes: before each step the file is asked where its next data is
//! (`SEEK_DATA`, which also sees pages still in the page cache), under the same lock as redb's
//! writes, so nothing redb wrote is ever overwritten.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use rustix::fs::SeekFrom;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

/// How far beyond the end of redb's latest write the file is kept free of holes...
const FILL_AHEAD: u64 = 4 << 20;
/// ...topped up when less than this is left (so zeros go out in steps of about 2 MiB).
const FILL_LOW: u64 = 2 << 20;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

#[derive(Debug)]
pub(crate) struct PrefilledFile {
    inner: FileBackend,
    file: File,
    /// Up to where the space ahead of redb's writes has been checked and its holes filled. Below
    /// it, holes can remain only where redb jumped ahead (they are then left alone).
    filled: Mutex<u64>,
}

impl PrefilledFile {
    pub(crate) fn open(path: &Path) -> io::Result<PrefilledFile> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // The log is readable by its owner only: created 0600, and tightened if an older
        // version left it group- or world-readable.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        if file.metadata()?.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        let writer = file.try_clone()?;
        let inner = FileBackend::new(file).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => io::Error::new(
                io::ErrorKind::WouldBlock,
                "the file is open in another process (a gateway, or a reader such as `uapk-gateway tail`)",
            ),
            e => io::Error::other(e),
        })?;
        Ok(PrefilledFile { inner, file: writer, filled: Mutex::new(0) })
    }

    /// Fills the holes in `[from, to)` (clipped to the file) with zeros; returns how far it got.
    /// Only an optimisation: on any error (a full disk, a filesystem without `SEEK_DATA`) it stops
    /// and the rest stays sparse.
    fn fill_holes(&self, from: u64, to: u64) -> u64 {
        let to = match self.inner.len() {
            Ok(len) => to.min(len),
            Err(_) => return from,
        };
        let mut at = from;
        while at < to {
            // The next data at or after `at`: everything before it is a hole.
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(at)) {
                Ok(d) => d.min(to),
                Err(rustix::io::Errno::NXIO) => to,
                Err(e) => {
                    tracing::debug!(error = %e, "audit file: cannot look for holes; it stays sparse");
                    return to;
                }
            };
            while at < data {
                let n = (data - at).min(ZEROS.len() as u64) as usize;
                if let Err(e) = self.file.write_all_at(&ZEROS[..n], at) {
                    tracing::debug!(error = %e, "audit file stays sparse past {at}");
                    return to;
                }
                at += n as u64;
            }
            if at >= to {
                break;
            }
            // Skip the data up to the hole after it (the end of the file counts as one).
            at = match rustix::fs::seek(&self.file, SeekFrom::Hole(at)) {
                Ok(h) => h.max(at + 1),
                Err(_) => return to,
            };
        }
        to
    }
}

impl StorageBackend for PrefilledFile {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut filled = self.filled.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.set_len(len)?;
        *filled = (*filled).min(len);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut filled = self.filled.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset.saturating_add(data.len() as u64);
        if end.saturating_add(FILL_LOW) > *filled {
            // Fill from where this write starts if it jumped past the filled space, so the write
            // itself lands in allocated blocks too.
            let from = (*filled).max(offset);
            *filled = self.fill_holes(from, end.saturating_add(FILL_AHEAD));
        }
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::{filled_log, pubkey};
    use crate::audit::{Durability, verify_db};

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
        let file = PrefilledFile::open(&path).unwrap();
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
}
