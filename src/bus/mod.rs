//! The event bus: the one path by which events are appended, stored and delivered.
//!
//! One trait, two implementations: [`redis`] (production: a stream, snapshot hashes and
//! Pub/Sub, changed together by one script) and [`memory`] (the demo and unit tests, same
//! semantics in-process). An append is atomic: the event joins the log, the rooms/voice
//! snapshot takes it into account, the snapshot's "valid at" id moves to it, and it is
//! published — all or nothing. A fenced append (the gateway's) is refused once its lease
//! is lost, so a paused old leader cannot write.
//!
//! Owns storage and delivery. Must not decide which events happen (the gateway and web
//! do) nor how they are shown.

pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker, UserMarker};

use crate::access::{Access, MemberRecord};
use crate::event::{Event, EventData, EventId, Person, Viewer, VoiceFlags};

/// A room as the snapshot keeps it (`P:{G}:rooms`, one JSON value per channel id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub name: String,
    pub user_limit: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_id: Option<Id<RoleMarker>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator_id: Option<Id<UserMarker>>,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds of the last voice activity (or creation).
    pub last_active: u64,
    /// Set while a `room.closing` warning stands; cleared when someone joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closes_at: Option<u64>,
    /// Who has the room's page open, on any replica (from the last `room.viewers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub viewers: Vec<Viewer>,
    /// Invite links of an older generation no longer work ("New link").
    #[serde(default, skip_serializing_if = "is_zero")]
    pub invite_gen: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Someone in voice as the snapshot keeps them (`P:{G}:voice`, one JSON value per user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoiceRecord {
    pub channel_id: Id<ChannelMarker>,
    pub user: Person,
    #[serde(flatten)]
    pub flags: VoiceFlags,
}

/// Rooms and voice states, valid at event `at`: replaying the log after `at` on top of
/// it gives the present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub at: EventId,
    pub rooms: BTreeMap<Id<ChannelMarker>, RoomRecord>,
    pub voice: BTreeMap<Id<UserMarker>, VoiceRecord>,
    /// Guild roles and channel overwrites: who may see what (`P:{G}:guild`,
    /// `P:{G}:channels`).
    pub access: Access,
    /// The guild it is of, as the bus that read it knows (pages link within it).
    pub guild: Option<Id<GuildMarker>>,
}

impl Snapshot {
    /// Applies one event. This is the definition of how events change the snapshot; the
    /// Redis script implements the same rules and a test holds the two together.
    pub fn apply(&mut self, event: &Event) {
        self.apply_data(&event.data, event.ts);
        self.at = self.at.max(event.id);
    }

    /// Applies an event's data at time `ts` (unix ms) without moving `at`: for views that
    /// track what events say before they have ids (the gateway's own cache).
    pub fn apply_data(&mut self, data: &EventData, ts: u64) {
        match data {
            EventData::RoomCreated {
                channel_id,
                name,
                user_limit,
                created_by,
                role_id,
            } => {
                let room = self.rooms.entry(*channel_id).or_insert_with(|| RoomRecord {
                    name: name.clone(),
                    user_limit: *user_limit,
                    role_id: None,
                    creator_id: None,
                    created_at: ts,
                    last_active: ts,
                    closes_at: None,
                    viewers: Vec::new(),
                    invite_gen: 0,
                });
                room.name.clone_from(name);
                room.user_limit = *user_limit;
                // An owner already recorded stays: what the web recorded when it made the
                // room is Coven's word; the gateway only fills in what Redis lost.
                if room.creator_id.is_none() {
                    room.creator_id = *created_by;
                }
                if room.role_id.is_none() {
                    room.role_id = *role_id;
                }
            }
            EventData::RoomUpdated {
                channel_id,
                name,
                user_limit,
            } => {
                if let Some(room) = self.rooms.get_mut(channel_id) {
                    room.name.clone_from(name);
                    room.user_limit = *user_limit;
                }
            }
            EventData::RoomDeleted { channel_id } => {
                self.rooms.remove(channel_id);
                self.voice.retain(|_, v| v.channel_id != *channel_id);
            }
            EventData::RoomClosing {
                channel_id,
                closes_at,
                ..
            } => {
                if let Some(room) = self.rooms.get_mut(channel_id) {
                    room.closes_at = Some(*closes_at);
                }
            }
            EventData::VoiceJoined {
                channel_id,
                user,
                flags,
            } => {
                self.voice.insert(
                    user.id,
                    VoiceRecord {
                        channel_id: *channel_id,
                        user: user.clone(),
                        flags: *flags,
                    },
                );
                if let Some(room) = self.rooms.get_mut(channel_id) {
                    room.last_active = ts;
                    room.closes_at = None;
                }
            }
            EventData::VoiceUpdated {
                channel_id,
                user_id,
                flags,
            } => {
                if let Some(v) = self.voice.get_mut(user_id) {
                    v.flags = *flags;
                    v.channel_id = *channel_id;
                }
            }
            EventData::VoiceLeft {
                channel_id,
                user_id,
            } => {
                self.voice.remove(user_id);
                if let Some(room) = self.rooms.get_mut(channel_id) {
                    room.last_active = ts;
                }
            }
            EventData::RoomViewers {
                channel_id,
                viewers,
            } => {
                if let Some(room) = self.rooms.get_mut(channel_id) {
                    room.viewers.clone_from(viewers);
                    // Someone looking at the room is activity; someone opening it calls off
                    // a standing closing.
                    room.last_active = ts;
                    if !viewers.is_empty() {
                        room.closes_at = None;
                    }
                }
            }
            EventData::InviteRenewed {
                channel_id,
                generation,
            } => {
                if let Some(room) = self.rooms.get_mut(channel_id) {
                    room.invite_gen = *generation;
                }
            }
            EventData::GuildUpdated { .. } | EventData::ChannelAccess { .. } => {
                self.access.apply(data);
            }
            EventData::Ping { .. }
            | EventData::GatewayStatus { .. }
            | EventData::MemberUpdated { .. }
            | EventData::MemberRemoved { .. }
            | EventData::SessionEnded { .. }
            | EventData::GuildRemoved { .. } => {}
        }
    }

    /// People in a room's voice channel.
    pub fn members(&self, channel: Id<ChannelMarker>) -> impl Iterator<Item = &VoiceRecord> {
        self.voice.values().filter(move |v| v.channel_id == channel)
    }

    /// Whether a room is at its user limit (a limit of 0 means none).
    pub fn is_full(&self, channel: Id<ChannelMarker>) -> bool {
        self.rooms.get(&channel).is_some_and(|room| {
            room.user_limit > 0 && self.members(channel).count() >= usize::from(room.user_limit)
        })
    }

    /// Whether `user` sits in `channel`'s voice channel.
    pub fn is_inside(&self, user: Id<UserMarker>, channel: Id<ChannelMarker>) -> bool {
        self.voice
            .get(&user)
            .is_some_and(|v| v.channel_id == channel)
    }
}

/// Proof of holding a lease, checked by every fenced append. Its token is unique per
/// acquisition (an increasing epoch plus the holder's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub token: String,
    pub epoch: u64,
    /// A deployment-wide lease (a shard's, [`Deployment::acquire`]): it lives outside
    /// every guild's key space (another Redis Cluster slot), so a guild's writes are
    /// fenced by the guild's epoch (`P:{G}:epoch`, refusing an epoch lower than the
    /// highest seen) instead of by reading the lease.
    pub by_epoch: bool,
}

/// Names one logical append of a writer that appends one event at a time: `writer` is
/// unique to it (a lease's fence token, a process, a Discord session), `seq` and `part`
/// count its appends in increasing order. A request older than the writer's last one in
/// that order counts as done: two gateways that saw the same Discord dispatch (a resumed
/// session replays what its predecessor may have appended) name its events alike
/// (session, sequence, index in the dispatch), so they reach the log once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub writer: String,
    pub seq: u64,
    pub part: u32,
}

impl Request {
    /// The `index`-th event derived from the dispatch Discord numbered `sequence` in
    /// session `session_id`.
    pub fn dispatch(session_id: &str, sequence: u64, index: u32) -> Self {
        Self {
            writer: format!("discord.{session_id}"),
            seq: sequence,
            part: index,
        }
    }

    /// As the append script reads it: `<writer>#<seq>.<part>`.
    pub fn id(&self) -> String {
        format!("{}#{}.{}", self.writer, self.seq, self.part)
    }
}

/// What a reader gets for "everything after id N".
#[derive(Debug, Clone, PartialEq)]
pub enum Since {
    /// The events after N, in order (possibly none).
    Events(Vec<Arc<Event>>),
    /// N is older than the log keeps: the reader must start again from a snapshot.
    Gap,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The writer's lease was lost: it must stop writing.
    #[error("the lease {0} is no longer held by this writer")]
    Fenced(String),
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
    #[error("cannot encode the event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The first connection failed: what was tried and what to check, on one line.
    #[error("{0}")]
    Connect(String),
    /// Fewer replicas than `REDIS_MIN_REPLICAS` acknowledged the write in time: it may
    /// still be lost in a failover, so it is not yet done (retry the same request).
    #[error("only {acked} of the {wanted} replicas required acknowledged the write in time")]
    NotDurable { acked: i64, wanted: u32 },
    /// The connection changed between the write and its `WAIT` (a reconnect, a failover):
    /// nothing proves that replicas of the primary holding the write have it, so it is not
    /// yet done (retry the same request).
    #[error("the connection to Redis changed before the write's replicas could be counted")]
    Unproven,
}

pub type BusResult<T> = Result<T, BusError>;

/// The longest wait between two tries of an append, a subscription or a read that Redis
/// refused (the gateway's writer, a replica's resubscribe and gap fill): a failover is
/// over in seconds, and a retry made up to 2 s after it was most of a guild's pause.
pub const RETRY_AT_MOST: Duration = Duration::from_millis(250);

/// The bus, as every component sees it.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// The guild whose key space (`P:{G}:*`) this bus is.
    fn guild_id(&self) -> Id<GuildMarker>;

    /// Appends one event atomically (log, snapshot, publish). With a fence, refused with
    /// [`BusError::Fenced`] unless the fence still holds its lease.
    async fn append(&self, data: EventData, fence: Option<&Fence>) -> BusResult<Arc<Event>>;

    /// [`Bus::append`] for a writer that retries: calling again with the same `request`
    /// after an error whose outcome is unknown (a lost answer, a failover, a write not yet
    /// on enough replicas) answers with the event the first call appended, if it did, so
    /// the event reaches the log once. A request older than the writer's last (see
    /// [`Request`]) appends nothing and answers with the writer's last event. In-process
    /// logs know every outcome: they append.
    async fn append_once(
        &self,
        data: EventData,
        fence: Option<&Fence>,
        request: &Request,
    ) -> BusResult<Arc<Event>> {
        let _ = request;
        self.append(data, fence).await
    }

    /// Rooms and voice states with the id they are valid at.
    async fn snapshot(&self) -> BusResult<Snapshot>;

    /// Whether the guild has room `room` (one field of `P:{G}:rooms`, not the snapshot).
    async fn has_room(&self, room: Id<ChannelMarker>) -> BusResult<bool>;

    /// The events after `after` (exclusive), at most `limit`.
    async fn since(&self, after: EventId, limit: usize) -> BusResult<Since>;

    /// Whether the log holds the event `id`. Every id a reader was ever given is in the
    /// log until trimmed, so an id inside the log's range that it does not hold comes from
    /// another log's history.
    async fn holds(&self, id: EventId) -> BusResult<bool>;

    /// Drops the log's events appended before `before_ms` (unix ms), so a log is capped
    /// by age as well as by length: a quiet guild's log shrinks even when nothing is
    /// appended to it. Events not yet published (withheld until durable) are never
    /// dropped. Returns how many were dropped; readers behind them get a gap, as after
    /// any trim.
    async fn trim_before(&self, before_ms: u64) -> BusResult<u64>;

    /// Live events, in id order, from the moment this returns (the guild's subscription
    /// is made on the first call; a failure to make it is the error). One subscription
    /// per guild per process feeds every receiver; a receiver that falls behind sees
    /// `Lagged` and must catch up with [`Bus::since`].
    async fn subscribe(&self) -> BusResult<broadcast::Receiver<Arc<Event>>>;

    /// `false` while the store is known to be unreachable (its connection dropped and is
    /// being re-established), so callers can answer at once instead of waiting out a
    /// timeout. `true` says only that nothing is known to be wrong.
    fn reachable(&self) -> bool {
        true
    }

    /// Presence on a room page: marks `present` as viewing `channel` for `ttl` more, `gone`
    /// as no longer viewing, forgets viewers whose time ran out, and when that changes
    /// who is viewing appends `room.viewers` with the new list in the same atomic step
    /// (returned). Kept in `P:{G}:viewers:{channel}`, so a dead replica's viewers fade out.
    async fn viewers(
        &self,
        channel: Id<ChannelMarker>,
        present: &[Viewer],
        gone: &[Viewer],
        ttl: Duration,
    ) -> BusResult<Option<Arc<Event>>>;

    /// A member's roles as last recorded by `member.updated` (`P:{G}:members`); `None`
    /// when Coven knows them as no member.
    async fn member(&self, user: Id<UserMarker>) -> BusResult<Option<MemberRecord>>;

    /// Sets `P:{G}:<key>` for `ttl` unless it exists: `true` for the one caller that set
    /// it (a "do this at most once per ttl" across replicas).
    async fn claim(&self, key: &str, ttl: Duration) -> BusResult<bool>;

    /// Takes lease `name` for `holder` if nobody holds it.
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>>;

    /// How long lease `name` is still held by whoever holds it (`None`: nobody).
    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>>;

    /// Extends a held lease; `false` when it was lost meanwhile.
    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool>;

    /// Gives a lease up at once (a clean shutdown), if still held.
    async fn release(&self, fence: &Fence) -> BusResult<()>;
}

/// Small named values beside the log: the gateway's stored session and status. A fenced
/// put is refused once the fence's lease is lost, like a fenced append.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Sets `P:{G}:<key>`, expiring after `ttl` when given.
    async fn put(
        &self,
        fence: Option<&Fence>,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> BusResult<()>;

    async fn get(&self, key: &str) -> BusResult<Option<String>>;

    /// Makes the guild's data expire `after` from now (the bot was removed: kept a grace
    /// period, then gone), or, with `None`, keep again (the bot is back).
    async fn expire(&self, after: Option<Duration>) -> BusResult<()>;
}

/// What the registry (`P:guilds`) says of a guild, as Discord last told the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuildEntry {
    pub name: String,
    #[serde(default)]
    pub icon: Option<String>,
    pub shard: u32,
    /// `false` while Discord reports the guild in an outage.
    pub available: bool,
    /// The shard lease epoch that wrote it: a write with a lower one is refused, so a
    /// paused old gateway cannot undo what its successor wrote.
    #[serde(default)]
    pub epoch: u64,
}

/// `P:guilds`: guild id → [`GuildEntry`] JSON.
pub const REGISTRY: &str = "guilds";

/// `P:control`: what every web replica must hear, whatever guilds it watches.
pub const CONTROL: &str = "control";

/// `P:shards:count`: how many shards the bot's sessions are split into.
pub const SHARD_COUNT: &str = "shards:count";

/// The most shards a deployment may be split into: 4 million guilds at Discord's
/// recommended 1,000 a shard. Every gateway process reads every shard's lease each round,
/// and web replicas every shard's status each second, so the count bounds that work.
pub const MAX_SHARDS: u32 = 4_096;

/// `shard:{i}:<what>`, a shard's deployment-wide key (`lease`, `session`, `status`): the
/// braces keep one shard's keys in one Redis Cluster slot, so its fenced writes (session,
/// status) check its lease in one script, as a guild's `P:{G}:*` keys do.
pub fn shard_key(shard: u32, what: &str) -> String {
    format!("shard:{{{shard}}}:{what}")
}

/// Discord's guild → shard: `(guild_id >> 22) % shard_count`.
pub fn shard_of(guild: Id<GuildMarker>, shard_count: u32) -> u32 {
    u32::try_from((guild.get() >> 22) % u64::from(shard_count.max(1))).unwrap_or(0)
}

/// Deployment-wide state, beside every guild's own: the registry, the shards' leases,
/// sessions and statuses (keys `P:<name>` outside any guild's key space), and the bus of
/// any guild. Written by the gateway only; web replicas read through their guild's bus.
#[async_trait::async_trait]
pub trait Deployment: Send + Sync + 'static {
    /// The bus of one guild (cheap: it shares this deployment's connections).
    fn guild(&self, guild: Id<GuildMarker>) -> Arc<dyn Backend>;

    /// Whether Redis is connected right now (a dropped connection is known at once).
    fn reachable(&self) -> bool {
        true
    }

    /// Takes lease `P:<name>` for `holder` if nobody holds it; its epoch (`P:<name>:epoch`)
    /// only grows. The fence is checked by epoch in guilds' writes.
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>>;

    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>>;

    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool>;

    async fn release(&self, fence: &Fence) -> BusResult<()>;

    /// Sets `P:<key>`; with a fence, only while its lease (in the same slot) is held.
    async fn put(
        &self,
        fence: Option<&Fence>,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> BusResult<()>;

    async fn get(&self, key: &str) -> BusResult<Option<String>>;

    /// Sets `P:<key>` unless it is set; answers what it holds afterwards.
    async fn put_first(&self, key: &str, value: &str) -> BusResult<String>;

    /// Adds or refreshes a guild in the registry; `false` when an entry written under a
    /// higher epoch stands.
    async fn register(&self, guild: Id<GuildMarker>, entry: &GuildEntry) -> BusResult<bool>;

    /// Removes a guild from the registry unless written under a higher epoch than `epoch`.
    async fn unregister(&self, guild: Id<GuildMarker>, epoch: u64) -> BusResult<bool>;

    async fn registry(&self) -> BusResult<BTreeMap<Id<GuildMarker>, GuildEntry>>;

    /// The registry's entries of `guilds`, in their order (`None`: not registered), in
    /// one request: what a person's picker needs, whatever the registry's size.
    async fn entries(&self, guilds: &[Id<GuildMarker>]) -> BusResult<Vec<Option<GuildEntry>>>;

    /// How many guilds are registered.
    async fn registry_len(&self) -> BusResult<usize>;

    /// The guilds that have a key `P:{G}:<suffix>`, found by scanning the keyspace: for
    /// a rare question asked once at start (an upgrade's old leases), never per request.
    /// In memory there is no older deployment to find.
    async fn guilds_with_key(&self, suffix: &str) -> BusResult<Vec<Id<GuildMarker>>> {
        let _ = suffix;
        Ok(Vec::new())
    }

    /// Says `data` on `P:control`, the channel every web replica hears whatever guilds it
    /// watches (a login ended). Best effort, as Pub/Sub is: a replica that was
    /// disconnected meanwhile misses it, and what it guards is checked again elsewhere.
    async fn announce(&self, data: &EventData) -> BusResult<()>;

    /// Listens to `P:control` (subscribed on the first call).
    async fn control(&self) -> BusResult<broadcast::Receiver<Arc<EventData>>>;

    /// Raises `P:{G}:epoch` of every guild to at least `epoch`, sent together: from then
    /// on, a writer with a lower epoch is refused in each of them.
    async fn raise_epochs(&self, guilds: &[Id<GuildMarker>], epoch: u64) -> BusResult<()>;

    /// Sets `P:<key>` for `ttl` unless it is set; `true` when this call set it (an
    /// identify bucket's turn).
    async fn claim(&self, key: &str, ttl: Duration) -> BusResult<bool>;

    /// Says in `P:gateways` that gateway process `process` is alive for `ttl` more, by
    /// Redis's clock (so the processes' clocks need not agree), and answers every process
    /// alive now, itself included, sorted.
    async fn beat(&self, process: &str, ttl: Duration) -> BusResult<Vec<String>>;

    /// Takes `process` out of `P:gateways` (it is stopping): the others' shares grow now,
    /// not when its last beat runs out.
    async fn leave(&self, process: &str) -> BusResult<()>;
}

/// `P:gateways`: the live gateway processes (a sorted set, process → when its last beat
/// runs out, in Redis's milliseconds).
pub const GATEWAYS: &str = "gateways";

/// `P:identify:{bucket}`: set for 5 s (and a margin) by the process whose shard of that
/// bucket identifies now.
pub fn identify_key(bucket: u32) -> String {
    format!("identify:{{{bucket}}}")
}

/// `P:shard:{i}:status` ([`shard_key`]) holds a [`GatewayReport`]: what the shard's
/// holder last said about its Discord connection, refreshed every third of its lease TTL.
/// Replicas judge its freshness by `ts` and `ttl_ms`, so a dead gateway is noticed within
/// one lease TTL without knowing its settings. (One guild's gateway kept it at
/// `P:{G}:gateway:status`, read by nothing now.)

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayReport {
    pub state: crate::event::GatewayState,
    #[serde(default)]
    pub reason: Option<String>,
    /// Unix ms when it was written.
    pub ts: u64,
    /// The gateway's lease TTL: a report older than this is stale.
    #[serde(default = "default_report_ttl")]
    pub ttl_ms: u64,
}

fn default_report_ttl() -> u64 {
    10_000
}

impl GatewayReport {
    /// Whether the report is still current at `now_ms`.
    pub fn fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.ts) <= self.ttl_ms
    }
}

/// Everything a component needs from shared state.
pub trait Backend: Bus + Store {}

impl<T: Bus + Store> Backend for T {}

/// How many events a live subscription buffers per receiver before it lags.
pub const LIVE_BUFFER: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn ev(id: &str, data: EventData) -> Event {
        let id: EventId = id.parse().unwrap();
        Event::new(id, Id::new(1), id.ms, data).unwrap()
    }

    fn person(id: u64) -> Person {
        Person {
            id: Id::new(id),
            username: format!("u{id}"),
            global_name: None,
            avatar_url: None,
        }
    }

    #[test]
    fn a_room_lives_and_dies_with_its_events() {
        let mut s = Snapshot::default();
        let room = Id::new(10);
        s.apply(&ev(
            "1-0",
            EventData::RoomCreated {
                channel_id: room,
                name: "a".into(),
                user_limit: 4,
                created_by: None,
                role_id: None,
            },
        ));
        s.apply(&ev(
            "2-0",
            EventData::VoiceJoined {
                channel_id: room,
                user: person(5),
                flags: VoiceFlags::default(),
            },
        ));
        s.apply(&ev(
            "3-0",
            EventData::RoomClosing {
                channel_id: room,
                reason: "idle".into(),
                closes_at: 9,
            },
        ));
        assert_eq!(s.rooms[&room].closes_at, Some(9));
        s.apply(&ev(
            "4-0",
            EventData::VoiceJoined {
                channel_id: room,
                user: person(6),
                flags: VoiceFlags::default(),
            },
        ));
        assert_eq!(
            s.rooms[&room].closes_at, None,
            "a join calls the closing off"
        );
        assert_eq!(s.rooms[&room].last_active, 4);
        s.apply(&ev(
            "4-1",
            EventData::RoomClosing {
                channel_id: room,
                reason: "idle".into(),
                closes_at: 10,
            },
        ));
        let viewer = Viewer {
            id: Id::new(7),
            username: "g".into(),
            avatar_url: None,
        };
        s.apply(&ev(
            "4-2",
            EventData::RoomViewers {
                channel_id: room,
                viewers: vec![viewer],
            },
        ));
        assert_eq!(
            s.rooms[&room].closes_at, None,
            "someone opening the room calls the closing off"
        );
        assert_eq!(
            s.rooms[&room].last_active, 4,
            "ev() stamps ts from the id's ms"
        );
        let muted = VoiceFlags {
            self_mute: true,
            ..VoiceFlags::default()
        };
        s.apply(&ev(
            "5-0",
            EventData::VoiceUpdated {
                channel_id: room,
                user_id: Id::new(5),
                flags: muted,
            },
        ));
        assert!(s.voice[&Id::new(5)].flags.self_mute);
        s.apply(&ev(
            "6-0",
            EventData::VoiceLeft {
                channel_id: room,
                user_id: Id::new(5),
            },
        ));
        assert_eq!(s.members(room).count(), 1);
        s.apply(&ev("7-0", EventData::RoomDeleted { channel_id: room }));
        assert!(s.rooms.is_empty() && s.voice.is_empty());
        assert_eq!(s.at, "7-0".parse().unwrap());
    }
}
