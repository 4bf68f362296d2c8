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
