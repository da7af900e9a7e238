//! cargo-nextest: `<binary-id> <test name>` test ids, listed with `list -T oneline`, a shard
//! selected exactly by a filterset and run with a JUnit profile of the shard's own in a tool
//! config file (which ranks below the project's own nextest configuration).

use std::path::PathBuf;

use super::batch::{CommandRunner, IdFormat, Shard, first_line, join_detail};
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
    let target = cargo_target_dir(runner)
        .await
        .map_err(|e| RunnerError::Tool(join_detail(first_line(&e), e.clone())))?;
    // A profile of this shard's own, so shards running side by side never share a file.
    let profile = format!("shardgate-{:016x}", rand::random::<u64>());
    let toolconfig = dir.path().join("nextest.toml");
    std::fs::write(
        &toolconfig,
        format!("[profile.{profile}]\nfail-fast = false\n[profile.{profile}.junit]\npath = \"junit.xml\"\n"),
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
    let store = target.join("nextest").join(&profile);
    let cmd = runner.command_with(
        &run(),
        &[],
        &[
            ("{toolconfig}", &toolconfig.display().to_string()),
            ("{profile}", &profile),
            ("{filterset}", &filterset),
            ("{revision}", revision),
        ],
    );
    let junit_path = store.join("junit.xml");
    let ran = runner.run_junit(cmd, junit_path, Some(store), shard).await;
    drop(dir);
    ran
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

/// The cargo target directory of the workdir, asked of `cargo metadata` once.
async fn cargo_target_dir(runner: &CommandRunner) -> Result<PathBuf, String> {
    let mut cached = runner.target_dir.lock().await;
    if let Some(t) = cached.as_ref() {
        return Ok(t.clone());
    }
    let out = tokio::process::Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(&runner.cfg.workdir)
        .envs(&runner.cfg.env)
        .output()
        .await
        .map_err(|e| format!("failed to run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata printed bad JSON: {e}"))?;
    let dir = v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or("cargo metadata has no target_directory")?;
    *cached = Some(dir.clone());
    Ok(dir)
}
