//! `--config FILE`: a TOML file with the same keys as the flags (`grpc_addr = "0.0.0.0:7070"`,
//! `drain-grace = "45s"`, `redact = ["password=\\S+"]`). Precedence: a flag on the command line,
//! then its `SHARDGATE_*` variable, then the file, then the default. A key that is no flag of
//! the binary is refused with its name.
//!
//! The file is turned into command-line arguments placed before the user's own, for the flags
//! neither the command line nor the environment sets, so clap checks every value as it checks a
//! flag's.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::ArgAction;

/// Reads the config file named by `--config FILE` (or `SHARDGATE_CONFIG`) in `argv`, if any, and
/// returns `argv` with the file's settings added for `cmd`'s flags.
pub fn with_config_file(cmd: &clap::Command, argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&argv) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read the config file '{}'", path.display()))?;
    let extra = settings(cmd, &text, &argv, |k| std::env::var_os(k).is_some())
        .with_context(|| format!("invalid config file '{}'", path.display()))?;
    let mut out = Vec::with_capacity(argv.len() + extra.len());
    let mut argv = argv.into_iter();
    out.extend(argv.next());
    out.extend(extra);
    out.extend(argv);
    Ok(out)
}

fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("SHARDGATE_CONFIG").map(PathBuf::from)
}

/// The arguments the file `text` adds: for each key, its flag and value(s), unless the flag is
/// on the command line or `env_set` says its variable is set.
fn settings(
    cmd: &clap::Command,
    text: &str,
    argv: &[OsString],
    env_set: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text.parse()?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            let known: Vec<&str> = cmd
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config" && *l != "help" && *l != "version")
                .collect();
            bail!(
                "unknown key '{key}': {} takes {}",
                cmd.get_name(),
                known.join(", ")
            );
        };
        let on_command_line = argv.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{long}") || a.starts_with(&format!("--{long}="))
        });
        let from_env = arg.get_env().is_some_and(|e| env_set(&e.to_string_lossy()));
        if on_command_line || from_env {
            continue;
        }
        let flag = OsString::from(format!("--{long}"));
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                toml::Value::Boolean(true) => out.push(flag),
                toml::Value::Boolean(false) => {}
                other => bail!("key '{key}' is a switch: give true or false, not {other}"),
            },
            _ => {
                let values = match value {
                    toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<Vec<_>, _>>(),
                    v => scalar(v).map(|s| vec![s]),
                }
                .map_err(|what| anyhow::anyhow!("key '{key}': {what}"))?;
                for v in values {
                    out.push(flag.clone());
                    out.push(OsString::from(v));
                }
            }
        }
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("{} is not a value a flag takes", other.type_str())),
    }
}

/// For tests: the settings a file adds, with no environment.
#[cfg(test)]
fn settings_without_env(cmd: &clap::Command, text: &str, argv: &[&str]) -> anyhow::Result<Vec<String>> {
    let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
    Ok(settings(cmd, text, &argv, |_| false)?
        .into_iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{CoordinatorArgs, WorkerArgs};
    use clap::{CommandFactory, Parser};

    #[test]
    fn keys_become_flags_unless_the_command_line_sets_them() {
        let cmd = CoordinatorArgs::command();
        let text = "grpc_addr = \"0.0.0.0:7171\"\nhttp-addr = \"0.0.0.0:7181\"\nauto_quarantine = true\nmax_active_runs = 7\ninsecure_no_auth = false\n";
        let got = settings_without_env(
            &cmd,
            text,
            &["shardgate-coordinator", "--http-addr", "127.0.0.1:1"],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "--auto-quarantine",
                "--grpc-addr",
                "0.0.0.0:7171",
                "--max-active-runs",
                "7"
            ]
        );
        let mut argv = vec!["shardgate-coordinator".to_owned()];
        argv.extend(got);
        argv.extend(["--http-addr".to_owned(), "127.0.0.1:1".to_owned()]);
        let args = CoordinatorArgs::try_parse_from(argv).unwrap();
        assert_eq!(args.grpc_addr.to_string(), "0.0.0.0:7171");
        assert_eq!(args.http_addr.to_string(), "127.0.0.1:1", "the flag wins");
    }

    #[test]
    fn lists_repeat_the_flag_and_unknown_keys_are_named() {
        let cmd = WorkerArgs::command();
        let got = settings_without_env(&cmd, "redact = [\"a=\\\\S+\", \"b\"]\nslots = 4\n", &["w"]).unwrap();
        assert_eq!(got, ["--redact", "a=\\S+", "--redact", "b", "--slots", "4"]);
        let e = settings_without_env(&cmd, "slot = 4\n", &["w"])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("unknown key 'slot': shardgate-worker takes"), "{e}");
        assert!(e.contains("slots"), "{e}");
        let e = settings_without_env(&cmd, "check = \"yes\"\n", &["w"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a switch"), "{e}");
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let cmd = WorkerArgs::command();
        let argv = [OsString::from("w")];
        let got = settings(&cmd, "slots = 4\nname = \"a\"\n", &argv, |e| {
            e == "SHARDGATE_SLOTS"
        })
        .unwrap();
        assert_eq!(got, [OsString::from("--name"), OsString::from("a")]);
    }
}
