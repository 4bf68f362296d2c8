//! `coven web`: the pages, the posts and the live stream people use, any number of
//! replicas behind a load balancer.
//!
//! Layout, bottom to top (imports point down only):
//! - leaves every part shares: [`settings`], [`session`] (the logged-in person and their
//!   session), [`view`] (what templates render), [`return_to`];
//! - [`http`]: plumbing that knows no feature (connections, errors, protection, assets,
//!   the layers every answer gets);
//! - [`members`] (who is a member, rechecked) and [`guard`] (the extractors that decide
//!   who is asking);
//! - [`live`]: the hub and the two stream endpoints;
//! - the features: [`login`], [`invites`], [`rooms`], [`pages`], [`sweeper`], [`health`].
//!
//! This file is the composition root: [`App`] (what every handler may use, their state),
//! [`start`] (the one startup, for `coven web` and the demo alike), the router, and
//! serving. Reads shared state only through the bus; must not hold the Discord Gateway
//! (that is `gateway`). Replicas share nothing but Redis, so any replica can serve any
//! request.

pub mod adding;
pub mod guard;
pub mod guilds;
pub mod health;
pub mod http;
pub mod invites;
#[cfg(test)]
mod layers;
pub mod live;
pub mod login;
pub mod members;
pub mod pages;
pub mod people;
pub mod return_to;
pub mod rooms;
pub mod session;
pub mod settings;
pub mod sweeper;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_sessions::{SessionManagerLayer, cookie::SameSite};

pub use settings::{DEFAULT_BIND, DEFAULT_PUBLIC_URL, Settings, Tuning, contradictions};

use crate::bus::Deployment;
use crate::discord::Discord;
use http::{assets, conn, error, ops, protect};
use live::communities::{Communities, HubSettings};
use live::freshness;

/// Everything a request handler may use, shared by all of them.
pub struct App {
    pub settings: Settings,
    /// The communities served, and each one's bus.
    pub guilds: guilds::Guilds,
    pub discord: Discord,
    /// The guilds someone on this replica streams, each with its hub.
    pub communities: Arc<Communities>,
    /// What every post is checked against.
    pub protect: protect::Protect,
    /// First membership questions in flight here, asked once each.
    pub asking: members::Asking,
    /// People with streams on this replica, whose membership is rechecked.
    pub holders: members::StreamHolders,
    /// The gateway's shards' freshness as this replica sees it.
    pub upstream: freshness::Freshness,
    /// The session store, read by the session layer and the streams' session cache.
    pub sessions: session::Store,
    /// Each configured room category by its guild, asked of Discord once.
    pub categories: tokio::sync::OnceCell<
        std::collections::HashMap<
            twilight_model::id::Id<twilight_model::id::marker::GuildMarker>,
            twilight_model::id::Id<twilight_model::id::marker::ChannelMarker>,
        >,
    >,
}

pub type AppState = Arc<App>;

impl App {
    pub fn secure_cookies(&self) -> bool {
        self.settings.public_url.scheme() == "https"
    }
}

/// A replica's state with its tasks running, and the router that serves it.
pub struct Replica {
    pub app: AppState,
    pub router: Router,
}

/// The one startup of a web replica, for `coven web` and the demo alike: its state from
/// its settings, bus and session store, the tasks that run beside the requests (the
/// stream fan-out, presence, the idle-room sweeper, membership rechecks, the gateway's
/// freshness), all ending with `shutdown`, and its router.
pub async fn start(
    settings: Settings,
    deployment: Arc<dyn Deployment>,
    sessions: session::Store,
    shutdown: &CancellationToken,
) -> anyhow::Result<Replica> {
    let discord = Discord::new(&settings.discord, &settings.public_url)?;
    let communities = Arc::new(Communities::new(
        Arc::new(session::SessionCache::new(sessions.clone())),
        HubSettings {
            buffer: settings.stream_buffer,
            max_behind: settings.stream_max_behind,
            keepalive: settings.keepalive,
            viewer_ttl: settings.viewer_ttl,
        },
        shutdown.clone(),
    ));
    communities.start(deployment.clone());
    let app = Arc::new(App {
        protect: protect::Protect::new(&settings.public_url),
        guilds: guilds::Guilds::new(
            deployment.clone(),
            settings.guild_ids.clone(),
            settings.max_guilds,
        ),
        settings,
        discord,
        communities: communities.clone(),
        asking: members::Asking::default(),
        holders: members::StreamHolders::default(),
        upstream: freshness::Freshness::default(),
        sessions,
        categories: tokio::sync::OnceCell::new(),
    });
    sweeper::start(app.clone(), shutdown.clone());
    members::StreamHolders::start(app.clone(), shutdown.clone());
    app.upstream
        .start(deployment, communities, shutdown.clone());
    let router = router(app.clone());
    Ok(Replica { app, router })
}

/// The whole site.
pub fn router(app: AppState) -> Router {
    let [csp, nosniff, referrer, frames] = ops::security_headers();
    let sessions = SessionManagerLayer::new(app.sessions.clone())
        .with_name(session::SESSION_COOKIE)
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(app.secure_cookies())
        .with_expiry(session::session_expiry(app.settings.session_ttl));
    let site = Router::new()
        .route("/", get(pages::landing))
        .route("/g/{guild}", get(pages::community))
        .route("/g/{guild}/rooms", get(pages::rooms).post(rooms::create))
        .route("/g/{guild}/rooms/{channel_id}", get(pages::room))
        .route(
            "/g/{guild}/rooms/{channel_id}/close",
            get(rooms::confirm_close).post(rooms::close),
        )
        .route("/g/{guild}/rooms/{channel_id}/move", post(rooms::move_in))
        .route(
            "/g/{guild}/rooms/{channel_id}/invite",
            post(rooms::new_invite),
        )
        .route("/g/{guild}/add", get(adding::add))
        .route("/g/{guild}/setting-up", get(adding::setting_up))
        // Before communities: the only guild's, or the room's guild's.
        .route("/rooms", get(pages::old_rooms).post(pages::old_rooms))
        .route("/rooms/{*rest}", get(pages::old_room).post(pages::old_room))
        .route("/invite/{token}", get(invites::follow).post(invites::join))
        .route("/auth/login", get(login::login))
        .route("/auth/callback", get(login::callback))
        .route("/auth/added", get(adding::added))
        .route("/auth/logout", post(login::logout))
        // Inside the sessions, so a logged-in person's 404 keeps their header.
        .fallback(pages::not_found)
        // Forms here are a room name and a token; anything bigger is not ours.
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::from_fn(error::with_header))
        .layer(sessions)
        .layer(axum::middleware::from_fn_with_state(
            app.guilds.deployment().clone(),
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
    let streams = Router::new()
        .route("/api/stream", get(live::json::stream))
        .route("/api/stream/html", get(live::html::html_stream))
        .layer(axum::middleware::from_fn_with_state(
            app.guilds.deployment().clone(),
            error::shared_state_guard,
        ));
    // A request's span: tower-http's for pages and posts (to the end of the body); for a
    // stream, only until its answer starts, since tower-http's body would enter the span
    // at every write of every stream, a cost per delivery.
    let (site, streams) = if crate::telemetry::enabled() {
        (
            site.layer(ops::traces()),
            streams.layer(axum::middleware::from_fn(ops::stream_span)),
        )
    } else {
        (site, streams)
    };
    Router::new()
        .merge(site)
        .merge(streams)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
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
    replica: Replica,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Replica { app, router } = replica;
    let drain = app.settings.drain_timeout;
    let communities = app.communities.clone();
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        stopping.cancelled().await;
        communities.drain(drain).await;
    });
    let limits =
        conn::ConnLimits::for_descriptors(open_file_limit(), app.settings.stream_write_timeout);
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
    let deployment = crate::bus::redis::Redis::connect(
        &redis_url,
        &settings.key_prefix,
        // A replica never appends enough to trim; the gateway's setting governs the log.
        100_000,
        crate::bus::redis::REQUEST_TIMEOUT,
        settings.durability,
    )
    .await?;
    let pool =
        crate::bus::redis::session_pool(&redis_url, crate::bus::redis::REQUEST_TIMEOUT).await?;
    let store = session::Store::new(tower_sessions_redis_store::RedisStore::new(pool));
    let listener = TcpListener::bind(settings.bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.bind))?;
    let addr = listener.local_addr()?;
    if let Some(handle) = metrics {
        let at = crate::prometheus::serve(settings.metrics_bind, handle, shutdown.clone()).await?;
        println!("coven web metrics at http://{at}/metrics");
    }
    let replica = start(settings, Arc::new(deployment), store, &shutdown).await?;
    println!("coven web listening on http://{addr}/");
    serve(listener, replica, shutdown).await
}

/// Each stream is an open socket: raise the soft limit on open files to the hard one so
/// thousands of streams fit.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
