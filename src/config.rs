//! Settings: read once at start from CLI flags, the environment and `.env` files, checked,
//! and handed to each command as typed values.
//!
//! Owns the names of every setting, their defaults and their validation. Must not open
//! sockets or talk to Redis or Discord: a bad setting is reported before anything starts,
//! one line per problem, and never echoes a secret's value.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use twilight_model::id::Id;
use twilight_model::id::marker::{ApplicationMarker, ChannelMarker, GuildMarker};
use url::Url;

/// One bad or missing setting: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub setting: &'static str,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// Every problem found in one pass, so an operator fixes them all at once.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

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
        dotenvy::from_filename(&path).map_err(|e| Problem {
            setting: "COVEN_ENV",
            message: format!("cannot read {name}: {e}"),
        })?;
        loaded.push(path);
    }
    Ok(loaded)
}

/// Collects problems while settings are parsed, so all are reported together.
#[derive(Debug, Default)]
pub struct Reader {
    problems: Vec<Problem>,
}

impl Reader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem found outside a single setting's parse (for example two settings
    /// that contradict each other).
    pub fn problem(&mut self, setting: &'static str, message: impl Into<String>) {
        self.problems.push(Problem {
            setting,
            message: message.into(),
        });
    }

    /// A setting that must be present.
    pub fn required<T>(
        &mut self,
        setting: &'static str,
        raw: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match present(raw) {
            Some(raw) => self.parse(setting, raw, parse),
            None => {
                self.problem(setting, "is required but not set");
                None
            }
        }
    }

    /// A setting with a default used when it is absent or empty.
    pub fn or_default<T>(
        &mut self,
        setting: &'static str,
        raw: Option<&str>,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match present(raw) {
            Some(raw) => self.parse(setting, raw, parse),
            None => Some(default),
        }
    }

    /// A setting that may be absent. `Some(None)` means absent, `None` means invalid.
    pub fn optional<T>(
        &mut self,
        setting: &'static str,
        raw: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<Option<T>> {
        match present(raw) {
            Some(raw) => self.parse(setting, raw, parse).map(Some),
            None => Some(None),
        }
    }

    fn parse<T>(
        &mut self,
        setting: &'static str,
        raw: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(raw) {
            Ok(v) => Some(v),
            Err(message) => {
                self.problem(setting, message);
                None
            }
        }
    }

    /// Ends the pass: `Err` with every problem when there were any.
    pub fn finish(self) -> Result<(), Problems> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(self.problems))
        }
    }

    /// Ends the pass and returns the problems, even when `finish` found none: used when a
    /// typed value is missing after parsing, which only happens with problems recorded.
    pub fn into_problems(self) -> Problems {
        Problems(self.problems)
    }
}

/// Treats an empty value like an unset one: `.env.example` style `KEY=` lines mean "unset".
fn present(raw: Option<&str>) -> Option<&str> {
    raw.map(str::trim).filter(|s| !s.is_empty())
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

fn parse_snowflake(raw: &str) -> Result<u64, String> {
    match raw.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "expected a Discord id (a positive whole number), got {raw:?}"
        )),
    }
}

/// Durations are written `500ms`, `30s`, `5m`, `1h` (and combinations such as `1h30m`).
/// Settings use [`parse_duration_in`]: every duration setting has a range.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw)
        .map_err(|_| format!("expected a duration such as 500ms, 30s, 5m or 1h, got {raw:?}"))?;
    if d.is_zero() {
        return Err(format!("must be longer than zero, got {raw:?}"));
    }
    Ok(d)
}

/// A duration from `min` to `max` (both included). Every duration setting has a range:
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

/// Settings use [`parse_number_in`]: every numeric setting has a range.
pub fn parse_positive<T>(raw: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + Default,
{
    match raw.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(format!("expected a positive whole number, got {raw:?}")),
    }
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
pub fn parse_secret(min: usize) -> impl FnOnce(&str) -> Result<SecretString, String> {
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
    const SCHEMES: &[&str] = &[
        "redis://",
        "rediss://",
        "redis-cluster://",
        "rediss-cluster://",
        "redis-sentinel://",
        "rediss-sentinel://",
        "unix://",
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

/// Shows that a secret is set without showing it.
pub fn describe_secret(secret: &SecretString) -> String {
    format!("<redacted, {} bytes>", secret.expose_secret().len())
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

// ---------------------------------------------------------------------------------------
// Command-line flags shared by several commands. Each flag also reads its environment
// variable (and so the `.env` files); values are kept raw here and parsed by the command
// that needs them, so one pass can report every problem.

/// Logging, shared by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides it
    #[arg(long, env = "LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// pretty or json
    #[arg(long, env = "LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
}

impl LogArgs {
    pub fn settings(&self, r: &mut Reader) -> Option<LogSettings> {
        let level = r.or_default(
            "LOG_LEVEL",
            self.log_level.as_deref(),
            "info".to_owned(),
            parse_log_level,
        );
        let format = r.or_default(
            "LOG_FORMAT",
            self.log_format.as_deref(),
            LogFormat::Pretty,
            parse_log_format,
        );
        let filter = match std::env::var("RUST_LOG") {
            Ok(f) if !f.trim().is_empty() => Some(f),
            _ => level,
        };
        Some(LogSettings {
            filter: filter?,
            format: format?,
        })
    }
}

/// Who we are to Discord: shared by `sim` (as its truth) and the commands that talk to it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiscordArgs {
    /// The guild (server) Coven serves
    #[arg(long, env = "DISCORD_GUILD_ID")]
    pub discord_guild_id: Option<String>,
    /// Alias of DISCORD_GUILD_ID kept from the original system
    #[arg(long, env = "PRIMARY_GUILD_ID", hide = true)]
    pub primary_guild_id: Option<String>,
    /// Bot token (secret)
    #[arg(long, env = "DISCORD_BOT_TOKEN", hide_env_values = true)]
    pub discord_bot_token: Option<String>,
    /// OAuth2 application (client) id
    #[arg(long, env = "DISCORD_CLIENT_ID")]
    pub discord_client_id: Option<String>,
    /// OAuth2 client secret (secret)
    #[arg(long, env = "DISCORD_CLIENT_SECRET", hide_env_values = true)]
    pub discord_client_secret: Option<String>,
}

impl DiscordArgs {
    /// DISCORD_GUILD_ID, or its alias PRIMARY_GUILD_ID.
    pub fn guild_id(&self) -> Option<&str> {
        present(self.discord_guild_id.as_deref()).or(present(self.primary_guild_id.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("500ms", Some(Duration::from_millis(500))),
            ("30s", Some(Duration::from_secs(30))),
            ("5m", Some(Duration::from_secs(300))),
            ("1h", Some(Duration::from_secs(3600))),
            ("1h30m", Some(Duration::from_secs(5400))),
            ("0s", None),
            ("30", None),
            ("soon", None),
            ("-5s", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_duration(raw).ok(), want, "{raw}");
        }
    }

    #[test]
    fn durations_in_a_range() {
        let lease = parse_duration_in(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(lease("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(lease("1m"), Ok(Duration::from_secs(60)));
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
        for bad in ["0", "-1", "abc", "1.5", "99999999999999999999"] {
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

    #[test]
    fn reader_collects_every_problem() {
        let mut r = Reader::new();
        let a = r.required("A", None, parse_guild_id);
        let b = r.required("B", Some("x"), parse_guild_id);
        let c = r.or_default("C", Some(""), Duration::from_secs(1), parse_duration);
        let d = r.optional("D", None, parse_guild_id);
        assert!(a.is_none() && b.is_none());
        assert_eq!(c, Some(Duration::from_secs(1)));
        assert_eq!(d, Some(None));
        let problems = r.finish().unwrap_err();
        assert_eq!(problems.0.len(), 2);
        assert_eq!(problems.0[0].to_string(), "A: is required but not set");
        assert!(
            problems.0[1]
                .to_string()
                .starts_with("B: expected a Discord id")
        );
    }
}
