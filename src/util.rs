//! Small pieces the binaries share: logging set-up, shutdown signals, reading test lists.

use std::path::Path;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// The exit code when stdout or stderr is gone (`shardgate run … | head -1`, a worker whose
/// log pipe closed): the run's code once it is known, 2 before.
static EXIT_ON_CLOSED_OUTPUT: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(crate::exit::ERROR);

/// Sets the exit code used when output cannot be written any more.
pub fn exit_on_closed_output(code: u8) {
    EXIT_ON_CLOSED_OUTPUT.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// A closed stdout or stderr ends the process quietly with [`exit_on_closed_output`]'s code
/// instead of a panic (exit 101): the standard printing macros panic when the pipe is gone.
pub fn exit_quietly_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to std") {
            std::process::exit(i32::from(
                EXIT_ON_CLOSED_OUTPUT.load(std::sync::atomic::Ordering::Relaxed),
            ));
        }
        default(info);
    }));
}

/// An error and its causes on one line, each said once: libraries often repeat their cause's
/// words in their own ("tcp connect error: tcp connect error: …").
pub fn error_text(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if parts
            .last()
            .is_some_and(|last| last.ends_with(&text) || *last == text)
        {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

/// When `e` is a write to a closed pipe, the exit code to leave with quietly.
pub fn closed_output_exit(e: &anyhow::Error) -> Option<u8> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        .then(|| EXIT_ON_CLOSED_OUTPUT.load(std::sync::atomic::Ordering::Relaxed))
}

/// Logs to stderr. `SHARDGATE_LOG` (a tracing filter such as `info` or
/// `shardgate_coordinator=debug`) overrides `default`.
pub fn init_logging(default: &str, format: crate::args::LogFormat) {
    let filter = EnvFilter::try_from_env("SHARDGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        // One object per line, the fields (run, shard, worker, attempt ids) as keys.
        crate::args::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        // Colour only for a person at a terminal: log files and journals get plain text.
        crate::args::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// The exit code of a server binary: 0, or the error on stderr and exit code 2.
pub fn server_exit(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
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
