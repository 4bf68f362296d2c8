//! The deployment files against the binary: every compose service's command, flags,
//! environment, port and healthcheck must be something `coven` really accepts and
//! serves, and `.env.example` must list every setting. A renamed flag or route fails
//! here instead of in someone's production.

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;
use yaml_rust2::{Yaml, YamlLoader};

use crate::harness::redis::free_port;
use crate::harness::{Browser, Stack, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Settings read from the environment outside clap: RUST_LOG by tracing, COVEN_ENV by the .env loader, SSL_CERT_FILE by
/// rustls-native-certs (the CAs for `rediss://`), and the OpenTelemetry specification's
/// own variables (config::trace_settings and the SDK; docs/configuration.md, "Traces").
const EXTRA_ENV: &[&str] = &[
    "RUST_LOG",
    "COVEN_ENV",
    "SSL_CERT_FILE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
];

/// Routes each command's healthcheck may use (each checked live below).
fn health_routes(command: &str) -> &'static [&'static str] {
    match command {
        "web" => &["/healthz", "/readyz"],
        "gateway" => &["/healthz"],
        "sim" => &["/_sim/state"],
        _ => &[],
    }
}

fn cli() -> clap::Command {
    coven::cli::Cli::command()
}

/// Environment variables a command reads through its flags: (name, hidden).
fn env_of(cmd: &clap::Command) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for arg in cmd.get_arguments() {
        if let Some(env) = arg.get_env() {
            out.insert(env.to_string_lossy().into_owned(), arg.is_hide_set());
        }
    }
    out
}

fn command_env(sub: &str) -> BTreeSet<String> {
    let root = cli();
    let sub = root
        .find_subcommand(sub)
        .unwrap_or_else(|| panic!("coven has no command {sub:?}"));
    env_of(sub)
        .into_keys()
        .chain(env_of(&root).into_keys())
        .chain(EXTRA_ENV.iter().map(|s| (*s).to_owned()))
        .collect()
}

/// YAML 1.1 merge keys (`<<: *anchor`), which the parser leaves as a key.
fn merged(node: &Yaml) -> Yaml {
    let Yaml::Hash(h) = node else {
        return node.clone();
    };
    let mut out = yaml_rust2::yaml::Hash::new();
    if let Some(Yaml::Hash(base)) = h.get(&Yaml::String("<<".into())).map(merged) {
        out.extend(base);
    }
    for (k, v) in h {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), merged(v));
        }
    }
    Yaml::Hash(out)
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn port_of(addr_or_url: &str) -> Option<u16> {
    let rest = addr_or_url.rsplit_once(':')?.1;
    rest.split('/').next()?.parse().ok()
}

#[test]
fn every_compose_service_runs_a_real_command_with_real_flags_ports_and_healthchecks() {
    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml")).unwrap();
    let doc = &YamlLoader::load_from_str(&text).expect("docker-compose.yml parses")[0];
    let services = doc["services"].as_hash().expect("services");
    let mut web_port = None;
    let mut checked = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let service = merged(service);
        let uses_coven = service["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("coven"))
            || !service["build"].is_badvalue();
        if !uses_coven {
            continue;
        }
        let command = strings(&service["command"]);
        let sub_name = command
            .first()
            .unwrap_or_else(|| panic!("{name}: no command"));
        let root = cli();
        let sub = root
            .find_subcommand(sub_name)
            .unwrap_or_else(|| panic!("{name}: coven has no command {sub_name:?}"));
        let mut bind = None;
        let mut words = command.iter().skip(1);
        while let Some(word) = words.next() {
            let flag = word
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("{name}: {word:?} is not a flag"));
            assert!(
                sub.get_arguments().any(|a| a.get_long() == Some(flag)),
                "{name}: `coven {sub_name}` has no --{flag}"
            );
            let value = words
                .next()
                .unwrap_or_else(|| panic!("{name}: --{flag} has no value"));
            if flag == "bind" {
                bind = port_of(value);
            }
        }
        let port = bind.unwrap_or_else(|| panic!("{name}: say where it listens (--bind)"));
        let known = command_env(sub_name);
        if let Some(env) = service["environment"].as_hash() {
            for key in env.keys() {
                let key = key.as_str().unwrap();
                assert!(
                    known.contains(key),
                    "{name}: `coven {sub_name}` does not read {key}"
                );
            }
        }
        let test = strings(&service["healthcheck"]["test"]);
        let url = test
            .last()
            .unwrap_or_else(|| panic!("{name}: no healthcheck"));
        assert_eq!(
            port_of(url),
            Some(port),
            "{name}: the healthcheck asks another port than --bind"
        );
        let path = url
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        assert!(
            health_routes(sub_name).contains(&path.as_str()),
            "{name}: {path} is not a health route of `coven {sub_name}`"
        );
        if sub_name == "web" {
            web_port = Some(port);
        }
        checked.insert(sub_name.clone());
    }
    assert_eq!(
        checked,
        ["gateway", "sim", "web"]
            .map(str::to_owned)
            .into_iter()
            .collect(),
        "compose runs gateways, web replicas and (profile sim) the simulator"
    );
    // nginx sends traffic to the port the web replicas listen on.
    let nginx = std::fs::read_to_string(format!("{ROOT}/deploy/nginx.conf")).unwrap();
    let web_port = web_port.unwrap();
    assert!(
        nginx.contains(&format!("server web:{web_port}")),
        "nginx upstream port"
    );
    for needed in [
        "proxy_http_version 1.1",
        "proxy_buffering off",
        "proxy_read_timeout",
    ] {
        assert!(nginx.contains(needed), "nginx.conf lacks {needed}");
    }
    let lb = merged(&services[&Yaml::String("lb".into())]);
    let lb_check = strings(&lb["healthcheck"]["test"]).join(" ");
    assert!(
        lb_check.contains("/readyz"),
        "the load balancer checks readiness through to a replica"
    );
    let web = merged(&services[&Yaml::String("web".into())]);
    assert!(
        web["deploy"]["replicas"].as_i64().unwrap_or(1) >= 2,
        "at least two web replicas"
    );
    assert!(
        services.contains_key(&Yaml::String("gateway-b".into())),
        "a standby gateway"
    );

    // `docker compose config` accepts the file, where the tool is installed.
    let has_compose = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_compose {
        let out = std::process::Command::new("docker")
            .args([
                "compose",
                "--env-file",
                "deploy/sim.env",
                "--profile",
                "sim",
                "config",
                "--quiet",
            ])
            .current_dir(ROOT)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker compose config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_routes_compose_uses_answer_on_the_real_processes() {
    let mut stack = Stack::start(1, &[]).await;
    let http = reqwest::Client::new();
    let gateway = stack.gateway.listening_url();
    for (what, url) in [
        ("web /healthz", stack.web(0).url("/healthz")),
        ("web /readyz", stack.web(0).url("/readyz")),
        ("gateway /healthz", format!("{gateway}/healthz")),
        ("sim /_sim/state", stack.sim.url("/_sim/state")),
    ] {
        let res = http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200, "{what}");
    }
}

#[test]
fn env_example_lists_every_setting_and_nothing_else() {
    let text = std::fs::read_to_string(format!("{ROOT}/.env.example")).unwrap();
    let listed: BTreeSet<String> = text
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k.to_owned())
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    let root = cli();
    let mut visible = BTreeSet::new();
    let mut all: BTreeSet<String> = EXTRA_ENV.iter().map(|s| (*s).to_owned()).collect();
    for cmd in std::iter::once(&root).chain(root.get_subcommands()) {
        for (env, hidden) in env_of(cmd) {
            if !hidden {
                visible.insert(env.clone());
            }
            all.insert(env);
        }
    }
    let missing: Vec<_> = visible.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        ".env.example does not mention {missing:?}"
    );
    // Compose's own knobs (ports, certificate files) are settings of the deployment.
    all.extend(compose_variables());
    let unknown: Vec<_> = listed.difference(&all).collect();
    assert!(
        unknown.is_empty(),
        ".env.example lists settings nothing reads: {unknown:?}"
    );
}

/// The one table of settings in docs/configuration.md, held to the binary: every
/// setting any command reads is described once, by the commands that really read it,
/// with clap's flag, default and range; and nothing else is described.
#[test]
fn the_configuration_page_describes_every_setting_once_as_the_binary_reads_it() {
    let page = "docs/configuration.md";
    let text = std::fs::read_to_string(format!("{ROOT}/{page}")).unwrap();
    let rows = settings_table(&text)
        .unwrap_or_else(|| panic!("{page}: no table headed `{SETTINGS_HEADER}`"));
    let read = settings_read();
    let mut problems = Vec::new();
    let mut described: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        let Some(key) = row.name.clone().or_else(|| row.flag.clone()) else {
            problems.push("a row names neither a variable nor a flag".to_owned());
            continue;
        };
        *described.entry(key.clone()).or_default() += 1;
        let Some(setting) = read.get(&key) else {
            if !EXTRA_ENV.contains(&key.as_str()) {
                problems.push(format!(
                    "{key}: no command reads it; remove its row, or fix the name"
                ));
            }
            continue;
        };
        let doc_commands = if row.commands == ["all"] {
            COMMANDS.iter().map(|c| (*c).to_owned()).collect()
        } else {
            row.commands.iter().cloned().collect::<BTreeSet<_>>()
        };
        let commands: BTreeSet<String> = setting.by_command.keys().cloned().collect();
        if doc_commands != commands {
            problems.push(format!(
                "{key}: the commands column says {doc_commands:?}, but `coven <command> --help` \
                 shows it on {commands:?}; write `{}`",
                if commands.len() == COMMANDS.len() {
                    "all".to_owned()
                } else {
                    commands.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            ));
        }
        for (command, arg) in &setting.by_command {
            if row.flag.as_deref() != Some(arg.flag.as_str()) {
                problems.push(format!(
                    "{key}: the flag column says {:?}, `coven {command}` takes `{}`",
                    row.flag, arg.flag
                ));
            }
            if row.hidden != arg.hidden {
                problems.push(format!(
                    "{key}: `coven {command} --help` {} it; {} `(hidden)` after its name",
                    if arg.hidden { "hides" } else { "shows" },
                    if arg.hidden { "write" } else { "remove" }
                ));
            }
            let documented = row.default_for(command);
            if documented != arg.default {
                let shown =
                    |d: &Option<String>| d.as_ref().map_or("none".to_owned(), |d| format!("`{d}`"));
                problems.push(format!(
                    "{key}: the default column gives `coven {command}` {}, its clap default is {}; \
                     write {}",
                    shown(&documented),
                    shown(&arg.default),
                    arg.default
                        .as_ref()
                        .map_or(format!("no default for {command}"), |d| format!(
                            "`{d}` (or `{command} `{d}`` beside other commands' defaults)"
                        ))
                ));
            }
            let range = ranges(&row.range).into_iter().next();
            let help_range = ranges(&arg.help).into_iter().next();
            if range != help_range {
                problems.push(format!(
                    "{key}: the range column says {:?}, `coven {command} --help` says {:?}; \
                     make them agree",
                    range.map(|(a, b)| format!("{a}–{b}")),
                    help_range.map(|(a, b)| format!("{a}–{b}")),
                ));
            }
        }
    }
    for (key, setting) in &read {
        let commands: Vec<_> = setting.by_command.keys().cloned().collect();
        match described.get(key).copied().unwrap_or(0) {
            0 => problems.push(format!(
                "{key}: read by {commands:?} but not described; add a row for it"
            )),
            1 => {}
            n => problems.push(format!(
                "{key}: described in {n} rows; keep one (with every command in its commands \
                 column)"
            )),
        }
    }
    for extra in EXTRA_ENV {
        if !described.contains_key(*extra) {
            problems.push(format!(
                "{extra}: read outside clap but not described; add a row for it"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{page}'s settings table disagrees with the binary:\n  {}",
        problems.join("\n  ")
    );
}

/// The commands `all` stands for in docs/configuration.md.
const COMMANDS: &[&str] = &["gateway", "web", "publish", "sim", "demo"];

const SETTINGS_HEADER: &str = "| variable | flag | commands | default | range | what it does |";

/// One setting as one command reads it.
struct ReadArg {
    flag: String,
    hidden: bool,
    default: Option<String>,
    help: String,
}

/// A setting (an environment variable, or a flag that has none) and the commands that
/// read it.
#[derive(Default)]
struct Setting {
    by_command: BTreeMap<String, ReadArg>,
}

/// Every setting of every command, keyed by variable (or flag, for flags without one).
/// `coven` with no command is the demo: its settings must be the demo's own.
fn settings_read() -> BTreeMap<String, Setting> {
    let mut root = cli();
    root.build();
    let mut out: BTreeMap<String, Setting> = BTreeMap::new();
    for sub in root.get_subcommands() {
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let flag = format!("--{long}");
            let key = arg
                .get_env()
                .map_or_else(|| flag.clone(), |e| e.to_string_lossy().into_owned());
            let takes_values = arg.get_action().takes_values();
            let default = arg
                .get_default_values()
                .first()
                .filter(|_| takes_values)
                .map(|d| d.to_string_lossy().into_owned());
            out.entry(key).or_default().by_command.insert(
                sub.get_name().to_owned(),
                ReadArg {
                    flag,
                    hidden: arg.is_hide_set(),
                    default,
                    help: arg.get_help().map(ToString::to_string).unwrap_or_default(),
                },
            );
        }
    }
    let demo = root.find_subcommand("demo").expect("coven demo");
    for arg in root.get_arguments().filter(|a| !a.is_global_set()) {
        if matches!(arg.get_long(), Some("help" | "version") | None) {
            continue;
        }
        assert!(
            demo.get_arguments()
                .any(|d| d.get_long() == arg.get_long() && d.get_env() == arg.get_env()),
            "`coven --{}` with no command is not the demo's; docs/configuration.md's `all` \
             assumes it is",
            arg.get_long().unwrap()
        );
    }
    out
}

/// A row of the settings table.
struct Row {
    /// The variable, or `None` for a flag without one.
    name: Option<String>,
    hidden: bool,
    /// The flag, or `None` for a variable read outside clap.
    flag: Option<String>,
    commands: Vec<String>,
    /// `(commands it applies to, value)`; no commands: every command of the row.
    defaults: Vec<(Vec<String>, String)>,
    range: String,
}

impl Row {
    fn default_for(&self, command: &str) -> Option<String> {
        self.defaults
            .iter()
            .find(|(cmds, _)| cmds.is_empty() || cmds.iter().any(|c| c == command))
            .map(|(_, value)| value.clone())
    }
}

/// The rows of the table under [`SETTINGS_HEADER`].
fn settings_table(text: &str) -> Option<Vec<Row>> {
    let mut lines = text.lines().skip_while(|l| l.trim() != SETTINGS_HEADER);
    lines.next()?;
    lines.next(); // the |---| line
    let rows = lines
        .take_while(|l| l.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.trim().trim_matches('|').split(" | ").collect();
            assert_eq!(
                cells.len(),
                6,
                "docs/configuration.md: this row needs the table's 6 cells (write a `|` inside \
                 a cell as words): {line}"
            );
            let name = ticked(cells[0]).into_iter().next();
            Row {
                hidden: cells[0].contains("(hidden)"),
                name,
                flag: ticked(cells[1]).into_iter().next(),
                commands: cells[2]
                    .split(',')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .collect(),
                defaults: cells[3]
                    .split(';')
                    .filter(|d| d.contains('`'))
                    .map(|d| {
                        let (cmds, value) = d.split_once('`').unwrap();
                        let cmds = cmds
                            .split(',')
                            .map(str::trim)
                            .filter(|c| !c.is_empty())
                            .map(str::to_owned)
                            .collect();
                        (cmds, value.trim_end().trim_end_matches('`').to_owned())
                    })
                    .collect(),
                range: cells[4].to_owned(),
            }
        })
        .collect();
    Some(rows)
}

/// The `code` spans of a cell.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Numeric ranges written in text (`1s–1h`, `1-100000`, `65,536–268,435,456`), with
/// thousands separators dropped, so the help's and the page's compare.
fn ranges(text: &str) -> Vec<(String, String)> {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == ',';
    let clean = |s: &str| s.trim_matches(',').replace(',', "");
    let mut out = Vec::new();
    for (i, dash) in text.char_indices().filter(|(_, c)| matches!(c, '–' | '-')) {
        let before = &text[..i];
        let start = before
            .char_indices()
            .rev()
            .find(|(_, c)| !part(*c))
            .map_or(0, |(j, c)| j + c.len_utf8());
        let after = &text[i + dash.len_utf8()..];
        let end = after.find(|c: char| !part(c)).unwrap_or(after.len());
        let (low, high) = (clean(&before[start..]), clean(&after[..end]));
        let numeric = |s: &str| s.starts_with(|c: char| c.is_ascii_digit());
        if numeric(&low) && numeric(&high) {
            out.push((low, high));
        }
    }
    out
}

/// The variables docker-compose.yml interpolates itself (`${NAME}`, `${NAME:-default}`).
fn compose_variables() -> BTreeSet<String> {
    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml")).unwrap();
    text.split("${")
        .skip(1)
        .filter_map(|rest| {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            Some(rest[..end].to_owned())
        })
        .collect()
}

/// Where nginx reads the certificate and key; compose mounts them there.
const TLS_CERT: &str = "/etc/nginx/tls/cert.pem";
const TLS_KEY: &str = "/etc/nginx/tls/key.pem";

#[test]
fn nginx_serves_https_with_http2_from_the_certificate_compose_mounts() {
    let nginx = std::fs::read_to_string(format!("{ROOT}/deploy/nginx.conf")).unwrap();
    for needed in [
        "listen 80;".to_owned(),
        "listen 443 ssl http2;".to_owned(),
        format!("ssl_certificate {TLS_CERT};"),
        format!("ssl_certificate_key {TLS_KEY};"),
        "location /api/ {".to_owned(),
    ] {
        assert!(nginx.contains(&needed), "nginx.conf lacks {needed}");
    }
    let streams = &nginx[nginx.find("location /api/ {").unwrap()..];
    assert!(
        streams.contains("proxy_buffering off"),
        "streams unbuffered"
    );

    let text = std::fs::read_to_string(format!("{ROOT}/docker-compose.yml")).unwrap();
    let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
    let lb = merged(&doc["services"]["lb"]);
    let ports = strings(&lb["ports"]);
    assert!(
        ports.iter().any(|p| p.ends_with(":443")),
        "HTTPS published: {ports:?}"
    );
    let mounts: Vec<String> = lb["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|v| v["target"].as_str().map(str::to_owned))
        .collect();
    for target in [TLS_CERT, TLS_KEY] {
        assert!(mounts.iter().any(|m| m == target), "{target} mounted");
    }
    let web = merged(&doc["services"]["web"]);
    let public = web["environment"]["PUBLIC_URL"].as_str().unwrap();
    assert!(
        public.contains("https://"),
        "people open the HTTPS port: {public}"
    );
}

/// nginx, stopped when dropped: TERM lets its master stop the workers (a killed master
/// would leave them running); KILL only if it does not stop in time.
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The deployment's own nginx.conf, in front of a real replica, with a certificate from
/// `scripts/dev-cert.sh`: pages and a live stream go through it over HTTPS and HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_goes_through_the_deployments_nginx_over_https_and_http2() {
    let stack = Stack::start(1, &[]).await;
    let web = stack.web(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    // nginx's workers drop root; they must be able to read what is here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let made = std::process::Command::new(format!("{ROOT}/scripts/dev-cert.sh"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "dev-cert.sh: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    // The file as compose mounts it, with loopback addresses for compose's names.
    let (http, https) = (free_port(), free_port());
    let web_port = port_of(&web.url).unwrap();
    let mut conf = std::fs::read_to_string(format!("{ROOT}/deploy/nginx.conf")).unwrap();
    for (from, to) in [
        (
            "server web:3000".to_owned(),
            format!("server 127.0.0.1:{web_port}"),
        ),
        ("listen 80;".to_owned(), format!("listen 127.0.0.1:{http};")),
        (
            "listen 443 ssl http2;".to_owned(),
            format!("listen 127.0.0.1:{https} ssl http2;"),
        ),
        (TLS_CERT.to_owned(), format!("{path}/cert.pem")),
        (TLS_KEY.to_owned(), format!("{path}/key.pem")),
    ] {
        assert_eq!(conf.matches(&from).count(), 1, "nginx.conf has one {from}");
        conf = conf.replace(&from, &to);
    }
    std::fs::write(dir.path().join("coven.conf"), conf).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "pid {path}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {path}/body;\n\
             proxy_temp_path {path}/proxy;\n fastcgi_temp_path {path}/fastcgi;\n\
             uwsgi_temp_path {path}/uwsgi;\n scgi_temp_path {path}/scgi;\n\
             include {path}/coven.conf;\n}}\n"
        ),
    )
    .unwrap();
    let nginx = |extra: &[&str]| {
        let mut cmd = std::process::Command::new("nginx");
        cmd.args([
            "-p",
            &path,
            "-c",
            &format!("{path}/nginx.conf"),
            "-e",
            "stderr",
        ])
        .args(extra);
        cmd
    };
    let checked = nginx(&["-t"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run nginx ({e}); scripts/test.sh installs it"));
    assert!(
        checked.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let _nginx = Nginx(
        nginx(&["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("nginx to listen", || async {
        std::net::TcpStream::connect(("127.0.0.1", https))
            .ok()
            .map(|_| ())
    })
    .await;

    // A browser that trusts the self-signed certificate and speaks HTTP/2 when offered.
    let cert = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let browser = Browser {
        http: reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
            .cookie_provider(jar.clone())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        jar,
    };
    let secure = |p: &str| format!("https://127.0.0.1:{https}{p}");
    let ready = browser.get(&secure("/readyz")).await;
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.version(), reqwest::Version::HTTP_2, "HTTP/2 over TLS");
    let plain = browser
        .get(&format!("http://127.0.0.1:{http}/readyz"))
        .await;
    assert_eq!(plain.status(), 200, "the plain port the health check uses");

    // Logged in (on the replica: PUBLIC_URL is its own address here; the cookie is the
    // host's, whatever the port), the stream comes through nginx event by event.
    browser
        .login(web, &stack.sim, stack.user("ash").await)
        .await;
    let res = browser
        .http
        .get(secure("/api/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut stream = crate::harness::Sse::new(res);
    let bramble = stack.user("bramble").await;
    stack
        .voice(bramble, Some(stack.lobby), serde_json::json!({}))
        .await;
    let id = bramble.to_string();
    let seen = stream
        .until(|m| m.event == "voice.joined" && m.json()["data"]["user"]["id"] == id.as_str())
        .await;
    assert!(!seen.is_empty());
}
