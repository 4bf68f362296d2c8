//! The simulated Gateway v10 (JSON text frames): HELLO, IDENTIFY, READY + GUILD_CREATE,
//! heartbeats, sequence numbers, RESUME with replay, RECONNECT, INVALID_SESSION and
//! Discord's documented close codes.
//!
//! [`Hub`] owns the sessions and the live connections and numbers every dispatch; the
//! connection task only speaks the protocol. Must not change the guild: that is
//! [`super::world`]'s job, which hands its dispatches to [`Hub::dispatch`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use flate2::write::ZlibEncoder;
use flate2::{Compress, Compression, FlushCompress};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::sleep_until;

use super::world::Dispatch;
use super::{SESSION_START_TOTAL, Settings, Shared};

/// Gateway opcodes (Discord's numbering).
mod op {
    pub const DISPATCH: u8 = 0;
    pub const HEARTBEAT: u8 = 1;
    pub const IDENTIFY: u8 = 2;
    pub const PRESENCE_UPDATE: u8 = 3;
    pub const VOICE_STATE_UPDATE: u8 = 4;
    pub const RESUME: u8 = 6;
    pub const RECONNECT: u8 = 7;
    pub const REQUEST_GUILD_MEMBERS: u8 = 8;
    pub const INVALID_SESSION: u8 = 9;
    pub const HELLO: u8 = 10;
    pub const HEARTBEAT_ACK: u8 = 11;
    pub const REQUEST_SOUNDBOARD_SOUNDS: u8 = 31;
}

/// Close codes from Discord's documentation.
pub mod close {
    pub const UNKNOWN_ERROR: u16 = 4000;
    pub const UNKNOWN_OPCODE: u16 = 4001;
    pub const DECODE_ERROR: u16 = 4002;
    pub const NOT_AUTHENTICATED: u16 = 4003;
    pub const AUTHENTICATION_FAILED: u16 = 4004;
    pub const ALREADY_AUTHENTICATED: u16 = 4005;
    pub const INVALID_SEQ: u16 = 4007;
    pub const RATE_LIMITED: u16 = 4008;
    pub const SESSION_TIMED_OUT: u16 = 4009;
    pub const INVALID_SHARD: u16 = 4010;
    pub const SHARDING_REQUIRED: u16 = 4011;
    pub const INVALID_API_VERSION: u16 = 4012;
    pub const INVALID_INTENTS: u16 = 4013;
    pub const DISALLOWED_INTENTS: u16 = 4014;

    pub fn reason(code: u16) -> &'static str {
        match code {
            UNKNOWN_ERROR => "Unknown error.",
            UNKNOWN_OPCODE => "Unknown opcode.",
            DECODE_ERROR => "Decode error.",
            NOT_AUTHENTICATED => "Not authenticated.",
            AUTHENTICATION_FAILED => "Authentication failed.",
            ALREADY_AUTHENTICATED => "Already authenticated.",
            INVALID_SEQ => "Invalid seq.",
            RATE_LIMITED => "Rate limited.",
            SESSION_TIMED_OUT => "Session timed out.",
            INVALID_SHARD => "Invalid shard.",
            SHARDING_REQUIRED => "Sharding required.",
            INVALID_API_VERSION => "Invalid API version.",
            INVALID_INTENTS => "Invalid intent(s).",
            DISALLOWED_INTENTS => "Disallowed intent(s).",
            _ => "",
        }
    }

    /// Codes after which Discord's session cannot be resumed: 1000 and 1001 ("your
    /// session will be invalidated"), the two that say "start a new session" (4007,
    /// 4009), and those Gateway Close Event Codes mark not to reconnect with. After the
    /// other codes a client should "attempt to resume" ("Resuming", case 2), 4005 and
    /// 4008 included.
    pub fn ends_session(code: u16) -> bool {
        matches!(
            code,
            1000 | 1001 | AUTHENTICATION_FAILED | INVALID_SEQ | SESSION_TIMED_OUT
        ) || (INVALID_SHARD..=DISALLOWED_INTENTS).contains(&code)
    }
}

/// Intent bits the simulator cares about.
pub mod intents {
    pub const GUILDS: u64 = 1 << 0;
    pub const GUILD_MEMBERS: u64 = 1 << 1;
    pub const GUILD_PRESENCES: u64 = 1 << 8;
    pub const GUILD_VOICE_STATES: u64 = 1 << 7;
    pub const MESSAGE_CONTENT: u64 = 1 << 15;
    /// Every bit Discord defines.
    pub const VALID: u64 = ((1 << 17) - 1) | (1 << 20) | (1 << 21) | (1 << 24) | (1 << 25);
    /// Privileged intents, which the simulated application has not been granted.
    pub const PRIVILEGED: u64 = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT;

    /// The intent a dispatch needs; `0` means it is always sent. `bot` is the bot's user
    /// id: "Guild Member Update is sent for current-user updates regardless of whether the
    /// `GUILD_MEMBERS` intent is set" (Gateway, "Gateway Intents").
    pub fn required_for(event: &str, data: &serde_json::Value, bot: u64) -> u64 {
        match event {
            "READY" | "RESUMED" => 0,
            "GUILD_MEMBER_UPDATE" if super::is_user(data, bot) => 0,
            "VOICE_STATE_UPDATE" => GUILD_VOICE_STATES,
            "GUILD_MEMBER_ADD" | "GUILD_MEMBER_UPDATE" | "GUILD_MEMBER_REMOVE" => GUILD_MEMBERS,
            _ => GUILDS,
        }
    }
}

/// Payloads a client may send per minute before Discord closes with 4008.
const PAYLOAD_LIMIT: usize = 120;
/// Dispatches kept per session for RESUME replay.
const REPLAY_LOG: usize = 10_000;
/// One IDENTIFY per identify bucket in this long ("Session Start Limit Object":
/// `max_concurrency` is "the number of identify requests allowed per 5 seconds").
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(5);
/// How much closer than [`IDENTIFY_INTERVAL`] two IDENTIFYs of a bucket may arrive and
/// both be let in. A client that spaces them exactly 5 s apart on its own clock, as
/// twilight's queue does, must not be refused because the first took longer to arrive
/// than the second (Discord documents no tolerance, but refuses no such client).
pub const IDENTIFY_TOLERANCE: Duration = Duration::from_millis(500);
/// How long until `session_start_limit.remaining` is back to its total.
const SESSION_START_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// A session's shard as IDENTIFY gave it: `[shard_id, num_shards]`, `None` for a session
/// that sent none (it holds every guild).
pub type ShardKey = Option<[u64; 2]>;

/// What the hub tells a connection task to do.
#[derive(Debug)]
pub enum Out {
    /// A frame that is not a dispatch (op 1, 7, 9, 11).
    Frame(Arc<str>),
    /// A dispatch (op 0), the one frame payload compression applies to.
    Dispatch(Arc<str>),
    /// The session on this connection asked for payload compression (IDENTIFY's
    /// `compress`), or not; sent ahead of the session's first frame.
    PayloadCompression(bool),
    Close(u16),
}

#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<Out>,
    session: Option<String>,
    /// Zombie mode: heartbeats go unanswered on this connection.
    zombie: bool,
    /// A close is on its way: what the client sent after the payload that earned it
    /// must not still start or resume a session.
    closing: bool,
    /// The Gateway version of the URL (10 or 9), which READY's `v` tells back.
    version: u8,
    /// The shard this connection last identified or resumed as, for `/_sim/state`.
    shard: Option<ShardKey>,
}

#[derive(Debug)]
struct Session {
    intents: u64,
    /// IDENTIFY's `compress`, which a RESUME on another connection keeps.
    compress: bool,
    /// IDENTIFY's `[shard_id, num_shards]`, if it sent one.
    shard: Option<[u64; 2]>,
    seq: u64,
    log: VecDeque<(u64, Arc<str>)>,
    conn: Option<u64>,
    detached_at: Option<Instant>,
}

/// Counters the control API reports.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub connections: u64,
    /// Sessions started (accepted IDENTIFYs).
    pub identifies: u64,
    pub resumes: u64,
    pub last_sequence: u64,
    /// IDENTIFYs answered with op 9: too early for their bucket, or none left for the day.
    pub identify_rejected: u64,
    /// Connections that asked for `compress=zlib-stream` and `compress=zstd-stream`.
    pub zlib_stream_connections: u64,
    pub zstd_stream_connections: u64,
}

/// What `/_sim/state` reports of one shard, over all its sessions and connections.
#[derive(Debug, Default, Clone)]
struct ShardLog {
    identifies: u64,
    resumes: u64,
    last_sequence: u64,
    /// How each connection that identified or resumed as this shard ended.
    closes: Vec<u16>,
    /// Unix milliseconds of each accepted IDENTIFY.
    identified_at_ms: Vec<u64>,
}

/// Discord's session start limit and identify buckets.
#[derive(Debug, Default)]
struct StartLimit {
    max_concurrency: u64,
    remaining: u64,
    /// When the day's count started (the first IDENTIFY after a reset).
    period_start: Option<Instant>,
    /// When each bucket (`shard_id % max_concurrency`) last started a session.
    buckets: HashMap<u64, Instant>,
}

impl StartLimit {
    fn refresh(&mut self) {
        if self
            .period_start
            .is_some_and(|at| at.elapsed() >= SESSION_START_PERIOD)
        {
            self.period_start = None;
            self.remaining = SESSION_START_TOTAL;
        }
    }

    /// Milliseconds until `remaining` is back to the total.
    fn reset_after_ms(&mut self) -> u64 {
        self.refresh();
        let left = self.period_start.map_or(SESSION_START_PERIOD, |at| {
            SESSION_START_PERIOD.saturating_sub(at.elapsed())
        });
        left.as_millis() as u64
    }

    /// Takes a session start for an IDENTIFY with `shard`; false when Discord would refuse
    /// it: its bucket started a session less than 5 s ago, or none are left for the day.
    fn admit(&mut self, shard: ShardKey) -> bool {
        self.refresh();
        let bucket = shard.map_or(0, |[id, _]| id % self.max_concurrency.max(1));
        let now = Instant::now();
        // Discord does not say whether a refused IDENTIFY restarts its bucket's 5 s; here
        // only accepted ones do, so a client that waits 5 s after its last session start
        // (as twilight's queue does) is let in however many it had refused meanwhile.
        let too_early = self
            .buckets
            .get(&bucket)
            .is_some_and(|at| now.duration_since(*at) < IDENTIFY_INTERVAL - IDENTIFY_TOLERANCE);
        if self.remaining == 0 || too_early {
            return false;
        }
        self.remaining -= 1;
        self.period_start.get_or_insert(now);
        self.buckets.insert(bucket, now);
        true
    }
}

#[derive(Debug, Default)]
pub struct Hub {
    /// The bot's user id, whose own member updates every session gets.
    bot_id: u64,
    sessions: HashMap<String, Session>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    pub counters: Counters,
    resume_ttl: Duration,
    shards: BTreeMap<ShardKey, ShardLog>,
    limit: StartLimit,
}

impl Hub {
    pub fn new(settings: &Settings) -> Self {
        Self {
            bot_id: settings.client_id,
            resume_ttl: settings.resume_ttl,
            limit: StartLimit {
                max_concurrency: settings.max_concurrency,
                remaining: settings.session_start_remaining,
                ..StartLimit::default()
            },
            ..Self::default()
        }
    }

    /// GET /gateway/bot's `session_start_limit`.
    pub fn session_start_limit(&mut self) -> Value {
        let reset_after = self.limit.reset_after_ms();
        json!({
            "total": SESSION_START_TOTAL,
            "remaining": self.limit.remaining,
            "reset_after": reset_after,
            "max_concurrency": self.limit.max_concurrency,
        })
    }

    /// `/_sim/state`'s `gateway`: the counters and each shard's sessions, by shard.
    pub fn state_json(&self) -> Value {
        let mut body = serde_json::to_value(self.counters).unwrap_or_else(|_| json!({}));
        body["sessions"] = self
            .shards
            .iter()
            .map(|(shard, log)| {
                let connected = self
                    .conns
                    .values()
                    .any(|c| c.session.is_some() && c.shard == Some(*shard));
                json!({
                    "shard": shard,
                    "connected": connected,
                    "identifies": log.identifies,
                    "resumes": log.resumes,
                    "last_sequence": log.last_sequence,
                    "closes": log.closes,
                    "identified_at_ms": log.identified_at_ms,
                })
            })
            .collect();
        body
    }

    /// Control API: forget every session no connection holds, as Discord does some
    /// minutes after a disconnect; a RESUME of one then gets op 9 (not resumable).
    pub fn expire_detached(&mut self) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|_, s| s.conn.is_some());
        before - self.sessions.len()
    }

    fn open(&mut self, tx: mpsc::UnboundedSender<Out>) -> u64 {
        self.next_conn += 1;
        self.counters.connections += 1;
        self.conns.insert(
            self.next_conn,
            Conn {
                tx,
                session: None,
                zombie: false,
                closing: false,
                version: 10,
                shard: None,
            },
        );
        self.next_conn
    }

    /// Forgets a connection that ended with close `code` (1006: dropped without a close
    /// frame); its session stays resumable for `resume_ttl` unless the code ended it.
    fn closed(&mut self, conn_id: u64, code: u16) {
        let Some(conn) = self.conns.remove(&conn_id) else {
            return;
        };
        if let Some(shard) = conn.shard {
            self.shards.entry(shard).or_default().closes.push(code);
        }
        let Some(id) = conn.session else { return };
        let Some(s) = self
            .sessions
            .get_mut(&id)
            .filter(|s| s.conn == Some(conn_id))
        else {
            return;
        };
        // "When you close the connection to the gateway with close code 1000 or 1001, your
        // session will be invalidated"; "If you simply close the TCP connection or use a
        // different close code, the session will remain active" (Gateway, "Initiating a
        // Disconnect").
        if matches!(code, 1000 | 1001) {
            self.sessions.remove(&id);
        } else {
            s.conn = None;
            s.detached_at = Some(Instant::now());
        }
    }

    fn forget_expired(&mut self) {
        let ttl = self.resume_ttl;
        self.sessions
            .retain(|_, s| s.conn.is_some() || s.detached_at.is_none_or(|at| at.elapsed() < ttl));
    }

    /// The sessions that hold `guild` (by their shard) and whose intents include `need`.
    fn sessions_for(&self, guild: u64, need: u64) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|(_, s)| holds(s.shard, guild) && (need == 0 || s.intents & need != 0))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Numbers and delivers a guild's changes to every session that holds the guild and
    /// whose intents want them, including detached ones (for replay on RESUME).
    pub fn dispatch(&mut self, guild: u64, events: &[Dispatch]) {
        self.forget_expired();
        for event in events {
            let need = intents::required_for(event.name, &event.data, self.bot_id);
            for id in self.sessions_for(guild, need) {
                self.send_dispatch(&id, event.name, &event.data);
            }
        }
    }

    /// GUILD_CREATE for `guild` to the sessions that hold it, with voice states only for
    /// those with the voice-states intent (`payload(with_voice)` builds it).
    pub fn dispatch_guild_create(&mut self, guild: u64, payload: impl Fn(bool) -> Value) {
        self.forget_expired();
        for id in self.sessions_for(guild, intents::GUILDS) {
            let with_voice = self
                .sessions
                .get(&id)
                .is_some_and(|s| s.intents & intents::GUILD_VOICE_STATES != 0);
            self.send_dispatch(&id, "GUILD_CREATE", &payload(with_voice));
        }
    }

    fn send_dispatch(&mut self, session_id: &str, name: &str, data: &Value) {
        let Some(s) = self.sessions.get_mut(session_id) else {
            return;
        };
        s.seq += 1;
        let frame: Arc<str> = dispatch_frame(name, s.seq, data).into();
        s.log.push_back((s.seq, frame.clone()));
        if s.log.len() > REPLAY_LOG {
            s.log.pop_front();
        }
        self.counters.last_sequence = s.seq;
        self.shards.entry(s.shard).or_default().last_sequence = s.seq;
        // A zombied connection delivers nothing: the dispatch waits in the session's log
        // for the RESUME that follows, as what Discord sent into a dead connection is
        // replayed from the client's last sequence ("Resuming").
        if let Some(conn) = s
            .conn
            .and_then(|c| self.conns.get(&c))
            .filter(|c| !c.zombie)
        {
            let _ = conn.tx.send(Out::Dispatch(frame));
        }
    }

    /// Sends a frame that is not a dispatch ([`op_frame`]).
    fn send_op(&self, conn_id: u64, op: u8, d: Value) {
        if let Some(c) = self.conns.get(&conn_id).filter(|c| !c.zombie) {
            let _ = c.tx.send(Out::Frame(op_frame(op, d).into()));
        }
    }

    fn close(&mut self, conn_id: u64, code: u16) {
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.closing = true;
            let _ = c.tx.send(Out::Close(code));
        }
        if close::ends_session(code)
            && let Some(id) = self.conns.get(&conn_id).and_then(|c| c.session.clone())
        {
            self.sessions.remove(&id);
        }
    }

    /// Control API: close every live connection with `code`.
    pub fn disconnect_all(&mut self, code: u16) -> usize {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in &ids {
            self.close(*id, code);
        }
        ids.len()
    }

    /// Control API: send op 7 RECONNECT to every identified connection.
    pub fn reconnect_all(&mut self) -> usize {
        let mut n = 0;
        for (id, c) in &self.conns {
            if c.session.is_some() {
                self.send_op(*id, op::RECONNECT, Value::Null);
                n += 1;
            }
        }
        n
    }

    /// Control API: send op 9 INVALID_SESSION; a non-resumable one ends the sessions.
    ///
    /// Either way the connection no longer holds its session, so it may send what a new
    /// connection would: op 9 is sent when "the gateway has invalidated an active session
    /// and is requesting client action" (Gateway Events, "Invalid Session"), and a client
    /// that has been told `d: true` may RESUME ("Resuming", case 4), on this socket as on
    /// a new one; one told `d: false` may IDENTIFY again. Anything else before then is
    /// 4003: "this session has been invalidated" (Gateway Close Event Codes).
    pub fn invalidate_all(&mut self, resumable: bool) -> usize {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.session.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.send_op(*id, op::INVALID_SESSION, Value::Bool(resumable));
            let Some(session) = self.conns.get_mut(id).and_then(|c| c.session.take()) else {
                continue;
            };
            if resumable {
                // Kept for a RESUME: its dispatches are logged for the replay meanwhile.
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.conn = None;
                    s.detached_at = Some(Instant::now());
                }
            } else {
                self.sessions.remove(&session);
            }
        }
        ids.len()
    }

    /// Control API: send op 1, Discord asking for a heartbeat now ("Discord may request
    /// additional heartbeats from your app by sending a Heartbeat (opcode 1) event",
    /// Gateway, "Sending Heartbeats").
    pub fn request_heartbeat_all(&self) -> usize {
        for id in self.conns.keys() {
            self.send_op(*id, op::HEARTBEAT, Value::Null);
        }
        self.conns.len()
    }

    /// Control API: stop acknowledging heartbeats on the connections open now.
    pub fn zombify_all(&mut self) -> usize {
        for c in self.conns.values_mut() {
            c.zombie = true;
        }
        self.conns.len()
    }
}

/// Whether a session identified with `shard` receives `guild`'s events: Discord's
/// "Sharding" formula `shard_id = (guild_id >> 22) % num_shards`; a session that sent no
/// `shard` holds every guild.
pub fn holds(shard: Option<[u64; 2]>, guild: u64) -> bool {
    shard.is_none_or(|[id, count]| count > 0 && (guild >> 22) % count == id)
}

/// A frame that is not a dispatch. `s` and `t` are there, null: "`s` and `t` are null when
/// `op` is not 0" (Gateway Events, "Payload Structure"), and clients such as discord.py
/// read both from every frame.
fn op_frame(op: u8, d: Value) -> String {
    json!({"op": op, "d": d, "s": null, "t": null}).to_string()
}

/// Whether a member object (or anything with a `user`) is the user `id`'s.
fn is_user(data: &Value, id: u64) -> bool {
    data["user"]["id"]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        == Some(id)
}

/// A dispatch frame with Discord's key order (`t`, `s`, `op`, then `d`): twilight finds
/// the event type and sequence by scanning for these keys ahead of the payload.
fn dispatch_frame(name: &str, seq: u64, data: &Value) -> String {
    format!(
        r#"{{"t":{},"s":{seq},"op":{},"d":{data}}}"#,
        Value::from(name),
        op::DISPATCH
    )
}

// ---------------------------------------------------------------------------------------
// One WebSocket connection.

#[derive(Debug, Deserialize)]
struct Payload {
    op: u8,
    #[serde(default)]
    d: Value,
}

#[derive(Debug, Deserialize)]
struct Identify {
    token: String,
    intents: u64,
    #[serde(default)]
    shard: Option<[u64; 2]>,
    /// Payload compression ("Payload Compression").
    #[serde(default)]
    compress: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct Resume {
    token: String,
    session_id: String,
    seq: u64,
}

/// Query parameters the Gateway URL carries.
#[derive(Debug, Deserialize, Default)]
pub struct GatewayQuery {
    pub v: Option<String>,
    pub encoding: Option<String>,
    pub compress: Option<String>,
}

/// "Must not exceed 4096 bytes. If an event payload does exceed 4096 bytes, the connection
/// will be closed with a 4002 close event code" (Gateway, "Sending Events").
const MAX_PAYLOAD: usize = 4096;

/// The transport compression a connection asked for in its URL.
enum Transport {
    None,
    /// `compress=zlib-stream`: "a single Gateway connection using a shared zlib context",
    /// every message ending in the `Z_SYNC_FLUSH` suffix `00 00 ff ff`.
    Zlib(Compress),
    /// `compress=zstd-stream`: "a zstd decompression context that stays alive for the
    /// lifetime of the gateway connection"; "each websocket message corresponds to a
    /// single gateway message, but does not end a zstd frame" (Gateway, "zstd-stream"):
    /// one frame for the connection, flushed after each message. twilight asks it by
    /// default, and discord.py wherever it has zstd (Python 3.14, or `zstandard`).
    Zstd(Box<zstd::stream::raw::Encoder<'static>>),
}

/// Reads the URL's query as "Gateway URL Query String Params" lists it: the transport
/// compression, or the close code and reason to end the connection with before HELLO.
fn negotiate(query: &GatewayQuery) -> Result<(u8, Transport), (u16, &'static str)> {
    let version = match query.v.as_deref() {
        // Both "Available" ("API Versions"); what the simulator sends is the same in
        // both. Without `v` Discord would take its default, 6, which it does not simulate.
        Some("10") => 10,
        Some("9") => 9,
        _ => {
            return Err((
                close::INVALID_API_VERSION,
                "Invalid API version (the simulator speaks v=10 and v=9).",
            ));
        }
    };
    // Discord documents no answer to an encoding or compression it does not offer; a
    // decode error with a reason that says which parameter is as clear as a close gets.
    match query.encoding.as_deref() {
        None | Some("json") => {}
        Some("etf") => {
            return Err((
                close::DECODE_ERROR,
                "encoding=etf is not simulated: connect with encoding=json.",
            ));
        }
        Some(_) => {
            return Err((
                close::DECODE_ERROR,
                "Invalid encoding: json or etf, and the simulator speaks json.",
            ));
        }
    }
    match query.compress.as_deref() {
        None => Ok((version, Transport::None)),
        Some("zlib-stream") => Ok((
            version,
            Transport::Zlib(Compress::new(Compression::fast(), true)),
        )),
        Some("zstd-stream") => match zstd::stream::raw::Encoder::new(3) {
            Ok(encoder) => Ok((version, Transport::Zstd(Box::new(encoder)))),
            // Only out of memory; the client is told as it would be by any failure.
            Err(_) => Err((close::UNKNOWN_ERROR, "Could not start zstd-stream.")),
        },
        Some(_) => Err((
            close::DECODE_ERROR,
            "Invalid compress: zlib-stream or zstd-stream.",
        )),
    }
}

/// How frames go out on one connection (Gateway, "Encoding and Compression").
struct Encoder {
    transport: Transport,
    /// IDENTIFY's `compress: true`: dispatches go out each as a zlib stream of its own
    /// ("the gateway does not implement a shared compression context between events
    /// sent"; "not all payloads will be compressed": here only dispatches are). "Payload
    /// compression will be disabled if you use transport compression": it is ignored
    /// under either transport compression, which is how discord.py connects (both at
    /// once, zstd-stream where it has zstd).
    payload: bool,
}

impl Encoder {
    /// The message carrying `frame`; `None` if compressing it failed, after which the
    /// stream cannot go on.
    fn message(&mut self, frame: &str, dispatch: bool) -> Option<Message> {
        let compressed = match &mut self.transport {
            Transport::Zlib(stream) => sync_flush(stream, frame.as_bytes()),
            Transport::Zstd(stream) => zstd_flush(stream, frame.as_bytes()),
            Transport::None if self.payload && dispatch => zlib(frame.as_bytes()),
            Transport::None => return Some(Message::Text(Utf8Bytes::from(frame))),
        };
        compressed.map(|b| Message::Binary(b.into()))
    }
}

/// Deflates `input` through the connection's stream and flushes with `Z_SYNC_FLUSH`, so
/// the message ends on a byte boundary the client can inflate up to.
fn sync_flush(stream: &mut Compress, mut input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() / 4 + 64);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let before = stream.total_in();
        stream
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .ok()?;
        let used = usize::try_from(stream.total_in() - before).ok()?;
        input = input.get(used..)?;
        // Deflate stops short of the end of the buffer only once it has written the flush.
        if input.is_empty() && out.len() < out.capacity() {
            return Some(out);
        }
    }
}

/// Compresses `input` into the connection's zstd frame and flushes it, so the message
/// holds everything the client needs to decompress this gateway message, the frame left
/// open for the next.
fn zstd_flush(stream: &mut zstd::stream::raw::Encoder<'static>, input: &[u8]) -> Option<Vec<u8>> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut out: Vec<u8> = Vec::with_capacity(input.len() / 4 + 64);
    let mut src = InBuffer::around(input);
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        }
        let at = out.len();
        let mut dst = OutBuffer::around_pos(&mut out, at);
        if src.pos < input.len() {
            stream.run(&mut src, &mut dst).ok()?;
        } else if stream.flush(&mut dst).ok()? == 0 {
            return Some(out);
        }
    }
}

/// One payload as a complete zlib stream (RFC 1950), as payload compression sends it.
fn zlib(input: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut encoder = ZlibEncoder::new(
        Vec::with_capacity(input.len() / 4 + 64),
        Compression::fast(),
    );
    encoder.write_all(input).ok()?;
    encoder.finish().ok()
}

/// Speaks the Gateway protocol on one socket until either side closes it.
pub async fn serve_connection(shared: Arc<Shared>, mut socket: WebSocket, query: GatewayQuery) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn_id = shared.lock().hub.open(tx);
    let heartbeat = shared.settings.heartbeat_interval;

    let mut encoder = match negotiate(&query) {
        Ok((version, transport)) => {
            let mut state = shared.lock();
            if let Some(c) = state.hub.conns.get_mut(&conn_id) {
                c.version = version;
            }
            let counters = &mut state.hub.counters;
            match transport {
                Transport::Zlib(_) => counters.zlib_stream_connections += 1,
                Transport::Zstd(_) => counters.zstd_stream_connections += 1,
                Transport::None => {}
            }
            drop(state);
            Encoder {
                transport,
                payload: false,
            }
        }
        Err((code, reason)) => {
            send_close_with(&mut socket, code, reason).await;
            shared.lock().hub.closed(conn_id, code);
            return;
        }
    };

    let hello = op_frame(
        op::HELLO,
        json!({"heartbeat_interval": heartbeat.as_millis() as u64}),
    );
    let mut alive = match encoder.message(&hello, false) {
        Some(message) => socket.send(message).await.is_ok(),
        None => false,
    };
    // Discord ends a connection that stops heartbeating; allow generous slack for jitter.
    let grace = heartbeat + heartbeat / 2 + Duration::from_secs(1);
    let mut deadline = tokio::time::Instant::now() + grace;
    let mut window: VecDeque<Instant> = VecDeque::new();
    // How the connection ended, for `/_sim/state`: a socket that just goes away is 1006
    // (RFC 6455: closed without a close frame).
    let mut ended: u16 = 1006;

    while alive {
        tokio::select! {
            incoming = socket.recv() => {
                let text = match incoming {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        // The simulator speaks JSON only; ETF or compressed input is undecodable.
                        shared.lock().hub.close(conn_id, close::DECODE_ERROR);
                        continue;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        // A close frame without a code reads as 1005 (RFC 6455, 7.1.5).
                        ended = frame.map_or(1005, |f| f.code);
                        // WebSocket's closing handshake (RFC 6455 §5.5.1), as Discord
                        // does it: tungstenite queued the echo of the client's close
                        // frame; flushing sends it, so the client sees its close
                        // acknowledged, not a dropped connection.
                        let _ = futures_util::SinkExt::flush(&mut socket).await;
                        break;
                    }
                    None | Some(Err(_)) => break,
                };
                // "Apps can send 120 gateway events per connection every 60 seconds ...
                // Apps that surpass the limit are immediately disconnected" (Gateway,
                // "Rate Limiting"); heartbeats are gateway events too.
                let now = Instant::now();
                window.push_back(now);
                while window.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60)) {
                    window.pop_front();
                }
                if window.len() > PAYLOAD_LIMIT {
                    shared.lock().hub.close(conn_id, close::RATE_LIMITED);
                    continue;
                }
                if text.len() > MAX_PAYLOAD {
                    shared.lock().hub.close(conn_id, close::DECODE_ERROR);
                    continue;
                }
                if handle_payload(&shared, conn_id, &text) {
                    deadline = tokio::time::Instant::now() + grace;
                }
            }
            out = rx.recv() => {
                let (frame, dispatch) = match out {
                    Some(Out::Frame(frame)) => (frame, false),
                    Some(Out::Dispatch(frame)) => (frame, true),
                    Some(Out::PayloadCompression(on)) => {
                        encoder.payload = on;
                        continue;
                    }
                    Some(Out::Close(code)) => {
                        send_close(&mut socket, code).await;
                        ended = code;
                        break;
                    }
                    None => break,
                };
                match encoder.message(&frame, dispatch) {
                    Some(message) => alive = socket.send(message).await.is_ok(),
                    None => {
                        send_close(&mut socket, close::UNKNOWN_ERROR).await;
                        ended = close::UNKNOWN_ERROR;
                        break;
                    }
                }
            }
            () = sleep_until(deadline) => {
                shared.lock().hub.close(conn_id, close::SESSION_TIMED_OUT);
                deadline = tokio::time::Instant::now() + grace;
            }
            () = shared.shutdown.cancelled() => {
                send_close(&mut socket, 1001).await;
                ended = 1001;
                break;
            }
        }
    }
    shared.lock().hub.closed(conn_id, ended);
}

async fn send_close(socket: &mut WebSocket, code: u16) {
    send_close_with(socket, code, close::reason(code)).await;
}

async fn send_close_with(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Handles one client payload. Returns true when it was a heartbeat.
fn handle_payload(shared: &Shared, conn_id: u64, text: &str) -> bool {
    let mut state = shared.lock();
    let state = &mut *state;
    if state.hub.conns.get(&conn_id).is_none_or(|c| c.closing) {
        return false;
    }
    let Ok(payload) = serde_json::from_str::<Payload>(text) else {
        state.hub.close(conn_id, close::DECODE_ERROR);
        return false;
    };
    let identified = state
        .hub
        .conns
        .get(&conn_id)
        .is_some_and(|c| c.session.is_some());
    match payload.op {
        op::HEARTBEAT if !fits(op::HEARTBEAT, &payload.d) => {
            state.hub.close(conn_id, close::UNKNOWN_OPCODE);
        }
        op::HEARTBEAT => {
            let zombie = state.hub.conns.get(&conn_id).is_none_or(|c| c.zombie);
            if !zombie {
                state.hub.send_op(conn_id, op::HEARTBEAT_ACK, Value::Null);
            }
            return true;
        }
        op::IDENTIFY if identified => state.hub.close(conn_id, close::ALREADY_AUTHENTICATED),
        // A well-formed payload whose `d` does not fit its opcode is 4001: "an invalid
        // payload for an opcode" (Gateway Close Event Codes); 4002 is for what cannot be
        // decoded at all.
        op::IDENTIFY => match serde_json::from_value::<Identify>(payload.d) {
            Err(_) => state.hub.close(conn_id, close::UNKNOWN_OPCODE),
            Ok(identify) => {
                if !shared.settings.token_matches(&identify.token) {
                    state.hub.close(conn_id, close::AUTHENTICATION_FAILED);
                } else if identify.intents & !intents::VALID != 0 {
                    state.hub.close(conn_id, close::INVALID_INTENTS);
                } else if identify.intents & intents::PRIVILEGED != 0 {
                    state.hub.close(conn_id, close::DISALLOWED_INTENTS);
                } else if identify
                    .shard
                    .is_some_and(|[id, count]| count == 0 || id >= count)
                {
                    state.hub.close(conn_id, close::INVALID_SHARD);
                } else {
                    if let Some(c) = state.hub.conns.get_mut(&conn_id) {
                        c.shard = Some(identify.shard);
                    }
                    let held = state
                        .guilds()
                        .filter(|w| w.bot_in() && holds(identify.shard, w.guild_id))
                        .count();
                    // "Each shard can only support a maximum of 2500 guilds" (Sharding);
                    // only the count one session would hold matters, not `num_shards`
                    // itself: sessions of any `num_shards` may run side by side.
                    if held as u64 > shared.settings.max_guilds_per_shard {
                        state.hub.close(conn_id, close::SHARDING_REQUIRED);
                    } else if !state.hub.limit.admit(identify.shard) {
                        // Too early for the bucket: "If your app exceeds this limit, Discord
                        // will respond with a Invalid Session (opcode 9) event" (Identifying).
                        // No sessions left for the day: Discord documents only the
                        // aftermath ("all active sessions for the app will be terminated,
                        // the bot token will be reset"), not the answer to the IDENTIFY
                        // itself; the simulator refuses it the same way, with op 9 (not
                        // resumable), and neither ends the other sessions nor resets the
                        // token.
                        state.hub.counters.identify_rejected += 1;
                        state
                            .hub
                            .send_op(conn_id, op::INVALID_SESSION, Value::Bool(false));
                    } else {
                        start_session(shared, state, conn_id, identify);
                    }
                }
            }
        },
        op::RESUME if identified => state.hub.close(conn_id, close::ALREADY_AUTHENTICATED),
        op::RESUME => match serde_json::from_value::<Resume>(payload.d) {
            Err(_) => state.hub.close(conn_id, close::UNKNOWN_OPCODE),
            Ok(resume) if !shared.settings.token_matches(&resume.token) => {
                state.hub.close(conn_id, close::AUTHENTICATION_FAILED);
            }
            Ok(resume) => resume_session(&mut state.hub, conn_id, resume),
        },
        op::PRESENCE_UPDATE
        | op::VOICE_STATE_UPDATE
        | op::REQUEST_GUILD_MEMBERS
        | op::REQUEST_SOUNDBOARD_SOUNDS => {
            if !identified {
                state.hub.close(conn_id, close::NOT_AUTHENTICATED);
            } else if !fits(payload.op, &payload.d) {
                state.hub.close(conn_id, close::UNKNOWN_OPCODE);
            } else if payload.op == op::VOICE_STATE_UPDATE {
                bot_voice(state, conn_id, &payload.d);
            } else if payload.op == op::REQUEST_GUILD_MEMBERS {
                member_chunk(state, conn_id, &payload.d);
            }
            // Presences and soundboard sounds are not simulated (docs/simulator.md).
        }
        _ => state.hub.close(conn_id, close::UNKNOWN_OPCODE),
    }
    false
}

/// The guild a send event names, if the connection's session holds it (its shard), with
/// that session's id and intents.
fn held_guild(hub: &Hub, conn_id: u64, d: &Value) -> Option<(u64, String, u64)> {
    let guild = d.get("guild_id").and_then(super::world::id_from_json)?;
    let session = hub.conns.get(&conn_id)?.session.as_ref()?;
    let s = hub.sessions.get(session)?;
    holds(s.shard, guild).then(|| (guild, session.clone(), s.intents))
}

/// Update Voice State (op 4): the bot joins, moves in or leaves voice as a user's client
/// does, with the same checks (View Channel and Connect, the user limit), and every
/// session holding the guild gets its VOICE_STATE_UPDATE. Discord answers a refused join
/// with nothing, and so does the simulator. The VOICE_SERVER_UPDATE that would follow
/// belongs to voice transport, which is not simulated: a library waiting for it to open a
/// voice connection times out (docs/simulator.md, "What it does not do").
fn bot_voice(state: &mut super::State, conn_id: u64, d: &Value) {
    let Some((guild, _, _)) = held_guild(&state.hub, conn_id, d) else {
        return;
    };
    let channel = d.get("channel_id").and_then(super::world::id_from_json);
    let flag = |k: &str| d.get(k).and_then(Value::as_bool).unwrap_or(false);
    let Some(w) = state.guild_mut(guild) else {
        return;
    };
    let flags = super::world::VoiceFlags {
        self_mute: flag("self_mute"),
        self_deaf: flag("self_deaf"),
        ..w.voice
            .get(&w.bot_id)
            .map(|v| v.flags.clone())
            .unwrap_or_default()
    };
    let bot = w.bot_id;
    if let Ok(events) = w.user_voice(bot, channel, flags) {
        state.emit_in(guild, &events);
    }
}

/// Request Guild Members (op 8): GUILD_MEMBERS_CHUNK with the members asked for, by
/// `user_ids` (at most 100; unknown ones in `not_found`) or by a username prefix in
/// `query` (at most 100), with the request's `nonce` when it is 32 bytes or fewer.
/// "GUILD_MEMBERS intent is required to request the entire member list" (`query` "" with
/// `limit` 0), and the simulated application is never granted it: such a request is
/// closed with 4014 Disallowed intent(s), Discord's code for an intent the app may not
/// use. Presences are not simulated, so `presences` is answered as Discord answers it
/// without GUILD_PRESENCES: "it will always be false".
fn member_chunk(state: &mut super::State, conn_id: u64, d: &Value) {
    let Some((guild, session, intents)) = held_guild(&state.hub, conn_id, d) else {
        return;
    };
    let query = d.get("query").and_then(Value::as_str);
    let limit = d.get("limit").and_then(Value::as_u64).unwrap_or(0);
    let ids: Option<Vec<u64>> = d.get("user_ids").map(|v| match v {
        Value::Array(list) => list.iter().filter_map(super::world::id_from_json).collect(),
        one => super::world::id_from_json(one).into_iter().collect(),
    });
    if ids.is_none() && query == Some("") && limit == 0 && intents & intents::GUILD_MEMBERS == 0 {
        state.hub.close(conn_id, close::DISALLOWED_INTENTS);
        return;
    }
    let Some(w) = state.guild(guild) else {
        return;
    };
    let (members, not_found): (Vec<Value>, Vec<Value>) = match ids {
        Some(ids) => {
            let mut found = Vec::new();
            let mut missing = Vec::new();
            for id in ids.into_iter().take(100) {
                match w.member_json(id) {
                    Some(m) => found.push(m),
                    None => missing.push(json!(id.to_string())),
                }
            }
            (found, missing)
        }
        None => {
            let prefix = query.unwrap_or("").to_lowercase();
            let cap = if limit == 0 { 100 } else { limit.min(100) } as usize;
            let found = w
                .members
                .keys()
                .filter(|id| {
                    w.users
                        .get(id)
                        .is_some_and(|u| u.username.to_lowercase().starts_with(&prefix))
                })
                .take(cap)
                .filter_map(|id| w.member_json(*id))
                .collect();
            (found, Vec::new())
        }
    };
    let mut chunk = json!({
        "guild_id": guild.to_string(),
        "members": members,
        "chunk_index": 0,
        "chunk_count": 1,
    });
    if !not_found.is_empty() {
        chunk["not_found"] = Value::Array(not_found);
    }
    // "Nonce can only be up to 32 bytes. If you send an invalid nonce it will be ignored."
    if let Some(nonce) = d
        .get("nonce")
        .and_then(Value::as_str)
        .filter(|n| n.len() <= 32)
    {
        chunk["nonce"] = json!(nonce);
    }
    state
        .hub
        .send_dispatch(&session, "GUILD_MEMBERS_CHUNK", &chunk);
}

/// Whether `d` has the fields "Gateway Events" lists for the send event `op`, with their
/// types; Discord closes with 4001 when it does not ("an invalid payload for an opcode";
/// an Update Presence without `since`, say, is closed so: discord-api-docs issues 2226 and
/// 3854).
fn fits(op: u8, d: &Value) -> bool {
    fn snowflake(v: &Value) -> bool {
        v.as_str().is_some_and(|s| s.parse::<u64>().is_ok()) || v.is_u64()
    }
    fn snowflakes(v: &Value) -> bool {
        v.as_array().is_some_and(|a| a.iter().all(snowflake))
    }
    fn null_or(v: &Value, ok: fn(&Value) -> bool) -> bool {
        v.is_null() || ok(v)
    }
    let has = |key: &str, ok: fn(&Value) -> bool| d.get(key).is_some_and(ok);
    match op {
        // "the last sequence number ... If you have not yet received one, send null".
        op::HEARTBEAT => null_or(d, Value::is_u64),
        op::PRESENCE_UPDATE => {
            has("since", |v| null_or(v, Value::is_u64))
                && has("activities", Value::is_array)
                && has("status", Value::is_string)
                && has("afk", Value::is_boolean)
        }
        op::VOICE_STATE_UPDATE => {
            has("guild_id", snowflake)
                && has("channel_id", |v| null_or(v, snowflake))
                && has("self_mute", Value::is_boolean)
                && has("self_deaf", Value::is_boolean)
        }
        op::REQUEST_GUILD_MEMBERS => {
            has("guild_id", snowflake)
                && ((has("query", Value::is_string) && has("limit", Value::is_u64))
                    || has("user_ids", |v| snowflake(v) || snowflakes(v)))
        }
        op::REQUEST_SOUNDBOARD_SOUNDS => has("guild_ids", snowflakes),
        _ => true,
    }
}

fn start_session(shared: &Shared, state: &mut super::State, conn_id: u64, identify: Identify) {
    let session_id = super::ids::random_hex(16);
    state.hub.counters.identifies += 1;
    let log = state.hub.shards.entry(identify.shard).or_default();
    log.identifies += 1;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    log.identified_at_ms.push(now_ms);
    let compress = identify.compress.unwrap_or(false);
    state.hub.sessions.insert(
        session_id.clone(),
        Session {
            intents: identify.intents,
            compress,
            shard: identify.shard,
            seq: 0,
            log: VecDeque::new(),
            conn: Some(conn_id),
            detached_at: None,
        },
    );
    if let Some(c) = state.hub.conns.get_mut(&conn_id) {
        c.session = Some(session_id.clone());
        let _ = c.tx.send(Out::PayloadCompression(compress));
    }
    let world = &state.world;
    // READY lists every guild of the session as unavailable; a GUILD_CREATE follows for
    // each that is available ("Ready": `guilds` are Unavailable Guild objects).
    let guilds: Vec<&super::world::World> = state
        .guilds()
        .filter(|w| w.bot_in() && holds(identify.shard, w.guild_id))
        .collect();
    let mut ready = json!({
        "v": state.hub.conns.get(&conn_id).map_or(10, |c| c.version),
        "user": world.user_json(world.bot_id).map(|mut u| {
            u["mfa_enabled"] = json!(false);
            u["verified"] = json!(true);
            u
        }),
        "guilds": guilds
            .iter()
            .map(|w| json!({"id": w.guild_id.to_string(), "unavailable": true}))
            .collect::<Vec<_>>(),
        "session_id": session_id,
        "resume_gateway_url": shared.gateway_url(),
        "application": {"id": shared.settings.client_id.to_string(), "flags": 0},
        "private_channels": [],
        "presences": [],
        "relationships": [],
        "_trace": ["coven-sim"],
    });
    if let Some(shard) = identify.shard {
        ready["shard"] = json!(shard);
    }
    let with_voice = identify.intents & intents::GUILD_VOICE_STATES != 0;
    let creates: Vec<Value> = if identify.intents & intents::GUILDS != 0 {
        guilds
            .iter()
            .filter(|w| !w.unavailable)
            .map(|w| w.guild_create_json(with_voice))
            .collect()
    } else {
        Vec::new()
    };
    state.hub.send_dispatch(&session_id, "READY", &ready);
    for guild in creates {
        state.hub.send_dispatch(&session_id, "GUILD_CREATE", &guild);
    }
}

fn resume_session(hub: &mut Hub, conn_id: u64, resume: Resume) {
    let ttl = hub.resume_ttl;
    let Some(session) = hub.sessions.get_mut(&resume.session_id) else {
        hub.send_op(conn_id, op::INVALID_SESSION, Value::Bool(false));
        return;
    };
    let expired =
        session.conn.is_none() && session.detached_at.is_some_and(|at| at.elapsed() >= ttl);
    if !expired && resume.seq > session.seq {
        // A sequence the session never sent: "Invalid seq: The sequence sent when
        // resuming the session was invalid. Reconnect and start a new session" (Gateway
        // Close Event Codes).
        hub.sessions.remove(&resume.session_id);
        hub.close(conn_id, close::INVALID_SEQ);
        return;
    }
    let oldest = session.log.front().map_or(session.seq + 1, |(s, _)| *s);
    if expired || resume.seq + 1 < oldest {
        // Too late, or the missed events are no longer kept: "It's possible your app
        // won't reconnect in time to Resume, in which case it will receive an Invalid
        // Session (opcode 9)" (Gateway, "Resuming").
        hub.sessions.remove(&resume.session_id);
        hub.send_op(conn_id, op::INVALID_SESSION, Value::Bool(false));
        return;
    }
    // A session moves to the newest connection; Discord drops the older one.
    let previous = session.conn.replace(conn_id);
    session.detached_at = None;
    let shard = session.shard;
    let compress = session.compress;
    let replay: Vec<Arc<str>> = session
        .log
        .iter()
        .filter(|(s, _)| *s > resume.seq)
        .map(|(_, f)| f.clone())
        .collect();
    if let Some(prev) = previous.filter(|p| *p != conn_id)
        && let Some(c) = hub.conns.get_mut(&prev)
    {
        c.session = None;
        c.closing = true;
        let _ = c.tx.send(Out::Close(close::UNKNOWN_ERROR));
    }
    if let Some(c) = hub.conns.get_mut(&conn_id) {
        c.session = Some(resume.session_id.clone());
        c.shard = Some(shard);
        let _ = c.tx.send(Out::PayloadCompression(compress));
        for frame in replay {
            let _ = c.tx.send(Out::Dispatch(frame));
        }
    }
    hub.counters.resumes += 1;
    hub.shards.entry(shard).or_default().resumes += 1;
    hub.send_dispatch(
        &resume.session_id,
        "RESUMED",
        &json!({"_trace": ["coven-sim"]}),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharded_session_holds_the_guilds_discords_formula_gives_it() {
        use crate::sim::defaults::{GUILD_ID, NIGHT_OWLS_GUILD_ID, generated_guild_id};
        assert!(holds(None, GUILD_ID) && holds(None, NIGHT_OWLS_GUILD_ID));
        // (guild_id >> 22) % num_shards: the two seeded guilds sit on different shards.
        assert!(holds(Some([0, 2]), GUILD_ID) && !holds(Some([1, 2]), GUILD_ID));
        assert!(holds(Some([1, 2]), NIGHT_OWLS_GUILD_ID));
        assert!(!holds(Some([0, 2]), NIGHT_OWLS_GUILD_ID));
        assert!(holds(Some([0, 1]), NIGHT_OWLS_GUILD_ID));
        // Generated guilds take consecutive shards.
        let shards: Vec<u64> = (0..6)
            .map(|i| {
                (0..3)
                    .find(|s| holds(Some([*s, 3]), generated_guild_id(i)))
                    .unwrap()
            })
            .collect();
        assert_eq!(shards.iter().filter(|s| **s == 0).count(), 2);
        assert_eq!(shards.iter().filter(|s| **s == 2).count(), 2);
        assert!(!holds(Some([0, 0]), GUILD_ID));
    }
    #[test]
    fn identify_buckets_and_the_days_session_starts() {
        let mut limit = StartLimit {
            max_concurrency: 2,
            remaining: 3,
            ..StartLimit::default()
        };
        assert!(limit.admit(Some([0, 4])));
        assert!(!limit.admit(Some([2, 4])), "bucket 0 again within 5 s");
        assert!(!limit.admit(None), "an unsharded session is bucket 0");
        assert!(limit.admit(Some([1, 4])), "bucket 1");
        assert_eq!(limit.remaining, 1, "refusals start no session");
        // Still too early just before the tolerance starts (back-dated, not waited for).
        let nearly = IDENTIFY_INTERVAL - IDENTIFY_TOLERANCE - Duration::from_millis(100);
        if let Some(past) = Instant::now().checked_sub(nearly) {
            limit.buckets.insert(0, past);
            assert!(!limit.admit(None));
        }
        // Five seconds on, bucket 0 may start again.
        if let Some(past) = Instant::now().checked_sub(IDENTIFY_INTERVAL) {
            limit.buckets.insert(0, past);
            assert!(limit.admit(None));
            assert_eq!(limit.remaining, 0);
        }
        limit.buckets.clear();
        limit.remaining = 0;
        assert!(!limit.admit(Some([0, 4])), "none left for the day");
        assert!(limit.reset_after_ms() <= SESSION_START_PERIOD.as_millis() as u64);
        if let Some(yesterday) = Instant::now().checked_sub(SESSION_START_PERIOD) {
            limit.period_start = Some(yesterday);
            assert!(limit.admit(Some([0, 4])), "a new day");
            assert_eq!(limit.remaining, SESSION_START_TOTAL - 1);
        }
    }

    #[test]
    fn zlib_stream_messages_end_in_the_sync_flush_suffix_and_inflate_in_turn() {
        // Text that barely compresses, so the output outgrows its first buffer.
        let mut x: u32 = 7;
        let noisy: String = (0..100_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from(b'!' + ((x >> 16) % 90) as u8)
            })
            .collect();
        let mut deflate = Compress::new(Compression::fast(), true);
        let mut inflate = flate2::Decompress::new(true);
        for message in [r#"{"op":10}"#, noisy.as_str(), "", r#"{"op":11}"#] {
            let bytes = sync_flush(&mut deflate, message.as_bytes()).unwrap();
            assert!(bytes.ends_with(&[0, 0, 0xff, 0xff]));
            let mut out = Vec::with_capacity(message.len() + 64);
            inflate
                .decompress_vec(&bytes, &mut out, flate2::FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, message.as_bytes());
        }
    }

    use serde::de::DeserializeSeed;
    use twilight_model::gateway::event::{GatewayEvent, GatewayEventDeserializer};

    #[test]
    fn dispatch_frames_are_read_by_twilights_scanner() {
        let world = crate::sim::world::World::seeded(5, 6);
        let lobby = world.lobby_id;
        let mut world = world;
        let user = *world.members.keys().find(|u| **u != 6).unwrap();
        let events = world
            .user_voice(user, Some(lobby), Default::default())
            .unwrap();
        let frame = dispatch_frame(events[0].name, 7, &events[0].data);
        let de = GatewayEventDeserializer::from_json(&frame).unwrap();
        assert_eq!((de.op(), de.event_type()), (0, Some("VOICE_STATE_UPDATE")));
        let mut json = serde_json::Deserializer::from_str(&frame);
        let event = de.deserialize(&mut json).unwrap();
        assert!(matches!(event, GatewayEvent::Dispatch(7, _)));
    }
}
