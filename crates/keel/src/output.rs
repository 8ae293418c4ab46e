//! The one place where the CLI prints.

/// A line for the user on stdout.
#[expect(clippy::print_stdout, reason = "CLI output")]
pub fn line(text: &str) {
    println!("{text}");
}

/// An error for the user on stderr, prefixed `error: `.
#[expect(clippy::print_stderr, reason = "CLI output")]
pub fn error(text: &str) {
    eprintln!("error: {text}");
}
