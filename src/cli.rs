//! The `coven` command line: parses flags, turns them into checked settings, sets up
//! logging and the runtime, and runs one command. Owns exit codes: 2 for bad settings or
//! usage, 1 for a failure at run time. Must not hold any command's logic.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, LogArgs, Reader};
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
    pub default: demo::Args,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Hold the guild's Discord Gateway session and publish its events to Redis
    Gateway(gateway::Args),
    /// Serve the pages, posts and live stream (any number of replicas)
    Web(Box<web::Args>),
    /// Append an event (or a series of pings) through the gateway's atomic path
    Publish(publish::Args),
    /// A local Discord (Gateway, REST, OAuth2, control API) for development, tests and demos
    Sim(sim::Args),
    /// Everything in one process against the simulator, with simulated players (the default)
    Demo(demo::Args),
}

/// What a command needs to run, all settings checked.
enum Plan {
    Gateway(gateway::Settings),
    Publish(publish::Settings),
    Web(Box<web::Settings>),
    Sim(sim::Settings),
    Demo(Box<demo::Settings>),
}

pub fn main() -> ExitCode {
    if let Err(problem) = config::load_dotenv() {
        eprintln!("error: {problem}");
        return ExitCode::from(2);
    }
    run(Cli::parse())
}

pub fn run(cli: Cli) -> ExitCode {
    let mut reader = Reader::new();
    let log = cli.log.settings(&mut reader);
    let plan = match cli.command {
        Some(Command::Gateway(args)) => args.settings(&mut reader).map(Plan::Gateway),
        Some(Command::Publish(args)) => args.settings(&mut reader).map(Plan::Publish),
        Some(Command::Web(args)) => args.settings(&mut reader).map(|s| Plan::Web(Box::new(s))),
        Some(Command::Sim(args)) => args.settings(&mut reader).map(Plan::Sim),
        Some(Command::Demo(args)) => args.settings(&mut reader).map(|s| Plan::Demo(Box::new(s))),
        None => cli
            .default
            .settings(&mut reader)
            .map(|s| Plan::Demo(Box::new(s))),
    };
    let (Some(log), Some(plan)) = (log, plan) else {
        return bad_settings(reader);
    };
    if reader.finish().is_err() {
        // Unreachable: every parser that records a problem also returns None.
        return ExitCode::from(2);
    }
    telemetry::init(&log);

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
                Err(e) => Err(e),
            },
            Plan::Publish(settings) => publish::command(settings).await.map(|()| ExitCode::SUCCESS),
            Plan::Web(settings) => web::command(*settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS),
            Plan::Demo(settings) => demo::command(*settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS),
            Plan::Sim(settings) => sim::run(settings, shutdown)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn bad_settings(reader: Reader) -> ExitCode {
    for problem in reader.into_problems().0 {
        eprintln!("error: {problem}");
    }
    eprintln!("(settings come from flags, the environment and .env files; see README.md)");
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
