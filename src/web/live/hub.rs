//! The hub: one per replica, between the bus and every open stream.
//!
//! Flow of an event: the bus's live subscription → `Hub::publish`, which under the
//! `state` lock applies it to the hub's state, renders its fragments once (while pages'
//! streams are open), builds its [`EventFrame`] once, keeps it in `recent` and sends it
//! on the broadcast ring every stream reads.
//!
//! Flow of a stream ([`super::json`], [`super::html`]):
//! 1. **subscribe** ([`Hub::subscribe`]): a receiver on the ring and the id of the newest
//!    event passed on, taken together under the `state` lock, so no frame falls between;
//! 2. **read its sight** ([`super::sight`]): the viewer's roles and what they may see,
//!    read after subscribing, so a change in between arrives as a frame;
//! 3. **replay** ([`super::replay`]): from the replica's recent frames, the log, or a
//!    resync, when the stream names where it was;
//! 4. **live** ([`super::feed`]): frames from the ring (or from `recent` after a burst),
//!    filtered by the sight, deduplicated by id.
//!
//! Lock order: see [`Hub`]. Owns fan-out and the replica's state of rooms, voice and
//! access. Must not render pages beyond the shared fragments, nor change shared state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::{GuildMarker, UserMarker};

use super::fragments;
use super::frame::{Control, EventFrame, Frame, frame_bytes, subject, view_bytes};
use super::recent::Recent;
use super::roles::RoleCache;
use crate::access::Access;
use crate::bus::{Backend, BusError, Since, Snapshot};
use crate::event::{Event, EventData, EventId};
use crate::web::session::SessionCache;

/// Events fetched per round trip while catching up from the log.
pub const REPLAY_PAGE: usize = 1000;
/// Steps of the shutdown drain: each closes another slice of the streams.
const DRAIN_STEPS: u32 = 20;

/// The replica's fan-out point. It also keeps who may see what (guild roles and channel
/// overwrites), updated by the events it passes on, so each stream can filter the shared
/// frames without asking Redis.
///
/// Locks (std mutexes, never held across an await), taken in this order only:
/// `access` is taken and released on its own; `state` may be held while `recent` is
/// taken (publishing does, so a frame is in `recent` before any stream that read `state`
/// can look for it); nothing takes `state` while holding `recent`.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Frame>,
    /// The newest frames, so a stream that fell behind the ring catches up from memory
    /// instead of being cut. Taken after `state` when both are needed.
    recent: Arc<Mutex<Recent>>,
    /// How far (in bytes of frames) a stream may fall behind before it is cut.
    max_behind: usize,
    bus: Arc<dyn Backend>,
    guild: Id<GuildMarker>,
    /// Who may see what as of the newest event passed on; swapped whole, so a stream
    /// clones the `Arc` and reads it without a lock.
    access: Arc<Mutex<Arc<Access>>>,
    /// Rooms and voice as of the newest event passed on: what the pages' fragments are
    /// rendered from. Events are applied, rendered and sent under this lock, so a stream
    /// that reads it knows which frames its state already covers.
    state: Arc<Mutex<Snapshot>>,
    /// Pages' streams open on this replica: fragments are rendered only while there are.
    html_streams: Arc<AtomicUsize>,
    /// The last snapshot read to show streams a change of visibility: one read serves
    /// every stream an event changes (a role edit can touch thousands), and only one is
    /// kept.
    view: Arc<tokio::sync::Mutex<Option<Arc<Snapshot>>>>,
    /// Looked up once: incremented per delivery (`guild_bucket` labelled).
    pub delivered: metrics::Counter,
    /// How old each event is when this replica passes it on (now − its append time):
    /// Discord-to-replica latency, per guild bucket.
    age: metrics::Histogram,
    /// Open streams (`coven_web_streams`), looked up once.
    pub streams: metrics::Gauge,
    /// Resumes (`coven_web_replays_total`) and those served from memory: per stream,
    /// so looked up once.
    pub replays: [metrics::Counter; 2],
    /// Sessions of stream openers; logouts and removals passing through drop theirs.
    pub sessions: Arc<SessionCache>,
    /// Roles of stream openers, kept up to date by the role events passing through.
    pub roles: Arc<RoleCache>,
}

impl Hub {
    /// Starts the fan-out task from the current snapshot's permissions. It runs as long
    /// as the bus does: during a shutdown it keeps feeding the streams the drain has not
    /// closed yet.
    pub async fn start(
        bus: Arc<dyn Backend>,
        sessions: Arc<SessionCache>,
        guild: Id<GuildMarker>,
        buffer: usize,
        max_behind: usize,
        keepalive: Duration,
        stop: CancellationToken,
    ) -> Result<Self, BusError> {
        // Subscribed before the snapshot is read: a permission change in between is
        // applied from the live events (those newer than the snapshot).
        let live = bus.subscribe().await?;
        let snapshot = bus.snapshot().await?;
        let tx = broadcast::channel(buffer.max(1)).0;
        let hub = Hub {
            tx,
            // Twice the bound: a stream just under it can still be served from memory.
            // Memory covers what comes after the snapshot the hub starts from, nothing
            // before it.
            recent: Arc::new(Mutex::new(Recent::starting_at(
                max_behind.saturating_mul(2),
                snapshot.at,
            ))),
            max_behind,
            bus,
            guild,
            access: Arc::new(Mutex::new(Arc::new(snapshot.access.clone()))),
            state: Arc::new(Mutex::new(snapshot)),
            html_streams: Arc::default(),
            view: Arc::default(),
            delivered: metrics::counter!("coven_web_events_delivered_total", "guild_bucket" => crate::prometheus::guild_bucket(guild)),
            age: metrics::histogram!("coven_web_event_age_seconds", "guild_bucket" => crate::prometheus::guild_bucket(guild)),
            streams: metrics::gauge!("coven_web_streams"),
            replays: [
                metrics::counter!("coven_web_replays_total"),
                metrics::counter!("coven_web_replays_from_memory_total"),
            ],
            sessions,
            roles: Arc::default(),
        };
        let at = hub.lock_state().at;
        tokio::spawn(hub.clone().run(live, at, keepalive, stop));
        Ok(hub)
    }

    /// A snapshot valid at `id` or later: the kept one when it is recent enough, else a
    /// fresh read (streams asking meanwhile wait for it rather than read again). `None`
    /// when Redis cannot be read.
    pub async fn snapshot_since(&self, id: EventId) -> Option<Arc<Snapshot>> {
        let mut kept = self.view.lock().await;
        if let Some(snapshot) = kept.as_ref().filter(|s| s.at >= id) {
            return Some(snapshot.clone());
        }
        match self.bus.snapshot().await {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                *kept = Some(snapshot.clone());
                Some(snapshot)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the snapshot to show a change of visibility");
                None
            }
        }
    }

    /// Subscribes a stream, with the id of the newest event passed on before it. What the
    /// stream reads afterwards (roles, access) is at least that new, so the controls of
    /// events up to that id are already in it: see [`super::sight::Sight::obey`].
    pub fn subscribe(&self) -> (broadcast::Receiver<Frame>, EventId) {
        // Under the state lock, which `publish` holds while it sends: no frame falls
        // between the id and the subscription.
        let state = self.lock_state();
        (self.tx.subscribe(), state.at)
    }

    /// The frames after `last` for a stream that reconnects, when `last` is an id this
    /// replica passed on and its recent frames reach back to it within the byte bound:
    /// a wave of reconnecting browsers then reads no pages of the log. (Whether the log
    /// still holds `last`, which decides `resync`, is the caller's to ask.)
    pub fn replay_from(&self, last: EventId) -> Option<VecDeque<Frame>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .passed_on(last)
            .then(|| recent.after(last, self.max_behind))
            .flatten()
    }

    pub fn lock_state(&self) -> MutexGuard<'_, Snapshot> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who may see what, as of the newest event the hub passed on.
    pub fn access(&self) -> Arc<Access> {
        self.access
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn run(
        self,
        live: broadcast::Receiver<Arc<Event>>,
        applied: EventId,
        keepalive: Duration,
        stop: CancellationToken,
    ) {
        use tokio_stream::StreamExt;
        use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
        use tokio_stream::wrappers::{BroadcastStream, IntervalStream};

        enum Input {
            Live(Result<Arc<Event>, BroadcastStreamRecvError>),
            Tick,
        }
        let ticks = IntervalStream::new(tokio::time::interval_at(
            tokio::time::Instant::now() + keepalive,
            keepalive,
        ));
        let mut inputs = BroadcastStream::new(live)
            .map(Input::Live)
            .merge(ticks.map(|_| Input::Tick));
        let mut last = EventId::ZERO;
        let mut applied = applied;
        loop {
            let input = tokio::select! {
                () = stop.cancelled() => return,
                input = inputs.next() => match input {
                    Some(input) => input,
                    None => return,
                },
            };
            match input {
                Input::Live(Ok(event)) => self.publish(&event, &mut last, &mut applied),
                Input::Live(Err(BroadcastStreamRecvError::Lagged(missed))) => {
                    tracing::warn!(
                        missed,
                        "stream hub fell behind the bus; catching up from the log"
                    );
                    self.catch_up(&mut last, &mut applied).await;
                }
                Input::Tick => {
                    let _ = self.tx.send(Frame::KeepAlive);
                }
            }
        }
    }

    fn publish(&self, event: &Event, last: &mut EventId, applied: &mut EventId) {
        if event.id <= *last {
            return;
        }
        *last = event.id;
        // This replica's part of the event's trace: one span for every stream it goes to.
        let span = event
            .trace
            .as_deref()
            .filter(|_| crate::telemetry::enabled())
            .map(|parent| {
                let span = tracing::info_span!(
                    "stream.write",
                    guild = %self.guild,
                    event = %event.id,
                    kind = %event.kind(),
                    streams = self.tx.receiver_count(),
                    trace_id = tracing::field::Empty,
                );
                crate::telemetry::continue_trace(&span, parent);
                span
            });
        let _span = span.as_ref().map(tracing::Span::enter);
        self.age
            .record(crate::event::now_ms().saturating_sub(event.ts) as f64 / 1000.0);
        let control = Control::of(&event.data);
        match &control {
            Some(Control::LoggedOut(user, login)) => self.sessions.revoke_login(*user, login),
            Some(Control::Removed(user)) => {
                self.sessions.revoke_user(*user);
                self.roles.changed(*user, None);
            }
            Some(Control::Roles(user, roles)) => self.roles.changed(*user, Some(roles.clone())),
            _ => {}
        }
        if matches!(control, Some(Control::Access)) && event.id > *applied {
            *applied = event.id;
            let mut access = self.access.lock().unwrap_or_else(|e| e.into_inner());
            let mut next = (**access).clone();
            next.apply(&event.data);
            *access = Arc::new(next);
        }
        let mut state = self.lock_state();
        let rendered = self.html_streams.load(Ordering::Acquire) > 0;
        // What the fragments need from before the event, only when they are rendered.
        let prior = rendered.then(|| fragments::Prior::of(&state, &event.data));
        if event.id > state.at {
            state.apply(event);
        }
        let html = prior
            .and_then(|prior| fragments::fragments(&state, event, &prior))
            .map(Arc::new);
        let frame = Frame::Event(Arc::new(EventFrame {
            id: event.id,
            audience: event.data.audience(),
            bytes: frame_bytes(event),
            control,
            html,
            rendered,
            subject: subject(&event.data),
        }));
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(frame.clone());
        let _ = self.tx.send(frame);
    }

    /// The frames after `last` for a stream that fell behind its buffer, if memory still
    /// holds all of them and they come to no more than `STREAM_MAX_BEHIND` bytes.
    pub fn catch_up_from(&self, last: Option<EventId>) -> Option<VecDeque<Frame>> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .after(last.unwrap_or(EventId::ZERO), self.max_behind)
    }

    async fn catch_up(&self, last: &mut EventId, applied: &mut EventId) {
        loop {
            match self.bus.since(*last, REPLAY_PAGE).await {
                Ok(Since::Events(events)) => {
                    let n = events.len();
                    for e in &events {
                        self.publish(e, last, applied);
                    }
                    if n < REPLAY_PAGE {
                        return;
                    }
                }
                Ok(Since::Gap) | Err(_) => {
                    // The pages' state missed events too: start it again from Redis
                    // (streams reconnect and render afresh meanwhile).
                    // Memory missed them as well: it covers only what comes after.
                    let restart = |at| {
                        self.recent
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .restart(at)
                    };
                    match self.bus.snapshot().await {
                        Ok(snapshot) => {
                            *self.access.lock().unwrap_or_else(|e| e.into_inner()) =
                                Arc::new(snapshot.access.clone());
                            *applied = snapshot.at;
                            *last = (*last).max(snapshot.at);
                            let at = snapshot.at;
                            let mut state = self.lock_state();
                            *state = snapshot;
                            restart(at);
                        }
                        Err(_) => restart(*last),
                    }
                    let _ = self.tx.send(Frame::Cut);
                    return;
                }
            }
        }
    }

    /// Ends the streams of `user`'s login `login` (heard on `P:control`).
    pub fn logged_out(&self, user: Id<UserMarker>, login: &str) {
        let _ = self.tx.send(Frame::LoggedOut(user, login.into()));
    }

    /// Sends every open stream an event of this replica's own (not from the log), built
    /// once.
    pub fn notice(&self, data: &EventData) {
        if let Some(bytes) = view_bytes(EventId::ZERO, self.guild, data) {
            let _ = self
                .tx
                .send(Frame::Notice(bytes, fragments::gateway_notice(data)));
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

    /// Counts a pages' stream for as long as the guard lives: counted before it
    /// subscribes, every frame it receives has its HTML rendered.
    pub fn count_pages_stream(&self) -> PagesStreamCount {
        self.html_streams.fetch_add(1, Ordering::AcqRel);
        PagesStreamCount(self.html_streams.clone())
    }
}

/// A pages' stream, counted while it lives: the hub renders HTML only while there is one.
pub struct PagesStreamCount(Arc<AtomicUsize>);

impl Drop for PagesStreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hubs for unit tests of what streams do: over a memory bus, on real frames.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use twilight_model::id::Id;

    use super::Hub;
    use crate::bus::memory::MemoryBus;
    use crate::event::{EventId, Person};
    use crate::web::session::{SessionCache, SessionUser, Store};

    pub async fn hub(bus: Arc<MemoryBus>) -> Hub {
        let sessions = SessionCache::new(Store::new(tower_sessions::MemoryStore::default()));
        Hub::start(
            bus,
            Arc::new(sessions),
            Id::new(1),
            64,
            1 << 20,
            Duration::from_secs(3600),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    /// Waits (with a deadline) until the hub has passed `id` on.
    pub async fn reached(hub: &Hub, id: EventId) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.lock_state().at < id {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hub never reached {id}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn user(id: u64) -> SessionUser {
        SessionUser {
            person: Person {
                id: Id::new(id),
                username: format!("u{id}"),
                global_name: None,
                avatar_url: None,
            },
            access_token: String::new(),
            refresh_token: None,
            expires_at: u64::MAX,
            csrf: String::new(),
            login: format!("login-{id}"),
            version: crate::web::session::SESSION_VERSION,
        }
    }
}
