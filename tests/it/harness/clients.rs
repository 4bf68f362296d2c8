//! Runs a client library's scenario script (tests/clients/) against a simulator: the
//! script takes `--sim URL --token T SCENARIO`, prints `PASS`/`FAIL` lines and a closing
//! `RESULT <scenario> passed|failed`, and logs the library's own output on stderr.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::TestSim;

/// The longest one scenario may run (each check inside has its own deadline).
pub const SCENARIO_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `scenario` with `command` (the interpreter, the script and its environment) against
/// `sim`; fails with the script's report and the last `tail` lines of `library`'s log unless
/// the scenario passed. Answers the report.
pub async fn run_scenario(
    library: &str,
    mut command: Command,
    sim: &TestSim,
    scenario: &str,
    tail: usize,
) -> String {
    let mut child = command
        .arg("--sim")
        .arg(sim.url(""))
        .arg("--token")
        .arg(sim.token())
        .arg(scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {library}'s suite ({command:?}): {e}"));
    // Read both pipes as they come, so a scenario stopped at the deadline still shows
    // what it had said.
    let drain = |pipe: Option<Box<dyn AsyncRead + Unpin + Send>>| {
        tokio::spawn(async move {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out).await;
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let (exited_ok, status) = match tokio::time::timeout(SCENARIO_DEADLINE, child.wait()).await {
        Ok(Ok(status)) => (status.success(), status.to_string()),
        Ok(Err(e)) => (false, format!("not awaited: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            (false, format!("stopped after {SCENARIO_DEADLINE:?}"))
        }
    };
    let report = stdout.await.expect("the stdout reader");
    let log = stderr.await.expect("the stderr reader");
    let passed = format!("RESULT {scenario} passed");
    if !exited_ok || !report.lines().any(|l| l == passed) {
        let lines: Vec<&str> = log.lines().collect();
        let end = lines[lines.len().saturating_sub(tail)..].join("\n");
        panic!(
            "{library} scenario {scenario} failed ({status}):\n{report}\n\
             --- the end of {library}'s log ---\n{end}"
        );
    }
    report
}
