//! `contact-sync console`: serves the operator console until SIGTERM or SIGINT, and
//! `console hash-password`, which prints the hash a `[console.users.NAME]` entry carries.

use super::args::{ConsoleArgs, ConsoleCommand};
use anyhow::Context;
use contact_sync::config::Settings;
use contact_sync::console::{self, Access};
use contact_sync::worker::shutdown::Shutdown;
use std::process::ExitCode;

/// Where the console listens when neither `--listen` nor `console.listen` says.
const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

pub async fn run(
    args: ConsoleArgs,
    settings: &Settings,
    signals: Shutdown,
) -> anyhow::Result<ExitCode> {
    if let Some(ConsoleCommand::HashPassword) = args.command {
        let password = read_password()?;
        println!("{}", console::hash_password(&password)?);
        return Ok(ExitCode::SUCCESS);
    }
    let listen = match (args.listen, settings.console.listen.as_str()) {
        (Some(addr), _) => addr.to_string(),
        (None, "") => DEFAULT_LISTEN.to_string(),
        (None, configured) => configured.to_string(),
    };
    let pool = super::connect(settings).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("the console cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let access = if args.no_auth {
        Access::Open
    } else {
        Access::SignIn
    };
    // checks the access before saying where it listens
    let router = console::router(pool.clone(), settings.console.clone(), access, addr)?;
    println!(
        "console: http://{addr}/ ({})",
        match access {
            Access::Open => "no sign-in: anyone on this machine acts as an operator".to_string(),
            Access::SignIn => format!("{} user(s) may sign in", settings.console.users.len()),
        }
    );
    console::serve(listener, router, signals.graceful).await?;
    pool.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The password: from a terminal, asked for without echo; otherwise the first line of stdin.
fn read_password() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let echo = if terminal {
        eprint!("password (not shown): ");
        std::io::stderr().flush()?;
        EchoOff::new()
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    drop(echo);
    if terminal {
        eprintln!();
    }
    read.context("could not read the password from stdin")?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        anyhow::bail!("no password given: type it, or pipe it in (printf %s \"$PASSWORD\" | contact-sync console hash-password)");
    }
    Ok(password)
}

/// The terminal's echo turned off while it lives.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<EchoOff> {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios the call fills in.
        unsafe {
            let mut term: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut term) != 0 {
                return None;
            }
            let saved = term;
            term.c_lflag &= !libc::ECHO;
            term.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &term) != 0 {
                return None;
            }
            Some(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}
