//! `GET /openapi.json`: generated from the handlers' annotations, then
//! completed here so that it describes exactly what this server serves:
//!
//! * the routes without a JSON handler of their own (`/livez`, `/metrics`,
//!   `/openapi.json`, the `/ws` upgrade, the web client's files), each only
//!   while the settings serve it;
//! * the input rules the handlers enforce (`minimum` on ids, username and
//!   password lengths, the configured title length, enums), set on the
//!   generated schemas by name. [`constrain`] reports a name it did not
//!   find, and a test fails on it, so a renamed field cannot silently lose
//!   its rule.
//!
//! A unit test compares the spec's paths with the routes the router
//! source declares, and a black-box test (tests/api/hardening.rs) calls
//! every documented operation and checks that the router answers it.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{accounts, chats, error, health, schema};
use crate::app::AppState;
use crate::config::Settings;

#[derive(OpenApi)]
#[openapi(
    info(title = "shindensen", description = "Messenger backend: HTTP API. The WebSocket protocol behind GET /ws is described in the API contract and the README."),
    paths(
        accounts::login, accounts::register, accounts::refresh, accounts::change_password,
        accounts::logout,
        chats::initiate, chats::list, chats::create, chats::get, chats::rename,
        chats::history, chats::add_member, chats::set_role, chats::remove_member, chats::read,
        health::live, health::ready,
    ),
    components(schemas(
        error::ErrorBody, accounts::LoginRequest, accounts::RegisterRequest, schema::LoginResponse,
        accounts::PasswordChange,
        chats::InitiateRequest, chats::InitiateResponse, chats::CreateChatRequest,
        chats::RenameRequest, chats::AddMemberRequest, chats::SetRoleRequest, chats::ReadRequest,
        schema::UserBody, schema::MessageBody, schema::ChatBody, schema::MemberBody,
        schema::ReadMarkerBody, crate::store::Timestamp,
        health::Health, health::Readiness, health::Checks,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub async fn spec(State(state): State<AppState>) -> Json<Value> {
    Json(document(&state.settings))
}

/// The OpenAPI document for a server running with `settings`.
pub fn document(settings: &Settings) -> Value {
    // The generated document is plain data: serializing it cannot fail.
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    add_routes(&mut doc, settings);
    let missed = constrain(&mut doc, settings);
    if !missed.is_empty() {
        tracing::warn!(?missed, "openapi: constraints whose target is missing");
    }
    doc
}

/// Usernames: 1-32 characters from `A-Z a-z 0-9 _ . -` (`domain::validate`).
fn username() -> Value {
    json!({"minLength": 1, "maxLength": 32, "pattern": "^[A-Za-z0-9_.-]{1,32}$"})
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// The routes the annotations do not cover, as the router serves them.
fn add_routes(doc: &mut Value, settings: &Settings) {
    let healthz = doc["paths"]["/healthz"].clone();
    let paths = &mut doc["paths"];
    let mut livez = healthz;
    livez["get"]["operationId"] = json!("livez");
    livez["get"]["summary"] = json!("Liveness, as `/healthz`");
    paths["/livez"] = livez;
    if settings.metrics.on_main_port {
        paths["/metrics"] = json!({"get": {
            "tags": ["operations"],
            "operationId": "metrics",
            "summary": "Prometheus text exposition",
            "description": "Also served on `metrics.listen` when set; off the public port with `metrics.on_main_port = false`.",
            "responses": {"200": {
                "description": "Prometheus text format 0.0.4",
                "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}
            }}
        }});
    }
    paths["/openapi.json"] = json!({"get": {
        "tags": ["operations"],
        "operationId": "openapi",
        "summary": "This document",
        "responses": {"200": {
            "description": "OpenAPI 3 document",
            "content": {"application/json": {"schema": {"type": "object"}}}
        }}
    }});
    paths["/ws"] = json!({"get": {
        "tags": ["websocket"],
        "operationId": "ws",
        "summary": "Upgrade to the real-time WebSocket protocol",
        "description": "An HTTP/1.1 upgrade (`Connection: Upgrade`, `Upgrade: websocket`). Frames, acks, errors and close codes are described in the API contract. The token goes in `Authorization: Bearer` or, for browsers, in `access_token`.",
        "parameters": [
            {"name": "access_token", "in": "query", "required": false,
             "description": "The token, for clients that cannot set `Authorization` (never logged)",
             "schema": {"type": "string"}},
            {"name": "since", "in": "query", "required": false,
             "description": "Resume: first replay every message with a greater id",
             "schema": {"type": "integer", "format": "int64", "minimum": 0}}
        ],
        "security": [{"bearer": []}, {"access_token": []}],
        "responses": {
            "101": {"description": "Switching Protocols: the WebSocket is open"},
            "400": error_response("`invalid_request` (not a WebSocket upgrade, bad `since`)"),
            "401": error_response("`missing_token`, `invalid_token`"),
            "429": error_response("`too_many_connections` (the per-user cap of open WebSockets)")
        }
    }});
    doc["components"]["securitySchemes"]["access_token"] =
        json!({"type": "apiKey", "in": "query", "name": "access_token"});
    if settings.web.enabled {
        for (path, id, media) in [
            ("/", "web_index", "text/html; charset=utf-8"),
            ("/app.js", "web_app_js", "text/javascript; charset=utf-8"),
            ("/style.css", "web_style_css", "text/css; charset=utf-8"),
        ] {
            doc["paths"][path] = json!({"get": {
                "tags": ["web"],
                "operationId": id,
                "summary": "The browser client (`web.enabled`)",
                "parameters": [{"name": "If-None-Match", "in": "header", "required": false,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "The file (`Cache-Control: no-cache`, a strong `ETag`)",
                            "content": {media: {"schema": {"type": "string"}}}},
                    "304": {"description": "Not Modified: the `ETag` matches"}
                }
            }});
        }
    }
}

/// Sets the input rules on the generated schemas. Returns the targets it
/// did not find (a test insists there are none).
fn constrain(doc: &mut Value, settings: &Settings) -> Vec<String> {
    let mut missed = Vec::new();

    // Parameters, by name wherever they appear: ids are positive, `after`
    // and `since` may be 0 ("from the start").
    let ids = json!({"minimum": 1});
    let from = json!({"minimum": 0});
    let mut seen = std::collections::HashSet::new();
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in op.values_mut() {
                let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                    continue;
                };
                for p in params {
                    let (name, rule) = match p["name"].as_str() {
                        Some(n @ ("chat_id" | "user_id" | "before")) => (n.to_string(), &ids),
                        Some(n @ ("after" | "since")) => (n.to_string(), &from),
                        _ => continue,
                    };
                    merge(&mut p["schema"], rule);
                    seen.insert(name);
                }
            }
        }
    }
    for name in ["chat_id", "user_id", "before", "after", "since"] {
        if !seen.contains(name) {
            missed.push(format!("parameter {name}"));
        }
    }

    // Request and response bodies, by schema and property.
    let title = json!({"minLength": 1, "maxLength": settings.chats.max_title_chars});
    let password = json!({"minLength": 8, "maxLength": 128});
    let rules: [(&str, &str, Value); 15] = [
        ("LoginRequest", "username", username()),
        ("LoginRequest", "password", password.clone()),
        ("RegisterRequest", "username", username()),
        ("RegisterRequest", "password", password.clone()),
        ("PasswordChange", "new_password", password),
        ("InitiateRequest", "target_username", username()),
        ("InitiateResponse", "chat_id", ids.clone()),
        (
            "InitiateResponse",
            "status",
            json!({"enum": ["created", "exists"]}),
        ),
        ("CreateChatRequest", "type", json!({"enum": ["group"]})),
        ("CreateChatRequest", "title", title.clone()),
        ("CreateChatRequest", "members", json!({"items": username()})),
        ("RenameRequest", "title", title),
        ("AddMemberRequest", "username", username()),
        (
            "SetRoleRequest",
            "role",
            json!({"enum": ["admin", "member"]}),
        ),
        ("ReadRequest", "up_to", from.clone()),
    ];
    for (schema, property, rule) in rules {
        match doc["components"]["schemas"][schema]["properties"].get_mut(property) {
            Some(target) => merge(target, &rule),
            None => missed.push(format!("{schema}.{property}")),
        }
    }
    missed
}

/// Merges the keys of `rule` into `target` (objects), recursively.
fn merge(target: &mut Value, rule: &Value) {
    match (target, rule) {
        (Value::Object(t), Value::Object(r)) => {
            for (k, v) in r {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (target, rule) => *target = rule.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The paths the router declares: every `.route("…"` in the files
    /// that build it.
    fn router_paths() -> BTreeSet<String> {
        let sources = [include_str!("mod.rs"), include_str!("web.rs")];
        let mut paths = BTreeSet::new();
        for src in sources {
            let mut rest = src;
            while let Some(at) = rest.find(".route(") {
                rest = &rest[at + ".route(".len()..];
                let literal = rest.trim_start();
                if let Some(lit) = literal.strip_prefix('"') {
                    let end = lit.find('"').expect("closing quote");
                    paths.insert(lit[..end].to_string());
                }
            }
        }
        paths
    }

    fn spec_paths(doc: &Value) -> BTreeSet<String> {
        doc["paths"].as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn the_spec_lists_every_route_the_router_serves() {
        let routes = router_paths();
        assert!(routes.contains("/chats/{chat_id}/messages"), "{routes:?}");
        assert!(routes.contains("/app.js"), "{routes:?}");
        let doc = document(&Settings::default());
        assert_eq!(spec_paths(&doc), routes);
    }

    #[test]
    fn routes_that_settings_turn_off_are_not_listed() {
        let mut settings = Settings::default();
        settings.web.enabled = false;
        settings.metrics.on_main_port = false;
        let paths = spec_paths(&document(&settings));
        for off in ["/", "/app.js", "/style.css", "/metrics"] {
            assert!(!paths.contains(off), "{off}");
        }
        assert!(paths.contains("/livez") && paths.contains("/openapi.json"));
    }

    #[test]
    fn every_constraint_finds_its_target() {
        let settings = Settings::default();
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        add_routes(&mut doc, &settings);
        assert_eq!(constrain(&mut doc, &settings), Vec::<String>::new());
    }

    #[test]
    fn ids_limits_and_lengths_carry_their_bounds() {
        let mut settings = Settings::default();
        settings.chats.max_title_chars = 77;
        let doc = document(&settings);
        let history = &doc["paths"]["/chats/{chat_id}/messages"]["get"]["parameters"];
        let param = |name: &str| {
            history
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{name}"))["schema"]
                .clone()
        };
        assert_eq!(param("chat_id")["minimum"], 1);
        assert_eq!(param("before")["minimum"], 1);
        assert_eq!(param("after")["minimum"], 0);
        assert_eq!(param("limit")["minimum"], 1);
        assert_eq!(param("limit")["maximum"], 200);
        for path in [
            "/chats/{chat_id}",
            "/chats/{chat_id}/read",
            "/chats/{chat_id}/members",
            "/chats/{chat_id}/members/{user_id}",
        ] {
            for (method, op) in doc["paths"][path].as_object().unwrap() {
                for p in op["parameters"].as_array().unwrap() {
                    assert_eq!(p["schema"]["minimum"], 1, "{method} {path} {}", p["name"]);
                    assert_eq!(p["required"], true, "{method} {path} {}", p["name"]);
                }
            }
        }
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["CreateChatRequest"]["properties"]["title"]["maxLength"],
            77
        );
        assert_eq!(
            schemas["RegisterRequest"]["properties"]["password"]["minLength"],
            8
        );
        for (schema, field) in [
            ("Message", "id"),
            ("Message", "chat_id"),
            ("Message", "sender_id"),
            ("Chat", "chat_id"),
            ("User", "id"),
            ("Member", "id"),
            ("ReadMarkerBody", "chat_id"),
        ] {
            assert_eq!(
                schemas[schema]["properties"][field]["minimum"], 1,
                "{schema}.{field}"
            );
        }
        for (schema, field) in [
            ("Chat", "last_read_id"),
            ("Member", "last_read_id"),
            ("ReadMarkerBody", "last_read_id"),
        ] {
            assert_eq!(
                schemas[schema]["properties"][field]["minimum"], 0,
                "{schema}.{field}"
            );
        }
    }

    #[test]
    fn required_fields_are_the_ones_always_sent() {
        let doc = document(&Settings::default());
        let required = |schema: &str| -> BTreeSet<String> {
            doc["components"]["schemas"][schema]["required"]
                .as_array()
                .unwrap_or_else(|| panic!("{schema} has no required list"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        // `title`, `peer` and `last_message` are always sent, as null when
        // they do not apply; `members` only with "with members".
        assert_eq!(
            required("Chat"),
            set(&[
                "chat_id",
                "type",
                "title",
                "peer",
                "member_count",
                "created_at",
                "last_message",
                "last_read_id",
                "unread_count"
            ])
        );
        assert!(!required("Message").contains("event"));
        assert_eq!(required("LoginRequest"), set(&["username"]));
        assert_eq!(required("CreateChatRequest"), set(&["type", "title"]));
        assert_eq!(required("ReadRequest"), set(&["up_to"]));
    }
}
