//! Simulated OAuth2: `GET /oauth2/authorize` (a page to pick which user to be, or
//! `&sim_user=<id>`; with `bot` in the scope, Discord's bot authorization, in [`bot`]), `POST /api/oauth2/token` (authorization code with PKCE, refresh
//! token; client auth by HTTP Basic or form body; rate limited as Discord does it) and the
//! bearer tokens REST accepts.
//!
//! Owns codes, tokens and the token endpoint's rate limit. Must not change a guild, except
//! that bot authorization adds the bot to one (through the world).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use askama::Template;
use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use url::Url;

use super::Shared;
use super::ids::random_hex;

mod bot;

/// Codes live ten minutes, as Discord's do.
const CODE_TTL: Duration = Duration::from_secs(600);

/// The scopes Discord documents that the simulator accepts.
const KNOWN_SCOPES: &[&str] = &[
    "identify",
    "email",
    "guilds",
    "guilds.join",
    "guilds.members.read",
    "connections",
    "openid",
    "bot",
    "applications.commands",
];

#[derive(Debug)]
struct Grant {
    redirect_uri: String,
    scopes: Vec<String>,
    user_id: u64,
    challenge: Option<String>,
    expires: Instant,
    /// Advanced bot authorization: the guild the bot was added to, whose object the
    /// token response carries.
    guild: Option<u64>,
}

#[derive(Debug)]
struct Token {
    user_id: u64,
    scopes: Vec<String>,
    expires: Instant,
}

#[derive(Debug, Default)]
pub struct Store {
    codes: HashMap<String, Grant>,
    access: HashMap<String, Token>,
    refresh: HashMap<String, (u64, Vec<String>)>,
    refreshed: u64,
    token_window: TokenWindow,
}

/// The token endpoint's fixed rate-limit window (`SIM_TOKEN_RATE_LIMIT` requests per
/// `SIM_TOKEN_RATE_WINDOW`), shared by both of its paths.
#[derive(Debug, Default)]
struct TokenWindow {
    started: Option<Instant>,
    used: u32,
    /// Requests refused with 429.
    limited: u64,
}

impl Store {
    /// The user and scopes behind a live access token.
    pub fn bearer(&self, token: &str) -> Option<(u64, Vec<String>)> {
        self.access
            .get(token)
            .filter(|t| t.expires > Instant::now())
            .map(|t| (t.user_id, t.scopes.clone()))
    }

    /// Revokes every token of a user (they removed the app in Discord): refreshes fail.
    /// Returns how many tokens went.
    pub fn revoke(&mut self, user_id: u64) -> usize {
        let before = self.access.len() + self.refresh.len();
        self.access.retain(|_, t| t.user_id != user_id);
        self.refresh.retain(|_, (u, _)| *u != user_id);
        before - self.access.len() - self.refresh.len()
    }

    /// Refresh tokens redeemed so far (a test's evidence of a silent refresh).
    pub fn refreshed(&self) -> u64 {
        self.refreshed
    }

    /// Token requests refused with 429 so far.
    pub fn token_rate_limited(&self) -> u64 {
        self.token_window.limited
    }

    /// Counts a token request against the window.
    fn admit_token_request(&mut self, limit: u32, window: Duration) -> Admission {
        let now = Instant::now();
        let w = &mut self.token_window;
        let started = match w.started {
            Some(s) if now.duration_since(s) < window => s,
            _ => {
                w.used = 0;
                w.started = Some(now);
                now
            }
        };
        let reset_after = window.saturating_sub(now.duration_since(started));
        let limited = w.used >= limit;
        if limited {
            w.limited += 1;
        } else {
            w.used += 1;
        }
        let reset_at = super::ids::now_ms() as f64 / 1000.0 + reset_after.as_secs_f64();
        let headers = vec![
            ("x-ratelimit-bucket", TOKEN_BUCKET.to_owned()),
            ("x-ratelimit-limit", limit.to_string()),
            (
                "x-ratelimit-remaining",
                (limit - w.used.min(limit)).to_string(),
            ),
            ("x-ratelimit-reset", format!("{reset_at:.3}")),
            (
                "x-ratelimit-reset-after",
                format!("{:.3}", reset_after.as_secs_f64()),
            ),
            ("x-ratelimit-scope", "user".to_owned()),
        ];
        Admission {
            headers,
            retry_after: limited.then_some(reset_after),
        }
    }

    fn issue(&mut self, user_id: u64, scopes: Vec<String>, ttl: Duration) -> serde_json::Value {
        let access = random_hex(20);
        let refresh = random_hex(20);
        self.access.retain(|_, t| t.expires > Instant::now());
        self.access.insert(
            access.clone(),
            Token {
                user_id,
                scopes: scopes.clone(),
                expires: Instant::now() + ttl,
            },
        );
        self.refresh
            .insert(refresh.clone(), (user_id, scopes.clone()));
        json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl.as_secs(),
            "refresh_token": refresh,
            "scope": scopes.join(" "),
        })
    }
}

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/oauth2/authorize", get(authorize))
}

/// The token endpoint's paths (the REST router serves them; this module limits them).
const TOKEN_PATHS: &[&str] = &["/api/oauth2/token", "/api/v10/oauth2/token"];

/// The token endpoint's rate-limit bucket id (opaque, as Discord's are).
const TOKEN_BUCKET: &str = "4f2c9d1e7a3b8c60";

fn with_headers(response: &mut Response, headers: Vec<(&'static str, String)>) {
    let h = response.headers_mut();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

/// A token request counted: the rate-limit headers to send, and how long to wait when the
/// window is used up.
struct Admission {
    headers: Vec<(&'static str, String)>,
    retry_after: Option<Duration>,
}

/// Discord's 429.
fn rate_limited(headers: Vec<(&'static str, String)>, retry_after: Duration) -> Response {
    let seconds = retry_after.as_secs_f64();
    let body = json!({
        "message": "You are being rate limited.",
        "retry_after": (seconds * 1000.0).round() / 1000.0,
        "global": false,
    });
    let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    with_headers(&mut response, headers);
    // Discord's header is whole seconds, rounded up; the body has the fraction.
    let whole = (seconds.ceil() as u64).max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(whole));
    response
}

/// Rate-limits `POST` to the token endpoint before anything else sees the request, and
/// puts the endpoint's own rate-limit headers on its answers (wrapping the whole
/// simulator, so the REST router's generic headers do not replace them).
pub async fn limit_token_requests(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let is_token = request.method() == Method::POST
        && TOKEN_PATHS.contains(&request.uri().path().trim_end_matches('/'));
    if !is_token {
        return next.run(request).await;
    }
    let admitted = shared.lock().oauth.admit_token_request(
        shared.settings.token_rate_limit,
        shared.settings.token_rate_window,
    );
    if let Some(wait) = admitted.retry_after {
        tracing::debug!(?wait, "token endpoint rate limited");
        return rate_limited(admitted.headers, wait);
    }
    let mut response = next.run(request).await;
    with_headers(&mut response, admitted.headers);
    response
}

/// `/api/v10/oauth2/token` (nested under `/api/v10` by the REST router).
pub fn token_routes() -> Router<Arc<Shared>> {
    Router::new().route("/oauth2/token", post(token))
}

/// `/api/oauth2/token`, the unversioned path Discord documents for the token endpoint.
pub fn token_routes_unversioned() -> Router<Arc<Shared>> {
    Router::new().route("/api/oauth2/token", post(token))
}

#[derive(Debug, Deserialize)]
pub struct AuthorizeQuery {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    sim_user: Option<String>,
    permissions: Option<String>,
    guild_id: Option<String>,
    disable_guild_select: Option<String>,
}

#[derive(Template)]
#[template(path = "sim/authorize.html")]
struct PickUser {
    guild: String,
    scopes: String,
    users: Vec<PickableUser>,
}

struct PickableUser {
    name: String,
    username: String,
    member: bool,
    href: String,
}

#[derive(Template)]
#[template(path = "sim/oauth_error.html")]
struct AuthorizeError {
    message: String,
}

fn error_page(message: impl Into<String>) -> Response {
    let page = AuthorizeError {
        message: message.into(),
    };
    match page.render() {
        Ok(html) => (StatusCode::BAD_REQUEST, Html(html)).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "invalid authorization request").into_response(),
    }
}

/// A simulated person (not a bot) of any guild, by id or username.
fn find_user(state: &super::State, pick: &str) -> Option<u64> {
    state
        .guilds()
        .flat_map(|w| w.users.values())
        .find(|u| !u.bot && (u.id.to_string() == pick || u.username == pick))
        .map(|u| u.id)
}

fn requested_scopes(raw: Option<&str>) -> Vec<String> {
    raw.unwrap_or("")
        .split([' ', '+'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The challenge of a PKCE authorization request, or why it is refused.
fn pkce(q: &AuthorizeQuery) -> Result<Option<String>, &'static str> {
    match (&q.code_challenge, q.code_challenge_method.as_deref()) {
        (None, None) => Ok(None),
        (Some(c), Some("S256")) if (43..=128).contains(&c.len()) => Ok(Some(c.clone())),
        (Some(_), Some("S256")) => Err("Invalid code_challenge"),
        _ => Err("code_challenge_method must be S256"),
    }
}

/// Whether `redirect` is one the application registered (any http(s) URL when
/// `SIM_REDIRECT_URIS` is unset).
fn redirect_allowed(shared: &Shared, redirect: &Url) -> bool {
    let allowed = &shared.settings.redirect_uris;
    matches!(redirect.scheme(), "http" | "https")
        && (allowed.is_empty() || allowed.contains(redirect))
}

/// Logging in on the authorize page logs the browser in to (simulated) Discord as well,
/// so its channel pages know who "you" are.
fn log_in_browser(response: &mut Response, user_id: u64) {
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{}={user_id}; Path=/; HttpOnly; SameSite=Lax",
        super::app::USER_COOKIE
    )) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
}

async fn authorize(State(shared): State<Arc<Shared>>, Query(q): Query<AuthorizeQuery>) -> Response {
    // Errors about the client or the redirect URI are shown, never redirected: sending
    // a user to an unverified URI is exactly what OAuth2 forbids.
    let client_ok = q
        .client_id
        .as_deref()
        .is_some_and(|c| c == shared.settings.client_id.to_string());
    if !client_ok {
        return error_page("Unknown application (client_id does not match).");
    }
    let scopes = requested_scopes(q.scope.as_deref());
    if scopes.iter().any(|s| s == "bot") {
        return bot::authorize(&shared, &q, scopes);
    }
    let Some(redirect) = q.redirect_uri.as_deref().and_then(|u| Url::parse(u).ok()) else {
        return error_page("Invalid OAuth2 redirect_uri.");
    };
    if !redirect_allowed(&shared, &redirect) {
        return error_page("Invalid OAuth2 redirect_uri.");
    }
    let fail = |error: &str, description: &str| {
        let mut to = redirect.clone();
        {
            let mut pairs = to.query_pairs_mut();
            pairs.append_pair("error", error);
            pairs.append_pair("error_description", description);
            if let Some(s) = &q.state {
                pairs.append_pair("state", s);
            }
        }
        Redirect::to(to.as_str()).into_response()
    };
    if q.response_type.as_deref() != Some("code") {
        return fail("unsupported_response_type", "response_type must be code");
    }
    if scopes.is_empty() || scopes.iter().any(|s| !KNOWN_SCOPES.contains(&s.as_str())) {
        return fail(
            "invalid_scope",
            "The requested scope is invalid, unknown, or malformed.",
        );
    }
    let challenge = match pkce(&q) {
        Ok(c) => c,
        Err(why) => return fail("invalid_request", why),
    };

    let mut state = shared.lock();
    let Some(pick) = q.sim_user.as_deref() else {
        let w = &state.world;
        let users = w
            .users
            .values()
            .filter(|u| !u.bot)
            .map(|u| {
                let mut href =
                    Url::parse("http://sim/oauth2/authorize").unwrap_or(redirect.clone());
                href.query_pairs_mut()
                    .append_pair("client_id", q.client_id.as_deref().unwrap_or_default())
                    .append_pair("redirect_uri", redirect.as_str())
                    .append_pair("response_type", "code")
                    .append_pair("scope", &scopes.join(" "))
                    .append_pair("sim_user", &u.id.to_string());
                if let Some(s) = &q.state {
                    href.query_pairs_mut().append_pair("state", s);
                }
                if let Some(c) = &challenge {
                    href.query_pairs_mut()
                        .append_pair("code_challenge", c)
                        .append_pair("code_challenge_method", "S256");
                }
                PickableUser {
                    name: u.global_name.clone().unwrap_or_else(|| u.username.clone()),
                    username: u.username.clone(),
                    member: w.members.contains_key(&u.id),
                    href: format!("/oauth2/authorize?{}", href.query().unwrap_or_default()),
                }
            })
            .collect();
        let page = PickUser {
            guild: w.guild_name.clone(),
            scopes: scopes.join(", "),
            users,
        };
        return match page.render() {
            Ok(html) => Html(html).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
    };
    let user_id = find_user(&state, pick);
    let Some(user_id) = user_id else {
        return error_page(format!("No simulated user {pick:?}."));
    };
    let code = random_hex(16);
    state.oauth.codes.retain(|_, g| g.expires > Instant::now());
    state.oauth.codes.insert(
        code.clone(),
        Grant {
            redirect_uri: redirect.as_str().to_owned(),
            scopes,
            user_id,
            challenge,
            expires: Instant::now() + CODE_TTL,
            guild: None,
        },
    );
    let mut to = redirect.clone();
    {
        let mut pairs = to.query_pairs_mut();
        pairs.append_pair("code", &code);
        if let Some(s) = &q.state {
            pairs.append_pair("state", s);
        }
    }
    let mut response = Redirect::to(to.as_str()).into_response();
    log_in_browser(&mut response, user_id);
    response
}

#[derive(Debug, Deserialize)]
pub struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// The client's credentials, from HTTP Basic (form-urlencoded parts, RFC 6749 §2.3.1) or
/// the form body.
fn client_credentials(headers: &HeaderMap, form: &TokenForm) -> Option<(String, String)> {
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = STANDARD.decode(basic.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        let unescape = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        };
        return Some((unescape(id)?, unescape(secret)?));
    }
    Some((form.client_id.clone()?, form.client_secret.clone()?))
}

async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(form) = serde_urlencoded_form(&body) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "malformed form body",
        );
    };
    let authenticated = client_credentials(&headers, &form).is_some_and(|(id, secret)| {
        id == shared.settings.client_id.to_string()
            && secret == shared.settings.client_secret.expose_secret()
    });
    if !authenticated {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid client credentials",
        );
    }
    let ttl = shared.settings.token_ttl;
    let mut state = shared.lock();
    match form.grant_type.as_deref() {
        Some("authorization_code") => {
            // A code is spent by any attempt to use it, successful or not.
            let Some(grant) = form
                .code
                .as_deref()
                .and_then(|c| state.oauth.codes.remove(c))
            else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"code\" in request.",
                );
            };
            if grant.expires <= Instant::now() {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"code\" in request.",
                );
            }
            if form.redirect_uri.as_deref() != Some(grant.redirect_uri.as_str()) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"redirect_uri\" in request.",
                );
            }
            if let Some(challenge) = &grant.challenge {
                let ok = form.code_verifier.as_deref().is_some_and(|v| {
                    URL_SAFE_NO_PAD.encode(Sha256::digest(v.as_bytes())) == *challenge
                });
                if !ok {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "Invalid \"code_verifier\" in request.",
                    );
                }
            }
            let mut answer = state.oauth.issue(grant.user_id, grant.scopes, ttl);
            // Advanced bot authorization: "you'll also receive information about the
            // guild to which your bot was added".
            if let Some(guild) = grant.guild.and_then(|g| state.guild(g)) {
                answer["guild"] = guild.guild_json();
            }
            axum::Json(answer).into_response()
        }
        Some("refresh_token") => {
            let Some((user, scopes)) = form
                .refresh_token
                .as_deref()
                .and_then(|r| state.oauth.refresh.remove(r))
            else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid \"refresh_token\" in request.",
                );
            };
            state.oauth.refreshed += 1;
            axum::Json(state.oauth.issue(user, scopes, ttl)).into_response()
        }
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Unsupported grant type",
        ),
    }
}

fn serde_urlencoded_form(body: &[u8]) -> Result<TokenForm, ()> {
    let mut map: HashMap<String, String> = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        map.insert(k.into_owned(), v.into_owned());
    }
    let take = |k: &str| map.get(k).cloned();
    if std::str::from_utf8(body).is_err() {
        return Err(());
    }
    Ok(TokenForm {
        grant_type: take("grant_type"),
        code: take("code"),
        redirect_uri: take("redirect_uri"),
        code_verifier: take("code_verifier"),
        refresh_token: take("refresh_token"),
        client_id: take("client_id"),
        client_secret: take("client_secret"),
    })
}
