//! HS256 access tokens. Only HS256 is accepted: `none`, HS512, RS256 and
//! anything else fail validation, as do bad signatures and expired tokens.
//!
//! Beyond the signature and `exp` (5 s leeway): an `nbf` (not before), if
//! present, must have passed (same leeway); `iat` may not be more than
//! [`MAX_IAT_SKEW_SECS`] in the future (a token "issued" later than now was
//! not issued by a server with a sane clock); `sub` must be a user id in
//! canonical form: decimal digits, no sign, no leading zero, no spaces,
//! positive and within `i64` (docs/decisions/0011-input-hardening.md).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// How far in the future a token's `iat` may lie (clock skew between
/// nodes), in seconds.
pub const MAX_IAT_SKEW_SECS: u64 = 60;

/// Token claims: `sub` is the user id as a string (RFC 7519). We never
/// issue `nbf`; a token that has one is checked against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub username: String,
    pub iat: u64,
    pub exp: u64,
    /// The account's token key when the token was issued (see
    /// `store::TokenCheck`); tokens without one are refused.
    #[serde(default)]
    pub key: String,
    /// The token's random id, for revoking it alone.
    #[serde(default)]
    pub jti: String,
}

/// A token whose signature and claims checked out; the account behind it
/// is checked by `domain::Accounts`.
#[derive(Debug, Clone)]
pub struct Verified {
    pub id: UserId,
    pub key: String,
    pub jti: String,
    pub exp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token")]
    Invalid,
}

#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
}

impl JwtKeys {
    pub fn new(secret: &SecretString, ttl_secs: u64) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_exp = true;
        // Checked when present (the library's rule); required only if listed below.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            ttl_secs,
        }
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Issues a token for the user, bound to the account's token key.
    pub fn issue(&self, user_id: UserId, username: &str, key: &str) -> String {
        let iat = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            username: username.to_string(),
            iat,
            exp: iat + self.ttl_secs,
            key: key.to_string(),
            jti: format!("{:032x}", rand::random::<u128>()),
        };
        // HS256 with an HMAC key cannot fail to encode.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding with an HMAC key")
    }

    /// Verifies a token and returns whom it was issued to.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        let now = jsonwebtoken::get_current_timestamp();
        if data.claims.iat > now.saturating_add(MAX_IAT_SKEW_SECS) {
            return Err(TokenError::Invalid);
        }
        let id = parse_sub(&data.claims.sub).ok_or(TokenError::Invalid)?;
        let c = data.claims;
        if c.key.is_empty() || c.jti.is_empty() || c.jti.len() > 64 {
            return Err(TokenError::Invalid);
        }
        Ok(Verified {
            id,
            key: c.key,
            jti: c.jti,
            exp: c.exp,
        })
    }
}

/// A `sub` in the one form we issue: `UserId::to_string()` of a positive
/// id. `str::parse` alone would also take `+5` and `05`, so the same
/// account would have several spellings.
fn parse_sub(sub: &str) -> Option<UserId> {
    let canonical = sub.bytes().all(|b| b.is_ascii_digit()) && !sub.starts_with('0');
    if !canonical {
        return None;
    }
    match sub.parse::<i64>() {
        Ok(id) if id > 0 => Some(UserId(id)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::get_current_timestamp as now;
    use serde_json::{Value, json};

    fn keys() -> JwtKeys {
        JwtKeys::new(
            &SecretString::from("jwt-unit-test-secret-0123456789abcdef"),
            3600,
        )
    }

    fn sign(claims: &Value) -> String {
        let key = EncodingKey::from_secret(b"jwt-unit-test-secret-0123456789abcdef");
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    fn claims(sub: &str) -> Value {
        json!({"sub": sub, "username": "alice", "iat": now(), "exp": now() + 600, "key": "k", "jti": "j"})
    }

    #[test]
    fn issued_tokens_verify() {
        let k = keys();
        let v = k.verify(&k.issue(UserId(42), "alice", "key42")).unwrap();
        assert_eq!(v.id, UserId(42));
        assert_eq!(v.key, "key42");
        assert_eq!(v.jti.len(), 32);
        let again = k.verify(&k.issue(UserId(42), "alice", "key42")).unwrap();
        assert_ne!(v.jti, again.jti, "every token has its own id");
        let max = k.issue(UserId(i64::MAX), "max", "k");
        assert_eq!(k.verify(&max).unwrap().id, UserId(i64::MAX));
    }

    #[test]
    fn tokens_without_a_key_or_id_are_refused() {
        let k = keys();
        for field in ["key", "jti"] {
            let mut c = claims("7");
            c.as_object_mut().unwrap().remove(field);
            assert!(k.verify(&sign(&c)).is_err(), "without {field}");
            c[field] = json!("");
            assert!(k.verify(&sign(&c)).is_err(), "empty {field}");
        }
    }

    #[test]
    fn sub_must_be_a_canonical_positive_id() {
        let k = keys();
        assert_eq!(k.verify(&sign(&claims("7"))).unwrap().id, UserId(7));
        for bad in [
            "",
            "0",
            "-7",
            "+7",
            "07",
            " 7",
            "7 ",
            "7.0",
            "1e3",
            "٧",
            "0x7",
            "9223372036854775808",
            "99999999999999999999",
        ] {
            assert!(k.verify(&sign(&claims(bad))).is_err(), "sub {bad:?}");
        }
        let mut numeric = claims("7");
        numeric["sub"] = json!(7);
        assert!(k.verify(&sign(&numeric)).is_err(), "sub must be a string");
    }

    #[test]
    fn nbf_is_honoured_when_present() {
        let k = keys();
        let mut c = claims("7");
        c["nbf"] = json!(now() - 10);
        assert!(k.verify(&sign(&c)).is_ok());
        c["nbf"] = json!(now() + 120);
        assert!(k.verify(&sign(&c)).is_err(), "not valid yet");
        c["nbf"] = json!("soon");
        assert!(k.verify(&sign(&c)).is_err(), "malformed nbf");
    }

    #[test]
    fn iat_more_than_a_minute_ahead_is_refused() {
        let k = keys();
        let mut c = claims("7");
        c["iat"] = json!(now() + 30);
        assert!(k.verify(&sign(&c)).is_ok(), "within the skew");
        c["iat"] = json!(now() + MAX_IAT_SKEW_SECS + 30);
        assert!(k.verify(&sign(&c)).is_err());
        c["iat"] = json!(u64::MAX);
        assert!(k.verify(&sign(&c)).is_err());
    }
}
