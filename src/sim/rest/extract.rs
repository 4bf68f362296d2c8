//! Who is calling (the bot's token or a user's OAuth2 bearer) and reading requests as
//! Discord does: JSON bodies, snowflakes in paths, overwrite lists and bitsets, each
//! refused with Discord's error when malformed.
//!
//! Reads requests only; must not touch the world.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use twilight_model::guild::Permissions;

use super::error::{ApiError, ApiResult};
use crate::sim::world::{self, Overwrite, World};
use crate::sim::{Shared, State};

// Who is calling.

/// The bot, authenticated with `Authorization: Bot <token>`.
pub struct Bot;

impl FromRequestParts<Arc<Shared>> for Bot {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> ApiResult<Self> {
        match authorization(&parts.headers) {
            Some(Auth::Bot(token)) if token == shared.settings.bot_token.expose_secret() => Ok(Bot),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// Either the bot or a user's OAuth2 bearer token.
pub enum Caller {
    Bot,
    User { id: u64, scopes: Vec<String> },
}

impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Arc<Shared>) -> ApiResult<Self> {
        match authorization(&parts.headers) {
            Some(Auth::Bot(token)) if token == shared.settings.bot_token.expose_secret() => {
                Ok(Caller::Bot)
            }
            Some(Auth::Bearer(token)) => match shared.lock().oauth.bearer(token) {
                Some((id, scopes)) => Ok(Caller::User { id, scopes }),
                None => Err(ApiError::unauthorized()),
            },
            _ => Err(ApiError::unauthorized()),
        }
    }
}

enum Auth<'a> {
    Bot(&'a str),
    Bearer(&'a str),
}

fn authorization(headers: &HeaderMap) -> Option<Auth<'_>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = value.strip_prefix("Bot ") {
        Some(Auth::Bot(t))
    } else {
        value.strip_prefix("Bearer ").map(Auth::Bearer)
    }
}

/// A JSON body parsed as Discord does: bad JSON is 50109, wrong shapes are 50035.
pub struct DiscordJson<T>(pub T);

impl<T: DeserializeOwned> DiscordJson<T> {
    pub(super) fn parse(body: &Bytes) -> ApiResult<Self> {
        let value: Value = if body.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(body).map_err(|_| ApiError::code(50109))?
        };
        serde_json::from_value(value)
            .map(DiscordJson)
            .map_err(|e| ApiError::invalid_field("_body", "BASE_TYPE_INVALID", &format!("{e}")))
    }
}

pub(super) fn snowflake(field: &str, raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::invalid_field(
            field,
            "NUMBER_TYPE_COERCE",
            &format!("Value \"{raw}\" is not snowflake."),
        )
    })
}

/// The guild a `/guilds/{guild.id}/...` path names, as the bot may address it: 10004
/// Unknown Guild for an id no guild has, 50001 Missing Access for a guild the bot is not
/// in (Discord's answer to a bot addressing a guild it cannot see).
pub(super) fn bot_guild<'a>(state: &'a mut State, raw: &str) -> ApiResult<(u64, &'a mut World)> {
    let id = snowflake("guild_id", raw)?;
    match state.guild_mut(id) {
        None => Err(ApiError::code(10004)),
        Some(w) if !w.bot_in() => Err(ApiError::code(50001)),
        Some(w) => Ok((id, w)),
    }
}

/// The guild holding a channel the bot addresses by id (`/channels/{channel.id}`):
/// 10003 Unknown Channel when no guild has it, 50001 Missing Access when the bot is not
/// in its guild.
pub(super) fn channel_guild(state: &mut State, channel: u64) -> ApiResult<(u64, &mut World)> {
    let guild = state
        .guilds()
        .find(|w| w.channels.contains_key(&channel))
        .map(|w| w.guild_id)
        .ok_or_else(|| ApiError::code(10003))?;
    match state.guild_mut(guild) {
        Some(w) if w.bot_in() => Ok((guild, w)),
        _ => Err(ApiError::code(50001)),
    }
}

pub(super) use world::{bits_from_json as bits_field, id_from_json as id_field};

/// A list of overwrite objects, with Discord's 50035 naming the bad entry.
pub(super) fn overwrites(list: &[Map<String, Value>]) -> ApiResult<Vec<Overwrite>> {
    list.iter()
        .enumerate()
        .map(|(i, o)| {
            world::overwrite_from_json(o, None).map_err(|what| {
                ApiError::invalid_field(
                    &format!("permission_overwrites.{i}"),
                    "BASE_TYPE_INVALID",
                    &format!("Invalid {what}."),
                )
            })
        })
        .collect()
}

/// A permissions field, absent or null meaning "not given".
pub(super) fn permissions_field(v: Option<&Value>) -> ApiResult<Option<Permissions>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => bits_field(v).map(Some).ok_or_else(|| {
            ApiError::invalid_field(
                "permissions",
                "NUMBER_TYPE_COERCE",
                "Value is not a bitset.",
            )
        }),
    }
}
