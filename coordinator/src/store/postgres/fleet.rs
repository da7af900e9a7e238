//! Quarantine, the deploy log, workers and the live attempts they hold.

use shardgate_common::{AttemptId, pb};
use tokio_postgres::Row;

use super::PgStore;
use super::conn::{Conn, get, int, int32, text};
use crate::store::codec::{from_json, parse, to_json};
use crate::store::{
    AttemptRow, DeployRow, DeployState, FleetStore, GateStore, QuarantineRow, RunnerOffer, StoreResult,
    WorkerRow,
};

pub(super) const DEPLOY_COLUMNS: &str = "id, run_id, suite, revision, requested_by, authors, created_ms,
    started_ms, finished_ms, state, detail";

pub(super) fn deploy_row(r: &Row) -> StoreResult<DeployRow> {
    Ok(DeployRow {
        id: get(r, 0)?,
        run_id: parse("deploys", get::<&str>(r, 1)?)?,
        suite: get(r, 2)?,
        revision: get(r, 3)?,
        requested_by: get(r, 4)?,
        authors: from_json("deploys", get::<&str>(r, 5)?)?,
        created_ms: int(r, 6)?,
        started_ms: int(r, 7)?,
        finished_ms: int(r, 8)?,
        state: parse("deploys", get::<&str>(r, 9)?)?,
        detail: get(r, 10)?,
    })
}

/// Deploys selected by `filter` (the SQL after `FROM deploys`).
pub(super) fn query_deploys(
    c: &mut Conn,
    filter: &str,
    args: super::conn::Params<'_>,
) -> StoreResult<Vec<DeployRow>> {
    let rows = c.query(&format!("SELECT {DEPLOY_COLUMNS} FROM deploys {filter}"), args)?;
    rows.iter().map(deploy_row).collect()
}

impl GateStore for PgStore {
    fn add_quarantine(&mut self, q: &QuarantineRow) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "INSERT INTO quarantine (suite, test_id, reason, added_by, added_ms, automatic)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (suite, test_id) DO UPDATE SET reason = EXCLUDED.reason,
                 added_by = EXCLUDED.added_by, added_ms = EXCLUDED.added_ms,
                 automatic = EXCLUDED.automatic",
            &[
                &q.suite,
                &q.test_id,
                &text(&q.reason),
                &q.added_by,
                &(q.added_ms as i64),
                &q.automatic,
            ],
        )?;
        Ok(())
    }

    fn remove_quarantine(&mut self, suite: &str, test_id: &str) -> StoreResult<bool> {
        let n = self.conn.get_mut().write_execute(
            "DELETE FROM quarantine WHERE suite = $1 AND test_id = $2",
            &[&suite, &test_id],
        )?;
        Ok(n == 1)
    }

    fn insert_deploy(&mut self, d: &DeployRow) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            &format!(
                "INSERT INTO deploys ({DEPLOY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            &[
                &d.id,
                &d.run_id.to_string(),
                &d.suite,
                &d.revision,
                &d.requested_by,
                &to_json(&d.authors),
                &(d.created_ms as i64),
                &(d.started_ms as i64),
                &(d.finished_ms as i64),
                &d.state.as_str(),
                &text(&d.detail),
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
        let n = self.conn.get_mut().write_execute(
            "UPDATE deploys SET state = $3, detail = $5,
                 started_ms = CASE WHEN $3 = 'running' THEN $4 ELSE started_ms END,
                 finished_ms = CASE WHEN $3 = 'running' THEN finished_ms ELSE $4 END
             WHERE id = $1 AND state = $2",
            &[&id, &from.as_str(), &to.as_str(), &(at_ms as i64), &text(detail)],
        )?;
        Ok(n == 1)
    }

    fn next_pending_deploy(&self) -> StoreResult<Option<DeployRow>> {
        Ok(query_deploys(
            &mut self.conn.borrow_mut(),
            "WHERE state = 'pending' ORDER BY created_ms, id LIMIT 1",
            &[],
        )?
        .pop())
    }

    fn deploys_in(&self, state: DeployState) -> StoreResult<Vec<DeployRow>> {
        query_deploys(
            &mut self.conn.borrow_mut(),
            "WHERE state = $1 ORDER BY created_ms, id",
            &[&state.as_str()],
        )
    }
}

impl FleetStore for PgStore {
    fn upsert_worker(&mut self, w: &WorkerRow) -> StoreResult<()> {
        let runners: Vec<(&str, &str)> = w
            .runners
            .iter()
            .map(|r| (r.name.as_str(), r.kind.as_str()))
            .collect();
        self.conn.get_mut().write_execute(
            "INSERT INTO workers (id, name, slots, labels, runners, registered_ms, last_seen_ms, state, owner)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET last_seen_ms = EXCLUDED.last_seen_ms,
                                            state = EXCLUDED.state",
            &[
                &w.id.to_string(),
                &text(&w.name),
                &i64::from(w.slots),
                &to_json(&w.labels),
                &to_json(&runners),
                &(w.registered_ms as i64),
                &(w.last_seen_ms as i64),
                &w.state.as_str(),
                &w.owner,
            ],
        )?;
        Ok(())
    }

    fn workers(&self) -> StoreResult<Vec<WorkerRow>> {
        let rows = self.conn.borrow_mut().query(
            "SELECT id, name, slots, labels, runners, registered_ms, last_seen_ms, state, owner
             FROM workers ORDER BY registered_ms",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let runners: Vec<(String, String)> = from_json("workers", get::<&str>(r, 4)?)?;
                let runners = runners
                    .into_iter()
                    .map(|(name, kind)| {
                        Ok(RunnerOffer {
                            name,
                            kind: parse("workers", &kind)?,
                        })
                    })
                    .collect::<StoreResult<_>>()?;
                Ok(WorkerRow {
                    id: parse("workers", get::<&str>(r, 0)?)?,
                    name: get(r, 1)?,
                    slots: int32(r, 2)?,
                    labels: from_json("workers", get::<&str>(r, 3)?)?,
                    runners,
                    registered_ms: int(r, 5)?,
                    last_seen_ms: int(r, 6)?,
                    state: parse("workers", get::<&str>(r, 7)?)?,
                    owner: get(r, 8)?,
                })
            })
            .collect()
    }

    fn insert_attempt(&mut self, a: &AttemptRow) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "INSERT INTO attempts (id, run_id, worker_id, shard_id, discover, tests, started_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &a.id.to_string(),
                &a.run.to_string(),
                &a.worker.to_string(),
                &a.shard.to_string(),
                &a.discover,
                &to_json(&a.tests),
                &(a.started_ms as i64),
            ],
        )?;
        Ok(())
    }

    fn delete_attempt(&mut self, id: AttemptId) -> StoreResult<()> {
        self.conn
            .get_mut()
            .write_execute("DELETE FROM attempts WHERE id = $1", &[&id.to_string()])?;
        Ok(())
    }

    fn attempts(&self) -> StoreResult<Vec<AttemptRow>> {
        let rows = self.conn.borrow_mut().query(
            "SELECT id, run_id, worker_id, shard_id, discover, tests, started_ms FROM attempts",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRow {
                    id: parse("attempts", get::<&str>(r, 0)?)?,
                    run: parse("attempts", get::<&str>(r, 1)?)?,
                    worker: parse("attempts", get::<&str>(r, 2)?)?,
                    shard: parse("attempts", get::<&str>(r, 3)?)?,
                    discover: get(r, 4)?,
                    tests: from_json("attempts", get::<&str>(r, 5)?)?,
                    started_ms: int(r, 6)?,
                })
            })
            .collect()
    }

    fn log_shard(&mut self, s: &pb::ShardProgress) -> StoreResult<()> {
        self.conn.get_mut().write_execute(
            "INSERT INTO shard_log (attempt_id, run_id, shard_id, worker, tests, done, started_ms,
                                    ended_ms, state, estimated_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (attempt_id) DO UPDATE SET run_id = EXCLUDED.run_id,
                 shard_id = EXCLUDED.shard_id, worker = EXCLUDED.worker, tests = EXCLUDED.tests,
                 done = EXCLUDED.done, started_ms = EXCLUDED.started_ms,
                 ended_ms = EXCLUDED.ended_ms, state = EXCLUDED.state,
                 estimated_ms = EXCLUDED.estimated_ms",
            &[
                &s.attempt_id,
                &s.run_id,
                &s.shard_id,
                &text(&s.worker),
                &i64::from(s.tests),
                &i64::from(s.done),
                &(s.started_at_ms as i64),
                &(s.ended_at_ms as i64),
                &s.state,
                &(s.estimated_ms as i64),
            ],
        )?;
        Ok(())
    }
}
