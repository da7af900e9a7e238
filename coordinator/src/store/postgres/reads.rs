//! The read side's queries on PostgreSQL, and the pool of sessions that serves them off the
//! scheduler thread. Each query is one statement, so it sees one committed state (PostgreSQL's
//! `READ COMMITTED` takes a snapshot per statement) and never blocks the writer.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use shardgate_common::{Outcome, RunId, pb};

use super::conn::{Conn, Params, get, int, int32};
use super::fleet::query_deploys;
use super::runs::{FLAKINESS_COLUMNS, RUN_COLUMNS, flakiness_row, run_row};
use super::{PgStore, connect};
use crate::scheduler::History;
use crate::store::codec::parse_outcome;
use crate::store::{
    DeployRow, FlakinessRow, OutcomeCounts, QuarantineRow, Reads, RunFilter, RunRow, StoreResult,
};

/// Sessions to one database for the read side, opened on demand and kept for reuse.
pub struct PgReader {
    url: String,
    shown: String,
    idle: Mutex<Vec<Conn>>,
    keep: usize,
}

impl std::fmt::Debug for PgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReader")
            .field("db", &self.shown)
            .finish_non_exhaustive()
    }
}

impl PgReader {
    /// A reader of the database at `url`, keeping up to `keep` sessions open between reads.
    pub fn open(url: &str, keep: usize) -> StoreResult<Self> {
        let reader = Self {
            url: url.to_owned(),
            shown: super::redact(url),
            idle: Mutex::new(Vec::new()),
            keep,
        };
        // Fail now, not on the first dashboard request, if it cannot be read.
        reader.with_conn(|c| c.batch("SELECT 1"))?;
        Ok(reader)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> StoreResult<T>) -> StoreResult<T> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match idle {
            Some(c) if !c.is_closed() => c,
            _ => connect(&self.url, &self.shown, "shardgate reader")?,
        };
        let out = f(&mut conn);
        // A session that broke is not kept: the next read opens a new one.
        if !conn.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.keep {
                idle.push(conn);
            }
        }
        out
    }
}

impl PgStore {
    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> StoreResult<T>) -> StoreResult<T> {
        f(&mut self.conn.borrow_mut())
    }
}

/// The read side of a PostgreSQL database, on the writer's session or a reader's.
macro_rules! pg_reads {
    ($t:ty) => {
        impl Reads for $t {
            fn runs_page(&self, limit: u32) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
                self.with_conn(|c| runs_page(c, limit))
            }
            fn runs_search(&self, f: &RunFilter) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
                self.with_conn(|c| runs_search(c, f))
            }
            fn runs_by_status(&self) -> StoreResult<Vec<(String, u64)>> {
                self.with_conn(runs_by_status)
            }
            fn shard_log(&self, run: RunId) -> StoreResult<Vec<pb::ShardProgress>> {
                self.with_conn(|c| shard_log(c, run))
            }
            fn run_with_counts(&self, id: RunId) -> StoreResult<Option<(RunRow, OutcomeCounts)>> {
                self.with_conn(|c| run_with_counts(c, id))
            }
            fn results(&self, run: RunId) -> StoreResult<Vec<pb::TestResult>> {
                self.with_conn(|c| results_where(c, run, "", u32::MAX))
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
                self.with_conn(|c| {
                    query_deploys(
                        c,
                        "ORDER BY created_ms DESC, id DESC LIMIT $1",
                        &[&i64::from(limit)],
                    )
                })
            }
            fn deploy_of_run(&self, run: RunId) -> StoreResult<Option<DeployRow>> {
                self.with_conn(|c| Ok(query_deploys(c, "WHERE run_id = $1", &[&run.to_string()])?.pop()))
            }
            fn last_started_deploy(&self) -> StoreResult<Option<DeployRow>> {
                self.with_conn(|c| {
                    Ok(query_deploys(
                        c,
                        "WHERE started_ms > 0 ORDER BY started_ms DESC, id DESC LIMIT 1",
                        &[],
                    )?
                    .pop())
                })
            }
            fn deploys_since(&self, since_ms: u64) -> StoreResult<u32> {
                self.with_conn(|c| deploys_since(c, since_ms))
            }
            fn quarantine(&self, suite: Option<&str>) -> StoreResult<Vec<QuarantineRow>> {
                self.with_conn(|c| quarantine(c, suite))
            }
            fn flakiness(&self, suite: &str, limit: u32) -> StoreResult<Vec<FlakinessRow>> {
                self.with_conn(|c| flakiness(c, suite, limit))
            }
            fn history(&self, suite: &str) -> StoreResult<HashMap<String, History>> {
                self.with_conn(|c| history(c, suite))
            }
            fn flaky_tests(&self, suite: &str, since_ms: u64) -> StoreResult<HashSet<String>> {
                self.with_conn(|c| flaky_tests(c, suite, since_ms))
            }
        }
    };
}

pg_reads!(PgStore);
pg_reads!(PgReader);

fn runs_page(c: &mut Conn, limit: u32) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
    runs_with_counts(
        c,
        "SELECT * FROM runs WHERE NOT staged ORDER BY created_ms DESC, id DESC LIMIT $1",
        &[&i64::from(limit)],
    )
}

fn runs_search(c: &mut Conn, f: &RunFilter) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
    runs_with_counts(
        c,
        "SELECT * FROM runs WHERE NOT staged
           AND ($1::text IS NULL OR suite = $1)
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR requested_by = $3)
           AND ($4::bigint IS NULL OR created_ms < $4)
         ORDER BY created_ms DESC, id DESC LIMIT $5",
        &[
            &f.suite,
            &f.status,
            &f.requested_by,
            &f.before_ms.map(|b| b as i64),
            &i64::from(f.limit),
        ],
    )
}

fn run_with_counts(c: &mut Conn, id: RunId) -> StoreResult<Option<(RunRow, OutcomeCounts)>> {
    Ok(runs_with_counts(
        c,
        "SELECT * FROM runs WHERE id = $1 AND NOT staged",
        &[&id.to_string()],
    )?
    .pop())
}

fn runs_by_status(c: &mut Conn) -> StoreResult<Vec<(String, u64)>> {
    let rows = c.query(
        "SELECT status, COUNT(*) FROM runs WHERE NOT staged GROUP BY status",
        &[],
    )?;
    rows.iter().map(|r| Ok((get(r, 0)?, int(r, 1)?))).collect()
}

fn shard_log(c: &mut Conn, run: RunId) -> StoreResult<Vec<pb::ShardProgress>> {
    let rows = c.query(
        "SELECT attempt_id, run_id, shard_id, worker, tests, done, started_ms, ended_ms, state,
                estimated_ms
         FROM shard_log WHERE run_id = $1 ORDER BY started_ms, attempt_id",
        &[&run.to_string()],
    )?;
    rows.iter()
        .map(|r| {
            Ok(pb::ShardProgress {
                attempt_id: get(r, 0)?,
                run_id: get(r, 1)?,
                shard_id: get(r, 2)?,
                worker: get(r, 3)?,
                tests: int32(r, 4)?,
                done: int32(r, 5)?,
                started_at_ms: int(r, 6)?,
                ended_at_ms: int(r, 7)?,
                state: get(r, 8)?,
                estimated_ms: int(r, 9)?,
                current_test: String::new(),
            })
        })
        .collect()
}

fn deploys_since(c: &mut Conn, since_ms: u64) -> StoreResult<u32> {
    let row = c.query_opt(
        "SELECT COUNT(*) FROM deploys WHERE started_ms >= $1 AND started_ms > 0",
        &[&(since_ms as i64)],
    )?;
    row.map(|r| int32(&r, 0))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn quarantine(c: &mut Conn, suite: Option<&str>) -> StoreResult<Vec<QuarantineRow>> {
    let rows = c.query(
        "SELECT suite, test_id, reason, added_by, added_ms, automatic FROM quarantine
         WHERE $1::text IS NULL OR suite = $1 ORDER BY suite, test_id",
        &[&suite],
    )?;
    rows.iter()
        .map(|r| {
            Ok(QuarantineRow {
                suite: get(r, 0)?,
                test_id: get(r, 1)?,
                reason: get(r, 2)?,
                added_by: get(r, 3)?,
                added_ms: int(r, 4)?,
                automatic: get(r, 5)?,
            })
        })
        .collect()
}

fn flakiness(c: &mut Conn, suite: &str, limit: u32) -> StoreResult<Vec<FlakinessRow>> {
    let rows = c.query(
        &format!(
            "SELECT {FLAKINESS_COLUMNS}
             FROM flakiness WHERE suite = $1 AND (flakes > 0 OR flips > 0)
             ORDER BY flakes::float8 / runs DESC, flips DESC, test_id LIMIT $2"
        ),
        &[&suite, &i64::from(limit)],
    )?;
    rows.iter().map(flakiness_row).collect()
}

fn history(c: &mut Conn, suite: &str) -> StoreResult<HashMap<String, History>> {
    let rows = c.query(
        "SELECT test_id, estimate_ms, samples, last_failed_ms FROM durations WHERE suite = $1",
        &[&suite],
    )?;
    rows.iter()
        .map(|r| {
            Ok((
                get(r, 0)?,
                History {
                    estimate_ms: get(r, 1)?,
                    samples: int32(r, 2)?,
                    last_failed_ms: int(r, 3)?,
                },
            ))
        })
        .collect()
}

fn flaky_tests(c: &mut Conn, suite: &str, since_ms: u64) -> StoreResult<HashSet<String>> {
    let rows = c.query(
        "SELECT test_id FROM flakiness WHERE suite = $1 AND flakes > 0 AND last_flake_ms >= $2",
        &[&suite, &(since_ms as i64)],
    )?;
    rows.iter().map(|r| get(r, 0)).collect()
}

/// The runs `select` picks (a `SELECT * FROM runs …`), in its order, each with its counts per
/// outcome: one query, whatever the number of runs.
fn runs_with_counts(
    c: &mut Conn,
    select: &str,
    args: Params<'_>,
) -> StoreResult<Vec<(RunRow, OutcomeCounts)>> {
    let rows = c.query(
        &format!(
            "SELECT {RUN_COLUMNS}, tests.outcome, COUNT(tests.idx)
             FROM ({select}) AS runs LEFT JOIN tests ON tests.run_id = runs.id
             GROUP BY {RUN_COLUMNS}, tests.outcome
             ORDER BY runs.created_ms DESC, runs.id DESC"
        ),
        args,
    )?;
    let mut out: Vec<(RunRow, OutcomeCounts)> = Vec::new();
    let mut last: Option<&str> = None;
    for r in &rows {
        let id: &str = get(r, 0)?;
        if last != Some(id) {
            out.push((run_row(r)?, OutcomeCounts::default()));
            last = Some(id);
        }
        let counts = &mut out.last_mut().expect("pushed above").1;
        counts.add(parse_outcome(get(r, 16)?)?, int32(r, 17)?);
    }
    Ok(out)
}

/// The tests of `run` that match `condition` (SQL over the `tests` table, or empty), at most
/// `limit`, in submission order.
fn results_where(c: &mut Conn, run: RunId, condition: &str, limit: u32) -> StoreResult<Vec<pb::TestResult>> {
    let rows = c.query(
        &format!(
            "SELECT test_id, outcome, duration_ms, attempts, worker, detail, output, quarantined
             FROM tests WHERE run_id = $1 {condition} ORDER BY idx LIMIT $2"
        ),
        &[&run.to_string(), &i64::from(limit)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(pb::TestResult {
                test_id: get(r, 0)?,
                outcome: parse_outcome(get(r, 1)?)?
                    .map(Outcome::to_wire)
                    .unwrap_or(pb::Outcome::Unspecified as i32),
                duration_ms: int(r, 2)?,
                attempts: int32(r, 3)?,
                worker: get(r, 4)?,
                detail: get(r, 5)?,
                output: get(r, 6)?,
                quarantined: get(r, 7)?,
            })
        })
        .collect()
}
