//! Command-line arguments of the three binaries. Every flag can also be set through an
//! environment variable named `SHARDGATE_<FLAG>`; a flag wins over its variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// `--version`: the package version and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SHARDGATE_COMMIT"), ")");

/// A listen address: `IP:PORT`, or `HOST:PORT` resolved once at start (its first address).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("'{s}' is not an address like 0.0.0.0:7070 or localhost:7070: {e}"))?
        .next()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 10s or 500ms: {e}"))
}

/// A duration, or `off` (zero).
fn grace(s: &str) -> Result<Duration, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    duration(s)
}

/// `shardgate-coordinator`: serves the run, worker and dashboard APIs.
#[derive(Debug, Parser)]
#[command(
    name = "shardgate-coordinator",
    version = VERSION,
    after_help = "`shardgate-coordinator backup --db FILE --to FILE` copies a live database (SQLite's online backup) and exits."
)]
pub struct CoordinatorArgs {
    /// A TOML file with the same keys as these flags (`grpc_addr = "0.0.0.0:7070"`); a flag
    /// or its `SHARDGATE_*` variable wins over the file.
    #[arg(long, env = "SHARDGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log lines as text, or as one JSON object per line (for log collectors).
    #[arg(long, env = "SHARDGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Address for gRPC (runs, workers, dashboards, health, reflection).
    #[arg(long, env = "SHARDGATE_GRPC_ADDR", default_value = "127.0.0.1:7070", value_parser = listen_addr)]
    pub grpc_addr: SocketAddr,
    /// Address for HTTP (`/healthz`, the JSON API).
    #[arg(long, env = "SHARDGATE_HTTP_ADDR", default_value = "127.0.0.1:7080", value_parser = listen_addr)]
    pub http_addr: SocketAddr,
    /// A second gRPC address for dashboards and other watchers (every service but the
    /// workers'), served on threads of its own at the lowest CPU priority, so that following
    /// busy runs never slows the workers' calls. Off by default.
    #[arg(long, env = "SHARDGATE_WATCH_ADDR", value_parser = listen_addr, value_name = "HOST:PORT")]
    pub watch_addr: Option<SocketAddr>,
    /// An OpenTelemetry collector's OTLP/gRPC URL (`http://collector:4317`): every run is sent
    /// as a trace whose id is the run's id, with a span per shard attempt and per test result.
    /// Off by default.
    /// `https://` for TLS, with the public web roots or `--otlp-ca-cert`.
    #[arg(long, env = "SHARDGATE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The CA (PEM) an `https://` --otlp-endpoint's certificate must chain to.
    #[arg(
        long,
        env = "SHARDGATE_OTLP_CA_CERT",
        value_name = "FILE",
        requires = "otlp_endpoint"
    )]
    pub otlp_ca_cert: Option<PathBuf>,
    /// Which test results get a span in a run's trace: `all`, `failed` (results that are not
    /// green; the run's and shards' spans still count everything) or `none`.
    #[arg(long, env = "SHARDGATE_OTLP_TEST_SPANS", default_value = "all", value_parser = ["all", "failed", "none"], requires = "otlp_endpoint")]
    pub otlp_test_spans: String,
    /// The database: a SQLite file (created if missing), or a PostgreSQL URL
    /// (`postgres://user:password@host/db`), which several coordinators may share: one leads,
    /// the others stand by.
    #[arg(long, env = "SHARDGATE_DB", default_value = "shardgate.db")]
    pub db: PathBuf,
    /// The gRPC address other machines use to reach this coordinator (default: the bound
    /// `--grpc-addr`). With a PostgreSQL database, standbys send callers there.
    #[arg(long, env = "SHARDGATE_ADVERTISE_GRPC_ADDR", value_name = "HOST:PORT")]
    pub advertise_grpc_addr: Option<String>,
    /// The HTTP address other machines use to reach this coordinator (default: the bound
    /// `--http-addr`).
    #[arg(long, env = "SHARDGATE_ADVERTISE_HTTP_ADDR", value_name = "HOST:PORT")]
    pub advertise_http_addr: Option<String>,
    /// Credentials: a TOML file with one `[tokens.NAME]` table per token (`role` and the
    /// `sha256` of its secret; see `shardgate token new`). Without it the coordinator serves
    /// loopback addresses only.
    #[arg(long, env = "SHARDGATE_TOKENS", value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// Serve without credentials on non-loopback addresses: anyone who reaches the port can
    /// then submit runs, report results and start rollouts.
    #[arg(long, env = "SHARDGATE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// TLS on the gRPC and HTTP ports: the certificate chain (PEM).
    #[arg(long, env = "SHARDGATE_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key (PEM).
    #[arg(long, env = "SHARDGATE_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Most gRPC connections open at once (default: the file limit less 256).
    #[arg(long, env = "SHARDGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// A connection on which nothing moved for this long is closed (live connections are
    /// pinged well within it).
    #[arg(long, env = "SHARDGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,
    /// mTLS: workers must present a certificate signed by this CA (PEM).
    #[arg(long, env = "SHARDGATE_CLIENT_CA", value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: CoordinatorTuning,
    #[command(flatten)]
    pub rollout: RolloutArgs,
}

/// The coordinator's own rollout hooks: a run asks for a rollout, but what runs is named here
/// only, never by a request.
#[derive(Debug, Clone, Args)]
pub struct RolloutArgs {
    /// Rollout command as a JSON array (argv, no shell), e.g. '["/usr/local/bin/deploy",
    /// "--prod"]'. It gets RUN_ID, REVISION, SUITE, REQUESTED_BY, DEPLOY_ID and AUTHORS in its
    /// environment and runs once per passed run that asked for a rollout, one at a time.
    #[arg(long, env = "SHARDGATE_ROLLOUT_COMMAND", value_name = "JSON_ARGV")]
    pub rollout_command: Option<String>,
    /// Or a webhook (plain http://) POSTed the same as JSON; a 2xx answer is success.
    #[arg(long, env = "SHARDGATE_ROLLOUT_URL")]
    pub rollout_url: Option<String>,
    /// Run after a successful rollout (JSON argv, same environment); failing fails the deploy.
    #[arg(long, env = "SHARDGATE_VERIFY_COMMAND", value_name = "JSON_ARGV")]
    pub verify_command: Option<String>,
    /// Run when verify fails (JSON argv, same environment).
    #[arg(long, env = "SHARDGATE_ROLLBACK_COMMAND", value_name = "JSON_ARGV")]
    pub rollback_command: Option<String>,
    /// Longest a hook may run before it is killed and the deploy fails.
    #[arg(long, env = "SHARDGATE_HOOK_TIMEOUT", default_value = "30m", value_parser = duration)]
    pub hook_timeout: Duration,
}

/// Scheduling settings shared by the coordinator binary and `shardgate local`.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorTuning {
    /// Events kept for the slowest watcher before it is sent a fresh snapshot instead
    /// (tests use a small one).
    #[arg(long, env = "SHARDGATE_EVENT_BUFFER", default_value_t = 16 * 1024, hide = true)]
    pub event_buffer: usize,
    /// How long a shard's lease lasts without a heartbeat from its worker.
    #[arg(long, env = "SHARDGATE_LEASE", default_value = "10s", value_parser = duration)]
    pub lease: Duration,
    /// How often workers heartbeat.
    #[arg(long, env = "SHARDGATE_HEARTBEAT", default_value = "2s", value_parser = duration)]
    pub heartbeat: Duration,
    /// A worker whose connection closes (its process died) and that does not call again within
    /// this long loses its shards at once instead of at the end of the lease; `off` leaves it to
    /// the lease (for workers behind a proxy that shares one connection among several).
    #[arg(long, env = "SHARDGATE_DISCONNECT_GRACE", default_value = "1s", value_parser = grace)]
    pub disconnect_grace: Duration,
    /// How many different workers a test may lose (or twice as many hand-outs on fewer
    /// workers) before it is reported as an infrastructure error; also how many shards in a
    /// row a runner may fail the same way before the run stops as errored.
    #[arg(long, env = "SHARDGATE_MAX_INFRA_ATTEMPTS", default_value_t = 3)]
    pub max_infra_attempts: u32,
    /// Runs again of a failed test before it counts as failed, when a run does not say.
    #[arg(long, env = "SHARDGATE_DEFAULT_RETRIES", default_value_t = 2)]
    pub default_retries: u32,
    /// The same for a test that flaked in its suite in the last 30 days.
    #[arg(long, env = "SHARDGATE_DEFAULT_FLAKY_RETRIES", default_value_t = 4)]
    pub default_flaky_retries: u32,
    /// Flake rate at which a test is proposed for quarantine (over at least
    /// --quarantine-min-runs counted runs).
    #[arg(long, env = "SHARDGATE_QUARANTINE_THRESHOLD", default_value_t = 0.05)]
    pub quarantine_threshold: f64,
    #[arg(long, env = "SHARDGATE_QUARANTINE_MIN_RUNS", default_value_t = 10)]
    pub quarantine_min_runs: u32,
    /// Quarantine such tests automatically (recorded as by "shardgate", with the rate).
    #[arg(long, env = "SHARDGATE_AUTO_QUARANTINE")]
    pub auto_quarantine: bool,
    /// Most runs one requester (token) may have queued or running at once.
    #[arg(long, env = "SHARDGATE_MAX_ACTIVE_RUNS", default_value_t = 50)]
    pub max_active_runs: usize,
    /// Most tests without a result one requester may have across its active runs.
    #[arg(long, env = "SHARDGATE_MAX_OPEN_TESTS", default_value_t = 4_000_000)]
    pub max_open_tests: usize,
    /// How long a run may wait with work queued while no live worker can take it (its runner
    /// with its labels) before it ends errored, when the run does not say.
    #[arg(long, env = "SHARDGATE_DEFAULT_QUEUE_TIMEOUT", default_value = "10m", value_parser = duration)]
    pub default_queue_timeout: Duration,
    /// How long the captured output of finished runs' tests is kept (`30d`, `2w`); after
    /// that it is cleared (outcomes, details and times stay). Kept forever when not given.
    #[arg(long, env = "SHARDGATE_KEEP_OUTPUT", value_parser = duration)]
    pub keep_output: Option<Duration>,
}

/// `shardgate-worker`: runs shards for a coordinator.
#[derive(Debug, Parser)]
#[command(name = "shardgate-worker", version = VERSION)]
pub struct WorkerArgs {
    /// A TOML file with the same keys as these flags (`slots = 4`, `redact = ["…"]`); a flag
    /// or its `SHARDGATE_*` variable wins over the file.
    #[arg(long, env = "SHARDGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log lines as text, or as one JSON object per line (for log collectors).
    #[arg(long, env = "SHARDGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The coordinator's gRPC URL; several, comma-separated, for coordinators that share a
    /// PostgreSQL database (the worker follows the one that leads).
    #[arg(long, env = "SHARDGATE_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    #[command(flatten)]
    pub credential: Credential,
    /// A regular expression masked (as `[redacted]`) in test output before it leaves the
    /// worker; repeatable.
    /// (`SHARDGATE_REDACT` takes one pattern per line.)
    #[arg(long, value_name = "REGEX", env = "SHARDGATE_REDACT", value_delimiter = '\n')]
    pub redact: Vec<String>,
    /// mTLS: this worker's certificate (PEM), for a coordinator started with --client-ca.
    #[arg(long, env = "SHARDGATE_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// mTLS: this worker's private key (PEM).
    #[arg(long, env = "SHARDGATE_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name shown in results and dashboards (default: the host name).
    #[arg(long, env = "SHARDGATE_NAME")]
    pub name: Option<String>,
    /// Tests run at once (default: the number of CPUs).
    #[arg(long, env = "SHARDGATE_SLOTS")]
    pub slots: Option<u32>,
    /// Labels runs can select this worker by, as `k=v,k2=v2`.
    #[arg(long, env = "SHARDGATE_LABELS", default_value = "")]
    pub labels: String,
    /// Root directory of the built-in `exec` runner (each executable file under it is a test).
    #[arg(long, env = "SHARDGATE_EXEC_ROOT")]
    pub exec_root: Option<PathBuf>,
    /// TOML file of runner profiles (pytest, JUnit commands, exec roots); see the README.
    #[arg(long, env = "SHARDGATE_RUNNERS")]
    pub runners: Option<PathBuf>,
    /// Check each runner (its directory and program, its listing, and one small shard of a few
    /// listed tests run and read back), print a report per runner and exit: 0 when every
    /// runner is ok, 1 otherwise. Needs no coordinator.
    #[arg(long)]
    pub check: bool,
    /// With --check: the revision given to the setup and the listing.
    #[arg(long, default_value = "HEAD", requires = "check")]
    pub check_revision: String,
    /// With --check: tests run in the sample shard.
    #[arg(long, default_value_t = 3, requires = "check")]
    pub check_sample: usize,
    /// With --check: print the report as JSON.
    #[arg(long, requires = "check")]
    pub json: bool,
    /// At start-up, in the background: `list` checks each runner's directory, program and
    /// listing (no test runs) and tells the coordinator which runners failed, so they get no
    /// shards until a re-check passes (every minute); `off` skips it.
    #[arg(long, env = "SHARDGATE_START_CHECK", value_enum, default_value = "list")]
    pub start_check: StartCheck,
    /// Serve `/healthz` (alive) and `/readyz` (registered and not draining) on this address,
    /// for container probes.
    #[arg(long, env = "SHARDGATE_HEALTH_ADDR", value_parser = listen_addr)]
    pub health_addr: Option<SocketAddr>,
    /// On SIGTERM, how long running tests may finish before they are killed and handed back.
    #[arg(long, env = "SHARDGATE_DRAIN_GRACE", default_value = "30s", value_parser = duration)]
    pub drain_grace: Duration,
    /// Fault injection for the chaos suite: probability of sending a report twice.
    #[arg(
        long,
        env = "SHARDGATE_FAULT_DUPLICATE_REPORTS",
        default_value_t = 0.0,
        hide = true
    )]
    pub fault_duplicate_reports: f64,
    /// Fault injection for the chaos suite: probability of holding a report back.
    #[arg(
        long,
        env = "SHARDGATE_FAULT_DELAY_REPORTS",
        default_value_t = 0.0,
        hide = true
    )]
    pub fault_delay_reports: f64,
    /// Fault injection for the chaos suite: how long a held-back report waits.
    #[arg(long, env = "SHARDGATE_FAULT_DELAY", default_value = "1s", value_parser = duration, hide = true)]
    pub fault_delay: Duration,
}

/// `shardgate-coordinator backup`: copies the database with SQLite's online backup, safe while a
/// coordinator runs on it, and checks the copy's integrity.
#[derive(Debug, Parser)]
#[command(name = "shardgate-coordinator backup", version = VERSION)]
pub struct BackupArgs {
    /// The coordinator's database.
    #[arg(long, env = "SHARDGATE_DB", default_value = "shardgate.db")]
    pub db: PathBuf,
    /// The new file to write (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
}

/// What a worker checks of its runners at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartCheck {
    List,
    Off,
}

/// `shardgate`: submit runs, follow them, and look at the fleet.
#[derive(Debug, Parser)]
#[command(name = "shardgate", version = VERSION, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// Log lines (on stderr) as text, or as one JSON object per line.
    #[arg(long, global = true, env = "SHARDGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub const EXIT_CODES: &str = "Exit codes: 0 the gate passed; 1 the gate failed (a test failed, or the run was cancelled); \
2 usage, connection or infrastructure error, or the run errored.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a run to a coordinator and follow it to its verdict.
    Run(RunArgs),
    /// Run a coordinator and N workers in this process: an exec root, a pytest, Cargo or Go
    /// project, or a runner profile.
    Local(Box<LocalArgs>),
    /// Follow a submitted run to its verdict.
    Watch(RunRef),
    /// Show a run and its results.
    Status(RunRef),
    /// Cancel a run.
    Cancel(CancelArgs),
    /// List recent runs.
    Runs(ListArgs),
    /// List the workers.
    Workers(ListArgs),
    /// List the flakiest tests of a suite, with their flake rates.
    Flaky(FlakyArgs),
    /// Quarantine tests: they still run and are reported, but cannot fail the gate.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// The deploy log: the last deploys, and how often they happen.
    Deploys(DeploysArgs),
    /// Credentials for a coordinator's `--tokens` file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a shell completion script (`shardgate completions bash > /etc/bash_completion.d/shardgate`).
    Completions(CompletionsArgs),
    /// Print a man page in roff (`shardgate man | man -l -`); `--binary` picks another binary's.
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
    /// The binary to complete.
    #[arg(long, value_enum, default_value = "shardgate")]
    pub binary: Binary,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The binary whose page to print.
    #[arg(long, value_enum, default_value = "shardgate")]
    pub binary: Binary,
}

/// One of the three binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Binary {
    Shardgate,
    ShardgateCoordinator,
    ShardgateWorker,
}

impl Binary {
    /// The binary's command line definition.
    pub fn command(self) -> clap::Command {
        use clap::CommandFactory;
        match self {
            Binary::Shardgate => Cli::command(),
            Binary::ShardgateCoordinator => CoordinatorArgs::command(),
            Binary::ShardgateWorker => WorkerArgs::command(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token: prints its secret on the first line, then the table to add to the
    /// coordinator's `--tokens` file (which keeps only the secret's SHA-256).
    New(TokenNewArgs),
}

#[derive(Debug, Args)]
pub struct TokenNewArgs {
    /// The token's name: who acts with it (recorded as who submitted, quarantined, cancelled).
    #[arg(long)]
    pub name: String,
    /// worker, trigger, viewer or admin.
    #[arg(long)]
    pub role: shardgate_common::auth::Role,
}

#[derive(Debug, Args)]
pub struct DeploysArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Show at most this many deploys.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Show only the deploy of this run.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct FlakyArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long, env = "SHARDGATE_SUITE", default_value = "default")]
    pub suite: String,
    /// Show at most this many tests.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// Quarantine a test of a suite.
    Add(QuarantineAdd),
    /// Lift a test's quarantine.
    Remove(QuarantineRef),
    /// List quarantined tests.
    List(QuarantineList),
}

#[derive(Debug, Args)]
pub struct QuarantineAdd {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long, env = "SHARDGATE_SUITE", default_value = "default")]
    pub suite: String,
    /// The test's id, as the run's runner names it.
    pub test_id: String,
    /// Why (shown wherever the quarantine is).
    #[arg(long)]
    pub reason: String,
    /// Who quarantines it (default: $USER, else $LOGNAME).
    #[arg(long, env = "SHARDGATE_REQUESTED_BY")]
    pub by: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct QuarantineRef {
    #[command(flatten)]
    pub conn: Connection,
    #[arg(long, env = "SHARDGATE_SUITE", default_value = "default")]
    pub suite: String,
    pub test_id: String,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct QuarantineList {
    #[command(flatten)]
    pub conn: Connection,
    /// Only this suite (default: every suite).
    #[arg(long)]
    pub suite: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The coordinator's gRPC URL; several, comma-separated, for coordinators that share a
    /// PostgreSQL database (calls go to the one that leads).
    #[arg(long, env = "SHARDGATE_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    #[command(flatten)]
    pub credential: Credential,
}

/// The credential sent to the coordinator (as `authorization: Bearer <secret>`), and how its
/// TLS certificate is checked.
#[derive(Debug, Clone, Args)]
pub struct Credential {
    /// The CA the coordinator's TLS certificate must chain to (with an https:// URL; without it
    /// the public web roots are used).
    #[arg(long, env = "SHARDGATE_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// The token's secret, when the coordinator needs one.
    #[arg(
        long,
        env = "SHARDGATE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file whose first line is the token's secret.
    #[arg(long, env = "SHARDGATE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl Credential {
    /// How TLS is checked (no client certificate).
    pub fn tls(&self) -> shardgate_common::tls::ClientTls {
        shardgate_common::tls::ClientTls {
            ca_cert: self.ca_cert.clone(),
            ..Default::default()
        }
    }

    /// The secret, from `--token` or the first line of `--token-file`.
    pub fn secret(&self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_owned()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read --token-file '{}'", path.display()))?;
        let secret = text.lines().next().unwrap_or_default().trim().to_owned();
        anyhow::ensure!(!secret.is_empty(), "--token-file '{}' is empty", path.display());
        Ok(Some(secret))
    }
}

#[derive(Debug, Clone, Args)]
pub struct Output {
    /// Print one JSON document instead of text.
    #[arg(long, env = "SHARDGATE_JSON")]
    pub json: bool,
}

/// How a run's report is given: text or JSON on stdout, and optionally JUnit XML in a file.
#[derive(Debug, Clone, Args)]
pub struct RunOutput {
    /// Print one JSON document instead of text.
    #[arg(long, env = "SHARDGATE_JSON")]
    pub json: bool,
    /// Also write the run as JUnit XML (Surefire's dialect: flaky runs as `flakyFailure`,
    /// retries of a failed test as `rerunFailure`) to this file.
    #[arg(long, env = "SHARDGATE_JUNIT", value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct TestSource {
    /// File with one test id per line ('#' starts a comment line).
    #[arg(long, env = "SHARDGATE_TESTS_FILE")]
    pub tests_file: Option<PathBuf>,
    /// Let a worker list the suite's tests.
    #[arg(long, env = "SHARDGATE_DISCOVER")]
    pub discover: bool,
}

/// Where `shardgate local`'s tests come from: like [`TestSource`], but a runner that lists its
/// own tests (every kind but `exec`) discovers them when neither is given.
#[derive(Debug, Clone, Args)]
#[group(required = false, multiple = false)]
pub struct LocalTestSource {
    /// File with one test id per line ('#' starts a comment line).
    #[arg(long, env = "SHARDGATE_TESTS_FILE")]
    pub tests_file: Option<PathBuf>,
    /// Let a worker list the suite's tests (the default for runners other than `exec`).
    #[arg(long, env = "SHARDGATE_DISCOVER")]
    pub discover: bool,
}

impl LocalTestSource {
    pub fn to_source(&self) -> TestSource {
        TestSource {
            tests_file: self.tests_file.clone(),
            discover: self.discover,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SubmitOptions {
    /// Suite name (duration and flakiness history are kept per suite).
    #[arg(long, env = "SHARDGATE_SUITE", default_value = "default")]
    pub suite: String,
    /// Revision under test.
    #[arg(long, env = "SHARDGATE_REVISION", default_value = "local")]
    pub revision: String,
    /// Who asked for the run (default: $USER, else $LOGNAME).
    #[arg(long, env = "SHARDGATE_REQUESTED_BY")]
    pub requested_by: Option<String>,
    /// Only workers carrying all these labels (`k=v,…`) may take the run.
    #[arg(long, env = "SHARDGATE_RUN_LABELS", default_value = "")]
    pub labels: String,
    /// Runs with a higher priority get free slots first.
    #[arg(
        long,
        env = "SHARDGATE_PRIORITY",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    /// Per-test timeout (default: the coordinator's, 5 minutes).
    #[arg(long, env = "SHARDGATE_TEST_TIMEOUT", value_parser = duration)]
    pub test_timeout: Option<Duration>,
    /// How long the run may wait with no live worker able to take it (its runner with its
    /// labels) before it ends errored, saying so (default: the coordinator's, 10 minutes).
    #[arg(long, env = "SHARDGATE_RUN_QUEUE_TIMEOUT", value_parser = duration)]
    pub queue_timeout: Option<Duration>,
    /// Runs again of a failed test before it counts as failed (default: the coordinator's, 2);
    /// a test that fails and then passes is reported as flaky.
    #[arg(long, env = "SHARDGATE_RETRIES")]
    pub retries: Option<u32>,
    /// Runs again of a failed test that flaked in this suite in the last 30 days (default: the
    /// coordinator's, 4).
    #[arg(long, env = "SHARDGATE_FLAKY_RETRIES")]
    pub flaky_retries: Option<u32>,
    /// Flaky tests fail the gate.
    #[arg(long, env = "SHARDGATE_STRICT_FLAKY")]
    pub strict_flaky: bool,
    /// Fail the run and cancel its remaining tests as soon as one failure is confirmed.
    #[arg(long, env = "SHARDGATE_FAIL_FAST")]
    pub fail_fast: bool,
    /// Roll the revision out with the coordinator's rollout hook once the gate passes.
    #[arg(long, env = "SHARDGATE_ROLLOUT")]
    pub rollout: bool,
    /// An author of the changes going out, for the deploy log (repeatable; needs --rollout).
    #[arg(long = "author", value_name = "NAME")]
    pub authors: Vec<String>,
    /// With --rollout: after a passed gate, wait for the deploy to end and exit with its
    /// outcome (0 succeeded, 1 failed or rolled back, 2 unknown).
    #[arg(long, env = "SHARDGATE_WAIT_ROLLOUT", requires = "rollout")]
    pub wait_rollout: bool,
    /// Send tests that failed recently first, for an earlier red signal.
    #[arg(long, env = "SHARDGATE_FAIL_FIRST")]
    pub fail_first: bool,
    /// How long to keep reconnecting when the coordinator is unreachable while following.
    #[arg(long, env = "SHARDGATE_RECONNECT_FOR", default_value = "10m", value_parser = duration)]
    pub reconnect_for: Duration,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Name of a runner the workers offer (e.g. `exec`).
    #[arg(long, env = "SHARDGATE_RUNNER")]
    pub runner: String,
    #[command(flatten)]
    pub source: TestSource,
    #[command(flatten)]
    pub submit: SubmitOptions,
    #[command(flatten)]
    pub output: RunOutput,
    /// Submit and print the run's id, without following it (for jobs that should not wait;
    /// `shardgate watch ID` follows it later). Exit code 0 once the run is accepted.
    #[arg(long, env = "SHARDGATE_DETACH", conflicts_with_all = ["junit", "wait_rollout"])]
    pub detach: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("suite_kind").required(true).multiple(false))]
pub struct LocalArgs {
    /// Workers to start.
    #[arg(long, env = "SHARDGATE_WORKERS", default_value_t = 4)]
    pub workers: u32,
    /// Slots of each worker.
    #[arg(long, env = "SHARDGATE_SLOTS", default_value_t = 1)]
    pub slots: u32,
    /// Root directory of the exec runner (each test an executable under it).
    #[arg(long, env = "SHARDGATE_EXEC_ROOT", group = "suite_kind")]
    pub exec_root: Option<PathBuf>,
    /// Runner profiles (the workers' `--runners` TOML); the run uses `--runner`.
    #[arg(long, value_name = "FILE", group = "suite_kind")]
    pub runners: Option<PathBuf>,
    /// Which profile of `--runners` runs the suite (default: the only one).
    #[arg(long, value_name = "NAME", requires = "runners")]
    pub runner: Option<String>,
    /// A pytest project: its rootdir (pytest must be installed). Tests are discovered unless
    /// `--tests-file` names them.
    #[arg(long, value_name = "DIR", group = "suite_kind")]
    pub pytest: Option<PathBuf>,
    /// A Rust workspace run with `cargo test` (test binaries built once, tests sharded).
    #[arg(long, value_name = "DIR", group = "suite_kind")]
    pub cargo_test: Option<PathBuf>,
    /// A Rust workspace run with `cargo nextest` (cargo-nextest must be installed).
    #[arg(long, value_name = "DIR", group = "suite_kind")]
    pub nextest: Option<PathBuf>,
    /// A Go module run with `go test`.
    #[arg(long, value_name = "DIR", group = "suite_kind")]
    pub go_test: Option<PathBuf>,
    /// The database (the history that schedules the next run, records, quarantine). Default:
    /// `.shardgate/local.db` in the project's directory (`--exec-root`, `--pytest`, ... DIR;
    /// the current directory with `--runners`).
    #[arg(long, env = "SHARDGATE_DB")]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub source: LocalTestSource,
    #[command(flatten)]
    pub submit: SubmitOptions,
    #[command(flatten)]
    pub tuning: CoordinatorTuning,
    #[command(flatten)]
    pub output: RunOutput,
}

#[derive(Debug, Args)]
pub struct RunRef {
    #[command(flatten)]
    pub conn: Connection,
    /// The run's id.
    pub run_id: String,
    #[command(flatten)]
    pub output: RunOutput,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// The run's id.
    pub run_id: String,
    /// Why, recorded with the run.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: Connection,
    #[command(flatten)]
    pub output: Output,
    /// Most entries to show, newest first (runs: at most 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_clis_are_well_formed() {
        Cli::command().debug_assert();
        CoordinatorArgs::command().debug_assert();
        WorkerArgs::command().debug_assert();
    }

    #[test]
    fn completions_and_man_pages_cover_every_binary() {
        use clap::ValueEnum;
        for b in Binary::value_variants() {
            for shell in clap_complete::Shell::value_variants() {
                let mut cmd = b.command();
                let name = cmd.get_name().to_owned();
                let mut out = Vec::new();
                clap_complete::generate(*shell, &mut cmd, name.clone(), &mut out);
                assert!(String::from_utf8(out).unwrap().contains(&name), "{b:?} {shell}");
            }
            let mut page = Vec::new();
            clap_mangen::Man::new(b.command()).render(&mut page).unwrap();
            let page = String::from_utf8(page).unwrap();
            assert!(page.contains(".SH OPTIONS"), "{b:?}");
            assert!(page.contains(VERSION), "the page names the version and commit");
        }
    }

    #[test]
    fn a_run_needs_exactly_one_test_source() {
        let base = ["shardgate", "run", "--runner", "exec"];
        assert!(Cli::try_parse_from(base).is_err());
        let both = [&base[..], &["--discover", "--tests-file", "x"]].concat();
        assert!(Cli::try_parse_from(both).is_err());
        let one = [&base[..], &["--discover"]].concat();
        assert!(Cli::try_parse_from(one).is_ok());
    }
}
