//! Who the caller is: the Gateway URL for the bot, the current user and their guilds.
//!
//! Reads the world only; must not change it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult};
use super::extract::{Bot, Caller, snowflake};
use crate::sim::Shared;
use crate::sim::world::World;

pub(super) async fn gateway_bot(State(shared): State<Arc<Shared>>, _: Bot) -> Response {
    let mut state = shared.lock();
    let shards = shared.shards(&state);
    axum::Json(json!({
        "url": shared.gateway_url(),
        "shards": shards,
        "session_start_limit": state.hub.session_start_limit(),
    }))
    .into_response()
}

/// `GET /gateway`: the URL alone, no authorization ("Get Gateway").
pub(super) async fn gateway(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({ "url": shared.gateway_url() })).into_response()
}

/// `GET /oauth2/applications/@me` ("Get Current Bot Application Information") and
/// `GET /applications/@me` ("Get Current Application"): the application object of the bot
/// token. discord.py asks it at every login (`Client.login` → `application_info`) and
/// indexes `id`, `name`, `description`, `bot_public`, `bot_require_code_grant`,
/// `verify_key` and `owner` without checking.
pub(super) async fn current_application(State(shared): State<Arc<Shared>>, _: Bot) -> ApiResult {
    let state = shared.lock();
    let settings = &shared.settings;
    let bot = state
        .user(state.world.bot_id)
        .map(crate::sim::world::user_json)
        .ok_or_else(|| ApiError::code(10013))?;
    let owner = state
        .user(state.app_owner())
        .map(crate::sim::world::user_json)
        .unwrap_or(Value::Null);
    // Discord's is the hex of an Ed25519 public key: 32 bytes, fixed per application.
    let verify_key = crate::sim::ids::digest_hex(&settings.client_id.to_be_bytes(), 32);
    Ok(axum::Json(json!({
        "id": settings.client_id.to_string(),
        "name": bot["username"].clone(),
        "icon": null,
        "description": "",
        "summary": "",
        "type": null,
        "bot": bot,
        "bot_public": settings.bot_public,
        "bot_require_code_grant": false,
        "verify_key": verify_key,
        "owner": owner,
        "team": null,
        "flags": 0,
        "rpc_origins": [],
        "redirect_uris": [],
        "interactions_endpoint_url": null,
        "tags": [],
        "approximate_guild_count": state.bot_guilds(),
    }))
    .into_response())
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
    // A person may be known to another guild than the first (Night Owls' own people).
    let mut user = state
        .user(id)
        .map(crate::sim::world::user_json)
        .ok_or_else(|| ApiError::code(10013))?;
    user["mfa_enabled"] = json!(false);
    user["locale"] = json!("en-US");
    user["verified"] = json!(true);
    Ok(axum::Json(user).into_response())
}

/// Get User: any user the simulator knows, as the bot sees them.
pub(super) async fn get_user(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(u): Path<String>,
) -> ApiResult {
    let id = snowflake("user_id", &u)?;
    let state = shared.lock();
    let user = state
        .user(id)
        .map(crate::sim::world::user_json)
        .ok_or_else(|| ApiError::code(10013))?;
    Ok(axum::Json(user).into_response())
}

/// Get Current User Guilds' query (user resource): `before`/`after` a guild id,
/// `limit` (1–200, default 200) and `with_counts`.
#[derive(Deserialize)]
pub(super) struct GuildsQuery {
    before: Option<String>,
    after: Option<String>,
    limit: Option<String>,
    with_counts: Option<String>,
}

/// The user a bearer token names, if it carries `scope`. A token without the scope gets
/// Discord's plain 401 (what Discord answers an OAuth2 token lacking the route's scope).
fn user_with_scope(caller: Caller, scope: &str) -> ApiResult<u64> {
    match caller {
        Caller::User { id, scopes } if scopes.iter().any(|s| s == scope) => Ok(id),
        _ => Err(ApiError::unauthorized()),
    }
}

/// Get Current User Guilds (scope `guilds`): partial guilds, by id ascending, each with
/// `owner` and the caller's computed guild `permissions` as a decimal string.
pub(super) async fn current_user_guilds(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Query(q): Query<GuildsQuery>,
) -> ApiResult {
    let id = match caller {
        Caller::Bot => None,
        user => Some(user_with_scope(user, "guilds")?),
    };
    let bound =
        |field: &str, raw: &Option<String>| raw.as_deref().map(|r| snowflake(field, r)).transpose();
    let (before, after) = (bound("before", &q.before)?, bound("after", &q.after)?);
    let limit = match q.limit.as_deref() {
        None => 200,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "limit",
                    "NUMBER_TYPE_MAX",
                    "int value should be between 1 and 200.",
                )
            })?,
    };
    let with_counts = super::extract::boolean_query("with_counts", q.with_counts.as_deref())?;
    let state = shared.lock();
    let mut mine: Vec<&World> = state
        .guilds()
        .filter(|w| match id {
            Some(user) => w.members.contains_key(&user),
            None => w.bot_in(),
        })
        .filter(|w| before.is_none_or(|b| w.guild_id < b) && after.is_none_or(|a| w.guild_id > a))
        .collect();
    mine.sort_by_key(|w| w.guild_id);
    // With only `before`, the page is the `limit` guilds just before it.
    let skip = if before.is_some() && after.is_none() {
        mine.len().saturating_sub(limit)
    } else {
        0
    };
    let guilds: Vec<Value> = mine
        .iter()
        .skip(skip)
        .take(limit)
        .map(|w| {
            let user = id.unwrap_or(w.bot_id);
            let mut guild = json!({
                "id": w.guild_id.to_string(),
                "name": w.guild_name,
                "icon": null,
                "banner": null,
                "owner": user == w.owner_id,
                "permissions": w.guild_permissions(user),
                "features": [],
            });
            if with_counts {
                guild["approximate_member_count"] = json!(w.members.len());
                guild["approximate_presence_count"] = json!(w.voice.len());
            }
            guild
        })
        .collect();
    Ok(axum::Json(guilds).into_response())
}

/// Get Current User Guild Member (scope `guilds.members.read`): the caller's member
/// object in the guild; 10004 Unknown Guild when they are not in it (or it does not
/// exist), so the answer never tells the two apart.
pub(super) async fn current_user_guild_member(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    Path(g): Path<String>,
) -> ApiResult {
    let user = user_with_scope(caller, "guilds.members.read")?;
    let guild = snowflake("guild_id", &g)?;
    let state = shared.lock();
    let member = state
        .guild(guild)
        .and_then(|w| w.member_json(user))
        .ok_or_else(|| ApiError::code(10004))?;
    Ok(axum::Json(member).into_response())
}
