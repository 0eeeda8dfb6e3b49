//! `GET /openapi.json`, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{accounts, chats, error, health, schema};

#[derive(OpenApi)]
#[openapi(
    info(title = "shindensen", description = "Messenger backend: HTTP API. The WebSocket protocol at GET /ws is described in the README."),
    paths(
        accounts::login, accounts::register,
        chats::initiate, chats::list, chats::create, chats::get, chats::rename,
        chats::history, chats::add_member, chats::set_role, chats::remove_member, chats::read,
        health::live, health::ready,
    ),
    components(schemas(
        error::ErrorBody, accounts::LoginRequest, accounts::RegisterRequest, schema::LoginResponse,
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

pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
