//! Accounts: login, registration and token checks.
//!
//! * Passwords are stored only as argon2id hashes; an unknown username
//!   costs the same time as a wrong password (a dummy verification).
//! * Login and registration attempts draw on two token buckets, per client
//!   address and per username (case-insensitive). Only a wrong guess (bad
//!   credentials, or probing for taken names) spends the budget; anything
//!   else gives it back, so legitimate users are never locked out by their
//!   own successes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use secrecy::SecretString;

use super::{DomainError, validate};
use crate::auth::{Identity, JwtKeys, PasswordHasher};
use crate::config::{AuthMode, AuthSettings};
use crate::ids::UserId;
use crate::ratelimit::KeyedLimiter;
use crate::store::{Store, User};
use crate::telemetry::metrics::auth_failure;

/// A logged-in session: what `POST /login` and `POST /register` answer.
#[derive(Debug, Clone)]
pub struct Session {
    /// HS256 JWT for `Authorization: Bearer`.
    pub token: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub user: User,
    /// True when this call created the account.
    pub created: bool,
}

pub struct Accounts {
    store: Arc<dyn Store>,
    jwt: JwtKeys,
    hasher: PasswordHasher,
    by_address: KeyedLimiter<IpAddr>,
    by_username: KeyedLimiter<String>,
    mode: AuthMode,
    auto_register: bool,
    /// Accounts seen to exist: id -> stored username.
    known: DashMap<UserId, Arc<str>>,
}

/// Entries of the known-accounts cache before it starts over.
const KNOWN_ACCOUNTS_MAX: usize = 100_000;

impl Accounts {
    pub fn new(settings: &AuthSettings, secret: &SecretString, store: Arc<dyn Store>) -> Accounts {
        let window = Duration::from_secs(settings.login_window_secs);
        let hash_concurrency = std::thread::available_parallelism().map_or(2, |n| n.get());
        Accounts {
            store,
            jwt: JwtKeys::new(secret, settings.token_ttl_secs),
            hasher: PasswordHasher::new(hash_concurrency),
            by_address: KeyedLimiter::new(settings.login_attempts_per_ip, window),
            by_username: KeyedLimiter::new(settings.login_attempts_per_username, window),
            mode: settings.mode,
            auto_register: settings.auto_register,
            known: DashMap::new(),
        }
    }

    /// Verifies a bearer token and that its account exists (a validly
    /// signed token can name an id the database does not have, e.g. after
    /// a restore): either failure is `InvalidToken`. The identity carries
    /// the account's stored username, not the token's claim.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, DomainError> {
        let claimed = self.jwt.verify(token).map_err(|_| {
            auth_failure("invalid_token");
            DomainError::InvalidToken
        })?;
        if let Some(username) = self.known.get(&claimed.id) {
            return Ok(Identity {
                id: claimed.id,
                username: username.to_string(),
            });
        }
        let Some(user) = self.store.user_by_id(claimed.id).await? else {
            auth_failure("unknown_account");
            return Err(DomainError::InvalidToken);
        };
        self.remember(&user);
        Ok(Identity {
            id: user.id,
            username: user.username,
        })
    }

    /// Caches an account that exists (accounts are never deleted or
    /// renamed while the server runs, so an entry never goes stale).
    fn remember(&self, user: &User) {
        if self.known.len() >= KNOWN_ACCOUNTS_MAX {
            self.known.clear();
        }
        self.known.insert(user.id, user.username.as_str().into());
    }

    /// Logs in; an unknown username is registered with this password
    /// (unless `auth.auto_register = false`).
    pub async fn login(
        &self,
        client: IpAddr,
        username: &str,
        password: Option<String>,
    ) -> Result<Session, DomainError> {
        validate::username(username)?;
        if self.mode == AuthMode::Password && password.is_none() {
            return Err(password_required());
        }
        self.limited(client, username, async {
            match (self.mode, password) {
                (AuthMode::Password, Some(password)) => {
                    self.login_password(username, password).await
                }
                (AuthMode::Password, None) => Err(password_required()),
                (AuthMode::Open, password) => self.login_open(username, password).await,
            }
        })
        .await
    }

    /// Creates an account and logs in; a taken name is `UsernameTaken`.
    pub async fn register(
        &self,
        client: IpAddr,
        username: &str,
        password: Option<String>,
    ) -> Result<Session, DomainError> {
        validate::username(username)?;
        let password = password.ok_or_else(password_required)?;
        validate::password(&password)?;
        self.limited(client, username, async {
            if self.store.user_by_name(username).await?.is_some() {
                return Err(DomainError::UsernameTaken);
            }
            match self.create_account(username, Some(password)).await? {
                Some(user) => Ok(self.session(user, true)),
                None => Err(DomainError::UsernameTaken),
            }
        })
        .await
    }

    fn session(&self, user: User, created: bool) -> Session {
        Session {
            token: self.jwt.issue(user.id, &user.username),
            expires_in: self.jwt.ttl_secs(),
            user,
            created,
        }
    }

    /// Runs `attempt` under the login budgets of `client` and `username`.
    async fn limited<T>(
        &self,
        client: IpAddr,
        username: &str,
        attempt: impl Future<Output = Result<T, DomainError>>,
    ) -> Result<T, DomainError> {
        let name = username.to_ascii_lowercase();
        let limited = |retry_after| {
            auth_failure("rate_limited");
            DomainError::RateLimited { retry_after }
        };
        self.by_address.try_take(&client).map_err(limited)?;
        if let Err(retry_after) = self.by_username.try_take(&name) {
            self.by_address.give_back(&client);
            return Err(limited(retry_after));
        }
        let result = attempt.await;
        match &result {
            Err(DomainError::InvalidCredentials) => auth_failure("invalid_credentials"),
            Err(DomainError::UsernameTaken) => auth_failure("username_taken"),
            _ => {
                self.by_address.give_back(&client);
                self.by_username.give_back(&name);
            }
        }
        result
    }

    /// Creates the account, or `None` when the name is taken.
    async fn create_account(
        &self,
        username: &str,
        password: Option<String>,
    ) -> Result<Option<User>, DomainError> {
        let hash = match password {
            Some(p) => Some(self.hasher.hash(p).await?),
            None => None,
        };
        Ok(self.store.create_user(username, hash).await?)
    }

    async fn check_password(
        &self,
        stored: Option<String>,
        password: String,
    ) -> Result<(), DomainError> {
        let ok = match stored {
            Some(hash) => self.hasher.verify(password, hash).await?,
            None => self.hasher.verify_dummy(password).await?,
        };
        if ok {
            Ok(())
        } else {
            Err(DomainError::InvalidCredentials)
        }
    }

    async fn login_password(
        &self,
        username: &str,
        password: String,
    ) -> Result<Session, DomainError> {
        if let Some(rec) = self.store.user_by_name(username).await? {
            self.check_password(rec.password_hash, password).await?;
            return Ok(self.session(rec.user, false));
        }
        if !self.auto_register {
            self.hasher.verify_dummy(password).await?;
            return Err(DomainError::InvalidCredentials);
        }
        validate::password(&password)?;
        match self
            .create_account(username, Some(password.clone()))
            .await?
        {
            Some(user) => Ok(self.session(user, true)),
            // Created concurrently by another request: log in against it.
            None => {
                let rec = self
                    .store
                    .user_by_name(username)
                    .await?
                    .ok_or(DomainError::InvalidCredentials)?;
                self.check_password(rec.password_hash, password).await?;
                Ok(self.session(rec.user, false))
            }
        }
    }

    async fn login_open(
        &self,
        username: &str,
        password: Option<String>,
    ) -> Result<Session, DomainError> {
        if let Some(rec) = self.store.user_by_name(username).await? {
            return Ok(self.session(rec.user, false));
        }
        if !self.auto_register {
            return Err(DomainError::InvalidCredentials);
        }
        if let Some(p) = &password {
            validate::password(p)?;
        }
        match self.create_account(username, password).await? {
            Some(user) => Ok(self.session(user, true)),
            None => {
                let rec = self
                    .store
                    .user_by_name(username)
                    .await?
                    .ok_or(DomainError::InvalidCredentials)?;
                Ok(self.session(rec.user, false))
            }
        }
    }
}

fn password_required() -> DomainError {
    DomainError::invalid("password_required", "password is required")
}
