//! `coven gateway`: holds the guild's Discord Gateway session and turns what Discord
//! says into domain events on the bus.
//!
//! Owns the shard ([`run`]), the derivation of events from dispatches ([`derive`]),
//! reconciling after reconnects, the leader lease, the stored session and the health
//! endpoint ([`health`]; metrics are on their own listener, [`crate::prometheus`]). Must not serve pages or call Discord's REST API on users'
//! behalf (that is `web`).

pub mod derive;
pub mod health;
pub mod run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker};
use url::Url;

use crate::bus::Backend;
use crate::config::{self, DiscordArgs, Reader};

pub use run::Outcome;

/// Flags of `coven gateway` (each also read from its environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Address of the health endpoint
    #[arg(long, env = "BIND")]
    pub bind: Option<String>,
    /// Address of the Prometheus `/metrics` listener (keep it off the public network)
    #[arg(long, env = "METRICS_BIND")]
    pub metrics_bind: Option<String>,
    /// Redis holding the event log and shared state (redis://, rediss://, ...)
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    #[command(flatten)]
    pub discord: DiscordArgs,
    /// Discord Gateway base URL
    #[arg(long, env = "DISCORD_GATEWAY_URL")]
    pub discord_gateway_url: Option<String>,
    /// Only voice channels in this category are rooms (default: every voice channel)
    #[arg(long, env = "DISCORD_ROOM_CATEGORY_ID")]
    pub discord_room_category_id: Option<String>,
    /// Prefix of every Redis key
    #[arg(long, env = "COVEN_KEY_PREFIX")]
    pub coven_key_prefix: Option<String>,
    /// Leader lease lifetime; a standby takes over within it (1s–1m)
    #[arg(long, env = "GATEWAY_LEASE_TTL")]
    pub gateway_lease_ttl: Option<String>,
    /// Events kept in the log (approximately; older ones are trimmed; 100–10,000,000)
    #[arg(long, env = "EVENT_LOG_MAX_LEN")]
    pub event_log_max_len: Option<String>,
    /// Events held in memory while Redis is unreachable before falling back to a
    /// reconcile (1–100,000)
    #[arg(long, env = "GATEWAY_QUEUE_SIZE")]
    pub gateway_queue_size: Option<String>,
}

/// Checked settings of the gateway.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub metrics_bind: SocketAddr,
    pub redis_url: SecretString,
    pub guild_id: Id<GuildMarker>,
    pub bot_token: SecretString,
    pub gateway_url: Url,
    pub room_category: Option<Id<ChannelMarker>>,
    pub key_prefix: String,
    pub lease_ttl: Duration,
    pub event_log_max_len: u64,
    pub queue_size: usize,
}

impl Settings {
    pub(crate) fn bot_token_value(&self) -> String {
        self.bot_token.expose_secret().to_owned()
    }
}

pub const DEFAULT_BIND: &str = "127.0.0.1:3001";
pub const DEFAULT_GATEWAY_URL: &str = "wss://gateway.discord.gg";

impl Args {
    pub fn settings(&self, r: &mut Reader) -> Option<Settings> {
        let bind = r.or_default(
            "BIND",
            self.bind.as_deref(),
            SocketAddr::from(([127, 0, 0, 1], 3001)),
            config::parse_bind,
        );
        let metrics_bind = r.or_default(
            "METRICS_BIND",
            self.metrics_bind.as_deref(),
            SocketAddr::from(([127, 0, 0, 1], 9465)),
            config::parse_bind,
        );
        let redis_url = r.required(
            "REDIS_URL",
            self.redis_url.as_deref(),
            config::parse_redis_url,
        );
        let guild_id = r.required(
            "DISCORD_GUILD_ID",
            self.discord.guild_id(),
            config::parse_guild_id,
        );
        let bot_token = r.required(
            "DISCORD_BOT_TOKEN",
            self.discord.discord_bot_token.as_deref(),
            config::parse_secret(1),
        );
        let gateway_url = r.or_default(
            "DISCORD_GATEWAY_URL",
            self.discord_gateway_url.as_deref(),
            Url::parse(DEFAULT_GATEWAY_URL).ok()?,
            config::parse_ws_url,
        );
        let room_category = r.optional(
            "DISCORD_ROOM_CATEGORY_ID",
            self.discord_room_category_id.as_deref(),
            config::parse_channel_id,
        );
        let key_prefix = r.or_default(
            "COVEN_KEY_PREFIX",
            self.coven_key_prefix.as_deref(),
            "coven".to_owned(),
            config::parse_key_prefix,
        );
        let lease_ttl = r.or_default(
            "GATEWAY_LEASE_TTL",
            self.gateway_lease_ttl.as_deref(),
            Duration::from_secs(10),
            // Renewed every third of its life: under a second that is a busy loop against
            // Redis, and every pause longer than it hands the guild to a standby. Over a
            // minute, a crashed gateway leaves the site stale that long.
            config::parse_duration_in(Duration::from_secs(1), Duration::from_secs(60)),
        );
        let event_log_max_len = r.or_default(
            "EVENT_LOG_MAX_LEN",
            self.event_log_max_len.as_deref(),
            100_000,
            // Fewer than a page's worth of events makes every reconnect a resync; ten
            // million envelopes are gigabytes of Redis memory.
            config::parse_number_in::<u64>(100, 10_000_000),
        );
        let queue_size = r.or_default(
            "GATEWAY_QUEUE_SIZE",
            self.gateway_queue_size.as_deref(),
            10_000,
            config::parse_number_in::<usize>(1, 100_000),
        );
        Some(Settings {
            queue_size: queue_size?,
            bind: bind?,
            metrics_bind: metrics_bind?,
            redis_url: redis_url?,
            guild_id: guild_id?,
            bot_token: bot_token?,
            gateway_url: gateway_url?,
            room_category: room_category?,
            key_prefix: key_prefix?,
            lease_ttl: lease_ttl?,
            event_log_max_len: event_log_max_len?,
        })
    }
}

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
    let bus = crate::bus::redis::RedisBus::connect(
        settings.redis_url.expose_secret(),
        &settings.key_prefix,
        settings.guild_id,
        settings.event_log_max_len,
    )
    .await?;
    let backend: Arc<dyn Backend> = Arc::new(bus);
    run::run(settings, backend, health, shutdown).await
}
