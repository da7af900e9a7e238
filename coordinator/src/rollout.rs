//! The rollout task: runs the coordinator's own rollout hook for each deploy the gate queued,
//! one at a time, then the optional verify hook, and the rollback hook when verify fails.
//!
//! Hooks come only from the coordinator's configuration: a command (argv, never a shell
//! string) with `RUN_ID`, `REVISION`, `SUITE`, `REQUESTED_BY`, `DEPLOY_ID` and `AUTHORS` in its
//! environment, or a plain-HTTP webhook that receives the same as JSON. Nothing that arrives
//! over the network is ever run. A deploy is marked `running` (committed) before its hook
//! starts; if the coordinator dies during the hook, the next start marks it `unknown` and does
//! not run it again.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::actor::Handle;
use crate::store::{DeployRow, DeployState};

/// The hooks, from the coordinator's configuration.
#[derive(Debug, Clone, Default)]
pub struct RolloutConfig {
    /// The rollout command, as argv.
    pub command: Option<Vec<String>>,
    /// Or a webhook, `http://host:port/path`, POSTed the deploy as JSON.
    pub url: Option<String>,
    /// Run after a successful rollout; a failure means the rollout failed.
    pub verify: Option<Vec<String>>,
    /// Run when verify fails.
    pub rollback: Option<Vec<String>>,
    /// Longest any one hook may run before it is killed and counted as failed.
    pub timeout: Duration,
}

impl RolloutConfig {
    pub fn is_configured(&self) -> bool {
        self.command.is_some() || self.url.is_some()
    }

    /// Checks the configuration: argv non-empty, the URL plain HTTP.
    pub fn check(&self) -> Result<(), String> {
        for (name, argv) in [
            ("--rollout-command", &self.command),
            ("--verify-command", &self.verify),
            ("--rollback-command", &self.rollback),
        ] {
            if argv.as_ref().is_some_and(|a| a.is_empty() || a[0].is_empty()) {
                return Err(format!(
                    "{name} needs a program: a JSON array like [\"/usr/bin/deploy\", \"--prod\"]"
                ));
            }
        }
        if self.command.is_some() && self.url.is_some() {
            return Err("give --rollout-command or --rollout-url, not both".into());
        }
        if let Some(url) = &self.url {
            parse_http_url(url)?;
        }
        if (self.verify.is_some() || self.rollback.is_some()) && !self.is_configured() {
            return Err("--verify-command and --rollback-command need a rollout hook".into());
        }
        Ok(())
    }
}

/// Runs deploys as the gate queues them, until the actor stops.
pub async fn run(handle: Handle, cfg: RolloutConfig) {
    if !cfg.is_configured() {
        return;
    }
    loop {
        let next = handle.call(|core, now| core.start_next_deploy(now)).await;
        let deploy = match next {
            Ok(Some(d)) => d,
            Ok(None) => {
                handle.deploy_added().await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, "rollout task stopping: the scheduler is gone");
                return;
            }
        };
        let (state, detail) = deploy_one(&cfg, &deploy).await;
        let id = deploy.id.clone();
        let recorded = handle
            .call(move |core, now| core.finish_deploy(&id, state, &detail, now))
            .await;
        match recorded {
            Ok(_) => handle.metrics().rollout(state.as_str()),
            Err(e) => warn!(deploy = %deploy.id, error = %e, "failed to record the rollout's outcome"),
        }
    }
}

/// Runs the hooks for one deploy; returns its final state and what happened.
async fn deploy_one(cfg: &RolloutConfig, d: &DeployRow) -> (DeployState, String) {
    let rollout = match (&cfg.command, &cfg.url) {
        (Some(argv), _) => run_hook("rollout", argv, d, cfg.timeout).await,
        (None, Some(url)) => webhook(url, d, cfg.timeout).await,
        (None, None) => Err("no rollout hook".into()),
    };
    let rollout_note = match rollout {
        Ok(note) => note,
        Err(e) => return (DeployState::Failed, e),
    };
    let Some(verify) = &cfg.verify else {
        return (DeployState::Succeeded, rollout_note);
    };
    let verify_err = match run_hook("verify", verify, d, cfg.timeout).await {
        Ok(note) => return (DeployState::Succeeded, format!("{rollout_note}\n{note}")),
        Err(e) => e,
    };
    let Some(rollback) = &cfg.rollback else {
        return (DeployState::Failed, format!("{rollout_note}\n{verify_err}"));
    };
    match run_hook("rollback", rollback, d, cfg.timeout).await {
        Ok(note) => (
            DeployState::RolledBack,
            format!("{rollout_note}\n{verify_err}\n{note}"),
        ),
        Err(e) => (DeployState::Failed, format!("{rollout_note}\n{verify_err}\n{e}")),
    }
}

/// The deploy as environment variables for a command hook.
fn env_of(d: &DeployRow) -> [(&'static str, String); 6] {
    [
        ("DEPLOY_ID", d.id.clone()),
        ("RUN_ID", d.run_id.to_string()),
        ("REVISION", d.revision.clone()),
        ("SUITE", d.suite.clone()),
        ("REQUESTED_BY", d.requested_by.clone()),
        ("AUTHORS", d.authors.join(",")),
    ]
}

/// The last `max` bytes of `s`, on a character boundary.
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Runs one command hook to its end (or its timeout); Ok with a note when it exits 0.
async fn run_hook(name: &str, argv: &[String], d: &DeployRow, timeout: Duration) -> Result<String, String> {
    info!(hook = name, deploy = %d.id, program = %argv[0], "running hook");
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env_of(d))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("{name} hook: failed to start {}: {e}", argv[0]))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!("{name} hook: killed after {timeout:?}")),
        Ok(Err(e)) => Err(format!("{name} hook: {e}")),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let text = tail(text.trim_end(), 4096);
            if out.status.success() {
                Ok(format!("{name} hook: exit 0\n{text}").trim_end().to_owned())
            } else {
                Err(format!("{name} hook: {}\n{text}", out.status)
                    .trim_end()
                    .to_owned())
            }
        }
    }
}

/// `http://host[:port][/path]` → (host:port, path).
fn parse_http_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("--rollout-url '{url}': only http:// is supported (put a local relay in front of an https endpoint)")
    })?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if hostport.is_empty() {
        return Err(format!("--rollout-url '{url}' has no host"));
    }
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    Ok((hostport, path.to_owned()))
}

/// POSTs the deploy as JSON; Ok when the answer is 2xx.
async fn webhook(url: &str, d: &DeployRow, timeout: Duration) -> Result<String, String> {
    let (hostport, path) = parse_http_url(url)?;
    let body = serde_json::json!({
        "deploy_id": d.id, "run_id": d.run_id.to_string(), "revision": d.revision,
        "suite": d.suite, "requested_by": d.requested_by, "authors": d.authors,
    })
    .to_string();
    let post = async {
        let mut s = tokio::net::TcpStream::connect(&hostport)
            .await
            .map_err(|e| format!("webhook: cannot connect to {hostport}: {e}"))?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("webhook: {e}"))?;
        let mut resp = Vec::new();
        s.take(64 * 1024)
            .read_to_end(&mut resp)
            .await
            .map_err(|e| format!("webhook: {e}"))?;
        let resp = String::from_utf8_lossy(&resp);
        let status = resp.lines().next().unwrap_or_default().to_owned();
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if (200..300).contains(&code) {
            Ok(format!("webhook {url}: {status}"))
        } else {
            Err(format!(
                "webhook {url}: {}",
                if status.is_empty() { "no answer" } else { &status }
            ))
        }
    };
    tokio::time::timeout(timeout, post)
        .await
        .map_err(|_| format!("webhook {url}: no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_name_the_flag() {
        let bad = RolloutConfig {
            url: Some("https://deploy.example".into()),
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("only http:// is supported"));
        let empty = RolloutConfig {
            command: Some(vec![]),
            ..Default::default()
        };
        assert!(
            empty
                .check()
                .unwrap_err()
                .starts_with("--rollout-command needs a program")
        );
        let verify_alone = RolloutConfig {
            verify: Some(vec!["/bin/true".into()]),
            ..Default::default()
        };
        assert!(verify_alone.check().is_err());
        assert_eq!(
            parse_http_url("http://127.0.0.1:9/hook?x=1").unwrap(),
            ("127.0.0.1:9".into(), "/hook?x=1".into())
        );
        assert_eq!(
            parse_http_url("http://deploy").unwrap(),
            ("deploy:80".into(), "/".into())
        );
    }

    fn deploy() -> DeployRow {
        DeployRow {
            id: "d1".into(),
            run_id: shardgate_common::RunId::new(),
            suite: "s".into(),
            revision: "abc".into(),
            requested_by: "ann".into(),
            authors: vec!["ann".into(), "bob".into()],
            created_ms: 1,
            started_ms: 2,
            finished_ms: 0,
            state: DeployState::Running,
            detail: String::new(),
        }
    }

    /// A one-shot HTTP server answering `status`; returns its URL and the request it got.
    async fn server(status: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", l.local_addr().unwrap());
        let got = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut req = Vec::new();
            // Read the head and the body (Content-Length) before answering.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        (url, got)
    }

    #[tokio::test]
    async fn the_webhook_gets_the_deploy_as_json_and_a_non_2xx_answer_fails_it() {
        let (url, got) = server("200 OK").await;
        let note = webhook(&url, &deploy(), Duration::from_secs(5)).await.unwrap();
        assert!(note.ends_with("HTTP/1.1 200 OK"), "{note}");
        let req = got.await.unwrap();
        assert!(req.starts_with("POST /hook HTTP/1.1\r\n"), "{req}");
        let body: serde_json::Value = serde_json::from_str(req.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["deploy_id"], "d1");
        assert_eq!(body["authors"], serde_json::json!(["ann", "bob"]));

        let (url, _got) = server("503 Service Unavailable").await;
        let err = webhook(&url, &deploy(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.ends_with("HTTP/1.1 503 Service Unavailable"), "{err}");
        let err = webhook("http://127.0.0.1:1/x", &deploy(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("cannot connect to 127.0.0.1:1"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_verify_runs_the_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let sh = |body: &str| {
            vec![
                "/bin/sh".to_string(),
                "-c".into(),
                format!("{body} >> '{}'", log.display()),
            ]
        };
        let cfg = RolloutConfig {
            command: Some(sh("echo rollout $REVISION")),
            verify: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo smoke failed; exit 3".into(),
            ]),
            rollback: Some(sh("echo rollback $DEPLOY_ID")),
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let (state, detail) = deploy_one(&cfg, &deploy()).await;
        assert_eq!(state, DeployState::RolledBack, "{detail}");
        assert!(
            detail.contains("verify hook: exit status: 3\nsmoke failed"),
            "{detail}"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "rollout abc\nrollback d1\n"
        );

        let slow = RolloutConfig {
            command: Some(vec!["/bin/sleep".into(), "5".into()]),
            timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let (state, detail) = deploy_one(&slow, &deploy()).await;
        assert_eq!(
            (state, detail.as_str()),
            (DeployState::Failed, "rollout hook: killed after 200ms")
        );
    }

    #[test]
    fn tail_keeps_whole_characters() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
