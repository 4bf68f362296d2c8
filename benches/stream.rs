//! Stream benchmark: many browsers on `/api/stream` across two `coven web` replicas, fed
//! by `coven publish --ping`.
//!
//! Real processes on real sockets: a private `redis-server`, the simulator (in this
//! process, only for the login), two release-built `coven web` replicas and the
//! `coven publish` binary. This process is the load generator: it opens the streams with
//! one logged-in session split evenly over the replicas, reads them, and checks every
//! ping's arrival per stream (lost, duplicated) and its latency from the publisher's
//! clock (`ts`, unix ns at send) to the moment it is read here. A stream the server cuts
//! off reconnects with its last id, as a browser does, so a cut-off costs latency, not
//! events.
//!
//! `cargo bench --bench stream` runs the scenarios of issue [5/6]:
//!   (a) 1,000 streams × 10 events/s for 10 s
//!   (b) 10,000 streams × 2 events/s for 10 s
//!   (c) 1,000 streams × 100 events/s for 10 s
//!   (d) 1,000 streams × 2,000 events/s for 2 s
//! `-- a` (or b, c, d) runs one; `-- nchan` also runs each chosen scenario against Nchan
//! (nginx + nchan over the same private Redis, two worker processes as Coven has two
//! replicas), with the same load generator and the same measures, and prints the two side
//! by side (`STREAM_BENCH_PROFILE=<dir>` writes the servers' pids to `<dir>/pids` three
//! seconds before each connect phase and `<dir>/opened` after it, for a profiler or
//! `strace -c` attached from outside); `-- traces` runs the chosen scenarios with
//! OpenTelemetry traces on at ratio 1.0 (every Coven process exporting every span over
//! OTLP/HTTP to a sink in this process), to hold its cost against a run without;
//! `-- stalled` runs only the stalled-readers scenario of issue [2/6]: 500 streams that stop reading under 3,000 events, with the replica's memory and
//! the machine's TCP memory per stalled stream, and how long until they are cut. Server CPU
//! comes from /proc: the run time of every thread of the servers (`schedstat`, in ns),
//! and utime+stime (`stat`, in 10 ms ticks: coarse at 1,000 streams), over the connect
//! phase (per stream opened) and over the events (per delivery); memory per stream is the replicas' resident-set growth
//! from before the streams opened to when all were open, divided by the streams.

// A benchmark that cannot set itself up has nothing to measure: it may stop there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Logging in through the simulator, shared by the benchmarks.
#[path = "support/login.rs"]
mod login;

use coven::sim::{Settings as SimSettings, Sim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_coven");

/// The `coven` binary the replicas and the publisher run: this build's, or another build's
/// given in `STREAM_BENCH_COVEN` (to compare two builds on one machine, alternating).
fn coven_bin() -> String {
    std::env::var("STREAM_BENCH_COVEN").unwrap_or_else(|_| BIN.to_owned())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "port {port} did not open");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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

/// Run time of every thread of a process (`/proc/<pid>/task/*/schedstat`), in seconds:
/// the same CPU as utime+stime, in nanoseconds rather than ticks (threads that already
/// ended are not counted; the servers' threads live as long as they do).
fn cpu_ns_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Both CPU measures of some processes, summed: (schedstat, stat).
fn cpu_of(pids: &[u32]) -> (f64, f64) {
    (
        pids.iter().map(|p| cpu_ns_seconds(*p)).sum(),
        pids.iter().map(|p| cpu_seconds(*p)).sum(),
    )
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

// Fields drop in order: the replicas go before the Redis they talk to.
struct Setup {
    webs: Vec<(Proc, u16)>,
    _redis: Proc,
    redis_url: String,
    cookie: String,
    _sim: Sim,
    _shutdown: CancellationToken,
    guild: String,
    /// The OTLP endpoint every Coven process exports to (`-- traces`), else none.
    traces: Option<String>,
}

/// The OpenTelemetry settings of a process, with traces on at ratio 1.0: every event
/// traced, queued deep enough that none is dropped (dropped spans would cost nothing).
fn traced(endpoint: Option<&str>) -> Vec<(&'static str, String)> {
    let Some(endpoint) = endpoint else {
        return Vec::new();
    };
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("OTEL_TRACES_SAMPLER", "always_on".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "1000".to_owned()),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "16384".to_owned()),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048".to_owned()),
    ]
}

/// An OTLP/HTTP collector that takes every export and keeps only its size: what a real
/// collector does with the spans is not the replicas' cost.
async fn otlp_sink() -> anyhow::Result<(String, Arc<AtomicU64>, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counts = (requests.clone(), bytes.clone());
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            counts.0.fetch_add(1, Ordering::Relaxed);
            counts.1.fetch_add(body.len() as u64, Ordering::Relaxed);
            // An empty ExportTraceServiceResponse is zero bytes of protobuf.
            async {
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, requests, bytes))
}

async fn setup(traces: Option<&str>) -> anyhow::Result<Setup> {
    let redis_port = free_port()?;
    let redis = Proc(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(redis_port)?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let shutdown = CancellationToken::new();
    let sim = Sim::start(SimSettings::default(), shutdown.clone()).await?;
    let sim_url = sim.url("");
    let sim_url = sim_url.trim_end_matches('/').to_owned();
    let guild = sim.shared.settings.guild_id.to_string();
    // No gateway runs here (the pings come from `coven publish`): register the guild as
    // the gateway does from its GUILD_CREATE, or the replicas serve it nothing.
    let registered = Command::new("redis-cli")
        .args([
            "-p",
            &redis_port.to_string(),
            "HSET",
            "coven:guilds",
            &guild,
        ])
        .arg(r#"{"name":"Coven Playgroup","icon":null,"shard":0,"available":true,"epoch":0}"#)
        .output()?;
    anyhow::ensure!(registered.status.success(), "cannot register the guild");
    let mut webs = Vec::new();
    for _ in 0..2 {
        let port = free_port()?;
        let child = Command::new(coven_bin())
            .arg("web")
            .env("BIND", format!("127.0.0.1:{port}"))
            .env("METRICS_BIND", format!("127.0.0.1:{}", free_port()?))
            .env("PUBLIC_URL", format!("http://127.0.0.1:{port}"))
            .env("REDIS_URL", &redis_url)
            .env("DISCORD_GUILD_ID", &guild)
            .env("DISCORD_BOT_TOKEN", "sim-bot-token")
            .env("DISCORD_CLIENT_ID", "1190000000000000002")
            .env("DISCORD_CLIENT_SECRET", "sim-client-secret")
            .env("DISCORD_API_URL", format!("{sim_url}/api"))
            .env("DISCORD_OAUTH_URL", &sim_url)
            .env("INVITE_SECRET", "bench-invite-secret-0123456789abcdef")
            // One logged-in session holds every stream of the load generator.
            .env("STREAM_MAX_PER_USER", "100000")
            .env(
                "RUST_LOG",
                std::env::var("STREAM_BENCH_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .envs(traced(traces))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        webs.push((Proc(child), port));
        wait_port(port)?;
    }
    let cookie = login(webs[0].1).await?;
    Ok(Setup {
        _redis: redis,
        redis_url,
        webs,
        cookie,
        _sim: sim,
        _shutdown: shutdown,
        traces: traces.map(str::to_owned),
        guild,
    })
}

/// Logs in as the sim's owner of the first guild (ash) through the real OAuth2 flow;
/// returns the cookie.
async fn login(port: u16) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    login::session_cookie(&http, &format!("http://127.0.0.1:{port}"), "ash").await
}

/// What one stream saw.
#[derive(Default)]
struct Seen {
    got: Vec<u64>,
    duplicates: u64,
    latencies_us: Vec<u32>,
    reconnects: u64,
}

struct Scenario {
    name: &'static str,
    streams: usize,
    rate: u64,
    seconds: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run_stream(
    port: u16,
    head: Arc<str>,
    start_id: Arc<str>,
    count: u64,
    open: Arc<Semaphore>,
    opened: Arc<AtomicU64>,
    done: CancellationToken,
) -> Seen {
    let mut seen = Seen {
        got: vec![0; (count as usize) / 64 + 1],
        ..Seen::default()
    };
    let mut received = 0u64;
    let mut last_id: Vec<u8> = start_id.as_bytes().to_vec();
    let mut first = true;
    'connect: loop {
        // The permit only paces connection setup; it is let go once the stream is open.
        let mut permit = Some(open.acquire().await);
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let req = format!(
            "{head}Last-Event-ID: {}\r\nAccept: text/event-stream\r\n\r\n",
            String::from_utf8_lossy(&last_id)
        );
        if conn.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        // Read straight into one small buffer and parse in place: the generator shares
        // the two cores with the servers, so every cycle it spends is latency for them.
        let mut buf: Vec<u8> = Vec::with_capacity(4 * 1024);
        let mut headers_done = false;
        loop {
            buf.reserve(4 * 1024);
            let n = tokio::select! {
                r = conn.read_buf(&mut buf) => match r { Ok(0) | Err(_) => 0, Ok(n) => n },
                () = done.cancelled() => return seen,
            };
            if n == 0 {
                seen.reconnects += 1;
                continue 'connect;
            }
            let at = now_ns();
            if !headers_done {
                let Some(end) = find(&buf, b"\r\n\r\n") else {
                    continue;
                };
                if !buf.starts_with(b"HTTP/1.1 200") {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'connect;
                }
                buf.drain(..end + 4);
                headers_done = true;
                if first {
                    first = false;
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit.take());
            }
            // Whole frames only: up to the last blank line.
            let Some(end) = rfind(&buf, b"\n\n") else {
                continue;
            };
            for frame in buf[..end].split(|b| *b == b'\n') {
                if let Some(id) = frame.strip_prefix(b"id: ") {
                    last_id.clear();
                    last_id.extend_from_slice(id);
                } else if let Some(data) = frame.strip_prefix(b"data: ") {
                    let (Some(seq), Some(ts)) = (
                        number_after(data, b"\"seq\":"),
                        number_after(data, b"\"ts\":"),
                    ) else {
                        continue;
                    };
                    if seq == 0 || seq > count {
                        continue;
                    }
                    let (word, bit) = ((seq / 64) as usize, seq % 64);
                    if seen.got[word] & (1 << bit) != 0 {
                        seen.duplicates += 1;
                    } else {
                        seen.got[word] |= 1 << bit;
                        received += 1;
                        // ts is the envelope's data ts (ns); skip the envelope's own ms ts.
                        seen.latencies_us
                            .push((at.saturating_sub(ts) / 1000).min(u64::from(u32::MAX)) as u32);
                    }
                }
            }
            buf.drain(..end + 2);
            if received == count {
                return seen;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// The number after `key` in a JSON object (the ping's `data` comes after the envelope's
/// own fields, so the last occurrence is the ping's).
fn number_after(data: &[u8], key: &[u8]) -> Option<u64> {
    let at = rfind(data, key)? + key.len();
    let digits = &data[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    (len > 0).then(|| {
        digits[..len]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
    })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

async fn publish(setup: &Setup, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(coven_bin())
        .arg("publish")
        .args(args)
        .env("REDIS_URL", &setup.redis_url)
        .env("DISCORD_GUILD_ID", &setup.guild)
        .envs(traced(setup.traces.as_deref()))
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "coven publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The memory a replica spends on an idle keep-alive HTTP/1 connection that has made
/// one request (`/healthz`): hyper's floor, which every stream also pays.
async fn idle_connection_kib(setup: &Setup, n: usize) -> anyhow::Result<f64> {
    let (proc_, port) = &setup.webs[0];
    let pid = proc_.0.id();
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut conn = TcpStream::connect(("127.0.0.1", *port)).await?;
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut buf = [0u8; 1024];
        let mut got = 0;
        while find(&buf[..got], b"}").is_none() {
            let n = conn.read(&mut buf[got..]).await?;
            anyhow::ensure!(n > 0, "healthz closed");
            got += n;
        }
        conns.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid);
    drop(conns);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// The machine's TCP memory (`/proc/net/sockstat`, `TCP: ... mem N`, in pages), in KiB.
fn tcp_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                if w == "mem" {
                    return words.next()?.parse::<u64>().ok();
                }
            }
            None
        })
        .map_or(0, |pages| pages * 4)
}

/// 500 streams whose readers stop reading (a 4 KiB receive buffer, never read) while
/// 3,000 events go out: what each costs the replica and the kernel while stalled, and how
/// long until `STREAM_WRITE_TIMEOUT` (30 s) cuts them.
async fn stalled(setup: &Setup) -> anyhow::Result<()> {
    const STREAMS: usize = 500;
    // Replica 1: replica 0's allocator still holds what the idle-connection reference
    // freed, which would hide the growth.
    let (proc_, port) = &setup.webs[1];
    let pid = proc_.0.id();
    let rss_before = rss_kib(pid);
    let tcp_before = tcp_memory_kib();
    let mut held = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let mut conn = socket.connect(([127, 0, 0, 1], *port).into()).await?;
        let request = format!(
            "GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {}\r\n\r\n",
            setup.cookie
        );
        conn.write_all(request.as_bytes()).await?;
        held.push(conn);
    }
    let started = Instant::now();
    publish(setup, &["--ping", "--count", "3000", "--rate", "1000"]).await?;
    // The buffers are full well before the last event: measure while every stream is stalled.
    let rss = rss_kib(pid).saturating_sub(rss_before) as f64 / STREAMS as f64;
    let tcp = tcp_memory_kib().saturating_sub(tcp_before) as f64 / STREAMS as f64;
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let cut = loop {
        let body: serde_json::Value = reqwest::get(&healthz).await?.json().await?;
        if body["streams"].as_u64() == Some(0) {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "stalled streams still open after 60 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(held);
    println!(
        "stalled: {STREAMS} streams that stopped reading under 3,000 events: replica {rss:.1} KiB and \
         machine TCP memory {tcp:.1} KiB per stalled stream (both ends of loopback; target < 256 KiB); \
         all cut {:.1} s after the events began (STREAM_WRITE_TIMEOUT 30 s; target < 35 s)",
        cut.as_secs_f64()
    );
    Ok(())
}

/// nginx with nchan over the bench's Redis: the reference a stream's cost is held to.
struct Nchan {
    // Dropped before the directory its configuration and pid file are in.
    nginx: Proc,
    port: u16,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Nchan {
    /// nginx's workers outlive a master that is killed outright: ask it to stop them.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.nginx.0.id().to_string()])
            .status();
        let _ = self.nginx.0.wait();
    }
}

/// Where nginx's nchan module is when installed from Debian's `libnginx-mod-nchan`.
const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

impl Nchan {
    /// Starts a private nginx (two workers, as Coven runs two replicas) on a free port:
    /// subscribers on `/sub` (EventSource), the publisher on `/pub`, one channel, stored
    /// in the bench's Redis.
    async fn start(redis_url: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            std::path::Path::new(NCHAN_MODULE).exists(),
            "nchan is not installed (apt-get install nginx libnginx-mod-nchan)"
        );
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let d = dir.path().display();
        let config = format!(
            r#"load_module {NCHAN_MODULE};
worker_processes 2;
worker_rlimit_nofile 65536;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    nchan_redis_url "{redis_url}";
    server {{
        listen 127.0.0.1:{port};
        location = /sub {{
            nchan_subscriber eventsource;
            nchan_channel_id bench;
            nchan_use_redis on;
        }}
        location = /pub {{
            nchan_publisher;
            nchan_channel_id bench;
            nchan_use_redis on;
        }}
    }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config)?;
        let nginx = Proc(
            Command::new("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
        wait_port(port)?;
        Ok(Nchan {
            nginx,
            port,
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    /// nginx's master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.nginx.0.id();
        let mut pids = vec![master];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.filter_map(Result::ok) {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
                if ppid == Some(master) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Publishes one message (from this process: it is not timed); returns its id.
    async fn publish(&self, body: String) -> anyhow::Result<String> {
        let answer: serde_json::Value = self
            .http
            .post(format!("http://127.0.0.1:{}/pub", self.port))
            .header("accept", "application/json")
            .body(body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        answer["last_message_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("nchan answered no message id: {answer}"))
    }

    /// Pings as `coven publish --ping` sends them: from a process of its own (this
    /// benchmark run as `nchan-publish`), so the publisher does not share the load
    /// generator's runtime.
    async fn pings(&self, count: u64, rate: u64) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(std::env::current_exe()?)
            .args(["nchan-publish", &self.port.to_string()])
            .args([count.to_string(), rate.to_string()])
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "the nchan publisher failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// `nchan-publish <port> <count> <rate>`: `{"seq":n,"ts":<unix ns at send>}` to nchan's
/// publisher, at the rate `coven publish --ping` keeps.
fn nchan_publish(args: &[String]) -> anyhow::Result<()> {
    let [port, count, rate] = args else {
        anyhow::bail!("nchan-publish <port> <count> <rate>");
    };
    let (port, count, rate): (u16, u64, u64) = (port.parse()?, count.parse()?, rate.parse()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/pub");
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        // Not one at a time: nchan answers a publish only once it has gone through Redis,
        // which at 100/s would cap the rate below the scenario's. The time of sending is
        // in each message, so the latency measured still starts there.
        let mut sent = Vec::with_capacity(count as usize);
        for seq in 1..=count {
            tick.tick().await;
            let post = http
                .post(&url)
                .body(format!(r#"{{"seq":{seq},"ts":{}}}"#, now_ns()))
                .send();
            sent.push(tokio::spawn(post));
        }
        for post in sent {
            post.await??.error_for_status()?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "published {count} pings in {secs:.2} s ({:.0}/s)",
            count as f64 / secs.max(1e-9)
        );
        Ok(())
    })
}

/// The server a scenario runs against.
#[derive(Clone, Copy)]
enum Target<'a> {
    Coven(&'a Setup),
    Nchan(&'a Nchan),
}

impl Target<'_> {
    fn name(&self) -> &'static str {
        match self {
            Target::Coven(_) => "coven",
            Target::Nchan(_) => "nchan",
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Target::Coven(setup) => setup.webs.iter().map(|(p, _)| p.0.id()).collect(),
            Target::Nchan(nchan) => nchan.pids(),
        }
    }

    fn ports(&self) -> Vec<u16> {
        match self {
            Target::Coven(setup) => setup.webs.iter().map(|(_, port)| *port).collect(),
            Target::Nchan(nchan) => vec![nchan.port],
        }
    }

    /// A stream's request up to its `Last-Event-ID`.
    fn head(&self) -> String {
        match self {
            Target::Coven(setup) => format!(
                "GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {}\r\n",
                setup.cookie
            ),
            Target::Nchan(_) => "GET /sub HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_owned(),
        }
    }

    /// Publishes one event that is not a ping; returns its id, where streams start.
    async fn start_id(&self) -> anyhow::Result<String> {
        match self {
            Target::Coven(setup) => {
                publish(
                    setup,
                    &[
                        "--type",
                        "gateway.status",
                        "--data",
                        r#"{"state":"CONNECTED","reason":null}"#,
                    ],
                )
                .await
            }
            Target::Nchan(nchan) => {
                nchan
                    .publish(r#"{"state":"CONNECTED","reason":null}"#.to_owned())
                    .await
            }
        }
    }

    async fn pings(&self, count: u64, rate: u64) -> anyhow::Result<String> {
        match self {
            Target::Coven(setup) => {
                publish(
                    setup,
                    &[
                        "--ping",
                        "--count",
                        &count.to_string(),
                        "--rate",
                        &rate.to_string(),
                    ],
                )
                .await
            }
            Target::Nchan(nchan) => nchan.pings(count, rate).await,
        }
    }
}

/// What a scenario measured, for the side-by-side summary.
struct Outcome {
    scenario: &'static str,
    target: &'static str,
    streams: usize,
    rate: u64,
    open_us: f64,
    open_ticks_us: f64,
    delivery_us: f64,
    p50: f64,
    p99: f64,
    max: f64,
    lost: u64,
}

async fn scenario(target: Target<'_>, s: &Scenario) -> anyhow::Result<Outcome> {
    let count = s.rate * s.seconds;
    // Every stream starts after this id, so a reconnect before its first ping replays.
    let start_id: Arc<str> = target.start_id().await?.into();
    let pids = target.pids();
    let ports = target.ports();
    let rss_before: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let profile = std::env::var_os("STREAM_BENCH_PROFILE").map(std::path::PathBuf::from);
    if let Some(dir) = &profile {
        // For a profiler or `strace -c` attached from outside to the connect phase only:
        // the servers' pids, a moment to attach, and a mark when every stream is open.
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        std::fs::write(
            dir.join("pids"),
            format!("{} {} {}\n", s.name, target.name(), list.join(" ")),
        )?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let cpu_open_before = cpu_of(&pids);
    let head: Arc<str> = target.head().into();
    let open = Arc::new(Semaphore::new(256));
    let opened = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let mut tasks = Vec::with_capacity(s.streams);
    for i in 0..s.streams {
        let port = ports[i % ports.len()];
        tasks.push(tokio::spawn(run_stream(
            port,
            head.clone(),
            start_id.clone(),
            count,
            open.clone(),
            opened.clone(),
            done.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened.load(Ordering::Relaxed) < s.streams as u64 {
        anyhow::ensure!(Instant::now() < deadline, "streams did not all open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_open_after = cpu_of(&pids);
    if let Some(dir) = &profile {
        std::fs::write(
            dir.join("opened"),
            format!("{} {}\n", s.name, target.name()),
        )?;
    }
    let cpu_open = cpu_open_after.0 - cpu_open_before.0;
    let cpu_open_ticks = cpu_open_after.1 - cpu_open_before.1;
    // Let the servers settle, then measure memory with every stream open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_open: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let cpu_before = cpu_of(&pids).0;
    let started = Instant::now();
    let published = target.pings(count, s.rate).await?;
    let publish_took = started.elapsed();
    // Everything published must arrive; give stragglers time, then stop.
    let stop = done.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        stop.cancel();
    });
    let mut seen = Vec::with_capacity(tasks.len());
    for t in tasks {
        seen.push(t.await?);
    }
    let all_in = started.elapsed();
    let cpu = cpu_of(&pids).0 - cpu_before;
    let rss_traffic: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    done.cancel();

    let mut latencies: Vec<u32> = seen
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let deliveries = latencies.len() as u64;
    let expected = count * s.streams as u64;
    let duplicates: u64 = seen.iter().map(|s| s.duplicates).sum();
    let reconnects: u64 = seen.iter().map(|s| s.reconnects).sum();
    let outcome = Outcome {
        scenario: s.name,
        target: target.name(),
        streams: s.streams,
        rate: s.rate,
        open_us: cpu_open * 1e6 / s.streams as f64,
        open_ticks_us: cpu_open_ticks * 1e6 / s.streams as f64,
        delivery_us: cpu * 1e6 / deliveries.max(1) as f64,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
        lost: expected - deliveries,
    };
    println!(
        "({}) [{}] {} streams × {} events/s for {} s: {published} (publisher took {:.2} s)",
        s.name,
        target.name(),
        s.streams,
        s.rate,
        s.seconds,
        publish_took.as_secs_f64()
    );
    println!(
        "    latency publish→receive: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        outcome.p50, outcome.p99, outcome.max
    );
    println!(
        "    deliveries: {deliveries} of {expected} in {:.2} s ({:.0}/s); lost {}, duplicated {duplicates}, reconnects after cut-off {reconnects}",
        all_in.as_secs_f64(),
        deliveries as f64 / all_in.as_secs_f64().max(1e-9),
        outcome.lost,
    );
    println!(
        "    server CPU: {:.2} s over the servers' processes ({}) = {:.2} µs per delivery; {:.1} µs per stream opened ({:.0} µs by utime+stime ticks)",
        cpu,
        pids.len(),
        outcome.delivery_us,
        outcome.open_us,
        outcome.open_ticks_us,
    );
    println!(
        "    memory per stream: {:.1} KiB after connecting, {:.1} KiB after traffic (RSS {} → {} → {} KiB)",
        (rss_open.saturating_sub(rss_before)) as f64 / s.streams as f64,
        (rss_traffic.saturating_sub(rss_before)) as f64 / s.streams as f64,
        rss_before,
        rss_open,
        rss_traffic
    );
    // Let the servers close the finished streams before the next scenario.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(outcome)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "nchan-publish") {
        return nchan_publish(&args[1..]);
    }
    coven::web::raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let only: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|a| matches!(*a, "a" | "b" | "c" | "d" | "stalled"))
            .collect();
        let with_nchan = args.iter().any(|a| a == "nchan");
        let sink = if args.iter().any(|a| a == "traces") {
            Some(otlp_sink().await?)
        } else {
            None
        };
        let setup = setup(sink.as_ref().map(|(url, ..)| url.as_str())).await?;
        if setup.traces.is_some() {
            println!("traces on: every Coven process exports every span (ratio 1.0) over OTLP/HTTP to a sink in this process");
        }
        let nchan = if with_nchan {
            match Nchan::start(&setup.redis_url).await {
                Ok(n) => Some(n),
                Err(e) => {
                    println!("nchan reference not run: {e}");
                    None
                }
            }
        } else {
            None
        };
        let scenarios = [
            Scenario { name: "a", streams: 1_000, rate: 10, seconds: 10 },
            Scenario { name: "b", streams: 10_000, rate: 2, seconds: 10 },
            Scenario { name: "c", streams: 1_000, rate: 100, seconds: 10 },
            Scenario { name: "d", streams: 1_000, rate: 2_000, seconds: 2 },
        ];
        println!(
            "stream benchmark: 2 release-built `coven web` replicas, redis-server and this load generator on one machine ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "reference: an idle keep-alive HTTP/1 connection after one request costs a replica {:.1} KiB",
            idle_connection_kib(&setup, 5_000).await?
        );
        let mut outcomes = Vec::new();
        for s in &scenarios {
            if only.is_empty() || only.contains(&s.name) {
                outcomes.push(scenario(Target::Coven(&setup), s).await?);
                if let Some(nchan) = &nchan {
                    outcomes.push(scenario(Target::Nchan(nchan), s).await?);
                }
            }
        }
        if nchan.is_some() {
            println!("side by side (same load generator; server CPU from /proc, schedstat ns):");
            println!(
                "    {:<3} {:<6} {:>7} {:>7} {:>14} {:>8} {:>14} {:>8} {:>8} {:>8} {:>5}",
                "", "server", "streams", "ev/s", "µs/opened", "(ticks)", "µs/delivery", "p50 ms", "p99 ms", "max ms", "lost"
            );
            for o in &outcomes {
                println!(
                    "    {:<3} {:<6} {:>7} {:>7} {:>14.1} {:>8.0} {:>14.2} {:>8.1} {:>8.1} {:>8.1} {:>5}",
                    o.scenario, o.target, o.streams, o.rate, o.open_us, o.open_ticks_us,
                    o.delivery_us, o.p50, o.p99, o.max, o.lost
                );
            }
        }
        if only.is_empty() || only.contains(&"stalled") {
            stalled(&setup).await?;
        }
        if let Some((_, requests, bytes)) = &sink {
            println!(
                "OTLP sink: {} exports, {:.1} MiB of spans",
                requests.load(Ordering::Relaxed),
                bytes.load(Ordering::Relaxed) as f64 / 1_048_576.0
            );
        }
        Ok(())
    })
}
