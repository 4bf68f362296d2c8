//! Logging setup: one subscriber for the whole process, pretty for people, JSON for log
//! pipelines. Owns nothing else; must not decide what is logged.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Safe to call more than once (tests): later calls are
/// ignored.
pub fn init(settings: &LogSettings) {
    // The filter string was validated for LOG_LEVEL; RUST_LOG is the operator's own
    // directive, and an unparsable one falls back to "info" rather than silence.
    let filter = EnvFilter::try_new(&settings.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never into files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Pretty => builder.with_target(true).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
