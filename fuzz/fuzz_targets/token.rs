//! Capability and override tokens: any string is refused or accepted, never a panic.
#![no_main]
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use uapk_gateway::identity::{IssuerKey, TokenPolicy, TokenVerifier, unverified_subject, verify_override};

fn verifier() -> &'static TokenVerifier {
    static V: OnceLock<TokenVerifier> = OnceLock::new();
    V.get_or_init(|| {
        TokenVerifier::new(TokenPolicy {
            audience: "uapk-gateway".into(),
            max_lifetime_secs: 86_400,
            leeway_secs: 60,
            issuers: vec![IssuerKey { id: "platform".into(), key: SigningKey::from_bytes(&[7u8; 32]).verifying_key() }],
            revoked: Default::default(),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = unverified_subject(s);
    let _ = verifier().verify(s, 1_800_000_000);
    let _ = verify_override(s, &SigningKey::from_bytes(&[9u8; 32]).verifying_key(), 1_800_000_000);
});
