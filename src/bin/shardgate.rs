//! `shardgate`: the client and the embedded `local` mode.

use std::process::ExitCode;

use clap::Parser;
use shardgate::args::Cli;
use shardgate::{exit, util};

fn main() -> ExitCode {
    // nextest may start this program as its target runner (see `nextest_direct.rs`).
    shardgate_worker::runners::record_start_if_asked();
    run()
}

#[tokio::main]
async fn run() -> ExitCode {
    util::exit_quietly_on_closed_output();
    let cli = Cli::parse();
    util::init_logging("warn", cli.log_format);
    match shardgate::cli::main(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => match util::closed_output_exit(&e) {
            Some(code) => ExitCode::from(code),
            None => {
                eprintln!("error: {}", util::error_text(&e));
                ExitCode::from(exit::ERROR)
            }
        },
    }
}
