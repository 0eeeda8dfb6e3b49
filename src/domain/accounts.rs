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
use std::time::{Duration, Instant};

use dashmap::DashMap;
use secrecy::SecretString;

use super::{DomainError, validate};
use crate::auth::{Identity, JwtKeys, PasswordHasher, TokenRef};
use crate::config::{AuthMode, AuthSettings};
use crate::ids::UserId;
use crate::ratelimit::KeyedLimiter;
use crate::store::{Store, User, UserRecord};
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
    /// Account creations per client address (`auth.registrations_per_ip`).
    registrations: Option<KeyedLimiter<IpAddr>>,
    /// Tokens checked against their account lately: jti -> result.
    checked: DashMap<Arc<str>, Checked>,
}

struct Checked {
    user: UserId,
    username: Arc<str>,
    at: Instant,
}

/// How long a token's account check is reused. A password change or a
/// logout takes effect at once on the node that made it (its entries are
/// dropped) and within this time on the others.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Entries of the check cache before it starts over.
const CHECKED_MAX: usize = 100_000;

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
            checked: DashMap::new(),
            registrations: (settings.registrations_per_ip > 0).then(|| {
                KeyedLimiter::new(
                    settings.registrations_per_ip,
                    Duration::from_secs(settings.registration_window_secs),
                )
            }),
        }
    }

    /// Verifies a bearer token, then its account: the account exists (a
    /// validly signed token can name an id the database does not have,
    /// e.g. after a restore), its token key is the token's (so it is the
    /// same account, and its password has not changed since), and the
    /// token was not revoked. Any failure is `InvalidToken`. The identity
    /// carries the account's stored username, not the token's claim.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, DomainError> {
        let v = self.jwt.verify(token).map_err(|_| {
            auth_failure("invalid_token");
            DomainError::InvalidToken
        })?;
        let token = Arc::new(TokenRef {
            jti: v.jti,
            key: v.key,
            expires_at: v.exp,
        });
        let username = self.check_account(v.id, &token).await?;
        Ok(Identity {
            id: v.id,
            username: username.to_string(),
            token,
        })
    }

    /// True while `who`'s token is still good: not expired, account key
    /// unchanged, not revoked (read at most once per [`RECHECK`]).
    pub async fn still_valid(&self, who: &Identity) -> Result<bool, DomainError> {
        if who.token.expires_at <= jsonwebtoken::get_current_timestamp() {
            return Ok(false);
        }
        match self.check_account(who.id, &who.token).await {
            Ok(_) => Ok(true),
            Err(DomainError::InvalidToken) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn check_account(&self, id: UserId, token: &TokenRef) -> Result<Arc<str>, DomainError> {
        if let Some(c) = self.checked.get(token.jti.as_str())
            && c.user == id
            && c.at.elapsed() < RECHECK
        {
            return Ok(c.username.clone());
        }
        let refuse = |reason| {
            auth_failure(reason);
            DomainError::InvalidToken
        };
        let Some(check) = self.store.token_check(id, &token.jti).await? else {
            return Err(refuse("unknown_account"));
        };
        if check.token_key != token.key {
            return Err(refuse("token_key_mismatch"));
        }
        if check.revoked {
            return Err(refuse("revoked"));
        }
        if self.checked.len() >= CHECKED_MAX {
            self.checked.clear();
        }
        let username: Arc<str> = check.username.into();
        self.checked.insert(
            token.jti.as_str().into(),
            Checked {
                user: id,
                username: username.clone(),
                at: Instant::now(),
            },
        );
        Ok(username)
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
                    self.login_password(client, username, password).await
                }
                (AuthMode::Password, None) => Err(password_required()),
                (AuthMode::Open, password) => self.login_open(client, username, password).await,
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
            match self
                .create_account(client, username, Some(password))
                .await?
            {
                Some(rec) => Ok(self.session(rec, true)),
                None => Err(DomainError::UsernameTaken),
            }
        })
        .await
    }

    fn session(&self, rec: UserRecord, created: bool) -> Session {
        Session {
            token: self
                .jwt
                .issue(rec.user.id, &rec.user.username, &rec.token_key),
            expires_in: self.jwt.ttl_secs(),
            user: rec.user,
            created,
        }
    }

    /// `POST /token/refresh`: a new token for the caller's valid one (which
    /// stays valid until it expires).
    pub fn refresh(&self, who: &Identity) -> Session {
        self.session(
            UserRecord {
                user: User {
                    id: who.id,
                    username: who.username.clone(),
                },
                password_hash: None,
                token_key: who.token.key.clone(),
            },
            false,
        )
    }

    /// `POST /account/password`: checks the old password (under the login
    /// budgets), stores the new one with a new token key, so every token
    /// issued before stops working, and returns a session with a new token.
    pub async fn change_password(
        &self,
        client: IpAddr,
        who: &Identity,
        old: String,
        new: String,
    ) -> Result<Session, DomainError> {
        validate::password(&new)?;
        self.limited(client, &who.username, async {
            let rec = self
                .store
                .user_by_name(&who.username)
                .await?
                .filter(|r| r.user.id == who.id)
                .ok_or(DomainError::InvalidToken)?;
            self.check_password(rec.password_hash.clone(), old).await?;
            let hash = self.hasher.hash(new).await?;
            let key = self
                .store
                .set_password(who.id, hash)
                .await?
                .ok_or(DomainError::InvalidToken)?;
            self.checked.retain(|_, c| c.user != who.id);
            Ok(self.session(
                UserRecord {
                    user: rec.user,
                    password_hash: None,
                    token_key: key,
                },
                false,
            ))
        })
        .await
    }

    /// `POST /logout`: revokes the caller's token (only that one).
    pub async fn logout(&self, who: &Identity) -> Result<(), DomainError> {
        let expires_at = i64::try_from(who.token.expires_at).unwrap_or(i64::MAX);
        self.store.revoke_token(&who.token.jti, expires_at).await?;
        self.checked.remove(who.token.jti.as_str());
        Ok(())
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
        client: IpAddr,
        username: &str,
        password: Option<String>,
    ) -> Result<Option<UserRecord>, DomainError> {
        if let Some(limiter) = &self.registrations {
            limiter.try_take(&client).map_err(|retry_after| {
                auth_failure("registrations_rate_limited");
                DomainError::RateLimited { retry_after }
            })?;
        }
        let hash = match password {
            Some(p) => Some(self.hasher.hash(p).await?),
            None => None,
        };
        if self.store.create_user(username, hash).await?.is_none() {
            return Ok(None);
        }
        // Read back for the token key the store gave it.
        Ok(self.store.user_by_name(username).await?)
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
        client: IpAddr,
        username: &str,
        password: String,
    ) -> Result<Session, DomainError> {
        if let Some(rec) = self.store.user_by_name(username).await? {
            self.check_password(rec.password_hash.clone(), password)
                .await?;
            return Ok(self.session(rec, false));
        }
        if !self.auto_register {
            self.hasher.verify_dummy(password).await?;
            return Err(DomainError::InvalidCredentials);
        }
        validate::password(&password)?;
        match self
            .create_account(client, username, Some(password.clone()))
            .await?
        {
            Some(rec) => Ok(self.session(rec, true)),
            // Created concurrently by another request: log in against it.
            None => {
                let rec = self
                    .store
                    .user_by_name(username)
                    .await?
                    .ok_or(DomainError::InvalidCredentials)?;
                self.check_password(rec.password_hash.clone(), password)
                    .await?;
                Ok(self.session(rec, false))
            }
        }
    }

    async fn login_open(
        &self,
        client: IpAddr,
        username: &str,
        password: Option<String>,
    ) -> Result<Session, DomainError> {
        if let Some(rec) = self.store.user_by_name(username).await? {
            return Ok(self.session(rec, false));
        }
        if !self.auto_register {
            return Err(DomainError::InvalidCredentials);
        }
        if let Some(p) = &password {
            validate::password(p)?;
        }
        match self.create_account(client, username, password).await? {
            Some(rec) => Ok(self.session(rec, true)),
            None => {
                let rec = self
                    .store
                    .user_by_name(username)
                    .await?
                    .ok_or(DomainError::InvalidCredentials)?;
                Ok(self.session(rec, false))
            }
        }
    }
}

fn password_required() -> DomainError {
    DomainError::invalid("password_required", "password is required")
}
