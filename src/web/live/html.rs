//! `GET /api/stream/html[?view=<room id>,...][&last_event_id=<id>]`: the pages' stream.
//!
//! The same events as `/api/stream`, as the HTML fragments the pages swap in (event
//! `rooms` for the rooms list, `room-<id>` for the pages of the rooms in `view`, `me` for
//! the viewer's own voice channel, `gateway` for the delay banner), each event closed by
//! an `at` event carrying its id. One stream serves all of a browser's tabs; the rooms in
//! `view` count it as viewing them.
//!
//! Opening follows the hub's flow (subscribe, sight, where the page is, live); where the
//! page is decided by `open` and what the stream does per event by
//! `PagesStream::take`, both plain functions. Owns the pages' stream. Must not change
//! shared state beyond counting viewers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::Response;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, UserMarker};

use futures_util::StreamExt;

use super::communities;
use super::feed::{self, Connected, Feed, Step, Taker};
use super::fragments;
use super::frame::{EventFrame, Frame, RETRY, event_stream};
use super::hub::Hub;
use super::presence::Viewing;
use super::query::{self, HtmlStreamQuery, LastEventId};
use super::sight::{Obey, Sight, sight_of};
use crate::bus::{Backend, BusError};
use crate::event::EventId;
use crate::web::AppState;
use crate::web::guard::StreamUser;
use crate::web::http::error::WebError;

/// How long a pages' stream waits for the hub to reach the id its page was rendered at.
const HUB_CATCH_UP: Duration = Duration::from_secs(2);

/// A pages' stream once open.
struct PagesStream {
    hub: Hub,
    sight: Sight,
    /// The room pages it serves.
    views: Vec<Id<ChannelMarker>>,
    /// Those it counts as viewing (existing and visible).
    viewing: Vec<(Id<ChannelMarker>, Viewing)>,
    /// The newest event the pages have.
    last: EventId,
    delivered: metrics::Counter,
}

impl Taker for PagesStream {
    const HTML: bool = true;

    fn is_login(&self, user: Id<UserMarker>, login: &str) -> bool {
        self.sight.is_login(user, login)
    }

    fn last(&self) -> Option<EventId> {
        Some(self.last)
    }

    async fn take(&mut self, event: &EventFrame) -> Step {
        self.take_now(event)
    }
}

impl PagesStream {
    /// What the stream sends for `event` (nothing it does waits).
    fn take_now(&mut self, event: &EventFrame) -> Step {
        let mut step = Step::default();
        match self.sight.obey(event) {
            Obey::End => return Step::end(),
            Obey::Refresh => {
                let (appeared, gone) = self.sight.refresh(&self.hub.access());
                if !appeared.is_empty() || !gone.is_empty() {
                    self.viewing.retain(|(room, _)| !gone.contains(room));
                    let changed: Vec<Id<ChannelMarker>> = self
                        .views
                        .iter()
                        .filter(|v| appeared.contains(v) || gone.contains(v))
                        .copied()
                        .collect();
                    let state = self.hub.lock_state();
                    self.last = self.last.max(state.at);
                    step.before.push(fragments::refresh(
                        &state,
                        self.sight.principal(),
                        &changed,
                        false,
                    ));
                }
            }
            Obey::Nothing => {}
        }
        if let Some((_, channel)) = event.subject.filter(|(user, _)| *user == self.sight.user) {
            step.before.push(fragments::whereabouts(channel));
        }
        if event.id <= self.last {
            return step;
        }
        self.last = event.id;
        if !event.rendered {
            // Sent before this stream was counted and after its state was read: cannot
            // happen (both are under the hub's state lock), but if it did, a page could
            // miss it; start again.
            step.end = true;
            return step;
        }
        if let Some(html) = event
            .html
            .as_ref()
            .filter(|_| self.sight.shows(event.audience))
        {
            self.delivered.increment(1);
            let viewing = &self.viewing;
            step.frame = Some(
                html.for_views(|room| viewing.iter().any(|(r, _)| *r == room))
                    .clone(),
            );
        }
        step
    }
}

/// Where a pages' stream starts, and what it sends before going live.
struct Opening {
    /// The newest event the pages have once `first` is sent.
    last: EventId,
    /// Frames to go out before the live ones.
    pending: VecDeque<Frame>,
    /// The pages whole (when they are not continued), or the stream's position.
    first: Bytes,
}

/// Where the pages are: exactly continued from the replica's recent frames when the
/// page's id is at or behind the hub's state and memory reaches back; sent whole
/// otherwise (the pages swap it in by id). A page ahead of the hub (rendered from Redis a
/// moment ago) is continued when the log holds its id (the hub catches up), and sent
/// whole when it is from another log.
async fn open(
    hub: &Hub,
    bus: &dyn Backend,
    sight: &Sight,
    views: &[Id<ChannelMarker>],
    after: Option<EventId>,
    early: VecDeque<Frame>,
) -> Result<Opening, BusError> {
    let whole = |hub: &Hub| {
        let state = hub.lock_state();
        (
            state.at,
            fragments::refresh(&state, sight.principal(), views, true),
        )
    };
    let at = hub.lock_state().at;
    let Some(after) = after else {
        let (last, first) = whole(hub);
        return Ok(whole_opening(last, first));
    };
    if after < at {
        // Behind: frames in memory replay exactly (announcements included), as long as
        // every one of them was rendered.
        return Ok(match hub.catch_up_from(Some(after)).filter(all_rendered) {
            Some(pending) => Opening {
                last: after,
                pending,
                first: fragments::position(after),
            },
            None => {
                let (last, first) = whole(hub);
                whole_opening(last, first)
            }
        });
    }
    if after > at && !bus.holds(after).await? {
        let (last, first) = whole(hub);
        return Ok(whole_opening(last, first));
    }
    Ok(Opening {
        last: after,
        pending: early,
        first: fragments::position(after),
    })
}

fn whole_opening(last: EventId, first: Bytes) -> Opening {
    Opening {
        last,
        pending: VecDeque::new(),
        first,
    }
}

/// Whether every event among `frames` has its HTML.
fn all_rendered(frames: &VecDeque<Frame>) -> bool {
    frames
        .iter()
        .all(|f| !matches!(f, Frame::Event(e) if !e.rendered))
}

/// `GET /api/stream/html`.
pub async fn html_stream(
    State(app): State<AppState>,
    StreamUser(who): StreamUser,
    last_event_id: LastEventId,
    Query(q): Query<HtmlStreamQuery>,
) -> Result<Response, WebError> {
    let after = query::last_id(&last_event_id, q.last_event_id.as_deref())?;
    let views = query::parse_views(q.view.as_deref())?;
    let (guild, community) = communities::for_stream(&app, q.guild.as_deref(), &who).await?;
    let hub = community.hub.clone();
    let bus: Arc<dyn Backend> = guild.bus.clone();
    // Counted before subscribing: every frame this stream receives is rendered.
    let counted = hub.count_pages_stream();
    let (mut live, as_of) = hub.subscribe();
    let mut sight = sight_of(
        &hub,
        app.communities.sessions(),
        bus.as_ref(),
        &who,
        None,
        as_of,
    )
    .await?;
    // A page rendered from Redis a moment ago can be ahead of this replica's hub (a room
    // just made): wait briefly for the hub to get there, so the rooms the page shows are
    // known here. The frames that pass meanwhile are kept for the stream.
    let mut early: VecDeque<Frame> = VecDeque::new();
    if let Some(after) = after {
        let deadline = tokio::time::Instant::now() + HUB_CATCH_UP;
        while hub.lock_state().at < after {
            match tokio::time::timeout_at(deadline, live.recv()).await {
                Ok(Ok(frame)) => early.push_back(frame),
                // Too far behind, closed, or past the deadline: the stream starts from
                // what the hub has (the pages get it whole if needed).
                _ => break,
            }
        }
        sight.refresh(&hub.access());
    }
    let max = app.settings.stream_max_per_user;
    let held = app
        .holders
        .hold(guild.id, &who, max)
        .ok_or(WebError::TooManyStreams { max })?;
    // Only rooms that exist and that the viewer may see count them as a viewer; the
    // others get their "gone" notice in the first refresh.
    let viewing: Vec<(Id<ChannelMarker>, Viewing)> = {
        let state = hub.lock_state();
        views
            .iter()
            .filter(|id| state.rooms.contains_key(id) && sight.visible.contains(id))
            .map(|id| (*id, community.presence.enter(*id, who.viewer())))
            .collect()
    };
    let banner = fragments::gateway_banner(app.upstream.of(guild.id).banner().as_deref());
    let mut stream = PagesStream {
        hub: hub.clone(),
        sight,
        views,
        viewing,
        last: EventId::ZERO,
        delivered: hub.delivered.clone(),
    };
    // Counted from now, not from the body's first poll: the head may reach the client
    // before the body is polled, and a stream whose head was sent is open.
    let connected = Connected::new(&hub.streams);
    let frames = async_stream::stream! {
        let _alive = (counted, held, connected, community);
        yield Bytes::from_static(RETRY);
        let opening = match open(&hub, bus.as_ref(), &stream.sight, &stream.views, after, early).await {
            Ok(opening) => opening,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a stream's last id; it will reconnect");
                return;
            }
        };
        stream.last = opening.last;
        // The pages whole carry their own id; otherwise where this connection starts, as
        // an id: a browser's `lastEventId` is empty on a new connection until one
        // arrives, and the pages tell what they already have by it.
        yield opening.first;
        yield {
            let state = hub.lock_state();
            fragments::whereabouts(state.voice.get(&stream.sight.user).map(|v| v.channel_id))
        };
        yield banner;
        let live = feed::live(Feed::new(&hub, live, opening.pending), stream);
        futures_util::pin_mut!(live);
        while let Some(bytes) = live.next().await {
            yield bytes;
        }
    };
    Ok(event_stream(frames))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use twilight_model::id::Id;

    use super::*;
    use crate::bus::Bus;
    use crate::bus::memory::MemoryBus;
    use crate::event::EventData;
    use crate::web::live::hub::testing;

    fn room(id: u64) -> EventData {
        EventData::RoomCreated {
            channel_id: Id::new(id),
            name: format!("Room {id}"),
            user_limit: 4,
            created_by: None,
            role_id: None,
        }
    }

    /// The pages sent whole (they carry the rooms list), rather than a position.
    fn whole(first: &Bytes) -> bool {
        String::from_utf8_lossy(first).contains("event: rooms")
    }

    fn ids(frames: &VecDeque<Frame>) -> Vec<EventId> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Event(e) => Some(e.id),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_page_is_continued_where_memory_reaches_and_sent_whole_where_it_cannot_be() {
        let bus = Arc::new(MemoryBus::new(Id::new(1), 1000));
        let viewer = testing::user(7);
        bus.append(
            EventData::MemberUpdated {
                user_id: viewer.person.id,
                roles: Vec::new(),
            },
            None,
        )
        .await
        .unwrap();
        let hub = testing::hub(bus.clone()).await;
        // Rendered from here on; the member event above was not.
        let _counted = hub.count_pages_stream();
        let a = bus.append(room(10), None).await.unwrap().id;
        let b = bus.append(room(11), None).await.unwrap().id;
        testing::reached(&hub, b).await;
        let (_live, as_of) = hub.subscribe();
        let sight = sight_of(&hub, &hub.sessions, bus.as_ref(), &viewer, None, as_of)
            .await
            .unwrap();
        let open =
            |after: Option<EventId>| open(&hub, bus.as_ref(), &sight, &[], after, VecDeque::new());

        // A new page: whole, at the hub's state.
        let o = open(None).await.unwrap();
        assert!(whole(&o.first));
        assert_eq!(o.last, b);

        // At the hub's state: continued from its id, nothing to replay.
        let o = open(Some(b)).await.unwrap();
        assert!(!whole(&o.first));
        assert_eq!(o.last, b);
        assert!(o.pending.is_empty());

        // Behind, within memory: continued exactly, the frames after its id replayed.
        let o = open(Some(a)).await.unwrap();
        assert!(!whole(&o.first));
        assert_eq!(o.last, a);
        assert_eq!(ids(&o.pending), vec![b]);

        // Behind, but memory holds a frame without its HTML: whole.
        let o = open(Some(EventId { ms: 1, seq: 0 })).await.unwrap();
        assert!(whole(&o.first));
        assert_eq!(o.last, b);

        // Ahead of the hub, and no log ever gave that id out: whole, from the hub's state.
        let o = open(Some(EventId {
            ms: b.ms + 1_000_000,
            seq: 0,
        }))
        .await
        .unwrap();
        assert!(whole(&o.first));
        assert_eq!(o.last, b);
    }
}
