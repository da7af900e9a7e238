//! The SQLite store: runs, tests with their counted results, and registered workers. Only the
//! scheduler thread owns a [`Store`], so every write goes through one connection in order.
//!
//! Durability: the database runs in WAL mode with `synchronous=NORMAL`, which survives a crash or
//! `kill -9` of the coordinator (the WAL is in the OS page cache) but may lose the last
//! transactions on a power failure. A result is acknowledged to a worker only after its
//! transaction committed. The actor groups the writes of many messages into one transaction
//! ([`Store::begin_batch`]), each message's writes in a savepoint of their own.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use shardgate_common::labels::Labels;
use shardgate_common::{AttemptId, Outcome, RunId, RunStatus, RunnerKind, ShardId, WorkerId, pb};

use crate::model::Policy;
use crate::scheduler::History;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open database '{path}': {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("database '{path}' has schema version {found}, this coordinator knows {expected}")]
    Version { path: String, found: i64, expected: i64 },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("corrupt row in table {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
}

/// The schema this code writes: [`SCHEMA`] is version 1, and each entry of [`MIGRATIONS`] moves
/// a database one version up, in one transaction.
const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

const MIGRATIONS: &[&str] = &[
    // 2: a test's retry state (failures so far, workers that lost it) survives a restart.
    "ALTER TABLE tests ADD COLUMN retry TEXT NOT NULL DEFAULT '';",
    // 3: flakiness history per test: counted runs, confirmed failures, flaky results, flips
    // between green and red, and when it last flaked.
    "CREATE TABLE flakiness (
        suite         TEXT NOT NULL,
        test_id       TEXT NOT NULL,
        runs          INTEGER NOT NULL,
        failures      INTEGER NOT NULL,
        flakes        INTEGER NOT NULL,
        flips         INTEGER NOT NULL,
        last_green    INTEGER NOT NULL,
        last_flake_ms INTEGER NOT NULL,
        last_run_ms   INTEGER NOT NULL,
        PRIMARY KEY (suite, test_id)
    ) WITHOUT ROWID;",
    // 4: quarantine per suite, and which tests of a run were quarantined when it was submitted.
    "CREATE TABLE quarantine (
        suite     TEXT NOT NULL,
        test_id   TEXT NOT NULL,
        reason    TEXT NOT NULL,
        added_by  TEXT NOT NULL,
        added_ms  INTEGER NOT NULL,
        automatic INTEGER NOT NULL,
        PRIMARY KEY (suite, test_id)
    ) WITHOUT ROWID;
    ALTER TABLE tests ADD COLUMN quarantined INTEGER NOT NULL DEFAULT 0;",
    // 5: rollouts. A run that asks for one, with its authors; and the deploy log, at most one
    // deploy per run (the schema says so too).
    "CREATE TABLE rollout_requests (
        run_id  TEXT PRIMARY KEY,
        authors TEXT NOT NULL
    );
    CREATE TABLE deploys (
        id           TEXT PRIMARY KEY,
        run_id       TEXT NOT NULL UNIQUE,
        suite        TEXT NOT NULL,
        revision     TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        authors      TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        started_ms   INTEGER NOT NULL DEFAULT 0,
        finished_ms  INTEGER NOT NULL DEFAULT 0,
        state        TEXT NOT NULL,
        detail       TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX deploys_by_time ON deploys(created_ms);",
];

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS runs (
    id           TEXT PRIMARY KEY,
    suite        TEXT NOT NULL,
    revision     TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    runner       TEXT NOT NULL,
    labels       TEXT NOT NULL,
    policy       TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    discover     INTEGER NOT NULL,
    status       TEXT NOT NULL,
    message      TEXT NOT NULL DEFAULT '',
    created_ms   INTEGER NOT NULL,
    started_ms   INTEGER NOT NULL DEFAULT 0,
    finished_ms  INTEGER NOT NULL DEFAULT 0,
    shards       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status);
CREATE TABLE IF NOT EXISTS tests (
    run_id      TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    test_id     TEXT NOT NULL,
    outcome     TEXT,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    worker      TEXT NOT NULL DEFAULT '',
    detail      TEXT NOT NULL DEFAULT '',
    output      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS tests_by_id ON tests(run_id, test_id);
CREATE TABLE IF NOT EXISTS durations (
    suite          TEXT NOT NULL,
    test_id        TEXT NOT NULL,
    estimate_ms    REAL NOT NULL,
    samples        INTEGER NOT NULL,
    last_failed_ms INTEGER NOT NULL,
    PRIMARY KEY (suite, test_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    id         TEXT PRIMARY KEY,
    run_id     TEXT NOT NULL,
    worker_id  TEXT NOT NULL,
    shard_id   TEXT NOT NULL,
    discover   INTEGER NOT NULL,
    tests      TEXT NOT NULL,
    started_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    slots         INTEGER NOT NULL,
    labels        TEXT NOT NULL,
    runners       TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    state         TEXT NOT NULL
);
"#;

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: RunId,
    pub suite: String,
    pub revision: String,
    pub requested_by: String,
    pub runner: String,
    pub labels: Labels,
    pub policy: Policy,
    pub priority: i32,
    pub discover: bool,
    pub status: RunStatus,
    pub message: String,
    pub created_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub shards: u32,
}

/// One counted result, with the test's history updated by it.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub idx: u32,
    pub test_id: String,
    pub history: History,
    pub outcome: Outcome,
    pub duration_ms: u64,
    pub attempts: u32,
    pub worker: String,
    pub detail: String,
    pub output: String,
    /// When the result was counted.
    pub at_ms: u64,
}

/// A test's flakiness in its suite, as `shardgate flaky` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakinessRow {
    pub test_id: String,
    pub runs: u32,
    pub failures: u32,
    pub flakes: u32,
    pub flips: u32,
    pub last_flake_ms: u64,
    pub last_run_ms: u64,
}

/// A test as loaded on restart: its id and, when counted, its outcome.
#[derive(Debug, Clone)]
pub struct StoredTest {
    pub test_id: String,
    pub outcome: Option<Outcome>,
    pub retry: RetryState,
    pub quarantined: bool,
}

/// One deploy in the log. States: `pending` (the gate passed; the hook has not started),
/// `running` (written before the hook starts), then `succeeded`, `failed`, `rolled_back`, or
/// `unknown` (the coordinator stopped while the hook ran; it is never run again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRow {
    pub id: String,
    pub run_id: RunId,
    pub suite: String,
    pub revision: String,
    pub requested_by: String,
    pub authors: Vec<String>,
    pub created_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub state: String,
    pub detail: String,
}

/// A quarantined test of a suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRow {
    pub suite: String,
    pub test_id: String,
    pub reason: String,
    pub added_by: String,
    pub added_ms: u64,
    pub automatic: bool,
}

/// What an open test went through in its run so far, kept so that a restarted coordinator
/// neither forgets a failure (and grants an extra retry) nor a lost worker.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetryState {
    /// Failed runs that were retried rather than counted.
    pub failures: u32,
    /// The first retried failure: detail, output, worker name.
    pub first_failure: Option<(String, String, String)>,
    /// Attempts that ended without a result for this test (lease expired, no result).
    pub lost: u32,
    /// The names of the distinct workers that lost it, with the last reason for each.
    pub lost_on: Vec<(String, String)>,
    /// Workers it should not run on again while others can take it (failed or lost there).
    pub avoid: Vec<WorkerId>,
}

impl RetryState {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A live attempt as stored, so a restarted coordinator keeps the shards workers still run.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub id: AttemptId,
    pub run: RunId,
    pub worker: WorkerId,
    pub shard: ShardId,
    pub discover: bool,
    /// Indexes of the shard's tests.
    pub tests: Vec<u32>,
    pub started_ms: u64,
}

/// A registered worker as stored.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: WorkerId,
    pub name: String,
    pub slots: u32,
    pub labels: Labels,
    pub runners: Vec<(String, RunnerKind)>,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    pub state: String,
}

pub struct Store {
    conn: Connection,
    /// Set when the store is dropped, to stop the background checkpointer.
    stop_checkpoints: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop_checkpoints {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`; `:memory:` gives a private in-memory
    /// database for tests.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: shown.clone(),
            source,
        })?;
        let open_err = |source| StoreError::Open {
            path: shown.clone(),
            source,
        };
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(open_err)?;
        // 64 MiB of page cache: a large run's working set stays in memory between commits.
        conn.pragma_update(None, "cache_size", -65536).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Version {
                path: shown,
                found: version,
                expected: SCHEMA_VERSION,
            });
        }
        let mut at = version;
        if at == 0 {
            conn.execute_batch(SCHEMA).map_err(open_err)?;
            at = 1;
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(at as usize - 1) {
            let to = i as i64 + 2;
            conn.execute_batch(&format!("BEGIN; {m} PRAGMA user_version = {to}; COMMIT;"))
                .map_err(open_err)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
        Ok(Self {
            conn,
            stop_checkpoints: None,
        })
    }

    /// Moves WAL checkpoints off the writer: the writer no longer checkpoints when it commits
    /// (a checkpoint syncs the disk and would stall every reply of that batch), and a thread
    /// with its own connection runs passive checkpoints, which never block the writer, every
    /// `every`. Stops when the store is dropped.
    pub fn checkpoint_in_background(
        &mut self,
        path: &Path,
        every: std::time::Duration,
    ) -> Result<(), StoreError> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.stop_checkpoints = Some(stop.clone());
        std::thread::Builder::new()
            .name("shardgate-checkpoint".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(every);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %e, "background checkpoint failed");
                    }
                }
            })
            .map_err(|e| StoreError::Corrupt {
                table: "-",
                reason: format!("failed to start the checkpoint thread: {e}"),
            })?;
        Ok(())
    }

    /// Starts a group commit: the writes of every call until [`Store::commit_batch`] become
    /// durable together. Each call still runs in its own savepoint, so a failed call rolls back
    /// alone.
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Ends a group commit; after it returns, every write of the batch is on disk.
    pub fn commit_batch(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// Stores a new run with its tests in one transaction.
    pub fn insert_run(&mut self, run: &RunRow, tests: &[String]) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "INSERT INTO runs (id, suite, revision, requested_by, runner, labels, policy, priority,
                               discover, status, message, created_ms, started_ms, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                run.id.to_string(),
                run.suite,
                run.revision,
                run.requested_by,
                run.runner,
                to_json(&run.labels),
                to_json(&run.policy),
                run.priority,
                run.discover,
                run.status.as_str(),
                run.message,
                run.created_ms as i64,
                run.started_ms as i64,
                run.finished_ms as i64,
            ],
        )?;
        insert_tests(&tx, run.id, 0, tests)?;
        tx.commit()?;
        Ok(())
    }

    /// Adds the tests a discovery found to a run.
    pub fn add_tests(&mut self, run: RunId, first_idx: u32, tests: &[String]) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        insert_tests(&tx, run, first_idx, tests)?;
        tx.commit()?;
        Ok(())
    }

    pub fn update_run_status(&mut self, row: &RunRow) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE runs SET status = ?2, message = ?3, started_ms = ?4, finished_ms = ?5, shards = ?6
             WHERE id = ?1",
            params![
                row.id.to_string(),
                row.status.as_str(),
                row.message,
                row.started_ms as i64,
                row.finished_ms as i64,
                row.shards
            ],
        )?;
        Ok(())
    }

    /// Writes results, the histories they update and the retry state of tests that go round
    /// again, in one transaction. A row that already has an outcome is left alone, so a result
    /// can never be counted twice; returns how many results were written.
    pub fn record_results(
        &mut self,
        run: RunId,
        suite: &str,
        results: &[ResultRow],
        retry: &[(u32, &RetryState)],
    ) -> Result<usize, StoreError> {
        let tx = self.conn.savepoint()?;
        let mut written = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE tests SET retry = ?3 WHERE run_id = ?1 AND idx = ?2 AND outcome IS NULL",
            )?;
            let run = run.to_string();
            for (idx, state) in retry {
                stmt.execute(params![run, idx, to_json(state)])?;
            }
        }
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE tests SET outcome = ?3, duration_ms = ?4, attempts = ?5, worker = ?6,
                                  detail = ?7, output = ?8
                 WHERE run_id = ?1 AND idx = ?2 AND outcome IS NULL",
            )?;
            let mut hist = tx.prepare_cached(UPSERT_HISTORY)?;
            let mut flaky = tx.prepare_cached(UPSERT_FLAKINESS)?;
            let run = run.to_string();
            for r in results {
                let n = stmt.execute(params![
                    run,
                    r.idx,
                    r.outcome.as_str(),
                    r.duration_ms as i64,
                    r.attempts,
                    r.worker,
                    r.detail,
                    r.output
                ])?;
                if n == 1 {
                    hist.execute(params![
                        suite,
                        r.test_id,
                        r.history.estimate_ms,
                        r.history.samples,
                        r.history.last_failed_ms as i64
                    ])?;
                    let (green, red) = match r.outcome {
                        Outcome::Passed | Outcome::Flaky => (true, false),
                        Outcome::Failed | Outcome::TimedOut => (false, true),
                        // Not a verdict on the test itself.
                        Outcome::Skipped | Outcome::InfraError => (false, false),
                    };
                    if green || red {
                        let flake = r.outcome == Outcome::Flaky;
                        flaky.execute(params![
                            suite,
                            r.test_id,
                            red,
                            flake,
                            green,
                            if flake { r.at_ms as i64 } else { 0 },
                            r.at_ms as i64
                        ])?;
                    }
                }
                written += n;
            }
        }
        tx.commit()?;
        Ok(written)
    }

    /// Records that `run` asks for a rollout once its gate passes.
    pub fn add_rollout_request(&mut self, run: RunId, authors: &[String]) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO rollout_requests (run_id, authors) VALUES (?1, ?2)",
            params![run.to_string(), to_json(&authors)],
        )?;
        Ok(())
    }

    /// The authors of a run that asked for a rollout; `None` when it did not ask.
    pub fn rollout_request(&self, run: RunId) -> Result<Option<Vec<String>>, StoreError> {
        let authors: Option<String> = self
            .conn
            .query_row(
                "SELECT authors FROM rollout_requests WHERE run_id = ?1",
                [run.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        authors.map(|a| from_json("rollout_requests", &a)).transpose()
    }

    /// Adds a deploy to the log; fails if the run already has one.
    pub fn insert_deploy(&mut self, d: &DeployRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO deploys (id, run_id, suite, revision, requested_by, authors, created_ms,
                                  started_ms, finished_ms, state, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                d.id,
                d.run_id.to_string(),
                d.suite,
                d.revision,
                d.requested_by,
                to_json(&d.authors),
                d.created_ms as i64,
                d.started_ms as i64,
                d.finished_ms as i64,
                d.state,
                d.detail
            ],
        )?;
        Ok(())
    }

    /// Moves a deploy from state `from` to `to`; false when it was not in `from`.
    pub fn update_deploy(
        &mut self,
        id: &str,
        from: &str,
        to: &str,
        at_ms: u64,
        detail: &str,
    ) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE deploys SET state = ?3, detail = ?5,
                 started_ms = CASE WHEN ?3 = 'running' THEN ?4 ELSE started_ms END,
                 finished_ms = CASE WHEN ?3 = 'running' THEN finished_ms ELSE ?4 END
             WHERE id = ?1 AND state = ?2",
            params![id, from, to, at_ms as i64, detail],
        )?;
        Ok(n == 1)
    }

    /// The deploy log, newest first; with `state`, only deploys in that state.
    pub fn deploys(&self, state: Option<&str>, limit: u32) -> Result<Vec<DeployRow>, StoreError> {
        self.query_deploys(
            "WHERE ?1 IS NULL OR state = ?1 ORDER BY created_ms DESC, id DESC LIMIT ?2",
            params![state, limit],
        )
    }

    /// The oldest deploy still waiting for its hook.
    pub fn next_pending_deploy(&self) -> Result<Option<DeployRow>, StoreError> {
        Ok(self
            .query_deploys("WHERE state = 'pending' ORDER BY created_ms, id LIMIT 1", [])?
            .pop())
    }

    /// The deploy that started last.
    pub fn last_started_deploy(&self) -> Result<Option<DeployRow>, StoreError> {
        Ok(self
            .query_deploys(
                "WHERE started_ms > 0 ORDER BY started_ms DESC, id DESC LIMIT 1",
                [],
            )?
            .pop())
    }

    /// Deploys selected by `filter` (the SQL after `FROM deploys`).
    fn query_deploys(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<DeployRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT id, run_id, suite, revision, requested_by, authors, created_ms, started_ms,
                    finished_ms, state, detail
             FROM deploys {filter}"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, String>(9)?,
                r.get::<_, String>(10)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, run, suite, revision, requested_by, authors, created, started, finished, state, detail) =
                row?;
            out.push(DeployRow {
                id,
                run_id: parse_id("deploys", &run)?,
                suite,
                revision,
                requested_by,
                authors: from_json("deploys", &authors)?,
                created_ms: created as u64,
                started_ms: started as u64,
                finished_ms: finished as u64,
                state,
                detail,
            });
        }
        Ok(out)
    }

    /// How many deploys started at or after `since_ms`.
    pub fn deploys_since(&self, since_ms: u64) -> Result<u32, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM deploys WHERE started_ms >= ?1 AND started_ms > 0",
            [since_ms as i64],
            |r| r.get(0),
        )?)
    }

    /// Quarantines a test of a suite (again: the newest reason wins).
    pub fn add_quarantine(&mut self, q: &QuarantineRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO quarantine (suite, test_id, reason, added_by, added_ms, automatic)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(suite, test_id) DO UPDATE SET reason = excluded.reason,
                 added_by = excluded.added_by, added_ms = excluded.added_ms,
                 automatic = excluded.automatic",
            params![
                q.suite,
                q.test_id,
                q.reason,
                q.added_by,
                q.added_ms as i64,
                q.automatic
            ],
        )?;
        Ok(())
    }

    /// Lifts a quarantine; false when the test was not quarantined.
    pub fn remove_quarantine(&mut self, suite: &str, test_id: &str) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "DELETE FROM quarantine WHERE suite = ?1 AND test_id = ?2",
            params![suite, test_id],
        )?;
        Ok(n == 1)
    }

    /// The quarantined tests of `suite`, or of every suite.
    pub fn quarantine(&self, suite: Option<&str>) -> Result<Vec<QuarantineRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT suite, test_id, reason, added_by, added_ms, automatic FROM quarantine
             WHERE ?1 IS NULL OR suite = ?1 ORDER BY suite, test_id",
        )?;
        let rows = stmt.query_map(params![suite], |r| {
            Ok(QuarantineRow {
                suite: r.get(0)?,
                test_id: r.get(1)?,
                reason: r.get(2)?,
                added_by: r.get(3)?,
                added_ms: r.get::<_, i64>(4)? as u64,
                automatic: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks the tests of `run` that are quarantined in `suite` now; returns their indexes.
    pub fn mark_quarantined(&mut self, run: RunId, suite: &str) -> Result<Vec<u32>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE tests SET quarantined = 1 WHERE run_id = ?1
               AND test_id IN (SELECT test_id FROM quarantine WHERE suite = ?2)
             RETURNING idx",
        )?;
        let rows = stmt.query_map(params![run.to_string(), suite], |r| r.get::<_, u32>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The flakiness of one test.
    pub fn flakiness_of(&self, suite: &str, test_id: &str) -> Result<Option<FlakinessRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT test_id, runs, failures, flakes, flips, last_flake_ms, last_run_ms
                 FROM flakiness WHERE suite = ?1 AND test_id = ?2",
                params![suite, test_id],
                flakiness_row,
            )
            .optional()
            .map_err(Into::into)
    }

    /// Tests of `suite` that flaked at or after `since_ms`.
    pub fn flaky_tests(
        &self,
        suite: &str,
        since_ms: u64,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT test_id FROM flakiness WHERE suite = ?1 AND flakes > 0 AND last_flake_ms >= ?2",
        )?;
        let rows = stmt.query_map(params![suite, since_ms as i64], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The flakiest tests of `suite` (by flaky results over counted runs, then flips), at most
    /// `limit`, among those with at least one flake or flip.
    pub fn flakiness(&self, suite: &str, limit: u32) -> Result<Vec<FlakinessRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT test_id, runs, failures, flakes, flips, last_flake_ms, last_run_ms
             FROM flakiness WHERE suite = ?1 AND (flakes > 0 OR flips > 0)
             ORDER BY CAST(flakes AS REAL) / runs DESC, flips DESC, test_id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![suite, limit], flakiness_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The duration and failure history of every test of `suite` seen so far.
    pub fn history(&self, suite: &str) -> Result<HashMap<String, History>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT test_id, estimate_ms, samples, last_failed_ms FROM durations WHERE suite = ?1",
        )?;
        let rows = stmt.query_map([suite], |r| {
            Ok((
                r.get::<_, String>(0)?,
                History {
                    estimate_ms: r.get(1)?,
                    samples: r.get(2)?,
                    last_failed_ms: r.get::<_, i64>(3)? as u64,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Replaces the history of some tests (imports, benchmarks).
    pub fn put_history(&mut self, suite: &str, entries: &[(String, History)]) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        {
            let mut hist = tx.prepare_cached(UPSERT_HISTORY)?;
            for (id, h) in entries {
                hist.execute(params![
                    suite,
                    id,
                    h.estimate_ms,
                    h.samples,
                    h.last_failed_ms as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn insert_attempt(&mut self, a: &AttemptRow) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO attempts (id, run_id, worker_id, shard_id, discover, tests, started_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                a.id.to_string(),
                a.run.to_string(),
                a.worker.to_string(),
                a.shard.to_string(),
                a.discover,
                to_json(&a.tests),
                a.started_ms as i64
            ])?;
        Ok(())
    }

    pub fn delete_attempt(&mut self, id: AttemptId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM attempts WHERE id = ?1")?
            .execute([id.to_string()])?;
        Ok(())
    }

    pub fn attempts(&self) -> Result<Vec<AttemptRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, run_id, worker_id, shard_id, discover, tests, started_ms FROM attempts")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, bool>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, run, worker, shard, discover, tests, started) = row?;
            out.push(AttemptRow {
                id: parse_id("attempts", &id)?,
                run: parse_id("attempts", &run)?,
                worker: parse_id("attempts", &worker)?,
                shard: parse_id("attempts", &shard)?,
                discover,
                tests: from_json("attempts", &tests)?,
                started_ms: started as u64,
            });
        }
        Ok(out)
    }

    pub fn upsert_worker(&mut self, w: &WorkerRow) -> Result<(), StoreError> {
        let runners: Vec<(String, String)> = w
            .runners
            .iter()
            .map(|(n, k)| (n.clone(), k.as_str().to_owned()))
            .collect();
        self.conn.execute(
            "INSERT INTO workers (id, name, slots, labels, runners, registered_ms, last_seen_ms, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,
                                           state = excluded.state",
            params![
                w.id.to_string(),
                w.name,
                w.slots,
                to_json(&w.labels),
                to_json(&runners),
                w.registered_ms as i64,
                w.last_seen_ms as i64,
                w.state
            ],
        )?;
        Ok(())
    }

    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, slots, labels, runners, registered_ms, last_seen_ms, state
             FROM workers ORDER BY registered_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, slots, labels, runners, reg, seen, state) = row?;
            let runners: Vec<(String, String)> = from_json("workers", &runners)?;
            let runners = runners
                .into_iter()
                .map(|(n, k)| {
                    k.parse().map(|k| (n, k)).map_err(|reason| StoreError::Corrupt {
                        table: "workers",
                        reason,
                    })
                })
                .collect::<Result<_, _>>()?;
            out.push(WorkerRow {
                id: parse_id("workers", &id)?,
                name,
                slots,
                labels: from_json("workers", &labels)?,
                runners,
                registered_ms: reg as u64,
                last_seen_ms: seen as u64,
                state,
            });
        }
        Ok(out)
    }

    pub fn run(&self, id: RunId) -> Result<Option<RunRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!("{RUN_SELECT} WHERE id = ?1"))?;
        let raw = stmt.query_row([id.to_string()], raw_run).optional()?;
        raw.map(RawRun::parse).transpose()
    }

    /// Runs newest first.
    pub fn runs(&self, limit: u32) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RUN_SELECT} ORDER BY created_ms DESC, id DESC LIMIT ?1"
        ))?;
        let raws = stmt.query_map([limit], raw_run)?.collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(RawRun::parse).collect()
    }

    /// Runs that have not reached a terminal status, oldest first.
    pub fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "{RUN_SELECT} WHERE status IN ('queued', 'running') ORDER BY created_ms, id"
        ))?;
        let raws = stmt.query_map([], raw_run)?.collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(RawRun::parse).collect()
    }

    /// A run's tests in submission order, with the outcome of those already counted.
    pub fn tests(&self, run: RunId) -> Result<Vec<StoredTest>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT test_id, outcome, retry, quarantined FROM tests WHERE run_id = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map([run.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (test_id, outcome, retry, quarantined) = row?;
            let retry = if retry.is_empty() {
                RetryState::default()
            } else {
                from_json("tests", &retry)?
            };
            let outcome = outcome
                .map(|o| {
                    o.parse().map_err(|reason| StoreError::Corrupt {
                        table: "tests",
                        reason,
                    })
                })
                .transpose()?;
            out.push(StoredTest {
                test_id,
                outcome,
                retry,
                quarantined,
            });
        }
        Ok(out)
    }

    /// Counts of a run's tests per outcome (`None` is "no result yet").
    pub fn outcome_counts(&self, run: RunId) -> Result<Vec<(Option<Outcome>, u32)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT outcome, COUNT(*) FROM tests WHERE run_id = ?1 GROUP BY outcome")?;
        let rows = stmt.query_map([run.to_string()], |r| {
            Ok((r.get::<_, Option<String>>(0)?, r.get::<_, u32>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (o, n) = row?;
            let o = o
                .map(|o| {
                    o.parse().map_err(|reason| StoreError::Corrupt {
                        table: "tests",
                        reason,
                    })
                })
                .transpose()?;
            out.push((o, n));
        }
        Ok(out)
    }

    /// Every test of a run with its result, in submission order.
    pub fn results(&self, run: RunId) -> Result<Vec<pb::TestResult>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT test_id, outcome, duration_ms, attempts, worker, detail, output, quarantined
             FROM tests WHERE run_id = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map([run.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, bool>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (test_id, outcome, duration_ms, attempts, worker, detail, output, quarantined) = row?;
            let outcome = match outcome {
                Some(o) => o
                    .parse::<Outcome>()
                    .map_err(|reason| StoreError::Corrupt {
                        table: "tests",
                        reason,
                    })?
                    .to_wire(),
                None => pb::Outcome::Unspecified as i32,
            };
            out.push(pb::TestResult {
                test_id,
                outcome,
                duration_ms: duration_ms as u64,
                attempts,
                worker,
                output,
                detail,
                quarantined,
            });
        }
        Ok(out)
    }
}

/// One counted result into the flakiness history: ?3 red, ?4 flaky, ?5 green (0/1), ?6 the
/// time of the flake (0 if none), ?7 now. A flaky result is a flip of its own; a run whose
/// colour differs from the last one is another.
const UPSERT_FLAKINESS: &str = "INSERT INTO flakiness
        (suite, test_id, runs, failures, flakes, flips, last_green, last_flake_ms, last_run_ms)
     VALUES (?1, ?2, 1, ?3, ?4, ?4, ?5, ?6, ?7)
     ON CONFLICT(suite, test_id) DO UPDATE SET
         runs = runs + 1,
         failures = failures + excluded.failures,
         flakes = flakes + excluded.flakes,
         flips = flips + excluded.flips + (last_green != excluded.last_green),
         last_green = excluded.last_green,
         last_flake_ms = max(last_flake_ms, excluded.last_flake_ms),
         last_run_ms = excluded.last_run_ms";

const UPSERT_HISTORY: &str = "INSERT INTO durations (suite, test_id, estimate_ms, samples, last_failed_ms)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT(suite, test_id) DO UPDATE SET estimate_ms = excluded.estimate_ms,
         samples = excluded.samples, last_failed_ms = excluded.last_failed_ms";

const RUN_SELECT: &str = "SELECT id, suite, revision, requested_by, runner, labels, policy, priority,
        discover, status, message, created_ms, started_ms, finished_ms, shards FROM runs";

struct RawRun {
    id: String,
    suite: String,
    revision: String,
    requested_by: String,
    runner: String,
    labels: String,
    policy: String,
    priority: i32,
    discover: bool,
    status: String,
    message: String,
    created_ms: i64,
    started_ms: i64,
    finished_ms: i64,
    shards: u32,
}

/// A `flakiness` row selected as test_id, runs, failures, flakes, flips, last_flake_ms,
/// last_run_ms.
fn flakiness_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FlakinessRow> {
    Ok(FlakinessRow {
        test_id: r.get(0)?,
        runs: r.get(1)?,
        failures: r.get(2)?,
        flakes: r.get(3)?,
        flips: r.get(4)?,
        last_flake_ms: r.get::<_, i64>(5)? as u64,
        last_run_ms: r.get::<_, i64>(6)? as u64,
    })
}

fn raw_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: r.get(0)?,
        suite: r.get(1)?,
        revision: r.get(2)?,
        requested_by: r.get(3)?,
        runner: r.get(4)?,
        labels: r.get(5)?,
        policy: r.get(6)?,
        priority: r.get(7)?,
        discover: r.get(8)?,
        status: r.get(9)?,
        message: r.get(10)?,
        created_ms: r.get(11)?,
        started_ms: r.get(12)?,
        finished_ms: r.get(13)?,
        shards: r.get(14)?,
    })
}

impl RawRun {
    fn parse(self) -> Result<RunRow, StoreError> {
        Ok(RunRow {
            id: parse_id("runs", &self.id)?,
            suite: self.suite,
            revision: self.revision,
            requested_by: self.requested_by,
            runner: self.runner,
            labels: from_json("runs", &self.labels)?,
            policy: from_json("runs", &self.policy)?,
            priority: self.priority,
            discover: self.discover,
            status: self.status.parse().map_err(|reason| StoreError::Corrupt {
                table: "runs",
                reason,
            })?,
            message: self.message,
            created_ms: self.created_ms as u64,
            started_ms: self.started_ms as u64,
            finished_ms: self.finished_ms as u64,
            shards: self.shards,
        })
    }
}

fn insert_tests(
    tx: &rusqlite::Savepoint<'_>,
    run: RunId,
    first_idx: u32,
    tests: &[String],
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached("INSERT INTO tests (run_id, idx, test_id) VALUES (?1, ?2, ?3)")?;
    let run = run.to_string();
    for (i, t) in tests.iter().enumerate() {
        stmt.execute(params![run, first_idx + i as u32, t])?;
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data always serializes")
}

fn from_json<T: serde::de::DeserializeOwned>(table: &'static str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        table,
        reason: format!("bad JSON {s:?}: {e}"),
    })
}

fn parse_id<T: std::str::FromStr>(table: &'static str, s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt {
        table,
        reason: format!("bad id '{s}'"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_row() -> RunRow {
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
        }
    }

    #[test]
    fn results_are_counted_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let run = run_row();
        {
            let mut s = Store::open(&path).unwrap();
            s.insert_run(&run, &["a".into(), "b".into()]).unwrap();
            let r = ResultRow {
                idx: 1,
                test_id: "b".into(),
                history: History {
                    estimate_ms: 5.0,
                    samples: 1,
                    last_failed_ms: 0,
                },
                outcome: Outcome::Failed,
                duration_ms: 5,
                attempts: 1,
                worker: "w".into(),
                detail: "exit status 1".into(),
                output: "boom".into(),
                at_ms: 10,
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
        let s = Store::open(&path).unwrap();
        let tests = s.tests(run.id).unwrap();
        assert_eq!(tests.len(), 2);
        assert_eq!(tests[0].outcome, None);
        assert_eq!(tests[1].outcome, Some(Outcome::Failed));
        let results = s.results(run.id).unwrap();
        assert_eq!(results[1].output, "boom");
        assert_eq!(s.run(run.id).unwrap().unwrap().suite, "unit");
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

    #[test]
    fn flakiness_counts_flakes_and_flips_per_suite() {
        let mut s = Store::open(Path::new(":memory:")).unwrap();
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
            s.insert_run(&run, &["t".into(), "steady".into()]).unwrap();
            let row = |idx: u32, id: &str, outcome: Outcome| ResultRow {
                idx,
                test_id: id.into(),
                history: History::default(),
                outcome,
                duration_ms: 1,
                attempts: 1,
                worker: "w".into(),
                detail: String::new(),
                output: String::new(),
                at_ms: 100 + i as u64,
            };
            let rows = [row(0, "t", *o), row(1, "steady", Outcome::Passed)];
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

    #[test]
    fn a_failed_call_inside_a_batch_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let good = run_row();
        let bad = run_row();
        {
            let mut s = Store::open(&path).unwrap();
            s.begin_batch().unwrap();
            s.insert_run(&good, &["a".into()]).unwrap();
            assert!(s.insert_run(&bad, &["x".into(), "x".into()]).is_err());
            s.commit_batch().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(s.run(good.id).unwrap().is_some());
        assert!(s.run(bad.id).unwrap().is_none());
    }

    #[test]
    fn a_duplicate_test_id_is_refused_by_the_schema_too() {
        let mut s = Store::open(Path::new(":memory:")).unwrap();
        let run = run_row();
        assert!(s.insert_run(&run, &["a".into(), "a".into()]).is_err());
        assert!(
            s.run(run.id).unwrap().is_none(),
            "the failed insert left nothing behind"
        );
    }
}
