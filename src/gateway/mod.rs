//! `coven gateway`: holds a fair share of the bot's Discord Gateway shards, beside any
//! number of other gateway processes, and turns what Discord says into domain events on
//! the bus of each guild it serves (every guild of its shards, or the configured ones).
//!
//! Owns the process's share of the shards ([`run`], by the rule in [`spread`]), each
//! shard's life ([`shard`]: lease, stored session, status, RESUME on takeover), the
//! identify queue every process shares ([`identify`]), the derivation of events from
//! dispatches ([`derive`]), the registry of guilds (`P:guilds`) and the health endpoint
//! ([`health`]; metrics are on their own listener, [`crate::prometheus`]). Must not serve
//! pages or call Discord's REST API on users' behalf (that is `web`); its only REST call
//! is the bot's `GET /gateway/bot`.

pub mod derive;
pub mod health;
pub mod identify;
pub mod run;
pub mod shard;
pub mod spread;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker};
use url::Url;

use crate::bus::Deployment;
use crate::config;

pub use run::Outcome;

/// Settings of the gateway: its flags, each also read from its environment variable.
/// What has no default is here; everything with one is in [`Tuning`], which reads through.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Redis holding the event log and shared state (redis://, rediss://, ...)
    #[arg(long, env = "REDIS_URL", hide_env_values = true, required = true, value_parser = config::parse_redis_url)]
    pub redis_url: Option<SecretString>,
    /// The guilds (servers) Coven serves: one id or a comma-separated list (default:
    /// every guild the bot is in)
    #[arg(long = "discord-guild-id", env = "DISCORD_GUILD_ID", value_delimiter = ',', value_parser = config::parse_guild_id)]
    pub guild_ids: Vec<Id<GuildMarker>>,
    /// Bot token (secret)
    #[arg(long = "discord-bot-token", env = "DISCORD_BOT_TOKEN", hide_env_values = true, value_parser = config::parse_secret(1))]
    pub bot_token: SecretString,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// The gateway settings with a default, which the demo keeps.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Address of the health endpoint
    #[arg(long, env = "BIND", default_value = "127.0.0.1:3001", value_parser = config::parse_bind)]
    pub bind: SocketAddr,
    /// Address of the Prometheus `/metrics` listener (keep it off the public network)
    #[arg(long, env = "METRICS_BIND", default_value = "127.0.0.1:9465", value_parser = config::parse_bind)]
    pub metrics_bind: SocketAddr,
    /// Discord Gateway base URL
    #[arg(long = "discord-gateway-url", env = "DISCORD_GATEWAY_URL", default_value = DEFAULT_GATEWAY_URL, value_parser = config::parse_ws_url)]
    pub gateway_url: Url,
    /// Discord REST base URL (the gateway asks only `GET /gateway/bot`: the recommended
    /// shard count and how many session starts are left)
    #[arg(long = "discord-api-url", env = "DISCORD_API_URL", default_value = crate::discord::DEFAULT_API_URL, value_parser = crate::discord::parse_api_url)]
    pub api_url: Url,
    /// How many shards the bot's session is split into, decided by the first gateway
    /// process and stored (default: Discord's recommendation); a process started with
    /// another count than the stored one is refused (1–4,096)
    #[arg(long = "shard-count", env = "SHARD_COUNT", value_parser = config::parse_number_in::<u32>(1, MAX_SHARDS))]
    pub shard_count: Option<u32>,
    /// Session starts (IDENTIFYs) kept back of Discord's daily 1,000: at this many left,
    /// a process stops with one line instead of identifying (0–1,000)
    // Discord resets the bot's token when they run out: the reserve leaves room for an
    // operator to act (and RESUMEs, which cost nothing, go on meanwhile).
    #[arg(long = "identify-reserve", env = "IDENTIFY_RESERVE", default_value = "10", value_parser = config::parse_number_in::<u32>(0, 1000))]
    pub identify_reserve: u32,
    /// Only voice channels in this category are rooms (default: every voice channel); a
    /// comma-separated list gives each guild its own (each category names its guild)
    #[arg(long = "discord-room-category-id", env = "DISCORD_ROOM_CATEGORY_ID", value_delimiter = ',', value_parser = config::parse_channel_id)]
    pub room_categories: Vec<Id<ChannelMarker>>,
    /// Prefix of every Redis key
    #[arg(long = "coven-key-prefix", env = "COVEN_KEY_PREFIX", default_value = config::KEY_PREFIX, value_parser = config::parse_key_prefix)]
    pub key_prefix: String,
    /// Each shard's lease lifetime; another process takes a dead one's shards within it
    /// (1s–1m)
    // Renewed every third of its life: under a second that is a busy loop against Redis,
    // and every pause longer than it hands the guild to a standby. Over a minute, a
    // crashed gateway leaves the site stale that long.
    #[arg(long = "gateway-lease-ttl", env = "GATEWAY_LEASE_TTL", default_value = "10s", value_parser = config::parse_duration_in(Duration::from_secs(1), Duration::from_secs(60)))]
    pub lease_ttl: Duration,
    /// Events kept in the log (approximately; older ones are trimmed; 100–10,000,000)
    // Fewer than a page's worth of events makes every reconnect a resync; ten million
    // envelopes are gigabytes of Redis memory.
    #[arg(long, env = "EVENT_LOG_MAX_LEN", default_value = "100000", value_parser = config::parse_number_in::<u64>(100, 10_000_000))]
    pub event_log_max_len: u64,
    /// Events older than this are trimmed from the log, checked at least hourly (1m–30d)
    // The log's length cap alone lets a guild that went quiet keep its busy day for
    // ever; with many guilds that is most of Redis's memory.
    #[arg(long, env = "EVENT_LOG_MAX_AGE", default_value = "24h", value_parser = config::parse_duration_in(Duration::from_secs(60), Duration::from_secs(30 * 24 * 3600)))]
    pub event_log_max_age: Duration,
    /// How long a guild's data is kept after the bot was removed from it (1m–30d)
    // Someone who removed the bot by mistake and adds it back the same day finds their
    // rooms' records and invite links as they were; after that, nothing is kept.
    #[arg(long, env = "GUILD_REMOVED_GRACE", default_value = "24h", value_parser = config::parse_duration_in(Duration::from_secs(60), Duration::from_secs(30 * 24 * 3600)))]
    pub guild_removed_grace: Duration,
    /// Events held in memory while Redis is unreachable before falling back to a
    /// reconcile (1–100,000)
    #[arg(long = "gateway-queue-size", env = "GATEWAY_QUEUE_SIZE", default_value = "10000", value_parser = config::parse_number_in::<usize>(1, 100_000))]
    pub queue_size: usize,
    /// How long a Redis command waits for Redis to come back (a restart, a Sentinel
    /// failover) before it fails (1s–1h)
    // Sentinel's default down-after-milliseconds is 30 s, so a failover takes longer than
    // that: a minute rides one out.
    #[arg(long, env = "REDIS_RETRY_FOR", default_value = "60s", value_parser = config::parse_duration_in(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600)))]
    pub redis_retry_for: std::time::Duration,
    /// `REDIS_MIN_REPLICAS` and `REDIS_REPLICA_TIMEOUT`: what appends ask of replicas.
    #[command(flatten)]
    pub durability: crate::bus::redis::Durability,
}

impl Default for Tuning {
    fn default() -> Self {
        config::defaults()
    }
}

/// Every setting reads as `settings.name`, wherever it is declared.
impl std::ops::Deref for Settings {
    type Target = Tuning;

    fn deref(&self) -> &Tuning {
        &self.tuning
    }
}

impl Settings {
    pub(crate) fn bot_token_value(&self) -> String {
        self.bot_token.expose_secret().to_owned()
    }

    /// Whether this gateway serves `guild`: every guild when none is configured.
    pub fn serves(&self, guild: Id<GuildMarker>) -> bool {
        self.guild_ids.is_empty() || self.guild_ids.contains(&guild)
    }
}

pub const DEFAULT_GATEWAY_URL: &str = "wss://gateway.discord.gg";

pub use crate::bus::MAX_SHARDS;

/// `coven gateway`: connect to Redis, serve health, run until stopped or refused.
pub async fn command(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Outcome> {
    let metrics = crate::prometheus::install(&shutdown);
    let health = health::Health::default();
    let addr = health::serve(settings.bind, health.clone(), shutdown.clone()).await?;
    println!("coven gateway health listening on http://{addr}");
    if let Some(handle) = metrics {
        let at = crate::prometheus::serve(settings.metrics_bind, handle, shutdown.clone()).await?;
        println!("coven gateway metrics at http://{at}/metrics");
    }
    let redis_url = settings
        .redis_url
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("REDIS_URL is required"))?;
    let redis = crate::bus::redis::Redis::connect(
        redis_url.expose_secret(),
        &settings.key_prefix,
        settings.event_log_max_len,
        settings.redis_retry_for,
        settings.durability,
    )
    .await?;
    let deployment: Arc<dyn Deployment> = Arc::new(redis);
    run::run(settings, deployment, health, shutdown).await
}
