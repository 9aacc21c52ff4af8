//! The transparent listener: the pod's iptables rules REDIRECT all agent TCP egress here. The
//! original destination comes from `SO_ORIGINAL_DST`; the first bytes (read with a deadline)
//! tell TLS from plain HTTP. TLS is authorised by SNI like a CONNECT and then intercepted or
//! spliced; plain HTTP goes through the data path with its `Host`. A connection whose original
//! destination is the gateway itself is refused (no loops).

use super::connect::{Tunnel, authorize_tunnel, intercept, passthrough};
use super::{Entry, Gateway, Via, handle, new_facts};
use crate::config::TlsMode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The destination the client dialled before iptables redirected it.
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()?.ip() {
        IpAddr::V4(_) => sock.original_dst()?,
        IpAddr::V6(_) => sock.original_dst_ipv6()?,
    };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// Handles one redirected connection.
pub async fn serve_connection(gw: Arc<Gateway>, stream: TcpStream, own: Vec<SocketAddr>) {
    let orig = match original_destination(&stream) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "transparent connection without an original destination; closing");
            return;
        }
    };
    let local = stream.local_addr().ok();
    let loops = own.iter().chain(local.iter()).any(|a| {
        a.port() == orig.port() && (a.ip() == orig.ip() || a.ip().is_unspecified() || orig.ip().is_loopback())
    });
    if loops {
        tracing::warn!(%orig, "refusing a transparent connection to the gateway itself");
        return;
    }
    // Peek (not read) the first bytes, so a passthrough tunnel can still forward them.
    let deadline = Instant::now() + gw.config.limits.header_read_timeout;
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    let mut sni = None;
    let mut is_tls = false;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => {
                is_tls = buf[0] == 0x16;
                if !is_tls {
                    break;
                }
                match super::tls::client_hello_sni(&buf[..n]) {
                    Ok(name) => {
                        sni = name;
                        break;
                    }
                    Err(_) if n > seen && n < buf.len() => {
                        // Not all of the ClientHello has arrived yet.
                        seen = n;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => break,
                }
            }
        }
    }
    if !is_tls {
        let svc = hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(gw, req, Via::Transparent(orig)).await) }
        });
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        b.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
        let _ = b.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
        return;
    }
    let host = sni.unwrap_or_else(|| orig.ip().to_string());
    let mut facts = new_facts(&http::Method::CONNECT, &http::Uri::from_static("/"), Entry::Transparent);
    facts.path = String::new();
    facts.host = host.clone();
    facts.port = orig.port();
    let Ok((connector, record)) = authorize_tunnel(&gw, &mut facts, &http::HeaderMap::new(), None).await else {
        return;
    };
    let tunnel = Arc::new(Tunnel { host, port: orig.port(), token: None, agent: facts.agent.clone() });
    match connector.tls {
        TlsMode::Intercept => intercept(gw, stream, tunnel).await,
        TlsMode::Passthrough => passthrough(gw, stream, &tunnel, &connector, &facts, record).await,
    }
}

/// The nat rules the pod's init container installs: traffic of the gateway's own UID, loopback
/// and DNS returns untouched; every other TCP connection is redirected to the transparent port.
/// One argv per command, for `iptables` and then `ip6tables`.
pub fn iptables_rules(proxy_uid: u32, port: u16) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for bin in ["iptables", "ip6tables"] {
        let rule = |args: &str| -> Vec<String> {
            std::iter::once(bin.to_string()).chain(args.split_whitespace().map(str::to_string)).collect()
        };
        out.push(rule("-t nat -N UAPK_OUTPUT"));
        out.push(rule(&format!("-t nat -A UAPK_OUTPUT -m owner --uid-owner {proxy_uid} -j RETURN")));
        out.push(rule("-t nat -A UAPK_OUTPUT -o lo -j RETURN"));
        out.push(rule("-t nat -A UAPK_OUTPUT -p tcp --dport 53 -j RETURN"));
        out.push(rule(&format!("-t nat -A UAPK_OUTPUT -p tcp -j REDIRECT --to-ports {port}")));
        out.push(rule("-t nat -A OUTPUT -p tcp -j UAPK_OUTPUT"));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rules_exempt_the_proxy_uid_before_redirecting() {
        let rules = super::iptables_rules(1337, 15001);
        assert_eq!(rules.len(), 12);
        let v4: Vec<String> = rules.iter().take(6).map(|r| r.join(" ")).collect();
        let uid = v4.iter().position(|r| r.contains("--uid-owner 1337 -j RETURN")).unwrap();
        let redirect = v4.iter().position(|r| r.contains("REDIRECT --to-ports 15001")).unwrap();
        assert!(uid < redirect);
        assert_eq!(v4[5], "iptables -t nat -A OUTPUT -p tcp -j UAPK_OUTPUT");
        assert!(rules[6][0] == "ip6tables");
    }
}
