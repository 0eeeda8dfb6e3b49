//! Tokens: only valid HS256 tokens signed with the server's secret pass.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TEST_SECRET, TestApp};

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The claims of `user`'s issued token with `sub` and `exp` replaced.
fn claims_of(user: &crate::helpers::TestUser, sub: i64, exp: u64) -> Value {
    let payload = user.token.split('.').nth(1).unwrap();
    let mut c: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    c["sub"] = json!(sub.to_string());
    c["exp"] = json!(exp);
    c
}

async fn chats_status(app: &TestApp, token: &str) -> (StatusCode, Value) {
    app.get("/chats", Some(token)).await
}

#[tokio::test]
async fn issued_tokens_carry_sub_username_iat_exp() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let payload = alice.token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["sub"], alice.id.to_string());
    assert_eq!(claims["username"], "alice");
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 86400);
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(alice.token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "HS256");
    let (status, _) = chats_status(&app, &alice.token).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_missing_token_is_missing_token() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/chats", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "missing_token");
    let (status, body) = app
        .post("/chats/initiate", json!({"target_username": "x"}), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "missing_token");
}

#[tokio::test]
async fn forged_expired_and_malformed_tokens_are_rejected() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let good = claims_of(&alice, alice.id, now() + 3600);

    let none_token = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    let hs512 = sign(Algorithm::HS512, TEST_SECRET, &good);
    let wrong_key = sign(
        Algorithm::HS256,
        "another-secret-another-secret-another-secret",
        &good,
    );
    let expired = sign(
        Algorithm::HS256,
        TEST_SECRET,
        &claims_of(&alice, alice.id, now() - 120),
    );
    let mut parts: Vec<String> = alice.token.split('.').map(String::from).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(claims_of(&alice, alice.id + 1, now() + 3600).to_string());
    let tampered = parts.join(".");
    // Sanity: the same claims signed properly pass.
    let (status, _) = chats_status(&app, &sign(Algorithm::HS256, TEST_SECRET, &good)).await;
    assert_eq!(status, StatusCode::OK);

    for (name, token) in [
        ("alg none", none_token.as_str()),
        ("HS512", hs512.as_str()),
        ("wrong key", wrong_key.as_str()),
        ("expired", expired.as_str()),
        ("tampered payload", tampered.as_str()),
        ("garbage", "not.a.jwt"),
        ("empty parts", ".."),
    ] {
        let (status, body) = chats_status(&app, token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(body["code"], "invalid_token", "{name}");
    }
    let res = app
        .http
        .get(app.url("/chats"))
        .header("Authorization", format!("Basic {}", alice.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn tokens_survive_a_restart_with_the_generated_secret() {
    crate::db::sqlite_only!();
    // No secret configured: one is generated next to the database (0600).
    let app = TestApp::spawn_with(|s| s.auth.jwt_secret = None).await;
    let alice = app.user("alice").await;
    let secret_file = shindensen::store::sqlite::secret_path(&app.db_path());
    let dir = app.stop().await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let app = TestApp::spawn_in(dir, |s| s.auth.jwt_secret = None).await;
    let (status, _) = chats_status(&app, &alice.token).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn on_postgresql_the_secret_must_come_from_the_configuration() {
    crate::db::postgres_only!();
    // There is no database file to keep a generated secret beside.
    let dir = tempfile::tempdir().unwrap();
    crate::db::ensure_database(dir.path()).await;
    let mut settings = crate::helpers::test_settings(dir.path());
    settings.auth.jwt_secret = None;
    let err = match shindensen::app::Application::build(settings).await {
        Ok(_) => panic!("started without a signing secret"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("JWT_SECRET"), "{err}");
}
