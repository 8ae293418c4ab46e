//! The `keel` binary: parses the command line and hands off.

mod cli;
mod output;
mod serve;

use std::process::ExitCode;

use clap::Parser;

/// glibc's malloc spends a fifth of the gateway's time at saturation in
/// allocation and free across threads (measured with perf). jemalloc's thread
/// caches do not, and side by side it cost 0.9-5.1 us less CPU per call than
/// mimalloc in eleven rounds of twelve: mimalloc's generic path, which every
/// allocation over 1 KiB takes, weighed on a call (DEVELOPERS.md, "Where the
/// gateway's CPU goes").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
