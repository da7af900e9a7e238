//! `shardgate`: the client and the embedded `local` mode.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::Cli;
use shardgate::{exit, util};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    util::init_logging("warn");
    match shardgate::cli::main(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
