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
    // A command whose output is piped into `head` ends quietly when the reader goes, as Unix
    // tools do, instead of panicking on the broken pipe. The daemons keep ignoring SIGPIPE: a
    // log reader that goes away must not stop them.
    if !matches!(
        cli.command,
        cli::Command::Run { .. } | cli::Command::Sandbox(_)
    ) {
        end_quietly_on_broken_pipe();
    }
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

/// Restores the default SIGPIPE disposition (the Rust runtime ignores it at start-up).
fn end_quietly_on_broken_pipe() {
    // SAFETY: called at start-up, before the runtime starts any thread; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
