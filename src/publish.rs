//! `coven publish`: appends events through the same atomic path the gateway uses, so an
//! operator can check a deployment end to end and benchmarks can drive the real path.
//! Owns only its command line; storage is the bus's.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use secrecy::{ExposeSecret, SecretString};
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use crate::bus::{Bus, BusError, Request};
use crate::config::{self, Problem};
use crate::event::EventData;

/// Settings of `coven publish`: its flags, some also read from the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Redis holding the event log
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = config::parse_redis_url)]
    pub redis_url: SecretString,
    /// The guild whose log to append to
    #[arg(long = "discord-guild-id", env = "DISCORD_GUILD_ID", value_parser = config::parse_guild_id)]
    pub guild_id: Id<GuildMarker>,
    /// Prefix of every Redis key
    #[arg(long = "coven-key-prefix", env = "COVEN_KEY_PREFIX", default_value = config::KEY_PREFIX, value_parser = config::parse_key_prefix)]
    pub key_prefix: String,
    /// How long a Redis command waits for Redis to come back (a restart, a Sentinel
    /// failover) before it fails (1s–1h)
    // Sentinel's default down-after-milliseconds is 30 s, so a failover takes longer than
    // that: a minute rides one out.
    #[arg(long, env = "REDIS_RETRY_FOR", default_value = "60s", value_parser = config::parse_duration_in(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600)))]
    pub redis_retry_for: std::time::Duration,
    /// `REDIS_MIN_REPLICAS` and `REDIS_REPLICA_TIMEOUT`: what appends ask of replicas.
    #[command(flatten)]
    pub durability: crate::bus::redis::Durability,
    /// Event type, e.g. room.closing (with --data)
    #[arg(long = "type", value_name = "TYPE", conflicts_with = "ping")]
    pub kind: Option<String>,
    /// Event data as JSON (with --type)
    #[arg(long, value_name = "JSON", requires = "kind")]
    pub data: Option<String>,
    /// Publish a series of `ping` events instead
    #[arg(long)]
    pub ping: bool,
    /// How many pings (1–10,000,000)
    #[arg(long, requires = "ping", default_value = "1", value_parser = config::parse_number_in::<u64>(1, 10_000_000))]
    pub count: u64,
    /// Pings per second (0.01–100,000)
    // The pause between pings is 1/rate: a rate near zero would overflow it, and past
    // 100,000 a second the pause is below what a timer keeps.
    #[arg(long, requires = "ping", default_value = "10", value_parser = config::parse_number_in::<f64>(0.01, 100_000.0))]
    pub rate: f64,
}

pub enum What {
    One(EventData),
    Pings { count: u64, rate: f64 },
}

impl Settings {
    /// What to publish: the event `--type` and `--data` describe, or the pings.
    pub fn what(&self) -> Result<What, Problem> {
        if self.ping {
            return Ok(What::Pings {
                count: self.count,
                rate: self.rate,
            });
        }
        match (&self.kind, &self.data) {
            (Some(kind), Some(data)) => EventData::from_parts(kind, data)
                .map(What::One)
                .map_err(|e| Problem::new("--data", e)),
            _ => Err(Problem::new("--type", "give --type and --data, or --ping")),
        }
    }
}

pub async fn command(settings: Settings, what: What) -> anyhow::Result<()> {
    let bus: Arc<dyn Bus> = Arc::new(
        crate::bus::redis::RedisBus::connect_durable(
            settings.redis_url.expose_secret(),
            &settings.key_prefix,
            settings.guild_id,
            100_000,
            settings.redis_retry_for,
            settings.durability,
        )
        .await?,
    );
    // Unique to this run: its appends are retried under the same names, so each reaches
    // the log once.
    let writer = format!(
        "publish:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let append = |data: EventData, seq: u64| {
        let request = Request {
            writer: writer.clone(),
            seq,
            part: 0,
        };
        let bus = bus.clone();
        // Each event appended is the root of its own trace, as a Discord dispatch is.
        let span = if crate::telemetry::enabled() {
            let span = tracing::info_span!(
                "publish",
                kind = %data.kind(),
                seq,
                trace_id = tracing::field::Empty,
            );
            crate::telemetry::record_trace_id(&span);
            span
        } else {
            tracing::Span::none()
        };
        async move { append_durably(&*bus, data, &request, settings.redis_retry_for).await }
            .instrument(span)
    };
    match what {
        What::One(data) => {
            let event = append(data, 0).await?;
            println!("{}", event.id);
        }
        What::Pings { count, rate } => {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for seq in 1..=count {
                tick.tick().await;
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                let event = append(EventData::Ping { seq, ts }, seq).await?;
                // One line per event appended (durably, when asked): what an operator
                // (or a test) can hold the log and the streams to.
                tracing::debug!(id = %event.id, seq, "appended");
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "published {count} pings in {secs:.2} s ({:.0}/s)",
                count as f64 / secs.max(1e-9)
            );
        }
    }
    Ok(())
}

/// Appends `data` as `request`, retrying for up to `retry_for` while the write is not
/// yet on enough replicas or Redis is failing over: the same request never appends
/// twice.
async fn append_durably(
    bus: &dyn Bus,
    data: EventData,
    request: &Request,
    retry_for: Duration,
) -> Result<Arc<crate::event::Event>, BusError> {
    let deadline = Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(50);
    loop {
        match bus.append_once(data.clone(), None, request).await {
            Ok(event) => return Ok(event),
            Err(e @ (BusError::NotDurable { .. } | BusError::Unproven | BusError::Redis(_)))
                if Instant::now() < deadline =>
            {
                tracing::warn!(error = %e, "append not done; retrying");
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}
