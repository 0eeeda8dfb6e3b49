//! Accounts: login with auto-registration, register, open mode, rate limits.

use reqwest::StatusCode;
use serde_json::json;
use shindensen::config::AuthMode;

use crate::helpers::{PASSWORD, TestApp};

#[tokio::test]
async fn first_login_creates_the_account_and_later_logins_need_the_password() {
    let app = TestApp::spawn().await;
    let (status, body) = app.login("alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["created"], true);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86400);
    assert_eq!(body["user"]["username"], "alice");
    assert!(body["token"].as_str().unwrap().split('.').count() == 3);

    let (status, body) = app.login("alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["created"], false);

    let (status, body) = app.login("alice", "wrong password").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "invalid_credentials");
}

#[tokio::test]
async fn usernames_are_one_account_case_insensitively_and_keep_their_spelling() {
    let app = TestApp::spawn().await;
    let (_, first) = app.login("Alice", PASSWORD).await;
    let (status, second) = app.login("alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["created"], false);
    assert_eq!(first["user"]["id"], second["user"]["id"]);
    assert_eq!(second["user"]["username"], "Alice");

    let (status, body) = app.register("ALICE", PASSWORD).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "username_taken");
}

#[tokio::test]
async fn twenty_concurrent_first_logins_create_one_account() {
    let app = TestApp::spawn_with(|s| s.auth.login_attempts_per_username = 100).await;
    let results =
        futures_util::future::join_all((0..20).map(|_| app.login("carol", PASSWORD))).await;
    let mut ids = Vec::new();
    let mut created = 0;
    for (status, body) in results {
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["user"]["id"].as_i64().unwrap());
        if body["created"] == true {
            created += 1;
        }
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one account: {ids:?}");
    assert_eq!(created, 1);
}

#[tokio::test]
async fn login_validates_username_and_password() {
    let app = TestApp::spawn().await;
    for bad in ["", "has space", "ünïcode", &"x".repeat(33), "semi;colon"] {
        let (status, body) = app.login(bad, PASSWORD).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
        assert_eq!(body["code"], "invalid_username");
    }
    let (status, body) = app.post("/login", json!({"username": "dave"}), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "password_required");

    for bad in ["short", &"p".repeat(129)] {
        let (status, body) = app.login("dave", bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["code"], "invalid_password");
    }
    // Nothing was created by the failed attempts.
    assert!(
        app.state
            .store
            .user_by_name("dave")
            .await
            .unwrap()
            .is_none()
    );
    // 32 characters of every allowed kind is fine.
    let (status, _) = app
        .login("Az09_.-Az09_.-Az09_.-Az09_.-Az09", PASSWORD)
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn register_creates_once_with_201() {
    let app = TestApp::spawn().await;
    let (status, body) = app.register("erin", PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["created"], true);
    assert_eq!(body["user"]["username"], "erin");
    let (status, body) = app.register("erin", PASSWORD).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "username_taken");
    let (status, body) = app
        .post("/register", json!({"username": "frank"}), None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "password_required");
    let (status, body) = app.register("frank", "short").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "invalid_password");
}

#[tokio::test]
async fn passwords_are_stored_only_as_argon2id_hashes() {
    let app = TestApp::spawn().await;
    app.user("gina").await;
    let rec = app.state.store.user_by_name("gina").await.unwrap().unwrap();
    let hash = rec.password_hash.unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    if crate::db::on_postgres() {
        // No file to search: no stored column holds the plaintext.
        let found = crate::db::column_i64(
            app.dir.path(),
            &format!("SELECT count(*) FROM users WHERE password_hash LIKE '%{PASSWORD}%' OR username LIKE '%{PASSWORD}%'"),
        )
        .await;
        assert_eq!(found, vec![0]);
        return;
    }
    let raw = std::fs::read(app.db_path()).unwrap();
    let wal = std::fs::read(app.db_path().with_extension("db-wal")).unwrap_or_default();
    let needle = PASSWORD.as_bytes();
    for bytes in [raw, wal] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "plaintext password on disk"
        );
    }
}

#[tokio::test]
async fn without_auto_register_unknown_users_cannot_log_in() {
    let app = TestApp::spawn_with(|s| s.auth.auto_register = false).await;
    let (status, body) = app.login("henry", PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "invalid_credentials");
    let (status, _) = app.register("henry", PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = app.login("henry", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn open_mode_logs_in_with_the_username_alone_like_the_seed() {
    let app = TestApp::spawn_with(|s| s.auth.mode = AuthMode::Open).await;
    let (status, body) = app.post("/login", json!({"username": "ivy"}), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["created"], true);
    let (status, body) = app.post("/login", json!({"username": "ivy"}), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["created"], false);
}

#[tokio::test]
async fn the_eleventh_rapid_wrong_password_login_is_rate_limited() {
    let app = TestApp::spawn().await;
    app.user("jack").await;
    for i in 0..10 {
        let (status, _) = app.login("jack", "wrong password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {}", i + 1);
    }
    let res = app
        .http
        .post(app.url("/login"))
        .json(&json!({"username": "JACK", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Other usernames are not affected by jack's budget.
    let (status, _) = app.login("kate", PASSWORD).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn successful_logins_do_not_use_up_the_budget() {
    let app = TestApp::spawn().await;
    for _ in 0..15 {
        let (status, _) = app.login("liam", PASSWORD).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn one_address_is_limited_across_usernames() {
    let app = TestApp::spawn_with(|s| s.auth.login_attempts_per_ip = 5).await;
    app.user("mia").await;
    for i in 0..5 {
        let (status, _) = app.login(&format!("mia{i}"), "x").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY); // invalid_password: validation, not counted
    }
    for _ in 0..5 {
        let (status, _) = app.login("mia", "wrong password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = app.login("nobody-else", "wrong password").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
}
