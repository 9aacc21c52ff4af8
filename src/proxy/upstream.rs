//! The pooled upstream client: HTTP/1.1 and HTTP/2 (ALPN) over rustls, verified against the
//! webpki roots plus configured extra roots (never the interception CA), dialling only
//! addresses the SSRF guard vetted. It follows no redirects.

use super::ssrf::Vetter;
use super::{BoxError, ProxyBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub(crate) type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector<VettedResolver>>, ProxyBody>;

/// Resolves only from the vetted table; a name the guard has not approved does not resolve.
#[derive(Clone)]
pub(crate) struct VettedResolver(pub Vetter);

impl tower::Service<Name> for VettedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        ready(match self.0.lookup(name.as_str()) {
            Some(ips) => Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect::<Vec<_>>().into_iter()),
            None => Err(std::io::Error::other(format!("{} was not vetted by the SSRF guard", name.as_str()))),
        })
    }
}

/// Root store: webpki roots plus every certificate in the `extra` PEM files.
pub(crate) fn root_store(extra: &[PathBuf]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("extra upstream root {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("extra upstream root {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("extra upstream root {} holds no certificate", path.display()));
        }
        for c in certs {
            roots.add(c).map_err(|e| format!("extra upstream root {}: {e}", path.display()))?;
        }
    }
    Ok(roots)
}

/// The TLS client configuration for upstream connections.
pub(crate) fn tls_config(roots: RootCertStore) -> Result<rustls::ClientConfig, BoxError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// TLS (HTTP/1.1 and HTTP/2 by ALPN) or plain HTTP over `http`, by the URI's scheme.
pub(crate) fn https_over<C>(http: C, tls: rustls::ClientConfig) -> hyper_rustls::HttpsConnector<C> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

pub(crate) fn build_client(vetter: Vetter, tls: rustls::ClientConfig, connect_timeout: Duration) -> UpstreamClient {
    let mut http = HttpConnector::new_with_resolver(VettedResolver(vetter));
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = https_over(http, tls);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https)
}
