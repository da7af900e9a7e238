//! cargo-nextest: `<binary-id> <test name>` test ids, listed with `list -T oneline`, a shard
//! selected exactly by a filterset and run with shardgate's profile from a tool config file
//! (JUnit to the shard's own file, no retries of nextest's own, the run's test timeout).

use super::batch::{CommandRunner, IdFormat, RecordedBuild, Shard};
use super::{BoxFuture, Commands, RunnerError, Tool, ToolSpec};

#[derive(Debug)]
pub struct Nextest;

impl Tool for Nextest {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        if spec.run.is_some() || spec.id.is_some() {
            return Err("nextest builds its own run command and ids; remove run and id".into());
        }
        Ok(Commands {
            list: Some(spec.list.cloned().unwrap_or_else(list)),
            run: vec!["{tests}".to_owned(), "{junit}".to_owned()],
            id: IdFormat::ClassnameSpaceName,
        })
    }

    /// Where the run's tests may start without nextest (see `nextest_direct.rs`) and the
    /// profile lists as by default, the listing is the one the run's record makes anyway:
    /// one build check and one listing, not two of each side by side. Otherwise it lists with
    /// the profile's command, as by default, and beside it records the run's build for its
    /// shards on this worker (see [`build_once`]), so that their first one does not wait for
    /// cargo's build check a second time.
    fn list_for_run<'a>(
        &'a self,
        runner: &'a CommandRunner,
        revision: &'a str,
        run: &'a str,
        limit: std::time::Duration,
    ) -> BoxFuture<'a, Option<Vec<String>>> {
        if runner.cfg.list.as_ref() != Some(&list()) || super::nextest_direct::refusal(runner, &[]).is_some()
        {
            record_in_background(runner, revision, run);
            return Box::pin(async { None });
        }
        Box::pin(async move {
            let cancel = tokio_util::sync::CancellationToken::new();
            let mut built = runner.nextest_build.lock().await;
            // Past the listing's limit the record's commands are killed (dropped), and the
            // profile's listing runs under the same limit to say what hangs.
            let recorded = tokio::time::timeout(limit, fill(&mut built, runner, revision, run, &cancel))
                .await
                .ok()??;
            // Without a record of the starts, the profile's listing runs after all.
            recorded.launches.as_ref().map(|l| l.listing().to_vec())
        })
    }

    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(run_shard(runner, shard))
    }
}

async fn run_shard(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
    let reuse = build_once(runner, &shard).await;
    // What the run's record covers starts without nextest; the rest goes through it.
    let left;
    let shard = match reuse.as_ref().and_then(|r| r.launches.as_ref()) {
        Some(launches) => {
            left = super::nextest_direct::run(runner, launches, &shard).await;
            if left.is_empty() {
                return Ok(());
            }
            Shard {
                tests: &left,
                ..shard
            }
        }
        None => shard,
    };
    let dir = tempfile::tempdir()
        .map_err(|e| RunnerError::Local(format!("failed to create a directory for JUnit: {e}")))?;
    let (tests, revision) = (shard.tests, shard.revision);
    // The JUnit file goes to this shard's own directory by an absolute path, which nextest
    // honours whatever the project's target or store directory is (CARGO_TARGET_DIR, a
    // `[store] dir` of its own); so shards side by side never share a file.
    let junit_path = dir.path().join("junit.xml");
    let toolconfig = dir.path().join("nextest.toml");
    std::fs::write(
        &toolconfig,
        profile(&junit_path.display().to_string(), shard.test_timeout),
    )
    .map_err(|e| RunnerError::Local(format!("failed to write the nextest config: {e}")))?;
    let filterset = tests
        .iter()
        .map(|t| {
            let (bin, name) = t.split_once(' ').unwrap_or((t, ""));
            format!("(binary_id(={bin}) & test(={name}))")
        })
        .collect::<Vec<_>>()
        .join(" | ");
    let vars = [
        ("{toolconfig}", &*toolconfig.display().to_string()),
        ("{profile}", PROFILE),
        ("{filterset}", &filterset),
        ("{revision}", revision),
    ];
    let cmd = match &reuse {
        Some(r) => r.command(runner, run(), &vars),
        None => runner.command_with(&run(), &[], &vars),
    };
    let ran = runner.run_junit(cmd, junit_path, None, shard).await;
    drop(dir);
    ran
}

/// The build's metadata files, in the directory [`build_once`] keeps them.
const BINARIES: &str = "binaries.json";
const CARGO: &str = "cargo.json";

/// A run's build as this worker recorded it, for the run's later shards.
#[derive(Debug)]
pub(crate) struct Recorded {
    /// Holds [`BINARIES`] and [`CARGO`].
    dir: tempfile::TempDir,
    /// How to start nextest without cargo, if that could be found out.
    direct: Option<Direct>,
    /// How nextest starts each test binary, for tests started without nextest (see
    /// `nextest_direct.rs`), if that could be recorded and may be used.
    launches: Option<std::sync::Arc<super::nextest_direct::Launches>>,
    /// What `launches` was made from.
    inputs: Option<super::nextest_direct::Inputs>,
}

impl Recorded {
    /// `argv`, a `cargo nextest …` command with `vars` to fill in, reusing this record's build
    /// and started without cargo where that could be found out.
    fn command(
        &self,
        runner: &CommandRunner,
        mut argv: Vec<String>,
        vars: &[(&str, &str)],
    ) -> tokio::process::Command {
        argv.extend([
            "--binaries-metadata".to_owned(),
            self.dir.path().join(BINARIES).display().to_string(),
            "--cargo-metadata".to_owned(),
            self.dir.path().join(CARGO).display().to_string(),
        ]);
        if let Some(direct) = &self.direct {
            // `cargo nextest …` is `cargo-nextest nextest …` in the environment cargo gives
            // its subcommands.
            argv[0] = direct.program.display().to_string();
        }
        let mut cmd = runner.command_with(&argv, &[], vars);
        if let Some(direct) = &self.direct {
            cmd.envs(direct.env.iter().map(|(k, v)| (k, v)));
        }
        cmd
    }
}

/// nextest started as cargo starts it (`cargo-nextest nextest …`), without cargo's own start
/// each time (about 30 ms, half of what a one-test shard costs on top of its test).
#[derive(Debug, PartialEq)]
struct Direct {
    /// The `cargo-nextest` cargo would run.
    program: std::path::PathBuf,
    /// What cargo (and rustup's proxy, when cargo is one) adds to the environment of its
    /// subcommands: `CARGO`, which nextest hands on to the tests as `cargo test` does,
    /// `RUSTUP_TOOLCHAIN`, the toolchain's library path...
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

/// One build per run: the first shard of a run on this worker builds the test binaries and
/// records where they are (`cargo nextest list --list-type binaries-only`, `cargo metadata`);
/// then it and the run's later shards hand both to nextest (`--binaries-metadata`,
/// `--cargo-metadata`), so they skip cargo's build check and cost about a third of the time. A new run builds again
/// (code edited between two runs of one revision is never missed); a failure to record either
/// leaves every shard building as before. Beside them it records the environment cargo gives
/// its subcommands, so that those shards start nextest directly, as cargo would, without
/// starting cargo first; if that cannot be found out, they go through cargo.
async fn build_once(runner: &CommandRunner, shard: &Shard<'_>) -> Option<std::sync::Arc<Recorded>> {
    if shard.run.is_empty() {
        return None;
    }
    let mut built = runner.nextest_build.lock().await;
    fill(&mut built, runner, shard.revision, shard.run, shard.cancel).await
}

/// `built` for `run`: as it is if it already holds `run`'s record, else recorded now.
async fn fill(
    built: &mut Option<RecordedBuild>,
    runner: &CommandRunner,
    revision: &str,
    run: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<std::sync::Arc<Recorded>> {
    if let Some((r, recorded)) = &*built
        && r == run
    {
        return recorded.clone();
    }
    let previous = built.take().and_then(|(_, r)| r);
    let recorded = record_build(runner, revision, cancel, previous.as_deref())
        .await
        .map(std::sync::Arc::new);
    *built = Some((run.to_owned(), recorded.clone()));
    recorded
}

/// Starts recording `run`'s build while the run's tests are being listed, unless a recording
/// is under way or done for it. The record is held locked from now on, so a shard that comes
/// first waits for this recording rather than making its own.
fn record_in_background(runner: &CommandRunner, revision: &str, run: &str) {
    let Ok(mut built) = runner.nextest_build.clone().try_lock_owned() else {
        return;
    };
    let (runner, revision, run) = (runner.clone(), revision.to_owned(), run.to_owned());
    tokio::spawn(async move {
        // Nothing cancels it: it ends with its commands, which die with the worker.
        let cancel = tokio_util::sync::CancellationToken::new();
        fill(&mut built, &runner, &revision, &run, &cancel).await;
    });
}

/// Records a run's build; `previous` is the last run's record on this worker, whose record of
/// the starts (and listing) is kept when nothing it came from changed.
async fn record_build(
    runner: &CommandRunner,
    revision: &str,
    cancel: &tokio_util::sync::CancellationToken,
    previous: Option<&Recorded>,
) -> Option<Recorded> {
    let dir = tempfile::tempdir().ok()?;
    let record = |argv: &[&str], file: &'static str| {
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let path = dir.path().join(file);
        async move {
            let out = output(runner, revision, cancel, &argv, None).await?;
            if !out.status.success() || out.stdout.is_empty() {
                tracing::warn!(
                    command = %argv.join(" "),
                    status = %out.status,
                    "could not record the build for the run's shards; each shard builds"
                );
                return None;
            }
            std::fs::write(path, &out.stdout).ok()
        }
    };
    // The three side by side: cargo's build check, cargo's metadata, cargo's environment.
    let (binaries, metadata, direct) = tokio::join!(
        record(
            &[
                "cargo",
                "nextest",
                "list",
                "--list-type",
                "binaries-only",
                "--message-format",
                "json"
            ],
            BINARIES,
        ),
        record(&["cargo", "metadata", "--format-version", "1"], CARGO),
        direct(runner, revision, cancel),
    );
    binaries?;
    metadata?;
    let binaries = std::fs::read_to_string(dir.path().join(BINARIES)).ok()?;
    let inputs = super::nextest_direct::Inputs::read(
        runner,
        &binaries,
        &dir.path().join(CARGO),
        &format!("{direct:?}"),
    );
    let mut recorded = Recorded {
        dir,
        direct,
        launches: None,
        inputs,
    };
    let kept = previous.filter(|p| p.inputs.is_some() && p.inputs == recorded.inputs);
    recorded.launches = match kept.and_then(|p| p.launches.as_ref()) {
        Some(l) => {
            tracing::info!(runner = %runner.cfg.name, "test binaries unchanged: the last run's listing and record of their starts are kept");
            Some(std::sync::Arc::clone(l))
        }
        None => record_launches(runner, revision, cancel, &recorded, &binaries)
            .await
            .map(std::sync::Arc::new),
    };
    Some(recorded)
}

/// Lists the suite with nextest, reusing the recorded build, under shardgate's profile, and
/// records how nextest starts each test binary (see `nextest_direct.rs`); `None` when that
/// may not be used here or could not be recorded.
async fn record_launches(
    runner: &CommandRunner,
    revision: &str,
    cancel: &tokio_util::sync::CancellationToken,
    recorded: &Recorded,
    binaries: &str,
) -> Option<super::nextest_direct::Launches> {
    let cargo_env = recorded
        .direct
        .as_ref()
        .map(|d| d.env.as_slice())
        .unwrap_or_default();
    if let Some(why) = super::nextest_direct::refusal(runner, cargo_env) {
        tracing::info!(runner = %runner.cfg.name, why, "every test starts through nextest");
        return None;
    }
    let host = super::nextest_direct::host_triple(binaries)?;
    let dir = recorded.dir.path();
    let toolconfig = dir.join("list.toml");
    let junit = dir.join("list-junit.xml").display().to_string();
    std::fs::write(&toolconfig, profile(&junit, std::time::Duration::from_secs(3600))).ok()?;
    let argv = [
        "cargo",
        "nextest",
        "list",
        "--tool-config-file",
        "shardgate:{toolconfig}",
        "--profile",
        PROFILE,
        "-T",
        "oneline",
    ];
    let cmd = recorded.command(
        runner,
        argv.map(String::from).to_vec(),
        &[
            ("{toolconfig}", &toolconfig.display().to_string()),
            ("{revision}", revision),
        ],
    );
    super::nextest_direct::record(runner, cmd, &host, cancel).await
}

/// Runs `argv` for `revision` (in the profile's workdir and environment), with `path` put
/// first on the search path; its output, or none if it could not run or was cancelled.
async fn output(
    runner: &CommandRunner,
    revision: &str,
    cancel: &tokio_util::sync::CancellationToken,
    argv: &[String],
    path: Option<&std::path::Path>,
) -> Option<std::process::Output> {
    let mut cmd = runner.command(argv, &[], "", revision);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    if let Some(dir) = path {
        let rest = runner_env(runner, "PATH").unwrap_or_default();
        let mut paths = vec![dir.to_path_buf()];
        paths.extend(std::env::split_paths(&rest));
        cmd.env("PATH", std::env::join_paths(paths).ok()?);
    }
    tokio::select! {
        out = cmd.output() => out.ok(),
        () = cancel.cancelled() => None,
    }
}

/// `name` in the environment the runner's commands start with: the profile's, else this
/// process's.
/// Whether the profile's or the worker's environment sets `name` to `0`: a fast path turned
/// off (`SHARDGATE_NEXTEST_DIRECT`, `SHARDGATE_CARGO_TEST_DIRECT`, `SHARDGATE_GO_TEST_DIRECT`).
pub(super) fn turned_off(runner: &CommandRunner, name: &str) -> bool {
    runner_env(runner, name).is_some_and(|v| v.to_string_lossy().trim() == "0")
}

pub(super) fn runner_env(runner: &CommandRunner, name: &str) -> Option<std::ffi::OsString> {
    runner
        .cfg
        .env
        .get(name)
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os(name))
}

/// A cargo subcommand of our own (a script in a fresh directory put first on the search path)
/// prints the environment cargo gives it; [`Direct`] is what that adds to the runner's own.
async fn direct(
    runner: &CommandRunner,
    revision: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<Direct> {
    use std::os::unix::fs::PermissionsExt;
    const NAME: &str = "shardgate-env";
    let bin = tempfile::tempdir().ok()?;
    let script = bin.path().join(format!("cargo-{NAME}"));
    std::fs::write(&script, "#!/bin/sh\nexec env -0\n").ok()?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).ok()?;
    let argv = ["cargo".to_owned(), NAME.to_owned()];
    let out = output(runner, revision, cancel, &argv, Some(bin.path())).await?;
    if !out.status.success() {
        return None;
    }
    let given = parse_env0(&out.stdout);
    let env = cargo_additions(&given, |k| runner_env(runner, k), bin.path());
    let lookup = |k: &str| given.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let program = find_subcommand("cargo-nextest", lookup("CARGO_HOME"), lookup("PATH"), bin.path())?;
    Some(Direct { program, env })
}

/// `env -0`'s output as pairs.
pub(super) fn parse_env0(out: &[u8]) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    use std::os::unix::ffi::OsStrExt;
    out.split(|b| *b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            Some((
                std::ffi::OsStr::from_bytes(&kv[..eq]).to_owned(),
                std::ffi::OsStr::from_bytes(&kv[eq + 1..]).to_owned(),
            ))
        })
        .collect()
}

/// What cargo set or changed in `given` against `before`: not the shell's `_`, not a
/// jobserver's file descriptors (valid only in that one child), and the search path without
/// our own `script_dir` (unchanged otherwise, so left alone).
fn cargo_additions(
    given: &[(std::ffi::OsString, std::ffi::OsString)],
    before: impl Fn(&str) -> Option<std::ffi::OsString>,
    script_dir: &std::path::Path,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    const SKIP: [&str; 4] = ["_", "MAKEFLAGS", "MFLAGS", "CARGO_MAKEFLAGS"];
    given
        .iter()
        .filter_map(|(k, v)| {
            let name = k.to_str()?;
            if SKIP.contains(&name) {
                return None;
            }
            let v = if name == "PATH" {
                let kept: Vec<_> = std::env::split_paths(v).filter(|p| p != script_dir).collect();
                std::env::join_paths(kept).ok()?
            } else {
                v.clone()
            };
            (before(name).as_ref() != Some(&v)).then(|| (k.clone(), v))
        })
        .collect()
}

/// Where cargo finds subcommand `name`: `$CARGO_HOME/bin`, then the search path (without our
/// own `script_dir`).
fn find_subcommand(
    name: &str,
    cargo_home: Option<std::ffi::OsString>,
    path: Option<std::ffi::OsString>,
    script_dir: &std::path::Path,
) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let home = cargo_home.map(|h| std::path::PathBuf::from(h).join("bin"));
    let dirs = path
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    home.into_iter()
        .chain(dirs)
        .filter(|d| d != script_dir)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The nextest profile shardgate adds through its tool config file.
const PROFILE: &str = "shardgate";

/// shardgate's profile: every test of the shard runs (no fail-fast), once (shardgate retries,
/// so the project's own `retries` must not multiply with them and turn a failure into a pass
/// nobody sees), one at a time (a slot runs one test: the worker's slots are its parallelism,
/// and a shard's wall time minus its tests' is then the hand-out's cost), stopped at the run's
/// test timeout (a `test timeout` failure in the JUnit file, read as `timed_out`), results to
/// `junit`.
fn profile(junit: &str, test_timeout: std::time::Duration) -> String {
    format!(
        "[profile.{PROFILE}]\nfail-fast = false\nretries = 0\ntest-threads = 1\nslow-timeout = {{ period = \"{}ms\", terminate-after = 1 }}\n[profile.{PROFILE}.junit]\npath = {}\n",
        test_timeout.as_millis().max(1),
        toml_string(junit)
    )
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// nextest's default listing command: one `<binary-id> <test name>` per line.
fn list() -> Vec<String> {
    ["cargo", "nextest", "list", "-T", "oneline"]
        .map(String::from)
        .to_vec()
}

/// nextest's run command: exact selection by a filterset, JUnit from a profile of our own
/// in a tool config file, which ranks below the project's own nextest configuration.
fn run() -> Vec<String> {
    [
        "cargo",
        "nextest",
        "run",
        "--no-fail-fast",
        "--tool-config-file",
        "shardgate:{toolconfig}",
        "--profile",
        "{profile}",
        "-E",
        "{filterset}",
    ]
    .map(String::from)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        v.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn what_cargo_adds_is_what_it_set_or_changed_without_our_script_or_a_jobserver() {
        let given = parse_env0(
            b"HOME=/root\0CARGO=/tc/bin/cargo\0PATH=/tmp/us:/usr/bin\0_=/usr/bin/cargo\0CARGO_MAKEFLAGS=-j --jobserver-fds=3,4\0RUSTUP_TOOLCHAIN=stable\0EMPTY=\0LINE=a=b\nc\0",
        );
        assert_eq!(given.len(), 8, "{given:?}");
        let before = |k: &str| match k {
            "HOME" => Some("/root".into()),
            "PATH" => Some("/usr/bin".into()),
            "RUSTUP_TOOLCHAIN" => Some("nightly".into()),
            _ => None,
        };
        assert_eq!(
            cargo_additions(&given, before, std::path::Path::new("/tmp/us")),
            pairs(&[
                ("CARGO", "/tc/bin/cargo"),
                ("RUSTUP_TOOLCHAIN", "stable"),
                ("EMPTY", ""),
                ("LINE", "a=b\nc")
            ])
        );
        // A search path cargo did change (rustup prepends the toolchain's) is kept, ours removed.
        let given = pairs(&[("PATH", "/tmp/us:/tc/bin:/usr/bin")]);
        assert_eq!(
            cargo_additions(&given, before, std::path::Path::new("/tmp/us")),
            pairs(&[("PATH", "/tc/bin:/usr/bin")])
        );
    }

    #[test]
    fn the_subcommand_is_found_where_cargo_looks_cargo_home_first() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let make = |dir: &str, exec: bool| {
            let d = root.path().join(dir);
            std::fs::create_dir_all(&d).unwrap();
            let f = d.join("cargo-nextest");
            std::fs::write(&f, "").unwrap();
            let mode = if exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            f
        };
        let home_bin = make("home/bin", true);
        let on_path = make("path", true);
        let not_exec = make("plain", false);
        let path =
            |dirs: &[&str]| Some(std::env::join_paths(dirs.iter().map(|d| root.path().join(d))).unwrap());
        let home = Some(root.path().join("home").into_os_string());
        let ours = root.path().join("ours");
        assert_eq!(
            find_subcommand("cargo-nextest", home.clone(), path(&["path"]), &ours),
            Some(home_bin)
        );
        assert_eq!(
            find_subcommand("cargo-nextest", None, path(&["plain", "path"]), &ours),
            Some(on_path.clone())
        );
        assert_eq!(
            find_subcommand("cargo-nextest", None, path(&["plain"]), &ours),
            None
        );
        // Our own script directory is never where it comes from.
        assert_eq!(
            find_subcommand("cargo-nextest", None, path(&["path"]), &root.path().join("path")),
            None
        );
        drop(not_exec);
    }
}
