//! `shardgate-worker`: parses flags, sets up logging and runs shards until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::WorkerArgs;
use shardgate::{exit, servers, util};

#[tokio::main]
async fn main() -> ExitCode {
    let args = WorkerArgs::parse();
    util::init_logging("info");
    match servers::worker(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
