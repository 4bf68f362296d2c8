//! A real local Redis Cluster: six `redis-server --cluster-enabled yes` (three primaries
//! with a replica each) on free ports, each with an explicit `--cluster-port` (the bus) on
//! a free port of its own and its own directory, joined by `redis-cli --cluster create`.
//! Administration (who owns a slot, killing, freezing, migrating a slot) goes through
//! `redis-cli`, as an operator's would.
//!
//! [`Cluster::shared`] is one cluster for every test of a run that only reads and writes
//! its own guilds' keys; a test that kills, freezes or migrates starts its own with
//! [`Cluster::start`]. Every node runs under a small `sh` watchdog that kills it once the
//! test process is gone (the shared cluster is never dropped, and a test binary killed
//! outright runs no destructor); a private cluster also kills its nodes when dropped, a
//! failed test's unwinding included.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::redis::free_port;

/// How long the cluster may take to form, fail over or settle a migration.
const SETTLE: Duration = Duration::from_secs(40);

/// One node: the `redis-server` process (its pid, to signal) under its watchdog.
struct ClusterNode {
    port: u16,
    args: Vec<String>,
    /// The watchdog `sh`, parent of the server.
    watchdog: Option<Child>,
    /// The server's own pid, while it runs.
    pid: Option<u32>,
}

impl ClusterNode {
    fn spawn(dir: &Path, port: u16, tls: bool) -> Self {
        let own = dir.join(port.to_string());
        std::fs::create_dir_all(&own).expect("node dir");
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &free_port().to_string(),
            "--cluster-config-file",
            &own.join("nodes.conf").display().to_string(),
            "--cluster-node-timeout",
            "2000",
            "--save",
            "",
            "--appendonly",
            "no",
            // A replica (or an old primary rejoining as one) syncs at once.
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            &own.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if tls {
            // TLS only: clients, the cluster bus and replication (the plain port is off).
            let file = |name: &str| dir.join(name).display().to_string();
            let at = args.iter().position(|a| a == "--port").expect("--port");
            args[at + 1] = "0".to_owned();
            args.extend([
                "--tls-port".to_owned(),
                port.to_string(),
                "--tls-cluster".to_owned(),
                "yes".to_owned(),
                "--tls-replication".to_owned(),
                "yes".to_owned(),
                "--tls-cert-file".to_owned(),
                file("server.pem"),
                "--tls-key-file".to_owned(),
                file("server.key"),
                "--tls-ca-cert-file".to_owned(),
                file("ca.pem"),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ]);
        }
        let mut node = ClusterNode {
            port,
            args,
            watchdog: None,
            pid: None,
        };
        node.start();
        node
    }

    /// Starts the server (again, after [`ClusterNode::kill`]: with its `nodes.conf`, so it
    /// rejoins as itself).
    fn start(&mut self) {
        let script = format!(
            "redis-server \"$@\" >/dev/null 2>&1 & r=$!; echo $r; \
             while kill -0 $r 2>/dev/null; do \
               kill -0 {test} 2>/dev/null || {{ kill -9 $r; break; }}; sleep 1; \
             done; wait $r",
            test = std::process::id()
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh runs (redis-server: run scripts/test.sh, which installs it)");
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().expect("watchdog stdout"))
            .read_line(&mut line)
            .expect("the server's pid");
        self.pid = Some(line.trim().parse().expect("a pid"));
        self.watchdog = Some(watchdog);
        super::redis::wait_listening(self.port);
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid {
            super::redis::signal(pid, signal);
        }
    }

    /// `kill -9`, as in a crash; its watchdog goes too. A server already gone is no
    /// error (this runs on drop, a failed test's included).
    fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        // SIGKILL ends a frozen server too.
        self.kill();
    }
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// The primary's id, for a replica.
    pub replica_of: Option<String>,
    /// Marked failing (`fail` or `fail?`) by the node asked.
    pub failing: bool,
    /// Slot ranges it serves (inclusive).
    pub slots: Vec<(u16, u16)>,
}

pub struct Cluster {
    // Dropped first (fields drop in order): the nodes stop before their directory goes,
    // which a node would otherwise find gone when it next saves its cluster config.
    nodes: Mutex<Vec<ClusterNode>>,
    /// Nodes killed or frozen by the test: never asked anything.
    down: Mutex<Vec<u16>>,
    /// Every node speaks TLS only, with the certificates in `dir` (`ca.pem`).
    tls: bool,
    dir: tempfile::TempDir,
}

/// The ACL user of a secure cluster, and its password.
pub const ACL_USER: &str = "coven";
pub const ACL_PASSWORD: &str = "coven-secret";
const ACL_PASSWORD_ARG: &str = ">coven-secret";

/// `redis-cli`'s flags for a TLS-only node.
fn tls_cli_args(tls: bool, dir: &Path) -> Vec<String> {
    if tls {
        vec![
            "--tls".to_owned(),
            "--cacert".to_owned(),
            dir.join("ca.pem").display().to_string(),
        ]
    } else {
        Vec::new()
    }
}

/// The slot of `key` (its hash tag's, when it has one), as Redis and fred compute it.
pub fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

impl Cluster {
    /// The run's shared cluster, started by the first test that asks. For tests that only
    /// touch their own guilds' keys: never kill, freeze or migrate on it.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    /// Six nodes, three primaries with a replica each, once every node says
    /// `cluster_state:ok` and every replica is linked. Blocks.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// [`Cluster::start`] with TLS only (clients, cluster bus, replication), verified
    /// against [`Cluster::ca`], and an ACL user `coven` (password `coven-secret`) on
    /// every node besides `default`.
    pub fn start_secure() -> Self {
        let cluster = Self::start_with(true);
        for port in cluster.ports() {
            cluster
                .cli(
                    port,
                    &[
                        "ACL",
                        "SETUSER",
                        ACL_USER,
                        "on",
                        ACL_PASSWORD_ARG,
                        "~*",
                        "&*",
                        "+@all",
                    ],
                )
                .expect("ACL SETUSER");
        }
        cluster
    }

    /// The PEM bundle a secure cluster's certificates are signed by (`SSL_CERT_FILE`).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A secure cluster's `REDIS_URL`: TLS, the ACL user, every node.
    pub fn secure_url(&self, password: &str) -> String {
        let ports = self.ports();
        let nodes: String = ports[1..]
            .iter()
            .map(|p| format!("&node=127.0.0.1:{p}"))
            .collect();
        format!(
            "rediss-cluster://{ACL_USER}:{password}@127.0.0.1:{}?{}",
            ports[0],
            &nodes[1..]
        )
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        if tls {
            super::sentinel::certificates(dir.path());
        }
        let nodes: Vec<ClusterNode> = (0..6)
            .map(|_| ClusterNode::spawn(dir.path(), free_port(), tls))
            .collect();
        let mut create = tls_cli_args(tls, dir.path());
        create.extend(["--cluster".to_owned(), "create".to_owned()]);
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = Command::new("timeout")
            .arg("60")
            .arg("redis-cli")
            .args(&create)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster {
            nodes: Mutex::new(nodes),
            down: Mutex::new(Vec::new()),
            tls,
            dir,
        };
        cluster.wait_healthy();
        cluster
    }

    fn nodes(&self) -> MutexGuard<'_, Vec<ClusterNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn down(&self) -> MutexGuard<'_, Vec<u16>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes().iter().map(|n| n.port).collect()
    }

    /// Ports of the nodes that run and answer (not killed, not frozen).
    pub fn live_ports(&self) -> Vec<u16> {
        let down = self.down().clone();
        self.ports()
            .into_iter()
            .filter(|p| !down.contains(p))
            .collect()
    }

    /// Coven's `REDIS_URL`: every node.
    pub fn url(&self) -> String {
        let ports = self.ports();
        let nodes: String = ports[1..]
            .iter()
            .map(|p| format!("&node=127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://127.0.0.1:{}?{}", ports[0], &nodes[1..])
    }

    /// `redis-cli` against one node (no `-c`: the node's own answer, MOVED included); its
    /// output, or `None` when it could not ask.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        // Bounded: a frozen node accepts the connection and never answers.
        let out = Command::new("timeout")
            .args(["5", "redis-cli"])
            .args(tls_cli_args(self.tls, self.dir.path()))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.starts_with("ERR") && !text.contains("Could not connect"))
            .then_some(text)
    }

    /// The cluster id of the node on `port`.
    fn node_id(&self, port: u16) -> String {
        self.topology()
            .into_iter()
            .find(|n| n.port == port)
            .map(|n| n.id)
            .expect("a node id")
    }

    /// Runs an administrative command that must succeed.
    fn must(&self, port: u16, args: &[&str]) {
        let out = self.cli(port, args);
        assert!(
            out.as_deref().is_some_and(|o| !o.contains("ERR")),
            "{args:?} on {port}: {out:?}"
        );
    }

    /// `CLUSTER NODES` as the node on `port` sees the cluster.
    pub fn topology_from(&self, port: u16) -> Option<Vec<NodeInfo>> {
        let out = self.cli(port, &["CLUSTER", "NODES"])?;
        Some(out.lines().filter_map(parse_node).collect())
    }

    /// `CLUSTER NODES` as the first live node that answers sees it.
    pub fn topology(&self) -> Vec<NodeInfo> {
        self.live_ports()
            .into_iter()
            .find_map(|p| self.topology_from(p))
            .expect("a live node answers CLUSTER NODES")
    }

    /// The primary serving `slot` and its replicas' ports, as the live nodes agree (waits
    /// until they do).
    pub fn owner_of_slot(&self, slot: u16) -> (u16, Vec<u16>) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let views: Vec<Option<(u16, Vec<u16>)>> = self
                .live_ports()
                .into_iter()
                .map(|p| owner_in(&self.topology_from(p)?, slot))
                .collect();
            if let Some(Some(first)) = views.first()
                && views.iter().all(|v| v.as_ref() == Some(first))
            {
                return first.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the live nodes do not agree who serves slot {slot}: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The primary holding `key`'s slot and its replicas.
    pub fn owner(&self, key: &str) -> (u16, Vec<u16>) {
        self.owner_of_slot(slot(key))
    }

    /// The primaries' ports.
    pub fn primaries(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self
            .topology()
            .iter()
            .filter(|n| n.primary && !n.failing && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        out.sort_unstable();
        out
    }

    /// `kill -9` of the node on `port`.
    pub fn kill(&self, port: u16) {
        let mut nodes = self.nodes();
        let node = nodes.iter_mut().find(|n| n.port == port).expect("a node");
        node.kill();
        self.down().push(port);
    }

    /// Starts a killed node again; it rejoins (as a replica, once its slots were taken
    /// over).
    pub fn restart(&self, port: u16) {
        let mut nodes = self.nodes();
        let node = nodes.iter_mut().find(|n| n.port == port).expect("a node");
        node.start();
        self.down().retain(|p| *p != port);
    }

    /// SIGSTOP: the node keeps its sockets open and answers nothing.
    pub fn freeze(&self, port: u16) {
        let nodes = self.nodes();
        nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node")
            .signal("-STOP");
        self.down().push(port);
    }

    /// SIGCONT after [`Cluster::freeze`].
    pub fn thaw(&self, port: u16) {
        let nodes = self.nodes();
        nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node")
            .signal("-CONT");
        self.down().retain(|p| *p != port);
    }

    /// Waits until every live node says `cluster_state:ok`, every live replica is linked to
    /// its primary, and every live node sees the same primary for every slot.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy: {:?}",
                self.live_ports()
                    .into_iter()
                    .map(|p| (p, self.cli(p, &["CLUSTER", "INFO"])))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn healthy(&self) -> bool {
        let live = self.live_ports();
        let ok = live.iter().all(|p| {
            self.cli(*p, &["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
        });
        if !ok {
            return false;
        }
        let mut views = Vec::new();
        for p in &live {
            let Some(nodes) = self.topology_from(*p) else {
                return false;
            };
            let me = nodes.iter().find(|n| n.port == *p);
            if me.is_some_and(|n| !n.primary)
                && !self
                    .cli(*p, &["INFO", "replication"])
                    .is_some_and(|i| i.contains("master_link_status:up"))
            {
                return false;
            }
            let mut owners: Vec<(u16, u16, u16)> = nodes
                .iter()
                .filter(|n| n.primary)
                .flat_map(|n| n.slots.iter().map(move |(a, b)| (*a, *b, n.port)))
                .collect();
            owners.sort_unstable();
            views.push(owners);
        }
        views.windows(2).all(|w| w[0] == w[1])
            && views.first().is_some_and(|v| {
                v.iter().map(|(a, b, _)| u32::from(b - a) + 1).sum::<u32>() == 16384
            })
    }

    /// Waits until the live nodes agree that a primary other than `old` serves `slot`;
    /// that primary's port.
    pub fn wait_new_owner(&self, slot: u16, old: u16) -> u16 {
        let deadline = Instant::now() + SETTLE;
        loop {
            let views: Vec<Option<u16>> = self
                .live_ports()
                .into_iter()
                .map(|p| owner_in(&self.topology_from(p)?, slot).map(|(o, _)| o))
                .collect();
            if let Some(Some(first)) = views.first()
                && *first != old
                && views.iter().all(|v| *v == Some(*first))
            {
                return *first;
            }
            assert!(
                Instant::now() < deadline,
                "no new primary for slot {slot} (was {old}): {views:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Moves `slot` to the primary on `to` as `redis-cli --cluster reshard` does, while
    /// clients keep using it: IMPORTING on the target, MIGRATING on the source, the keys
    /// moved in batches with MIGRATE, then SETSLOT NODE on the target, the source and
    /// every other primary.
    pub fn migrate(&self, slot: u16, to: u16) {
        let from = self.move_keys(slot, to);
        self.assign(slot, from, to);
    }

    /// The first half of [`Cluster::migrate`]: `slot` is MIGRATING on its owner, IMPORTING
    /// on `to`, and its keys are on `to`, so its owner answers ASK for them until
    /// [`Cluster::assign`]. The owner's port.
    pub fn move_keys(&self, slot: u16, to: u16) -> u16 {
        let (from, _) = self.owner_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let slot_s = slot.to_string();
        self.must(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]);
        self.must(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]);
        loop {
            let keys = self
                .cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])
                .expect("GETKEYSINSLOT");
            let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_s = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_s, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let out = self.cli(from, &args);
            assert!(
                out.as_deref()
                    .is_some_and(|o| o.contains("OK") || o.contains("NOKEY")),
                "MIGRATE: {out:?}"
            );
        }
        from
    }

    /// The second half of [`Cluster::migrate`]: SETSLOT NODE on `to`, on `from` and on
    /// every other primary, then waits until every live node agrees.
    pub fn assign(&self, slot: u16, from: u16, to: u16) {
        let to_id = self.node_id(to);
        let slot_s = slot.to_string();
        self.must(to, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        self.must(from, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        for other in self.primaries() {
            if other != from && other != to {
                self.must(other, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
            }
        }
        let deadline = Instant::now() + SETTLE;
        while self.owner_of_slot(slot).0 != to {
            assert!(
                Instant::now() < deadline,
                "slot {slot} did not move to {to}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `INFO commandstats` of the node on `port`: the `calls` of each `cmdstat_<name>`.
    pub fn command_calls(&self, port: u16) -> Vec<(String, u64)> {
        let info = self
            .cli(port, &["INFO", "commandstats"])
            .unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .split(',')
                    .find_map(|f| f.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// `PUBSUB SHARDNUMSUB channel` on the node on `port`.
    pub fn shard_subscribers(&self, port: u16, channel: &str) -> Option<u64> {
        let out = self.cli(port, &["PUBSUB", "SHARDNUMSUB", channel])?;
        out.lines().nth(1)?.trim().parse().ok()
    }
}

/// The primary serving `slot` in `nodes`, and its replicas.
pub fn owner_in(nodes: &[NodeInfo], slot: u16) -> Option<(u16, Vec<u16>)> {
    let primary = nodes.iter().find(|n| {
        n.primary && !n.failing && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    })?;
    let mut replicas: Vec<u16> = nodes
        .iter()
        .filter(|n| n.replica_of.as_deref() == Some(primary.id.as_str()))
        .map(|n| n.port)
        .collect();
    replicas.sort_unstable();
    Some((primary.port, replicas))
}

/// One line of `CLUSTER NODES`: `<id> <ip:port@cport> <flags> <primary> <ping> <pong>
/// <epoch> <link> <slot>...`.
fn parse_node(line: &str) -> Option<NodeInfo> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields
        .get(1)?
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags: Vec<&str> = fields.get(2)?.split(',').collect();
    let slots = fields
        .iter()
        .skip(8)
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => {
                let one = s.parse().ok()?;
                Some((one, one))
            }
        })
        .collect();
    Some(NodeInfo {
        id: fields.first()?.to_string(),
        port,
        primary: flags.contains(&"master"),
        replica_of: fields.get(3).filter(|p| **p != "-").map(|p| p.to_string()),
        failing: flags.contains(&"fail") || flags.contains(&"fail?"),
        slots,
    })
}
