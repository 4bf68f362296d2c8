//! discord.js, unmodified, against the simulator with only its base URL changed (issue
//! [6/6]): discord.js from npm, pinned in `tests/clients/discordjs/package.json` and its
//! lock, through `tests/clients/discordjs/suite.js`, with the `node_modules` that
//! `scripts/test.sh` installs (named by `COVEN_CLIENTS_NODE_MODULES`); one test per
//! scenario on a simulator of its own. Its REST base is the `rest.api` option of
//! `Client`; its Gateway URL the one `GET /gateway/bot` gives.

use coven::sim::Settings;

use crate::harness::TestSim;
use crate::harness::clients::run_scenario;

/// Runs one scenario of the discord.js suite against a fresh simulator; fails with the
/// suite's report and the end of discord.js's log unless every check passed.
async fn discordjs(scenario: &str) {
    discordjs_with(scenario, |_| {}).await;
}

async fn discordjs_with(scenario: &str, tweak: impl FnOnce(&mut Settings)) {
    let Some(modules) = std::env::var_os("COVEN_CLIENTS_NODE_MODULES") else {
        panic!(
            "COVEN_CLIENTS_NODE_MODULES is not set: run scripts/test.sh, which installs \
             discord.js as pinned in tests/clients/discordjs/package-lock.json (`npm ci` \
             into target/clients-node) and points COVEN_CLIENTS_NODE_MODULES at its \
             node_modules (or run `mkdir -p target/clients-node && cp \
             tests/clients/discordjs/package*.json target/clients-node && npm ci --prefix \
             target/clients-node` and export \
             COVEN_CLIENTS_NODE_MODULES=$PWD/target/clients-node/node_modules)"
        );
    };
    let installed = std::path::Path::new(&modules).join("discord.js/package.json");
    assert!(
        installed.is_file(),
        "COVEN_CLIENTS_NODE_MODULES is {modules:?}, which has no discord.js: run \
         scripts/test.sh, which installs it there with npm ci"
    );
    let sim = TestSim::start_with(tweak).await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/discordjs/suite.js"
        ))
        .env("NODE_PATH", &modules);
    run_scenario("discord.js", command, &sim, scenario, 80).await;
}

#[tokio::test]
async fn discordjs_logs_in_and_its_cache_matches_the_simulator() {
    discordjs("login_and_cache").await;
}

#[tokio::test]
async fn discordjs_sees_players_join_move_and_leave_voice() {
    discordjs("voice_updates").await;
}

#[tokio::test]
async fn discordjs_makes_covens_rest_calls_and_gets_each_dispatch() {
    discordjs("rest_with_dispatches").await;
}

#[tokio::test]
async fn discordjs_makes_the_calls_bots_make_first() {
    discordjs("first_calls").await;
}

#[tokio::test]
async fn discordjs_finds_every_documented_param_honoured_or_refused() {
    discordjs("every_param").await;
}

#[tokio::test]
async fn discordjs_waits_out_a_route_429() {
    discordjs("rate_limit_route").await;
}

#[tokio::test]
async fn discordjs_waits_out_a_global_429() {
    discordjs("rate_limit_global").await;
}

#[tokio::test]
async fn discordjs_waits_out_a_shared_429() {
    discordjs("rate_limit_shared").await;
}

#[tokio::test]
async fn discordjs_resumes_after_op7_and_misses_no_dispatch() {
    discordjs("resume").await;
}

#[tokio::test]
async fn discordjs_identifies_again_after_a_non_resumable_op9() {
    discordjs("reidentify").await;
}

#[tokio::test]
async fn discordjs_detects_a_zombied_connection_and_resumes() {
    discordjs("zombie").await;
}

#[tokio::test]
async fn discordjs_shards_auto_over_the_two_shards_gateway_bot_recommends() {
    discordjs_with("two_shards", |s| s.shards = Some(2)).await;
}
