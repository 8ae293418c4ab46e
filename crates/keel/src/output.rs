//! The one place where the CLI prints.

use std::io::Write;

/// A line for the user on stdout. When stdout is closed (`keel tasks events ID | head -1`),
/// keel stops quietly, as `grep` or `kubectl` do, instead of panicking on the broken pipe.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        error(&format!("cannot write to stdout: {e}"));
        std::process::exit(1);
    }
}

/// A warning for the user on stderr, prefixed `warning: `.
#[expect(clippy::print_stderr, reason = "CLI output")]
pub fn warning(text: &str) {
    eprintln!("warning: {text}");
}

/// An error for the user on stderr, prefixed `error: `.
#[expect(clippy::print_stderr, reason = "CLI output")]
pub fn error(text: &str) {
    eprintln!("error: {text}");
}
