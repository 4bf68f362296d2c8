//! Redis over TLS (`rediss://`): a real TLS-only `redis-server` with a throwaway CA made
//! here by `openssl`. Coven talks TLS to it, and never talks in clear to a `rediss://`
//! URL: a plain-text server or an untrusted certificate is refused with one line.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::redis::free_port;
use crate::harness::sentinel::certificates;
use crate::harness::{CovenProcess, wait_for};

const GUILD: &str = "1190000000000000001";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis(dir: &Path, tls: bool) -> (Server, u16) {
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    if tls {
        cmd.args(["--port", "0", "--tls-port", &port.to_string()])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"]);
    } else {
        cmd.args(["--port", &port.to_string()]);
    }
    let child = cmd
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (Server(child), port)
}

fn publish(url: &str, ca: Option<&Path>) -> CovenProcess {
    let ca = ca.map(|p| p.display().to_string()).unwrap_or_default();
    let mut env = vec![("REDIS_URL", url), ("DISCORD_GUILD_ID", GUILD)];
    if !ca.is_empty() {
        env.push(("SSL_CERT_FILE", &ca));
    }
    CovenProcess::spawn(&["publish", "--ping", "--count", "3"], &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_is_tls_verified_against_the_ca_and_never_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (_tls, tls_port) = redis(dir.path(), true);
    let (_plain, plain_port) = redis(dir.path(), false);
    let ca = dir.path().join("ca.pem");

    // TLS with the CA: it works, for `coven publish` and for a web replica.
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let mut ok = publish(&url, Some(&ca));
    assert_eq!(ok.wait_exit(), Some(0), "{:?}", ok.stderr());
    assert!(
        ok.stdout().iter().any(|l| l.contains("published 3")),
        "{:?}",
        ok.stdout()
    );
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let public = format!("http://{bind}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let ca_text = ca.display().to_string();
    let mut web = CovenProcess::spawn(
        &["web"],
        &[
            ("BIND", &bind),
            ("METRICS_BIND", &metrics),
            ("PUBLIC_URL", &public),
            ("REDIS_URL", &url),
            ("SSL_CERT_FILE", &ca_text),
            ("DISCORD_GUILD_ID", GUILD),
            ("DISCORD_BOT_TOKEN", "sim-bot-token"),
            ("DISCORD_CLIENT_ID", "1190000000000000002"),
            ("DISCORD_CLIENT_SECRET", "sim-client-secret"),
            ("INVITE_SECRET", crate::harness::INVITE_SECRET),
        ],
    );
    web.wait_for_stdout("coven web listening on");
    wait_for("the replica over TLS to be ready", || async {
        let r = reqwest::get(format!("{public}/readyz")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    drop(web);

    // A plain-text server behind rediss://, an unknown CA, the wrong CA: refused, one
    // line that says what to check, nothing sent in clear.
    for (what, url, ca) in [
        (
            "a plain-text server",
            format!("rediss://127.0.0.1:{plain_port}"),
            Some(ca.clone()),
        ),
        ("no CA for it", url.clone(), None),
        (
            "another CA",
            url.clone(),
            Some(dir.path().join("other.pem")),
        ),
    ] {
        let mut refused = publish(&url, ca.as_deref());
        assert_ne!(refused.wait_exit(), Some(0), "{what}: accepted");
        let errors: Vec<String> = refused
            .stderr()
            .into_iter()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{what}: {errors:?}");
        assert!(
            errors[0].contains("over TLS") && errors[0].contains("SSL_CERT_FILE"),
            "{what}: {errors:?}"
        );
    }
}
