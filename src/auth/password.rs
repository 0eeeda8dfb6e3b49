//! argon2id password hashing with OWASP's parameters (m = 19 MiB, t = 2,
//! p = 1, the `argon2` crate's defaults), run on the blocking pool and
//! bounded by a semaphore so a login burst cannot exhaust memory or starve
//! the async workers.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use tokio::sync::Semaphore;

#[derive(Clone)]
pub struct PasswordHasher {
    permits: Arc<Semaphore>,
    /// A hash of a random password, verified against when the user does not
    /// exist so that the response time does not reveal it.
    dummy: Arc<String>,
}

impl PasswordHasher {
    pub fn new(concurrency: usize) -> Self {
        let dummy = Argon2::default()
            .hash_password(b"dummy password that never matches")
            .map(|h| h.to_string())
            .unwrap_or_default();
        PasswordHasher {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy: Arc::new(dummy),
        }
    }

    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(move || {
            Argon2::default()
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("argon2 hash failed: {e}"))
        })
        .await?
    }

    /// True when `password` matches the PHC string `hash`.
    pub async fn verify(&self, password: String, hash: String) -> anyhow::Result<bool> {
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(move || {
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| anyhow::anyhow!("stored hash is not a PHC string: {e}"))?;
            Ok(Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok())
        })
        .await?
    }

    /// Spends the time of one verification and returns false.
    pub async fn verify_dummy(&self, password: String) -> anyhow::Result<bool> {
        self.verify(password, self.dummy.to_string()).await?;
        Ok(false)
    }
}
