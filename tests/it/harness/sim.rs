//! An in-process `coven sim` on a free port, with helpers for its control API, and
//! twilight shards pointed at it.

use std::time::Duration;

use coven::sim::{Settings, Sim};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use twilight_gateway::{ConfigBuilder, Event, EventTypeFlags, Intents, Shard, ShardId, StreamExt};
use twilight_gateway_queue::InMemoryQueue;

use super::{DEADLINE, init_logs};

pub struct TestSim {
    pub sim: Sim,
    shutdown: CancellationToken,
    pub http: reqwest::Client,
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestSim {
    /// A simulator with test-friendly timings: quick heartbeats, small rate limits.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        init_logs();
        let mut settings = Settings {
            heartbeat_interval: Duration::from_millis(1_000),
            ..Settings::default()
        };
        tweak(&mut settings);
        let shutdown = CancellationToken::new();
        let sim = Sim::start(settings, shutdown.clone())
            .await
            .expect("the simulator starts");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client");
        Self {
            sim,
            shutdown,
            http,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.sim.url(path)
    }

    pub fn gateway_url(&self) -> String {
        self.sim.shared.gateway_url()
    }

    pub fn token(&self) -> String {
        self.sim
            .shared
            .settings
            .bot_token
            .expose_secret()
            .to_owned()
    }

    pub fn guild_id(&self) -> u64 {
        self.sim.shared.settings.guild_id
    }

    /// `host:port`, as twilight-http's proxy setting takes it.
    pub fn host(&self) -> String {
        self.sim.addr.to_string()
    }

    pub fn twilight_http(&self) -> twilight_http::Client {
        twilight_http::Client::builder()
            .token(self.token())
            .proxy(self.host(), true)
            .timeout(Duration::from_secs(10))
            .build()
    }

    pub async fn state(&self) -> Value {
        self.http
            .get(self.url("/_sim/state"))
            .send()
            .await
            .expect("state request")
            .json()
            .await
            .expect("state json")
    }

    /// `GET /_sim/state?guild=G`: guild G in the shape of the first guild's state.
    pub async fn guild_state(&self, guild: u64) -> Value {
        self.http
            .get(self.url(&format!("/_sim/state?guild={guild}")))
            .send()
            .await
            .expect("state request")
            .json()
            .await
            .expect("state json")
    }

    /// The id of a user of guild G by username.
    pub async fn user_of(&self, guild: u64, username: &str) -> u64 {
        let state = self.guild_state(guild).await;
        state["users"]
            .as_array()
            .and_then(|users| users.iter().find(|u| u["username"] == username))
            .and_then(|u| u["id"].as_str())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no user {username} in guild {guild}"))
    }

    /// An id field of guild G's state (`lobby_id`, `room_category_id`, ...).
    pub async fn id_in(&self, guild: u64, field: &str) -> u64 {
        self.guild_state(guild).await[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("state of {guild} has no {field}"))
    }

    /// A user's OAuth2 access token with these scopes (space-separated), through the
    /// authorize redirect (`sim_user`) and the token endpoint, as a web app gets one.
    pub async fn user_token(&self, user: u64, scopes: &str) -> String {
        let redirect = "http://127.0.0.1:9/auth/callback";
        let client_id = self.sim.shared.settings.client_id.to_string();
        let res = self
            .http
            .get(self.url("/oauth2/authorize"))
            .query(&[
                ("client_id", client_id.as_str()),
                ("redirect_uri", redirect),
                ("response_type", "code"),
                ("scope", scopes),
                ("sim_user", &user.to_string()),
            ])
            .send()
            .await
            .expect("authorize request");
        let location = res
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("authorize did not redirect ({})", res.status()));
        let code = url::Url::parse(&location)
            .expect("a redirect URL")
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("the redirect carries a code");
        self.exchange(&code, redirect).await["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned()
    }

    /// The token endpoint's answer to a code (client authenticated by HTTP Basic).
    pub async fn exchange(&self, code: &str, redirect: &str) -> Value {
        let settings = &self.sim.shared.settings;
        let res = self
            .http
            .post(self.url("/api/oauth2/token"))
            .basic_auth(
                settings.client_id.to_string(),
                Some(settings.client_secret.expose_secret()),
            )
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect),
            ])
            .send()
            .await
            .expect("token request");
        assert_eq!(res.status(), 200, "the code is exchanged");
        res.json().await.expect("token json")
    }

    /// A REST call with a user's bearer token: status and JSON body (null if none).
    pub async fn as_user(&self, token: &str, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(self.url(&format!("/api/v10{path}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("REST request");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// POSTs to the control API and returns the status and JSON body (null if none).
    pub async fn control(&self, path: &str, body: Value) -> (u16, Value) {
        let res = self
            .http
            .post(self.url(&format!("/_sim{path}")))
            .json(&body)
            .send()
            .await
            .expect("control request");
        let status = res.status().as_u16();
        let body = res.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Makes the REST API fail the next request matching `fault` once, as Discord would
    /// answer it (`method`, `path` with `*` for an id, `status`, and `code` or
    /// `retry_after` where Discord sends them).
    pub async fn fail_once(&self, fault: Value) {
        let (status, body) = self.control("/rest/fail", fault).await;
        assert_eq!(status, 204, "fault refused: {body}");
    }

    /// The id of a seeded user by username.
    pub async fn user(&self, username: &str) -> u64 {
        let state = self.state().await;
        state["users"]
            .as_array()
            .and_then(|users| users.iter().find(|u| u["username"] == username))
            .and_then(|u| u["id"].as_str())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no seeded user {username}"))
    }

    pub async fn id_of(&self, field: &str) -> u64 {
        self.state().await[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("state has no {field}"))
    }

    pub async fn join(&self, user: u64, channel: u64) {
        let (status, body) = self
            .control(
                "/voice",
                json!({"user_id": user.to_string(), "channel_id": channel.to_string()}),
            )
            .await;
        assert_eq!(status, 200, "join refused: {body}");
    }

    pub async fn gateway_counter(&self, name: &str) -> u64 {
        self.state().await["gateway"][name].as_u64().unwrap_or(0)
    }

    /// Any control API call: status and JSON body (null if none).
    pub async fn control_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(&format!("/_sim{path}")));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("control request");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Like `control_with`, failing the test unless the answer is a success.
    async fn control_ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.control_with(method.clone(), path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} /_sim{path} refused ({status}): {answer}"
        );
        answer
    }

    /// A channel made "in Discord" (`POST /_sim/channels`, which takes `name`, `type`,
    /// `parent_id`, `user_limit` and `permission_overwrites`); returns its id.
    pub async fn create_channel(&self, body: Value) -> u64 {
        let channel = self
            .control_ok(reqwest::Method::POST, "/channels", Some(body))
            .await;
        channel["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("the channel has an id")
    }

    /// A role made by an admin, with these permission bits; returns its id.
    pub async fn create_role(&self, name: &str, permissions: u64) -> u64 {
        let role = self
            .control_ok(
                reqwest::Method::POST,
                "/roles",
                Some(json!({"name": name, "permissions": permissions.to_string()})),
            )
            .await;
        role["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("the role has an id")
    }

    /// An admin sets a role's permissions (GUILD_ROLE_UPDATE).
    pub async fn set_role_permissions(&self, role: u64, permissions: u64) {
        self.control_ok(
            reqwest::Method::PATCH,
            &format!("/roles/{role}"),
            Some(json!({"permissions": permissions.to_string()})),
        )
        .await;
    }

    /// An admin gives a member a role (GUILD_MEMBER_UPDATE).
    pub async fn grant_role(&self, user: u64, role: u64) {
        self.control_ok(
            reqwest::Method::PUT,
            &format!("/members/{user}/roles/{role}"),
            None,
        )
        .await;
    }

    /// An admin takes a role from a member (GUILD_MEMBER_UPDATE).
    pub async fn revoke_role(&self, user: u64, role: u64) {
        self.control_ok(
            reqwest::Method::DELETE,
            &format!("/members/{user}/roles/{role}"),
            None,
        )
        .await;
    }

    /// An admin removes a member from the guild; they leave voice first.
    pub async fn remove_member(&self, user: u64) {
        self.control_ok(reqwest::Method::DELETE, &format!("/members/{user}"), None)
            .await;
    }

    /// An admin sets the overwrite for `target` (`kind` 0 = role, 1 = member) on a
    /// channel (CHANNEL_UPDATE).
    pub async fn set_overwrite(&self, channel: u64, target: u64, kind: u8, allow: u64, deny: u64) {
        self.control_ok(
            reqwest::Method::PUT,
            &format!("/channels/{channel}/permissions/{target}"),
            Some(json!({"type": kind, "allow": allow.to_string(), "deny": deny.to_string()})),
        )
        .await;
    }

    /// An admin deletes the overwrite for `target` on a channel (CHANNEL_UPDATE).
    pub async fn delete_overwrite(&self, channel: u64, target: u64) {
        self.control_ok(
            reqwest::Method::DELETE,
            &format!("/channels/{channel}/permissions/{target}"),
            None,
        )
        .await;
    }

    /// Every move made through REST Modify Guild Member, in order: (user, channel).
    pub async fn moves(&self) -> Vec<(u64, u64)> {
        let id = |v: &Value| v.as_str().and_then(|s| s.parse().ok()).expect("an id");
        self.state().await["moves"]
            .as_array()
            .expect("state lists moves")
            .iter()
            .map(|m| (id(&m["user_id"]), id(&m["channel_id"])))
            .collect()
    }
}

/// A shard for the simulator's bot with Coven's intents and no identify queue delay.
pub fn shard(sim: &TestSim) -> Shard {
    shard_with(sim, |c| c)
}

pub fn shard_with(sim: &TestSim, tweak: impl FnOnce(ConfigBuilder) -> ConfigBuilder) -> Shard {
    let config = ConfigBuilder::new(sim.token(), Intents::GUILDS | Intents::GUILD_VOICE_STATES)
        .proxy_url(sim.gateway_url())
        .queue(InMemoryQueue::new(0, 0, Duration::ZERO, 0));
    Shard::with_config(ShardId::ONE, tweak(config).build())
}

/// The next VOICE_STATE_UPDATE of `user`, skipping every other event.
pub async fn next_voice_state(shard: &mut Shard, user: u64) -> twilight_model::voice::VoiceState {
    match next_event(
        shard,
        |e| matches!(e, Event::VoiceStateUpdate(v) if v.0.user_id.get() == user),
    )
    .await
    {
        Event::VoiceStateUpdate(v) => v.0,
        other => unreachable!("matched a voice state, got {other:?}"),
    }
}

/// The next CHANNEL_UPDATE of `channel`, skipping every other event.
pub async fn next_channel_update(
    shard: &mut Shard,
    channel: u64,
) -> twilight_model::channel::Channel {
    match next_event(
        shard,
        |e| matches!(e, Event::ChannelUpdate(c) if c.0.id.get() == channel),
    )
    .await
    {
        Event::ChannelUpdate(c) => c.0,
        other => unreachable!("matched a channel update, got {other:?}"),
    }
}

/// The next event the predicate accepts, skipping others and reconnect errors. Fails the
/// test if the stream ends or the deadline passes.
pub async fn next_event(shard: &mut Shard, mut want: impl FnMut(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let item = tokio::time::timeout_at(deadline, shard.next_event(EventTypeFlags::all()))
            .await
            .unwrap_or_else(|_| panic!("no matching gateway event within {DEADLINE:?}"));
        match item {
            Some(Ok(event)) if want(&event) => return event,
            Some(Ok(event)) if std::env::var_os("TEST_LOG").is_some() => {
                eprintln!("skipping {:?}", event.kind());
            }
            Some(Err(e)) => {
                use std::error::Error;
                if let twilight_gateway::error::ReceiveMessageErrorType::Deserializing { event } =
                    e.kind()
                {
                    panic!(
                        "twilight could not read a simulator payload ({:?}): {event}",
                        e.source()
                    );
                }
            }
            Some(Ok(_)) => {}
            None => panic!("the shard stream ended (state {:?})", shard.state()),
        }
    }
}
