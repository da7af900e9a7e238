//! Tests of the SQLite store on its own: what only a file has (removal, damage).

use super::SqliteStore;
use crate::store::conformance::run_row;
use crate::store::{RunStore, Transactions};

#[test]
fn a_removed_or_replaced_database_file_refuses_the_next_commit() {
    for replace in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut s = SqliteStore::open(&path).unwrap();
        s.begin_batch().unwrap();
        s.insert_run(&run_row(), &["a".into()], false).unwrap();
        s.commit_batch().unwrap();
        std::fs::remove_file(&path).unwrap();
        if replace {
            std::fs::write(&path, b"").unwrap();
        }
        s.begin_batch().unwrap();
        s.insert_run(&run_row(), &["b".into()], false).unwrap();
        let e = s.commit_batch().unwrap_err();
        let want = if replace { "was replaced" } else { "was removed" };
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[test]
fn a_damaged_database_is_refused_at_start_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    std::fs::write(&path, b"this is not a database, just junk bytes ".repeat(200)).unwrap();
    let e = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(e.contains("restore it from a backup"), "{e}");
}
