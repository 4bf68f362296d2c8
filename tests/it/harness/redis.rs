//! A private `redis-server` per test on a free port, never the machine's shared one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
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

pub fn free_port() -> u16 {
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

/// The private Redis the integration tests rely on: it starts on its own port, answers,
/// and survives a restart, without touching the machine's shared server.
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
}
