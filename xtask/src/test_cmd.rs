//! `cargo xtask test`: the CI gate, one step after another, stopping at the first failure.
//!
//! Steps, in order: `install` (see [`crate::install`]), `fmt`, `clippy`, `doc` (rustdoc with
//! broken intra-doc links denied, STYLE.md §8), `doctest`, `nextest`. Each step prints a
//! `==> name` header and how long it took. nextest runs last and its `Summary` line is printed
//! again as the very last line of the output, so whoever reads the closing line of a run (a
//! person, or CI) sees the test count, even after the step timings.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::bail;

use crate::install::{self, Mode, NEEDS, TestEnv};
use crate::process::{cargo_command, ci, run_passthrough, run_tee_stderr, workspace_root};

/// One step of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Install the tools the tests need.
    Install,
    /// `cargo fmt --all --check`.
    Fmt,
    /// `cargo clippy --workspace --all-targets --all-features -- -D warnings`.
    Clippy,
    /// `cargo doc --workspace --no-deps` with broken intra-doc links denied.
    Doc,
    /// `cargo test --workspace --all-features --doc`.
    Doctest,
    /// `cargo nextest run --workspace --all-features --no-fail-fast`.
    Nextest,
}

impl Step {
    /// Every step, in the order the gate runs them.
    pub const ALL: [Step; 6] = [
        Step::Install,
        Step::Fmt,
        Step::Clippy,
        Step::Doc,
        Step::Doctest,
        Step::Nextest,
    ];

    /// The step's name on the command line and in headers.
    pub fn name(self) -> &'static str {
        match self {
            Step::Install => "install",
            Step::Fmt => "fmt",
            Step::Clippy => "clippy",
            Step::Doc => "doc",
            Step::Doctest => "doctest",
            Step::Nextest => "nextest",
        }
    }

    /// The step called `name`.
    pub fn from_name(name: &str) -> anyhow::Result<Step> {
        match Step::ALL.into_iter().find(|step| step.name() == name) {
            Some(step) => Ok(step),
            None => {
                let names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
                bail!("unknown step `{name}` (steps: {})", names.join(", "))
            }
        }
    }
}

/// Options of `cargo xtask test`.
#[derive(Debug, Default, PartialEq)]
pub struct TestArgs {
    /// Steps not to run.
    pub skip: Vec<Step>,
    /// When not empty, run only these steps (still in gate order).
    pub only: Vec<Step>,
}

impl TestArgs {
    fn runs(&self, step: Step) -> bool {
        (self.only.is_empty() || self.only.contains(&step)) && !self.skip.contains(&step)
    }
}

/// Runs the gate; the exit code is non-zero when a step failed.
pub fn run(args: &TestArgs) -> anyhow::Result<ExitCode> {
    let root = workspace_root();
    let mut gate = Gate {
        root: &root,
        env: TestEnv::default(),
        summary: None,
    };
    // Without the install step, still tell the tests about tools that are already there.
    if !args.runs(Step::Install) {
        gate.env = install::ensure(&root, NEEDS, Mode::DetectOnly)?;
    }
    let mut failed = None;
    for step in Step::ALL.into_iter().filter(|&step| args.runs(step)) {
        println!("==> {}", step.name());
        let started = Instant::now();
        let ok = match gate.run(step) {
            Ok(ok) => ok,
            Err(err) => {
                println!("    {err:#}");
                false
            }
        };
        let verdict = if ok { "ok" } else { "FAILED" };
        println!(
            "    {} {verdict} in {:.1}s",
            step.name(),
            started.elapsed().as_secs_f64()
        );
        if !ok {
            failed = Some(step);
            break;
        }
    }
    if let Some(step) = failed {
        println!("==> cargo xtask test failed at step `{}`", step.name());
    }
    // Last line: nextest's own verdict on the test run.
    if let Some(summary) = &gate.summary {
        println!("{summary}");
    }
    Ok(if failed.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

struct Gate<'a> {
    root: &'a Path,
    env: TestEnv,
    summary: Option<String>,
}

impl Gate<'_> {
    /// Runs one step; `Ok(false)` when the step's command failed.
    fn run(&mut self, step: Step) -> anyhow::Result<bool> {
        match step {
            Step::Install => {
                self.env = install::ensure(self.root, NEEDS, Mode::Install)?;
                for (key, value) in self.env.vars() {
                    println!("    {key}={}", value.to_string_lossy());
                }
                Ok(true)
            }
            Step::Fmt => {
                let mut cmd = self.cargo();
                cmd.args(["fmt", "--all", "--check"]);
                if ci() {
                    // rustfmt colours its diff even into a pipe unless told not to.
                    cmd.args(["--", "--color", "never"]);
                }
                run_passthrough(&mut cmd)
            }
            Step::Clippy => run_passthrough(self.cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ])),
            Step::Doc => run_passthrough(
                self.cargo()
                    .args(["doc", "--workspace", "--no-deps"])
                    .env("RUSTDOCFLAGS", "-D rustdoc::broken_intra_doc_links"),
            ),
            Step::Doctest => {
                let mut cmd = self.cargo();
                cmd.args(["test", "--workspace", "--all-features", "--doc"]);
                self.env.apply(&mut cmd);
                run_passthrough(&mut cmd)
            }
            Step::Nextest => {
                let mut cmd = self.cargo();
                cmd.args([
                    "nextest",
                    "run",
                    "--workspace",
                    "--all-features",
                    "--no-fail-fast",
                ]);
                if ci() {
                    cmd.args(["--profile", "ci"]);
                } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    // Our pipe would turn nextest's colours off; a person at a terminal wants them.
                    cmd.args(["--color", "always"]);
                }
                self.env.apply(&mut cmd);
                let (ok, summary) = run_tee_stderr(&mut cmd, is_nextest_summary)?;
                self.summary = summary;
                Ok(ok)
            }
        }
    }

    fn cargo(&self) -> Command {
        cargo_command(self.root)
    }
}

/// nextest's closing line: `Summary [   1.234s] 12 tests run: 12 passed, 0 skipped`.
fn is_nextest_summary(line: &str) -> bool {
    line.starts_with("Summary [") && line.contains(" run:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip() {
        for step in Step::ALL {
            assert_eq!(Step::from_name(step.name()).unwrap(), step);
        }
    }

    #[test]
    fn only_and_skip_select_steps() {
        let args = TestArgs {
            skip: vec![Step::Fmt],
            only: vec![Step::Install, Step::Fmt],
        };
        assert!(args.runs(Step::Install));
        assert!(!args.runs(Step::Fmt));
        assert!(!args.runs(Step::Nextest));
        assert!(TestArgs::default().runs(Step::Nextest));
    }

    #[test]
    fn recognises_nextest_summary_lines() {
        assert!(is_nextest_summary(
            "Summary [   0.345s] 12 tests run: 12 passed, 0 skipped"
        ));
        assert!(is_nextest_summary(
            "Summary [   1.000s] 3 tests run: 2 passed, 1 failed, 0 skipped"
        ));
        assert!(!is_nextest_summary("test result: ok. 3 passed; 0 failed"));
    }
}
