//! The `turbosched` command line. `anyhow` lives here and only here: every error is
//! printed once and becomes an exit code (1: the command's answer is "no", e.g. a config
//! with errors or a run that failed; 2: it could not do its job at all).

mod bench;
mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
