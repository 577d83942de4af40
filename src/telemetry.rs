//! Logging set-up: `tracing-subscriber` with `RUST_LOG` honoured (default `info`), pretty or JSON
//! lines on stderr. Spans carry identifiers (job id, provider, account, masked email), never
//! payloads or secrets.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Installs the global subscriber with `RUST_LOG`, or `default_level` when it is unset; a
/// second call (tests) is a no-op.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Pretty => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// `jane.doe@example.com` → `ja***@example.com`: enough to tell contacts apart in logs.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let keep: String = local.chars().take(2).collect();
            format!("{keep}***@{domain}")
        }
        None => "***".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn masks_the_local_part() {
        assert_eq!(
            super::mask_email("jane.doe@example.com"),
            "ja***@example.com"
        );
        assert_eq!(super::mask_email("j@x.io"), "j***@x.io");
        assert_eq!(super::mask_email("nonsense"), "***");
    }
}
