//! Role routes: create, modify, delete, and a member's roles.
//!
//! HTTP only; every change goes through the world and its dispatches.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Map, Value};
use twilight_model::guild::Permissions;

use super::error::{ApiError, ApiResult};
use super::extract::{Bot, DiscordJson, bot_guild, permissions_field, snowflake};
use crate::sim::Shared;
use crate::sim::world;

#[derive(Deserialize)]
struct CreateRole {
    name: Option<String>,
    #[serde(default)]
    permissions: Option<Value>,
    #[serde(default)]
    color: Option<u32>,
    #[serde(default)]
    hoist: Option<bool>,
    #[serde(default)]
    mentionable: Option<bool>,
}

pub(super) async fn create_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    let DiscordJson(req) = DiscordJson::<CreateRole>::parse(&body)?;
    let permissions =
        permissions_field(req.permissions.as_ref())?.unwrap_or(Permissions::VIEW_CHANNEL);
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let (role, events) = w.create_role(
        Some(bot),
        req.name,
        permissions,
        req.color.unwrap_or(0),
        req.hoist.unwrap_or(false),
        req.mentionable.unwrap_or(false),
    )?;
    state.emit_in(g, &events);
    Ok(axum::Json(role).into_response())
}

pub(super) async fn delete_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, r)): Path<(String, String)>,
) -> ApiResult {
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let role = snowflake("role_id", &r)?;
    let bot = w.bot_id;
    let events = w.delete_role(Some(bot), role)?;
    state.emit_in(g, &events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Modify Guild Role: every field optional and nullable.
pub(super) async fn update_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, r)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    let role = snowflake("role_id", &r)?;
    let DiscordJson(req) = DiscordJson::<Map<String, Value>>::parse(&body)?;
    let edit = world::role_edit_from_json(&req).map_err(|field| {
        ApiError::invalid_field(field, "BASE_TYPE_INVALID", "Value is of the wrong type.")
    })?;
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let (role, events) = w.update_role(Some(bot), role, edit)?;
    state.emit_in(g, &events);
    Ok(axum::Json(role).into_response())
}

pub(super) async fn add_member_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u, r)): Path<(String, String, String)>,
) -> ApiResult {
    set_role(&shared, &g, &u, &r, true)
}

pub(super) async fn remove_member_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u, r)): Path<(String, String, String)>,
) -> ApiResult {
    set_role(&shared, &g, &u, &r, false)
}

fn set_role(shared: &Shared, g: &str, u: &str, r: &str, grant: bool) -> ApiResult {
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, g)?;
    let user = snowflake("user_id", u)?;
    let role = snowflake("role_id", r)?;
    let bot = w.bot_id;
    let events = w.set_member_role(Some(bot), user, role, grant)?;
    state.emit_in(g, &events);
    Ok(StatusCode::NO_CONTENT.into_response())
}
