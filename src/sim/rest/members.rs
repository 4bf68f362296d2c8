//! Member and voice routes: read, add (`guilds.join`), move (Modify Guild Member's
//! `channel_id`), kick, and voice states.
//!
//! HTTP only; every change goes through the world and its dispatches.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{ApiError, ApiResult};
use super::extract::{Bot, DiscordJson, bot_guild, id_field, snowflake};
use crate::sim::Shared;

pub(super) async fn get_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
) -> ApiResult {
    let mut state = shared.lock();
    let (_, w) = bot_guild(&mut state, &g)?;
    let user = snowflake("user_id", &u)?;
    let member = w.member_json(user).ok_or_else(|| ApiError::code(10007))?;
    Ok(axum::Json(member).into_response())
}

#[derive(Deserialize)]
struct AddMember {
    access_token: Option<String>,
    #[serde(default)]
    roles: Option<Vec<Value>>,
}

/// Adds a user to the guild with their OAuth2 token (`guilds.join` scope): 201 with the
/// member when added, 204 when they were a member already.
pub(super) async fn add_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    let user = snowflake("user_id", &u)?;
    let DiscordJson(req) = DiscordJson::<AddMember>::parse(&body)?;
    let Some(token) = req.access_token else {
        return Err(ApiError::invalid_field(
            "access_token",
            "BASE_TYPE_REQUIRED",
            "This field is required",
        ));
    };
    let mut roles = Vec::new();
    for r in req.roles.unwrap_or_default() {
        roles.push(id_field(&r).ok_or_else(|| {
            ApiError::invalid_field("roles", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        })?);
    }
    let mut state = shared.lock();
    match state.oauth.bearer(&token) {
        Some((owner, scopes)) if owner == user && scopes.iter().any(|s| s == "guilds.join") => {}
        _ => return Err(ApiError::code(50025)),
    }
    // The user may be known only to other guilds so far.
    let known = state.user(user).cloned();
    let (g, w) = bot_guild(&mut state, &g)?;
    if let Some(u) = known {
        w.users.entry(user).or_insert(u);
    }
    let bot = w.bot_id;
    match w.add_member(bot, user, &roles)? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(events) => {
            let member = w.member_json(user).ok_or_else(|| ApiError::code(10007))?;
            state.emit_in(g, &events);
            Ok((StatusCode::CREATED, axum::Json(member)).into_response())
        }
    }
}

/// Modify Guild Member: Coven uses it to move a user between voice channels
/// (`channel_id`, or `null` to disconnect).
pub(super) async fn modify_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let user = snowflake("user_id", &u)?;
    let DiscordJson(req) = DiscordJson::<Map<String, Value>>::parse(&body)?;
    if !w.members.contains_key(&user) {
        return Err(ApiError::code(10007));
    }
    if let Some(target) = req.get("channel_id") {
        let channel = match target {
            Value::Null => None,
            v => Some(id_field(v).ok_or_else(|| {
                ApiError::invalid_field(
                    "channel_id",
                    "NUMBER_TYPE_COERCE",
                    "Value is not snowflake.",
                )
            })?),
        };
        let bot = w.bot_id;
        let events = w.move_member(bot, user, channel)?;
        state.emit_in(g, &events);
    }
    let member = state
        .guild(g)
        .and_then(|w| w.member_json(user))
        .ok_or_else(|| ApiError::code(10007))?;
    Ok(axum::Json(member).into_response())
}

/// Remove Guild Member (a kick): 204, and the member is gone (10007 afterwards).
pub(super) async fn remove_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
) -> ApiResult {
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let user = snowflake("user_id", &u)?;
    let bot = w.bot_id;
    let events = w.remove_member(Some(bot), user)?;
    state.emit_in(g, &events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn get_voice_state(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
) -> ApiResult {
    let mut state = shared.lock();
    let (_, w) = bot_guild(&mut state, &g)?;
    let user = if u == "@me" {
        w.bot_id
    } else {
        snowflake("user_id", &u)?
    };
    let voice = w.voice.get(&user).ok_or_else(|| ApiError::code(10065))?;
    Ok(axum::Json(w.voice_json(user, Some(voice.channel_id), voice, true)).into_response())
}
