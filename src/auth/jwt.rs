//! HS256 access tokens. Only HS256 is accepted: `none`, HS512, RS256 and
//! anything else fail validation, as do bad signatures and expired tokens.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngExt;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Token claims: `sub` is the user id as a string (RFC 7519).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub username: String,
    pub iat: u64,
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

    /// Issues a token for the user.
    pub fn issue(&self, user_id: i64, username: &str) -> String {
        let iat = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            username: username.to_string(),
            iat,
            exp: iat + self.ttl_secs,
        };
        // HS256 with an HMAC key cannot fail to encode.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding with an HMAC key")
    }

    /// Verifies a token and returns `(user_id, username)`.
    pub fn verify(&self, token: &str) -> Result<(i64, String), TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        let id: i64 = data.claims.sub.parse().map_err(|_| TokenError::Invalid)?;
        if id <= 0 {
            return Err(TokenError::Invalid);
        }
        Ok((id, data.claims.username))
    }
}

/// Reads the signing secret kept at `path`, or generates and stores one
/// (mode 0600) so tokens survive restarts.
pub fn load_or_create_secret(path: &Path) -> std::io::Result<SecretString> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= crate::config::MIN_SECRET_BYTES => {
            return Ok(SecretString::from(s.trim().to_string()));
        }
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} holds a secret shorter than {} bytes; delete it to have a new one generated",
                path.display(),
                crate::config::MIN_SECRET_BYTES
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 48];
    rand::rng().fill(&mut bytes[..]);
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    write_private(path, &secret)?;
    Ok(SecretString::from(secret))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}
