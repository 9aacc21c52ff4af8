//! The log's file: redb's own file backend, except that when redb grows the file (it doubles it)
//! the new space is written with zeros at once, up to `PREFILL_MAX` bytes.
//!
//! A sparse extension is allocated block by block at writeback, so each group commit's fdatasync
//! would also write the filesystem's allocation metadata (inode, extent blocks) synchronously:
//! about two more I/Os per commit. With the space already written, later commits overwrite
//! allocated blocks and their fdatasync flushes only the pages redb wrote. The zeros are what
//! redb expects of new space anyway ("new positions must be initialized to zero").

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest extension written with zeros in one growth; beyond it the file stays sparse.
const PREFILL_MAX: u64 = 64 << 20;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

#[derive(Debug)]
pub(crate) struct PrefilledFile {
    inner: FileBackend,
    file: File,
}

impl PrefilledFile {
    pub(crate) fn open(path: &Path) -> io::Result<PrefilledFile> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let writer = file.try_clone()?;
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(PrefilledFile { inner, file: writer })
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
        let old = self.inner.len()?;
        self.inner.set_len(len)?;
        // Only an optimisation: the extension already reads as zeros, so a failure here (a full
        // disk) leaves it sparse and is reported by the write that needs the space.
        let end = len.min(old.saturating_add(PREFILL_MAX));
        let mut at = old;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            if let Err(e) = self.file.write_all_at(&ZEROS[..n], at) {
                tracing::debug!(error = %e, "audit file stays sparse past {at}");
                break;
            }
            at += n as u64;
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
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
