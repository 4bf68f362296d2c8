//! Logging in with Discord and out again.
//!
//! Owns the OAuth2 round trip (PKCE, state compared against the session, `return_to`
//! limited to this site by [`super::return_to`]) and the end of a login (its streams end
//! on every replica, announced on `P:control`). Who is asking, on every later request, is [`super::guard`]'s;
//! membership and roles are [`super::members`]'. Must not render room data.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use tower_sessions::cookie::time::Duration;
use tower_sessions::{Expiry, Session};

use super::AppState;
use super::http::error::WebError;
use super::http::protect::{self, Sender};
use super::return_to::safe_return_to;
use super::session::{SESSION_VERSION, SessionUser, USER, session_expiry};
use crate::discord::DiscordError;
use crate::event::EventData;

const LOGIN: &str = "login";
/// How long a login attempt may take: Discord's authorization codes live ten minutes.
const LOGIN_TTL: Duration = Duration::minutes(10);

/// A login in progress: what the callback must see again.
#[derive(Debug, Serialize, Deserialize)]
struct PendingLogin {
    state: String,
    verifier: String,
    return_to: String,
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
    // Membership is asked per community, with the person's own token, when they open it.
    // A new id for the logged-in session: an id planted before login is worth nothing.
    session.cycle_id().await?;
    session.set_expiry(Some(session_expiry(app.settings.session_ttl)));
    tracing::info!(user = %person.id, "logged in");
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
                version: SESSION_VERSION,
            },
        )
        .await?;
    Ok(Redirect::to(&pending.return_to).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    pub csrf_token: Option<String>,
    /// `login` to log in again straight away ("use another account"); else home.
    #[serde(default)]
    pub then: Option<String>,
}

/// `POST /auth/logout`: forget the session everywhere (it lives in Redis). Not a
/// [`super::guard::Posted`]: someone whose session is already gone is simply sent home.
pub async fn logout(
    State(app): State<AppState>,
    session: Session,
    headers: axum::http::HeaderMap,
    form: Result<axum::Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, WebError> {
    let user: Option<SessionUser> = session.get(USER).await?;
    let form = match protect::read_form(form) {
        Ok(form) => form,
        // Without a session there is nothing to protect: home (or login) all the same.
        Err(_) if user.is_none() => LogoutForm::default(),
        Err(e) => return Err(e),
    };
    // Someone logged in with an account that is not in the server switches accounts by
    // logging out and in again; Discord's authorize page shows which account it uses.
    let then = match form.then.as_deref() {
        Some("login") => "/auth/login",
        _ => "/",
    };
    if let Some(user) = user {
        app.protect
            .check(&user, &Sender::of(&headers), form.csrf_token.as_deref())?;
        session.flush().await?;
        // The session is gone, so no new stream opens with it; the open ones end too, in
        // every community, on every replica.
        app.guilds
            .deployment()
            .announce(&EventData::SessionEnded {
                user_id: user.person.id,
                login: user.login,
            })
            .await?;
    }
    Ok(Redirect::to(then).into_response())
}
