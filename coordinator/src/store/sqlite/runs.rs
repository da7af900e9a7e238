//! Runs, their tests and counted results, and rollout requests.

use rusqlite::{OptionalExtension, params};
use shardgate_common::{Outcome, RunId};

use super::{SqliteStore, from_json, parse, to_json};
use crate::store::codec::parse_outcome;
use crate::store::{ResultRow, RetryState, RunRow, RunStore, StoreResult, StoredTest};

/// The columns [`run_row`] reads, in order.
pub(super) const RUN_COLUMNS: &str = "runs.id, runs.suite, runs.revision, runs.requested_by, runs.runner,
        runs.labels, runs.policy, runs.priority, runs.discover, runs.status, runs.message,
        runs.created_ms, runs.started_ms, runs.finished_ms, runs.shards, runs.tested_commit";

/// A run from the first 16 columns of a row selected with [`RUN_COLUMNS`]. Parsing happens
/// outside rusqlite's closure so that a corrupt value names its table.
pub(super) struct RawRun {
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
    tested_commit: String,
}

pub(super) fn raw_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
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
        tested_commit: r.get(15)?,
    })
}

impl RawRun {
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn parse(self) -> StoreResult<RunRow> {
        Ok(RunRow {
            id: parse("runs", &self.id)?,
            suite: self.suite,
            revision: self.revision,
            requested_by: self.requested_by,
            runner: self.runner,
            labels: from_json("runs", &self.labels)?,
            policy: from_json("runs", &self.policy)?,
            priority: self.priority,
            discover: self.discover,
            status: parse("runs", &self.status)?,
            message: self.message,
            created_ms: self.created_ms as u64,
            started_ms: self.started_ms as u64,
            finished_ms: self.finished_ms as u64,
            shards: self.shards,
            tested_commit: self.tested_commit,
        })
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

/// Inserts `tests` at indexes `first_idx..` of `run`.
fn insert_tests(
    conn: &rusqlite::Connection,
    run: RunId,
    first_idx: u32,
    tests: &[String],
) -> StoreResult<()> {
    let mut stmt = conn.prepare_cached("INSERT INTO tests (run_id, idx, test_id) VALUES (?1, ?2, ?3)")?;
    let run = run.to_string();
    for (i, t) in tests.iter().enumerate() {
        stmt.execute(params![run, first_idx + i as u32, t])?;
    }
    Ok(())
}

impl RunStore for SqliteStore {
    fn insert_run(&mut self, run: &RunRow, tests: &[String], staged: bool) -> StoreResult<()> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "INSERT INTO runs (id, suite, revision, requested_by, runner, labels, policy, priority,
                               discover, status, message, created_ms, started_ms, finished_ms, staged)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
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
                staged,
            ],
        )?;
        // The tests go in the same savepoint as the run row: a run is never half written.
        insert_tests(&tx, run.id, 0, tests)?;
        tx.commit()?;
        Ok(())
    }

    fn add_tests(&mut self, run: RunId, first_idx: u32, tests: &[String]) -> StoreResult<()> {
        let tx = self.conn.savepoint()?;
        insert_tests(&tx, run, first_idx, tests)?;
        tx.commit()?;
        Ok(())
    }

    fn unstage_run(&mut self, run: RunId) -> StoreResult<()> {
        self.conn
            .execute("UPDATE runs SET staged = 0 WHERE id = ?1", [run.to_string()])?;
        Ok(())
    }

    fn delete_staged_runs(&mut self) -> StoreResult<u32> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "DELETE FROM tests WHERE run_id IN (SELECT id FROM runs WHERE staged = 1)",
            [],
        )?;
        tx.execute(
            "DELETE FROM rollout_requests WHERE run_id IN (SELECT id FROM runs WHERE staged = 1)",
            [],
        )?;
        let n = tx.execute("DELETE FROM runs WHERE staged = 1", [])?;
        tx.commit()?;
        Ok(n as u32)
    }

    fn prune_output(&mut self, before_ms: u64, limit: u32) -> StoreResult<u32> {
        let n = self.conn.execute(
            "UPDATE tests SET output = '' WHERE (run_id, idx) IN (
                 SELECT t.run_id, t.idx FROM tests t JOIN runs r ON r.id = t.run_id
                 WHERE r.finished_ms > 0 AND r.finished_ms < ?1 AND t.output != ''
                 LIMIT ?2)",
            rusqlite::params![before_ms as i64, limit],
        )?;
        Ok(n as u32)
    }

    fn update_run_status(&mut self, row: &RunRow) -> StoreResult<()> {
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

    fn set_tested_commit(&mut self, run: RunId, commit: &str) -> StoreResult<()> {
        self.conn.execute(
            "UPDATE runs SET tested_commit = ?2 WHERE id = ?1",
            params![run.to_string(), commit],
        )?;
        Ok(())
    }

    fn record_results(
        &mut self,
        run: RunId,
        suite: &str,
        results: &[ResultRow],
        retry: &[(u32, &RetryState)],
    ) -> StoreResult<usize> {
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
            let mut hist = tx.prepare_cached(super::history::UPSERT_HISTORY)?;
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

    fn mark_quarantined(&mut self, run: RunId, suite: &str) -> StoreResult<Vec<u32>> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE tests SET quarantined = 1 WHERE run_id = ?1
               AND test_id IN (SELECT test_id FROM quarantine WHERE suite = ?2)
             RETURNING idx",
        )?;
        let rows = stmt.query_map(params![run.to_string(), suite], |r| r.get::<_, u32>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_rollout_request(&mut self, run: RunId, authors: &[String]) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO rollout_requests (run_id, authors) VALUES (?1, ?2)",
            params![run.to_string(), to_json(&authors)],
        )?;
        Ok(())
    }

    fn rollout_request(&self, run: RunId) -> StoreResult<Option<Vec<String>>> {
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

    fn unfinished_runs(&self) -> StoreResult<Vec<RunRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs
             WHERE status IN ('queued', 'running') AND staged = 0 ORDER BY created_ms, id"
        ))?;
        let raws = stmt.query_map([], raw_run)?.collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(RawRun::parse).collect()
    }

    fn tests(&self, run: RunId) -> StoreResult<Vec<StoredTest>> {
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
            out.push(StoredTest {
                test_id,
                outcome: parse_outcome(outcome)?,
                retry,
                quarantined,
            });
        }
        Ok(out)
    }
}
