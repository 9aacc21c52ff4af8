//! TLS interception: the local CA (`ca init`, or generated in `data_dir` for development) and
//! a bounded cache of short-lived leaf certificates minted for the exact host an agent asked
//! for. Leaves share one key pair generated at start, so minting costs one signature.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Writes a new interception CA: `cert` (PEM) and `key` (PKCS#8 PEM, mode 0600).
pub fn generate_ca(cert: &Path, key: &Path) -> Result<(), String> {
    let kp = KeyPair::generate().map_err(|e| format!("generating the CA key: {e}"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "UAPK Gateway interception CA");
    params.distinguished_name.push(DnType::OrganizationName, "UAPK Gateway");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = crate::clock::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365 * 2);
    let ca = params.self_signed(&kp).map_err(|e| format!("signing the CA: {e}"))?;
    write_private(key, kp.serialize_pem().as_bytes())?;
    std::fs::write(cert, ca.pem()).map_err(|e| format!("writing {}: {e}", cert.display()))?;
    Ok(())
}

/// Writes a file readable only by its owner, created with that mode.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.write_all(bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The interception CA and the cache of leaves it signed.
pub struct LeafCache {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaf_key: KeyPair,
    leaf_key_der: Vec<u8>,
    /// Validity of a minted leaf.
    validity: Duration,
    /// How long a leaf is served from the cache: shorter than its validity.
    ttl: Duration,
    cache: Mutex<HashMap<String, (Arc<CertifiedKey>, Instant)>>,
    /// Leaves served from the cache (`uapk_tls_leaf_cache_hits_total`).
    pub hits: AtomicU64,
    /// Leaves minted because none was cached or the cached one was past the cache TTL
    /// (`uapk_tls_leaf_cache_misses_total`).
    pub misses: AtomicU64,
}

const MAX_LEAVES: usize = 10_000;

impl LeafCache {
    /// Loads the CA from PEM files. Errors name the file, never key material.
    pub(crate) fn load(cert: &Path, key: &Path, validity: Duration) -> Result<LeafCache, String> {
        let cert_pem = std::fs::read_to_string(cert).map_err(|e| format!("CA certificate {}: {e}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key).map_err(|e| format!("CA key {}: {e}", key.display()))?;
        let kp =
            KeyPair::from_pem(&key_pem).map_err(|_| format!("CA key {}: not a PKCS#8 private key", key.display()))?;
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| format!("CA certificate {}: not a PEM certificate", cert.display()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, kp).map_err(|e| format!("CA certificate {}: {e}", cert.display()))?;
        let leaf_key = KeyPair::generate().map_err(|e| e.to_string())?;
        let leaf_key_der = leaf_key.serialize_der();
        let validity = validity.max(Duration::from_secs(600));
        Ok(LeafCache {
            issuer,
            ca_der,
            leaf_key,
            leaf_key_der,
            ttl: validity / 2,
            validity,
            cache: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The leaf for `name` (a DNS name or an IP literal), minted on first use within the TTL.
    pub(crate) fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, String> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((ck, at)) = cache.get(&name)
                && crate::clock::since(*at) < self.ttl
            {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(ck.clone());
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let ck = Arc::new(self.mint(&name)?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_LEAVES {
            let ttl = self.ttl;
            cache.retain(|_, (_, at)| crate::clock::since(*at) < ttl);
            if cache.len() >= MAX_LEAVES {
                cache.clear();
            }
        }
        cache.insert(name, (ck.clone(), crate::clock::instant()));
        Ok(ck)
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        let san = match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.try_into().map_err(|_| format!("{name:?} is not a DNS name"))?),
        };
        params.subject_alt_names = vec![san];
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = crate::clock::now_utc();
        params.not_before = now - time::Duration::minutes(10);
        params.not_after = now + time::Duration::seconds(self.validity.as_secs() as i64);
        let cert = params.signed_by(&self.leaf_key, &self.issuer).map_err(|e| format!("minting a leaf: {e}"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
        Ok(CertifiedKey::new(vec![cert.der().clone(), self.ca_der.clone()], signer))
    }
}

/// Serves the leaf for one tunnel's host: a ClientHello naming another host gets no
/// certificate, so the handshake fails instead of a forged success for the wrong name.
#[derive(Debug)]
pub(crate) struct TunnelCert {
    pub host: String,
    pub leaf: Arc<CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for TunnelCert {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(sni) if !sni.eq_ignore_ascii_case(&self.host) => None,
            _ => Some(self.leaf.clone()),
        }
    }
}

/// A server config presenting `leaf` for `host`, offering HTTP/2 and HTTP/1.1.
pub(crate) fn server_config(host: &str, leaf: Arc<CertifiedKey>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(TunnelCert { host: host.to_ascii_lowercase(), leaf }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Bytes that are not (or not yet all of) a TLS ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotClientHello;

/// The server name from a TLS ClientHello at the start of `buf`: `Ok(None)` for one without
/// SNI, `Err` for bytes that are not a complete ClientHello record.
pub fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, NotClientHello> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], NotClientHello> {
        if b.len() < n {
            return Err(NotClientHello);
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h)
    }
    fn u16_at(b: &mut &[u8]) -> Result<usize, NotClientHello> {
        let x = take(b, 2)?;
        Ok(usize::from(x[0]) << 8 | usize::from(x[1]))
    }
    let mut b = buf;
    let rec = take(&mut b, 5)?;
    if rec[0] != 0x16 {
        return Err(NotClientHello);
    }
    let hs = take(&mut b, 4)?;
    if hs[0] != 0x01 {
        return Err(NotClientHello);
    }
    take(&mut b, 2 + 32)?; // version, random
    let sid = take(&mut b, 1)?[0] as usize;
    take(&mut b, sid)?;
    let cs = u16_at(&mut b)?;
    take(&mut b, cs)?;
    let cm = take(&mut b, 1)?[0] as usize;
    take(&mut b, cm)?;
    if b.is_empty() {
        return Ok(None);
    }
    let ext_len = u16_at(&mut b)?;
    let mut exts = take(&mut b, ext_len)?;
    while !exts.is_empty() {
        let ty = u16_at(&mut exts)?;
        let len = u16_at(&mut exts)?;
        let mut data = take(&mut exts, len)?;
        if ty == 0 {
            let _list = u16_at(&mut data)?;
            while !data.is_empty() {
                let kind = take(&mut data, 1)?[0];
                let n = u16_at(&mut data)?;
                let name = take(&mut data, n)?;
                if kind == 0 {
                    let s = std::str::from_utf8(name).map_err(|_| NotClientHello)?;
                    return Ok(Some(s.to_ascii_lowercase()));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, as rustls writes it.
    fn hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn sni_is_read_from_a_real_client_hello() {
        assert_eq!(client_hello_sni(&hello("API.Example.com")), Ok(Some("api.example.com".into())));
        // An IP literal is sent without SNI.
        assert_eq!(client_hello_sni(&hello("127.0.0.1")), Ok(None));
        let full = hello("api.example.com");
        for cut in [0, 3, 10, full.len() / 2] {
            assert_eq!(client_hello_sni(&full[..cut]), Err(NotClientHello), "truncated at {cut}");
        }
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), Err(NotClientHello));
        let seed = include_bytes!("../../fuzz/corpus/client_hello/sni");
        assert_eq!(client_hello_sni(seed), Ok(Some("api.stripe.com".into())));
    }

    #[test]
    fn leaves_are_cached_and_name_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
        generate_ca(&cert, &key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let cache = LeafCache::load(&cert, &key, Duration::from_secs(3600)).unwrap();
        let a = cache.leaf("api.example.com").unwrap();
        let b = cache.leaf("API.example.com.").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((cache.misses.load(Ordering::Relaxed), cache.hits.load(Ordering::Relaxed)), (1, 1));
        assert_eq!(a.cert.len(), 2, "leaf and CA");
        assert!(cache.leaf("10.0.0.1").is_ok());
    }
}
