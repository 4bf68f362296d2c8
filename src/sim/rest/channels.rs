//! Channel routes: list, create, read, modify, delete, and permission overwrites. The
//! bot sees channels it cannot view as Discord shows them (left out, or 50001).
//!
//! HTTP only; every change goes through the world and its dispatches.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Map, Value};

use super::error::{ApiError, ApiResult};
use super::extract::{
    Bot, DiscordJson, bool_field, bot_guild, channel_guild, count_field, int_field, overwrites,
    refuse_unmodelled, snowflake, snowflake_field, string_field,
};
use crate::sim::Shared;
use crate::sim::world::{
    self, ChannelEdit, ChannelMove, ChannelSettings, NewChannel, NewChannelExtras,
};

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

/// Documented Create Guild Channel / Modify Channel fields the simulator does not model
/// (forum, media and thread defaults): refused when given, never dropped.
const UNMODELLED: &[&str] = &[
    "default_auto_archive_duration",
    "default_reaction_emoji",
    "available_tags",
    "default_sort_order",
    "default_forum_layout",
    "default_thread_rate_limit_per_user",
];

/// The settings Create Guild Channel and Modify Channel share.
fn settings(req: &Map<String, Value>) -> ApiResult<ChannelEdit> {
    refuse_unmodelled(req, UNMODELLED)?;
    // Channel flags a guild text or voice channel can carry are all set by Discord
    // (PINNED, REQUIRE_TAG, ... belong to threads, forums and media).
    if count_field::<u64>(req, "flags")?
        .given()
        .is_some_and(|f| f != 0)
    {
        refuse_unmodelled(req, &["flags"])?;
    }
    Ok(ChannelEdit {
        name: string_field(req, "name")?.given(),
        user_limit: count_field::<u32>(req, "user_limit")?.given(),
        overwrites: match req.get("permission_overwrites") {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) => {
                let mut objects = Vec::with_capacity(list.len());
                for (i, o) in list.iter().enumerate() {
                    objects.push(o.as_object().cloned().ok_or_else(|| {
                        ApiError::invalid_field(
                            &format!("permission_overwrites.{i}"),
                            "MODEL_TYPE_CONVERT",
                            "Only dictionaries may be used in a ModelType",
                        )
                    })?);
                }
                Some(overwrites(&objects)?)
            }
            Some(_) => {
                return Err(ApiError::invalid_field(
                    "permission_overwrites",
                    "BASE_TYPE_LIST",
                    "Must be a list.",
                ));
            }
        },
        position: int_field(req, "position")?.given(),
        parent_id: snowflake_field(req, "parent_id")?.nullable(),
        bitrate: count_field::<u32>(req, "bitrate")?.given(),
        topic: string_field(req, "topic")?.nullable(),
        nsfw: bool_field(req, "nsfw")?.given(),
        rate_limit_per_user: count_field::<u32>(req, "rate_limit_per_user")?.given(),
        rtc_region: string_field(req, "rtc_region")?.nullable(),
        video_quality_mode: count_field::<u8>(req, "video_quality_mode")?.given(),
    })
}

pub(super) async fn create_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    let req = DiscordJson::object(&body)?;
    let edit = settings(&req)?;
    let Some(name) = edit.name else {
        return Err(ApiError::invalid_field(
            "name",
            "BASE_TYPE_REQUIRED",
            "This field is required",
        ));
    };
    let kind = match count_field::<u8>(&req, "type")?.given() {
        Some(k) => k,
        None => world::kind::TEXT,
    };
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let (id, events) = w.create_channel(
        Some(bot),
        NewChannel {
            name,
            kind,
            parent_id: edit.parent_id.flatten(),
            user_limit: edit.user_limit.unwrap_or(0),
            overwrites: edit.overwrites.unwrap_or_default(),
            extras: NewChannelExtras {
                bitrate: edit.bitrate,
                position: edit.position,
                settings: ChannelSettings {
                    topic: edit.topic.flatten(),
                    nsfw: edit.nsfw.unwrap_or(false),
                    rate_limit_per_user: edit.rate_limit_per_user.unwrap_or(0),
                    rtc_region: edit.rtc_region.flatten(),
                    video_quality_mode: edit.video_quality_mode,
                },
            },
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

/// Modify Channel (guild channel): every documented field; `type` may only stay what it
/// is, since conversion needs the NEWS feature the simulated guilds lack.
pub(super) async fn update_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(c): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let req = DiscordJson::object(&body)?;
    let edit = settings(&req)?;
    let kind = count_field::<u8>(&req, "type")?.given();
    let mut state = shared.lock();
    let (g, w) = channel_guild(&mut state, id)?;
    if let Some(k) = kind
        && w.channel(id).is_ok_and(|c| c.kind != k)
    {
        return Err(ApiError::invalid_field(
            "type",
            "CHANNEL_TYPE_INVALID",
            "Only text and announcement channels convert, and only with the NEWS feature.",
        ));
    }
    let bot = w.bot_id;
    let events = w.update_channel(Some(bot), id, edit)?;
    let channel = w.channel(id).map(|c| w.channel_json_for_bot(c, true))?;
    state.emit_in(g, &events);
    Ok(axum::Json(channel).into_response())
}

/// Modify Guild Channel Positions: a JSON array of `{id, position?, parent_id?,
/// lock_permissions?}`; 204.
pub(super) async fn move_channels(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    let list = DiscordJson::list(&body)?;
    let mut moves = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let read = || -> ApiResult<ChannelMove> {
            if count_field::<u64>(entry, "flags")?
                .given()
                .is_some_and(|f| f != 0)
            {
                return Err(ApiError::invalid_field(
                    "flags",
                    "SIMULATOR_UNSUPPORTED",
                    "coven sim does not model channel flags.",
                ));
            }
            Ok(ChannelMove {
                id: snowflake_field(entry, "id")?.required("id")?,
                position: int_field(entry, "position")?.given(),
                parent_id: snowflake_field(entry, "parent_id")?.nullable(),
                lock_permissions: bool_field(entry, "lock_permissions")?.given(),
            })
        };
        moves.push(read().map_err(|e| e.in_entry(i))?);
    }
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let events = w.move_channels(Some(bot), &moves)?;
    state.emit_in(g, &events);
    Ok(StatusCode::NO_CONTENT.into_response())
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
    let req = DiscordJson::object(&body)?;
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
