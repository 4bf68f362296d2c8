//! What a stream asks for, parsed once at the edge into checked types: where it starts
//! (`Last-Event-ID` or `last_event_id`), the room of a room page's JSON stream, and the
//! room pages a pages' stream serves.
//!
//! Owns the streams' query strings. Must not look anything up.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Deserialize;
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

use crate::event::EventId;
use crate::web::http::error::WebError;

/// `GET /api/stream`'s query.
#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    /// The community (a guild id); optional when the deployment serves one.
    pub guild: Option<String>,
    pub room: Option<String>,
    pub last_event_id: Option<String>,
}

/// `GET /api/stream/html`'s query.
#[derive(Debug, Deserialize)]
pub struct HtmlStreamQuery {
    /// The community (a guild id); optional when the deployment serves one.
    pub guild: Option<String>,
    /// The rooms whose pages the browser has open, comma-separated.
    pub view: Option<String>,
    pub last_event_id: Option<String>,
}

/// The `Last-Event-ID` header a browser sends when it reconnects by itself, read from the
/// request without copying its headers.
pub struct LastEventId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(LastEventId(
            parts
                .headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ))
    }
}

/// Where a stream starts: after `Last-Event-ID` (a browser reconnecting by itself), which
/// wins over the id the page was rendered with (it is newer), or after `last_event_id`.
pub fn last_id(header: &LastEventId, query: Option<&str>) -> Result<Option<EventId>, WebError> {
    match header
        .0
        .as_deref()
        .filter(|v| !v.is_empty())
        .or(query.filter(|v| !v.is_empty()))
    {
        Some(raw) => Ok(Some(raw.parse::<EventId>().map_err(|_| {
            WebError::BadRequest(format!("{raw:?} is not an event id (expected <ms>-<seq>)"))
        })?)),
        None => Ok(None),
    }
}

/// `?room=`: the one room a room page's JSON stream shows.
pub fn room(raw: Option<&str>) -> Result<Option<Id<ChannelMarker>>, WebError> {
    match raw.filter(|v| !v.is_empty()) {
        Some(raw) => Ok(Some(room_id(raw)?)),
        None => Ok(None),
    }
}

fn room_id(raw: &str) -> Result<Id<ChannelMarker>, WebError> {
    crate::web::guard::parse_id(raw)
        .ok_or_else(|| WebError::BadRequest(format!("{raw:?} is not a room id")))
}

/// Room pages one pages' stream may serve (a browser's tabs share one stream).
pub const MAX_VIEWS: usize = 64;

pub fn parse_views(raw: Option<&str>) -> Result<Vec<Id<ChannelMarker>>, WebError> {
    let mut views = Vec::new();
    for part in raw.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let id = room_id(part)?;
        if !views.contains(&id) {
            views.push(id);
        }
    }
    if views.len() > MAX_VIEWS {
        return Err(WebError::BadRequest(format!(
            "a stream serves at most {MAX_VIEWS} room pages"
        )));
    }
    Ok(views)
}
