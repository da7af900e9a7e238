//! One writer per database. Two coordinators on one database would both resume the same runs
//! and overwrite each other's verdicts, so the writer takes an exclusive lock on `<db>.lock`
//! for as long as it lives. The OS drops the lock when the process dies, however it dies, so a
//! `kill -9`ed coordinator's database is taken over at once with no manual clean-up.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::store::{StoreError, StoreResult};

/// How long a held lock is asked for again before the database is refused.
const HELD_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// The held lock; dropping it releases the database.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Takes the writer lock of the database at `db`, or says who holds it.
    pub fn acquire(db: &Path) -> StoreResult<Self> {
        let path = lock_path(db);
        let fail = |reason: String| StoreError::Open {
            path: db.display().to_string(),
            reason,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| fail(format!("failed to open the lock file '{}': {e}", path.display())))?;
        // A process that forks (a rollout hook) shares the lock until its child execs, so a
        // lock freed a moment ago may still look held: ask again for a short while.
        let deadline = std::time::Instant::now() + HELD_GRACE;
        let mut locked = file.try_lock();
        while matches!(locked, Err(TryLockError::WouldBlock)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            locked = file.try_lock();
        }
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StoreError::Held {
                    path: db.display().to_string(),
                    holder: if holder.is_empty() {
                        "an unknown process".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(fail(format!("failed to lock '{}': {e}", path.display())));
            }
        }
        // Ours now: say who holds it, for the next one who asks.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown host".to_owned());
        let holder = format!("coordinator pid {} on {host}", std::process::id());
        let write = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(holder.as_bytes()))
            .and_then(|_| file.flush());
        if let Err(e) = write {
            tracing::warn!(error = %e, "failed to write the lock holder");
        }
        Ok(Self { _file: file })
    }
}

fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holder_named_and_takes_over_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let first = WriterLock::acquire(&db).unwrap();
        let err = WriterLock::acquire(&db).unwrap_err().to_string();
        assert!(
            err.contains("held by") && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        WriterLock::acquire(&db).expect("released with its holder");
    }
}
