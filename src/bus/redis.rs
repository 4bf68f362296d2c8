//! The Redis bus: the `P:{G}:events` stream and Pub/Sub channel, the `P:{G}:rooms` /
//! `P:{G}:voice` snapshot hashes with `P:{G}:applied`, and leases — changed together by
//! scripts so every append is all-or-nothing and fenced writes are checked in Redis.
//!
//! Owns the key names, the scripts and the process's connections ([`Redis`]: one command
//! client, one appender, one subscriber, however many guilds); a guild's bus
//! ([`RedisBus`]) is a view of them with that guild's keys. A guild's live events come
//! through a sharded Pub/Sub subscription (`SSUBSCRIBE P:{G}:events`) made when someone in
//! the process first watches it and dropped a little after the last stops, so a process's
//! cost does not grow with guilds nobody on it watches. The snapshot rules in
//! `append.lua` mirror [`Snapshot::apply`](super::Snapshot::apply); a test holds the two
//! together. Must not decide what events mean.
//!
//! Durable appends (`REDIS_MIN_REPLICAS` > 0): a primary acknowledges a write before its
//! replicas have it, and a failover in between loses it. So an append is withheld: the
//! script adds it to the stream and the snapshot but does not publish it; the appender
//! then asks `WAIT` whether enough replicas hold it, and only then moves `P:{G}:durable`
//! up to its id and publishes every withheld event up to there, in id order (`RELEASE`).
//! Readers never pass `P:{G}:durable`: replay reads the stream only up to it, and a
//! snapshot valid at a later id waits until it is durable. So no reader is ever given an
//! event that a failover can take back. Because the replication stream is one ordered
//! log, a replica holding an event holds every event with a smaller id, which is why one
//! watermark suffices whoever appended them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::cluster::ClusterRouting;
use fred::types::scripts::Script;
use tokio::sync::{broadcast, mpsc};
use twilight_model::channel::permission_overwrite::PermissionOverwrite;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};

use super::{
    Bus, BusError, BusResult, Fence, GuildEntry, LIVE_BUFFER, Request, RoomRecord, Since, Snapshot,
    Store, VoiceRecord,
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
        redis.call('GET', KEYS[4]) or '', redis.call('HGETALL', KEYS[5]), redis.call('GET', KEYS[6]) or ''}
"#;

/// After a `WAIT` said enough replicas hold every write up to `ARGV[1]`: moves the durable
/// id there and publishes the withheld events up to it, in id order. Idempotent; a
/// durable id lost in a failover only makes events be published again, which readers
/// drop by id.
/// KEYS: 1 events stream (and channel), 2 durable id. ARGV: 1 the id now durable.
const RELEASE_DURABLE: &str = r#"
local function parse(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if ms then return tonumber(ms), tonumber(seq) end
  return 0, 0
end
local d = redis.call('GET', KEYS[2]) or '0-0'
local dms, dseq = parse(d)
local ms, seq = parse(ARGV[1])
if ms < dms or (ms == dms and seq <= dseq) then return 0 end
local entries = redis.call('XRANGE', KEYS[1], '(' .. d, ARGV[1])
for _, entry in ipairs(entries) do
  local fields = entry[2]
  local envelope, trace
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then envelope = fields[i + 1] end
    if fields[i] == 't' then trace = fields[i + 1] end
  end
  if envelope and trace then
    redis.call('SPUBLISH', KEYS[1], trace .. '\n' .. envelope)
  elseif envelope then
    redis.call('SPUBLISH', KEYS[1], envelope)
  end
end
redis.call('SET', KEYS[2], ARGV[1])
return #entries
"#;

/// Where the append scripts take the W3C `traceparent` (`ARGV[9]`, 0-based here).
const TRACE_ARG: usize = 8;

/// The last applied id, read with a write (to a key of its own) so that the connection's
/// replication offset covers every event up to it: a `WAIT` after it then tells whether
/// replicas hold them all. KEYS: 1 applied id, 2 the probe key.
const MARK: &str = r#"
local applied = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[2], applied or '', 'PX', 60000)
return applied
"#;

const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
local token = epoch .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"#;

// Redis's own clock decides who is alive, so gateway processes on machines whose clocks
// disagree still agree on it.
const BEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
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

/// Adds or refreshes a registry entry unless one written under a higher epoch stands.
/// KEYS: 1 the registry. ARGV: 1 guild id, 2 entry JSON ('' to remove), 3 the epoch.
const REGISTER: &str = r#"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local ok, old = pcall(cjson.decode, raw)
  if ok and type(old) == 'table' and (tonumber(old.epoch) or 0) > tonumber(ARGV[3]) then
    return 0
  end
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"#;

/// Raises a guild's epoch to at least ARGV[1]. KEYS: 1 `P:{G}:epoch`.
const RAISE_EPOCH: &str = r#"
local epoch = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tonumber(ARGV[1]) > epoch then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"#;

/// A guild's keys that stay until removed (the rest expire by themselves: viewer sets,
/// request names, claims, the web's leases), given a grace period when the bot is removed.
const GUILD_KEYS: [&str; 13] = [
    "events",
    "rooms",
    "voice",
    "applied",
    "guild",
    "channels",
    "members",
    DURABLE,
    "epoch",
    // One guild's gateway kept these; an upgraded deployment still has them.
    "gateway:session",
    "gateway:status",
    "gateway:leader:epoch",
    "rooms:sweeper:epoch",
];

struct Scripts {
    register: Script,
    raise_epoch: Script,
    append: Script,
    viewers: Script,
    snapshot: Script,
    acquire: Script,
    renew: Script,
    release: Script,
    put: Script,
    release_durable: Script,
    mark: Script,
    beat: Script,
}

impl Scripts {
    fn load() -> Self {
        Scripts {
            register: Script::from_lua(REGISTER),
            raise_epoch: Script::from_lua(RAISE_EPOCH),
            append: Script::from_lua(APPEND),
            viewers: Script::from_lua(format!("{VIEWERS}\n{APPEND}")),
            snapshot: Script::from_lua(SNAPSHOT),
            acquire: Script::from_lua(ACQUIRE),
            renew: Script::from_lua(RENEW),
            release: Script::from_lua(RELEASE),
            put: Script::from_lua(PUT),
            release_durable: Script::from_lua(RELEASE_DURABLE),
            mark: Script::from_lua(MARK),
            beat: Script::from_lua(BEAT),
        }
    }
}

/// How many replicas must hold an append before it counts as done and may be published
/// (`REDIS_MIN_REPLICAS`; 0: at once), and how long one `WAIT` for them may take
/// (`REDIS_REPLICA_TIMEOUT`).
///
/// Declared once here and flattened into every command that appends (gateway, web,
/// publish), so the setting is the same everywhere it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct Durability {
    /// Replicas that must hold an event before it counts as appended and reaches
    /// streams (0: none, at once; 1 with Sentinel; 0–16)
    // Set alike on every command: a writer at 0 marks the log durable up to its own events.
    #[arg(long = "redis-min-replicas", env = "REDIS_MIN_REPLICAS", default_value = "0", value_parser = crate::config::parse_number_in::<u32>(0, 16))]
    pub min_replicas: u32,
    /// How long one WAIT for those replicas may take before the append is retried
    /// (10ms–10s)
    // Each WAIT holds the append connection; past 10 s a frozen replica would hold every
    // writer that long between retries.
    #[arg(long = "redis-replica-timeout", env = "REDIS_REPLICA_TIMEOUT", default_value = "1s", value_parser = crate::config::parse_duration_in(Duration::from_millis(10), Duration::from_secs(10)))]
    pub timeout: Duration,
}

impl Durability {
    pub const OFF: Durability = Durability {
        min_replicas: 0,
        timeout: Duration::from_secs(1),
    };
}

/// One process's connections to Redis, shared by every guild it serves: the command
/// client, the appender (a connection of its own when appends `WAIT` for replicas), and
/// one subscriber for sharded Pub/Sub (one connection per primary, however many guilds it
/// watches). [`Redis::guild`] gives the bus of one guild.
pub struct Redis {
    client: Client,
    /// Runs appends and their `WAIT`s. `WAIT` counts the replicas that hold the writes of
    /// the connection it is sent on, and blocks that connection: with durability on this
    /// is a client of its own, so pages and leases never queue behind a `WAIT`.
    appender: Client,
    subscriber: SubscriberClient,
    durability: Durability,
    prefix: String,
    max_len: u64,
    scripts: Arc<Scripts>,
    /// Names this process's unnamed appends (with `appends`), so that one fred sends
    /// again is recognised: see [`Bus::append`] below.
    name: String,
    appends: AtomicU64,
    /// The guilds watched live, by channel: where the one subscriber's messages go.
    watched: Arc<Mutex<HashMap<String, Watched>>>,
    /// Held while a guild's first subscription is made, so it is made once.
    subscribing: tokio::sync::Mutex<()>,
    /// How long a guild nobody here watches stays subscribed, in ms.
    unwatch_after: AtomicU64,
    /// `holds` questions on their way to Redis, by guild and id: see [`Holds`].
    holds: Holds,
    /// What `P:control` says, to whoever in this process listens.
    control: broadcast::Sender<Arc<EventData>>,
    /// Subscribed to `P:control` (once, on the first listener).
    control_subscribed: tokio::sync::OnceCell<()>,
    /// On a Redis Cluster: the primary (`host:port`) each subscribed channel was last
    /// subscribed on, which [`watch`] compares with the cluster's routing.
    owners: Mutex<HashMap<String, Option<String>>>,
    /// A host of the cluster URL: what `CLUSTER SLOTS` entries without a host mean.
    seed_host: String,
}

/// `XRANGE id id` questions shared by the streams that ask about the same id while one
/// is waiting to go: a wave of reconnecting browsers resumes from one or a few ids, and
/// each stream asking Redis for itself was most of what opening one cost. A stream only
/// joins a question not yet sent, so its answer is never older than its request; one
/// that comes while the question is out waits for the next, which goes when the answer
/// is in (so at most two are out per id).
#[derive(Clone, Default)]
struct Holds(Arc<std::sync::Mutex<Flights>>);

/// The questions waiting or out, by guild and id.
type Flights = HashMap<(Id<GuildMarker>, EventId), Flight>;

type HoldsAnswer = futures_util::future::Shared<
    futures_util::future::BoxFuture<'static, Result<bool, fred::error::Error>>,
>;

struct Flight {
    /// Told apart from the flight that replaces it under the same id.
    number: u64,
    /// Set just before the question goes to Redis: from then on, no one joins.
    sent: Arc<std::sync::atomic::AtomicBool>,
    answer: HoldsAnswer,
}

/// Flights kept at most; past it the ones already sent are forgotten (their askers hold
/// their own handle), so an id asked once and abandoned cannot stay for ever.
const HOLDS_KEPT: usize = 1024;

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Flights> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to "does `guild`'s log hold `id`", shared with whoever else is about to
    /// ask.
    fn ask(
        &self,
        client: &Client,
        guild: Id<GuildMarker>,
        key: impl FnOnce() -> String,
        id: EventId,
    ) -> HoldsAnswer {
        use futures_util::FutureExt;
        static NUMBERS: AtomicU64 = AtomicU64::new(0);
        let mut flights = self.lock();
        let before = match flights.get(&(guild, id)) {
            Some(f) if !f.sent.load(Ordering::SeqCst) => return f.answer.clone(),
            Some(f) => Some(f.answer.clone()),
            None => None,
        };
        if flights.len() >= HOLDS_KEPT {
            flights.retain(|_, f| !f.sent.load(Ordering::SeqCst));
        }
        let number = NUMBERS.fetch_add(1, Ordering::Relaxed);
        let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (client, key, this, going) = (client.clone(), key(), self.clone(), sent.clone());
        let answer = async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            going.store(true, Ordering::SeqCst);
            // Only whether an entry came back matters: left as a `Value`, its fields are
            // not parsed.
            let entries: Result<Value, _> = client
                .xrange(key, id.to_string(), id.to_string(), Some(1))
                .await;
            let mut flights = this.lock();
            if flights
                .get(&(guild, id))
                .is_some_and(|f| f.number == number)
            {
                flights.remove(&(guild, id));
            }
            match entries? {
                Value::Array(entries) => Ok(!entries.is_empty()),
                Value::Null => Ok(false),
                other => Err(fred::error::Error::new(
                    fred::error::ErrorKind::Parse,
                    format!("XRANGE answered {:?}", other.kind()),
                )),
            }
        }
        .boxed()
        .shared();
        flights.insert(
            (guild, id),
            Flight {
                number,
                sent,
                answer: answer.clone(),
            },
        );
        answer
    }
}

/// A guild watched live by this process.
struct Watched {
    /// Its messages, in arrival order, to the guild's relay.
    messages: mpsc::Sender<String>,
    /// Set when a message could not be queued: the relay fills from the log.
    lagged: Arc<AtomicBool>,
    /// Every receiver of the guild's events in this process.
    live: broadcast::Sender<Arc<Event>>,
    /// Set by [`watch`] while the guild's subscription is made again.
    resync: Arc<Resync>,
}

/// How [`watch`] and a guild's relay hand over a subscription made again (after a
/// reconnect, a failover or a slot migration).
///
/// A subscription that died loses what was published until it is made again, and the
/// only way to find out what was lost is to read the log *after* it is made again:
/// read before, an event published between the read and the new `SSUBSCRIBE` would be
/// skipped, because the next live event's id would make it look delivered. So while
/// `holding`, the relay drops live messages (each was published before it arrived, so
/// before the fill that follows reads the log, which then delivers it); once the
/// subscription is back, the watcher sets the guild's `lagged`, then clears `holding`,
/// then wakes the relay, which fills from the log before it delivers anything newer.
#[derive(Default)]
struct Resync {
    holding: AtomicBool,
    wake: tokio::sync::Notify,
}

/// The bus of one guild: its keys (`P:{G}:*`, in one cluster slot), over the process's
/// shared [`Redis`] connections.
#[derive(Clone)]
pub struct RedisBus {
    redis: Arc<Redis>,
    guild_id: Id<GuildMarker>,
}

impl std::ops::Deref for RedisBus {
    type Target = Redis;

    fn deref(&self) -> &Redis {
        &self.redis
    }
}

/// Messages the live subscription may hold before the relay takes them.
const RELAY_BUFFER: usize = 1024;

/// Reconnect for ever, backing off up to half a second: Redis outages are waited out.
/// A failover is over (a replica promoted, or a Sentinel naming it) a moment after the
/// last failed attempt; a longer back-off only adds its wait on top (with two seconds a
/// cluster primary's kill paused appends about 5.5 s for a 2 s `cluster-node-timeout`).
/// A few connection attempts a second per client cost a Redis that is down nothing.
fn policy() -> ReconnectPolicy {
    ReconnectPolicy::new_exponential(0, 50, 500, 2)
}

/// How long a command may wait for Redis (queued while reconnecting, or unanswered)
/// before its caller gets an error: the gateway and `publish`, which retry by themselves.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The same for a web replica, where a person waits on most commands: a page that cannot
/// have its data within a second says so (503) rather than hang. The replica's own tasks
/// (stream fan-out, presence, sweeper) retry failed commands, so they only retry sooner.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection with a command unanswered this long is dropped and re-made, whatever the
/// command timeout: a Redis that stopped answering without closing its sockets (a hung or
/// frozen process, a partition) is then noticed, [`Bus::reachable`] turns false, and fred
/// reconnects (on a cluster, reading the topology again and finding the promoted
/// replica) instead of every command on that socket waiting out its timeout for as long
/// as the node sleeps. Blocking commands (`WAIT`) are not counted by fred.
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(2);

fn unresponsive_after(command_timeout: Duration) -> Duration {
    (command_timeout * 2).min(UNRESPONSIVE_AFTER)
}

fn builder(url: &str, command_timeout: Duration) -> BusResult<Builder> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder.set_policy(policy());
    builder.with_connection_config(|c| {
        c.connection_timeout = Duration::from_secs(5);
        c.internal_command_timeout = Duration::from_secs(5);
        let max = unresponsive_after(command_timeout);
        c.unresponsive.max_timeout = Some(max);
        c.unresponsive.interval = max / 4;
    });
    builder.with_performance_config(|p| {
        p.default_command_timeout = command_timeout;
    });
    Ok(builder)
}

/// Restarts a fred client's connection task whenever it ends with an error, for as long
/// as the process runs.
///
/// fred 10.1 ends the task for good on some routing errors, reconnect policy or not:
/// during a slot migration a command redirected with `ASK` whose `ASKING` runs out of
/// attempts makes the router return the error, disconnect from every node and stop, and
/// every later command waits out its timeout (seen on a local cluster: a writer dead
/// for minutes after one `CLUSTER SETSLOT … MIGRATING`). Commands sent meanwhile stay
/// queued and go once the task is back. A task that ends without an error was closed on
/// purpose (`QUIT`) and stays closed.
fn keep_routing_from<C>(client: C, task: fred::types::ConnectHandle, what: &'static str)
where
    C: ClientLike + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut task = task;
        loop {
            match task.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => {
                    tracing::warn!(client = what, error = %e, "the Redis connection task stopped; restarting it");
                }
                Err(e) => {
                    tracing::warn!(client = what, error = %e, "the Redis connection task failed; restarting it");
                }
            }
            metrics::counter!("coven_redis_client_restarts_total").increment(1);
            tokio::time::sleep(Duration::from_millis(100)).await;
            task = client.connect();
        }
    });
}

/// The oldest Redis with sharded Pub/Sub (`SPUBLISH`, `SSUBSCRIBE`), which the live path
/// uses on every kind of deployment (standalone, Sentinel, Cluster) alike.
const MIN_REDIS: (u32, u32) = (7, 0);

/// Refuses, with one line, a Redis older than [`MIN_REDIS`]: the append script would fail
/// on its first `SPUBLISH` and streams would hear nothing.
async fn require_sharded_pubsub(client: &Client) -> BusResult<()> {
    // On a cluster every primary is asked: a guild whose slot is on an older node would
    // fail there alone.
    let primaries = if client.is_clustered() {
        client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if primaries.is_empty() {
        let info: String = client.info(Some(fred::types::InfoKind::Server)).await?;
        return check_version(&info, None);
    }
    for node in primaries {
        let info: String = client
            .with_cluster_node(node.clone())
            .info(Some(fred::types::InfoKind::Server))
            .await?;
        check_version(&info, Some(&node))?;
    }
    Ok(())
}

fn check_version(info: &str, node: Option<&fred::types::config::Server>) -> BusResult<()> {
    let version = redis_version(info);
    let node = node.map_or_else(String::new, |n| format!(" at {}:{}", n.host, n.port));
    match version {
        Some(v) if v >= MIN_REDIS => Ok(()),
        _ => Err(BusError::Connect(format!(
            "Redis{node} {} is too old: Coven needs Redis {}.{} or newer (sharded Pub/Sub)",
            version.map_or_else(
                || "of unknown version".to_owned(),
                |(a, b)| format!("{a}.{b}")
            ),
            MIN_REDIS.0,
            MIN_REDIS.1,
        ))),
    }
}

/// `redis_version:7.0.15` from `INFO server`, as (major, minor).
fn redis_version(info: &str) -> Option<(u32, u32)> {
    let raw = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = raw.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
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
    let refused = ["WRONGPASS", "NOAUTH", "NOPERM"]
        .iter()
        .any(|code| e.details().contains(code));
    BusError::Connect(if refused {
        format!(
            "Redis at {target} refused the credentials in REDIS_URL ({e}): check the user and password"
        )
    } else if tls {
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
    for client in pool.clients() {
        let task = client.init().await.map_err(|e| not_connected(url, e))?;
        keep_routing_from(client.clone(), task, "sessions");
    }
    Ok(pool)
}

impl Redis {
    /// Connects, checks the server's version and loads nothing yet (scripts load on first
    /// use). Nothing is subscribed until a guild's bus is asked for live events.
    pub async fn connect(
        url: &str,
        prefix: &str,
        max_len: u64,
        command_timeout: Duration,
        durability: Durability,
    ) -> BusResult<Arc<Self>> {
        let mut builder = builder(url, command_timeout)?;
        let client = builder.build()?;
        let task = client.init().await.map_err(|e| not_connected(url, e))?;
        keep_routing_from(client.clone(), task, "commands");
        require_sharded_pubsub(&client).await?;
        let appender = if durability.min_replicas > 0 {
            // Its commands include a WAIT of up to `durability.timeout`.
            let appender = self::builder(url, command_timeout + durability.timeout)?.build()?;
            let task = appender.init().await.map_err(|e| not_connected(url, e))?;
            keep_routing_from(appender.clone(), task, "appends");
            appender
        } else {
            client.clone()
        };
        let scripts = Arc::new(Scripts::load());
        // fred hands messages on through a broadcast of 32 by default: a dispatch held up
        // for a moment by a busy replica (a burst to thousands of streams) would lag and
        // every guild would fill from the log, a Redis round trip on top of the delay. A
        // second of events at a thousand a second fits in this.
        builder.with_performance_config(|p| p.broadcast_channel_capacity = RELAY_BUFFER);
        let subscriber = builder.build_subscriber_client()?;
        let task = subscriber.init().await.map_err(|e| not_connected(url, e))?;
        keep_routing_from(subscriber.clone(), task, "subscriptions");
        // Taken once connected: fred announces its first connections as reconnects too,
        // and a resubscription then would fill a first relay from the log for nothing.
        // Not fred's `manage_subscriptions()`: it resubscribes, but nothing tells a
        // guild's relay when the subscription is back, and the relay must read the log
        // only then (see [`Resync`]); [`watch`] does both.
        let reconnects = subscriber.reconnect_rx();
        let watched: Arc<Mutex<HashMap<String, Watched>>> = Arc::default();
        let control = broadcast::channel(CONTROL_BUFFER).0;
        tokio::spawn(dispatch(
            subscriber.clone(),
            watched.clone(),
            (format!("{prefix}:{}", super::CONTROL), control.clone()),
        ));
        let seed_host = match &client.client_config().server {
            fred::types::config::ServerConfig::Clustered { hosts, .. } => hosts
                .first()
                .map(|h| h.host.to_string())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let redis = Arc::new(Redis {
            client,
            appender,
            subscriber,
            durability,
            prefix: prefix.to_owned(),
            max_len,
            scripts,
            name: format!("{:016x}", rand::random::<u64>()),
            appends: AtomicU64::new(0),
            watched,
            subscribing: tokio::sync::Mutex::new(()),
            unwatch_after: AtomicU64::new(UNWATCH_AFTER.as_millis() as u64),
            holds: Holds::default(),
            control,
            control_subscribed: tokio::sync::OnceCell::new(),
            owners: Mutex::default(),
            seed_host,
        });
        tokio::spawn(watch(Arc::downgrade(&redis), reconnects));
        Ok(redis)
    }

    /// The bus of one guild, sharing these connections.
    pub fn guild(self: &Arc<Self>, guild_id: Id<GuildMarker>) -> RedisBus {
        RedisBus {
            redis: self.clone(),
            guild_id,
        }
    }

    /// Guilds this process watches live.
    pub fn watched(&self) -> usize {
        lock(&self.watched).len()
    }

    /// How long a guild nobody here watches stays subscribed (default 30 s); tests
    /// shorten it. Applies to subscriptions made afterwards.
    pub fn set_unwatch_after(&self, after: Duration) {
        self.unwatch_after
            .store(after.as_millis().max(1) as u64, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RedisBus {
    /// Connects and gives the bus of `guild_id`. Commands wait up to
    /// [`COMMAND_TIMEOUT`].
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
        Self::connect_durable(
            url,
            prefix,
            guild_id,
            max_len,
            command_timeout,
            Durability::OFF,
        )
        .await
    }

    /// [`connect_with_timeout`](Self::connect_with_timeout) with appends that count as
    /// done only once `durability` says so.
    pub async fn connect_durable(
        url: &str,
        prefix: &str,
        guild_id: Id<GuildMarker>,
        max_len: u64,
        command_timeout: Duration,
        durability: Durability,
    ) -> BusResult<Self> {
        let redis = Redis::connect(url, prefix, max_len, command_timeout, durability).await?;
        Ok(redis.guild(guild_id))
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

    /// KEYS 5-11 and ARGV 6-8 of the append script (after the first four keys and five
    /// arguments): the writer's lease, the access keys, the durable id, the request and
    /// the guild's epoch.
    fn append_tail(
        &self,
        fence: Option<&Fence>,
        request: Option<&Request>,
        keys: &mut Vec<String>,
        args: &mut Vec<String>,
    ) {
        keys.push(fence.map_or_else(|| self.key("gateway:leader"), |f| self.key(&f.lease)));
        keys.extend(self.access_keys());
        keys.push(self.key(DURABLE));
        keys.push(self.key(&format!(
            "appended:{}",
            request.map_or("-", |r| r.writer.as_str())
        )));
        keys.push(self.key("epoch"));
        args.push(if self.durability.min_replicas > 0 {
            "1".to_owned()
        } else {
            String::new()
        });
        args.push(request.map_or_else(String::new, Request::id));
        args.push(
            fence
                .filter(|f| f.by_epoch)
                .map_or_else(String::new, |f| f.epoch.to_string()),
        );
        // The caller's span (a dispatch's append, an HTTP request) when traced.
        args.push(crate::telemetry::traceparent().unwrap_or_default());
    }

    /// Runs the append script (or the viewers script in front of it) on the appender.
    async fn run_append(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BusResult<Option<Arc<Event>>> {
        let trace = args.get(TRACE_ARG).filter(|t| !t.is_empty()).cloned();
        let envelope: Option<String> = if self.durability.min_replicas == 0 {
            script
                .evalsha_with_reload(&self.appender, keys, args)
                .await?
        } else {
            self.proven(script, keys, args).await?.convert()?
        };
        let Some(envelope) = envelope else {
            return Ok(None);
        };
        let event = Event::parse(&envelope)
            .map_err(|e| BusError::Corrupt(format!("appended envelope: {e}")))?
            .traced(trace.as_deref());
        self.release_up_to(event.id).await?;
        Ok(Some(Arc::new(event)))
    }

    /// The cluster slot of every key of this guild.
    fn slot(&self) -> u16 {
        fred::util::redis_keyslot(self.key("events").as_bytes())
    }

    /// Runs `script` (which writes) and proves that `REDIS_MIN_REPLICAS` replicas of the
    /// primary that ran it hold its writes: [`BusError::NotDurable`] when `WAIT` falls
    /// short, [`BusError::Unproven`] when it cannot tell.
    ///
    /// `WAIT` counts the replicas holding the writes *of the connection it is sent on*,
    /// so it proves something only on the connection that ran the script, on the
    /// primary that ran it. Two ways it silently proved nothing: on a cluster fred sends a
    /// command without keys to one node of its own choosing (the first of its
    /// connections, whatever the guild), where `WAIT` answers at once; and after a
    /// reconnect (a failover, a dropped socket) fred sends a queued or unanswered `WAIT`
    /// again on a new connection, which has written nothing, so `WAIT` counts every
    /// replica at once: an append only the old primary held was acknowledged. So the
    /// four commands go together to the guild's slot, the script and `WAIT` between two
    /// `CLIENT INFO`s, and count only if both name the same connection (its id, our
    /// address and the server's): then the script and `WAIT` ran there too, in order.
    /// Otherwise the caller retries the same request, which, on a new primary lacking
    /// the write, appends it again under its name and proves it there.
    async fn proven(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> BusResult<Value> {
        let Durability {
            min_replicas,
            timeout,
        } = self.durability;
        let ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let slot = self.slot();
        let on_slot = self.appender.with_options(&Options {
            cluster_hash: Some(fred::types::ClusterHash::Custom(slot)),
            ..Options::default()
        });
        let mut evalsha = Vec::with_capacity(2 + keys.len() + args.len());
        evalsha.push(script.sha1().to_string());
        evalsha.push(keys.len().to_string());
        evalsha.extend(keys);
        evalsha.extend(args);
        let client_info = || {
            fred::types::CustomCommand::new_static(
                "CLIENT INFO",
                fred::types::ClusterHash::Custom(slot),
                false,
            )
        };
        let mut loaded = false;
        loop {
            let pipeline = fred::clients::Pipeline::from(on_slot.clone());
            let _: () = pipeline.custom(client_info(), Vec::<String>::new()).await?;
            // fred pipelines no scripts: EVALSHA by hand, in the guild's slot.
            let _: () = pipeline
                .custom(
                    fred::types::CustomCommand::new_static(
                        "EVALSHA",
                        fred::types::ClusterHash::Custom(slot),
                        false,
                    ),
                    evalsha.clone(),
                )
                .await?;
            let _: () = pipeline.wait(i64::from(min_replicas), ms).await?;
            let _: () = pipeline.custom(client_info(), Vec::<String>::new()).await?;
            let mut answers = pipeline.try_all::<Value>().await.into_iter();
            let mut next = || {
                answers.next().unwrap_or_else(|| {
                    Err(fred::error::Error::new(
                        fred::error::ErrorKind::Protocol,
                        "a pipelined answer is missing",
                    ))
                })
            };
            let (before, ran, acked, after) = (next(), next(), next(), next());
            let ran = match ran {
                // A new primary has not loaded the script (`SCRIPT LOAD` is not replicated).
                Err(e) if !loaded && e.details().starts_with("NOSCRIPT") => {
                    script.load(&self.appender).await?;
                    loaded = true;
                    continue;
                }
                ran => ran?,
            };
            let (before, after): (String, String) = (before?.convert()?, after?.convert()?);
            let acked: i64 = acked?.convert()?;
            proof(&before, &after, acked, min_replicas)?;
            return Ok(ran);
        }
    }

    /// After a proof: moves the durable id up to `id` and publishes the withheld events up
    /// to it. Without durability, nothing is withheld.
    async fn release_up_to(&self, id: EventId) -> BusResult<()> {
        if self.durability.min_replicas == 0 {
            return Ok(());
        }
        let _: i64 = self
            .scripts
            .release_durable
            .evalsha_with_reload(
                &self.appender,
                vec![self.key("events"), self.key(DURABLE)],
                vec![id.to_string()],
            )
            .await?;
        Ok(())
    }

    /// Settles whatever was appended up to now (for a snapshot valid at an id not yet
    /// durable, whose writer is still waiting or died before settling): the mark script
    /// writes, so its proof covers every event before it.
    async fn settle_applied(&self) -> BusResult<()> {
        let applied: Option<String> = self
            .proven(
                &self.scripts.mark,
                vec![self.key("applied"), self.key("durable:probe")],
                Vec::new(),
            )
            .await?
            .convert()?;
        match applied.and_then(|a| a.parse::<EventId>().ok()) {
            Some(id) => self.release_up_to(id).await,
            None => Ok(()),
        }
    }

    /// A handle for the relay task that reads the stream without owning the bus.
    fn reader(&self) -> Reader {
        Reader {
            client: self.client.clone(),
            events: self.key("events"),
            durable: self.key(DURABLE),
        }
    }
}

/// Where a deployment lease's epoch is kept: in its lease's cluster slot, since the
/// acquire script touches both (Redis Cluster refuses a script whose keys span slots).
/// A tagged lease (`P:shard:{3}:lease`) takes `:epoch` after it; an untagged one
/// (`P:rooms:sweeper`) is hashed whole, so its epoch carries the whole name as its tag
/// (`P:rooms:sweeper:epoch:{P:rooms:sweeper}`), still under the prefix like every key.
fn shared_epoch_key(lease: &str) -> String {
    // Redis's rule: the tag is what lies between the first `{` and the next `}`, if not
    // empty.
    let tagged = lease
        .split_once('{')
        .and_then(|(_, rest)| rest.find('}'))
        .is_some_and(|end| end > 0);
    if tagged {
        format!("{lease}:epoch")
    } else {
        format!("{lease}:epoch:{{{lease}}}")
    }
}

/// Whether a pipelined script and `WAIT` prove the write durable: both `CLIENT INFO`s
/// (before the script, after the `WAIT`) name one connection, and `WAIT` counted enough
/// replicas. A `WAIT` on another connection counts nothing about the write, whatever it
/// answers, so the connection is judged first.
fn proof(before: &str, after: &str, acked: i64, min_replicas: u32) -> BusResult<()> {
    match (connection_of(before), connection_of(after)) {
        (Some(a), Some(b)) if a == b => {}
        _ => {
            metrics::counter!("coven_redis_wait_unproven_total").increment(1);
            return Err(BusError::Unproven);
        }
    }
    if acked < i64::from(min_replicas) {
        metrics::counter!("coven_redis_wait_short_total").increment(1);
        return Err(BusError::NotDurable {
            acked,
            wanted: min_replicas,
        });
    }
    Ok(())
}

/// Which connection answered a `CLIENT INFO`: its id and both ends' addresses (an id
/// alone repeats across servers and restarts).
fn connection_of(info: &str) -> Option<[&str; 3]> {
    let field = |name: &str| {
        info.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    Some([field("id")?, field("addr")?, field("laddr")?])
}

/// A short, stable digest of an event's type and data, for naming its append.
fn content_digest(kind: &str, data_json: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(kind)
        .chain_update([0])
        .chain_update(data_json)
        .finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `P:{G}:durable`: the id up to which every event is on enough replicas and published.
/// Readers never read past it.
const DURABLE: &str = "durable";

/// Reads history for gap filling; shared by `since` and the relay.
#[derive(Clone)]
struct Reader {
    client: Client,
    events: String,
    durable: String,
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
        // Never past the durable id: an event after it may still be lost in a failover.
        // No durable id: nothing was ever withheld (a log from before durable appends).
        let durable: Option<String> = self.client.get(&self.durable).await?;
        let end = durable.unwrap_or_else(|| "+".to_owned());
        if end != "+" && end.parse::<EventId>().is_ok_and(|end| end <= after) {
            return Ok(Since::Events(Vec::new()));
        }
        let entries: Vec<(String, HashMap<String, String>)> = self
            .client
            .xrange(&self.events, format!("({after}"), end, Some(limit as u64))
            .await?;
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let json = fields
                .get("e")
                .ok_or_else(|| BusError::Corrupt(format!("stream entry {id} has no field e")))?;
            let event = Event::parse(json)
                .map_err(|e| BusError::Corrupt(format!("stream entry {id}: {e}")))?
                .traced(fields.get("t").map(String::as_str));
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

/// Messages queued for one guild's relay; past it the relay fills from the log instead.
const RELAY_QUEUE: usize = 4096;

/// How long a guild nobody in this process watches any more stays subscribed, by
/// default: a page reload (stream closed, stream opened) should not unsubscribe and
/// subscribe again.
const UNWATCH_AFTER: Duration = Duration::from_secs(30);

/// Messages of `P:control` a listener may fall behind by before it lags (they are rare:
/// logouts and removals).
const CONTROL_BUFFER: usize = 1024;

/// The process's one subscriber: hands each message to its guild's relay, by channel, and
/// `P:control`'s to its listeners.
async fn dispatch(
    subscriber: SubscriberClient,
    watched: Arc<Mutex<HashMap<String, Watched>>>,
    (control_channel, control): (String, broadcast::Sender<Arc<EventData>>),
) {
    let mut messages = subscriber.message_rx();
    loop {
        match messages.recv().await {
            Ok(message) => {
                let Some(json) = message.value.as_string() else {
                    continue;
                };
                if *message.channel == *control_channel {
                    match serde_json::from_str::<EventData>(&json) {
                        Ok(data) => drop(control.send(Arc::new(data))),
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping an unreadable control message")
                        }
                    }
                    continue;
                }
                let watched = lock(&watched);
                if let Some(guild) = watched.get(&*message.channel)
                    && guild.messages.try_send(json).is_err()
                {
                    guild.lagged.store(true, Ordering::Release);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "the live subscription fell behind; filling from the log"
                );
                for guild in lock(&watched).values() {
                    guild.lagged.store(true, Ordering::Release);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// One guild's live events: parses each envelope once, drops duplicates, and fills gaps
/// from the log after reconnects or when it fell behind, so receivers see every id in
/// order. Unsubscribes once nobody in the process has watched the guild for
/// [`UNWATCH_AFTER`].
async fn relay(
    bus: RedisBus,
    mut messages: mpsc::Receiver<String>,
    (lagged, resync): (Arc<AtomicBool>, Arc<Resync>),
    mut last: EventId,
    live: broadcast::Sender<Arc<Event>>,
) {
    let reader = bus.reader();
    let channel = bus.key("events");
    let unwatch_after = Duration::from_millis(bus.unwatch_after.load(Ordering::Relaxed));
    let mut tick = tokio::time::interval(unwatch_after / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unwatched_since: Option<tokio::time::Instant> = None;
    loop {
        // A subscription made again (reconnect, failover, slot moved) is announced by
        // [`watch`] through `resync`: see [`Resync`] for why the gap is read only then.
        tokio::select! {
            biased;
            () = resync.wake.notified() => {}
            m = messages.recv() => match m {
                Some(json) => {
                    // While the subscription is made again, what arrives is left to the
                    // fill that follows (it was published before that fill reads).
                    // Checked before `lagged`, which the watcher sets before it clears
                    // this.
                    if resync.holding.load(Ordering::SeqCst) {
                        continue;
                    }
                    // A lag is marked before any message after it is queued: filling first
                    // delivers what was lost before anything newer (whose id would make
                    // the lost events look already delivered).
                    if lagged.swap(false, Ordering::AcqRel) {
                        tracing::warn!(guild = %bus.guild_id, "the live subscription fell behind; filling from the log");
                        fill(&reader, &mut last, &live).await;
                    }
                    match Event::parse_message(&json) {
                        Ok(event) if event.id > last => {
                            last = event.id;
                            let _ = live.send(Arc::new(event));
                        }
                        Ok(_) => {} // already delivered (from a gap fill)
                        Err(e) => tracing::warn!(error = %e, "skipping an unreadable message on the events channel"),
                    }
                }
                None => return,
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                if live.receiver_count() > 0 {
                    unwatched_since = None;
                } else if unwatched_since.is_some_and(|at| now - at >= unwatch_after) {
                    // Held through the unsubscribe: a first subscription made meanwhile
                    // would otherwise reach Redis before this `SUNSUBSCRIBE` and be
                    // cancelled by it.
                    let _once = bus.subscribing.lock().await;
                    // Removed under the lock subscribers look it up with: one that found
                    // it first holds a receiver, and the count below says so.
                    let gone = {
                        let mut watched = lock(&bus.watched);
                        let idle = watched.get(&channel).is_some_and(|w| w.live.receiver_count() == 0);
                        if idle {
                            watched.remove(&channel);
                        }
                        idle
                    };
                    if gone {
                        lock(&bus.owners).remove(&channel);
                        if let Err(e) = bus.subscriber.sunsubscribe(channel.clone()).await {
                            tracing::warn!(error = %e, "cannot unsubscribe from an unwatched guild");
                        }
                        tracing::debug!(guild = %bus.guild_id, "no longer watched; unsubscribed");
                        return;
                    }
                } else if unwatched_since.is_none() {
                    unwatched_since = Some(now);
                }
            },
        }
        if !resync.holding.load(Ordering::SeqCst) && lagged.swap(false, Ordering::AcqRel) {
            tracing::info!(guild = %bus.guild_id, "filling the live subscription's gap from the log");
            fill(&reader, &mut last, &live).await;
        }
    }
}

/// How long [`Redis::resubscribe`] retries one channel.
const RESUBSCRIBE_FOR: Duration = Duration::from_secs(10);

/// How often, on a Redis Cluster, [`watch`] compares the cluster's routing with where the
/// subscriptions were made (one `CLUSTER SLOTS`).
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// Keeps the process's subscriptions alive and tells the relays when a gap must be
/// filled:
///
/// - After the subscriber reconnects (a Redis restart, a Sentinel or Cluster failover),
///   every channel is subscribed again, then every watched guild fills from the log.
/// - On a Redis Cluster, once a second: when the primary that owns a subscribed channel's
///   slot is not the one it was subscribed on (a slot migrated, or a replica promoted),
///   that channel is subscribed again on its new owner, then its guild fills. A moved
///   slot needs this: the node that loses the slot ends its subscriptions with an
///   unsolicited `sunsubscribe`, which fred 10.1 takes for the answer to a command and
///   drops (`check_pubsub_message` in `router/responses.rs`), so the subscription is dead
///   while fred still lists it, and nothing else would ever tell (StackExchange.Redis,
///   node-redis and redis-py had the same bug and fixed it). A failover is also seen by
///   the reconnect; whichever comes first, the other only makes a harmless second fill.
///
/// Ends once the process's [`Redis`] is gone.
async fn watch(
    redis: Weak<Redis>,
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
) {
    let mut tick = tokio::time::interval(TOPOLOGY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = reconnects.recv() => {
                if let Err(broadcast::error::RecvError::Closed) = r {
                    return;
                }
                // fred reconnects to every node at once and says so once per node: one
                // resubscription for the lot.
                while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) =
                    reconnects.try_recv()
                {}
                let Some(redis) = redis.upgrade() else { return };
                redis.resubscribe(None).await;
            }
            _ = tick.tick() => {
                let Some(redis) = redis.upgrade() else { return };
                // Nothing subscribed (a gateway, `publish`): nothing to look at.
                if !redis.client.is_clustered() || redis.subscriber.tracked_shard_channels().is_empty() {
                    continue;
                }
                let moved = redis.moved_channels().await;
                if !moved.is_empty() {
                    tracing::info!(channels = moved.len(), "a subscribed channel's slot has a new primary; subscribing there");
                    // Routes the new `SSUBSCRIBE`s to the new owners (without it, fred would
                    // be sent there by a MOVED).
                    if let Err(e) = redis.subscriber.sync_cluster().await {
                        tracing::warn!(error = %e, "cannot refresh the subscriber's cluster routing");
                    }
                    redis.resubscribe(Some(moved)).await;
                }
            }
        }
    }
}

/// `host:port` of a server, as routing tables are compared.
fn address(server: &fred::types::config::Server) -> String {
    format!("{}:{}", server.host, server.port)
}

impl Redis {
    /// On a cluster: the primary that owns `channel`'s slot, as the subscriber last routed.
    fn routed_owner(&self, channel: &str) -> Option<String> {
        let routing = self.subscriber.cached_cluster_state()?;
        routing
            .get_server(fred::util::redis_keyslot(channel.as_bytes()))
            .map(address)
    }

    /// Records where `channel` was just subscribed (on a cluster), for [`watch`].
    fn subscribed_on(&self, channel: &str) {
        if self.client.is_clustered() {
            let owner = self.routed_owner(channel);
            lock(&self.owners).insert(channel.to_owned(), owner);
        }
    }

    /// Subscribed channels whose slot's primary, in the cluster's routing now, is not
    /// the one they were subscribed on. Nothing when the routing cannot be read (it is
    /// asked again in a second).
    async fn moved_channels(&self) -> Vec<String> {
        let slots: Value = match self.client.cluster_slots().await {
            Ok(slots) => slots,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the cluster's slots");
                return Vec::new();
            }
        };
        let routing = match ClusterRouting::from_cluster_slots(slots, self.seed_host.as_str()) {
            Ok(routing) => routing,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's slots");
                return Vec::new();
            }
        };
        let tracked: std::collections::HashSet<String> = self
            .subscriber
            .tracked_shard_channels()
            .iter()
            .map(|c| c.to_string())
            .collect();
        let mut owners = lock(&self.owners);
        owners.retain(|channel, _| tracked.contains(channel));
        let mut moved = Vec::new();
        for channel in tracked {
            // A slot no primary serves (the cluster is failing over) is looked at again
            // once one does.
            let Some(now) = routing
                .get_server(fred::util::redis_keyslot(channel.as_bytes()))
                .map(address)
            else {
                continue;
            };
            match owners.get(&channel) {
                Some(Some(before)) if *before == now => {}
                Some(_) => moved.push(channel),
                None => {
                    owners.insert(channel, Some(now));
                }
            }
        }
        moved
    }

    /// Subscribes `only` these channels again (all the subscriber's, when `None`), then
    /// has every watched guild among them fill its gap from the log: see [`Resync`].
    /// Retries each `SSUBSCRIBE` for up to [`RESUBSCRIBE_FOR`]; one that still fails was
    /// refused by a connection that is down again, whose reconnect brings another
    /// resubscription (and on a cluster the next look at the routing retries it), so
    /// first subscriptions are not held up meanwhile.
    async fn resubscribe(&self, only: Option<Vec<String>>) {
        // No first subscription or unsubscribe meanwhile: each would race with these.
        let _once = self.subscribing.lock().await;
        let channels: Vec<String> = only.unwrap_or_else(|| {
            self.subscriber
                .tracked_shard_channels()
                .iter()
                .map(|c| c.to_string())
                .collect()
        });
        if channels.is_empty() {
            return;
        }
        let held: Vec<(Arc<AtomicBool>, Arc<Resync>)> = {
            let watched = lock(&self.watched);
            channels
                .iter()
                .filter_map(|c| watched.get(c))
                .map(|w| (w.lagged.clone(), w.resync.clone()))
                .collect()
        };
        for (_, resync) in &held {
            resync.holding.store(true, Ordering::SeqCst);
        }
        // One channel a command: fred reads one answer to each `SSUBSCRIBE` (and must not
        // pipeline them), so several channels in one would leave answers unread.
        for channel in &channels {
            let mut backoff = Duration::from_millis(50);
            let started = tokio::time::Instant::now();
            loop {
                match self.subscriber.ssubscribe(channel.clone()).await {
                    Ok(()) => {
                        self.subscribed_on(channel);
                        break;
                    }
                    Err(e) if started.elapsed() >= RESUBSCRIBE_FOR => {
                        tracing::warn!(error = %e, %channel, "cannot subscribe again; giving up until the next reconnect");
                        // Not where it should be: the next look at the routing tries again.
                        lock(&self.owners).insert(channel.clone(), None);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, %channel, "cannot subscribe again; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(super::RETRY_AT_MOST);
                    }
                }
            }
        }
        for (lagged, resync) in held {
            lagged.store(true, Ordering::SeqCst);
            resync.holding.store(false, Ordering::SeqCst);
            resync.wake.notify_one();
        }
        metrics::counter!("coven_redis_resubscribes_total").increment(1);
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
                backoff = (backoff * 2).min(super::RETRY_AT_MOST);
            }
        }
    }
}

#[async_trait::async_trait]
impl Bus for RedisBus {
    fn guild_id(&self) -> Id<GuildMarker> {
        self.guild_id
    }

    async fn append(&self, data: EventData, fence: Option<&Fence>) -> BusResult<Arc<Event>> {
        // fred sends a command again when its connection closed before the answer came
        // (`max_command_attempts`), so a script that ran can run twice. Every append is
        // named, by this process and a counter: the second run is answered with the
        // event the first appended (the name is kept an hour).
        let request = Request {
            writer: format!(
                "{}.{}",
                self.name,
                self.appends.fetch_add(1, Ordering::Relaxed)
            ),
            seq: 0,
            part: 0,
        };
        self.append_once(data, fence, &request).await
    }

    async fn append_once(
        &self,
        data: EventData,
        fence: Option<&Fence>,
        request: &Request,
    ) -> BusResult<Arc<Event>> {
        let kind = data.kind();
        let data_json = data.data_json()?;
        let mut keys = self.append_keys();
        let mut args = vec![
            fence
                .filter(|f| !f.by_epoch)
                .map(|f| f.token.clone())
                .unwrap_or_default(),
            kind.as_str().to_owned(),
            data_json,
            self.guild_id.to_string(),
            self.max_len.to_string(),
        ];
        self.append_tail(fence, Some(request), &mut keys, &mut args);
        // The request's name carries what it appends: a successor whose deriver starts
        // from a snapshot that already holds part of a dispatch numbers the rest from 0
        // again, and must not be taken for the part its predecessor appended.
        args[6] = format!("{}:{}", args[6], content_digest(kind.as_str(), &args[2]));
        // The script answers nil only when the fence no longer holds its lease.
        self.run_append(&self.scripts.append, keys, args)
            .await?
            .ok_or_else(|| BusError::Fenced(fence.map(|f| f.lease.clone()).unwrap_or_default()))
    }

    async fn viewers(
        &self,
        channel: Id<ChannelMarker>,
        present: &[Viewer],
        gone: &[Viewer],
        ttl: Duration,
    ) -> BusResult<Option<Arc<Event>>> {
        let mut keys = self.append_keys();
        let mut args = vec![
            String::new(),
            String::new(),
            String::new(),
            self.guild_id.to_string(),
            self.max_len.to_string(),
        ];
        // No request: run again, the script finds the set unchanged and appends nothing.
        self.append_tail(None, None, &mut keys, &mut args);
        keys.push(self.key(&format!("viewers:{channel}")));
        args.extend([
            channel.to_string(),
            ttl.as_millis().max(1).to_string(),
            present.len().to_string(),
        ]);
        for v in present.iter().chain(gone) {
            args.push(serde_json::to_string(v)?);
        }
        self.run_append(&self.scripts.viewers, keys, args).await
    }

    async fn has_room(&self, room: Id<ChannelMarker>) -> BusResult<bool> {
        Ok(self
            .client
            .hexists(self.key("rooms"), room.to_string())
            .await?)
    }

    async fn snapshot(&self) -> BusResult<Snapshot> {
        let keys = vec![
            self.key("rooms"),
            self.key("voice"),
            self.key("applied"),
            self.key("guild"),
            self.key("channels"),
            self.key(DURABLE),
        ];
        let parts: Vec<Value> = self
            .scripts
            .snapshot
            .evalsha_with_reload(&self.client, keys, Vec::<String>::new())
            .await?;
        let [rooms, voice, applied, guild, channels, durable] = <[Value; 6]>::try_from(parts)
            .map_err(|_| BusError::Corrupt("snapshot script answer".to_owned()))?;
        let mut snapshot = Snapshot {
            guild: Some(self.guild_id),
            ..Snapshot::default()
        };
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
        // A snapshot shows its events' effects: valid at an id not yet durable, it is
        // handed out only once that id is (or fails like any unanswered read).
        let durable = durable.as_string().and_then(|d| d.parse::<EventId>().ok());
        if self.durability.min_replicas > 0 && durable.is_some_and(|d| d < snapshot.at) {
            self.settle_applied().await?;
        }
        Ok(snapshot)
    }

    async fn since(&self, after: EventId, limit: usize) -> BusResult<Since> {
        self.reader().since(after, limit).await
    }

    async fn holds(&self, id: EventId) -> BusResult<bool> {
        Ok(self
            .holds
            .ask(&self.client, self.guild_id, || self.key("events"), id)
            .await?)
    }

    async fn trim_before(&self, before_ms: u64) -> BusResult<u64> {
        // Never past the durable id: what follows it is withheld, not yet published, and
        // dropping it would lose it for every stream. (The durable id only moves forward,
        // so reading it first and trimming after is safe.)
        let durable: Option<String> = self.client.get(self.key(DURABLE)).await?;
        let floor = durable
            .and_then(|d| d.parse::<EventId>().ok())
            .map_or(before_ms, |d| d.ms.min(before_ms));
        // Exact (`=`): an age cap removes only what is older, a handful per run.
        let dropped: u64 = self
            .client
            .xtrim(self.key("events"), ("MINID", "=", format!("{floor}-0")))
            .await?;
        Ok(dropped)
    }

    async fn subscribe(&self) -> BusResult<broadcast::Receiver<Arc<Event>>> {
        let channel = self.key("events");
        if let Some(watched) = lock(&self.watched).get(&channel) {
            return Ok(watched.live.subscribe());
        }
        let _once = self.subscribing.lock().await;
        if let Some(watched) = lock(&self.watched).get(&channel) {
            return Ok(watched.live.subscribe());
        }
        // Routed before subscribing, so nothing that arrives is dropped: the relay
        // starts once it knows where the log is.
        let (messages, queued) = mpsc::channel(RELAY_QUEUE);
        let lagged = Arc::new(AtomicBool::new(false));
        let resync = Arc::new(Resync::default());
        let live = broadcast::channel(LIVE_BUFFER).0;
        let receiver = live.subscribe();
        lock(&self.watched).insert(
            channel.clone(),
            Watched {
                messages,
                lagged: lagged.clone(),
                live: live.clone(),
                resync: resync.clone(),
            },
        );
        let started = async {
            self.subscriber.ssubscribe(channel.clone()).await?;
            self.subscribed_on(&channel);
            // Live from the last published event: the durable id when there is one
            // (events after it, up to `applied`, are still withheld and will be
            // published).
            let durable: Option<String> = self.client.get(self.key(DURABLE)).await?;
            let applied: Option<String> = self.client.get(self.key("applied")).await?;
            BusResult::Ok(
                durable
                    .or(applied)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(EventId::ZERO),
            )
        };
        match started.await {
            Ok(start) => {
                tokio::spawn(relay(self.clone(), queued, (lagged, resync), start, live));
                Ok(receiver)
            }
            Err(e) => {
                lock(&self.watched).remove(&channel);
                Err(e)
            }
        }
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
        self.claim_at(self.key(key), ttl).await
    }

    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        let lease = self.key(name);
        let epoch = self.key(&format!("{name}:epoch"));
        self.lease_acquire(lease, epoch, name, holder, ttl, false)
            .await
    }

    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>> {
        self.lease_left_at(self.key(name)).await
    }

    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        self.lease_renew(self.key(&fence.lease), fence, ttl).await
    }

    async fn release(&self, fence: &Fence) -> BusResult<()> {
        self.lease_release(self.key(&fence.lease), fence).await
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

    async fn expire(&self, after: Option<Duration>) -> BusResult<()> {
        // One guild's keys share a slot, but each is its own command: sent together.
        let keys = GUILD_KEYS.map(|k| self.key(k));
        let done = futures_util::future::try_join_all(keys.iter().map(|key| async move {
            match after {
                Some(after) => {
                    let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX).max(1);
                    self.client.pexpire::<i64, _>(key, ms, None).await
                }
                None => self.client.persist::<i64, _>(key).await,
            }
        }))
        .await?;
        drop(done);
        Ok(())
    }
}

/// A fence from the acquire script's token (`<epoch>:<holder>`).
fn fence(name: &str, token: String, by_epoch: bool) -> Fence {
    Fence {
        lease: name.to_owned(),
        epoch: token
            .split(':')
            .next()
            .and_then(|e| e.parse().ok())
            .unwrap_or(0),
        token,
        by_epoch,
    }
}

impl Redis {
    /// `P:<name>`: a deployment-wide key, in no guild's key space.
    fn shared_key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// A lease's scripts, wherever its keys are (a guild's, or the deployment's).
    async fn lease_acquire(
        &self,
        lease: String,
        epoch: String,
        name: &str,
        holder: &str,
        ttl: Duration,
        shared: bool,
    ) -> BusResult<Option<Fence>> {
        let args = vec![holder.to_owned(), ttl.as_millis().to_string()];
        let token: Option<String> = self
            .scripts
            .acquire
            .evalsha_with_reload(&self.client, vec![lease, epoch], args)
            .await?;
        Ok(token.map(|token| fence(name, token, shared)))
    }

    /// Sets `key` for `ttl` unless it is set; `true` when this call set it.
    async fn claim_at(&self, key: String, ttl: Duration) -> BusResult<bool> {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let set: Option<String> = self
            .client
            .set(
                key,
                "1",
                Some(Expiration::PX(ms)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    async fn lease_left_at(&self, lease: String) -> BusResult<Option<Duration>> {
        let ms: i64 = self.client.pttl(lease).await?;
        // -2: no key; -1: no expiry (never set so by Coven).
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    async fn lease_renew(&self, lease: String, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        let args = vec![fence.token.clone(), ttl.as_millis().to_string()];
        let held: i64 = self
            .scripts
            .renew
            .evalsha_with_reload(&self.client, vec![lease], args)
            .await?;
        Ok(held == 1)
    }

    async fn lease_release(&self, lease: String, fence: &Fence) -> BusResult<()> {
        let _: i64 = self
            .scripts
            .release
            .evalsha_with_reload(&self.client, vec![lease], vec![fence.token.clone()])
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl super::Deployment for Arc<Redis> {
    fn reachable(&self) -> bool {
        self.client.is_connected()
    }

    fn guild(&self, guild: Id<GuildMarker>) -> Arc<dyn super::Backend> {
        Arc::new(Redis::guild(self, guild))
    }

    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        let lease = self.shared_key(name);
        let epoch = shared_epoch_key(&lease);
        self.lease_acquire(lease, epoch, name, holder, ttl, true)
            .await
    }

    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>> {
        self.lease_left_at(self.shared_key(name)).await
    }

    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        self.lease_renew(self.shared_key(&fence.lease), fence, ttl)
            .await
    }

    async fn release(&self, fence: &Fence) -> BusResult<()> {
        self.lease_release(self.shared_key(&fence.lease), fence)
            .await
    }

    async fn put(
        &self,
        fence: Option<&Fence>,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> BusResult<()> {
        // Without a fence the lease key is only a placeholder in the key's own slot.
        let lease = self.shared_key(fence.map_or(key, |f| f.lease.as_str()));
        let keys = vec![self.shared_key(key), lease];
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
        Ok(self.client.get(self.shared_key(key)).await?)
    }

    async fn put_first(&self, key: &str, value: &str) -> BusResult<String> {
        let before: Option<String> = self
            .client
            .set(
                self.shared_key(key),
                value,
                None,
                Some(SetOptions::NX),
                true,
            )
            .await?;
        Ok(before.unwrap_or_else(|| value.to_owned()))
    }

    async fn register(&self, guild: Id<GuildMarker>, entry: &GuildEntry) -> BusResult<bool> {
        let json = serde_json::to_string(entry)?;
        self.write_registry(guild, json, entry.epoch).await
    }

    async fn unregister(&self, guild: Id<GuildMarker>, epoch: u64) -> BusResult<bool> {
        self.write_registry(guild, String::new(), epoch).await
    }

    async fn registry(&self) -> BusResult<BTreeMap<Id<GuildMarker>, GuildEntry>> {
        let all: HashMap<String, String> = self
            .client
            .hgetall(self.shared_key(super::REGISTRY))
            .await?;
        let mut out = BTreeMap::new();
        for (id, json) in all {
            let Some(guild) = id.parse::<u64>().ok().and_then(Id::new_checked) else {
                tracing::warn!(field = %id, "ignoring a registry field that is no guild id");
                continue;
            };
            match serde_json::from_str(&json) {
                Ok(entry) => {
                    out.insert(guild, entry);
                }
                Err(e) => {
                    tracing::warn!(%guild, error = %e, "ignoring an unreadable registry entry")
                }
            }
        }
        Ok(out)
    }

    async fn entries(&self, guilds: &[Id<GuildMarker>]) -> BusResult<Vec<Option<GuildEntry>>> {
        if guilds.is_empty() {
            return Ok(Vec::new());
        }
        let fields: Vec<String> = guilds.iter().map(ToString::to_string).collect();
        let values: Vec<Option<String>> = self
            .client
            .hmget(self.shared_key(super::REGISTRY), fields)
            .await?;
        Ok(values
            .into_iter()
            .zip(guilds)
            .map(|(json, guild)| {
                json.filter(|j| !j.is_empty()).and_then(|j| {
                    serde_json::from_str(&j)
                        .inspect_err(|e| tracing::warn!(%guild, error = %e, "ignoring an unreadable registry entry"))
                        .ok()
                })
            })
            .collect())
    }

    async fn guilds_with_key(&self, suffix: &str) -> BusResult<Vec<Id<GuildMarker>>> {
        use futures_util::TryStreamExt;
        let pattern = format!("{}:{{*}}:{suffix}", self.prefix);
        let keys: Vec<Key> = if self.client.is_clustered() {
            self.client
                .scan_cluster_buffered(pattern, Some(1000), None)
                .try_collect()
                .await?
        } else {
            self.client
                .scan_buffered(pattern, Some(1000), None)
                .try_collect()
                .await?
        };
        let open = format!("{}:{{", self.prefix);
        Ok(keys
            .iter()
            .filter_map(|k| k.as_str())
            .filter_map(|k| {
                k.strip_prefix(&open)?
                    .split('}')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .filter_map(Id::new_checked)
            .collect())
    }

    async fn registry_len(&self) -> BusResult<usize> {
        Ok(self.client.hlen(self.shared_key(super::REGISTRY)).await?)
    }

    async fn announce(&self, data: &EventData) -> BusResult<()> {
        let json = serde_json::to_string(data)?;
        let _: i64 = self
            .client
            .spublish(self.shared_key(super::CONTROL), json)
            .await?;
        Ok(())
    }

    async fn control(&self) -> BusResult<broadcast::Receiver<Arc<EventData>>> {
        let receiver = self.control.subscribe();
        self.control_subscribed
            .get_or_try_init(|| async {
                let channel = self.shared_key(super::CONTROL);
                let _once = self.subscribing.lock().await;
                self.subscriber.ssubscribe(channel.clone()).await?;
                self.subscribed_on(&channel);
                BusResult::Ok(())
            })
            .await?;
        Ok(receiver)
    }

    async fn claim(&self, key: &str, ttl: Duration) -> BusResult<bool> {
        self.claim_at(self.shared_key(key), ttl).await
    }

    async fn beat(&self, process: &str, ttl: Duration) -> BusResult<Vec<String>> {
        let live: Vec<String> = self
            .scripts
            .beat
            .evalsha_with_reload(
                &self.client,
                vec![self.shared_key(super::GATEWAYS)],
                vec![process.to_owned(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok(live)
    }

    async fn leave(&self, process: &str) -> BusResult<()> {
        let _: i64 = self
            .client
            .zrem(self.shared_key(super::GATEWAYS), process)
            .await?;
        Ok(())
    }

    async fn raise_epochs(&self, guilds: &[Id<GuildMarker>], epoch: u64) -> BusResult<()> {
        // Each guild is its own slot: concurrent commands, which fred pipelines on its
        // connections, in bounded batches.
        for batch in guilds.chunks(500) {
            let done = futures_util::future::try_join_all(batch.iter().map(|g| {
                let key = Redis::guild(self, *g).key("epoch");
                async move {
                    self.scripts
                        .raise_epoch
                        .evalsha_with_reload::<i64, _, _>(
                            &self.client,
                            vec![key],
                            vec![epoch.to_string()],
                        )
                        .await
                }
            }))
            .await?;
            drop(done);
        }
        Ok(())
    }
}

impl Redis {
    async fn write_registry(
        &self,
        guild: Id<GuildMarker>,
        json: String,
        epoch: u64,
    ) -> BusResult<bool> {
        let written: i64 = self
            .scripts
            .register
            .evalsha_with_reload(
                &self.client,
                vec![self.shared_key(super::REGISTRY)],
                vec![guild.to_string(), json, epoch.to_string()],
            )
            .await?;
        Ok(written == 1)
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

#[cfg(test)]
impl Redis {
    /// A process's connections never connected: for what needs no Redis (key names).
    fn offline(prefix: &str) -> Arc<Self> {
        let client = Builder::default_centralized().build().expect("a client");
        let subscriber = Builder::default_centralized()
            .build_subscriber_client()
            .expect("a subscriber");
        Arc::new(Redis {
            appender: client.clone(),
            client,
            subscriber,
            durability: Durability::OFF,
            prefix: prefix.to_owned(),
            max_len: 1000,
            scripts: Arc::new(Scripts::load()),
            name: "offline".to_owned(),
            appends: AtomicU64::new(0),
            watched: Arc::default(),
            subscribing: tokio::sync::Mutex::new(()),
            unwatch_after: AtomicU64::new(1),
            holds: Holds::default(),
            control: broadcast::channel(1).0,
            control_subscribed: tokio::sync::OnceCell::new(),
            owners: Mutex::default(),
            seed_host: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{connection_of, redis_version};

    #[test]
    fn a_deployment_lease_s_epoch_is_in_the_lease_s_slot() {
        for lease in ["coven:rooms:sweeper", "coven:shard:{3}:lease"] {
            let epoch = super::shared_epoch_key(lease);
            assert_eq!(
                fred::util::redis_keyslot(lease.as_bytes()),
                fred::util::redis_keyslot(epoch.as_bytes()),
                "{lease} and {epoch}"
            );
        }
        assert_eq!(
            super::shared_epoch_key("coven:shard:{3}:lease"),
            "coven:shard:{3}:lease:epoch",
            "a shard's epoch keeps its name"
        );
    }

    #[test]
    fn a_wait_counts_only_on_the_connection_that_wrote() {
        use super::{BusError, proof};
        let on = |id: &str, port: u16| {
            format!("id={id} addr=127.0.0.1:50412 laddr=127.0.0.1:{port} fd=9 cmd=client|info")
        };
        assert!(proof(&on("7", 6379), &on("7", 6379), 1, 1).is_ok());
        // A reconnect between the script and WAIT (same server, new connection), or a
        // failover (another server, same id): enough replicas counted, nothing proven.
        assert!(matches!(
            proof(&on("7", 6379), &on("8", 6379), 1, 1),
            Err(BusError::Unproven)
        ));
        assert!(matches!(
            proof(&on("7", 6379), &on("7", 6380), 2, 1),
            Err(BusError::Unproven)
        ));
        assert!(matches!(
            proof("", &on("7", 6379), 1, 1),
            Err(BusError::Unproven)
        ));
        // The same connection, too few replicas.
        assert!(matches!(
            proof(&on("7", 6379), &on("7", 6379), 0, 1),
            Err(BusError::NotDurable {
                acked: 0,
                wanted: 1
            })
        ));
    }

    #[test]
    fn a_connection_is_named_by_its_id_and_both_addresses() {
        let info = "id=7 addr=127.0.0.1:50412 laddr=127.0.0.1:6379 fd=9 name= age=0 idle=0 \
                    flags=N db=0 cmd=client|info\n";
        assert_eq!(
            connection_of(info),
            Some(["7", "127.0.0.1:50412", "127.0.0.1:6379"])
        );
        // The same id on another server (a failover) or from another socket differs.
        let other = info.replace("laddr=127.0.0.1:6379", "laddr=127.0.0.1:6380");
        assert_ne!(connection_of(info), connection_of(&other));
        // `idle=` is not `id=`; an answer without the fields names no connection.
        assert_eq!(connection_of("idle=3 addr=a laddr=b"), None);
        assert_eq!(connection_of(""), None);
    }

    /// On a Redis Cluster a script or command whose keys span slots fails (CROSSSLOT): a
    /// key named outside the guild's hash tag must fail here, not in production.
    #[test]
    fn every_key_a_guild_touches_hashes_to_the_guild_slot() {
        use super::{DURABLE, GUILD_KEYS, Redis};
        use crate::bus::{Fence, Request};
        use twilight_model::id::Id;

        let slot = |key: &str| fred::util::redis_keyslot(key.as_bytes());
        let guild: u64 = 1_190_000_000_000_000_001;
        let bus = Redis::offline("coven").guild(Id::new(guild));
        let want = slot(&guild.to_string());
        let mut keys: Vec<String> = bus.append_keys();
        keys.extend(bus.access_keys());
        keys.extend(GUILD_KEYS.map(|k| bus.key(k)));
        let fences = [
            None,
            Some(Fence {
                lease: "rooms:sweeper".into(),
                epoch: 3,
                token: "3:me".into(),
                by_epoch: false,
            }),
            Some(Fence {
                lease: "shard:0:lease".into(),
                epoch: 4,
                token: "4:me".into(),
                by_epoch: true,
            }),
        ];
        let request = Request::dispatch("session", 7, 1);
        for fence in &fences {
            for request in [None, Some(&request)] {
                let (mut tail, mut args) = (Vec::new(), Vec::new());
                bus.append_tail(fence.as_ref(), request, &mut tail, &mut args);
                keys.extend(tail);
            }
        }
        // The viewers script's set, the settle probe, the relay's reads, leases and their
        // epochs, claims and stored values (as the web and gateway name them).
        keys.push(bus.key("viewers:10"));
        keys.push(bus.key("durable:probe"));
        let reader = bus.reader();
        keys.extend([reader.events, reader.durable, bus.key(DURABLE)]);
        for name in [
            "gateway:leader",
            "rooms:sweeper",
            "members:recheck:5",
            "gateway:status",
        ] {
            keys.push(bus.key(name));
            keys.push(bus.key(&format!("{name}:epoch")));
        }
        assert!(keys.len() > 30);
        for key in &keys {
            assert!(
                key.starts_with(&format!("coven:{{{guild}}}:")),
                "{key} is named under the guild's hash tag"
            );
            assert_eq!(slot(key), want, "{key} hashes to the guild's slot");
        }
    }

    #[test]
    fn the_redis_version_is_read_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(redis_version(info), Some((7, 0)));
        assert_eq!(redis_version("redis_version:6.2.14\r\n"), Some((6, 2)));
        assert_eq!(redis_version("redis_version:8\r\n"), Some((8, 0)));
        assert_eq!(redis_version("# Server\r\nos:Linux\r\n"), None);
        assert_eq!(redis_version("redis_version:x.y\r\n"), None);
        // Ordered as versions, not as text.
        assert!(Some((10, 0)) >= Some(super::MIN_REDIS));
        assert!(Some((6, 9)) < Some(super::MIN_REDIS));
    }
}
