//! Running other programs and finding things on this machine: the workspace root, cargo, the
//! PATH, whether we are root, whether we run under CI.
//!
//! Every child gets a closed stdin: CI runs with no standard input, and a prompt that waits
//! for an answer would hang the run instead of failing it.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The workspace root: the parent of the xtask package.
///
/// Read at run time from `CARGO_MANIFEST_DIR` (set by `cargo run`), so a target directory shared
/// between clones at different paths still points at the clone being tested.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), Path::to_path_buf)
}

/// The cargo that started us (`$CARGO`), so every step uses the pinned toolchain.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// A `cargo` command run from the workspace root with stdin closed (and, under CI, no colour).
pub fn cargo_command(root: &Path) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).stdin(Stdio::null());
    if ci() {
        cmd.env("CARGO_TERM_COLOR", "never");
        // A CI build runs once from a clean clone: the incremental cache would only cost disk.
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// True when `CI` is set to anything but empty, `0` or `false`.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !matches!(value.as_str(), "" | "0" | "false"))
}

/// True when this process runs as uid 0 (read from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// The first executable file called `name` on `PATH`, like `command -v`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// True when `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Runs `cmd` with its output captured; on failure the error carries the output's tail.
///
/// For installers: quiet when all goes well, everything needed to debug when it does not.
pub fn run_quiet(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    bail!("{what} failed ({}):\n{}", output.status, tail(&text, 40))
}

/// True when `cmd` runs and exits 0, with all output discarded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs `cmd` with stdout and stderr passed through; returns whether it exited 0.
pub fn run_passthrough(cmd: &mut Command) -> anyhow::Result<bool> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    Ok(status.success())
}

/// Runs `cmd`, copying its stderr to ours line by line, and returns whether it exited 0 plus
/// the last stderr line (ANSI colour removed, trimmed) that satisfies `keep`.
///
/// This is how the test gate remembers nextest's `Summary` line to print it again last.
pub fn run_tee_stderr(
    cmd: &mut Command,
    keep: impl Fn(&str) -> bool,
) -> anyhow::Result<(bool, Option<String>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    let kept = match child.stderr.take() {
        Some(stderr) => copy_lines_to_stderr(stderr, keep),
        None => None,
    };
    let status = child.wait().context("waiting for the child")?;
    Ok((status.success(), kept))
}

fn copy_lines_to_stderr(from: impl Read, keep: impl Fn(&str) -> bool) -> Option<String> {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    let mut kept = None;
    let mut stderr = std::io::stderr();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                // A closed stderr must not stop us from draining the child's pipe.
                let _ = stderr.write_all(&line);
                let text = strip_ansi(&String::from_utf8_lossy(&line));
                let text = text.trim();
                if keep(text) {
                    kept = Some(text.to_owned());
                }
            }
        }
    }
    kept
}

/// Removes ANSI escape sequences (`ESC [ ... letter`) from `text`.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_ansi_removes_colour_codes() {
        let coloured = "\u{1b}[32;1m     Summary\u{1b}[0m [   1.0s] 3 tests run";
        assert_eq!(strip_ansi(coloured), "     Summary [   1.0s] 3 tests run");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").is_dir());
    }

    #[test]
    fn tee_keeps_the_last_matching_line() {
        let input = "one\nSummary first\ntwo\nSummary [1s] 2 tests run\nerror: x\n";
        let kept = copy_lines_to_stderr(input.as_bytes(), |l| l.starts_with("Summary"));
        assert_eq!(kept.as_deref(), Some("Summary [1s] 2 tests run"));
    }

    #[test]
    fn find_on_path_finds_sh() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("surely-not-a-program-keel").is_none());
    }
}
