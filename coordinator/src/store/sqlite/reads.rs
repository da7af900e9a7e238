//! The read side's queries, one per page, and the pool of read-only connections that serves
//! them off the scheduler thread. In WAL mode a reader sees the last committed transaction and
//! never blocks the writer.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, params};
use shardgate_common::{Outcome, RunId, pb};

use super::gate::query_deploys;
use super::history::{FLAKINESS_COLUMNS, flakiness_row};
use super::runs::{RUN_COLUMNS, raw_run};
use super::{WithConn, open_err};
use crate::scheduler::History;
use crate::store::codec::parse_outcome;
use crate::store::{
    DeployRow, FlakinessRow, OutcomeCounts, QuarantineRow, Reads, RunFilter, RunRow, StoreResult,
};

/// Read-only connections to one database, opened on demand and kept for reuse.
pub struct SqliteReader {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Most idle connections kept.
    keep: usize,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteReader {
    /// A reader of the database at `path` (which the writer has created), keeping up to `keep`
    /// connections open between reads.
    pub fn open(path: &Path, keep: usize) -> StoreResult<Self> {
        let reader = Self {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            keep,
        };
        // Fail now, not on the first dashboard request, if it cannot be read.
        reader.with_conn(|_| Ok(()))?;
        Ok(reader)
    }

    fn connect(&self) -> StoreResult<Connection> {
        let shown = self.path.display().to_string();
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err(&shown))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err(&shown))?;
        Ok(conn)
    }
}

impl WithConn for SqliteReader {
    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => self.connect()?,
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep {
            idle.push(conn);
        }
        out
    }
}

impl<T: WithConn> Reads for T {
    fn runs_page(&self, limit: u32) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
        self.with_conn(|c| {
            runs_with_counts(
                c,
                "SELECT * FROM runs WHERE staged = 0 ORDER BY created_ms DESC, id DESC LIMIT ?1",
                params![limit],
            )
        })
    }

    fn runs_search(&self, f: &RunFilter) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
        self.with_conn(|c| {
            runs_with_counts(
                c,
                "SELECT * FROM runs WHERE staged = 0
                   AND (?1 IS NULL OR suite = ?1)
                   AND (?2 IS NULL OR status = ?2)
                   AND (?3 IS NULL OR requested_by = ?3)
                   AND (?4 IS NULL OR created_ms < ?4)
                 ORDER BY created_ms DESC, id DESC LIMIT ?5",
                params![
                    f.suite,
                    f.status,
                    f.requested_by,
                    f.before_ms.map(|b| b as i64),
                    f.limit
                ],
            )
        })
    }

    fn runs_by_status(&self) -> StoreResult<Vec<(String, u64)>> {
        self.with_conn(|c| {
            let mut stmt =
                c.prepare_cached("SELECT status, COUNT(*) FROM runs WHERE staged = 0 GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn shard_log(&self, run: RunId) -> StoreResult<Vec<pb::ShardProgress>> {
        self.with_conn(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT attempt_id, run_id, shard_id, worker, tests, done, started_ms, ended_ms, state,
                        estimated_ms
                 FROM shard_log WHERE run_id = ?1 ORDER BY started_ms, attempt_id",
            )?;
            let rows = stmt.query_map([run.to_string()], |r| {
                Ok(pb::ShardProgress {
                    attempt_id: r.get(0)?,
                    run_id: r.get(1)?,
                    shard_id: r.get(2)?,
                    worker: r.get(3)?,
                    tests: r.get(4)?,
                    done: r.get(5)?,
                    started_at_ms: r.get::<_, i64>(6)? as u64,
                    ended_at_ms: r.get::<_, i64>(7)? as u64,
                    state: r.get(8)?,
                    estimated_ms: r.get::<_, i64>(9)? as u64,
                    current_test: String::new(),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn run_with_counts(&self, id: RunId) -> StoreResult<Option<(RunRow, OutcomeCounts)>> {
        self.with_conn(|c| {
            Ok(runs_with_counts(
                c,
                "SELECT * FROM runs WHERE id = ?1 AND staged = 0",
                params![id.to_string()],
            )?
            .pop())
        })
    }

    fn results(&self, run: RunId) -> StoreResult<Vec<pb::TestResult>> {
        self.with_conn(|c| results(c, run))
    }

    fn notable_results(&self, run: RunId, limit: u32) -> StoreResult<Vec<pb::TestResult>> {
        self.with_conn(|c| {
            results_where(
                c,
                run,
                "AND outcome IS NOT NULL AND outcome NOT IN ('passed', 'skipped')",
                limit,
            )
        })
    }

    fn deploys(&self, limit: u32) -> StoreResult<Vec<DeployRow>> {
        self.with_conn(|c| query_deploys(c, "ORDER BY created_ms DESC, id DESC LIMIT ?1", [limit]))
    }

    fn deploy_of_run(&self, run: RunId) -> StoreResult<Option<DeployRow>> {
        self.with_conn(|c| Ok(query_deploys(c, "WHERE run_id = ?1", [run.to_string()])?.pop()))
    }

    fn last_started_deploy(&self) -> StoreResult<Option<DeployRow>> {
        self.with_conn(|c| {
            Ok(query_deploys(
                c,
                "WHERE started_ms > 0 ORDER BY started_ms DESC, id DESC LIMIT 1",
                [],
            )?
            .pop())
        })
    }

    fn deploys_since(&self, since_ms: u64) -> StoreResult<u32> {
        self.with_conn(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM deploys WHERE started_ms >= ?1 AND started_ms > 0",
                [since_ms as i64],
                |r| r.get(0),
            )?)
        })
    }

    fn quarantine(&self, suite: Option<&str>) -> StoreResult<Vec<QuarantineRow>> {
        self.with_conn(|c| {
            let mut stmt = c.prepare_cached(
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
        })
    }

    fn flakiness(&self, suite: &str, limit: u32) -> StoreResult<Vec<FlakinessRow>> {
        self.with_conn(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {FLAKINESS_COLUMNS}
                 FROM flakiness WHERE suite = ?1 AND (flakes > 0 OR flips > 0)
                 ORDER BY CAST(flakes AS REAL) / runs DESC, flips DESC, test_id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![suite, limit], flakiness_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn history(&self, suite: &str) -> StoreResult<HashMap<String, History>> {
        self.with_conn(|c| super::history::history(c, suite))
    }

    fn flaky_tests(&self, suite: &str, since_ms: u64) -> StoreResult<HashSet<String>> {
        self.with_conn(|c| super::history::flaky_tests(c, suite, since_ms))
    }
}

/// The runs `select` picks (a `SELECT * FROM runs …`), in its order, each with its counts per
/// outcome: one query, whatever the number of runs.
fn runs_with_counts(
    conn: &Connection,
    select: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS}, tests.outcome, COUNT(tests.idx)
         FROM ({select}) AS runs LEFT JOIN tests ON tests.run_id = runs.id
         GROUP BY runs.id, tests.outcome
         ORDER BY runs.created_ms DESC, runs.id DESC"
    ))?;
    let rows = stmt.query_map(args, |r| {
        Ok((raw_run(r)?, r.get::<_, Option<String>>(16)?, r.get::<_, u32>(17)?))
    })?;
    let mut out: Vec<(RunRow, OutcomeCounts)> = Vec::new();
    let mut last: Option<String> = None;
    for row in rows {
        let (raw, outcome, n) = row?;
        let id = raw.id().to_owned();
        if last.as_deref() != Some(id.as_str()) {
            out.push((raw.parse()?, OutcomeCounts::default()));
            last = Some(id);
        }
        let counts = &mut out.last_mut().expect("pushed above").1;
        counts.add(parse_outcome(outcome)?, n);
    }
    Ok(out)
}

fn results(conn: &Connection, run: RunId) -> StoreResult<Vec<pb::TestResult>> {
    results_where(conn, run, "", u32::MAX)
}

/// The tests of `run` that match `condition` (SQL over the `tests` table, or empty), at most
/// `limit`, in submission order.
fn results_where(
    conn: &Connection,
    run: RunId,
    condition: &str,
    limit: u32,
) -> StoreResult<Vec<pb::TestResult>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT test_id, outcome, duration_ms, attempts, worker, detail, output, quarantined
         FROM tests WHERE run_id = ?1 {condition} ORDER BY idx LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![run.to_string(), limit], |r| {
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
        out.push(pb::TestResult {
            test_id,
            outcome: parse_outcome(outcome)?
                .map(Outcome::to_wire)
                .unwrap_or(pb::Outcome::Unspecified as i32),
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
