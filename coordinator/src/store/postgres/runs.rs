//! Runs, their tests and counted results, rollout requests, and the per-test history.
//!
//! A batch of results is one statement: the tests it counts, the duration history and the
//! flakiness they update go in together (data-modifying `WITH` clauses), so a report costs one
//! round trip to the server whatever its size.

use shardgate_common::RunId;
use tokio_postgres::Row;

use super::PgStore;
use super::conn::{Conn, get, int, int32, text};
use crate::scheduler::History;
use crate::store::codec::{from_json, parse, parse_outcome, to_json};
use crate::store::{
    FlakinessRow, HistoryStore, ResultRow, RetryState, RunRow, RunStore, StoreResult, StoredTest,
};

/// The columns [`run_row`] reads, in order.
pub(super) const RUN_COLUMNS: &str = "runs.id, runs.suite, runs.revision, runs.requested_by, runs.runner,
        runs.labels, runs.policy, runs.priority, runs.discover, runs.status, runs.message,
        runs.created_ms, runs.started_ms, runs.finished_ms, runs.shards, runs.tested_commit";

/// A run from the first 16 columns of a row selected with [`RUN_COLUMNS`].
pub(super) fn run_row(r: &Row) -> StoreResult<RunRow> {
    Ok(RunRow {
        id: parse("runs", get::<&str>(r, 0)?)?,
        suite: get(r, 1)?,
        revision: get(r, 2)?,
        requested_by: get(r, 3)?,
        runner: get(r, 4)?,
        labels: from_json("runs", get::<&str>(r, 5)?)?,
        policy: from_json("runs", get::<&str>(r, 6)?)?,
        priority: get::<i64>(r, 7)? as i32,
        discover: get(r, 8)?,
        status: parse("runs", get::<&str>(r, 9)?)?,
        message: get(r, 10)?,
        created_ms: int(r, 11)?,
        started_ms: int(r, 12)?,
        finished_ms: int(r, 13)?,
        shards: int32(r, 14)?,
        tested_commit: get(r, 15)?,
    })
}

pub(super) const FLAKINESS_COLUMNS: &str =
    "test_id, runs, failures, flakes, flips, last_flake_ms, last_run_ms";

pub(super) fn flakiness_row(r: &Row) -> StoreResult<FlakinessRow> {
    Ok(FlakinessRow {
        test_id: get(r, 0)?,
        runs: int32(r, 1)?,
        failures: int32(r, 2)?,
        flakes: int32(r, 3)?,
        flips: int32(r, 4)?,
        last_flake_ms: int(r, 5)?,
        last_run_ms: int(r, 6)?,
    })
}

fn insert_tests(c: &mut Conn, run: RunId, first_idx: u32, tests: &[String]) -> StoreResult<()> {
    if tests.is_empty() {
        return Ok(());
    }
    let tests: Vec<&str> = tests.iter().map(String::as_str).collect();
    c.execute(
        "INSERT INTO tests (run_id, idx, test_id)
         SELECT $1, $2 + n - 1, t FROM unnest($3::text[]) WITH ORDINALITY AS u(t, n)",
        &[&run.to_string(), &i64::from(first_idx), &tests],
    )?;
    Ok(())
}

/// Counts the results that find their test still open, and feeds the suite's duration
/// history and flakiness from exactly those. A flaky result is a flip of its own; a run whose
/// colour differs from the test's last one is another. Skipped tests and infrastructure
/// errors say nothing about the test and leave its flakiness alone.
const RECORD_RESULTS: &str = "
WITH input AS (
    SELECT * FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                         $8::text[], $9::text[], $10::text[], $11::float8[], $12::bigint[],
                         $13::bigint[], $14::bigint[])
        AS i(idx, test_id, outcome, duration_ms, attempts, worker, detail, output,
             estimate_ms, samples, last_failed_ms, at_ms)
), counted AS (
    UPDATE tests t SET outcome = i.outcome, duration_ms = i.duration_ms, attempts = i.attempts,
                       worker = i.worker, detail = i.detail, output = i.output
    FROM input i
    WHERE t.run_id = $1 AND t.idx = i.idx AND t.outcome IS NULL
    RETURNING i.test_id, i.outcome, i.estimate_ms, i.samples, i.last_failed_ms, i.at_ms
), history AS (
    INSERT INTO durations (suite, test_id, estimate_ms, samples, last_failed_ms)
    SELECT $2, test_id, estimate_ms, samples, last_failed_ms FROM counted
    ON CONFLICT (suite, test_id) DO UPDATE SET estimate_ms = EXCLUDED.estimate_ms,
        samples = EXCLUDED.samples, last_failed_ms = EXCLUDED.last_failed_ms
), verdicts AS (
    SELECT test_id, at_ms,
           (outcome IN ('failed', 'timed_out'))::int AS red,
           (outcome = 'flaky')::int AS flake,
           outcome IN ('passed', 'flaky') AS green
    FROM counted WHERE outcome IN ('passed', 'flaky', 'failed', 'timed_out')
), flakiness AS (
    INSERT INTO flakiness AS f
        (suite, test_id, runs, failures, flakes, flips, last_green, last_flake_ms, last_run_ms)
    SELECT $2, test_id, 1, red, flake, flake, green,
           CASE WHEN flake = 1 THEN at_ms ELSE 0 END, at_ms
    FROM verdicts
    ON CONFLICT (suite, test_id) DO UPDATE SET
        runs = f.runs + 1,
        failures = f.failures + EXCLUDED.failures,
        flakes = f.flakes + EXCLUDED.flakes,
        flips = f.flips + EXCLUDED.flips + (f.last_green <> EXCLUDED.last_green)::int,
        last_green = EXCLUDED.last_green,
        last_flake_ms = GREATEST(f.last_flake_ms, EXCLUDED.last_flake_ms),
        last_run_ms = EXCLUDED.last_run_ms
)
SELECT count(*) FROM counted";

impl RunStore for PgStore {
    fn insert_run(&mut self, run: &RunRow, tests: &[String], staged: bool) -> StoreResult<()> {
        // The tests go in the same level as the run row: a run is never half written.
        self.conn.get_mut().atomic(|c| {
            c.execute(
                "INSERT INTO runs (id, suite, revision, requested_by, runner, labels, policy, priority,
                                   discover, status, message, created_ms, started_ms, finished_ms, staged)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                &[
                    &run.id.to_string(),
                    &run.suite,
                    &run.revision,
                    &run.requested_by,
                    &run.runner,
                    &to_json(&run.labels),
                    &to_json(&run.policy),
                    &i64::from(run.priority),
                    &run.discover,
                    &run.status.as_str(),
                    &text(&run.message),
                    &(run.created_ms as i64),
                    &(run.started_ms as i64),
                    &(run.finished_ms as i64),
                    &staged,
                ],
            )?;
            insert_tests(c, run.id, 0, tests)
        })
    }

    fn add_tests(&mut self, run: RunId, first_idx: u32, tests: &[String]) -> StoreResult<()> {
        self.conn
            .get_mut()
            .atomic(|c| insert_tests(c, run, first_idx, tests))
    }

    fn unstage_run(&mut self, run: RunId) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "UPDATE runs SET staged = FALSE WHERE id = $1",
            &[&run.to_string()],
        )?;
        Ok(())
    }

    fn delete_staged_runs(&mut self) -> StoreResult<u32> {
        self.conn.get_mut().atomic(|c| {
            c.execute(
                "DELETE FROM tests WHERE run_id IN (SELECT id FROM runs WHERE staged)",
                &[],
            )?;
            c.execute(
                "DELETE FROM rollout_requests WHERE run_id IN (SELECT id FROM runs WHERE staged)",
                &[],
            )?;
            Ok(c.execute("DELETE FROM runs WHERE staged", &[])? as u32)
        })
    }

    fn prune_output(&mut self, before_ms: u64, limit: u32) -> StoreResult<u32> {
        let n = self.conn.get_mut().write_execute(
            "UPDATE tests SET output = '' WHERE (run_id, idx) IN (
                 SELECT t.run_id, t.idx FROM tests t JOIN runs r ON r.id = t.run_id
                 WHERE r.finished_ms > 0 AND r.finished_ms < $1 AND t.output <> ''
                 LIMIT $2)",
            &[&(before_ms as i64), &i64::from(limit)],
        )?;
        Ok(n as u32)
    }

    fn update_run_status(&mut self, row: &RunRow) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "UPDATE runs SET status = $2, message = $3, started_ms = $4, finished_ms = $5, shards = $6
             WHERE id = $1",
            &[
                &row.id.to_string(),
                &row.status.as_str(),
                &text(&row.message),
                &(row.started_ms as i64),
                &(row.finished_ms as i64),
                &i64::from(row.shards),
            ],
        )?;
        Ok(())
    }

    fn set_tested_commit(&mut self, run: RunId, commit: &str) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "UPDATE runs SET tested_commit = $2 WHERE id = $1",
            &[&run.to_string(), &text(commit)],
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
        let run = run.to_string();
        self.conn.get_mut().atomic(|c| {
            if !retry.is_empty() {
                let idx: Vec<i64> = retry.iter().map(|(i, _)| i64::from(*i)).collect();
                let state: Vec<String> = retry
                    .iter()
                    .map(|(_, s)| text(&to_json(s)).into_owned())
                    .collect();
                c.execute(
                    "UPDATE tests SET retry = r.retry
                     FROM unnest($2::bigint[], $3::text[]) AS r(idx, retry)
                     WHERE tests.run_id = $1 AND tests.idx = r.idx AND tests.outcome IS NULL",
                    &[&run, &idx, &state],
                )?;
            }
            if results.is_empty() {
                return Ok(0);
            }
            let col = |f: &dyn Fn(&ResultRow) -> i64| results.iter().map(f).collect::<Vec<i64>>();
            let txt = |f: &dyn Fn(&ResultRow) -> &str| {
                results
                    .iter()
                    .map(|r| text(f(r)).into_owned())
                    .collect::<Vec<String>>()
            };
            let estimates: Vec<f64> = results.iter().map(|r| r.history.estimate_ms).collect();
            let row = c.query_opt(
                RECORD_RESULTS,
                &[
                    &run,
                    &suite,
                    &col(&|r| i64::from(r.idx)),
                    &txt(&|r| &r.test_id),
                    &txt(&|r| r.outcome.as_str()),
                    &col(&|r| r.duration_ms as i64),
                    &col(&|r| i64::from(r.attempts)),
                    &txt(&|r| &r.worker),
                    &txt(&|r| &r.detail),
                    &txt(&|r| &r.output),
                    &estimates,
                    &col(&|r| i64::from(r.history.samples)),
                    &col(&|r| r.history.last_failed_ms as i64),
                    &col(&|r| r.at_ms as i64),
                ],
            )?;
            Ok(row.map(|r| int(&r, 0)).transpose()?.unwrap_or(0) as usize)
        })
    }

    fn mark_quarantined(&mut self, run: RunId, suite: &str) -> StoreResult<Vec<u32>> {
        let rows = self.conn.get_mut().write_query(
            "UPDATE tests SET quarantined = TRUE WHERE run_id = $1
               AND test_id IN (SELECT test_id FROM quarantine WHERE suite = $2)
             RETURNING idx",
            &[&run.to_string(), &suite],
        )?;
        rows.iter().map(|r| int32(r, 0)).collect()
    }

    fn add_rollout_request(&mut self, run: RunId, authors: &[String]) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "INSERT INTO rollout_requests (run_id, authors) VALUES ($1, $2)",
            &[&run.to_string(), &text(&to_json(&authors))],
        )?;
        Ok(())
    }

    fn rollout_request(&self, run: RunId) -> StoreResult<Option<Vec<String>>> {
        let row = self.conn.borrow_mut().query_opt(
            "SELECT authors FROM rollout_requests WHERE run_id = $1",
            &[&run.to_string()],
        )?;
        row.map(|r| from_json("rollout_requests", get::<&str>(&r, 0)?))
            .transpose()
    }

    fn unfinished_runs(&self) -> StoreResult<Vec<RunRow>> {
        let rows = self.conn.borrow_mut().query(
            &format!(
                "SELECT {RUN_COLUMNS} FROM runs
                 WHERE status IN ('queued', 'running') AND NOT staged ORDER BY created_ms, id"
            ),
            &[],
        )?;
        rows.iter().map(run_row).collect()
    }

    fn tests(&self, run: RunId) -> StoreResult<Vec<StoredTest>> {
        let rows = self.conn.borrow_mut().query(
            "SELECT test_id, outcome, retry, quarantined FROM tests WHERE run_id = $1 ORDER BY idx",
            &[&run.to_string()],
        )?;
        rows.iter()
            .map(|r| {
                let retry: &str = get(r, 2)?;
                Ok(StoredTest {
                    test_id: get(r, 0)?,
                    outcome: parse_outcome(get(r, 1)?)?,
                    retry: if retry.is_empty() {
                        RetryState::default()
                    } else {
                        from_json("tests", retry)?
                    },
                    quarantined: get(r, 3)?,
                })
            })
            .collect()
    }
}

impl HistoryStore for PgStore {
    fn put_history(&mut self, suite: &str, entries: &[(String, History)]) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let est: Vec<f64> = entries.iter().map(|(_, h)| h.estimate_ms).collect();
        let samples: Vec<i64> = entries.iter().map(|(_, h)| i64::from(h.samples)).collect();
        let failed: Vec<i64> = entries.iter().map(|(_, h)| h.last_failed_ms as i64).collect();
        self.conn.get_mut().write_execute(
            "INSERT INTO durations (suite, test_id, estimate_ms, samples, last_failed_ms)
             SELECT $1, * FROM unnest($2::text[], $3::float8[], $4::bigint[], $5::bigint[])
             ON CONFLICT (suite, test_id) DO UPDATE SET estimate_ms = EXCLUDED.estimate_ms,
                 samples = EXCLUDED.samples, last_failed_ms = EXCLUDED.last_failed_ms",
            &[&suite, &ids, &est, &samples, &failed],
        )?;
        Ok(())
    }

    fn flakiness_of(&self, suite: &str, test_id: &str) -> StoreResult<Option<FlakinessRow>> {
        self.conn
            .borrow_mut()
            .query_opt(
                &format!("SELECT {FLAKINESS_COLUMNS} FROM flakiness WHERE suite = $1 AND test_id = $2"),
                &[&suite, &test_id],
            )?
            .map(|r| flakiness_row(&r))
            .transpose()
    }
}
