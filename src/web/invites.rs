//! Invite links: `GET /invite/{token}` lets someone into a room and, when needed, into
//! the guild.
//!
//! Owns the token (HS256 with `INVITE_SECRET`: guild, channel, role, creator, the room's
//! invite generation, issued, expires) and what following one does: a member gets the
//! room's role at once; someone the link would add to the Discord server is asked first
//! (a confirm page, then a post). "New link" raises the room's generation, so older
//! links answer 410. Must not create or delete rooms.

use askama::Template;
use askama_web::WebTemplate;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker, UserMarker};

use super::guard::LoggedIn;
use super::guilds::Guild;
use super::http::error::WebError;
use super::http::protect::{self, TokenForm};
use super::view::UserView;
use super::{App, AppState, members};
use crate::access::Principal;
use crate::bus::Snapshot;
use crate::event::now_ms;

/// What an invite says. Ids are strings, as everywhere Discord ids meet JSON.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    guild_id: String,
    channel_id: Id<ChannelMarker>,
    role_id: Id<RoleMarker>,
    creator_id: Id<UserMarker>,
    /// The room's invite generation when the link was made.
    #[serde(default)]
    generation: u32,
    /// Unix seconds.
    iat: u64,
    exp: u64,
}

/// A signed invite to `channel` (opened by `role`), valid for `INVITE_TTL`.
fn sign(
    app: &App,
    guild: Id<GuildMarker>,
    channel: Id<ChannelMarker>,
    role: Id<RoleMarker>,
    creator: Id<UserMarker>,
    generation: u32,
) -> Result<String, WebError> {
    let iat = now_ms() / 1000;
    let claims = Claims {
        guild_id: guild.to_string(),
        channel_id: channel,
        role_id: role,
        creator_id: creator,
        generation,
        iat,
        exp: iat + app.settings.invite_ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(app.settings.invite_secret.expose_secret().as_bytes()),
    )
    .map_err(|e| WebError::BadRequest(format!("cannot make an invite: {e}")))
}

/// The full link to share.
fn link(app: &App, token: &str) -> String {
    format!(
        "{}/invite/{token}",
        app.settings.public_url.as_str().trim_end_matches('/')
    )
}

/// A fresh invite link to a room for `who`, if they may hand one out: rooms Coven made
/// (they have a role to grant), offered to their creator and to those holding the role —
/// the people Discord lets into the room — and only while Discord shows them the room.
pub fn offer(
    app: &App,
    guild: Id<GuildMarker>,
    snapshot: &Snapshot,
    id: Id<ChannelMarker>,
    who: Principal<'_>,
) -> Result<Option<String>, WebError> {
    let Some(room) = snapshot.rooms.get(&id) else {
        return Ok(None);
    };
    let (Some(role), Some(creator)) = (room.role_id, room.creator_id) else {
        return Ok(None);
    };
    if creator != who.user && !who.roles.contains(&role) {
        return Ok(None);
    }
    if !snapshot.access.can_see(who, id) {
        return Ok(None);
    }
    Ok(Some(link(
        app,
        &sign(app, guild, id, role, creator, room.invite_gen)?,
    )))
}

/// The invite's claims and the community it is to, if it is served here: a link to a
/// community Coven is no longer in (or never was) says the room is closed.
async fn verify(app: &App, token: &str) -> Result<(Claims, Guild), WebError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp"]);
    let forged = || {
        WebError::BadRequest(
            "This invite link is not valid: it was changed or cut short. Ask for a new link."
                .to_owned(),
        )
    };
    let claims = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(app.settings.invite_secret.expose_secret().as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => WebError::Gone(
            "This invite link has expired. Ask someone in the room for a new link.".to_owned(),
        ),
        _ => forged(),
    })?
    .claims;
    let Some(id) = super::guard::parse_id(&claims.guild_id) else {
        return Err(forged());
    };
    let Some(guild) = app.guilds.get(id).await? else {
        return Err(closed());
    };
    if guild.past_limit {
        return Err(WebError::PastLimit(app.settings.max_guilds));
    }
    Ok((claims, guild))
}

fn closed() -> WebError {
    WebError::NotFound(
        "This room has been closed. Ask for a link to another room, or make one.".to_owned(),
    )
}

/// The room an invite opens, if the link still does: 404 when the room is gone (or,
/// with a valid signature, no longer opened by the role the invite grants), 410 when a
/// newer link replaced this one, 409 when the room is full.
fn still_open<'s>(
    snapshot: &'s Snapshot,
    claims: &Claims,
    me: Id<UserMarker>,
) -> Result<&'s crate::bus::RoomRecord, WebError> {
    let channel = claims.channel_id;
    let Some(room) = snapshot
        .rooms
        .get(&channel)
        .filter(|r| r.role_id == Some(claims.role_id))
    else {
        return Err(closed());
    };
    if claims.generation < room.invite_gen {
        return Err(WebError::Gone(
            "This invite link was replaced by a newer one. Ask someone in the room for the new link."
                .to_owned(),
        ));
    }
    if !snapshot.is_inside(me, channel) && snapshot.is_full(channel) {
        return Err(WebError::Conflict(
            "This room is full. Try again when someone leaves.".to_owned(),
        ));
    }
    Ok(room)
}

#[derive(Template, WebTemplate)]
#[template(path = "web/join.html")]
pub struct JoinPage {
    pub user: Option<UserView>,
    /// Why live updates are delayed, when they are (the gateway is quiet or in trouble).
    pub delayed: Option<String>,
    pub server: String,
    pub room: String,
    pub name: String,
    pub token: String,
    pub csrf: String,
}

/// `GET /invite/{token}`: not logged in → log in and come back. A member gets the room's
/// role and goes to the room; someone the link would add to the Discord server is asked
/// first.
pub async fn follow(
    State(app): State<AppState>,
    who: LoggedIn,
    Path(token): Path<String>,
) -> Result<Response, WebError> {
    let (claims, guild) = verify(&app, &token).await?;
    let snapshot = guild.bus.snapshot().await?;
    let me = who.user.person.id;
    let room = still_open(&snapshot, &claims, me)?;
    if members::current(&app, &guild, &who.user).await?.is_none() {
        let view = UserView::of(&who.user);
        return Ok(JoinPage {
            delayed: None,
            server: snapshot
                .access
                .guild
                .as_ref()
                .map_or_else(|| "this Discord server".to_owned(), |g| g.name.clone()),
            room: room.name.clone(),
            name: view.name.clone(),
            csrf: view.csrf.clone(),
            user: Some(view),
            token,
        }
        .into_response());
    }
    enter(&app, &guild, &claims, me).await
}

/// `POST /invite/{token}`: the confirmed join — into the Discord server, then the room.
pub async fn join(
    State(app): State<AppState>,
    who: LoggedIn,
    Path(token): Path<String>,
    headers: HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, WebError> {
    let sent = protect::read_form(form)?.csrf_token;
    app.protect
        .check(&who.user, &protect::Sender::of(&headers), sent.as_deref())?;
    let (claims, guild) = verify(&app, &token).await?;
    let snapshot = guild.bus.snapshot().await?;
    let me = who.user.person.id;
    still_open(&snapshot, &claims, me)?;
    if guild.bus.member(me).await?.is_none() {
        app.discord
            .add_to_guild(guild.id, me, &who.user.access_token)
            .await?;
        tracing::info!(user = %me, guild = %guild.id, "added to the guild by a confirmed invite");
    }
    enter(&app, &guild, &claims, me).await
}

/// Grants the room's role, records it, and goes to the room.
async fn enter(
    app: &App,
    guild: &Guild,
    claims: &Claims,
    me: Id<UserMarker>,
) -> Result<Response, WebError> {
    app.discord.grant(guild.id, me, claims.role_id).await?;
    members::granted(&*guild.bus, me, claims.role_id).await?;
    Ok(Redirect::to(&format!("/g/{}/rooms/{}", guild.id, claims.channel_id)).into_response())
}
