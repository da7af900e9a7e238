//! The SQLite store, the embedded default: one writer connection owned by the scheduler actor,
//! read-only connections for the read side, and a background thread for WAL checkpoints.
//!
//! Durability: WAL mode with `synchronous=NORMAL`, which survives a crash or `kill -9` of the
//! coordinator (the WAL is in the OS page cache) but may lose the last transactions on a power
//! failure. One writer per database: [`SqliteStore::open`] takes an exclusive lock on
//! `<db>.lock`, which the OS drops when the process dies, so a dead coordinator's database is
//! taken over at once and a live one's is refused with the holder named.

mod fleet;
mod gate;
mod history;
mod lock;
mod reads;
mod runs;
mod schema;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use lock::WriterLock;
pub use reads::SqliteReader;
use rusqlite::Connection;

use super::{StoreError, StoreResult, Transactions};

/// The writer's connection to a SQLite database.
pub struct SqliteStore {
    conn: Connection,
    /// The file opened and its identity (device, inode), checked before every commit.
    file: Option<(std::path::PathBuf, (u64, u64))>,
    /// Set when the store is dropped, to stop the background checkpointer.
    stop_checkpoints: Option<Arc<AtomicBool>>,
    /// Held for as long as the store lives (none for `:memory:`).
    _lock: Option<WriterLock>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop_checkpoints {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn open_err(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Copies the database at `db` to a new file `to` with SQLite's online backup, which is safe
/// while a coordinator writes to `db` (it copies a consistent snapshot, page by page, without
/// blocking the writer for long), then checks the copy's integrity. Refuses to overwrite `to`.
pub fn backup(db: &Path, to: &Path) -> StoreResult<()> {
    use rusqlite::OpenFlags;
    let shown = db.display().to_string();
    let target = to.display().to_string();
    if !db.exists() {
        return Err(StoreError::Open {
            path: shown,
            reason: "no such file".into(),
        });
    }
    if to.exists() {
        return Err(StoreError::Open {
            path: target,
            reason: "the backup file exists already; choose a new name".into(),
        });
    }
    let src = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err(&shown))?;
    src.busy_timeout(Duration::from_secs(5))
        .map_err(open_err(&shown))?;
    let mut dst = Connection::open(to).map_err(open_err(&target))?;
    {
        let b = rusqlite::backup::Backup::new(&src, &mut dst).map_err(open_err(&target))?;
        b.run_to_completion(256, Duration::from_millis(5), None)
            .map_err(open_err(&target))?;
    }
    integrity_check(&dst, &target)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` as its only writer; `:memory:` gives a
    /// private in-memory database for tests. Staged runs of a submission that never finished
    /// are deleted.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let shown = path.display().to_string();
        let lock = if path == Path::new(":memory:") {
            None
        } else {
            check_free_space(path, MIN_FREE_BYTES)?;
            Some(WriterLock::acquire(path)?)
        };
        let conn = Connection::open(path).map_err(open_err(&shown))?;
        integrity_check(&conn, &shown)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err(&shown))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err(&shown))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err(&shown))?;
        // 64 MiB of page cache: a large run's working set stays in memory between commits.
        conn.pragma_update(None, "cache_size", -65536)
            .map_err(open_err(&shown))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err(&shown))?;
        schema::migrate(&conn, &shown)?;
        let file = lock
            .is_some()
            .then(|| file_identity(path).map(|id| (path.to_owned(), id)))
            .transpose()
            .map_err(|e| StoreError::Open {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        let mut store = Self {
            conn,
            file,
            stop_checkpoints: None,
            _lock: lock,
        };
        let staged = super::RunStore::delete_staged_runs(&mut store)?;
        if staged > 0 {
            tracing::warn!(runs = staged, "deleted runs whose submission never finished");
        }
        Ok(store)
    }

    /// Moves WAL checkpoints off the writer: the writer no longer checkpoints when it commits
    /// (a checkpoint syncs the disk and would stall every reply of that batch), and a thread
    /// with its own connection runs passive checkpoints, which never block the writer, every
    /// `every`. Stops when the store is dropped.
    pub fn checkpoint_in_background(&mut self, path: &Path, every: Duration) -> StoreResult<()> {
        let shown = path.display().to_string();
        let conn = Connection::open(path).map_err(open_err(&shown))?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let stop = Arc::new(AtomicBool::new(false));
        self.stop_checkpoints = Some(stop.clone());
        std::thread::Builder::new()
            .name("shardgate-checkpoint".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %e, "background checkpoint failed");
                    }
                }
            })
            .map_err(|e| StoreError::Open {
                path: shown,
                reason: format!("failed to start the checkpoint thread: {e}"),
            })?;
        Ok(())
    }
}

impl Transactions for SqliteStore {
    fn begin_batch(&mut self) -> StoreResult<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    fn commit_batch(&mut self) -> StoreResult<()> {
        // A database file removed or replaced under us would take every commit from now on
        // into a file nobody will open again: refuse to commit, so nothing is acknowledged.
        if let Err(e) = self.check_file() {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    // Cached statements: every message opens and closes one, thousands a second.
    fn savepoint(&mut self) -> StoreResult<()> {
        self.conn.prepare_cached("SAVEPOINT message")?.execute([])?;
        Ok(())
    }

    fn release(&mut self) -> StoreResult<()> {
        self.conn.prepare_cached("RELEASE message")?.execute([])?;
        Ok(())
    }

    fn rollback(&mut self) -> StoreResult<()> {
        self.conn.execute_batch("ROLLBACK TO message; RELEASE message")?;
        Ok(())
    }
}

impl SqliteStore {
    /// Whether the database file is still the one this store opened.
    fn check_file(&self) -> StoreResult<()> {
        let Some((path, id)) = &self.file else {
            return Ok(());
        };
        let what = match file_identity(path) {
            Ok(now) if now == *id => return Ok(()),
            Ok(_) => "replaced",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "removed",
            Err(_) => "made unreadable",
        };
        Err(StoreError::Vanished {
            path: path.display().to_string(),
            what,
        })
    }
}

/// Room the database's disk must have at start: a coordinator that cannot store results must
/// not start taking them.
const MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// Refuses to start on a disk with less than `min` bytes free for unprivileged writers.
fn check_free_space(db: &Path, min: u64) -> StoreResult<()> {
    let dir = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let Ok(st) = nix::sys::statvfs::statvfs(&dir) else {
        // The directory may not exist yet; opening will say so.
        return Ok(());
    };
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if free < min {
        return Err(StoreError::Open {
            path: db.display().to_string(),
            reason: format!(
                "only {} MiB free on its disk, at least {} MiB needed to store results: free some space",
                free / (1024 * 1024),
                min / (1024 * 1024)
            ),
        });
    }
    Ok(())
}

/// A file's device and inode.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Refuses a damaged database at start, with what to do, rather than failing at the first
/// request.
fn integrity_check(conn: &Connection, shown: &str) -> StoreResult<()> {
    let damaged = |detail: String| StoreError::Damaged {
        path: shown.to_owned(),
        detail,
    };
    let mut stmt = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| damaged(e.to_string()))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| damaged(e.to_string()))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    Err(damaged(rows.into_iter().take(3).collect::<Vec<_>>().join("; ")))
}

/// Where a connection for a read comes from: the writer's own, or one of the read pool's.
pub(crate) trait WithConn {
    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T>;
}

impl WithConn for SqliteStore {
    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        f(&self.conn)
    }
}

use super::codec::{from_json, parse, to_json};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod space_tests {
    #[test]
    fn a_disk_without_room_is_refused_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        super::check_free_space(&db, 1).unwrap();
        let e = super::check_free_space(&db, u64::MAX).unwrap_err().to_string();
        assert!(
            e.contains("MiB free on its disk") && e.contains("free some space"),
            "{e}"
        );
    }
}
