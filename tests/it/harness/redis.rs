//! A private `redis-server` per test on a free port, never the machine's shared one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    persistent: bool,
}

impl RedisServer {
    /// A server that keeps nothing on disk (a restart empties it).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server with an append-only file fsynced on every write, as production runs
    /// Redis: a restart keeps the log, the snapshot, leases and the stored session.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // A port is free when we probe it; another process could take it before redis
        // binds, so retry a few times on failure.
        for _ in 0..5 {
            let port = free_port();
            let child = command(port, dir.path(), persistent).spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    panic!("redis-server is not installed: run scripts/test.sh, which installs it")
                }
                Err(e) => panic!("cannot start redis-server: {e}"),
            };
            if wait_for_pong(port, &mut child) {
                return Self {
                    port,
                    child: Some(child),
                    _dir: dir,
                    persistent,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server did not come up on a free port after 5 tries");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (as a crash would) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Kills the server, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on its port (with its data, when persistent).
    pub fn start_again(&mut self) {
        let mut child = command(self.port, self._dir.path(), self.persistent)
            .spawn()
            .expect("restart redis-server");
        assert!(
            wait_for_pong(self.port, &mut child),
            "redis-server did not come back on port {}",
            self.port
        );
        self.child = Some(child);
    }
}

fn command(port: u16, dir: &std::path::Path, persistent: bool) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    if persistent {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    cmd.arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits (up to 10 s) until a server listens on `port`.
pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` (`-STOP`, `-CONT`, ...) to the process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {signal} {pid}");
}

/// A port for a server a test starts, free when asked. Drawn from below the kernel's
/// ephemeral range (`ip_local_port_range`), which `bind(0)` and every outgoing connection
/// take their ports from, and never handed out twice in a run: so nothing in the suite
/// can take it between here and the server binding it (a port from `bind(0)` could go to
/// the next outgoing connection). A port something else listens on is skipped.
pub fn free_port() -> u16 {
    static RANGE: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let range = RANGE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let ephemeral: u32 = text.split_whitespace().next()?.parse().ok()?;
        let span = ephemeral.checked_sub(LOW).filter(|&s| s >= 1_000)?;
        // Another run at the same time (a second checkout's suite) starts elsewhere.
        Some((span, std::process::id().wrapping_mul(7_919) % span))
    });
    if let Some((span, start)) = *range {
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let Ok(port) = u16::try_from(LOW + (start + n) % span) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_pong(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false; // exited: most likely the port was taken
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The private Redis the integration tests rely on (it starts on its own port, answers,
/// and survives a restart, without touching the machine's shared server) and the ports
/// their servers are started on.
#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_private_redis_starts_answers_and_restarts() {
        use super::RedisServer;
        use fred::prelude::*;

        let mut redis = RedisServer::start();
        assert_ne!(redis.port, 6379);
        let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
        client.init().await.expect("connects");
        let _: () = client.set("k", "v", None, None, false).await.unwrap();
        let v: String = client.get("k").await.unwrap();
        assert_eq!(v, "v");
        client.quit().await.unwrap();

        redis.restart();
        let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
        client.init().await.expect("connects after restart");
        let gone: Option<String> = client.get("k").await.unwrap();
        assert_eq!(gone, None, "a restarted test server starts empty");
    }

    /// What makes a handed-out port safe to bind later: no other call in the run gets
    /// it, and neither `bind(0)` nor an outgoing connection can.
    #[test]
    fn ports_are_handed_out_once_and_never_from_the_ephemeral_range() {
        let ports: Vec<u16> = (0..300).map(|_| super::free_port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("Linux says its ephemeral range");
        let low: u16 = range
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a number");
        assert!(
            ports.iter().all(|&p| p < low),
            "a port from the ephemeral range (from {low}): {ports:?}"
        );
    }
}
