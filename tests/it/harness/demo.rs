//! The demo (`coven` with no command) as tests start it: one process on free ports, the
//! site and the simulated Discord in it.
//!
//! Owns: starting the demo and reading its addresses from what it prints. Must not: walk
//! the demo; the tests that use it say what a person does there.

use serde_json::Value;

use super::CovenProcess;

/// The demo on free ports: its process, the site's and the simulator's addresses.
pub struct Demo {
    pub process: CovenProcess,
    pub web: String,
    pub sim: String,
}

impl Demo {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["--bind", "127.0.0.1:0", "--sim-bind", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut process = CovenProcess::spawn(&all, env);
        let open = process.wait_for_stdout("Open http");
        let web = open
            .rsplit(' ')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        let sim_line = process.wait_for_stdout("Simulated Discord: ");
        let state = sim_line.rsplit(' ').next().unwrap();
        assert!(state.ends_with("/_sim/state"), "{sim_line}");
        let sim = state.trim_end_matches("/_sim/state").to_owned();
        Demo { process, web, sim }
    }

    /// The simulator's whole state.
    pub async fn state(&self) -> Value {
        reqwest::get(format!("{}/_sim/state", self.sim))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}
