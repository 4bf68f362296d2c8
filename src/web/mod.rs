//! `coven web`: the pages, the posts and the live stream people use, any number of
//! replicas behind a load balancer.
//!
//! Owns HTTP: sessions and Discord login ([`auth`]), the SSE stream and its fan-out
//! ([`stream`]), who is viewing which room ([`presence`]), server-rendered pages
//! ([`pages`]), health/readiness and response headers ([`ops`]), and the one
//! mapping of failures to responses ([`error`]). Reads shared state only through the
//! bus; must not hold the Discord Gateway (that is `gateway`). Replicas share nothing but
//! Redis, so any replica can serve any request.

pub mod assets;
pub mod auth;
pub mod conn;
pub mod error;
pub mod invites;
pub mod live;
pub mod members;
pub mod ops;
pub mod pages;
pub mod presence;
pub mod protect;
pub mod rooms;
pub mod stream;
pub mod sweeper;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::{get, post};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_sessions::{SessionManagerLayer, SessionStore, cookie::SameSite};
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker};
use url::Url;

use crate::bus::Backend;
use crate::config::{self, Problem};
use crate::discord::{Discord, DiscordSettings};

/// Settings of a web replica: its flags, each also read from its environment variable.
/// What has no default is here; everything with one is in [`Tuning`], which reads through.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Redis holding the event log, shared state and sessions
    #[arg(long, env = "REDIS_URL", hide_env_values = true, required = true, value_parser = config::parse_redis_url)]
    pub redis_url: Option<SecretString>,
    /// The guild (server) Coven serves
    #[arg(long = "discord-guild-id", env = "DISCORD_GUILD_ID", value_parser = config::parse_guild_id)]
    pub guild_id: Id<GuildMarker>,
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
    /// Events a stream may fall behind before it is cut off (1–65,536)
    // Each stream may hold this many events queued: bounded so a typo cannot make one slow
    // client hold gigabytes (or abort the process allocating them).
    #[arg(long, env = "STREAM_BUFFER", default_value = "1024", value_parser = config::parse_number_in::<usize>(1, 65_536))]
    pub stream_buffer: usize,
    /// How long a viewer stays listed after their replica last vouched for them (3s–10m)
    // Refreshed every third of it: under 3 s the refreshes would be a busy loop.
    #[arg(long, env = "VIEWER_TTL", hide = true, default_value = "30s", value_parser = config::parse_duration_in(secs(3), secs(600)))]
    pub viewer_ttl: Duration,
    /// Interval of keep-alive comments on streams (1s–5m)
    #[arg(long = "stream-keepalive", env = "STREAM_KEEPALIVE", hide = true, default_value = "15s", value_parser = config::parse_duration_in(secs(1), secs(300)))]
    pub keepalive: Duration,
    /// New rooms go into this category (default: no category)
    #[arg(long = "discord-room-category-id", env = "DISCORD_ROOM_CATEGORY_ID", value_parser = config::parse_channel_id)]
    pub room_category: Option<Id<ChannelMarker>>,
    /// How long an invite link stays valid (1m–30d)
    #[arg(long, env = "INVITE_TTL", default_value = "24h", value_parser = config::parse_duration_in(secs(60), secs(30 * DAY)))]
    pub invite_ttl: Duration,
    /// A room with nobody in voice and nobody viewing it for this long is closed (1s–7d)
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

const DAY: u64 = 24 * 3600;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Everything a request handler may use, shared by all of them.
pub struct App {
    pub settings: Settings,
    pub bus: Arc<dyn Backend>,
    pub discord: Discord,
    pub hub: stream::Hub,
    pub presence: presence::Presence,
    pub limits: protect::Limits,
    /// People with streams on this replica, whose membership is rechecked.
    pub watched: members::Watched,
    /// The gateway's freshness as this replica sees it.
    pub upstream: upstream::Watch,
}

pub type AppState = Arc<App>;

impl App {
    /// Starts the replica's shared tasks (the stream fan-out and presence refresh); they
    /// end with `shutdown`.
    pub async fn start(settings: Settings, bus: Arc<dyn Backend>) -> anyhow::Result<AppState> {
        let discord = Discord::new(&settings.discord, settings.guild_id, &settings.public_url)?;
        let hub = stream::Hub::start(
            bus.clone(),
            settings.guild_id,
            settings.stream_buffer,
            settings.stream_max_behind,
            settings.keepalive,
        )
        .await?;
        let presence = presence::Presence::start(bus.clone(), settings.viewer_ttl);
        Ok(Arc::new(App {
            settings,
            bus,
            discord,
            hub,
            presence,
            limits: protect::Limits::default(),
            watched: members::Watched::default(),
            upstream: upstream::Watch::default(),
        }))
    }

    pub fn secure_cookies(&self) -> bool {
        self.settings.public_url.scheme() == "https"
    }
}

/// The whole site. Generic over the session store: Redis in production, memory in the
/// demo.
pub fn router<S: SessionStore + Clone>(app: AppState, store: S) -> Router {
    let [csp, nosniff, referrer, frames] = ops::security_headers();
    let sessions = SessionManagerLayer::new(store.clone())
        .with_name(auth::SESSION_COOKIE)
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(app.secure_cookies())
        .with_expiry(auth::session_expiry(app.settings.session_ttl));
    let site = Router::new()
        .route("/", get(pages::landing))
        .route("/rooms", get(pages::rooms).post(rooms::create))
        .route("/rooms/{channel_id}", get(pages::room))
        .route(
            "/rooms/{channel_id}/close",
            get(rooms::confirm_close).post(rooms::close),
        )
        .route("/rooms/{channel_id}/move", post(rooms::move_in))
        .route("/rooms/{channel_id}/invite", post(rooms::new_invite))
        .route("/invite/{token}", get(invites::follow).post(invites::join))
        .route("/auth/login", get(auth::login))
        .route("/auth/callback", get(auth::callback))
        .route("/auth/logout", post(auth::logout))
        // Inside the sessions, so a logged-in person's 404 keeps their header.
        .fallback(pages::not_found)
        // Forms here are a room name and a token; anything bigger is not ours.
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::from_fn(error::with_header))
        .layer(sessions)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            error::shared_state_guard,
        ))
        // Pages carry CSRF tokens and invite links: no cache, shared or private, keeps
        // them. The stream says `no-cache` itself, which this leaves in place.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    // Streams know their viewer from the session cookie through the replica's session
    // cache: opening one reads no session into the request and writes none back.
    app.hub.sessions.set_store(Arc::new(store));
    let streams = Router::new()
        .route("/api/stream", get(stream::stream))
        .route("/api/stream/html", get(stream::html_stream))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            error::shared_state_guard,
        ));
    Router::new()
        .merge(site)
        .merge(streams)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .nest_service("/assets", assets::router::<()>())
        .with_state(app)
        .layer(axum::middleware::from_fn(ops::observe))
        .layer(csp)
        .layer(nosniff)
        .layer(referrer)
        .layer(frames)
        .layer(axum::middleware::from_fn(ops::close_if_unread))
        .layer(axum::middleware::from_fn(ops::body_deadline))
}

/// Serves until `shutdown`, then stops accepting and drains open streams over
/// `DRAIN_TIMEOUT` so their clients reconnect elsewhere without a stampede.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    app: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let drain = app.settings.drain_timeout;
    let hub = app.hub.clone();
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        hub.drain(drain).await;
    });
    let limits =
        conn::Limits::for_descriptors(open_file_limit(), app.settings.stream_write_timeout);
    tracing::debug!(?limits, "connection limits");
    // Streams end during the drain; anything still open a moment later is cut.
    conn::serve(
        listener,
        router,
        limits,
        shutdown,
        drain + Duration::from_secs(2),
    )
    .await?;
    Ok(())
}

/// The process's soft limit on open files (what the connection limit must stay under).
fn open_file_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// `coven web`: connect to Redis, serve until SIGTERM.
pub async fn command(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    raise_open_file_limit();
    let metrics = crate::prometheus::install(&shutdown);
    let redis_url = settings
        .redis_url
        .as_ref()
        .map(|u| u.expose_secret().to_owned())
        .ok_or_else(|| anyhow::anyhow!("REDIS_URL is required"))?;
    let bus = crate::bus::redis::RedisBus::connect_durable(
        &redis_url,
        &settings.key_prefix,
        settings.guild_id,
        // A replica never appends enough to trim; the gateway's setting governs the log.
        100_000,
        crate::bus::redis::REQUEST_TIMEOUT,
        settings.durability,
    )
    .await?;
    let pool =
        crate::bus::redis::session_pool(&redis_url, crate::bus::redis::REQUEST_TIMEOUT).await?;
    let store = tower_sessions_redis_store::RedisStore::new(pool);
    let listener = TcpListener::bind(settings.bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.bind))?;
    let addr = listener.local_addr()?;
    if let Some(handle) = metrics {
        let at = crate::prometheus::serve(settings.metrics_bind, handle, shutdown.clone()).await?;
        println!("coven web metrics at http://{at}/metrics");
    }
    let app = App::start(settings, Arc::new(bus)).await?;
    sweeper::start(app.clone(), shutdown.clone());
    members::Watched::start(app.clone(), shutdown.clone());
    app.upstream
        .start(app.bus.clone(), app.hub.clone(), shutdown.clone());
    let router = router(app.clone(), store);
    println!("coven web listening on http://{addr}/");
    serve(listener, router, app, shutdown).await
}

/// Each stream is an open socket: raise the soft limit on open files to the hard one so
/// thousands of streams fit.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
