//! The `svft` command line: a bare `svft` runs the training demo; `decompose`, `init-adapter`,
//! `merge`, `inspect` and `bench` are the tools around it (see `svft help`).

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::Cli;

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    // A bare `svft` is `svft demo` with every default.
    let command = cli.command.or_else(|| Cli::parse_from(["svft", "demo"]).command).expect("demo parses");
    match cli::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svft: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so `svft inspect F | head` would panic on the closed pipe; a command-line
/// tool should end quietly instead, as the default disposition does.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resetting a signal to its default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
