//! Real suites from PyPI for the runner tests and the peers benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Downloads the sdist of `spec` (`name==version`) with pip into `into` and unpacks it there;
/// returns the project's directory.
pub fn sdist(spec: &str, into: &Path) -> Result<PathBuf, String> {
    let run = |cmd: &mut Command, what: &str| match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{what} failed ({s})")),
        Err(e) => Err(format!("{what} could not start: {e}")),
    };
    std::fs::create_dir_all(into).map_err(|e| format!("{}: {e}", into.display()))?;
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
            ])
            .arg(into)
            .arg(spec),
        &format!("pip download {spec}"),
    )?;
    let files = || {
        std::fs::read_dir(into)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
    };
    let tarball = files()
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .ok_or_else(|| format!("pip downloaded no sdist of {spec}"))?;
    run(
        Command::new("tar").arg("xzf").arg(&tarball).arg("-C").arg(into),
        &format!("unpacking {}", tarball.display()),
    )?;
    files()
        .find(|p| p.is_dir())
        .ok_or_else(|| format!("the sdist of {spec} holds no directory"))
}
