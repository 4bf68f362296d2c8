//! Making, entering and closing rooms from the web: `POST /rooms`,
//! `POST /rooms/{id}/close`, `POST /rooms/{id}/move`, `POST /rooms/{id}/invite`, and how
//! a room's id is read from a route.
//!
//! Owns the rules for rooms (names, who may close; the idle rule is in `sweeper`). Changes
//! Discord only through [`crate::discord`] and records what it did through the bus; must
//! not render pages beyond redirects.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, RoleMarker};

use super::error::WebError;
use super::protect::{NoFields, Posted};
use super::{App, AppState, invites};
use crate::access::Seer;
use crate::bus::{Fence, RoomRecord, Snapshot};
use crate::event::EventData;

/// The longest room name Discord accepts for a channel.
const MAX_NAME: usize = 100;

#[derive(Debug, Default, Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
}

/// A room name as people type it, checked: trimmed, no control characters, 1-100
/// characters; empty means the default `{username}'s Game #{4 chars}`.
pub fn room_name(raw: &str, username: &str) -> Result<String, WebError> {
    let name = raw.trim();
    if name.is_empty() {
        let tag: String = (0..4)
            .map(|_| {
                let i = rand::random_range(0..32usize);
                char::from(b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789"[i])
            })
            .collect();
        let mut name = format!("{username}'s Game #{tag}");
        if name.chars().count() > MAX_NAME {
            name = format!("Game #{tag}");
        }
        return Ok(name);
    }
    if name.chars().any(char::is_control) {
        return Err(WebError::BadRequest(
            "A room name cannot contain line breaks or control characters.".to_owned(),
        ));
    }
    let len = name.chars().count();
    if len > MAX_NAME {
        return Err(WebError::BadRequest(format!(
            "A room name can be at most {MAX_NAME} characters (this one has {len})."
        )));
    }
    Ok(name.to_owned())
}

/// The `{channel_id}` of a room route, parsed once; anything else is "no such room".
pub struct RoomId(pub Id<ChannelMarker>);

impl FromRequestParts<AppState> for RoomId {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, WebError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, app)
            .await
            .map_err(|_| no_such_room())?;
        raw.parse::<u64>()
            .ok()
            .and_then(Id::new_checked)
            .map(RoomId)
            .ok_or_else(no_such_room)
    }
}

pub fn no_such_room() -> WebError {
    WebError::NotFound(
        "This room does not exist (any more). Rooms close when nobody has used them for a while."
            .to_owned(),
    )
}

/// The room as the snapshot has it, if Discord shows it to `who`; 404 otherwise (a room
/// one may not see answers exactly like a room that does not exist).
pub fn visible_room<'s>(
    snapshot: &'s Snapshot,
    id: Id<ChannelMarker>,
    who: Seer<'_>,
) -> Result<&'s RoomRecord, WebError> {
    snapshot
        .rooms
        .get(&id)
        .filter(|_| snapshot.access.can_see(who, id))
        .ok_or_else(no_such_room)
}

/// Where to go next: a 303 for a plain form, `HX-Redirect` for an HTMX post (HTMX would
/// otherwise follow the redirect itself and swap the page into the form).
fn go(htmx: bool, to: &str) -> Response {
    if htmx {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Ok(v) = HeaderValue::from_str(to) {
            r.headers_mut().insert("hx-redirect", v);
        }
        return r;
    }
    Redirect::to(to).into_response()
}

/// `POST /rooms`: make a room and go to it.
pub async fn create(
    axum::extract::State(app): axum::extract::State<AppState>,
    post: Posted<CreateForm>,
) -> Result<Response, WebError> {
    let person = &post.who.user.person;
    let name = room_name(&post.form.name, &person.username)?;
    let me = person.id;
    let made = app
        .discord
        .create_room(
            &name,
            me,
            app.settings.max_players,
            app.settings.room_category,
        )
        .await?;
    tracing::info!(channel = %made.channel, role = %made.role, creator = %me, "room created");
    // Who may see the room, and that its creator holds its role, are recorded before
    // the room itself: every reader knows who sees it the moment it appears.
    app.bus
        .append(
            EventData::ChannelAccess {
                channel_id: made.channel,
                overwrites: Some(made.overwrites.clone()),
            },
            None,
        )
        .await?;
    super::members::granted(&app, me, made.role).await?;
    app.bus
        .append(
            EventData::RoomCreated {
                channel_id: made.channel,
                name,
                user_limit: app.settings.max_players,
                created_by: Some(me),
                role_id: Some(made.role),
            },
            None,
        )
        .await?;
    Ok(go(post.htmx, &format!("/rooms/{}", made.channel)))
}

/// `POST /rooms/{id}/close`: the creator closes the room. Closing a room that is already
/// gone is a success.
pub async fn close(
    axum::extract::State(app): axum::extract::State<AppState>,
    RoomId(id): RoomId,
    post: Posted<NoFields>,
) -> Result<Response, WebError> {
    let me = post.who.user.person.id;
    let snapshot = app.bus.snapshot().await?;
    if let Some(room) = snapshot.rooms.get(&id) {
        if room.creator_id != Some(me) {
            // Someone Discord does not show the room to learns nothing of it.
            visible_room(&snapshot, id, post.seer())?;
            return Err(WebError::Forbidden(
                "Only the person who made this room can close it.".to_owned(),
            ));
        }
        close_room(&app, id, room.role_id, None).await?;
        tracing::info!(channel = %id, by = %me, "room closed");
    }
    Ok(go(post.htmx, "/rooms?closed=1"))
}

/// Deletes the room in Discord and records it at once (the gateway will see the
/// deletion too; a second `room.deleted` changes nothing).
pub async fn close_room(
    app: &App,
    id: Id<ChannelMarker>,
    role: Option<Id<RoleMarker>>,
    fence: Option<&Fence>,
) -> Result<(), WebError> {
    app.discord.delete_room(Some(id), role).await?;
    app.bus
        .append(EventData::RoomDeleted { channel_id: id }, fence)
        .await?;
    Ok(())
}

/// `POST /rooms/{id}/move`: move me from another voice channel of the guild into the
/// room (Discord cannot pull someone into voice who is not in voice).
pub async fn move_in(
    axum::extract::State(app): axum::extract::State<AppState>,
    RoomId(id): RoomId,
    post: Posted<NoFields>,
) -> Result<Response, WebError> {
    let snapshot = app.bus.snapshot().await?;
    visible_room(&snapshot, id, post.seer())?;
    let me = post.who.user.person.id;
    // Discord lets a bot with Move Members move anyone anywhere; Coven moves people only
    // where Discord would let them go by themselves.
    if !snapshot.access.can_join(post.seer(), id) {
        return Err(WebError::Forbidden(
            "Discord does not let you join this room, so Coven will not move you into it. \
             Ask someone in the room for an invite link."
                .to_owned(),
        ));
    }
    match snapshot.voice.get(&me) {
        Some(v) if v.channel_id == id => {}
        Some(_) if snapshot.is_full(id) => {
            return Err(WebError::Conflict("This room is full.".to_owned()));
        }
        Some(_) => app.discord.move_member(me, id).await?,
        None => {
            return Err(WebError::Conflict(
                "You are not in a voice channel, and Discord only lets Coven move people who are. \
                 Join the room from Discord (\"Open in Discord\") instead."
                    .to_owned(),
            ));
        }
    }
    Ok(go(post.htmx, &format!("/rooms/{id}")))
}

/// `POST /rooms/{id}/invite`: a fresh invite link; every older link of the room stops
/// working. HTMX gets the link itself; a plain form goes back to the page, which shows
/// the fresh one.
pub async fn new_invite(
    axum::extract::State(app): axum::extract::State<AppState>,
    RoomId(id): RoomId,
    post: Posted<NoFields>,
) -> Result<Response, WebError> {
    let mut snapshot = app.bus.snapshot().await?;
    let room = visible_room(&snapshot, id, post.seer())?;
    let generation = room.invite_gen.saturating_add(1);
    if invites::offer(&app, &snapshot, id, post.seer())?.is_none() {
        return Err(WebError::Forbidden(
            "Only the creator of a room Coven made, and the people holding its role, can hand \
             out invites."
                .to_owned(),
        ));
    }
    let renewed = app
        .bus
        .append(
            EventData::InviteRenewed {
                channel_id: id,
                generation,
            },
            None,
        )
        .await?;
    snapshot.apply(&renewed);
    let Some(link) = invites::offer(&app, &snapshot, id, post.seer())? else {
        return Err(super::rooms::no_such_room());
    };
    if post.htmx {
        return Ok(link.into_response());
    }
    Ok(Redirect::to(&format!("/rooms/{id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_defaulted() {
        let n = room_name("  ", "ash").unwrap_or_default();
        assert!(n.starts_with("ash's Game #"), "{n}");
        assert_eq!(n.len(), "ash's Game #".len() + 4);
        assert_eq!(
            room_name(" Draft pod ", "ash").ok().as_deref(),
            Some("Draft pod")
        );
        assert!(room_name("a\nb", "ash").is_err());
        assert!(room_name(&"x".repeat(101), "ash").is_err());
        assert!(
            room_name(&"é".repeat(100), "ash").is_ok(),
            "characters, not bytes"
        );
        let long = "u".repeat(99);
        assert!(room_name("", &long).is_ok_and(|n| n.chars().count() <= 100));
    }
}
