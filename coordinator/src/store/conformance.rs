//! What every store must do alike, run against each of them: SQLite (a file in a temporary
//! directory) and PostgreSQL (a database of its own on the test process's server, see
//! `shardgate_testkit::postgres`). A test here is one function over a [`Backend`]; the macro at
//! the end makes one `#[test]` per store.

use shardgate_common::labels::Labels;
use shardgate_common::{Outcome, RunId, RunStatus};

use crate::model::Policy;
use crate::scheduler::History;
use crate::store::postgres::{Candidate, PgReader, PgStore};
use crate::store::{
    DeployRow, DeployState, FlakinessRow, Reads, ResultRow, RunRow, SqliteReader, SqliteStore, Store,
    StoreError, StoreResult,
};

/// One database, opened as often as a test asks (a reopen sees what was committed).
pub(crate) trait Backend {
    fn try_open(&self) -> StoreResult<Box<dyn Store>>;
    fn open(&self) -> Box<dyn Store> {
        self.try_open().expect("the store opens")
    }
    fn reader(&self) -> Box<dyn Reads + Send + Sync>;
}

pub(crate) struct Sqlite {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Sqlite {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        Self { _dir: dir, path }
    }
}

impl Backend for Sqlite {
    fn try_open(&self) -> StoreResult<Box<dyn Store>> {
        Ok(Box::new(SqliteStore::open(&self.path)?))
    }
    fn reader(&self) -> Box<dyn Reads + Send + Sync> {
        Box::new(SqliteReader::open(&self.path, 2).unwrap())
    }
}

pub(crate) struct Postgres {
    pub(crate) url: String,
}

impl Postgres {
    pub(crate) fn new() -> Self {
        Self {
            url: shardgate_testkit::postgres::PgServer::shared().database(),
        }
    }

    /// A candidate with a short lease, so that tests of takeovers do not wait long.
    pub(crate) fn candidate(name: &str) -> Candidate {
        Candidate {
            holder: name.into(),
            grpc_addr: format!("{name}:50051"),
            http_addr: format!("{name}:8080"),
            lease: std::time::Duration::from_secs(2),
            exit_when_lost: false,
        }
    }
}

impl Backend for Postgres {
    fn try_open(&self) -> StoreResult<Box<dyn Store>> {
        Ok(Box::new(PgStore::open(&self.url, &Self::candidate("test"))?))
    }
    fn reader(&self) -> Box<dyn Reads + Send + Sync> {
        Box::new(PgReader::open(&self.url, 2).unwrap())
    }
}

pub(crate) fn run_row() -> RunRow {
    RunRow {
        id: RunId::new(),
        suite: "unit".into(),
        revision: "abc".into(),
        requested_by: "ci".into(),
        runner: "exec".into(),
        labels: Labels::new(),
        policy: Policy::default(),
        priority: 0,
        discover: false,
        status: RunStatus::Queued,
        message: String::new(),
        created_ms: 1,
        started_ms: 0,
        finished_ms: 0,
        shards: 0,
        tested_commit: String::new(),
    }
}

pub(crate) fn result(idx: u32, id: &str, outcome: Outcome, at_ms: u64) -> ResultRow {
    ResultRow {
        idx,
        test_id: id.into(),
        history: History::default(),
        outcome,
        duration_ms: 1,
        attempts: 1,
        worker: "w".into(),
        detail: String::new(),
        output: String::new(),
        at_ms,
    }
}

fn results_are_counted_once_and_survive_reopen(db: &dyn Backend) {
    let run = run_row();
    {
        let mut s = db.open();
        s.insert_run(&run, &["a".into(), "b".into()], false).unwrap();
        let r = ResultRow {
            history: History {
                estimate_ms: 5.0,
                samples: 1,
                last_failed_ms: 0,
            },
            detail: "exit status 1".into(),
            output: "boom".into(),
            duration_ms: 5,
            ..result(1, "b", Outcome::Failed, 10)
        };
        assert_eq!(
            s.record_results(run.id, "unit", std::slice::from_ref(&r), &[])
                .unwrap(),
            1
        );
        let again = ResultRow {
            outcome: Outcome::Passed,
            history: History {
                estimate_ms: 99.0,
                samples: 2,
                last_failed_ms: 0,
            },
            ..r
        };
        assert_eq!(s.record_results(run.id, "unit", &[again], &[]).unwrap(), 0);
    }
    let s = db.open();
    let tests = s.tests(run.id).unwrap();
    assert_eq!(tests.len(), 2);
    assert_eq!(tests[0].outcome, None);
    assert_eq!(tests[1].outcome, Some(Outcome::Failed));
    let results = s.results(run.id).unwrap();
    assert_eq!(results[1].output, "boom");
    let (row, counts) = s.run_with_counts(run.id).unwrap().unwrap();
    assert_eq!(row.suite, "unit");
    assert_eq!((counts.total, counts.open, counts.of(Outcome::Failed)), (2, 1, 1));
    assert_eq!(s.unfinished_runs().unwrap().len(), 1);
    let h = s.history("unit").unwrap();
    assert_eq!(
        h["b"].estimate_ms, 5.0,
        "a result that was not counted does not touch the history"
    );
    assert!(s.history("other").unwrap().is_empty());
    let f = s.flakiness("unit", 10).unwrap();
    assert!(f.is_empty(), "one red run is neither a flake nor a flip: {f:?}");
}

fn flakiness_counts_flakes_and_flips_per_suite(db: &dyn Backend) {
    let mut s = db.open();
    let outcomes = [
        Outcome::Passed,
        Outcome::Flaky,
        Outcome::Passed,
        Outcome::Failed,
        Outcome::InfraError,
        Outcome::Passed,
    ];
    for (i, o) in outcomes.iter().enumerate() {
        let run = run_row();
        s.insert_run(&run, &["t".into(), "steady".into()], false).unwrap();
        let at = 100 + i as u64;
        let rows = [result(0, "t", *o, at), result(1, "steady", Outcome::Passed, at)];
        assert_eq!(s.record_results(run.id, "unit", &rows, &[]).unwrap(), 2);
    }
    let f = s.flakiness("unit", 10).unwrap();
    assert_eq!(
        f,
        vec![FlakinessRow {
            test_id: "t".into(),
            // The infrastructure error says nothing about the test.
            runs: 5,
            failures: 1,
            flakes: 1,
            // The flaky run itself, then passed -> failed, then failed -> passed.
            flips: 3,
            last_flake_ms: 101,
            last_run_ms: 105,
        }]
    );
    assert_eq!(
        s.flaky_tests("unit", 101).unwrap(),
        ["t".to_string()].into_iter().collect()
    );
    assert!(s.flaky_tests("unit", 102).unwrap().is_empty(), "too long ago");
    assert!(s.flakiness("other", 10).unwrap().is_empty());
}

fn a_rolled_back_savepoint_inside_a_batch_undoes_only_its_own_writes(db: &dyn Backend) {
    let (good, bad) = (run_row(), run_row());
    {
        let mut s = db.open();
        s.begin_batch().unwrap();
        s.savepoint().unwrap();
        s.insert_run(&good, &["a".into()], false).unwrap();
        s.release().unwrap();
        s.savepoint().unwrap();
        s.insert_run(&bad, &["x".into()], false).unwrap();
        assert!(s.add_tests(bad.id, 1, &["x".into()]).is_err(), "duplicate id");
        s.rollback().unwrap();
        s.commit_batch().unwrap();
    }
    let s = db.open();
    assert!(s.run_with_counts(good.id).unwrap().is_some());
    assert!(s.run_with_counts(bad.id).unwrap().is_none());
}

fn a_duplicate_test_id_is_refused_by_the_schema_too(db: &dyn Backend) {
    let mut s = db.open();
    let run = run_row();
    assert!(s.insert_run(&run, &["a".into(), "a".into()], false).is_err());
    assert!(
        s.run_with_counts(run.id).unwrap().is_none(),
        "the failed insert left nothing behind"
    );
}

fn a_staged_run_is_invisible_until_unstaged_and_deleted_by_the_next_start(db: &dyn Backend) {
    let (done, left) = (run_row(), run_row());
    {
        let mut s = db.open();
        for r in [&done, &left] {
            s.insert_run(r, &["a".into()], true).unwrap();
            s.add_tests(r.id, 1, &["b".into()]).unwrap();
            assert!(s.run_with_counts(r.id).unwrap().is_none());
            assert!(s.unfinished_runs().unwrap().is_empty());
        }
        s.unstage_run(done.id).unwrap();
        assert_eq!(s.run_with_counts(done.id).unwrap().unwrap().1.total, 2);
    }
    let s = db.open();
    assert_eq!(s.unfinished_runs().unwrap().len(), 1);
    assert!(s.tests(left.id).unwrap().is_empty(), "its tests went with it");
}

fn a_page_of_runs_comes_with_counts_from_one_query_and_readers_see_commits(db: &dyn Backend) {
    let mut s = db.open();
    let reader = db.reader();
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let run = RunRow {
            created_ms: 10 + i,
            ..run_row()
        };
        let tests: Vec<String> = (0..=i).map(|t| format!("t{t}")).collect();
        s.insert_run(&run, &tests, false).unwrap();
        s.record_results(run.id, "unit", &[result(0, "t0", Outcome::Passed, 1)], &[])
            .unwrap();
        ids.push(run.id);
    }
    s.begin_batch().unwrap();
    let hidden = run_row();
    s.insert_run(&hidden, &["x".into()], false).unwrap();
    let page = reader.runs_page(10).unwrap();
    assert_eq!(page.len(), 3, "an uncommitted run is not read");
    s.commit_batch().unwrap();
    let page = reader.runs_page(2).unwrap();
    assert_eq!(
        page.iter().map(|(r, _)| r.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]],
        "newest first, limited"
    );
    assert_eq!(
        (page[0].1.total, page[0].1.open, page[0].1.of(Outcome::Passed)),
        (3, 2, 1)
    );
    assert_eq!(reader.runs_page(10).unwrap().len(), 4);
}

fn a_run_finds_its_own_deploy_and_sees_it_move(db: &dyn Backend) {
    let mut s = db.open();
    let reader = db.reader();
    let (deployed, other) = (run_row(), run_row());
    for r in [&deployed, &other] {
        s.insert_run(r, &["t".into()], false).unwrap();
    }
    for (i, run) in [other.id, deployed.id].into_iter().enumerate() {
        s.insert_deploy(&DeployRow {
            id: format!("d{i}"),
            run_id: run,
            suite: "unit".into(),
            revision: "abc".into(),
            requested_by: "ci".into(),
            authors: vec!["ann".into()],
            created_ms: 5 + i as u64,
            started_ms: 0,
            finished_ms: 0,
            state: DeployState::Pending,
            detail: String::new(),
        })
        .unwrap();
    }
    let d = reader.deploy_of_run(deployed.id).unwrap().expect("its deploy");
    assert_eq!((d.id.as_str(), d.run_id), ("d1", deployed.id));
    assert!(
        s.update_deploy("d1", DeployState::Pending, DeployState::Running, 7, "")
            .unwrap()
    );
    assert_eq!(
        reader
            .deploy_of_run(deployed.id)
            .unwrap()
            .map(|d| (d.state, d.started_ms)),
        Some((DeployState::Running, 7))
    );
    assert!(
        reader.deploy_of_run(RunId::new()).unwrap().is_none(),
        "a run without a deploy"
    );
}

fn a_pinned_tested_commit_outlives_status_updates_reopen_and_reads(db: &dyn Backend) {
    let mut s = db.open();
    let mut run = run_row();
    s.insert_run(&run, &["t".into()], false).unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    s.set_tested_commit(run.id, commit).unwrap();
    // A status update carries a row decided before the pin: it must not clear it.
    run.status = RunStatus::Running;
    s.update_run_status(&run).unwrap();
    drop(s);
    let s = db.open();
    let stored = s.unfinished_runs().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].tested_commit, commit);
    let (row, _) = db.reader().run_with_counts(run.id).unwrap().expect("the run");
    assert_eq!(row.tested_commit, commit);
    assert_eq!(db.reader().runs_page(5).unwrap()[0].0.tested_commit, commit);
}

fn a_second_writer_on_the_same_database_is_refused(db: &dyn Backend) {
    let _first = db.open();
    let Err(err) = db.try_open() else {
        panic!("a second writer opened the database")
    };
    assert!(matches!(err, StoreError::Held { .. }), "{err}");
}

/// One `#[test]` per store for each named test function.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Sqlite::new()); })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(&super::Postgres::new()); })*
        }
    };
}

on_every_store!(
    results_are_counted_once_and_survive_reopen,
    flakiness_counts_flakes_and_flips_per_suite,
    a_rolled_back_savepoint_inside_a_batch_undoes_only_its_own_writes,
    a_duplicate_test_id_is_refused_by_the_schema_too,
    a_staged_run_is_invisible_until_unstaged_and_deleted_by_the_next_start,
    a_page_of_runs_comes_with_counts_from_one_query_and_readers_see_commits,
    a_second_writer_on_the_same_database_is_refused,
    a_run_finds_its_own_deploy_and_sees_it_move,
    a_pinned_tested_commit_outlives_status_updates_reopen_and_reads,
);
