//! Login tokens: HS256 JWTs signed by the app's backend with the shared secret.
//!
//! The validity window (`nbf` to `exp`) is checked against the time the caller passes in, not
//! the system clock, so the rule is testable and the core stays free of clocks.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Longest uid (`sub`) and device id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Optional (RFC 7519 §4.1.5): a backend may issue a token that only becomes valid later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// A token for `uid` that expires at `exp` (Unix seconds), signed as the app's backend would
/// (development and tests: `imgate token`).
pub fn issue(secret: &[u8], uid: &str, exp: u64) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: uid.to_owned(),
            exp,
            nbf: None,
        },
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

/// Why a token was refused; all map to Error UNAUTHENTICATED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Malformed,
    Expired,
    NotYetValid,
    BadSubject,
}

impl AuthError {
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Malformed => "invalid token",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::BadSubject => "token subject must be 1-64 bytes",
        }
    }
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked in `verify` against the caller's clock; `exp` must still be present.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp".to_owned(), "sub".to_owned()].into();
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Returns the uid of a valid token at time `now_secs` (Unix seconds). Both ends of the
    /// validity window get the same (zero) leeway: a token is valid from second `nbf` up to,
    /// not including, second `exp`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<String, AuthError> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| AuthError::Malformed)?;
        if data.claims.exp <= now_secs {
            return Err(AuthError::Expired);
        }
        if data.claims.nbf.is_some_and(|nbf| nbf > now_secs) {
            return Err(AuthError::NotYetValid);
        }
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > MAX_ID_BYTES {
            return Err(AuthError::BadSubject);
        }
        Ok(sub)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    #[derive(Serialize)]
    struct Out<'a> {
        sub: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        nbf: Option<u64>,
    }

    pub(crate) fn token(secret: &[u8], sub: &str, exp: Option<u64>) -> String {
        token_with_nbf(secret, sub, None, exp)
    }

    pub(crate) fn token_with_nbf(
        secret: &[u8],
        sub: &str,
        nbf: Option<u64>,
        exp: Option<u64>,
    ) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &Out { sub, exp, nbf },
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn accepts_valid_and_refuses_everything_else() {
        let v = Verifier::new(b"secret");
        assert_eq!(
            v.verify(&token(b"secret", "alice", Some(2000)), 1000),
            Ok("alice".into())
        );
        assert_eq!(
            v.verify(&token(b"secret", "alice", Some(1000)), 1000),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(&token(b"other", "alice", Some(2000)), 1000),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            v.verify(&token(b"secret", "alice", None), 1000),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            v.verify(&token(b"secret", "", Some(2000)), 1000),
            Err(AuthError::BadSubject)
        );
        let longest = "x".repeat(MAX_ID_BYTES);
        assert_eq!(
            v.verify(&token(b"secret", &longest, Some(2000)), 1000),
            Ok(longest.clone())
        );
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert_eq!(
            v.verify(&token(b"secret", &long, Some(2000)), 1000),
            Err(AuthError::BadSubject)
        );
        assert_eq!(v.verify("not.a.jwt", 1000), Err(AuthError::Malformed));
        assert_eq!(
            v.verify(&issue(b"secret", "carol", 5000), 4999),
            Ok("carol".into())
        );
        let none_alg =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(v.verify(none_alg, 1000), Err(AuthError::Malformed));
    }

    #[test]
    fn nbf_is_checked_like_exp_with_the_callers_time() {
        let v = Verifier::new(b"secret");
        let at = |nbf: u64, now: u64| {
            v.verify(
                &token_with_nbf(b"secret", "alice", Some(nbf), Some(9000)),
                now,
            )
        };
        assert_eq!(at(1000 + 3600, 1000), Err(AuthError::NotYetValid));
        assert_eq!(at(1001, 1000), Err(AuthError::NotYetValid));
        assert_eq!(at(1000, 1000), Ok("alice".into()));
        assert_eq!(at(999, 1000), Ok("alice".into()));
        assert_eq!(AuthError::NotYetValid.message(), "token not yet valid");
        // A non-numeric nbf is not a token we understand.
        #[derive(Serialize)]
        struct Text<'a> {
            sub: &'a str,
            exp: u64,
            nbf: &'a str,
        }
        let text = encode(
            &Header::new(Algorithm::HS256),
            &Text {
                sub: "alice",
                exp: 9000,
                nbf: "soon",
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(v.verify(&text, 1000), Err(AuthError::Malformed));
    }
}
