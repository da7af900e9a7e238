//! Unit tests of the scheduling core: no network, an in-memory or temporary database, and a
//! stepped clock.

use std::path::Path;
use std::time::Duration;

use shardgate_common::{AttemptId, Error, Outcome, RunId, RunStatus, WorkerId, pb};

use super::Core;
use crate::model::{CoreConfig, Now};
use crate::store::SqliteStore;

fn core_at(path: &Path, now: Now) -> Core {
    Core::open(CoreConfig::default(), SqliteStore::open(path).unwrap(), now).unwrap()
}

fn core() -> (Core, Now) {
    let now = Now::real();
    (core_at(Path::new(":memory:"), now), now)
}

fn register(core: &mut Core, name: &str, slots: u32, labels: &[(&str, &str)], now: Now) -> WorkerId {
    let resp = core
        .register(
            pb::RegisterRequest {
                name: name.into(),
                slots,
                labels: labels
                    .iter()
                    .map(|(k, v)| pb::Label {
                        key: (*k).into(),
                        value: (*v).into(),
                    })
                    .collect(),
                runners: vec![pb::RunnerInfo {
                    name: "exec".into(),
                    kind: pb::RunnerKind::Exec as i32,
                }],
            },
            now,
        )
        .unwrap();
    resp.worker_id.parse().unwrap()
}

pub(super) fn submit_req(tests: &[&str]) -> pb::SubmitRunRequest {
    pb::SubmitRunRequest {
        suite: "unit".into(),
        revision: "r1".into(),
        requested_by: "ci".into(),
        runner: "exec".into(),
        tests: tests.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn submit(core: &mut Core, tests: &[&str], now: Now) -> RunId {
    core.submit(submit_req(tests), now)
        .unwrap()
        .run_id
        .parse()
        .unwrap()
}

pub(super) fn result(id: &str, outcome: Outcome) -> pb::TestResult {
    pb::TestResult {
        test_id: id.into(),
        outcome: outcome.to_wire(),
        duration_ms: 3,
        ..Default::default()
    }
}

fn status(core: &Core, run: RunId) -> RunStatus {
    RunStatus::from_wire(core.summary(run).unwrap().status).unwrap()
}

/// Runs every shard `worker` gets to completion with `outcome_of` deciding each test.
fn drain(core: &mut Core, worker: WorkerId, now: Now, outcome_of: impl Fn(&str) -> Outcome) -> usize {
    drain_with(core, worker, now, |t| result(t, outcome_of(t)))
}

/// Runs every shard `worker` gets to completion, reporting `result_of` each test; the shards.
fn drain_with(
    core: &mut Core,
    worker: WorkerId,
    now: Now,
    mut result_of: impl FnMut(&str) -> pb::TestResult,
) -> usize {
    let mut shards = 0;
    while let Some(shard) = core.acquire(worker, now).unwrap() {
        shards += 1;
        let attempt: AttemptId = shard.attempt_id.parse().unwrap();
        let results = shard.tests.iter().map(|t| result_of(t)).collect();
        core.report(worker, attempt, results, now).unwrap();
        core.finish(worker, attempt, "", false, now).unwrap();
    }
    shards
}

#[test]
fn every_test_gets_one_result_and_the_verdict_follows_the_outcomes() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 2, &[], now);
    let tests: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = tests.iter().map(String::as_str).collect();
    let green = submit(&mut core, &refs, now);
    assert!(drain(&mut core, w, now, |_| Outcome::Passed) > 1);
    assert_eq!(status(&core, green), RunStatus::Passed);
    let red = submit(&mut core, &refs, now);
    drain(&mut core, w, now, |t| {
        if t == "t7" {
            Outcome::Failed
        } else {
            Outcome::Passed
        }
    });
    assert_eq!(status(&core, red), RunStatus::Failed);
    let got = core.get_run(red, true).unwrap();
    assert_eq!(got.results.len(), 50);
    let counts = got.run.unwrap().counts.unwrap();
    assert_eq!(
        (counts.passed, counts.failed, counts.queued, counts.running),
        (49, 1, 0, 0)
    );
}

#[test]
fn bad_submissions_name_the_problem_and_store_nothing() {
    let (mut core, now) = core();
    let err = core.submit(submit_req(&["a"]), now).unwrap_err();
    assert!(err.to_string().contains("unknown runner 'exec'"), "{err}");
    register(&mut core, "w1", 1, &[], now);
    let mut req = submit_req(&["a"]);
    req.runner = "pytest".into();
    let err = core.submit(req, now).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid runner: unknown runner 'pytest': no worker has registered it (known runners: exec)"
    );
    for (tests, want) in [
        (vec![], "the run has no tests"),
        (vec!["a", "a"], "duplicate test id 'a'"),
        (vec!["../x"], "escapes the runner's root"),
        (vec!["/etc/passwd"], "absolute path"),
    ] {
        let err = core.submit(submit_req(&tests), now).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }));
        assert!(err.to_string().contains(want), "{err} should contain {want}");
    }
    assert!(core.list_runs(0).unwrap().is_empty());
}

#[test]
fn an_expired_lease_requeues_only_the_unfinished_tests_and_refuses_late_reports() {
    let (mut core, now) = core();
    let w1 = register(&mut core, "w1", 1, &[], now);
    let run = submit(&mut core, &["a", "b", "c"], now);
    let shard = core.acquire(w1, now).unwrap().unwrap();
    assert_eq!(
        shard.tests,
        vec!["a"],
        "three tests on one slot go out a third at a time"
    );
    let attempt: AttemptId = shard.attempt_id.parse().unwrap();
    core.report(w1, attempt, vec![result("a", Outcome::Passed)], now)
        .unwrap();
    let shard = core.acquire(w1, now).unwrap();
    assert!(shard.is_none(), "a worker with every slot busy gets nothing");
    core.finish(w1, attempt, "", false, now).unwrap();
    let shard = core.acquire(w1, now).unwrap().unwrap();
    assert_eq!(shard.tests, vec!["b"]);
    let attempt: AttemptId = shard.attempt_id.parse().unwrap();

    // w1 goes silent past its lease; w2 takes over what w1 had not finished.
    let later = now.after(Duration::from_secs(11));
    core.tick(later).unwrap();
    let w2 = register(&mut core, "w2", 1, &[], later);
    let shard2 = core.acquire(w2, later).unwrap().unwrap();
    assert_eq!(shard2.tests, vec!["b"], "the requeued test goes first");

    let err = core
        .report(w1, attempt, vec![result("b", Outcome::Failed)], later)
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("is not live"), "{err}");
    let hb = core.heartbeat(w1, &[attempt.to_string()], later).unwrap();
    assert_eq!(hb.cancel_attempt_ids, vec![attempt.to_string()]);

    let a2: AttemptId = shard2.attempt_id.parse().unwrap();
    let resp = core
        .report(w2, a2, vec![result("b", Outcome::Passed)], later)
        .unwrap();
    assert_eq!(resp.accepted, 1);
    core.finish(w2, a2, "", false, later).unwrap();
    drain(&mut core, w2, later, |_| Outcome::Passed);
    assert_eq!(status(&core, run), RunStatus::Passed);
    let results = core.get_run(run, true).unwrap().results;
    assert_eq!(
        results.iter().map(|r| r.attempts).collect::<Vec<_>>(),
        vec![1, 2, 1]
    );
    assert_eq!(results[1].worker, "w2");
}

#[test]
fn a_duplicated_report_is_counted_once() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let run = submit_with(
        &mut core,
        &["a", "b"],
        pb::RunPolicy {
            retries: Some(0),
            ..Default::default()
        },
        now,
    );
    let shard = core.acquire(w, now).unwrap().unwrap();
    let attempt: AttemptId = shard.attempt_id.parse().unwrap();
    let first = core
        .report(w, attempt, vec![result("a", Outcome::Failed)], now)
        .unwrap();
    let again = core
        .report(
            w,
            attempt,
            vec![result("a", Outcome::Passed), result("a", Outcome::Passed)],
            now,
        )
        .unwrap();
    assert_eq!((first.accepted, again.accepted), (1, 0));
    let unknown = core
        .report(w, attempt, vec![result("zzz", Outcome::Passed)], now)
        .unwrap();
    assert_eq!(unknown.accepted, 0);
    let counts = core.summary(run).unwrap().counts.unwrap();
    assert_eq!(
        (counts.failed, counts.passed, counts.queued + counts.running),
        (1, 0, 1)
    );
}

#[test]
fn a_test_that_keeps_losing_its_worker_becomes_an_infra_error() {
    let (mut core, mut now) = core();
    let run = {
        register(&mut core, "w0", 1, &[], now);
        submit(&mut core, &["poison"], now)
    };
    for i in 0..3 {
        let w = register(&mut core, &format!("w{}", i + 1), 1, &[], now);
        let shard = core
            .acquire(w, now)
            .unwrap()
            .expect("the test is requeued each time");
        assert_eq!(shard.tests, vec!["poison"]);
        now = now.after(Duration::from_secs(11));
        core.tick(now).unwrap();
    }
    assert_eq!(status(&core, run), RunStatus::Failed);
    let r = &core.get_run(run, true).unwrap().results[0];
    assert_eq!(Outcome::from_wire(r.outcome), Some(Outcome::InfraError));
    assert!(
        r.detail
            .contains("no result after 3 lost attempts on 3 worker(s)")
            && r.detail
                .contains("lease expired on worker w1; lease expired on worker w2"),
        "{}",
        r.detail
    );
}

#[test]
fn a_poison_test_is_tried_on_different_workers_and_its_shard_mates_survive() {
    let (mut core, mut now) = core();
    let workers: Vec<WorkerId> = (0..4)
        .map(|i| register(&mut core, &format!("w{i}"), 1, &[], now))
        .collect();
    let tests: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    let mut refs: Vec<&str> = tests.iter().map(String::as_str).collect();
    refs.push("poison");
    let run = submit(&mut core, &refs, now);
    let mut poison_on = Vec::new();
    for _round in 0..100 {
        if status(&core, run).is_terminal() {
            break;
        }
        // Every worker takes a shard; one holding the poison test never reports (its worker
        // died), the others pass.
        let mut lost = false;
        for &w in &workers {
            let Some(shard) = core.acquire(w, now).unwrap() else {
                continue;
            };
            let a: AttemptId = shard.attempt_id.parse().unwrap();
            if shard.tests.iter().any(|t| t == "poison") {
                if shard.tests.len() == 1 {
                    poison_on.push(w);
                }
                lost = true;
                continue;
            }
            let results = shard.tests.iter().map(|t| result(t, Outcome::Passed)).collect();
            core.report(w, a, results, now).unwrap();
            core.finish(w, a, "", false, now).unwrap();
        }
        core.check_invariants();
        if lost {
            now = now.after(Duration::from_secs(11));
            for &w in &workers {
                core.heartbeat(w, &[], now).unwrap();
            }
            core.tick(now).unwrap();
        }
    }
    assert_eq!(status(&core, run), RunStatus::Failed);
    let results = core.get_run(run, true).unwrap().results;
    for r in &results {
        let want = if r.test_id == "poison" {
            Outcome::InfraError
        } else {
            Outcome::Passed
        };
        assert_eq!(
            Outcome::from_wire(r.outcome),
            Some(want),
            "{}: {}",
            r.test_id,
            r.detail
        );
    }
    // Run alone from its second loss on, each time on a worker it had not taken down yet.
    let alone: Vec<_> = poison_on.iter().skip_while(|w| **w == poison_on[0]).collect();
    let distinct: std::collections::HashSet<_> = alone.iter().collect();
    assert_eq!(distinct.len(), alone.len(), "{poison_on:?}");
    let poison = results.iter().find(|r| r.test_id == "poison").unwrap();
    assert!(poison.detail.contains("on 3 worker(s)"), "{}", poison.detail);
}

#[test]
fn a_test_lost_again_and_again_on_one_worker_still_ends() {
    let (mut core, mut now) = core();
    let w = register(&mut core, "only", 1, &[], now);
    let run = submit(&mut core, &["poison"], now);
    let mut handouts = 0;
    while core.acquire(w, now).unwrap().is_some() {
        handouts += 1;
        now = now.after(Duration::from_secs(11));
        core.heartbeat(w, &[], now).unwrap();
        core.tick(now).unwrap();
        assert!(handouts <= 6, "handed out forever");
    }
    assert_eq!(handouts, 6, "twice the limit on a single worker");
    let r = &core.get_run(run, true).unwrap().results[0];
    assert_eq!(Outcome::from_wire(r.outcome), Some(Outcome::InfraError));
    assert!(
        r.detail.contains("6 lost attempts on 1 worker(s)"),
        "{}",
        r.detail
    );
}

#[test]
fn a_failed_test_is_retried_on_another_worker_when_one_is_free() {
    let (mut core, now) = core();
    let a = register(&mut core, "a", 1, &[], now);
    let b = register(&mut core, "b", 1, &[], now);
    let run = submit(&mut core, &["f"], now);
    let (w1, w2) = {
        let shard = core.acquire(a, now).unwrap().unwrap();
        let at: AttemptId = shard.attempt_id.parse().unwrap();
        core.report(a, at, vec![result("f", Outcome::Failed)], now)
            .unwrap();
        core.finish(a, at, "", false, now).unwrap();
        (a, b)
    };
    assert!(
        core.acquire(w1, now).unwrap().is_none(),
        "the worker it failed on waits while another could take it"
    );
    let shard = core
        .acquire(w2, now)
        .unwrap()
        .expect("the other worker takes the retry");
    assert_eq!(shard.tests, vec!["f"]);
    let at: AttemptId = shard.attempt_id.parse().unwrap();
    core.report(w2, at, vec![result("f", Outcome::Passed)], now)
        .unwrap();
    let r = &core.get_run(run, true).unwrap().results[0];
    assert_eq!(Outcome::from_wire(r.outcome), Some(Outcome::Flaky));
    assert!(r.detail.contains("first failure on a"), "{}", r.detail);
    core.check_invariants();

    // With no other worker, the one it failed on retries it.
    let lone = submit(&mut core, &["g"], now);
    core.deregister(w2, now).unwrap();
    drain_attempts(&mut core, w1, now, |_, n| {
        if n == 1 { Outcome::Failed } else { Outcome::Passed }
    });
    assert_eq!(status(&core, lone), RunStatus::Passed);
}

#[test]
fn a_restart_remembers_failures_so_no_extra_retry_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let now = Now::real();
    let policy = pb::RunPolicy {
        retries: Some(1),
        ..Default::default()
    };
    let (run, w) = {
        let mut core = core_at(&path, now);
        let w = register(&mut core, "w1", 1, &[], now);
        let run = submit_with(&mut core, &["f"], policy, now);
        let shard = core.acquire(w, now).unwrap().unwrap();
        let at: AttemptId = shard.attempt_id.parse().unwrap();
        core.report(w, at, vec![result("f", Outcome::Failed)], now)
            .unwrap();
        core.finish(w, at, "", false, now).unwrap();
        (run, w)
    };
    let mut core = core_at(&path, now);
    core.heartbeat(w, &[], now).unwrap();
    core.check_invariants();
    let shard = core.acquire(w, now).unwrap().expect("the retry is still due");
    let at: AttemptId = shard.attempt_id.parse().unwrap();
    core.report(w, at, vec![result("f", Outcome::Failed)], now)
        .unwrap();
    assert_eq!(
        status(&core, run),
        RunStatus::Failed,
        "one retry in all, restart or not"
    );
    let r = &core.get_run(run, true).unwrap().results[0];
    assert!(r.detail.starts_with("failed 2 of 2 attempts"), "{}", r.detail);
}

#[test]
fn labels_select_workers_and_priority_orders_runs() {
    let (mut core, now) = core();
    let linux = register(&mut core, "linux", 1, &[("os", "linux")], now);
    let mac = register(&mut core, "mac", 1, &[("os", "mac")], now);
    let mut req = submit_req(&["m"]);
    req.labels = vec![pb::Label {
        key: "os".into(),
        value: "mac".into(),
    }];
    core.submit(req, now).unwrap();
    assert!(
        core.acquire(linux, now).unwrap().is_none(),
        "linux may not take a mac run"
    );
    let low = submit(&mut core, &["low"], now);
    let mut high = submit_req(&["high"]);
    high.priority = 5;
    let high: RunId = core.submit(high, now).unwrap().run_id.parse().unwrap();
    let s = core.acquire(linux, now).unwrap().unwrap();
    assert_eq!(s.run_id, high.to_string());
    let s = core.acquire(mac, now).unwrap().unwrap();
    assert_eq!(
        s.tests,
        vec!["m"],
        "the mac run is the only one the labels fit first"
    );
    let _ = low;
}

#[test]
fn cancel_ends_the_run_and_stops_its_attempts() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let run = submit(&mut core, &["a", "b"], now);
    let shard = core.acquire(w, now).unwrap().unwrap();
    let summary = core.cancel(run, "superseded", now).unwrap();
    assert_eq!(RunStatus::from_wire(summary.status), Some(RunStatus::Cancelled));
    assert_eq!(summary.message, "cancelled: superseded");
    let hb = core
        .heartbeat(w, std::slice::from_ref(&shard.attempt_id), now)
        .unwrap();
    assert_eq!(hb.cancel_attempt_ids, vec![shard.attempt_id.clone()]);
    let err = core.cancel(run, "", now).unwrap_err().to_string();
    assert!(err.contains("already ended (cancelled)"), "{err}");
    let err = core.cancel(RunId::new(), "", now).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }));
}

#[test]
fn discovery_fills_the_run_or_errors_it() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let mut req = submit_req(&[]);
    req.discover = true;
    let run: RunId = core.submit(req.clone(), now).unwrap().run_id.parse().unwrap();
    let shard = core.acquire(w, now).unwrap().unwrap();
    assert_eq!(shard.kind, pb::ShardKind::Discover as i32);
    let a: AttemptId = shard.attempt_id.parse().unwrap();
    core.discovery(w, a, vec!["x".into(), "y".into()], "", now)
        .unwrap();
    drain(&mut core, w, now, |_| Outcome::Passed);
    assert_eq!(status(&core, run), RunStatus::Passed);
    assert_eq!(core.summary(run).unwrap().counts.unwrap().total, 2);

    let bad: RunId = core.submit(req, now).unwrap().run_id.parse().unwrap();
    let shard = core.acquire(w, now).unwrap().unwrap();
    let a: AttemptId = shard.attempt_id.parse().unwrap();
    core.discovery(w, a, vec!["../etc".into()], "", now).unwrap();
    let s = core.summary(bad).unwrap();
    assert_eq!(RunStatus::from_wire(s.status), Some(RunStatus::Errored));
    assert!(s.message.contains("escapes"), "{}", s.message);
}

#[test]
fn a_restart_resumes_unfinished_runs_and_keeps_finished_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let now = Now::real();
    let (done, open, w1, kept) = {
        let mut core = core_at(&path, now);
        let w = register(&mut core, "w1", 1, &[], now);
        let done = submit(&mut core, &["a", "b"], now);
        drain(&mut core, w, now, |_| Outcome::Passed);
        let open = submit_with(
            &mut core,
            &["c", "d", "e"],
            pb::RunPolicy {
                retries: Some(0),
                ..Default::default()
            },
            now,
        );
        let shard = core.acquire(w, now).unwrap().unwrap();
        assert_eq!(shard.tests, vec!["c"]);
        let a: AttemptId = shard.attempt_id.parse().unwrap();
        (done, open, w, a)
    };
    // The coordinator restarts (its memory is gone) while w1 still runs test c.
    let mut core = core_at(&path, now);
    core.check_invariants();
    assert_eq!(status(&core, done), RunStatus::Passed);
    assert_eq!(core.get_run(done, true).unwrap().results.len(), 2);
    // w1 heartbeats and keeps its shard; nobody else gets test c meanwhile.
    let hb = core.heartbeat(w1, &[kept.to_string()], now).unwrap();
    assert!(hb.cancel_attempt_ids.is_empty() && !hb.reregister, "{hb:?}");
    let w2 = register(&mut core, "w2", 1, &[], now);
    let mut seen = Vec::new();
    while let Some(shard) = core.acquire(w2, now).unwrap() {
        let a: AttemptId = shard.attempt_id.parse().unwrap();
        seen.extend(shard.tests.clone());
        let results = shard.tests.iter().map(|t| result(t, Outcome::Passed)).collect();
        core.report(w2, a, results, now).unwrap();
        core.finish(w2, a, "", false, now).unwrap();
    }
    seen.sort();
    assert_eq!(seen, vec!["d", "e"], "test c stays with the worker that runs it");
    let resp = core
        .report(w1, kept, vec![result("c", Outcome::Failed)], now)
        .unwrap();
    assert_eq!(resp.accepted, 1, "a result into a kept attempt counts");
    assert_eq!(status(&core, open), RunStatus::Failed);
    let results = core.get_run(open, true).unwrap().results;
    assert!(
        results.iter().all(|r| r.attempts == 1),
        "nothing ran twice: {results:?}"
    );
}

#[test]
fn a_kept_attempt_whose_worker_never_returns_expires_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let now = Now::real();
    let run = {
        let mut core = core_at(&path, now);
        let w = register(&mut core, "w1", 1, &[], now);
        let run = submit(&mut core, &["x"], now);
        core.acquire(w, now).unwrap().unwrap();
        run
    };
    let mut core = core_at(&path, now);
    let w2 = register(&mut core, "w2", 1, &[], now);
    assert!(
        core.acquire(w2, now).unwrap().is_none(),
        "x is still leased to w1"
    );
    let later = now.after(Duration::from_secs(11));
    core.tick(later).unwrap();
    core.check_invariants();
    drain(&mut core, w2, later, |_| Outcome::Passed);
    assert_eq!(status(&core, run), RunStatus::Passed);
}

#[test]
fn any_call_from_a_lost_worker_makes_it_live_again() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let later = now.after(Duration::from_secs(11));
    core.tick(later).unwrap();
    assert_eq!(core.list_workers(false)[0].state, "lost");
    submit(&mut core, &["a"], later);
    assert!(core.acquire(w, later).unwrap().is_some());
    assert_eq!(core.list_workers(false)[0].state, "live");
}

#[test]
fn a_shard_whose_runner_failed_goes_to_another_worker() {
    let (mut core, now) = core();
    let broken = register(&mut core, "broken", 1, &[], now);
    let run = submit(&mut core, &["a"], now);
    let shard = core.acquire(broken, now).unwrap().unwrap();
    let a: AttemptId = shard.attempt_id.parse().unwrap();
    let resp = core
        .finish(
            broken,
            a,
            "setup for revision 'r1' failed (exit status 1)",
            false,
            now,
        )
        .unwrap();
    assert_eq!(resp.requeued, 1);
    // Alone in the fleet, the broken worker still gets the test rather than starving the run.
    let again = core
        .acquire(broken, now)
        .unwrap()
        .expect("no other worker: it may retry");
    let a: AttemptId = again.attempt_id.parse().unwrap();
    core.finish(broken, a, "setup failed again", false, now).unwrap();
    let good = register(&mut core, "good", 1, &[], now);
    assert!(
        core.acquire(broken, now).unwrap().is_none(),
        "another worker can take it now"
    );
    let shard = core.acquire(good, now).unwrap().unwrap();
    let a: AttemptId = shard.attempt_id.parse().unwrap();
    core.report(good, a, vec![result("a", Outcome::Passed)], now)
        .unwrap();
    assert_eq!(status(&core, run), RunStatus::Passed);
    let r = &core.get_run(run, true).unwrap().results[0];
    assert_eq!((r.worker.as_str(), r.attempts), ("good", 3));
}

#[test]
fn a_runner_failing_the_same_way_shard_after_shard_stops_the_run_once() {
    let (mut core, now) = core();
    let w1 = register(&mut core, "w1", 1, &[], now);
    let w2 = register(&mut core, "w2", 1, &[], now);
    let tests: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = tests.iter().map(String::as_str).collect();
    let run = submit(&mut core, &refs, now);
    let fail = |core: &mut Core, w: WorkerId, error: &str| {
        let shard = core.acquire(w, now).unwrap().expect("a shard");
        let a: AttemptId = shard.attempt_id.parse().unwrap();
        core.finish(w, a, error, false, now).unwrap();
        shard
    };
    let error =
        "no JUnit file (No such file or directory); the command ended with exit status 4\nERROR: usage";
    fail(&mut core, w1, error);
    fail(&mut core, w2, error);
    // A shard that ends with all its results breaks the streak.
    let shard = core.acquire(w1, now).unwrap().unwrap();
    let a: AttemptId = shard.attempt_id.parse().unwrap();
    let results = shard.tests.iter().map(|t| result(t, Outcome::Passed)).collect();
    core.report(w1, a, results, now).unwrap();
    core.finish(w1, a, "", false, now).unwrap();
    fail(&mut core, w2, error);
    fail(&mut core, w1, error);
    assert_eq!(
        status(&core, run),
        RunStatus::Running,
        "two in a row since the last good shard"
    );
    fail(&mut core, w2, error);
    assert_eq!(status(&core, run), RunStatus::Errored);
    let info = core.get_run(run, false).unwrap().run.unwrap();
    assert!(
        info.message.contains("failed 3 shards in a row") && info.message.contains("no JUnit file"),
        "{}",
        info.message
    );
    core.check_invariants();
}

#[test]
fn a_run_with_labels_no_known_worker_carries_is_refused_at_submit() {
    let (mut core, now) = core();
    // A runner no worker ever registered is refused as before.
    let mut req = submit_req(&["a"]);
    req.labels = vec![pb::Label {
        key: "os".into(),
        value: "windows".into(),
    }];
    let fresh = core.submit(req.clone(), now);
    assert!(
        matches!(fresh, Err(Error::InvalidArgument { .. })),
        "no runner is known yet: {fresh:?}"
    );
    register(&mut core, "w1", 1, &[("os", "linux")], now);
    let e = core.submit(req, now).unwrap_err();
    assert!(
        e.to_string().contains(
            "no known worker offering runner 'exec' carries labels os=windows; their labels: os=linux"
        ),
        "{e}"
    );
    assert!(core.list_runs(10).unwrap().is_empty(), "nothing was stored");
}

#[test]
fn a_run_no_live_worker_can_take_errors_after_its_queue_timeout() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    core.deregister(w, now).unwrap();
    let policy = pb::RunPolicy {
        queue_timeout_ms: 60_000,
        ..Default::default()
    };
    let run = submit_with(&mut core, &["a", "b"], policy, now);
    core.tick(now.after(Duration::from_secs(1))).unwrap();
    core.tick(now.after(Duration::from_secs(50))).unwrap();
    assert_eq!(
        status(&core, run),
        RunStatus::Queued,
        "still inside its queue timeout"
    );
    // A worker that can take it comes and goes: the clock starts again when it has gone.
    let w2 = register(&mut core, "w2", 1, &[], now.after(Duration::from_secs(55)));
    core.tick(now.after(Duration::from_secs(56))).unwrap();
    core.deregister(w2, now.after(Duration::from_secs(57))).unwrap();
    core.tick(now.after(Duration::from_secs(58))).unwrap();
    core.tick(now.after(Duration::from_secs(100))).unwrap();
    assert_ne!(
        status(&core, run),
        RunStatus::Errored,
        "58 s + 42 s is not 60 s without a worker"
    );
    core.tick(now.after(Duration::from_secs(119))).unwrap();
    assert_eq!(status(&core, run), RunStatus::Errored);
    let info = core.get_run(run, false).unwrap().run.unwrap();
    assert!(
        info.message
            .contains("no live worker could take this run for 60s")
            && info.message.contains("runner 'exec'"),
        "{}",
        info.message
    );
    core.check_invariants();
}

#[test]
fn the_output_of_old_runs_is_pruned_after_keep_output_and_their_verdicts_stay() {
    let cfg = CoreConfig {
        keep_output: Some(Duration::from_secs(3600)),
        ..CoreConfig::default()
    };
    let now = Now::real();
    let mut core = Core::open(cfg, SqliteStore::open(Path::new(":memory:")).unwrap(), now).unwrap();
    let w = register(&mut core, "w1", 1, &[], now);
    let policy = pb::RunPolicy {
        retries: Some(0),
        ..Default::default()
    };
    let run = submit_with(&mut core, &["a"], policy, now);
    let shard = core.acquire(w, now).unwrap().unwrap();
    let a: AttemptId = shard.attempt_id.parse().unwrap();
    let mut r = result("a", Outcome::Failed);
    r.output = "a long trace".into();
    core.report(w, a, vec![r], now).unwrap();
    let output = |core: &Core| core.get_run(run, true).unwrap().results[0].output.clone();
    core.tick(now.after(Duration::from_secs(1800))).unwrap();
    assert_eq!(output(&core), "a long trace", "kept within the period");
    core.tick(now.after(Duration::from_secs(3700))).unwrap();
    assert_eq!(output(&core), "", "cleared after it");
    let r = &core.get_run(run, true).unwrap().results[0];
    assert_eq!(
        Outcome::from_wire(r.outcome),
        Some(Outcome::Failed),
        "the outcome stays"
    );
    assert_eq!(status(&core, run), RunStatus::Failed);
}

fn submit_with(core: &mut Core, tests: &[&str], policy: pb::RunPolicy, now: Now) -> RunId {
    let mut req = submit_req(tests);
    req.policy = Some(policy);
    core.submit(req, now).unwrap().run_id.parse().unwrap()
}

/// Runs shards on `w` with `outcome_of(test, attempt number)` until nothing is left.
fn drain_attempts(core: &mut Core, w: WorkerId, now: Now, outcome_of: impl Fn(&str, u32) -> Outcome) {
    let mut seen: std::collections::HashMap<String, u32> = Default::default();
    drain_with(core, w, now, |t| {
        let n = seen.entry(t.to_owned()).or_default();
        *n += 1;
        result(t, outcome_of(t, *n))
    });
}

#[test]
fn a_test_that_fails_then_passes_is_flaky_and_passes_the_gate_unless_strict() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let flaky = |t: &str, n: u32| {
        if t == "f" && n == 1 {
            Outcome::Failed
        } else {
            Outcome::Passed
        }
    };
    let run = submit(&mut core, &["a", "f"], now);
    drain_attempts(&mut core, w, now, flaky);
    assert_eq!(status(&core, run), RunStatus::Passed);
    let r = core.get_run(run, true).unwrap();
    let f = r.results.iter().find(|r| r.test_id == "f").unwrap();
    assert_eq!(
        (Outcome::from_wire(f.outcome), f.attempts),
        (Some(Outcome::Flaky), 2)
    );
    assert!(
        f.detail.starts_with("passed on attempt 2 after 1 failure(s)"),
        "{}",
        f.detail
    );
    assert_eq!(r.run.unwrap().counts.unwrap().flaky, 1);

    let strict = submit_with(
        &mut core,
        &["a", "f"],
        pb::RunPolicy {
            strict_flaky: true,
            ..Default::default()
        },
        now,
    );
    drain_attempts(&mut core, w, now, flaky);
    assert_eq!(
        status(&core, strict),
        RunStatus::Failed,
        "strict: flaky fails the gate"
    );
}

#[test]
fn a_test_that_always_fails_is_failed_after_its_retries_and_zero_retries_is_immediate() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let run = submit(&mut core, &["broken"], now);
    drain_attempts(&mut core, w, now, |_, _| Outcome::Failed);
    assert_eq!(status(&core, run), RunStatus::Failed);
    let r = &core.get_run(run, true).unwrap().results[0];
    assert_eq!(
        (Outcome::from_wire(r.outcome), r.attempts),
        (Some(Outcome::Failed), 3)
    );
    assert!(r.detail.starts_with("failed 3 of 3 attempts"), "{}", r.detail);

    let once = submit_with(
        &mut core,
        &["broken"],
        pb::RunPolicy {
            retries: Some(0),
            ..Default::default()
        },
        now,
    );
    drain_attempts(&mut core, w, now, |_, _| Outcome::Failed);
    assert_eq!(core.get_run(once, true).unwrap().results[0].attempts, 1);
}

#[test]
fn fail_fast_fails_the_run_at_the_first_confirmed_failure_and_stops_the_rest() {
    let (mut core, now) = core();
    let a = register(&mut core, "a", 1, &[], now);
    let b = register(&mut core, "b", 1, &[], now);
    let tests: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = tests.iter().map(String::as_str).collect();
    let run = submit_with(
        &mut core,
        &refs,
        pb::RunPolicy {
            fail_fast: true,
            retries: Some(0),
            ..Default::default()
        },
        now,
    );
    let sa = core.acquire(a, now).unwrap().unwrap();
    let sb = core.acquire(b, now).unwrap().unwrap();
    let at: AttemptId = sa.attempt_id.parse().unwrap();
    let first = sa.tests[0].clone();
    let resp = core
        .report(a, at, vec![result(&first, Outcome::Failed)], now)
        .unwrap();
    assert!(resp.stop, "the reporting worker is told to stop");
    let summary = core.summary(run).unwrap();
    assert_eq!(RunStatus::from_wire(summary.status), Some(RunStatus::Failed));
    assert!(
        summary.message.starts_with(&format!(
            "fail-fast: '{first}' failed after 1 attempt(s); 19 test(s) left unrun"
        )),
        "{}",
        summary.message
    );
    // The other worker learns at its next heartbeat that its attempt is over.
    let hb = core
        .heartbeat(b, std::slice::from_ref(&sb.attempt_id), now)
        .unwrap();
    assert_eq!(hb.cancel_attempt_ids, vec![sb.attempt_id.clone()]);
    assert!(
        core.acquire(b, now).unwrap().is_none(),
        "nothing left to hand out"
    );
    core.check_invariants();

    // Without fail-fast the same failure waits for the rest of the run.
    let slow = submit_with(
        &mut core,
        &["x", "y"],
        pb::RunPolicy {
            retries: Some(0),
            ..Default::default()
        },
        now,
    );
    let s = core.acquire(a, now).unwrap().unwrap();
    let at: AttemptId = s.attempt_id.parse().unwrap();
    core.report(a, at, vec![result(&s.tests[0], Outcome::Failed)], now)
        .unwrap();
    assert_eq!(status(&core, slow), RunStatus::Running);
}

#[test]
fn a_test_with_a_flaky_history_gets_more_retries_and_a_steady_test_does_not() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    // Run 1: `f` fails once, then passes: it is flaky, and now has a flaky history.
    let first = submit(&mut core, &["f", "g"], now);
    drain_attempts(&mut core, w, now, |t, n| {
        if t == "f" && n == 1 {
            Outcome::Failed
        } else {
            Outcome::Passed
        }
    });
    assert_eq!(status(&core, first), RunStatus::Passed);
    // Run 2: both fail four times in a row. `f` has its four extra retries and passes on the
    // fifth attempt; `g`, which never flaked, is red after its default three attempts.
    let second = submit(&mut core, &["f", "g"], now);
    drain_attempts(&mut core, w, now, |_, n| {
        if n <= 4 { Outcome::Failed } else { Outcome::Passed }
    });
    let results = core.get_run(second, true).unwrap().results;
    let by_id = |id: &str| results.iter().find(|r| r.test_id == id).unwrap();
    assert_eq!(
        (Outcome::from_wire(by_id("f").outcome), by_id("f").attempts),
        (Some(Outcome::Flaky), 5)
    );
    assert_eq!(
        (Outcome::from_wire(by_id("g").outcome), by_id("g").attempts),
        (Some(Outcome::Failed), 3)
    );
    assert_eq!(status(&core, second), RunStatus::Failed);
}

#[test]
fn a_test_past_the_flake_threshold_is_proposed_and_auto_quarantined_when_asked() {
    let cfg = CoreConfig {
        auto_quarantine: true,
        quarantine_min_runs: 4,
        quarantine_threshold: 0.5,
        ..CoreConfig::default()
    };
    let now = Now::real();
    let mut core = Core::open(cfg, SqliteStore::open(Path::new(":memory:")).unwrap(), now).unwrap();
    let w = register(&mut core, "w1", 1, &[], now);
    // Runs 1-3: flaky twice, then passing: 2 flakes over 3 runs, too few runs to judge.
    for flaky in [true, true, false] {
        submit(&mut core, &["f"], now);
        drain_attempts(&mut core, w, now, |_, n| {
            if flaky && n == 1 {
                Outcome::Failed
            } else {
                Outcome::Passed
            }
        });
    }
    assert!(core.list_quarantine("unit").unwrap().is_empty());
    let listed = core.list_flaky("unit", 10).unwrap();
    assert_eq!(
        (listed[0].runs, listed[0].flakes, listed[0].propose_quarantine),
        (3, 2, false)
    );
    // Run 4 flakes again: 3 of 4, past 50 % over 4 runs: quarantined by the coordinator.
    submit(&mut core, &["f"], now);
    drain_attempts(&mut core, w, now, |_, n| {
        if n == 1 { Outcome::Failed } else { Outcome::Passed }
    });
    let q = core.list_quarantine("").unwrap();
    assert_eq!(q.len(), 1);
    assert!(q[0].automatic && q[0].added_by == "shardgate", "{q:?}");
    assert!(
        q[0].reason.starts_with("flaked in 3 of 4 runs (75.0 %)"),
        "{}",
        q[0].reason
    );
    // The next run carries it as quarantined: its failure no longer fails the gate.
    let run = submit(&mut core, &["f"], now);
    drain_attempts(&mut core, w, now, |_, _| Outcome::Failed);
    assert_eq!(status(&core, run), RunStatus::Passed);
    assert!(core.get_run(run, true).unwrap().results[0].quarantined);
}

#[test]
fn a_lease_expiry_that_ends_the_run_leaves_its_other_expired_attempts_alone() {
    // Expired attempts are visited in hash order; enough rounds and enough attempts make sure
    // the one that ends the run comes before the others at least once.
    for _round in 0..20 {
        let (mut core, now) = core();
        let silent = register(&mut core, "silent", 1, &[], now);
        let others: Vec<WorkerId> = (0..8)
            .map(|i| register(&mut core, &format!("w{i}"), 1, &[], now))
            .collect();
        let tests: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = tests.iter().map(String::as_str).collect();
        let run = submit_with(
            &mut core,
            &refs,
            pb::RunPolicy {
                max_infra_attempts: 1,
                ..Default::default()
            },
            now,
        );
        let first = core.acquire(silent, now).unwrap().unwrap();
        assert_eq!(first.tests.len(), 1, "one test a slot");
        // Eight more workers each report their test but leave their attempt open.
        for &w in &others {
            let s = core.acquire(w, now).unwrap().unwrap();
            let at: AttemptId = s.attempt_id.parse().unwrap();
            let results = s.tests.iter().map(|t| result(t, Outcome::Passed)).collect();
            core.report(w, at, results, now).unwrap();
        }
        // Every lease runs out in one tick: the silent worker's test is given up, which ends
        // the run and drops the other attempts, wherever the tick is in its list.
        core.tick(now.after(Duration::from_secs(11))).unwrap();
        core.check_invariants();
        assert_eq!(status(&core, run), RunStatus::Failed);
    }
}

#[test]
fn out_of_range_inputs_are_refused_with_the_field_named_and_change_nothing() {
    let (mut core, now) = core();
    register(&mut core, "w1", 1, &[], now);
    let with_policy = |p: pb::RunPolicy| pb::SubmitRunRequest {
        policy: Some(p),
        ..submit_req(&["a"])
    };
    let cases = [
        (
            with_policy(pb::RunPolicy {
                retries: Some(50),
                ..Default::default()
            }),
            "policy.retries: 50 is more than the 10 allowed",
        ),
        (
            with_policy(pb::RunPolicy {
                max_infra_attempts: u32::MAX,
                ..Default::default()
            }),
            "policy.max_infra_attempts",
        ),
        (
            with_policy(pb::RunPolicy {
                retries: Some(3),
                flaky_retries: Some(1),
                ..Default::default()
            }),
            "policy.flaky_retries: 1 is fewer than the 3 retries",
        ),
        (
            pb::SubmitRunRequest {
                labels: (0..100)
                    .map(|i| pb::Label {
                        key: format!("k{i}"),
                        value: "v".into(),
                    })
                    .collect(),
                ..submit_req(&["a"])
            },
            "100 labels given, at most 32",
        ),
        (submit_req(&[&"x".repeat(10_000)]), "at most 4096 allowed"),
    ];
    for (req, want) in cases {
        let e = core.submit(req, now).unwrap_err().to_string();
        assert!(e.contains(want), "{e} should say {want:?}");
        assert!(e.len() < 300, "the input is not echoed back: {e}");
    }
    assert!(core.list_runs(10).unwrap().is_empty(), "nothing was stored");

    let quarantine = |test_id: &str, reason: &str| pb::AddQuarantineRequest {
        suite: "unit".into(),
        test_id: test_id.into(),
        reason: reason.into(),
        added_by: "qa".into(),
    };
    for (q, want) in [
        (quarantine("t\n[forged] ok", "r"), "test_id"),
        (quarantine("t", "clear \u{1b}[2J"), "control character"),
        (quarantine("t\0", "r"), "control character"),
        (quarantine("t", &"r".repeat(40_000)), "at most 1024"),
    ] {
        let e = core.add_quarantine(q, now).unwrap_err().to_string();
        assert!(e.contains(want) && e.len() < 300, "{e}");
    }
    assert!(core.list_quarantine("").unwrap().is_empty());

    let run = submit(&mut core, &["a"], now);
    let e = core.cancel_as(run, &"x".repeat(40_000), &crate::auth::Identity::anonymous(), now);
    assert!(e.unwrap_err().to_string().contains("at most 1024"));
    assert_eq!(status(&core, run), RunStatus::Queued, "the run goes on");
}

#[test]
fn a_reported_duration_is_clamped_to_the_time_its_attempt_was_out() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let run = submit(&mut core, &["a"], now);
    let shard = core.acquire(w, now).unwrap().unwrap();
    let later = now.after(Duration::from_secs(2));
    let forged = pb::TestResult {
        duration_ms: u64::MAX,
        ..result("a", Outcome::Passed)
    };
    core.report(w, shard.attempt_id.parse().unwrap(), vec![forged], later)
        .unwrap();
    let r = &core.get_run(run, true).unwrap().results[0];
    assert!(r.duration_ms <= 2_000 + 5_000, "{}", r.duration_ms);
}

#[test]
fn a_requester_past_its_share_of_runs_or_open_tests_is_refused() {
    let now = Now::real();
    let cfg = CoreConfig {
        max_active_runs_per_requester: 2,
        max_open_tests_per_requester: 5,
        ..CoreConfig::default()
    };
    let mut core = Core::open(cfg, SqliteStore::open(Path::new(":memory:")).unwrap(), now).unwrap();
    register(&mut core, "w1", 1, &[], now);
    submit(&mut core, &["a", "b"], now);
    let e = core.submit(submit_req(&["c", "d", "e", "f"]), now).unwrap_err();
    assert!(
        matches!(e, Error::ResourceExhausted(_)) && e.to_string().contains("6 tests"),
        "{e}"
    );
    let second = submit(&mut core, &["c"], now);
    let e = core.submit(submit_req(&["g"]), now).unwrap_err();
    assert!(e.to_string().contains("'ci' has 2 active runs"), "{e}");
    let other = pb::SubmitRunRequest {
        requested_by: "someone-else".into(),
        ..submit_req(&["g"])
    };
    core.submit(other, now)
        .expect("another requester has its own share");
    core.cancel(second, "", now).unwrap();
    core.submit(submit_req(&["g"]), now)
        .expect("a run ended: room again");
}

#[test]
fn the_live_views_counts_are_always_current_and_its_shard_list_catches_up_when_due() {
    let (mut core, now) = core();
    let w1 = register(&mut core, "w1", 1, &[], now);
    let w2 = register(&mut core, "w2", 1, &[], now);
    let run = submit(&mut core, &["a", "b", "c", "d"], now);
    let mut view = core.live_view();
    assert!(view.runs[&run].shards.is_empty());
    let changed: std::collections::HashSet<RunId> = [run].into();
    let none = std::collections::HashSet::new();
    // A hand-out right after the list was built: the counts follow at once, the list waits.
    core.acquire(w1, now).unwrap().expect("work");
    assert!(
        core.refresh_live(&mut view, &changed, &none),
        "the shard list is left stale"
    );
    assert_eq!(
        view.runs[&run].summary.counts.unwrap().queued,
        core.summary(run).unwrap().counts.unwrap().queued
    );
    assert!(view.runs[&run].shards.is_empty());
    assert!(core.refresh_stale_shards(&mut view), "not due yet");
    // Once due, it is rebuilt, whether or not the run changed again.
    view.runs.get_mut(&run).unwrap().shards_at =
        Some(std::time::Instant::now() - crate::read::SHARDS_REFRESH);
    assert!(!core.refresh_stale_shards(&mut view));
    assert_eq!(view.runs[&run].shards.len(), 1);
    // A change when the list is due rebuilds it directly.
    core.acquire(w2, now).unwrap().expect("work");
    view.runs.get_mut(&run).unwrap().shards_at =
        Some(std::time::Instant::now() - crate::read::SHARDS_REFRESH);
    assert!(!core.refresh_live(&mut view, &changed, &none));
    assert_eq!(view.runs[&run].shards.len(), 2);
}

#[test]
fn an_ended_shard_keeps_its_whole_estimate_and_its_results_in_the_timeline() {
    let (mut core, now) = core();
    let w = register(&mut core, "w1", 1, &[], now);
    let tests: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = tests.iter().map(String::as_str).collect();
    let run = submit(&mut core, &refs, now);
    assert!(drain(&mut core, w, now, |_| Outcome::Passed) > 1);
    let log = crate::store::Reads::shard_log(&*core.store, run).unwrap();
    assert!(log.len() > 1, "{log:?}");
    for s in &log {
        assert!(s.ended_at_ms > 0 && s.tests > 0, "{s:?}");
        // Every test of the shard had a guess: the entry shows their sum, not what was left.
        assert!(s.estimated_ms > 0, "an ended shard shows no estimate: {s:?}");
        // The last shard's last result ends the run in the same message: that shard still
        // finished every test it had.
        assert_eq!((s.done, s.state.as_str()), (s.tests, "finished"), "{s:?}");
    }
}

/// The shard worker `b` gets of a run of 40 one-second tests (known from a first run), asked
/// `after_ms` after worker `a` took its shard, whose results come only at its end (as nextest's
/// and JUnit runners' do); and the size of `a`'s shard.
fn second_shard_after(after_ms: u64) -> (usize, usize) {
    let (mut core, now) = core();
    let a = register(&mut core, "a", 1, &[], now);
    let b = register(&mut core, "b", 1, &[], now);
    let tests: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = tests.iter().map(String::as_str).collect();
    submit(&mut core, &refs, now);
    drain_with(&mut core, a, now, |t| pb::TestResult {
        duration_ms: 1000,
        ..result(t, Outcome::Passed)
    });
    submit(&mut core, &refs, now);
    let first = core.acquire(a, now).unwrap().unwrap().tests.len();
    let later = Now {
        at: now.at + Duration::from_millis(after_ms),
        ms: now.ms + after_ms,
    };
    let next = core.acquire(b, later).unwrap().unwrap().tests.len();
    core.check_invariants();
    (first, next)
}

#[test]
fn a_running_shard_counts_only_what_it_has_left_when_the_next_is_sized() {
    // Asked at once, the second worker's share is as large as the first's.
    let (first, at_once) = second_shard_after(0);
    assert!(first > 1, "{first}");
    assert_eq!(at_once, first);
    // Asked when the first shard is a second from its due end, the work left per slot is the
    // queue's and that second, not the first shard's whole estimate: a smaller shard, so the
    // two slots end together.
    let (first, late) = second_shard_after(first as u64 * 1000 - 1000);
    let left_per_slot = ((40 - first) as f64 * 1000.0 + 1000.0) / 2.0;
    assert!(late < at_once, "{late} against {at_once}");
    assert!(
        (late as f64 * 1000.0) <= left_per_slot,
        "{late} s of tests for {left_per_slot} ms per slot"
    );
}

#[test]
fn shards_are_filled_by_the_unit_a_runner_starts_per_shard() {
    use shardgate_common::RunnerKind;
    let start_unit = |kind, id| super::handout::start_unit(kind).map(|unit| unit(id));
    assert_eq!(
        start_unit(RunnerKind::Nextest, "itertools::quick size_hint"),
        Some("itertools::quick")
    );
    assert_eq!(
        start_unit(RunnerKind::GoTest, "example.com/m/pkg TestA"),
        Some("example.com/m/pkg")
    );
    for kind in [
        RunnerKind::Exec,
        RunnerKind::Pytest,
        RunnerKind::Junit,
        RunnerKind::CargoTest,
    ] {
        assert_eq!(start_unit(kind, "a b"), None, "{kind:?}");
    }
}
