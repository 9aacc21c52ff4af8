//! Upstreams on 127.0.0.1:0: a plain one that records every request, one behind TLS with its
//! own test CA, a WebSocket one, and `serve`, the HTTP server loop they (and the telemetry
//! collectors) share.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Serves every connection `listener` accepts (HTTP/1.1 with upgrades, or HTTP/2), each request
/// answered by `handler`.
pub(crate) fn serve<H, F, B>(listener: tokio::net::TcpListener, handler: H)
where
    H: Fn(http::Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            serve_connection(stream, handler.clone());
        }
    });
}

/// Serves one connection (HTTP/1.1 with upgrades, or HTTP/2), each request answered by `handler`.
pub(crate) fn serve_connection<I, H, F, B>(io: I, handler: H)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(http::Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let answer = handler(req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    });
}

/// What one upstream request looked like.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// Reads `req` whole; `path` as the test wants it.
    async fn read(req: http::Request<Incoming>, path: impl Fn(&http::Uri) -> String) -> Seen {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Seen { path: path(&parts.uri), headers: parts.headers, body }
    }
}

type Hook = Arc<dyn Fn(&Seen) -> (u16, String) + Send + Sync>;

/// A loopback HTTP/1.1 upstream that records every request and answers 200 with a JSON echo,
/// or whatever its hook says.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl Upstream {
    pub(crate) async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let hook: Arc<Mutex<Option<Hook>>> = Arc::default();
        let (s2, h2) = (seen.clone(), hook.clone());
        serve(listener, move |req| {
            let (seen, hook) = (s2.clone(), h2.clone());
            async move {
                let s = Seen::read(req, |uri| uri.to_string()).await;
                let h = hook.lock().unwrap().clone();
                let (status, text) = match h {
                    Some(h) => h(&s),
                    None => (200, serde_json::json!({"ok": true, "path": s.path}).to_string()),
                };
                seen.lock().unwrap().push(s);
                let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                resp
            }
        });
        Upstream { addr, seen, hook }
    }

    pub(crate) fn set_hook(&self, f: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Arc::new(f));
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub(crate) fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the upstream saw no request")
    }
}

/// A loopback HTTPS upstream (HTTP/1.1 and HTTP/2 by ALPN) with its own test CA, for
/// `tls.extra_upstream_roots`. Its certificate names `localhost` and 127.0.0.1.
pub(crate) struct TlsUpstream {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TlsUpstream {
    pub(crate) async fn start() -> TlsUpstream {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test upstream CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (acceptor, seen) = (acceptor.clone(), s2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    serve_connection(tls, move |req| {
                        let seen = seen.clone();
                        async move {
                            let version = format!("{:?}", req.version());
                            let s =
                                Seen::read(req, |uri| uri.path_and_query().map(|p| p.to_string()).unwrap_or_default())
                                    .await;
                            let text = serde_json::json!({"ok": true, "tls": true, "path": s.path, "version": version})
                                .to_string();
                            seen.lock().unwrap().push(s);
                            http::Response::new(Full::new(Bytes::from(text)))
                        }
                    });
                });
            }
        });
        TlsUpstream { addr, ca_pem: ca.pem(), seen }
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A WebSocket upstream: it switches protocols for every request, then echoes what it receives
/// when `echo`, or only reads (never sending a byte) otherwise.
pub(crate) async fn websocket_upstream(echo: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve(listener, move |mut req: http::Request<Incoming>| async move {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(u) = on.await {
                let mut io = hyper_util::rt::TokioIo::new(u);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || (echo && io.write_all(&buf[..n]).await.is_err()) {
                        break;
                    }
                }
            }
        });
        let mut r = http::Response::new(Empty::<Bytes>::new());
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("connection", "upgrade".parse().unwrap());
        r.headers_mut().insert("upgrade", "websocket".parse().unwrap());
        r
    });
    addr
}
