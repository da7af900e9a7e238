//! `shardgate-worker`: parses flags, sets up logging and runs shards until SIGTERM.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use shardgate::args::WorkerArgs;
use shardgate::{servers, util};

fn main() -> ExitCode {
    // nextest may start this program as its target runner (see `nextest_direct.rs`).
    shardgate_worker::runners::record_start_if_asked();
    run()
}

#[tokio::main]
async fn run() -> ExitCode {
    util::exit_quietly_on_closed_output();
    let argv =
        match shardgate::config::with_config_file(&WorkerArgs::command(), std::env::args_os().collect()) {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("error: {}", shardgate::util::error_text(&e));
                return ExitCode::from(shardgate::exit::ERROR);
            }
        };
    let args = WorkerArgs::parse_from(argv);
    util::init_logging("info", args.log_format);
    let result = servers::worker(args).await;
    // A check that found a broken runner is a finding, not an error of the worker's own.
    if let Err(e) = &result
        && let Some(failed) = e.downcast_ref::<servers::CheckFailed>()
    {
        eprintln!("{failed}");
        return ExitCode::from(1);
    }
    util::server_exit(result)
}
