//! Runner profiles: the TOML file a worker is given with `--runners FILE`, naming the runners
//! it offers and how each lists tests, runs a batch and reads the results.
//!
//! ```toml
//! [runners.unit]
//! kind = "pytest"                 # exec | pytest | nextest | cargo-test | go-test | junit
//! workdir = "/srv/checkout"       # where commands run (pytest: the rootdir)
//! # optional; pytest has built-in defaults for both
//! list = ["python3", "-m", "pytest", "--collect-only", "-q"]
//! run = ["python3", "-m", "pytest", "--junitxml={junit}", "{tests}"]
//! env = { PYTHONDONTWRITEBYTECODE = "1" }
//! setup = ["git", "checkout", "{revision}"]   # once per revision on this worker
//! setup_timeout = "10m"
//! shard_timeout = "30m"
//! id = "classname.name"           # junit kind: how a <testcase> names a test
//! ```
//!
//! Commands are argument vectors and never go through a shell. In `run`, an argument that is
//! exactly `{tests}` becomes one argument per test id; `{junit}` is the path of the JUnit file
//! the command must write, `{revision}` the revision under test, `{workdir}` the working
//! directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use shardgate_common::RunnerKind;

use crate::runners::{self, CommandRunner, ExecRunner, IdFormat, Runner, Runners, ToolSpec};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("failed to read runner profiles '{path}': {error}")]
    Read { path: String, error: std::io::Error },
    #[error("invalid runner profiles: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("runner '{runner}': {reason}")]
    Invalid { runner: String, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    runners: BTreeMap<String, Spec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    kind: RunnerKind,
    /// exec: the root directory of the tests.
    root: Option<PathBuf>,
    workdir: Option<PathBuf>,
    list: Option<Vec<String>>,
    run: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    setup: Option<Vec<String>>,
    setup_timeout: Option<String>,
    shard_timeout: Option<String>,
    id: Option<IdFormat>,
    /// A repository to check each revision out of, in a worktree of its own.
    git: Option<String>,
    /// With `git`: where the mirror and worktrees live.
    checkouts: Option<PathBuf>,
    /// With `git`: most worktrees kept.
    max_checkouts: Option<usize>,
    /// With `git`: most disk the worktrees may take, e.g. "20GiB".
    max_checkouts_size: Option<String>,
    /// With `git`: the longest a clone, fetch or checkout may take.
    checkout_timeout: Option<String>,
    /// Prints the commit the workdir holds, the proof sent with results.
    revision_check: Option<Vec<String>>,
}

/// Bytes in a size like `512MiB`, `20GB` or `1000000`.
fn size(runner: &str, field: &str, v: &str) -> Result<u64, ProfileError> {
    let t = v.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => u64::MAX,
    };
    match n.parse::<u64>() {
        Ok(n) if unit_bytes != u64::MAX => Ok(n.saturating_mul(unit_bytes)),
        _ => Err(ProfileError::Invalid {
            runner: runner.to_owned(),
            reason: format!("{field} '{v}' is not a size like 20GiB"),
        }),
    }
}

/// Where a `git` runner keeps its checkouts when its profile does not say.
fn default_checkouts(runner: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("shardgate").join("checkouts").join(runner)
}

fn duration(runner: &str, field: &str, v: &Option<String>) -> Result<Option<Duration>, ProfileError> {
    v.as_deref()
        .map(|s| {
            humantime::parse_duration(s).map_err(|e| ProfileError::Invalid {
                runner: runner.to_owned(),
                reason: format!("{field} '{s}' is not a duration like 10m: {e}"),
            })
        })
        .transpose()
}

fn non_empty(runner: &str, field: &str, v: &Option<Vec<String>>) -> Result<(), ProfileError> {
    if v.as_ref().is_some_and(|c| c.is_empty() || c[0].is_empty()) {
        return Err(ProfileError::Invalid {
            runner: runner.to_owned(),
            reason: format!("{field} must name a program"),
        });
    }
    Ok(())
}

/// Parses a profiles file's text into runners.
pub fn parse(text: &str, max_output: usize) -> Result<Runners, ProfileError> {
    let file: File = toml::from_str(text)?;
    let mut out = Runners::new();
    for (name, spec) in file.runners {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ProfileError::Invalid {
                runner: name,
                reason: "a runner name uses letters, digits, '-', '_' and '.', at most 64".into(),
            });
        }
        let invalid = |reason: &str| ProfileError::Invalid {
            runner: name.clone(),
            reason: reason.to_owned(),
        };
        non_empty(&name, "list", &spec.list)?;
        non_empty(&name, "run", &spec.run)?;
        non_empty(&name, "setup", &spec.setup)?;
        non_empty(&name, "revision_check", &spec.revision_check)?;
        if spec.git.is_none()
            && (spec.checkouts.is_some()
                || spec.max_checkouts.is_some()
                || spec.max_checkouts_size.is_some()
                || spec.checkout_timeout.is_some())
        {
            return Err(invalid(
                "checkouts, max_checkouts, max_checkouts_size and checkout_timeout need git",
            ));
        }
        let runner = match runners::tool(spec.kind) {
            None => {
                let root = spec
                    .root
                    .as_ref()
                    .ok_or_else(|| invalid("an exec runner needs root"))?;
                if spec.run.is_some() || spec.list.is_some() || spec.id.is_some() {
                    return Err(invalid("an exec runner takes no list, run or id"));
                }
                Runner::Exec(ExecRunner::new(root, max_output).map_err(|e| invalid(&e.to_string()))?)
            }
            Some(tool) => {
                let git = match &spec.git {
                    None => None,
                    Some(repo) if repo.trim().is_empty() || repo.starts_with('-') => {
                        return Err(invalid("git must name a repository (a URL or a path)"));
                    }
                    Some(repo) => Some(runners::workspace::GitConfig {
                        repo: repo.clone(),
                        dir: spec.checkouts.clone().unwrap_or_else(|| default_checkouts(&name)),
                        max_checkouts: match spec.max_checkouts {
                            Some(0) => return Err(invalid("max_checkouts must be at least 1")),
                            n => n.unwrap_or(8),
                        },
                        max_bytes: spec
                            .max_checkouts_size
                            .as_deref()
                            .map(|v| size(&name, "max_checkouts_size", v))
                            .transpose()?,
                        timeout: duration(&name, "checkout_timeout", &spec.checkout_timeout)?
                            .unwrap_or(Duration::from_secs(600)),
                    }),
                };
                let workdir = match (&git, spec.workdir.clone()) {
                    (Some(_), None) => PathBuf::new(),
                    (Some(_), Some(w))
                        if w.is_absolute()
                            || w.components().any(|c| c == std::path::Component::ParentDir) =>
                    {
                        return Err(invalid(
                            "with git, workdir is a path inside the checkout (relative, without '..')",
                        ));
                    }
                    (Some(_), Some(w)) => w,
                    (None, w) => w.ok_or_else(|| invalid("workdir is required (or git)"))?,
                };
                if spec.root.is_some() {
                    return Err(invalid("root is for exec runners; use workdir"));
                }
                let commands = tool
                    .configure(ToolSpec {
                        list: spec.list.as_ref(),
                        run: spec.run.as_ref(),
                        id: spec.id,
                    })
                    .map_err(|e| invalid(&e))?;
                if !commands.run.iter().any(|a| a == "{tests}") {
                    return Err(invalid("run must contain the argument {tests}"));
                }
                if tool.writes_junit() && !commands.run.iter().any(|a| a.contains("{junit}")) {
                    return Err(invalid("run must write JUnit XML to {junit}"));
                }
                Runner::Command(Box::new(CommandRunner::new(runners::Config {
                    name: name.clone(),
                    kind: spec.kind,
                    workdir,
                    list: commands.list,
                    run: commands.run,
                    env: spec.env.clone(),
                    setup: spec.setup.clone(),
                    setup_timeout: duration(&name, "setup_timeout", &spec.setup_timeout)?
                        .unwrap_or(Duration::from_secs(600)),
                    shard_timeout: duration(&name, "shard_timeout", &spec.shard_timeout)?,
                    id: commands.id,
                    max_output,
                    git,
                    revision_check: spec.revision_check.clone(),
                })))
            }
        };
        out.insert(name, runner);
    }
    Ok(out)
}

/// Reads and parses a profiles file.
pub fn load(path: &std::path::Path, max_output: usize) -> Result<Runners, ProfileError> {
    let text = std::fs::read_to_string(path).map_err(|error| ProfileError::Read {
        path: path.display().to_string(),
        error,
    })?;
    parse(&text, max_output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pytest_and_junit_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[runners.py]
kind = "pytest"
workdir = "{d}"
env = {{ A = "1" }}
setup = ["true"]
setup_timeout = "2m"

[runners.gradle]
kind = "junit"
workdir = "{d}"
run = ["./run-tests", "--out", "{{junit}}", "{{tests}}"]
id = "classname::name"
shard_timeout = "30m"

[runners.scripts]
kind = "exec"
root = "{d}"
"#,
            d = dir.path().display()
        );
        let r = parse(&text, 1024).unwrap();
        assert_eq!(
            r.keys().cloned().collect::<Vec<_>>(),
            vec!["gradle", "py", "scripts"]
        );
        assert_eq!(r["py"].kind(), shardgate_common::RunnerKind::Pytest);
        assert_eq!(r["gradle"].kind(), shardgate_common::RunnerKind::Junit);
        assert_eq!(r["scripts"].kind(), shardgate_common::RunnerKind::Exec);
    }

    #[test]
    fn bad_profiles_name_the_runner_and_the_problem() {
        let cases = [
            (
                "[runners.x]\nkind = \"rspec\"\nworkdir = \"/\"",
                "unknown runner kind 'rspec' (one of: exec, pytest, junit, nextest, cargo-test, go-test)",
            ),
            (
                "[runners.x]\nkind = \"junit\"\nworkdir = \"/\"",
                "runner 'x': a junit runner needs run",
            ),
            (
                "[runners.x]\nkind = \"junit\"\nworkdir = \"/\"\nrun = [\"t\", \"{junit}\"]",
                "must contain the argument {tests}",
            ),
            (
                "[runners.x]\nkind = \"pytest\"",
                "runner 'x': workdir is required (or git)",
            ),
            (
                "[runners.x]\nkind = \"pytest\"\nworkdir = \"/\"\nsetup_timeout = \"soon\"",
                "setup_timeout 'soon' is not a duration",
            ),
            (
                "[runners.x]\nkind = \"pytest\"\nworkdir = \"/\"\nbogus = 1",
                "unknown field `bogus`",
            ),
            (
                "[runners.x]\nkind = \"pytest\"\nworkdir = \"/\"\nrun = []",
                "run must name a program",
            ),
            (
                "[runners.\"a b\"]\nkind = \"pytest\"\nworkdir = \"/\"",
                "a runner name uses letters",
            ),
            ("[runners.x]\nkind = \"exec\"", "an exec runner needs root"),
            ("runners = 3", "invalid runner profiles"),
        ];
        for (text, want) in cases {
            let e = parse(text, 1024).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = parse(&s, 1024);
        }

        #[test]
        fn arbitrary_profile_like_text_never_panics(parts in proptest::collection::vec(
            proptest::sample::select(vec![
                "[runners.a]\n", "[runners.b]\n", "kind = \"pytest\"\n", "kind = \"junit\"\n",
                "kind = \"exec\"\n", "workdir = \"/tmp\"\n", "root = \"/nonexistent\"\n",
                "run = [\"x\", \"{tests}\", \"{junit}\"]\n", "run = []\n", "list = [\"\"]\n",
                "env = { A = \"1\" }\n", "id = \"name\"\n", "shard_timeout = \"1x\"\n", "= =\n",
            ]), 0..12)) {
            let _ = parse(&parts.concat(), 1024);
        }
    }
}
