//! The wire format: what the hub hands its streams ([`Frame`]), an event as every stream
//! shares it ([`EventFrame`], built once per replica), the SSE bytes of events, resyncs
//! and view changes, and the response that carries them.
//!
//! Owns the bytes. Must not decide who gets them (that is [`super::sight`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker, UserMarker};

use super::fragments::Html;
use crate::event::{Audience, Event, EventData, EventId};

/// What browsers wait before reconnecting (ms); the drain spreads reconnects further.
pub const RETRY: &[u8] = b"retry: 2000\n\n";
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

#[derive(Clone, Debug)]
pub enum Frame {
    Event(Arc<EventFrame>),
    KeepAlive,
    /// This replica's own word to every stream (the gateway went quiet or came back), as
    /// JSON and as the pages' HTML.
    Notice(Bytes, Option<Bytes>),
    /// Streams whose rank is below this (of 1000) close now.
    Drain(u32),
    /// The hub lost events it cannot recover: every stream ends and reconnects.
    Cut,
    /// A login ended (heard on `P:control`, whatever guild): its streams end.
    LoggedOut(Id<UserMarker>, Arc<str>),
}

/// An event as the streams get it: built once by the hub, and shared (a stream's copy is
/// one reference count).
#[derive(Debug)]
pub struct EventFrame {
    pub id: EventId,
    pub audience: Audience,
    /// The SSE frame of `/api/stream`.
    pub bytes: Bytes,
    /// Set when the event changes who may see what, or ends someone's streams.
    pub control: Option<Control>,
    /// The pages' HTML for the event, rendered once; `None` when no page shows it.
    pub html: Option<Arc<Html>>,
    /// Whether `html` was rendered: it is only while pages' streams are open.
    pub rendered: bool,
    /// Whose voice state the event changes, and the channel they are in after it.
    pub subject: Option<(Id<UserMarker>, Option<Id<ChannelMarker>>)>,
}

/// What an event tells the streams themselves (never sent to a browser).
#[derive(Clone, Debug)]
pub enum Control {
    /// Guild roles or channel overwrites changed: the hub's access is newer.
    Access,
    /// A member's roles changed.
    Roles(Id<UserMarker>, Arc<[Id<RoleMarker>]>),
    /// A member left the guild: their streams end.
    Removed(Id<UserMarker>),
    /// A login ended: its streams end.
    LoggedOut(Id<UserMarker>, Arc<str>),
    /// The bot was removed from the guild: every stream of it ends.
    GuildGone,
}

impl Control {
    pub fn of(data: &EventData) -> Option<Self> {
        match data {
            EventData::GuildUpdated { .. } | EventData::ChannelAccess { .. } => {
                Some(Control::Access)
            }
            EventData::MemberUpdated { user_id, roles } => {
                Some(Control::Roles(*user_id, roles.as_slice().into()))
            }
            EventData::MemberRemoved { user_id } => Some(Control::Removed(*user_id)),
            EventData::SessionEnded { user_id, login } => {
                Some(Control::LoggedOut(*user_id, login.as_str().into()))
            }
            EventData::GuildRemoved { .. } => Some(Control::GuildGone),
            _ => None,
        }
    }
}

/// The SSE frame of an event: `id:`, `event:` and the envelope as `data:`.
pub fn frame_bytes(event: &Event) -> Bytes {
    let kind = event.kind().as_str();
    let mut out = String::with_capacity(event.json.len() + kind.len() + 48);
    out.push_str("id: ");
    out.push_str(&event.id.to_string());
    out.push_str("\nevent: ");
    out.push_str(kind);
    out.push_str("\ndata: ");
    // The envelope is compact JSON (no raw newlines), so it is one data line.
    out.push_str(&event.json);
    out.push_str("\n\n");
    Bytes::from(out)
}

pub fn resync_bytes(at: EventId) -> Bytes {
    Bytes::from(format!(
        "id: {at}\nevent: resync\ndata: {{\"at\":\"{at}\"}}\n\n"
    ))
}

/// One viewer's view of a change in what they may see: an event as if it had just
/// happened (a room appearing with the people in it, or a room going away), marked
/// `"view":true` and sent without an `id:` line, so it moves no one's place in the log.
pub fn view_bytes(at: EventId, guild: Id<GuildMarker>, data: &EventData) -> Option<Bytes> {
    let json = crate::event::envelope(at, data.kind(), guild, at.ms, &data.data_json().ok()?);
    let json = json.strip_suffix('}')?;
    Some(Bytes::from(format!(
        "event: {}\ndata: {json},\"view\":true}}\n\n",
        data.kind()
    )))
}

/// The bytes an event frame holds (its JSON and its HTML).
pub fn frame_size(frame: &Frame) -> usize {
    match frame {
        Frame::Event(e) => e.bytes.len() + e.html.as_ref().map_or(0, |h| h.size()),
        _ => 0,
    }
}

/// Whose voice state an event changes, and where they are after it.
pub fn subject(data: &EventData) -> Option<(Id<UserMarker>, Option<Id<ChannelMarker>>)> {
    match data {
        EventData::VoiceJoined {
            channel_id, user, ..
        } => Some((user.id, Some(*channel_id))),
        EventData::VoiceLeft { user_id, .. } => Some((*user_id, None)),
        _ => None,
    }
}

/// The response for a stream of SSE frames.
pub fn event_stream(frames: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Response {
    let mut response = Body::from_stream(futures_util::StreamExt::map(
        frames,
        Ok::<Bytes, Infallible>,
    ))
    .into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
