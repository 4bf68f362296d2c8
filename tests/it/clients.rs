//! Client libraries written by other people, unmodified, against the simulator with only
//! their base URLs changed (issue [6/6]): discord.py from PyPI, through
//! `tests/clients/discordpy_suite.py` in the virtual environment `scripts/test.sh` makes
//! (its python named by `COVEN_CLIENTS_PYTHON`), one test per scenario on a simulator of
//! its own; and twilight (ours) for what `sim_gateway` and `sim_rest` do not drive: the
//! REST calls Coven makes each with its dispatch on a shard, global and shared 429s, and
//! the routes bots call first.

use std::time::{Duration, Instant};

use coven::sim::Settings;
use serde_json::{Value, json};
use twilight_gateway::Event;
use twilight_model::channel::ChannelType;
use twilight_model::channel::permission_overwrite::PermissionOverwrite;
use twilight_model::guild::Permissions;
use twilight_model::http::permission_overwrite::{
    PermissionOverwrite as NewOverwrite, PermissionOverwriteType as NewKind,
};
use twilight_model::id::Id;

use crate::harness::clients::run_scenario;
use crate::harness::{TestSim, next_channel_update, next_event, next_voice_state, shard};

/// Runs one scenario of the discord.py suite against a fresh simulator; fails with the
/// suite's report and the end of discord.py's log unless every check passed.
async fn discordpy(scenario: &str) {
    discordpy_with(scenario, |_| {}).await;
}

async fn discordpy_with(scenario: &str, tweak: impl FnOnce(&mut Settings)) {
    discordpy_in("COVEN_CLIENTS_PYTHON", scenario, tweak).await;
}

/// Runs one scenario with the python `var` names (a virtual environment of
/// `scripts/test.sh`); answers the suite's report and the simulator's Gateway counters.
async fn discordpy_in(
    var: &str,
    scenario: &str,
    tweak: impl FnOnce(&mut Settings),
) -> (String, Value) {
    let Some(python) = std::env::var_os(var) else {
        panic!(
            "{var} is not set: run scripts/test.sh, which makes the client suite's virtual \
             environments (discord.py as pinned in tests/clients/requirements.txt, and with \
             zstd in requirements-zstd.txt) and points COVEN_CLIENTS_PYTHON and \
             COVEN_CLIENTS_PYTHON_ZSTD at their pythons (or run `python3 -m venv \
             target/clients-venv && target/clients-venv/bin/pip install -r \
             tests/clients/requirements.txt` and export \
             COVEN_CLIENTS_PYTHON=target/clients-venv/bin/python)"
        );
    };
    let sim = TestSim::start_with(tweak).await;
    let mut command = tokio::process::Command::new(&python);
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/discordpy_suite.py"
        ))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let report = run_scenario("discord.py", command, &sim, scenario, 60).await;
    (report, sim.state().await["gateway"].clone())
}

/// discord.py said it asked for `compression`, and the sim answered every connection in
/// it (`counter` in `/_sim/state`): a sim that answered in text would still be read.
fn assert_compressed(report: &str, gateway: &Value, compression: &str, counter: &str) {
    assert!(
        report
            .lines()
            .any(|l| l == format!("INFO compression {compression}")),
        "discord.py did not ask for {compression}:\n{report}"
    );
    let connections = gateway["connections"].as_u64().unwrap_or(0);
    assert!(connections > 0, "{gateway}");
    assert_eq!(gateway[counter].as_u64(), Some(connections), "{gateway}");
}

/// discord.py with zstd asks for `compress=zstd-stream` (on Python 3.14 it always has
/// zstd): it logs in, sees voice and resumes over the one zstd stream a connection keeps.
#[tokio::test]
async fn discordpy_over_zstd_stream_logs_in_sees_voice_and_resumes() {
    for scenario in ["login_and_cache", "voice_updates", "resume"] {
        let (report, gateway) = discordpy_in("COVEN_CLIENTS_PYTHON_ZSTD", scenario, |_| {}).await;
        assert_compressed(&report, &gateway, "zstd-stream", "zstd_stream_connections");
    }
}

/// discord.py logs in with its defaults (zlib-stream transport compression), and its
/// cache matches the simulator's state.
#[tokio::test]
async fn discordpy_logs_in_and_its_cache_matches_the_simulator() {
    let (report, gateway) = discordpy_in("COVEN_CLIENTS_PYTHON", "login_and_cache", |_| {}).await;
    assert_compressed(&report, &gateway, "zlib-stream", "zlib_stream_connections");
}

#[tokio::test]
async fn discordpy_sees_players_join_move_and_leave_voice() {
    discordpy("voice_updates").await;
}

#[tokio::test]
async fn discordpy_makes_covens_rest_calls_and_gets_each_dispatch() {
    discordpy("rest_with_dispatches").await;
}

#[tokio::test]
async fn discordpy_makes_the_calls_bots_make_first() {
    discordpy("first_calls").await;
}

#[tokio::test]
async fn discordpy_finds_every_documented_param_honoured_or_refused() {
    discordpy("every_param").await;
}

#[tokio::test]
async fn discordpy_sees_guilds_go_down_come_back_leave_and_join() {
    discordpy("guild_lifecycle").await;
}

#[tokio::test]
async fn discordpy_resumes_after_op7_and_misses_no_dispatch() {
    discordpy("resume").await;
}

#[tokio::test]
async fn discordpy_resumes_after_a_resumable_op9_and_misses_no_dispatch() {
    discordpy("resume_after_op9").await;
}

#[tokio::test]
async fn discordpy_resumes_after_a_4000_close_and_misses_no_dispatch() {
    discordpy("resume_after_close").await;
}

#[tokio::test]
async fn discordpy_identifies_again_after_a_non_resumable_op9() {
    discordpy("reidentify").await;
}

#[tokio::test]
async fn discordpy_waits_out_a_route_429() {
    discordpy("rate_limit_route").await;
}

#[tokio::test]
async fn discordpy_waits_out_a_global_429() {
    discordpy("rate_limit_global").await;
}

#[tokio::test]
async fn discordpy_waits_out_a_shared_429() {
    discordpy("rate_limit_shared").await;
}

#[tokio::test]
async fn discordpy_detects_a_zombied_connection_and_resumes() {
    discordpy("zombie").await;
}

#[tokio::test]
async fn discordpy_autoshards_over_the_two_shards_gateway_bot_recommends() {
    discordpy_with("two_shards", |s| s.shards = Some(2)).await;
}

// ---------------------------------------------------------------------------------------
// twilight, where sim_gateway and sim_rest do not already drive it.

/// Each REST call Coven makes, through twilight-http, and the dispatch each brings on a
/// twilight shard (none for a member's roles: GUILD_MEMBER_UPDATE needs the privileged
/// GUILD_MEMBERS intent, which Coven does not ask for).
#[tokio::test]
async fn twilight_rest_calls_coven_makes_each_bring_their_dispatch() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let bot = sim.id_of("bot_id").await;
    let category = Id::new(sim.id_of("room_category_id").await);
    let lobby = sim.id_of("lobby_id").await;
    let player = sim.user("hollow").await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let role = http
        .create_role(guild)
        .name("Room: lantern")
        .permissions(Permissions::VIEW_CHANNEL | Permissions::CONNECT)
        .await
        .expect("create role")
        .model()
        .await
        .expect("role model");
    let Event::RoleCreate(created) = next_event(
        &mut shard,
        |e| matches!(e, Event::RoleCreate(r) if r.role.id == role.id),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (created.guild_id, created.role.name.as_str()),
        (guild, "Room: lantern")
    );

    http.update_role(guild, role.id)
        .name(Some("Room: candle"))
        .await
        .expect("update role");
    let Event::RoleUpdate(updated) = next_event(
        &mut shard,
        |e| matches!(e, Event::RoleUpdate(r) if r.role.id == role.id),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(updated.role.name, "Room: candle");

    // The overwrites Coven gives a room, made by Coven's own code.
    let overwrites = coven::access::room_overwrites(guild, role.id, Id::new(player), Id::new(bot));
    let room = http
        .create_guild_channel(guild, "lantern")
        .kind(ChannelType::GuildVoice)
        .parent_id(category)
        .user_limit(4)
        .permission_overwrites(&overwrites)
        .await
        .expect("create channel")
        .model()
        .await
        .expect("channel model")
        .id;
    let Event::ChannelCreate(made) = next_event(
        &mut shard,
        |e| matches!(e, Event::ChannelCreate(c) if c.id == room),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (made.parent_id, made.user_limit, made.kind),
        (Some(category), Some(4), ChannelType::GuildVoice)
    );
    let mut have = made.permission_overwrites.clone().unwrap_or_default();
    have.sort_by_key(|o| o.id);
    let mut want = overwrites.clone();
    want.sort_by_key(|o| o.id);
    assert_eq!(
        have, want,
        "the dispatched overwrites are the ones asked for"
    );

    http.update_channel_permission(
        room,
        &NewOverwrite {
            allow: Some(Permissions::VIEW_CHANNEL),
            deny: Some(Permissions::CONNECT),
            id: role.id.cast(),
            kind: NewKind::Role,
        },
    )
    .await
    .expect("edit one overwrite");
    let changed = next_channel_update(&mut shard, room.get()).await;
    let of_role = |overwrites: &[PermissionOverwrite]| {
        overwrites
            .iter()
            .find(|o| o.id == role.id.cast())
            .map(|o| (o.allow, o.deny))
    };
    assert_eq!(
        of_role(changed.permission_overwrites.as_deref().unwrap_or_default()),
        Some((Permissions::VIEW_CHANNEL, Permissions::CONNECT))
    );

    http.update_channel(room)
        .permission_overwrites(&overwrites)
        .await
        .expect("edit the overwrites");
    let changed = next_channel_update(&mut shard, room.get()).await;
    assert_eq!(
        of_role(changed.permission_overwrites.as_deref().unwrap_or_default()),
        of_role(&overwrites)
    );

    http.add_guild_member_role(guild, Id::new(player), role.id)
        .await
        .expect("grant the role");
    assert_eq!(
        member_roles(&sim, player).await,
        json!([role.id.to_string()])
    );
    http.remove_guild_member_role(guild, Id::new(player), role.id)
        .await
        .expect("take the role");
    assert_eq!(member_roles(&sim, player).await, json!([]));

    sim.join(player, lobby).await;
    next_event(
        &mut shard,
        |e| matches!(e, Event::VoiceStateUpdate(v) if v.0.user_id.get() == player),
    )
    .await;
    http.update_guild_member(guild, Id::new(player))
        .channel_id(Some(room))
        .await
        .expect("move the player into the room");
    let moved = next_voice_state(&mut shard, player).await;
    assert_eq!(moved.channel_id, Some(room));
    http.update_guild_member(guild, Id::new(player))
        .channel_id(None)
        .await
        .expect("disconnect the player");
    let left = next_voice_state(&mut shard, player).await;
    assert_eq!(left.channel_id, None, "disconnected");

    http.delete_role(guild, role.id).await.expect("delete role");
    let Event::RoleDelete(gone) = next_event(
        &mut shard,
        |e| matches!(e, Event::RoleDelete(r) if r.role_id == role.id),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(gone.guild_id, guild);
    http.delete_channel(room).await.expect("delete channel");
    next_event(
        &mut shard,
        |e| matches!(e, Event::ChannelDelete(c) if c.id == room),
    )
    .await;
}

/// A member's role ids as the simulator holds them.
async fn member_roles(sim: &TestSim, user: u64) -> Value {
    let id = user.to_string();
    sim.state().await["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["user_id"] == id.as_str()))
        .map_or(Value::Null, |m| m["roles"].clone())
}

/// An injected 429 of `scope`, raw: the headers and body Discord sends with it.
async fn raw_429(sim: &TestSim, fault: Value) -> (reqwest::header::HeaderMap, Value) {
    sim.fail_once(fault).await;
    let res = sim
        .http
        .post(sim.url(&format!("/api/v10/guilds/{}/roles", sim.guild_id())))
        .header("authorization", format!("Bot {}", sim.token()))
        .json(&json!({"name": "raw"}))
        .send()
        .await
        .expect("REST request");
    assert_eq!(res.status(), 429);
    let headers = res.headers().clone();
    (headers, res.json().await.expect("a JSON 429 body"))
}

/// "Rate Limits": a shared 429 says `X-RateLimit-Scope: shared` and `global: false`; a
/// global one `X-RateLimit-Global: true`, scope `global` and `global: true`; both with
/// `Retry-After` and `Via`, which discord.py needs to tell them from a Cloudflare ban.
#[tokio::test]
async fn forced_429s_carry_discords_scope_headers() {
    let sim = TestSim::start().await;
    let path = json!("/guilds/*/roles");
    let (h, body) = raw_429(
        &sim,
        json!({"method": "POST", "path": path, "status": 429, "retry_after": 1.5, "scope": "shared"}),
    )
    .await;
    assert_eq!(h["x-ratelimit-scope"], "shared");
    assert!(!h.contains_key("x-ratelimit-global"));
    assert_eq!(
        (h["retry-after"].to_str().ok(), h["via"].to_str().ok()),
        (Some("2"), Some("1.1 google"))
    );
    assert_eq!(
        (body["global"].clone(), body["retry_after"].clone()),
        (json!(false), json!(1.5))
    );
    let (h, body) = raw_429(
        &sim,
        json!({"method": "POST", "path": path, "status": 429, "retry_after": 1.5, "global": true}),
    )
    .await;
    assert_eq!(
        (
            h["x-ratelimit-scope"].to_str().ok(),
            h["x-ratelimit-global"].to_str().ok()
        ),
        (Some("global"), Some("true"))
    );
    assert_eq!(body["global"], true);
    let (status, _) = sim
        .control(
            "/rest/fail",
            json!({"path": path, "status": 429, "scope": "everyone"}),
        )
        .await;
    assert_eq!(status, 400, "an unknown scope is refused");
}

/// twilight-http takes a shared 429's `Retry-After` as its bucket's wait
/// (`RateLimitHeaders::shared`): it waits, then the call succeeds once.
#[tokio::test]
async fn twilight_waits_out_a_shared_429() {
    let sim = TestSim::start().await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let before = sim.state().await["roles"].as_array().map_or(0, Vec::len);
    sim.fail_once(
        json!({"method": "POST", "path": "/guilds/*/roles", "status": 429,
        "retry_after": 1.5, "scope": "shared"}),
    )
    .await;
    let started = Instant::now();
    http.create_role(guild)
        .name("shared")
        .await
        .expect("succeeds after the wait");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1_400),
        "retried after {waited:?}, before the advertised 1.5 s"
    );
    let after = sim.state().await["roles"].as_array().map_or(0, Vec::len);
    assert_eq!(after, before + 1, "one role made");
}

/// A global 429: twilight-http 0.18 reads no wait from it (`parse_ratelimit_headers`
/// answers `None` for scope `global`; it paces itself by its own global limit instead)
/// and asks again; the simulator's injected 429 is one answer, so the call succeeds once
/// without error. The simulator does not hold the global limit for `retry_after`
/// (see docs/simulator.md), so this test cannot show twilight waiting.
#[tokio::test]
async fn twilight_gets_through_a_global_429() {
    let sim = TestSim::start().await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let before = sim.state().await["roles"].as_array().map_or(0, Vec::len);
    let limited = sim.state().await["rest"]["rate_limited"]
        .as_u64()
        .unwrap_or(0);
    sim.fail_once(
        json!({"method": "POST", "path": "/guilds/*/roles", "status": 429,
        "retry_after": 0.5, "global": true}),
    )
    .await;
    let started = Instant::now();
    http.create_role(guild)
        .name("global")
        .await
        .expect("succeeds once the global limit is over");
    let state = sim.state().await;
    assert_eq!(
        state["roles"].as_array().map_or(0, Vec::len),
        before + 1,
        "one role made"
    );
    // The limit holds for the advertised 0.5 s, so the call succeeds only after it...
    assert!(started.elapsed() >= Duration::from_millis(450));
    // ...and twilight-http 0.18 does not wait on a global 429 (it reads no headers
    // with scope `global`, response/future.rs, and asks again at once): what it sent in
    // the meantime was refused too, as Discord would refuse it.
    let refused = state["rest"]["rate_limited"].as_u64().unwrap_or(0) - limited;
    assert!(
        refused >= 1,
        "twilight asked again inside the global limit: {refused}"
    );
}

/// The routes bots call first, through twilight-http: Get Guild, Get Guild Roles, Get
/// User and Modify Current Member, whose change reaches the bot's shard as
/// GUILD_MEMBER_UPDATE (sent for the bot's own member whatever its intents).
#[tokio::test]
async fn twilight_makes_the_calls_bots_make_first() {
    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let bot = sim.id_of("bot_id").await;
    let roles = sim.state().await["roles"].as_array().map_or(0, Vec::len);
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let got = http
        .guild(guild)
        .with_counts(true)
        .await
        .expect("Get Guild")
        .model()
        .await
        .expect("guild model");
    assert_eq!((got.id, got.name.as_str()), (guild, "Coven Playgroup"));
    let got = http
        .roles(guild)
        .await
        .expect("Get Guild Roles")
        .models()
        .await
        .expect("role models");
    assert_eq!(got.len(), roles);
    let bramble = sim.user("bramble").await;
    let got = http
        .user(Id::new(bramble))
        .await
        .expect("Get User")
        .model()
        .await
        .expect("user model");
    assert_eq!(got.name, "bramble");
    let res = http
        .update_current_member(guild)
        .nick(Some("Coven (sim)"))
        .await
        .expect("Modify Current Member");
    assert_eq!(res.status().get(), 200);
    let Event::MemberUpdate(me) = next_event(
        &mut shard,
        |e| matches!(e, Event::MemberUpdate(m) if m.user.id.get() == bot),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(me.nick.as_deref(), Some("Coven (sim)"));
}

/// Documented params of the routes the simulator serves, through twilight-http: each is
/// honoured with its dispatch or refused as Discord refuses it, never answered 200 and
/// dropped (Modify Guild Member's roles, mute, deaf and nick; Modify Channel's
/// parent_id and bitrate; Modify Guild Channel Positions; Modify Guild Role Positions).
#[tokio::test]
async fn twilight_finds_every_documented_param_honoured_or_refused() {
    use twilight_model::guild::RolePosition;
    use twilight_model::http::channel_position::Position;

    let sim = TestSim::start_with(|s| s.rate_limit = 100).await;
    let http = sim.twilight_http();
    let guild = Id::new(sim.guild_id());
    let category = Id::new(sim.id_of("room_category_id").await);
    let lobby = sim.id_of("lobby_id").await;
    let player = sim.user("fable").await;
    let mut shard = shard(&sim);
    next_event(&mut shard, |e| matches!(e, Event::GuildCreate(_))).await;

    let role = http
        .create_role(guild)
        .name("Regular")
        .await
        .expect("create role")
        .model()
        .await
        .expect("role model");
    http.update_guild_member(guild, Id::new(player))
        .roles(&[role.id])
        .await
        .expect("Modify Guild Member roles");
    assert_eq!(
        member_roles(&sim, player).await,
        json!([role.id.to_string()]),
        "Modify Guild Member's roles are the member's roles"
    );

    sim.join(player, lobby).await;
    next_event(
        &mut shard,
        |e| matches!(e, Event::VoiceStateUpdate(v) if v.0.user_id.get() == player),
    )
    .await;
    http.update_guild_member(guild, Id::new(player))
        .mute(true)
        .deaf(true)
        .await
        .expect("Modify Guild Member mute and deaf");
    let muted = next_voice_state(&mut shard, player).await;
    assert_eq!(
        (muted.mute, muted.deaf, muted.channel_id),
        (true, true, Some(Id::new(lobby)))
    );

    // The bot has Change Nickname (its own), not Manage Nicknames.
    let refused = http
        .update_guild_member(guild, Id::new(player))
        .nick(Some("Fabulous"))
        .await;
    match refused {
        Err(e) => assert!(
            matches!(e.kind(), twilight_http::error::ErrorType::Response { status, .. } if status.get() == 403),
            "{e:?}"
        ),
        Ok(_) => panic!("a nick without Manage Nicknames was accepted"),
    }

    http.update_channel(Id::new(lobby))
        .parent_id(Some(category))
        .bitrate(48_000)
        .await
        .expect("Modify Channel parent_id and bitrate");
    let moved = next_channel_update(&mut shard, lobby).await;
    assert_eq!(
        (moved.parent_id, moved.bitrate),
        (Some(category), Some(48_000))
    );

    let second = http
        .create_guild_channel(guild, "second")
        .kind(ChannelType::GuildVoice)
        .await
        .expect("create channel")
        .model()
        .await
        .expect("channel model")
        .id;
    http.update_guild_channel_positions(
        guild,
        &[Position {
            id: second,
            lock_permissions: None,
            parent_id: None,
            position: Some(Some(0)),
        }],
    )
    .await
    .expect("Modify Guild Channel Positions");
    let placed = next_channel_update(&mut shard, second.get()).await;
    assert_eq!(placed.position, Some(0));

    let below = http
        .create_role(guild)
        .name("Below")
        .await
        .expect("create role")
        .model()
        .await
        .expect("role model");
    // A new role comes in at position 1 and moves no other ("roles with the same
    // position are sorted by id"): put Regular just above Below.
    let want = below.position + 1;
    http.update_role_positions(
        guild,
        &[RolePosition {
            id: role.id,
            position: want as u64,
        }],
    )
    .await
    .expect("Modify Guild Role Positions");
    let Event::RoleUpdate(placed) = next_event(
        &mut shard,
        |e| matches!(e, Event::RoleUpdate(r) if r.role.id == role.id),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(placed.role.position, want);
}
