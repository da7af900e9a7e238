//! Per-test duration history and flakiness of each suite.

use std::collections::{HashMap, HashSet};

use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::scheduler::History;
use crate::store::{FlakinessRow, HistoryStore, StoreResult};

pub(super) const UPSERT_HISTORY: &str =
    "INSERT INTO durations (suite, test_id, estimate_ms, samples, last_failed_ms)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT(suite, test_id) DO UPDATE SET estimate_ms = excluded.estimate_ms,
         samples = excluded.samples, last_failed_ms = excluded.last_failed_ms";

/// The columns [`flakiness_row`] reads, in order.
pub(super) const FLAKINESS_COLUMNS: &str =
    "test_id, runs, failures, flakes, flips, last_flake_ms, last_run_ms";

pub(super) fn flakiness_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FlakinessRow> {
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

impl HistoryStore for SqliteStore {
    fn put_history(&mut self, suite: &str, entries: &[(String, History)]) -> StoreResult<()> {
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

    fn flakiness_of(&self, suite: &str, test_id: &str) -> StoreResult<Option<FlakinessRow>> {
        self.conn
            .query_row(
                &format!("SELECT {FLAKINESS_COLUMNS} FROM flakiness WHERE suite = ?1 AND test_id = ?2"),
                params![suite, test_id],
                flakiness_row,
            )
            .optional()
            .map_err(Into::into)
    }
}

pub(crate) fn history(conn: &rusqlite::Connection, suite: &str) -> StoreResult<HashMap<String, History>> {
    let mut stmt = conn.prepare_cached(
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

pub(crate) fn flaky_tests(
    conn: &rusqlite::Connection,
    suite: &str,
    since_ms: u64,
) -> StoreResult<HashSet<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT test_id FROM flakiness WHERE suite = ?1 AND flakes > 0 AND last_flake_ms >= ?2",
    )?;
    let rows = stmt.query_map(params![suite, since_ms as i64], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
