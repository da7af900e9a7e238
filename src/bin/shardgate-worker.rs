//! `shardgate-worker`: parses flags, sets up logging and runs shards until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::WorkerArgs;
use shardgate::{servers, util};

#[tokio::main]
async fn main() -> ExitCode {
    let args = WorkerArgs::parse();
    util::init_logging("info");
    util::server_exit(servers::worker(args).await)
}
