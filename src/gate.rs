//! The gate's commands: the flakiest tests of a suite, and quarantine.

use shardgate_common::pb;
use shardgate_common::pb::gate_service_client::GateServiceClient;

use crate::args::{DeploysArgs, FlakyArgs, QuarantineCommand};
use crate::connect::{connect, refused};
use crate::exit;

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM` UTC, or "-" for none.
fn when(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    // 2026-11-26T08:57:01Z -> 2026-11-26 08:57
    s.get(..16).unwrap_or(&s).replace('T', " ")
}

pub async fn flaky(a: FlakyArgs) -> anyhow::Result<u8> {
    let mut client = GateServiceClient::new(connect(&a.conn).await?);
    let tests = client
        .list_flaky(pb::ListFlakyRequest {
            suite: a.suite.clone(),
            limit: a.limit,
        })
        .await
        .map_err(|s| refused("failed to list flaky tests", s))?
        .into_inner()
        .tests;
    if a.output.json {
        println!("{}", serde_json::to_string_pretty(&tests)?);
        return Ok(exit::PASSED);
    }
    if tests.is_empty() {
        println!("no flaky tests in suite '{}'", a.suite);
        return Ok(exit::PASSED);
    }
    println!(
        "{:>7} {:>6} {:>6} {:>6} {:>6}  {:<17} test",
        "rate", "flakes", "runs", "fails", "flips", "last flake (UTC)"
    );
    for t in &tests {
        let note = if t.quarantined {
            "  [quarantined]"
        } else if t.propose_quarantine {
            "  [proposed for quarantine]"
        } else {
            ""
        };
        println!(
            "{:>6.1}% {:>6} {:>6} {:>6} {:>6}  {:<17} {}{note}",
            100.0 * t.flake_rate,
            t.flakes,
            t.runs,
            t.failures,
            t.flips,
            when(t.last_flake_at_ms),
            t.test_id
        );
    }
    let proposed: Vec<&str> = tests
        .iter()
        .filter(|t| t.propose_quarantine)
        .map(|t| t.test_id.as_str())
        .collect();
    if !proposed.is_empty() {
        println!(
            "\n{} test(s) proposed for quarantine: shardgate quarantine add --suite {} TEST --reason \"…\"",
            proposed.len(),
            a.suite
        );
    }
    Ok(exit::PASSED)
}

pub async fn quarantine(q: QuarantineCommand) -> anyhow::Result<u8> {
    match q {
        QuarantineCommand::Add(a) => {
            let mut client = GateServiceClient::new(connect(&a.conn).await?);
            let by = a.by.unwrap_or_else(crate::util::current_user);
            let e = client
                .add_quarantine(pb::AddQuarantineRequest {
                    suite: a.suite,
                    test_id: a.test_id,
                    reason: a.reason,
                    added_by: by,
                })
                .await
                .map_err(|s| refused("failed to quarantine", s))?
                .into_inner();
            if a.output.json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!(
                    "quarantined {} in suite {} ({}, by {})",
                    e.test_id, e.suite, e.reason, e.added_by
                );
            }
        }
        QuarantineCommand::Remove(r) => {
            let mut client = GateServiceClient::new(connect(&r.conn).await?);
            let removed = client
                .remove_quarantine(pb::RemoveQuarantineRequest {
                    suite: r.suite.clone(),
                    test_id: r.test_id.clone(),
                })
                .await
                .map_err(|s| refused("failed to lift the quarantine", s))?
                .into_inner()
                .removed;
            if !removed {
                anyhow::bail!("{} is not quarantined in suite {}", r.test_id, r.suite);
            }
            if r.output.json {
                let v = serde_json::json!({ "suite": r.suite, "test_id": r.test_id, "removed": true });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("lifted the quarantine of {} in suite {}", r.test_id, r.suite);
            }
        }
        QuarantineCommand::List(l) => {
            let mut client = GateServiceClient::new(connect(&l.conn).await?);
            let entries = client
                .list_quarantine(pb::ListQuarantineRequest {
                    suite: l.suite.unwrap_or_default(),
                })
                .await
                .map_err(|s| refused("failed to list the quarantine", s))?
                .into_inner()
                .entries;
            if l.output.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!("no quarantined tests");
            } else {
                for e in entries {
                    println!(
                        "{:<12} {:<40} {:<17} {:<12} {}",
                        e.suite,
                        e.test_id,
                        when(e.added_at_ms),
                        e.added_by,
                        e.reason
                    );
                }
            }
        }
    }
    Ok(exit::PASSED)
}

pub async fn deploys(a: DeploysArgs) -> anyhow::Result<u8> {
    let mut client = GateServiceClient::new(connect(&a.conn).await?);
    let log = client
        .list_deploys(pb::ListDeploysRequest {
            limit: a.limit,
            run_id: a.run.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| refused("failed to list deploys", s))?
        .into_inner();
    if a.output.json {
        println!("{}", serde_json::to_string_pretty(&log)?);
        return Ok(exit::PASSED);
    }
    if log.last_started_at_ms == 0 {
        println!("no deploys yet");
    } else {
        let ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH + std::time::Duration::from_millis(log.last_started_at_ms))
            .map(|d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|_| "just now".into());
        println!(
            "last deploy: {} UTC by {} ({ago} ago); {} in the last day, {} in the last week",
            when(log.last_started_at_ms),
            log.last_requested_by,
            log.last_day,
            log.last_week
        );
    }
    for d in &log.deploys {
        let took = if d.finished_at_ms >= d.started_at_ms && d.started_at_ms > 0 && d.finished_at_ms > 0 {
            format!("{:.1} s", (d.finished_at_ms - d.started_at_ms) as f64 / 1000.0)
        } else {
            "-".into()
        };
        println!(
            "{:<11} {:<16} {:<17} {:>8}  {:<12} {:<20} run {}",
            d.state,
            d.revision,
            when(d.started_at_ms.max(d.created_at_ms)),
            took,
            d.requested_by,
            d.authors.join(","),
            d.run_id
        );
    }
    if let (Some(run), true) = (&a.run, log.deploys.is_empty()) {
        println!("run {run} made no deploy");
    }
    Ok(exit::PASSED)
}

/// `shardgate token new`: a fresh secret on the first line, then the table for the
/// coordinator's `--tokens` file, which keeps only the secret's SHA-256.
pub fn token(cmd: crate::args::TokenCommand) -> anyhow::Result<u8> {
    let crate::args::TokenCommand::New(a) = cmd;
    anyhow::ensure!(
        !a.name.is_empty()
            && a.name.len() <= 64
            && a.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)),
        "invalid --name '{}': use letters, digits, '-', '_', '.' and '@', at most 64",
        a.name
    );
    let secret = shardgate_common::auth::new_secret();
    println!("{secret}");
    println!();
    println!(
        "# Add to the coordinator's --tokens file; give the secret above to '{}' only.",
        a.name
    );
    println!("[tokens.{}]", a.name);
    println!("role = \"{}\"", a.role);
    println!("sha256 = \"{}\"", shardgate_common::auth::digest_hex(&secret));
    Ok(exit::PASSED)
}
