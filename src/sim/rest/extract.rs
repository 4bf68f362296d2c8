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
use serde_json::{Map, Value, json};

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

/// A JSON body parsed as Discord does: bad JSON is 50109, a body of the wrong shape is
/// 50035 with the error on the body itself (`{"errors": {"_errors": [...]}}`).
pub struct DiscordJson<T>(pub T);

fn json_body(body: &Bytes, empty: Value) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(empty);
    }
    serde_json::from_slice(body).map_err(|_| ApiError::code(50109))
}

impl DiscordJson<Map<String, Value>> {
    /// A JSON object (an empty body reads as `{}`).
    pub(super) fn object(body: &Bytes) -> ApiResult<Map<String, Value>> {
        match json_body(body, json!({}))? {
            Value::Object(map) => Ok(map),
            _ => Err(ApiError::invalid_body(
                "DICT_TYPE_CONVERT",
                "Only dictionaries may be used in a DictType",
            )),
        }
    }
}

impl DiscordJson<Vec<Map<String, Value>>> {
    /// A JSON array of objects (the position routes).
    pub(super) fn list(body: &Bytes) -> ApiResult<Vec<Map<String, Value>>> {
        let Value::Array(items) = json_body(body, json!([]))? else {
            return Err(ApiError::invalid_body(
                "LIST_TYPE_CONVERT",
                "Only iterables may be used in a ListType",
            ));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(map) => Ok(map),
                _ => Err(ApiError::invalid_field(
                    &i.to_string(),
                    "MODEL_TYPE_CONVERT",
                    "Only dictionaries may be used in a ModelType",
                )),
            })
            .collect()
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

pub(super) use world::id_from_json as id_field;

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

// Fields of a JSON object body, each absent, null or a value, refused with Discord's
// 50035 naming the field when it has the wrong type.

/// What a field held: absent, `null`, or a value.
pub(super) enum Field<T> {
    Absent,
    Null,
    Value(T),
}

impl<T> Field<T> {
    /// Absent = unchanged (`None`), null = cleared (`Some(None)`).
    pub(super) fn nullable(self) -> Option<Option<T>> {
        match self {
            Field::Absent => None,
            Field::Null => Some(None),
            Field::Value(v) => Some(Some(v)),
        }
    }

    /// A field the route requires: absent or null is refused as Discord refuses it.
    pub(super) fn required(self, name: &str) -> ApiResult<T> {
        self.given().ok_or_else(|| {
            ApiError::invalid_field(name, "BASE_TYPE_REQUIRED", "This field is required")
        })
    }

    /// Absent or null = unchanged.
    pub(super) fn given(self) -> Option<T> {
        match self {
            Field::Value(v) => Some(v),
            _ => None,
        }
    }
}

fn field<T>(
    body: &Map<String, Value>,
    name: &str,
    code: &str,
    message: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> ApiResult<Field<T>> {
    match body.get(name) {
        None => Ok(Field::Absent),
        Some(Value::Null) => Ok(Field::Null),
        Some(v) => read(v)
            .map(Field::Value)
            .ok_or_else(|| ApiError::invalid_field(name, code, message)),
    }
}

pub(super) fn string_field(body: &Map<String, Value>, name: &str) -> ApiResult<Field<String>> {
    field(body, name, "BASE_TYPE_STRING", "Must be a string.", |v| {
        v.as_str().map(str::to_owned)
    })
}

pub(super) fn bool_field(body: &Map<String, Value>, name: &str) -> ApiResult<Field<bool>> {
    field(
        body,
        name,
        "BASE_TYPE_BOOLEAN",
        "Must be either true or false.",
        |v| v.as_bool(),
    )
}

pub(super) fn int_field(body: &Map<String, Value>, name: &str) -> ApiResult<Field<i64>> {
    field(body, name, "NUMBER_TYPE_COERCE", "Value is not int.", |v| {
        v.as_i64()
    })
}

/// A non-negative integer that fits `T` (bitrate, user limit, slowmode).
pub(super) fn count_field<T: TryFrom<u64>>(
    body: &Map<String, Value>,
    name: &str,
) -> ApiResult<Field<T>> {
    field(body, name, "NUMBER_TYPE_COERCE", "Value is not int.", |v| {
        v.as_u64().and_then(|n| T::try_from(n).ok())
    })
}

pub(super) fn id_list_field(body: &Map<String, Value>, name: &str) -> ApiResult<Field<Vec<u64>>> {
    field(
        body,
        name,
        "NUMBER_TYPE_COERCE",
        "Value is not snowflake.",
        |v| v.as_array()?.iter().map(id_field).collect(),
    )
}

pub(super) fn snowflake_field(body: &Map<String, Value>, name: &str) -> ApiResult<Field<u64>> {
    field(
        body,
        name,
        "NUMBER_TYPE_COERCE",
        "Value is not snowflake.",
        id_field,
    )
}

/// Documented fields the simulator does not model. A value there is refused with 50035
/// naming the field, never accepted and dropped: a client must not see a 200 for a change
/// that did not happen. `null` (the documented "unset") is accepted.
pub(super) fn refuse_unmodelled(body: &Map<String, Value>, fields: &[&str]) -> ApiResult<()> {
    for f in fields {
        if body.get(*f).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid_field(
                f,
                "SIMULATOR_UNSUPPORTED",
                "coven sim does not model this field (docs/simulator.md, \"What it does not do\").",
            ));
        }
    }
    Ok(())
}

/// Image data as Discord takes it (a `data:image/...;base64,` URI), kept as the hash
/// Discord would return for it.
pub(super) fn image_field(body: &Map<String, Value>, name: &str) -> ApiResult<Field<String>> {
    field(body, name, "IMAGE_INVALID", "Invalid image data", |v| {
        let uri = v.as_str()?;
        let rest = uri.strip_prefix("data:image/")?;
        let (kind, data) = rest.split_once(";base64,")?;
        if !matches!(kind, "png" | "jpeg" | "jpg" | "gif" | "webp") || data.is_empty() {
            return None;
        }
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()?;
        let hash = crate::sim::ids::digest_hex(&bytes, 16);
        Some(if kind == "gif" {
            format!("a_{hash}")
        } else {
            hash
        })
    })
}

/// A boolean query string param, as the Reference's "Boolean Query Strings" reads one:
/// `True`, `true` or `1`, and `False`, `false` or `0`.
pub(super) fn boolean_query(name: &str, raw: Option<&str>) -> ApiResult<bool> {
    match raw {
        None | Some("false" | "False" | "0") => Ok(false),
        Some("true" | "True" | "1") => Ok(true),
        Some(_) => Err(ApiError::invalid_field(
            name,
            "BASE_TYPE_BOOLEAN",
            "Must be either true or false.",
        )),
    }
}
