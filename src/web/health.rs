//! What operators and load balancers ask: `/healthz` (the process answers) and
//! `/readyz` (Redis answers; the gateway's freshness is reported in the body, never in
//! the status).
//!
//! Owns the health answers. Must not touch sessions.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::live::freshness;

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz(State(app): State<AppState>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "streams": app.communities.all().iter().map(|c| c.hub.streams()).sum::<usize>(),
        "communities_watched": app.communities.len(),
    }))
    .into_response()
}

/// `GET /readyz`: 200 when this replica can serve (Redis answers), 503 otherwise. The
/// gateway's freshness is in the body, never in the status: a dead gateway must not take
/// every replica out of the load balancer (pages tell people updates are delayed).
pub async fn readyz(State(app): State<AppState>) -> Response {
    // A dropped connection is known at once: no need to wait out a command's timeout.
    let deployment = app.guilds.deployment();
    if !deployment.reachable() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unready", "redis": "unreachable"})),
        )
            .into_response();
    }
    match freshness::gateway_now(&**deployment).await {
        Ok(now) => {
            let gateway = match &now.report {
                Some(r) => json!({
                    "fresh": now.fresh(),
                    "state": r.state,
                    "reason": r.reason,
                    "age_ms": now.age_ms(),
                }),
                None => json!({"fresh": false, "state": null,
                               "reason": "no gateway status: is `coven gateway` running?"}),
            };
            (
                StatusCode::OK,
                axum::Json(json!({"status": "ready", "redis": "ok", "gateway": gateway})),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: Redis unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "unready", "redis": "unreachable"})),
            )
                .into_response()
        }
    }
}
