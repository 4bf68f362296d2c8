//! `GET /api/stream[?room=<channel id>][&last_event_id=<id>]`: the events as JSON
//! envelopes, resumable by event id.
//!
//! Opening follows the hub's flow (subscribe, sight, replay, live); what the stream does
//! per event is `JsonStream::take`, a plain function. Owns the JSON stream. Must not
//! render pages or change shared state (a room page's stream does count its viewer,
//! through [`super::presence`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::Response;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};

use futures_util::StreamExt;

use super::communities;
use super::feed::{self, Connected, Feed, Step, Taker};
use super::frame::{EventFrame, RETRY, event_stream, view_bytes};
use super::hub::Hub;
use super::query::{self, LastEventId, StreamQuery};
use super::replay::{self, LogReplay, Start};
use super::sight::{Obey, Sight, sight_of, view_changes};
use crate::bus::Backend;
use crate::event::EventId;
use crate::web::AppState;
use crate::web::guard::StreamUser;
use crate::web::http::error::WebError;

/// A JSON stream once open: its sight and where it is.
struct JsonStream {
    hub: Hub,
    guild: Id<GuildMarker>,
    sight: Sight,
    /// The newest event sent (or skipped as not shown).
    last: Option<EventId>,
    delivered: metrics::Counter,
}

impl Taker for JsonStream {
    const HTML: bool = false;

    fn is_login(&self, user: Id<UserMarker>, login: &str) -> bool {
        self.sight.is_login(user, login)
    }

    fn last(&self) -> Option<EventId> {
        self.last
    }

    async fn take(&mut self, event: &EventFrame) -> Step {
        let mut step = Step::default();
        // Control is acted on even for an event the replay already sent (when newer than
        // the sight): it reads the hub's newest state, so acting twice changes nothing.
        match self.sight.obey(event) {
            Obey::End => return Step::end(),
            Obey::Refresh => {
                let (appeared, gone) = self.sight.refresh(&self.hub.access());
                if !appeared.is_empty() || !gone.is_empty() {
                    // The stream reconnects and renders afresh when the snapshot cannot
                    // be read.
                    let Some(snapshot) = self.hub.snapshot_since(event.id).await else {
                        return Step::end();
                    };
                    step.before = view_changes(&snapshot, &self.sight, &appeared, &gone)
                        .iter()
                        .filter_map(|data| view_bytes(event.id, self.guild, data))
                        .collect();
                    // A room page whose room the viewer may no longer see: told (above),
                    // and no longer counted as viewing it.
                    if self.sight.room.is_some_and(|room| gone.contains(&room)) {
                        step.end = true;
                        return step;
                    }
                }
            }
            Obey::Nothing => {}
        }
        if self.last.is_some_and(|last| event.id <= last) {
            return step;
        }
        self.last = Some(event.id);
        if self.sight.shows(event.audience) {
            self.delivered.increment(1);
            step.frame = Some(event.bytes.clone());
        }
        step
    }
}

/// A room page's stream: the room must exist and be this person's to see, or no viewer
/// is recorded. Asked of the hub's state (a change after it arrives as a frame); only a
/// room the hub has not reached yet, made a moment ago, is looked up in Redis.
async fn may_view(
    hub: &Hub,
    bus: &dyn Backend,
    sight: &Sight,
    room: Id<ChannelMarker>,
) -> Result<bool, WebError> {
    let known = hub.lock_state().rooms.contains_key(&room);
    if known {
        return Ok(sight.visible.contains(&room));
    }
    let snapshot = bus.snapshot().await?;
    Ok(snapshot.rooms.contains_key(&room) && snapshot.access.can_see(sight.principal(), room))
}

/// `GET /api/stream`.
pub async fn stream(
    State(app): State<AppState>,
    // Logged in; membership and roles are read once below, after subscribing (the
    // watcher rechecks stream holders, so opening a stream asks Discord nothing).
    StreamUser(who): StreamUser,
    last_event_id: LastEventId,
    Query(q): Query<StreamQuery>,
) -> Result<Response, WebError> {
    let after = query::last_id(&last_event_id, q.last_event_id.as_deref())?;
    let room = query::room(q.room.as_deref())?;
    let (guild, community) = communities::for_stream(&app, q.guild.as_deref(), &who).await?;
    let hub = community.hub.clone();
    let bus: Arc<dyn Backend> = guild.bus.clone();
    // Subscribe before replaying: whatever lands meanwhile is in one or the other, and
    // ids tell which was seen. Roles and permissions are read after subscribing, so a
    // change in between arrives as a frame.
    let (live, as_of) = hub.subscribe();
    let sight = sight_of(
        &hub,
        app.communities.sessions(),
        bus.as_ref(),
        &who,
        room,
        as_of,
    )
    .await?;
    if let Some(room) = room
        && !may_view(&hub, bus.as_ref(), &sight, room).await?
    {
        return Err(WebError::no_such_room());
    }
    let max = app.settings.stream_max_per_user;
    let held = app
        .holders
        .hold(guild.id, &who, max)
        .ok_or(WebError::TooManyStreams { max })?;
    let viewing = room.map(|room| community.presence.enter(room, who.viewer()));
    let mut stream = JsonStream {
        hub: hub.clone(),
        guild: guild.id,
        sight,
        last: after,
        delivered: hub.delivered.clone(),
    };
    // Counted from now, not from the body's first poll: the head may reach the client
    // before the body is polled, and a stream whose head was sent is open.
    let connected = Connected::new(&hub.streams);
    let frames = async_stream::stream! {
        let _alive = (held, viewing, connected, community);
        yield Bytes::from_static(RETRY);
        let start = match after {
            Some(after) => match replay::start(bus.as_ref(), &hub, after).await {
                Ok(start) => Some(start),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check a stream's last id; it will reconnect");
                    return;
                }
            },
            None => None,
        };
        if let Some(mut log) = start.as_ref().and_then(LogReplay::of) {
            while let Some(page) = log.next_page(bus.as_ref(), &stream.sight).await {
                match page {
                    Ok(frames) => for bytes in frames { yield bytes },
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot replay a stream; it will reconnect");
                        return;
                    }
                }
            }
            stream.last = Some(log.cursor());
        }
        let pending = match start {
            Some(Start::Memory(frames)) => frames,
            _ => Default::default(),
        };
        let live = feed::live(Feed::new(&hub, live, pending), stream);
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

    use axum::body::Bytes;
    use twilight_model::id::Id;

    use super::*;
    use crate::bus::Bus;
    use crate::bus::memory::MemoryBus;
    use crate::event::{Audience, EventData};
    use crate::web::live::frame::Control;
    use crate::web::live::hub::testing;

    fn frame(ms: u64, audience: Audience, control: Option<Control>) -> EventFrame {
        EventFrame {
            id: EventId { ms, seq: 0 },
            audience,
            bytes: Bytes::from(format!("id: {ms}-0\n\n")),
            control,
            html: None,
            rendered: false,
            subject: None,
        }
    }

    async fn stream_of(user: u64) -> (JsonStream, EventId) {
        let bus = Arc::new(MemoryBus::new(Id::new(1), 1000));
        let viewer = testing::user(user);
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
        let (_live, as_of) = hub.subscribe();
        let sight = sight_of(&hub, &hub.sessions, bus.as_ref(), &viewer, None, as_of)
            .await
            .unwrap();
        let stream = JsonStream {
            delivered: hub.delivered.clone(),
            hub,
            guild: Id::new(1),
            sight,
            last: None,
        };
        (stream, as_of)
    }

    #[tokio::test]
    async fn a_stream_sends_each_event_it_may_show_once_and_obeys_only_newer_controls() {
        let (mut stream, as_of) = stream_of(7).await;
        let next = |n: u64| as_of.ms + n;

        let everyone = frame(next(1), Audience::Everyone, None);
        let step = stream.take(&everyone).await;
        assert_eq!(step.frame, Some(everyone.bytes.clone()));
        assert!(!step.end && step.before.is_empty());
        assert_eq!(stream.last, Some(everyone.id));

        // The overlap of a replay and the ring: sent once.
        assert_eq!(stream.take(&everyone).await.frame, None);

        // A room the viewer may not see: not sent, but passed.
        let hidden = frame(next(2), Audience::Channel(Id::new(999)), None);
        let step = stream.take(&hidden).await;
        assert_eq!(step.frame, None);
        assert_eq!(stream.last, Some(hidden.id));

        // Internal events never go to a browser.
        assert_eq!(
            stream
                .take(&frame(next(3), Audience::Internal, None))
                .await
                .frame,
            None
        );

        // A removal older than what the stream was opened with is history, not news.
        let old_removal = EventFrame {
            id: as_of,
            ..frame(0, Audience::Internal, Some(Control::Removed(Id::new(7))))
        };
        assert!(!stream.take(&old_removal).await.end);

        // Someone else's logout changes nothing; this login's ends the stream.
        let other = Control::LoggedOut(Id::new(8), "login-8".into());
        assert!(
            !stream
                .take(&frame(next(4), Audience::Internal, Some(other)))
                .await
                .end
        );
        let mine = Control::LoggedOut(Id::new(7), "login-7".into());
        let step = stream
            .take(&frame(next(5), Audience::Internal, Some(mine)))
            .await;
        assert!(step.end);
        assert_eq!(step.frame, None);
    }
}
