//! Ed25519 key files: PKCS#8 PEM private keys (created 0600) and SPKI PEM public keys.

use super::IdentityError;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

fn file_err(path: &Path, message: impl Into<String>) -> IdentityError {
    IdentityError::KeyFile { path: path.display().to_string(), message: message.into() }
}

/// `key.pem` → `key.pub.pem`.
pub(super) fn public_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".pem").unwrap_or(&name);
    out.with_file_name(format!("{stem}.pub.pem"))
}

/// Writes a new Ed25519 key to `out` (PKCS#8 PEM, created with mode 0600; an existing file is
/// refused unless `force`) and its public key to `<stem>.pub.pem`. Returns the public path.
pub fn generate_key_files(out: &Path, force: bool) -> Result<PathBuf, IdentityError> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = private_key_pem(&key)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| file_err(dir, e.to_string()))?;
    }
    if force {
        let _ = std::fs::remove_file(out);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| file_err(out, format!("cannot create the key file: {e}")))?;
    f.write_all(pem.as_bytes()).map_err(|e| file_err(out, e.to_string()))?;
    let pub_path = public_path(out);
    std::fs::write(&pub_path, verifying_key_pem(&key.verifying_key()))
        .map_err(|e| file_err(&pub_path, e.to_string()))?;
    Ok(pub_path)
}

/// The key as PKCS#8 v1 PEM (RFC 8410: the seed only, no public key). ed25519-dalek writes
/// v2 (RFC 5958, with the public key), which OpenSSL 3 and pyca/cryptography refuse to load.
pub(super) fn private_key_pem(
    key: &SigningKey,
) -> Result<ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing<String>, IdentityError> {
    ed25519_dalek::pkcs8::KeypairBytes { secret_key: key.to_bytes(), public_key: None }
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| IdentityError::Key(e.to_string()))
}

/// Reads a PKCS#8 PEM Ed25519 private key (v1 or v2).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, IdentityError> {
    let pem = std::fs::read_to_string(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| file_err(path, "not an Ed25519 private key in PKCS#8 PEM form"))
}

/// Parses an SPKI PEM Ed25519 public key.
pub fn parse_verifying_key_pem(pem: &str) -> Result<VerifyingKey, IdentityError> {
    VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|_| IdentityError::Key("not an Ed25519 public key in SPKI PEM form".into()))
}

/// An Ed25519 public key in SPKI PEM form, as `keygen` writes it to `KEY.pub.pem` (empty if it
/// cannot be encoded).
pub fn verifying_key_pem(vk: &VerifyingKey) -> String {
    vk.to_public_key_pem(LineEnding::LF).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_written_as_pkcs8_v1_and_both_versions_are_read() {
        let key = SigningKey::from_bytes(&[11u8; 32]);
        let pem = private_key_pem(&key).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{}", pem.as_str());
        // RFC 8410 v1: SEQUENCE { INTEGER 0, AlgorithmIdentifier id-Ed25519, OCTET STRING { seed } }.
        let (_, der) = ed25519_dalek::pkcs8::spki::der::SecretDocument::from_pem(pem.as_str()).unwrap();
        let mut want = hex::decode("302e020100300506032b657004220420").unwrap();
        want.extend_from_slice(&[11u8; 32]);
        assert_eq!(der.as_bytes(), want.as_slice());
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("v1.pem");
        std::fs::write(&v1, pem.as_bytes()).unwrap();
        assert_eq!(load_signing_key(&v1).unwrap().to_bytes(), key.to_bytes());
        let v2 = dir.path().join("v2.pem");
        std::fs::write(&v2, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        assert_eq!(load_signing_key(&v2).unwrap().to_bytes(), key.to_bytes());
        // generate_key_files writes v1, 0600, in a directory it creates 0700.
        use std::os::unix::fs::PermissionsExt;
        let out = dir.path().join("new/k.pem");
        generate_key_files(&out, false).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (_, der) = ed25519_dalek::pkcs8::spki::der::SecretDocument::from_pem(&text).unwrap();
        assert_eq!(der.as_bytes().len(), 48, "v1: the seed only");
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join("new")).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
