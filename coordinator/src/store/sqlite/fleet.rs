//! Workers and the live attempts they hold.

use rusqlite::params;
use shardgate_common::{AttemptId, pb};

use super::{SqliteStore, from_json, parse, to_json};
use crate::store::{AttemptRow, FleetStore, RunnerOffer, StoreResult, WorkerRow};

impl FleetStore for SqliteStore {
    fn upsert_worker(&mut self, w: &WorkerRow) -> StoreResult<()> {
        let runners: Vec<(&str, &str)> = w
            .runners
            .iter()
            .map(|r| (r.name.as_str(), r.kind.as_str()))
            .collect();
        self.conn
            .prepare_cached(
                "INSERT INTO workers (id, name, slots, labels, runners, registered_ms, last_seen_ms, state, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,
                                               state = excluded.state",
            )?
            .execute(params![
                w.id.to_string(),
                w.name,
                w.slots,
                to_json(&w.labels),
                to_json(&runners),
                w.registered_ms as i64,
                w.last_seen_ms as i64,
                w.state.as_str(),
                w.owner
            ])?;
        Ok(())
    }

    fn workers(&self) -> StoreResult<Vec<WorkerRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, slots, labels, runners, registered_ms, last_seen_ms, state, owner
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
                r.get::<_, String>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, slots, labels, runners, reg, seen, state, owner) = row?;
            let runners: Vec<(String, String)> = from_json("workers", &runners)?;
            let runners = runners
                .into_iter()
                .map(|(name, kind)| {
                    Ok(RunnerOffer {
                        name,
                        kind: parse("workers", &kind)?,
                    })
                })
                .collect::<StoreResult<_>>()?;
            out.push(WorkerRow {
                id: parse("workers", &id)?,
                name,
                slots,
                labels: from_json("workers", &labels)?,
                runners,
                registered_ms: reg as u64,
                last_seen_ms: seen as u64,
                state: parse("workers", &state)?,
                owner,
            });
        }
        Ok(out)
    }

    fn insert_attempt(&mut self, a: &AttemptRow) -> StoreResult<()> {
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

    fn delete_attempt(&mut self, id: AttemptId) -> StoreResult<()> {
        self.conn
            .prepare_cached("DELETE FROM attempts WHERE id = ?1")?
            .execute([id.to_string()])?;
        Ok(())
    }

    fn log_shard(&mut self, s: &pb::ShardProgress) -> StoreResult<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO shard_log (attempt_id, run_id, shard_id, worker, tests, done,
                     started_ms, ended_ms, state, estimated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                s.attempt_id,
                s.run_id,
                s.shard_id,
                s.worker,
                s.tests,
                s.done,
                s.started_at_ms as i64,
                s.ended_at_ms as i64,
                s.state,
                s.estimated_ms as i64,
            ])?;
        Ok(())
    }

    fn attempts(&self) -> StoreResult<Vec<AttemptRow>> {
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
                id: parse("attempts", &id)?,
                run: parse("attempts", &run)?,
                worker: parse("attempts", &worker)?,
                shard: parse("attempts", &shard)?,
                discover,
                tests: from_json("attempts", &tests)?,
                started_ms: started as u64,
            });
        }
        Ok(out)
    }
}
