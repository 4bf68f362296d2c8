//! Domain events: the contract between the gateway, the bus and every web replica.
//!
//! An event travels as one JSON envelope,
//! `{"v":1,"id":"<id>","type":"<type>","guild_id":"<id>","ts":<unix ms>,"data":{...}}`,
//! built once where it is appended and passed on verbatim. This module owns the event
//! names, the shapes of their data and the event id; it must not know how events are
//! stored or delivered.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use twilight_model::channel::permission_overwrite::PermissionOverwrite;
use twilight_model::guild::Permissions;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, RoleMarker, UserMarker};

/// Where Discord serves avatar images.
pub const DEFAULT_CDN: &str = "https://cdn.discordapp.com";

/// Discord's CDN URL of a user's avatar (`hash` as Discord gives it; `a_…` is animated),
/// at the size pages show. The one place avatar URLs are made.
pub fn avatar_url(cdn: &str, user: Id<UserMarker>, hash: &str) -> String {
    let ext = if hash.starts_with("a_") { "gif" } else { "png" };
    format!("{cdn}/avatars/{user}/{hash}.{ext}?size=64")
}

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An event's position in the log: Redis stream ids (`<unix ms>-<seq>`), strictly
/// increasing, so "everything after N" is well defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub const ZERO: EventId = EventId { ms: 0, seq: 0 };

    /// The smallest id greater than `self`.
    pub fn successor(self) -> EventId {
        match self.seq.checked_add(1) {
            Some(seq) => EventId { ms: self.ms, seq },
            None => EventId {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }

    /// The next id to hand out at wall-clock time `now_ms`: the clock's millisecond if it
    /// moved on, else one past the last id (so ids increase even if the clock steps back).
    pub fn next_after(last: EventId, now_ms: u64) -> EventId {
        if now_ms > last.ms {
            EventId { ms: now_ms, seq: 0 }
        } else {
            last.successor()
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why an event id from outside (a `Last-Event-ID` header, a query) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an event id (expected <milliseconds>-<sequence>)")]
pub struct BadEventId;

impl FromStr for EventId {
    type Err = BadEventId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(BadEventId)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(BadEventId);
        }
        Ok(EventId {
            ms: ms.parse().map_err(|_| BadEventId)?,
            seq: seq.parse().map_err(|_| BadEventId)?,
        })
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The four voice flags Discord reports per person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VoiceFlags {
    pub self_mute: bool,
    pub self_deaf: bool,
    pub self_video: bool,
    pub self_stream: bool,
}

/// A person as pages show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    pub id: Id<UserMarker>,
    pub username: String,
    #[serde(default)]
    pub global_name: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
}

impl Person {
    /// The name to show: the display name when set, else the username.
    pub fn display_name(&self) -> &str {
        self.global_name.as_deref().unwrap_or(&self.username)
    }
}

/// Someone looking at a room page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewer {
    pub id: Id<UserMarker>,
    pub username: String,
    #[serde(default)]
    pub avatar_url: Option<String>,
}

/// A guild role as visibility needs it: its id and guild-level permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAccess {
    pub id: Id<RoleMarker>,
    pub permissions: Permissions,
}

/// States of the gateway's Discord connection, as `gateway.status` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GatewayState {
    Disconnected,
    Connecting,
    Identifying,
    Connected,
    Reconnecting,
    Failed,
}

impl GatewayState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnected => "DISCONNECTED",
            Self::Connecting => "CONNECTING",
            Self::Identifying => "IDENTIFYING",
            Self::Connected => "CONNECTED",
            Self::Reconnecting => "RECONNECTING",
            Self::Failed => "FAILED",
        }
    }
}

/// What happened, with its data. The serde tag and content names are the envelope's
/// `type` and `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum EventData {
    #[serde(rename = "room.created")]
    RoomCreated {
        channel_id: Id<ChannelMarker>,
        name: String,
        user_limit: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_by: Option<Id<UserMarker>>,
        /// The role that opens the room (when Coven made it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role_id: Option<Id<RoleMarker>>,
    },
    #[serde(rename = "room.updated")]
    RoomUpdated {
        channel_id: Id<ChannelMarker>,
        name: String,
        user_limit: u16,
    },
    #[serde(rename = "room.deleted")]
    RoomDeleted { channel_id: Id<ChannelMarker> },
    #[serde(rename = "room.closing")]
    RoomClosing {
        channel_id: Id<ChannelMarker>,
        reason: String,
        /// Unix milliseconds.
        closes_at: u64,
    },
    #[serde(rename = "voice.joined")]
    VoiceJoined {
        channel_id: Id<ChannelMarker>,
        user: Person,
        #[serde(flatten)]
        flags: VoiceFlags,
    },
    #[serde(rename = "voice.updated")]
    VoiceUpdated {
        channel_id: Id<ChannelMarker>,
        user_id: Id<UserMarker>,
        #[serde(flatten)]
        flags: VoiceFlags,
    },
    #[serde(rename = "voice.left")]
    VoiceLeft {
        channel_id: Id<ChannelMarker>,
        user_id: Id<UserMarker>,
    },
    #[serde(rename = "room.viewers")]
    RoomViewers {
        channel_id: Id<ChannelMarker>,
        viewers: Vec<Viewer>,
    },
    #[serde(rename = "ping")]
    Ping {
        seq: u64,
        /// Unix nanoseconds when it was sent.
        ts: u64,
    },
    #[serde(rename = "gateway.status")]
    GatewayStatus {
        state: GatewayState,
        #[serde(default)]
        reason: Option<String>,
    },
    /// The guild's name, owner and roles with their permissions: half of what decides who
    /// sees which channel (the other half is each channel's overwrites).
    #[serde(rename = "guild.updated")]
    GuildUpdated {
        id: Id<GuildMarker>,
        name: String,
        owner_id: Id<UserMarker>,
        roles: Vec<RoleAccess>,
    },
    /// A voice channel's permission overwrites; `null` when the channel is gone or hidden
    /// from the bot (then nobody sees it through Coven).
    #[serde(rename = "channel.access")]
    ChannelAccess {
        channel_id: Id<ChannelMarker>,
        overwrites: Option<Vec<PermissionOverwrite>>,
    },
    /// A member's roles, as Discord last told Coven (login, recheck, Coven's own grants).
    #[serde(rename = "member.updated")]
    MemberUpdated {
        user_id: Id<UserMarker>,
        roles: Vec<Id<RoleMarker>>,
    },
    /// Someone left or was removed from the guild: their streams end everywhere.
    #[serde(rename = "member.removed")]
    MemberRemoved { user_id: Id<UserMarker> },
    /// A login ended (logout): that login's streams end on every replica.
    #[serde(rename = "session.ended")]
    SessionEnded {
        user_id: Id<UserMarker>,
        login: String,
    },
    /// "New link": invites of an older generation to this room stop working.
    #[serde(rename = "invite.renewed")]
    InviteRenewed {
        channel_id: Id<ChannelMarker>,
        generation: u32,
    },
    /// The bot was removed from the guild (GUILD_DELETE without `unavailable`): the last
    /// event of its log, whose data expires after `GUILD_REMOVED_GRACE`; streams of the
    /// guild end.
    #[serde(rename = "guild.removed")]
    GuildRemoved { id: Id<GuildMarker> },
}

/// Who may receive an event on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Everyone logged in (pings, the gateway's status).
    Everyone,
    /// Whoever may see this channel in Discord.
    Channel(Id<ChannelMarker>),
    /// Nobody: the event steers Coven itself (permissions, members, logins) and is
    /// never sent to a browser.
    Internal,
}

/// Event names, as SSE `event:` fields and the envelope's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    RoomCreated,
    RoomUpdated,
    RoomDeleted,
    RoomClosing,
    VoiceJoined,
    VoiceUpdated,
    VoiceLeft,
    RoomViewers,
    Ping,
    GatewayStatus,
    GuildUpdated,
    ChannelAccess,
    MemberUpdated,
    MemberRemoved,
    SessionEnded,
    InviteRenewed,
    GuildRemoved,
}

impl EventKind {
    pub const ALL: [EventKind; 17] = [
        Self::RoomCreated,
        Self::RoomUpdated,
        Self::RoomDeleted,
        Self::RoomClosing,
        Self::VoiceJoined,
        Self::VoiceUpdated,
        Self::VoiceLeft,
        Self::RoomViewers,
        Self::Ping,
        Self::GatewayStatus,
        Self::GuildUpdated,
        Self::ChannelAccess,
        Self::MemberUpdated,
        Self::MemberRemoved,
        Self::SessionEnded,
        Self::InviteRenewed,
        Self::GuildRemoved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoomCreated => "room.created",
            Self::RoomUpdated => "room.updated",
            Self::RoomDeleted => "room.deleted",
            Self::RoomClosing => "room.closing",
            Self::VoiceJoined => "voice.joined",
            Self::VoiceUpdated => "voice.updated",
            Self::VoiceLeft => "voice.left",
            Self::RoomViewers => "room.viewers",
            Self::Ping => "ping",
            Self::GatewayStatus => "gateway.status",
            Self::GuildUpdated => "guild.updated",
            Self::ChannelAccess => "channel.access",
            Self::MemberUpdated => "member.updated",
            Self::MemberRemoved => "member.removed",
            Self::SessionEnded => "session.ended",
            Self::InviteRenewed => "invite.renewed",
            Self::GuildRemoved => "guild.removed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown event type {s:?} (one of {})", names.join(", "))
            })
    }
}

impl EventData {
    pub fn kind(&self) -> EventKind {
        match self {
            Self::RoomCreated { .. } => EventKind::RoomCreated,
            Self::RoomUpdated { .. } => EventKind::RoomUpdated,
            Self::RoomDeleted { .. } => EventKind::RoomDeleted,
            Self::RoomClosing { .. } => EventKind::RoomClosing,
            Self::VoiceJoined { .. } => EventKind::VoiceJoined,
            Self::VoiceUpdated { .. } => EventKind::VoiceUpdated,
            Self::VoiceLeft { .. } => EventKind::VoiceLeft,
            Self::RoomViewers { .. } => EventKind::RoomViewers,
            Self::Ping { .. } => EventKind::Ping,
            Self::GatewayStatus { .. } => EventKind::GatewayStatus,
            Self::GuildUpdated { .. } => EventKind::GuildUpdated,
            Self::ChannelAccess { .. } => EventKind::ChannelAccess,
            Self::MemberUpdated { .. } => EventKind::MemberUpdated,
            Self::MemberRemoved { .. } => EventKind::MemberRemoved,
            Self::SessionEnded { .. } => EventKind::SessionEnded,
            Self::InviteRenewed { .. } => EventKind::InviteRenewed,
            Self::GuildRemoved { .. } => EventKind::GuildRemoved,
        }
    }

    /// The room an event concerns, for `?room=` filtering; `None` for guild-wide events.
    pub fn channel_id(&self) -> Option<Id<ChannelMarker>> {
        match self {
            Self::RoomCreated { channel_id, .. }
            | Self::RoomUpdated { channel_id, .. }
            | Self::RoomDeleted { channel_id }
            | Self::RoomClosing { channel_id, .. }
            | Self::VoiceJoined { channel_id, .. }
            | Self::VoiceUpdated { channel_id, .. }
            | Self::VoiceLeft { channel_id, .. }
            | Self::RoomViewers { channel_id, .. }
            | Self::InviteRenewed { channel_id, .. }
            | Self::ChannelAccess { channel_id, .. } => Some(*channel_id),
            Self::Ping { .. }
            | Self::GatewayStatus { .. }
            | Self::GuildUpdated { .. }
            | Self::MemberUpdated { .. }
            | Self::MemberRemoved { .. }
            | Self::SessionEnded { .. }
            | Self::GuildRemoved { .. } => None,
        }
    }

    /// Who may receive the event on a stream.
    pub fn audience(&self) -> Audience {
        match self {
            Self::Ping { .. } | Self::GatewayStatus { .. } => Audience::Everyone,
            Self::GuildUpdated { .. }
            | Self::ChannelAccess { .. }
            | Self::MemberUpdated { .. }
            | Self::MemberRemoved { .. }
            | Self::SessionEnded { .. }
            | Self::GuildRemoved { .. } => Audience::Internal,
            _ => self
                .channel_id()
                .map_or(Audience::Internal, Audience::Channel),
        }
    }

    /// The `data` object alone, as JSON.
    pub fn data_json(&self) -> serde_json::Result<String> {
        let tagged = serde_json::to_value(self)?;
        serde_json::to_string(&tagged["data"])
    }

    /// Parses a `--type` and `--data` pair (the `coven publish` command line).
    pub fn from_parts(kind: &str, data: &str) -> Result<Self, String> {
        kind.parse::<EventKind>()?;
        let data: serde_json::Value =
            serde_json::from_str(data).map_err(|e| format!("--data is not JSON: {e}"))?;
        serde_json::from_value(serde_json::json!({"type": kind, "data": data}))
            .map_err(|e| format!("--data does not fit {kind}: {e}"))
    }
}

/// An appended event: its id, guild, time and data, plus its envelope JSON, built once.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: EventId,
    pub guild_id: Id<GuildMarker>,
    /// Unix milliseconds when it was appended.
    pub ts: u64,
    pub data: EventData,
    /// The envelope, exactly as stored and published.
    pub json: std::sync::Arc<str>,
    /// The W3C `traceparent` of the append, when it was traced: it travels beside the
    /// envelope (see [`Event::parse_message`]), never in what browsers receive.
    pub trace: Option<std::sync::Arc<str>>,
}

/// Envelope version.
pub const VERSION: u8 = 1;

/// Builds an envelope from its parts. `data_json` must be the JSON of the event's data.
pub fn envelope(
    id: EventId,
    kind: EventKind,
    guild_id: Id<GuildMarker>,
    ts: u64,
    data_json: &str,
) -> String {
    format!(
        r#"{{"v":{VERSION},"id":"{id}","type":"{kind}","guild_id":"{guild_id}","ts":{ts},"data":{data_json}}}"#
    )
}

#[derive(Deserialize)]
struct Wire {
    v: u8,
    id: EventId,
    guild_id: Id<GuildMarker>,
    ts: u64,
    #[serde(flatten)]
    data: EventData,
}

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed event envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unsupported event envelope version {0}")]
    Version(u8),
}

impl Event {
    /// Builds an event and its envelope.
    pub fn new(
        id: EventId,
        guild_id: Id<GuildMarker>,
        ts: u64,
        data: EventData,
    ) -> serde_json::Result<Self> {
        let json = envelope(id, data.kind(), guild_id, ts, &data.data_json()?);
        Ok(Self {
            id,
            guild_id,
            ts,
            data,
            json: json.into(),
            trace: None,
        })
    }

    /// Reads an envelope (from the stream or Pub/Sub), keeping its text to pass on.
    pub fn parse(json: &str) -> Result<Self, EnvelopeError> {
        let wire: Wire = serde_json::from_str(json)?;
        if wire.v != VERSION {
            return Err(EnvelopeError::Version(wire.v));
        }
        Ok(Self {
            id: wire.id,
            guild_id: wire.guild_id,
            ts: wire.ts,
            data: wire.data,
            json: json.into(),
            trace: None,
        })
    }

    /// Reads a Pub/Sub message: an envelope, or a `traceparent`, a newline and an
    /// envelope (a traced append's). An unreadable trace context is dropped, not the
    /// event: tracing must never cost an event.
    pub fn parse_message(message: &str) -> Result<Self, EnvelopeError> {
        if message.starts_with('{') {
            return Self::parse(message);
        }
        match message.split_once('\n') {
            Some((trace, json)) => {
                let mut event = Self::parse(json)?;
                event.trace = crate::telemetry::valid_traceparent(trace).map(Into::into);
                Ok(event)
            }
            _ => Self::parse(message),
        }
    }

    /// The same event carrying the trace context `trace`.
    pub fn traced(mut self, trace: Option<&str>) -> Self {
        self.trace = trace
            .and_then(crate::telemetry::valid_traceparent)
            .map(Into::into);
        self
    }

    pub fn kind(&self) -> EventKind {
        self.data.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined() -> EventData {
        EventData::VoiceJoined {
            channel_id: Id::new(10),
            user: Person {
                id: Id::new(20),
                username: "ash".into(),
                global_name: Some("Ash".into()),
                avatar_url: None,
            },
            flags: VoiceFlags {
                self_mute: true,
                ..VoiceFlags::default()
            },
        }
    }

    #[test]
    fn ids_order_parse_and_print() {
        let a: EventId = "1700000000000-0".parse().unwrap();
        let b: EventId = "1700000000000-1".parse().unwrap();
        let c: EventId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-1");
        assert_eq!(a.successor(), b);
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-1-1",
            " 1-1",
            "1-1 ",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
        }
        assert_eq!(
            EventId::next_after(a, 5),
            b,
            "a clock stepping back still moves forward"
        );
        assert_eq!(EventId::next_after(a, a.ms + 7).ms, a.ms + 7);
    }

    #[test]
    fn envelopes_have_the_documented_shape_and_round_trip() {
        let event = Event::new("5-1".parse().unwrap(), Id::new(7), 5, joined()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&event.json).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["id"], "5-1");
        assert_eq!(v["type"], "voice.joined");
        assert_eq!(v["guild_id"], "7");
        assert_eq!(v["ts"], 5);
        assert_eq!(v["data"]["channel_id"], "10");
        assert_eq!(v["data"]["user"]["id"], "20");
        assert_eq!(v["data"]["self_mute"], true);
        let back = Event::parse(&event.json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn a_message_carries_its_trace_beside_the_envelope_and_a_bad_one_costs_no_event() {
        let event = Event::new("5-1".parse().unwrap(), Id::new(7), 5, joined()).unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = Event::parse_message(&format!("{tp}\n{}", event.json)).unwrap();
        assert_eq!(traced.trace.as_deref(), Some(tp));
        assert_eq!(
            traced.json, event.json,
            "what streams get is the bare envelope"
        );
        assert_eq!(Event::parse_message(&event.json).unwrap(), event);
        for bad in ["not-a-traceparent", "00-zz-zz-01", ""] {
            let got = Event::parse_message(&format!("{bad}\n{}", event.json)).unwrap();
            assert_eq!((got.trace, got.id), (None, event.id), "{bad:?}");
        }
        for garbage in [
            tp.to_owned(),
            format!("{tp}\n{{"),
            "\n".to_owned(),
            String::new(),
        ] {
            assert!(Event::parse_message(&garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>().unwrap(), kind);
        }
        assert!("room.exploded".parse::<EventKind>().is_err());
    }

    #[test]
    fn publish_parts_are_checked() {
        let ok = EventData::from_parts("room.deleted", r#"{"channel_id":"12"}"#).unwrap();
        assert_eq!(ok.channel_id(), Some(Id::new(12)));
        assert!(EventData::from_parts("room.deleted", "{").is_err());
        assert!(EventData::from_parts("room.deleted", r#"{"channel_id":"0"}"#).is_err());
        assert!(EventData::from_parts("nope", "{}").is_err());
    }

    #[test]
    fn unknown_versions_are_refused() {
        let json =
            r#"{"v":2,"id":"1-0","type":"ping","guild_id":"1","ts":1,"data":{"seq":1,"ts":1}}"#;
        assert!(matches!(Event::parse(json), Err(EnvelopeError::Version(2))));
    }
}
