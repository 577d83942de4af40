//! `contact-sync`: parse the command line, set up logging, hand over to the library.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0; a usage error exits 64 (EX_USAGE), apart
        // from the codes the commands use (2: no such job, 3: wrong state)
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The demo and the benchmark narrate on stdout; their logs default to warnings.
    let default_level = match cli.command {
        cli::Command::Demo | cli::Command::Bench(_) | cli::Command::BenchCalls { .. } => "warn",
        cli::Command::Run { .. } | cli::Command::Sandbox(_) => "info",
        // an operator command speaks through its output and errors; sqlx's slow-statement
        // notes (the SQL, many lines) are not for the operator's terminal
        _ => "warn,sqlx=error",
    };
    contact_sync::telemetry::init(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
