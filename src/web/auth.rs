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
use tower_sessions::Session;
use url::Url;

use super::error::WebError;
use super::{AppState, protect};
use crate::discord::DiscordError;
use crate::event::{Person, Viewer, now_ms};

const USER: &str = "user";
const LOGIN: &str = "login";
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

/// `return_to` as given, if it is a path on this site; `/rooms` otherwise. Rejects
/// `//host` and `/\host` (browsers read both as another site), schemes, control
/// characters, and the login routes themselves (no loops).
pub fn safe_return_to(raw: Option<&str>) -> String {
    const DEFAULT: &str = "/rooms";
    let Some(raw) = raw else {
        return DEFAULT.to_owned();
    };
    if !raw.starts_with('/')
        || raw.starts_with("//")
        || raw.contains('\\')
        || raw.chars().any(char::is_control)
        || raw.starts_with("/auth/")
    {
        return DEFAULT.to_owned();
    }
    let Ok(base) = Url::parse("http://coven.invalid/") else {
        return DEFAULT.to_owned();
    };
    match base.join(raw) {
        Ok(url) if url.origin() == base.origin() => url[url::Position::BeforePath..].to_owned(),
        _ => DEFAULT.to_owned(),
    }
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

/// `GET /auth/callback`: Discord sends the browser back with a code.
pub async fn callback(
    State(app): State<AppState>,
    session: Session,
    Query(q): Query<CallbackQuery>,
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
    super::members::record(&app, person.id, known, roles).await?;
    // Just asked: the next recheck is a full interval away.
    app.bus
        .claim(
            &super::members::check_key(person.id),
            app.settings.member_recheck,
        )
        .await?;
    // A new id for the logged-in session: an id planted before login is worth nothing.
    session.cycle_id().await?;
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
    if let Some(user) = user {
        let token = protect::read_form(form)?.csrf_token;
        protect::check(
            &app,
            &user,
            &protect::Sender::of(&headers),
            token.as_deref(),
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
    Ok(Redirect::to("/").into_response())
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
            let Some(refresh) = user.refresh_token.clone() else {
                session.remove_value(USER).await?;
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
                    session.remove_value(USER).await?;
                    return Err(not_logged_in());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(LoggedIn { user, session })
    }
}

#[cfg(test)]
mod tests {
    use super::safe_return_to;

    #[test]
    fn return_to_stays_on_site() {
        for (raw, want) in [
            (None, "/rooms"),
            (Some("/rooms/123"), "/rooms/123"),
            (Some("/rooms?x=1#y"), "/rooms?x=1#y"),
            (Some("/invite/abc.def"), "/invite/abc.def"),
            (Some("//elsewhere.example"), "/rooms"),
            (Some("//elsewhere.example/rooms"), "/rooms"),
            (Some("/\\elsewhere.example"), "/rooms"),
            (Some("https://elsewhere.example/"), "/rooms"),
            (Some("javascript:alert(1)"), "/rooms"),
            (Some("rooms"), "/rooms"),
            (Some("/\telsewhere"), "/rooms"),
            (Some("/auth/login"), "/rooms"),
            (Some("/a/../../b"), "/b"),
        ] {
            assert_eq!(safe_return_to(raw), want, "{raw:?}");
        }
    }
}
