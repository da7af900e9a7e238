//! Fault injection: every message is all-or-nothing. Each scenario sets a core up, then runs one
//! message with the Nth store write failing, for every N up to the number of writes the message
//! makes. After each failure the caller got an error; the message left no event; memory, the
//! store and the core's invariants are as before the message; memory equals that of a core
//! reopened from the same database; and the same message sent again (a worker's retry)
//! succeeds on the same core. Every scenario runs on SQLite and on PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shardgate_common::{AttemptId, Error, Outcome, RunId, WorkerId, pb};

use super::Core;
use super::tests::{result, submit_req as req};
use crate::model::{CoreConfig, Now};
use crate::store::conformance::Postgres;
use crate::store::postgres::PgStore;
use crate::store::{FaultHandle, FaultyStore, SqliteStore, Store};

/// Everything the store holds that a message may write, to compare before and after.
fn store_fingerprint(store: &dyn Store) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        store.runs_page(1000).unwrap(),
        store
            .deploys(1000)
            .unwrap()
            .iter()
            .map(|d| (d.run_id, d.state))
            .collect::<Vec<_>>(),
        store.quarantine(None).unwrap(),
        {
            let mut a: Vec<_> = store.attempts().unwrap().into_iter().map(|a| a.id).collect();
            a.sort();
            a
        },
        {
            let mut w: Vec<_> = store
                .workers()
                .unwrap()
                .into_iter()
                .map(|w| (w.id, w.state))
                .collect();
            w.sort_by_key(|w| w.0);
            w
        },
    )
}

/// The world a scenario's message runs in.
struct World {
    core: Core,
    faults: FaultHandle,
    db: Db,
    now: Now,
    workers: Vec<WorkerId>,
    runs: Vec<RunId>,
    /// Live attempts the scenario holds, with their tests.
    shards: Vec<(WorkerId, AttemptId, Vec<String>)>,
    _dir: tempfile::TempDir,
}

fn config() -> CoreConfig {
    CoreConfig {
        rollout_configured: true,
        auto_quarantine: true,
        quarantine_min_runs: 1,
        quarantine_threshold: 0.1,
        ..CoreConfig::default()
    }
}

/// Where a world's database is.
#[derive(Debug, Clone)]
enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

/// The stores every scenario runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

const KINDS: [Kind; 2] = [Kind::Sqlite, Kind::Postgres];

fn open(db: &Db, now: Now) -> (Core, FaultHandle) {
    match db {
        Db::Sqlite(path) => {
            let (store, faults) = FaultyStore::new(SqliteStore::open(path).unwrap());
            (Core::open(config(), store, now).unwrap(), faults)
        }
        Db::Postgres(url) => {
            let (store, faults) =
                FaultyStore::new(PgStore::open(url, &Postgres::candidate("faults")).unwrap());
            (Core::open(config(), store, now).unwrap(), faults)
        }
    }
}

impl World {
    fn new(kind: Kind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = match kind {
            Kind::Sqlite => Db::Sqlite(dir.path().join("db.sqlite")),
            Kind::Postgres => Db::Postgres(Postgres::new().url),
        };
        let now = Now::real();
        let (core, faults) = open(&db, now);
        let mut w = Self {
            core,
            faults,
            db,
            now,
            workers: Vec::new(),
            runs: Vec::new(),
            shards: Vec::new(),
            _dir: dir,
        };
        w.register("w1");
        w.register("w2");
        w
    }

    fn register(&mut self, name: &str) -> WorkerId {
        let resp = self.core.register(register_req(name), self.now).unwrap();
        let id = resp.worker_id.parse().unwrap();
        self.workers.push(id);
        id
    }

    fn submit(&mut self, req: pb::SubmitRunRequest) -> RunId {
        let id = self.core.submit(req, self.now).unwrap().run_id.parse().unwrap();
        self.runs.push(id);
        id
    }

    fn acquire(&mut self, worker: usize) {
        let w = self.workers[worker];
        let shard = self
            .core
            .acquire(w, self.now)
            .unwrap()
            .expect("work for the worker");
        self.shards
            .push((w, shard.attempt_id.parse().unwrap(), shard.tests));
    }

    fn quarantine(&mut self, test: &str) {
        self.core
            .add_quarantine(
                pb::AddQuarantineRequest {
                    suite: "unit".into(),
                    test_id: test.into(),
                    reason: "known flake".into(),
                    added_by: "qa".into(),
                },
                self.now,
            )
            .unwrap();
    }
}

fn register_req(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        name: name.into(),
        slots: 2,
        labels: vec![],
        runners: vec![pb::RunnerInfo {
            name: "exec".into(),
            kind: pb::RunnerKind::Exec as i32,
        }],
    }
}

type Setup = fn(&mut World);
type Message = fn(&mut World) -> Result<(), Error>;

/// Runs `message` after `setup` with each of its writes failing in turn, and checks that every
/// failure left nothing behind. Returns how many writes the message makes when nothing fails.
fn every_write_fails_alone(name: &str, setup: Setup, message: Message, multi: bool) -> u32 {
    let mut writes = Vec::new();
    for kind in KINDS {
        writes.push(every_write_fails_alone_on(kind, name, setup, message, multi));
    }
    assert!(
        writes.windows(2).all(|w| w[0] == w[1]),
        "{name}: the stores make different numbers of writes: {writes:?}"
    );
    writes[0]
}

fn every_write_fails_alone_on(kind: Kind, name: &str, setup: Setup, message: Message, multi: bool) -> u32 {
    let name = &format!("{name} ({kind:?})");
    for n in 1.. {
        let mut w = World::new(kind);
        setup(&mut w);
        w.core.take_effects();
        let memory = w.core.durable_view();
        let stored = store_fingerprint(w.core.store.as_ref());
        w.faults.arm(n);
        let outcome = message(&mut w);
        let writes = w.faults.writes();
        w.faults.arm(0);
        if writes < n {
            outcome.unwrap_or_else(|e| panic!("{name}: fails with no fault injected: {e}"));
            assert!(n > 1, "{name}: writes nothing");
            return n - 1;
        }
        let err = outcome.expect_err(&format!("{name}: write {n} failed but the caller got no error"));
        assert!(err.to_string().contains("injected"), "{name}, write {n}: {err}");
        w.core.check_invariants();
        if !multi {
            let effects = w.core.take_effects();
            assert!(
                effects.events.is_empty(),
                "{name}, write {n}: a failed message published events"
            );
            assert!(
                w.core.durable_view() == memory,
                "{name}, write {n}: memory changed"
            );
            assert_eq!(
                store_fingerprint(w.core.store.as_ref()),
                stored,
                "{name}, write {n}: the store changed"
            );
        }
        // The same message again, as a worker retries: it must go through.
        message(&mut w).unwrap_or_else(|e| panic!("{name}, write {n}: the retry failed: {e}"));
        w.core.check_invariants();

        // Memory after a failure is what a restart would load.
        let mut w = World::new(kind);
        setup(&mut w);
        w.faults.arm(n);
        let _ = message(&mut w);
        w.faults.arm(0);
        let memory = w.core.durable_view();
        let World { core, db, now, .. } = &mut w;
        let placeholder =
            Core::open(config(), SqliteStore::open(Path::new(":memory:")).unwrap(), *now).unwrap();
        drop(std::mem::replace(core, placeholder));
        let (reopened, _) = open(db, *now);
        reopened.check_invariants();
        let reloaded = reopened.durable_view();
        assert!(
            memory == reloaded,
            "{name}, write {n}: memory and a reopened core disagree:\n{memory:#?}\nvs\n{reloaded:#?}"
        );
    }
    unreachable!()
}

#[test]
fn a_submission_with_rollout_and_quarantine_is_all_or_nothing() {
    let writes = every_write_fails_alone(
        "submit",
        |w| w.quarantine("b"),
        |w| {
            let mut r = req(&["a", "b", "c"]);
            r.rollout = true;
            r.authors = vec!["ann".into()];
            w.core.submit(r, w.now).map(|_| ())
        },
        false,
    );
    assert!(writes >= 3, "{writes}");
}

#[test]
fn a_hand_out_is_all_or_nothing() {
    every_write_fails_alone(
        "acquire",
        |w| {
            w.submit(req(&["a", "b"]));
        },
        |w| w.core.acquire(w.workers[0], w.now).map(|_| ()),
        false,
    );
}

/// A run asking for a rollout whose test "f" failed once and is out again for its retry.
fn flaky_retry_out(w: &mut World) {
    let mut r = req(&["f", "g"]);
    r.rollout = true;
    w.submit(r);
    // The first worker runs everything it is given; the retry avoids it, for the second.
    let w1 = w.workers[0];
    while let Some(shard) = w.core.acquire(w1, w.now).unwrap() {
        let a: AttemptId = shard.attempt_id.parse().unwrap();
        let results = shard
            .tests
            .iter()
            .map(|t| {
                result(
                    t,
                    if t == "f" {
                        Outcome::Failed
                    } else {
                        Outcome::Passed
                    },
                )
            })
            .collect();
        w.core.report(w1, a, results, w.now).unwrap();
        w.core.finish(w1, a, "", false, w.now).unwrap();
    }
    w.acquire(1);
    assert_eq!(w.shards[0].2, ["f"], "the retry");
}

#[test]
fn a_report_that_flakes_auto_quarantines_and_concludes_with_a_deploy_is_all_or_nothing() {
    let writes = every_write_fails_alone(
        "report",
        flaky_retry_out,
        |w| {
            let (wk, a, _) = w.shards[0].clone();
            let r = w.core.report(wk, a, vec![result("f", Outcome::Passed)], w.now)?;
            assert!(r.stop, "the run ended with this report");
            Ok(())
        },
        false,
    );
    // Results, quarantine, verdict, deploy, the run's attempt.
    assert!(writes >= 5, "{writes}");
}

#[test]
fn a_report_with_fail_fast_is_all_or_nothing() {
    every_write_fails_alone(
        "report (fail-fast)",
        |w| {
            let mut r = req(&["a", "b", "c", "d"]);
            r.policy = Some(pb::RunPolicy {
                fail_fast: true,
                retries: Some(0),
                ..Default::default()
            });
            w.submit(r);
            w.acquire(0);
            w.acquire(1);
        },
        |w| {
            let (wk, a, tests) = w.shards[0].clone();
            w.core
                .report(wk, a, vec![result(&tests[0], Outcome::Failed)], w.now)
                .map(|_| ())
        },
        false,
    );
}

#[test]
fn a_discovery_is_all_or_nothing() {
    every_write_fails_alone(
        "discovery",
        |w| {
            w.quarantine("t2");
            let mut r = req(&[]);
            r.discover = true;
            w.submit(r);
            w.acquire(0);
        },
        |w| {
            let (wk, a, _) = w.shards[0].clone();
            w.core.discovery(wk, a, vec!["t1".into(), "t2".into()], "", w.now)
        },
        false,
    );
}

#[test]
fn a_finish_with_a_runner_error_is_all_or_nothing() {
    every_write_fails_alone(
        "finish",
        |w| {
            w.submit(req(&["a", "b", "c"]));
            w.acquire(0);
            let (wk, a, tests) = w.shards[0].clone();
            w.core
                .report(wk, a, vec![result(&tests[0], Outcome::Passed)], w.now)
                .unwrap();
        },
        |w| {
            let (wk, a, _) = w.shards[0].clone();
            w.core.finish(wk, a, "no junit", false, w.now).map(|_| ())
        },
        false,
    );
}

#[test]
fn a_finish_that_gives_up_the_last_tests_and_concludes_is_all_or_nothing() {
    every_write_fails_alone(
        "finish (give up)",
        |w| {
            let mut r = req(&["a", "b"]);
            r.policy = Some(pb::RunPolicy {
                max_infra_attempts: 1,
                ..Default::default()
            });
            w.submit(r);
            w.acquire(0);
        },
        |w| {
            let (wk, a, _) = w.shards[0].clone();
            w.core.finish(wk, a, "", false, w.now).map(|_| ())
        },
        false,
    );
}

#[test]
fn a_cancel_is_all_or_nothing() {
    every_write_fails_alone(
        "cancel",
        |w| {
            w.submit(req(&["a", "b", "c"]));
            w.acquire(0);
        },
        |w| w.core.cancel(w.runs[0], "by hand", w.now).map(|_| ()),
        false,
    );
}

#[test]
fn a_deregistration_is_all_or_nothing() {
    every_write_fails_alone(
        "deregister",
        |w| {
            w.submit(req(&["a", "b", "c"]));
            w.acquire(0);
            w.acquire(0);
        },
        |w| w.core.deregister(w.workers[0], w.now),
        false,
    );
}

#[test]
fn a_disconnection_is_all_or_nothing() {
    every_write_fails_alone(
        "connection closed",
        |w| {
            w.submit(req(&["a", "b", "c"]));
            w.acquire(0);
            w.acquire(0);
        },
        |w| w.core.connection_closed(w.workers[0], w.now),
        false,
    );
}

#[test]
fn a_lease_expiry_that_gives_up_and_concludes_leaves_memory_as_a_restart_would() {
    // Expiries are messages of their own: a failed one leaves the others done.
    every_write_fails_alone(
        "tick",
        |w| {
            let mut r = req(&["a", "b"]);
            r.policy = Some(pb::RunPolicy {
                max_infra_attempts: 1,
                ..Default::default()
            });
            w.submit(r);
            w.submit(req(&["c", "d"]));
            w.acquire(0);
            w.acquire(1);
            w.now = w.now.after(Duration::from_secs(11));
        },
        |w| w.core.tick(w.now),
        true,
    );
}
