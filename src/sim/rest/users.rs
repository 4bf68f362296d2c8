//! Who the caller is: the Gateway URL for the bot, the current user and their guilds.
//!
//! Reads the world only; must not change it.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::extract::{Bot, Caller};
use crate::sim::Shared;

pub(super) async fn gateway_bot(State(shared): State<Arc<Shared>>, _: Bot) -> Response {
    axum::Json(json!({
        "url": shared.gateway_url(),
        "shards": 1,
        "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1},
    }))
    .into_response()
}

pub(super) async fn current_user(State(shared): State<Arc<Shared>>, caller: Caller) -> ApiResult {
    let state = shared.lock();
    let id = match caller {
        Caller::Bot => state.world.bot_id,
        Caller::User { id, scopes } => {
            if !scopes.iter().any(|s| s == "identify") {
                return Err(ApiError::unauthorized());
            }
            id
        }
    };
    let mut user = state
        .world
        .user_json(id)
        .ok_or_else(|| ApiError::code(10013))?;
    user["mfa_enabled"] = json!(false);
    user["locale"] = json!("en-US");
    user["verified"] = json!(true);
    Ok(axum::Json(user).into_response())
}

pub(super) async fn current_user_guilds(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> ApiResult {
    let state = shared.lock();
    let w = &state.world;
    let id = match caller {
        Caller::Bot => w.bot_id,
        Caller::User { id, scopes } => {
            if !scopes.iter().any(|s| s == "guilds") {
                return Err(ApiError::unauthorized());
            }
            id
        }
    };
    let guilds: Vec<Value> = if w.members.contains_key(&id) {
        vec![json!({
            "id": w.guild_id.to_string(),
            "name": w.guild_name,
            "icon": null,
            "banner": null,
            "owner": id == w.owner_id,
            "permissions": w.guild_permissions(id),
            "features": [],
        })]
    } else {
        Vec::new()
    };
    Ok(axum::Json(guilds).into_response())
}
