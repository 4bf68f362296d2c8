//! A stream's place among the hub's frames: what every stream does alike (keep-alives,
//! the shutdown drain, cut-offs, catching up from the replica's recent frames after a
//! burst) is done here; events go to the caller.
//!
//! Owns a stream's reading of the ring. Must not filter events (that is the sight's).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use tokio::sync::broadcast::{self, error::RecvError};

use super::frame::{EventFrame, Frame, KEEPALIVE};
use super::hub::Hub;
use crate::event::EventId;
use twilight_model::id::Id;
use twilight_model::id::marker::UserMarker;

/// Counts a stream as connected for as long as it lives (on the hub's gauge, looked up
/// once per replica, not per stream).
pub struct Connected(metrics::Gauge);

impl Connected {
    pub fn new(streams: &metrics::Gauge) -> Self {
        streams.increment(1.0);
        Connected(streams.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A stream's place among the hub's frames: the live ring, and the replica's recent
/// frames once it fell behind. What every stream does alike is done here (keep-alives,
/// the shutdown drain, cut-offs, catching up after a burst); events go to the caller.
pub struct Feed {
    hub: Hub,
    live: broadcast::Receiver<Frame>,
    /// Frames to go out before the live ones (a catch-up, or what passed while the
    /// stream was opening).
    pending: VecDeque<Frame>,
    /// This stream's place in the shutdown drain (of 1000).
    rank: u32,
}

/// What a stream is handed next.
pub enum Next {
    Event(Arc<EventFrame>),
    /// To send as it is: a keep-alive, or this replica's notice in the stream's format.
    Send(Bytes),
    /// A login ended: the stream ends if it is that login's.
    LoggedOut(Id<UserMarker>, Arc<str>),
    End,
}

impl Feed {
    pub fn new(hub: &Hub, live: broadcast::Receiver<Frame>, pending: VecDeque<Frame>) -> Self {
        Feed {
            hub: hub.clone(),
            live,
            pending,
            rank: rand::random_range(0..1000),
        }
    }

    /// The next event or bytes for a stream whose newest event is `last`; `html` picks
    /// the pages' form of notices.
    pub async fn next(&mut self, last: Option<EventId>, html: bool) -> Next {
        loop {
            let next = match self.pending.pop_front() {
                Some(frame) => Ok(frame),
                None => self.live.recv().await,
            };
            match next {
                Ok(Frame::Event(event)) => return Next::Event(event),
                Ok(Frame::KeepAlive) => return Next::Send(Bytes::from_static(KEEPALIVE)),
                Ok(Frame::Notice(json, page)) => {
                    if let Some(bytes) = if html { page } else { Some(json) } {
                        return Next::Send(bytes);
                    }
                }
                Ok(Frame::Drain(level)) => {
                    if self.rank < level {
                        return Next::End;
                    }
                }
                Ok(Frame::LoggedOut(user, login)) => return Next::LoggedOut(user, login),
                Ok(Frame::Cut) | Err(RecvError::Closed) => return Next::End,
                // A burst: catch up from the replica's recent frames (the live receiver
                // has moved on to the oldest it still holds; the caller drops the overlap
                // by id). Only a stream more than STREAM_MAX_BEHIND bytes behind is cut,
                // and its reconnect replays from the log.
                Err(RecvError::Lagged(missed)) => match self.hub.catch_up_from(last) {
                    Some(frames) => {
                        metrics::counter!("coven_web_stream_catch_ups_total").increment(1);
                        self.pending = frames;
                    }
                    None => {
                        tracing::info!(missed, "stream fell too far behind; cutting it off");
                        metrics::counter!("coven_web_streams_cut_off_total").increment(1);
                        return Next::End;
                    }
                },
            }
        }
    }
}

/// What a stream sends for one event: announcements first (a change of what its viewer
/// may see, where they are), then the event's shared bytes; `end` closes the stream after
/// them. Built per event without allocating unless there is something to announce.
#[derive(Default)]
pub struct Step {
    pub before: Vec<Bytes>,
    pub frame: Option<Bytes>,
    pub end: bool,
}

impl Step {
    pub fn end() -> Self {
        Step {
            end: true,
            ..Step::default()
        }
    }
}

/// What a stream does with each event the feed hands it: the JSON and the pages' streams.
pub trait Taker: Send {
    /// Whether notices go out in the pages' form.
    const HTML: bool;

    /// The newest event the stream has: the feed's overlap before it is dropped by id.
    fn last(&self) -> Option<EventId>;

    /// What the stream sends for `event`.
    fn take(&mut self, event: &EventFrame) -> impl Future<Output = Step> + Send;

    /// Whether the stream is the login `login` of `user` (which just ended).
    fn is_login(&self, user: Id<UserMarker>, login: &str) -> bool;
}

/// A stream once live: the feed's frames through `taker`, until either ends it.
pub fn live<T: Taker>(
    mut feed: Feed,
    mut taker: T,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    async_stream::stream! {
        loop {
            let step = match feed.next(taker.last(), T::HTML).await {
                Next::Event(event) => taker.take(&event).await,
                Next::Send(bytes) => {
                    yield bytes;
                    continue;
                }
                Next::LoggedOut(user, login) => {
                    if taker.is_login(user, &login) {
                        break;
                    }
                    continue;
                }
                Next::End => break,
            };
            for bytes in step.before {
                yield bytes;
            }
            if let Some(bytes) = step.frame {
                yield bytes;
            }
            if step.end {
                break;
            }
        }
    }
}
