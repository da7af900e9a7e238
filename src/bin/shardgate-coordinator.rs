//! `shardgate-coordinator`: parses flags, sets up logging and serves until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::CoordinatorArgs;
use shardgate::{servers, util};

#[tokio::main]
async fn main() -> ExitCode {
    let args = CoordinatorArgs::parse();
    util::init_logging("info");
    util::server_exit(servers::coordinator(args).await)
}
