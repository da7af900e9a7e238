//! Tests of what only the PostgreSQL store has: the lead, its fence, and a server that goes
//! away. (What every store does is in `store::conformance`.)

use std::time::Duration;

use shardgate_common::Outcome;
use shardgate_testkit::wait_for;
use tokio_postgres::NoTls;

use super::{PgStore, current_leader};
use crate::store::conformance::{Postgres, result, run_row};
use crate::store::{Reads, RunStore, StoreError, Transactions};

/// A plain session for what the tests do behind the store's back.
struct Admin(tokio::runtime::Runtime, tokio_postgres::Client);

impl Admin {
    fn execute(&mut self, sql: &str, _: &[&str]) -> Result<u64, tokio_postgres::Error> {
        self.0.block_on(self.1.execute(sql, &[]))
    }

    fn count(&mut self, sql: &str) -> i64 {
        self.0.block_on(self.1.query_one(sql, &[])).unwrap().get(0)
    }
}

fn admin(url: &str) -> Admin {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    });
    Admin(rt, client)
}

/// Ends `leader`'s lease now, as if it had not renewed it.
fn expire_lease(leader: &mut PgStore, url: &str) {
    leader.stop_renewing();
    admin(url)
        .execute("UPDATE leader SET expires_at = now() - interval '1 second'", &[])
        .unwrap();
}

/// Ends the writer's session from the server's side, as when its process dies or its
/// connection breaks.
fn end_writer_session(url: &str) {
    admin(url)
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'shardgate writer' AND datname = current_database()",
            &[],
        )
        .unwrap();
}

#[test]
fn a_takeover_fences_the_old_writer_and_names_the_new_one() {
    let db = Postgres::new();
    let mut a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    let held = PgStore::open(&db.url, &Postgres::candidate("b")).unwrap_err();
    assert!(
        matches!(&held, StoreError::Held { holder, .. } if holder.contains("a at a:50051")),
        "{held}"
    );
    expire_lease(&mut a, &db.url);
    let b = PgStore::open(&db.url, &Postgres::candidate("b")).unwrap();
    assert_eq!(b.epoch(), a.epoch() + 1);
    let e = a.begin_batch().unwrap_err();
    assert!(
        matches!(&e, StoreError::Fenced { holder, ours, newer, .. } if holder == "b" && *newer == *ours + 1),
        "{e}"
    );
    let leader = current_leader(&db.url).unwrap().unwrap();
    assert_eq!((leader.holder.as_str(), leader.live), ("b", true));
}

#[test]
fn a_batch_in_flight_commits_before_a_takeover_and_none_after() {
    let db = Postgres::new();
    let mut a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    let (first, late) = (run_row(), run_row());
    expire_lease(&mut a, &db.url);
    a.begin_batch().unwrap();
    a.insert_run(&first, &["t".into()], false).unwrap();
    let url = db.url.clone();
    let taking = std::thread::spawn(move || PgStore::open(&url, &Postgres::candidate("b")));
    // The takeover waits on the leader row, which the batch holds.
    let mut watch = admin(&db.url);
    wait_for(
        "the takeover to wait for the batch",
        Duration::from_secs(20),
        || {
            let n = watch.count(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'shardgate writer' AND datname = current_database() AND wait_event_type = 'Lock'",
            );
            (n == 1).then_some(())
        },
    );
    assert!(!taking.is_finished());
    a.commit_batch().unwrap();
    let b = taking.join().unwrap().unwrap();
    assert!(
        b.run_with_counts(first.id).unwrap().is_some(),
        "the batch in flight counted"
    );
    assert!(
        matches!(a.begin_batch(), Err(StoreError::Fenced { .. })),
        "the old writer is fenced"
    );
    // A write outside a batch gets a transaction of its own, fenced the same way.
    let e = a.insert_run(&late, &["t".into()], false).unwrap_err();
    assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
    drop(b);
    let c = PgStore::open(&db.url, &Postgres::candidate("c")).unwrap();
    assert!(c.run_with_counts(late.id).unwrap().is_none());
}

#[test]
fn the_lead_is_free_at_once_when_the_leaders_session_ends() {
    let db = Postgres::new();
    let mut a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    // As when the coordinator's process dies: its writing session ends, its lease still runs.
    end_writer_session(&db.url);
    let mut ask = admin(&db.url);
    wait_for("the writer's session to end", Duration::from_secs(20), || {
        let n =
            ask.count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate writer' AND datname = current_database()");
        (n == 0).then_some(())
    });
    assert!(
        current_leader(&db.url).unwrap().unwrap().live,
        "the lease has not run out"
    );
    let b = PgStore::open(&db.url, &Postgres::candidate("b")).unwrap();
    assert_eq!(b.epoch(), 2);
    let e = a.begin_batch().unwrap_err();
    assert!(
        e.to_string().contains("closed") || e.to_string().contains("terminat"),
        "{e}"
    );
}

/// A standby whose takeover waited on the row for a leader that vanished mid-batch (its
/// session ends when the server times it out, a lease later) still gets a whole lease,
/// counted from when it took the lead, not from when it asked: else it stops before its
/// first renewal and the lead changes hands twice.
#[test]
fn a_takeover_that_waited_for_a_dead_batch_gets_a_whole_lease() {
    let db = Postgres::new();
    let mut a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    a.stop_renewing();
    // The leader is cut off with a batch open: the leader row stays locked for share.
    a.begin_batch().unwrap();
    a.insert_run(&run_row(), &["t".into()], false).unwrap();
    let url = db.url.clone();
    let taking = std::thread::spawn(move || PgStore::open(&url, &Postgres::candidate("b")));
    let mut watch = admin(&db.url);
    let lease = Postgres::candidate("b").lease;
    // The takeover waits on the row until the server ends the dead leader's session: its
    // idle-in-transaction timeout, a lease.
    wait_for("the takeover to wait on the row", Duration::from_secs(20), || {
        let n = watch.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'shardgate writer' AND datname = current_database() AND wait_event_type = 'Lock'",
        );
        (n == 1).then_some(())
    });
    let b = taking.join().unwrap().unwrap();
    assert_eq!(b.epoch(), 2);
    let left_ms =
        watch.count("SELECT (extract(epoch FROM expires_at - clock_timestamp()) * 1000)::bigint FROM leader");
    assert!(
        left_ms > lease.as_millis() as i64 / 2,
        "the new leader's lease has {left_ms} ms left of {lease:?}"
    );
    let since = b.lease.renewed.lock().unwrap().elapsed();
    assert!(
        since < lease / 2,
        "its own count of the lease started {since:?} ago"
    );
}

#[test]
fn a_lost_connection_fails_the_commit_and_keeps_nothing() {
    let db = Postgres::new();
    let mut a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    let run = run_row();
    a.begin_batch().unwrap();
    a.insert_run(&run, &["t".into()], false).unwrap();
    end_writer_session(&db.url);
    let e = a.commit_batch().unwrap_err();
    assert!(matches!(e, StoreError::Postgres(_)), "{e}");
    drop(a);
    let b = PgStore::open(&db.url, &Postgres::candidate("b")).unwrap();
    assert!(b.run_with_counts(run.id).unwrap().is_none());
}

#[test]
fn a_failed_statement_cannot_be_committed_silently() {
    let db = Postgres::new();
    let mut a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    let run = run_row();
    a.insert_run(&run, &["t".into()], false).unwrap();
    a.begin_batch().unwrap();
    a.insert_run(&run_row(), &["kept?".into()], false).unwrap();
    // A statement that fails outside any savepoint of its own aborts the whole transaction on
    // PostgreSQL, where COMMIT would then quietly roll back: the store says so instead.
    assert!(a.unstage_run(run.id).is_ok());
    let dup = a.add_rollout_request(run.id, &[]);
    assert!(dup.is_ok());
    assert!(a.add_rollout_request(run.id, &[]).is_err(), "one request per run");
    let e = a.commit_batch().unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
}

#[test]
fn text_with_nul_bytes_is_stored() {
    let db = Postgres::new();
    let mut s = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    let run = run_row();
    s.insert_run(&run, &["t".into()], false).unwrap();
    let r = crate::store::ResultRow {
        output: "before\0after".into(),
        ..result(0, "t", Outcome::Failed, 5)
    };
    assert_eq!(s.record_results(run.id, "unit", &[r], &[]).unwrap(), 1);
    assert_eq!(s.results(run.id).unwrap()[0].output, "before\u{FFFD}after");
}

#[test]
fn a_newer_schema_is_refused_and_a_dropped_store_hands_on_the_lead() {
    let db = Postgres::new();
    let a = PgStore::open(&db.url, &Postgres::candidate("a")).unwrap();
    drop(a);
    // Dropped (a clean stop): the next one need not wait for the lease.
    let b = PgStore::open(&db.url, &Postgres::candidate("b")).unwrap();
    drop(b);
    admin(&db.url)
        .execute("UPDATE shardgate_schema SET version = 99", &[])
        .unwrap();
    let e = PgStore::open(&db.url, &Postgres::candidate("c")).unwrap_err();
    assert!(matches!(e, StoreError::Version { found: 99, .. }), "{e}");
}

#[test]
fn a_url_is_shown_without_its_password() {
    assert_eq!(
        super::redact("postgres://gate:s3cret@db.internal:5432/shardgate"),
        "postgres://gate:***@db.internal:5432/shardgate"
    );
    assert_eq!(super::redact("postgres://db/x"), "postgres://db/x");
    assert!(super::is_url("postgresql://db/x") && !super::is_url("/var/lib/shardgate.db"));
}
