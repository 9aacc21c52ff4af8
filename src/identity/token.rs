//! Capability tokens (issued by the platform, presented by agents) and override tokens (minted
//! by the gateway when a human approves an escalation).

use super::IdentityError;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// Leeway on time claims, seconds.
pub const LEEWAY: i64 = 60;
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterpartyConstraint {
    #[serde(default)]
    pub allow: Vec<String>,
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    #[serde(
        default,
        deserialize_with = "de_opt_decimal",
        serialize_with = "ser_opt_decimal",
        skip_serializing_if = "Option::is_none"
    )]
    pub min: Option<Decimal>,
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
    #[serde(default, deserialize_with = "de_money", serialize_with = "ser_money")]
    pub amount_max: BTreeMap<String, Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdictions: Option<Vec<String>>,
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
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectors: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_types: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Constraints>,
}

pub struct IssuerKey {
    pub id: String,
    pub key: VerifyingKey,
}

/// What verification needs from an agent's manifest.
pub struct TokenPolicy {
    pub audience: String,
    pub max_lifetime_secs: i64,
    pub issuers: Vec<IssuerKey>,
    pub revoked: HashSet<String>,
}

/// The token rules of a validated manifest.
pub fn token_policy_for(m: &crate::config::Manifest) -> TokenPolicy {
    TokenPolicy {
        audience: m.capability.audience.clone(),
        max_lifetime_secs: m.capability.max_lifetime.as_secs() as i64,
        issuers: m.capability.issuers.iter().map(|i| IssuerKey { id: i.id.clone(), key: i.key }).collect(),
        revoked: m.capability.revoked.clone(),
    }
}

/// Why a capability token was refused (SPEC §8 step 1). Messages never contain token bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Invalid(String),
    Expired,
    Revoked,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Invalid(_) => "capability_token_invalid",
            TokenError::Expired => "capability_token_expired",
            TokenError::Revoked => "capability_token_revoked",
        }
    }
    pub fn message(&self) -> String {
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
    pub fn new(policy: TokenPolicy) -> Self {
        let keys = policy.issuers.iter().map(|i| (i.id.clone(), DecodingKey::from_ed_der(i.key.as_bytes()))).collect();
        TokenVerifier { policy, keys, cache: RwLock::new(HashMap::new()) }
    }

    /// Time and revocation checks, applied on every use (cached or not).
    fn still_valid(&self, c: &CapabilityClaims, now: i64) -> Result<(), TokenError> {
        if now > c.exp + LEEWAY {
            return Err(TokenError::Expired);
        }
        if c.nbf.is_some_and(|nbf| nbf > now + LEEWAY) {
            return Err(TokenError::Invalid("not valid yet (nbf)".into()));
        }
        if c.jti.as_ref().is_some_and(|j| self.policy.revoked.contains(j)) {
            return Err(TokenError::Revoked);
        }
        Ok(())
    }

    pub fn verify(&self, token: &str, now: i64) -> Result<Arc<CapabilityClaims>, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(&digest).cloned() {
            self.still_valid(&c, now)?;
            return Ok(c);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("malformed header".into()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid(format!("alg {:?} is not accepted (EdDSA only)", header.alg)));
        }
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
        if c.exp - c.iat > self.policy.max_lifetime_secs {
            return Err(TokenError::Invalid("lifetime (exp - iat) above capability.max_lifetime".into()));
        }
        if c.iat > now + LEEWAY {
            return Err(TokenError::Invalid("issued in the future (iat)".into()));
        }
        self.still_valid(&c, now)?;
        let c = Arc::new(c);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, v| v.exp + LEEWAY >= now);
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

/// Mints a capability token: `{alg: EdDSA, typ: JWT, kid?}`.
pub fn mint(key: &SigningKey, kid: Option<&str>, claims: &CapabilityClaims) -> Result<String, IdentityError> {
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

pub const OVERRIDE_ISSUER: &str = "uapk-gateway";

pub fn mint_override(
    key: &SigningKey,
    sub: &str,
    approval_id: &str,
    action_hash: &str,
    ttl_secs: i64,
    now: i64,
) -> Result<(String, OverrideClaims), IdentityError> {
    use rand::RngCore;
    let mut jti = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut jti);
    let claims = OverrideClaims {
        iss: OVERRIDE_ISSUER.into(),
        sub: sub.into(),
        approval_id: approval_id.into(),
        action_hash: action_hash.into(),
        exp: now + ttl_secs,
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

impl OverrideError {
    pub fn code(&self) -> &'static str {
        "override_token_invalid"
    }
}

/// Verifies an override token against the gateway's own key.
pub fn verify_override(token: &str, gateway_key: &VerifyingKey, now: i64) -> Result<OverrideClaims, OverrideError> {
    let invalid = |m: &str| OverrideError::Invalid(m.to_string());
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed header"))?;
    if header.alg != Algorithm::EdDSA {
        return Err(invalid("alg is not EdDSA"));
    }
    let mut v = Validation::new(Algorithm::EdDSA);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "iss", "sub"]);
    v.set_issuer(&[OVERRIDE_ISSUER]);
    let data = jsonwebtoken::decode::<OverrideClaims>(token, &DecodingKey::from_ed_der(gateway_key.as_bytes()), &v)
        .map_err(|_| invalid("bad signature or claims"))?;
    if now > data.claims.exp + LEEWAY {
        return Err(invalid("expired"));
    }
    Ok(data.claims)
}
