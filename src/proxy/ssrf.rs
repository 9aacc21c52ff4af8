//! SSRF guard (SPEC §12): resolve once, classify every address, and dial only the vetted
//! address. The upstream client's resolver reads the vetted table and never resolves on its own,
//! so the address that was checked is the address that is dialled.

use crate::config::Cidr;
use crate::policy::{Code, Decision};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why an address may not be dialled, or `None` for public unicast.
pub(crate) fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    let n = u32::from(ip);
    let in_net = |net: u32, prefix: u32| (n ^ net) >> (32 - prefix) == 0;
    Some(match () {
        _ if o[0] == 0 => "this-network (0.0.0.0/8)",
        _ if o[0] == 127 => "loopback",
        _ if o[0] == 10 || in_net(0xAC10_0000, 12) || in_net(0xC0A8_0000, 16) => "private (RFC 1918)",
        _ if in_net(0xA9FE_0000, 16) => "link-local (incl. cloud metadata 169.254.169.254)",
        _ if in_net(0x6440_0000, 10) => "carrier-grade NAT (100.64.0.0/10)",
        _ if in_net(0xC000_0000, 24) => "IETF protocol assignments (192.0.0.0/24)",
        _ if in_net(0xC000_0200, 24) || in_net(0xC633_6400, 24) || in_net(0xCB00_7100, 24) => "documentation",
        _ if in_net(0xC612_0000, 15) => "benchmarking (198.18.0.0/15)",
        _ if in_net(0xC058_6300, 24) => "6to4 relay anycast",
        _ if o[0] >= 224 => "multicast or reserved",
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // Addresses that embed an IPv4 address are judged by it, and refused when it is private.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4).map(|_| "IPv4-mapped non-public address").or(Some("IPv4-mapped address"));
    }
    if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        return Some("IPv4-compatible (deprecated)");
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        return Some("NAT64 (64:ff9b::/96)");
    }
    if s[0] == 0x2002 {
        return Some("6to4 (2002::/16)");
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("Teredo (2001::/32)");
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Some("documentation (2001:db8::/32)");
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return Some("unique local (fc00::/7)");
    }
    if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        return Some("link-local or site-local");
    }
    if s[0] & 0xff00 == 0xff00 {
        return Some("multicast");
    }
    if s[0] & 0xe000 != 0x2000 {
        return Some("not global unicast (outside 2000::/3)");
    }
    None
}

/// A host's vetted addresses and when they were resolved.
type VettedAddrs = (Vec<IpAddr>, Instant);

/// Resolves and vets upstream hosts; the upstream client dials only what is in this table.
#[derive(Clone)]
pub struct Vetter {
    allow: Arc<Vec<Cidr>>,
    /// The gateway's own listener addresses: never a destination.
    own: Arc<Mutex<Vec<SocketAddr>>>,
    table: Arc<Mutex<HashMap<String, VettedAddrs>>>,
    ttl: Duration,
    /// DNS resolutions performed (tests prove refusals never resolve).
    pub lookups: Arc<std::sync::atomic::AtomicU64>,
}

/// The outcome of vetting a host.
pub(crate) enum Vetted {
    Ok,
    /// `ssrf_blocked`, with a message naming the address class.
    Blocked(String),
    /// The name does not resolve.
    Unresolvable(String),
}

impl Vetted {
    /// The refusal of a host that did not pass: `ssrf_blocked` or `upstream_unresolvable`.
    pub(crate) fn refusal(self) -> Option<Decision> {
        match self {
            Vetted::Ok => None,
            Vetted::Blocked(why) => Some(Decision::deny(Code::SsrfBlocked, why)),
            Vetted::Unresolvable(why) => Some(Decision::deny(Code::UpstreamUnresolvable, why)),
        }
    }
}

impl Vetter {
    pub(crate) fn new(allow: Vec<Cidr>) -> Self {
        Vetter {
            allow: Arc::new(allow),
            own: Arc::default(),
            table: Arc::default(),
            ttl: Duration::from_secs(30),
            lookups: Arc::default(),
        }
    }

    pub(crate) fn add_own_listener(&self, addr: SocketAddr) {
        self.own.lock().unwrap_or_else(|e| e.into_inner()).push(addr);
    }

    fn judge(&self, ip: IpAddr, port: u16) -> Result<(), String> {
        let own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        if own.iter().any(|a| a.port() == port && (a.ip() == ip || a.ip().is_unspecified())) {
            return Err(format!("{ip}:{port} is one of the gateway's own listeners"));
        }
        drop(own);
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        match classify(ip) {
            Some(class) => Err(format!("{ip} is {class}; not a public unicast address")),
            None => Ok(()),
        }
    }

    /// Resolves `host` (once per TTL), checks every address, and records the vetted ones for the
    /// upstream client. An IP literal is checked as it is.
    pub(crate) async fn vet(&self, host: &str, port: u16) -> Vetted {
        let key = host.to_ascii_lowercase();
        let cached = {
            let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            t.get(&key).filter(|(_, at)| crate::clock::since(*at) < self.ttl).map(|(ips, _)| ips.clone())
        };
        let ips = match cached {
            Some(ips) => ips,
            None => {
                let literal = host.trim_start_matches('[').trim_end_matches(']');
                let ips: Vec<IpAddr> = match literal.parse::<IpAddr>() {
                    Ok(ip) => vec![ip],
                    Err(_) => match self.resolve(host, port).await {
                        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                        Err(e) => return Vetted::Unresolvable(format!("{host} does not resolve: {e}")),
                    },
                };
                if ips.is_empty() {
                    return Vetted::Unresolvable(format!("{host} resolves to no address"));
                }
                ips
            }
        };
        // Every address must pass: a name that mixes public and private answers is refused.
        for ip in &ips {
            if let Err(e) = self.judge(*ip, port) {
                return Vetted::Blocked(format!("{host}: {e}"));
            }
        }
        self.table.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (ips, crate::clock::instant()));
        Vetted::Ok
    }

    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<impl Iterator<Item = std::net::SocketAddr>> {
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::net::lookup_host((host, port)).await
    }

    /// The vetted addresses of `host`, for the dialer.
    pub(crate) fn lookup(&self, host: &str) -> Option<Vec<IpAddr>> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.get(&host.to_ascii_lowercase()).map(|(ips, _)| ips.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_ranges_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:0:4136:e378::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(classify(ip).is_some(), "{ip} should be refused");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(classify(ip), None, "{ip} is public");
        }
    }

    #[tokio::test]
    async fn allowlist_and_own_listeners() {
        let v = Vetter::new(vec![Cidr::parse("127.0.0.0/8").unwrap()]);
        assert!(matches!(v.vet("127.0.0.1", 8080).await, Vetted::Ok));
        assert_eq!(v.lookup("127.0.0.1"), Some(vec!["127.0.0.1".parse().unwrap()]));
        v.add_own_listener("127.0.0.1:15080".parse().unwrap());
        assert!(matches!(v.vet("127.0.0.2", 15080).await, Vetted::Ok));
        let v2 = Vetter::new(vec![Cidr::parse("127.0.0.0/8").unwrap()]);
        v2.add_own_listener("127.0.0.1:15080".parse().unwrap());
        assert!(matches!(v2.vet("127.0.0.1", 15080).await, Vetted::Blocked(_)));
        assert!(matches!(Vetter::new(vec![]).vet("10.0.0.1", 80).await, Vetted::Blocked(_)));
        assert!(matches!(Vetter::new(vec![]).vet("localhost", 80).await, Vetted::Blocked(_)));
    }
}
