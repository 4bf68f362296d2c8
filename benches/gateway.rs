//! Gateway benchmark: how long a Discord change takes to become an appended (and
//! published) event, and how many changes per second the path sustains.
//!
//! Runs the real components in one process: a private `redis-server` on a free port, the
//! simulator, and the gateway's run loop over the Redis bus. A change is made in the
//! simulator's guild (which dispatches it at once); the clock stops when the event comes
//! back on the bus's live subscription, so each figure covers dispatch → twilight →
//! derive → append script → Pub/Sub → relay.
//!
//! `cargo bench --bench gateway` (`-- --changes N` to change the sample size).

// A benchmark that cannot set itself up has nothing to measure: it may stop there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coven::bus::Bus;
use coven::bus::redis::RedisBus;
use coven::event::EventData;
use coven::gateway::health::Health;
use coven::sim::world::VoiceFlags;
use coven::sim::{Settings as SimSettings, Sim};
use tokio_util::sync::CancellationToken;
use twilight_model::id::Id;

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> anyhow::Result<(Redis, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((Redis(child), port))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let changes: usize = std::env::args()
        .skip_while(|a| a != "--changes")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let (_redis, port) = start_redis()?;
    let shutdown = CancellationToken::new();
    let sim = Sim::start(SimSettings::default(), shutdown.clone()).await?;
    let guild = Id::new(sim.shared.settings.guild_id);
    let url = format!("redis://127.0.0.1:{port}");
    let redis = coven::bus::redis::Redis::connect(
        &url,
        "bench",
        1_000_000,
        coven::bus::redis::COMMAND_TIMEOUT,
        coven::bus::redis::Durability::OFF,
    )
    .await?;
    let observer = RedisBus::connect(&url, "bench", guild, 1_000_000).await?;
    let settings = coven::gateway::Settings {
        redis_url: Some(secrecy::SecretString::from(url.clone())),
        guild_ids: vec![guild],
        bot_token: sim.shared.settings.bot_token.clone(),
        tuning: coven::gateway::Tuning {
            gateway_url: url::Url::parse(&sim.shared.gateway_url())?,
            api_url: url::Url::parse(&sim.url("/api"))?,
            key_prefix: "bench".into(),
            event_log_max_len: 1_000_000,
            queue_size: 100_000,
            ..coven::gateway::Tuning::default()
        },
    };
    let backend: Arc<dyn coven::bus::Deployment> = Arc::new(redis);
    let health = Health::default();
    tokio::spawn(coven::gateway::run::run(
        settings,
        backend,
        health.clone(),
        shutdown.clone(),
    ));
    let connected = Instant::now() + Duration::from_secs(15);
    while health.report().1["state"] != "CONNECTED" {
        anyhow::ensure!(Instant::now() < connected, "the gateway did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (lobby, ash) = {
        let state = sim.shared.lock();
        let ash = state
            .world
            .users
            .values()
            .find(|u| u.username == "ash")
            .map(|u| u.id);
        (
            state.world.lobby_id,
            ash.ok_or_else(|| anyhow::anyhow!("no seeded user ash"))?,
        )
    };
    let change = |mute: bool| {
        let mut state = sim.shared.lock();
        let flags = VoiceFlags {
            self_mute: mute,
            ..VoiceFlags::default()
        };
        match state.world.user_voice(ash, Some(lobby), flags) {
            Ok(events) => state.emit(&events),
            Err(e) => panic!("the simulator refused a change: {e:?}"),
        }
    };
    let mut live = observer.subscribe().await.unwrap();
    let mut next_voice = async || loop {
        match live.recv().await {
            Ok(e)
                if matches!(
                    e.data,
                    EventData::VoiceJoined { .. } | EventData::VoiceUpdated { .. }
                ) =>
            {
                return e;
            }
            Ok(_) => {}
            Err(e) => panic!("observer: {e}"),
        }
    };

    // Each change flips ash's mute, so every one is a real change that Discord dispatches.
    let mut muted = false;
    change(muted);
    next_voice().await;
    // Latency: one change at a time.
    let mut samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let started = Instant::now();
        muted = !muted;
        change(muted);
        if tokio::time::timeout(Duration::from_secs(10), next_voice())
            .await
            .is_err()
        {
            anyhow::bail!("change {i} was not seen within 10 s");
        }
        samples.push(started.elapsed());
    }
    samples.sort();

    // Throughput: every change at once, until the last one is appended and seen.
    let started = Instant::now();
    for _ in 0..changes {
        muted = !muted;
        change(muted);
    }
    for i in 0..changes {
        if tokio::time::timeout(Duration::from_secs(10), next_voice())
            .await
            .is_err()
        {
            anyhow::bail!("burst change {i} was not seen within 10 s");
        }
    }
    let burst = started.elapsed();

    println!(
        "gateway benchmark: {changes} voice changes, sim + gateway + observer in one process, redis-server local"
    );
    println!(
        "  change -> appended and seen   p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    println!(
        "  sustained appends             {:.0} events/s ({changes} changes in {:.2} s)",
        changes as f64 / burst.as_secs_f64(),
        burst.as_secs_f64()
    );
    println!(
        "  machine: {} cores (shared; quote ratios, not absolutes)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    shutdown.cancel();
    Ok(())
}
