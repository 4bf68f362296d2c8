//! Redis as production runs it for high availability: a primary, replicas and three
//! Sentinels, every one a real `redis-server` on a free port (sentinels run as
//! `redis-server <conf> --sentinel`), all over TLS with a throwaway CA made here by
//! `openssl`, the sentinels behind a password of their own; and plain-text nodes for
//! tests that need only a primary and its replica. Administration (who is primary,
//! freezing and killing nodes) goes through `redis-cli`, as an operator's would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::free_port;

/// The Sentinel service name the sentinels monitor.
pub const SERVICE: &str = "mymaster";
/// Sentinels' own password (`requirepass` on each sentinel, `sentinelPassword` in URLs).
pub const SENTINEL_PASSWORD: &str = "sentinel-secret-7f3a";
/// How long the sentinels wait before they call a silent primary down: more than five
/// seconds, so a failover outlasts Coven's old five-second command timeout.
pub const DOWN_AFTER_MS: u64 = 5_000;

/// A CA (`ca.pem`), a server certificate for 127.0.0.1 and localhost signed by it
/// (`server.pem`, `server.key`), and another CA that signed nothing (`other.pem`).
pub fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    let ca = |key: &str, pem: &str, cn: &str| {
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", pem, "-days",
            "1", "-subj", cn,
        ]);
    };
    ca("ca.key", "ca.pem", "/CN=Coven test CA");
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write ext.cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    ca("other.key", "other.pem", "/CN=Someone else");
}

/// One `redis-server` (a data node or a sentinel) that can be killed, frozen and
/// started again on its port.
pub struct Node {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn spawn(args: Vec<String>, port: u16) -> Self {
        let mut node = Node {
            port,
            args,
            child: None,
        };
        node.start_again();
        node
    }

    /// Starts the node again (after [`Node::kill`]) on its port with its settings.
    pub fn start_again(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/test.sh, which installs it)");
        self.child = Some(child);
        super::redis::wait_listening(self.port);
    }

    /// `kill -9`: the node dies as in a crash, its sockets closed by the kernel.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the node keeps its sockets open and answers nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Node::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running node").id();
        super::redis::signal(pid, signal);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGKILL ends a frozen process too.
        self.kill();
    }
}

/// A primary, `replicas` replicas and three sentinels, over TLS.
pub struct Sentinels {
    dir: tempfile::TempDir,
    pub primary: Node,
    pub replicas: Vec<Node>,
    pub sentinels: Vec<Node>,
}

impl Sentinels {
    /// Starts everything and waits until the sentinels know each other and every replica.
    pub fn start(replicas: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        certificates(dir.path());
        let primary = data_node(dir.path(), "primary", None);
        let replicas = (0..replicas)
            .map(|i| data_node(dir.path(), &format!("replica{i}"), Some(primary.port)))
            .collect();
        let sentinels = (0..3)
            .map(|i| sentinel(dir.path(), i, primary.port))
            .collect();
        let set = Sentinels {
            dir,
            primary,
            replicas,
            sentinels,
        };
        set.wait_until_monitored();
        set
    }

    /// Starts a fresh, empty data node as a replica of the node on `primary` (kept with
    /// the replicas); its port.
    pub fn attach_fresh(&mut self, name: &str, primary: u16) -> u16 {
        let node = data_node(self.dir.path(), name, Some(primary));
        let port = node.port;
        self.replicas.push(node);
        port
    }

    /// The PEM bundle Coven verifies every node with (`SSL_CERT_FILE`).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Coven's `REDIS_URL`: every sentinel, the service, database 0, the sentinels'
    /// credentials, TLS to sentinels and data nodes.
    pub fn url(&self) -> String {
        let nodes: String = self.sentinels[1..]
            .iter()
            .map(|s| format!("&node=127.0.0.1:{}", s.port))
            .collect();
        format!(
            "rediss-sentinel://127.0.0.1:{}/0?sentinelServiceName={SERVICE}{nodes}\
             &sentinelUsername=default&sentinelPassword={SENTINEL_PASSWORD}",
            self.sentinels[0].port
        )
    }

    /// `redis-cli` over TLS against the node on `port` (with the sentinels' password
    /// when `sentinel`); its output, or `None` when it could not ask.
    pub fn cli(&self, port: u16, sentinel: bool, args: &[&str]) -> Option<String> {
        // Bounded: a frozen node accepts the connection and never answers.
        let mut cmd = Command::new("timeout");
        cmd.args(["5", "redis-cli", "--tls", "--cacert"])
            .arg(self.ca())
            .args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        if sentinel {
            cmd.env("REDISCLI_AUTH", SENTINEL_PASSWORD);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.starts_with("ERR") && !text.contains("Could not connect"))
            .then_some(text)
    }

    /// The port of the node the first answering sentinel names as primary.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let out = self.cli(
                s.port,
                true,
                &["SENTINEL", "get-master-addr-by-name", SERVICE],
            )?;
            out.lines().nth(1)?.trim().parse().ok()
        })
    }

    /// `name:value` fields of `SENTINEL MASTER` as one sentinel sees them.
    fn master_fields(&self, sentinel: u16) -> Vec<(String, String)> {
        let out = self
            .cli(sentinel, true, &["SENTINEL", "MASTER", SERVICE])
            .unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter_map(|p| Some((p.first()?.to_string(), p.get(1)?.to_string())))
            .collect()
    }

    fn wait_until_monitored(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want_replicas = self.replicas.len().to_string();
        loop {
            let ready = self.sentinels.iter().all(|s| {
                let fields = self.master_fields(s.port);
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                field("num-slaves") == Some(want_replicas.as_str())
                    && field("num-other-sentinels") == Some("2")
                    && field("flags") == Some("master")
            }) && self.replicas.iter().all(|r| {
                self.cli(r.port, false, &["INFO", "replication"])
                    .is_some_and(|i| i.contains("master_link_status:up"))
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not come to monitor the primary and {want_replicas} replicas"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn tls_args(dir: &Path, port: u16) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--tls-cert-file".into(),
        file("server.pem"),
        "--tls-key-file".into(),
        file("server.key"),
        "--tls-ca-cert-file".into(),
        file("ca.pem"),
        "--tls-auth-clients".into(),
        "no".into(),
        // Replication (and sentinels' links to the nodes) over TLS too.
        "--tls-replication".into(),
        "yes".into(),
    ]
}

fn data_node(dir: &Path, name: &str, primary: Option<u16>) -> Node {
    let port = free_port();
    node(dir, name, primary, tls_args(dir, port), port)
}

/// A plain-text data node keeping its data in `dir/name`, a replica of the node on
/// `primary` when given.
pub fn plain_node(dir: &Path, name: &str, primary: Option<u16>) -> Node {
    let port = free_port();
    let args = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    node(dir, name, primary, args, port)
}

fn node(dir: &Path, name: &str, primary: Option<u16>, mut args: Vec<String>, port: u16) -> Node {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).expect("node dir");
    args.extend(
        // A replica (or a rejoining old primary) syncs at once: Redis would otherwise
        // wait five seconds for more replicas before a diskless sync.
        [
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push(data.display().to_string());
    if let Some(primary) = primary {
        args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ]);
    }
    Node::spawn(args, port)
}

fn sentinel(dir: &Path, i: usize, primary: u16) -> Node {
    let port = free_port();
    let own = dir.join(format!("sentinel{i}"));
    std::fs::create_dir_all(&own).expect("sentinel dir");
    let conf = own.join("sentinel.conf");
    // A file, not flags: a sentinel rewrites its configuration as it learns.
    let text = format!(
        "requirepass {SENTINEL_PASSWORD}\n\
         sentinel sentinel-pass {SENTINEL_PASSWORD}\n\
         dir {dir}\n\
         sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {SERVICE} 60000\n\
         sentinel parallel-syncs {SERVICE} 2\n",
        dir = own.display()
    );
    std::fs::write(&conf, text).expect("sentinel.conf");
    let mut args = vec![conf.display().to_string(), "--sentinel".into()];
    args.extend(tls_args(dir, port));
    Node::spawn(args, port)
}
