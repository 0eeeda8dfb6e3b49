//! Chats and their history.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{AppJson, AuthUser, ChatIdPath, parse_id};
use crate::app::AppState;
use crate::store::{ChatSummary, HistoryPage, Message};

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
    pub chat_id: i64,
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
    let target = state
        .store
        .user_by_name(&req.target_username)
        .await?
        .ok_or(ApiError::UserNotFound)?;
    if target.user.id == me.id {
        return Err(ApiError::unprocessable(
            "invalid_target",
            "you cannot start a chat with yourself",
        ));
    }
    let (chat_id, created) = state
        .store
        .initiate_direct_chat(me.id, target.user.id)
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
        (status = 200, body = Vec<ChatSummary>),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    me: AuthUser,
) -> Result<Json<Vec<ChatSummary>>, ApiError> {
    Ok(Json(state.store.chats_of(me.id).await?))
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
            .map(|r| parse_id("before", r))
            .transpose()?;
        // `after=0` pages from the very first message.
        let after = match self.after.as_deref() {
            Some("0") => Some(0),
            other => other.map(|r| parse_id("after", r)).transpose()?,
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

/// A page of a chat's history, ascending by id.
#[utoipa::path(
    get, path = "/chats/{chat_id}/messages", tag = "chats",
    params(("chat_id" = i64, Path, description = "Chat id"), HistoryParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Ascending by id", body = Vec<Message>),
        (status = 400, description = "`invalid_request` (bad id, limit, before/after)", body = ErrorBody),
        (status = 401, description = "`missing_token`, `invalid_token`", body = ErrorBody),
        (status = 404, description = "`chat_not_found` (also when not a participant)", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    me: AuthUser,
    ChatIdPath(chat_id): ChatIdPath,
    query: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::InvalidRequest(format!("invalid query: {e}")))?;
    let page = params.page()?;
    if !state.store.is_member(chat_id, me.id).await? {
        return Err(ApiError::ChatNotFound);
    }
    // The page arrives already serialized: the JSON array of `Message`s.
    let body = state.store.history_json(chat_id, page)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}
