//! Communities benchmark: the figures of issue 21 ("many guilds"), each measured on real
//! processes over real sockets.
//!
//! Every figure starts its own deployment: a private `redis-server` on a free port, the
//! simulator (`coven sim`, with `SIM_GUILDS` generated guilds), one `coven gateway` and one
//! `coven web` replica, all this build's release-built binary. This process is the load
//! generator: people are made and put in guilds through the simulator's control API (a
//! user accepting an invite, `PUT /_sim/guilds/{g}/members/{user}`), logged in through the
//! replica's real OAuth2 flow (`sim_user`, as the tests do), and then stream or load pages.
//!
//! `cargo bench --bench communities` runs the three figures; `-- memory`, `-- picker` or
//! `-- rest` runs one.
//!   memory  A replica with streams on 3 of 1,000 guilds holds Redis subscriptions for 3
//!           guilds and no per-guild state for the rest; its RSS is within 10% of a
//!           replica serving one guild (`DISCORD_GUILD_ID` set) with the same streams.
//!           `--streams N` (default 300) streams in all.
//!   picker  `/` renders in under 50 ms at p99 for a person in 200 guilds (their guild
//!           list cached). `--loads N` (default 300).
//!   rest    Bot REST requests per second with 1,000 people viewing pages across 10
//!           guilds: near zero (membership is asked with the people's own tokens).
//!           `--seconds N` (default 60; the figure is over 300), `--people N`
//!           (default 1,000), `--think S` (default 5: each person loads a page, then
//!           waits S seconds).
//!
//! The simulator counts REST requests by the credentials they carried (`/_sim/state`'s
//! `rest.requests`: `bot`, `bearer`, `other`), so the bot's share is read, not guessed.

// A benchmark that cannot set itself up has nothing to measure: it may stop there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Logging in through the simulator, shared by the benchmarks.
#[path = "support/login.rs"]
mod login;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_coven");
const PREFIX: &str = "coven";
const BOT_TOKEN: &str = "sim-bot-token";
const CLIENT_ID: &str = "1190000000000000002";
const CLIENT_SECRET: &str = "sim-client-secret";

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

/// Resident set of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn log_level() -> String {
    std::env::var("COMMUNITIES_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned())
}

/// The simulated generated guild `n` (from 0), as `coven sim` numbers them.
fn generated(n: u32) -> String {
    coven::sim::defaults::generated_guild_id(n).to_string()
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

/// Redis, the simulator and a gateway; replicas are started on it.
// Fields drop in order: the gateway before the simulator and Redis it talks to.
struct Deployment {
    gateway: Option<Proc>,
    _sim: Proc,
    _redis: Proc,
    redis_port: u16,
    sim_url: String,
    http: reqwest::Client,
}

struct Web {
    proc: Proc,
    port: u16,
}

impl Web {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }
}

impl Deployment {
    /// Redis, `coven sim` with `guilds` generated guilds, and a gateway serving every
    /// guild the bot is in; returns once the registry holds them all.
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
                // Logging a thousand people in is a thousand code exchanges from one
                // web app; Discord publishes no fixed limit for the token endpoint.
                .env("SIM_TOKEN_RATE_LIMIT", "10000")
                .env("RUST_LOG", log_level())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        wait_port(sim_port);
        let sim_url = format!("http://127.0.0.1:{sim_port}");
        let mut d = Self {
            gateway: None,
            _sim: sim,
            _redis: redis,
            redis_port,
            sim_url,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
        };
        d.gateway = Some(Proc(
            Command::new(BIN)
                .arg("gateway")
                .env("BIND", "127.0.0.1:0")
                .env("METRICS_BIND", format!("127.0.0.1:{}", free_port()))
                .env("REDIS_URL", d.redis_url())
                .env("DISCORD_BOT_TOKEN", BOT_TOKEN)
                .env("DISCORD_GATEWAY_URL", d.sim_url.replace("http://", "ws://"))
                .env("DISCORD_API_URL", format!("{}/api", d.sim_url))
                .env("RUST_LOG", log_level())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        ));
        // The bot is in two seeded guilds and every generated one.
        let want = u64::from(guilds) + 2;
        let started = Instant::now();
        loop {
            let have: u64 = d
                .redis(&["HLEN", &format!("{PREFIX}:guilds")])
                .trim()
                .parse()
                .unwrap_or(0);
            if have >= want {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "the gateway registered {have} of {want} guilds"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "    deployment up: {want} guilds registered by the gateway in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        d
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    /// A command through `redis-cli`, its output.
    fn redis(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The shard channels someone is subscribed to, without the deployment-wide control
    /// channel; and whether that one was there.
    fn shard_channels(&self) -> (Vec<String>, bool) {
        let control = format!("{PREFIX}:control");
        let all: Vec<String> = self
            .redis(&["PUBSUB", "SHARDCHANNELS"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let had_control = all.contains(&control);
        (
            all.into_iter().filter(|c| *c != control).collect(),
            had_control,
        )
    }

    /// A replica; `guild` sets `DISCORD_GUILD_ID` (one guild), else it serves every one.
    async fn web(&self, guild: Option<&str>) -> Web {
        let port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.arg("web")
            .env("BIND", format!("127.0.0.1:{port}"))
            .env("METRICS_BIND", format!("127.0.0.1:{}", free_port()))
            .env("PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env("REDIS_URL", self.redis_url())
            .env("DISCORD_BOT_TOKEN", BOT_TOKEN)
            .env("DISCORD_CLIENT_ID", CLIENT_ID)
            .env("DISCORD_CLIENT_SECRET", CLIENT_SECRET)
            .env("DISCORD_API_URL", format!("{}/api", self.sim_url))
            .env("DISCORD_OAUTH_URL", &self.sim_url)
            .env("INVITE_SECRET", "bench-invite-secret-0123456789abcdef")
            // One logged-in session may hold every stream of the load generator.
            .env("STREAM_MAX_PER_USER", "100000")
            .env("RUST_LOG", log_level())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(g) = guild {
            cmd.env("DISCORD_GUILD_ID", g);
        }
        let web = Web {
            proc: Proc(cmd.spawn().unwrap()),
            port,
        };
        wait_port(port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.http.get(web.url("/readyz")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        web
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

    /// REST requests the simulator has served so far: (bot, bearer, other).
    async fn rest_requests(&self) -> (u64, u64, u64) {
        let state = self.sim_state(None).await;
        let r = &state["rest"]["requests"];
        let n = |k: &str| {
            r[k].as_u64()
                .expect("the sim counts REST requests by caller")
        };
        (n("bot"), n("bearer"), n("other"))
    }

    /// The id of the user named `username` in `guild`.
    async fn user_in(&self, guild: &str, username: &str) -> String {
        let state = self.sim_state(Some(guild)).await;
        state["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["username"] == username)
            .and_then(|u| u["id"].as_str())
            .unwrap_or_else(|| panic!("no user {username} in guild {guild}"))
            .to_owned()
    }

    /// A new simulated person, in no guild yet.
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

    /// `user` accepts an invite to `guild`.
    async fn join(&self, guild: &str, user: &str) {
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

    /// Logs `user` in on `web` through the real OAuth2 flow; returns the session cookie.
    async fn login(&self, web: &Web, user: &str) -> String {
        login::session_cookie(&self.http, &web.url(""), user)
            .await
            .expect("a login")
    }

    async fn healthz(&self, web: &Web) -> Value {
        self.http
            .get(web.url("/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// Open SSE streams, read (and thrown away) until `done`.
struct Streams {
    opened: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    done: CancellationToken,
}

impl Streams {
    fn new() -> Self {
        Self {
            opened: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            done: CancellationToken::new(),
        }
    }

    /// Opens `count` streams of `guild` on `web` as the session `cookie`.
    fn open(&self, web: &Web, cookie: &str, guild: &str, count: usize) {
        let head: Arc<str> = format!(
            "GET /api/stream?guild={guild} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .into();
        let gate = Arc::new(Semaphore::new(64));
        for _ in 0..count {
            let (head, gate, port) = (head.clone(), gate.clone(), web.port);
            let (opened, refused, done) =
                (self.opened.clone(), self.refused.clone(), self.done.clone());
            tokio::spawn(async move {
                let mut permit = Some(gate.acquire_owned().await);
                let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if conn.write_all(head.as_bytes()).await.is_err() {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let mut buf = vec![0u8; 16 * 1024];
                let mut first = true;
                loop {
                    let n = tokio::select! {
                        r = conn.read(&mut buf) => r.unwrap_or(0),
                        () = done.cancelled() => return,
                    };
                    if n == 0 {
                        if first {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    if first {
                        first = false;
                        // The permit only paces connection setup.
                        permit.take();
                        if buf.starts_with(b"HTTP/1.1 200") {
                            opened.fetch_add(1, Ordering::Relaxed);
                        } else {
                            refused.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
    }

    async fn wait(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.opened.load(Ordering::Relaxed) + self.refused.load(Ordering::Relaxed) < count {
            assert!(Instant::now() < deadline, "streams did not all open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let refused = self.refused.load(Ordering::Relaxed);
        assert_eq!(refused, 0, "{refused} streams were refused");
    }
}

/// What one replica measured with its streams open.
struct Holding {
    rss_idle: u64,
    rss_open: u64,
    channels: Vec<String>,
    control: bool,
    health: Value,
}

/// Opens `streams` streams split over `guilds` (each as its own host) on `web`.
async fn hold(d: &Deployment, web: &Web, guilds: &[String], streams: usize) -> (Holding, Streams) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_kib(web.pid());
    let s = Streams::new();
    for (i, g) in guilds.iter().enumerate() {
        // Generated guild n's host is `g{n}.host`.
        let n = (g.parse::<u64>().unwrap() - coven::sim::defaults::GENERATED_GUILD_BASE) >> 22;
        let host = d.user_in(g, &format!("g{n}.host")).await;
        let cookie = d.login(web, &host).await;
        let share = streams / guilds.len() + usize::from(i < streams % guilds.len());
        s.open(web, &cookie, g, share);
    }
    s.wait(streams as u64).await;
    // Let the replica settle, then look.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss_kib(web.pid());
    let (channels, control) = d.shard_channels();
    let health = d.healthz(web).await;
    (
        Holding {
            rss_idle,
            rss_open,
            channels,
            control,
            health,
        },
        s,
    )
}

fn print_holding(what: &str, h: &Holding) {
    println!(
        "    {what}: RSS {} KiB idle → {} KiB with streams; healthz streams {}, communities_watched {}; shard channels held (without {PREFIX}:control{}): {} {:?}",
        h.rss_idle,
        h.rss_open,
        h.health["streams"],
        h.health["communities_watched"],
        if h.control {
            ", which is held"
        } else {
            ", not held"
        },
        h.channels.len(),
        h.channels,
    );
}

async fn memory(streams: usize) {
    println!(
        "memory: {streams} streams on 3 of 1,000 generated guilds vs on the one guild of a single-guild replica"
    );
    let three: Vec<String> = (0..3).map(generated).collect();
    // Each replica in a deployment of its own (Redis, the sim with 1,000 generated guilds
    // and a gateway serving them all), so each is its deployment's only replica and holds
    // the room sweeper's lease, as a lone replica does.
    let measure = async |what: &str, only: Option<&str>, on: &[String]| {
        let d = Deployment::start(1_000).await;
        let web = d.web(only).await;
        let (h, s) = hold(&d, &web, on, streams).await;
        print_holding(what, &h);
        s.done.cancel();
        h
    };
    let many = measure("replica serving every guild, streams on 3", None, &three).await;
    let one = measure(
        "replica with DISCORD_GUILD_ID set, streams on it",
        Some(&three[0]),
        &three[..1],
    )
    .await;
    // Where a gap comes from: the same streams on one guild of the replica serving all.
    let many_one = measure(
        "replica serving every guild, streams on 1",
        None,
        &three[..1],
    )
    .await;
    let want: std::collections::BTreeSet<String> = three
        .iter()
        .map(|g| format!("{PREFIX}:{{{g}}}:events"))
        .collect();
    let held: std::collections::BTreeSet<String> = many.channels.iter().cloned().collect();
    let _ = &many_one;
    let subscriptions_ok = many.channels.len() == 3 && held == want;
    let watched_ok = many.health["communities_watched"] == 3;
    let ratio = many.rss_open as f64 / one.rss_open.max(1) as f64;
    println!(
        "  subscriptions for exactly the 3 streamed guilds: {} ({} shard channels; wanted {:?})",
        met(subscriptions_ok),
        many.channels.len(),
        want
    );
    println!(
        "  per-guild state for the 3 only (communities_watched {}): {}",
        many.health["communities_watched"],
        met(watched_ok)
    );
    println!(
        "  RSS of the 1,000-guild replica / the one-guild replica, same {streams} streams: {} / {} KiB = {:.3} (target ≤ 1.10): {}",
        many.rss_open,
        one.rss_open,
        ratio,
        met(ratio <= 1.10)
    );
    println!(
        "  (apart: the 1,000-guild replica with the streams on 1 guild / the one-guild replica = {:.3}; growth with the streams {} KiB on 3 guilds, {} KiB on 1 guild of 1,000, {} KiB on the only guild)",
        many_one.rss_open as f64 / one.rss_open.max(1) as f64,
        many.rss_open.saturating_sub(many.rss_idle),
        many_one.rss_open.saturating_sub(many_one.rss_idle),
        one.rss_open.saturating_sub(one.rss_idle),
    );
}

async fn picker(loads: usize) {
    const GUILDS: u32 = 200;
    println!("picker: `/` for a person in {GUILDS} guilds where the bot is, {loads} loads");
    let d = Deployment::start(GUILDS).await;
    let person = d.new_person("bench.picker").await;
    for n in 0..GUILDS {
        d.join(&generated(n), &person).await;
    }
    let web = d.web(None).await;
    let cookie = d.login(&web, &person).await;
    let load = || async {
        let started = Instant::now();
        let r = d
            .http
            .get(web.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        (started.elapsed(), status, body)
    };
    let (first, status, body) = load().await;
    assert_eq!(status, 200, "the picker answers");
    let listed = (0..GUILDS)
        .filter(|n| {
            body.contains(&format!("/g/{}/", generated(*n)))
                || body.contains(&format!("/g/{}\"", generated(*n)))
        })
        .count();
    println!(
        "    first load (fills the session's guild list): {:.1} ms; the page links {listed} of the {GUILDS} guilds ({} bytes)",
        first.as_secs_f64() * 1e3,
        body.len()
    );
    let before = d.rest_requests().await;
    let mut times = Vec::with_capacity(loads);
    for _ in 0..loads {
        let (took, status, _) = load().await;
        assert_eq!(status, 200);
        times.push(took);
    }
    let after = d.rest_requests().await;
    times.sort_unstable();
    let p99 = percentile(&times, 0.99);
    println!(
        "    {loads} loads: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; REST requests meanwhile: bot {}, bearer {}",
        percentile(&times, 0.5),
        p99,
        percentile(&times, 1.0),
        after.0 - before.0,
        after.1 - before.1,
    );
    println!("  picker p99 under 50 ms: {}", met(p99 < 50.0));
}

async fn rest(people: usize, seconds: u64, think: f64) {
    const GUILDS: u32 = 10;
    println!(
        "rest: {people} people across {GUILDS} guilds loading their guild's rooms page every {think} s for {seconds} s"
    );
    let d = Arc::new(Deployment::start(GUILDS).await);
    let web = Arc::new(d.web(None).await);
    let setup = Instant::now();
    let mut who = Vec::with_capacity(people);
    for i in 0..people {
        let g = generated(i as u32 % GUILDS);
        let person = d.new_person(&format!("bench.p{i}")).await;
        d.join(&g, &person).await;
        who.push((g, person));
    }
    let before_login = d.rest_requests().await;
    let logins = Instant::now();
    let sessions = Arc::new(Mutex::new(Vec::with_capacity(people)));
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for (g, person) in who {
        let (d, web, gate, sessions) = (d.clone(), web.clone(), gate.clone(), sessions.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let cookie = d.login(&web, &person).await;
            sessions.lock().await.push((g, cookie));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after_login = d.rest_requests().await;
    println!(
        "    {people} people made and logged in ({:.1} s; logins {:.1} s): REST during the logins: bot {}, bearer {}, other {}",
        setup.elapsed().as_secs_f64(),
        logins.elapsed().as_secs_f64(),
        after_login.0 - before_login.0,
        after_login.1 - before_login.1,
        after_login.2 - before_login.2,
    );
    let sessions = std::mem::take(&mut *sessions.lock().await);
    let done = CancellationToken::new();
    let pages = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let before = d.rest_requests().await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (g, cookie)) in sessions.into_iter().enumerate() {
        let (d, web, done) = (d.clone(), web.clone(), done.clone());
        let (pages, failed, times) = (pages.clone(), failed.clone(), times.clone());
        // Spread the first loads over one think time.
        let offset = Duration::from_secs_f64(think * i as f64 / people as f64);
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(offset) => {}
                () = done.cancelled() => return,
            }
            let url = web.url(&format!("/g/{g}/rooms"));
            loop {
                let at = Instant::now();
                match d.http.get(&url).header("cookie", &cookie).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        pages.fetch_add(1, Ordering::Relaxed);
                        times.lock().unwrap().push(at.elapsed());
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let wait = Duration::from_secs_f64(think).saturating_sub(at.elapsed());
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = done.cancelled() => return,
                }
            }
        }));
    }
    let mut last = (before, Instant::now());
    for s in 1..=seconds {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            started + Duration::from_secs(s),
        ))
        .await;
        if s % 30 == 0 || s == seconds {
            let now = d.rest_requests().await;
            let span = last.1.elapsed().as_secs_f64();
            println!(
                "    at {s:>4} s: {} pages so far; last {:.0} s: bot {:.2}/s, bearer {:.2}/s",
                pages.load(Ordering::Relaxed),
                span,
                (now.0 - last.0.0) as f64 / span,
                (now.1 - last.0.1) as f64 / span,
            );
            last = (now, Instant::now());
        }
    }
    let after = d.rest_requests().await;
    let took = started.elapsed().as_secs_f64();
    done.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let mut times = std::mem::take(&mut *times.lock().unwrap());
    times.sort_unstable();
    let (bot, bearer) = (
        (after.0 - before.0) as f64 / took,
        (after.1 - before.1) as f64 / took,
    );
    println!(
        "    {} pages in {took:.0} s ({:.0}/s), {} failed; page p50 {:.1} ms, p99 {:.1} ms",
        pages.load(Ordering::Relaxed),
        pages.load(Ordering::Relaxed) as f64 / took,
        failed.load(Ordering::Relaxed),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
    );
    println!(
        "    REST requests over the {took:.0} s: bot {} ({bot:.3}/s), people's bearer tokens {} ({bearer:.2}/s), other {}",
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
    );
    // "Near zero": under one bot request every ten seconds (the bot's budget is 50/s).
    println!(
        "  bot REST requests per second near zero (< 0.1/s) while people view pages: {}",
        met(bot < 0.1)
    );
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
        .filter(|a| matches!(*a, "memory" | "picker" | "rest"))
        .collect();
    let runs = |name: &str| only.is_empty() || only.contains(&name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "communities benchmark: release-built redis-server, `coven sim`, `coven gateway` and one `coven web` per figure, with this load generator, on one machine ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    runtime.block_on(async {
        if runs("memory") {
            memory(flag(&args, "--streams", 300)).await;
        }
        if runs("picker") {
            picker(flag(&args, "--loads", 300)).await;
        }
        if runs("rest") {
            rest(
                flag(&args, "--people", 1_000),
                flag(&args, "--seconds", 60),
                flag(&args, "--think", 5.0),
            )
            .await;
        }
    });
}
