//! Channel routes: list, create, read, modify, delete, and permission overwrites. The
//! bot sees channels it cannot view as Discord shows them (left out, or 50001).
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
use super::extract::{Bot, DiscordJson, bot_guild, channel_guild, id_field, overwrites, snowflake};
use crate::sim::Shared;
use crate::sim::world::{self, ChannelEdit, NewChannel};

pub(super) async fn list_channels(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
) -> ApiResult {
    let mut state = shared.lock();
    let (_, w) = bot_guild(&mut state, &g)?;
    let w = &*w;
    // Discord's "Obfuscated Channels": the list leaves out what the bot cannot view.
    let list: Vec<Value> = w
        .channels
        .values()
        .filter(|c| w.bot_can_view(c))
        .map(|c| w.channel_json(c, true))
        .collect();
    Ok(axum::Json(list).into_response())
}

#[derive(Deserialize)]
struct CreateChannel {
    name: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<u8>,
    #[serde(default)]
    parent_id: Option<Value>,
    #[serde(default)]
    user_limit: Option<u32>,
    #[serde(default)]
    permission_overwrites: Option<Vec<Map<String, Value>>>,
}

pub(super) async fn create_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    let DiscordJson(req) = DiscordJson::<CreateChannel>::parse(&body)?;
    let Some(name) = req.name else {
        return Err(ApiError::invalid_field(
            "name",
            "BASE_TYPE_REQUIRED",
            "This field is required",
        ));
    };
    let parent_id = match req.parent_id {
        None | Some(Value::Null) => None,
        Some(v) => Some(id_field(&v).ok_or_else(|| {
            ApiError::invalid_field("parent_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        })?),
    };
    let overwrites = overwrites(&req.permission_overwrites.unwrap_or_default())?;
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let (id, events) = w.create_channel(
        Some(bot),
        NewChannel {
            name,
            kind: req.kind.unwrap_or(world::kind::TEXT),
            parent_id,
            user_limit: req.user_limit.unwrap_or(0),
            overwrites,
        },
    )?;
    let channel = w.channel(id).map(|c| w.channel_json_for_bot(c, true))?;
    state.emit_in(g, &events);
    Ok((StatusCode::CREATED, axum::Json(channel)).into_response())
}

pub(super) async fn get_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(c): Path<String>,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let mut state = shared.lock();
    let (_, w) = channel_guild(&mut state, id)?;
    let w = &*w;
    // A channel the bot cannot view answers 50001 Missing Access ("Obfuscated Channels").
    let channel = w.channel_for(Some(w.bot_id), id)?;
    Ok(axum::Json(w.channel_json(channel, true)).into_response())
}

#[derive(Deserialize)]
struct UpdateChannel {
    name: Option<String>,
    user_limit: Option<u32>,
    #[serde(default)]
    permission_overwrites: Option<Vec<Map<String, Value>>>,
}

pub(super) async fn update_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(c): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let DiscordJson(req) = DiscordJson::<UpdateChannel>::parse(&body)?;
    let edit = ChannelEdit {
        name: req.name,
        user_limit: req.user_limit,
        overwrites: req
            .permission_overwrites
            .as_deref()
            .map(overwrites)
            .transpose()?,
    };
    let mut state = shared.lock();
    let (g, w) = channel_guild(&mut state, id)?;
    let bot = w.bot_id;
    let events = w.update_channel(Some(bot), id, edit)?;
    let channel = w.channel(id).map(|c| w.channel_json_for_bot(c, true))?;
    state.emit_in(g, &events);
    Ok(axum::Json(channel).into_response())
}

/// Edit Channel Permissions: `{type, allow?, deny?}` for the role or member in the path.
pub(super) async fn set_overwrite(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((c, o)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let target = snowflake("overwrite_id", &o)?;
    let DiscordJson(req) = DiscordJson::<Map<String, Value>>::parse(&body)?;
    let overwrite = world::overwrite_from_json(&req, Some(target)).map_err(|what| {
        ApiError::invalid_field(what, "BASE_TYPE_INVALID", &format!("Invalid {what}."))
    })?;
    let mut state = shared.lock();
    let (g, w) = channel_guild(&mut state, id)?;
    let bot = w.bot_id;
    let events = w.set_overwrite(Some(bot), id, overwrite)?;
    state.emit_in(g, &events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn delete_overwrite(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((c, o)): Path<(String, String)>,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let target = snowflake("overwrite_id", &o)?;
    let mut state = shared.lock();
    let (g, w) = channel_guild(&mut state, id)?;
    let bot = w.bot_id;
    let events = w.delete_overwrite(Some(bot), id, target)?;
    state.emit_in(g, &events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn delete_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(c): Path<String>,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let mut state = shared.lock();
    let (g, w) = channel_guild(&mut state, id)?;
    let bot = w.bot_id;
    let (channel, events) = w.delete_channel(Some(bot), id)?;
    state.emit_in(g, &events);
    Ok(axum::Json(channel).into_response())
}
