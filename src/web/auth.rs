//! Logging in with Discord and knowing who is asking.
//!
//! Owns the OAuth2 round trip (PKCE, state compared against the session, `return_to`
//! limited to this site), the session's user record, silent token refresh, the
//! [`LoggedIn`] extractor, and the end of a login (its streams end on every replica).
//! Membership and roles are [`super::members`]'. Must not render room data.

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tower_sessions::cookie::time::Duration;
use tower_sessions::{Expiry, Session};
use twilight_model::id::Id;
use twilight_model::id::marker::UserMarker;
use url::Url;

use super::error::WebError;
use super::{AppState, protect};
use crate::discord::DiscordError;
use crate::event::{Person, Viewer, now_ms};

/// The session key of the logged-in [`SessionUser`].
pub(super) const USER: &str = "user";
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "coven_session";
const LOGIN: &str = "login";
/// How long a login attempt may take: Discord's authorization codes live ten minutes.
const LOGIN_TTL: Duration = Duration::minutes(10);
/// Refresh a little before Discord's expiry, so a token never dies mid-request.
const REFRESH_MARGIN_MS: u64 = 60_000;

/// Who is logged in, as the session keeps it (in Redis, never in the cookie).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionUser {
    pub person: Person,
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// Unix ms when the access token expires.
    pub expires_at: u64,
    /// The session's CSRF token: every post must carry it.
    #[serde(default)]
    pub csrf: String,
    /// Names this login (not secret): logging out ends this login's streams, not the
    /// same person's other devices.
    #[serde(default)]
    pub login: String,
}

impl SessionUser {
    pub fn viewer(&self) -> Viewer {
        Viewer {
            id: self.person.id,
            username: self.person.display_name().to_owned(),
            avatar_url: self.person.avatar_url.clone(),
        }
    }
}

/// A login in progress: what the callback must see again.
#[derive(Debug, Serialize, Deserialize)]
struct PendingLogin {
    state: String,
    verifier: String,
    return_to: String,
}

/// Where a login goes when `return_to` is absent or refused.
const DEFAULT_RETURN_TO: &str = "/rooms";
/// The longest `return_to` kept: a login attempt stays small.
pub const MAX_RETURN_TO: usize = 2048;

/// A logged-in session ends after `ttl` unused.
pub fn session_expiry(ttl: std::time::Duration) -> Expiry {
    Expiry::OnInactivity(Duration::seconds(
        i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
    ))
}

/// `return_to` as one path on this site after normalisation, or `/rooms`.
///
/// Browsers read `//host` and `/\host` as another site, and resolve dot segments
/// (`/.//host`, `/a/..//host`, `/%2e//host`) before they look, so the verdict is taken on
/// the normalised value, never on the raw one. Refused outright: anything not starting
/// with `/`, backslashes and control characters whether raw or percent-encoded (an
/// encoded one can be decoded by a proxy or a later hop), values over
/// [`MAX_RETURN_TO`] bytes, and the login routes themselves (no loops).
pub fn safe_return_to(raw: Option<&str>) -> String {
    raw.and_then(normalised_return_to)
        .unwrap_or_else(|| DEFAULT_RETURN_TO.to_owned())
}

fn normalised_return_to(raw: &str) -> Option<String> {
    if raw.len() > MAX_RETURN_TO || !raw.starts_with('/') || hostile(raw) {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    if hostile(&decoded) {
        return None;
    }
    // The url crate resolves dot segments the way browsers do (`%2e` included).
    let base = Url::parse("http://coven.invalid/").ok()?;
    let url = base.join(raw).ok()?;
    if url.origin() != base.origin() {
        return None;
    }
    let out = &url[url::Position::BeforePath..];
    (out.starts_with('/')
        && !out.starts_with("//")
        && out.len() <= MAX_RETURN_TO
        && stays_on_site(url.path(), &base))
    .then(|| out.to_owned())
}

/// Whether a normalised path still names a path on this site for every hop that decodes
/// it again (a proxy, a framework, a browser reading `%2f`): decoded and re-normalised
/// level by level, it never turns into `//host`, a backslash or a control character, nor
/// into the login routes. Deeper encodings than a few levels are refused.
fn stays_on_site(path: &str, base: &Url) -> bool {
    let mut path = path.to_owned();
    for _ in 0..4 {
        let decoded = percent_encoding::percent_decode_str(&path)
            .decode_utf8_lossy()
            .into_owned();
        if hostile(&decoded) || decoded.starts_with("//") {
            return false;
        }
        let mut again = base.clone();
        again.set_path(&decoded);
        if again.path().starts_with("//") || again.path().starts_with("/auth/") {
            return false;
        }
        if decoded == path {
            return true;
        }
        path = decoded;
    }
    false
}

/// Characters no same-site path needs and browsers read in surprising ways.
fn hostile(s: &str) -> bool {
    s.chars().any(|c| c == '\\' || c.is_control())
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// `GET /auth/login`: off to Discord, remembering where to come back to.
pub async fn login(
    State(app): State<AppState>,
    session: Session,
    Query(q): Query<LoginQuery>,
) -> Result<Response, WebError> {
    let return_to = safe_return_to(q.return_to.as_deref());
    let authorization = app.discord.authorize();
    let user: Option<SessionUser> = session.get(USER).await?;
    if user.is_none() {
        // An anonymous visitor's only server state is this attempt, and it lives no
        // longer than Discord's code would.
        session.set_expiry(Some(Expiry::OnInactivity(LOGIN_TTL)));
    }
    session
        .insert(
            LOGIN,
            PendingLogin {
                state: authorization.state,
                verifier: authorization.verifier,
                return_to,
            },
        )
        .await?;
    Ok(Redirect::to(authorization.url.as_str()).into_response())
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /auth/callback`: Discord sends the browser back with a code. A failed attempt
/// leaves nothing behind for an anonymous visitor.
pub async fn callback(
    State(app): State<AppState>,
    session: Session,
    Query(q): Query<CallbackQuery>,
) -> Result<Response, WebError> {
    let done = complete_login(&app, &session, q).await;
    if done.is_err() {
        let user: Option<SessionUser> = session.get(USER).await?;
        if user.is_none() {
            session.flush().await?;
        }
    }
    done
}

async fn complete_login(
    app: &AppState,
    session: &Session,
    q: CallbackQuery,
) -> Result<Response, WebError> {
    let pending: Option<PendingLogin> = session.remove(LOGIN).await?;
    let Some(pending) = pending else {
        return Err(WebError::BadRequest(
            "This login has already been used or has expired. Start again from the login button."
                .to_owned(),
        ));
    };
    if q.state.as_deref() != Some(pending.state.as_str()) {
        return Err(WebError::BadRequest(
            "The login could not be verified (it did not start here). Start again from the login button."
                .to_owned(),
        ));
    }
    if let Some(error) = q.error {
        tracing::info!(error, "Discord login not completed");
        return Err(WebError::BadRequest(
            "The Discord login was cancelled. You can start again whenever you like.".to_owned(),
        ));
    }
    let Some(code) = q.code else {
        return Err(WebError::BadRequest(
            "Discord sent no login code back. Start again from the login button.".to_owned(),
        ));
    };
    let tokens = match app.discord.exchange(code, pending.verifier).await {
        Ok(t) => t,
        Err(DiscordError::Unauthorized) => {
            return Err(WebError::BadRequest(
                "Discord did not accept this login code (it may have been used already). Start again."
                    .to_owned(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let person = app.discord.me(&tokens.access_token).await?;
    let roles = app.discord.member_roles(person.id).await?;
    let member = roles.is_some();
    let known = app.bus.member(person.id).await?;
    super::members::record(app, person.id, known, roles).await?;
    // Just asked: the next recheck is a full interval away.
    app.bus
        .claim(
            &super::members::check_key(person.id),
            app.settings.member_recheck,
        )
        .await?;
    // A new id for the logged-in session: an id planted before login is worth nothing.
    session.cycle_id().await?;
    session.set_expiry(Some(session_expiry(app.settings.session_ttl)));
    tracing::info!(user = %person.id, member, "logged in");
    session
        .insert(
            USER,
            SessionUser {
                person,
                access_token: tokens.access_token,
                refresh_token: tokens.refresh_token,
                expires_at: tokens.expires_at,
                csrf: protect::new_token(),
                login: protect::new_token(),
            },
        )
        .await?;
    // Non-members may still follow an invite, which adds them to the guild.
    if !member && !pending.return_to.starts_with("/invite/") {
        return Err(WebError::NotMember);
    }
    Ok(Redirect::to(&pending.return_to).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    pub csrf_token: Option<String>,
    /// `login` to log in again straight away ("use another account"); else home.
    #[serde(default)]
    pub then: Option<String>,
}

/// `POST /auth/logout`: forget the session everywhere (it lives in Redis). Not a
/// [`protect::Posted`]: someone whose session is already gone is simply sent home.
pub async fn logout(
    State(app): State<AppState>,
    session: Session,
    headers: axum::http::HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, WebError> {
    let user: Option<SessionUser> = session.get(USER).await?;
    let form = match protect::read_form(form) {
        Ok(form) => form,
        // Without a session there is nothing to protect: home (or login) all the same.
        Err(_) if user.is_none() => TokenForm::default(),
        Err(e) => return Err(e),
    };
    // Someone logged in with an account that is not in the server switches accounts by
    // logging out and in again; Discord's authorize page shows which account it uses.
    let then = match form.then.as_deref() {
        Some("login") => "/auth/login",
        _ => "/",
    };
    if let Some(user) = user {
        protect::check(
            &app,
            &user,
            &protect::Sender::of(&headers),
            form.csrf_token.as_deref(),
        )?;
        session.flush().await?;
        // The session is gone, so no new stream opens with it; the open ones end too.
        app.bus
            .append(
                crate::event::EventData::SessionEnded {
                    user_id: user.person.id,
                    login: user.login,
                },
                None,
            )
            .await?;
    }
    Ok(Redirect::to(then).into_response())
}

/// Someone with a valid session (their Discord token refreshed when it ran out).
pub struct LoggedIn {
    pub user: SessionUser,
    pub session: Session,
}

impl FromRequestParts<AppState> for LoggedIn {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, WebError> {
        let session = Session::from_request_parts(parts, app)
            .await
            .map_err(|(_, m)| {
                WebError::Session(tower_sessions::session::Error::Store(
                    tower_sessions::session_store::Error::Backend(m.to_owned()),
                ))
            })?;
        let api = parts.uri.path().starts_with("/api/");
        let here = parts
            .uri
            .path_and_query()
            .map_or("/rooms", |p| p.as_str())
            .to_owned();
        let not_logged_in = || WebError::NotLoggedIn {
            return_to: safe_return_to(Some(&here)),
            api,
        };
        let user: Option<SessionUser> = session.get(USER).await?;
        let Some(mut user) = user else {
            return Err(not_logged_in());
        };
        if user.expires_at <= now_ms() + REFRESH_MARGIN_MS {
            // Flushed, not emptied: an empty record would outlive the login by SESSION_TTL.
            let Some(refresh) = user.refresh_token.clone() else {
                session.flush().await?;
                return Err(not_logged_in());
            };
            match app.discord.refresh(refresh).await {
                Ok(tokens) => {
                    user.access_token = tokens.access_token;
                    user.refresh_token = tokens.refresh_token.or(user.refresh_token);
                    user.expires_at = tokens.expires_at;
                    session.insert(USER, &user).await?;
                    tracing::debug!(user = %user.person.id, "Discord token refreshed");
                }
                Err(DiscordError::Unauthorized) => {
                    tracing::info!(user = %user.person.id, "Discord token refresh refused; logging out");
                    session.flush().await?;
                    return Err(not_logged_in());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(LoggedIn { user, session })
    }
}

/// How long a stream's session stays cached in the replica after it was read.
pub const SESSION_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);
/// Sessions cached at most; past it, entries older than the TTL are dropped first.
const SESSION_CACHE_MAX: usize = 200_000;

/// The sessions of recent stream openers, by session id, so a wave of reconnecting
/// browsers asks Redis for a session once per `SESSION_CACHE_TTL` instead of reading and
/// rewriting it for every stream. Revocation stays immediate: a logout (`session.ended`)
/// or a removal from the server (`member.removed`) drops the person's entries on every
/// replica as the hub passes the event on.
#[derive(Default)]
pub struct SessionCache {
    entries: std::sync::Mutex<HashMap<i128, (std::time::Instant, Arc<SessionUser>)>>,
    store: std::sync::OnceLock<Arc<dyn tower_sessions::SessionStore>>,
    /// Logins ended lately, so a stream that read its session just before the logout
    /// passed, and subscribed just after, still learns of it.
    revoked:
        std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, Id<UserMarker>, String)>>,
}

impl SessionCache {
    /// Where sessions are read on a miss (the site's session store).
    pub fn set_store(&self, store: Arc<dyn tower_sessions::SessionStore>) {
        let _ = self.store.set(store);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<i128, (std::time::Instant, Arc<SessionUser>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the entries of one login (it logged out).
    pub fn revoke_login(&self, user: Id<UserMarker>, login: &str) {
        self.lock()
            .retain(|_, (_, u)| !(u.person.id == user && u.login == login));
        self.remember(user, login.to_owned());
    }

    /// Drops every entry of a person (they left the server). No mark is needed: a
    /// stream reads membership after subscribing, so it sees the removal either way.
    pub fn revoke_user(&self, user: Id<UserMarker>) {
        self.lock().retain(|_, (_, u)| u.person.id != user);
    }

    fn remember(&self, user: Id<UserMarker>, login: String) {
        let now = std::time::Instant::now();
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        while revoked
            .front()
            .is_some_and(|(at, ..)| now.duration_since(*at) > SESSION_CACHE_TTL * 3)
        {
            revoked.pop_front();
        }
        revoked.push_back((now, user, login));
    }

    /// Whether `user`'s login was revoked in the last moments (asked by a stream once it
    /// has subscribed to the events that would revoke it from then on).
    pub fn was_revoked(&self, user: &SessionUser) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(_, who, login)| *who == user.person.id && *login == user.login)
    }

    async fn user(
        &self,
        id: tower_sessions::session::Id,
    ) -> Result<Option<Arc<SessionUser>>, WebError> {
        let now = std::time::Instant::now();
        if let Some((at, user)) = self.lock().get(&id.0)
            && now.duration_since(*at) < SESSION_CACHE_TTL
        {
            return Ok(Some(user.clone()));
        }
        let Some(store) = self.store.get() else {
            return Ok(None);
        };
        let record = store
            .load(&id)
            .await
            .map_err(|e| WebError::Session(tower_sessions::session::Error::Store(e)))?;
        let user = record
            .filter(|r| r.expiry_date > tower_sessions::cookie::time::OffsetDateTime::now_utc())
            .and_then(|mut r| r.data.remove(USER))
            .and_then(|v| serde_json::from_value::<SessionUser>(v).ok())
            .map(Arc::new);
        let mut entries = self.lock();
        match &user {
            Some(user) => {
                if entries.len() >= SESSION_CACHE_MAX {
                    entries.retain(|_, (at, _)| now.duration_since(*at) < SESSION_CACHE_TTL);
                    if entries.len() >= SESSION_CACHE_MAX {
                        entries.clear();
                    }
                }
                entries.insert(id.0, (now, user.clone()));
            }
            None => {
                entries.remove(&id.0);
            }
        }
        Ok(user)
    }
}

/// Someone opening a stream, known by their session cookie through the [`SessionCache`]:
/// no session is loaded into the request, and nothing is written back.
pub struct StreamUser(pub Arc<SessionUser>);

impl FromRequestParts<AppState> for StreamUser {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, WebError> {
        let not_logged_in = || WebError::NotLoggedIn {
            return_to: "/rooms".to_owned(),
            api: true,
        };
        let id = parts
            .headers
            .get_all(axum::http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
            .find_map(|v| v.parse::<tower_sessions::session::Id>().ok())
            .ok_or_else(not_logged_in)?;
        let user = app.hub.sessions.user(id).await?.ok_or_else(not_logged_in)?;
        Ok(StreamUser(user))
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_RETURN_TO, safe_return_to};

    /// Every value an attacker might try, with what must come out.
    const CASES: &[(&str, &str)] = &[
        // Paths on this site stay as they are.
        ("/rooms/123", "/rooms/123"),
        ("/rooms?x=1#y", "/rooms?x=1#y"),
        ("/invite/abc.def", "/invite/abc.def"),
        ("/", "/"),
        ("/rooms//123", "/rooms//123"),
        ("/rooms%2f123", "/rooms%2f123"),
        (
            "/rooms?next=//elsewhere.example",
            "/rooms?next=//elsewhere.example",
        ),
        ("/rooms#//elsewhere.example", "/rooms#//elsewhere.example"),
        ("/javascript:alert(1)", "/javascript:alert(1)"),
        ("/r\u{e9}", "/r%C3%A9"),
        ("/\u{ff0f}elsewhere.example", "/%EF%BC%8Felsewhere.example"),
        // Dot segments resolve, and stay on the site.
        ("/a/../../b", "/b"),
        ("/a/./b/../c", "/a/c"),
        ("/%2e%2e/%2E%2e/rooms", "/rooms"),
        ("/a/%2e%2e/rooms", "/rooms"),
        ("/a/.%2e/rooms", "/rooms"),
        // Scheme-relative, before or after normalisation.
        ("//elsewhere.example", "/rooms"),
        ("//elsewhere.example/rooms", "/rooms"),
        ("///elsewhere.example", "/rooms"),
        ("////elsewhere.example", "/rooms"),
        ("/.//elsewhere.example", "/rooms"),
        ("/././/elsewhere.example", "/rooms"),
        ("/a/..//elsewhere.example", "/rooms"),
        ("/a/b/../..//elsewhere.example", "/rooms"),
        ("/%2e//elsewhere.example", "/rooms"),
        ("/%2E//elsewhere.example", "/rooms"),
        ("/a/%2e%2e//elsewhere.example", "/rooms"),
        ("/a/%2E%2E//elsewhere.example", "/rooms"),
        ("/..//elsewhere.example", "/rooms"),
        // Encoded slashes that decode to a scheme-relative path.
        ("/%2felsewhere.example", "/rooms"),
        ("/%2Felsewhere.example", "/rooms"),
        ("/%2f%2felsewhere.example", "/rooms"),
        ("/.%2f%2felsewhere.example", "/rooms"),
        ("/a/..%2f%2felsewhere.example", "/rooms"),
        // Encoded twice, for hops that decode twice.
        ("/%252f%252felsewhere.example", "/rooms"),
        ("/%252e%252e//elsewhere.example", "/rooms"),
        ("/%255c", "/rooms"),
        ("/%2509", "/rooms"),
        ("/%25252f%25252felsewhere.example", "/rooms"),
        ("/100%25", "/100%25"),
        // Backslashes, raw and encoded.
        ("/\\elsewhere.example", "/rooms"),
        ("\\\\elsewhere.example", "/rooms"),
        ("/%5celsewhere.example", "/rooms"),
        ("/%5Celsewhere.example", "/rooms"),
        ("/rooms/%5c", "/rooms"),
        ("/.%5c/elsewhere.example", "/rooms"),
        // Control characters, raw and encoded, anywhere.
        ("/\telsewhere", "/rooms"),
        ("/\t/elsewhere.example", "/rooms"),
        ("/\n/elsewhere.example", "/rooms"),
        ("/rooms\r\nSet-Cookie: x=1", "/rooms"),
        ("/%09/elsewhere.example", "/rooms"),
        ("/%0a/elsewhere.example", "/rooms"),
        ("/%0D%0A/elsewhere.example", "/rooms"),
        ("/rooms?x=%0d%0aSet-Cookie:%20x=1", "/rooms"),
        ("/rooms#%00", "/rooms"),
        ("/%7f", "/rooms"),
        ("/%c2%85", "/rooms"),
        ("/\u{85}", "/rooms"),
        ("/rooms\0", "/rooms"),
        // Other origins and schemes.
        ("https://elsewhere.example/", "/rooms"),
        ("http:elsewhere.example", "/rooms"),
        ("HTTPS://elsewhere.example/", "/rooms"),
        ("javascript:alert(1)", "/rooms"),
        ("JaVaScRiPt:alert(1)", "/rooms"),
        ("data:text/html,<script>alert(1)</script>", "/rooms"),
        (" /rooms", "/rooms"),
        ("rooms", "/rooms"),
        ("elsewhere.example", "/rooms"),
        ("", "/rooms"),
        ("?x=1", "/rooms"),
        ("#x", "/rooms"),
        // No loops through the login itself.
        ("/auth/login", "/rooms"),
        ("/auth/callback?code=x", "/rooms"),
        ("/rooms/../auth/login", "/rooms"),
        ("/%61uth/login", "/rooms"),
    ];

    #[test]
    fn return_to_is_one_normalised_path_on_this_site() {
        assert_eq!(safe_return_to(None), "/rooms");
        for (raw, want) in CASES {
            let got = safe_return_to(Some(raw));
            assert_eq!(got, *want, "{raw:?}");
            assert!(
                got.starts_with('/') && !got.starts_with("//") && !got.starts_with("/\\"),
                "{raw:?} gave {got:?}"
            );
        }
    }

    #[test]
    fn return_to_is_at_most_two_kib() {
        let longest = format!("/rooms/{}", "x".repeat(MAX_RETURN_TO - 7));
        assert_eq!(safe_return_to(Some(&longest)), longest);
        let over = format!("{longest}x");
        assert_eq!(safe_return_to(Some(&over)), "/rooms");
        let huge = format!("/{}", "a/".repeat(100_000));
        assert_eq!(safe_return_to(Some(&huge)), "/rooms");
        // Within the limit raw, over it once encoded: refused too.
        let grows = format!("/{}", "\u{e9}".repeat(MAX_RETURN_TO / 2 - 1));
        assert!(grows.len() <= MAX_RETURN_TO);
        assert_eq!(safe_return_to(Some(&grows)), "/rooms");
    }
}
