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
use crate::config::{self, DiscordArgs, Reader};
use crate::discord::{Discord, DiscordSettings};

/// Flags of `coven web` (each also read from its environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Address to listen on
    #[arg(long, env = "BIND")]
    pub bind: Option<String>,
    /// Address of the Prometheus `/metrics` listener (keep it off the public network)
    #[arg(long, env = "METRICS_BIND")]
    pub metrics_bind: Option<String>,
    /// The URL people open: an origin such as https://coven.example.com, no path (decides
    /// the OAuth2 redirect and whether cookies are Secure)
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Redis holding the event log, shared state and sessions
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    #[command(flatten)]
    pub discord: DiscordArgs,
    /// Discord REST base URL
    #[arg(long, env = "DISCORD_API_URL")]
    pub discord_api_url: Option<String>,
    /// Discord OAuth2 base URL (the authorize page is under it)
    #[arg(long, env = "DISCORD_OAUTH_URL")]
    pub discord_oauth_url: Option<String>,
    /// Prefix of every Redis key
    #[arg(long, env = "COVEN_KEY_PREFIX")]
    pub coven_key_prefix: Option<String>,
    /// Players a room holds (1–99, Discord's limit)
    #[arg(long, env = "ROOM_MAX_PLAYERS")]
    pub room_max_players: Option<String>,
    /// On SIGTERM, open streams are closed spread over this long (1s–10m)
    #[arg(long, env = "DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// A session unused this long is forgotten (10m–90d)
    #[arg(long, env = "SESSION_TTL")]
    pub session_ttl: Option<String>,
    /// Events a stream may fall behind before it is cut off (1–65,536)
    #[arg(long, env = "STREAM_BUFFER")]
    pub stream_buffer: Option<String>,
    /// How long a viewer stays listed after their replica last vouched for them (3s–10m)
    #[arg(long, env = "VIEWER_TTL", hide = true)]
    pub viewer_ttl: Option<String>,
    /// Interval of keep-alive comments on streams (1s–5m)
    #[arg(long, env = "STREAM_KEEPALIVE", hide = true)]
    pub stream_keepalive: Option<String>,
    /// New rooms go into this category (default: no category)
    #[arg(long, env = "DISCORD_ROOM_CATEGORY_ID")]
    pub discord_room_category_id: Option<String>,
    /// Key that signs invite links (32 bytes or more)
    #[arg(long, env = "INVITE_SECRET", hide_env_values = true)]
    pub invite_secret: Option<String>,
    /// How long an invite link stays valid (1m–30d)
    #[arg(long, env = "INVITE_TTL")]
    pub invite_ttl: Option<String>,
    /// A room with nobody in voice and nobody viewing it for this long is closed (1s–7d)
    #[arg(long, env = "ROOM_IDLE_TIMEOUT")]
    pub room_idle_timeout: Option<String>,
    /// How often one replica looks for idle rooms (100ms–1h, at most ROOM_IDLE_TIMEOUT)
    #[arg(long, env = "ROOM_SWEEP_INTERVAL")]
    pub room_sweep_interval: Option<String>,
    /// Warning given (`room.closing`) before an idle room is closed (1s–1h)
    #[arg(long, env = "ROOM_CLOSE_WARNING")]
    pub room_close_warning: Option<String>,
    /// How often a member's roles and membership are rechecked with Discord (per user,
    /// across replicas; 1s–1h)
    #[arg(long, env = "MEMBER_RECHECK")]
    pub member_recheck: Option<String>,
    /// Live streams one person may hold open on one replica (1-100000)
    #[arg(long, env = "STREAM_MAX_PER_USER")]
    pub stream_max_per_user: Option<String>,
    /// A stream whose socket accepts nothing for this long is cut (1s-10m); it reconnects
    /// and replays
    #[arg(long, env = "STREAM_WRITE_TIMEOUT")]
    pub stream_write_timeout: Option<String>,
    /// Bytes of events a stream may fall behind (catching up from the replica's memory)
    /// before it is cut (65536-268435456)
    #[arg(long, env = "STREAM_MAX_BEHIND")]
    pub stream_max_behind: Option<String>,
}

/// Checked settings of a web replica.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub metrics_bind: SocketAddr,
    pub public_url: Url,
    pub redis_url: Option<SecretString>,
    pub guild_id: Id<GuildMarker>,
    pub discord: DiscordSettings,
    pub key_prefix: String,
    pub max_players: u16,
    pub drain_timeout: Duration,
    pub session_ttl: Duration,
    pub stream_buffer: usize,
    pub viewer_ttl: Duration,
    pub keepalive: Duration,
    pub room_category: Option<Id<ChannelMarker>>,
    pub invite_secret: SecretString,
    pub invite_ttl: Duration,
    pub room_idle_timeout: Duration,
    pub room_sweep_interval: Duration,
    pub room_close_warning: Duration,
    pub member_recheck: Duration,
    pub stream_max_per_user: usize,
    pub stream_write_timeout: Duration,
    pub stream_max_behind: usize,
}

pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:3000";

impl Args {
    pub fn settings(&self, r: &mut Reader) -> Option<Settings> {
        let bind = r.or_default(
            "BIND",
            self.bind.as_deref(),
            SocketAddr::from(([127, 0, 0, 1], 3000)),
            config::parse_bind,
        );
        let metrics_bind = r.or_default(
            "METRICS_BIND",
            self.metrics_bind.as_deref(),
            SocketAddr::from(([127, 0, 0, 1], 9464)),
            config::parse_bind,
        );
        let public_url = r.or_default(
            "PUBLIC_URL",
            self.public_url.as_deref(),
            Url::parse(DEFAULT_PUBLIC_URL).ok()?,
            config::parse_public_url,
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
        let discord = DiscordSettings::read(
            r,
            &self.discord,
            self.discord_api_url.as_deref(),
            self.discord_oauth_url.as_deref(),
        );
        let key_prefix = r.or_default(
            "COVEN_KEY_PREFIX",
            self.coven_key_prefix.as_deref(),
            "coven".to_owned(),
            config::parse_key_prefix,
        );
        let max_players = r.or_default(
            "ROOM_MAX_PLAYERS",
            self.room_max_players.as_deref(),
            4,
            config::parse_number_in(1, 99),
        );
        let drain_timeout = r.or_default(
            "DRAIN_TIMEOUT",
            self.drain_timeout.as_deref(),
            Duration::from_secs(10),
            config::parse_duration_in(secs(1), secs(600)),
        );
        let session_ttl = r.or_default(
            "SESSION_TTL",
            self.session_ttl.as_deref(),
            Duration::from_secs(7 * 24 * 3600),
            config::parse_duration_in(secs(600), secs(90 * DAY)),
        );
        let stream_buffer = r.or_default(
            "STREAM_BUFFER",
            self.stream_buffer.as_deref(),
            1024,
            // Each stream may hold this many events queued: bounded so a typo cannot make
            // one slow client hold gigabytes (or abort the process allocating them).
            config::parse_number_in::<usize>(1, 65_536),
        );
        let viewer_ttl = r.or_default(
            "VIEWER_TTL",
            self.viewer_ttl.as_deref(),
            Duration::from_secs(30),
            // Refreshed every third of it: under 3 s the refreshes would be a busy loop.
            config::parse_duration_in(secs(3), secs(600)),
        );
        let keepalive = r.or_default(
            "STREAM_KEEPALIVE",
            self.stream_keepalive.as_deref(),
            Duration::from_secs(15),
            config::parse_duration_in(secs(1), secs(300)),
        );
        let room_category = r.optional(
            "DISCORD_ROOM_CATEGORY_ID",
            self.discord_room_category_id.as_deref(),
            config::parse_channel_id,
        );
        let invite_secret = r.required(
            "INVITE_SECRET",
            self.invite_secret.as_deref(),
            config::parse_secret(32),
        );
        let duration = |r: &mut Reader, name, raw: &Option<String>, default, min, max| {
            r.or_default(
                name,
                raw.as_deref(),
                default,
                config::parse_duration_in(min, max),
            )
        };
        let invite_ttl = duration(
            r,
            "INVITE_TTL",
            &self.invite_ttl,
            secs(24 * 3600),
            secs(60),
            secs(30 * DAY),
        );
        let room_idle_timeout = duration(
            r,
            "ROOM_IDLE_TIMEOUT",
            &self.room_idle_timeout,
            secs(3600),
            secs(1),
            secs(7 * DAY),
        );
        let room_sweep_interval = duration(
            r,
            "ROOM_SWEEP_INTERVAL",
            &self.room_sweep_interval,
            secs(300),
            Duration::from_millis(100),
            secs(3600),
        );
        let room_close_warning = duration(
            r,
            "ROOM_CLOSE_WARNING",
            &self.room_close_warning,
            secs(30),
            secs(1),
            secs(3600),
        );
        // Discord allows a bot about 50 requests a second in all; a recheck per user more
        // often than every second would only spend them.
        let member_recheck = duration(
            r,
            "MEMBER_RECHECK",
            &self.member_recheck,
            secs(30),
            secs(1),
            secs(3600),
        );
        let stream_max_per_user = r.or_default(
            "STREAM_MAX_PER_USER",
            self.stream_max_per_user.as_deref(),
            32,
            config::parse_number_in(1usize, 100_000),
        );
        let stream_write_timeout = duration(
            r,
            "STREAM_WRITE_TIMEOUT",
            &self.stream_write_timeout,
            secs(30),
            secs(1),
            secs(600),
        );
        // A sweep finds a room idle up to one interval late: an interval longer than the
        // idle timeout itself would make the timeout meaningless. (The close warning runs
        // after the idle timeout, not inside it, and the sweeper wakes for it on time, so
        // it needs no such check.)
        if let (Some(idle), Some(sweep)) = (room_idle_timeout, room_sweep_interval)
            && sweep > idle
        {
            r.problem(
                "ROOM_SWEEP_INTERVAL",
                format!(
                    "got {}, longer than ROOM_IDLE_TIMEOUT ({}): idle rooms would be noticed \
                     up to an interval late; set it to {} or less",
                    config::short_duration(sweep),
                    config::short_duration(idle),
                    config::short_duration(idle)
                ),
            );
            return None;
        }
        let stream_max_behind = r.or_default(
            "STREAM_MAX_BEHIND",
            self.stream_max_behind.as_deref(),
            2 * 1024 * 1024,
            config::parse_number_in(64 * 1024usize, 256 * 1024 * 1024),
        );
        Some(Settings {
            stream_max_behind: stream_max_behind?,
            stream_max_per_user: stream_max_per_user?,
            stream_write_timeout: stream_write_timeout?,
            member_recheck: member_recheck?,
            room_category: room_category?,
            invite_secret: invite_secret?,
            invite_ttl: invite_ttl?,
            room_idle_timeout: room_idle_timeout?,
            room_sweep_interval: room_sweep_interval?,
            room_close_warning: room_close_warning?,
            bind: bind?,
            metrics_bind: metrics_bind?,
            public_url: public_url?,
            redis_url: Some(redis_url?),
            guild_id: guild_id?,
            discord: discord?,
            key_prefix: key_prefix?,
            max_players: max_players?,
            drain_timeout: drain_timeout?,
            session_ttl: session_ttl?,
            stream_buffer: stream_buffer?,
            viewer_ttl: viewer_ttl?,
            keepalive: keepalive?,
        })
    }
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
    let sessions = SessionManagerLayer::new(store)
        .with_name("coven_session")
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
        .route("/api/stream", get(stream::stream))
        // Forms here are a room name and a token; anything bigger is not ours.
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
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
    Router::new()
        .merge(site)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .nest_service("/assets", assets::router::<()>())
        .fallback(pages::not_found)
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
    let bus = crate::bus::redis::RedisBus::connect_with_timeout(
        &redis_url,
        &settings.key_prefix,
        settings.guild_id,
        // A replica never appends enough to trim; the gateway's setting governs the log.
        100_000,
        crate::bus::redis::REQUEST_TIMEOUT,
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
