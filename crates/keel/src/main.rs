//! The `keel` binary: parses the command line and hands off.

mod cli;
mod output;
mod serve;

use std::process::ExitCode;

use clap::Parser;

/// glibc's malloc spends a fifth of the gateway's time at saturation in
/// allocation and free across threads (measured with perf); mimalloc's
/// per-thread heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            output::error(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
