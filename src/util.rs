//! Small pieces the binaries share: logging set-up, shutdown signals, reading test lists.

use std::path::Path;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// Logs to stderr. `SHARDGATE_LOG` (a tracing filter such as `info` or
/// `shardgate_coordinator=debug`) overrides `default`.
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_env("SHARDGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// The exit code of a server binary: 0, or the error on stderr and exit code 2.
pub fn server_exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(crate::exit::ERROR)
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("failed to install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("failed to install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Reads a test list: one id per line; blank lines and lines starting with '#' are skipped,
/// and surrounding white space is trimmed.
pub fn read_tests_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read tests file '{}'", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// This machine's host name, for a worker's default name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "worker".to_owned())
}

/// Who is running this command: `$USER`, else `$LOGNAME`, else "unknown".
pub fn current_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_files_skip_comments_and_blanks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tests.txt");
        std::fs::write(&p, "# suite\na.sh\n\n  b/c.sh  \r\n").unwrap();
        assert_eq!(read_tests_file(&p).unwrap(), vec!["a.sh", "b/c.sh"]);
        let err = read_tests_file(&dir.path().join("missing")).unwrap_err();
        assert!(
            format!("{err:#}").starts_with("failed to read tests file"),
            "{err:#}"
        );
    }
}
