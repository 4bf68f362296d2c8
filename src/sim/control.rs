//! The control API under `/_sim/`: what tests and the demo use to read the simulated
//! guilds and to make changes "in Discord" (people joining voice; channels, roles, member
//! roles, removals and permission overwrites changed by an admin, in the first guild; the
//! bot removed from a guild, a guild's outage; Gateway trouble; REST failures).
//!
//! Every change goes through the world and its dispatches, exactly as REST changes do.
//! Errors are plain JSON `{"error": "..."}` with a fitting status.

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::Shared;
use super::rest::Fault;
use super::world::{self, ChannelEdit, NewChannel, Overwrite, Refusal, VoiceFlags, kind};

pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/state", get(state))
        .route("/guilds/{guild}/bot", delete(remove_bot))
        .route("/guilds/{guild}/outage", post(outage))
        .route("/guilds/{guild}/members/{user}", put(join_guild))
        .route("/users", post(add_user))
        .route("/voice", post(voice))
        .route("/channels", post(create_channel))
        .route(
            "/channels/{id}",
            delete(delete_channel).patch(update_channel),
        )
        .route(
            "/channels/{id}/permissions/{target}",
            put(set_overwrite).delete(delete_overwrite),
        )
        .route("/roles", post(create_role))
        .route("/roles/{id}", delete(delete_role).patch(update_role))
        .route("/members/{user}", delete(remove_member))
        .route(
            "/members/{user}/roles/{role}",
            put(grant_role).delete(revoke_role),
        )
        .route("/gateway/disconnect", post(disconnect))
        .route("/gateway/reconnect", post(reconnect))
        .route("/gateway/invalidate", post(invalidate))
        .route("/gateway/zombie", post(zombie))
        .route("/gateway/heartbeat", post(request_heartbeat))
        .route("/gateway/expire", post(expire))
        .route("/rest/fail", post(fail))
        .route("/oauth/revoke", post(revoke))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such control route") })
}

/// A refused control request: a status and a sentence, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct Fail(pub StatusCode, pub String);

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

type Result<T = Response> = std::result::Result<T, Fail>;

fn error(status: StatusCode, message: impl Into<String>) -> Fail {
    Fail(status, message.into())
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Self {
        refusal(r)
    }
}

pub(super) fn refusal(r: Refusal) -> Fail {
    match r {
        Refusal::UnknownChannel => error(StatusCode::NOT_FOUND, "unknown channel"),
        Refusal::UnknownRole => error(StatusCode::NOT_FOUND, "unknown role"),
        Refusal::UnknownMember => error(StatusCode::FORBIDDEN, "user is not a member of the guild"),
        Refusal::UnknownUser => error(StatusCode::NOT_FOUND, "unknown user"),
        Refusal::UnknownVoiceState => error(StatusCode::NOT_FOUND, "user is not in voice"),
        Refusal::UnknownOverwrite => error(StatusCode::NOT_FOUND, "no such overwrite"),
        Refusal::MissingAccess => error(StatusCode::FORBIDDEN, "missing access"),
        Refusal::NotInVoice => error(StatusCode::BAD_REQUEST, "user is not in voice"),
        Refusal::MissingPermission(bit) => error(
            StatusCode::FORBIDDEN,
            format!("missing permission {}", world::permission_name(bit)),
        ),
        Refusal::ChannelFull => error(StatusCode::CONFLICT, "channel is full"),
        Refusal::OneParentAtATime => error(
            StatusCode::BAD_REQUEST,
            "only one channel can have a parent_id modified at a time",
        ),
        Refusal::Invalid(field, _, message) => {
            error(StatusCode::BAD_REQUEST, format!("{field}: {message}"))
        }
    }
}

/// Parses a control body; an empty body counts as `{}`.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T> {
    let raw: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(raw)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad body: {e}")))
}

/// Ids may be sent as strings (Discord style) or numbers.
fn id(v: &Value, field: &str) -> Result<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| error(StatusCode::BAD_REQUEST, format!("{field} must be an id")))
}

fn optional_id(v: Option<&Value>, field: &str) -> Result<Option<u64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => id(v, field).map(Some),
    }
}

/// A path segment that must be an id.
fn path_id(raw: String, what: &str) -> Result<u64> {
    id(&Value::String(raw), what)
}

fn overwrite_list(list: Option<&[Map<String, Value>]>) -> Result<Option<Vec<Overwrite>>> {
    list.map(|list| {
        list.iter()
            .enumerate()
            .map(|(i, o)| {
                world::overwrite_from_json(o, None).map_err(|what| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("permission_overwrites.{i}: bad {what}"),
                    )
                })
            })
            .collect()
    })
    .transpose()
}

#[derive(Deserialize)]
struct StateQuery {
    guild: Option<String>,
}

/// `GET /_sim/state[?guild=G]`: the first guild (or G) and the counters, plus `guilds`,
/// every guild the simulator holds.
async fn state(State(shared): State<Arc<Shared>>, Query(q): Query<StateQuery>) -> Result {
    let state = shared.lock();
    let w = match q.guild {
        None => &state.world,
        Some(raw) => {
            let id = path_id(raw, "guild")?;
            state
                .guild(id)
                .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown guild"))?
        }
    };
    let shards = shared.shards(&state);
    let body = json!({
        "guild_id": w.guild_id.to_string(),
        "client_id": shared.settings.client_id.to_string(),
        "bot_id": w.bot_id.to_string(),
        "owner_id": w.owner_id.to_string(),
        "room_category_id": w.room_category_id.to_string(),
        "lobby_id": w.lobby_id.to_string(),
        "users": w.users.values().map(|u| json!({
            "id": u.id.to_string(),
            "username": u.username,
            "global_name": u.global_name,
            "avatar": u.avatar,
            "bot": u.bot,
        })).collect::<Vec<_>>(),
        "channels": w.channels.values().map(|c| json!({
            "id": c.id.to_string(),
            "name": c.name,
            "type": c.kind,
            "parent_id": c.parent_id.map(|p| p.to_string()),
            "user_limit": c.user_limit,
            "bot_can_view": w.bot_can_view(c),
            "permission_overwrites": c.overwrites.iter().map(|o| json!({
                "id": o.id.to_string(),
                "type": o.kind,
                "allow": o.allow,
                "deny": o.deny,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "roles": w.roles.values().map(|r| json!({
            "id": r.id.to_string(),
            "name": r.name,
            "permissions": r.permissions,
            "position": r.position,
            "managed": r.managed,
        })).collect::<Vec<_>>(),
        "members": w.members.iter().map(|(u, m)| json!({
            "user_id": u.to_string(),
            "roles": m.roles.iter().map(u64::to_string).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "voice_states": w.voice.iter().map(|(u, v)| json!({
            "user_id": u.to_string(),
            "channel_id": v.channel_id.to_string(),
            "self_mute": v.flags.self_mute,
            "self_deaf": v.flags.self_deaf,
            "self_video": v.flags.self_video,
            "self_stream": v.flags.self_stream,
        })).collect::<Vec<_>>(),
        "moves": w.moves.iter().map(|(u, c)| json!({
            "user_id": u.to_string(),
            "channel_id": c.to_string(),
        })).collect::<Vec<_>>(),
        "gateway": state.hub.state_json(),
        "rest": {
            "rate_limited": state.limits.rate_limited,
            // REST requests by the credentials they carried: the bot's token, a person's
            // bearer token, neither (the token endpoint).
            "requests": state.limits.requests,
        },
        "oauth": {"refreshed": state.oauth.refreshed()},
        "guilds": state.guilds().map(|g| json!({
            "id": g.guild_id.to_string(),
            "name": g.guild_name,
            "bot": g.bot_in(),
            "members": g.members.len(),
            "unavailable": g.unavailable,
            // The shard of GET /gateway/bot's recommended count that holds it ("Sharding").
            "shard": (g.guild_id >> 22) % shards,
        })).collect::<Vec<_>>(),
    });
    Ok(axum::Json(body).into_response())
}

/// `DELETE /_sim/guilds/{g}/bot`: an admin removes the bot. Its sessions get
/// GUILD_DELETE without `unavailable` ("Guild Delete": the user was removed).
async fn remove_bot(State(shared): State<Arc<Shared>>, Path(raw): Path<String>) -> Result {
    let guild = path_id(raw, "guild")?;
    let mut state = shared.lock();
    let w = state
        .guild_mut(guild)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown guild"))?;
    let was_available = !w.unavailable;
    if !w.remove_bot() {
        return Err(error(StatusCode::CONFLICT, "the bot is not in that guild"));
    }
    // While the guild is down the bot was told so already; it hears nothing more.
    if was_available {
        let gone = world::Dispatch {
            name: "GUILD_DELETE",
            data: json!({"id": guild.to_string()}),
        };
        state.hub.dispatch(guild, &[gone]);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct Outage {
    unavailable: bool,
}

/// `POST /_sim/guilds/{g}/outage {"unavailable": true|false}`: the guild goes down
/// (GUILD_DELETE with `unavailable: true`) or comes back (GUILD_CREATE with all of it),
/// as Discord tells a bot in it ("Guild Delete", "Guild Create").
async fn outage(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> Result {
    let guild = path_id(raw, "guild")?;
    let req: Outage = body(&bytes)?;
    let mut state = shared.lock();
    let w = state
        .guild_mut(guild)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown guild"))?;
    if w.unavailable == req.unavailable {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    w.unavailable = req.unavailable;
    if !w.bot_in() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if req.unavailable {
        let down = world::Dispatch {
            name: "GUILD_DELETE",
            data: json!({"id": guild.to_string(), "unavailable": true}),
        };
        state.hub.dispatch(guild, &[down]);
    } else {
        state.announce_guild(guild, super::Announce::Available);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /_sim/guilds/{g}/members/{user}`: the user accepts an invite to guild G (as in
/// Discord's client: any user may join a guild through an invite its members may make):
/// 201 with the member and GUILD_MEMBER_ADD to the bot's sessions, 204 when they were a
/// member already. The user must exist (made by `POST /_sim/users` or seeded in any guild).
async fn join_guild(
    State(shared): State<Arc<Shared>>,
    Path((raw, user)): Path<(String, String)>,
) -> Result {
    let guild = path_id(raw, "guild")?;
    let user = path_id(user, "user id")?;
    let mut state = shared.lock();
    let known = state
        .user(user)
        .cloned()
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown user"))?;
    let w = state
        .guild_mut(guild)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "unknown guild"))?;
    w.users.entry(user).or_insert(known);
    // The invite is the owner's (every member of a seeded guild may create one).
    let owner = w.owner_id;
    match w.add_member(owner, user, &[], Default::default())? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(events) => {
            let member = w.member_json(user).unwrap_or(Value::Null);
            state.emit_in(guild, &events);
            Ok((StatusCode::CREATED, axum::Json(member)).into_response())
        }
    }
}

#[derive(Deserialize)]
struct NewUser {
    username: String,
    global_name: Option<String>,
    #[serde(default = "yes")]
    member: bool,
}

fn yes() -> bool {
    true
}

async fn add_user(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let req: NewUser = body(&bytes)?;
    let name_ok = (2..=32).contains(&req.username.chars().count())
        && req
            .username
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    if !name_ok {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "username must be 2-32 characters of a-z, 0-9, _ and .",
        ));
    }
    let mut state = shared.lock();
    // Usernames are unique across Discord, not per guild.
    if state
        .guilds()
        .flat_map(|w| w.users.values())
        .any(|u| u.username == req.username)
    {
        return Err(error(StatusCode::CONFLICT, "username is taken"));
    }
    let id = state
        .world
        .add_user(req.username, req.global_name, req.member);
    let mut user = state.world.user_json(id).unwrap_or(Value::Null);
    user["member"] = json!(req.member);
    Ok((StatusCode::CREATED, axum::Json(user)).into_response())
}

/// Reads a field that is present (even as `null`) as `Some`; an absent one stays `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct VoiceChange {
    user_id: Value,
    /// The guild whose voice the user is in: by default the channel's (or, leaving, the
    /// first guild), as a member is in voice in one guild at a time per guild.
    #[serde(default)]
    guild_id: Option<Value>,
    /// Required, and `null` to leave, so a forgotten field is not read as "leave".
    #[serde(default, deserialize_with = "present")]
    channel_id: Option<Value>,
    #[serde(default)]
    self_mute: bool,
    #[serde(default)]
    self_deaf: bool,
    #[serde(default)]
    self_video: bool,
    #[serde(default)]
    self_stream: bool,
    /// Not Discord's: the demo's players join only if this many seats stay free after
    /// them, checked here in one step with the join (a person joining at the same moment
    /// cannot be squeezed out by a player who looked a moment earlier).
    #[serde(default)]
    leave_free: u32,
}

/// A user joins, moves, changes flags or leaves voice from their Discord client.
async fn voice(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let req: VoiceChange = body(&bytes)?;
    let Some(channel) = req.channel_id.as_ref() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "channel_id is required (null to leave)",
        ));
    };
    let user = id(&req.user_id, "user_id")?;
    let channel = optional_id(Some(channel), "channel_id")?;
    let flags = VoiceFlags {
        self_mute: req.self_mute,
        self_deaf: req.self_deaf,
        self_video: req.self_video,
        self_stream: req.self_stream,
    };
    let mut state = shared.lock();
    let guild = match (&req.guild_id, channel) {
        (Some(g), _) => id(g, "guild_id")?,
        (None, Some(c)) => state
            .guilds()
            .find(|w| w.channels.contains_key(&c))
            .map_or(state.world.guild_id, |w| w.guild_id),
        (None, None) => state.world.guild_id,
    };
    if state.guild(guild).is_none() {
        return Err(error(StatusCode::NOT_FOUND, "unknown guild"));
    }
    if let Some(to) = channel.filter(|_| req.leave_free > 0)
        && let Some(w) = state.guild(guild)
    {
        let limit = w.channels.get(&to).map_or(0, |c| c.user_limit);
        let elsewhere = w.voice.get(&user).is_none_or(|v| v.channel_id != to);
        let present = w.voice.values().filter(|v| v.channel_id == to).count();
        let after = present + usize::from(elsewhere) + req.leave_free as usize;
        if limit > 0 && elsewhere && after > limit as usize {
            return Err(error(
                StatusCode::CONFLICT,
                "joining would leave fewer seats free than leave_free",
            ));
        }
    }
    let Some(world) = state.guild_mut(guild) else {
        return Err(error(StatusCode::NOT_FOUND, "unknown guild"));
    };
    let events = world.user_voice(user, channel, flags)?;
    state.emit_in(guild, &events);
    let Some(w) = state.guild(guild) else {
        return Err(error(StatusCode::NOT_FOUND, "unknown guild"));
    };
    let now = w
        .voice
        .get(&user)
        .map(|v| w.voice_json(user, Some(v.channel_id), v, false))
        .unwrap_or(Value::Null);
    Ok(axum::Json(json!({"voice_state": now, "dispatched": events.len()})).into_response())
}

#[derive(Deserialize)]
struct ChannelChange {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<u8>,
    parent_id: Option<Value>,
    user_limit: Option<u32>,
    permission_overwrites: Option<Vec<Map<String, Value>>>,
}

fn channel_body(shared: &Shared, id: u64) -> Value {
    let state = shared.lock();
    let w = &state.world;
    w.channel(id)
        .map(|c| w.channel_json(c, true))
        .unwrap_or(Value::Null)
}

async fn create_channel(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let req: ChannelChange = body(&bytes)?;
    let parent_id = optional_id(req.parent_id.as_ref(), "parent_id")?;
    let new = NewChannel {
        extras: Default::default(),
        name: req.name.unwrap_or_default(),
        kind: req.kind.unwrap_or(kind::VOICE),
        parent_id,
        user_limit: req.user_limit.unwrap_or(0),
        overwrites: overwrite_list(req.permission_overwrites.as_deref())?.unwrap_or_default(),
    };
    let id = {
        let mut state = shared.lock();
        let (id, events) = state.world.create_channel(None, new)?;
        state.emit(&events);
        id
    };
    Ok((StatusCode::CREATED, axum::Json(channel_body(&shared, id))).into_response())
}

async fn update_channel(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> Result {
    let req: ChannelChange = body(&bytes)?;
    let channel = path_id(raw, "channel id")?;
    let edit = ChannelEdit {
        name: req.name,
        user_limit: req.user_limit,
        overwrites: overwrite_list(req.permission_overwrites.as_deref())?,
        ..Default::default()
    };
    {
        let mut state = shared.lock();
        let events = state.world.update_channel(None, channel, edit)?;
        state.emit(&events);
    }
    Ok(axum::Json(channel_body(&shared, channel)).into_response())
}

async fn delete_channel(State(shared): State<Arc<Shared>>, Path(raw): Path<String>) -> Result {
    let channel = path_id(raw, "channel id")?;
    let mut state = shared.lock();
    let (c, events) = state.world.delete_channel(None, channel)?;
    state.emit(&events);
    Ok(axum::Json(c).into_response())
}

/// `PUT /_sim/channels/{id}/permissions/{target}` `{"type", "allow"?, "deny"?}`.
async fn set_overwrite(
    State(shared): State<Arc<Shared>>,
    Path((raw, target)): Path<(String, String)>,
    bytes: Bytes,
) -> Result {
    let channel = path_id(raw, "channel id")?;
    let target = path_id(target, "overwrite target")?;
    let req: Map<String, Value> = body(&bytes)?;
    let overwrite = world::overwrite_from_json(&req, Some(target))
        .map_err(|what| error(StatusCode::BAD_REQUEST, format!("bad {what}")))?;
    let mut state = shared.lock();
    let events = state.world.set_overwrite(None, channel, overwrite)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_overwrite(
    State(shared): State<Arc<Shared>>,
    Path((raw, target)): Path<(String, String)>,
) -> Result {
    let channel = path_id(raw, "channel id")?;
    let target = path_id(target, "overwrite target")?;
    let mut state = shared.lock();
    let events = state.world.delete_overwrite(None, channel, target)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct NewRole {
    name: Option<String>,
    #[serde(default)]
    permissions: Value,
    #[serde(default)]
    color: u32,
    #[serde(default)]
    hoist: bool,
    #[serde(default)]
    mentionable: bool,
}

/// `POST /_sim/roles` `{"name", "permissions"}`: 201 with the role as Discord shows it.
async fn create_role(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let req: NewRole = body(&bytes)?;
    let permissions = world::bits_from_json(&req.permissions).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "permissions must be a bitset (a decimal string or a number)",
        )
    })?;
    let mut state = shared.lock();
    let (role, events) = state.world.create_role(
        None,
        req.name,
        permissions,
        req.color,
        req.hoist,
        req.mentionable,
    )?;
    state.emit(&events);
    Ok((StatusCode::CREATED, axum::Json(role)).into_response())
}

/// `PATCH /_sim/roles/{id}` with Modify Guild Role's fields: 200 with the role.
async fn update_role(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
    bytes: Bytes,
) -> Result {
    let role = path_id(raw, "role id")?;
    let req: Map<String, Value> = body(&bytes)?;
    let edit = world::role_edit_from_json(&req)?;
    let mut state = shared.lock();
    let (role, events) = state.world.update_role(None, role, edit)?;
    state.emit(&events);
    Ok(axum::Json(role).into_response())
}

async fn delete_role(State(shared): State<Arc<Shared>>, Path(raw): Path<String>) -> Result {
    let role = path_id(raw, "role id")?;
    let mut state = shared.lock();
    let events = state.world.delete_role(None, role)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn grant_role(
    State(shared): State<Arc<Shared>>,
    Path((user, role)): Path<(String, String)>,
) -> Result {
    member_role(&shared, user, role, true)
}

async fn revoke_role(
    State(shared): State<Arc<Shared>>,
    Path((user, role)): Path<(String, String)>,
) -> Result {
    member_role(&shared, user, role, false)
}

fn member_role(shared: &Shared, user: String, role: String, grant: bool) -> Result {
    let user = path_id(user, "user id")?;
    let role = path_id(role, "role id")?;
    let mut state = shared.lock();
    let events = state.world.set_member_role(None, user, role, grant)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /_sim/members/{user}`: the member is removed from the guild (kicked by an
/// admin, or left); they leave voice first.
async fn remove_member(State(shared): State<Arc<Shared>>, Path(raw): Path<String>) -> Result {
    let user = path_id(raw, "user id")?;
    let mut state = shared.lock();
    let events = state.world.remove_member(None, user)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct Disconnect {
    #[serde(default = "default_close")]
    code: u16,
}

fn default_close() -> u16 {
    super::gateway::close::UNKNOWN_ERROR
}

fn connections(n: usize) -> Response {
    axum::Json(json!({"connections": n})).into_response()
}

async fn disconnect(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let req: Disconnect = body(&bytes)?;
    // 1004-1006 and 1015 are reserved: never sent in a close frame.
    if !(1000..=4999).contains(&req.code) || (1004..=1006).contains(&req.code) || req.code == 1015 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "code must be a close code a server may send",
        ));
    }
    Ok(connections(shared.lock().hub.disconnect_all(req.code)))
}

async fn reconnect(State(shared): State<Arc<Shared>>) -> Response {
    connections(shared.lock().hub.reconnect_all())
}

#[derive(Deserialize)]
struct Invalidate {
    #[serde(default)]
    resumable: bool,
}

async fn invalidate(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let req: Invalidate = body(&bytes)?;
    Ok(connections(shared.lock().hub.invalidate_all(req.resumable)))
}

async fn zombie(State(shared): State<Arc<Shared>>) -> Response {
    connections(shared.lock().hub.zombify_all())
}

/// `POST /_sim/gateway/heartbeat`: Discord asks every connection for a heartbeat now.
async fn request_heartbeat(State(shared): State<Arc<Shared>>) -> Response {
    connections(shared.lock().hub.request_heartbeat_all())
}

/// `POST /_sim/gateway/expire`: the resume window of every disconnected session passes
/// now, instead of `SIM_RESUME_TTL` after its disconnect.
async fn expire(State(shared): State<Arc<Shared>>) -> Response {
    let expired = shared.lock().hub.expire_detached();
    axum::Json(json!({"sessions": expired})).into_response()
}

#[derive(Deserialize)]
struct Revoke {
    user_id: Value,
}

/// `POST /_sim/oauth/revoke {"user_id"}`: the user de-authorized the app; their access
/// and refresh tokens stop working.
async fn revoke(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let r: Revoke = body(&bytes)?;
    let user = id(&r.user_id, "user_id")?;
    let revoked = shared.lock().oauth.revoke(user);
    Ok(axum::Json(json!({ "revoked": revoked })).into_response())
}

async fn fail(State(shared): State<Arc<Shared>>, bytes: Bytes) -> Result {
    let fault: Fault = body(&bytes)?;
    if !(400..=599).contains(&fault.status)
        || fault.count == 0
        || !fault.path.starts_with('/')
        || fault
            .retry_after
            .is_some_and(|r| !(0.0..=Fault::LONGEST_WAIT).contains(&r))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "status must be 400-599, count at least 1, path absolute, retry_after 0-86400",
        ));
    }
    if fault.global && fault.scope.is_some_and(|s| s != super::rest::Scope::Global) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "global: true goes with scope global or none",
        ));
    }
    shared.lock().limits.add_fault(fault);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Template)]
#[template(path = "sim/index.html")]
struct Index {
    api: String,
    gateway: String,
    base: String,
    guild_id: u64,
    client_id: u64,
    users: usize,
    channels: usize,
    voice: usize,
}

pub fn index_page(shared: &Shared) -> Response {
    let state = shared.lock();
    let page = Index {
        api: shared.url("/api"),
        gateway: shared.gateway_url(),
        base: shared.url(""),
        guild_id: state.world.guild_id,
        client_id: shared.settings.client_id,
        users: state.world.users.len(),
        channels: state.world.channels.len(),
        voice: state.world.voice.len(),
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
