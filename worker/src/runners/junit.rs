//! Any tool that writes JUnit XML: the profile gives the run command (with `{tests}` and
//! `{junit}`), optionally a list command, and how a `testcase` names a test.

use super::batch::IdFormat;
use super::{Commands, Tool, ToolSpec};

#[derive(Debug)]
pub struct Junit;

impl Tool for Junit {
    fn configure(&self, spec: ToolSpec<'_>) -> Result<Commands, String> {
        let run = spec.run.cloned().ok_or("a junit runner needs run")?;
        Ok(Commands {
            list: spec.list.cloned(),
            run,
            id: spec.id.unwrap_or(IdFormat::ClassnameDotName),
        })
    }
}
