//! argon2id password hashing with OWASP's parameters (m = 19 MiB, t = 2,
//! p = 1, the `argon2` crate's defaults), run on the blocking pool and
//! bounded by a semaphore so a login burst cannot exhaust memory or starve
//! the async workers.
//!
//! The work area is allocated here, not by the `argon2` crate (see
//! [`Argon2WorkArea`]).

use std::sync::Arc;

use argon2::password_hash::phc::{Output, ParamsString, PasswordHash, Salt};
use argon2::password_hash::{
    self, CustomizedPasswordHasher, PasswordHasher as _, PasswordVerifier as _,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
        let dummy = Argon2WorkArea::default()
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
            Argon2WorkArea::default()
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
            Ok(Argon2WorkArea::default()
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

/// argon2 with its work area (19 MiB) allocated by a plain `vec!`.
///
/// The crate allocates it with `alloc_zeroed`. jemalloc serves a large
/// zeroed allocation by discarding the pages it holds (`MADV_DONTNEED`),
/// and the hash then faults every page back in: 4,870 page faults per hash,
/// a third of the login rate under a burst. A plain allocation reuses the
/// pages the previous hash freed. The PHC encoding and the constant-time
/// verification are the crate's (`PasswordVerifier` comes with
/// [`CustomizedPasswordHasher`]).
#[derive(Default)]
struct Argon2WorkArea {
    algorithm: Algorithm,
    version: Version,
    params: Params,
}

impl password_hash::PasswordHasher<PasswordHash> for Argon2WorkArea {
    fn hash_password_with_salt(
        &self,
        password: &[u8],
        salt: &[u8],
    ) -> password_hash::Result<PasswordHash> {
        let salt = Salt::new(salt)?;
        let params = &self.params;
        let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let mut out = [0u8; Output::MAX_LENGTH];
        let out = out.get_mut(..len).ok_or(password_hash::Error::OutputSize)?;
        let mut blocks = vec![Block::default(); params.block_count()];
        Argon2::new(self.algorithm, self.version, params.clone()).hash_password_into_with_memory(
            password,
            &salt,
            out,
            &mut blocks[..],
        )?;
        Ok(PasswordHash {
            algorithm: self.algorithm.ident(),
            version: Some(self.version.into()),
            params: ParamsString::try_from(params)?,
            salt: Some(salt),
            hash: Some(Output::new(out)?),
        })
    }
}

impl CustomizedPasswordHasher<PasswordHash> for Argon2WorkArea {
    type Params = Params;

    fn hash_password_customized(
        &self,
        password: &[u8],
        salt: &[u8],
        alg_id: Option<&str>,
        version: Option<u32>,
        params: Params,
    ) -> password_hash::Result<PasswordHash> {
        Argon2WorkArea {
            algorithm: alg_id
                .map(Algorithm::try_from)
                .transpose()?
                .unwrap_or_default(),
            version: version
                .map(Version::try_from)
                .transpose()?
                .unwrap_or_default(),
            params,
        }
        .hash_password_with_salt(password, salt)
    }
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};

    use super::*;

    /// Hashes made here verify with the crate's own code and the other
    /// way round; a wrong password or a changed parameter does not.
    #[test]
    fn the_work_area_hasher_agrees_with_the_crate() {
        let ours = Argon2WorkArea::default()
            .hash_password(b"correct horse")
            .unwrap();
        let theirs = Argon2::default().hash_password(b"correct horse").unwrap();
        assert!(
            ours.to_string()
                .starts_with("$argon2id$v=19$m=19456,t=2,p=1$")
        );
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &ours)
                .is_ok()
        );
        assert!(
            Argon2WorkArea::default()
                .verify_password(b"correct horse", &theirs)
                .is_ok()
        );
        assert!(
            Argon2WorkArea::default()
                .verify_password(b"correct horsf", &theirs)
                .is_err()
        );
        assert!(
            Argon2::default()
                .verify_password(b"correct horsf", &ours)
                .is_err()
        );
        // Same salt and password, the crate's hash: byte for byte the same.
        let salt = ours.salt.unwrap();
        let again = Argon2::default()
            .hash_password_with_salt(b"correct horse", &salt)
            .unwrap();
        assert_eq!(again.to_string(), ours.to_string());
        // A hash made with other parameters is verified with its own.
        let cheap = Params::new(1024, 1, 1, None).unwrap();
        let other = Argon2::new(Algorithm::Argon2id, Version::V0x13, cheap)
            .hash_password(b"pw")
            .unwrap();
        assert!(
            Argon2WorkArea::default()
                .verify_password(b"pw", &other)
                .is_ok()
        );
        assert!(
            Argon2WorkArea::default()
                .verify_password(b"px", &other)
                .is_err()
        );
    }
}
