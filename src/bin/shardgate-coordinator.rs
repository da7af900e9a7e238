//! `shardgate-coordinator`: parses flags, sets up logging and serves until SIGTERM; or, as
//! `shardgate-coordinator backup`, copies a live database.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use shardgate::args::CoordinatorArgs;
use shardgate::{servers, util};

#[tokio::main]
async fn main() -> ExitCode {
    util::exit_quietly_on_closed_output();
    // `shardgate-coordinator backup --db … --to …`: a copy of a live database, then exit.
    if std::env::args_os().nth(1).is_some_and(|a| a == "backup") {
        let args = shardgate::args::BackupArgs::parse_from(std::env::args_os().skip(1));
        return util::server_exit(servers::backup(&args));
    }
    let argv =
        match shardgate::config::with_config_file(&CoordinatorArgs::command(), std::env::args_os().collect())
        {
            Ok(argv) => argv,
            Err(e) => {
                eprintln!("error: {}", shardgate::util::error_text(&e));
                return ExitCode::from(shardgate::exit::ERROR);
            }
        };
    let args = CoordinatorArgs::parse_from(argv);
    util::init_logging("info", args.log_format);
    util::server_exit(servers::coordinator(args).await)
}
