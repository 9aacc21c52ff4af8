//! Capability tokens (issued by the platform, presented by agents) and override tokens (minted
//! by the gateway when a human approves an escalation).

use super::IdentityError;
use crate::policy::Code;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// Leeway on the time claims of override tokens, seconds. Capability tokens use their manifest's
/// `capability.leeway` ([`TokenPolicy::leeway_secs`]).
pub(super) const LEEWAY: i64 = 60;
/// The latest time claim accepted: 9999-12-31T23:59:59Z. Later values, and negative ones, are
/// refused as invalid: no honest issuer writes them, and bounding them keeps every comparison
/// and difference far from `i64` overflow.
pub(crate) const MAX_TIME_CLAIM: i64 = 253_402_300_799;
const CACHE_MAX: usize = 10_000;

/// `aud`: a string or an array of strings on the wire, always an array when minted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Audience(pub Vec<String>);

impl From<Vec<String>> for Audience {
    fn from(v: Vec<String>) -> Self {
        Audience(v)
    }
}

impl Serialize for Audience {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Audience {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Repr::deserialize(d)? {
            Repr::One(s) => Audience(vec![s]),
            Repr::Many(v) => Audience(v),
        })
    }
}

/// Per-currency caps given as decimal strings ("100.00"); numbers and garbage are refused.
fn de_money<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Decimal>, D::Error> {
    let raw = BTreeMap::<String, String>::deserialize(d)?;
    raw.into_iter()
        .map(|(cur, amount)| {
            let value =
                Decimal::from_str_exact(amount.trim()).ok().filter(|v| !v.is_sign_negative()).ok_or_else(|| {
                    serde::de::Error::custom(format!("amount_max.{cur} is not a non-negative decimal string"))
                })?;
            Ok((cur.to_ascii_uppercase(), value))
        })
        .collect()
}

fn ser_money<S: Serializer>(m: &BTreeMap<String, Decimal>, s: S) -> Result<S::Ok, S::Error> {
    m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect::<BTreeMap<_, _>>().serialize(s)
}

/// `constraints.counterparties` of a capability token: allow and deny lists for the `counterparty`
/// param (ASCII case-insensitive, exact or `prefix*`; deny wins). A request that names no
/// counterparty is refused `token_counterparty_not_allowed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterpartyConstraint {
    /// Counterparties allowed; empty: any the deny list does not name.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Counterparties refused, even when the allow list names them.
    #[serde(default)]
    pub deny: Vec<String>,
}

fn de_opt_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    let raw = Option::<String>::deserialize(d)?;
    raw.map(|s| {
        Decimal::from_str_exact(s.trim())
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a decimal string")))
    })
    .transpose()
}

fn ser_opt_decimal<S: Serializer>(v: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
    v.map(|d| d.to_string()).serialize(s)
}

/// `constraints.params.<name>`: the values a declared param may take under this token (lists
/// match ASCII case-insensitively; `min`/`max` are decimal strings, inclusive). Unknown keys make
/// the token invalid rather than silently unconstrained.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamConstraint {
    /// `allow`: values the param may take; empty: any value the deny list does not name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// `deny`: values refused (`token_param_not_allowed`), even when allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// `min`: the smallest value allowed, inclusive (`token_param_out_of_range` below it).
    #[serde(
        default,
        deserialize_with = "de_opt_decimal",
        serialize_with = "ser_opt_decimal",
        skip_serializing_if = "Option::is_none"
    )]
    pub min: Option<Decimal>,
    /// `max`: the largest value allowed, inclusive (`token_param_out_of_range` above it).
    #[serde(
        default,
        deserialize_with = "de_opt_decimal",
        serialize_with = "ser_opt_decimal",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Decimal>,
}

/// Narrowing constraints a token may carry (it can only narrow what the manifest allows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Constraints {
    /// `amount_max`: the largest amount allowed per upper-case currency code, decimal strings on
    /// the wire (`token_amount_exceeds_cap`). When not empty, an amount in a currency it does not
    /// name is refused too.
    #[serde(default, deserialize_with = "de_money", serialize_with = "ser_money")]
    pub amount_max: BTreeMap<String, Decimal>,
    /// `jurisdictions`: the only values of the `jurisdiction` param allowed (exact, ASCII
    /// case-insensitive); a request that names none is refused `token_jurisdiction_not_allowed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdictions: Option<Vec<String>>,
    /// `counterparties`: allow and deny lists for the `counterparty` param.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counterparties: Option<CounterpartyConstraint>,
    /// Constraints on declared params, by param name (`token_param_not_allowed` /
    /// `token_param_out_of_range`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<BTreeMap<String, ParamConstraint>>,
}

/// The claims of a capability token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilityClaims {
    /// Issuer: the `capability.issuers[].id` of the agent's manifest whose key verifies the token.
    pub iss: String,
    /// Subject: the agent id, which picks the manifest (`agent.id`).
    pub sub: String,
    /// Audiences; one must be the manifest's `capability.audience`.
    pub aud: Audience,
    /// Expiry, unix seconds; the token is accepted until `exp` plus the leeway.
    pub exp: i64,
    /// Issue time, unix seconds; `exp - iat` must not exceed `capability.max_lifetime`.
    pub iat: i64,
    /// Not before, unix seconds: the token is refused until `nbf` minus the leeway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Token id, recorded with each decision; `capability.revoked` refuses it by this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Connectors the token grants (exact names); `None`: every connector the manifest allows
    /// (`token_tool_not_allowed` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectors: Option<Vec<String>>,
    /// Action types the token grants (exact); `None`: every action type the manifest allows
    /// (`token_action_type_not_allowed` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_types: Option<Vec<String>>,
    /// Narrowing constraints on amounts, jurisdictions, counterparties and params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Constraints>,
}

/// A token issuer the verifier trusts: its id and Ed25519 public key.
pub struct IssuerKey {
    /// The issuer id a token's `iss` names.
    pub id: String,
    /// The issuer's Ed25519 public key.
    pub key: VerifyingKey,
}

/// What verification needs from an agent's manifest.
pub struct TokenPolicy {
    /// A value a token's `aud` must contain (`capability.audience`).
    pub audience: String,
    /// The longest `exp - iat` accepted, seconds (`capability.max_lifetime`).
    pub max_lifetime_secs: i64,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, seconds (`capability.leeway`).
    pub leeway_secs: i64,
    /// The trusted issuers (`capability.issuers`).
    pub issuers: Vec<IssuerKey>,
    /// Token ids (`jti`) refused `capability_token_revoked` (`capability.revoked`).
    pub revoked: HashSet<String>,
}

/// The token rules of a validated manifest.
pub(crate) fn token_policy_for(m: &crate::config::Manifest) -> TokenPolicy {
    TokenPolicy {
        audience: m.capability.audience.clone(),
        max_lifetime_secs: i64::try_from(m.capability.max_lifetime.as_secs()).unwrap_or(i64::MAX),
        leeway_secs: i64::try_from(m.capability.leeway.as_secs()).unwrap_or(i64::MAX),
        issuers: m.capability.issuers.iter().map(|i| IssuerKey { id: i.id.clone(), key: i.key }).collect(),
        revoked: m.capability.revoked.clone(),
    }
}

/// Why a capability token was refused (SPEC §8 step 1). Messages never contain token bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// `capability_token_invalid`: malformed, badly signed, from an unknown issuer, for another
    /// audience, not valid yet, or with time claims out of range; the text says which.
    Invalid(String),
    /// `capability_token_expired`: past `exp` plus the leeway.
    Expired,
    /// `capability_token_revoked`: its `jti` is in `capability.revoked`.
    Revoked,
}

impl TokenError {
    pub(crate) fn code(&self) -> Code {
        match self {
            TokenError::Invalid(_) => Code::CapabilityTokenInvalid,
            TokenError::Expired => Code::CapabilityTokenExpired,
            TokenError::Revoked => Code::CapabilityTokenRevoked,
        }
    }
    pub(crate) fn message(&self) -> String {
        match self {
            TokenError::Invalid(why) => format!("the capability token is invalid: {why}"),
            TokenError::Expired => "the capability token has expired".into(),
            TokenError::Revoked => "the capability token has been revoked".into(),
        }
    }
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// The payload of a compact JWS as JSON, unverified.
fn unverified_payload(token: &str) -> Option<serde_json::Value> {
    let mut parts = token.split('.');
    let (_, payload, _, extra) = (parts.next()?, parts.next()?, parts.next()?, parts.next());
    if extra.is_some() {
        return None;
    }
    serde_json::from_slice(&b64url(payload)?).ok()
}

/// What the protected header says that matters here, read strictly: a member named twice, or
/// a `crit` member of any value, makes the whole token invalid.
struct ProtectedHeader {
    alg: Option<String>,
}

impl<'de> Deserialize<'de> for ProtectedHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = ProtectedHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ProtectedHeader, A::Error> {
                use serde::de::{Error, IgnoredAny};
                let mut seen = HashSet::new();
                let mut alg = None;
                // Names are decoded (escapes included) before they are compared.
                while let Some(name) = map.next_key::<String>()? {
                    if name == "crit" {
                        return Err(A::Error::custom("crit"));
                    }
                    if name == "alg" {
                        alg = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                    if !seen.insert(name) {
                        return Err(A::Error::custom("duplicate"));
                    }
                }
                Ok(ProtectedHeader { alg })
            }
        }
        d.deserialize_map(Members)
    }
}

/// Checks the protected header of a compact JWS before anything else of the token is used:
/// a JSON object, no member named twice, `alg: EdDSA`, and no `crit` member. `crit` lists
/// extensions the recipient must understand or reject the token (RFC 7515 §4.1.11); this
/// gateway understands none, so any `crit`, even an empty list, is refused.
fn check_protected_header(token: &str) -> Result<(), String> {
    let first = token.split('.').next().unwrap_or_default();
    let bytes = b64url(first).ok_or_else(|| "malformed header".to_string())?;
    let header = serde_json::from_slice::<ProtectedHeader>(&bytes).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("crit") {
            "the header has a crit parameter (no JWS extension is understood here)".to_string()
        } else if text.starts_with("duplicate") {
            "the header names a parameter twice".to_string()
        } else {
            "malformed header".to_string()
        }
    })?;
    match header.alg.as_deref() {
        Some("EdDSA") => Ok(()),
        Some(other) => {
            Err(format!("alg {:?} is not accepted (EdDSA only)", other.chars().take(16).collect::<String>()))
        }
        None => Err("the header has no alg".into()),
    }
}

/// A time claim (`exp`, `iat`, `nbf`) in the accepted range: 0 to [`MAX_TIME_CLAIM`].
fn time_claim_in_range(t: i64) -> bool {
    (0..=MAX_TIME_CLAIM).contains(&t)
}

/// `a + b` for time comparisons: widened, so no input can overflow.
fn wide_add(a: i64, b: i64) -> i128 {
    i128::from(a) + i128::from(b)
}

/// The `sub` claim read WITHOUT verification: only used to choose the manifest whose issuer
/// keys then verify the token.
pub fn unverified_subject(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Subject {
        sub: String,
    }
    let mut parts = token.split('.');
    let (_, payload, _, extra) = (parts.next()?, parts.next()?, parts.next()?, parts.next());
    if extra.is_some() {
        return None;
    }
    // Only `sub` is read; the other claims are skipped without building a tree.
    serde_json::from_slice::<Subject>(&b64url(payload)?).ok().map(|s| s.sub)
}

/// Verifies capability tokens for one agent's manifest, with a bounded cache of verified tokens.
pub struct TokenVerifier {
    policy: TokenPolicy,
    keys: HashMap<String, DecodingKey>,
    cache: RwLock<HashMap<[u8; 32], Arc<CapabilityClaims>>>,
}

impl TokenVerifier {
    /// A verifier of the tokens `policy` accepts, with an empty cache.
    pub fn new(policy: TokenPolicy) -> Self {
        let keys = policy.issuers.iter().map(|i| (i.id.clone(), DecodingKey::from_ed_der(i.key.as_bytes()))).collect();
        TokenVerifier { policy, keys, cache: RwLock::new(HashMap::new()) }
    }

    /// Time and revocation checks, applied on every use (cached or not).
    fn still_valid(&self, c: &CapabilityClaims, now: i64) -> Result<(), TokenError> {
        if i128::from(now) > wide_add(c.exp, self.policy.leeway_secs) {
            return Err(TokenError::Expired);
        }
        if c.nbf.is_some_and(|nbf| i128::from(nbf) > wide_add(now, self.policy.leeway_secs)) {
            return Err(TokenError::Invalid("not valid yet (nbf)".into()));
        }
        if c.jti.as_ref().is_some_and(|j| self.policy.revoked.contains(j)) {
            return Err(TokenError::Revoked);
        }
        Ok(())
    }

    /// Verifies `token` at `now` (unix seconds): protected header, signature, issuer, audience,
    /// time claims (with the policy's leeway), lifetime and revocation. Verified claims are cached
    /// by the token's SHA-256; time and revocation are checked again on every use.
    pub fn verify(&self, token: &str, now: i64) -> Result<Arc<CapabilityClaims>, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(&digest).cloned() {
            self.still_valid(&c, now)?;
            return Ok(c);
        }
        check_protected_header(token).map_err(TokenError::Invalid)?;
        let iss = unverified_payload(token)
            .and_then(|p| p.get("iss").and_then(|v| v.as_str()).map(str::to_string))
            .ok_or_else(|| TokenError::Invalid("malformed payload".into()))?;
        let key = self.keys.get(&iss).ok_or_else(|| TokenError::Invalid("unknown issuer".into()))?;
        let mut v = Validation::new(Algorithm::EdDSA);
        // Time claims are checked below against `now`, with the same leeway.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
        v.set_audience(&[&self.policy.audience]);
        v.set_issuer(&[&iss]);
        let data = jsonwebtoken::decode::<CapabilityClaims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            TokenError::Invalid(
                match e.kind() {
                    K::InvalidSignature => "bad signature",
                    K::InvalidAudience => "wrong audience",
                    K::InvalidIssuer => "wrong issuer",
                    K::MissingRequiredClaim(_) => "a required claim is missing",
                    K::Json(_) => "malformed claims",
                    _ => "malformed or unverifiable",
                }
                .to_string(),
            )
        })?;
        let c = data.claims;
        if ![c.exp, c.iat].into_iter().chain(c.nbf).all(time_claim_in_range) {
            return Err(TokenError::Invalid("a time claim is negative or after the year 9999".into()));
        }
        if i128::from(c.exp) - i128::from(c.iat) > i128::from(self.policy.max_lifetime_secs) {
            return Err(TokenError::Invalid("lifetime (exp - iat) above capability.max_lifetime".into()));
        }
        if i128::from(c.iat) > wide_add(now, self.policy.leeway_secs) {
            return Err(TokenError::Invalid("issued in the future (iat)".into()));
        }
        self.still_valid(&c, now)?;
        let c = Arc::new(c);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, v| wide_add(v.exp, self.policy.leeway_secs) >= i128::from(now));
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, c.clone());
        Ok(c)
    }
}

fn encoding_key(key: &SigningKey) -> Result<EncodingKey, IdentityError> {
    let der = key.to_pkcs8_der().map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok(EncodingKey::from_ed_der(der.as_bytes()))
}

/// Mints a capability token: `{alg: EdDSA, typ: JWT, kid?}`. Time claims outside the range
/// verification accepts are refused rather than minted into a token no gateway would take.
pub fn mint(key: &SigningKey, kid: Option<&str>, claims: &CapabilityClaims) -> Result<String, IdentityError> {
    if ![claims.exp, claims.iat].into_iter().chain(claims.nbf).all(time_claim_in_range) {
        return Err(IdentityError::Mint("a time claim is negative or after the year 9999".into()));
    }
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, &encoding_key(key)?).map_err(|e| IdentityError::Mint(e.to_string()))
}

/// The claims of an override token (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideClaims {
    pub iss: String,
    pub sub: String,
    pub approval_id: String,
    pub action_hash: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
}

pub(super) const OVERRIDE_ISSUER: &str = "uapk-gateway";

pub(crate) fn mint_override(
    key: &SigningKey,
    sub: &str,
    approval_id: &str,
    action_hash: &str,
    ttl_secs: i64,
    now: i64,
) -> Result<(String, OverrideClaims), IdentityError> {
    use rand::RngCore;
    let exp = now
        .checked_add(ttl_secs)
        .filter(|&e| time_claim_in_range(e) && time_claim_in_range(now))
        .ok_or_else(|| IdentityError::Mint("override_ttl puts exp out of range".into()))?;
    let mut jti = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut jti);
    let claims = OverrideClaims {
        iss: OVERRIDE_ISSUER.into(),
        sub: sub.into(),
        approval_id: approval_id.into(),
        action_hash: action_hash.into(),
        exp,
        iat: now,
        jti: hex::encode(jti),
    };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &encoding_key(key)?)
        .map_err(|e| IdentityError::Mint(e.to_string()))?;
    Ok((token, claims))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverrideError {
    Invalid(String),
}

/// Verifies an override token against the gateway's own key, under the same header and
/// time-claim rules as capability tokens.
pub fn verify_override(token: &str, gateway_key: &VerifyingKey, now: i64) -> Result<OverrideClaims, OverrideError> {
    let invalid = |m: &str| OverrideError::Invalid(m.to_string());
    check_protected_header(token).map_err(OverrideError::Invalid)?;
    let mut v = Validation::new(Algorithm::EdDSA);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "iss", "sub"]);
    v.set_issuer(&[OVERRIDE_ISSUER]);
    let data = jsonwebtoken::decode::<OverrideClaims>(token, &DecodingKey::from_ed_der(gateway_key.as_bytes()), &v)
        .map_err(|_| invalid("bad signature or claims"))?;
    let c = data.claims;
    if !time_claim_in_range(c.exp) || !time_claim_in_range(c.iat) {
        return Err(invalid("a time claim is negative or after the year 9999"));
    }
    if i128::from(c.iat) > wide_add(now, LEEWAY) {
        return Err(invalid("issued in the future (iat)"));
    }
    if i128::from(now) > wide_add(c.exp, LEEWAY) {
        return Err(invalid("expired"));
    }
    Ok(c)
}

/// Token time claims and protected headers: overflow, absurd values, `crit`, duplicates.
#[cfg(test)]
mod tests {
    use super::*;
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
        let t =
            jsonwebtoken::encode(&h, &claims(NOW, NOW + 3600), &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()))
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
}
