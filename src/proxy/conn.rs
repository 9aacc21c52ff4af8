//! Connection lifetimes (SPEC §14.7 "Limits"). Every accepted connection holds a [`ConnSlot`]
//! of its listener's cap for as long as anything of it is open: the HTTP connection itself,
//! and a CONNECT tunnel or upgraded connection spliced from it (the slot travels in the
//! request's extensions to the task that keeps the tunnel). An HTTP connection that has not
//! sent its first request within `header_read_timeout`, or has had no request in flight for
//! `idle_timeout`, is closed by its [`watchdog`]; a splice with no bytes either way for
//! `tunnel_idle_timeout` ends ([`splice`]). Connections past the cap get [`OVERLOADED`], a
//! ready-made 503 that costs no parsing.

use super::ProxyBody;
use crate::policy::{At, Code, Decision};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connection cap of one or more listeners.
#[derive(Clone)]
pub(crate) struct Slots {
    sem: Arc<Semaphore>,
    cap: usize,
}

impl Slots {
    pub(crate) fn new(cap: usize) -> Slots {
        let cap = cap.max(1);
        Slots { sem: Arc::new(Semaphore::new(cap)), cap }
    }

    /// A slot for a new connection, or none when the cap is reached.
    pub(crate) fn try_take(&self) -> Option<ConnSlot> {
        self.sem.clone().try_acquire_owned().ok().map(|p| ConnSlot(Arc::new(p)))
    }

    /// Connections holding a slot now.
    pub(crate) fn in_use(&self) -> usize {
        self.cap - self.sem.available_permits()
    }
}

/// One connection's place under the cap; released when the last clone is dropped (the
/// connection and every tunnel made of it are closed).
#[derive(Clone)]
pub(crate) struct ConnSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// The deadlines of an HTTP connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnTimeouts {
    /// Until the first request arrives (`limits.header_read_timeout`).
    pub first_request: Duration,
    /// With no request in flight after that (`limits.idle_timeout`).
    pub idle: Duration,
}

impl ConnTimeouts {
    pub(crate) fn from_limits(l: &crate::config::Limits) -> ConnTimeouts {
        ConnTimeouts { first_request: l.header_read_timeout, idle: l.idle_timeout }
    }
}

/// What the watchdog of one HTTP connection knows: requests in flight and since when none is.
pub(crate) struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    idle_since: Mutex<Instant>,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        let now = crate::clock::instant();
        Arc::new(Activity {
            started: now,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since: Mutex::new(now),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection is to be closed, if nothing happens before; none while a request is
    /// in flight.
    fn deadline(&self, t: ConnTimeouts) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if self.requests.load(Ordering::SeqCst) == 0 {
            return Some(self.started + t.first_request);
        }
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        Some(since + t.idle)
    }
}

/// A request in flight: from the moment the service is called until its response body has
/// been sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = crate::clock::instant();
        }
    }
}

/// A response body that keeps its request in flight until it is sent or dropped; its size and
/// end are the inner body's, so a `Content-Length` stays a `Content-Length`.
struct InFlightBody {
    body: ProxyBody,
    _guard: InFlight,
}

impl http_body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Completes when the connection has outlived its deadline: no first request within
/// `first_request`, or no request in flight for `idle`. Requests in flight are never cut.
/// It sleeps until the deadline as it stood and looks again then (requests do not wake it: a
/// timer re-armed on every request cost a tenth of the throughput).
pub(crate) async fn watchdog(act: &Activity, t: ConnTimeouts) {
    let mut wake = act.started + t.first_request;
    loop {
        tokio::time::sleep_until(wake.into()).await;
        let now = crate::clock::instant();
        match act.deadline(t) {
            // Busy: a request ending restarts the idle clock; look again an idle period on.
            None => wake = now + t.idle,
            Some(d) if now >= d => return,
            Some(d) => wake = d,
        }
    }
}

type BoxResponse = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// Wraps a service so the connection's activity is tracked and its slot reaches every request
/// (as a [`ConnSlot`] extension) for tunnels that outlive the HTTP connection.
pub(crate) fn track<S, F>(
    svc: S,
    act: Arc<Activity>,
    slot: Option<ConnSlot>,
) -> impl Fn(Request<Incoming>) -> BoxResponse + Clone + Send + Sync + 'static
where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    move |mut req: Request<Incoming>| {
        let guard = act.begin();
        if let Some(s) = &slot {
            req.extensions_mut().insert(s.clone());
        }
        let fut = svc(req);
        Box::pin(async move {
            let resp = fut.await?;
            // The request stays in flight until its body has been sent.
            Ok(resp.map(move |body| InFlightBody { body, _guard: guard }.boxed_unsync()))
        })
    }
}

/// Serves one HTTP/1.1 or HTTP/2 connection (with upgrades) under the connection deadlines.
pub(crate) async fn serve_http<IO, S, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    svc: S,
    slot: Option<ConnSlot>,
    t: ConnTimeouts,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let act = Activity::new();
    let svc = track(svc, act.clone(), slot);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), hyper::service::service_fn(svc));
    tokio::select! {
        _ = conn => {}
        _ = watchdog(&act, t) => {}
    }
}

/// A server builder with the gateway's header limits. Deadlines are the [`watchdog`]'s: hyper's
/// own header timer would also run while a keep-alive connection waits for its next request,
/// closing it after `header_read_timeout` instead of `idle_timeout`. The first request head must
/// arrive within `header_read_timeout`, a later one within `idle_timeout` of the last response.
pub(crate) fn builder(l: &crate::config::Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(l.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX));
    b
}

/// The answer to a connection past the cap: a complete HTTP/1.1 503 with the §7 body and
/// reason `too_many_connections`, written without reading the request.
/// `cap_key` names the configuration key of the cap that was reached.
pub(crate) fn overloaded_response(cap_key: &str) -> Vec<u8> {
    let d = Decision::deny(Code::TooManyConnections, format!("the gateway is at {cap_key}; retry shortly"));
    let body = serde_json::json!({
        "decision": d.verdict.as_str(),
        "reasons": d.reasons,
        "record": null,
        "agent": null,
        "error": {
            "type": format!("uapk_{}", d.verdict.as_str()),
            "code": d.code(),
            "message": super::respond::refusal_message(&d, None),
        },
    })
    .to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\nx-uapk-decision: deny\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        OVERLOADED.as_str(),
        OVERLOADED.canonical_reason().unwrap_or_default(),
        body.len()
    )
    .into_bytes()
}

/// The status of [`overloaded_response`].
pub(crate) const OVERLOADED: StatusCode = Code::TooManyConnections.status(At::Request);

/// How a splice ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spliced {
    /// Bytes read from the first side (and written to the second).
    pub a_to_b: u64,
    /// Bytes read from the second side.
    pub b_to_a: u64,
    /// Why it ended, when not by both sides closing.
    pub error: Option<&'static str>,
}

/// Copies both ways until both sides close, either fails, or no byte has moved either way for
/// `idle` (then both are dropped by the caller).
pub(crate) async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let base = crate::clock::instant();
    let last = AtomicU64::new(0);
    let (na, nb) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut ta = Touch { inner: a, base, last: &last, count: &na };
    let mut tb = Touch { inner: b, base, last: &last, count: &nb };
    let copy = tokio::io::copy_bidirectional(&mut ta, &mut tb);
    let idle_watch = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = base + since + idle;
            if crate::clock::instant() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    let error = tokio::select! {
        r = copy => r.err().map(|_| "the tunnel ended with an error"),
        _ = idle_watch => Some("closed after limits.tunnel_idle_timeout without traffic"),
    };
    Spliced { a_to_b: na.load(Ordering::Relaxed), b_to_a: nb.load(Ordering::Relaxed), error }
}

/// Notes the time of every read that moved bytes, and counts them.
struct Touch<'a, T: ?Sized> {
    inner: &'a mut T,
    base: Instant,
    last: &'a AtomicU64,
    count: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Touch<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            self.count.fetch_add(n, Ordering::Relaxed);
            let ms = u64::try_from(crate::clock::since(self.base).as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Touch<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_splice_without_traffic_ends_after_the_idle_timeout_and_counts_bytes() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
        let started = crate::clock::instant();
        let task = tokio::spawn(async move { splice(&mut a, &mut b, Duration::from_millis(300)).await });
        a_peer.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let r = task.await.unwrap();
        let took = crate::clock::since(started);
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
        assert_eq!((r.a_to_b, r.b_to_a), (5, 0));
        assert!(r.error.is_some_and(|e| e.contains("tunnel_idle_timeout")));
    }

    #[tokio::test]
    async fn traffic_keeps_a_splice_open() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut a, &mut b, Duration::from_millis(300)).await });
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            a_peer.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            b_peer.read_exact(&mut one).await.unwrap();
        }
        assert!(!task.is_finished(), "900 ms of steady traffic must keep a 300 ms idle splice open");
        drop(a_peer);
        drop(b_peer);
        let r = task.await.unwrap();
        assert_eq!(r.a_to_b, 6);
    }

    #[tokio::test]
    async fn the_watchdog_waits_for_requests_in_flight() {
        let act = Activity::new();
        let t = ConnTimeouts { first_request: Duration::from_millis(200), idle: Duration::from_millis(200) };
        let guard = act.begin();
        let a2 = act.clone();
        let w = tokio::spawn(async move { watchdog(&a2, t).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!w.is_finished(), "a request in flight is never cut");
        let idle_from = crate::clock::instant();
        drop(guard);
        w.await.unwrap();
        let waited = crate::clock::since(idle_from);
        assert!(waited >= Duration::from_millis(190) && waited < Duration::from_secs(1), "{waited:?}");
    }

    #[test]
    fn slots_are_released_when_the_last_holder_lets_go() {
        let slots = Slots::new(1);
        let s = slots.try_take().expect("one slot");
        assert!(slots.try_take().is_none());
        let tunnel = s.clone();
        drop(s);
        assert!(slots.try_take().is_none(), "the tunnel still holds the slot");
        drop(tunnel);
        assert_eq!(slots.in_use(), 0);
        assert!(slots.try_take().is_some());
    }
}
