//! The `coven` binary as an operator meets it: settings errors, the startup banner,
//! `.env` files, secrets kept out of output, and a clean stop on SIGTERM.

use serde_json::Value;

use crate::harness::CovenProcess;

#[test]
fn every_bad_setting_is_reported_on_its_own_line_and_exits_2() {
    let mut p = CovenProcess::spawn(
        &["sim"],
        &[
            ("BIND", "not-an-address"),
            ("DISCORD_GUILD_ID", "abc"),
            ("SIM_RATE_WINDOW", "soon"),
            ("LOG_FORMAT", "xml"),
            ("DISCORD_BOT_TOKEN", "very-secret-token-value"),
        ],
    );
    assert_eq!(p.wait_exit(), Some(2));
    let err = p.stderr().join("\n");
    for setting in ["BIND", "DISCORD_GUILD_ID", "SIM_RATE_WINDOW", "LOG_FORMAT"] {
        let lines = err
            .lines()
            .filter(|l| l.starts_with(&format!("error: {setting}:")))
            .count();
        assert_eq!(lines, 1, "one line for {setting} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("very-secret-token-value"));
}

#[test]
fn unknown_flags_are_a_usage_error() {
    let mut p = CovenProcess::spawn(&["sim", "--no-such-flag"], &[]);
    assert_eq!(p.wait_exit(), Some(2));
}

#[tokio::test]
async fn the_sim_prints_where_it_listens_serves_and_stops_on_sigterm() {
    let mut p = CovenProcess::spawn(
        &["sim", "--bind", "127.0.0.1:0"],
        &[("DISCORD_BOT_TOKEN", "configured-secret-token")],
    );
    let url = p.listening_url();
    let state: Value = reqwest::get(format!("{url}/_sim/state"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        state["guild_id"],
        coven::sim::defaults::GUILD_ID.to_string()
    );
    p.signal("TERM");
    assert_eq!(p.wait_exit(), Some(0));
    let out = p.stdout().join("\n");
    assert!(
        out.contains("DISCORD_GUILD_ID=") && out.contains("(default)"),
        "{out}"
    );
    let all = format!("{out}\n{}", p.stderr().join("\n"));
    assert!(
        !all.contains("configured-secret-token"),
        "a configured secret was printed"
    );
}

#[tokio::test]
async fn dotenv_files_load_in_order_and_the_real_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "DISCORD_GUILD_ID=111\nDISCORD_CLIENT_ID=222\nSIM_RATE_LIMIT=3\n",
    )
    .unwrap();
    std::fs::write(dir.path().join(".env.local"), "DISCORD_CLIENT_ID=333\n").unwrap();
    std::fs::write(dir.path().join(".env.staging"), "DISCORD_GUILD_ID=444\n").unwrap();
    let mut p = CovenProcess::spawn_in(
        dir.path(),
        &["sim", "--bind", "127.0.0.1:0"],
        &[("COVEN_ENV", "staging"), ("SIM_RATE_LIMIT", "9")],
    );
    let url = p.listening_url();
    let state: Value = reqwest::get(format!("{url}/_sim/state"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["guild_id"], "444", ".env.staging beats .env");
    assert_eq!(state["client_id"], "333", ".env.local beats .env");
    let res = reqwest::Client::new()
        .get(format!("{url}/api/v10/users/@me"))
        .header("authorization", "Bot sim-bot-token")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["x-ratelimit-limit"],
        "9",
        "the real environment beats every file"
    );
}

#[test]
fn a_malformed_dotenv_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "THIS IS NOT\n'unterminated\n").unwrap();
    let mut p = CovenProcess::spawn_in(dir.path(), &["sim"], &[]);
    assert_eq!(p.wait_exit(), Some(2));
    assert!(p.stderr().join("\n").contains(".env"), "{:?}", p.stderr());
}

#[test]
fn the_gateway_names_every_missing_or_bad_setting() {
    let mut p = CovenProcess::spawn(
        &["gateway"],
        &[
            ("DISCORD_GATEWAY_URL", "https://gateway.discord.gg"),
            ("GATEWAY_LEASE_TTL", "10"),
            ("REDIS_URL", "http://user:hunter2@host"),
            // Optional in the gateway (unset: every guild), but each listed id must be one.
            ("DISCORD_GUILD_ID", "1190000000000000001,not-an-id"),
        ],
    );
    assert_eq!(p.wait_exit(), Some(2));
    let err = p.stderr().join("\n");
    for setting in [
        "REDIS_URL",
        "DISCORD_GUILD_ID",
        "DISCORD_BOT_TOKEN",
        "DISCORD_GATEWAY_URL",
        "GATEWAY_LEASE_TTL",
    ] {
        assert!(
            err.contains(&format!("error: {setting}:")),
            "{setting} missing in:\n{err}"
        );
    }
    assert!(
        !err.contains("hunter2"),
        "a Redis password was printed:\n{err}"
    );
}

#[test]
fn publish_refuses_data_that_does_not_fit_the_type() {
    let mut p = CovenProcess::spawn(
        &[
            "publish",
            "--type",
            "room.deleted",
            "--data",
            r#"{"channel": "5"}"#,
        ],
        &[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("DISCORD_GUILD_ID", "1"),
        ],
    );
    assert_eq!(p.wait_exit(), Some(2));
    assert!(
        p.stderr().join("\n").contains("error: --data:"),
        "{:?}",
        p.stderr()
    );
    let mut p = CovenProcess::spawn(
        &["publish", "--type", "room.exploded", "--data", "{}"],
        &[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("DISCORD_GUILD_ID", "1"),
        ],
    );
    assert_eq!(p.wait_exit(), Some(2));
    assert!(
        p.stderr().join("\n").contains("unknown event type"),
        "{:?}",
        p.stderr()
    );
}

/// Settings a command needs besides the one under test, none of them reached at start.
fn base_env(command: &str) -> Vec<(&'static str, &'static str)> {
    let redis = ("REDIS_URL", "redis://127.0.0.1:1");
    let guild = ("DISCORD_GUILD_ID", "1190000000000000001");
    match command {
        "web" => vec![
            redis,
            guild,
            ("DISCORD_BOT_TOKEN", "token"),
            ("DISCORD_CLIENT_ID", "1190000000000000002"),
            ("DISCORD_CLIENT_SECRET", "secret"),
            ("INVITE_SECRET", crate::harness::INVITE_SECRET),
        ],
        "gateway" => vec![redis, guild, ("DISCORD_BOT_TOKEN", "token")],
        "publish" => vec![redis, guild],
        _ => Vec::new(),
    }
}

/// The `error:` lines of a run that must stop at the settings stage.
fn refused(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut p = CovenProcess::spawn(args, env);
    let code = p.wait_exit();
    let err = p.stderr();
    assert_eq!(code, Some(2), "{args:?} {env:?} exits 2; stderr:\n{err:?}");
    assert!(!err.join("\n").contains("panicked"), "{err:?}");
    err.into_iter()
        .filter(|l| l.starts_with("error: "))
        .collect()
}

/// (command, setting, values out of its range): each is refused with exactly one line
/// naming the setting and the range.
const OUT_OF_RANGE: &[(&str, &str, &[&str])] = &[
    ("web", "STREAM_BUFFER", &["0", "65537", "1000000000000"]),
    ("web", "SESSION_TTL", &["9m", "91d"]),
    ("web", "INVITE_TTL", &["59s", "31d"]),
    ("web", "ROOM_MAX_PLAYERS", &["0", "100"]),
    ("web", "ROOM_IDLE_TIMEOUT", &["999ms", "8d"]),
    ("web", "ROOM_SWEEP_INTERVAL", &["99ms", "2h"]),
    ("web", "ROOM_CLOSE_WARNING", &["500ms", "61m"]),
    ("web", "DRAIN_TIMEOUT", &["0s", "11m"]),
    ("web", "VIEWER_TTL", &["2s", "11m"]),
    ("web", "STREAM_KEEPALIVE", &["999ms", "6m"]),
    ("web", "MEMBER_RECHECK", &["100ms", "2h"]),
    ("gateway", "GATEWAY_LEASE_TTL", &["1ms", "999ms", "61s"]),
    ("gateway", "EVENT_LOG_MAX_LEN", &["99", "10000001"]),
    ("gateway", "GATEWAY_QUEUE_SIZE", &["0", "100001"]),
    ("gateway", "REDIS_MIN_REPLICAS", &["-1", "17"]),
    ("gateway", "REDIS_REPLICA_TIMEOUT", &["9ms", "11s"]),
    ("web", "REDIS_MIN_REPLICAS", &["17"]),
    ("web", "REDIS_REPLICA_TIMEOUT", &["0s", "1m"]),
    ("sim", "SIM_HEARTBEAT_INTERVAL_MS", &["1", "600001"]),
    ("sim", "SIM_RESUME_TTL", &["10ms", "2h"]),
    ("sim", "SIM_TOKEN_TTL", &["100ms", "31d"]),
    ("sim", "SIM_RATE_LIMIT", &["0", "10001"]),
    ("sim", "SIM_RATE_WINDOW", &["1ms", "2h"]),
    ("sim", "SIM_GLOBAL_RATE_LIMIT", &["0", "100001"]),
    ("sim", "SIM_TOKEN_RATE_LIMIT", &["0", "10001"]),
    ("sim", "SIM_TOKEN_RATE_WINDOW", &["1ms", "2h"]),
    ("demo", "DEMO_PLAYER_INTERVAL", &["1ms", "11m"]),
];

#[test]
fn every_out_of_range_setting_is_refused_with_one_line_naming_it() {
    let cases: Vec<(&str, &str, &str)> = OUT_OF_RANGE
        .iter()
        .flat_map(|(cmd, setting, values)| values.iter().map(move |v| (*cmd, *setting, *v)))
        .collect();
    // Each case is its own process; they stop at the settings, so run them side by side.
    std::thread::scope(|s| {
        for chunk in cases.chunks(8) {
            s.spawn(move || {
                for (cmd, setting, value) in chunk {
                    let mut env = base_env(cmd);
                    env.push((setting, value));
                    let lines = refused(&[cmd], &env);
                    assert_eq!(
                        lines.len(),
                        1,
                        "{cmd} {setting}={value}: exactly one line: {lines:?}"
                    );
                    assert!(
                        lines[0].starts_with(&format!("error: {setting}: expected "))
                            && lines[0].contains(" from ")
                            && lines[0].contains(&format!("{value:?}")),
                        "{cmd} {setting}={value}: names it, its range and the value: {lines:?}"
                    );
                }
            });
        }
    });
}

#[test]
fn publish_refuses_counts_and_rates_out_of_range() {
    for (flag, value) in [
        ("--count", "0"),
        ("--count", "10000001"),
        ("--rate", "0"),
        ("--rate", "1e-300"),
        ("--rate", "NaN"),
        ("--rate", "inf"),
        ("--rate", "100001"),
    ] {
        let lines = refused(&["publish", "--ping", flag, value], &base_env("publish"));
        assert_eq!(lines.len(), 1, "{flag} {value}: {lines:?}");
        assert!(
            lines[0].starts_with(&format!("error: {flag}: expected a number from ")),
            "{lines:?}"
        );
    }
}

#[test]
fn several_bad_settings_give_one_line_each() {
    let mut env = base_env("web");
    env.extend([
        ("STREAM_BUFFER", "1000000000000"),
        ("SESSION_TTL", "1s"),
        ("VIEWER_TTL", "forever"),
        ("ROOM_MAX_PLAYERS", "-4"),
        ("PUBLIC_URL", "https://example.com/coven"),
        // Fine on their own, contradictory together.
        ("ROOM_IDLE_TIMEOUT", "1m"),
        ("ROOM_SWEEP_INTERVAL", "5m"),
    ]);
    let lines = refused(&["web"], &env);
    let names = [
        "STREAM_BUFFER",
        "SESSION_TTL",
        "VIEWER_TTL",
        "ROOM_MAX_PLAYERS",
        "PUBLIC_URL",
        "ROOM_SWEEP_INTERVAL",
    ];
    for name in names {
        let n = lines
            .iter()
            .filter(|l| l.starts_with(&format!("error: {name}: ")))
            .count();
        assert_eq!(n, 1, "one line for {name}: {lines:?}");
    }
    assert_eq!(lines.len(), names.len(), "nothing else: {lines:?}");
    let sweep = lines
        .iter()
        .find(|l| l.starts_with("error: ROOM_SWEEP_INTERVAL:"))
        .unwrap();
    assert!(sweep.contains("ROOM_IDLE_TIMEOUT (1m)"), "{sweep}");
}

#[test]
fn public_url_must_be_the_root_of_an_origin() {
    for (value, says) in [
        ("https://example.com/coven", "root of its origin"),
        ("https://example.com/coven/", "root of its origin"),
        ("https://example.com/?x=1", "query"),
        ("https://example.com/#rooms", "fragment"),
        ("https://admin:hunter2@example.com", "user name or password"),
    ] {
        let mut env = base_env("web");
        env.push(("PUBLIC_URL", value));
        let lines = refused(&["web"], &env);
        assert_eq!(lines.len(), 1, "{value}: {lines:?}");
        assert!(
            lines[0].starts_with("error: PUBLIC_URL: ") && lines[0].contains(says),
            "{value}: {lines:?}"
        );
        assert!(!lines[0].contains("hunter2"), "a password was printed");
    }
}

/// The settings of `every_out_of_range_setting...` at the ends of their ranges: each
/// command starts with all of them at once.
#[test]
fn boundary_values_are_accepted_and_the_commands_start() {
    let redis = crate::harness::RedisServer::start();
    let url = redis.url();
    for (idle, sweep, web) in [
        (
            "1s",
            "100ms",
            [
                ("STREAM_BUFFER", "1"),
                ("SESSION_TTL", "10m"),
                ("INVITE_TTL", "1m"),
                ("ROOM_MAX_PLAYERS", "1"),
                ("ROOM_CLOSE_WARNING", "1s"),
                ("DRAIN_TIMEOUT", "1s"),
                ("VIEWER_TTL", "3s"),
                ("STREAM_KEEPALIVE", "1s"),
                ("MEMBER_RECHECK", "1s"),
            ],
        ),
        (
            "7d",
            "1h",
            [
                ("STREAM_BUFFER", "65536"),
                ("SESSION_TTL", "90d"),
                ("INVITE_TTL", "30d"),
                ("ROOM_MAX_PLAYERS", "99"),
                ("ROOM_CLOSE_WARNING", "1h"),
                ("DRAIN_TIMEOUT", "10m"),
                ("VIEWER_TTL", "10m"),
                ("STREAM_KEEPALIVE", "5m"),
                ("MEMBER_RECHECK", "1h"),
            ],
        ),
    ] {
        let mut env = base_env("web");
        env.retain(|(k, _)| *k != "REDIS_URL");
        env.extend([
            ("REDIS_URL", url.as_str()),
            ("BIND", "127.0.0.1:0"),
            ("METRICS_BIND", "127.0.0.1:0"),
            ("PUBLIC_URL", "https://coven.example.com/"),
            ("ROOM_IDLE_TIMEOUT", idle),
            ("ROOM_SWEEP_INTERVAL", sweep),
        ]);
        env.extend(web);
        let mut p = CovenProcess::spawn(&["web"], &env);
        p.wait_for_stdout("coven web listening on");
    }
    for ends in [
        [
            ("GATEWAY_LEASE_TTL", "1s"),
            ("EVENT_LOG_MAX_LEN", "100"),
            ("GATEWAY_QUEUE_SIZE", "1"),
        ],
        [
            ("GATEWAY_LEASE_TTL", "1m"),
            ("EVENT_LOG_MAX_LEN", "10000000"),
            ("GATEWAY_QUEUE_SIZE", "100000"),
        ],
    ] {
        let mut env = base_env("gateway");
        env.extend([
            ("BIND", "127.0.0.1:0"),
            ("METRICS_BIND", "127.0.0.1:0"),
            ("DISCORD_GATEWAY_URL", "ws://127.0.0.1:1"),
        ]);
        env.extend(ends);
        let mut p = CovenProcess::spawn(&["gateway"], &env);
        p.wait_for_stdout("health listening on");
    }
    for ends in [
        [
            ("SIM_HEARTBEAT_INTERVAL_MS", "100"),
            ("SIM_RESUME_TTL", "1s"),
            ("SIM_TOKEN_TTL", "1s"),
            ("SIM_RATE_LIMIT", "1"),
            ("SIM_RATE_WINDOW", "100ms"),
            ("SIM_TOKEN_RATE_LIMIT", "1"),
            ("SIM_TOKEN_RATE_WINDOW", "100ms"),
        ],
        [
            ("SIM_HEARTBEAT_INTERVAL_MS", "600000"),
            ("SIM_RESUME_TTL", "1h"),
            ("SIM_TOKEN_TTL", "30d"),
            ("SIM_RATE_LIMIT", "10000"),
            ("SIM_RATE_WINDOW", "1h"),
            ("SIM_TOKEN_RATE_LIMIT", "10000"),
            ("SIM_TOKEN_RATE_WINDOW", "1h"),
        ],
    ] {
        let mut p = CovenProcess::spawn(&["sim", "--bind", "127.0.0.1:0"], &ends);
        p.listening_url();
    }
    for interval in ["100ms", "10m"] {
        let mut p = CovenProcess::spawn(
            &["--bind", "127.0.0.1:0", "--sim-bind", "127.0.0.1:0"],
            &[("DEMO_PLAYER_INTERVAL", interval)],
        );
        p.wait_for_stdout("Coven demo is running");
    }
    let guild = [
        ("DISCORD_GUILD_ID", "1190000000000000001"),
        ("REDIS_URL", url.as_str()),
    ];
    for (count, rate) in [("1", "0.01"), ("3", "100000")] {
        let mut p = CovenProcess::spawn(
            &["publish", "--ping", "--count", count, "--rate", rate],
            &guild,
        );
        assert_eq!(p.wait_exit(), Some(0), "{:?}", p.stderr());
        assert!(
            p.stdout()
                .join("\n")
                .contains(&format!("published {count} pings")),
            "{:?}",
            p.stdout()
        );
    }
}
