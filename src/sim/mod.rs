//! `coven sim`: a local Discord that twilight-gateway, twilight-http and oauth2 talk to
//! unmodified — Gateway v10, the REST routes Coven uses, OAuth2 — plus a control API
//! under `/_sim/` for tests and demos.
//!
//! It is a test double for Discord only. Owns the simulated guilds ([`world`], one
//! `World` each, held in [`State`]), the bot's Gateway sessions ([`gateway`]), REST ([`rest`]), OAuth2 ([`oauth`]), the pages of
//! Discord's web app that Coven links to ([`app`]) and control API ([`control`]), and the
//! ids it hands out ([`ids`]). Must not depend on any other Coven
//! component.

pub mod app;
pub mod control;
pub mod gateway;
pub mod ids;
pub mod oauth;
pub mod rest;
pub mod world;

use std::collections::BTreeMap;
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

use crate::config::{self, Problem};

/// Defaults used when the Discord identity settings are unset, so the simulator runs with
/// no configuration at all. They are printed at start.
pub mod defaults {
    /// "Coven Playgroup", the first guild: the one `DISCORD_GUILD_ID` names (this id by
    /// default), and the one the control API's unnamed routes act on.
    pub const GUILD_ID: u64 = 1_190_000_000_000_000_001;
    /// "Night Owls", a second seeded guild with the bot in it (on the other shard of two
    /// from the first guild, by Discord's `(guild_id >> 22) % num_shards`).
    pub const NIGHT_OWLS_GUILD_ID: u64 = 1_190_000_000_004_194_315;
    /// "Dice Tower", a seeded guild the bot is not in; some seeded players may add it.
    pub const DICE_TOWER_GUILD_ID: u64 = 1_190_000_000_008_388_619;
    /// The id of the `i`-th (from 0) of the `SIM_GUILDS` generated guilds: consecutive
    /// values of `guild_id >> 22`, so they spread evenly over any number of shards.
    pub const fn generated_guild_id(i: u32) -> u64 {
        GENERATED_GUILD_BASE + ((i as u64 + 1) << 22)
    }
    /// Below every id `generated_guild_id` gives.
    pub const GENERATED_GUILD_BASE: u64 = 1_180_000_000_000_000_000;
    /// The most generated guilds `SIM_GUILDS` allows.
    pub const MAX_GENERATED_GUILDS: u32 = 10_000;
    pub const CLIENT_ID: u64 = 1_190_000_000_000_000_002;
    pub const BOT_TOKEN: &str = "sim-bot-token";
    pub const CLIENT_SECRET: &str = "sim-client-secret";
    pub const BIND: &str = "127.0.0.1:3100";
}

/// Settings of the simulator: its flags, each also read from its environment variable.
/// Every one has a default, so the simulator runs with no configuration at all; the
/// identity defaults are printed at start.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address to listen on (use port 0 for any free port)
    #[arg(long, env = "BIND", default_value = defaults::BIND, value_parser = config::parse_bind)]
    pub bind: SocketAddr,
    /// The guild (server) Coven serves
    #[arg(long = "discord-guild-id", env = "DISCORD_GUILD_ID", default_value_t = defaults::GUILD_ID, value_parser = config::parse_snowflake)]
    pub guild_id: u64,
    /// Bot token (secret)
    #[arg(long = "discord-bot-token", env = "DISCORD_BOT_TOKEN", hide_env_values = true, default_value = defaults::BOT_TOKEN, value_parser = config::parse_secret(1))]
    pub bot_token: SecretString,
    /// OAuth2 application (client) id
    #[arg(long = "discord-client-id", env = "DISCORD_CLIENT_ID", default_value_t = defaults::CLIENT_ID, value_parser = config::parse_snowflake)]
    pub client_id: u64,
    /// OAuth2 client secret (secret)
    #[arg(long = "discord-client-secret", env = "DISCORD_CLIENT_SECRET", hide_env_values = true, default_value = defaults::CLIENT_SECRET, value_parser = config::parse_secret(1))]
    pub client_secret: SecretString,
    /// Base URL that clients use to reach the simulator (default: http://BIND)
    #[arg(long = "sim-public-url", env = "SIM_PUBLIC_URL", value_parser = config::parse_http_url)]
    pub public_url: Option<Url>,
    /// Gateway heartbeat interval in milliseconds (Discord uses 41250; 100–600,000)
    #[arg(long = "sim-heartbeat-interval-ms", env = "SIM_HEARTBEAT_INTERVAL_MS", default_value = "41250", value_parser = |raw: &str| config::parse_number_in::<u64>(100, 600_000)(raw).map(Duration::from_millis))]
    pub heartbeat_interval: Duration,
    /// How long a disconnected Gateway session stays resumable (1s–1h)
    #[arg(long = "sim-resume-ttl", env = "SIM_RESUME_TTL", default_value = "2m", value_parser = config::parse_duration_in(secs(1), secs(3600)))]
    pub resume_ttl: Duration,
    /// Lifetime of OAuth2 access tokens (1s–30d)
    #[arg(long = "sim-token-ttl", env = "SIM_TOKEN_TTL", default_value = "7d", value_parser = config::parse_duration_in(secs(1), secs(30 * 24 * 3600)))]
    pub token_ttl: Duration,
    /// Requests per REST rate-limit bucket per window (1–10,000)
    #[arg(long = "sim-rate-limit", env = "SIM_RATE_LIMIT", default_value = "5", value_parser = config::parse_number_in::<u32>(1, 10_000))]
    pub rate_limit: u32,
    /// Length of a REST rate-limit window (100ms–1h)
    #[arg(long = "sim-rate-window", env = "SIM_RATE_WINDOW", default_value = "1s", value_parser = config::parse_duration_in(Duration::from_millis(100), secs(3600)))]
    pub rate_window: Duration,
    /// Requests a second one token may make across all routes, Discord's global rate limit (1–100,000)
    #[arg(long = "sim-global-rate-limit", env = "SIM_GLOBAL_RATE_LIMIT", default_value = "50", value_parser = config::parse_number_in::<u32>(1, 100_000))]
    pub global_rate_limit: u32,
    /// Requests the OAuth2 token endpoint accepts per window (1–10,000)
    #[arg(long = "sim-token-rate-limit", env = "SIM_TOKEN_RATE_LIMIT", default_value = "5", value_parser = config::parse_number_in::<u32>(1, 10_000))]
    pub token_rate_limit: u32,
    /// Length of the OAuth2 token endpoint's rate-limit window (100ms–1h)
    #[arg(long = "sim-token-rate-window", env = "SIM_TOKEN_RATE_WINDOW", default_value = "1s", value_parser = config::parse_duration_in(Duration::from_millis(100), secs(3600)))]
    pub token_rate_window: Duration,
    /// Comma-separated OAuth2 redirect URIs to accept (default: any http(s) URL)
    #[arg(long = "sim-redirect-uris", env = "SIM_REDIRECT_URIS", value_delimiter = ',', value_parser = parse_redirect_uri)]
    pub redirect_uris: Vec<Url>,
    /// Generated guilds with the bot in them, besides the three seeded ones (0–10,000)
    #[arg(long = "sim-guilds", env = "SIM_GUILDS", default_value = "0", value_parser = config::parse_number_in::<u32>(0, defaults::MAX_GENERATED_GUILDS))]
    pub guilds: u32,
    /// Whether anyone who manages a guild may add the bot (Discord's "Public Bot"); false: only the application's owner
    #[arg(long = "sim-bot-public", env = "SIM_BOT_PUBLIC", default_value = "true", action = clap::ArgAction::Set, value_parser = parse_bool)]
    pub bot_public: bool,
    /// Shards GET /gateway/bot recommends (default: one per 1,000 guilds the bot is in, at least 1; 1–100,000)
    #[arg(long = "sim-shards", env = "SIM_SHARDS", value_parser = config::parse_number_in::<u64>(1, 100_000))]
    pub shards: Option<u64>,
    /// Discord's max_concurrency: identify buckets (`shard_id % max_concurrency`), each allowed one IDENTIFY per 5 s (1–1,024)
    #[arg(long = "sim-max-concurrency", env = "SIM_MAX_CONCURRENCY", default_value = "1", value_parser = config::parse_number_in::<u64>(1, 1024))]
    pub max_concurrency: u64,
    /// IDENTIFYs left of the day's 1,000 (session_start_limit.remaining) when the simulator starts (0–1,000)
    #[arg(long = "sim-session-start-remaining", env = "SIM_SESSION_START_REMAINING", default_value = "1000", value_parser = config::parse_number_in::<u64>(0, SESSION_START_TOTAL))]
    pub session_start_remaining: u64,
    /// Most guilds one Gateway session may hold; an IDENTIFY for more is closed with 4011 (Discord's figure is 2,500; 1–2,500)
    #[arg(long = "sim-max-guilds-per-shard", env = "SIM_MAX_GUILDS_PER_SHARD", default_value = "2500", value_parser = config::parse_number_in::<u64>(1, 2500))]
    pub max_guilds_per_shard: u64,
}

/// IDENTIFYs a bot may send per day ("Session Start Limit Object": `total`).
pub const SESSION_START_TOTAL: u64 = 1000;

fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// The declared defaults, listening on any free port (for tests and benchmarks).
impl Default for Settings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..config::defaults()
        }
    }
}

fn parse_redirect_uri(raw: &str) -> Result<Url, String> {
    let raw = raw.trim();
    Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e})"))
}

/// The simulated application and guilds are told apart by id.
pub fn contradictions(parsed: &config::Parsed) -> Vec<Problem> {
    let client = parsed.get::<u64>("DISCORD_CLIENT_ID");
    let guild = parsed.get::<u64>("DISCORD_GUILD_ID");
    if client.is_some() && client == guild {
        return vec![Problem::new(
            "DISCORD_CLIENT_ID",
            "must differ from DISCORD_GUILD_ID",
        )];
    }
    let seeded = |id: u64| {
        id == defaults::NIGHT_OWLS_GUILD_ID
            || id == defaults::DICE_TOWER_GUILD_ID
            || (id > defaults::GENERATED_GUILD_BASE
                && (id - defaults::GENERATED_GUILD_BASE).trailing_zeros() >= 22
                && (id - defaults::GENERATED_GUILD_BASE) >> 22
                    <= u64::from(defaults::MAX_GENERATED_GUILDS))
    };
    [("DISCORD_GUILD_ID", guild), ("DISCORD_CLIENT_ID", client)]
        .into_iter()
        .filter(|(_, id)| id.is_some_and(seeded))
        .map(|(name, _)| Problem::new(name, "must differ from the ids of the other seeded guilds"))
        .collect()
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

/// Why a GUILD_CREATE is sent after READY's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// The bot was just added to the guild.
    Joined,
    /// The guild is back from an outage.
    Available,
}

/// The simulator's mutable state, behind one lock so a change and its dispatches are
/// numbered in the order they happen.
pub struct State {
    /// The first guild ("Coven Playgroup", `DISCORD_GUILD_ID`): the one the control API's
    /// routes that name no guild act on.
    pub world: world::World,
    /// Every other guild, by id: the seeded ones and the `SIM_GUILDS` generated ones.
    pub others: BTreeMap<u64, world::World>,
    pub hub: gateway::Hub,
    pub oauth: oauth::Store,
    pub limits: rest::Limits,
}

impl State {
    /// Delivers dispatches of the first guild to the Gateway sessions.
    pub fn emit(&mut self, events: &[world::Dispatch]) {
        self.emit_in(self.world.guild_id, events);
    }

    /// Delivers a change's dispatches in `guild` to the sessions that hold it; none while
    /// the bot is not in the guild or the guild is unavailable (Discord sends a guild's
    /// events only to bots in it, and after an outage a GUILD_CREATE with all of it).
    pub fn emit_in(&mut self, guild: u64, events: &[world::Dispatch]) {
        if self
            .guild(guild)
            .is_some_and(|w| w.bot_in() && !w.unavailable)
        {
            self.hub.dispatch(guild, events);
        }
    }

    /// Sends GUILD_CREATE for `guild` to the sessions that hold it, each shaped by its
    /// intents. `why` decides `unavailable`: `false` for a guild back from an outage,
    /// absent for one the bot just joined, as Discord sends them (observed, and what
    /// libraries tell a join by: discord.py's `ConnectionState.parse_guild_create`,
    /// state.py, dispatches `guild_join` only when `unavailable` is absent and
    /// `guild_available` when it is `false`; hikari's `GuildJoinEvent` likewise).
    pub fn announce_guild(&mut self, guild: u64, why: Announce) {
        let Self {
            world, others, hub, ..
        } = self;
        let w = if world.guild_id == guild {
            Some(&*world)
        } else {
            others.get(&guild)
        };
        // A guild in an outage is announced when it comes back, as its other dispatches
        // are held until then.
        if let Some(w) = w.filter(|w| !w.unavailable) {
            hub.dispatch_guild_create(guild, |with_voice| {
                let mut create = w.guild_create_json(with_voice);
                if why == Announce::Joined
                    && let Some(fields) = create.as_object_mut()
                {
                    fields.remove("unavailable");
                }
                create
            });
        }
    }

    pub fn guild(&self, id: u64) -> Option<&world::World> {
        if id == self.world.guild_id {
            Some(&self.world)
        } else {
            self.others.get(&id)
        }
    }

    pub fn guild_mut(&mut self, id: u64) -> Option<&mut world::World> {
        if id == self.world.guild_id {
            Some(&mut self.world)
        } else {
            self.others.get_mut(&id)
        }
    }

    /// Every guild, the first one first, then by id.
    pub fn guilds(&self) -> impl Iterator<Item = &world::World> {
        std::iter::once(&self.world).chain(self.others.values())
    }

    /// A user of the simulator, whichever guild knows them.
    pub fn user(&self, id: u64) -> Option<&world::User> {
        self.guilds().find_map(|w| w.users.get(&id))
    }

    /// How many guilds the bot is in, whether or not they are available.
    pub fn bot_guilds(&self) -> usize {
        self.guilds().filter(|w| w.bot_in()).count()
    }

    /// The application's owner (Discord's "Public Bot" off lets only them add the bot):
    /// the first guild's owner.
    pub fn app_owner(&self) -> u64 {
        self.world.owner_id
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

    /// The shard count GET /gateway/bot recommends: `SIM_SHARDS`, or one per 1,000 guilds
    /// the bot is in (Discord recommends about that many; it requires sharding from 2,500).
    pub fn shards(&self, state: &State) -> u64 {
        self.settings
            .shards
            .unwrap_or_else(|| (state.bot_guilds() as u64).div_ceil(1000).max(1))
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
        // Dispatches are small frames sent one by one: with Nagle's algorithm each waits
        // for the client's delayed ACK of the one before (up to 40 ms on Linux), a delay
        // of the simulator's own that Discord's Gateway does not add.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let public_url = match &settings.public_url {
            Some(u) => u.clone(),
            None => Url::parse(&format!("http://{addr}"))?,
        };
        let first = world::World::seeded(settings.guild_id, settings.client_id);
        let others = world::seed_others(&first, settings.guilds)
            .into_iter()
            .map(|w| (w.guild_id, w))
            .collect();
        let state = State {
            world: first,
            others,
            hub: gateway::Hub::new(&settings),
            oauth: oauth::Store::default(),
            limits: rest::Limits::new(settings.rate_limit, settings.rate_window)
                .with_global(settings.global_rate_limit),
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
    let sim = Sim::start(settings, shutdown).await?;
    let s = &sim.shared.settings;
    println!("coven sim listening on {}", sim.url(""));
    println!("  gateway   {}", sim.shared.gateway_url());
    println!("  REST      {}", sim.url("/api/v10"));
    println!("  OAuth2    {}", sim.url("/oauth2/authorize"));
    println!("  control   {}", sim.url("/_sim/state"));
    // Defaults are public test values; configured secrets are never printed.
    for (name, value, default) in [
        (
            "DISCORD_GUILD_ID",
            s.guild_id.to_string(),
            defaults::GUILD_ID.to_string(),
        ),
        (
            "DISCORD_CLIENT_ID",
            s.client_id.to_string(),
            defaults::CLIENT_ID.to_string(),
        ),
        (
            "DISCORD_BOT_TOKEN",
            s.bot_token.expose_secret().to_owned(),
            defaults::BOT_TOKEN.to_owned(),
        ),
        (
            "DISCORD_CLIENT_SECRET",
            s.client_secret.expose_secret().to_owned(),
            defaults::CLIENT_SECRET.to_owned(),
        ),
    ] {
        if value == default {
            println!("  {name}={default} (default)");
        }
    }
    tracing::info!(addr = %sim.addr, "simulator ready");
    sim.stopped().await
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(gateway_or_index))
        .merge(rest::router(shared.clone()))
        .merge(oauth::router())
        .merge(app::router())
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
