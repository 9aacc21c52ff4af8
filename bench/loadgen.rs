//! A small closed-loop HTTP/1.1 load generator for the HTTPS rows of `bench/run.sh`: like `wrk`,
//! but it can also open each connection with `CONNECT` through a proxy and then start TLS with
//! the target's host name as SNI (what browsers, curl and Python clients do).
//!
//! ```sh
//! cargo run --release --example loadgen -- --url https://localhost:8443/ok --cacert ca.pem \
//!     [--proxy http://agent:TOKEN@127.0.0.1:15080] [-c 32] [-d 10] [-H 'name: value']
//! ```
//!
//! Every connection keeps one request in flight and reuses its connection. Prints requests/s,
//! p50/p99 latency, errors and non-2xx answers.

// A benchmark measures real elapsed time: the clock rule (clippy.toml) is for the gateway.
#![allow(clippy::disallowed_methods)]

use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

struct Opts {
    url: url::Url,
    proxy: Option<url::Url>,
    cacert: Option<String>,
    conns: usize,
    secs: f64,
    headers: Vec<(String, String)>,
}

fn opts() -> Opts {
    let mut o = Opts {
        url: url::Url::parse("http://127.0.0.1/").unwrap(),
        proxy: None,
        cacert: None,
        conns: 32,
        secs: 10.0,
        headers: vec![],
    };
    let mut url = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = Some(v()),
            "--proxy" => o.proxy = Some(url::Url::parse(&v()).expect("--proxy URL")),
            "--cacert" => o.cacert = Some(v()),
            "-c" => o.conns = v().parse().expect("-c N"),
            "-d" => o.secs = v().parse().expect("-d SECONDS"),
            "-H" => {
                let h = v();
                let (n, val) = h.split_once(':').expect("-H 'name: value'");
                o.headers.push((n.trim().to_string(), val.trim().to_string()));
            }
            other => panic!("unknown argument {other}"),
        }
    }
    o.url = url::Url::parse(&url.expect("--url is required")).expect("--url URL");
    o
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn dial(o: &Opts, tls: &Option<tokio_rustls::TlsConnector>) -> Result<Box<dyn Io>, String> {
    let host = o.url.host_str().ok_or("URL without host")?.to_string();
    let port = o.url.port_or_known_default().ok_or("URL without port")?;
    let mut tcp = match &o.proxy {
        Some(p) => {
            let addr = format!("{}:{}", p.host_str().unwrap_or("127.0.0.1"), p.port().unwrap_or(8080));
            let mut s = TcpStream::connect(addr).await.map_err(|e| format!("proxy connect: {e}"))?;
            let mut req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
            if !p.username().is_empty() || p.password().is_some() {
                let cred = format!("{}:{}", p.username(), p.password().unwrap_or(""));
                let enc = base64::engine::general_purpose::STANDARD.encode(cred);
                req.push_str(&format!("Proxy-Authorization: Basic {enc}\r\n"));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes()).await.map_err(|e| format!("CONNECT: {e}"))?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut byte).await.map_err(|e| format!("CONNECT: {e}"))? == 0 || head.len() > 8192 {
                    return Err("CONNECT: the proxy closed the connection".into());
                }
                head.push(byte[0]);
            }
            let status = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
            if !status.contains(" 200") {
                return Err(format!("CONNECT refused: {status}"));
            }
            s
        }
        None => TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?,
    };
    tcp.set_nodelay(true).ok();
    match tls {
        Some(c) => {
            let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| format!("server name: {e}"))?;
            let s = c.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
            Ok(Box::new(s))
        }
        None => {
            tcp.flush().await.ok();
            Ok(Box::new(tcp))
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    non_2xx: u64,
    first_error: Option<String>,
}

async fn worker(o: Arc<Opts>, tls: Arc<Option<tokio_rustls::TlsConnector>>, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let authority = match o.url.port() {
        Some(p) => format!("{}:{p}", o.url.host_str().unwrap_or_default()),
        None => o.url.host_str().unwrap_or_default().to_string(),
    };
    let path = match o.url.query() {
        Some(q) => format!("{}?{q}", o.url.path()),
        None => o.url.path().to_string(),
    };
    while Instant::now() < deadline {
        let io = match dial(&o, &tls).await {
            Ok(io) => io,
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (mut send, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
            Ok(x) => x,
            Err(e) => {
                t.errors += 1;
                t.first_error.get_or_insert(format!("handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            // A server may close a kept-alive connection after N requests (nginx: 1,000) with
            // `Connection: close`: open a new one, as every client does; that is not an error.
            if send.ready().await.is_err() {
                break;
            }
            let mut req = hyper::Request::get(path.as_str()).header("host", authority.as_str());
            for (n, v) in &o.headers {
                req = req.header(n.as_str(), v.as_str());
            }
            let req = req.body(Empty::<Bytes>::new()).expect("request");
            let started = Instant::now();
            let res = match send.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    t.errors += 1;
                    t.first_error.get_or_insert(format!("request: {e}"));
                    break;
                }
            };
            let ok = res.status().is_success();
            if let Err(e) = res.into_body().collect().await {
                t.errors += 1;
                t.first_error.get_or_insert(format!("body: {e}"));
                break;
            }
            t.latencies_us.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if !ok {
                t.non_2xx += 1;
            }
        }
    }
    t
}

fn main() {
    let o = Arc::new(opts());
    let tls = if o.url.scheme() == "https" {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = &o.cacert {
            let pem = std::fs::read(path).expect("--cacert file");
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                roots.add(cert.expect("PEM certificate")).expect("CA certificate");
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    } else {
        None
    };
    let tls = Arc::new(tls);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.secs);
    let tallies: Vec<Tally> = rt.block_on(async {
        let tasks: Vec<_> = (0..o.conns).map(|_| tokio::spawn(worker(o.clone(), tls.clone(), deadline))).collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("worker"));
        }
        out
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat: Vec<u32> = tallies.iter().flat_map(|t| t.latencies_us.iter().copied()).collect();
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let errors: u64 = tallies.iter().map(|t| t.errors).sum();
    let non_2xx: u64 = tallies.iter().map(|t| t.non_2xx).sum();
    println!("requests: {}, errors: {errors}, non-2xx: {non_2xx}", lat.len());
    if let Some(e) = tallies.iter().find_map(|t| t.first_error.clone()) {
        println!("first error: {e}");
    }
    println!("Requests/sec: {:.0}", lat.len() as f64 / elapsed);
    println!("50%: {}", human(pct(0.50)));
    println!("99%: {}", human(pct(0.99)));
}

/// wrk's style: `812.00us`, `1.33ms`.
fn human(us: u32) -> String {
    if us < 1000 { format!("{us}.00us") } else { format!("{:.2}ms", us as f64 / 1000.0) }
}
