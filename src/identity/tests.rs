//! Token time claims and protected headers: overflow, absurd values, `crit`, duplicates.

use super::*;
use crate::identity::token::MAX_TIME_CLAIM;
use crate::identity::token::TokenError;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use std::collections::HashSet;

const NOW: i64 = 1_800_000_000;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

fn verifier(max_lifetime_secs: i64) -> TokenVerifier {
    verifier_with_leeway(max_lifetime_secs, 60)
}

fn verifier_with_leeway(max_lifetime_secs: i64, leeway_secs: i64) -> TokenVerifier {
    TokenVerifier::new(TokenPolicy {
        audience: "uapk-gateway".into(),
        max_lifetime_secs,
        leeway_secs,
        issuers: vec![IssuerKey { id: "platform".into(), key: key().verifying_key() }],
        revoked: HashSet::new(),
    })
}

fn claims(iat: i64, exp: i64) -> serde_json::Value {
    serde_json::json!({"iss": "platform", "sub": "unit-agent", "aud": ["uapk-gateway"], "iat": iat, "exp": exp})
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS over exactly these header and payload bytes, correctly signed: only the rules
/// under test can refuse it.
fn sign_raw(key: &SigningKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

fn sign(claims: &serde_json::Value) -> String {
    sign_raw(&key(), r#"{"alg":"EdDSA","typ":"JWT"}"#, &claims.to_string())
}

fn invalid_because(r: Result<std::sync::Arc<CapabilityClaims>, TokenError>, why: &str) {
    match r {
        Err(e @ TokenError::Invalid(_)) => {
            assert_eq!(e.code(), "capability_token_invalid");
            assert!(e.message().contains(why), "{} does not say {why:?}", e.message());
        }
        other => panic!("expected capability_token_invalid ({why}), got {other:?}"),
    }
}

#[test]
fn a_well_formed_token_verifies() {
    // The control for every test below: the same signing path accepts an honest token.
    let c = verifier(86_400).verify(&sign(&claims(NOW, NOW + 3600)), NOW).unwrap();
    assert_eq!(c.sub, "unit-agent");
}

#[test]
fn lifetime_overflow_attack_is_invalid() {
    // exp - iat overflows i64 and wrapped to a negative "lifetime" that passed max_lifetime.
    let t = sign(&claims(-(1i64 << 62), i64::MAX - 1));
    invalid_because(verifier(86_400).verify(&t, NOW), "time claim");
    // The same with the largest max_lifetime a config can give.
    invalid_because(verifier(i64::MAX).verify(&t, NOW), "time claim");
}

#[test]
fn time_claims_beyond_year_9999_or_negative_are_invalid() {
    let v = verifier(i64::MAX);
    for (name, c) in [
        ("exp after 9999", claims(NOW, MAX_TIME_CLAIM + 1)),
        ("exp i64::MAX", claims(NOW, i64::MAX)),
        ("negative iat", claims(-1, NOW + 60)),
        ("iat i64::MIN", claims(i64::MIN, NOW + 60)),
    ] {
        match v.verify(&sign(&c), NOW) {
            Err(TokenError::Invalid(m)) => assert!(m.contains("time claim"), "{name}: {m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    for nbf in [-1, MAX_TIME_CLAIM + 1, i64::MIN, i64::MAX] {
        let mut c = claims(NOW, NOW + 60);
        c["nbf"] = nbf.into();
        invalid_because(v.verify(&sign(&c), NOW), "time claim");
    }
    // A number that is not an i64 at all is malformed, not wrapped.
    let mut c = claims(NOW, NOW + 60);
    c["exp"] = serde_json::json!(18446744073709551615u64);
    invalid_because(v.verify(&sign(&c), NOW), "malformed");
    // The last second of year 9999 is still a time (a policy with an unbounded lifetime).
    assert!(v.verify(&sign(&claims(NOW, MAX_TIME_CLAIM)), NOW).is_ok());
}

#[test]
fn lifetime_is_compared_exactly() {
    let v = verifier(3600);
    assert!(v.verify(&sign(&claims(NOW, NOW + 3600)), NOW).is_ok());
    invalid_because(v.verify(&sign(&claims(NOW, NOW + 3601)), NOW), "max_lifetime");
}

#[test]
fn the_leeway_is_the_manifests() {
    let t = sign(&claims(NOW - 100, NOW));
    // The default 60 s: 18 s past `exp` is accepted, 61 s is not.
    assert!(verifier(86_400).verify(&t, NOW + 18).is_ok());
    assert_eq!(verifier(86_400).verify(&t, NOW + 61), Err(TokenError::Expired));
    // 0 s: 1 s past `exp` is expired, `exp` itself still valid; the cached path agrees.
    let strict = verifier_with_leeway(86_400, 0);
    assert!(strict.verify(&t, NOW).is_ok());
    assert_eq!(strict.verify(&t, NOW + 1), Err(TokenError::Expired));
    let mut c = claims(NOW, NOW + 60);
    c["nbf"] = (NOW + 1).into();
    invalid_because(strict.verify(&sign(&c), NOW), "nbf");
    invalid_because(strict.verify(&sign(&claims(NOW + 1, NOW + 60)), NOW), "issued in the future");
}

#[test]
fn leeway_additions_never_overflow() {
    let v = verifier(86_400);
    let t = sign(&claims(NOW, NOW + 3600));
    // A clock at either end of i64: refused, never a panic or a wrapped comparison.
    assert_eq!(v.verify(&t, i64::MAX), Err(TokenError::Expired));
    invalid_because(v.verify(&t, i64::MIN), "issued in the future");
    // The cached path applies the same checks.
    assert!(v.verify(&t, NOW).is_ok());
    assert_eq!(v.verify(&t, i64::MAX), Err(TokenError::Expired));
    let mut c = claims(NOW, NOW + 3600);
    c["nbf"] = NOW.into();
    invalid_because(v.verify(&sign(&c), i64::MIN), "issued in the future");
}

#[test]
fn a_crit_header_is_invalid_whatever_it_names() {
    let v = verifier(86_400);
    let payload = claims(NOW, NOW + 3600).to_string();
    for header in [
        r#"{"alg":"EdDSA","crit":["exp"]}"#,
        r#"{"alg":"EdDSA","crit":["b64"],"b64":false}"#,
        r#"{"alg":"EdDSA","crit":["x-unknown"],"x-unknown":1}"#,
        r#"{"alg":"EdDSA","crit":[]}"#,
        r#"{"alg":"EdDSA","crit":null}"#,
        r#"{"crit":["exp"],"alg":"EdDSA"}"#,
        // An escaped name is the same name.
        r#"{"alg":"EdDSA","cr\u0069t":["exp"]}"#,
    ] {
        let t = sign_raw(&key(), header, &payload);
        invalid_because(v.verify(&t, NOW), "crit");
    }
    // jsonwebtoken's own header type carries `crit` too: a token it mints with one is refused.
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    h.crit = Some(vec!["exp".into()]);
    let der = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_der(&key()).unwrap();
    let t = jsonwebtoken::encode(&h, &claims(NOW, NOW + 3600), &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()))
        .unwrap();
    invalid_because(v.verify(&t, NOW), "crit");
}

#[test]
fn headers_that_could_be_read_two_ways_are_invalid() {
    let v = verifier(86_400);
    let payload = claims(NOW, NOW + 3600).to_string();
    for (header, why) in [
        (r#"{"alg":"EdDSA","alg":"EdDSA"}"#, "twice"),
        (r#"{"alg":"none","alg":"EdDSA"}"#, "twice"),
        (r#"{"alg":"EdDSA","kid":"a","kid":"b"}"#, "twice"),
        (r#"{"alg":"HS256"}"#, "not accepted"),
        (r#"{"typ":"JWT"}"#, "no alg"),
        (r#"{"alg":7}"#, "malformed header"),
        (r#"["alg","EdDSA"]"#, "malformed header"),
    ] {
        invalid_because(v.verify(&sign_raw(&key(), header, &payload), NOW), why);
    }
}

#[test]
fn override_tokens_follow_the_same_rules() {
    let k = key();
    let vk = k.verifying_key();
    let (good, _) = mint_override(&k, "unit-agent", "appr-1", "hash", 300, NOW).unwrap();
    assert!(verify_override(&good, &vk, NOW).is_ok());
    assert!(verify_override(&good, &vk, i64::MAX).is_err(), "expired, and no overflow");
    assert!(verify_override(&good, &vk, i64::MIN).is_err(), "issued in the future, and no overflow");
    let raw = |iat: i64, exp: i64| {
        serde_json::json!({"iss": "uapk-gateway", "sub": "unit-agent", "approval_id": "appr-1",
            "action_hash": "hash", "iat": iat, "exp": exp, "jti": "j"})
        .to_string()
    };
    let h = r#"{"alg":"EdDSA","typ":"JWT"}"#;
    assert!(verify_override(&sign_raw(&k, h, &raw(NOW, NOW + 300)), &vk, NOW).is_ok(), "control");
    for (name, t) in [
        ("overflow attack", sign_raw(&k, h, &raw(-(1i64 << 62), i64::MAX - 1))),
        ("exp after 9999", sign_raw(&k, h, &raw(NOW, MAX_TIME_CLAIM + 1))),
        ("negative iat", sign_raw(&k, h, &raw(-5, NOW + 300))),
        ("crit", sign_raw(&k, r#"{"alg":"EdDSA","crit":["exp"]}"#, &raw(NOW, NOW + 300))),
        ("duplicate alg", sign_raw(&k, r#"{"alg":"EdDSA","alg":"EdDSA"}"#, &raw(NOW, NOW + 300))),
    ] {
        let OverrideError::Invalid(why) = verify_override(&t, &vk, NOW).expect_err(name);
        assert!(!why.is_empty(), "{name}");
    }
    // Minting refuses a ttl that would put exp out of range instead of wrapping.
    assert!(mint_override(&k, "unit-agent", "appr-1", "hash", i64::MAX, NOW).is_err());
    assert!(mint_override(&k, "unit-agent", "appr-1", "hash", MAX_TIME_CLAIM, NOW).is_err());
}

#[test]
fn minting_refuses_absurd_time_claims() {
    let base: CapabilityClaims = serde_json::from_value(claims(NOW, NOW + 60)).unwrap();
    assert!(mint(&key(), None, &base).is_ok());
    for (iat, exp, nbf) in [(NOW, MAX_TIME_CLAIM + 1, None), (-1, NOW, None), (NOW, NOW + 60, Some(-1))] {
        let c = CapabilityClaims { iat, exp, nbf, ..base.clone() };
        assert!(mint(&key(), None, &c).is_err(), "iat {iat} exp {exp} nbf {nbf:?}");
    }
}
