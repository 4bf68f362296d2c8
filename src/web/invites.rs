//! Invite links: `GET /invite/{token}` lets someone into a room and, when needed, into
//! the guild.
//!
//! Owns the token (HS256 with `INVITE_SECRET`: guild, channel, role, creator, issued,
//! expires) and what following one does. Must not create or delete rooms.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, RoleMarker, UserMarker};

use super::auth::{LoggedIn, now_member};
use super::error::WebError;
use super::{App, AppState};
use crate::bus::Snapshot;
use crate::event::now_ms;

/// What an invite says. Ids are strings, as everywhere Discord ids meet JSON.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    guild_id: String,
    channel_id: Id<ChannelMarker>,
    role_id: Id<RoleMarker>,
    creator_id: Id<UserMarker>,
    /// Unix seconds.
    iat: u64,
    exp: u64,
}

/// A signed invite to `channel` (opened by `role`), valid for `INVITE_TTL`.
fn sign(
    app: &App,
    channel: Id<ChannelMarker>,
    role: Id<RoleMarker>,
    creator: Id<UserMarker>,
) -> Result<String, WebError> {
    let iat = now_ms() / 1000;
    let claims = Claims {
        guild_id: app.settings.guild_id.to_string(),
        channel_id: channel,
        role_id: role,
        creator_id: creator,
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
/// (they have a role to grant), offered to their creator and the people in them.
pub fn offer(
    app: &App,
    snapshot: &Snapshot,
    id: Id<ChannelMarker>,
    who: Id<UserMarker>,
) -> Result<Option<String>, WebError> {
    let Some(room) = snapshot.rooms.get(&id) else {
        return Ok(None);
    };
    let (Some(role), Some(creator)) = (room.role_id, room.creator_id) else {
        return Ok(None);
    };
    if creator != who && !snapshot.is_inside(who, id) {
        return Ok(None);
    }
    Ok(Some(link(app, &sign(app, id, role, creator)?)))
}

fn verify(app: &App, token: &str) -> Result<Claims, WebError> {
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
    if claims.guild_id != app.settings.guild_id.to_string() {
        return Err(forged());
    }
    Ok(claims)
}

/// `GET /invite/{token}`: not logged in → log in and come back; then into the guild if
/// needed, the room's role, and the room page.
pub async fn follow(
    State(app): State<AppState>,
    mut who: LoggedIn,
    Path(token): Path<String>,
) -> Result<Response, WebError> {
    let claims = verify(&app, &token)?;
    let channel = claims.channel_id;
    let snapshot = app.bus.snapshot().await?;
    // Gone, or (with a valid signature) no longer opened by the role the invite grants.
    if snapshot.rooms.get(&channel).and_then(|r| r.role_id) != Some(claims.role_id) {
        return Err(WebError::NotFound(
            "This room has been closed. Ask for a link to another room, or make one.".to_owned(),
        ));
    }
    let me = who.user.person.id;
    if !snapshot.is_inside(me, channel) && snapshot.is_full(channel) {
        return Err(WebError::Conflict(
            "This room is full. Try again when someone leaves.".to_owned(),
        ));
    }
    let joining = !who.user.member;
    if joining {
        app.discord.add_to_guild(me, &who.user.access_token).await?;
        tracing::info!(user = %me, "added to the guild by an invite");
    }
    app.discord.grant(me, claims.role_id).await?;
    if joining {
        now_member(&mut who).await?;
    }
    Ok(Redirect::to(&format!("/rooms/{}", claims.channel_id)).into_response())
}
