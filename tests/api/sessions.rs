//! Sessions (API "Sessions"): refresh, password change, logout, tokens
//! bound to their account across a restore, and WebSockets closed with
//! 4001 when their token expires or is revoked.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{PASSWORD, TestApp, TestUser};

async fn chats_status(app: &TestApp, token: &str) -> StatusCode {
    app.get("/chats", Some(token)).await.0
}

fn user_with(body: &Value, like: &TestUser) -> TestUser {
    TestUser {
        id: like.id,
        username: like.username.clone(),
        token: body["token"].as_str().expect("a token").to_string(),
    }
}

#[tokio::test]
async fn refresh_gives_a_new_token_and_the_old_one_stays_valid() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (status, body) = app
        .post("/token/refresh", json!({}), Some(&alice.token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["id"], alice.id);
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    let fresh = body["token"].as_str().unwrap();
    assert_ne!(fresh, alice.token);
    assert_eq!(chats_status(&app, fresh).await, StatusCode::OK);
    assert_eq!(chats_status(&app, &alice.token).await, StatusCode::OK);
    let (status, body) = app.post("/token/refresh", json!({}), None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
}

#[tokio::test]
async fn a_password_change_revokes_every_earlier_token_and_closes_their_websockets() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let (_, second) = app.login("alice", PASSWORD).await;
    let second = user_with(&second, &alice);
    let mut old_ws = app.ws(&second).await;

    let wrong = json!({"old_password": "not the password", "new_password": "a new password 1"});
    let (status, body) = app
        .post("/account/password", wrong, Some(&alice.token))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_credentials")),
        "{body}"
    );
    let short = json!({"old_password": PASSWORD, "new_password": "short"});
    let (status, body) = app
        .post("/account/password", short, Some(&alice.token))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_password")),
        "{body}"
    );
    // Nothing changed yet.
    assert_eq!(chats_status(&app, &second.token).await, StatusCode::OK);

    let change = json!({"old_password": PASSWORD, "new_password": "a new password 1"});
    let (status, body) = app
        .post("/account/password", change, Some(&alice.token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let renewed = user_with(&body, &alice);

    for old in [&alice.token, &second.token] {
        let (status, body) = app.get("/chats", Some(old)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_token"))
        );
    }
    assert_eq!(
        old_ws.close_frame().await.expect("a close frame").code,
        4001.into()
    );
    assert!(
        app.try_ws(Some(&alice.token), "").await.is_err(),
        "old token upgrades"
    );
    assert_eq!(chats_status(&app, &renewed.token).await, StatusCode::OK);
    let id = app.say_and_ack(&renewed, chat, "with the new token").await;
    assert!(id > 0);
    assert_eq!(
        app.login("alice", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.login("alice", "a new password 1").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn logout_revokes_only_that_token_and_closes_only_its_websockets() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let (_, other) = app.login("alice", PASSWORD).await;
    let other = user_with(&other, &alice);
    let mut doomed = app.ws(&alice).await;
    let mut kept = app.ws(&other).await;

    let res = app
        .http
        .post(app.url("/logout"))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (status, body) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token"))
    );
    assert_eq!(
        doomed.close_frame().await.expect("a close frame").code,
        4001.into()
    );
    assert_eq!(chats_status(&app, &other.token).await, StatusCode::OK);
    // The other connection is still served.
    kept.send_json(json!({"type": "typing", "chat_id": 1}))
        .await;
    kept.send_json(json!({"chat_id": 999, "content": "x", "client_msg_id": "k"}))
        .await;
    assert_eq!(kept.next_of("error").await["code"], "chat_not_found");
}

#[tokio::test]
async fn a_websocket_is_closed_with_4001_when_its_token_expires() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    // Alice's token as issued, but expiring in 2 s.
    let mut claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(alice.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    claims["exp"] = json!(jsonwebtoken::get_current_timestamp() + 2);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(crate::helpers::TEST_SECRET.as_bytes()),
    )
    .unwrap();
    let mut ws = app.try_ws(Some(&token), "").await.expect("valid for 2 s");
    let frame = ws.close_frame().await.expect("a close frame");
    assert_eq!(frame.code, 4001.into(), "{frame:?}");
}

#[tokio::test]
async fn after_a_restore_an_old_token_never_authenticates_as_the_account_that_reuses_its_id() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let carol = app.user("carol").await;
    assert_eq!(chats_status(&app, &carol.token).await, StatusCode::OK);
    let dir = app.stop().await;
    // Restore a backup taken before carol existed: her row is gone and
    // the next account gets her id again.
    crate::db::execute(
        dir.path(),
        &format!("DELETE FROM users WHERE id = {}", carol.id),
    )
    .await;
    if crate::db::on_postgres() {
        crate::db::execute(
            dir.path(),
            &format!(
                "SELECT setval(pg_get_serial_sequence('users', 'id'), {})",
                alice.id
            ),
        )
        .await;
    }
    let app = TestApp::spawn_in(dir, |_| {}).await;
    let dave = app.user("dave").await;
    assert_eq!(dave.id, carol.id, "the restore hands carol's id to dave");
    let (status, body) = app.get("/chats", Some(&carol.token)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_token")),
        "{body}"
    );
    assert!(app.try_ws(Some(&carol.token), "").await.is_err());
    assert_eq!(chats_status(&app, &dave.token).await, StatusCode::OK);
    assert_eq!(chats_status(&app, &alice.token).await, StatusCode::OK);
}
