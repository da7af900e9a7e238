//! A real `shardgate-coordinator` process and real `shardgate-worker` processes on loopback
//! ports chosen by the OS, driven through the real `shardgate` client binary. Waits poll a
//! predicate under a deadline; nothing sleeps for a fixed time.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::proxy::Proxy;

/// The directory holding the shardgate binaries: `SHARDGATE_BIN_DIR`, else the directory of the
/// running executable (`target/<profile>` for a binary, its parent for a test in `deps/`).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("SHARDGATE_BIN_DIR") {
            return PathBuf::from(d);
        }
        let exe = std::env::current_exe().expect("the path of this executable");
        let mut dir = exe
            .parent()
            .expect("an executable lives in a directory")
            .to_owned();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir
    })
}

/// The path of one of the shardgate binaries, which must have been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built (cargo build --bins, or set SHARDGATE_BIN_DIR)",
        p.display()
    );
    p
}

/// How long the harness lets pass between two looks at a predicate.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `f` until it returns `Some`, or `None` once `deadline` has passed. The one place the
/// harness waits (with [`poll_until_async`]): a predicate polled under a deadline, never a
/// fixed sleep.
pub fn poll_until<T>(deadline: Instant, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`poll_until`] for a predicate that is itself async (a gRPC call, a browser query); it
/// yields to the runtime between looks.
pub async fn poll_until_async<T, F: std::future::Future<Output = Option<T>>>(
    deadline: Instant,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(Instant::now() + timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the tests run their coordinators on PostgreSQL (`SHARDGATE_TEST_STORE=postgres`)
/// rather than on the embedded SQLite.
pub fn on_postgres() -> bool {
    std::env::var("SHARDGATE_TEST_STORE").is_ok_and(|s| s == "postgres")
}

/// The `--db` of a test's coordinator: a new database on the test process's PostgreSQL
/// server when the tests run on it, else a SQLite file in `dir`.
pub fn test_db(dir: &Path) -> PathBuf {
    if on_postgres() {
        PathBuf::from(crate::postgres::PgServer::shared().database())
    } else {
        dir.join("shardgate.db")
    }
}

/// Writes an executable shell script at `root/rel`.
pub fn script(root: &Path, rel: &str, body: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `n` exec tests `t/NNN.sh`; those in `failing` exit 1. Each sleeps `sleep` seconds.
pub fn suite(root: &Path, n: usize, failing: &[usize], sleep: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let id = format!("t/{i:03}.sh");
            let exit = if failing.contains(&i) { 1 } else { 0 };
            script(root, &id, &format!("echo test {i}\nsleep {sleep}\nexit {exit}"));
            id
        })
        .collect()
}

/// GETs `path` from an HTTP server at `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_get_with(addr, path, None)
}

/// The same, with `authorization: Bearer <token>` when a token is given.
pub fn http_get_with(addr: &str, path: &str, token: Option<&str>) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: shardgate\r\n{auth}\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Each test's outcome in a `shardgate run --json` report (`"none"` for a test without one),
/// asserting that no test is reported twice.
pub fn outcomes_once(report: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    let tests = report["tests"]
        .as_array()
        .unwrap_or_else(|| panic!("no tests in the report: {report}"));
    let mut got = std::collections::BTreeMap::new();
    for t in tests {
        let id = t["id"].as_str().expect("a test id").to_owned();
        let prev = got.insert(id.clone(), t["outcome"].as_str().unwrap_or("none").to_owned());
        assert!(prev.is_none(), "{id} counted twice");
    }
    got
}

/// The result of one client invocation.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the `shardgate` client with `args`.
pub fn client(args: &[&str]) -> Ran {
    let out = Command::new(bin("shardgate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("failed to run shardgate");
    Ran::from(out)
}

pub struct ClusterBuilder {
    /// The coordinator's `--db`, when the test chooses it.
    db: Option<PathBuf>,
    /// On a PostgreSQL database whatever `SHARDGATE_TEST_STORE` says.
    postgres: bool,
    /// Runner profiles (TOML) every worker gets with `--runners`.
    runners: Option<String>,
    workers: usize,
    slots: u32,
    lease: String,
    heartbeat: String,
    proxied: bool,
    worker_env: Vec<(String, String)>,
    coordinator_args: Vec<String>,
    tokens: bool,
    /// TLS, with mTLS for workers when true.
    tls: Option<bool>,
}

/// The tokens of a cluster started [`ClusterBuilder::with_tokens`]: name and role. The workers
/// use `fleet`; the cluster's client `ops`.
pub const TOKENS: &[(&str, &str)] = &[
    ("fleet", "worker"),
    ("rogue", "worker"),
    ("ci", "trigger"),
    ("other-ci", "trigger"),
    ("board", "viewer"),
    ("ops", "admin"),
];

impl ClusterBuilder {
    /// Credentials: the coordinator gets a tokens file with [`TOKENS`] (made with
    /// `shardgate token new`), the workers the `fleet` token, the cluster's client `ops`.
    /// Runs the coordinator on this `--db` (a PostgreSQL URL through a proxy, say).
    pub fn db(mut self, db: &str) -> Self {
        self.db = Some(PathBuf::from(db));
        self
    }

    /// Runs the coordinator(s) on a new PostgreSQL database (standbys need one).
    pub fn on_postgres(mut self) -> Self {
        self.postgres = true;
        self
    }

    pub fn with_tokens(mut self) -> Self {
        self.tokens = true;
        self
    }

    /// TLS on the coordinator's ports with test certificates ([`crate::certs`]); with `mtls`
    /// the workers must present their client certificate. Clients and workers trust the CA.
    pub fn with_tls(mut self, mtls: bool) -> Self {
        self.tls = Some(mtls);
        self
    }

    /// Extra arguments for the coordinator (every start).
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub fn runners(mut self, toml: &str) -> Self {
        self.runners = Some(toml.to_owned());
        self
    }

    pub fn slots(mut self, n: u32) -> Self {
        self.slots = n;
        self
    }

    /// The coordinator's lease and heartbeat interval (defaults 3 s and 300 ms).
    pub fn lease(mut self, lease: &str, heartbeat: &str) -> Self {
        self.lease = lease.to_owned();
        self.heartbeat = heartbeat.to_owned();
        self
    }

    /// Every worker reaches the coordinator through a [`Proxy`] of its own, so that it can be
    /// partitioned.
    pub fn proxied(mut self) -> Self {
        self.proxied = true;
        self
    }

    /// An environment variable for every worker process.
    pub fn worker_env(mut self, key: &str, value: &str) -> Self {
        self.worker_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the coordinator and the workers, and waits until every worker is live.
    pub fn start(mut self) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut secrets = std::collections::BTreeMap::new();
        let certs = self.tls.map(|mtls| {
            let certs = crate::certs::make(dir.path());
            let path = |p: &PathBuf| p.display().to_string();
            self.coordinator_args.extend([
                "--tls-cert".to_owned(),
                path(&certs.server_cert),
                "--tls-key".to_owned(),
                path(&certs.server_key),
            ]);
            self.worker_env
                .push(("SHARDGATE_CA_CERT".into(), path(&certs.ca)));
            if mtls {
                self.coordinator_args
                    .extend(["--client-ca".to_owned(), path(&certs.ca)]);
                self.worker_env
                    .push(("SHARDGATE_TLS_CERT".into(), path(&certs.worker_cert)));
                self.worker_env
                    .push(("SHARDGATE_TLS_KEY".into(), path(&certs.worker_key)));
            }
            certs
        });
        if self.tokens {
            let mut file = String::new();
            for (name, role) in TOKENS {
                let made = client(&["token", "new", "--name", name, "--role", role]);
                assert_eq!(made.code, 0, "token new: {}", made.stderr);
                let (secret, table) = made.stdout.split_once('\n').unwrap();
                secrets.insert(name.to_string(), secret.trim().to_owned());
                file.push_str(table);
            }
            let path = dir.path().join("tokens.toml");
            std::fs::write(&path, file).unwrap();
            self.coordinator_args
                .extend(["--tokens".to_owned(), path.display().to_string()]);
            self.worker_env
                .push(("SHARDGATE_TOKEN".into(), secrets["fleet"].clone()));
        }
        let root = dir.path().join("suite");
        std::fs::create_dir(&root).unwrap();
        let mut c = Cluster {
            db: if let Some(db) = self.db.clone() {
                db
            } else if self.postgres {
                PathBuf::from(crate::postgres::PgServer::shared().database())
            } else {
                test_db(dir.path())
            },
            root,
            coordinator: None,
            grpc_addr: String::new(),
            http_addr: String::new(),
            watch_addr: None,
            workers: Vec::new(),
            lease: self.lease,
            heartbeat: self.heartbeat,
            slots: self.slots,
            runners: None,
            proxied: self.proxied,
            worker_env: self.worker_env,
            coordinator_args: self.coordinator_args,
            client_token: secrets.get("ops").cloned(),
            standbys: Vec::new(),
            secrets,
            certs,
            dir,
        };
        if let Some(toml) = &self.runners {
            let path = c.dir.path().join("runners.toml");
            std::fs::write(&path, toml).unwrap();
            c.runners = Some(path);
        }
        c.start_coordinator("127.0.0.1:0");
        for _ in 0..self.workers {
            c.add_worker();
        }
        c.wait_for_live_workers(self.workers);
        c
    }
}

/// Another coordinator on the cluster's database.
struct StandbyProc {
    child: Option<Child>,
    grpc_addr: String,
    http_addr: String,
    db: PathBuf,
    /// Its log's name.
    name: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    /// The exec root every worker serves.
    pub root: PathBuf,
    coordinator: Option<Child>,
    pub grpc_addr: String,
    pub http_addr: String,
    /// The gRPC watch port, when the coordinator was given `--watch-addr`.
    pub watch_addr: Option<String>,
    workers: Vec<WorkerProc>,
    lease: String,
    heartbeat: String,
    slots: u32,
    runners: Option<PathBuf>,
    proxied: bool,
    worker_env: Vec<(String, String)>,
    coordinator_args: Vec<String>,
    /// Secrets by token name (with [`ClusterBuilder::with_tokens`]).
    pub secrets: std::collections::BTreeMap<String, String>,
    /// The token [`Cluster::client`] sends.
    client_token: Option<String>,
    /// Other coordinators on the same database, with their ready lines.
    standbys: Vec<StandbyProc>,
    /// The test certificates (with [`ClusterBuilder::with_tls`]).
    pub certs: Option<crate::certs::Certs>,
}

/// One worker: its process (absent while it is down) and, when proxied, its link.
struct WorkerProc {
    name: String,
    child: Option<Child>,
    proxy: Option<Proxy>,
    starts: u32,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            db: None,
            postgres: false,
            runners: None,
            workers: 3,
            slots: 2,
            lease: "3s".into(),
            heartbeat: "300ms".into(),
            proxied: false,
            worker_env: Vec::new(),
            coordinator_args: Vec::new(),
            tokens: false,
            tls: None,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.certs.is_some() { "https" } else { "http" };
        let mut url = format!("{scheme}://{}", self.grpc_addr);
        for s in &self.standbys {
            url.push_str(&format!(",{scheme}://{}", s.grpc_addr));
        }
        url
    }

    /// `--ca-cert FILE` when the cluster has TLS.
    fn ca_args(&self) -> Vec<String> {
        self.certs
            .iter()
            .flat_map(|c| ["--ca-cert".to_owned(), c.ca.display().to_string()])
            .collect()
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    /// Starts the coordinator on `grpc` (use the previous address to come back on the same
    /// port) and reads the addresses it prints once it listens.
    pub fn start_coordinator(&mut self, grpc: &str) {
        let (child, ready) = self.spawn_coordinator(grpc, &self.db, "coordinator");
        self.grpc_addr = ready["grpc_addr"].as_str().unwrap().to_owned();
        self.http_addr = ready["http_addr"].as_str().unwrap().to_owned();
        self.watch_addr = ready["watch_addr"].as_str().map(str::to_owned);
        self.coordinator = Some(child);
    }

    /// Starts another coordinator on the same database (PostgreSQL: it stands by while the
    /// first leads). Workers and clients started after it are given both addresses. Returns
    /// its ready line (addresses and role).
    pub fn start_standby(&mut self) -> serde_json::Value {
        let db = self.db.clone();
        self.start_standby_on(&db)
    }

    /// The same, reaching the database by `db` (a URL through a proxy of its own, say).
    pub fn start_standby_on(&mut self, db: &Path) -> serde_json::Value {
        let name = format!("standby-{}", self.standbys.len() + 1);
        let (child, ready) = self.spawn_coordinator("127.0.0.1:0", db, &name);
        self.standbys.push(StandbyProc {
            child: Some(child),
            grpc_addr: ready["grpc_addr"].as_str().unwrap().to_owned(),
            http_addr: ready["http_addr"].as_str().unwrap().to_owned(),
            db: db.to_owned(),
            name,
        });
        ready
    }

    /// The HTTP address of other coordinator `i`.
    pub fn standby_http(&self, i: usize) -> &str {
        &self.standbys[i].http_addr
    }

    /// Kills other coordinator `i` with SIGKILL.
    pub fn kill_standby(&mut self, i: usize) {
        if let Some(mut c) = self.standbys[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts other coordinator `i` again (after it died) on its gRPC port and database; it
    /// comes back as a standby when another leads. Returns its role.
    pub fn restart_standby(&mut self, i: usize) -> String {
        self.kill_standby(i);
        let (addr, db, name) = {
            let s = &self.standbys[i];
            (s.grpc_addr.clone(), s.db.clone(), s.name.clone())
        };
        wait_for("the standby's port to be free", Duration::from_secs(10), || {
            std::net::TcpListener::bind(&addr).ok().map(drop)
        });
        let (child, ready) = self.spawn_coordinator(&addr, &db, &name);
        let s = &mut self.standbys[i];
        s.child = Some(child);
        s.http_addr = ready["http_addr"].as_str().unwrap().to_owned();
        ready["role"].as_str().unwrap_or_default().to_owned()
    }

    /// Other coordinator `i` leads now: it becomes the cluster's coordinator (what `http_json`
    /// and `client` ask first), and the former one (dead or alive) takes its place among the
    /// others.
    pub fn take_over(&mut self, i: usize) {
        let s = &mut self.standbys[i];
        std::mem::swap(&mut self.coordinator, &mut s.child);
        std::mem::swap(&mut self.grpc_addr, &mut s.grpc_addr);
        std::mem::swap(&mut self.http_addr, &mut s.http_addr);
        std::mem::swap(&mut self.db, &mut s.db);
    }

    fn spawn_coordinator(&self, grpc: &str, db: &Path, log: &str) -> (Child, serde_json::Value) {
        let mut child = Command::new(bin("shardgate-coordinator"))
            .args(["--grpc-addr", grpc, "--http-addr", "127.0.0.1:0"])
            .arg("--db")
            .arg(db)
            .args(["--lease", &self.lease, "--heartbeat", &self.heartbeat])
            .args(&self.coordinator_args)
            .env("SHARDGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(self.log(log))
            .spawn()
            .expect("failed to start the coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "coordinator did not report its addresses ({e}): {line:?}\n{}",
                self.logs()
            )
        });
        (child, ready)
    }

    /// Waits up to `timeout` for the coordinator to exit by itself; its exit status.
    pub fn wait_coordinator_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.coordinator.as_mut()?;
        let status = poll_until(Instant::now() + timeout, || c.try_wait().ok().flatten())?;
        self.coordinator = None;
        Some(status)
    }

    /// The process id of the running coordinator.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(|c| c.id())
    }

    /// Kills the coordinator with SIGKILL: no chance to flush or say goodbye.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Kills the coordinator and starts it again on the same port and database.
    pub fn restart_coordinator(&mut self) {
        self.kill_coordinator();
        let addr = self.grpc_addr.clone();
        // The port was just released; binding it again can race with the kernel for a moment.
        wait_for(
            "the coordinator's port to be free",
            Duration::from_secs(10),
            || std::net::TcpListener::bind(&addr).ok().map(drop),
        );
        self.start_coordinator(&addr);
    }

    /// Starts one more worker, named `w<N>`; returns its index.
    pub fn add_worker(&mut self) -> usize {
        let i = self.workers.len();
        let proxy = self
            .proxied
            .then(|| Proxy::start(self.grpc_addr.parse().expect("a socket address")).expect("a proxy"));
        self.workers.push(WorkerProc {
            name: format!("w{}", i + 1),
            child: None,
            proxy,
            starts: 0,
        });
        self.start_worker(i);
        i
    }

    /// Starts worker `i` again after it was killed (same name, a new registration).
    pub fn start_worker(&mut self, i: usize) {
        let w = &self.workers[i];
        assert!(w.child.is_none(), "worker {} is running", w.name);
        let url = match &w.proxy {
            Some(p) => format!("http://{}", p.addr()),
            None => self.url(),
        };
        let log = self.log(&format!("worker-{}", i + 1));
        let child = Command::new(bin("shardgate-worker"))
            .args(["--coordinator", &url, "--name", &w.name])
            .args(["--slots", &self.slots.to_string()])
            .arg("--exec-root")
            .arg(&self.root)
            .args(
                self.runners
                    .iter()
                    .flat_map(|r| [std::ffi::OsStr::new("--runners"), r.as_os_str()]),
            )
            .env("SHARDGATE_LOG", "info")
            .envs(self.worker_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("failed to start a worker");
        let w = &mut self.workers[i];
        w.child = Some(child);
        w.starts += 1;
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub fn worker_name(&self, i: usize) -> &str {
        &self.workers[i].name
    }

    pub fn worker_running(&self, i: usize) -> bool {
        self.workers[i].child.is_some()
    }

    /// The process id of worker `i`, when it is running.
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers[i].child.as_ref().map(Child::id)
    }

    /// Kills worker `i` with SIGKILL (its tests' process groups are left to finish alone, as on
    /// a machine whose agent crashed).
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut c) = self.workers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to worker `i` and waits for it to exit: the drain path.
    pub fn stop_worker(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let mut c = self.workers[i].child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        c.wait().ok()
    }

    /// The proxy between worker `i` and the coordinator (only for a `proxied` cluster).
    pub fn link(&self, i: usize) -> &Proxy {
        self.workers[i]
            .proxy
            .as_ref()
            .expect("the cluster was built with proxied()")
    }

    /// Whether worker `i`'s link is cut (never, for a cluster without proxies).
    pub fn is_cut(&self, i: usize) -> bool {
        self.workers[i].proxy.as_ref().is_some_and(Proxy::is_cut)
    }

    pub fn wait_for_live_workers(&self, n: usize) {
        wait_for(&format!("{n} live workers"), Duration::from_secs(30), || {
            let r = self.client(&["workers", "--json"]);
            (r.code == 0
                && r.json()
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|w| w["state"] == "live")
                    .count()
                    >= n)
                .then_some(())
        });
    }

    /// Runs the client against this cluster's coordinator.
    /// The command's options go last, so subcommands (`quarantine add …`) work too.
    pub fn client(&self, args: &[&str]) -> Ran {
        self.client_with(self.client_token.as_deref(), args)
    }

    /// The client with the token named `name` ("" for none).
    pub fn client_as(&self, name: &str, args: &[&str]) -> Ran {
        let token = self.secrets.get(name).map(String::as_str);
        self.client_with(token, args)
    }

    fn client_with(&self, token: Option<&str>, args: &[&str]) -> Ran {
        let url = self.url();
        let ca = self.ca_args();
        let mut all = args.to_vec();
        all.extend(["--coordinator", &url]);
        all.extend(ca.iter().map(String::as_str));
        if let Some(t) = token {
            all.extend(["--token", t]);
        }
        client(&all)
    }

    /// `run` of the exec runner on `tests` (written to a fresh file) with `--json`, then `extra`
    /// (without `--coordinator`, for a client pointed elsewhere).
    pub fn run_args(&self, tests: &[String], extra: &[&str]) -> Vec<String> {
        let file = self
            .dir
            .path()
            .join(format!("tests-{}.txt", uuid::Uuid::new_v4()));
        std::fs::write(&file, tests.join("\n")).unwrap();
        let mut args: Vec<String> = [
            "run",
            "--runner",
            "exec",
            "--suite",
            "it",
            "--revision",
            "r1",
            "--requested-by",
            "tests",
            "--json",
            "--tests-file",
        ]
        .map(String::from)
        .into();
        args.push(file.to_str().unwrap().to_owned());
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Submits a run of `tests` and follows it to its end (see [`Cluster::run_args`]).
    pub fn run_tests(&self, tests: &[String], extra: &[&str]) -> Ran {
        let args = self.run_args(tests, extra);
        self.client(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The same as [`Cluster::run_tests`] in the background: the client's stdout is piped, its
    /// stderr goes to `stderr`.
    pub fn follow(&self, tests: &[String], extra: &[&str], stderr: Stdio) -> Child {
        Command::new(bin("shardgate"))
            .args(self.run_args(tests, extra))
            .args(["--coordinator", &self.url()])
            .args(self.ca_args())
            .args(self.client_token.iter().flat_map(|t| ["--token", t.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("failed to start the client")
    }

    /// GETs `path` from the coordinator's HTTP API; `None` when it cannot be reached or does not
    /// answer 200 with JSON (it may be restarting).
    pub fn http_json(&self, path: &str) -> Option<serde_json::Value> {
        match http_get_with(&self.http_addr, path, self.client_token.as_deref()) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// How many lines of the workers' logs contain `needle`.
    pub fn worker_log_count(&self, needle: &str) -> usize {
        (1..=self.workers.len())
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("worker-{i}.log")))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    /// Every process's log, for assertion messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} (last lines)\n", e.path().display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(c) = &mut w.child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(c) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in self.standbys.iter_mut().filter_map(|s| s.child.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads the "ready" line a coordinator started with its stdout piped prints (its bound
/// addresses, as JSON), taking its stdout.
pub fn coordinator_ready(child: &mut Child) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("the coordinator's stdout is piped"))
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not the ready line ({e}): {line:?}"))
}
