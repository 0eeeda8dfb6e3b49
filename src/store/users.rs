//! Accounts.

use serde::Serialize;
use utoipa::ToSchema;

use super::{Store, StoreError};

/// A user as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct User {
    pub id: i64,
    pub username: String,
}

/// A user with the stored credential, for login.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub user: User,
    /// argon2id PHC string; `None` for accounts created without a password.
    pub password_hash: Option<String>,
}

impl Store {
    /// Looks a user up by name, case-insensitively.
    #[tracing::instrument(name = "db.user_by_name", skip_all, fields(db.system.name = "sqlite"))]
    pub async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query!(
            r#"SELECT id AS "id!", username, password_hash FROM users WHERE username = ?"#,
            username
        )
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|r| UserRecord {
            user: User {
                id: r.id,
                username: r.username,
            },
            password_hash: r.password_hash,
        }))
    }

    /// Creates an account; `Ok(None)` when the name is taken (in any case).
    pub async fn create_user(
        &self,
        username: &str,
        password_hash: Option<String>,
    ) -> Result<Option<User>, StoreError> {
        self.writer
            .create_user(username.to_string(), password_hash)
            .await
    }
}
