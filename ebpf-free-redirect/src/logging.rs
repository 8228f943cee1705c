//! Log set-up shared by every zmesh binary (zmesh-node, zmesh-waypoint, zmesh-redirect), so one
//! pipeline reads them all: the filter comes from `ZMESH_LOG` (else `RUST_LOG`, else `info`),
//! the format from `LOG_FORMAT` (`text`, the default, or `json`).
//!
//! In JSON every line is one object with the same keys whatever the binary: `timestamp`
//! (RFC 3339, UTC), `level`, `target`, `message`, then the event's own fields at the top level
//! (a node access line's `src.addr`, `bytes_sent`, ...). Any other `LOG_FORMAT` value is not
//! fatal: the process logs as text and says so in its first line (a typo in a DaemonSet must
//! not take a node's traffic down).

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable that picks the format.
pub const FORMAT_ENV: &str = "LOG_FORMAT";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The log filter every zmesh binary starts with: `ZMESH_LOG`, else `RUST_LOG` (what ztunnel and
/// most Rust tools read), else `info`. tracing's `EnvFilter` syntax.
pub fn log_filter() -> String {
    ["ZMESH_LOG", "RUST_LOG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "info".to_string())
}

/// The format `LOG_FORMAT` names; unset or empty is text. The second value is the warning to
/// log when the variable held something else (the format is then text).
pub fn parse_format(value: Option<&str>) -> (LogFormat, Option<String>) {
    match value.map(str::trim) {
        None | Some("") => (LogFormat::Text, None),
        Some(v) if v.eq_ignore_ascii_case("text") => (LogFormat::Text, None),
        Some(v) if v.eq_ignore_ascii_case("json") => (LogFormat::Json, None),
        Some(v) => (
            LogFormat::Text,
            Some(format!(
                "{FORMAT_ENV}={v:?} is not a log format (use text or json); logging as text"
            )),
        ),
    }
}

/// `LOG_FORMAT` from the environment, as `parse_format` reads it.
pub fn log_format() -> (LogFormat, Option<String>) {
    parse_format(std::env::var(FORMAT_ENV).ok().as_deref())
}

/// The formatting layer of `format` writing to `writer`: plain text (coloured only when `ansi`),
/// or one flat JSON object per line.
pub fn fmt_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => layer
            .json()
            // The event's fields beside timestamp/level/target, not under a `fields` object:
            // the shape ztunnel's JSON lines have, so the same queries read both.
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    }
}

/// The filter `log_filter` names; an unparsable one falls back to `info` (returned as the
/// warning to log once logging is up).
pub fn env_filter() -> (EnvFilter, Option<String>) {
    let wanted = log_filter();
    match EnvFilter::try_new(&wanted) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!(
                "log filter {wanted:?} (ZMESH_LOG/RUST_LOG) is invalid: {e}; using info"
            )),
        ),
    }
}

/// Installs the process's subscriber on stderr with the environment's filter and format, then
/// logs any complaint about either. Returns the format. A second call changes nothing.
pub fn init_stderr() -> LogFormat {
    let (format, format_warning) = log_format();
    let (filter, filter_warning) = env_filter();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(format, std::io::stderr, ansi))
        .try_init()
        .is_ok();
    if installed {
        for w in [format_warning, filter_warning].into_iter().flatten() {
            tracing::warn!("{w}");
        }
    }
    format
}

/// The start line every binary logs first: its name, version and commit.
pub fn log_start(binary: &str) {
    tracing::info!(
        binary,
        version = crate::VERSION_NUMBER,
        git_sha = crate::GIT_SHA,
        "starting"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_values() {
        for (v, want) in [
            (None, LogFormat::Text),
            (Some(""), LogFormat::Text),
            (Some("text"), LogFormat::Text),
            (Some(" JSON "), LogFormat::Json),
            (Some("json"), LogFormat::Json),
        ] {
            assert_eq!(parse_format(v), (want, None), "{v:?}");
        }
    }

    /// Hostile: anything else is text, with a warning that quotes the value (escaped, so a
    /// value with quotes or newlines cannot forge log lines) and names the fallback.
    #[test]
    fn an_unknown_log_format_falls_back_to_text_with_a_warning() {
        let (format, warning) = parse_format(Some("jsn\n{\"level\":\"ERROR\"}"));
        assert_eq!(format, LogFormat::Text);
        let warning = warning.unwrap();
        assert!(
            warning.starts_with(r#"LOG_FORMAT="jsn\n{\"level\":\"ERROR\"}""#),
            "{warning}"
        );
        assert!(warning.ends_with("logging as text"), "{warning}");
        assert!(!warning.contains('\n'));
    }
}
