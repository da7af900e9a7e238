//! `shardgate-coordinator`: parses flags, sets up logging and serves until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::CoordinatorArgs;
use shardgate::{servers, util};

#[tokio::main]
async fn main() -> ExitCode {
    util::exit_quietly_on_closed_output();
    let args = CoordinatorArgs::parse();
    util::init_logging("info");
    util::server_exit(servers::coordinator(args).await)
}
