//! The PostgreSQL store, for teams that outgrow one machine: the same records, group commit
//! and per-message savepoints as the SQLite store, on a server the team already runs.
//!
//! One writer per database, decided by the `leader` row: a coordinator writes only while it
//! holds the newest *epoch*. It takes the row when the row's lease has run out or the session
//! that held it is gone (a `kill -9`ed coordinator's session ends at once), renews the lease
//! from a thread of its own, and **fences** every batch: the batch begins by locking the row
//! for share and checking the epoch, so once another coordinator has taken over (which updates
//! the row, and so waits for a batch in flight), no write of the old one commits.
//!
//! Connection loss is fail-stop: a failed statement fails its message, a failed commit stops
//! the coordinator (see the actor), and a restart reloads the truth from the database.

mod conn;
mod fleet;
mod reads;
mod runs;
mod schema;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conn::{Conn, get, pg_err};
pub use reads::PgReader;

use super::{StoreError, StoreResult, Transactions};

/// Whether a database argument names a PostgreSQL server rather than a SQLite file.
pub fn is_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A URL as logs and errors show it: without its password.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (Some(auth), host),
        None => (None, rest),
    };
    match auth.and_then(|a| a.split_once(':')) {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// The runtime that drives every session's connection. It lives as long as the process (a
/// static is never dropped, so no runtime is dropped inside another).
fn runtime() -> StoreResult<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shardgate-postgres")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| StoreError::Postgres(format!("failed to start the PostgreSQL runtime: {e}")))
}

/// Opens a session, named `application` in `pg_stat_activity`.
fn connect(url: &str, shown: &str, application: &str) -> StoreResult<Conn> {
    let fail = |reason: String| StoreError::Open {
        path: shown.to_owned(),
        reason,
    };
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| fail(format!("not a PostgreSQL URL: {e}")))?;
    config.application_name(application);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    // A peer that vanished without closing the connection is noticed by the kernel.
    config.keepalives(true).keepalives_idle(Duration::from_secs(5));
    let rt = runtime()?;
    let connecting = rt.spawn(async move {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a PostgreSQL session ended");
            }
        });
        Ok::<_, tokio_postgres::Error>(client)
    });
    let client = futures_executor::block_on(connecting)
        .map_err(|e| fail(format!("the connection task failed: {e}")))?
        .map_err(|e| fail(pg_err(e).to_string()))?;
    Ok(Conn::new(client))
}

/// Who this coordinator is, as the `leader` row names it to the others.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// A name for logs and errors (host and process).
    pub holder: String,
    /// Where clients reach its gRPC and HTTP ports, told by standbys to callers.
    pub grpc_addr: String,
    pub http_addr: String,
    /// How long the lease lasts without a renewal; renewed every quarter of it.
    pub lease: Duration,
    /// Whether the process stops when it cannot renew the lease before it runs out (servers:
    /// a coordinator that cannot prove it leads must stop serving). Tests leave it off.
    pub exit_when_lost: bool,
}

impl Candidate {
    /// This process, with its addresses unknown.
    pub fn this_process() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown-host".into());
        Self {
            holder: format!("{host}:{}", std::process::id()),
            grpc_addr: String::new(),
            http_addr: String::new(),
            lease: Duration::from_secs(8),
            exit_when_lost: false,
        }
    }
}

/// The coordinator that leads a database, as its `leader` row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub epoch: i64,
    pub holder: String,
    pub grpc_addr: String,
    pub http_addr: String,
    /// Whether its lease still runs.
    pub live: bool,
}

/// The lease as the renewing thread keeps it.
#[derive(Debug)]
struct Lease {
    epoch: i64,
    /// When the last renewal that succeeded was sent.
    renewed: Mutex<Instant>,
    /// Set when a renewal found another epoch: someone else leads now.
    lost: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// The writer's session to a PostgreSQL database.
pub struct PgStore {
    conn: RefCell<Conn>,
    shown: String,
    lease: Arc<Lease>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("db", &self.shown)
            .field("epoch", &self.lease.epoch)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.lease.stop.store(true, Ordering::Relaxed);
        if let Some(r) = &self.renewer {
            r.thread().unpark();
        }
        // Hand the lease on at once rather than make a standby wait for it to run out.
        let _ = self.conn.get_mut().execute(
            "UPDATE leader SET expires_at = now() WHERE id = 1 AND epoch = $1",
            &[&self.lease.epoch],
        );
    }
}

/// Takes the lead when the lease ran out, or when the session that held it is gone.
///
/// The times are the server's clock when the row is written (`clock_timestamp()`), not when
/// the statement began (`now()`): a takeover can wait on the row for as long as the old
/// leader's last batch holds it (until the server times that session out, a lease), and a
/// lease counted from before that wait would be over, or nearly, when it is granted.
const TAKE_LEAD: &str = "
INSERT INTO leader AS l (id, epoch, holder, grpc_addr, http_addr, since, expires_at, backend_pid)
VALUES (1, 1, $1, $2, $3, clock_timestamp(),
        clock_timestamp() + $4::bigint * interval '1 millisecond', pg_backend_pid())
ON CONFLICT (id) DO UPDATE SET epoch = l.epoch + 1, holder = EXCLUDED.holder,
    grpc_addr = EXCLUDED.grpc_addr, http_addr = EXCLUDED.http_addr, since = clock_timestamp(),
    expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond',
    backend_pid = EXCLUDED.backend_pid
WHERE l.expires_at < clock_timestamp()
   OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = l.backend_pid)
RETURNING epoch";

/// Extends the lease of epoch `$1` by `$2` milliseconds from the server's clock now.
const RENEW: &str = "
UPDATE leader SET expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond'
WHERE id = 1 AND epoch = $1 RETURNING epoch";

impl PgStore {
    /// Connects to the database at `url`, brings its schema up to date and takes the lead, or
    /// fails with [`StoreError::Held`] naming the coordinator that leads it.
    pub fn open(url: &str, me: &Candidate) -> StoreResult<Self> {
        match Self::try_open(url, me)? {
            Ok(store) => Ok(store),
            Err(leader) => Err(StoreError::Held {
                path: redact(url),
                holder: format!(
                    "{} at {} (epoch {})",
                    leader.holder,
                    if leader.grpc_addr.is_empty() {
                        "an unknown address"
                    } else {
                        &leader.grpc_addr
                    },
                    leader.epoch
                ),
            }),
        }
    }

    /// Like [`PgStore::open`], but a database another coordinator leads gives back who leads
    /// it, so that a standby can wait and ask again.
    pub fn try_open(url: &str, me: &Candidate) -> StoreResult<Result<Self, Leader>> {
        let shown = redact(url);
        let mut conn = connect(url, &shown, "shardgate writer")?;
        schema::migrate(&mut conn, &shown, schema::Upto::Base)?;
        // A batch stuck on a connection that went silent must not hold the leader row (and so
        // a takeover) for longer than a lease.
        conn.batch(&format!(
            "SET idle_in_transaction_session_timeout = {}",
            me.lease.as_millis().max(1000)
        ))?;
        let took = conn.query_opt(
            TAKE_LEAD,
            &[
                &me.holder,
                &me.grpc_addr,
                &me.http_addr,
                &(me.lease.as_millis() as i64),
            ],
        )?;
        let Some(row) = took else {
            return Ok(Err(leader_of(&mut conn)?.expect("a row refused our takeover")));
        };
        let epoch: i64 = get(&row, 0)?;
        // The lease runs from when the row was written, which can be long after the takeover
        // was sent (it waits on the row); this process counts it from a renewal sent now, so
        // that its own count never ends after the server's.
        let sent = Instant::now();
        conn.query_opt(RENEW, &[&epoch, &(me.lease.as_millis() as i64)])?;
        // The schema's later versions are the leader's to apply, under its fence.
        conn.fence = Some((epoch, shown.clone()));
        schema::migrate(&mut conn, &shown, schema::Upto::Latest)?;
        tracing::info!(db = %shown, epoch, holder = %me.holder, "took the lead of the database");
        let lease = Arc::new(Lease {
            epoch,
            renewed: Mutex::new(sent),
            lost: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let renewer = spawn_renewer(url, lease.clone(), me.clone(), shown.clone())?;
        let mut store = Self {
            conn: RefCell::new(conn),
            shown,
            lease,
            renewer: Some(renewer),
        };
        let staged = super::RunStore::delete_staged_runs(&mut store)?;
        if staged > 0 {
            tracing::warn!(runs = staged, "deleted runs whose submission never finished");
        }
        Ok(Ok(store))
    }

    /// Stops renewing the lease and waits until no renewal is in flight, so that a test can
    /// make the lease run out.
    #[cfg(test)]
    pub(crate) fn stop_renewing(&mut self) {
        self.lease.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.renewer.take() {
            r.thread().unpark();
            r.join().expect("the renewer ends");
        }
    }

    /// The epoch this store writes under.
    pub fn epoch(&self) -> i64 {
        self.lease.epoch
    }

    /// The refusal of a write under an epoch that is no longer the newest.
    fn fenced(&self, newer: i64, holder: String) -> StoreError {
        StoreError::Fenced {
            db: self.shown.clone(),
            holder,
            ours: self.lease.epoch,
            newer,
        }
    }
}

/// Who leads the database on `conn`, if anyone ever did.
fn leader_of(conn: &mut Conn) -> StoreResult<Option<Leader>> {
    let row = conn.query_opt(
        "SELECT epoch, holder, grpc_addr, http_addr, expires_at > now() FROM leader WHERE id = 1",
        &[],
    )?;
    row.map(|r| {
        Ok(Leader {
            epoch: get(&r, 0)?,
            holder: get(&r, 1)?,
            grpc_addr: get(&r, 2)?,
            http_addr: get(&r, 3)?,
            live: get(&r, 4)?,
        })
    })
    .transpose()
}

/// Who leads the database at `url` now (for standbys and the read side).
pub fn current_leader(url: &str) -> StoreResult<Option<Leader>> {
    let shown = redact(url);
    let mut conn = connect(url, &shown, "shardgate standby")?;
    leader_of(&mut conn)
}

/// Renews the lease every quarter of it from a session of its own. A renewal that finds
/// another epoch marks the lease lost (the next batch is refused); with `exit_when_lost`, a
/// lease that could not be renewed before it ran out stops the process.
fn spawn_renewer(
    url: &str,
    lease: Arc<Lease>,
    me: Candidate,
    shown: String,
) -> StoreResult<std::thread::JoinHandle<()>> {
    let mut conn = connect(url, &shown, "shardgate lease")?;
    let url = url.to_owned();
    let every = me.lease / 4;
    let db = shown.clone();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| StoreError::Open {
                path: db.clone(),
                reason: format!("failed to start the {name} thread: {e}"),
            })
    };
    let renewing = lease.clone();
    let lease_ms = me.lease.as_millis() as i64;
    let renewer = spawn(
        "shardgate-lease",
        Box::new(move || {
            while !renewing.stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(every);
                if renewing.stop.load(Ordering::Relaxed) {
                    break;
                }
                let sent = Instant::now();
                match conn.query_opt(RENEW, &[&renewing.epoch, &lease_ms]) {
                    Ok(Some(_)) => *renewing.renewed.lock().unwrap_or_else(|p| p.into_inner()) = sent,
                    Ok(None) => {
                        let who = leader_of(&mut conn)
                            .ok()
                            .flatten()
                            .map(|l| format!("{} (epoch {})", l.holder, l.epoch))
                            .unwrap_or_else(|| "another coordinator".into());
                        tracing::error!(epoch = renewing.epoch, leader = %who, "lost the lead of the database");
                        *renewing.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(who);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to renew the lease on the database");
                        if conn.is_closed()
                            && let Ok(c) = connect(&url, &shown, "shardgate lease")
                        {
                            conn = c;
                        }
                    }
                }
            }
        }),
    )?;
    if me.exit_when_lost {
        let watched = lease;
        let lease_len = me.lease;
        let _ = spawn(
            "shardgate-lease-watchdog",
            Box::new(move || {
                while !watched.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let renewed = *watched.renewed.lock().unwrap_or_else(|p| p.into_inner());
                    let lost = watched.lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if renewed.elapsed() >= lease_len || lost.is_some() {
                        tracing::error!(
                            epoch = watched.epoch,
                            leader = lost.as_deref().unwrap_or("unknown"),
                            "this coordinator can no longer show it leads the database (lease not renewed for {:?}); stopping",
                            renewed.elapsed()
                        );
                        std::process::exit(70);
                    }
                }
            }),
        )?;
    }
    Ok(renewer)
}

impl Transactions for PgStore {
    fn begin_batch(&mut self) -> StoreResult<()> {
        if let Some(who) = self.lease.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(self.fenced(self.lease.epoch + 1, who));
        }
        self.conn.get_mut().open_level()
    }

    fn commit_batch(&mut self) -> StoreResult<()> {
        self.conn.get_mut().close_level()
    }

    fn savepoint(&mut self) -> StoreResult<()> {
        self.conn.get_mut().open_level()
    }

    fn release(&mut self) -> StoreResult<()> {
        self.conn.get_mut().close_level()
    }

    fn rollback(&mut self) -> StoreResult<()> {
        self.conn.get_mut().rollback_level()
    }
}

#[cfg(test)]
mod tests;
