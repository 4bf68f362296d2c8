//! Who is asking, decided once by extractors so no handler can skip a check:
//! [`LoggedIn`] (a valid session, its Discord token refreshed when it ran out),
//! [`StreamUser`] (the same for a stream, through the replica's session cache),
//! [`Member`] (a member of the guild, with their roles, rechecked on schedule) and
//! [`Posted`] (a member's post that passed CSRF, origin and rate checks).
//!
//! Owns the extractors. Must not decide what a person may see (that is
//! [`crate::access`]) nor render anything.

use axum::Form;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tower_sessions::Session;
use twilight_model::id::Id;
use twilight_model::id::marker::{GuildMarker, RoleMarker, UserMarker};

use super::AppState;
use super::guilds::Guild;
use super::http::error::WebError;
use super::http::protect::{Sender, WithToken, read_form};
use super::members;
use super::return_to::safe_return_to;
use super::session::{SESSION_COOKIE, SESSION_VERSION, SessionUser, USER};
use crate::access::Principal;
use crate::config;
use crate::discord::DiscordError;
use crate::event::now_ms;

/// Refresh a little before Discord's expiry, so a token never dies mid-request.
const REFRESH_MARGIN_MS: u64 = 60_000;

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
        if user.version < SESSION_VERSION {
            // A login from before communities: its token cannot list the person's
            // servers. Once logged in again, the session is of this version.
            session.flush().await?;
            return Err(WebError::LoginAgain { api });
        }
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

/// Someone opening a stream, known by their session cookie through the [`super::session::SessionCache`]:
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
        let user = app
            .communities
            .sessions()
            .user(id)
            .await
            .map_err(|e| WebError::Session(tower_sessions::session::Error::Store(e)))?
            .filter(|u| u.version >= SESSION_VERSION)
            .ok_or_else(not_logged_in)?;
        Ok(StreamUser(user))
    }
}

/// The `{guild}` of a community's route, parsed once. Anything that is not a guild id
/// answers like a room that does not exist.
pub struct GuildId(pub Id<GuildMarker>);

impl FromRequestParts<AppState> for GuildId {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, WebError> {
        path_id(parts, app, "guild").await.map(GuildId)
    }
}

/// A Discord id as a route or query names it, spelled as Discord spells it
/// ([`config::parse_snowflake`]).
pub fn parse_id<M>(raw: &str) -> Option<Id<M>> {
    config::parse_snowflake(raw).ok().map(Id::new)
}

/// The route's `{name}` as an id; anything else answers like a room that does not exist.
pub async fn path_id<M>(parts: &mut Parts, app: &AppState, name: &str) -> Result<Id<M>, WebError> {
    let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, app)
        .await
        .map_err(|_| WebError::no_such_room())?;
    params
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, raw)| parse_id(raw))
        .ok_or_else(WebError::no_such_room)
}

/// A logged-in member of the route's guild and their roles there: who may see its rooms.
/// Someone who is not a member, a guild that is not served, and a guild that does not
/// exist all answer exactly like a room that does not exist; a guild the bot was removed
/// from tells its former members so.
pub struct Member {
    pub who: LoggedIn,
    pub roles: Vec<Id<RoleMarker>>,
    pub guild: Guild,
}

impl Member {
    pub fn id(&self) -> Id<UserMarker> {
        self.who.user.person.id
    }

    /// The member as the permission calculation sees them.
    pub fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.id(),
            roles: &self.roles,
        }
    }
}

impl FromRequestParts<AppState> for Member {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, WebError> {
        let GuildId(id) = GuildId::from_request_parts(parts, app).await?;
        let who = LoggedIn::from_request_parts(parts, app).await?;
        let me = who.user.person.id;
        let Some(guild) = app.guilds.get(id).await? else {
            // Its data outlives the bot's removal by a grace period: someone it knew as
            // a member is told what happened; anyone else learns nothing.
            return match app.guilds.bus(id).member(me).await? {
                Some(_) => Err(WebError::GuildGone),
                None => Err(WebError::no_such_room()),
            };
        };
        match members::current(app, &guild, &who.user).await {
            // A member is told; anyone else learns nothing of it.
            Ok(Some(_)) if guild.past_limit => Err(WebError::PastLimit(app.settings.max_guilds)),
            Ok(Some(record)) => Ok(Member {
                who,
                roles: record.roles,
                guild,
            }),
            Ok(None) => Err(WebError::no_such_room()),
            Err(WebError::Discord(DiscordError::Unauthorized)) => {
                // Their token was revoked: they log in again (never a retry loop).
                who.session.flush().await?;
                Err(WebError::NotLoggedIn {
                    return_to: safe_return_to(parts.uri.path_and_query().map(|p| p.as_str())),
                    api: false,
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// A post by a logged-in member from one of our pages: its form `F` read, and the CSRF
/// token, Origin and rate limit checked, before the handler runs.
pub struct Posted<F> {
    pub who: LoggedIn,
    /// The member's roles (what Discord lets them see and do).
    pub roles: Vec<Id<RoleMarker>>,
    /// The guild the post is to: its route's, never a form's.
    pub guild: Guild,
    pub form: F,
    /// Sent by HTMX (it wants `HX-Redirect` rather than a 303).
    pub htmx: bool,
}

impl<F> Posted<F> {
    pub fn principal(&self) -> Principal<'_> {
        Principal {
            user: self.who.user.person.id,
            roles: &self.roles,
        }
    }
}

impl<F: DeserializeOwned + Default + Send> FromRequest<AppState> for Posted<F> {
    type Rejection = WebError;

    async fn from_request(req: Request, app: &AppState) -> Result<Self, WebError> {
        let (mut parts, body) = req.into_parts();
        let Member { who, roles, guild } = Member::from_request_parts(&mut parts, app).await?;
        let sender = Sender::of(&parts.headers);
        let form = Form::<WithToken<F>>::from_request(Request::from_parts(parts, body), app).await;
        let form = read_form(form.map(|Form(f)| Form(Some(f))))?;
        let (token, form) = form.map_or((None, F::default()), |f| (f.csrf_token, f.form));
        app.protect.check(&who.user, &sender, token.as_deref())?;
        Ok(Posted {
            who,
            roles,
            guild,
            form,
            htmx: sender.htmx,
        })
    }
}
