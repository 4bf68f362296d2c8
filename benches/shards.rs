//! Shards benchmark: the figures of issue 22 ("[3/6] Shards across gateway processes"),
//! each measured on real processes over real sockets.
//!
//! Every figure starts its own deployment: a private `redis-server` on a free port, the
//! simulator (`coven sim`, with `SIM_GUILDS` generated guilds and Discord's defaults: max
//! concurrency 1, a 41.25 s heartbeat) and `coven gateway` processes sharing the shards,
//! all this build's release-built binary. This process watches them: each gateway's
//! `/healthz` (the shards it holds and their states), its Prometheus metrics, the
//! simulator's `/_sim/state` (per-shard `identifies`, `resumes`, `identified_at_ms`;
//! `identify_rejected`, the op 9s) and the guilds' logs in Redis.
//!
//! `cargo bench --bench shards` runs the three figures; `-- takeover`, `-- coldstart` or
//! `-- throughput` runs one.
//!   takeover    3 processes, 16 shards over 1,000 guilds, `GATEWAY_LEASE_TTL` 10 s: once
//!               all 16 are CONNECTED, the process holding the most is killed (-9); the
//!               time from the kill until every one of its shards is CONNECTED on the
//!               survivors (their `/healthz` polled every 50 ms) is within the TTL + 2 s,
//!               each RESUMEd (its `resumes` grew) and no shard identified again.
//!               `--ttl S` (default 10).
//!   coldstart   16 shards, max concurrency 1, 3 processes started at once: all 16
//!               CONNECTED within ceil(16 / 1) × 5 s + 10 s = 90 s, no op 9; prints the
//!               spacing of the IDENTIFYs and each process's `/healthz`.
//!   throughput  1,000 guilds (998 generated + 2 seeded) over 16 shards and 3 processes,
//!               then over one process with one shard (the single-process figure): a
//!               driver makes voice changes round-robin across the guilds through the
//!               simulator's control API, `--concurrency N` (default 32) at once, at
//!               `--rate N` changes a second in all (default 500; 0: as fast as the
//!               simulator takes them), for `--seconds N` (default 30); events appended per
//!               second per process (`coven_gateway_events_total`), and the Discord-to-log
//!               latency of
//!               one watched guild (changes made to it 10 a second, by itself, each timed
//!               from the control API call returning to the event read by a separate
//!               `XREAD BLOCK` on its `coven:{G}:events`).

// A benchmark that cannot set itself up has nothing to measure: it may stop there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::streams::XReadResponse;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_coven");
const PREFIX: &str = "coven";
const BOT_TOKEN: &str = "sim-bot-token";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} did not open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_level() -> String {
    std::env::var("SHARDS_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// A `coven gateway` process: its health URL (read from its stdout) and metrics URL.
struct Gateway {
    proc: Proc,
    health: Arc<std::sync::Mutex<Option<String>>>,
    metrics: String,
    name: String,
}

impl Gateway {
    /// Waits for the health URL the process prints at start.
    fn health_url(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(url) = self.health.lock().unwrap().clone() {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no health URL",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One shard as a process's `/healthz` shows it.
#[derive(Debug, Clone)]
struct Held {
    shard: u64,
    state: String,
}

/// One shard's sessions as the simulator counts them.
#[derive(Debug, Clone, Default)]
struct Sessions {
    identifies: u64,
    resumes: u64,
    identified_at_ms: Vec<u64>,
}

/// Redis and the simulator; gateways are started on them.
// Fields drop in order: the simulator and Redis last (gateways are owned by callers and
// dropped before).
struct Stack {
    _sim: Proc,
    _redis: Proc,
    redis_port: u16,
    sim_url: String,
    http: reqwest::Client,
}

impl Stack {
    async fn start(guilds: u32) -> Self {
        let redis_port = free_port();
        let redis = Proc(
            Command::new("redis-server")
                .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_port(redis_port);
        let sim_port = free_port();
        let sim = Proc(
            Command::new(BIN)
                .arg("sim")
                .env("BIND", format!("127.0.0.1:{sim_port}"))
                .env("SIM_GUILDS", guilds.to_string())
                .env("RUST_LOG", log_level())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        wait_port(sim_port);
        Self {
            _sim: sim,
            _redis: redis,
            redis_port,
            sim_url: format!("http://127.0.0.1:{sim_port}"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn redis(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a gateway process (returns at once; its health URL comes later).
    fn gateway(&self, name: &str, shards: u32, ttl: &str) -> Gateway {
        let metrics_port = free_port();
        let mut child = Command::new(BIN)
            .arg("gateway")
            .env("BIND", "127.0.0.1:0")
            .env("METRICS_BIND", format!("127.0.0.1:{metrics_port}"))
            .env("REDIS_URL", self.redis_url())
            .env("DISCORD_BOT_TOKEN", BOT_TOKEN)
            .env(
                "DISCORD_GATEWAY_URL",
                self.sim_url.replace("http://", "ws://"),
            )
            .env("DISCORD_API_URL", format!("{}/api", self.sim_url))
            .env("SHARD_COUNT", shards.to_string())
            .env("GATEWAY_LEASE_TTL", ttl)
            .env("RUST_LOG", log_level())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let health = Arc::new(std::sync::Mutex::new(None));
        let found = health.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(url) = line.strip_prefix("coven gateway health listening on ") {
                    *found.lock().unwrap() = Some(url.trim().trim_end_matches('/').to_owned());
                }
            }
        });
        Gateway {
            proc: Proc(child),
            health,
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            name: name.to_owned(),
        }
    }

    async fn healthz(&self, gw: &Gateway) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/healthz", gw.health_url()))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The shards a process holds; none if it does not answer.
    async fn held(&self, gw: &Gateway) -> Vec<Held> {
        let Some(body) = self.healthz(gw).await else {
            return Vec::new();
        };
        body["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                Some(Held {
                    shard: s["shard"][0].as_u64()?,
                    state: s["state"].as_str()?.to_owned(),
                })
            })
            .collect()
    }

    /// Polls every 50 ms until the processes hold all `count` shards between them, each
    /// CONNECTED; answers the time waited and the shards of each.
    async fn all_connected(
        &self,
        gateways: &[&Gateway],
        count: u64,
        limit: Duration,
    ) -> (Duration, Vec<Vec<u64>>) {
        let started = Instant::now();
        loop {
            let mut shares = Vec::new();
            let mut connected = BTreeSet::new();
            let mut total = 0;
            for gw in gateways {
                let held = self.held(gw).await;
                total += held.len();
                connected.extend(
                    held.iter()
                        .filter(|h| h.state == "CONNECTED")
                        .map(|h| h.shard),
                );
                shares.push(held.iter().map(|h| h.shard).collect::<Vec<_>>());
            }
            if connected.len() as u64 == count && total as u64 == count {
                return (started.elapsed(), shares);
            }
            assert!(
                started.elapsed() < limit,
                "after {limit:?}: {} of {count} shards connected; held {shares:?}",
                connected.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn sim_state(&self, guild: Option<&str>) -> Value {
        let mut url = format!("{}/_sim/state", self.sim_url);
        if let Some(g) = guild {
            url.push_str(&format!("?guild={g}"));
        }
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The sessions of each shard of `count`, and the op 9s so far.
    async fn sessions(&self, count: u64) -> (BTreeMap<u64, Sessions>, u64) {
        let state = self.sim_state(None).await;
        let g = &state["gateway"];
        let mut out = BTreeMap::new();
        for s in g["sessions"].as_array().into_iter().flatten() {
            if s["shard"][1].as_u64() != Some(count) {
                continue;
            }
            let Some(shard) = s["shard"][0].as_u64() else {
                continue;
            };
            out.insert(
                shard,
                Sessions {
                    identifies: s["identifies"].as_u64().unwrap_or(0),
                    resumes: s["resumes"].as_u64().unwrap_or(0),
                    identified_at_ms: s["identified_at_ms"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_u64)
                        .collect(),
                },
            );
        }
        (out, g["identify_rejected"].as_u64().unwrap_or(0))
    }

    /// Waits until the registry holds `want` guilds.
    async fn registered(&self, want: u64) -> Duration {
        let started = Instant::now();
        loop {
            let have: u64 = self
                .redis(&["HLEN", &format!("{PREFIX}:guilds")])
                .trim()
                .parse()
                .unwrap_or(0);
            if have >= want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "the gateways registered {have} of {want} guilds"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `coven_gateway_events_total` of a process, over every type.
    async fn events_total(&self, metrics: &str) -> u64 {
        let Ok(r) = self.http.get(metrics).send().await else {
            return 0;
        };
        let body = r.text().await.unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with("coven_gateway_events_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    async fn voice(&self, guild: &str, user: &str, channel: Option<&str>) -> bool {
        self.http
            .post(format!("{}/_sim/voice", self.sim_url))
            .json(&json!({"guild_id": guild, "user_id": user, "channel_id": channel}))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }
}

/// The three processes of a 16-shard figure, started at once.
fn three(stack: &Stack, shards: u32, ttl: &str) -> Vec<Gateway> {
    ["a", "b", "c"]
        .iter()
        .map(|n| stack.gateway(n, shards, ttl))
        .collect()
}

async fn takeover(ttl_secs: u64) {
    const SHARDS: u64 = 16;
    let ttl = format!("{ttl_secs}s");
    println!(
        "takeover: 3 processes, {SHARDS} shards over 1,000 guilds, GATEWAY_LEASE_TTL {ttl}; kill -9 of the one holding the most"
    );
    let stack = Stack::start(998).await;
    let mut gateways = three(&stack, SHARDS as u32, &ttl);
    let refs: Vec<&Gateway> = gateways.iter().collect();
    let (up, shares) = stack
        .all_connected(&refs, SHARDS, Duration::from_secs(300))
        .await;
    println!(
        "    all {SHARDS} shards CONNECTED after {:.1} s; shares {:?}",
        up.as_secs_f64(),
        shares.iter().map(Vec::len).collect::<Vec<_>>()
    );
    stack.registered(1_000).await;
    // Let every shard's session settle (its first heartbeat, its guilds stored).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let victim_at = (0..shares.len()).max_by_key(|i| shares[*i].len()).unwrap();
    let victim_shards: BTreeSet<u64> = shares[victim_at].iter().copied().collect();
    let (before, rejected_before) = stack.sessions(SHARDS).await;
    let mut victim = gateways.remove(victim_at);
    victim.proc.0.kill().unwrap();
    let killed = Instant::now();
    let _ = victim.proc.0.wait();
    println!(
        "    killed (-9) process {} holding {} shards {:?}",
        victim.name,
        victim_shards.len(),
        victim_shards
    );
    // Until every one of its shards is CONNECTED on a survivor.
    let mut first_seen: BTreeMap<u64, Duration> = BTreeMap::new();
    let took = loop {
        let mut connected = BTreeSet::new();
        for gw in &gateways {
            for h in stack.held(gw).await {
                if victim_shards.contains(&h.shard) {
                    first_seen
                        .entry(h.shard)
                        .or_insert_with(|| killed.elapsed());
                    if h.state == "CONNECTED" {
                        connected.insert(h.shard);
                    }
                }
            }
        }
        if connected == victim_shards {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "after 120 s only {connected:?} of {victim_shards:?} were connected again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (after, rejected_after) = stack.sessions(SHARDS).await;
    let resumed: Vec<u64> = victim_shards
        .iter()
        .copied()
        .filter(|s| after.get(s).map_or(0, |x| x.resumes) > before.get(s).map_or(0, |x| x.resumes))
        .collect();
    let identified_again: Vec<u64> = (0..SHARDS)
        .filter(|s| {
            after.get(s).map_or(0, |x| x.identifies) != before.get(s).map_or(0, |x| x.identifies)
        })
        .collect();
    let survivors: Vec<&Gateway> = gateways.iter().collect();
    let (_, shares_after) = stack
        .all_connected(&survivors, SHARDS, Duration::from_secs(30))
        .await;
    let first = first_seen.values().min().copied().unwrap_or_default();
    println!(
        "    its shards taken by the survivors from {:.2} s (first lease taken) to {:.2} s (last CONNECTED); survivors' shares now {:?}",
        first.as_secs_f64(),
        took.as_secs_f64(),
        shares_after.iter().map(Vec::len).collect::<Vec<_>>()
    );
    println!(
        "    RESUMEd: {} of {} ({:?}); shards identified again: {:?}; op 9 during the takeover: {}",
        resumed.len(),
        victim_shards.len(),
        resumed,
        identified_again,
        rejected_after - rejected_before
    );
    let limit = Duration::from_secs(ttl_secs + 2);
    let ok = took <= limit && resumed.len() == victim_shards.len() && identified_again.is_empty();
    println!(
        "  takeover after kill -9 within TTL + 2 s ({:.0} s), every shard RESUMEd, identifies unchanged: {:.2} s: {}",
        limit.as_secs_f64(),
        took.as_secs_f64(),
        met(ok)
    );
}

async fn coldstart() {
    const SHARDS: u64 = 16;
    let limit = Duration::from_secs(SHARDS * 5 + 10);
    println!(
        "coldstart: 3 processes started at once, {SHARDS} shards, max concurrency 1, 1,000 guilds"
    );
    let stack = Stack::start(998).await;
    let started = Instant::now();
    let gateways = three(&stack, SHARDS as u32, "10s");
    let refs: Vec<&Gateway> = gateways.iter().collect();
    let (_, shares) = stack
        .all_connected(&refs, SHARDS, Duration::from_secs(300))
        .await;
    let took = started.elapsed();
    let (sessions, rejected) = stack.sessions(SHARDS).await;
    let mut at: Vec<u64> = sessions
        .values()
        .flat_map(|s| s.identified_at_ms.iter().copied())
        .collect();
    at.sort_unstable();
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    let identifies: u64 = sessions.values().map(|s| s.identifies).sum();
    println!(
        "    all {SHARDS} CONNECTED after {:.1} s; shares {:?}; {identifies} IDENTIFYs accepted, {rejected} rejected (op 9)",
        took.as_secs_f64(),
        shares
    );
    println!(
        "    IDENTIFY spacing: min {} ms, max {} ms, mean {:.0} ms (Discord's: 5,000 ms per bucket); first to last {:.1} s",
        gaps.iter().min().unwrap_or(&0),
        gaps.iter().max().unwrap_or(&0),
        gaps.iter().sum::<u64>() as f64 / gaps.len().max(1) as f64,
        (at.last().unwrap_or(&0) - at.first().unwrap_or(&0)) as f64 / 1e3,
    );
    for gw in &gateways {
        let mut h = stack.healthz(gw).await.unwrap_or(Value::Null);
        h.as_object_mut().map(|o| o.remove("timestamp"));
        println!("    /healthz of {}: {h}", gw.name);
    }
    let min_gap = gaps.iter().min().copied().unwrap_or(u64::MAX);
    println!(
        "  cold start of {SHARDS} shards within {:.0} s, zero op 9: {:.1} s, {rejected} op 9, min spacing {min_gap} ms: {}",
        limit.as_secs_f64(),
        took.as_secs_f64(),
        met(took <= limit && rejected == 0)
    );
}

/// A guild the driver changes: a member toggled in and out of its lobby.
#[derive(Clone)]
struct Target {
    guild: String,
    lobby: String,
    user: String,
}

/// Every guild the bot is in, each with its lobby and up to two of its members.
async fn targets(stack: &Stack) -> Vec<(Target, Option<String>)> {
    let state = stack.sim_state(None).await;
    let mut out = Vec::new();
    for g in state["guilds"].as_array().unwrap() {
        if g["bot"] != true {
            continue;
        }
        let guild = g["id"].as_str().unwrap().to_owned();
        let gs = stack.sim_state(Some(&guild)).await;
        let bot = gs["bot_id"].as_str().unwrap_or_default().to_owned();
        let people: Vec<String> = gs["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["user_id"].as_str().map(str::to_owned))
            .filter(|u| *u != bot)
            .take(2)
            .collect();
        let Some(user) = people.first().cloned() else {
            continue;
        };
        out.push((
            Target {
                guild,
                lobby: gs["lobby_id"].as_str().unwrap().to_owned(),
                user,
            },
            people.get(1).cloned(),
        ));
    }
    out
}

/// What one setup of the throughput figure measured.
struct Throughput {
    setup: String,
    changes: u64,
    failed: u64,
    seconds: f64,
    per_process: Vec<(String, u64, f64)>,
    after_stop: u64,
    latencies: Vec<Duration>,
    /// The same, timed from the call being sent.
    from_sent: Vec<Duration>,
    early: usize,
    missing: usize,
}

async fn throughput_one(
    processes: usize,
    shards: u32,
    seconds: u64,
    concurrency: usize,
    rate: f64,
) -> Throughput {
    let setup = format!("{processes} process(es) × {shards} shard(s)");
    println!("    {setup}: starting");
    let stack = Arc::new(Stack::start(998).await);
    let gateways: Vec<Gateway> = if processes == 1 {
        vec![stack.gateway("a", shards, "10s")]
    } else {
        three(&stack, shards, "10s")
    };
    let refs: Vec<&Gateway> = gateways.iter().collect();
    let (up, shares) = stack
        .all_connected(&refs, u64::from(shards), Duration::from_secs(300))
        .await;
    let reg = stack.registered(1_000).await;
    println!(
        "    {setup}: all shards CONNECTED after {:.1} s (shares {:?}), 1,000 guilds registered {:.1} s later",
        up.as_secs_f64(),
        shares.iter().map(Vec::len).collect::<Vec<_>>(),
        reg.as_secs_f64()
    );
    let mut all = targets(&stack).await;
    assert!(all.len() >= 1_000, "{} guilds with members", all.len());
    // The watched guild is changed only by the latency loop, by a member of its own.
    let (watched, watched_user) = all.remove(0);
    let watched_user = watched_user.unwrap_or_else(|| watched.user.clone());
    let bulk: Arc<Vec<Target>> = Arc::new(all.into_iter().map(|(t, _)| t).collect());

    // The reader of the watched guild's log: a connection of its own, XREAD BLOCK.
    let client = Client::new(
        Config::from_url(&stack.redis_url()).unwrap(),
        None,
        None,
        None,
    );
    client.init().await.unwrap();
    let key = format!("{PREFIX}:{{{}}}:events", watched.guild);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let done = CancellationToken::new();
    let reader = {
        let (done, key, user) = (done.clone(), key.clone(), watched_user.clone());
        let mut last: String = {
            let newest: Vec<(String, HashMap<String, String>)> =
                client.xrevrange(&key, "+", "-", Some(1)).await.unwrap();
            newest
                .first()
                .map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone())
        };
        tokio::spawn(async move {
            while !done.is_cancelled() {
                let got: Option<XReadResponse<String, String, String, String>> = client
                    .xread_map(Some(100), Some(500), key.as_str(), last.as_str())
                    .await
                    .ok();
                let now = Instant::now();
                for (_, entries) in got.into_iter().flatten() {
                    for (id, fields) in entries {
                        last = id;
                        let Some(e) = fields
                            .get("e")
                            .and_then(|e| serde_json::from_str::<Value>(e).ok())
                        else {
                            continue;
                        };
                        let who = e["data"]["user_id"]
                            .as_str()
                            .or(e["data"]["user"]["id"].as_str());
                        let voice = e["type"].as_str().is_some_and(|t| t.starts_with("voice."));
                        if voice && who == Some(user.as_str()) {
                            let _ = seen_tx.send(now);
                        }
                    }
                }
            }
            let _ = client.quit().await;
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before: Vec<u64> = {
        let mut v = Vec::new();
        for gw in &gateways {
            v.push(stack.events_total(&gw.metrics).await);
        }
        v
    };
    let changes = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut drivers = Vec::new();
    for k in 0..concurrency {
        let (stack, bulk, changes, failed) =
            (stack.clone(), bulk.clone(), changes.clone(), failed.clone());
        drivers.push(tokio::spawn(async move {
            // Guilds k, k + concurrency, …: round-robin, each member in then out.
            let mine: Vec<Target> = bulk.iter().skip(k).step_by(concurrency).cloned().collect();
            let mut joined = vec![false; mine.len()];
            let mut i = 0;
            // Each driver's share of the rate, its first change offset by its place.
            let every = (rate > 0.0).then(|| Duration::from_secs_f64(concurrency as f64 / rate));
            let first = every.map_or(started, |e| {
                started + e.mul_f64(k as f64 / concurrency as f64)
            });
            while Instant::now() < end && !mine.is_empty() {
                if let Some(every) = every {
                    let at = first + every * i as u32;
                    if at >= end {
                        break;
                    }
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
                let t = &mine[i % mine.len()];
                let join = !joined[i % mine.len()];
                let ok = stack
                    .voice(&t.guild, &t.user, join.then_some(t.lobby.as_str()))
                    .await;
                if ok {
                    joined[i % mine.len()] = join;
                    changes.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    // The counters when the driving ends, whatever the watched loop below still waits for.
    let at_end = {
        let stack = stack.clone();
        let urls: Vec<String> = gateways.iter().map(|g| g.metrics.clone()).collect();
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
            let mut v = Vec::new();
            for u in &urls {
                v.push(stack.events_total(u).await);
            }
            v
        })
    };
    // The watched guild: one change at a time, 10 a second.
    let mut latencies = Vec::new();
    let mut from_sent = Vec::new();
    let (mut early, mut missing) = (0, 0);
    let mut join = true;
    while Instant::now() < end {
        let tick = Instant::now();
        while seen_rx.try_recv().is_ok() {}
        let sent = Instant::now();
        let ok = stack
            .voice(
                &watched.guild,
                &watched_user,
                join.then_some(watched.lobby.as_str()),
            )
            .await;
        let returned = Instant::now();
        if ok {
            join = !join;
            match tokio::time::timeout(Duration::from_secs(10), seen_rx.recv()).await {
                Ok(Some(at)) => {
                    if at < returned {
                        early += 1;
                    }
                    latencies.push(at.saturating_duration_since(returned));
                    from_sent.push(at.saturating_duration_since(sent));
                }
                _ => missing += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())).await;
    }
    for d in drivers {
        d.await.unwrap();
    }
    let elapsed = seconds as f64;
    let at_end = at_end.await.unwrap();
    let mut per_process = Vec::new();
    let mut at_stop = 0;
    for ((gw, b), e) in gateways.iter().zip(&before).zip(&at_end) {
        let n = e - b;
        at_stop += n;
        per_process.push((gw.name.clone(), n, n as f64 / elapsed));
    }
    // What was still queued when the driving ended.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut after_stop = 0;
    for (gw, b) in gateways.iter().zip(&before) {
        after_stop += stack.events_total(&gw.metrics).await - b;
    }
    done.cancel();
    let _ = reader.await;
    latencies.sort_unstable();
    from_sent.sort_unstable();
    drop(gateways);
    Throughput {
        setup,
        changes: changes.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        seconds: elapsed,
        per_process,
        after_stop: after_stop - at_stop,
        latencies,
        from_sent,
        early,
        missing,
    }
}

async fn throughput(seconds: u64, concurrency: usize, rate: f64) {
    let pace = if rate > 0.0 {
        format!("{rate:.0} a second in all")
    } else {
        "as fast as the simulator takes them".to_owned()
    };
    println!(
        "throughput: 1,000 guilds; voice changes round-robin across them, {concurrency} at once, {pace}, for {seconds} s; one watched guild changed 10 a second"
    );
    let sharded = throughput_one(3, 16, seconds, concurrency, rate).await;
    let single = throughput_one(1, 1, seconds, concurrency, rate).await;
    for t in [&sharded, &single] {
        let total: u64 = t.per_process.iter().map(|p| p.1).sum();
        println!(
            "    {}: {} changes in {:.1} s ({:.0}/s), {} failed; events appended {} ({:.0}/s), {} more after the driving ended; per process: {}",
            t.setup,
            t.changes,
            t.seconds,
            t.changes as f64 / t.seconds,
            t.failed,
            total,
            total as f64 / t.seconds,
            t.after_stop,
            t.per_process
                .iter()
                .map(|(n, c, r)| format!("{n} {c} ({r:.0}/s)"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "    {}: watched guild, {} changes: Discord-to-log p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} read before the call returned, {} never read); from the call sent: p50 {:.1} ms, p99 {:.1} ms",
            t.setup,
            t.latencies.len(),
            percentile(&t.latencies, 0.5),
            percentile(&t.latencies, 0.99),
            percentile(&t.latencies, 1.0),
            t.early,
            t.missing,
            percentile(&t.from_sent, 0.5),
            percentile(&t.from_sent, 0.99),
        );
    }
    let row = |t: &Throughput| {
        let total: u64 = t.per_process.iter().map(|p| p.1).sum();
        format!(
            "| {} | {:.0} | {:.0} | {} | {:.1} | {:.1} |",
            t.setup,
            t.changes as f64 / t.seconds,
            total as f64 / t.seconds,
            t.per_process
                .iter()
                .map(|(_, _, r)| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            percentile(&t.latencies, 0.5),
            percentile(&t.latencies, 0.99),
        )
    };
    println!("  side by side:");
    println!(
        "  | setup | changes/s | events/s (all) | events/s per process | watched p50 ms | watched p99 ms |"
    );
    println!("  |---|---|---|---|---|---|");
    println!("  {}", row(&sharded));
    println!("  {}", row(&single));
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .skip_while(|a| *a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    coven::web::raise_open_file_limit();
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| matches!(*a, "takeover" | "coldstart" | "throughput"))
        .collect();
    let runs = |name: &str| only.is_empty() || only.contains(&name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "shards benchmark: release-built redis-server, `coven sim` and `coven gateway` processes per figure, with this process watching, on one machine ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(async {
        if runs("takeover") {
            takeover(flag(&args, "--ttl", 10)).await;
        }
        if runs("coldstart") {
            coldstart().await;
        }
        if runs("throughput") {
            throughput(
                flag(&args, "--seconds", 30),
                flag(&args, "--concurrency", 32),
                flag(&args, "--rate", 500.0),
            )
            .await;
        }
    });
}
