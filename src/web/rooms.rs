//! Making, entering and closing rooms from the web: `POST /rooms`,
//! `POST /rooms/{id}/close`, `POST /rooms/{id}/move`, `POST /rooms/{id}/invite`, and the
//! idle sweeper.
//!
//! Owns the rules for rooms (names, who may close, when an idle room closes). Changes
//! Discord only through [`crate::discord`] and records what it did through the bus; must
//! not render pages beyond redirects.

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

use super::auth::Member;
use super::error::WebError;
use super::{AppState, protect};
use crate::event::EventData;

/// The longest room name Discord accepts for a channel.
const MAX_NAME: usize = 100;

#[derive(Debug, Default, Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    csrf_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf_token: Option<String>,
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

fn form<T: Default>(form: Result<Form<T>, FormRejection>) -> Result<T, WebError> {
    match form {
        Ok(Form(f)) => Ok(f),
        // A bodiless post (a script sending only the X-CSRF-Token header) is an empty form.
        Err(FormRejection::InvalidFormContentType(_)) => Ok(T::default()),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(WebError::TooLarge),
        Err(e) => Err(WebError::BadRequest(format!(
            "The form could not be read: {e}"
        ))),
    }
}

fn room_id(raw: &str) -> Result<Id<ChannelMarker>, WebError> {
    raw.parse::<u64>()
        .ok()
        .and_then(Id::new_checked)
        .ok_or_else(|| WebError::NotFound("There is no such room.".to_owned()))
}

/// Where to go next: a 303 for a plain form, `HX-Redirect` for an HTMX post (HTMX would
/// otherwise follow the redirect itself and swap the page into the form).
fn go(headers: &HeaderMap, to: &str) -> Response {
    if headers.contains_key("hx-request") {
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
    State(app): State<AppState>,
    Member(who): Member,
    headers: HeaderMap,
    body: Result<Form<CreateForm>, FormRejection>,
) -> Result<Response, WebError> {
    let body = form(body)?;
    protect::check(&app, &who.user, &headers, body.csrf_token.as_deref())?;
    let name = room_name(&body.name, &who.user.person.username)?;
    let me = who.user.person.id;
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
    Ok(go(&headers, &format!("/rooms/{}", made.channel)))
}

/// `POST /rooms/{id}/close`: the creator closes the room. Closing a room that is already
/// gone is a success.
pub async fn close(
    State(app): State<AppState>,
    Member(who): Member,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<Form<TokenForm>, FormRejection>,
) -> Result<Response, WebError> {
    let body = form(body)?;
    protect::check(&app, &who.user, &headers, body.csrf_token.as_deref())?;
    let id = room_id(&raw)?;
    let snapshot = app.bus.snapshot().await?;
    let Some(room) = snapshot.rooms.get(&id) else {
        return Ok(go(&headers, "/rooms?closed=1"));
    };
    if room.creator_id != Some(who.user.person.id) {
        return Err(WebError::Forbidden(
            "Only the person who made this room can close it.".to_owned(),
        ));
    }
    close_room(&app, id, room.role_id, None).await?;
    tracing::info!(channel = %id, by = %who.user.person.id, "room closed");
    Ok(go(&headers, "/rooms?closed=1"))
}

/// Deletes the room in Discord and records it at once (the gateway will see the
/// deletion too; a second `room.deleted` changes nothing).
pub async fn close_room(
    app: &super::App,
    id: Id<ChannelMarker>,
    role: Option<Id<twilight_model::id::marker::RoleMarker>>,
    fence: Option<&crate::bus::Fence>,
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
    State(app): State<AppState>,
    Member(who): Member,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<Form<TokenForm>, FormRejection>,
) -> Result<Response, WebError> {
    let body = form(body)?;
    protect::check(&app, &who.user, &headers, body.csrf_token.as_deref())?;
    let id = room_id(&raw)?;
    let snapshot = app.bus.snapshot().await?;
    let Some(room) = snapshot.rooms.get(&id) else {
        return Err(WebError::NotFound("This room has been closed.".to_owned()));
    };
    let me = who.user.person.id;
    match snapshot.voice.get(&me) {
        Some(v) if v.channel_id == id => {}
        Some(_) => {
            let players = snapshot.members(id).count();
            if room.user_limit > 0 && players >= usize::from(room.user_limit) {
                return Err(WebError::Conflict("This room is full.".to_owned()));
            }
            app.discord.move_member(me, id).await?;
        }
        None => {
            return Err(WebError::Conflict(
                "You are not in a voice channel, and Discord only lets Coven move people who are. \
                 Join the room from Discord (\"Open in Discord\") instead."
                    .to_owned(),
            ));
        }
    }
    Ok(go(&headers, &format!("/rooms/{id}")))
}

/// Who may hand out invites to a room: its creator and the people in it.
pub fn may_invite(
    snapshot: &crate::bus::Snapshot,
    id: Id<ChannelMarker>,
    who: Id<twilight_model::id::marker::UserMarker>,
) -> bool {
    let Some(room) = snapshot.rooms.get(&id) else {
        return false;
    };
    room.role_id.is_some()
        && (room.creator_id == Some(who)
            || snapshot.voice.get(&who).is_some_and(|v| v.channel_id == id))
}

/// `POST /rooms/{id}/invite`: a fresh invite link (the old ones stay valid until they
/// expire). HTMX gets the link itself; a plain form goes back to the page, which shows
/// a fresh one.
pub async fn new_invite(
    State(app): State<AppState>,
    Member(who): Member,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<Form<TokenForm>, FormRejection>,
) -> Result<Response, WebError> {
    let body = form(body)?;
    protect::check(&app, &who.user, &headers, body.csrf_token.as_deref())?;
    let id = room_id(&raw)?;
    let snapshot = app.bus.snapshot().await?;
    let me = who.user.person.id;
    let Some(room) = snapshot.rooms.get(&id) else {
        return Err(WebError::NotFound("This room has been closed.".to_owned()));
    };
    let (Some(role), Some(creator)) = (room.role_id, room.creator_id) else {
        return Err(WebError::Forbidden(
            "This voice channel was not made by Coven, so it has no invite links.".to_owned(),
        ));
    };
    if !may_invite(&snapshot, id, me) {
        return Err(WebError::Forbidden(
            "Only the room's creator and the people in it can hand out invites.".to_owned(),
        ));
    }
    let link = super::invites::link(&app, &super::invites::sign(&app, id, role, creator)?);
    if headers.contains_key("hx-request") {
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
