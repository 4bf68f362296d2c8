//! The scale run of issue 24 ("[5/6] See it at scale"): one deployment at the size of a
//! busy Coven, with faults on a schedule, measured against the truth and drawn.
//!
//! Real processes on real sockets, all this build's release binary: `coven sim` (1,000
//! generated guilds, 8 shards, max concurrency 8), a local Redis Cluster of 3 primaries
//! and 3 replicas (the test harness's), 3 `coven gateway` processes sharing the 8 shards,
//! 3 `coven web` replicas on loopback ports with no balancer in front. This process is the
//! rest: people made in the simulator, logged in through each replica's real OAuth2 flow,
//! about 2,000 SSE clients on `/api/stream?guild=G` over 200 guilds (most on 10 busy
//! ones), and a driver making voice changes through the simulator's control API, each
//! timed, so every stream's receipt of a change is a Discord-to-browser latency.
//!
//! A client is an `EventSource`: on a cut it waits the stream's `retry:` and reconnects to
//! the next replica with `Last-Event-ID`, as a browser behind a balancer would.
//!
//! Schedule (each phase `--seconds` / 6): steady; kill -9 of a gateway; kill -9 of a web
//! replica; kill -9 of a Redis primary (its node restarted once the replica took over, so
//! the cluster has its replicas back); a busy guild's slot migrated to another primary; a
//! fourth gateway added. The truth is each guild's event log, read at the end with XRANGE
//! from whichever node owns it then: every stream is checked against it (lost, repeated,
//! out of order), and every logged voice change is matched to the driver's call.
//!
//! `scripts/scale.sh` (= `cargo bench --bench scale --`) with `--seconds N` (default 240),
//! `--clients N` (2,000), `--guilds N` (watched, 200), `--rate N` (changes a second, 50),
//! `--lease-ttl S` (the gateways' `GATEWAY_LEASE_TTL`, 4), `--out DIR` (docs/): writes
//! `scale-run.json` and `scale-run.svg` there. See docs/benchmarks.md.

// A benchmark that cannot set itself up has nothing to measure: it may stop there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Logging in through the simulator, shared by the benchmarks.
#[path = "support/login.rs"]
mod login;

use coven::event::EventId;
use fred::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The test suite's machinery: the local cluster and `coven` processes.
#[allow(dead_code)]
#[path = "../tests/it/harness"]
mod harness {
    pub mod cluster;
    pub mod process;
    pub mod redis;
    pub mod sentinel;

    /// How long a process may take to print what it is waiting for.
    pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
}

use harness::cluster::Cluster;
use harness::process::CovenProcess;
use harness::redis::free_port;

const PREFIX: &str = "coven";
use coven::sim::defaults::{BOT_TOKEN, CLIENT_SECRET};
const CLIENT_ID: &str = "1190000000000000002";
const SHARDS: u64 = 8;
/// Guilds that draw most of the traffic and most of the viewers.
const BUSY: usize = 10;
/// Share of the changes made to the busy guilds (the rest: any of the 1,000).
const BUSY_SHARE: f64 = 0.7;
/// Share of the streams on the busy guilds.
const BUSY_STREAMS: f64 = 0.75;
/// Streams each person on a busy guild holds (tabs, devices).
const STREAMS_PER_BUSY_PERSON: usize = 3;
/// Quiet guilds each of the "few watching many" watches.
const QUIET_PER_PERSON: usize = 20;
/// A delivery slower than this is still the fault's doing (see `delivery_back`).
const LATE: Duration = Duration::from_secs(1);
/// A fault window lasts until delivery is back, plus this.
const WINDOW_MARGIN: Duration = Duration::from_secs(5);
const P99_TARGET_MS: f64 = 500.0;
const BACK_TARGET_S: f64 = 5.0;

struct Args {
    seconds: u64,
    clients: usize,
    guilds: usize,
    rate: f64,
    lease_ttl: u64,
    out: PathBuf,
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .skip_while(|a| *a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn generated(i: usize) -> u64 {
    coven::sim::defaults::generated_guild_id(i as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

/// Resident set of a process, in KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// `INFO` of a cluster node as fields (empty when it does not answer).
fn info(cluster: &Cluster, port: u16) -> HashMap<String, String> {
    cluster
        .cli(port, &["INFO"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn num(m: &HashMap<String, String>, k: &str) -> f64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// The deployment

struct Gateway {
    name: String,
    process: CovenProcess,
    health: String,
}

struct Web {
    name: String,
    process: Option<CovenProcess>,
    port: u16,
}

struct Deployment {
    cluster: Arc<Cluster>,
    sim: CovenProcess,
    sim_url: String,
    gateways: Vec<Gateway>,
    webs: Vec<Web>,
    http: reqwest::Client,
}

/// A `coven gateway` against the cluster and the simulator. Blocks until it listens.
fn spawn_gateway(name: &str, redis: &str, sim_url: &str, lease_ttl: u64) -> Gateway {
    let metrics = format!("127.0.0.1:{}", free_port());
    let ttl = format!("{lease_ttl}s");
    let ws = sim_url.replace("http://", "ws://");
    let api = format!("{sim_url}/api");
    let mut process = CovenProcess::spawn(
        &["gateway"],
        &[
            ("BIND", "127.0.0.1:0"),
            ("METRICS_BIND", &metrics),
            ("REDIS_URL", redis),
            ("DISCORD_BOT_TOKEN", BOT_TOKEN),
            ("DISCORD_GATEWAY_URL", &ws),
            ("DISCORD_API_URL", &api),
            ("SHARD_COUNT", &SHARDS.to_string()),
            ("GATEWAY_LEASE_TTL", &ttl),
            ("RUST_LOG", &log_level()),
        ],
    );
    let health = process.listening_url();
    Gateway {
        name: name.to_owned(),
        process,
        health,
    }
}

impl Deployment {
    fn web(&self, name: &str) -> Web {
        let port = free_port();
        let bind = format!("127.0.0.1:{port}");
        let public = format!("http://{bind}");
        let metrics = format!("127.0.0.1:{}", free_port());
        let redis = self.cluster.url();
        let api = format!("{}/api", self.sim_url);
        let mut process = CovenProcess::spawn(
            &["web"],
            &[
                ("BIND", &bind),
                ("METRICS_BIND", &metrics),
                ("PUBLIC_URL", &public),
                ("REDIS_URL", &redis),
                ("DISCORD_BOT_TOKEN", BOT_TOKEN),
                ("DISCORD_CLIENT_ID", CLIENT_ID),
                ("DISCORD_CLIENT_SECRET", CLIENT_SECRET),
                ("DISCORD_API_URL", &api),
                ("DISCORD_OAUTH_URL", &self.sim_url),
                ("INVITE_SECRET", "scale-invite-secret-0123456789abcdef"),
                ("RUST_LOG", &log_level()),
            ],
        );
        process.wait_for_stdout("coven web listening on");
        Web {
            name: name.to_owned(),
            process: Some(process),
            port,
        }
    }

    async fn sim_state(&self, guild: Option<u64>) -> Value {
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

    async fn new_person(&self, username: &str) -> String {
        let made: Value = self
            .http
            .post(format!("{}/_sim/users", self.sim_url))
            .json(&json!({"username": username, "member": false}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        made["id"].as_str().unwrap().to_owned()
    }

    async fn join(&self, guild: u64, user: &str) {
        let r = self
            .http
            .put(format!(
                "{}/_sim/guilds/{guild}/members/{user}",
                self.sim_url
            ))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "joining {guild}: {}", r.status());
    }

    /// Logs `user` in on the replica on `port` through its OAuth2 flow; the session cookie
    /// (sessions live in Redis: it works on every replica).
    async fn login(&self, port: u16, user: &str) -> String {
        login::session_cookie(&self.http, &format!("http://127.0.0.1:{port}"), user)
            .await
            .expect("a login")
    }

    /// Pids of the Coven processes alive now, by name.
    fn pids(&self) -> Vec<(String, u32)> {
        let mut out = vec![("sim".to_owned(), self.sim.pid())];
        for g in &self.gateways {
            out.push((g.name.clone(), g.process.pid()));
        }
        for w in &self.webs {
            if let Some(p) = &w.process {
                out.push((w.name.clone(), p.pid()));
            }
        }
        out
    }
}

fn log_level() -> String {
    std::env::var("SCALE_LOG").unwrap_or_else(|_| "warn".to_owned())
}

// ---------------------------------------------------------------------------------------
// The driver

/// One voice change the driver asked the simulator for.
#[derive(Clone)]
struct Change {
    user: u64,
    join: bool,
    sent: Instant,
    /// The same moment on the wall clock, in unix ms: a log entry's id is Redis's.
    sent_unix_ms: f64,
    ok: bool,
}

struct GuildDriver {
    lobby: String,
    users: Vec<u64>,
    in_voice: Vec<bool>,
    next: usize,
    changes: Vec<Change>,
}

/// Makes `rate` changes a second until `stop`: `BUSY_SHARE` to the busy guilds in turn,
/// the rest to a guild drawn from all. A guild's changes are made one at a time (its lock
/// is held over the call), so its log's order is the order they were asked in.
async fn drive(
    http: reqwest::Client,
    sim_url: String,
    guilds: Arc<Vec<tokio::sync::Mutex<GuildDriver>>>,
    busy: usize,
    rate: f64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut busy_turn = 0usize;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let quiet = rand::random::<f64>() >= BUSY_SHARE;
        let g = if quiet {
            rand::random_range(0..guilds.len())
        } else {
            busy_turn += 1;
            busy_turn % busy
        };
        let (http, sim_url, guilds) = (http.clone(), sim_url.clone(), guilds.clone());
        tasks.spawn(async move {
            let mut guild = guilds[g].lock().await;
            let u = guild.next % guild.users.len();
            guild.next += 1;
            let join = !guild.in_voice[u];
            let user = guild.users[u];
            let channel = join.then(|| guild.lobby.clone());
            let sent = Instant::now();
            let sent_unix_ms = unix_ms();
            let ok = http
                .post(format!("{sim_url}/_sim/voice"))
                .json(&json!({"guild_id": generated(g).to_string(), "user_id": user.to_string(), "channel_id": channel}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                guild.in_voice[u] = join;
            }
            guild.changes.push(Change {
                user,
                join,
                sent,
                sent_unix_ms,
                ok,
            });
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------------
// The clients

/// What one stream saw.
#[derive(Default)]
struct Seen {
    /// Events with an id, as read: (id, when).
    got: Vec<(EventId, Instant)>,
    reconnects: Vec<Instant>,
    resyncs: Vec<Instant>,
    /// Answers other than 200 (a replica starting, a limit).
    refused: u64,
}

struct Viewer {
    guild: usize,
    cookie: Arc<str>,
    /// The replica it is on now (an index into the ports).
    on: Arc<AtomicUsize>,
}

/// HTTP/1.1 chunked transfer decoding, incremental: what the server sends, as SSE text.
#[derive(Default)]
struct Dechunk {
    raw: Vec<u8>,
    /// Bytes of the current chunk still to come.
    left: usize,
}

impl Dechunk {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.raw.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            if self.left > 0 {
                let n = self.left.min(self.raw.len() - at);
                out.extend_from_slice(&self.raw[at..at + n]);
                at += n;
                self.left -= n;
                if self.left > 0 {
                    break;
                }
                // The chunk's own CRLF.
                self.left = usize::MAX;
            }
            if self.left == usize::MAX {
                if self.raw.len() - at < 2 {
                    break;
                }
                at += 2;
                self.left = 0;
            }
            let Some(end) = self.raw[at..].windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let size = std::str::from_utf8(&self.raw[at..at + end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .unwrap_or(0);
            at += end + 2;
            if size == 0 {
                // The last chunk: the response is over.
                self.raw.clear();
                return;
            }
            self.left = size;
        }
        self.raw.drain(..at);
    }
}

/// One `EventSource`: opens `/api/stream?guild=G` on its replica, reads, and on a cut
/// waits `retry:` and goes to the next replica that answers, with `Last-Event-ID`.
#[allow(clippy::too_many_arguments)]
async fn run_client(
    client: Arc<Viewer>,
    ports: Arc<Vec<u16>>,
    guild_id: u64,
    start: Option<String>,
    opened: Arc<AtomicU64>,
    trouble: Arc<AtomicU64>,
    gate: Arc<Semaphore>,
    done: CancellationToken,
) -> Seen {
    let mut seen = Seen::default();
    let mut last: Option<String> = start;
    let mut retry = Duration::from_millis(2000);
    let mut first = true;
    'connect: loop {
        if done.is_cancelled() {
            return seen;
        }
        let port = ports[client.on.load(Ordering::Relaxed)];
        let permit = gate.acquire().await;
        let conn = tokio::select! {
            c = TcpStream::connect(("127.0.0.1", port)) => c,
            () = done.cancelled() => return seen,
        };
        let Ok(mut conn) = conn else {
            drop(permit);
            // Nobody there: the balancer would pick another replica at once.
            client.on.store(
                (client.on.load(Ordering::Relaxed) + 1) % ports.len(),
                Ordering::Relaxed,
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut head = format!(
            "GET /api/stream?guild={guild_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {}\r\nAccept: text/event-stream\r\n",
            client.cookie
        );
        if let Some(id) = &last {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        if conn.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let mut permit = Some(permit);
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut sse: Vec<u8> = Vec::new();
        let mut dechunk = Dechunk::default();
        let mut headers = false;
        let mut head_buf: Vec<u8> = Vec::new();
        loop {
            buf.clear();
            buf.reserve(4096);
            let n = tokio::select! {
                r = conn.read_buf(&mut buf) => r.unwrap_or(0),
                () = done.cancelled() => return seen,
            };
            if n == 0 {
                drop(permit.take());
                if !done.is_cancelled() {
                    trouble.fetch_add(1, Ordering::Relaxed);
                    seen.reconnects.push(Instant::now());
                    // EventSource waits `retry`; the balancer then sends it elsewhere.
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = done.cancelled() => return seen,
                    }
                    client.on.store(
                        (client.on.load(Ordering::Relaxed) + 1) % ports.len(),
                        Ordering::Relaxed,
                    );
                }
                continue 'connect;
            }
            let at = Instant::now();
            if !headers {
                head_buf.extend_from_slice(&buf);
                let Some(end) = head_buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                if !head_buf.starts_with(b"HTTP/1.1 200") {
                    seen.refused += 1;
                    if trouble.fetch_add(1, Ordering::Relaxed) < 3 {
                        let line = head_buf.split(|b| *b == b'\r').next().unwrap_or_default();
                        eprintln!("  (a stream refused: {})", String::from_utf8_lossy(line));
                    }
                    drop(permit.take());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    client.on.store(
                        (client.on.load(Ordering::Relaxed) + 1) % ports.len(),
                        Ordering::Relaxed,
                    );
                    continue 'connect;
                }
                headers = true;
                drop(permit.take());
                if first {
                    first = false;
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                buf = head_buf.split_off(end + 4);
            }
            dechunk.push(&buf, &mut sse);
            // Whole messages only: up to the last blank line.
            let Some(end) = sse.windows(2).rposition(|w| w == b"\n\n") else {
                continue;
            };
            for message in sse[..end]
                .split(|b| *b == b'\n')
                .collect::<Vec<_>>()
                .split(|l| l.is_empty())
            {
                let mut id = None;
                let mut event: &[u8] = b"message";
                for line in message {
                    if let Some(v) = line.strip_prefix(b"id: ") {
                        id = Some(v);
                    } else if let Some(v) = line.strip_prefix(b"event: ") {
                        event = v;
                    } else if let Some(v) = line.strip_prefix(b"retry: ")
                        && let Some(r) = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok())
                    {
                        retry = Duration::from_millis(r);
                    }
                }
                let Some(id) = id.and_then(|i| std::str::from_utf8(i).ok()) else {
                    continue;
                };
                last = Some(id.to_owned());
                if event == b"resync" {
                    seen.resyncs.push(at);
                } else if let Ok(id) = id.parse::<EventId>() {
                    seen.got.push((id, at));
                }
            }
            sse.drain(..end + 2);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sampling

#[derive(Default, Clone, serde::Serialize)]
struct ProcSample {
    t: f64,
    rss_kib: u64,
    cpu_s: f64,
}

#[derive(Default, Clone, serde::Serialize)]
struct RedisSample {
    t: f64,
    role: String,
    clients: u64,
    commands: u64,
    rss_kib: u64,
    cpu_s: f64,
}

type Samples<T> = Arc<Mutex<BTreeMap<String, Vec<T>>>>;

// ---------------------------------------------------------------------------------------
// The run

/// A fault as it happened.
struct Fault {
    name: String,
    at: Instant,
    /// Streams whose delivery it could interrupt.
    affected: Vec<usize>,
    detail: String,
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = Args {
        seconds: flag(&argv, "--seconds", 240),
        clients: flag(&argv, "--clients", 2_000),
        guilds: flag(&argv, "--guilds", 200),
        rate: flag(&argv, "--rate", 50.0),
        lease_ttl: flag(&argv, "--lease-ttl", 4),
        out: flag(
            &argv,
            "--out",
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs")),
        ),
    };
    coven::web::raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let phase_len = Duration::from_secs(args.seconds / 6);
    println!(
        "scale run: {} s in 6 phases of {} s; {} clients over {} guilds; {}/s voice changes; lease TTL {} s; {} cores",
        args.seconds,
        phase_len.as_secs(),
        args.clients,
        args.guilds,
        args.rate,
        args.lease_ttl,
        cores
    );
    let setup = Instant::now();
    let cluster = Arc::new(tokio::task::spawn_blocking(Cluster::start).await.unwrap());
    println!(
        "  redis cluster up: primaries {:?}, all nodes {:?}",
        cluster.primaries(),
        cluster.ports()
    );
    let mut sim = CovenProcess::spawn(
        &["sim"],
        &[
            ("BIND", "127.0.0.1:0"),
            ("SIM_GUILDS", "1000"),
            ("SIM_SHARDS", &SHARDS.to_string()),
            // Eight buckets: the shards identify at once rather than 5 s apart.
            ("SIM_MAX_CONCURRENCY", "8"),
            // Logging thousands of people in is thousands of code exchanges.
            ("SIM_TOKEN_RATE_LIMIT", "10000"),
            ("RUST_LOG", &log_level()),
        ],
    );
    let sim_url = sim.listening_url();
    let mut d = Deployment {
        cluster: cluster.clone(),
        sim,
        sim_url,
        gateways: Vec::new(),
        webs: Vec::new(),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
    };
    for name in ["gateway-a", "gateway-b", "gateway-c"] {
        let gw = spawn_gateway(name, &cluster.url(), &d.sim_url, args.lease_ttl);
        d.gateways.push(gw);
    }
    let redis =
        fred::prelude::Client::new(Config::from_url(&cluster.url()).unwrap(), None, None, None);
    redis.init().await.unwrap();
    let registered = Instant::now();
    loop {
        let have: u64 = redis.hlen(format!("{PREFIX}:guilds")).await.unwrap_or(0);
        if have >= 1_002 {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(300),
            "the gateways registered {have} of 1,002 guilds"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  sim and 3 gateways up: 1,002 guilds registered in {:.1} s",
        registered.elapsed().as_secs_f64()
    );
    for name in ["web-0", "web-1", "web-2"] {
        let w = d.web(name);
        d.webs.push(w);
    }
    for w in &d.webs {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d
            .http
            .get(format!("http://127.0.0.1:{}/readyz", w.port))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "{} did not become ready", w.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let d = Arc::new(d);

    // Every generated guild's lobby and own people (the driver's voices).
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..1_000usize {
        let (d, gate) = (d.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            let s = d.sim_state(Some(generated(i))).await;
            let bot = s["bot_id"].as_str().unwrap_or_default().to_owned();
            let users: Vec<u64> = s["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["user_id"].as_str())
                .filter(|u| *u != bot)
                .filter_map(|u| u.parse().ok())
                .collect();
            let shard = (generated(i) >> 22) % SHARDS;
            (s["lobby_id"].as_str().unwrap().to_owned(), users, shard)
        }));
    }
    let mut drivers = Vec::new();
    let mut shard_of = Vec::new();
    for t in tasks {
        let (lobby, users, shard) = t.await.unwrap();
        assert!(!users.is_empty(), "a generated guild with people");
        shard_of.push(shard);
        drivers.push(tokio::sync::Mutex::new(GuildDriver {
            lobby,
            in_voice: vec![false; users.len()],
            users,
            next: 0,
            changes: Vec::new(),
        }));
    }
    let drivers = Arc::new(drivers);

    // People and their streams: many on a few busy guilds, a few on many quiet ones.
    let watched = args.guilds.max(BUSY + 1);
    let busy_streams = (args.clients as f64 * BUSY_STREAMS) as usize;
    let quiet_streams = args.clients - busy_streams;
    let quiet_guilds: Vec<usize> = (BUSY..watched).collect();
    // (person, guilds they are in and watch, streams per guild)
    let mut plan: Vec<(String, Vec<usize>, usize)> = Vec::new();
    let busy_people = busy_streams.div_ceil(STREAMS_PER_BUSY_PERSON);
    for p in 0..busy_people {
        plan.push((
            format!("scale.b{p}"),
            vec![p % BUSY],
            STREAMS_PER_BUSY_PERSON,
        ));
    }
    let quiet_people = quiet_streams.div_ceil(QUIET_PER_PERSON);
    for q in 0..quiet_people {
        let gs = (0..QUIET_PER_PERSON)
            .map(|k| quiet_guilds[(q * QUIET_PER_PERSON + k) % quiet_guilds.len()])
            .collect();
        plan.push((format!("scale.q{q}"), gs, 1));
    }
    let ports: Arc<Vec<u16>> = Arc::new(d.webs.iter().map(|w| w.port).collect());
    let logins = Instant::now();
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for (i, (name, gs, per)) in plan.into_iter().enumerate() {
        let (d, gate, ports) = (d.clone(), gate.clone(), ports.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await;
            let user = d.new_person(&name).await;
            for g in &gs {
                d.join(generated(*g), &user).await;
            }
            let cookie: Arc<str> = d.login(ports[i % ports.len()], &user).await.into();
            (cookie, gs, per)
        }));
    }
    let mut clients: Vec<Arc<Viewer>> = Vec::new();
    for t in tasks {
        let (cookie, gs, per) = t.await.unwrap();
        for g in gs {
            for _ in 0..per {
                let on = clients.len() % ports.len();
                clients.push(Arc::new(Viewer {
                    guild: g,
                    cookie: cookie.clone(),
                    on: Arc::new(AtomicUsize::new(on)),
                }));
            }
        }
    }
    println!(
        "  {} people made, put in their guilds and logged in through the replicas' OAuth2 in {:.1} s",
        busy_people + quiet_people,
        logins.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let web_idle: Vec<u64> = d
        .webs
        .iter()
        .map(|w| rss_kib(w.process.as_ref().unwrap().pid()))
        .collect();

    // Each stream starts where its guild's log is (as a page load gives the browser the
    // id it is at), so an event is never missed for want of a first id.
    let mut tails: HashMap<usize, Option<String>> = HashMap::new();
    for c in &clients {
        if let std::collections::hash_map::Entry::Vacant(e) = tails.entry(c.guild) {
            let newest: Vec<(String, HashMap<String, String>)> = redis
                .xrevrange(events_key(generated(c.guild)), "+", "-", Some(1))
                .await
                .unwrap();
            e.insert(newest.first().map(|(id, _)| id.clone()));
        }
    }
    // A failover or a migration later leaves this client's view stale: the logs are read
    // at the end with redis-cli on each slot's owner.
    let _ = redis.quit().await;
    let opened = Arc::new(AtomicU64::new(0));
    let trouble = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let open_gate = Arc::new(Semaphore::new(32));
    let readers: Vec<tokio::task::JoinHandle<Seen>> = clients
        .iter()
        .map(|c| {
            tokio::spawn(run_client(
                c.clone(),
                ports.clone(),
                generated(c.guild),
                tails[&c.guild].clone(),
                opened.clone(),
                trouble.clone(),
                open_gate.clone(),
                done.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened.load(Ordering::Relaxed) < clients.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {} streams opened",
            opened.load(Ordering::Relaxed),
            clients.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let web_streams: Vec<usize> = (0..ports.len())
        .map(|r| {
            clients
                .iter()
                .filter(|c| c.on.load(Ordering::Relaxed) == r)
                .count()
        })
        .collect();
    println!(
        "  {} streams open ({} on the {BUSY} busy guilds, {} on {} quiet ones; per replica {:?}); setup took {:.0} s",
        clients.len(),
        clients.iter().filter(|c| c.guild < BUSY).count(),
        clients.iter().filter(|c| c.guild >= BUSY).count(),
        quiet_guilds.len(),
        web_streams,
        setup.elapsed().as_secs_f64()
    );
    println!(
        "  while opening: {} refusals or cuts",
        trouble.load(Ordering::Relaxed)
    );

    // Samplers: Coven processes every second, Redis nodes every two.
    let t0 = Instant::now();
    let d = Arc::new(Mutex::new(Arc::try_unwrap(d).ok().expect("one owner")));
    let procs: Samples<ProcSample> = Arc::default();
    let nodes: Samples<RedisSample> = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (d, procs, sampling) = (d.clone(), procs.clone(), sampling.clone());
        std::thread::spawn(move || {
            let me = std::process::id();
            while sampling.load(Ordering::Relaxed) {
                let t = t0.elapsed().as_secs_f64();
                let mut pids = d.lock().unwrap().pids();
                pids.push(("load generator".to_owned(), me));
                let mut s = procs.lock().unwrap();
                for (name, pid) in pids {
                    s.entry(name).or_default().push(ProcSample {
                        t,
                        rss_kib: rss_kib(pid),
                        cpu_s: cpu_seconds(pid),
                    });
                }
                drop(s);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let redis_sampler = {
        let (cluster, nodes, sampling) = (cluster.clone(), nodes.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                for port in cluster.live_ports() {
                    let t = t0.elapsed().as_secs_f64();
                    let i = info(&cluster, port);
                    if i.is_empty() {
                        continue;
                    }
                    nodes
                        .lock()
                        .unwrap()
                        .entry(port.to_string())
                        .or_default()
                        .push(RedisSample {
                            t,
                            role: i.get("role").cloned().unwrap_or_default(),
                            clients: num(&i, "connected_clients") as u64,
                            commands: num(&i, "total_commands_processed") as u64,
                            rss_kib: (num(&i, "used_memory_rss") / 1024.0) as u64,
                            cpu_s: num(&i, "used_cpu_sys") + num(&i, "used_cpu_user"),
                        });
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };

    // The run.
    let stop = CancellationToken::new();
    let driver = tokio::spawn(drive(
        reqwest::Client::builder()
            .pool_max_idle_per_host(128)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        d.lock().unwrap().sim_url.clone(),
        drivers.clone(),
        BUSY,
        args.rate,
        stop.clone(),
    ));
    let say = |what: &str| {
        println!("  [{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    };
    let streams_of = |pred: &dyn Fn(&Viewer) -> bool| -> Vec<usize> {
        (0..clients.len()).filter(|i| pred(&clients[*i])).collect()
    };
    let mut faults: Vec<Fault> = Vec::new();
    let snapshot_gw = |d: &Arc<Mutex<Deployment>>| {
        let dd = d.lock().unwrap();
        dd.gateways
            .iter()
            .map(|g| (g.name.clone(), g.health.clone()))
            .collect::<Vec<_>>()
    };
    let held_by = async |d: &Arc<Mutex<Deployment>>| -> Vec<(String, Vec<u64>)> {
        let http = d.lock().unwrap().http.clone();
        let mut out = Vec::new();
        for (name, health) in snapshot_gw(d) {
            let body: Value = match http
                .get(format!("{health}/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let shards = body["shards"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["shard"][0].as_u64())
                .collect();
            out.push((name, shards));
        }
        out
    };
    say("phase steady: voice changes start");
    tokio::time::sleep(phase_len).await;
    let steady_holding = held_by(&d).await;
    let steady_rss: Vec<(String, u64)> = d
        .lock()
        .unwrap()
        .pids()
        .iter()
        .map(|(n, p)| (n.clone(), rss_kib(*p)))
        .collect();

    // 1. kill -9 a gateway: the one holding the most busy guilds.
    {
        let holding = held_by(&d).await;
        let busy_on =
            |shards: &Vec<u64>| (0..BUSY).filter(|g| shards.contains(&shard_of[*g])).count();
        let (victim, shards) = holding
            .iter()
            .max_by_key(|(_, s)| busy_on(s))
            .cloned()
            .unwrap();
        let at = Instant::now();
        {
            let mut dd = d.lock().unwrap();
            let i = dd.gateways.iter().position(|g| g.name == victim).unwrap();
            let mut g = dd.gateways.remove(i);
            g.process.kill();
        }
        let affected = streams_of(&|c| shards.contains(&shard_of[c.guild]));
        say(&format!(
            "FAULT kill -9 {victim} (shards {shards:?}; {} streams on their guilds)",
            affected.len()
        ));
        faults.push(Fault {
            name: format!("kill -9 {victim}"),
            at,
            affected,
            detail: format!("shards {shards:?}"),
        });
    }
    tokio::time::sleep(phase_len).await;

    // 2. kill -9 a web replica.
    {
        let r = 0;
        let affected = streams_of(&|c| c.on.load(Ordering::Relaxed) == r);
        let at = Instant::now();
        let name = {
            let mut dd = d.lock().unwrap();
            let w = &mut dd.webs[r];
            w.process.take().unwrap().kill();
            w.name.clone()
        };
        say(&format!(
            "FAULT kill -9 {name} ({} streams on it reconnect elsewhere with Last-Event-ID)",
            affected.len()
        ));
        faults.push(Fault {
            name: format!("kill -9 {name}"),
            at,
            affected,
            detail: String::new(),
        });
    }
    tokio::time::sleep(phase_len).await;

    // 3. kill -9 the Redis primary owning the most busy guilds; once its replica has taken
    // over, it is started again and rejoins as a replica.
    {
        let topology = cluster.topology();
        let owner = |g: usize| {
            harness::cluster::owner_in(&topology, slot_of(generated(g)))
                .unwrap()
                .0
        };
        let primaries = cluster.primaries();
        let victim = *primaries
            .iter()
            .max_by_key(|p| (0..BUSY).filter(|g| owner(*g) == **p).count())
            .unwrap();
        let affected = streams_of(&|c| owner(c.guild) == victim);
        let at = Instant::now();
        cluster.kill(victim);
        say(&format!(
            "FAULT kill -9 redis primary :{victim} ({} streams on its guilds)",
            affected.len()
        ));
        let slot = slot_of(generated(
            (0..BUSY).find(|g| owner(*g) == victim).unwrap_or(0),
        ));
        let c = cluster.clone();
        let new = tokio::task::spawn_blocking(move || c.wait_new_owner(slot, victim))
            .await
            .unwrap();
        say(&format!(
            "  its replica :{new} took over; restarting :{victim}"
        ));
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.restart(victim))
            .await
            .unwrap();
        faults.push(Fault {
            name: format!("kill -9 redis :{victim}"),
            at,
            affected,
            detail: format!("replica :{new} promoted"),
        });
    }
    let after_kill = faults.last().unwrap().at;
    tokio::time::sleep(phase_len.saturating_sub(after_kill.elapsed())).await;

    // 4. migrate a busy guild's slot to another primary.
    {
        let g = 1usize;
        let slot = slot_of(generated(g));
        let c = cluster.clone();
        let (from, to) = tokio::task::spawn_blocking(move || {
            let (from, _) = c.owner_of_slot(slot);
            let to = c.primaries().into_iter().find(|p| *p != from).unwrap();
            (from, to)
        })
        .await
        .unwrap();
        let affected = streams_of(&|c| slot_of(generated(c.guild)) == slot);
        let at = Instant::now();
        say(&format!(
            "FAULT migrate slot {slot} (busy guild {}) :{from} → :{to} ({} streams)",
            generated(g),
            affected.len()
        ));
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.migrate(slot, to))
            .await
            .unwrap();
        say(&format!(
            "  slot {slot} moved in {:.2} s",
            at.elapsed().as_secs_f64()
        ));
        faults.push(Fault {
            name: format!("migrate slot {slot}"),
            at,
            affected,
            detail: format!(":{from} → :{to}"),
        });
    }
    let after = faults.last().unwrap().at;
    tokio::time::sleep(phase_len.saturating_sub(after.elapsed())).await;

    // 5. add a gateway: the others hand it its fair share.
    let added_at = Instant::now();
    {
        let (redis_url, sim_url) = (cluster.url(), d.lock().unwrap().sim_url.clone());
        let gw = tokio::task::spawn_blocking(move || {
            spawn_gateway("gateway-d", &redis_url, &sim_url, args.lease_ttl)
        })
        .await
        .unwrap();
        d.lock().unwrap().gateways.push(gw);
        say("FAULT add gateway-d (the others hand it shards gracefully)");
    }
    tokio::time::sleep(phase_len.saturating_sub(added_at.elapsed())).await;
    let end_holding = held_by(&d).await;
    let new_shards: Vec<u64> = end_holding
        .iter()
        .find(|(n, _)| n == "gateway-d")
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    let affected = streams_of(&|c| new_shards.contains(&shard_of[c.guild]));
    faults.push(Fault {
        name: "add gateway-d".to_owned(),
        at: added_at,
        affected,
        detail: format!("took shards {new_shards:?}"),
    });
    say(&format!(
        "gateway-d holds shards {new_shards:?}; the driver stops"
    ));
    stop.cancel();
    let drive_end = Instant::now();
    if tokio::time::timeout(Duration::from_secs(40), driver)
        .await
        .is_err()
    {
        say("the driver's last calls did not return in 40 s");
    }
    // What was asked reaches the streams (or never will).
    tokio::time::sleep(Duration::from_secs(5)).await;
    done.cancel();
    sampling.store(false, Ordering::Relaxed);
    let mut seen = Vec::with_capacity(readers.len());
    for r in readers {
        let abort = r.abort_handle();
        match tokio::time::timeout(Duration::from_secs(5), r).await {
            Ok(s) => seen.push(s.unwrap()),
            Err(_) => {
                abort.abort();
                panic!("a stream reader did not stop");
            }
        }
    }
    say("streams closed; reading the logs");
    sampler.join().unwrap();
    redis_sampler.join().unwrap();
    let end_rss: Vec<(String, u64)> = d
        .lock()
        .unwrap()
        .pids()
        .iter()
        .map(|(n, p)| (n.clone(), rss_kib(*p)))
        .collect();

    // The truth: each watched guild's log, from whichever node owns it now.
    let mut logs: HashMap<usize, Vec<(EventId, u64, bool)>> = HashMap::new();
    let mut voice_in_log = 0usize;
    let mut all_ids: HashMap<usize, HashSet<EventId>> = HashMap::new();
    let c = cluster.clone();
    let raw: Vec<String> = tokio::task::spawn_blocking(move || {
        (0..watched)
            .map(|g| {
                let key = events_key(generated(g));
                let (owner, _) = c.owner_of_slot(slot_of(generated(g)));
                c.cli(owner, &["XRANGE", &key, "-", "+"])
                    .expect("the owner answers XRANGE")
            })
            .collect()
    })
    .await
    .unwrap();
    for (g, text) in raw.iter().enumerate() {
        // redis-cli prints an entry as its id, then each field and value on a line.
        let mut out = Vec::new();
        let mut id: Option<EventId> = None;
        for line in text.lines() {
            if let Ok(i) = line.parse::<EventId>() {
                id = Some(i);
                all_ids.entry(g).or_default().insert(i);
                continue;
            }
            let (Some(at), true) = (id, line.starts_with('{')) else {
                continue;
            };
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let join = match e["type"].as_str() {
                Some("voice.joined") => true,
                Some("voice.left") => false,
                _ => continue,
            };
            let user = e["data"]["user_id"]
                .as_str()
                .or(e["data"]["user"]["id"].as_str())
                .and_then(|u| u.parse().ok())
                .unwrap_or(0);
            out.push((at, user, join));
        }
        voice_in_log += out.len();
        logs.insert(g, out);
    }

    // Each logged voice event ↔ the change that caused it: per person, in order.
    let mut change_of: HashMap<(usize, EventId), Change> = HashMap::new();
    let mut not_logged = 0usize;
    let mut changes_total = 0usize;
    let mut changes_by_guild: Vec<Vec<Change>> = Vec::new();
    for g in drivers.iter() {
        changes_by_guild.push(g.lock().await.changes.clone());
    }
    let failed_calls: usize = changes_by_guild.iter().flatten().filter(|c| !c.ok).count();
    for g in 0..watched {
        let log = &logs[&g];
        let mut by_user: HashMap<u64, Vec<(EventId, bool)>> = HashMap::new();
        for (id, user, join) in log {
            by_user.entry(*user).or_default().push((*id, *join));
        }
        let mut next: HashMap<u64, usize> = HashMap::new();
        for c in changes_by_guild[g].iter().filter(|c| c.ok) {
            changes_total += 1;
            let entries = by_user.get(&c.user).map(Vec::as_slice).unwrap_or(&[]);
            let j = next.entry(c.user).or_default();
            match entries.get(*j) {
                Some((id, join)) if *join == c.join => {
                    change_of.insert((g, *id), c.clone());
                    *j += 1;
                }
                _ => not_logged += 1,
            }
        }
    }

    // Per stream against the truth.
    let phase_starts: Vec<Instant> = std::iter::once(t0)
        .chain(faults.iter().map(|f| f.at))
        .collect();
    let phase_names: Vec<String> = std::iter::once("steady".to_owned())
        .chain(faults.iter().map(|f| f.name.clone()))
        .collect();
    let phase_of =
        |t: Instant| -> usize { phase_starts.iter().rposition(|s| t >= *s).unwrap_or(0) };
    let nphases = phase_starts.len();
    #[derive(Default, Clone)]
    struct PhaseAcc {
        latencies: Vec<f64>,
        lost: u64,
        repeated: u64,
        out_of_order: u64,
        reconnects: u64,
        resyncs: u64,
        changes: u64,
        /// From the change to its entry in the log (the entry id's time is Redis's).
        to_log: Vec<f64>,
    }
    let mut acc = vec![PhaseAcc::default(); nphases];
    for changes in &changes_by_guild {
        for c in changes.iter().filter(|c| c.ok) {
            acc[phase_of(c.sent)].changes += 1;
        }
    }
    for ((_, id), c) in &change_of {
        acc[phase_of(c.sent)]
            .to_log
            .push((id.ms as f64 - c.sent_unix_ms).max(0.0));
    }
    // (sent, received, stream)
    let mut deliveries: Vec<(Instant, Instant, usize)> = Vec::new();
    let mut streams_out_of_order = 0usize;
    let mut unknown_ids = 0u64;
    for (i, s) in seen.iter().enumerate() {
        let g = clients[i].guild;
        let mut got: HashSet<EventId> = HashSet::new();
        let mut max = EventId::ZERO;
        let mut disordered = false;
        for (id, at) in &s.got {
            if !got.insert(*id) {
                acc[phase_of(*at)].repeated += 1;
                continue;
            }
            if *id < max {
                acc[phase_of(*at)].out_of_order += 1;
                disordered = true;
            }
            max = max.max(*id);
            match change_of.get(&(g, *id)) {
                Some(c) => deliveries.push((c.sent, *at, i)),
                None => {
                    if !all_ids.get(&g).is_some_and(|ids| ids.contains(id)) {
                        unknown_ids += 1;
                    }
                }
            }
        }
        streams_out_of_order += usize::from(disordered);
        for (id, _, _) in &logs[&g] {
            if let Some(c) = change_of.get(&(g, *id))
                && !got.contains(id)
            {
                acc[phase_of(c.sent)].lost += 1;
            }
        }
        for r in &s.reconnects {
            acc[phase_of(*r)].reconnects += 1;
        }
        for r in &s.resyncs {
            acc[phase_of(*r)].resyncs += 1;
        }
    }
    for (sent, at, _) in &deliveries {
        acc[phase_of(*sent)]
            .latencies
            .push(ms(at.saturating_duration_since(*sent)));
    }

    // Delivery back after each fault: the first post-fault change each affected stream
    // receives, or later if its deliveries stay late (over `LATE`) for a while; streams
    // whose guild got no change in the second after the fault had nothing to deliver.
    let mut by_stream: Vec<Vec<(Instant, Instant)>> = vec![Vec::new(); clients.len()];
    for (sent, at, i) in &deliveries {
        by_stream[*i].push((*sent, *at));
    }
    for v in &mut by_stream {
        v.sort_by_key(|x| x.0);
    }
    let back_of = |streams: &mut dyn Iterator<Item = usize>, at: Instant, end: Instant| {
        let mut per: Vec<f64> = Vec::new();
        for i in streams {
            // Until the next fault: what follows is that one's doing.
            let after: Vec<&(Instant, Instant)> = by_stream[i]
                .iter()
                .filter(|(s, a)| *s >= at && *a < end)
                .collect();
            let Some(first) = after.first() else { continue };
            if first.0 > at + Duration::from_secs(1) {
                continue;
            }
            let mut back = first.1.saturating_duration_since(at);
            for (s, a) in &after {
                if a.saturating_duration_since(*s) > LATE {
                    back = back.max(a.saturating_duration_since(at));
                }
            }
            per.push(back.as_secs_f64());
        }
        per.sort_by(f64::total_cmp);
        (
            percentile(&per, 0.5),
            per.last().copied().unwrap_or(f64::NAN),
            per.len(),
        )
    };
    // How long appends stalled: the slowest change-to-log in the ten seconds after each
    // fault, for the affected guilds and for the other watched ones.
    let stalls: Vec<(f64, f64)> = faults
        .iter()
        .map(|f| {
            let hit: HashSet<usize> = f.affected.iter().map(|i| clients[*i].guild).collect();
            let mut worst = (0.0f64, 0.0f64);
            for ((g, id), c) in &change_of {
                if c.sent < f.at || c.sent > f.at + Duration::from_secs(10) {
                    continue;
                }
                let t = (id.ms as f64 - c.sent_unix_ms).max(0.0);
                if hit.contains(g) {
                    worst.0 = worst.0.max(t);
                } else {
                    worst.1 = worst.1.max(t);
                }
            }
            worst
        })
        .collect();
    let mut backs: Vec<(f64, f64, usize)> = Vec::new();
    // The same for the streams the fault should not touch.
    let mut backs_others: Vec<(f64, f64, usize)> = Vec::new();
    for (k, f) in faults.iter().enumerate() {
        let end = phase_starts.get(k + 2).copied().unwrap_or(drive_end);
        backs.push(back_of(&mut f.affected.iter().copied(), f.at, end));
        let affected: HashSet<usize> = f.affected.iter().copied().collect();
        backs_others.push(back_of(
            &mut (0..clients.len()).filter(|i| !affected.contains(i)),
            f.at,
            end,
        ));
    }
    let windows: Vec<(Instant, Instant)> = faults
        .iter()
        .zip(&backs)
        .enumerate()
        .map(|(k, (f, b))| {
            let phase_end = phase_starts.get(k + 2).copied().unwrap_or(drive_end);
            let until = if b.1.is_finite() {
                f.at + Duration::from_secs_f64(b.1) + WINDOW_MARGIN
            } else {
                phase_end
            };
            (f.at, until)
        })
        .collect();
    let in_window = |t: Instant| windows.iter().any(|(a, b)| t >= *a && t < *b);
    let mut outside: Vec<f64> = deliveries
        .iter()
        .filter(|(s, _, _)| !in_window(*s))
        .map(|(s, a, _)| ms(a.saturating_duration_since(*s)))
        .collect();
    outside.sort_by(f64::total_cmp);
    let mut all_lat: Vec<f64> = deliveries
        .iter()
        .map(|(s, a, _)| ms(a.saturating_duration_since(*s)))
        .collect();
    all_lat.sort_by(f64::total_cmp);

    // Per second: latency of the changes made in it, deliveries read in it.
    let secs = drive_end.duration_since(t0).as_secs() as usize + 1;
    let mut lat_by_sec: Vec<Vec<f64>> = vec![Vec::new(); secs];
    let mut deliv_by_sec: Vec<u64> = vec![0; secs];
    for (s, a, _) in &deliveries {
        let si = s.saturating_duration_since(t0).as_secs() as usize;
        if si < secs {
            lat_by_sec[si].push(ms(a.saturating_duration_since(*s)));
        }
        let ai = a.saturating_duration_since(t0).as_secs() as usize;
        if ai < secs {
            deliv_by_sec[ai] += 1;
        }
    }
    let series: Vec<Value> = lat_by_sec
        .iter_mut()
        .enumerate()
        .map(|(t, v)| {
            v.sort_by(f64::total_cmp);
            json!({
                "t": t,
                "latency_p50_ms": finite(percentile(v, 0.5)),
                "latency_p99_ms": finite(percentile(v, 0.99)),
                "deliveries": deliv_by_sec[t],
            })
        })
        .collect();

    // Processes and Redis nodes per phase.
    let procs = procs.lock().unwrap().clone();
    let nodes = nodes.lock().unwrap().clone();
    let at_s = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let bounds: Vec<(f64, f64)> = (0..nphases)
        .map(|k| {
            (
                at_s(phase_starts[k]),
                phase_starts
                    .get(k + 1)
                    .map_or(at_s(drive_end), |t| at_s(*t)),
            )
        })
        .collect();
    let proc_phase = |k: usize| -> Value {
        let (a, b) = bounds[k];
        let mut out = serde_json::Map::new();
        for (name, samples) in &procs {
            let inside: Vec<&ProcSample> = samples
                .iter()
                .filter(|s| s.t >= a && s.t <= b && s.rss_kib > 0)
                .collect();
            let (Some(first), Some(last)) = (inside.first(), inside.last()) else {
                continue;
            };
            let span = last.t - first.t;
            out.insert(
                name.clone(),
                json!({
                    "rss_kib_max": inside.iter().map(|s| s.rss_kib).max(),
                    "rss_kib_end": last.rss_kib,
                    "cpu_percent": if span > 0.0 { finite(100.0 * (last.cpu_s - first.cpu_s) / span) } else { Value::Null },
                }),
            );
        }
        Value::Object(out)
    };
    let redis_phase = |k: usize| -> Value {
        let (a, b) = bounds[k];
        let mut out = serde_json::Map::new();
        for (port, samples) in &nodes {
            let inside: Vec<&RedisSample> =
                samples.iter().filter(|s| s.t >= a && s.t <= b).collect();
            let (Some(first), Some(last)) = (inside.first(), inside.last()) else {
                out.insert(port.clone(), json!({"down": true}));
                continue;
            };
            let span = last.t - first.t;
            // A restarted node counts from zero again.
            let ops = last
                .commands
                .checked_sub(first.commands)
                .unwrap_or(last.commands);
            out.insert(
                port.clone(),
                json!({
                    "role": last.role,
                    "connected_clients": last.clients,
                    "ops_per_s": if span > 0.0 { finite(ops as f64 / span) } else { Value::Null },
                    "cpu_percent": if span > 0.0 && last.cpu_s >= first.cpu_s { finite(100.0 * (last.cpu_s - first.cpu_s) / span) } else { Value::Null },
                    "rss_kib": last.rss_kib,
                }),
            );
        }
        Value::Object(out)
    };
    let phases: Vec<Value> = (0..nphases)
        .map(|k| {
            let mut l = acc[k].latencies.clone();
            l.sort_by(f64::total_cmp);
            let mut to_log = acc[k].to_log.clone();
            to_log.sort_by(f64::total_cmp);
            json!({
                "name": phase_names[k],
                "from_s": bounds[k].0,
                "to_s": bounds[k].1,
                "changes": acc[k].changes,
                "deliveries": l.len(),
                "latency_p50_ms": finite(percentile(&l, 0.5)),
                "latency_p99_ms": finite(percentile(&l, 0.99)),
                "latency_max_ms": finite(l.last().copied().unwrap_or(f64::NAN)),
                "change_to_log_p50_ms": finite(percentile(&to_log, 0.5)),
                "change_to_log_p99_ms": finite(percentile(&to_log, 0.99)),
                "lost": acc[k].lost,
                "repeated": acc[k].repeated,
                "out_of_order": acc[k].out_of_order,
                "reconnects": acc[k].reconnects,
                "resyncs": acc[k].resyncs,
                "processes": proc_phase(k),
                "redis_nodes": redis_phase(k),
            })
        })
        .collect();

    // Memory per web replica per 1,000 streams and per gateway per 100 guilds (steady).
    let mut guilds_per_shard = vec![0u64; SHARDS as usize];
    for s in &shard_of {
        guilds_per_shard[*s as usize] += 1;
    }
    // The two seeded guilds the bot is in count too.
    for g in [
        coven::sim::defaults::GUILD_ID,
        coven::sim::defaults::NIGHT_OWLS_GUILD_ID,
    ] {
        guilds_per_shard[((g >> 22) % SHARDS) as usize] += 1;
    }
    let steady_rss_of = |n: &str| steady_rss.iter().find(|(m, _)| m == n).map_or(0, |x| x.1);
    let web_mem: Vec<Value> = (0..ports.len())
        .map(|r| {
            let name = format!("web-{r}");
            let rss = steady_rss_of(&name);
            json!({
                "replica": name,
                "streams": web_streams[r],
                "rss_kib_idle": web_idle[r],
                "rss_kib_streams": rss,
                "kib_per_1000_streams": finite((rss as f64 - web_idle[r] as f64) / web_streams[r].max(1) as f64 * 1000.0),
                "rss_kib_per_1000_streams_whole": finite(rss as f64 / web_streams[r].max(1) as f64 * 1000.0),
            })
        })
        .collect();
    // The added gateway's first sample: a process holding no shard yet.
    let standby = procs
        .get("gateway-d")
        .and_then(|v| v.iter().find(|s| s.rss_kib > 0))
        .map_or(0, |s| s.rss_kib);
    let gw_mem: Vec<Value> = steady_holding
        .iter()
        .map(|(name, shards)| {
            let guilds: u64 = shards.iter().map(|s| guilds_per_shard[*s as usize]).sum();
            let rss = steady_rss_of(name);
            json!({
                "gateway": name,
                "shards": shards,
                "guilds": guilds,
                "rss_kib": rss,
                "rss_kib_per_100_guilds": finite(rss as f64 / guilds.max(1) as f64 * 100.0),
                "standby_rss_kib": standby,
                "kib_per_100_guilds_above_standby": finite((rss as f64 - standby as f64) / guilds.max(1) as f64 * 100.0),
            })
        })
        .collect();

    // The figures.
    let lost: u64 = acc.iter().map(|a| a.lost).sum();
    let repeated: u64 = acc.iter().map(|a| a.repeated).sum();
    let disordered: u64 = acc.iter().map(|a| a.out_of_order).sum();
    let p99_out = percentile(&outside, 0.99);
    let worst_back = backs.iter().map(|b| b.1).fold(f64::NAN, f64::max);
    let backs_ok = backs
        .iter()
        .all(|b| b.1.is_finite() && b.1 <= BACK_TARGET_S);
    let figures = json!([
        {"figure": "lost", "value": lost, "target": 0, "met": lost == 0},
        {"figure": "repeated", "value": repeated, "target": 0, "met": repeated == 0},
        {"figure": "out of order (events)", "value": disordered, "target": 0, "met": disordered == 0},
        {"figure": "voice changes the simulator took that are not in the log", "value": not_logged, "target": 0, "met": not_logged == 0},
        {"figure": "latency p99 outside fault windows (ms)", "value": finite(p99_out), "target": P99_TARGET_MS, "met": p99_out < P99_TARGET_MS},
        {"figure": "delivery back after each fault, worst (s)", "value": finite(worst_back), "target": BACK_TARGET_S, "met": backs_ok},
    ]);
    let fault_json: Vec<Value> = faults
        .iter()
        .zip(&backs)
        .zip(&windows)
        .zip(&backs_others)
        .zip(&stalls)
        .map(|((((f, b), w), o), st)| {
            json!({
                "name": f.name,
                "detail": f.detail,
                "at_s": at_s(f.at),
                "affected_streams": f.affected.len(),
                "streams_measured": b.2,
                "delivery_back_p50_s": finite(b.0),
                "delivery_back_max_s": finite(b.1),
                "other_streams_measured": o.2,
                "other_streams_delivery_back_p50_s": finite(o.0),
                "other_streams_delivery_back_max_s": finite(o.1),
                "change_to_log_max_ms_affected_guilds": finite(st.0),
                "change_to_log_max_ms_other_guilds": finite(st.1),
                "window_s": [at_s(w.0), at_s(w.1)],
            })
        })
        .collect();
    let mut proc_series = serde_json::Map::new();
    for (name, samples) in &procs {
        proc_series.insert(name.clone(), serde_json::to_value(samples).unwrap());
    }
    let mut node_series = serde_json::Map::new();
    for (port, samples) in &nodes {
        node_series.insert(port.clone(), serde_json::to_value(samples).unwrap());
    }
    let report = json!({
        "what": "coven scale run (benches/scale.rs, scripts/scale.sh)",
        "machine": {"cores": cores, "note": "one machine, shared with other work while it ran: every process (sim, 6 Redis nodes, gateways, replicas, this load generator) on the same cores"},
        "settings": {
            "seconds": args.seconds, "phase_s": phase_len.as_secs(), "clients": clients.len(),
            "watched_guilds": watched, "busy_guilds": BUSY, "guilds": 1000, "shards": SHARDS,
            "rate_per_s": args.rate, "busy_share": BUSY_SHARE, "gateway_lease_ttl_s": args.lease_ttl,
            "late_ms": ms(LATE), "window_margin_s": WINDOW_MARGIN.as_secs(),
        },
        "totals": {
            "changes_asked": changes_by_guild.iter().map(Vec::len).sum::<usize>(),
            "changes_refused_by_sim": failed_calls,
            "changes_on_watched_guilds": changes_total,
            "voice_events_in_watched_logs": voice_in_log,
            "not_in_log": not_logged,
            "deliveries": deliveries.len(),
            "latency_p50_ms": finite(percentile(&all_lat, 0.5)),
            "latency_p99_ms": finite(percentile(&all_lat, 0.99)),
            "latency_p99_outside_fault_windows_ms": finite(p99_out),
            "lost": lost, "repeated": repeated, "out_of_order": disordered,
            "streams_out_of_order": streams_out_of_order,
            "ids_read_not_in_log": unknown_ids,
            "refused_opens_busy_guild_streams": seen.iter().zip(&clients).filter(|(_, c)| c.guild < BUSY).map(|(s, _)| s.refused).sum::<u64>(),
            "refused_opens_quiet_guild_streams": seen.iter().zip(&clients).filter(|(_, c)| c.guild >= BUSY).map(|(s, _)| s.refused).sum::<u64>(),
        },
        "figures": figures,
        "faults": fault_json,
        "phases": phases,
        "memory": {"web": web_mem, "gateway": gw_mem, "rss_kib_at_end": end_rss.iter().map(|(n, r)| json!({"process": n, "rss_kib": r})).collect::<Vec<_>>()},
        "series": {"per_second": series, "processes": proc_series, "redis_nodes": node_series},
    });
    std::fs::create_dir_all(&args.out).unwrap();
    let json_path = args.out.join("scale-run.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    let svg_path = args.out.join("scale-run.svg");
    draw(&report, &svg_path);

    // The summary.
    println!("\n## per phase");
    println!(
        "| phase | changes | deliveries | p50 ms | p99 ms | lost | repeated | out of order | reconnects | resyncs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for p in &phases {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            p["name"].as_str().unwrap(),
            p["changes"],
            p["deliveries"],
            p["latency_p50_ms"].as_f64().unwrap_or(f64::NAN),
            p["latency_p99_ms"].as_f64().unwrap_or(f64::NAN),
            p["lost"],
            p["repeated"],
            p["out_of_order"],
            p["reconnects"],
            p["resyncs"],
        );
    }
    println!("\n## faults");
    for f in &fault_json {
        println!(
            "  {} at {:.1} s ({}): {} streams affected, {} measured; delivery back p50 {:.2} s, max {:.2} s; window until {:.1} s; the other streams: {} measured, p50 {:.2} s, max {:.2} s; slowest change-to-log in the 10 s after: {:.0} ms (affected guilds), {:.0} ms (others)",
            f["name"].as_str().unwrap(),
            f["at_s"].as_f64().unwrap(),
            f["detail"].as_str().unwrap(),
            f["affected_streams"],
            f["streams_measured"],
            f["delivery_back_p50_s"].as_f64().unwrap_or(f64::NAN),
            f["delivery_back_max_s"].as_f64().unwrap_or(f64::NAN),
            f["window_s"][1].as_f64().unwrap_or(f64::NAN),
            f["other_streams_measured"],
            f["other_streams_delivery_back_p50_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            f["other_streams_delivery_back_max_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            f["change_to_log_max_ms_affected_guilds"]
                .as_f64()
                .unwrap_or(f64::NAN),
            f["change_to_log_max_ms_other_guilds"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    println!("\n## memory (end of the steady phase)");
    for w in &web_mem {
        println!(
            "  {}: {} streams, RSS {} KiB idle → {} KiB: {:.0} KiB per 1,000 streams ({:.0} KiB whole RSS per 1,000)",
            w["replica"].as_str().unwrap(),
            w["streams"],
            w["rss_kib_idle"],
            w["rss_kib_streams"],
            w["kib_per_1000_streams"].as_f64().unwrap_or(f64::NAN),
            w["rss_kib_per_1000_streams_whole"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    for g in &gw_mem {
        println!(
            "  {}: shards {}, {} guilds, RSS {} KiB: {:.0} KiB per 100 guilds ({:.0} KiB above a standby gateway's {} KiB)",
            g["gateway"].as_str().unwrap(),
            g["shards"],
            g["guilds"],
            g["rss_kib"],
            g["rss_kib_per_100_guilds"].as_f64().unwrap_or(f64::NAN),
            g["kib_per_100_guilds_above_standby"]
                .as_f64()
                .unwrap_or(f64::NAN),
            g["standby_rss_kib"],
        );
    }
    println!(
        "\n## figures ({} changes asked, {} refused by the sim; {} deliveries; {} ids read that no log holds)",
        report["totals"]["changes_asked"],
        failed_calls,
        deliveries.len(),
        unknown_ids
    );
    println!("  0 lost: {lost} ({})", met(lost == 0));
    println!("  0 repeated: {repeated} ({})", met(repeated == 0));
    println!(
        "  order kept per guild: {disordered} events out of order on {streams_out_of_order} streams ({})",
        met(disordered == 0)
    );
    println!(
        "  every change the sim took is in the log: {not_logged} missing ({})",
        met(not_logged == 0)
    );
    println!(
        "  p99 under {P99_TARGET_MS} ms outside fault windows: {p99_out:.0} ms over {} deliveries ({})",
        outside.len(),
        met(p99_out < P99_TARGET_MS)
    );
    println!(
        "  delivery back within {BACK_TARGET_S} s of each fault: worst {worst_back:.2} s ({})",
        met(backs_ok)
    );
    println!("  wrote {} and {}", json_path.display(), svg_path.display());
    // The processes stop as `d` and the cluster drop.
    drop(d);
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn events_key(guild: u64) -> String {
    format!("{PREFIX}:{{{guild}}}:events")
}

fn slot_of(guild: u64) -> u16 {
    harness::cluster::slot(&events_key(guild))
}

// ---------------------------------------------------------------------------------------
// The picture

fn draw(report: &Value, path: &std::path::Path) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1200, 1500)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let (top, rest) = root.split_vertically(420);
    let (mid, rest) = rest.split_vertically(360);
    let (mem, bottom) = rest.split_vertically(400);
    let series = report["series"]["per_second"].as_array().unwrap();
    let faults = report["faults"].as_array().unwrap();
    let tmax = series.len() as f64;
    let font = ("sans-serif", 16).into_font();
    let small = ("sans-serif", 13).into_font();

    // Latency, log scale: a fault's seconds and a steady tens of ms on one axis.
    let lat_max = series
        .iter()
        .filter_map(|s| s["latency_p99_ms"].as_f64())
        .fold(1000.0, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Discord-to-browser latency per second (changes made in that second)",
            font.clone(),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, (1f64..lat_max * 3.0).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("ms")
        .label_style(small.clone())
        .draw()
        .unwrap();
    let line = |key: &'static str| {
        series
            .iter()
            .filter_map(move |s| Some((s["t"].as_f64()?, s[key].as_f64()?.max(1.0))))
            .collect::<Vec<_>>()
    };
    chart
        .draw_series(LineSeries::new(
            line("latency_p50_ms"),
            BLUE.stroke_width(2),
        ))
        .unwrap()
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(line("latency_p99_ms"), RED.stroke_width(2)))
        .unwrap()
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, P99_TARGET_MS), (tmax, P99_TARGET_MS)],
            RED.mix(0.4).stroke_width(1),
        ))
        .unwrap()
        .label("p99 target 500 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.4)));
    for (k, f) in faults.iter().enumerate() {
        let at = f["at_s"].as_f64().unwrap();
        chart
            .draw_series(LineSeries::new(
                vec![(at, 1.0), (at, lat_max * 3.0)],
                BLACK.mix(0.6).stroke_width(1),
            ))
            .unwrap();
        let y = lat_max * 2.4 / 2f64.powi(k as i32 % 3);
        chart
            .draw_series(std::iter::once(Text::new(
                f["name"].as_str().unwrap().to_owned(),
                (at + 1.0, y),
                small.clone(),
            )))
            .unwrap();
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(small.clone())
        .draw()
        .unwrap();

    // Deliveries per second.
    let dmax = series
        .iter()
        .filter_map(|s| s["deliveries"].as_f64())
        .fold(10.0, f64::max);
    let mut chart = ChartBuilder::on(&mid)
        .caption(
            "Deliveries per second (events read by all streams)",
            font.clone(),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..dmax * 1.1)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds")
        .label_style(small.clone())
        .draw()
        .unwrap();
    chart
        .draw_series(LineSeries::new(
            series
                .iter()
                .filter_map(|s| Some((s["t"].as_f64()?, s["deliveries"].as_f64()?))),
            GREEN.stroke_width(2),
        ))
        .unwrap();
    for f in faults {
        let at = f["at_s"].as_f64().unwrap();
        chart
            .draw_series(LineSeries::new(
                vec![(at, 0.0), (at, dmax * 1.1)],
                BLACK.mix(0.6).stroke_width(1),
            ))
            .unwrap();
        chart
            .draw_series(std::iter::once(Text::new(
                f["name"].as_str().unwrap().to_owned(),
                (at + 1.0, dmax * 1.05),
                small.clone(),
            )))
            .unwrap();
    }

    // Memory per process.
    let procs = report["series"]["processes"].as_object().unwrap();
    let mmax = procs
        .values()
        .flat_map(|v| v.as_array().unwrap())
        .filter_map(|s| s["rss_kib"].as_f64())
        .fold(1.0, f64::max)
        / 1024.0;
    let mut chart = ChartBuilder::on(&mem)
        .caption("Resident memory per process (MiB)", font.clone())
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..mmax * 1.6)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .label_style(small.clone())
        .draw()
        .unwrap();
    for (k, (name, samples)) in procs.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                samples
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| s["rss_kib"].as_f64() > Some(0.0))
                    .filter_map(|s| Some((s["t"].as_f64()?, s["rss_kib"].as_f64()? / 1024.0))),
                color.stroke_width(2),
            ))
            .unwrap()
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    for f in faults {
        let at = f["at_s"].as_f64().unwrap();
        chart
            .draw_series(LineSeries::new(
                vec![(at, 0.0), (at, mmax * 1.6)],
                BLACK.mix(0.3).stroke_width(1),
            ))
            .unwrap();
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(small.clone())
        .draw()
        .unwrap();

    // Lost and repeated per phase, as bars (with their numbers, zeros included).
    let phases = report["phases"].as_array().unwrap();
    let vmax = phases
        .iter()
        .flat_map(|p| {
            [
                p["lost"].as_f64(),
                p["repeated"].as_f64(),
                p["out_of_order"].as_f64(),
            ]
        })
        .flatten()
        .fold(1.0, f64::max);
    let n = phases.len() as f64;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            "Lost / repeated / out of order per phase (against the guilds' logs; target 0)",
            font,
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..vmax * 1.3)
        .unwrap();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .label_style(small.clone())
        .draw()
        .unwrap();
    let kinds = [("lost", RED), ("repeated", BLUE), ("out_of_order", MAGENTA)];
    for (k, p) in phases.iter().enumerate() {
        for (j, (key, color)) in kinds.iter().enumerate() {
            let v = p[*key].as_f64().unwrap_or(0.0);
            let x0 = k as f64 + 0.15 + j as f64 * 0.23;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.2, v)],
                    color.filled(),
                )))
                .unwrap();
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:.0}"),
                    (x0 + 0.05, v + vmax * 0.05),
                    small.clone(),
                )))
                .unwrap();
        }
        chart
            .draw_series(std::iter::once(Text::new(
                p["name"].as_str().unwrap().to_owned(),
                (k as f64 + 0.1, -vmax * 0.08),
                small.clone(),
            )))
            .unwrap();
    }
    for (key, color) in kinds {
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .unwrap()
            .label(key)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(small)
        .draw()
        .unwrap();
    root.present().unwrap();
}
