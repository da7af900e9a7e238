//! A real PostgreSQL server for the tests, started from the machine's own binaries in a
//! temporary directory on a free loopback port, as the current user (as `postgres` when run by
//! root, which `initdb` refuses). One server per test process; each test takes a database of
//! its own from it.
//!
//! The server is tied to this process by a pipe: a small shell keeps reading the pipe and,
//! when it closes (the test process ended, however it ended), stops the server and removes its
//! directory. Nothing is left behind, and nothing waits for a fixed time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::cluster::{free_port, wait_for};

/// A running server.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    /// The shell that owns the server; closing its stdin stops the server.
    lifeline: Mutex<Option<(Child, ChildStdin)>>,
}

/// The directory with PostgreSQL's server binaries: `SHARDGATE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else whatever `initdb` is on the `PATH`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SHARDGATE_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command run as the server's user.
fn command(bin: &Path, name: &str) -> Command {
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    }
}

impl PgServer {
    /// The server of this test process, started on first use. Panics with what to install if
    /// the machine has no PostgreSQL.
    pub fn shared() -> &'static PgServer {
        static SERVER: OnceLock<PgServer> = OnceLock::new();
        SERVER.get_or_init(PgServer::start)
    }

    /// Starts a new server.
    pub fn start() -> PgServer {
        let bin = bin_dir().expect(
            "PostgreSQL's server binaries were not found: install Debian's `postgresql` package \
             (scripts/test does), or set SHARDGATE_PG_BIN to the directory holding initdb",
        );
        let dir = tempfile::Builder::new()
            .prefix("shardgate-pg-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown runs");
            assert!(
                ok.success(),
                "failed to give {} to the postgres user",
                dir.display()
            );
        }
        let data = dir.join("data");
        let out = command(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-N"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        // The shell starts the server, then waits for its stdin to close; then it stops the
        // server (immediate shutdown: a test server keeps nothing) and removes the directory.
        let script = format!(
            "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
               -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
               -c max_connections=300 >{dir}/server.log 2>&1 & \
             pid=$!; cat >/dev/null; kill -QUIT $pid; wait $pid; rm -rf {dir}",
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let mut shell = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let mut child = shell
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the server's shell starts");
        let stdin = child.stdin.take().expect("piped stdin");
        let server = PgServer {
            port,
            bin,
            lifeline: Mutex::new(Some((child, stdin))),
        };
        let log = dir.join("server.log");
        wait_for(
            "PostgreSQL to accept connections",
            Duration::from_secs(60),
            || {
                let ready = Command::new(server.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "1"])
                    .stdout(Stdio::null())
                    .status()
                    .ok()?
                    .success();
                if !ready && let Some(exited) = server.exited() {
                    panic!(
                        "PostgreSQL exited ({exited}) before it accepted connections: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                ready.then_some(())
            },
        );
        server
    }

    fn exited(&self) -> Option<String> {
        let mut l = self.lifeline.lock().unwrap();
        let (child, _) = l.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.to_string())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new, empty database on this server; returns its URL.
    pub fn database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        );
        self.client("createdb", &[&name]);
        self.url(&name)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL on database `name` with `psql`; returns its output.
    pub fn psql(&self, name: &str, sql: &str) -> String {
        self.client("psql", &["-d", name, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
    }

    /// Runs one of PostgreSQL's client programs against this server; returns its output.
    fn client(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(self.bin.join(program))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program} does not run: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server now and waits for it.
    pub fn stop(&self) {
        if let Some((mut child, mut stdin)) = self.lifeline.lock().unwrap().take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
