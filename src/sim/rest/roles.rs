//! Role routes: create, modify, delete, and a member's roles.
//!
//! HTTP only; every change goes through the world and its dispatches.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::Value;
use twilight_model::guild::Permissions;

use super::error::{ApiError, ApiResult};
use super::extract::{Bot, DiscordJson, bot_guild, int_field, snowflake, snowflake_field};
use crate::sim::Shared;
use crate::sim::world;

/// Create Guild Role: the same fields as Modify Guild Role, with Discord's defaults
/// ("new role", @everyone's permissions, no colour).
pub(super) async fn create_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    let req = DiscordJson::object(&body)?;
    let edit = world::role_edit_from_json(&req)?;
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let everyone = w
        .roles
        .get(&w.guild_id)
        .map_or(Permissions::VIEW_CHANNEL, |r| r.permissions);
    let (role, events) = w.create_role(
        Some(bot),
        edit.name,
        edit.permissions.unwrap_or(everyone),
        edit.color.unwrap_or(0),
        edit.hoist.unwrap_or(false),
        edit.mentionable.unwrap_or(false),
    )?;
    state.emit_in(g, &events);
    Ok(axum::Json(role).into_response())
}

/// Get Guild Roles.
pub(super) async fn get_roles(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
) -> ApiResult {
    let mut state = shared.lock();
    let (_, w) = bot_guild(&mut state, &g)?;
    let roles: Vec<Value> = w.roles.values().map(world::role_json).collect();
    Ok(axum::Json(roles).into_response())
}

/// Get Guild Role.
pub(super) async fn get_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, r)): Path<(String, String)>,
) -> ApiResult {
    let mut state = shared.lock();
    let (_, w) = bot_guild(&mut state, &g)?;
    let role = snowflake("role_id", &r)?;
    let role = w.roles.get(&role).ok_or_else(|| ApiError::code(10011))?;
    Ok(axum::Json(world::role_json(role)).into_response())
}

/// Modify Guild Role Positions: a JSON array of `{id, position?}`; answers every role.
pub(super) async fn move_roles(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    let list = DiscordJson::list(&body)?;
    let mut moves = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let read = || -> ApiResult<(u64, Option<i64>)> {
            Ok((
                snowflake_field(entry, "id")?.required("id")?,
                int_field(entry, "position")?.given(),
            ))
        };
        // "position?: ?integer": an entry without one moves nothing.
        if let (id, Some(position)) = read().map_err(|e| e.in_entry(i))? {
            moves.push((id, position));
        }
    }
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let events = w.move_roles(Some(bot), &moves)?;
    let mut roles: Vec<&world::Role> = w.roles.values().collect();
    roles.sort_by_key(|r| (r.position, std::cmp::Reverse(r.id)));
    let roles: Vec<Value> = roles.into_iter().map(world::role_json).collect();
    state.emit_in(g, &events);
    Ok(axum::Json(roles).into_response())
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
    let req = DiscordJson::object(&body)?;
    let edit = world::role_edit_from_json(&req)?;
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
