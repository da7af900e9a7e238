//! nextest's tests started the way nextest starts them, without a nextest start per shard.
//!
//! nextest runs every test as a process of its own: the test binary with `--exact NAME
//! --nocapture`, in the package's directory, in an environment it builds (cargo's `[env]`, the
//! package's `CARGO_PKG_*`, `OUT_DIR`, the dynamic library path, `NEXTEST_*`...). A shard that
//! starts nextest pays for nextest's start and for the listing of every test binary it touches
//! (10 ms plus about 4 ms a binary) on top of its tests. Here the worker does what nextest
//! would, test by test, from a **record of how nextest starts each binary**:
//!
//! - Once per run, after the build is recorded, the worker lists the suite with nextest under
//!   shardgate's profile, with a target runner of its own (`CARGO_TARGET_<HOST>_RUNNER`: this
//!   very program with [`RECORD_START`]): nextest lists each test binary through it, and it
//!   writes down the program, the directory and the whole environment nextest gave it before
//!   it becomes the binary (not a shell script: a shell drops variables whose names are not
//!   shell names, such as cargo's `CARGO_BIN_EXE_<name-with-dashes>`). That is nextest's
//!   environment for the binary's tests, built by nextest itself, minus what nextest adds per
//!   test ([`per_test_env`], the variables of nextest 0.9.143). The listing it makes is the
//!   run's listing where the profile lists as by default.
//! - A shard's tests that the record covers run one by one from it; each result is sent as
//!   its test ends. The rest (a binary the record lacks, a test the listing did not name) and
//!   any test whose output does not say that libtest ran and passed exactly it (`test result:
//!   ok. 1 passed`: a harness of its own, a name that matched nothing) go to nextest as before.
//!   So a pass always comes from libtest's own words about that one test, or from nextest.
//! - It is used only where nextest would run nothing else: no nextest configuration in the
//!   workspace (`.config/nextest.toml`: overrides, setup scripts, wrapper scripts, test
//!   groups, extra arguments), no target runner in cargo's configuration or environment (ours
//!   would replace it), and not when `SHARDGATE_NEXTEST_DIRECT=0` is in the profile's or the
//!   worker's environment. Any of these, or a record that failed, leaves every shard to nextest.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use shardgate_common::Outcome;
use tracing::{debug, info};

use super::TestRun;
use super::batch::{CommandRunner, Shard};
use crate::process::{self, Ending};

/// How nextest starts the tests of one binary.
#[derive(Debug, Clone, PartialEq)]
struct Launch {
    program: PathBuf,
    cwd: PathBuf,
    /// The nextest run it was recorded in (`NEXTEST_RUN_ID`), for `NEXTEST_ATTEMPT_ID`.
    run_id: String,
    /// The whole environment (the child's is cleared first), without the per-test variables.
    env: Vec<(OsString, OsString)>,
}

/// What a run's record holds for direct starts.
#[derive(Debug, Default)]
pub(crate) struct Launches {
    /// By binary id.
    by_binary: HashMap<String, Launch>,
    /// The ids nextest's listing under shardgate's profile named (`<binary-id> <test name>`).
    tests: HashSet<String>,
    /// The same, in nextest's order.
    listing: Vec<String>,
}

impl Launches {
    /// The suite as nextest lists it under shardgate's profile.
    pub(crate) fn listing(&self) -> &[String] {
        &self.listing
    }
}

/// Everything a record of the starts and the listing is made from, to keep the last run's when
/// none of it changed (a later run of unchanged code then lists nothing): nextest's record of
/// the build (binary paths, build script directories...), cargo's metadata, the environment
/// cargo adds, the content of cargo's configuration files (`[env]`), and each test binary's
/// size, inode and times, which any rebuild changes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Inputs(Vec<u8>);

impl Inputs {
    /// `None` when some of it cannot be read: the record is then made again.
    pub(crate) fn read(
        runner: &CommandRunner,
        binaries: &str,
        metadata: &Path,
        cargo_env: &str,
    ) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let mut all = binaries.as_bytes().to_vec();
        all.extend(std::fs::read(metadata).ok()?);
        all.extend(cargo_env.as_bytes());
        let home = cargo_home(|k| super::nextest::runner_env(runner, k));
        for f in cargo_configs(&runner.config().workdir, home.as_deref()) {
            if let Ok(text) = std::fs::read(&f) {
                all.extend(f.as_os_str().as_encoded_bytes());
                all.extend(text);
            }
        }
        let v: serde_json::Value = serde_json::from_str(binaries).ok()?;
        for b in v["rust-binaries"].as_object()?.values() {
            let path = b["binary-path"].as_str()?;
            let m = std::fs::metadata(path).ok()?;
            let stamp = (
                m.len(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            );
            all.extend(format!("\0{path}{stamp:?}").as_bytes());
        }
        Some(Self(all))
    }
}

/// Why direct starts are not used for a runner, if they are not.
pub(crate) fn refusal(runner: &CommandRunner, env: &[(OsString, OsString)]) -> Option<String> {
    let var = |name: &str| env_var(runner, env, name);
    if var("SHARDGATE_NEXTEST_DIRECT").is_some_and(|v| v.to_string_lossy().trim() == "0") {
        return Some("SHARDGATE_NEXTEST_DIRECT=0".into());
    }
    // The workspace's root is the working directory or above it.
    let workdir = &runner.config().workdir;
    if let Some(f) = workdir
        .ancestors()
        .map(|d| d.join(".config/nextest.toml"))
        .find(|f| f.exists())
    {
        return Some(format!("a nextest configuration ({})", f.display()));
    }
    target_runner_refusal(runner, env)
}

/// Why a target runner of shardgate's own cannot record how cargo starts the test binaries,
/// if it cannot: the project or the worker has one already (in the environment, `env`
/// included, or in a cargo configuration file cargo would read).
pub(crate) fn target_runner_refusal(runner: &CommandRunner, env: &[(OsString, OsString)]) -> Option<String> {
    let var = |name: &str| env_var(runner, env, name);
    let given = runner.config().env.keys().cloned().map(OsString::from);
    let names = std::env::vars_os()
        .map(|(k, _)| k)
        .chain(given)
        .chain(env.iter().map(|(k, _)| k.clone()));
    for name in names {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_TARGET_") && name.ends_with("_RUNNER") {
            return Some(format!("a target runner is set ({name})"));
        }
    }
    let workdir = &runner.config().workdir;
    let home = cargo_home(var);
    cargo_config_runner(workdir, home.as_deref())
        .map(|f| format!("cargo's configuration may set a target runner ({})", f.display()))
}

/// A variable of `env` (the last setting wins), else of the runner's environment.
fn env_var(runner: &CommandRunner, env: &[(OsString, OsString)], name: &str) -> Option<OsString> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .or_else(|| super::nextest::runner_env(runner, name))
}

/// Cargo's home in an environment (`var`): `CARGO_HOME`, else `~/.cargo`.
fn cargo_home(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// The configuration files cargo would read for `workdir`: the `.cargo/config[.toml]` of the
/// directory and each one above it, then cargo's home.
fn cargo_configs(workdir: &Path, cargo_home: Option<&Path>) -> Vec<PathBuf> {
    let dirs = workdir.ancestors().map(|d| d.join(".cargo"));
    dirs.chain(cargo_home.map(Path::to_path_buf))
        .flat_map(|d| [d.join("config.toml"), d.join("config")])
        .collect()
}

/// A cargo configuration file cargo would read for `workdir` that mentions a runner.
fn cargo_config_runner(workdir: &Path, cargo_home: Option<&Path>) -> Option<PathBuf> {
    cargo_configs(workdir, cargo_home)
        .into_iter()
        .find(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("runner")))
}

/// The first argument that makes `shardgate-worker` (or `shardgate`, whose local workers run
/// inside it) the target runner nextest starts each test binary through while a run's record
/// is made: `RECORD_START DIR PROGRAM ARGS…` writes what it was started with to files named
/// after its process id in `DIR` ([`write_start`]), then becomes `PROGRAM ARGS…`.
pub const RECORD_START: &str = "__shardgate-record-start";

/// Called first thing by the binaries that run workers: when this process was started with
/// `__shardgate-record-start`, records the start and becomes the program it names, never returning;
/// otherwise returns at once.
pub fn record_start_if_asked() {
    use std::os::unix::process::CommandExt;
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).map(OsString::as_os_str) != Some(OsStr::new(RECORD_START)) {
        return;
    }
    let (Some(dir), Some(program)) = (args.get(2), args.get(3)) else {
        eprintln!("shardgate: {RECORD_START} needs a directory and a program");
        std::process::exit(127);
    };
    let started = std::env::current_dir().and_then(|cwd| {
        write_start(
            Path::new(dir),
            std::process::id(),
            &args[3..],
            &cwd,
            std::env::vars_os(),
        )
    });
    if let Err(e) = started {
        eprintln!(
            "shardgate: could not record how {} was started: {e}",
            program.to_string_lossy()
        );
        std::process::exit(127);
    }
    let e = std::process::Command::new(program).args(&args[4..]).exec();
    eprintln!("shardgate: could not start {}: {e}", program.to_string_lossy());
    std::process::exit(127);
}

/// Writes one start to `DIR/ID.env`, `DIR/ID.cwd` and, last (it is what the reader looks
/// for), `DIR/ID.argv`: NUL-separated `KEY=VALUE`s, the directory's bytes, NUL-terminated
/// arguments.
fn write_start(
    dir: &Path,
    id: u32,
    argv: &[OsString],
    cwd: &Path,
    env: impl Iterator<Item = (OsString, OsString)>,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut e = Vec::new();
    for (k, v) in env {
        e.extend_from_slice(k.as_bytes());
        e.push(b'=');
        e.extend_from_slice(v.as_bytes());
        e.push(0);
    }
    std::fs::write(dir.join(format!("{id}.env")), e)?;
    std::fs::write(dir.join(format!("{id}.cwd")), cwd.as_os_str().as_bytes())?;
    let mut a = Vec::new();
    for arg in argv {
        a.extend_from_slice(arg.as_bytes());
        a.push(0);
    }
    std::fs::write(dir.join(format!("{id}.argv")), a)
}

/// The environment variable that names the program nextest starts the host's test binaries
/// through (a target runner).
pub(crate) fn runner_var(host_triple: &str) -> String {
    format!(
        "CARGO_TARGET_{}_RUNNER",
        host_triple.to_uppercase().replace(['-', '.'], "_")
    )
}

/// The host's target triple, from nextest's record of the build (`--list-type binaries-only`).
pub(crate) fn host_triple(binaries_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(binaries_json).ok()?;
    v["rust-build-meta"]["platforms"]["host"]["platform"]["triple"]
        .as_str()
        .map(str::to_owned)
}

/// Runs `cmd` (nextest's listing under shardgate's profile) with this program as the host's
/// target runner ([`RECORD_START`]), and reads back how each binary was started; with the
/// listing itself. `None` when the listing failed or nothing could be read: the run is then
/// listed and its shards run through nextest as before.
pub(crate) async fn record(
    runner: &CommandRunner,
    cmd: tokio::process::Command,
    host_triple: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<Launches> {
    let (out, starts) = run_recording(runner, cmd, host_triple, cancel, "nextest").await?;
    let listing: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let by_binary = read_started(starts)?;
    // nextest's own configuration changes how tests run in ways a record cannot show.
    // `refusal` looked above the working directory; the workspace's root can be elsewhere
    // (`package.workspace`), and only nextest says where.
    let root = by_binary
        .values()
        .find_map(|l| lookup(&l.env, "NEXTEST_WORKSPACE_ROOT"))
        .map(PathBuf::from)?;
    if root.join(".config/nextest.toml").exists() {
        info!(
            runner = %runner.config().name,
            "the workspace has a nextest configuration: every shard goes through nextest"
        );
        return None;
    }
    debug!(runner = %runner.config().name, binaries = by_binary.len(), "recorded how nextest starts the test binaries");
    Some(Launches {
        by_binary,
        tests: listing.iter().cloned().collect(),
        listing,
    })
}

fn lookup<'a>(env: &'a [(OsString, OsString)], name: &str) -> Option<&'a OsStr> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_os_str())
}

/// Runs `cmd` (a listing of every test binary: nextest's or cargo's) with this program as
/// the host's target runner ([`RECORD_START`]); returns its output and every start it
/// recorded. `None` when it failed or nothing could be read: the shards then go through
/// `tool`, as before.
pub(crate) async fn run_recording(
    runner: &CommandRunner,
    mut cmd: tokio::process::Command,
    host_triple: &str,
    cancel: &tokio_util::sync::CancellationToken,
    tool: &str,
) -> Option<(std::process::Output, Vec<Start>)> {
    let files = tempfile::tempdir().ok()?;
    let me = std::env::current_exe().ok()?;
    let value = format!("{} {RECORD_START} {}", me.display(), files.path().display());
    // cargo splits a runner's command line at white space.
    if value.split_whitespace().count() != 3 {
        info!(runner = %runner.config().name, value, "a path has white space in it: every test starts through {tool}");
        return None;
    }
    let var = runner_var(host_triple);
    cmd.env(&var, &value)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::select! {
        out = cmd.output() => out.ok()?,
        () = cancel.cancelled() => return None,
    };
    if !out.status.success() {
        // The shards go through the tool, whose own output then says what failed.
        info!(
            runner = %runner.config().name,
            status = %out.status,
            stderr = %super::batch::tail(&String::from_utf8_lossy(&out.stderr), 2048),
            "could not record how the test binaries are started; every shard goes through {tool}"
        );
        return None;
    }
    let starts = read_starts(files.path(), &var)?;
    Some((out, starts))
}

/// One start [`write_start`] recorded: the arguments (the program first), the directory and
/// the whole environment, sorted, without the runner variable.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Start {
    pub argv: Vec<OsString>,
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
}

/// Every start recorded in `files` whose first argument is `--list` (a listing of a test
/// binary).
fn read_starts(files: &Path, runner_var: &str) -> Option<Vec<Start>> {
    let mut starts = Vec::new();
    for entry in std::fs::read_dir(files).ok()? {
        let path = entry.ok()?.path();
        if path.extension() != Some(OsStr::new("argv")) {
            continue;
        }
        let read = |ext: &str| std::fs::read(path.with_extension(ext)).ok();
        let (Some(argv), Some(cwd), Some(env)) = (read("argv"), read("cwd"), read("env")) else {
            continue;
        };
        let argv = split0(&argv);
        if argv.get(1).map(|a| a.as_os_str()) != Some(OsStr::new("--list")) {
            continue;
        }
        let mut env: Vec<(OsString, OsString)> = super::nextest::parse_env0(&env)
            .into_iter()
            .filter(|(k, _)| k != runner_var)
            .collect();
        env.sort();
        let cwd = {
            use std::os::unix::ffi::OsStrExt;
            PathBuf::from(OsStr::from_bytes(&cwd))
        };
        starts.push(Start { argv, cwd, env });
    }
    Some(starts)
}

/// nextest's starts by binary id. A binary started twice in two different ways is left out
/// (nextest would start it in one).
fn read_started(starts: Vec<Start>) -> Option<HashMap<String, Launch>> {
    let mut by_binary: HashMap<String, Option<Launch>> = HashMap::new();
    for Start { argv, cwd, env } in starts {
        let Some(binary) = lookup(&env, "NEXTEST_BINARY_ID").map(|b| b.to_string_lossy().into_owned()) else {
            continue;
        };
        let run_id = lookup(&env, "NEXTEST_RUN_ID")
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default();
        let launch = Launch {
            program: PathBuf::from(&argv[0]),
            cwd,
            run_id,
            env,
        };
        by_binary
            .entry(binary)
            .and_modify(|seen| {
                if seen.as_ref() != Some(&launch) {
                    *seen = None;
                }
            })
            .or_insert(Some(launch));
    }
    let by_binary: HashMap<String, Launch> =
        by_binary.into_iter().filter_map(|(b, l)| Some((b, l?))).collect();
    (!by_binary.is_empty()).then_some(by_binary)
}

fn split0(bytes: &[u8]) -> Vec<OsString> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    bytes
        .split(|b| *b == 0)
        .map(|a| OsStr::from_bytes(a).to_owned())
        .collect()
}

/// What nextest 0.9.143 adds to a binary's environment for one test run once under
/// shardgate's profile (one attempt, one test at a time, no test groups, no stress runs).
fn per_test_env(run_id: &str, binary: &str, name: &str) -> [(&'static str, String); 12] {
    [
        ("NEXTEST_TEST_PHASE", "run".into()),
        ("NEXTEST_RUN_MODE", "test".into()),
        ("NEXTEST_TEST_NAME", name.into()),
        ("NEXTEST_ATTEMPT", "1".into()),
        ("NEXTEST_TOTAL_ATTEMPTS", "1".into()),
        ("NEXTEST_ATTEMPT_ID", format!("{run_id}:{binary}${name}")),
        ("NEXTEST_STRESS_CURRENT", "none".into()),
        ("NEXTEST_STRESS_TOTAL", "none".into()),
        ("NEXTEST_TEST_GLOBAL_SLOT", "0".into()),
        ("NEXTEST_TEST_GROUP", "@global".into()),
        ("NEXTEST_TEST_GROUP_SLOT", "none".into()),
        ("NEXTEST_TEST_THREADS", "1".into()),
    ]
}

/// How one test's process ended, as a result; `None` when it says nothing certain about the
/// test (it exited 0 without libtest saying that it ran and passed exactly one test, or it
/// could not be started), so that nextest runs it instead.
fn judge(finished: process::Finished) -> Option<TestRun> {
    let run = |outcome, detail: String, output| TestRun {
        outcome,
        duration: finished.duration,
        output,
        detail,
    };
    match &finished.ending {
        Ending::Exited(0) => {
            passed_one(&finished.output).then(|| run(Outcome::Passed, String::new(), String::new()))
        }
        Ending::Exited(code) => Some(run(
            Outcome::Failed,
            format!("test failed with exit code {code}"),
            finished.output.clone(),
        )),
        Ending::Signaled(sig) => Some(run(
            Outcome::Failed,
            format!("test aborted: killed by signal {sig}"),
            finished.output.clone(),
        )),
        Ending::TimedOut => Some(run(
            Outcome::TimedOut,
            format!("test {}", finished.describe()),
            finished.output.clone(),
        )),
        Ending::Cancelled | Ending::NotStarted(_) | Ending::Lost(_) => None,
    }
}

/// Whether libtest's summary says one test ran and passed (`test result: ok. 1 passed; 0
/// failed; …`), on a line of its own.
fn passed_one(output: &str) -> bool {
    output
        .lines()
        .any(|l| l.starts_with("test result: ok. 1 passed; 0 failed;"))
}

/// Runs what it can of `shard` from `launches`, sending each result as its test ends; returns
/// the tests left for nextest, in the shard's order. Stops (returning nothing) when the shard
/// is cancelled or nobody takes the results any more.
pub(crate) async fn run(runner: &CommandRunner, launches: &Launches, shard: &Shard<'_>) -> Vec<String> {
    let mut left = Vec::new();
    let max_output = runner.config().max_output;
    for id in shard.tests {
        if shard.cancel.is_cancelled() {
            return Vec::new();
        }
        let (binary, name) = id.split_once(' ').unwrap_or((id, ""));
        let launch = match launches.by_binary.get(binary) {
            Some(l) if launches.tests.contains(id) => l,
            _ => {
                left.push(id.clone());
                continue;
            }
        };
        let mut cmd = tokio::process::Command::new(&launch.program);
        cmd.args(["--exact", name, "--nocapture"])
            .current_dir(&launch.cwd)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .envs(per_test_env(&launch.run_id, binary, name));
        let finished = process::run(cmd, Some(shard.test_timeout), shard.cancel, max_output).await;
        if finished.ending == Ending::Cancelled {
            return Vec::new();
        }
        match judge(finished) {
            Some(result) => {
                if shard.results.send((id.clone(), result)).await.is_err() {
                    return Vec::new();
                }
            }
            None => left.push(id.clone()),
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn finished(ending: Ending, output: &str) -> process::Finished {
        process::Finished {
            ending,
            duration: Duration::from_millis(7),
            output: output.into(),
            limit: Some(Duration::from_secs(3)),
        }
    }

    const PASSED: &str = "\nrunning 1 test\ntest a ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 0.00s\n\n";

    #[test]
    fn a_pass_is_libtests_word_that_exactly_one_test_ran_and_passed() {
        let r = judge(finished(Ending::Exited(0), PASSED)).unwrap();
        assert_eq!(
            (r.outcome, r.duration),
            (Outcome::Passed, Duration::from_millis(7))
        );
        // A name that matched nothing, an ignored test, a harness of its own, a test that
        // printed the words inside its own output line: none of them is a pass here.
        for out in [
            "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out\n",
            "running 1 test\ntest a ... ignored\n\ntest result: ok. 0 passed; 0 failed; 1 ignored; 0 measured\n",
            "all checks fine\n",
            "log: test result: ok. 1 passed; 0 failed;\n",
            "",
        ] {
            assert!(judge(finished(Ending::Exited(0), out)).is_none(), "{out:?}");
        }
        assert!(judge(finished(Ending::NotStarted("no such file".into()), "")).is_none());
        assert!(judge(finished(Ending::Cancelled, "")).is_none());
    }

    #[test]
    fn any_other_ending_is_the_tests_own_result_with_its_output() {
        let r = judge(finished(Ending::Exited(101), "thread panicked at boom")).unwrap();
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.detail, "test failed with exit code 101");
        assert_eq!(r.output, "thread panicked at boom");
        // Even with libtest's pass line in it: the exit status is what nextest reads.
        let r = judge(finished(Ending::Exited(1), PASSED)).unwrap();
        assert_eq!(r.outcome, Outcome::Failed);
        let r = judge(finished(Ending::Signaled(6), "")).unwrap();
        assert_eq!(
            (r.outcome, r.detail.as_str()),
            (Outcome::Failed, "test aborted: killed by signal 6")
        );
        let r = judge(finished(Ending::TimedOut, "")).unwrap();
        assert_eq!(
            (r.outcome, r.detail.as_str()),
            (Outcome::TimedOut, "test timed out after 3000 ms")
        );
    }

    #[test]
    fn the_runner_variable_is_cargos_name_for_the_host() {
        assert_eq!(
            runner_var("x86_64-unknown-linux-gnu"),
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER"
        );
        let json =
            r#"{"rust-build-meta":{"platforms":{"host":{"platform":{"triple":"aarch64-apple-darwin"}}}}}"#;
        assert_eq!(host_triple(json).as_deref(), Some("aarch64-apple-darwin"));
        assert_eq!(host_triple("{}"), None);
    }

    #[test]
    fn a_cargo_config_that_mentions_a_runner_anywhere_above_the_workdir_is_found() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("a/b");
        std::fs::create_dir_all(&work).unwrap();
        let home = root.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        assert_eq!(cargo_config_runner(&work, Some(&home)), None);
        std::fs::create_dir_all(root.path().join("a/.cargo")).unwrap();
        std::fs::write(root.path().join("a/.cargo/config.toml"), "[build]\njobs = 2\n").unwrap();
        assert_eq!(cargo_config_runner(&work, Some(&home)), None);
        std::fs::write(
            home.join("config"),
            "[target.x86_64-unknown-linux-gnu]\nrunner = \"qemu\"\n",
        )
        .unwrap();
        assert_eq!(cargo_config_runner(&work, Some(&home)), Some(home.join("config")));
        std::fs::write(
            root.path().join("a/.cargo/config.toml"),
            "[target.'cfg(unix)']\nrunner = 'valgrind'\n",
        )
        .unwrap();
        assert_eq!(
            cargo_config_runner(&work, Some(&home)),
            Some(root.path().join("a/.cargo/config.toml"))
        );
    }

    #[test]
    fn each_recorded_start_is_read_back_whole_and_a_binary_started_two_ways_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let var = "CARGO_TARGET_X_RUNNER";
        let start = |id: u32, binary: &str, extra: &str, args: &[&str]| {
            let argv: Vec<OsString> = std::iter::once("/bin/t")
                .chain(args.iter().copied())
                .map(OsString::from)
                .collect();
            let env = [
                ("NEXTEST_BINARY_ID", binary),
                ("EXTRA", extra),
                (var, "x"),
                ("CARGO_BIN_EXE_with-dashes", "/b"),
                ("EMPTY", ""),
            ];
            let env = env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v)));
            write_start(dir.path(), id, &argv, Path::new("/w/a b"), env).unwrap();
        };
        start(1, "c::one", "a\nb=c", &["--list", "--format", "terse"]);
        start(
            2,
            "c::one",
            "a\nb=c",
            &["--list", "--format", "terse", "--ignored"],
        );
        start(3, "c::two", "x", &["--list"]);
        start(4, "c::two", "y", &["--list"]);
        start(5, "c::three", "x", &["--exact", "t"]);
        let got = read_started(read_starts(dir.path(), var).unwrap()).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), vec!["c::one"], "{got:?}");
        let one = &got["c::one"];
        assert_eq!(one.program, PathBuf::from("/bin/t"));
        assert_eq!(one.cwd, PathBuf::from("/w/a b"));
        let names: Vec<_> = one.env.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(
            names,
            ["CARGO_BIN_EXE_with-dashes", "EMPTY", "EXTRA", "NEXTEST_BINARY_ID"]
        );
        assert_eq!(lookup(&one.env, "EXTRA"), Some(OsStr::new("a\nb=c")));
        assert_eq!(lookup(&one.env, "EMPTY"), Some(OsStr::new("")));
        // Nothing recorded: nothing to use.
        assert!(read_started(read_starts(tempfile::tempdir().unwrap().path(), var).unwrap()).is_none());
    }
}
