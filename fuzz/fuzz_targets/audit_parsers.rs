//! The audit log's decoders: entries (canonical JSON), signed checkpoints, proofs.
#![no_main]
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use uapk_gateway::audit::{Proof, canonical_json, parse_checkpoint};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(c) = canonical_json(&v)
    {
        // Canonical form is a fixed point.
        let again: serde_json::Value = serde_json::from_slice(&c).expect("canonical JSON parses");
        assert_eq!(canonical_json(&again).expect("re-encodes"), c);
    }
    let Ok(s) = std::str::from_utf8(data) else { return };
    let keys = [("fuzz/log".to_string(), SigningKey::from_bytes(&[1u8; 32]).verifying_key())];
    let _ = parse_checkpoint(s, &keys);
    if let Ok(p) = Proof::parse(s) {
        let _ = p.verify(&[keys[0].1], None, None);
        let _ = Proof::parse(&p.to_text()).expect("a printed proof parses");
    }
});
