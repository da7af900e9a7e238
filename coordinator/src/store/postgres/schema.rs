//! The PostgreSQL schema and its migrations. [`SCHEMA`] is version 1; each entry of
//! [`MIGRATIONS`] moves a database one version up. Migrations run in one transaction under an
//! advisory lock, so coordinators that start together on a new database do not race.
//!
//! Numbers are `BIGINT` (times in milliseconds since the epoch, counts), flags `BOOLEAN`,
//! lists and policies JSON text, as in the SQLite store.

use super::conn::Conn;
use crate::store::{StoreError, StoreResult};

pub(crate) const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

/// Later versions, in order. Append; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 2: the commit a run's counted results were produced from, as its workers proved it.
    "ALTER TABLE runs ADD COLUMN tested_commit TEXT NOT NULL DEFAULT '';",
];

/// The advisory lock key that serialises migrations ("shardgate" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x7368_6172_6467_6174;

const SCHEMA: &str = r#"
CREATE TABLE runs (
    id           TEXT PRIMARY KEY,
    suite        TEXT NOT NULL,
    revision     TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    runner       TEXT NOT NULL,
    labels       TEXT NOT NULL,
    policy       TEXT NOT NULL,
    priority     BIGINT NOT NULL,
    discover     BOOLEAN NOT NULL,
    status       TEXT NOT NULL,
    message      TEXT NOT NULL DEFAULT '',
    created_ms   BIGINT NOT NULL,
    started_ms   BIGINT NOT NULL DEFAULT 0,
    finished_ms  BIGINT NOT NULL DEFAULT 0,
    shards       BIGINT NOT NULL DEFAULT 0,
    staged       BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX runs_by_status ON runs(status);
CREATE INDEX runs_by_time ON runs(created_ms);
CREATE TABLE tests (
    run_id      TEXT NOT NULL,
    idx         BIGINT NOT NULL,
    test_id     TEXT NOT NULL,
    outcome     TEXT,
    duration_ms BIGINT NOT NULL DEFAULT 0,
    attempts    BIGINT NOT NULL DEFAULT 0,
    worker      TEXT NOT NULL DEFAULT '',
    detail      TEXT NOT NULL DEFAULT '',
    output      TEXT NOT NULL DEFAULT '',
    retry       TEXT NOT NULL DEFAULT '',
    quarantined BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (run_id, idx)
);
CREATE UNIQUE INDEX tests_by_id ON tests(run_id, test_id);
CREATE TABLE durations (
    suite          TEXT NOT NULL,
    test_id        TEXT NOT NULL,
    estimate_ms    DOUBLE PRECISION NOT NULL,
    samples        BIGINT NOT NULL,
    last_failed_ms BIGINT NOT NULL,
    PRIMARY KEY (suite, test_id)
);
CREATE TABLE attempts (
    id         TEXT PRIMARY KEY,
    run_id     TEXT NOT NULL,
    worker_id  TEXT NOT NULL,
    shard_id   TEXT NOT NULL,
    discover   BOOLEAN NOT NULL,
    tests      TEXT NOT NULL,
    started_ms BIGINT NOT NULL
);
CREATE TABLE workers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    slots         BIGINT NOT NULL,
    labels        TEXT NOT NULL,
    runners       TEXT NOT NULL,
    registered_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL,
    state         TEXT NOT NULL,
    owner         TEXT NOT NULL DEFAULT ''
);
CREATE TABLE flakiness (
    suite         TEXT NOT NULL,
    test_id       TEXT NOT NULL,
    runs          BIGINT NOT NULL,
    failures      BIGINT NOT NULL,
    flakes        BIGINT NOT NULL,
    flips         BIGINT NOT NULL,
    last_green    BOOLEAN NOT NULL,
    last_flake_ms BIGINT NOT NULL,
    last_run_ms   BIGINT NOT NULL,
    PRIMARY KEY (suite, test_id)
);
CREATE TABLE quarantine (
    suite     TEXT NOT NULL,
    test_id   TEXT NOT NULL,
    reason    TEXT NOT NULL,
    added_by  TEXT NOT NULL,
    added_ms  BIGINT NOT NULL,
    automatic BOOLEAN NOT NULL,
    PRIMARY KEY (suite, test_id)
);
CREATE TABLE rollout_requests (
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
    created_ms   BIGINT NOT NULL,
    started_ms   BIGINT NOT NULL DEFAULT 0,
    finished_ms  BIGINT NOT NULL DEFAULT 0,
    state        TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX deploys_by_time ON deploys(created_ms);
CREATE TABLE shard_log (
    attempt_id   TEXT PRIMARY KEY,
    run_id       TEXT NOT NULL,
    shard_id     TEXT NOT NULL,
    worker       TEXT NOT NULL,
    tests        BIGINT NOT NULL,
    done         BIGINT NOT NULL,
    started_ms   BIGINT NOT NULL,
    ended_ms     BIGINT NOT NULL,
    state        TEXT NOT NULL,
    estimated_ms BIGINT NOT NULL
);
CREATE INDEX shard_log_by_run ON shard_log(run_id, started_ms);
-- Which coordinator writes: the holder of the newest epoch, while its lease lasts. Every
-- batch of writes first locks this row for share and checks the epoch, so a coordinator that
-- was replaced cannot commit another write.
CREATE TABLE leader (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    epoch      BIGINT NOT NULL,
    holder     TEXT NOT NULL,
    grpc_addr  TEXT NOT NULL,
    http_addr  TEXT NOT NULL,
    since      TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    -- The leader's writing session: once it is gone (the process died), the lead is free.
    backend_pid INTEGER NOT NULL
);
"#;

/// How far [`migrate`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upto {
    /// Refuse a newer schema, create the first version on an empty database, change nothing
    /// else: what any coordinator may do before it leads (a standby must not migrate the
    /// schema under a leader of an older version).
    Base,
    /// Every migration: the leader's, once it leads.
    Latest,
}

/// Brings the database to [`SCHEMA_VERSION`] (or only to its first version, see [`Upto`]),
/// refusing one that is newer than this coordinator knows.
pub(crate) fn migrate(conn: &mut Conn, shown: &str, upto: Upto) -> StoreResult<()> {
    let open_err = |e: StoreError| StoreError::Open {
        path: shown.to_owned(),
        reason: e.to_string(),
    };
    conn.atomic(|c| {
        c.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        c.batch("CREATE TABLE IF NOT EXISTS shardgate_schema (version BIGINT NOT NULL)")?;
        let found: Option<i64> = match c.query_opt("SELECT version FROM shardgate_schema", &[])? {
            Some(row) => Some(super::conn::get(&row, 0)?),
            None => None,
        };
        let mut at = found.unwrap_or(0);
        if at > SCHEMA_VERSION {
            return Err(StoreError::Version {
                path: shown.to_owned(),
                found: at,
                expected: SCHEMA_VERSION,
            });
        }
        if at == 0 {
            c.batch(SCHEMA)?;
            c.execute("INSERT INTO shardgate_schema (version) VALUES (1)", &[])?;
            at = 1;
        }
        if upto == Upto::Base || at == SCHEMA_VERSION {
            return Ok(());
        }
        for m in MIGRATIONS.iter().skip(at as usize - 1) {
            c.batch(m)?;
        }
        c.execute("UPDATE shardgate_schema SET version = $1", &[&SCHEMA_VERSION])?;
        Ok(())
    })
    .map_err(|e| match e {
        StoreError::Version { .. } => e,
        other => open_err(other),
    })
}
