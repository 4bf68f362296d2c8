//! `GET /api/stream`: Server-Sent Events, resumable by event id.
//!
//! One [`Hub`] per replica reads the bus's live subscription and turns each event into
//! its SSE frame once; every client shares that frame (`Bytes` is reference counted), so
//! a client costs no JSON or formatting work per event. The hub's broadcast ring is each
//! client's bounded queue: a client that falls more than `STREAM_BUFFER` frames behind
//! is cut off, and its reconnect replays from its last id or resyncs. Keep-alives and
//! the shutdown drain travel through the same ring, so there is no timer per client.
//!
//! Owns the wire format and replay. Must not render pages or change shared state (a
//! stream for a room does count its viewer, through [`super::presence`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};
use twilight_model::id::Id;
use twilight_model::id::marker::ChannelMarker;

use super::AppState;
use super::auth::Member;
use super::error::WebError;
use crate::bus::{Backend, Since};
use crate::event::{Event, EventId};

/// Events fetched per round trip while replaying.
const REPLAY_PAGE: usize = 1000;
/// What browsers wait before reconnecting (ms); the drain spreads reconnects further.
const RETRY: &[u8] = b"retry: 2000\n\n";
const KEEPALIVE: &[u8] = b": keep-alive\n\n";
/// Steps of the shutdown drain: each closes another slice of the streams.
const DRAIN_STEPS: u32 = 20;

#[derive(Clone, Debug)]
enum Frame {
    Event {
        id: EventId,
        channel: Option<Id<ChannelMarker>>,
        bytes: Bytes,
    },
    KeepAlive,
    /// Streams whose rank is below this (of 1000) close now.
    Drain(u32),
    /// The hub lost events it cannot recover: every stream ends and reconnects.
    Cut,
}

/// The SSE frame of an event: `id:`, `event:` and the envelope as `data:`.
fn frame_bytes(event: &Event) -> Bytes {
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

fn resync_bytes(at: EventId) -> Bytes {
    Bytes::from(format!(
        "id: {at}\nevent: resync\ndata: {{\"at\":\"{at}\"}}\n\n"
    ))
}

/// The replica's fan-out point.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Frame>,
    bus: Arc<dyn Backend>,
    /// Looked up once: incremented per delivery.
    delivered: metrics::Counter,
}

impl Hub {
    /// Starts the fan-out task. It runs as long as the bus does: during a shutdown it
    /// keeps feeding the streams the drain has not closed yet.
    pub fn start(bus: Arc<dyn Backend>, buffer: usize, keepalive: Duration) -> Self {
        let tx = broadcast::channel(buffer.max(1)).0;
        let hub = Hub {
            tx,
            bus,
            delivered: metrics::counter!("coven_web_events_delivered_total"),
        };
        tokio::spawn(hub.clone().run(keepalive));
        hub
    }

    async fn run(self, keepalive: Duration) {
        let mut live = self.bus.subscribe();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        let mut last = EventId::ZERO;
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(event) => self.publish(&event, &mut last),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "stream hub fell behind the bus; catching up from the log");
                        self.catch_up(&mut last).await;
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    let _ = self.tx.send(Frame::KeepAlive);
                }
            }
        }
    }

    fn publish(&self, event: &Event, last: &mut EventId) {
        if event.id <= *last {
            return;
        }
        *last = event.id;
        let _ = self.tx.send(Frame::Event {
            id: event.id,
            channel: event.data.channel_id(),
            bytes: frame_bytes(event),
        });
    }

    async fn catch_up(&self, last: &mut EventId) {
        loop {
            match self.bus.since(*last, REPLAY_PAGE).await {
                Ok(Since::Events(events)) => {
                    let n = events.len();
                    for e in &events {
                        self.publish(e, last);
                    }
                    if n < REPLAY_PAGE {
                        return;
                    }
                }
                Ok(Since::Gap) | Err(_) => {
                    let _ = self.tx.send(Frame::Cut);
                    return;
                }
            }
        }
    }

    /// Closes every open stream, a slice at a time over `over`.
    pub async fn drain(&self, over: Duration) {
        let streams = self.tx.receiver_count();
        tracing::info!(streams, ?over, "draining streams");
        let step = over / DRAIN_STEPS;
        for i in 1..=DRAIN_STEPS {
            tokio::time::sleep(step).await;
            let _ = self.tx.send(Frame::Drain(i * 1000 / DRAIN_STEPS));
        }
    }

    pub fn streams(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    room: Option<String>,
    last_event_id: Option<String>,
}

/// Counts a stream as connected for as long as it lives.
struct Connected;

impl Connected {
    fn new() -> Self {
        metrics::gauge!("coven_web_streams").increment(1.0);
        Connected
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        metrics::gauge!("coven_web_streams").decrement(1.0);
    }
}

/// `GET /api/stream[?room=<channel id>][&last_event_id=<id>]`.
pub async fn stream(
    State(app): State<AppState>,
    Member(who): Member,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Response, WebError> {
    // The header (a browser reconnecting by itself) wins over the id the page was
    // rendered with: it is newer.
    let after = match headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .or(q.last_event_id.as_deref().filter(|v| !v.is_empty()))
    {
        Some(raw) => Some(raw.parse::<EventId>().map_err(|_| {
            WebError::BadRequest(format!("{raw:?} is not an event id (expected <ms>-<seq>)"))
        })?),
        None => None,
    };
    let room = match q.room.as_deref().filter(|v| !v.is_empty()) {
        Some(raw) => Some(
            raw.parse::<u64>()
                .ok()
                .and_then(Id::<ChannelMarker>::new_checked)
                .ok_or_else(|| WebError::BadRequest(format!("{raw:?} is not a room id")))?,
        ),
        None => None,
    };
    // Subscribe before replaying: whatever lands meanwhile is in one or the other, and
    // ids tell which was seen.
    let mut live = app.hub.tx.subscribe();
    let viewing = room.map(|room| app.presence.enter(room, who.user.viewer()));
    let bus = app.bus.clone();
    let delivered = app.hub.delivered.clone();
    let rank = rand::random_range(0..1000u32);
    let wants = move |channel: Option<Id<ChannelMarker>>| match (room, channel) {
        (Some(room), Some(channel)) => room == channel,
        _ => true,
    };
    let frames = async_stream::stream! {
        let _viewing = viewing;
        let _connected = Connected::new();
        yield Bytes::from_static(RETRY);
        let mut last = after;
        if let Some(mut cursor) = after {
            metrics::counter!("coven_web_replays_total").increment(1);
            loop {
                match bus.since(cursor, REPLAY_PAGE).await {
                    Ok(Since::Events(events)) => {
                        let n = events.len();
                        for e in events {
                            cursor = e.id;
                            if wants(e.data.channel_id()) {
                                yield frame_bytes(&e);
                            }
                        }
                        if n < REPLAY_PAGE {
                            break;
                        }
                    }
                    Ok(Since::Gap) => {
                        metrics::counter!("coven_web_resyncs_total").increment(1);
                        match bus.snapshot().await {
                            Ok(snapshot) => {
                                cursor = snapshot.at;
                                yield resync_bytes(snapshot.at);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot resync a stream");
                                return;
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot replay a stream; it will reconnect");
                        return;
                    }
                }
            }
            last = Some(cursor);
        }
        loop {
            match live.recv().await {
                Ok(Frame::Event { id, channel, bytes }) => {
                    if last.is_some_and(|l| id <= l) {
                        continue;
                    }
                    last = Some(id);
                    if wants(channel) {
                        delivered.increment(1);
                        yield bytes;
                    }
                }
                Ok(Frame::KeepAlive) => yield Bytes::from_static(KEEPALIVE),
                Ok(Frame::Drain(level)) => {
                    if rank < level {
                        break;
                    }
                }
                Ok(Frame::Cut) | Err(RecvError::Closed) => break,
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(missed, "stream fell behind its buffer; cutting it off");
                    metrics::counter!("coven_web_streams_cut_off_total").increment(1);
                    break;
                }
            }
        }
    };
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
    Ok(response)
}
