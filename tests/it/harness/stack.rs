//! The whole system for web tests: a private Redis, the simulator, a real `coven gateway`
//! and real `coven web` replicas, plus a browser-like HTTP client (cookie jar) and an SSE
//! reader.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::cookie::Jar;
use serde_json::Value;

use super::g;
use super::redis::free_port;
use super::{CovenProcess, DEADLINE, RedisServer, TestSim};

/// The invite key every test replica signs with (tests forge and expire tokens with it).
pub const INVITE_SECRET: &str = "test-invite-secret-0123456789abcdef";

pub struct Web {
    pub process: CovenProcess,
    pub url: String,
    /// `http://host:port/metrics` on the replica's METRICS_BIND.
    pub metrics: String,
}

impl Web {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

pub struct Stack {
    pub redis: RedisServer,
    pub sim: TestSim,
    pub gateway: CovenProcess,
    /// `http://host:port/metrics` on the gateway's METRICS_BIND.
    pub gateway_metrics: String,
    pub webs: Vec<Web>,
    pub lobby: u64,
}

impl Stack {
    /// Redis, sim, gateway and `replicas` web replicas; `extra` goes to every replica.
    pub async fn start(replicas: usize, extra: &[(&str, &str)]) -> Self {
        Self::start_on(
            RedisServer::start(),
            TestSim::start().await,
            replicas,
            extra,
        )
        .await
    }

    /// Redis, sim, a gateway and `replicas` web replicas serving every guild the bot is in
    /// (no `DISCORD_GUILD_ID`); `extra` goes to every replica.
    pub async fn every_community(replicas: usize, extra: &[(&str, &str)]) -> Self {
        Self::every_community_on(TestSim::start().await, replicas, extra).await
    }

    pub async fn every_community_on(sim: TestSim, replicas: usize, extra: &[(&str, &str)]) -> Self {
        let mut all = vec![("DISCORD_GUILD_ID", "")];
        all.extend_from_slice(extra);
        Self::start_with(
            RedisServer::start(),
            sim,
            replicas,
            &all,
            &[("DISCORD_GUILD_ID", "")],
        )
        .await
    }

    pub async fn start_on(
        redis: RedisServer,
        sim: TestSim,
        replicas: usize,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::start_with(redis, sim, replicas, extra, &[]).await
    }

    /// Like [`Self::start_on`], with `gateway_extra` settings for the gateway.
    pub async fn start_with(
        redis: RedisServer,
        sim: TestSim,
        replicas: usize,
        extra: &[(&str, &str)],
        gateway_extra: &[(&str, &str)],
    ) -> Self {
        let lobby = sim.id_of("lobby_id").await;
        let (gateway, gateway_metrics) = spawn_gateway_on(&sim, &redis.url(), gateway_extra);
        let mut stack = Stack {
            redis,
            sim,
            gateway,
            gateway_metrics,
            webs: Vec::new(),
            lobby,
        };
        for _ in 0..replicas {
            let web = stack.spawn_web(extra);
            stack.webs.push(web);
        }
        // Ready (Redis answers) with a fresh gateway report: the stack is fully up.
        let http = reqwest::Client::new();
        for web in &stack.webs {
            super::wait_for("the replica to be ready with a fresh gateway", || async {
                let r = http.get(web.url("/readyz")).send().await.ok()?;
                if r.status() != 200 {
                    return None;
                }
                let body: Value = r.json().await.ok()?;
                (body["gateway"]["fresh"] == true && body["gateway"]["state"] == "CONNECTED")
                    .then_some(())
            })
            .await;
        }
        // Pages of a community answer once the gateway has registered it.
        let redis = stack.redis_client().await;
        super::wait_for("the gateway to register the community", || async {
            use fred::prelude::*;
            let entry: Option<String> = redis
                .hget("coven:guilds", super::GUILD.to_string())
                .await
                .ok()?;
            entry.filter(|e| !e.is_empty()).map(|_| ())
        })
        .await;
        stack
    }

    /// A client of the stack's Redis, for looking at (or tampering with) shared state.
    pub async fn redis_client(&self) -> fred::prelude::Client {
        use fred::prelude::*;
        let client = Client::new(
            Config::from_url(&self.redis.url()).expect("the Redis URL"),
            None,
            None,
            None,
        );
        client.init().await.expect("Redis answers");
        client
    }

    /// Another `coven gateway` for this stack (a standby, or a replacement).
    pub fn spawn_gateway(&self) -> CovenProcess {
        spawn_gateway(&self.redis, &self.sim).0
    }

    /// A replica whose open-file limit is `nofile` (soft and hard), when given.
    pub fn spawn_web_limited(&self, nofile: Option<u64>, extra: &[(&str, &str)]) -> Web {
        spawn_web(&self.sim, &self.redis.url(), nofile, extra)
    }

    pub fn spawn_web(&self, extra: &[(&str, &str)]) -> Web {
        self.spawn_web_limited(None, extra)
    }

    pub fn web(&self, i: usize) -> &Web {
        &self.webs[i]
    }

    pub async fn user(&self, name: &str) -> u64 {
        self.sim.user(name).await
    }

    /// A new browser logged in on `web` as the simulated `user`, on the rooms page.
    pub async fn login_as(&self, web: &Web, user: u64) -> Browser {
        let browser = Browser::new();
        browser.login(web, &self.sim, user).await;
        browser
    }

    /// The role that opens a room Coven made (its one role overwrite besides @everyone).
    pub async fn room_role(&self, room: u64) -> u64 {
        let state = self.sim.state().await;
        let guild = self.sim.guild_id().to_string();
        state["channels"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["id"] == room.to_string().as_str()))
            .and_then(|c| c["permission_overwrites"].as_array())
            .and_then(|os| {
                os.iter()
                    .find(|o| o["type"] == 0 && o["id"] != guild.as_str())
            })
            .and_then(|o| o["id"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("room {room} has no role in the sim"))
    }

    /// `user` gets the room's role (as an invite gives it) and joins the room's voice
    /// channel, which is private: the sim, like Discord, lets only the role in.
    pub async fn seat(&self, user: u64, room: u64, flags: Value) {
        let role = self.room_role(room).await;
        self.sim
            .twilight_http()
            .add_guild_member_role(
                twilight_model::id::Id::new(self.sim.guild_id()),
                twilight_model::id::Id::new(user),
                twilight_model::id::Id::new(role),
            )
            .await
            .expect("the bot grants the room's role");
        self.voice(user, Some(room), flags).await;
    }

    /// A change "in Discord": `user` joins (or with `None` leaves) voice.
    pub async fn voice(&self, user: u64, channel: Option<u64>, flags: Value) {
        let mut body = serde_json::json!({
            "user_id": user.to_string(),
            "channel_id": channel.map(|c| c.to_string()),
        });
        if let (Some(b), Some(f)) = (body.as_object_mut(), flags.as_object()) {
            b.extend(f.clone());
        }
        let (status, answer) = self.sim.control("/voice", body).await;
        assert_eq!(status, 200, "voice change refused: {answer}");
    }
}

/// A `coven web` replica against `redis_url` and the sim; `extra` settings on top, and an
/// open-file limit when `nofile` is given.
pub fn spawn_web(
    sim: &TestSim,
    redis_url: &str,
    nofile: Option<u64>,
    extra: &[(&str, &str)],
) -> Web {
    retry_taken_port(|| {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let bind = format!("127.0.0.1:{port}");
        let guild = sim.guild_id().to_string();
        let token = sim.token();
        let api = sim.url("/api");
        let oauth = sim.url("");
        let mut env = vec![
            ("BIND", bind.as_str()),
            ("METRICS_BIND", "127.0.0.1:0"),
            ("PUBLIC_URL", url.as_str()),
            ("REDIS_URL", redis_url),
            ("DISCORD_GUILD_ID", &guild),
            ("DISCORD_BOT_TOKEN", &token),
            ("DISCORD_CLIENT_ID", "1190000000000000002"),
            ("DISCORD_CLIENT_SECRET", "sim-client-secret"),
            ("DISCORD_API_URL", &api),
            ("DISCORD_OAUTH_URL", oauth.trim_end_matches('/')),
            ("INVITE_SECRET", INVITE_SECRET),
            ("RUST_LOG", "coven=debug"),
        ];
        env.extend_from_slice(extra);
        let mut process = match nofile {
            Some(n) => CovenProcess::spawn_with_nofile(n, &["web"], &env),
            None => CovenProcess::spawn(&["web"], &env),
        };
        process.started("coven web listening on")?;
        // The metrics port is the kernel's pick, printed before the line above.
        let metrics = process.metrics_url();
        Ok(Web {
            process,
            url,
            metrics,
        })
    })
}

/// Runs `start` again, on new ports, while what it started exited because a port
/// `free_port` found free was taken before the process bound it (another test's socket
/// can get it in between); any other exit fails the test.
fn retry_taken_port<T>(mut start: impl FnMut() -> Result<T, String>) -> T {
    let mut tries = 0;
    loop {
        match start() {
            Ok(started) => return started,
            Err(why) if why.contains("Address already in use") && tries < 5 => {
                tries += 1;
                eprintln!("a port was taken before coven bound it; again on others: {why}");
            }
            Err(why) => panic!("{why}"),
        }
    }
}

/// A gateway against the stack's Redis and sim; with the URL of its metrics.
fn spawn_gateway(redis: &RedisServer, sim: &TestSim) -> (CovenProcess, String) {
    spawn_gateway_on(sim, &redis.url(), &[])
}

/// A gateway against `redis_url` and the sim, `extra` settings on top; with the URL of its
/// metrics.
pub fn spawn_gateway_on(
    sim: &TestSim,
    redis_url: &str,
    extra: &[(&str, &str)],
) -> (CovenProcess, String) {
    let guild = sim.guild_id().to_string();
    let gateway_url = sim.gateway_url();
    let api_url = sim.url("/api");
    let token = sim.token();
    let mut env = vec![
        ("BIND", "127.0.0.1:0"),
        ("METRICS_BIND", "127.0.0.1:0"),
        ("REDIS_URL", redis_url),
        ("DISCORD_GUILD_ID", &guild),
        ("DISCORD_BOT_TOKEN", &token),
        ("DISCORD_GATEWAY_URL", &gateway_url),
        ("DISCORD_API_URL", &api_url),
        ("GATEWAY_LEASE_TTL", "2s"),
        ("RUST_LOG", "coven=debug"),
    ];
    env.extend_from_slice(extra);
    let mut gateway = CovenProcess::spawn(&["gateway"], &env);
    // Both ports are the kernel's pick, read back from what the gateway prints.
    gateway.wait_for_stdout("health listening on");
    let metrics = gateway.metrics_url();
    (gateway, metrics)
}

/// A browser: one cookie jar shared by every replica (cookies do not depend on ports),
/// redirects not followed so each hop can be checked.
#[derive(Clone)]
pub struct Browser {
    pub http: reqwest::Client,
    pub jar: Arc<Jar>,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

impl Browser {
    pub fn new() -> Self {
        let jar = Arc::new(Jar::default());
        let http = reqwest::Client::builder()
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client");
        Browser { http, jar }
    }

    pub async fn get(&self, url: &str) -> reqwest::Response {
        self.http.get(url).send().await.expect("GET")
    }

    /// The session's CSRF token, read from a page's forms as a browser has it.
    pub async fn csrf(&self, web: &Web) -> String {
        let page = self.get(&web.url(&g("/rooms"))).await;
        assert_eq!(page.status(), 200, "the rooms page");
        let html = page.text().await.expect("page");
        form_value(&html, "csrf_token").expect("a csrf_token field")
    }

    /// A plain form post, as a browser sends it from one of `web`'s pages.
    pub async fn post(&self, web: &Web, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(web.url(path))
            .header("origin", &web.url)
            .form(form)
            .send()
            .await
            .expect("POST")
    }

    /// A page's HTML (asserting 200).
    pub async fn page(&self, url: &str) -> String {
        let res = self.get(url).await;
        assert_eq!(res.status(), 200, "GET {url}");
        res.text().await.expect("page body")
    }

    /// Logs in as the simulated `user` through `web`'s OAuth2 flow, starting from
    /// `/auth/login?return_to=...`, and returns where the callback sends the browser.
    pub async fn login_to(
        &self,
        web: &Web,
        sim: &TestSim,
        user: u64,
        return_to: &str,
    ) -> reqwest::Response {
        let start = self
            .http
            .get(web.url("/auth/login"))
            .query(&[("return_to", return_to)])
            .send()
            .await
            .expect("login");
        assert_eq!(start.status(), 303, "login redirects to Discord");
        let authorize = location(&start);
        assert!(
            authorize.starts_with(&sim.url("/oauth2/authorize")),
            "{authorize}"
        );
        let picked = self.get(&format!("{authorize}&sim_user={user}")).await;
        assert!(
            picked.status().is_redirection(),
            "the sim sends the browser back"
        );
        let callback = location(&picked);
        assert!(
            callback.starts_with(&web.url("/auth/callback")),
            "{callback}"
        );
        self.get(&callback).await
    }

    pub async fn login(&self, web: &Web, sim: &TestSim, user: u64) {
        let done = self.login_to(web, sim, user, "/rooms").await;
        assert_eq!(done.status(), 303, "the callback redirects");
        assert_eq!(location(&done), "/rooms");
    }

    /// "Log out", as the header's form posts it on `web`.
    pub async fn log_out(&self, web: &Web) -> reqwest::Response {
        let token = self.csrf(web).await;
        self.post(web, "/auth/logout", &[("csrf_token", &token)])
            .await
    }

    pub async fn stream(&self, url: &str, last_event_id: Option<&str>) -> Sse {
        // As EventSource asks.
        let mut req = self.http.get(url).header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.expect("stream request");
        assert_eq!(res.status(), 200, "stream opens");
        assert_eq!(
            res.headers()["content-type"],
            "text/event-stream",
            "an event stream"
        );
        Sse::new(res)
    }
}

/// The `value` of the input named `name` in `html`.
pub fn form_value(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))? + name.len() + 15;
    let len = html[at..].find('"')?;
    Some(html[at..at + len].to_owned())
}

pub fn location(res: &reqwest::Response) -> String {
    res.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// One SSE message.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Message {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// Reads an event stream message by message.
pub struct Sse {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
    pub retry: Option<u64>,
    pub comments: usize,
    pub ended: bool,
}

impl Sse {
    pub fn new(res: reqwest::Response) -> Self {
        Sse {
            body: res.bytes_stream().boxed(),
            buffer: String::new(),
            retry: None,
            comments: 0,
            ended: false,
        }
    }

    /// The next message, or `None` when the stream ends; fails at the deadline.
    pub async fn next(&mut self) -> Option<Message> {
        self.next_within(DEADLINE)
            .await
            .expect("a message within the deadline")
    }

    /// The next message; `Err` if none came within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<Message>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut msg = Message {
                    event: "message".into(),
                    ..Message::default()
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        let _ = c;
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        self.retry = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        msg.id = Some(v.to_owned());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        msg.event = v.to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        msg.data.push_str(v);
                        any = true;
                    }
                }
                if any {
                    return Ok(Some(msg));
                }
                continue;
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => return Err(()),
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(_)) | None) => self.ended = true,
            }
        }
    }

    /// Reads until the stream ends; `false` if it was still open after `limit`.
    pub async fn ends_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(()) => return false,
            }
        }
    }

    /// Messages until one matches `want` (returned last), skipping none: every message
    /// read is returned so a test can check what came before.
    pub async fn until(&mut self, mut want: impl FnMut(&Message) -> bool) -> Vec<Message> {
        let mut seen = Vec::new();
        loop {
            let msg = self
                .next()
                .await
                .expect("the stream ended before the wanted message");
            let done = want(&msg);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }

    /// The next message that is not diagnostics (`gateway.status`, `ping`).
    pub async fn next_domain(&mut self) -> Message {
        loop {
            let msg = self.next().await.expect("the stream ended");
            if msg.event != "gateway.status" && msg.event != "ping" {
                return msg;
            }
        }
    }
}

/// The Prometheus page at `url`, whole.
pub async fn metrics_page(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("the metrics page")
}

/// The sum of every sample of metric `name` on a Prometheus page at `url`.
pub async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
