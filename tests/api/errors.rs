//! Error shape and edge cases of the HTTP surface.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::TestApp;

fn assert_error_shape(body: &Value) {
    let obj = body.as_object().expect("JSON object");
    assert!(obj["error"].is_string(), "{body}");
    assert!(obj["code"].is_string(), "{body}");
}

#[tokio::test]
async fn malformed_json_is_400_invalid_request() {
    let app = TestApp::spawn().await;
    for raw in ["{", "[]", "\"x\"", "{\"username\": 5}", "", "{\"nope\": 1}"] {
        let (status, body) = app
            .send(
                app.http
                    .post(app.url("/login"))
                    .header("content-type", "application/json")
                    .body(raw),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?}");
        assert_eq!(body["code"], "invalid_request", "{raw:?}");
        assert_error_shape(&body);
    }
}

#[tokio::test]
async fn json_without_a_content_type_is_accepted_like_the_seed_clients_send_it() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/login"))
                .body(r#"{"username":"alice","password":"correct horse battery"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_3_mb_body_is_413() {
    let app = TestApp::spawn().await;
    let big = format!(
        r#"{{"username":"a","password":"{}"}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    let (status, body) = app
        .send(
            app.http
                .post(app.url("/login"))
                .header("content-type", "application/json")
                .body(big),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body);
    let (status, body) = app.get("/login", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error_shape(&body);
}

#[tokio::test]
async fn openapi_describes_every_route_of_the_http_api() {
    let app = TestApp::spawn().await;
    let (status, spec) = app.get("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let paths = spec["paths"].as_object().unwrap();
    for (path, method) in [
        ("/login", "post"),
        ("/register", "post"),
        ("/chats", "get"),
        ("/chats", "post"),
        ("/chats/initiate", "post"),
        ("/chats/{chat_id}", "get"),
        ("/chats/{chat_id}", "patch"),
        ("/chats/{chat_id}/messages", "get"),
        ("/chats/{chat_id}/members", "post"),
        ("/chats/{chat_id}/members/{user_id}", "patch"),
        ("/chats/{chat_id}/members/{user_id}", "delete"),
        ("/chats/{chat_id}/read", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path}"
        );
    }
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    for name in ["Message", "ErrorBody", "LoginResponse", "Chat", "Member"] {
        assert!(schemas.contains_key(name), "{name}");
    }
}

#[tokio::test]
async fn probes_answer() {
    let app = TestApp::spawn().await;
    for path in ["/healthz", "/livez"] {
        let (status, body) = app.get(path, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
    }
    let (status, body) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["migrations"], "ok");
}
