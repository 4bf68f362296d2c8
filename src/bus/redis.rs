//! The Redis bus: the `P:{G}:events` stream and Pub/Sub channel, the `P:{G}:rooms` /
//! `P:{G}:voice` snapshot hashes with `P:{G}:applied`, and leases — changed together by
//! scripts so every append is all-or-nothing and fenced writes are checked in Redis.
//!
//! Owns the key names, the scripts and the one Pub/Sub subscription per process. The
//! snapshot rules in `append.lua` mirror [`Snapshot::apply`](super::Snapshot::apply); a
//! test holds the two together. Must not decide what events mean.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::broadcast;
use twilight_model::channel::permission_overwrite::PermissionOverwrite;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};

use super::{
    Bus, BusError, BusResult, Fence, LIVE_BUFFER, RoomRecord, Since, Snapshot, Store, VoiceRecord,
};
use crate::access::MemberRecord;
use crate::event::{Event, EventData, EventId, Viewer};

/// A `P:{G}:channels` value: the `channel.access` data it was set from.
#[derive(serde::Deserialize)]
struct ChannelAccessRecord {
    channel_id: Id<ChannelMarker>,
    overwrites: Option<Vec<PermissionOverwrite>>,
}

const APPEND: &str = include_str!("append.lua");
const VIEWERS: &str = include_str!("viewers.lua");

const SNAPSHOT: &str = r#"
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), redis.call('GET', KEYS[3]) or '',
        redis.call('GET', KEYS[4]) or '', redis.call('HGETALL', KEYS[5])}
"#;

const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
local token = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

const PUT: &str = r#"
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"#;

struct Scripts {
    append: Script,
    viewers: Script,
    snapshot: Script,
    acquire: Script,
    renew: Script,
    release: Script,
    put: Script,
}

pub struct RedisBus {
    client: Client,
    prefix: String,
    guild_id: Id<GuildMarker>,
    max_len: u64,
    scripts: Arc<Scripts>,
    live: broadcast::Sender<Arc<Event>>,
}

/// Reconnect for ever, backing off up to two seconds: Redis outages are waited out.
fn policy() -> ReconnectPolicy {
    ReconnectPolicy::new_exponential(0, 50, 2_000, 2)
}

/// How long a command may wait for Redis (queued while reconnecting, or unanswered)
/// before its caller gets an error: the gateway and `publish`, which retry by themselves.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The same for a web replica, where a person waits on most commands: a page that cannot
/// have its data within a second says so (503) rather than hang. The replica's own tasks
/// (stream fan-out, presence, sweeper) retry failed commands, so they only retry sooner.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection with a command unanswered this long is dropped and re-made: a Redis that
/// vanished without closing its sockets (a network partition) is then noticed, and
/// [`Bus::reachable`] turns false, instead of every request waiting out its timeout.
fn unresponsive_after(command_timeout: Duration) -> Option<Duration> {
    (command_timeout < COMMAND_TIMEOUT).then_some(command_timeout * 2)
}

fn builder(url: &str, command_timeout: Duration) -> BusResult<Builder> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder.set_policy(policy());
    builder.with_connection_config(|c| {
        c.connection_timeout = Duration::from_secs(5);
        c.internal_command_timeout = Duration::from_secs(5);
        if let Some(max) = unresponsive_after(command_timeout) {
            c.unresponsive.max_timeout = Some(max);
            c.unresponsive.interval = command_timeout / 2;
        }
    });
    builder.with_performance_config(|p| {
        p.default_command_timeout = command_timeout;
    });
    Ok(builder)
}

/// The first connection's failure, said once and with what to check: over `rediss://` a
/// plain-text server never completes the handshake, and an untrusted certificate is
/// refused (nothing is ever sent in clear to a `rediss://` URL).
fn not_connected(url: &str, e: fred::error::Error) -> BusError {
    let target = url::Url::parse(url)
        .ok()
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or("?"),
                u.port().unwrap_or(6379)
            )
        })
        .unwrap_or_else(|| "the configured server".to_owned());
    let tls = url.starts_with("rediss");
    BusError::Connect(if tls {
        format!(
            "cannot reach Redis over TLS at {target} ({e}): check that it is a TLS port \
             and that its certificate is signed by a CA in the system roots or in SSL_CERT_FILE"
        )
    } else {
        format!("cannot reach Redis at {target} ({e})")
    })
}

/// A small connection pool for tower-sessions' Redis store, reconnecting like the bus.
/// Sessions are read and written only by requests: give it [`REQUEST_TIMEOUT`].
pub async fn session_pool(url: &str, command_timeout: Duration) -> BusResult<Pool> {
    let pool = builder(url, command_timeout)?.build_pool(4)?;
    pool.init().await.map_err(|e| not_connected(url, e))?;
    Ok(pool)
}

impl RedisBus {
    /// Connects, loads the scripts and starts the process's one live subscription.
    /// Commands wait up to [`COMMAND_TIMEOUT`].
    pub async fn connect(
        url: &str,
        prefix: &str,
        guild_id: Id<GuildMarker>,
        max_len: u64,
    ) -> BusResult<Self> {
        Self::connect_with_timeout(url, prefix, guild_id, max_len, COMMAND_TIMEOUT).await
    }

    /// [`connect`](Self::connect) with commands that give up after `command_timeout`.
    pub async fn connect_with_timeout(
        url: &str,
        prefix: &str,
        guild_id: Id<GuildMarker>,
        max_len: u64,
        command_timeout: Duration,
    ) -> BusResult<Self> {
        let builder = builder(url, command_timeout)?;
        let client = builder.build()?;
        client.init().await.map_err(|e| not_connected(url, e))?;
        let scripts = Arc::new(Scripts {
            append: Script::from_lua(APPEND),
            viewers: Script::from_lua(format!("{VIEWERS}\n{APPEND}")),
            snapshot: Script::from_lua(SNAPSHOT),
            acquire: Script::from_lua(ACQUIRE),
            renew: Script::from_lua(RENEW),
            release: Script::from_lua(RELEASE),
            put: Script::from_lua(PUT),
        });
        let live = broadcast::channel(LIVE_BUFFER).0;
        let bus = Self {
            client,
            prefix: prefix.to_owned(),
            guild_id,
            max_len,
            scripts,
            live,
        };
        let subscriber = builder.build_subscriber_client()?;
        subscriber.init().await.map_err(|e| not_connected(url, e))?;
        // Resubscribes after every reconnect; the task lives as long as the subscriber, so
        // its handle is not kept.
        drop(subscriber.manage_subscriptions());
        subscriber.subscribe(bus.key("events")).await?;
        let start: Option<String> = bus.client.get(bus.key("applied")).await?;
        let start = start.and_then(|s| s.parse().ok()).unwrap_or(EventId::ZERO);
        tokio::spawn(relay(bus.reader(), subscriber, start, bus.live.clone()));
        Ok(bus)
    }

    /// `P:{G}:<suffix>`: the braces keep one guild's keys in one cluster slot.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, self.guild_id)
    }

    /// KEYS 1-4 of the append script.
    fn append_keys(&self) -> Vec<String> {
        vec![
            self.key("events"),
            self.key("rooms"),
            self.key("voice"),
            self.key("applied"),
        ]
    }

    /// KEYS 6-8 of the append script.
    fn access_keys(&self) -> [String; 3] {
        [self.key("guild"), self.key("channels"), self.key("members")]
    }

    /// A handle for the relay task that reads the stream without owning the bus.
    fn reader(&self) -> Reader {
        Reader {
            client: self.client.clone(),
            events: self.key("events"),
        }
    }
}

/// Reads history for gap filling; shared by `since` and the relay.
#[derive(Clone)]
struct Reader {
    client: Client,
    events: String,
}

impl Reader {
    async fn since(&self, after: EventId, limit: usize) -> BusResult<Since> {
        let info: Result<Value, _> = self.client.xinfo_stream(&self.events, false, None).await;
        let info = match info {
            Ok(v) => v,
            Err(e) => {
                // No stream: nothing has been appended (since Redis last lost its
                // data), so only "from the start" continues. Asked rather than read from
                // the error's text.
                let exists: i64 = self.client.exists(&self.events).await?;
                if exists == 1 {
                    return Err(e.into());
                }
                return Ok(if after == EventId::ZERO {
                    Since::Events(Vec::new())
                } else {
                    Since::Gap
                });
            }
        };
        if trimmed_past(&info, after)? || ahead_of(&info, after)? {
            return Ok(Since::Gap);
        }
        let entries: Vec<(String, HashMap<String, String>)> = self
            .client
            .xrange(&self.events, format!("({after}"), "+", Some(limit as u64))
            .await?;
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let json = fields
                .get("e")
                .ok_or_else(|| BusError::Corrupt(format!("stream entry {id} has no field e")))?;
            let event = Event::parse(json)
                .map_err(|e| BusError::Corrupt(format!("stream entry {id}: {e}")))?;
            events.push(Arc::new(event));
        }
        Ok(Since::Events(events))
    }
}

/// Whether events after `after` may have been trimmed from the stream. Trimming
/// (`MAXLEN ~`) removes the oldest entries; Redis 7.0 records their count
/// (`entries-added` − `length`) but not their ids (`max-deleted-entry-id` moves only for
/// XDEL), so a reader is behind when it has not seen up to the entry just before the
/// oldest one kept. At worst a reader exactly at the last trimmed id resyncs needlessly.
fn trimmed_past(info: &Value, after: EventId) -> BusResult<bool> {
    let number = |v: Option<Value>| v.and_then(|v| v.as_u64()).unwrap_or(0);
    let id = |v: Option<Value>| -> BusResult<Option<EventId>> {
        match v.and_then(|v| v.as_string()) {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| BusError::Corrupt(format!("stream info id {s:?}"))),
        }
    };
    let mut fields = info_fields(info)?;
    let mut take = |name: &str| fields.remove(name);
    let length = number(take("length"));
    let added = number(take("entries-added"));
    let deleted = id(take("max-deleted-entry-id"))?.unwrap_or(EventId::ZERO);
    let first = id(take("recorded-first-entry-id"))?;
    let last = id(take("last-generated-id"))?.unwrap_or(EventId::ZERO);
    if after < deleted {
        return Ok(true);
    }
    if added <= length {
        return Ok(false); // nothing was ever trimmed
    }
    Ok(match first {
        Some(first) if length > 0 => after.successor() < first,
        _ => after < last,
    })
}

/// Whether `after` is past the newest id this log ever gave out: an id from another
/// log's history (Redis lost its data, or another deployment), which no replay can
/// continue from.
fn ahead_of(info: &Value, after: EventId) -> BusResult<bool> {
    let last = info_fields(info)?
        .remove("last-generated-id")
        .and_then(|v| v.as_string())
        .map(|s| s.parse::<EventId>())
        .transpose()
        .map_err(|_| BusError::Corrupt("stream info last-generated-id".to_owned()))?
        .unwrap_or(EventId::ZERO);
    Ok(after > last)
}

fn info_fields(info: &Value) -> BusResult<HashMap<String, Value>> {
    Ok(match info.clone() {
        Value::Map(map) => map
            .inner()
            .into_iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v)))
            .collect(),
        Value::Array(items) => {
            let mut fields = HashMap::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = k.as_string() {
                    fields.insert(k, v);
                }
            }
            fields
        }
        _ => return Err(BusError::Corrupt("XINFO STREAM answer".to_owned())),
    })
}

/// The one Pub/Sub subscription: parses each envelope once, drops duplicates, and fills
/// gaps from the stream after reconnects or when it fell behind, so receivers see every
/// id in order.
async fn relay(
    reader: Reader,
    subscriber: SubscriberClient,
    mut last: EventId,
    live: broadcast::Sender<Arc<Event>>,
) {
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    loop {
        // A reconnect is always noticed before messages of the new subscription (the
        // notice comes before fred resubscribes), so the gap is filled first.
        tokio::select! {
            biased;
            r = reconnects.recv() => match r {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    fill(&reader, &mut last, &live).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            m = messages.recv() => match m {
                Ok(message) => {
                    let Some(json) = message.value.as_str() else { continue };
                    match Event::parse(&json) {
                        Ok(event) if event.id > last => {
                            last = event.id;
                            let _ = live.send(Arc::new(event));
                        }
                        Ok(_) => {} // already delivered (from a gap fill)
                        Err(e) => tracing::warn!(error = %e, "skipping an unreadable message on the events channel"),
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "the live subscription fell behind; filling from the stream");
                    fill(&reader, &mut last, &live).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn fill(reader: &Reader, last: &mut EventId, live: &broadcast::Sender<Arc<Event>>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match reader.since(*last, 1_000).await {
            Ok(Since::Events(events)) => {
                let done = events.len() < 1_000;
                for event in events {
                    if event.id > *last {
                        *last = event.id;
                        let _ = live.send(event);
                    }
                }
                if done {
                    return;
                }
            }
            Ok(Since::Gap) => {
                tracing::error!(after = %last, "the log does not continue from the last relayed event (trimmed, or Redis lost its data); readers must resync");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stream to fill a gap; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[async_trait::async_trait]
impl Bus for RedisBus {
    async fn append(&self, data: EventData, fence: Option<&Fence>) -> BusResult<Arc<Event>> {
        let kind = data.kind();
        let data_json = data.data_json()?;
        let lease = fence.map_or_else(|| self.key("gateway:leader"), |f| self.key(&f.lease));
        let mut keys = self.append_keys();
        keys.push(lease);
        keys.extend(self.access_keys());
        let args = vec![
            fence.map(|f| f.token.clone()).unwrap_or_default(),
            kind.as_str().to_owned(),
            data_json,
            self.guild_id.to_string(),
            self.max_len.to_string(),
        ];
        let envelope: Option<String> = self
            .scripts
            .append
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        // The script answers nil only when the fence no longer holds its lease.
        let Some(envelope) = envelope else {
            return Err(BusError::Fenced(
                fence.map(|f| f.lease.clone()).unwrap_or_default(),
            ));
        };
        let event = Event::parse(&envelope)
            .map_err(|e| BusError::Corrupt(format!("appended envelope: {e}")))?;
        Ok(Arc::new(event))
    }

    async fn viewers(
        &self,
        channel: Id<ChannelMarker>,
        present: &[Viewer],
        gone: &[Viewer],
        ttl: Duration,
    ) -> BusResult<Option<Arc<Event>>> {
        let mut keys = self.append_keys();
        keys.push(self.key("gateway:leader"));
        keys.extend(self.access_keys());
        keys.push(self.key(&format!("viewers:{channel}")));
        let mut args = vec![
            String::new(),
            String::new(),
            String::new(),
            self.guild_id.to_string(),
            self.max_len.to_string(),
            channel.to_string(),
            ttl.as_millis().max(1).to_string(),
            present.len().to_string(),
        ];
        for v in present.iter().chain(gone) {
            args.push(serde_json::to_string(v)?);
        }
        let envelope: Option<String> = self
            .scripts
            .viewers
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        envelope
            .map(|envelope| {
                Event::parse(&envelope)
                    .map(Arc::new)
                    .map_err(|e| BusError::Corrupt(format!("appended envelope: {e}")))
            })
            .transpose()
    }

    async fn snapshot(&self) -> BusResult<Snapshot> {
        let keys = vec![
            self.key("rooms"),
            self.key("voice"),
            self.key("applied"),
            self.key("guild"),
            self.key("channels"),
        ];
        let parts: Vec<Value> = self
            .scripts
            .snapshot
            .evalsha_with_reload(&self.client, keys, Vec::<String>::new())
            .await?;
        let [rooms, voice, applied, guild, channels] = <[Value; 5]>::try_from(parts)
            .map_err(|_| BusError::Corrupt("snapshot script answer".to_owned()))?;
        let mut snapshot = Snapshot::default();
        for (id, json) in pairs(rooms) {
            let channel = id
                .parse()
                .map_err(|_| BusError::Corrupt(format!("{}: field {id:?}", self.key("rooms"))))?;
            let room: RoomRecord = serde_json::from_str(&json)
                .map_err(|e| BusError::Corrupt(format!("{} {id}: {e}", self.key("rooms"))))?;
            snapshot.rooms.insert(channel, room);
        }
        for (id, json) in pairs(voice) {
            let user = id
                .parse()
                .map_err(|_| BusError::Corrupt(format!("{}: field {id:?}", self.key("voice"))))?;
            let v: VoiceRecord = serde_json::from_str(&json)
                .map_err(|e| BusError::Corrupt(format!("{} {id}: {e}", self.key("voice"))))?;
            snapshot.voice.insert(user, v);
        }
        let guild = guild.as_string().unwrap_or_default();
        if !guild.is_empty() {
            snapshot.access.guild = Some(
                serde_json::from_str(&guild)
                    .map_err(|e| BusError::Corrupt(format!("{}: {e}", self.key("guild"))))?,
            );
        }
        for (id, json) in pairs(channels) {
            let access: ChannelAccessRecord = serde_json::from_str(&json)
                .map_err(|e| BusError::Corrupt(format!("{} {id}: {e}", self.key("channels"))))?;
            if let Some(overwrites) = access.overwrites {
                snapshot
                    .access
                    .channels
                    .insert(access.channel_id, overwrites);
            }
        }
        let applied = applied.as_string().unwrap_or_default();
        if !applied.is_empty() {
            snapshot.at = applied
                .parse()
                .map_err(|_| BusError::Corrupt(format!("{}: {applied:?}", self.key("applied"))))?;
        }
        Ok(snapshot)
    }

    async fn since(&self, after: EventId, limit: usize) -> BusResult<Since> {
        self.reader().since(after, limit).await
    }

    async fn holds(&self, id: EventId) -> BusResult<bool> {
        let entries: Vec<(String, HashMap<String, String>)> = self
            .client
            .xrange(self.key("events"), id.to_string(), id.to_string(), Some(1))
            .await?;
        Ok(!entries.is_empty())
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    fn reachable(&self) -> bool {
        self.client.is_connected()
    }

    async fn member(&self, user: Id<UserMarker>) -> BusResult<Option<MemberRecord>> {
        let raw: Option<String> = self
            .client
            .hget(self.key("members"), user.to_string())
            .await?;
        raw.map(|json| {
            serde_json::from_str(&json)
                .map_err(|e| BusError::Corrupt(format!("{} {user}: {e}", self.key("members"))))
        })
        .transpose()
    }

    async fn claim(&self, key: &str, ttl: Duration) -> BusResult<bool> {
        let set: Option<String> = self
            .client
            .set(
                self.key(key),
                "1",
                Some(Expiration::PX(
                    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                )),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        let keys = vec![self.key(name), self.key(&format!("{name}:epoch"))];
        let args = vec![holder.to_owned(), ttl.as_millis().to_string()];
        let token: Option<String> = self
            .scripts
            .acquire
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(token.map(|token| Fence {
            lease: name.to_owned(),
            epoch: token
                .split(':')
                .next()
                .and_then(|e| e.parse().ok())
                .unwrap_or(0),
            token,
        }))
    }

    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>> {
        let ms: i64 = self.client.pttl(self.key(name)).await?;
        // -2: no key; -1: no expiry (never set so by Coven).
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        let keys = vec![self.key(&fence.lease)];
        let args = vec![fence.token.clone(), ttl.as_millis().to_string()];
        let held: i64 = self
            .scripts
            .renew
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(held == 1)
    }

    async fn release(&self, fence: &Fence) -> BusResult<()> {
        let keys = vec![self.key(&fence.lease)];
        let _: i64 = self
            .scripts
            .release
            .evalsha_with_reload(&self.client, keys, vec![fence.token.clone()])
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for RedisBus {
    async fn put(
        &self,
        fence: Option<&Fence>,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> BusResult<()> {
        let lease = fence.map_or_else(|| self.key("gateway:leader"), |f| self.key(&f.lease));
        let keys = vec![self.key(key), lease];
        let args = vec![
            fence.map(|f| f.token.clone()).unwrap_or_default(),
            value.to_owned(),
            ttl.map(|t| t.as_millis().to_string()).unwrap_or_default(),
        ];
        let stored: i64 = self
            .scripts
            .put
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        if stored == 0 {
            return Err(BusError::Fenced(
                fence.map(|f| f.lease.clone()).unwrap_or_default(),
            ));
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> BusResult<Option<String>> {
        Ok(self.client.get(self.key(key)).await?)
    }
}

/// Name/value pairs of an HGETALL answer inside a script reply (a flat array).
fn pairs(value: Value) -> Vec<(String, String)> {
    match value {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|pair| Some((pair.first()?.as_string()?, pair.get(1)?.as_string()?)))
            .collect(),
        _ => Vec::new(),
    }
}
