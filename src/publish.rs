//! `coven publish`: appends events through the same atomic path the gateway uses, so an
//! operator can check a deployment end to end and benchmarks can drive the real path.
//! Owns only its command line; storage is the bus's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use twilight_model::id::Id;
use twilight_model::id::marker::GuildMarker;

use crate::bus::Bus;
use crate::config::{self, Reader};
use crate::event::EventData;

/// Flags of `coven publish`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Redis holding the event log
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The guild whose log to append to
    #[arg(long, env = "DISCORD_GUILD_ID")]
    pub discord_guild_id: Option<String>,
    #[arg(long, env = "PRIMARY_GUILD_ID", hide = true)]
    pub primary_guild_id: Option<String>,
    /// Prefix of every Redis key
    #[arg(long, env = "COVEN_KEY_PREFIX")]
    pub coven_key_prefix: Option<String>,
    /// Event type, e.g. room.closing (with --data)
    #[arg(long = "type", value_name = "TYPE", conflicts_with = "ping")]
    pub kind: Option<String>,
    /// Event data as JSON (with --type)
    #[arg(long, value_name = "JSON", requires = "kind")]
    pub data: Option<String>,
    /// Publish a series of `ping` events instead
    #[arg(long)]
    pub ping: bool,
    /// How many pings (1–10,000,000; default 1)
    #[arg(long, requires = "ping")]
    pub count: Option<String>,
    /// Pings per second (0.01–100,000; default 10)
    #[arg(long, requires = "ping")]
    pub rate: Option<String>,
}

pub enum What {
    One(EventData),
    Pings { count: u64, rate: f64 },
}

pub struct Settings {
    pub redis_url: SecretString,
    pub guild_id: Id<GuildMarker>,
    pub key_prefix: String,
    pub what: What,
}

impl Args {
    pub fn settings(&self, r: &mut Reader) -> Option<Settings> {
        let redis_url = r.required(
            "REDIS_URL",
            self.redis_url.as_deref(),
            config::parse_redis_url,
        );
        let guild = self
            .discord_guild_id
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .or(self.primary_guild_id.as_deref());
        let guild_id = r.required("DISCORD_GUILD_ID", guild, config::parse_guild_id);
        let key_prefix = r.or_default(
            "COVEN_KEY_PREFIX",
            self.coven_key_prefix.as_deref(),
            "coven".to_owned(),
            config::parse_key_prefix,
        );
        let what = if self.ping {
            let count = r.or_default(
                "--count",
                self.count.as_deref(),
                1,
                config::parse_number_in::<u64>(1, 10_000_000),
            );
            // The pause between pings is 1/rate: a rate near zero would overflow it, and
            // past 100,000 a second the pause is below what a timer keeps.
            let rate = r.or_default(
                "--rate",
                self.rate.as_deref(),
                10.0,
                config::parse_number_in::<f64>(0.01, 100_000.0),
            );
            Some(What::Pings {
                count: count?,
                rate: rate?,
            })
        } else {
            match (&self.kind, &self.data) {
                (Some(kind), Some(data)) => match EventData::from_parts(kind, data) {
                    Ok(event) => Some(What::One(event)),
                    Err(e) => {
                        r.problem("--data", e);
                        None
                    }
                },
                _ => {
                    r.problem("--type", "give --type and --data, or --ping");
                    None
                }
            }
        };
        Some(Settings {
            redis_url: redis_url?,
            guild_id: guild_id?,
            key_prefix: key_prefix?,
            what: what?,
        })
    }
}

pub async fn command(settings: Settings) -> anyhow::Result<()> {
    let bus: Arc<dyn Bus> = Arc::new(
        crate::bus::redis::RedisBus::connect(
            settings.redis_url.expose_secret(),
            &settings.key_prefix,
            settings.guild_id,
            100_000,
        )
        .await?,
    );
    match settings.what {
        What::One(data) => {
            let event = bus.append(data, None).await?;
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
                bus.append(EventData::Ping { seq, ts }, None).await?;
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
