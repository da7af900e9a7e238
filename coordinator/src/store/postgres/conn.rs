//! One PostgreSQL session with its prepared statements, and what the store knows about its
//! transaction: how deep the savepoints are and whether a statement failed inside one.
//!
//! The store is called from plain threads (the scheduler's) and from async tasks (the read
//! side) alike, so it cannot use a client that runs its own runtime (`postgres` panics inside
//! one). Sessions are `tokio-postgres` connections driven by one small runtime of the store's
//! own; the calls wait on their answers with a plain executor, which works on any thread.

use std::collections::HashMap;

use futures_executor::block_on;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use crate::store::{StoreError, StoreResult};

pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A session and its statement cache.
pub(crate) struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// Open transaction levels: 1 inside a batch, one more per savepoint.
    pub(super) depth: usize,
    /// The level at which a statement failed. PostgreSQL refuses every statement after a
    /// failure until the savepoint it happened under is rolled back, and a `COMMIT` then
    /// silently rolls back: the store refuses to commit instead.
    pub(super) failed_at: Option<usize>,
    /// The epoch every transaction of this session checks first (the writer's), and the
    /// database as errors show it.
    pub(super) fence: Option<(i64, String)>,
    /// Transaction control not sent yet (`BEGIN`, savepoints, their release or rollback): it
    /// goes out in the same round trip as the next statement, and a savepoint that saw no
    /// statement is never sent at all. A commit is sent at once.
    pending: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL error with what the server said, not just "db error".
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let detail = match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            s
        }
        None if e.is_closed() => format!("the connection is closed: {e}"),
        None => {
            // The cause says what went wrong on the wire (refused, reset, timed out).
            let mut s = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(c) = source {
                s.push_str(": ");
                s.push_str(&c.to_string());
                source = c.source();
            }
            s
        }
    };
    StoreError::Postgres(detail)
}

impl Conn {
    pub(crate) fn new(client: Client) -> Self {
        Self {
            client,
            statements: HashMap::new(),
            depth: 0,
            failed_at: None,
            fence: None,
            pending: String::new(),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Sends the pending transaction control, then the request `req` makes, pipelined: one
    /// round trip for both.
    fn send<'a, T, F>(&'a mut self, req: impl FnOnce(&'a Client) -> F) -> Result<T, tokio_postgres::Error>
    where
        F: std::future::Future<Output = Result<T, tokio_postgres::Error>> + 'a,
    {
        let control = std::mem::take(&mut self.pending);
        let client = &self.client;
        if control.is_empty() {
            return block_on(req(client));
        }
        let (sent, r) = block_on(futures_util::future::join(
            client.batch_execute(&control),
            req(client),
        ));
        sent.and(r)
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.send(|c| c.prepare(sql))?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn noted<T>(&mut self, r: Result<T, tokio_postgres::Error>) -> StoreResult<T> {
        r.map_err(|e| {
            if self.depth > 0 && self.failed_at.is_none() {
                self.failed_at = Some(self.depth);
            }
            pg_err(e)
        })
    }

    /// Runs a statement; returns how many rows it changed.
    pub(crate) fn execute(&mut self, sql: &str, params: Params<'_>) -> StoreResult<u64> {
        let r = self
            .prepared(sql)
            .and_then(|s| self.send(|c| async move { c.execute(&s, params).await }));
        self.noted(r)
    }

    pub(crate) fn query(&mut self, sql: &str, params: Params<'_>) -> StoreResult<Vec<Row>> {
        let r = self
            .prepared(sql)
            .and_then(|s| self.send(|c| async move { c.query(&s, params).await }));
        self.noted(r)
    }

    pub(crate) fn query_opt(&mut self, sql: &str, params: Params<'_>) -> StoreResult<Option<Row>> {
        let r = self
            .prepared(sql)
            .and_then(|s| self.send(|c| async move { c.query_opt(&s, params).await }));
        self.noted(r)
    }

    /// Statements without parameters, sent as one (transaction control, schema).
    pub(crate) fn batch(&mut self, sql: &str) -> StoreResult<()> {
        let r = self.send(|c| c.batch_execute(sql));
        self.noted(r)
    }

    /// Opens a transaction level: a transaction at the top, a savepoint inside one.
    pub(crate) fn open_level(&mut self) -> StoreResult<()> {
        if self.depth > 0 {
            self.pending.push_str(SAVEPOINT);
            self.depth += 1;
            return Ok(());
        }
        self.pending.push_str("BEGIN;");
        self.depth = 1;
        if let Err(e) = self.check_fence() {
            let _ = self.rollback_level();
            return Err(e);
        }
        Ok(())
    }

    /// Keeps the innermost level's writes (commits at the top, at once).
    pub(crate) fn close_level(&mut self) -> StoreResult<()> {
        if let Some(at) = self.failed_at
            && at >= self.depth
        {
            self.rollback_level()?;
            return Err(StoreError::Postgres(
                "a statement failed in this transaction; its writes were rolled back".into(),
            ));
        }
        self.depth -= 1;
        if self.depth == 0 {
            return self.batch("COMMIT");
        }
        if !self.drop_empty_savepoint() {
            self.pending.push_str("RELEASE level;");
        }
        Ok(())
    }

    /// Undoes the innermost level's writes.
    pub(crate) fn rollback_level(&mut self) -> StoreResult<()> {
        let level = self.depth;
        self.depth -= 1;
        let r = if self.depth == 0 {
            // The session is clean again at once.
            let r = self.send(|c| c.batch_execute("ROLLBACK")).map_err(pg_err);
            self.pending.clear();
            r
        } else {
            if !self.drop_empty_savepoint() {
                self.pending.push_str("ROLLBACK TO level; RELEASE level;");
            }
            Ok(())
        };
        if self.failed_at.is_some_and(|at| at >= level) || self.depth == 0 {
            self.failed_at = None;
        }
        r
    }

    /// Forgets the innermost savepoint if no statement ran since it was asked for (it was
    /// never sent); whether it did.
    fn drop_empty_savepoint(&mut self) -> bool {
        if self.pending.ends_with(SAVEPOINT) {
            self.pending.truncate(self.pending.len() - SAVEPOINT.len());
            true
        } else {
            false
        }
    }

    /// The fence: the leader row stays locked for share until the transaction ends, so a
    /// takeover (which updates the row) waits for it, and a transaction after a takeover sees
    /// the newer epoch and is refused.
    fn check_fence(&mut self) -> StoreResult<()> {
        let Some((ours, db)) = self.fence.clone() else {
            return Ok(());
        };
        let row = self.query_opt("SELECT epoch, holder FROM leader WHERE id = 1 FOR SHARE", &[])?;
        let (epoch, holder): (i64, String) = match &row {
            Some(r) => (get(r, 0)?, get(r, 1)?),
            None => (0, String::new()),
        };
        if epoch == ours {
            return Ok(());
        }
        Err(StoreError::Fenced {
            db,
            holder,
            ours,
            newer: epoch,
        })
    }

    /// Runs one writing statement under the fence (see [`Conn::write`]).
    pub(crate) fn write_execute(&mut self, sql: &str, params: Params<'_>) -> StoreResult<u64> {
        self.write(|c| c.execute(sql, params))
    }

    /// Runs one writing statement that returns rows (`RETURNING`) under the fence.
    pub(crate) fn write_query(&mut self, sql: &str, params: Params<'_>) -> StoreResult<Vec<Row>> {
        self.write(|c| c.query(sql, params))
    }

    /// Runs a write: inside the batch when one is open, else in a transaction of its own, so
    /// that no write escapes the fence.
    pub(crate) fn write<T>(&mut self, f: impl FnOnce(&mut Self) -> StoreResult<T>) -> StoreResult<T> {
        if self.depth > 0 { f(self) } else { self.atomic(f) }
    }

    /// Runs `f` in a level of its own: all of its writes or none.
    pub(crate) fn atomic<T>(&mut self, f: impl FnOnce(&mut Self) -> StoreResult<T>) -> StoreResult<T> {
        self.open_level()?;
        match f(self) {
            Ok(v) => {
                self.close_level()?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.rollback_level();
                Err(e)
            }
        }
    }
}

const SAVEPOINT: &str = "SAVEPOINT level;";

/// Text PostgreSQL can store: it refuses the NUL character, which test output may hold.
pub(crate) fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A stored count or time, which PostgreSQL keeps as a signed 64-bit integer.
pub(crate) fn int(row: &Row, i: usize) -> StoreResult<u64> {
    let v: i64 = row.try_get(i).map_err(pg_err)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        table: "(postgres)",
        reason: format!("negative value {v} in column {i}"),
    })
}

pub(crate) fn int32(row: &Row, i: usize) -> StoreResult<u32> {
    let v = int(row, i)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        table: "(postgres)",
        reason: format!("value {v} too large in column {i}"),
    })
}

pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> StoreResult<T> {
    row.try_get(i).map_err(pg_err)
}
