//! Chats: direct and group, members, history and read markers (the rules:
//! `domain::chats` and `domain::membership`).

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{AppJson, AuthUser, ChatIdPath, ChatMemberPath, parse_id};
use super::schema::{self, ChatBody, MessageBody, ReadMarkerBody};
use crate::app::AppState;
use crate::ids::{ChatId, MessageId};
use crate::store::{HistoryPage, Role};

/// Default and largest history page sizes.
pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;

#[derive(Debug, Deserialize, ToSchema)]
pub struct InitiateRequest {
    #[schema(example = "bob")]
    pub target_username: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InitiateResponse {
    #[schema(value_type = i64)]
    pub chat_id: ChatId,
    /// `created`, or `exists` when the pair already had a chat.
    #[schema(example = "created")]
    pub status: &'static str,
}

/// Start (or find) the direct chat with another user.
#[utoipa::path(
    post, path = "/chats/initiate", tag = "chats",
    request_body = InitiateRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`status` is `created` or `exists`", body = InitiateResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
        (status = 404, description = "`user_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_target` (yourself)", body = ErrorBody),
    )
)]
pub async fn initiate(
    State(state): State<AppState>,
    me: AuthUser,
    AppJson(req): AppJson<InitiateRequest>,
) -> Result<Json<InitiateResponse>, ApiError> {
    let (chat_id, created) = state
        .chats
        .initiate_direct(&me, &req.target_username)
        .await?;
    Ok(Json(InitiateResponse {
        chat_id,
        status: if created { "created" } else { "exists" },
    }))
}

/// The caller's chats, most recent activity first.
#[utoipa::path(
    get, path = "/chats", tag = "chats",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Vec<ChatBody>),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    me: AuthUser,
) -> Result<Json<Vec<ChatBody>>, ApiError> {
    let chats = state.chats.list(me.id).await?;
    Ok(Json(chats.into_iter().map(Into::into).collect()))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateChatRequest {
    /// Only `group` (direct chats come from `/chats/initiate`).
    #[serde(rename = "type")]
    #[schema(example = "group")]
    pub kind: String,
    #[schema(example = "Team")]
    pub title: String,
    /// Usernames of the other members; duplicates and your own name are ignored.
    #[serde(default)]
    pub members: Vec<String>,
}

/// Create a group; the caller is its admin.
#[utoipa::path(
    post, path = "/chats", tag = "chats",
    request_body = CreateChatRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The group, with members", body = ChatBody),
        (status = 400, description = "`invalid_request` (malformed JSON, `type` not `group`)", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
        (status = 404, description = "`user_not_found` (nothing is created)", body = ErrorBody),
        (status = 422, description = "`invalid_title`, `too_many_members`", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    me: AuthUser,
    AppJson(req): AppJson<CreateChatRequest>,
) -> Result<(StatusCode, Json<ChatBody>), ApiError> {
    if req.kind != "group" {
        return Err(ApiError::InvalidRequest(
            "type must be \"group\"; start a direct chat with POST /chats/initiate".into(),
        ));
    }
    let chat = state
        .chats
        .create_group(&me, &req.title, &req.members)
        .await?;
    Ok((StatusCode::CREATED, Json(chat.into())))
}

/// One chat, with its members.
#[utoipa::path(
    get, path = "/chats/{chat_id}", tag = "chats",
    params(("chat_id" = i64, Path, description = "Chat id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat, with members", body = ChatBody),
        (status = 400, description = "`invalid_request` (bad id)", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
        (status = 404, description = "`chat_not_found` (also when not a member)", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    me: AuthUser,
    ChatIdPath(chat_id): ChatIdPath,
) -> Result<Json<ChatBody>, ApiError> {
    Ok(Json(state.chats.detail(chat_id, me.id).await?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RenameRequest {
    #[schema(example = "Team (new)")]
    pub title: String,
}

/// Rename a group (admins).
#[utoipa::path(
    patch, path = "/chats/{chat_id}", tag = "chats",
    params(("chat_id" = i64, Path, description = "Chat id")),
    request_body = RenameRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat, with members", body = ChatBody),
        (status = 403, description = "`forbidden` (not an admin)", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_title`, `not_a_group`", body = ErrorBody),
    )
)]
pub async fn rename(
    State(state): State<AppState>,
    me: AuthUser,
    ChatIdPath(chat_id): ChatIdPath,
    AppJson(req): AppJson<RenameRequest>,
) -> Result<Json<ChatBody>, ApiError> {
    Ok(Json(
        state.chats.rename(chat_id, me.id, &req.title).await?.into(),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AddMemberRequest {
    #[schema(example = "carol")]
    pub username: String,
}

/// Add a member (admins); already a member changes nothing.
#[utoipa::path(
    post, path = "/chats/{chat_id}/members", tag = "chats",
    params(("chat_id" = i64, Path, description = "Chat id")),
    request_body = AddMemberRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat, with members", body = ChatBody),
        (status = 403, description = "`forbidden` (not an admin)", body = ErrorBody),
        (status = 404, description = "`chat_not_found`, `user_not_found`", body = ErrorBody),
        (status = 422, description = "`not_a_group`, `too_many_members`", body = ErrorBody),
    )
)]
pub async fn add_member(
    State(state): State<AppState>,
    me: AuthUser,
    ChatIdPath(chat_id): ChatIdPath,
    AppJson(req): AppJson<AddMemberRequest>,
) -> Result<Json<ChatBody>, ApiError> {
    Ok(Json(
        state
            .chats
            .add_member(chat_id, me.id, &req.username)
            .await?
            .into(),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SetRoleRequest {
    /// `admin` or `member`.
    #[schema(example = "admin")]
    pub role: String,
}

/// Change a member's role (admins).
#[utoipa::path(
    patch, path = "/chats/{chat_id}/members/{user_id}", tag = "chats",
    params(
        ("chat_id" = i64, Path, description = "Chat id"),
        ("user_id" = i64, Path, description = "The member's user id"),
    ),
    request_body = SetRoleRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat, with members", body = ChatBody),
        (status = 400, description = "`invalid_request` (role not `admin` or `member`)", body = ErrorBody),
        (status = 403, description = "`forbidden` (not an admin)", body = ErrorBody),
        (status = 404, description = "`chat_not_found`, `user_not_found` (not a member)", body = ErrorBody),
        (status = 422, description = "`not_a_group`", body = ErrorBody),
    )
)]
pub async fn set_role(
    State(state): State<AppState>,
    me: AuthUser,
    ChatMemberPath(chat_id, user_id): ChatMemberPath,
    AppJson(req): AppJson<SetRoleRequest>,
) -> Result<Json<ChatBody>, ApiError> {
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::InvalidRequest(format!(
            "role must be \"admin\" or \"member\", got {:?}",
            req.role
        ))
    })?;
    Ok(Json(
        state
            .chats
            .set_role(chat_id, me.id, user_id, role)
            .await?
            .into(),
    ))
}

/// Remove a member (admins), or leave (yourself).
#[utoipa::path(
    delete, path = "/chats/{chat_id}/members/{user_id}", tag = "chats",
    params(
        ("chat_id" = i64, Path, description = "Chat id"),
        ("user_id" = i64, Path, description = "The member's user id"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "`forbidden` (not an admin, not yourself)", body = ErrorBody),
        (status = 404, description = "`chat_not_found`, `user_not_found` (not a member)", body = ErrorBody),
        (status = 422, description = "`not_a_group`", body = ErrorBody),
    )
)]
pub async fn remove_member(
    State(state): State<AppState>,
    me: AuthUser,
    ChatMemberPath(chat_id, user_id): ChatMemberPath,
) -> Result<StatusCode, ApiError> {
    state.chats.remove_member(chat_id, me.id, user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ReadRequest {
    /// The highest message id read; the marker only moves forward.
    #[schema(value_type = i64)]
    pub up_to: i64,
}

/// Move the caller's read marker forward.
#[utoipa::path(
    post, path = "/chats/{chat_id}/read", tag = "chats",
    params(("chat_id" = i64, Path, description = "Chat id")),
    request_body = ReadRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The marker (unchanged when `up_to` is lower)", body = ReadMarkerBody),
        (status = 400, description = "`invalid_request` (`up_to` above the chat's latest message)", body = ErrorBody),
        (status = 404, description = "`chat_not_found`", body = ErrorBody),
    )
)]
pub async fn read(
    State(state): State<AppState>,
    me: AuthUser,
    ChatIdPath(chat_id): ChatIdPath,
    AppJson(req): AppJson<ReadRequest>,
) -> Result<Json<ReadMarkerBody>, ApiError> {
    if req.up_to < 0 {
        return Err(ApiError::InvalidRequest(
            "up_to must be a message id (a non-negative integer)".into(),
        ));
    }
    let marker = state
        .chats
        .mark_read(chat_id, &me, MessageId(req.up_to), None)
        .await?;
    Ok(Json(marker.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// Page size, 1-200 (default 50). Out of range is rejected, not clamped.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    pub limit: Option<String>,
    /// Return the messages just older than this id.
    #[param(value_type = Option<i64>)]
    pub before: Option<String>,
    /// Return the messages just newer than this id.
    #[param(value_type = Option<i64>)]
    pub after: Option<String>,
}

impl HistoryParams {
    fn page(&self) -> Result<HistoryPage, ApiError> {
        let limit = match &self.limit {
            None => DEFAULT_LIMIT,
            Some(raw) => match raw.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::InvalidRequest(format!(
                        "limit must be an integer from 1 to {MAX_LIMIT}, got {raw:?}"
                    )));
                }
            },
        };
        let before = self
            .before
            .as_deref()
            .map(|r| parse_id("before", r).map(MessageId))
            .transpose()?;
        // `after=0` pages from the very first message.
        let after = match self.after.as_deref() {
            Some("0") => Some(MessageId(0)),
            other => other
                .map(|r| parse_id("after", r).map(MessageId))
                .transpose()?,
        };
        match (before, after) {
            (Some(_), Some(_)) => Err(ApiError::InvalidRequest(
                "give either before or after, not both".into(),
            )),
            (Some(id), None) => Ok(HistoryPage::Before { id, limit }),
            (None, Some(id)) => Ok(HistoryPage::After { id, limit }),
            (None, None) => Ok(HistoryPage::Latest { limit }),
        }
    }
}

/// A page of a chat's history, ascending by id (timeline events included).
#[utoipa::path(
    get, path = "/chats/{chat_id}/messages", tag = "chats",
    params(("chat_id" = i64, Path, description = "Chat id"), HistoryParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Ascending by id", body = Vec<MessageBody>),
        (status = 400, description = "`invalid_request` (bad id, limit, before/after)", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
        (status = 404, description = "`chat_not_found` (also when not a member)", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    me: AuthUser,
    ChatIdPath(chat_id): ChatIdPath,
    query: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::InvalidRequest(format!("invalid query: {e}")))?;
    let page = params.page()?;
    let page = state.chats.history(chat_id, me.id, page).await?;
    let json = schema::page_json(&page);
    drop(page);
    let body = state
        .responses
        .body(json)
        .await
        .ok_or(ApiError::RateLimited {
            retry_after: Duration::from_secs(1),
        })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}
