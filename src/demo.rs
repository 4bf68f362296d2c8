//! `coven demo` (also `coven` with no command): the whole product in one process for a
//! first look: the simulated Discord on its own port, the gateway, and the web app, on
//! the in-memory bus and sessions (or Redis when `REDIS_URL` is set), with simulated
//! players who join the rooms people create, leave, mute and turn cameras on.
//!
//! Owns wiring the real components together and the players. The players act only the
//! way a person in Discord would: through the simulator's control API (voice changes)
//! and the bot's REST API (the room role an invite would give them). Must not reach into
//! the gateway or the web app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;
use url::Url;

use crate::access::MemberRecord;
use crate::bus::{Backend, Deployment, Snapshot};
use crate::discord::DiscordSettings;
use crate::{config, gateway, sim, web};

/// Settings of `coven demo`: its flags, each also read from its environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address of the web app (the page to open)
    #[arg(long, env = "BIND", default_value = web::DEFAULT_BIND, value_parser = config::parse_bind)]
    pub bind: SocketAddr,
    /// Address of the simulated Discord (its login page, REST and Gateway)
    #[arg(long, env = "SIM_BIND", default_value = sim::defaults::BIND, value_parser = config::parse_bind)]
    pub sim_bind: SocketAddr,
    /// Use this Redis for events and sessions instead of memory
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = config::parse_redis_url)]
    pub redis_url: Option<SecretString>,
    /// No simulated players: only what you do happens
    #[arg(long)]
    pub quiet: bool,
    /// Average time between two moves of the simulated players (100ms–10m)
    #[arg(long, env = "DEMO_PLAYER_INTERVAL", hide = true, default_value = "1500ms", value_parser = config::parse_duration_in(Duration::from_millis(100), Duration::from_secs(600)))]
    pub player_interval: Duration,
}

/// Runs the demo until shutdown.
pub async fn command(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    web::raise_open_file_limit();
    let sim_settings = sim::Settings {
        bind: settings.sim_bind,
        ..sim::Settings::default()
    };
    let simulator = sim::Sim::start(sim_settings, shutdown.clone()).await?;
    let sim_url = simulator.url("").trim_end_matches('/').to_owned();
    let listener = TcpListener::bind(settings.bind).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e} (try --bind 127.0.0.1:0)",
            settings.bind
        )
    })?;
    let addr = listener.local_addr()?;
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };
    let public_url = format!("http://{host}");
    let s = &simulator.shared.settings;
    let guild_id = Id::new(s.guild_id);
    // The real components, pointed at the simulator; the bus is Redis when REDIS_URL is
    // set, else memory.
    let web_settings = web::Settings {
        redis_url: settings.redis_url.clone(),
        // Every community the simulated bot is in; Dice Tower is offered "Add Coven".
        guild_ids: Vec::new(),
        discord: DiscordSettings {
            bot_token: s.bot_token.clone(),
            client_id: Id::new(s.client_id),
            client_secret: s.client_secret.clone(),
            api_url: Url::parse(&simulator.url("/api"))?,
            oauth_url: simulator.shared.public_url.clone(),
            // "Open in Discord" opens the simulator's page of the channel: works offline.
            app_url: simulator.shared.public_url.clone(),
        },
        invite_secret: SecretString::from(format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        )),
        tuning: web::Tuning {
            bind: addr,
            public_url: Url::parse(&public_url)?,
            // One process on a laptop: Ctrl-C should not wait out a long drain.
            drain_timeout: Duration::from_secs(1),
            ..web::Tuning::default()
        },
    };
    let gateway_settings = gateway::Settings {
        redis_url: settings.redis_url.clone(),
        guild_ids: Vec::new(),
        bot_token: s.bot_token.clone(),
        tuning: gateway::Tuning {
            gateway_url: Url::parse(&simulator.shared.gateway_url())?,
            api_url: web_settings.discord.api_url.clone(),
            ..gateway::Tuning::default()
        },
    };
    let deployment: Arc<dyn Deployment> = match &settings.redis_url {
        Some(url) => Arc::new(
            crate::bus::redis::Redis::connect(
                url.expose_secret(),
                &web_settings.key_prefix,
                100_000,
                crate::bus::redis::COMMAND_TIMEOUT,
                crate::bus::redis::Durability::OFF,
            )
            .await?,
        ),
        None => Arc::new(crate::bus::memory::MemoryDeployment::new(100_000)),
    };
    let played = [guild_id, Id::new(crate::sim::defaults::NIGHT_OWLS_GUILD_ID)];
    let gateway_bus = deployment.clone();
    let gateway_stop = shutdown.clone();
    tokio::spawn(async move {
        match gateway::run::run(
            gateway_settings,
            gateway_bus,
            gateway::health::Health::default(),
            gateway_stop,
        )
        .await
        {
            Ok(outcome) => tracing::info!(?outcome, "gateway stopped"),
            Err(e) => tracing::error!(error = %e, "gateway failed"),
        }
    });
    // No metrics listener: a demo on a laptop has nobody scraping it.
    let sessions = match &settings.redis_url {
        Some(url) => web::session::Store::new(tower_sessions_redis_store::RedisStore::new(
            crate::bus::redis::session_pool(
                url.expose_secret(),
                crate::bus::redis::REQUEST_TIMEOUT,
            )
            .await?,
        )),
        None => web::session::Store::new(tower_sessions::MemoryStore::default()),
    };
    let replica = web::start(web_settings, deployment.clone(), sessions, &shutdown).await?;
    if !settings.quiet {
        for guild in played {
            tokio::spawn(players(
                sim_url.clone(),
                s.bot_token.expose_secret().to_owned(),
                guild.get(),
                deployment.guild(guild),
                settings.player_interval,
                shutdown.clone(),
            ));
        }
    }
    // Until the gateway has registered the communities and told who may see what, nobody
    // sees any room: the URL is printed once it has (milliseconds against the built-in
    // simulator).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut ready = deployment
            .entries(&played)
            .await
            .is_ok_and(|e| e.iter().all(Option::is_some));
        for guild in played {
            ready &= deployment
                .guild(guild)
                .snapshot()
                .await
                .is_ok_and(|s| s.access.guild.is_some());
        }
        if ready {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "the gateway has not described the communities yet; they appear once it has"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("Coven demo is running. Open {public_url}/");
    println!("  Log in with the simulated Discord: pick any player on its login page.");
    println!("  Two communities have Coven; log in as dusk to add it to the third (Dice Tower).");
    println!(
        "  Create a room: simulated players join it, mute, turn cameras on and leave.{}",
        if settings.quiet {
            " (--quiet: not now)"
        } else {
            ""
        }
    );
    println!("  Simulated Discord: {sim_url}/_sim/state");
    println!(
        "  Events and sessions: {}. Ctrl-C stops.",
        if settings.redis_url.is_some() {
            "Redis"
        } else {
            "in memory (set REDIS_URL to use Redis)"
        }
    );
    web::serve(listener, replica, shutdown).await
}

/// How the players reach the simulated Discord: its REST API as the bot, its control API
/// as the players' Discord clients.
struct SimClient {
    http: reqwest::Client,
    url: String,
    bot_token: String,
    guild: u64,
}

/// Simulated players: every so often one of them does something a person in Discord
/// does. Rooms made from the web fill up; players come and go.
async fn players(
    sim_url: String,
    bot_token: String,
    guild: u64,
    bus: Arc<dyn Backend>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let sim = SimClient {
        http: reqwest::Client::new(),
        url: sim_url,
        bot_token,
        guild,
    };
    let mut roster: Vec<u64> = Vec::new();
    loop {
        let jitter = rand::random_range(0.5..1.5);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval.mul_f64(jitter)) => {}
        }
        if roster.is_empty() {
            roster = match seeded_members(&sim.http, &sim.url).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "players: cannot read the simulated guild");
                    continue;
                }
            };
        }
        let Ok(snapshot) = bus.snapshot().await else {
            continue;
        };
        // People who logged in through the web (the demo's humans) have a member record;
        // players never log in.
        let mut humans = Vec::new();
        for user in &roster {
            if let Ok(Some(m)) = bus.member(Id::new(*user)).await {
                humans.push(m);
            }
        }
        if let Err(e) = step(&sim, &snapshot, &roster, &humans).await {
            tracing::debug!(error = %e, "players: a move did not work");
        }
    }
}

async fn seeded_members(http: &reqwest::Client, sim_url: &str) -> anyhow::Result<Vec<u64>> {
    let state: serde_json::Value = http
        .get(format!("{sim_url}/_sim/state"))
        .send()
        .await?
        .json()
        .await?;
    let bots: Vec<&str> = state["users"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["bot"] == true)
        .filter_map(|u| u["id"].as_str())
        .collect();
    Ok(state["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["user_id"].as_str())
        .filter(|id| !bots.contains(id))
        .filter_map(|id| id.parse().ok())
        .collect())
}

/// One move: someone free joins a room that has space, or someone in a room changes
/// their mute/camera/stream, wanders to another room, or leaves. Players leave at least
/// one seat free in every room (so the friend the README tells you to invite gets in),
/// keep a seat for each person the room belongs to (its creator and whoever followed its
/// invite: logged-in people holding its role) who is not in it yet, and never touch the
/// humans: people who logged in, created a room or look at one.
async fn step(
    sim: &SimClient,
    snapshot: &Snapshot,
    roster: &[u64],
    logged_in: &[MemberRecord],
) -> anyhow::Result<()> {
    // Rooms made from the web (they have a role); their creators and whoever is looking
    // at a page are the humans, whom the players leave alone.
    let rooms: Vec<_> = snapshot
        .rooms
        .iter()
        .filter(|(_, r)| r.role_id.is_some())
        .collect();
    if rooms.is_empty() {
        return Ok(());
    }
    let humans: Vec<u64> = rooms
        .iter()
        .flat_map(|(_, r)| {
            r.creator_id
                .map(|c| c.get())
                .into_iter()
                .chain(r.viewers.iter().map(|v| v.id.get()))
        })
        .chain(logged_in.iter().map(|m| m.user_id.get()))
        .collect();
    let free: Vec<u64> = roster
        .iter()
        .copied()
        .filter(|u| !humans.contains(u) && !snapshot.voice.contains_key(&Id::new(*u)))
        .collect();
    let seated: Vec<(u64, &crate::bus::VoiceRecord)> = snapshot
        .voice
        .iter()
        .filter(|(u, v)| {
            !humans.contains(&u.get()) && rooms.iter().any(|(id, _)| **id == v.channel_id)
        })
        .map(|(u, v)| (u.get(), v))
        .collect();
    let (room_id, room) = rooms[rand::random_range(0..rooms.len())];
    let present = snapshot.members(*room_id).count();
    // Seats kept for the room's own people who are not in it yet, plus one for whoever
    // comes next: a player joins only if that many stay free after them.
    let expected = logged_in
        .iter()
        .filter(|m| {
            room.creator_id == Some(m.user_id) || room.role_id.is_some_and(|r| m.roles.contains(&r))
        })
        .filter(|m| snapshot.voice.get(&m.user_id).map(|v| v.channel_id) != Some(*room_id))
        .count();
    let leave_free = 1 + expected;
    let has_space =
        room.user_limit == 0 || present + 1 + leave_free <= usize::from(room.user_limit);
    let roll: f64 = rand::random();
    if has_space && !free.is_empty() && (seated.is_empty() || roll < 0.4) {
        let user = free[rand::random_range(0..free.len())];
        enter(sim, user, room_id.get(), room.role_id, leave_free).await?;
    } else if let Some((user, v)) =
        (!seated.is_empty()).then(|| seated[rand::random_range(0..seated.len())])
    {
        if roll > 0.9 {
            voice(sim, user, None, serde_json::json!({})).await?;
        } else if roll > 0.8 && has_space && *room_id != v.channel_id {
            // Wander to another room.
            enter(sim, user, room_id.get(), room.role_id, leave_free).await?;
        } else {
            // The sim takes the whole set of flags: change one, keep the others.
            let mut f = v.flags;
            match rand::random_range(0..3) {
                0 => f.self_mute = !f.self_mute,
                1 => f.self_video = !f.self_video,
                _ => f.self_stream = !f.self_stream,
            }
            let flags = serde_json::json!({
                "self_mute": f.self_mute,
                "self_deaf": f.self_deaf,
                "self_video": f.self_video,
                "self_stream": f.self_stream,
            });
            voice(sim, user, Some(v.channel_id.get()), flags).await?;
        }
    }
    Ok(())
}

/// A player gets a room's role, as following its invite would, and joins its voice.
async fn enter(
    sim: &SimClient,
    user: u64,
    room: u64,
    role: Option<Id<twilight_model::id::marker::RoleMarker>>,
    leave_free: usize,
) -> anyhow::Result<()> {
    if let Some(role) = role {
        sim.http
            .put(format!(
                "{}/api/v10/guilds/{}/members/{user}/roles/{role}",
                sim.url, sim.guild
            ))
            .header("authorization", format!("Bot {}", sim.bot_token))
            .send()
            .await?
            .error_for_status()?;
    }
    // The sim checks the free seat in one step with the join: a person arriving at the
    // same moment keeps their seat (a refused join is just a move not made).
    voice(
        sim,
        user,
        Some(room),
        serde_json::json!({ "leave_free": leave_free }),
    )
    .await
}

async fn voice(
    sim: &SimClient,
    user: u64,
    channel: Option<u64>,
    flags: serde_json::Value,
) -> anyhow::Result<()> {
    let mut body = serde_json::json!({
        "user_id": user.to_string(),
        "channel_id": channel.map(|c| c.to_string()),
    });
    if let (Some(b), Some(f)) = (body.as_object_mut(), flags.as_object()) {
        b.extend(f.clone());
    }
    sim.http
        .post(format!("{}/_sim/voice", sim.url))
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}
