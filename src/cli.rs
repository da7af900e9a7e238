//! The `shardgate` command's dispatch: one function per subcommand, in the module that owns it.

use crate::args::{Cli, Command};
use crate::{client, gate, local};

pub async fn main(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(a) => client::run(a).await,
        Command::Local(a) => local::run(*a).await,
        Command::Watch(r) => client::watch(r).await,
        Command::Status(r) => client::status(r).await,
        Command::Cancel(c) => client::cancel(c).await,
        Command::Runs(l) => client::runs(l).await,
        Command::Workers(l) => client::workers(l).await,
        Command::Flaky(a) => gate::flaky(a).await,
        Command::Quarantine(q) => gate::quarantine(q).await,
        Command::Deploys(d) => gate::deploys(d).await,
        Command::Token(t) => gate::token(t),
        Command::Completions(c) => {
            let mut cmd = c.binary.command();
            let name = cmd.get_name().to_owned();
            clap_complete::generate(c.shell, &mut cmd, name, &mut std::io::stdout());
            Ok(crate::exit::PASSED)
        }
        Command::Man(m) => {
            clap_mangen::Man::new(m.binary.command()).render(&mut std::io::stdout())?;
            Ok(crate::exit::PASSED)
        }
    }
}
