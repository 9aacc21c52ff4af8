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
