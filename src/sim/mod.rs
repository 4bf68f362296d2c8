//! `coven sim`: a local Discord that twilight-gateway, twilight-http and oauth2 talk to
//! unmodified — Gateway v10, the REST routes Coven uses, OAuth2 — plus a control API
//! under `/_sim/` for tests and demos.
//!
//! It is a test double for Discord only. Owns the simulated guild ([`world`]), its
//! Gateway sessions ([`gateway`]), REST ([`rest`]), OAuth2 ([`oauth`]) and control API
//! ([`control`]), and the ids it hands out ([`ids`]). Must not depend on any other Coven
//! component.

pub mod control;
pub mod gateway;
pub mod ids;
pub mod oauth;
pub mod rest;
pub mod world;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State as AxumState, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{self, DiscordArgs, Reader};

/// Defaults used when the Discord identity settings are unset, so the simulator runs with
/// no configuration at all. They are printed at start.
pub mod defaults {
    pub const GUILD_ID: u64 = 1_190_000_000_000_000_001;
    pub const CLIENT_ID: u64 = 1_190_000_000_000_000_002;
    pub const BOT_TOKEN: &str = "sim-bot-token";
    pub const CLIENT_SECRET: &str = "sim-client-secret";
    pub const BIND: &str = "127.0.0.1:3100";
}

/// Flags of `coven sim` (each also read from its environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Address to listen on (use port 0 for any free port)
    #[arg(long, env = "BIND")]
    pub bind: Option<String>,
    #[command(flatten)]
    pub discord: DiscordArgs,
    /// Base URL that clients use to reach the simulator (default: http://BIND)
    #[arg(long, env = "SIM_PUBLIC_URL")]
    pub sim_public_url: Option<String>,
    /// Gateway heartbeat interval in milliseconds (Discord uses 41250; 100–600,000)
    #[arg(long, env = "SIM_HEARTBEAT_INTERVAL_MS")]
    pub sim_heartbeat_interval_ms: Option<String>,
    /// How long a disconnected Gateway session stays resumable (1s–1h)
    #[arg(long, env = "SIM_RESUME_TTL")]
    pub sim_resume_ttl: Option<String>,
    /// Lifetime of OAuth2 access tokens (1s–30d)
    #[arg(long, env = "SIM_TOKEN_TTL")]
    pub sim_token_ttl: Option<String>,
    /// Requests per REST rate-limit bucket per window (1–10,000)
    #[arg(long, env = "SIM_RATE_LIMIT")]
    pub sim_rate_limit: Option<String>,
    /// Length of a REST rate-limit window (100ms–1h)
    #[arg(long, env = "SIM_RATE_WINDOW")]
    pub sim_rate_window: Option<String>,
    /// Requests the OAuth2 token endpoint accepts per window (1–10,000)
    #[arg(long, env = "SIM_TOKEN_RATE_LIMIT")]
    pub sim_token_rate_limit: Option<String>,
    /// Length of the OAuth2 token endpoint's rate-limit window (100ms–1h)
    #[arg(long, env = "SIM_TOKEN_RATE_WINDOW")]
    pub sim_token_rate_window: Option<String>,
    /// Comma-separated OAuth2 redirect URIs to accept (default: any http(s) URL)
    #[arg(long, env = "SIM_REDIRECT_URIS")]
    pub sim_redirect_uris: Option<String>,
}

/// Checked settings of the simulator.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub public_url: Option<Url>,
    pub guild_id: u64,
    pub client_id: u64,
    pub bot_token: SecretString,
    pub client_secret: SecretString,
    pub heartbeat_interval: Duration,
    pub resume_ttl: Duration,
    pub token_ttl: Duration,
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub token_rate_limit: u32,
    pub token_rate_window: Duration,
    pub redirect_uris: Vec<Url>,
    /// Identity settings that fell back to a default (printed at start).
    pub defaulted: Vec<&'static str>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_url: None,
            guild_id: defaults::GUILD_ID,
            client_id: defaults::CLIENT_ID,
            bot_token: SecretString::from(defaults::BOT_TOKEN),
            client_secret: SecretString::from(defaults::CLIENT_SECRET),
            heartbeat_interval: Duration::from_millis(41_250),
            resume_ttl: Duration::from_secs(120),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            rate_limit: 5,
            rate_window: Duration::from_secs(1),
            token_rate_limit: 5,
            token_rate_window: Duration::from_secs(1),
            redirect_uris: Vec::new(),
            defaulted: Vec::new(),
        }
    }
}

impl Args {
    pub fn settings(&self, r: &mut Reader) -> Option<Settings> {
        let d = Settings::default();
        let mut defaulted = Vec::new();
        let mut note = |name, raw: Option<&str>| {
            if raw.is_none_or(|s| s.trim().is_empty()) {
                defaulted.push(name);
            }
        };
        note("DISCORD_GUILD_ID", self.discord.guild_id());
        note(
            "DISCORD_CLIENT_ID",
            self.discord.discord_client_id.as_deref(),
        );
        note(
            "DISCORD_BOT_TOKEN",
            self.discord.discord_bot_token.as_deref(),
        );
        note(
            "DISCORD_CLIENT_SECRET",
            self.discord.discord_client_secret.as_deref(),
        );

        let bind = r.or_default(
            "BIND",
            self.bind.as_deref(),
            defaults::BIND.parse().unwrap_or(d.bind),
            config::parse_bind,
        );
        let public_url = r.optional(
            "SIM_PUBLIC_URL",
            self.sim_public_url.as_deref(),
            config::parse_http_url,
        );
        let guild_id = r.or_default(
            "DISCORD_GUILD_ID",
            self.discord.guild_id(),
            d.guild_id,
            |s| config::parse_guild_id(s).map(|id| id.get()),
        );
        let client_id = r.or_default(
            "DISCORD_CLIENT_ID",
            self.discord.discord_client_id.as_deref(),
            d.client_id,
            |s| config::parse_application_id(s).map(|id| id.get()),
        );
        let bot_token = r.or_default(
            "DISCORD_BOT_TOKEN",
            self.discord.discord_bot_token.as_deref(),
            d.bot_token.clone(),
            config::parse_secret(1),
        );
        let client_secret = r.or_default(
            "DISCORD_CLIENT_SECRET",
            self.discord.discord_client_secret.as_deref(),
            d.client_secret.clone(),
            config::parse_secret(1),
        );
        let heartbeat_interval = r.or_default(
            "SIM_HEARTBEAT_INTERVAL_MS",
            self.sim_heartbeat_interval_ms.as_deref(),
            d.heartbeat_interval,
            |s| config::parse_number_in::<u64>(100, 600_000)(s).map(Duration::from_millis),
        );
        let resume_ttl = r.or_default(
            "SIM_RESUME_TTL",
            self.sim_resume_ttl.as_deref(),
            d.resume_ttl,
            config::parse_duration_in(secs(1), secs(3600)),
        );
        let token_ttl = r.or_default(
            "SIM_TOKEN_TTL",
            self.sim_token_ttl.as_deref(),
            d.token_ttl,
            config::parse_duration_in(secs(1), secs(30 * 24 * 3600)),
        );
        let rate_limit = r.or_default(
            "SIM_RATE_LIMIT",
            self.sim_rate_limit.as_deref(),
            d.rate_limit,
            config::parse_number_in::<u32>(1, 10_000),
        );
        let rate_window = r.or_default(
            "SIM_RATE_WINDOW",
            self.sim_rate_window.as_deref(),
            d.rate_window,
            config::parse_duration_in(Duration::from_millis(100), secs(3600)),
        );
        let token_rate_limit = r.or_default(
            "SIM_TOKEN_RATE_LIMIT",
            self.sim_token_rate_limit.as_deref(),
            d.token_rate_limit,
            config::parse_number_in::<u32>(1, 10_000),
        );
        let token_rate_window = r.or_default(
            "SIM_TOKEN_RATE_WINDOW",
            self.sim_token_rate_window.as_deref(),
            d.token_rate_window,
            config::parse_duration_in(Duration::from_millis(100), secs(3600)),
        );
        let redirect_uris = r.or_default(
            "SIM_REDIRECT_URIS",
            self.sim_redirect_uris.as_deref(),
            Vec::new(),
            |s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(|u| Url::parse(u).map_err(|e| format!("{u:?} is not a URL ({e})")))
                    .collect()
            },
        );
        if client_id.is_some() && client_id == guild_id {
            r.problem("DISCORD_CLIENT_ID", "must differ from DISCORD_GUILD_ID");
            return None;
        }
        Some(Settings {
            bind: bind?,
            public_url: public_url?,
            guild_id: guild_id?,
            client_id: client_id?,
            bot_token: bot_token?,
            client_secret: client_secret?,
            heartbeat_interval: heartbeat_interval?,
            resume_ttl: resume_ttl?,
            token_ttl: token_ttl?,
            rate_limit: rate_limit?,
            rate_window: rate_window?,
            token_rate_limit: token_rate_limit?,
            token_rate_window: token_rate_window?,
            redirect_uris: redirect_uris?,
            defaulted,
        })
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Settings {
    /// Discord accepts the bot token with or without its `Bot ` prefix on the Gateway.
    pub fn token_matches(&self, given: &str) -> bool {
        let given = given.strip_prefix("Bot ").unwrap_or(given);
        given == self.bot_token.expose_secret()
    }
}

/// Everything the simulator's tasks share.
pub struct Shared {
    pub settings: Settings,
    /// Where clients reach us: `SIM_PUBLIC_URL`, or the bound address.
    pub public_url: Url,
    state: Mutex<State>,
    pub shutdown: CancellationToken,
}

/// The simulator's mutable state, behind one lock so a change and its dispatches are
/// numbered in the order they happen.
pub struct State {
    pub world: world::World,
    pub hub: gateway::Hub,
    pub oauth: oauth::Store,
    pub limits: rest::Limits,
}

impl State {
    /// Delivers a change's dispatches to the Gateway sessions.
    pub fn emit(&mut self, events: &[world::Dispatch]) {
        self.hub.dispatch(events);
    }
}

impl Shared {
    /// Locks the state. A panic while holding it cannot leave a half-applied change that
    /// matters more than staying up, so a poisoned lock is used as is.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Gateway URL we hand out (READY's resume_gateway_url, GET /gateway/bot).
    pub fn gateway_url(&self) -> String {
        let mut url = self.public_url.clone();
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        // Only http(s) → ws(s) happens here, which `set_scheme` always accepts.
        let _ = url.set_scheme(scheme);
        url.as_str().trim_end_matches('/').to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        config::join_url(&self.public_url, path)
    }
}

/// A running simulator.
pub struct Sim {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Sim {
    /// Binds `settings.bind` and serves until `shutdown` is cancelled.
    pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.bind)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.bind))?;
        let addr = listener.local_addr()?;
        let public_url = match &settings.public_url {
            Some(u) => u.clone(),
            None => Url::parse(&format!("http://{addr}"))?,
        };
        let state = State {
            world: world::World::seeded(settings.guild_id, settings.client_id),
            hub: gateway::Hub::new(settings.resume_ttl),
            oauth: oauth::Store::default(),
            limits: rest::Limits::new(settings.rate_limit, settings.rate_window),
        };
        let shared = Arc::new(Shared {
            settings,
            public_url,
            state: Mutex::new(state),
            shutdown: shutdown.clone(),
        });
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        });
        Ok(Self { addr, shared, task })
    }

    pub fn url(&self, path: &str) -> String {
        self.shared.url(path)
    }

    /// Waits until the server has stopped.
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }
}

/// `coven sim`: serve until a shutdown signal.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let defaulted = settings.defaulted.clone();
    let sim = Sim::start(settings, shutdown).await?;
    let s = &sim.shared.settings;
    println!("coven sim listening on {}", sim.url(""));
    println!("  gateway   {}", sim.shared.gateway_url());
    println!("  REST      {}", sim.url("/api/v10"));
    println!("  OAuth2    {}", sim.url("/oauth2/authorize"));
    println!("  control   {}", sim.url("/_sim/state"));
    let shown = |name: &str, value: String| {
        if defaulted.contains(&name) {
            println!("  {name}={value} (default)");
        }
    };
    shown("DISCORD_GUILD_ID", s.guild_id.to_string());
    shown("DISCORD_CLIENT_ID", s.client_id.to_string());
    // Defaults are public test values; configured secrets are never printed.
    shown("DISCORD_BOT_TOKEN", defaults::BOT_TOKEN.to_owned());
    shown("DISCORD_CLIENT_SECRET", defaults::CLIENT_SECRET.to_owned());
    tracing::info!(addr = %sim.addr, "simulator ready");
    sim.stopped().await
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(gateway_or_index))
        .merge(rest::router(shared.clone()))
        .merge(oauth::router())
        .nest("/_sim", control::router())
        .fallback(gateway_or_not_found)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            oauth::limit_token_requests,
        ))
        .with_state(shared)
}

/// Discord serves the Gateway at any path; `/` without an upgrade shows what this is.
async fn gateway_or_index(
    AxumState(shared): AxumState<Arc<Shared>>,
    Query(query): Query<gateway::GatewayQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(ws) => accept_gateway(shared, ws, query),
        Err(_) => control::index_page(&shared).into_response(),
    }
}

async fn gateway_or_not_found(
    AxumState(shared): AxumState<Arc<Shared>>,
    Query(query): Query<gateway::GatewayQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match upgrade {
        Ok(ws) => accept_gateway(shared, ws, query),
        Err(_) => rest::ApiError::not_found().into_response(),
    }
}

fn accept_gateway(
    shared: Arc<Shared>,
    ws: WebSocketUpgrade,
    query: gateway::GatewayQuery,
) -> Response {
    ws.on_upgrade(move |socket| gateway::serve_connection(shared, socket, query))
}
