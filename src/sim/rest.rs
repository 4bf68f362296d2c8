//! The simulated REST API under `/api/v10`: the routes Coven uses, Discord's JSON error
//! bodies and codes, per-route rate-limit buckets with Discord's headers, and injected
//! failures (`POST /_sim/rest/fail`).
//!
//! Owns HTTP concerns only; every change is made through [`super::world::World`] and its
//! dispatches handed to the Gateway hub. Must not keep guild state of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::Shared;
use super::world::{self, ChannelEdit, NewChannel, Overwrite, Refusal};
use twilight_model::guild::Permissions;

// ---------------------------------------------------------------------------------------
// Errors, as Discord writes them: `{"code", "message", "errors"?}`.

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"code": code, "message": message.into()}),
        }
    }

    /// A known Discord JSON error code with its documented message and status.
    pub fn code(code: u32) -> Self {
        let (status, message) = match code {
            10003 => (StatusCode::NOT_FOUND, "Unknown Channel"),
            10004 => (StatusCode::NOT_FOUND, "Unknown Guild"),
            10007 => (StatusCode::NOT_FOUND, "Unknown Member"),
            10009 => (StatusCode::NOT_FOUND, "Unknown Overwrite"),
            10011 => (StatusCode::NOT_FOUND, "Unknown Role"),
            10013 => (StatusCode::NOT_FOUND, "Unknown User"),
            10065 => (StatusCode::NOT_FOUND, "Unknown Voice State"),
            40032 => (
                StatusCode::BAD_REQUEST,
                "Target user is not connected to voice.",
            ),
            50001 => (StatusCode::FORBIDDEN, "Missing Access"),
            50013 => (StatusCode::FORBIDDEN, "Missing Permissions"),
            50025 => (StatusCode::UNAUTHORIZED, "Invalid OAuth2 access token"),
            50035 => (StatusCode::BAD_REQUEST, "Invalid Form Body"),
            50109 => (
                StatusCode::BAD_REQUEST,
                "The request body contains invalid JSON.",
            ),
            _ => (StatusCode::BAD_REQUEST, "Error"),
        };
        Self::new(status, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized")
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, 0, "404: Not Found")
    }

    /// 50035 with one field error, nested as Discord nests them.
    pub fn invalid_field(field: &str, code: &str, message: &str) -> Self {
        let mut e = Self::code(50035);
        e.body["errors"] = json!({ field: {"_errors": [{"code": code, "message": message}]} });
        e
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::UnknownChannel => Self::code(10003),
            Refusal::UnknownRole => Self::code(10011),
            Refusal::UnknownMember => Self::code(10007),
            Refusal::UnknownUser => Self::code(10013),
            Refusal::UnknownVoiceState => Self::code(10065),
            Refusal::UnknownOverwrite => Self::code(10009),
            Refusal::MissingAccess => Self::code(50001),
            Refusal::NotInVoice => Self::code(40032),
            Refusal::MissingPermission(_) => Self::code(50013),
            Refusal::ChannelFull => Self::new(StatusCode::BAD_REQUEST, 0, "Channel is full."),
            Refusal::Invalid(field, code, message) => Self::invalid_field(field, code, &message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

// ---------------------------------------------------------------------------------------
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
    fn parse(body: &Bytes) -> ApiResult<Self> {
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

fn snowflake(field: &str, raw: &str) -> ApiResult<u64> {
    raw.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::invalid_field(
            field,
            "NUMBER_TYPE_COERCE",
            &format!("Value \"{raw}\" is not snowflake."),
        )
    })
}

fn guild(shared: &Shared, raw: &str) -> ApiResult<()> {
    if snowflake("guild_id", raw)? == shared.settings.guild_id {
        Ok(())
    } else {
        Err(ApiError::code(10004))
    }
}

use world::{bits_from_json as bits_field, id_from_json as id_field};

/// A list of overwrite objects, with Discord's 50035 naming the bad entry.
fn overwrites(list: &[Map<String, Value>]) -> ApiResult<Vec<Overwrite>> {
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
fn permissions_field(v: Option<&Value>) -> ApiResult<Option<Permissions>> {
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

// ---------------------------------------------------------------------------------------
// Rate limits: fixed windows per bucket and major parameter, with Discord's headers on
// every answer (twilight-http reads them only when `X-RateLimit-Scope` is present).

#[derive(Debug)]
pub struct Limits {
    limit: u32,
    window: Duration,
    buckets: HashMap<String, Window>,
    faults: Vec<Fault>,
    /// 429s served because a bucket ran out (not injected ones): a client that reads the
    /// headers right never causes one.
    pub rate_limited: u64,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    used: u32,
}

/// A failure injected through the control API.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    pub status: u16,
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub retry_after: Option<f64>,
    /// A Discord JSON error code to answer with (for example 50013).
    #[serde(default)]
    pub code: Option<u32>,
    #[serde(default)]
    pub global: bool,
}

fn one() -> u32 {
    1
}

impl Fault {
    fn matches(&self, method: &Method, path: &str) -> bool {
        let method_ok = self
            .method
            .as_deref()
            .is_none_or(|m| m == "*" || m.eq_ignore_ascii_case(method.as_str()));
        let want = self.path.strip_prefix("/api/v10").unwrap_or(&self.path);
        let have = path.strip_prefix("/api/v10").unwrap_or(path);
        let (mut w, mut h) = (
            want.trim_matches('/').split('/'),
            have.trim_matches('/').split('/'),
        );
        let path_ok = loop {
            match (w.next(), h.next()) {
                (None, None) => break true,
                (Some(a), Some(b)) if a == "*" || a == b => {}
                _ => break false,
            }
        };
        method_ok && path_ok
    }
}

struct Verdict {
    headers: Vec<(&'static str, String)>,
    rejection: Option<Response>,
}

impl Limits {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            buckets: HashMap::new(),
            faults: Vec::new(),
            rate_limited: 0,
        }
    }

    pub fn add_fault(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    fn take_fault(&mut self, method: &Method, path: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| f.matches(method, path))?;
        let fault = self.faults[i].clone();
        self.faults[i].count = self.faults[i].count.saturating_sub(1);
        if self.faults[i].count == 0 {
            self.faults.remove(i);
        }
        Some(fault)
    }

    /// Counts a request against its bucket.
    fn check(&mut self, method: &Method, path: &str) -> Verdict {
        let (bucket, major) = bucket_of(method, path);
        let now = Instant::now();
        let w = self
            .buckets
            .entry(format!("{bucket}:{major}"))
            .or_insert(Window {
                started: now,
                used: 0,
            });
        if now.duration_since(w.started) >= self.window {
            *w = Window {
                started: now,
                used: 0,
            };
        }
        let reset_after = self.window.saturating_sub(now.duration_since(w.started));
        let limited = w.used >= self.limit;
        if limited {
            self.rate_limited += 1;
        } else {
            w.used += 1;
        }
        let remaining = self.limit - w.used.min(self.limit);
        let headers = limit_headers(&bucket, self.limit, remaining, reset_after, "user");
        let rejection = limited.then(|| too_many(&headers, reset_after.as_secs_f64(), false));
        Verdict { headers, rejection }
    }
}

/// The bucket a route belongs to (its hash) and its major parameter, as Discord keys
/// rate limits: the same route for another guild or channel is a separate window.
fn bucket_of(method: &Method, path: &str) -> (String, String) {
    let mut major = String::new();
    let mut template = String::from(method.as_str());
    let mut prev = "";
    for seg in path
        .trim_start_matches("/api/v10")
        .split('/')
        .filter(|s| !s.is_empty())
    {
        let numeric = seg.bytes().all(|b| b.is_ascii_digit());
        if numeric && major.is_empty() && matches!(prev, "guilds" | "channels" | "webhooks") {
            major = seg.to_owned();
            template.push_str("/{major}");
        } else if numeric {
            template.push_str("/{id}");
        } else {
            template.push('/');
            template.push_str(seg);
        }
        prev = seg;
    }
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(template.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (hash, major)
}

fn limit_headers(
    bucket: &str,
    limit: u32,
    remaining: u32,
    reset_after: Duration,
    scope: &str,
) -> Vec<(&'static str, String)> {
    let reset_at = super::ids::now_ms() as f64 / 1000.0 + reset_after.as_secs_f64();
    vec![
        ("x-ratelimit-bucket", bucket.to_owned()),
        ("x-ratelimit-limit", limit.to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", format!("{reset_at:.3}")),
        (
            "x-ratelimit-reset-after",
            format!("{:.3}", reset_after.as_secs_f64()),
        ),
        ("x-ratelimit-scope", scope.to_owned()),
    ]
}

fn too_many(headers: &[(&'static str, String)], retry_after: f64, global: bool) -> Response {
    let body = json!({
        "message": "You are being rate limited.",
        "retry_after": (retry_after * 1000.0).round() / 1000.0,
        "global": global,
        "code": 0,
    });
    let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    let h = response.headers_mut();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&(retry_after.ceil() as u64).max(1).to_string()) {
        h.insert(header::RETRY_AFTER, v);
    }
    if global {
        h.insert("x-ratelimit-global", HeaderValue::from_static("true"));
    }
    response
}

fn fault_response(fault: &Fault, method: &Method, path: &str) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (bucket, _) = bucket_of(method, path);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry = fault.retry_after.unwrap_or(1.0).max(0.0);
        let scope = if fault.global { "global" } else { "user" };
        let headers = limit_headers(&bucket, 1, 0, Duration::from_secs_f64(retry), scope);
        return too_many(&headers, retry, fault.global);
    }
    let error = match fault.code {
        Some(code) => {
            let mut e = ApiError::code(code);
            e.status = status;
            e
        }
        None => ApiError::new(
            status,
            0,
            format!(
                "{}: {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            ),
        ),
    };
    error.into_response()
}

/// Injected faults first (Discord failing), then the route's bucket, then the route.
async fn limit(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (fault, verdict) = {
        let mut state = shared.lock();
        match state.limits.take_fault(&method, &path) {
            Some(fault) => (Some(fault), None),
            None => (None, Some(state.limits.check(&method, &path))),
        }
    };
    if let Some(fault) = fault {
        tracing::debug!(%method, %path, status = fault.status, "injected failure");
        return fault_response(&fault, &method, &path);
    }
    let Some(verdict) = verdict else {
        return ApiError::not_found().into_response();
    };
    if let Some(rejection) = verdict.rejection {
        return rejection;
    }
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    for (name, value) in verdict.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    response
}

// ---------------------------------------------------------------------------------------
// Routes.

pub fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let v10 = Router::new()
        .route("/gateway/bot", get(gateway_bot))
        .route("/users/@me", get(current_user))
        .route("/users/@me/guilds", get(current_user_guilds))
        .route(
            "/guilds/{guild}/channels",
            get(list_channels).post(create_channel),
        )
        .route(
            "/channels/{channel}",
            get(get_channel)
                .patch(update_channel)
                .delete(delete_channel),
        )
        .route(
            "/channels/{channel}/permissions/{overwrite}",
            put(set_overwrite).delete(delete_overwrite),
        )
        .route("/guilds/{guild}/roles", post(create_role))
        .route(
            "/guilds/{guild}/roles/{role}",
            axum::routing::delete(delete_role).patch(update_role),
        )
        .route(
            "/guilds/{guild}/members/{user}",
            get(get_member)
                .put(add_member)
                .patch(modify_member)
                .delete(remove_member),
        )
        .route(
            "/guilds/{guild}/members/{user}/roles/{role}",
            put(add_member_role).delete(remove_member_role),
        )
        .route("/guilds/{guild}/voice-states/{user}", get(get_voice_state))
        .merge(super::oauth::token_routes())
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, 0, "405: Method Not Allowed")
        });
    Router::new()
        .nest("/api/v10", v10)
        .merge(super::oauth::token_routes_unversioned())
        .layer(middleware::from_fn_with_state(shared, limit))
}

async fn gateway_bot(State(shared): State<Arc<Shared>>, _: Bot) -> Response {
    axum::Json(json!({
        "url": shared.gateway_url(),
        "shards": 1,
        "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1},
    }))
    .into_response()
}

async fn current_user(State(shared): State<Arc<Shared>>, caller: Caller) -> ApiResult {
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
    let mut user = state
        .world
        .user_json(id)
        .ok_or_else(|| ApiError::code(10013))?;
    user["mfa_enabled"] = json!(false);
    user["locale"] = json!("en-US");
    user["verified"] = json!(true);
    Ok(axum::Json(user).into_response())
}

async fn current_user_guilds(State(shared): State<Arc<Shared>>, caller: Caller) -> ApiResult {
    let state = shared.lock();
    let w = &state.world;
    let id = match caller {
        Caller::Bot => w.bot_id,
        Caller::User { id, scopes } => {
            if !scopes.iter().any(|s| s == "guilds") {
                return Err(ApiError::unauthorized());
            }
            id
        }
    };
    let guilds: Vec<Value> = if w.members.contains_key(&id) {
        vec![json!({
            "id": w.guild_id.to_string(),
            "name": w.guild_name,
            "icon": null,
            "banner": null,
            "owner": id == w.owner_id,
            "permissions": w.guild_permissions(id),
            "features": [],
        })]
    } else {
        Vec::new()
    };
    Ok(axum::Json(guilds).into_response())
}

async fn list_channels(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
) -> ApiResult {
    guild(&shared, &g)?;
    let state = shared.lock();
    let w = &state.world;
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

async fn create_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    guild(&shared, &g)?;
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
    let bot = state.world.bot_id;
    let (id, events) = state.world.create_channel(
        Some(bot),
        NewChannel {
            name,
            kind: req.kind.unwrap_or(world::kind::TEXT),
            parent_id,
            user_limit: req.user_limit.unwrap_or(0),
            overwrites,
        },
    )?;
    state.emit(&events);
    let channel = state
        .world
        .channel(id)
        .map(|c| state.world.channel_json_for_bot(c, true))?;
    Ok((StatusCode::CREATED, axum::Json(channel)).into_response())
}

async fn get_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(c): Path<String>,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let state = shared.lock();
    let w = &state.world;
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

async fn update_channel(
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
    let bot = state.world.bot_id;
    let events = state.world.update_channel(Some(bot), id, edit)?;
    state.emit(&events);
    let channel = state.world.channel(id)?;
    Ok(axum::Json(state.world.channel_json_for_bot(channel, true)).into_response())
}

/// Edit Channel Permissions: `{type, allow?, deny?}` for the role or member in the path.
async fn set_overwrite(
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
    let bot = state.world.bot_id;
    let events = state.world.set_overwrite(Some(bot), id, overwrite)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_overwrite(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((c, o)): Path<(String, String)>,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let target = snowflake("overwrite_id", &o)?;
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let events = state.world.delete_overwrite(Some(bot), id, target)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_channel(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(c): Path<String>,
) -> ApiResult {
    let id = snowflake("channel_id", &c)?;
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let (channel, events) = state.world.delete_channel(Some(bot), id)?;
    state.emit(&events);
    Ok(axum::Json(channel).into_response())
}

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

async fn create_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path(g): Path<String>,
    body: Bytes,
) -> ApiResult {
    guild(&shared, &g)?;
    let DiscordJson(req) = DiscordJson::<CreateRole>::parse(&body)?;
    let permissions =
        permissions_field(req.permissions.as_ref())?.unwrap_or(Permissions::VIEW_CHANNEL);
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let (role, events) = state.world.create_role(
        Some(bot),
        req.name,
        permissions,
        req.color.unwrap_or(0),
        req.hoist.unwrap_or(false),
        req.mentionable.unwrap_or(false),
    )?;
    state.emit(&events);
    Ok(axum::Json(role).into_response())
}

async fn delete_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, r)): Path<(String, String)>,
) -> ApiResult {
    guild(&shared, &g)?;
    let role = snowflake("role_id", &r)?;
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let events = state.world.delete_role(Some(bot), role)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Modify Guild Role: every field optional and nullable.
async fn update_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, r)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    guild(&shared, &g)?;
    let role = snowflake("role_id", &r)?;
    let DiscordJson(req) = DiscordJson::<Map<String, Value>>::parse(&body)?;
    let edit = world::role_edit_from_json(&req).map_err(|field| {
        ApiError::invalid_field(field, "BASE_TYPE_INVALID", "Value is of the wrong type.")
    })?;
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let (role, events) = state.world.update_role(Some(bot), role, edit)?;
    state.emit(&events);
    Ok(axum::Json(role).into_response())
}

async fn add_member_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u, r)): Path<(String, String, String)>,
) -> ApiResult {
    set_role(&shared, &g, &u, &r, true)
}

async fn remove_member_role(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u, r)): Path<(String, String, String)>,
) -> ApiResult {
    set_role(&shared, &g, &u, &r, false)
}

fn set_role(shared: &Shared, g: &str, u: &str, r: &str, grant: bool) -> ApiResult {
    guild(shared, g)?;
    let user = snowflake("user_id", u)?;
    let role = snowflake("role_id", r)?;
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let events = state.world.set_member_role(Some(bot), user, role, grant)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
) -> ApiResult {
    guild(&shared, &g)?;
    let user = snowflake("user_id", &u)?;
    let state = shared.lock();
    let member = state
        .world
        .member_json(user)
        .ok_or_else(|| ApiError::code(10007))?;
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
async fn add_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    guild(&shared, &g)?;
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
    let bot = state.world.bot_id;
    match state.world.add_member(bot, user, &roles)? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(events) => {
            state.emit(&events);
            let member = state
                .world
                .member_json(user)
                .ok_or_else(|| ApiError::code(10007))?;
            Ok((StatusCode::CREATED, axum::Json(member)).into_response())
        }
    }
}

/// Modify Guild Member: Coven uses it to move a user between voice channels
/// (`channel_id`, or `null` to disconnect).
async fn modify_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    guild(&shared, &g)?;
    let user = snowflake("user_id", &u)?;
    let DiscordJson(req) = DiscordJson::<Map<String, Value>>::parse(&body)?;
    let mut state = shared.lock();
    if !state.world.members.contains_key(&user) {
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
        let bot = state.world.bot_id;
        let events = state.world.move_member(bot, user, channel)?;
        state.emit(&events);
    }
    let member = state
        .world
        .member_json(user)
        .ok_or_else(|| ApiError::code(10007))?;
    Ok(axum::Json(member).into_response())
}

/// Remove Guild Member (a kick): 204, and the member is gone (10007 afterwards).
async fn remove_member(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
) -> ApiResult {
    guild(&shared, &g)?;
    let user = snowflake("user_id", &u)?;
    let mut state = shared.lock();
    let bot = state.world.bot_id;
    let events = state.world.remove_member(Some(bot), user)?;
    state.emit(&events);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_voice_state(
    State(shared): State<Arc<Shared>>,
    _: Bot,
    Path((g, u)): Path<(String, String)>,
) -> ApiResult {
    guild(&shared, &g)?;
    let state = shared.lock();
    let user = if u == "@me" {
        state.world.bot_id
    } else {
        snowflake("user_id", &u)?
    };
    let voice = state
        .world
        .voice
        .get(&user)
        .ok_or_else(|| ApiError::code(10065))?;
    Ok(axum::Json(
        state
            .world
            .voice_json(user, Some(voice.channel_id), voice, true),
    )
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_key_by_route_and_major_parameter() {
        let (a, ga) = bucket_of(&Method::POST, "/api/v10/guilds/1/channels");
        let (b, gb) = bucket_of(&Method::POST, "/api/v10/guilds/2/channels");
        let (c, _) = bucket_of(&Method::GET, "/api/v10/guilds/1/channels");
        assert_eq!(a, b);
        assert_ne!(ga, gb);
        assert_ne!(a, c);
        let (d, _) = bucket_of(&Method::PUT, "/api/v10/guilds/1/members/5/roles/6");
        let (e, _) = bucket_of(&Method::PUT, "/api/v10/guilds/1/members/7/roles/8");
        assert_eq!(d, e);
    }

    #[test]
    fn permission_routes_are_keyed_by_their_channel_or_guild() {
        let put = |c: u32, o: u32| {
            bucket_of(
                &Method::PUT,
                &format!("/api/v10/channels/{c}/permissions/{o}"),
            )
        };
        let (a, ma) = put(1, 5);
        let (b, mb) = put(2, 6);
        assert_eq!((a.as_str(), ma.as_str()), (b.as_str(), "1"));
        assert_eq!(mb, "2");
        let (del, _) = bucket_of(&Method::DELETE, "/api/v10/channels/1/permissions/5");
        assert_ne!(a, del);
        let (role, major) = bucket_of(&Method::PATCH, "/api/v10/guilds/9/roles/5");
        assert_eq!(major, "9");
        let (kick, major) = bucket_of(&Method::DELETE, "/api/v10/guilds/9/members/5");
        assert_eq!(major, "9");
        let (get, _) = bucket_of(&Method::GET, "/api/v10/guilds/9/members/5");
        assert_ne!(kick, get);
        assert_ne!(role, kick);
    }

    #[test]
    fn fault_paths_match_with_wildcards() {
        let f = Fault {
            method: Some("post".into()),
            path: "/guilds/*/channels".into(),
            status: 500,
            count: 1,
            retry_after: None,
            code: None,
            global: false,
        };
        assert!(f.matches(&Method::POST, "/api/v10/guilds/42/channels"));
        assert!(!f.matches(&Method::GET, "/api/v10/guilds/42/channels"));
        assert!(!f.matches(&Method::POST, "/api/v10/guilds/42/roles"));
    }

    #[test]
    fn a_window_runs_out_and_resets() {
        let mut l = Limits::new(2, Duration::from_millis(50));
        let m = Method::GET;
        assert!(l.check(&m, "/api/v10/channels/1").rejection.is_none());
        assert!(l.check(&m, "/api/v10/channels/1").rejection.is_none());
        assert!(l.check(&m, "/api/v10/channels/1").rejection.is_some());
        assert!(l.check(&m, "/api/v10/channels/2").rejection.is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.check(&m, "/api/v10/channels/1").rejection.is_none());
    }
}
