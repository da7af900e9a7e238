//! The SQLite schema and its migrations. [`SCHEMA`] is version 1; each entry of
//! [`MIGRATIONS`] moves a database one version up, in one transaction.

use rusqlite::Connection;

use crate::store::StoreError;

pub(crate) const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;

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
    // 6: a large run is written in parts; until its last part it is staged: invisible to
    // restarts and reads, and deleted by the next start if the submission never finished.
    "ALTER TABLE runs ADD COLUMN staged INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX runs_by_time ON runs(created_ms);",
    // 7: a worker belongs to the identity that registered it.
    "ALTER TABLE workers ADD COLUMN owner TEXT NOT NULL DEFAULT '';",
    // 8: every attempt that ended, with its worker, times and how it ended: a run's timeline.
    "CREATE TABLE shard_log (
        attempt_id   TEXT PRIMARY KEY,
        run_id       TEXT NOT NULL,
        shard_id     TEXT NOT NULL,
        worker       TEXT NOT NULL,
        tests        INTEGER NOT NULL,
        done         INTEGER NOT NULL,
        started_ms   INTEGER NOT NULL,
        ended_ms     INTEGER NOT NULL,
        state        TEXT NOT NULL,
        estimated_ms INTEGER NOT NULL
    );
    CREATE INDEX shard_log_by_run ON shard_log(run_id, started_ms);",
    // 9: the commit a run's counted results were produced from, as its workers proved it.
    "ALTER TABLE runs ADD COLUMN tested_commit TEXT NOT NULL DEFAULT '';",
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

/// Brings the database on `conn` to [`SCHEMA_VERSION`], refusing one that is newer.
pub(crate) fn migrate(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: shown.to_owned(),
        reason: e.to_string(),
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Version {
            path: shown.to_owned(),
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
    Ok(())
}
