//! pytest: node ids as test ids, listed with `--collect-only -q`, a shard run with JUnit XML in
//! the `xunit1` family (which records each test's file, so node ids can be rebuilt).

use super::batch::IdFormat;
use super::{Commands, Tool, ToolSpec};
use crate::junit::Case;

#[derive(Debug)]
pub struct Pytest;

impl Tool for Pytest {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        if spec.id.is_some() {
            return Err("pytest maps JUnit test cases to node ids itself; remove id".into());
        }
        Ok(Commands {
            list: Some(spec.list.cloned().unwrap_or_else(list)),
            run: spec.run.cloned().unwrap_or_else(run),
            id: IdFormat::PytestNodeId,
        })
    }

    /// `pytest --collect-only -q` prints node ids, then a blank line and a summary.
    fn parse_listing(&self, stdout: &str) -> Vec<String> {
        stdout
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.contains("::"))
            .map(|l| l.trim().to_owned())
            .collect()
    }
}

/// pytest's default listing command.
fn list() -> Vec<String> {
    [
        "python3",
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    .map(String::from)
    .to_vec()
}

/// pytest's default run command: JUnit with the file recorded, so node ids can be rebuilt.
fn run() -> Vec<String> {
    [
        "python3",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        "--junitxml={junit}",
        "-q",
        "--",
        "{tests}",
    ]
    .map(String::from)
    .to_vec()
}

/// pytest's node id of a JUnit test case written with `junit_family=xunit1` (which records the
/// file): the file, the classes below the module, the test name.
pub(crate) fn node_id(c: &Case) -> String {
    let file = if c.file.is_empty() {
        // xunit2 has no file: guess the module from the classname.
        format!("{}.py", c.classname.replace('.', "/"))
    } else {
        c.file.clone()
    };
    let module = file.trim_end_matches(".py").replace(['/', '\\'], ".");
    let classes = c
        .classname
        .strip_prefix(&module)
        .unwrap_or("")
        .trim_start_matches('.');
    let mut id = file;
    for class in classes.split('.').filter(|s| !s.is_empty()) {
        id.push_str("::");
        id.push_str(class);
    }
    id.push_str("::");
    id.push_str(&c.name);
    id
}
