//! `GET /v1/records/stream?from=N`: the log as NDJSON for SIEM shippers (SPEC §17) — every
//! stored entry from index `from` on, one per line, byte for byte as stored (its canonical JSON,
//! which is what its leaf hash covers), then new entries as they commit.
//!
//! Each subscriber holds only a receiver of the committed tree size (`AuditHandle::committed`)
//! and reads the entries from the database itself, a bounded chunk at a time and only when the
//! connection has taken the previous chunk: the writer never waits for a reader, a slow reader
//! costs one chunk of memory, and a quiet log costs nothing (the task sleeps until a commit).
//! Every entry carries its `idx`: a client that reconnects with `from` = last index + 1 gets the
//! rest of the log with nothing lost and nothing repeated, across gateway restarts too.

use crate::app::App;
use crate::response::{BoxError, ProxyBody};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::sync::Arc;

/// Entries read per chunk: at most 64 × 16 KiB = 1 MiB held per subscriber.
const CHUNK: usize = 64;

/// Where a subscriber is.
struct Cursor {
    gw: Arc<App>,
    next: u64,
    follow: bool,
    committed: tokio::sync::watch::Receiver<u64>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// Why a stream cannot start.
pub(super) enum Refused {
    /// `from` lies past the end of the log (a restored or different log: never wait silently).
    PastEnd { from: u64, size: u64 },
}

/// The streaming response: entries `[from, …)`; with `follow` it stays open for new entries
/// until the client leaves or the gateway stops, else it ends at the current end of the log.
pub(super) fn response(gw: Arc<App>, from: u64, follow: bool) -> Result<Response<ProxyBody>, Refused> {
    // Subscribed before the size is read: no commit can fall between the two.
    let committed = gw.audit().committed();
    let size = gw.audit().tree_size();
    if from > size {
        return Err(Refused::PastEnd { from, size });
    }
    let stopping = gw.stopping();
    let cursor = Cursor { gw, next: from, follow, committed, stopping };
    let stream = futures_util::stream::unfold(Some(cursor), |state| async move {
        let mut c = state?;
        match c.next_chunk().await {
            Some(Ok(bytes)) => Some((Ok(Frame::data(bytes)), Some(c))),
            // The body ends with an error: the client sees a cut-off stream, never a clean end
            // that could be taken for "nothing more".
            Some(Err(e)) => Some((Err(e), None)),
            None => None,
        }
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    // Reverse proxies (nginx) must pass lines on as they come.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("x-uapk-tree-size", HeaderValue::from(size));
    *r.status_mut() = StatusCode::OK;
    Ok(r)
}

impl Cursor {
    /// The next lines to send; `None` at the end (caught up without `follow`, the client's
    /// connection gone, or the gateway stopping).
    async fn next_chunk(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            if *self.stopping.borrow() {
                return None;
            }
            let size = *self.committed.borrow_and_update();
            if self.next < size {
                return Some(self.read(size).await);
            }
            if !self.follow {
                return None;
            }
            tokio::select! {
                changed = self.committed.changed() => if changed.is_err() { return None },
                _ = self.stopping.wait_for(|s| *s) => return None,
            }
        }
    }

    /// Entries `[next, min(size, next + CHUNK))`, each followed by a newline.
    async fn read(&mut self, size: u64) -> Result<Bytes, BoxError> {
        let log = self.gw.log().clone();
        let (from, want) = (self.next, (size - self.next).min(CHUNK as u64) as usize);
        let rows = tokio::task::spawn_blocking(move || log.entries(from, want))
            .await
            .map_err(|e| -> BoxError { e.to_string().into() })?
            .map_err(|e| -> BoxError {
                tracing::error!(error = %e, "record stream: reading the log failed");
                e.to_string().into()
            })?;
        let mut out = Vec::with_capacity(rows.iter().map(|(_, b)| b.len() + 1).sum());
        let mut expect = from;
        for (idx, bytes) in rows.into_iter().take(want) {
            // The log is dense; a gap would be a lost entry, never something to skip.
            if idx != expect {
                return Err(format!("entry {expect} is missing from the log").into());
            }
            out.extend_from_slice(&bytes);
            out.push(b'\n');
            expect += 1;
        }
        if expect == from {
            return Err(format!("entry {from} is missing from the log").into());
        }
        self.next = expect;
        Ok(Bytes::from(out))
    }
}
