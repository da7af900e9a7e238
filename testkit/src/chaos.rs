//! The chaos campaign: runs suites on a real cluster while injecting infrastructure faults —
//! SIGKILL of a busy worker, SIGKILL and restart of the coordinator, a worker cut off from the
//! coordinator past its lease and then healed — with every worker duplicating and delaying
//! some of its reports. After each run a history checker compares what was counted with what
//! was submitted and with what a fault-free run gives.
//!
//! Each test is a shell script that appends a line to its own file every time it runs, so the
//! checker also sees how often each test really ran (at-least-once execution) and how much
//! work the faults cost.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::cluster::{Cluster, bin, http_get, poll_until, script};
use crate::postgres::PgServer;
use crate::proxy::Proxy;

#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub seed: u64,
    /// Runs in the campaign, and up to two more when faults are left over (see [`campaign`]).
    pub runs: usize,
    pub workers: usize,
    pub slots: u32,
    /// Tests per run.
    pub tests: usize,
    /// Each test sleeps a duration drawn from this range, in milliseconds.
    pub test_ms: (u64, u64),
    /// The coordinator's lease and heartbeat interval, e.g. `("10s", "2s")` (the defaults).
    pub lease: String,
    pub heartbeat: String,
    /// Probability that a worker sends a report twice, and that it holds one back.
    pub duplicate_reports: f64,
    pub delay_reports: f64,
    pub report_delay: String,
    /// A run that has not ended after this long is a failure of the campaign.
    pub run_deadline: Duration,
    /// Two coordinators on one PostgreSQL database, each reaching it through a proxy of its
    /// own; the faults are then the leader killed, the leader cut off from the database, the
    /// standby killed, and workers killed. Every run asks for a rollout, and the checker also
    /// asserts that each passed run's hook ran at most once (and no failed run's).
    pub failover: bool,
}

impl ChaosConfig {
    /// A campaign small enough for the integration tests (short lease, short tests).
    pub fn quick(seed: u64, runs: usize) -> Self {
        Self {
            seed,
            runs,
            workers: 4,
            slots: 2,
            // Runs of about a second and a half on 8 slots: long enough for a fault to land
            // at its share of the run on a loaded machine.
            tests: 32,
            test_ms: (100, 500),
            lease: "3s".into(),
            heartbeat: "300ms".into(),
            duplicate_reports: 0.2,
            delay_reports: 0.1,
            report_delay: "500ms".into(),
            run_deadline: Duration::from_secs(120),
            failover: false,
        }
    }

    /// The quick campaign with standby coordinators on PostgreSQL (see `failover`).
    pub fn quick_failover(seed: u64, runs: usize) -> Self {
        Self {
            failover: true,
            run_deadline: Duration::from_secs(180),
            ..Self::quick(seed, runs)
        }
    }
}

/// What a campaign saw. Every count but `runs`, `faults` and the timings must be zero.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub runs: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Submitted tests without a counted result.
    pub lost_results: u32,
    /// Tests counted more than once.
    pub double_counted: u32,
    /// Results for tests that were not submitted.
    pub unexpected_results: u32,
    /// Tests counted as run that never ran.
    pub phantom_results: u32,
    /// Tests whose outcome differs from a fault-free run's.
    pub wrong_outcomes: u32,
    /// Runs whose verdict (or exit code) differs from a fault-free run's.
    pub wrong_verdicts: u32,
    /// From a busy worker's death (or cut) to the coordinator taking its shards back.
    pub requeue_times: Vec<Duration>,
    /// The same, by fault (a killed worker's connection closes; a cut one waits for its lease).
    pub requeue_by: BTreeMap<&'static str, Vec<Duration>>,
    /// From the leader's death (or cut from the database) to the standby serving as leader.
    pub failover_times: Vec<Duration>,
    /// Passed runs whose rollout hook ran more than once, or failed runs whose hook ran.
    pub wrong_rollouts: u32,
    /// Rollout hooks that ran (failover campaigns).
    pub rollouts: u32,
    /// Test time run beyond what a fault-free run needs, and the time a fault-free run needs.
    pub extra_ms: u64,
    pub work_ms: u64,
    pub wall: Duration,
    /// One line per problem, naming the seed and run.
    pub problems: Vec<String>,
    /// Faults that found nothing to hit (no live worker at that moment), so were not injected
    /// then (the next run tries them again).
    pub skipped_faults: u32,
    /// The processes' logs of a campaign that found problems.
    pub logs: Vec<String>,
}

impl ChaosReport {
    pub fn merge(&mut self, o: ChaosReport) {
        self.runs += o.runs;
        for (k, v) in o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.lost_results += o.lost_results;
        self.double_counted += o.double_counted;
        self.unexpected_results += o.unexpected_results;
        self.phantom_results += o.phantom_results;
        self.wrong_outcomes += o.wrong_outcomes;
        self.wrong_verdicts += o.wrong_verdicts;
        self.requeue_times.extend(o.requeue_times);
        for (k, v) in o.requeue_by {
            self.requeue_by.entry(k).or_default().extend(v);
        }
        self.failover_times.extend(o.failover_times);
        self.wrong_rollouts += o.wrong_rollouts;
        self.rollouts += o.rollouts;
        self.extra_ms += o.extra_ms;
        self.work_ms += o.work_ms;
        self.wall = self.wall.max(o.wall);
        self.problems.extend(o.problems);
        self.skipped_faults += o.skipped_faults;
        self.logs.extend(o.logs);
    }

    /// True when nothing was lost, double-counted, invented or judged differently.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
            && self.lost_results == 0
            && self.double_counted == 0
            && self.unexpected_results == 0
            && self.phantom_results == 0
            && self.wrong_outcomes == 0
            && self.wrong_verdicts == 0
            && self.wrong_rollouts == 0
    }

    pub fn faults_total(&self) -> u32 {
        self.faults.values().sum()
    }

    /// The `q` quantile of the requeue times.
    pub fn requeue_quantile(&self, q: f64) -> Option<Duration> {
        quantile(&self.requeue_times, q)
    }

    /// The `q` quantile of the requeue times after `fault` (its name).
    pub fn requeue_quantile_of(&self, fault: &str, q: f64) -> Option<Duration> {
        quantile(self.requeue_by.get(fault).map_or(&[][..], Vec::as_slice), q)
    }

    /// The `q` quantile of the failover times.
    pub fn failover_quantile(&self, q: f64) -> Option<Duration> {
        quantile(&self.failover_times, q)
    }
}

fn quantile(v: &[Duration], q: f64) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillWorker,
    Partition,
    RestartCoordinator,
    KillLeader,
    CutLeader,
    KillStandby,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillWorker => "worker killed (SIGKILL)",
            Fault::Partition => "worker partitioned past its lease",
            Fault::RestartCoordinator => "coordinator killed (SIGKILL) and restarted",
            Fault::KillLeader => "leader killed (SIGKILL), standby took over",
            Fault::CutLeader => "leader cut off from PostgreSQL, standby took over",
            Fault::KillStandby => "standby killed (SIGKILL) and restarted",
        }
    }
}

/// One test of a run, as written.
struct Planned {
    id: String,
    ms: u64,
    fails: bool,
    /// Where each execution leaves a line.
    ran: PathBuf,
}

/// Runs a campaign on a cluster of its own and returns what it saw.
pub fn campaign(cfg: &ChaosConfig) -> ChaosReport {
    let started = Instant::now();
    let mut builder = Cluster::builder()
        .workers(if cfg.failover { 0 } else { cfg.workers })
        .slots(cfg.slots)
        .lease(&cfg.lease, &cfg.heartbeat)
        .worker_env(
            "SHARDGATE_FAULT_DUPLICATE_REPORTS",
            &cfg.duplicate_reports.to_string(),
        )
        .worker_env("SHARDGATE_FAULT_DELAY_REPORTS", &cfg.delay_reports.to_string())
        .worker_env("SHARDGATE_FAULT_DELAY", &cfg.report_delay);
    let mut failover = None;
    if cfg.failover {
        let f = Failover::new();
        let hook = f.hooks.display().to_string();
        builder = builder.db(&f.urls[0]).coordinator_args(&[
            "--rollout-command",
            &serde_json::json!(["sh", "-c", format!("echo \"$RUN_ID\" >> '{hook}'")]).to_string(),
        ]);
        failover = Some(f);
    } else {
        builder = builder.proxied();
    }
    let mut cluster = builder.start();
    if let Some(f) = &failover {
        cluster.start_standby_on(Path::new(&f.urls[1]));
        for _ in 0..cfg.workers {
            cluster.add_worker();
        }
        cluster.wait_for_live_workers(cfg.workers);
    }
    let cluster = &mut cluster;
    let mut report = ChaosReport::default();
    // Faults a run ended before (or that found nothing to hit) are injected in the next one
    // instead, with up to two runs more for those the last one left: on a loaded machine a
    // run can finish early, and the campaign still injects what its seed planned.
    let mut carried = Vec::new();
    for k in 0..cfg.runs + 2 {
        if k >= cfg.runs && carried.is_empty() {
            break;
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(k as u64));
        carried = one_run(cluster, failover.as_ref(), cfg, k, &mut rng, carried, &mut report);
        report.runs += 1;
    }
    if let Some(f) = &failover {
        f.check_rollouts(&mut report);
    }
    report.wall = started.elapsed();
    for (needle, kind) in [
        ("fault: sent a report twice", "report duplicated"),
        ("fault: holding a report back", "report delayed"),
    ] {
        let n = cluster.worker_log_count(needle) as u32;
        if n > 0 {
            report.faults.insert(kind, n);
        }
    }
    if !report.is_clean() {
        report
            .logs
            .push(format!("logs of seed {}:\n{}", cfg.seed, cluster.logs()));
    }
    report
}

fn plan_suite(root: &Path, k: usize, cfg: &ChaosConfig, rng: &mut StdRng) -> Vec<Planned> {
    // Half the runs have one failing test, so both verdicts are checked.
    let failing = rng.random_bool(0.5).then(|| rng.random_range(0..cfg.tests));
    let ran_dir = root.join(format!("ran-{k}"));
    std::fs::create_dir_all(&ran_dir).unwrap();
    (0..cfg.tests)
        .map(|i| {
            let id = format!("r{k}/t{i:03}.sh");
            let ms = rng.random_range(cfg.test_ms.0..=cfg.test_ms.1);
            let fails = failing == Some(i);
            let ran = ran_dir.join(format!("{i}"));
            script(
                root,
                &id,
                &format!(
                    "echo ran >> '{}'\nsleep {}.{:03}\nexit {}",
                    ran.display(),
                    ms / 1000,
                    ms % 1000,
                    u8::from(fails)
                ),
            );
            Planned { id, ms, fails, ran }
        })
        .collect()
}

fn one_run(
    cluster: &mut Cluster,
    failover: Option<&Failover>,
    cfg: &ChaosConfig,
    k: usize,
    rng: &mut StdRng,
    carried: Vec<Fault>,
    report: &mut ChaosReport,
) -> Vec<Fault> {
    let tag = format!("seed {} run {k}", cfg.seed);
    let suite = plan_suite(&cluster.root, k, cfg, rng);
    let list = cluster.dir.path().join(format!("tests-{k}.txt"));
    let ids: Vec<&str> = suite.iter().map(|t| t.id.as_str()).collect();
    std::fs::write(&list, ids.join("\n")).unwrap();
    let revision = format!("chaos-{}-{k}", cfg.seed);
    let stderr = std::fs::File::create(cluster.dir.path().join(format!("client-{k}.log"))).unwrap();
    let mut follower = Command::new(bin("shardgate"))
        .args(["run", "--coordinator", &cluster.url(), "--runner", "exec"])
        .args(["--suite", "chaos", "--revision", &revision, "--json"])
        .args(["--reconnect-for", "120s", "--tests-file"])
        .arg(&list)
        .args(if failover.is_some() {
            &["--rollout"][..]
        } else {
            &[]
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("failed to start the client");

    // One to three faults, at most two of which take a worker away (the rest carry on to the
    // next run), each once a random share of the run is done; then those carried over.
    let n = rng.random_range(1..=3);
    let mut worker_faults = 0;
    let mut plan = Vec::new();
    let mut left = Vec::new();
    let mut carried = carried.into_iter();
    for i in 0.. {
        let f = if i < n {
            match (failover.is_some(), rng.random_range(0..10)) {
                (false, 0..=3) => Fault::KillWorker,
                (false, 4..=6) => Fault::Partition,
                (false, _) => Fault::RestartCoordinator,
                (true, 0..=2) => Fault::KillWorker,
                (true, 3..=5) => Fault::KillLeader,
                (true, 6..=7) => Fault::CutLeader,
                (true, _) => Fault::KillStandby,
            }
        } else if let Some(f) = carried.next() {
            f
        } else {
            break;
        };
        if f == Fault::KillWorker || f == Fault::Partition {
            if worker_faults == 2 {
                left.push(f);
                continue;
            }
            worker_faults += 1;
        }
        plan.push((f, rng.random_range(0.05..0.7f64)));
    }
    plan.sort_by(|a, b| a.1.total_cmp(&b.1));
    let deadline = Instant::now() + cfg.run_deadline;
    let mut plan = plan.into_iter();
    while let Some((fault, at)) = plan.next() {
        if !wait_progress(cluster, &revision, at, deadline) {
            left.push(fault);
            left.extend(plan.map(|(f, _)| f));
            break;
        }
        if let Some(f) = failover
            && matches!(fault, Fault::KillLeader | Fault::CutLeader | Fault::KillStandby)
        {
            match f.inject(cluster, fault) {
                Ok(took) => {
                    *report.faults.entry(fault.name()).or_default() += 1;
                    report.failover_times.extend(took);
                }
                Err(e) => report.problems.push(format!("{tag}: {}: {e}", fault.name())),
            }
            continue;
        }
        match inject(cluster, fault, rng, deadline) {
            Ok(Some(requeue)) => {
                *report.faults.entry(fault.name()).or_default() += 1;
                report.requeue_times.extend(requeue);
                if let Some(d) = requeue {
                    report.requeue_by.entry(fault.name()).or_default().push(d);
                }
            }
            Ok(None) => {
                // Nothing to hit (every worker down or not yet back): tried again next run.
                report.skipped_faults += 1;
                left.push(fault);
            }
            Err(e) => report.problems.push(format!("{tag}: {}: {e}", fault.name())),
        }
    }
    let Some(status) = poll_until(deadline, || follower.try_wait().unwrap()) else {
        kill(&mut follower);
        report.problems.push(format!(
            "{tag}: the run did not end within {:?}",
            cfg.run_deadline
        ));
        return left;
    };
    let mut stdout = String::new();
    use std::io::Read;
    follower
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    if let Some(f) = failover
        && let Ok(doc) = serde_json::from_str::<serde_json::Value>(&stdout)
    {
        f.verdicts.lock().unwrap().insert(
            doc["run_id"].as_str().unwrap_or_default().to_owned(),
            doc["verdict"].as_str().unwrap_or_default().to_owned(),
        );
    }
    check(&tag, &suite, status.code(), &stdout, report);
    left
}

fn kill(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// The run of `revision` as the coordinator's HTTP API shows it.
fn run_of(cluster: &Cluster, revision: &str) -> Option<serde_json::Value> {
    let runs = cluster.http_json("/api/runs?limit=5")?;
    runs.as_array()?
        .iter()
        .find(|r| r["revision"] == revision)
        .cloned()
}

/// Waits until `share` of the run's tests have a result; false when the run ended first.
fn wait_progress(cluster: &Cluster, revision: &str, share: f64, deadline: Instant) -> bool {
    poll_until(deadline, || {
        let run = run_of(cluster, revision)?;
        if run["finished_at_ms"].as_u64().unwrap_or(0) > 0 {
            return Some(false);
        }
        let c = &run["counts"];
        let total = c["total"].as_u64().unwrap_or(0);
        let open = ["queued", "running", "assigned"]
            .iter()
            .map(|k| c[*k].as_u64().unwrap_or(0))
            .sum::<u64>();
        (total > 0 && (total - open) as f64 >= share * total as f64).then_some(true)
    })
    .unwrap_or(false)
}

/// The coordinator's view of the workers: (worker id, name, state, busy slots).
fn workers(cluster: &Cluster) -> Vec<(String, String, String, u64)> {
    let Some(v) = cluster.http_json("/api/workers?include_gone=true") else {
        return Vec::new();
    };
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|w| {
                    (
                        w["worker_id"].as_str().unwrap_or_default().to_owned(),
                        w["name"].as_str().unwrap_or_default().to_owned(),
                        w["state"].as_str().unwrap_or_default().to_owned(),
                        w["busy_slots"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Injects `fault`; returns how long the coordinator took to take back a busy worker's shards
/// (`Some(None)` for a fault that costs no shard), or `None` when there was nothing to hit.
fn inject(
    cluster: &mut Cluster,
    fault: Fault,
    rng: &mut StdRng,
    deadline: Instant,
) -> Result<Option<Option<Duration>>, String> {
    if fault == Fault::RestartCoordinator {
        cluster.restart_coordinator();
        return Ok(Some(None));
    }
    // A busy, live worker whose process runs, so that the fault costs something.
    let by_name: HashMap<String, usize> = (0..cluster.worker_count())
        .filter(|&i| cluster.worker_running(i) && !cluster.is_cut(i))
        .map(|i| (cluster.worker_name(i).to_owned(), i))
        .collect();
    let live: Vec<(String, usize, u64)> = workers(cluster)
        .into_iter()
        .filter(|w| w.2 == "live")
        .filter_map(|(id, name, _, busy)| by_name.get(&name).map(|&i| (id, i, busy)))
        .collect();
    let busy: Vec<&(String, usize, u64)> = live.iter().filter(|w| w.2 > 0).collect();
    let Some((id, i, _)) = (if busy.is_empty() {
        live.get(rng.random_range(0..live.len().max(1))).cloned()
    } else {
        Some(busy[rng.random_range(0..busy.len())].clone())
    }) else {
        // Every worker is down, cut off or not yet back after a coordinator restart.
        return Ok(None);
    };
    let was_busy = !busy.is_empty();
    let t0 = Instant::now();
    match fault {
        Fault::KillWorker => {
            cluster.kill_worker(i);
            // Its replacement registers at once, as a supervisor would restart it.
            cluster.start_worker(i);
        }
        Fault::Partition => cluster.link(i).cut(),
        _ => unreachable!("coordinator faults are injected elsewhere"),
    }
    // The coordinator takes the shards back when their lease expires.
    let requeued = poll_until(deadline, || {
        workers(cluster)
            .into_iter()
            .any(|w| w.0 == id && w.3 == 0)
            .then(|| t0.elapsed())
    });
    if fault == Fault::Partition {
        // Past the lease: the worker's next reports are refused; then it takes new work.
        cluster.link(i).heal();
    }
    match requeued {
        Some(d) => Ok(Some(was_busy.then_some(d))),
        None => Err(format!("worker {id}'s shards were never taken back")),
    }
}

/// Two coordinators on one PostgreSQL database, each through a proxy of its own, and the file
/// their rollout hook writes each run id to.
struct Failover {
    urls: [String; 2],
    proxies: [Proxy; 2],
    hooks: PathBuf,
    _dir: tempfile::TempDir,
    /// The verdict of each run that asked for a rollout, by run id.
    verdicts: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Failover {
    fn new() -> Self {
        let pg = PgServer::shared();
        let direct = pg.database();
        let name = direct.rsplit('/').next().expect("a database name").to_owned();
        let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", pg.port()).parse().expect("an address");
        let proxies = [
            Proxy::start(upstream).expect("a proxy"),
            Proxy::start(upstream).expect("a proxy"),
        ];
        let urls = [0, 1].map(|i| format!("postgres://postgres@{}/{name}", proxies[i].addr()));
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self {
            urls,
            proxies,
            hooks: dir.path().join("rollouts.txt"),
            _dir: dir,
            verdicts: Default::default(),
        }
    }

    /// The proxy the cluster's current leader reaches the database through.
    fn leader_proxy(&self, cluster: &Cluster) -> usize {
        self.urls
            .iter()
            .position(|u| Path::new(u) == cluster.db)
            .expect("the leader's database URL is one of ours")
    }

    /// Injects a coordinator fault; returns the failover time when the lead changed hands.
    fn inject(&self, cluster: &mut Cluster, fault: Fault) -> Result<Option<Duration>, String> {
        let t0 = Instant::now();
        match fault {
            Fault::KillStandby => {
                cluster.kill_standby(0);
                let role = cluster.restart_standby(0);
                return (role == "standby")
                    .then_some(None)
                    .ok_or_else(|| format!("the restarted standby came back as {role}"));
            }
            Fault::KillLeader => cluster.kill_coordinator(),
            Fault::CutLeader => {
                let p = self.leader_proxy(cluster);
                self.proxies[p].cut();
                let exited = cluster.wait_coordinator_exit(Duration::from_secs(60));
                self.proxies[p].heal();
                match exited.map(|s| s.code()) {
                    Some(Some(70)) => {}
                    other => return Err(format!("the cut-off leader did not stop with 70: {other:?}")),
                }
            }
            _ => unreachable!("not a coordinator fault"),
        }
        let took = poll_until(t0 + Duration::from_secs(60), || {
            matches!(http_get(cluster.standby_http(0), "/readyz"), Ok((200, _))).then(|| t0.elapsed())
        })
        .ok_or("the standby did not take the lead within 60 s")?;
        cluster.take_over(0);
        // The old leader comes back, as a supervisor would restart it, and stands by.
        let role = cluster.restart_standby(0);
        if role != "standby" {
            return Err(format!("the old leader came back as {role}"));
        }
        Ok(Some(took))
    }

    /// Each passed run's hook ran at most once, and no failed run's.
    fn check_rollouts(&self, report: &mut ChaosReport) {
        let ran = std::fs::read_to_string(&self.hooks).unwrap_or_default();
        let mut times: BTreeMap<&str, u32> = BTreeMap::new();
        for id in ran.lines().filter(|l| !l.is_empty()) {
            *times.entry(id).or_default() += 1;
        }
        let verdicts = self.verdicts.lock().unwrap();
        report.rollouts += times.values().sum::<u32>();
        for (id, n) in &times {
            let verdict = verdicts.get(*id).map(String::as_str).unwrap_or("unknown");
            if *n > 1 || verdict != "passed" {
                report.wrong_rollouts += 1;
                report
                    .problems
                    .push(format!("run {id} ({verdict}): its rollout hook ran {n} times"));
            }
        }
    }
}

/// Checks one run's report against its suite.
fn check(tag: &str, suite: &[Planned], code: Option<i32>, stdout: &str, report: &mut ChaosReport) {
    let doc: serde_json::Value = match serde_json::from_str(stdout) {
        Ok(v) => v,
        Err(e) => {
            report.problems.push(format!(
                "{tag}: the client printed no report ({e}); exit {code:?}"
            ));
            return;
        }
    };
    let expect_red = suite.iter().any(|t| t.fails);
    let want_verdict = if expect_red { "failed" } else { "passed" };
    if doc["verdict"] != want_verdict || code != Some(if expect_red { 1 } else { 0 }) {
        report.wrong_verdicts += 1;
        report.problems.push(format!(
            "{tag}: verdict {} (exit {code:?}), a fault-free run gives {want_verdict}",
            doc["verdict"]
        ));
    }
    let mut counted: HashMap<&str, Vec<&str>> = HashMap::new();
    for t in doc["tests"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let id = t["id"].as_str().unwrap_or_default();
        let outcome = t["outcome"].as_str().unwrap_or("none");
        match suite.iter().find(|p| p.id == id) {
            Some(p) => counted.entry(p.id.as_str()).or_default().push(outcome),
            None => {
                report.unexpected_results += 1;
                report
                    .problems
                    .push(format!("{tag}: a result for '{id}', which was not submitted"));
            }
        }
    }
    let c = &doc["counts"];
    let sum: u64 = ["passed", "failed", "skipped", "flaky", "timed_out", "infra_error"]
        .iter()
        .map(|k| c[*k].as_u64().unwrap_or(0))
        .sum();
    if sum != suite.len() as u64 || c["total"].as_u64() != Some(suite.len() as u64) {
        report.problems.push(format!(
            "{tag}: counts {c} do not add up to {} tests",
            suite.len()
        ));
    }
    for p in suite {
        let runs = std::fs::read_to_string(&p.ran)
            .map(|s| s.lines().count())
            .unwrap_or(0) as u64;
        // A failing test runs once and then twice more under the default retries.
        let needed = if p.fails { 3 } else { 1 };
        report.work_ms += needed * p.ms;
        report.extra_ms += runs.saturating_sub(needed) * p.ms;
        let outcomes = counted.get(p.id.as_str()).cloned().unwrap_or_default();
        match outcomes.as_slice() {
            [] | ["none"] => {
                report.lost_results += 1;
                report
                    .problems
                    .push(format!("{tag}: '{}' has no counted result", p.id));
                continue;
            }
            [_] => {}
            more => {
                report.double_counted += 1;
                report
                    .problems
                    .push(format!("{tag}: '{}' counted {} times", p.id, more.len()));
            }
        }
        let want = if p.fails { "failed" } else { "passed" };
        if outcomes[0] != want {
            report.wrong_outcomes += 1;
            report.problems.push(format!(
                "{tag}: '{}' is {}, a fault-free run gives {want}",
                p.id, outcomes[0]
            ));
        }
        if runs == 0 {
            report.phantom_results += 1;
            report
                .problems
                .push(format!("{tag}: '{}' is counted but never ran", p.id));
        }
    }
}
