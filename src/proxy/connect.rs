//! HTTPS egress: `CONNECT host:port` on the proxy listener. The tunnel is itself a decision
//! (identity, and a connector that names the host and port) taken before the tunnel opens and
//! before any DNS lookup. `intercept` connectors are decrypted with a leaf minted for the exact
//! host and every request inside runs the full policy; `passthrough` connectors are spliced
//! byte for byte and recorded as one tunnel.

use super::classify::{admit, connector_for};
use super::conn::{self, ConnSlot, ConnTimeouts};
use super::identify::{identify, proxy_auth_token};
use super::{App, Arrival, DenyBody, Facts, ProxyBody, Stop, full_body, handle, refuse, split_authority, tls};
use crate::clock::now_unix;
use crate::config::{Connector, TlsMode};
use crate::policy::{At, Code, Decision};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Map, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// What every request inside one intercepted tunnel shares.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub host: String,
    pub port: u16,
    /// The token presented on CONNECT (username, token), reused for each request inside.
    pub token: Option<(Option<String>, String)>,
    pub agent: Option<String>,
}

/// Decides whether a tunnel to `host:port` may open (identity, a connector naming the host and
/// port, connector policy; for passthrough also the SSRF guard) and records the decision.
/// On refusal returns the response to send (meaningful on CONNECT; a transparent connection is
/// closed).
pub(super) async fn authorize_tunnel(
    gw: &Arc<App>,
    facts: &mut Facts,
    headers: &http::HeaderMap,
    presented: Option<(Option<String>, String)>,
) -> Result<(Arc<Connector>, u64), Response<ProxyBody>> {
    match decide_tunnel(gw, facts, headers, presented).await {
        Ok(ok) => Ok(ok),
        Err(stop) => Err(gw.answer(facts, stop).await),
    }
}

/// The tunnel's decision, a stage like any other: a refusal is a [`Stop`]. Identity failures
/// are answered as on the explicit proxy (407), so clients offer credentials on CONNECT.
async fn decide_tunnel(
    gw: &Arc<App>,
    facts: &mut Facts,
    headers: &http::HeaderMap,
    presented: Option<(Option<String>, String)>,
) -> Result<(Arc<Connector>, u64), Stop> {
    let (host, port) = (facts.line.host.clone(), facts.line.port);
    let policies = gw.policies().load_full();
    let who = identify(gw, &policies, headers, facts, presented).map_err(|d| Stop::refuse_at(d, At::ProxyAuth))?;
    // Host and port must belong to a connector (the classification every request goes
    // through): checked on names only, before any DNS lookup.
    let connector = connector_for(&who.manifest, None, "", facts).map_err(Stop::refuse)?;
    facts.action.connector = Some(connector.name.clone());
    facts.action.name = Some(match connector.tls {
        TlsMode::Intercept => "tunnel.intercept".into(),
        TlsMode::Passthrough => "tunnel.passthrough".into(),
    });
    admit(&who, &connector, facts).map_err(Stop::refuse)?;
    if connector.tls == TlsMode::Intercept && gw.leaves().is_none() {
        let d = Decision::deny(Code::InterceptionUnavailable, "no interception CA is configured (tls.ca_cert)");
        return Err(Stop::refuse(d));
    }
    if connector.tls == TlsMode::Passthrough
        && let Some(d) = gw.vetter().vet(&host, port).await.refusal()
    {
        return Err(Stop::refuse(d));
    }
    // A tunnel authorisation reserves no budget and its entry (no route) is not counted when
    // budgets are rebuilt: `limits::counts_toward_budgets` is the one rule for both. The
    // requests inside an intercepted tunnel are decided and counted one by one.
    let decision = Decision::allow();
    let record = gw.record(facts, &decision, None).await.map_err(Stop::respond)?;
    gw.finish_metrics(facts, &decision, StatusCode::OK, Some(record));
    Ok((connector, record))
}

/// Handles a CONNECT request on the proxy listener.
pub(crate) async fn open(gw: &Arc<App>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let mut facts = Facts::new(req.method(), req.uri(), Arrival::Explicit);
    let target = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let Some((host, Some(port))) = split_authority(&target) else {
        let d = Decision::deny(Code::MalformedRequest, "CONNECT needs an authority-form target host:port");
        return refuse(At::Request, &facts, &d, None, DenyBody::default());
    };
    facts.line.tunnel(host.clone(), port);
    let presented = proxy_auth_token(req.headers());
    let (connector, record) = match authorize_tunnel(gw, &mut facts, req.headers(), presented.clone()).await {
        Ok(ok) => ok,
        Err(resp) => return resp,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The tunnel keeps the connection's place under limits.max_connections until it closes.
    let slot = req.extensions().get::<ConnSlot>().cloned();
    let gw2 = gw.clone();
    let tunnel = Arc::new(Tunnel { host, port, token: presented, agent: facts.caller.agent.clone() });
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        match connector.tls {
            TlsMode::Intercept => intercept(gw2, upgraded, tunnel, slot).await,
            TlsMode::Passthrough => {
                passthrough(gw2, upgraded, &tunnel, &connector, &facts, record).await;
                drop(slot);
            }
        }
    });
    let mut resp = Response::new(full_body(bytes::Bytes::new()));
    resp.headers_mut().insert("x-uapk-record", http::HeaderValue::from(record));
    resp
}

/// Terminates TLS with a leaf for the tunnel's host and serves HTTP/1.1 or HTTP/2 (ALPN),
/// every request going through the full data path. The ClientHello must arrive within
/// `limits.header_read_timeout` and the rest of the handshake within
/// `limits.tls_handshake_timeout`; the HTTP connection inside has the listeners' deadlines.
///
/// Boxed with an explicit `Send` bound: the data path can open tunnels whose requests go
/// through the data path again, and the named type breaks that cycle for the compiler.
pub(crate) fn intercept<IO>(
    gw: Arc<App>,
    io: IO,
    tunnel: Arc<Tunnel>,
    slot: Option<ConnSlot>,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(intercept_inner(gw, io, tunnel, slot))
}

async fn intercept_inner<IO>(gw: Arc<App>, io: IO, tunnel: Arc<Tunnel>, slot: Option<ConnSlot>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(leaves) = gw.leaves() else { return };
    let cfg = match leaves.leaf(&tunnel.host).and_then(|leaf| tls::server_config(&tunnel.host, leaf)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(host = %tunnel.host, error = %e, "cannot mint a leaf");
            return;
        }
    };
    gw.metrics()
        .leaf_cache_hits
        .store(leaves.hits.load(std::sync::atomic::Ordering::Relaxed), std::sync::atomic::Ordering::Relaxed);
    gw.metrics()
        .leaf_cache_misses
        .store(leaves.misses.load(std::sync::atomic::Ordering::Relaxed), std::sync::atomic::Ordering::Relaxed);
    let limits = &gw.config().limits;
    let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(limits.header_read_timeout, hello).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(host = %tunnel.host, error = %e, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(host = %tunnel.host, "no ClientHello within limits.header_read_timeout");
            return;
        }
    };
    let tls = match tokio::time::timeout(limits.tls_handshake_timeout, start.into_stream(cfg)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(host = %tunnel.host, error = %e, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(host = %tunnel.host, "TLS handshake not done within limits.tls_handshake_timeout");
            return;
        }
    };
    let timeouts = ConnTimeouts::from_limits(limits);
    let builder = conn::builder(limits);
    let svc = move |req| {
        let (gw, t) = (gw.clone(), tunnel.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(gw, req, Arrival::Tunnel(t)).await) }
    };
    conn::serve_http(&builder, tls, svc, slot, timeouts).await;
}

/// Splices a passthrough tunnel to the vetted upstream address and records its byte counts.
pub(crate) async fn passthrough<IO>(
    gw: Arc<App>,
    mut io: IO,
    tunnel: &Tunnel,
    connector: &Connector,
    facts: &Facts,
    record: u64,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = crate::clock::instant();
    let addrs = gw.vetter().lookup(&tunnel.host).unwrap_or_default();
    let mut upstream = None;
    for ip in addrs {
        let dial = tokio::net::TcpStream::connect((ip, tunnel.port));
        if let Ok(Ok(s)) = tokio::time::timeout(gw.config().limits.upstream_connect_timeout, dial).await {
            upstream = Some(s);
            break;
        }
    }
    let mut m = Map::new();
    m.insert("kind".into(), json!("outcome"));
    m.insert("request_id".into(), json!(facts.request_id));
    m.insert("decision_idx".into(), json!(record.to_string()));
    m.insert("connector".into(), json!(connector.name));
    m.insert("tunnel".into(), json!("passthrough"));
    match upstream {
        Some(mut up) => {
            let r = conn::splice(&mut io, &mut up, gw.config().limits.tunnel_idle_timeout).await;
            m.insert("bytes_sent".into(), json!(r.a_to_b.to_string()));
            m.insert("bytes_received".into(), json!(r.b_to_a.to_string()));
            if let Some(e) = r.error {
                m.insert("error".into(), json!(e));
            }
        }
        None => {
            m.insert("error".into(), json!("the upstream is unreachable"));
        }
    }
    m.insert("duration_us".into(), json!(crate::clock::since(started).as_micros().to_string()));
    m.insert("closed_at".into(), json!(now_unix().to_string()));
    if let Err(e) = gw.audit().append_nowait(m) {
        tracing::error!(error = %e, "tunnel outcome not queued");
    }
}
