//! The `coven` command line: parses flags, turns them into checked settings, sets up
//! logging and the runtime, and runs one command. Owns exit codes: 2 for bad settings or
//! usage, 1 for a failure at run time. Must not hold any command's logic.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, LogArgs, Problem};
use crate::{demo, gateway, publish, sim, telemetry, web};

#[derive(Debug, Parser)]
#[command(
    name = "coven",
    version,
    about = "A Discord community's voice rooms on the web, live",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no command, coven runs the all-in-one demo.
    #[command(flatten)]
    pub default: demo::Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hold the guild's Discord Gateway session and publish its events to Redis
    Gateway(gateway::Settings),
    /// Serve the pages, posts and live stream (any number of replicas)
    Web(Box<web::Settings>),
    /// Append an event (or a series of pings) through the gateway's atomic path
    Publish(publish::Settings),
    /// A local Discord (Gateway, REST, OAuth2, control API) for development, tests and demos
    Sim(sim::Settings),
    /// Everything in one process against the simulator, with simulated players (the default)
    Demo(demo::Settings),
}

/// What a command needs to run, all settings checked.
enum Plan {
    Gateway(gateway::Settings),
    Publish(publish::Settings, publish::What),
    Web(Box<web::Settings>),
    Sim(sim::Settings),
    Demo(demo::Settings),
}

impl Plan {
    /// The command, as traces name the process (`coven.command`).
    fn name(&self) -> &'static str {
        match self {
            Plan::Gateway(_) => "gateway",
            Plan::Publish(..) => "publish",
            Plan::Web(_) => "web",
            Plan::Sim(_) => "sim",
            Plan::Demo(_) => "demo",
        }
    }
}

pub fn main() -> ExitCode {
    if let Err(problem) = config::load_dotenv() {
        eprintln!("error: {problem}");
        return ExitCode::from(2);
    }
    match config::parse(std::env::args_os().collect(), contradictions) {
        Ok(cli) => run(cli),
        Err(problems) => bad_settings(problems),
    }
}

/// Settings of a command that are each fine but contradict each other.
fn contradictions(command: &str, parsed: &config::Parsed) -> Vec<Problem> {
    match command {
        "web" => web::contradictions(parsed),
        "sim" => sim::contradictions(parsed),
        _ => Vec::new(),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let plan = match cli.command.unwrap_or(Command::Demo(cli.default)) {
        Command::Gateway(settings) => Plan::Gateway(settings),
        Command::Publish(settings) => match settings.what() {
            Ok(what) => Plan::Publish(settings, what),
            Err(problem) => return bad_settings(vec![problem]),
        },
        Command::Web(settings) => Plan::Web(settings),
        Command::Sim(settings) => Plan::Sim(settings),
        Command::Demo(settings) => Plan::Demo(settings),
    };
    let traces = match config::trace_settings(|name| std::env::var(name).ok()) {
        Ok(traces) => traces,
        Err(problems) => return bad_settings(problems),
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let telemetry = {
        let _runtime = runtime.enter();
        telemetry::init(&cli.log.settings(), traces.as_ref(), plan.name())
    };
    let result = runtime.block_on(async move {
        let shutdown = shutdown_on_signal();
        match plan {
            Plan::Gateway(settings) => match gateway::command(settings, shutdown).await {
                Ok(gateway::Outcome::Stopped) => Ok(ExitCode::SUCCESS),
                Ok(gateway::Outcome::Fatal { code, cause }) => {
                    tracing::error!(code, cause, "the Discord Gateway refused the session");
                    eprintln!("error: {cause} (Gateway close code {code}); not retrying");
                    Ok(ExitCode::from(2))
                }
                Ok(gateway::Outcome::Refused(line)) => {
                    eprintln!("error: {line}");
                    Ok(ExitCode::from(2))
                }
                Err(e) => Err(e),
            },
            Plan::Publish(settings, what) => publish::command(settings, what)
                .await
                .map(|()| ExitCode::SUCCESS),
            Plan::Web(settings) => web::command(*settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS),
            Plan::Demo(settings) => demo::command(settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS),
            Plan::Sim(settings) => sim::run(settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    });
    // Before the runtime goes: the exporter's last requests run on it.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn bad_settings(problems: Vec<Problem>) -> ExitCode {
    for problem in problems {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "(settings come from flags, the environment and .env files; see docs/configuration.md)"
    );
    ExitCode::from(2)
}

/// A token cancelled on SIGINT or SIGTERM, so every command shuts down the same way.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed_and_every_declared_default_parses() {
        Cli::command().debug_assert();
        let web = web::Tuning::default();
        assert_eq!(web.bind.to_string(), web::DEFAULT_BIND);
        assert_eq!(gateway::Tuning::default().lease_ttl.as_secs(), 10);
        assert_eq!(sim::Settings::default().guild_id, sim::defaults::GUILD_ID);
    }

    fn problems(args: &str) -> Vec<String> {
        let args = std::iter::once("coven").chain(args.split_whitespace());
        match config::parse::<Cli>(args.map(Into::into).collect(), contradictions) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn contradictions_are_found_among_settings_fine_on_their_own() {
        let web = "web --redis-url redis://127.0.0.1:1 --discord-guild-id 1 \
                   --discord-bot-token t --discord-client-id 2 --discord-client-secret s \
                   --invite-secret 0123456789abcdef0123456789abcdef";
        assert_eq!(problems(web), Vec::<String>::new());
        let sweep = problems(&format!(
            "{web} --room-idle-timeout 1m --room-sweep-interval 5m --stream-buffer 0"
        ));
        assert_eq!(sweep.len(), 2, "{sweep:?}");
        assert!(
            sweep[1].starts_with("ROOM_SWEEP_INTERVAL: got 5m"),
            "{sweep:?}"
        );
        let sim = problems("sim --discord-guild-id 5 --discord-client-id 5");
        assert_eq!(
            sim,
            ["DISCORD_CLIENT_ID: must differ from DISCORD_GUILD_ID"]
        );
        // The simulator's other guilds keep their ids: the first may not take one.
        for taken in [
            sim::defaults::NIGHT_OWLS_GUILD_ID,
            sim::defaults::generated_guild_id(9_999),
        ] {
            assert_eq!(
                problems(&format!("sim --discord-guild-id {taken}")),
                ["DISCORD_GUILD_ID: must differ from the ids of the other seeded guilds"]
            );
        }
        let beyond = sim::defaults::generated_guild_id(10_000);
        assert_eq!(
            problems(&format!("sim --discord-guild-id {beyond}")),
            Vec::<String>::new()
        );
    }
}
