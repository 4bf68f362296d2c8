//! Member and voice routes: read, add (`guilds.join`), Modify Guild Member and Modify
//! Current Member, kick, and voice states.
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
    Bot, DiscordJson, Field, bool_field, bot_guild, count_field, id_list_field, image_field,
    snowflake, snowflake_field, string_field,
};
use crate::sim::Shared;
use crate::sim::ids::now_ms;
use crate::sim::world::{Joining, MemberEdit, SelfEdit};

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

/// List Guild Members: "restricted according to whether the GUILD_MEMBERS Privileged
/// Intent is enabled for your application", which the simulated application is not, so
/// Discord's answer is 50001 Missing Access (for a guild the bot is in; 10004 or 50001
/// otherwise, as for every guild route).
pub(super) async fn list_members(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
) -> ApiResult {
    bot_guild(&mut shared.lock(), &g)?;
    Err(ApiError::code(50001))
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
    let req = DiscordJson::object(&body)?;
    let token = string_field(&req, "access_token")?.required("access_token")?;
    let roles = id_list_field(&req, "roles")?.given().unwrap_or_default();
    let joining = Joining {
        nick: string_field(&req, "nick")?.given(),
        mute: bool_field(&req, "mute")?.given().unwrap_or(false),
        deaf: bool_field(&req, "deaf")?.given().unwrap_or(false),
    };
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
    match w.add_member(bot, user, &roles, joining)? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(events) => {
            let member = w.member_json(user).ok_or_else(|| ApiError::code(10007))?;
            state.emit_in(g, &events);
            Ok((StatusCode::CREATED, axum::Json(member)).into_response())
        }
    }
}

/// Modify Guild Member: every documented field (`nick`, `roles`, `mute`, `deaf`,
/// `channel_id`, `communication_disabled_until`, `flags`), all optional and nullable.
/// `@me` in the path is Modify Current Member.
pub(super) async fn modify_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let req = DiscordJson::object(&body)?;
    if u == "@me" {
        return modify_current_member(&shared, &g, &req);
    }
    let user = snowflake("user_id", &u)?;
    let edit = MemberEdit {
        nick: string_field(&req, "nick")?.nullable(),
        roles: match id_list_field(&req, "roles")? {
            Field::Absent => None,
            Field::Null => Some(Vec::new()),
            Field::Value(list) => Some(list),
        },
        mute: bool_field(&req, "mute")?.given(),
        deaf: bool_field(&req, "deaf")?.given(),
        channel_id: snowflake_field(&req, "channel_id")?.nullable(),
        communication_disabled_until: match string_field(&req, "communication_disabled_until")? {
            Field::Absent => None,
            Field::Null => Some(None),
            Field::Value(at) => {
                let when = chrono::DateTime::parse_from_rfc3339(&at).map_err(|_| {
                    ApiError::invalid_field(
                        "communication_disabled_until",
                        "DATE_TIME_TYPE_PARSE",
                        "Could not parse the timestamp. Should be ISO8601.",
                    )
                })?;
                Some(Some((at, when.timestamp_millis())))
            }
        },
        flags: count_field::<u64>(&req, "flags")?.given(),
    };
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, &g)?;
    let bot = w.bot_id;
    let events = w.modify_member(bot, user, edit, now_ms() as i64)?;
    let member = w.member_json(user).ok_or_else(|| ApiError::code(10007))?;
    state.emit_in(g, &events);
    Ok(axum::Json(member).into_response())
}

/// Modify Current Member: the bot's `nick`, guild `avatar` and `banner` (image data) and
/// `bio`.
fn modify_current_member(shared: &Shared, g: &str, req: &Map<String, Value>) -> ApiResult {
    let edit = SelfEdit {
        nick: string_field(req, "nick")?.nullable(),
        avatar: image_field(req, "avatar")?.nullable(),
        banner: image_field(req, "banner")?.nullable(),
        bio: string_field(req, "bio")?.nullable(),
    };
    let mut state = shared.lock();
    let (g, w) = bot_guild(&mut state, g)?;
    let events = w.modify_self(edit)?;
    let member = w
        .member_json(w.bot_id)
        .ok_or_else(|| ApiError::code(10007))?;
    state.emit_in(g, &events);
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
