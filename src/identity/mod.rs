//! Agent identity: Ed25519 key files, capability tokens (compact JWS, `alg: EdDSA` only) and
//! the gateway's override tokens (SPEC §6).
//!
//! A token's signature is checked before any claim is trusted; its unverified `sub` is used only
//! to choose which agent's manifest (and so which issuer keys) verifies it. Verified tokens are
//! cached by the SHA-256 of their bytes until they expire, so a request costs a hash and a map
//! lookup, not a signature verification.

mod keys;
mod token;

pub use keys::{generate_key_files, load_signing_key, parse_verifying_key_pem, verifying_key_pem};
pub use token::{
    Audience, CapabilityClaims, Constraints, CounterpartyConstraint, IssuerKey, ParamConstraint, TokenPolicy,
    TokenVerifier, mint, unverified_subject, verify_override,
};
pub(crate) use token::{OverrideClaims, OverrideError, mint_override, token_policy_for};

/// Errors of key handling and minting. Messages name files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A key file could not be read, created, written or parsed.
    #[error("{path}: {message}")]
    KeyFile {
        /// The file's path.
        path: String,
        /// What went wrong with it (never key material).
        message: String,
    },
    /// Key material that is not usable: not an Ed25519 key in the expected PEM form, or not
    /// encodable.
    #[error("invalid key: {0}")]
    Key(String),
    /// A token could not be minted (a time claim out of range, or signing failed).
    #[error("cannot mint the token: {0}")]
    Mint(String),
}
