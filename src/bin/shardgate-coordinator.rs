//! `shardgate-coordinator`: parses flags, sets up logging and serves until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::CoordinatorArgs;
use shardgate::{exit, servers, util};

#[tokio::main]
async fn main() -> ExitCode {
    let args = CoordinatorArgs::parse();
    util::init_logging("info");
    match servers::coordinator(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
