//! `GET /openapi.json`, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{auth, chats, error, health};
use crate::store;

#[derive(OpenApi)]
#[openapi(
    info(title = "shindensen", description = "Messenger backend: HTTP API. The WebSocket protocol at GET /ws is described in the README."),
    paths(
        auth::login, auth::register,
        chats::initiate, chats::list, chats::history,
        health::live, health::ready,
    ),
    components(schemas(
        error::ErrorBody, auth::LoginRequest, auth::RegisterRequest, auth::LoginResponse,
        chats::InitiateRequest, chats::InitiateResponse,
        store::User, store::Message, store::ChatSummary, store::Timestamp,
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

pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
