//! Running one child process the way every runner needs it: its own process group, stdout and
//! stderr interleaved in one pipe and captured up to a cap, a timeout and a cancellation that
//! kill the whole group, and the group killed after the child exits so nothing outlives it.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::output::CappedOutput;

/// How long to wait for the output pipe to close after the child exited and its group was
/// killed; a process that left the group (by `setsid`) may hold it open.
const PIPE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Cancelled,
    /// The program could not be started; the reason.
    NotStarted(String),
    /// Waiting for it failed.
    Lost(String),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub ending: Ending,
    pub duration: Duration,
    pub output: String,
    /// The time limit it ran under.
    pub limit: Option<Duration>,
}

impl Finished {
    /// How it ended, e.g. "exit status 1" or "timed out after 600000 ms".
    pub fn describe(&self) -> String {
        self.ending.describe(self.limit)
    }
}

impl Ending {
    /// A short description, e.g. "exit status 1".
    pub fn describe(&self, timeout: Option<Duration>) -> String {
        match self {
            Ending::Exited(c) => format!("exit status {c}"),
            Ending::Signaled(s) => format!("killed by signal {s}"),
            Ending::TimedOut => format!(
                "timed out after {} ms",
                timeout.map(|t| t.as_millis()).unwrap_or(0)
            ),
            Ending::Cancelled => "cancelled".into(),
            Ending::NotStarted(e) => format!("failed to start: {e}"),
            Ending::Lost(e) => format!("failed to wait: {e}"),
        }
    }
}

/// Runs `cmd` (stdio and process group are set here) to its end.
pub async fn run(
    mut cmd: tokio::process::Command,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
    max_output: usize,
) -> Finished {
    let started = Instant::now();
    let not_started = |e: String| Finished {
        ending: Ending::NotStarted(e),
        duration: started.elapsed(),
        output: String::new(),
        limit: timeout,
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return not_started(format!("failed to create an output pipe: {e}")),
    };
    let writer2 = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return not_started(format!("failed to create an output pipe: {e}")),
    };
    cmd.stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0)
        .kill_on_drop(true);
    let spawned = cmd.spawn();
    // Drop our copies of the pipe's write end so the reader sees EOF once the child's
    // processes are gone.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return not_started(e.to_string()),
    };
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let (out_tx, out_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut reader = reader;
        let mut buf = CappedOutput::new(max_output);
        let mut chunk = [0u8; 8192];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.push(&chunk[..n]),
            }
        }
        let _ = out_tx.send(buf.into_string());
    });
    let kill_group = || {
        if let Some(pgid) = pgid {
            // The group may already be gone: nothing to do then.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    };
    let sleep = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let ending = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => match s.code() {
                Some(c) => Ending::Exited(c),
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    Ending::Signaled(s.signal().unwrap_or(0))
                }
            },
            Err(e) => Ending::Lost(e.to_string()),
        },
        _ = sleep => {
            kill_group();
            let _ = child.wait().await;
            Ending::TimedOut
        }
        _ = cancel.cancelled() => {
            kill_group();
            let _ = child.wait().await;
            Ending::Cancelled
        }
    };
    kill_group();
    let duration = started.elapsed();
    let output = match tokio::time::timeout(PIPE_GRACE, out_rx).await {
        Ok(Ok(s)) => s,
        _ => "[output unavailable: a process that left the group holds the pipe open]".to_owned(),
    };
    Finished {
        ending,
        duration,
        output,
        limit: timeout,
    }
}
