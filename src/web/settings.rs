//! Settings of a web replica: its flags, each also read from its environment variable,
//! and the one check between two of them.
//!
//! Owns the declarations (the one description of each setting is in
//! `docs/configuration.md`, held to these by a test). Must not start anything.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker};
use url::Url;

use crate::config::{self, Problem};
use crate::discord::DiscordSettings;

/// Settings of a web replica: its flags, each also read from its environment variable.
/// What has no default is here; everything with one is in [`Tuning`], which reads through.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Redis holding the event log, shared state and sessions
    #[arg(long, env = "REDIS_URL", hide_env_values = true, required = true, value_parser = config::parse_redis_url)]
    pub redis_url: Option<SecretString>,
    /// The guilds (servers) Coven serves: one id or a comma-separated list (default:
    /// every guild the bot is in; with a list, nobody is offered "Add Coven")
    #[arg(long = "discord-guild-id", env = "DISCORD_GUILD_ID", value_delimiter = ',', value_parser = config::parse_guild_id)]
    pub guild_ids: Vec<Id<GuildMarker>>,
    #[command(flatten)]
    pub discord: DiscordSettings,
    /// Key that signs invite links (32 bytes or more)
    #[arg(long, env = "INVITE_SECRET", hide_env_values = true, value_parser = config::parse_secret(32))]
    pub invite_secret: SecretString,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// The web settings with a default, which the demo keeps.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Address to listen on
    #[arg(long, env = "BIND", default_value = DEFAULT_BIND, value_parser = config::parse_bind)]
    pub bind: SocketAddr,
    /// Address of the Prometheus `/metrics` listener (keep it off the public network)
    #[arg(long, env = "METRICS_BIND", default_value = "127.0.0.1:9464", value_parser = config::parse_bind)]
    pub metrics_bind: SocketAddr,
    /// The URL people open: an origin such as https://coven.example.com, no path (decides
    /// the OAuth2 redirect and whether cookies are Secure)
    #[arg(long, env = "PUBLIC_URL", default_value = DEFAULT_PUBLIC_URL, value_parser = config::parse_public_url)]
    pub public_url: Url,
    /// Prefix of every Redis key
    #[arg(long = "coven-key-prefix", env = "COVEN_KEY_PREFIX", default_value = config::KEY_PREFIX, value_parser = config::parse_key_prefix)]
    pub key_prefix: String,
    /// Players a room holds (1–99, Discord's limit)
    #[arg(long = "room-max-players", env = "ROOM_MAX_PLAYERS", default_value = "4", value_parser = config::parse_number_in::<u16>(1, 99))]
    pub max_players: u16,
    /// On SIGTERM, open streams are closed spread over this long (1s–10m)
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "10s", value_parser = config::parse_duration_in(secs(1), secs(600)))]
    pub drain_timeout: Duration,
    /// A session unused this long is forgotten (10m–90d)
    #[arg(long, env = "SESSION_TTL", default_value = "7d", value_parser = config::parse_duration_in(secs(600), secs(90 * DAY)))]
    pub session_ttl: Duration,
    /// Frames a stream may fall behind the live ring before it catches up from the
    /// replica's recent events (1–65,536)
    // The size of the ring every stream of the replica shares: bounded so a typo cannot
    // make the replica hold gigabytes (or abort the process allocating them).
    #[arg(long, env = "STREAM_BUFFER", default_value = "1024", value_parser = config::parse_number_in::<usize>(1, 65_536))]
    pub stream_buffer: usize,
    /// How long a viewer stays listed after their replica last vouched for them (3s–10m)
    // Refreshed every third of it: under 3 s the refreshes would be a busy loop.
    #[arg(long, env = "VIEWER_TTL", hide = true, default_value = "30s", value_parser = config::parse_duration_in(secs(3), secs(600)))]
    pub viewer_ttl: Duration,
    /// Interval of keep-alive comments on streams (1s–5m)
    #[arg(long = "stream-keepalive", env = "STREAM_KEEPALIVE", hide = true, default_value = "15s", value_parser = config::parse_duration_in(secs(1), secs(300)))]
    pub keepalive: Duration,
    /// New rooms go into this category; a comma-separated list gives each guild its own
    /// (each category names its guild; default: no category)
    #[arg(long = "discord-room-category-id", env = "DISCORD_ROOM_CATEGORY_ID", value_delimiter = ',', value_parser = config::parse_channel_id)]
    pub room_categories: Vec<Id<ChannelMarker>>,
    /// Who may add Coven to a server they manage from the communities page: `anyone`
    /// (with Manage Server there) or `off`
    #[arg(
        long = "add-coven",
        env = "ADD_COVEN",
        default_value = "anyone",
        value_enum
    )]
    pub add_coven: AddCoven,
    /// Communities this deployment serves at most (1–1,000,000); a server past it is told
    /// so and served nothing
    #[arg(long = "max-guilds", env = "MAX_GUILDS", default_value = "10000", value_parser = config::parse_number_in::<usize>(1, 1_000_000))]
    pub max_guilds: usize,
    /// How long an invite link stays valid (1m–30d)
    #[arg(long, env = "INVITE_TTL", default_value = "24h", value_parser = config::parse_duration_in(secs(60), secs(30 * DAY)))]
    pub invite_ttl: Duration,
    /// A room with nobody in voice and nobody viewing it for this long gets the closing
    /// warning (room.closing) and is closed ROOM_CLOSE_WARNING later (1s–7d)
    #[arg(long, env = "ROOM_IDLE_TIMEOUT", default_value = "1h", value_parser = config::parse_duration_in(secs(1), secs(7 * DAY)))]
    pub room_idle_timeout: Duration,
    /// How often one replica looks for idle rooms (100ms–1h, at most ROOM_IDLE_TIMEOUT)
    #[arg(long, env = "ROOM_SWEEP_INTERVAL", default_value = "5m", value_parser = config::parse_duration_in(Duration::from_millis(100), secs(3600)))]
    pub room_sweep_interval: Duration,
    /// Warning given (`room.closing`) before an idle room is closed (1s–1h)
    #[arg(long, env = "ROOM_CLOSE_WARNING", default_value = "30s", value_parser = config::parse_duration_in(secs(1), secs(3600)))]
    pub room_close_warning: Duration,
    /// How often a member's roles and membership are rechecked with Discord (per user,
    /// across replicas; 1s–1h)
    // Discord allows a bot about 50 requests a second in all; a recheck per user more often
    // than every second would only spend them.
    #[arg(long, env = "MEMBER_RECHECK", default_value = "30s", value_parser = config::parse_duration_in(secs(1), secs(3600)))]
    pub member_recheck: Duration,
    /// Live streams one person may hold open on one replica (1-100000)
    #[arg(long, env = "STREAM_MAX_PER_USER", default_value = "32", value_parser = config::parse_number_in::<usize>(1, 100_000))]
    pub stream_max_per_user: usize,
    /// A stream whose socket accepts nothing for this long is cut (1s-10m); it reconnects
    /// and replays
    #[arg(long, env = "STREAM_WRITE_TIMEOUT", default_value = "30s", value_parser = config::parse_duration_in(secs(1), secs(600)))]
    pub stream_write_timeout: Duration,
    /// Bytes of events a stream may fall behind (catching up from the replica's memory)
    /// before it is cut (65,536–268,435,456)
    #[arg(long, env = "STREAM_MAX_BEHIND", default_value = "2097152", value_parser = config::parse_number_in::<usize>(64 * 1024, 256 * 1024 * 1024))]
    pub stream_max_behind: usize,
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

pub const DEFAULT_BIND: &str = "127.0.0.1:3000";
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:3000";

/// A sweep finds a room idle up to one interval late: an interval longer than the idle
/// timeout itself would make the timeout meaningless. (The close warning runs after the
/// idle timeout, not inside it, and the sweeper wakes for it on time, so it needs no such
/// check.)
pub fn contradictions(parsed: &config::Parsed) -> Vec<Problem> {
    let idle = parsed.get::<Duration>("ROOM_IDLE_TIMEOUT");
    let sweep = parsed.get::<Duration>("ROOM_SWEEP_INTERVAL");
    let (Some(idle), Some(sweep)) = (idle, sweep) else {
        return Vec::new();
    };
    if sweep <= idle {
        return Vec::new();
    }
    let idle = config::short_duration(idle);
    vec![Problem::new(
        "ROOM_SWEEP_INTERVAL",
        format!(
            "got {}, longer than ROOM_IDLE_TIMEOUT ({idle}): idle rooms would be noticed up \
             to an interval late; set it to {idle} or less",
            config::short_duration(sweep),
        ),
    )]
}

/// `ADD_COVEN`: who is offered "Add Coven".
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AddCoven {
    /// Anyone with Manage Server (or Administrator) in a server the bot is not in.
    Anyone,
    /// Nobody: the deployment serves the servers it is in.
    Off,
}

const DAY: u64 = 24 * 3600;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
