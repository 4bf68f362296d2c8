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

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker, UserMarker};

use super::AppState;
use super::auth::StreamUser;
use super::error::WebError;
use super::live;
use crate::access::{Access, Seer};
use crate::bus::{Backend, Since, Snapshot};
use crate::event::{Audience, Event, EventData, EventId};

/// Events fetched per round trip while replaying.
const REPLAY_PAGE: usize = 1000;
/// What browsers wait before reconnecting (ms); the drain spreads reconnects further.
const RETRY: &[u8] = b"retry: 2000\n\n";
const KEEPALIVE: &[u8] = b": keep-alive\n\n";
/// Steps of the shutdown drain: each closes another slice of the streams.
const DRAIN_STEPS: u32 = 20;

#[derive(Clone, Debug)]
enum Frame {
    Event(Arc<EventFrame>),
    KeepAlive,
    /// This replica's own word to every stream (the gateway went quiet or came back), as
    /// JSON and as the pages' HTML.
    Notice(Bytes, Option<Bytes>),
    /// Streams whose rank is below this (of 1000) close now.
    Drain(u32),
    /// The hub lost events it cannot recover: every stream ends and reconnects.
    Cut,
}

/// An event as the streams get it: built once by the hub, and shared (a stream's copy is
/// one reference count).
#[derive(Debug)]
struct EventFrame {
    id: EventId,
    audience: Audience,
    /// The SSE frame of `/api/stream`.
    bytes: Bytes,
    /// Set when the event changes who may see what, or ends someone's streams.
    control: Option<Control>,
    /// The pages' HTML for the event, rendered once; `None` when no page shows it.
    html: Option<Arc<live::Html>>,
    /// Whether `html` was rendered: it is only while pages' streams are open.
    rendered: bool,
    /// Whose voice state the event changes, and the channel they are in after it.
    subject: Option<(Id<UserMarker>, Option<Id<ChannelMarker>>)>,
}

/// What an event tells the streams themselves (never sent to a browser).
#[derive(Clone, Debug)]
enum Control {
    /// Guild roles or channel overwrites changed: the hub's access is newer.
    Access,
    /// A member's roles changed.
    Roles(Id<UserMarker>, Arc<[Id<RoleMarker>]>),
    /// A member left the guild: their streams end.
    Removed(Id<UserMarker>),
    /// A login ended: its streams end.
    LoggedOut(Id<UserMarker>, Arc<str>),
}

impl Control {
    fn of(data: &EventData) -> Option<Self> {
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
            _ => None,
        }
    }
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

/// One viewer's view of a change in what they may see: an event as if it had just
/// happened (a room appearing with the people in it, or a room going away), marked
/// `"view":true` and sent without an `id:` line, so it moves no one's place in the log.
fn view_bytes(at: EventId, guild: Id<GuildMarker>, data: &EventData) -> Option<Bytes> {
    let json = crate::event::envelope(at, data.kind(), guild, at.ms, &data.data_json().ok()?);
    let json = json.strip_suffix('}')?;
    Some(Bytes::from(format!(
        "event: {}\ndata: {json},\"view\":true}}\n\n",
        data.kind()
    )))
}

/// The newest frames the hub sent, bounded in bytes (the frames are shared, not copied).
struct Recent {
    frames: VecDeque<Frame>,
    bytes: usize,
    cap: usize,
    /// The newest id dropped: memory covers everything after it.
    dropped: EventId,
}

impl Recent {
    fn new(cap: usize) -> Self {
        Recent {
            frames: VecDeque::new(),
            bytes: 0,
            cap,
            dropped: EventId::ZERO,
        }
    }

    fn push(&mut self, frame: Frame) {
        self.bytes += frame_size(&frame);
        self.frames.push_back(frame);
        while self.bytes > self.cap {
            let Some(frame) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= frame_size(&frame);
            if let Frame::Event(event) = frame {
                self.dropped = event.id;
            }
        }
    }

    /// Whether `id` is an event this replica passed on and still knows of: one it holds,
    /// or the newest it dropped.
    fn passed_on(&self, id: EventId) -> bool {
        (id == self.dropped && id != EventId::ZERO)
            || self
                .frames
                .binary_search_by(|f| match f {
                    Frame::Event(e) => e.id.cmp(&id),
                    _ => std::cmp::Ordering::Less,
                })
                .is_ok()
    }

    /// Every frame after `last`, when memory reaches back to it and they stay within
    /// `limit` bytes.
    fn after(&self, last: EventId, limit: usize) -> Option<VecDeque<Frame>> {
        if last < self.dropped {
            return None;
        }
        let start = self
            .frames
            .partition_point(|f| matches!(f, Frame::Event(e) if e.id <= last));
        let mut size = 0;
        let mut out = VecDeque::new();
        for frame in self.frames.range(start..) {
            size += frame_size(frame);
            if size > limit {
                return None;
            }
            out.push_back(frame.clone());
        }
        Some(out)
    }
}

/// The bytes an event frame holds (its JSON and its HTML).
fn frame_size(frame: &Frame) -> usize {
    match frame {
        Frame::Event(e) => e.bytes.len() + e.html.as_ref().map_or(0, |h| h.size()),
        _ => 0,
    }
}

/// Whose voice state an event changes, and where they are after it.
fn subject(data: &EventData) -> Option<(Id<UserMarker>, Option<Id<ChannelMarker>>)> {
    match data {
        EventData::VoiceJoined {
            channel_id, user, ..
        } => Some((user.id, Some(*channel_id))),
        EventData::VoiceLeft { user_id, .. } => Some((*user_id, None)),
        _ => None,
    }
}

/// How long a member's roles read from Redis serve stream openings on this replica.
const ROLES_TTL: Duration = Duration::from_secs(10);

/// Members' roles for opening streams, so a wave of reconnecting browsers reads each
/// person's roles from Redis once per `ROLES_TTL` rather than once per stream. The events
/// that change roles (`member.updated`, `member.removed`) pass through the hub, which
/// updates this as they do; a read that raced one is not kept.
type Roles = Arc<[Id<RoleMarker>]>;
type RoleEntries = std::collections::HashMap<Id<UserMarker>, (std::time::Instant, Roles)>;

#[derive(Default)]
struct RoleCache {
    entries: Mutex<RoleEntries>,
    /// Role events passed so far: a Redis read during which one passed may be older than
    /// it, and is used but not kept.
    changes: std::sync::atomic::AtomicU64,
}

impl RoleCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoleEntries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member's roles; `None` when they are not a member.
    async fn roles(
        &self,
        bus: &dyn Backend,
        user: Id<UserMarker>,
    ) -> Result<Option<Arc<[Id<RoleMarker>]>>, crate::bus::BusError> {
        let now = std::time::Instant::now();
        if let Some((at, roles)) = self.lock().get(&user)
            && now.duration_since(*at) < ROLES_TTL
        {
            return Ok(Some(roles.clone()));
        }
        let before = self.changes.load(Ordering::Acquire);
        let roles: Option<Arc<[Id<RoleMarker>]>> = bus.member(user).await?.map(|m| m.roles.into());
        let mut entries = self.lock();
        if self.changes.load(Ordering::Acquire) == before {
            match &roles {
                Some(roles) => {
                    if entries.len() >= 200_000 {
                        entries.retain(|_, (at, _)| now.duration_since(*at) < ROLES_TTL);
                    }
                    entries.insert(user, (now, roles.clone()));
                }
                None => {
                    entries.remove(&user);
                }
            }
        }
        Ok(roles)
    }

    /// A role event passed: what it says is the newest word.
    fn changed(&self, user: Id<UserMarker>, roles: Option<Arc<[Id<RoleMarker>]>>) {
        let mut entries = self.lock();
        self.changes.fetch_add(1, Ordering::AcqRel);
        match roles {
            Some(roles) => {
                entries.insert(user, (std::time::Instant::now(), roles));
            }
            None => {
                entries.remove(&user);
            }
        }
    }
}

/// The replica's fan-out point. It also keeps who may see what (guild roles and channel
/// overwrites), updated by the events it passes on, so each stream can filter the shared
/// frames without asking Redis.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Frame>,
    /// The newest frames, so a stream that fell behind the ring catches up from memory
    /// instead of being cut.
    recent: Arc<Mutex<Recent>>,
    /// How far (in bytes of frames) a stream may fall behind before it is cut.
    max_behind: usize,
    bus: Arc<dyn Backend>,
    guild: Id<GuildMarker>,
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
    /// Looked up once: incremented per delivery.
    delivered: metrics::Counter,
    /// Sessions of stream openers; logouts and removals passing through drop theirs.
    pub sessions: Arc<super::auth::SessionCache>,
    /// Roles of stream openers, kept up to date by the role events passing through.
    roles: Arc<RoleCache>,
}

impl Hub {
    /// Starts the fan-out task from the current snapshot's permissions. It runs as long
    /// as the bus does: during a shutdown it keeps feeding the streams the drain has not
    /// closed yet.
    pub async fn start(
        bus: Arc<dyn Backend>,
        guild: Id<GuildMarker>,
        buffer: usize,
        max_behind: usize,
        keepalive: Duration,
    ) -> Result<Self, crate::bus::BusError> {
        // Subscribed before the snapshot is read: a permission change in between is
        // applied from the live events (those newer than the snapshot).
        let live = bus.subscribe();
        let snapshot = bus.snapshot().await?;
        let tx = broadcast::channel(buffer.max(1)).0;
        let hub = Hub {
            tx,
            // Twice the bound: a stream just under it can still be served from memory.
            recent: Arc::new(Mutex::new(Recent::new(max_behind.saturating_mul(2)))),
            max_behind,
            bus,
            guild,
            access: Arc::new(Mutex::new(Arc::new(snapshot.access.clone()))),
            state: Arc::new(Mutex::new(snapshot)),
            html_streams: Arc::default(),
            view: Arc::default(),
            delivered: metrics::counter!("coven_web_events_delivered_total"),
            sessions: Arc::default(),
            roles: Arc::default(),
        };
        let at = hub.lock_state().at;
        tokio::spawn(hub.clone().run(live, at, keepalive));
        Ok(hub)
    }

    /// A snapshot valid at `id` or later: the kept one when it is recent enough, else a
    /// fresh read (streams asking meanwhile wait for it rather than read again). `None`
    /// when Redis cannot be read.
    async fn snapshot_since(&self, id: EventId) -> Option<Arc<Snapshot>> {
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
    /// events up to that id are already in it: see [`Sight::obey`].
    fn subscribe(&self) -> (broadcast::Receiver<Frame>, EventId) {
        // Under the state lock, which `publish` holds while it sends: no frame falls
        // between the id and the subscription.
        let state = self.lock_state();
        (self.tx.subscribe(), state.at)
    }

    /// The frames after `last` for a stream that reconnects, when `last` is an id this
    /// replica passed on and its recent frames reach back to it within the byte bound:
    /// a wave of reconnecting browsers then reads no pages of the log. (Whether the log
    /// still holds `last`, which decides `resync`, is the caller's to ask.)
    fn replay_from(&self, last: EventId) -> Option<VecDeque<Frame>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .passed_on(last)
            .then(|| recent.after(last, self.max_behind))
            .flatten()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, Snapshot> {
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
        while let Some(input) = inputs.next().await {
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
        let prior = rendered.then(|| live::Prior::of(&state, &event.data));
        if event.id > state.at {
            state.apply(event);
        }
        let html = prior
            .and_then(|prior| live::fragments(&state, event, &prior))
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
    fn catch_up_from(&self, last: Option<EventId>) -> Option<VecDeque<Frame>> {
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
                    if let Ok(snapshot) = self.bus.snapshot().await {
                        *self.access.lock().unwrap_or_else(|e| e.into_inner()) =
                            Arc::new(snapshot.access.clone());
                        *applied = snapshot.at;
                        *last = (*last).max(snapshot.at);
                        *self.lock_state() = snapshot;
                    }
                    let _ = self.tx.send(Frame::Cut);
                    return;
                }
            }
        }
    }

    /// Sends every open stream an event of this replica's own (not from the log), built
    /// once.
    pub fn notice(&self, data: &EventData) {
        if let Some(bytes) = view_bytes(EventId::ZERO, self.guild, data) {
            let _ = self
                .tx
                .send(Frame::Notice(bytes, live::gateway_notice(data)));
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

/// What one stream may show: recomputed only when permissions or its viewer's roles
/// change, so filtering a shared frame is one set lookup.
struct Sight {
    user: Id<UserMarker>,
    login: String,
    roles: Vec<Id<RoleMarker>>,
    /// `?room=`: only this room's events.
    room: Option<Id<ChannelMarker>>,
    visible: HashSet<Id<ChannelMarker>>,
    /// The newest event passed on when the stream subscribed: roles and access were read
    /// after it, so they already reflect every event up to it.
    as_of: EventId,
}

impl Sight {
    fn seer(&self) -> Seer<'_> {
        Seer {
            user: self.user,
            roles: &self.roles,
        }
    }

    /// Recomputes what is visible; returns the channels that appeared and those gone.
    fn refresh(&mut self, access: &Access) -> (Vec<Id<ChannelMarker>>, Vec<Id<ChannelMarker>>) {
        let now = access.visible(self.seer());
        let appeared = now.difference(&self.visible).copied().collect();
        let gone = self.visible.difference(&now).copied().collect();
        self.visible = now;
        (appeared, gone)
    }

    fn shows(&self, audience: Audience) -> bool {
        match audience {
            Audience::Everyone => true,
            Audience::Internal => false,
            Audience::Channel(c) => {
                self.visible.contains(&c) && self.room.is_none_or(|room| room == c)
            }
        }
    }
}

/// The events that show a viewer the rooms that just became visible to them (with the
/// people in them) and take away the rooms that no longer are.
fn view_changes(
    snapshot: &Snapshot,
    sight: &Sight,
    appeared: &[Id<ChannelMarker>],
    gone: &[Id<ChannelMarker>],
) -> Vec<EventData> {
    let wanted = |c: &Id<ChannelMarker>| sight.room.is_none_or(|room| room == *c);
    let mut out = Vec::new();
    for id in gone.iter().filter(|c| wanted(c)) {
        out.push(EventData::RoomDeleted { channel_id: *id });
    }
    for id in appeared.iter().filter(|c| wanted(c)) {
        let Some(room) = snapshot.rooms.get(id) else {
            continue;
        };
        out.push(EventData::RoomCreated {
            channel_id: *id,
            name: room.name.clone(),
            user_limit: room.user_limit,
            created_by: room.creator_id,
            role_id: room.role_id,
        });
        for v in snapshot.members(*id) {
            out.push(EventData::VoiceJoined {
                channel_id: *id,
                user: v.user.clone(),
                flags: v.flags,
            });
        }
        if !room.viewers.is_empty() {
            out.push(EventData::RoomViewers {
                channel_id: *id,
                viewers: room.viewers.clone(),
            });
        }
    }
    out
}

/// Where a stream starts: after `Last-Event-ID` (a browser reconnecting by itself), which
/// wins over the id the page was rendered with (it is newer), or after `last_event_id`.
fn last_id(headers: &HeaderMap, query: Option<&str>) -> Result<Option<EventId>, WebError> {
    match headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .or(query.filter(|v| !v.is_empty()))
    {
        Some(raw) => Ok(Some(raw.parse::<EventId>().map_err(|_| {
            WebError::BadRequest(format!("{raw:?} is not an event id (expected <ms>-<seq>)"))
        })?)),
        None => Ok(None),
    }
}

/// Counts a pages' stream for as long as it lives: the hub renders HTML only while
/// there is one.
struct HtmlStream(Arc<AtomicUsize>);

impl HtmlStream {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        HtmlStream(count.clone())
    }
}

impl Drop for HtmlStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a pages' stream waits for the hub to reach the id its page was rendered at.
const HUB_CATCH_UP: Duration = Duration::from_secs(2);

/// Room pages one pages' stream may serve (a browser's tabs share one stream).
const MAX_VIEWS: usize = 64;

#[derive(Debug, Deserialize)]
pub struct HtmlStreamQuery {
    /// The rooms whose pages the browser has open, comma-separated.
    view: Option<String>,
    last_event_id: Option<String>,
}

fn parse_views(raw: Option<&str>) -> Result<Vec<Id<ChannelMarker>>, WebError> {
    let mut views = Vec::new();
    for part in raw.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let id = part
            .parse::<u64>()
            .ok()
            .and_then(Id::<ChannelMarker>::new_checked)
            .ok_or_else(|| WebError::BadRequest(format!("{part:?} is not a room id")))?;
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

/// `GET /api/stream/html[?view=<room id>,...][&last_event_id=<id>]`: the pages' stream.
/// The same events as `/api/stream`, as the HTML fragments the pages swap in (event
/// `rooms` for the rooms list, `room-<id>` for the pages of the rooms in `view`, `me` for
/// the viewer's own voice channel, `gateway` for the delay banner), each event closed by
/// an `at` event carrying its id. One stream serves all of a browser's tabs; the rooms in
/// `view` count it as viewing them.
pub async fn html_stream(
    State(app): State<AppState>,
    StreamUser(who): StreamUser,
    headers: HeaderMap,
    Query(q): Query<HtmlStreamQuery>,
) -> Result<Response, WebError> {
    let after = last_id(&headers, q.last_event_id.as_deref())?;
    let views = parse_views(q.view.as_deref())?;
    let hub = app.hub.clone();
    // Counted before subscribing: every frame this stream receives is rendered.
    let counted = HtmlStream::new(&hub.html_streams);
    let (mut live, as_of) = hub.subscribe();
    let mut sight = sight_of(&app, &who, None, as_of).await?;
    let me = sight.user;
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
    let watch = app
        .watched
        .watch(me, max)
        .ok_or(WebError::TooManyStreams { max })?;
    // Only rooms that exist and that the viewer may see count them as a viewer; the
    // others get their "gone" notice in the first refresh.
    let mut viewing: Vec<(Id<ChannelMarker>, super::presence::Viewing)> = {
        let state = hub.lock_state();
        views
            .iter()
            .filter(|id| state.rooms.contains_key(id) && sight.visible.contains(id))
            .map(|id| (*id, app.presence.enter(*id, who.viewer())))
            .collect()
    };
    let bus = app.bus.clone();
    let delivered = hub.delivered.clone();
    let banner = live::gateway_banner(app.upstream.current().banner().as_deref());
    let frames = async_stream::stream! {
        let _counted = counted;
        let _watch = watch;
        let _connected = Connected::new();
        yield Bytes::from_static(RETRY);
        // Where the page's state is: exactly continued from the replica's recent frames
        // when they reach back, else rendered whole (the pages swap it in by id).
        let (start, opening, ahead, whereabouts) = {
            let state = hub.lock_state();
            let whereabouts = live::whereabouts(state.voice.get(&me).map(|v| v.channel_id));
            match after {
                Some(after) if after >= state.at => (after, None, after > state.at, whereabouts),
                _ => (state.at, Some(live::refresh(&state, sight.seer(), &views, true)), false, whereabouts),
            }
        };
        let mut last = start;
        let mut pending: VecDeque<Frame> = early;
        // Whether the pages were sent whole (which carries its own id).
        let mut whole_sent = false;
        match (after, opening) {
            (_, Some(whole)) => {
                // Frames in memory replay exactly (announcements included); only when
                // they do not reach back is the state sent whole.
                match after.and_then(|a| hub.catch_up_from(Some(a)).filter(all_rendered).map(|f| (a, f))) {
                    Some((a, frames)) => {
                        last = a;
                        pending = frames;
                    }
                    None => {
                        whole_sent = true;
                        yield whole;
                    }
                }
            }
            (Some(after), None) if ahead => {
                // Ahead of this replica's state: from a page rendered a moment ago (the
                // state catches up) or from another log (then it must start afresh).
                let held = match bus.holds(after).await {
                    Ok(held) => held,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check a stream's last id; it will reconnect");
                        return;
                    }
                };
                if !held {
                    let whole = {
                        let state = hub.lock_state();
                        last = state.at;
                        live::refresh(&state, sight.seer(), &views, true)
                    };
                    whole_sent = true;
                    yield whole;
                }
            }
            _ => {}
        }
        // Where this connection starts, as an id: a browser's `lastEventId` is empty on a
        // new connection until one arrives, and the pages tell what they already have by
        // it (a message belongs to the event after it).
        if !whole_sent {
            yield live::position(last);
        }
        yield whereabouts;
        yield banner;
        let mut feed = Feed::new(&hub, live, pending);
        loop {
            let event = match feed.next(Some(last), true).await {
                Next::Event(event) => event,
                Next::Send(bytes) => {
                    yield bytes;
                    continue;
                }
                Next::End => break,
            };
            match sight.obey(&event) {
                Obey::End => break,
                Obey::Refresh => {
                    let (appeared, gone) = sight.refresh(&hub.access());
                    if !appeared.is_empty() || !gone.is_empty() {
                        viewing.retain(|(room, _)| !gone.contains(room));
                        let changed: Vec<Id<ChannelMarker>> = views
                            .iter()
                            .filter(|v| appeared.contains(v) || gone.contains(v))
                            .copied()
                            .collect();
                        let whole = {
                            let state = hub.lock_state();
                            last = last.max(state.at);
                            live::refresh(&state, sight.seer(), &changed, false)
                        };
                        yield whole;
                    }
                }
                Obey::Nothing => {}
            }
            if let Some((_, channel)) = event.subject.filter(|(user, _)| *user == sight.user) {
                yield live::whereabouts(channel);
            }
            if event.id <= last {
                continue;
            }
            last = event.id;
            if !event.rendered {
                // Sent before this stream was counted and after its state was read:
                // cannot happen (both are under the hub's state lock), but if it did, a
                // page could miss it; start again.
                break;
            }
            if let Some(html) = event.html.as_ref().filter(|_| sight.shows(event.audience)) {
                delivered.increment(1);
                yield html.for_views(|room| viewing.iter().any(|(r, _)| *r == room)).clone();
            }
        }
    };
    Ok(event_stream(frames))
}

/// Whether every event among `frames` has its HTML.
fn all_rendered(frames: &VecDeque<Frame>) -> bool {
    frames
        .iter()
        .all(|f| !matches!(f, Frame::Event(e) if !e.rendered))
}

/// The response for a stream of SSE frames.
fn event_stream(frames: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Response {
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

/// A stream's place among the hub's frames: the live ring, and the replica's recent
/// frames once it fell behind. What every stream does alike is done here (keep-alives,
/// the shutdown drain, cut-offs, catching up after a burst); events go to the caller.
struct Feed {
    hub: Hub,
    live: broadcast::Receiver<Frame>,
    /// Frames to go out before the live ones (a catch-up, or what passed while the
    /// stream was opening).
    pending: VecDeque<Frame>,
    /// This stream's place in the shutdown drain (of 1000).
    rank: u32,
}

/// What a stream is handed next.
enum Next {
    Event(Arc<EventFrame>),
    /// To send as it is: a keep-alive, or this replica's notice in the stream's format.
    Send(Bytes),
    End,
}

impl Feed {
    fn new(hub: &Hub, live: broadcast::Receiver<Frame>, pending: VecDeque<Frame>) -> Self {
        Feed {
            hub: hub.clone(),
            live,
            pending,
            rank: rand::random_range(0..1000),
        }
    }

    /// The next event or bytes for a stream whose newest event is `last`; `html` picks
    /// the pages' form of notices.
    async fn next(&mut self, last: Option<EventId>, html: bool) -> Next {
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

/// What a stream does about an event's control part.
enum Obey {
    /// Its login ended, or its viewer left the guild.
    End,
    /// What the viewer may see may have changed.
    Refresh,
    Nothing,
}

impl Sight {
    /// What to do about `event`'s control part. Only events newer than what the sight
    /// was read from count: replayed from memory, an older "removed" would end the
    /// stream of someone who has since come back (and end it again on every
    /// reconnect), an older role change would take their newer roles away.
    fn obey(&mut self, event: &EventFrame) -> Obey {
        if event.id <= self.as_of {
            return Obey::Nothing;
        }
        match event.control.as_ref() {
            Some(Control::Removed(user)) if *user == self.user => {
                tracing::info!(%user, "member removed; ending their stream");
                Obey::End
            }
            Some(Control::LoggedOut(user, login))
                if *user == self.user && **login == *self.login =>
            {
                Obey::End
            }
            Some(Control::Roles(user, roles)) if *user == self.user => {
                self.roles = roles.to_vec();
                Obey::Refresh
            }
            Some(Control::Access) => Obey::Refresh,
            _ => Obey::Nothing,
        }
    }
}

/// Who a stream is for and what they may see, read once the stream has subscribed (so a
/// change after this arrives as a frame). Refused when the login has just ended, or the
/// person is not a member.
async fn sight_of(
    app: &super::App,
    who: &super::auth::SessionUser,
    room: Option<Id<ChannelMarker>>,
    as_of: EventId,
) -> Result<Sight, WebError> {
    if app.hub.sessions.was_revoked(who) {
        return Err(WebError::NotLoggedIn {
            return_to: "/rooms".to_owned(),
            api: true,
        });
    }
    let roles = app
        .hub
        .roles
        .roles(app.bus.as_ref(), who.person.id)
        .await?
        .ok_or(WebError::NotMember)?
        .to_vec();
    let mut sight = Sight {
        user: who.person.id,
        login: who.login.clone(),
        roles,
        room,
        visible: HashSet::new(),
        as_of,
    };
    sight.refresh(&app.hub.access());
    Ok(sight)
}

/// `GET /api/stream[?room=<channel id>][&last_event_id=<id>]`.
pub async fn stream(
    State(app): State<AppState>,
    // Logged in; membership and roles are read once below, after subscribing (the
    // watcher rechecks stream holders, so opening a stream asks Discord nothing).
    StreamUser(who): StreamUser,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Response, WebError> {
    let after = last_id(&headers, q.last_event_id.as_deref())?;
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
    // ids tell which was seen. Roles and permissions are read after subscribing, so a
    // change in between arrives as a frame.
    let (live, as_of) = app.hub.subscribe();
    let mut sight = sight_of(&app, &who, room, as_of).await?;
    let me = sight.user;
    if let Some(room) = room {
        // A room page's stream: the room must exist and be this person's to see, or no
        // viewer is recorded. Asked of the hub's state (a change after it arrives as a
        // frame); only a room the hub has not reached yet, made a moment ago, is looked
        // up in Redis.
        let known = app.hub.lock_state().rooms.contains_key(&room);
        let allowed = if known {
            sight.visible.contains(&room)
        } else {
            let snapshot = app.bus.snapshot().await?;
            snapshot.rooms.contains_key(&room) && snapshot.access.can_see(sight.seer(), room)
        };
        if !allowed {
            return Err(super::rooms::no_such_room());
        }
    }
    let max = app.settings.stream_max_per_user;
    let watch = app
        .watched
        .watch(me, max)
        .ok_or(WebError::TooManyStreams { max })?;
    let viewing = room.map(|room| app.presence.enter(room, who.viewer()));
    let bus = app.bus.clone();
    let hub = app.hub.clone();
    let guild = app.settings.guild_id;
    let delivered = app.hub.delivered.clone();
    let frames = async_stream::stream! {
        let _viewing = viewing;
        let _watch = watch;
        let _connected = Connected::new();
        yield Bytes::from_static(RETRY);
        let mut last = after;
        // Frames to go out before the live ones: a replay from the replica's memory.
        let mut pending = VecDeque::new();
        if let Some(mut cursor) = after {
            metrics::counter!("coven_web_replays_total").increment(1);
            let held = match bus.holds(cursor).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check a stream's last id; it will reconnect");
                    return;
                }
            };
            // An id this log never gave out (from before Redis lost its data, or from
            // another deployment) cannot be continued from: resync at once.
            let foreign = !held && cursor != EventId::ZERO;
            // Still in the log, so nothing after it was trimmed away: the replica's recent
            // frames serve the replay when they reach back to it (a wave of reconnecting
            // browsers costs one small read each, not pages of the log). An id the log
            // no longer has gets its resync as the contract says, memory or not.
            let remembered = if held { hub.replay_from(cursor) } else { None };
            if let Some(frames) = remembered {
                metrics::counter!("coven_web_replays_from_memory_total").increment(1);
                pending = frames;
            } else {
                loop {
                    let page = if foreign { Ok(Since::Gap) } else { bus.since(cursor, REPLAY_PAGE).await };
                    match page {
                        Ok(Since::Events(events)) => {
                            let n = events.len();
                            for e in events {
                                cursor = e.id;
                                if sight.shows(e.data.audience()) {
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
        }
        let mut feed = Feed::new(&hub, live, pending);
        loop {
            let event = match feed.next(last, false).await {
                Next::Event(event) => event,
                Next::Send(bytes) => {
                    yield bytes;
                    continue;
                }
                Next::End => break,
            };
            // Control is acted on even for an event the replay already sent (when newer
            // than the sight): it reads the hub's newest state, so acting twice changes
            // nothing.
            let changed = match sight.obey(&event) {
                Obey::End => break,
                Obey::Refresh => true,
                Obey::Nothing => false,
            };
            if changed {
                let (appeared, gone) = sight.refresh(&hub.access());
                if !appeared.is_empty() || !gone.is_empty() {
                    match hub.snapshot_since(event.id).await {
                        Some(snapshot) => {
                            for data in view_changes(&snapshot, &sight, &appeared, &gone) {
                                if let Some(bytes) = view_bytes(event.id, guild, &data) {
                                    yield bytes;
                                }
                            }
                        }
                        // The stream reconnects and renders afresh.
                        None => break,
                    }
                    // A room page whose room the viewer may no longer see: told (above),
                    // and no longer counted as viewing it.
                    if sight.room.is_some_and(|room| gone.contains(&room)) {
                        break;
                    }
                }
            }
            if last.is_some_and(|l| event.id <= l) {
                continue;
            }
            last = Some(event.id);
            if sight.shows(event.audience) {
                delivered.increment(1);
                yield event.bytes.clone();
            }
        }
    };
    Ok(event_stream(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ms: u64, size: usize) -> Frame {
        Frame::Event(Arc::new(EventFrame {
            id: EventId { ms, seq: 0 },
            audience: Audience::Everyone,
            bytes: Bytes::from(vec![b'x'; size]),
            control: None,
            html: None,
            rendered: false,
            subject: None,
        }))
    }

    fn ids(frames: &VecDeque<Frame>) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Event(e) => Some(e.id.ms),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_replay_from_memory_starts_only_at_an_id_this_replica_passed_on() {
        let mut recent = Recent::new(300);
        for ms in [1, 3, 5, 7, 9] {
            recent.push(frame(ms, 100));
        }
        // Holds 5, 7 and 9; 3 is the newest dropped.
        let at = |ms| EventId { ms, seq: 0 };
        assert!(recent.passed_on(at(7)));
        assert!(recent.passed_on(at(9)));
        assert!(recent.passed_on(at(3)), "the newest dropped is known");
        assert!(!recent.passed_on(at(6)), "an id never given out");
        assert!(
            !recent.passed_on(at(10)),
            "an id from ahead (or another log)"
        );
        assert!(!recent.passed_on(at(1)), "forgotten");
        assert!(!Recent::new(300).passed_on(EventId::ZERO));
    }

    #[test]
    fn recent_frames_serve_a_stream_behind_within_the_byte_bound_only() {
        let mut recent = Recent::new(300);
        for ms in 1..=5 {
            recent.push(frame(ms, 100));
        }
        // Holds 3 (300 bytes); 1 and 2 were dropped.
        let at = |ms| EventId { ms, seq: 0 };
        assert_eq!(recent.after(at(3), 1000).map(|f| ids(&f)), Some(vec![4, 5]));
        assert_eq!(
            recent.after(at(2), 1000).map(|f| ids(&f)),
            Some(vec![3, 4, 5])
        );
        assert!(
            recent.after(at(1), 1000).is_none(),
            "memory no longer reaches back"
        );
        assert!(
            recent.after(at(2), 250).is_none(),
            "past the byte bound: cut"
        );
        assert_eq!(recent.after(at(5), 0).map(|f| ids(&f)), Some(vec![]));
    }
}
