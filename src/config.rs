//! Settings: read once at start from CLI flags, the environment and `.env` files, checked,
//! and handed to each command as typed values.
//!
//! Each setting is declared once, as a typed clap argument on the `Settings` struct of the
//! command that uses it: its flag, environment variable, default (`default_value`, which
//! `--help` shows) and value parser (the `parse_*` functions here, whose messages name the
//! expected form and range). Components take those structs as they are. What has a default
//! sits in a flattened `Tuning` struct (which `Settings` derefs to), so the demo builds the
//! settings of the components it runs as values: what it decides, and `Tuning::default()`,
//! which [`defaults`] reads from the declarations, for the rest. A Redis URL the demo may
//! go without is an `Option` that the command line requires.
//!
//! clap stops at the first bad value; operators want every problem at once. So [`parse`]
//! goes through the command line twice. The first pass takes every value as a plain string
//! (clap still finds flags, subcommands, environment variables and defaults, and refuses
//! unknown flags as usage errors). Then each argument of the chosen command runs its own
//! value parser on its value, a required one without a value is noted, and the command's
//! checks that involve several settings run on those that parsed ([`Parsed`]): every
//! problem is reported at once, one line each. Only when there are none does clap parse
//! for real, and finds nothing more. An empty variable counts as unset, and
//! `PRIMARY_GUILD_ID` is read when `DISCORD_GUILD_ID` is not.
//!
//! Must not open sockets or talk to Redis or Discord: a bad setting is reported before
//! anything starts, one line per problem, and never echoes a secret's value.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::ValueParser;
use clap::error::ErrorKind;
use clap::{Arg, ArgMatches, Command, FromArgMatches};
use secrecy::SecretString;
use twilight_model::id::Id;
use twilight_model::id::marker::{ApplicationMarker, ChannelMarker, GuildMarker};
use url::Url;

/// One bad or missing setting: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub setting: String,
    pub message: String,
}

impl Problem {
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// Loads `.env` files in the order the seeds documented, lowest priority last:
/// `.env.{mode}.local`, `.env.{mode}`, `.env.local` (not in `test` mode), `.env`.
/// dotenvy never overrides a variable that is already set, so loading the most specific
/// file first gives it priority and the real environment always wins.
///
/// Must run before any thread starts (it sets process environment variables).
pub fn load_dotenv() -> Result<Vec<PathBuf>, Problem> {
    let mode = std::env::var("COVEN_ENV").ok().filter(|m| !m.is_empty());
    let mut files = Vec::new();
    if let Some(mode) = &mode {
        files.push(format!(".env.{mode}.local"));
        files.push(format!(".env.{mode}"));
    }
    if mode.as_deref() != Some("test") {
        files.push(".env.local".to_owned());
    }
    files.push(".env".to_owned());

    let mut loaded = Vec::new();
    for name in files {
        let path = PathBuf::from(&name);
        if !path.is_file() {
            continue;
        }
        dotenvy::from_filename(&path)
            .map_err(|e| Problem::new("COVEN_ENV", format!("cannot read {name}: {e}")))?;
        loaded.push(path);
    }
    Ok(loaded)
}

// ---------------------------------------------------------------------------------------
// Reading the command line: every problem at once, then the typed parse.

/// Environment variables read under another name when theirs is unset.
const ALIASES: &[(&str, &str)] = &[("DISCORD_GUILD_ID", "PRIMARY_GUILD_ID")];

/// Parses `args` (with the binary name first) into `P`, after checking every setting of
/// the chosen command: `Err` holds one problem per bad or missing setting, and one per
/// contradiction `contradictions` finds among the settings that are fine on their own (it
/// is given the chosen command's name, empty for none). Usage mistakes (an unknown flag)
/// and `--help` end the process the way clap does.
pub fn parse<P: clap::Parser>(
    args: Vec<OsString>,
    contradictions: impl Fn(&str, &Parsed) -> Vec<Problem>,
) -> Result<P, Vec<Problem>> {
    let mut declared = each_arg(P::command(), &named_like_the_flag);
    let mut typed = each_arg(declared.clone(), &from_environment);
    let mut raw = each_arg(typed.clone(), &|arg| {
        if arg.get_action().takes_values() {
            arg.value_parser(ValueParser::os_string()).required(false)
        } else {
            arg
        }
    });
    let raw = match raw.try_get_matches_from_mut(&args) {
        Ok(m) => m,
        Err(e) => {
            // Help comes from the declared command: it shows what is required.
            let help = [ErrorKind::DisplayHelp, ErrorKind::DisplayVersion];
            if help.contains(&e.kind())
                && let Err(shown) = declared.clone().try_get_matches_from(&args)
                && shown.kind() == e.kind()
            {
                shown.exit()
            }
            e.exit()
        }
    };
    declared.build();
    let (mut command, mut matches) = (&declared, &raw);
    while let Some((name, sub)) = matches.subcommand() {
        let Some(found) = command.find_subcommand(name) else {
            break;
        };
        (command, matches) = (found, sub);
    }
    let mut problems = Vec::new();
    let mut parsed = Parsed::default();
    for arg in command.get_arguments() {
        match check(arg, matches) {
            Ok(Some((name, value))) => {
                parsed.0.insert(name, value);
            }
            Ok(None) => {}
            Err(problem) => problems.push(problem),
        }
    }
    let name = if command.get_name() == declared.get_name() {
        ""
    } else {
        command.get_name()
    };
    problems.extend(contradictions(name, &parsed));
    if !problems.is_empty() {
        return Err(problems);
    }
    // The check above ran every parser clap runs here, so this refuses nothing; should it,
    // the error says what kind it is and never quotes a value.
    typed
        .try_get_matches_from_mut(args)
        .and_then(|mut m| P::from_arg_matches_mut(&mut m))
        .map_err(|e| vec![Problem::new("command line", e.kind().to_string())])
}

/// The settings of the chosen command that are fine on their own, typed, by name (such as
/// `ROOM_IDLE_TIMEOUT`), for the checks that involve several.
#[derive(Default)]
pub struct Parsed(HashMap<String, ArgMatches>);

impl Parsed {
    /// The (first) value of `setting`, if it has one and it parsed.
    ///
    /// # Panics
    ///
    /// If `T` is not the type the setting parses to.
    pub fn get<T: Clone + Send + Sync + 'static>(&self, setting: &str) -> Option<T> {
        self.0.get(setting)?.get_one::<T>("value").cloned()
    }
}

/// `arg`'s name and parsed value, `None` without one, or its problem: its value (from the
/// command line, the environment or its default) refused by its own parser, or no value
/// when one is required.
fn check(arg: &Arg, matches: &ArgMatches) -> Result<Option<(String, ArgMatches)>, Problem> {
    if !arg.get_action().takes_values() {
        return Ok(None);
    }
    let name = match arg.get_env() {
        Some(env) => env.to_string_lossy().into_owned(),
        None => format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str())),
    };
    let Some(values) = matches.try_get_raw(arg.get_id().as_str()).ok().flatten() else {
        if arg.is_required_set() {
            return Err(Problem::new(name, "is required but not set"));
        }
        return Ok(None);
    };
    let mut first = None;
    for value in values {
        let parsed = parse_one(arg.get_value_parser(), value)
            .map_err(|message| Problem::new(name.clone(), message))?;
        first.get_or_insert(parsed);
    }
    Ok(first.map(|value| (name, value)))
}

/// Runs a value parser the way clap runs it, on one value, which the matches hold as
/// `value`. A message is the parser's own (clap's wording around it would quote the value,
/// a secret's included).
fn parse_one(parser: &ValueParser, value: &OsStr) -> Result<ArgMatches, String> {
    let probe = Arg::new("value")
        .value_parser(parser.clone())
        .allow_hyphen_values(true);
    Command::new("probe")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from([OsStr::new("--"), value])
        .map_err(|e| {
            std::error::Error::source(&e).map_or_else(|| e.kind().to_string(), ToString::to_string)
        })
}

/// Applies `f` to every argument of `command` and its subcommands.
fn each_arg(command: Command, f: &impl Fn(Arg) -> Arg) -> Command {
    command.mut_args(f).mut_subcommands(|sub| each_arg(sub, f))
}

/// `--discord-guild-id <DISCORD_GUILD_ID>` in `--help`, where the field is `guild_id`: a
/// value is named after its flag unless the declaration names it (`--data <JSON>`).
fn named_like_the_flag(arg: Arg) -> Arg {
    let derived = arg.get_id().as_str().to_uppercase();
    let (Some(long), Some([name])) = (arg.get_long(), arg.get_value_names()) else {
        return arg;
    };
    if name.as_str() != derived {
        return arg;
    }
    let name = long.replace('-', "_").to_uppercase();
    arg.value_name(name)
}

/// An empty variable counts as unset (`.env.example` style `KEY=` lines), and an unset
/// one is read under its alias when that is set.
fn from_environment(arg: Arg) -> Arg {
    let Some(name) = arg.get_env().and_then(OsStr::to_str).map(str::to_owned) else {
        return arg;
    };
    let value = |name: &str| std::env::var_os(name);
    let blank = |v: &OsString| v.to_str().is_some_and(|s| s.trim().is_empty());
    let alias = ALIASES
        .iter()
        .find(|(of, alias)| *of == name && value(alias).is_some_and(|v| !blank(&v)));
    match (value(&name), alias) {
        (Some(v), _) if !blank(&v) => arg,
        (_, Some((_, alias))) => arg.env(*alias),
        (Some(_), None) => arg.env(None),
        (None, None) => arg,
    }
}

/// `T` at the defaults its arguments declare, parsed the way the command line is and
/// ignoring the environment: a default is written once, in its `#[arg(default_value)]`.
///
/// # Panics
///
/// If `T` has a required argument, or a declared default its own parser refuses (the
/// `cli` tests call it for every `Tuning`, so neither reaches a build).
pub fn defaults<T: clap::Args + FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None));
    command
        .try_get_matches_from(std::iter::empty::<&str>())
        .and_then(|m| T::from_arg_matches(&m))
        .unwrap_or_else(|e| {
            panic!(
                "the declared defaults of {} do not parse: {e}",
                std::any::type_name::<T>()
            )
        })
}

// ---------------------------------------------------------------------------------------
// Parsers for the kinds of values our settings hold. Each error message describes the
// expected form and, for non-secrets only, quotes what was given.

pub fn parse_guild_id(raw: &str) -> Result<Id<GuildMarker>, String> {
    parse_snowflake(raw).map(Id::new)
}

pub fn parse_channel_id(raw: &str) -> Result<Id<ChannelMarker>, String> {
    parse_snowflake(raw).map(Id::new)
}

pub fn parse_application_id(raw: &str) -> Result<Id<ApplicationMarker>, String> {
    parse_snowflake(raw).map(Id::new)
}

/// A Discord id as the simulator keeps it (a plain number).
pub fn parse_snowflake(raw: &str) -> Result<u64, String> {
    // As Discord writes ids: digits only, no sign, no leading zero. `u64::from_str` alone
    // also takes `+42` and `042`, which would give one id many spellings (and URLs).
    let canonical = raw.bytes().all(|b| b.is_ascii_digit()) && !raw.starts_with('0');
    match raw.parse::<u64>() {
        Ok(n) if n > 0 && canonical => Ok(n),
        _ => Err(format!(
            "expected a Discord id (a positive whole number), got {raw:?}"
        )),
    }
}

/// A duration from `min` to `max` (both included), written `500ms`, `30s`, `5m`, `1h` (and
/// combinations such as `1h30m`). Every duration setting has a range:
/// a value outside it is a typo or a misunderstanding (`1ms` for a lease, `100y` for a
/// timer), and is cheaper to refuse at start than to discover in production.
pub fn parse_duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Copy {
    move |raw| {
        let out_of_range = || {
            format!(
                "expected a duration from {} to {}, got {raw:?}",
                short_duration(min),
                short_duration(max)
            )
        };
        // Zero and unparsable values get the range too: it is what the operator needs.
        let d = humantime::parse_duration(raw).map_err(|_| {
            format!(
                "expected a duration such as 500ms, 30s, 5m or 1h, from {} to {}, got {raw:?}",
                short_duration(min),
                short_duration(max)
            )
        })?;
        if d < min || d > max {
            return Err(out_of_range());
        }
        Ok(d)
    }
}

/// A number from `min` to `max` (both included), for counts, sizes and rates.
pub fn parse_number_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Copy
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    move |raw| match raw.parse::<T>() {
        // NaN compares false with everything, so it falls through and is refused.
        Ok(n) if min <= n && n <= max => Ok(n),
        _ => Err(format!(
            "expected a number from {} to {}, got {raw:?}",
            grouped(&min.to_string()),
            grouped(&max.to_string())
        )),
    }
}

/// `1h`, `30s`, `7d`, `250ms`: the largest unit that divides the duration, as people
/// write them in settings.
pub fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// `65536` → `65,536`, so a range reads at a glance; anything but plain digits is kept.
fn grouped(number: &str) -> String {
    if number.len() <= 4 || !number.bytes().all(|b| b.is_ascii_digit()) {
        return number.to_owned();
    }
    let mut out = String::new();
    for (i, c) in number.chars().enumerate() {
        if i > 0 && (number.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn parse_bind(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|_| format!("expected an address such as 127.0.0.1:3000, got {raw:?}"))
}

/// An http(s) base URL, kept without a trailing slash so paths can be appended.
pub fn parse_http_url(raw: &str) -> Result<Url, String> {
    parse_url(raw, &["http", "https"])
}

/// The site's own address. Pages, redirects, cookies and the OAuth2 redirect all assume
/// the site is the root of its origin, so a path (`https://example.com/coven`) would give
/// a site that half works; userinfo would put a password in every link. The value is
/// quoted only when it carries no userinfo.
pub fn parse_public_url(raw: &str) -> Result<Url, String> {
    let url =
        Url::parse(raw.trim_end_matches('/')).map_err(|e| format!("not a valid URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user name or password".to_owned());
    }
    let url = parse_http_url(raw)?;
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "the site must be served at the root of its origin, such as \
             https://coven.example.com (put it behind its own host name), got {raw:?}"
        ));
    }
    Ok(url)
}

/// A ws(s) base URL. twilight-gateway panics on a malformed one, so it is checked here.
pub fn parse_ws_url(raw: &str) -> Result<Url, String> {
    parse_url(raw, &["ws", "wss"])
}

fn parse_url(raw: &str, schemes: &[&str]) -> Result<Url, String> {
    let trimmed = raw.trim_end_matches('/');
    let url = Url::parse(trimmed).map_err(|e| format!("not a valid URL ({e}): {raw:?}"))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "expected a {} URL, got {raw:?}",
            schemes.join(" or ")
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL has no host: {raw:?}"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("URL must not have a query or fragment: {raw:?}"));
    }
    Ok(url)
}

/// A secret of at least `min` bytes. The value never appears in a message.
pub fn parse_secret(min: usize) -> impl Fn(&str) -> Result<SecretString, String> + Copy {
    move |raw| {
        if raw.len() < min {
            Err(format!(
                "must be at least {min} bytes long (it has {})",
                raw.len()
            ))
        } else {
            Ok(SecretString::from(raw.to_owned()))
        }
    }
}

/// A Redis URL fred understands (`redis://`, `rediss://`, `redis-sentinel://`,
/// `redis-cluster://`, ...). Kept secret: it may carry a password.
pub fn parse_redis_url(raw: &str) -> Result<SecretString, String> {
    // Only what this build of fred honours: TLS (rustls) and Sentinel's own credentials
    // (`sentinelUsername`/`sentinelPassword`) are compiled in; Unix sockets are not, so a
    // socket URL is refused here rather than failing later.
    const SCHEMES: &[&str] = &[
        "redis://",
        "rediss://",
        "redis-cluster://",
        "rediss-cluster://",
        "redis-sentinel://",
        "rediss-sentinel://",
    ];
    let known = SCHEMES.iter().any(|s| raw.starts_with(s));
    match fred::types::config::Config::from_url(raw) {
        Ok(_) if known => Ok(SecretString::from(raw.to_owned())),
        // fred's message may quote the URL, password included: say only what is expected.
        _ => Err(
            "expected a Redis URL such as redis://host:6379, rediss://user:pass@host:6380/0, \
             redis-sentinel://... or redis-cluster://..."
                .to_owned(),
        ),
    }
}

/// The default Redis key prefix.
pub const KEY_PREFIX: &str = "coven";

/// A Redis key prefix: no spaces, and no braces, which would break the `{guild}` hash tag
/// that keeps one guild's keys in one cluster slot.
pub fn parse_key_prefix(raw: &str) -> Result<String, String> {
    if raw.len() > 64
        || raw
            .chars()
            .any(|c| c.is_whitespace() || c == '{' || c == '}')
    {
        Err(format!(
            "expected up to 64 characters without spaces or braces, got {raw:?}"
        ))
    } else {
        Ok(raw.to_owned())
    }
}

/// Renders a base URL with a path appended, without doubling slashes.
pub fn join_url(base: &Url, path: &str) -> String {
    format!(
        "{}/{}",
        base.as_str().trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

// ---------------------------------------------------------------------------------------
// Logging settings are shared by every command.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    /// A `tracing_subscriber::EnvFilter` directive (from `RUST_LOG`, else `LOG_LEVEL`).
    pub filter: String,
    pub format: LogFormat,
}

pub fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    match raw.to_ascii_lowercase().as_str() {
        "pretty" | "text" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected pretty or json, got {raw:?}")),
    }
}

pub fn parse_log_level(raw: &str) -> Result<String, String> {
    match raw.to_ascii_lowercase().as_str() {
        l @ ("error" | "warn" | "info" | "debug" | "trace" | "off") => Ok(l.to_owned()),
        "warning" => Ok("warn".to_owned()),
        _ => Err(format!(
            "expected one of error, warn, info, debug, trace, got {raw:?}"
        )),
    }
}

/// Logging, shared by every command.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides it
    #[arg(long, env = "LOG_LEVEL", global = true, default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,
    /// pretty or json
    #[arg(long, env = "LOG_FORMAT", global = true, default_value = "pretty", value_parser = parse_log_format)]
    pub log_format: LogFormat,
}

impl LogArgs {
    pub fn settings(&self) -> LogSettings {
        let filter = match std::env::var("RUST_LOG") {
            Ok(f) if !f.trim().is_empty() => f,
            _ => self.log_level.clone(),
        };
        LogSettings {
            filter,
            format: self.log_format,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Traces: the OpenTelemetry specification's own variables, not Coven's, read by every
// command. Off unless an OTLP endpoint is given.

/// How spans reach the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Which traces are kept (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedRatio(f64),
}

/// Traces, checked: present only when spans are to be exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    pub protocol: OtlpProtocol,
    pub sampler: SamplerSetting,
    pub timeout: Duration,
    /// `OTEL_SERVICE_NAME`, when set (else the service is `coven`).
    pub service_name: Option<String>,
    /// Whether `OTEL_RESOURCE_ATTRIBUTES` names the instance (else each process names
    /// itself).
    pub instance_given: bool,
}

/// Reads the trace settings through `var` (the environment): `None` when traces are off
/// (no `OTEL_EXPORTER_OTLP_ENDPOINT` nor `…_TRACES_ENDPOINT`, `OTEL_SDK_DISABLED=true` or
/// `OTEL_TRACES_EXPORTER=none`). Values the SDK would silently replace with a default
/// are refused here, one line each.
pub fn trace_settings(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<TraceSettings>, Vec<Problem>> {
    let var = |name: &str| {
        var(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut problems = Vec::new();
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match var("OTEL_TRACES_EXPORTER")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => problems.push(Problem::new(
            "OTEL_TRACES_EXPORTER",
            format!("expected otlp or none, got {other:?}"),
        )),
    }
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|name| Some((name, var(name)?)));
    let Some((endpoint_var, endpoint)) = endpoint else {
        return if problems.is_empty() {
            Ok(None)
        } else {
            Err(problems)
        };
    };
    match url::Url::parse(&endpoint) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
        _ => problems.push(Problem::new(
            endpoint_var,
            format!("expected an http:// or https:// URL, got {endpoint:?}"),
        )),
    }
    let protocol = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|name| Some((name, var(name)?)));
    let protocol = match protocol {
        // The specification's default.
        None => OtlpProtocol::HttpProtobuf,
        Some((_, p)) if p == "grpc" => OtlpProtocol::Grpc,
        Some((_, p)) if p == "http/protobuf" => OtlpProtocol::HttpProtobuf,
        Some((name, p)) => {
            problems.push(Problem::new(
                name,
                format!("expected grpc or http/protobuf, got {p:?}"),
            ));
            OtlpProtocol::HttpProtobuf
        }
    };
    let ratio = match var("OTEL_TRACES_SAMPLER_ARG") {
        None => 1.0,
        Some(raw) => match raw.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                problems.push(Problem::new(
                    "OTEL_TRACES_SAMPLER_ARG",
                    format!("expected a ratio from 0 to 1, got {raw:?}"),
                ));
                1.0
            }
        },
    };
    let sampler = match var("OTEL_TRACES_SAMPLER")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("parentbased_always_on") => SamplerSetting::ParentBasedAlwaysOn,
        Some("always_on") => SamplerSetting::AlwaysOn,
        Some("always_off") => SamplerSetting::AlwaysOff,
        Some("traceidratio") => SamplerSetting::Ratio(ratio),
        Some("parentbased_always_off") => SamplerSetting::ParentBasedAlwaysOff,
        Some("parentbased_traceidratio") => SamplerSetting::ParentBasedRatio(ratio),
        Some(other) => {
            problems.push(Problem::new(
                "OTEL_TRACES_SAMPLER",
                format!(
                    "expected always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio, got {other:?}"
                ),
            ));
            SamplerSetting::ParentBasedAlwaysOn
        }
    };
    let millis = |name: &str, problems: &mut Vec<Problem>| {
        let raw = var(name)?;
        match raw.parse::<u64>() {
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(_) => {
                problems.push(Problem::new(
                    name,
                    format!("expected a whole number of milliseconds, got {raw:?}"),
                ));
                None
            }
        }
    };
    // Read by the SDK itself; checked here so a typo is not silently the default.
    let _ = millis("OTEL_BSP_SCHEDULE_DELAY", &mut problems);
    let timeout = millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", &mut problems)
        .or_else(|| millis("OTEL_EXPORTER_OTLP_TIMEOUT", &mut problems))
        .unwrap_or(Duration::from_secs(10));
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Some(TraceSettings {
        protocol,
        sampler,
        timeout,
        service_name: var("OTEL_SERVICE_NAME"),
        instance_given: var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
            a.split(',')
                .any(|kv| kv.trim().starts_with("service.instance.id="))
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traces(vars: &[(&str, &str)]) -> Result<Option<TraceSettings>, Vec<Problem>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        trace_settings(|name| vars.get(name).cloned())
    }

    #[test]
    fn traces_are_off_unless_an_endpoint_is_given() {
        assert_eq!(traces(&[]), Ok(None));
        assert_eq!(traces(&[("OTEL_TRACES_SAMPLER", "always_on")]), Ok(None));
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        let settings = traces(&on).unwrap().unwrap();
        assert_eq!(settings.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(settings.sampler, SamplerSetting::ParentBasedAlwaysOn);
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(traces(&[on[0], off]), Ok(None));
        }
        let grpc = traces(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.instance.id=web-1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(grpc.protocol, OtlpProtocol::Grpc);
        assert_eq!(grpc.sampler, SamplerSetting::ParentBasedRatio(0.25));
        assert!(grpc.instance_given);
    }

    #[test]
    fn a_bad_trace_setting_is_named_not_replaced_by_a_default() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        for (bad, setting) in [
            (
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp"),
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            ),
            (("OTEL_TRACES_SAMPLER", "sometimes"), "OTEL_TRACES_SAMPLER"),
            (
                ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                ("OTEL_TRACES_SAMPLER_ARG", "half"),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (("OTEL_BSP_SCHEDULE_DELAY", "5s"), "OTEL_BSP_SCHEDULE_DELAY"),
            (
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1"),
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (("OTEL_TRACES_EXPORTER", "zipkin"), "OTEL_TRACES_EXPORTER"),
        ] {
            let problems = traces(&[on, bad]).unwrap_err();
            assert_eq!(problems.len(), 1, "{bad:?}: {problems:?}");
            assert_eq!(problems[0].setting, setting);
        }
        for endpoint in ["collector:4318", "ftp://c", "http://"] {
            let problems = traces(&[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)]).unwrap_err();
            assert_eq!(
                problems[0].setting, "OTEL_EXPORTER_OTLP_ENDPOINT",
                "{endpoint}"
            );
        }
    }

    #[test]
    fn durations_in_a_range() {
        let lease = parse_duration_in(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(lease("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(lease("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(lease("1m"), lease("30s30s"));
        for bad in ["999ms", "1ms", "0s", "61s", "1h", "soon", "", "-1s"] {
            let err = lease(bad).unwrap_err();
            assert!(err.contains("from 1s to 1m"), "{bad}: {err}");
        }
        assert_eq!(short_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(short_duration(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(short_duration(Duration::from_millis(1_500)), "1500ms");
    }

    #[test]
    fn numbers_in_a_range() {
        let buffer = parse_number_in::<usize>(1, 65_536);
        assert_eq!(buffer("1"), Ok(1));
        assert_eq!(buffer("65536"), Ok(65_536));
        for bad in ["0", "65537", "1000000000000", "-1", "1.5", "many", "1e3"] {
            let err = buffer(bad).unwrap_err();
            assert!(err.contains("from 1 to 65,536"), "{bad}: {err}");
        }
        let rate = parse_number_in::<f64>(0.01, 100_000.0);
        assert_eq!(rate("0.5"), Ok(0.5));
        for bad in ["0", "NaN", "inf", "-1", "1e9", "1e-300"] {
            assert!(rate(bad).is_err(), "{bad}");
        }
        assert_eq!(grouped("100000"), "100,000");
        assert_eq!(grouped("10000000"), "10,000,000");
        assert_eq!(grouped("0.01"), "0.01");
    }

    #[test]
    fn the_public_url_is_an_origin() {
        let ok = parse_public_url("https://coven.example.com/").unwrap();
        assert_eq!(
            join_url(&ok, "/auth/callback"),
            "https://coven.example.com/auth/callback"
        );
        assert!(parse_public_url("http://127.0.0.1:3000").is_ok());
        let path = parse_public_url("https://example.com/coven").unwrap_err();
        assert!(path.contains("root of its origin"), "{path}");
        for bad in [
            "https://example.com/coven/",
            "https://example.com/?a=1",
            "https://example.com/#top",
            "ftp://example.com",
            "https://",
        ] {
            assert!(parse_public_url(bad).is_err(), "{bad}");
        }
        let err = parse_public_url("https://admin:hunter2@example.com").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(parse_public_url("https://admin@example.com").is_err());
    }

    #[test]
    fn snowflakes() {
        assert_eq!(parse_guild_id("42").map(Id::get), Ok(42));
        for bad in [
            "0",
            "-1",
            "abc",
            "1.5",
            "99999999999999999999",
            "+42",
            "042",
            " 42",
            "",
            "4 2",
        ] {
            assert!(parse_guild_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_keep_no_trailing_slash() {
        let u = parse_http_url("https://discord.com/api/").unwrap();
        assert_eq!(
            join_url(&u, "/v10/users/@me"),
            "https://discord.com/api/v10/users/@me"
        );
        assert!(parse_ws_url("wss://gateway.discord.gg").is_ok());
        assert!(parse_ws_url("https://gateway.discord.gg").is_err());
        assert!(parse_http_url("not a url").is_err());
        assert!(parse_http_url("http://").is_err());
        assert!(parse_http_url("http://x/?a=1").is_err());
    }

    #[test]
    fn redis_urls_and_prefixes() {
        assert!(parse_redis_url("redis://127.0.0.1:6379").is_ok());
        assert!(parse_redis_url("rediss://u:p@host:6380/1").is_ok());
        let err = parse_redis_url("http://u:hunter2@host").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(
            parse_redis_url(
                "rediss-sentinel://u:p@s1:26379/0?sentinelServiceName=mymaster&sentinelUsername=su&sentinelPassword=sp&node=s2:26379"
            )
            .is_ok()
        );
        for socket in ["unix:///run/redis.sock", "redis+unix:///run/redis.sock"] {
            assert!(
                parse_redis_url(socket).is_err(),
                "{socket}: not compiled in"
            );
        }
        assert!(parse_key_prefix("coven").is_ok());
        assert!(parse_key_prefix("a{b").is_err());
        assert!(parse_key_prefix("a b").is_err());
    }

    #[test]
    fn secrets_are_never_quoted() {
        let err = parse_secret(32)("hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(parse_secret(4)("hunter2").is_ok());
    }

    /// A command with the kinds of settings the real ones have.
    #[derive(Debug, clap::Parser)]
    struct Example {
        #[arg(long, env = "COVEN_TEST_GUILD", value_parser = parse_guild_id)]
        guild: Id<GuildMarker>,
        #[arg(long, env = "COVEN_TEST_SECRET", value_parser = parse_secret(8))]
        secret: SecretString,
        #[arg(long, default_value = "30s", value_parser = parse_duration_in(Duration::from_secs(1), Duration::from_secs(60)))]
        lease: Duration,
        #[arg(long, value_parser = parse_number_in::<u16>(1, 99))]
        players: Option<u16>,
        #[arg(long)]
        quiet: bool,
    }

    fn parsed(args: &[&str]) -> Result<Example, Vec<String>> {
        let args = std::iter::once("coven").chain(args.iter().copied());
        let lease_over = |_: &str, parsed: &Parsed| {
            let lease = parsed.get::<Duration>("--lease")?;
            (lease > Duration::from_secs(50)).then(|| Problem::new("--lease", "over 50s"))
        };
        parse::<Example>(args.map(OsString::from).collect(), |c, p| {
            lease_over(c, p).into_iter().collect()
        })
        .map_err(|problems| problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn every_problem_is_found_in_one_pass() {
        let problems = parsed(&["--guild", "abc", "--lease", "2m", "--players=-4"]).unwrap_err();
        assert_eq!(
            problems,
            [
                r#"COVEN_TEST_GUILD: expected a Discord id (a positive whole number), got "abc""#,
                "COVEN_TEST_SECRET: is required but not set",
                r#"--lease: expected a duration from 1s to 1m, got "2m""#,
                r#"--players: expected a number from 1 to 99, got "-4""#,
            ]
        );
        let secret = parsed(&["--guild", "1", "--secret", "hunter2"]).unwrap_err();
        assert_eq!(
            secret,
            ["COVEN_TEST_SECRET: must be at least 8 bytes long (it has 7)"]
        );
    }

    #[test]
    fn good_values_parse_typed_with_their_defaults() {
        let ok = parsed(&["--guild", "7", "--secret", "long enough", "--quiet"]).unwrap();
        assert_eq!(ok.guild, Id::new(7));
        assert_eq!(ok.lease, Duration::from_secs(30));
        assert_eq!(ok.players, None);
        assert!(ok.quiet);
        assert!(!format!("{ok:?}").contains("long enough"), "{ok:?}");
    }

    #[derive(Debug, clap::Args)]
    struct Tunable {
        #[arg(long, env = "COVEN_TEST_LEASE", default_value = "10s", value_parser = parse_duration_in(Duration::from_secs(1), Duration::from_secs(60)))]
        lease: Duration,
        #[arg(long, default_value = KEY_PREFIX, value_parser = parse_key_prefix)]
        prefix: String,
    }

    #[test]
    fn defaults_are_the_declared_ones() {
        let d = defaults::<Tunable>();
        assert_eq!(
            (d.lease, d.prefix.as_str()),
            (Duration::from_secs(10), "coven")
        );
    }
}
