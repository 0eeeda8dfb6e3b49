//! Probes: liveness (no I/O) and readiness (database round trip + migrations).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;

/// How long the readiness database check may take.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// Present on 503.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// Present on 503: what failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub checks: Checks,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    /// `ok` or what went wrong.
    pub database: String,
    pub migrations: String,
    /// `ok`, or `shutting_down`.
    pub lifecycle: String,
}

/// Liveness: 200 while the process can serve.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn live() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: 200 when the database answers and migrations are applied;
/// 503 `not_ready` otherwise and from the first moment of shutdown.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness))
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let lifecycle = if state.draining.is_cancelled() {
        "shutting_down".to_string()
    } else {
        "ok".to_string()
    };
    let (database, migrations) =
        match tokio::time::timeout(READY_TIMEOUT, state.store.check()).await {
            Ok(Ok(health)) if health.migrations_applied => ("ok".to_string(), "ok".to_string()),
            Ok(Ok(_)) => ("ok".to_string(), "pending".to_string()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: database check failed");
                ("unavailable".to_string(), "unknown".to_string())
            }
            Err(_) => ("timeout".to_string(), "unknown".to_string()),
        };
    let ok = database == "ok" && migrations == "ok" && lifecycle == "ok";
    let checks = Checks {
        database,
        migrations,
        lifecycle,
    };
    if ok {
        (
            StatusCode::OK,
            Json(Readiness {
                status: "ready",
                code: None,
                error: None,
                checks,
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Readiness {
                status: "not_ready",
                code: Some("not_ready"),
                error: Some("service is not ready".into()),
                checks,
            }),
        )
    }
}

/// Prometheus text exposition.
pub async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics::render(),
    )
}
