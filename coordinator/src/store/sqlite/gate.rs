//! Quarantine and the deploy log.

use rusqlite::params;

use super::{SqliteStore, from_json, parse, to_json};
use crate::store::{DeployRow, DeployState, GateStore, QuarantineRow, StoreResult};

impl GateStore for SqliteStore {
    fn add_quarantine(&mut self, q: &QuarantineRow) -> StoreResult<()> {
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

    fn remove_quarantine(&mut self, suite: &str, test_id: &str) -> StoreResult<bool> {
        let n = self.conn.execute(
            "DELETE FROM quarantine WHERE suite = ?1 AND test_id = ?2",
            params![suite, test_id],
        )?;
        Ok(n == 1)
    }

    fn insert_deploy(&mut self, d: &DeployRow) -> StoreResult<()> {
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
                d.state.as_str(),
                d.detail
            ],
        )?;
        Ok(())
    }

    fn update_deploy(
        &mut self,
        id: &str,
        from: DeployState,
        to: DeployState,
        at_ms: u64,
        detail: &str,
    ) -> StoreResult<bool> {
        let n = self.conn.execute(
            "UPDATE deploys SET state = ?3, detail = ?5,
                 started_ms = CASE WHEN ?3 = 'running' THEN ?4 ELSE started_ms END,
                 finished_ms = CASE WHEN ?3 = 'running' THEN finished_ms ELSE ?4 END
             WHERE id = ?1 AND state = ?2",
            params![id, from.as_str(), to.as_str(), at_ms as i64, detail],
        )?;
        Ok(n == 1)
    }

    fn next_pending_deploy(&self) -> StoreResult<Option<DeployRow>> {
        Ok(query_deploys(
            &self.conn,
            "WHERE state = 'pending' ORDER BY created_ms, id LIMIT 1",
            [],
        )?
        .pop())
    }

    fn deploys_in(&self, state: DeployState) -> StoreResult<Vec<DeployRow>> {
        query_deploys(
            &self.conn,
            "WHERE state = ?1 ORDER BY created_ms, id",
            [state.as_str()],
        )
    }
}

/// Deploys selected by `filter` (the SQL after `FROM deploys`).
pub(super) fn query_deploys(
    conn: &rusqlite::Connection,
    filter: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Vec<DeployRow>> {
    let mut stmt = conn.prepare_cached(&format!(
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
            run_id: parse("deploys", &run)?,
            suite,
            revision,
            requested_by,
            authors: from_json("deploys", &authors)?,
            created_ms: created as u64,
            started_ms: started as u64,
            finished_ms: finished as u64,
            state: parse("deploys", &state)?,
            detail,
        });
    }
    Ok(out)
}
