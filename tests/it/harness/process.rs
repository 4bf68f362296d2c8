//! Real `coven` processes: spawned from the binary cargo built, in a scratch directory
//! (so no `.env` file of the developer's leaks in), with their output captured.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct CovenProcess {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

/// Settings that must not leak from the developer's shell into a test process.
const SCRUBBED: &[&str] = &[
    "REDIS_URL",
    "DISCORD_BOT_TOKEN",
    "DISCORD_CLIENT_ID",
    "DISCORD_CLIENT_SECRET",
    "DISCORD_GUILD_ID",
    "PRIMARY_GUILD_ID",
    "DISCORD_ROOM_CATEGORY_ID",
    "DISCORD_API_URL",
    "DISCORD_GATEWAY_URL",
    "DISCORD_OAUTH_URL",
    "DISCORD_APP_URL",
    "PUBLIC_URL",
    "BIND",
    "METRICS_BIND",
    "INVITE_SECRET",
    "COVEN_KEY_PREFIX",
    "RUST_LOG",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "COVEN_ENV",
    "SSL_CERT_FILE",
    // A developer's collector must not receive (or slow) test processes' traces.
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
];

/// Waiting on a process blocks the thread: tests that also serve something in-process
/// (the simulator) must use `#[tokio::test(flavor = "multi_thread")]`.
impl CovenProcess {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut p = Self::spawn_in(dir.path(), args, env);
        p._dir = Some(dir);
        p
    }

    pub fn spawn_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coven"));
        cmd.args(args);
        Self::start(cmd, dir, env)
    }

    /// Like [`Self::spawn`], with the open-file limit (soft and hard) set to `nofile`, as
    /// an operator's `ulimit -n` would.
    pub fn spawn_with_nofile(nofile: u64, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg(env!("CARGO_BIN_EXE_coven"))
            .args(args);
        let mut p = Self::start(cmd, dir.path(), env);
        p._dir = Some(dir);
        p
    }

    fn start(mut cmd: Command, dir: &Path, env: &[(&str, &str)]) -> Self {
        cmd.current_dir(dir);
        for k in SCRUBBED {
            cmd.env_remove(k);
        }
        // An empty value unsets (`DISCORD_GUILD_ID=""`: every guild).
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn coven");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, stdout.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(collect(err, stderr.clone()));
        }
        Self {
            child,
            stdout,
            stderr,
            readers,
            _dir: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for a stdout line containing `needle` and returns it.
    pub fn wait_for_stdout(&mut self, needle: &str) -> String {
        self.started(needle).unwrap_or_else(|exit| panic!("{exit}"))
    }

    /// Waits for a stdout line containing `needle`; if the process exits first, why (its
    /// status and stderr), for a caller that can start it again.
    pub fn started(&mut self, needle: &str) -> Result<String, String> {
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            if let Some(line) = self.stdout().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "coven exited ({status}) before printing {needle:?}; stderr:\n{}",
                    self.stderr().join("\n")
                ));
            }
            assert!(
                Instant::now() < deadline,
                "coven did not print {needle:?} in time; stderr:\n{}",
                self.stderr().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `http://host:port` from a "listening on" line.
    pub fn listening_url(&mut self) -> String {
        let line = self.wait_for_stdout("listening on ");
        line.rsplit(' ')
            .next()
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned()
    }

    /// The `http://host:port/metrics` from a "metrics at" line (METRICS_BIND).
    pub fn metrics_url(&mut self) -> String {
        let line = self.wait_for_stdout("metrics at ");
        line.rsplit(' ').next().unwrap_or_default().to_owned()
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + super::DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // The readers end at EOF, once they hold everything the process wrote.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status.code();
            }
            assert!(Instant::now() < deadline, "coven did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `coven` to its end and expects it to succeed (its stderr shown if not).
    pub fn run_ok(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut process = Self::spawn(args, env);
        let code = tokio::task::block_in_place(|| process.wait_exit());
        assert_eq!(code, Some(0), "coven {args:?}: {:?}", process.stderr());
        process
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CovenProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    stream: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("[coven] {line}");
            }
            if let Ok(mut l) = into.lock() {
                l.push(line);
            }
        }
    })
}
