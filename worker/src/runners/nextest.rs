//! cargo-nextest: `<binary-id> <test name>` test ids, listed with `list -T oneline`, a shard
//! selected exactly by a filterset and run with shardgate's profile from a tool config file
//! (JUnit to the shard's own file, no retries of nextest's own, the run's test timeout).

use super::batch::{CommandRunner, IdFormat, Shard};
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

    fn run_shard<'a>(
        &'a self,
        runner: &'a CommandRunner,
        shard: Shard<'a>,
    ) -> BoxFuture<'a, Result<(), RunnerError>> {
        Box::pin(run_shard(runner, shard))
    }
}

async fn run_shard(runner: &CommandRunner, shard: Shard<'_>) -> Result<(), RunnerError> {
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
    let mut argv = run();
    let reuse = build_once(runner, &shard).await;
    if let Some(r) = &reuse {
        argv.extend([
            "--binaries-metadata".to_owned(),
            r.path().join(BINARIES).display().to_string(),
            "--cargo-metadata".to_owned(),
            r.path().join(CARGO).display().to_string(),
        ]);
    }
    let cmd = runner.command_with(
        &argv,
        &[],
        &[
            ("{toolconfig}", &toolconfig.display().to_string()),
            ("{profile}", PROFILE),
            ("{filterset}", &filterset),
            ("{revision}", revision),
        ],
    );
    let ran = runner.run_junit(cmd, junit_path, None, shard).await;
    drop(dir);
    ran
}

/// The build's metadata files, in the directory [`build_once`] keeps them.
const BINARIES: &str = "binaries.json";
const CARGO: &str = "cargo.json";

/// One build per run: the first shard of a run on this worker builds the test binaries and
/// records where they are (`cargo nextest list --list-type binaries-only`, `cargo metadata`);
/// the run's later shards hand both to nextest (`--binaries-metadata`, `--cargo-metadata`), so
/// they skip cargo's build check and cost about a third of the time. A new run builds again
/// (code edited between two runs of one revision is never missed); a failure to record either
/// leaves every shard building as before.
async fn build_once(runner: &CommandRunner, shard: &Shard<'_>) -> Option<std::sync::Arc<tempfile::TempDir>> {
    if shard.run.is_empty() {
        return None;
    }
    let mut built = runner.nextest_build.lock().await;
    if let Some((run, dir)) = &*built
        && run == shard.run
    {
        return dir.clone();
    }
    let dir = record_build(runner, shard).await.map(std::sync::Arc::new);
    *built = Some((shard.run.to_owned(), dir.clone()));
    dir
}

async fn record_build(runner: &CommandRunner, shard: &Shard<'_>) -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().ok()?;
    for (argv, file) in [
        (
            vec![
                "cargo",
                "nextest",
                "list",
                "--list-type",
                "binaries-only",
                "--message-format",
                "json",
            ],
            BINARIES,
        ),
        (vec!["cargo", "metadata", "--format-version", "1"], CARGO),
    ] {
        let argv: Vec<String> = argv.into_iter().map(String::from).collect();
        let mut cmd = runner.command(&argv, &[], "", shard.revision);
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        let out = tokio::select! {
            out = cmd.output() => out.ok()?,
            () = shard.cancel.cancelled() => return None,
        };
        if !out.status.success() || out.stdout.is_empty() {
            tracing::warn!(
                command = %argv.join(" "),
                status = %out.status,
                "could not record the build for the run's shards; each shard builds"
            );
            return None;
        }
        std::fs::write(dir.path().join(file), &out.stdout).ok()?;
    }
    Some(dir)
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
