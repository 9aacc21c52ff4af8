//! Raw HTTP/1.1 on a TCP stream, for what an HTTP client would not send or would hide: bytes as
//! they are, CONNECT by hand, response heads.

use super::TestGateway;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` to the gateway's proxy listener and returns what came back before it closed
/// the connection or 5 s passed.
pub(crate) async fn raw(gw: &TestGateway, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.proxy).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status of a raw response (0 when there is none).
pub(crate) fn status_of(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The `x-uapk-record` header of a raw response.
pub(crate) fn record_header(resp: &str) -> Option<u64> {
    resp.lines().find_map(|l| l.strip_prefix("x-uapk-record: ")).and_then(|v| v.trim().parse().ok())
}

/// The JSON body of a raw response (`Null` when it has none).
pub(crate) fn body_json(resp: &str) -> Value {
    resp.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null)
}

/// Reads a response head, to the blank line that ends it (or what came before the peer closed,
/// or 5 s passed).
pub(crate) async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Opens a CONNECT tunnel to `target` through the proxy listener at `proxy` with `tok`: the
/// stream after the response head, and the head (with the body, for a refusal).
pub(crate) async fn connect(proxy: SocketAddr, target: &str, tok: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {tok}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = read_head(&mut s).await;
    if !text.starts_with("HTTP/1.1 200") {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        text.push_str(&String::from_utf8_lossy(&rest));
    }
    (s, text)
}
