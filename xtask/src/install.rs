//! Installs what the test suites need from the machine, and tells the tests where it is.
//!
//! A new machine (and so CI) has only the Rust toolchain, cargo-nextest and Python: whatever
//! else the tests use must be installed here, idempotently, and quietly when it is already
//! present. [`NEEDS`] is the one list of what the suites need; an issue that adds a suite using
//! PostgreSQL or Chromium flips its entry on. Each tool found is handed to the test processes
//! through an environment variable ([`TestEnv`]); the process environment is never mutated.
//!
//! | need | installed by | exported to tests |
//! | --- | --- | --- |
//! | Python with `openai` (SDK compatibility tests) | `python3 -m venv .venv` + pip | `KEEL_TEST_PYTHON` |
//! | `promtool` (checks `/metrics` text) | apt package `prometheus` | `PROMTOOL` |
//! | PostgreSQL server binaries (PostgreSQL store tests: `keel_store::testing::PgServer`) | apt package `postgresql` | `KEEL_TEST_PG_BIN` (the dir with `pg_ctl`, `initdb`, `postgres`) |
//! | Chromium (dashboard tests) | apt package `chromium` | `KEEL_TEST_CHROMIUM` |
//! | the example Wasm tool (Wasm tool tests) | `rustup target add wasm32-wasip1`, then `cargo build -p keel-example-refund` for it | `KEEL_TEST_REFUND_WASM` (the `.wasm` file) |
//!
//! PostgreSQL refuses to run as root: a suite that starts it must drop to another user.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::process::{cargo_command, find_on_path, is_executable, is_root, run_quiet, succeeds};

/// Which tools the test suites need. See [`NEEDS`].
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// A Python venv with the `openai` package at `<workspace>/.venv`.
    pub python_openai: bool,
    /// Prometheus's `promtool`.
    pub promtool: bool,
    /// PostgreSQL server binaries (`pg_ctl`, `initdb`, `postgres`).
    pub postgres: bool,
    /// A headless-capable Chromium.
    pub chromium: bool,
    /// The example Wasm tool (`examples/tools/refund`) built for `wasm32-wasip1`.
    pub wasm_tool: bool,
}

/// What the test suites need today. The one place to change when a suite starts using a tool.
pub const NEEDS: Needs = Needs {
    python_openai: true,
    promtool: true,
    postgres: true,
    chromium: true,
    wasm_tool: true,
};

/// Environment variables for the test processes (`cargo nextest`, `cargo test --doc`).
#[derive(Debug, Default)]
pub struct TestEnv {
    vars: Vec<(&'static str, OsString)>,
}

impl TestEnv {
    /// Sets these variables on `cmd` (and only on it).
    pub fn apply(&self, cmd: &mut Command) {
        for (key, value) in &self.vars {
            cmd.env(key, value);
        }
    }

    /// The variables, for printing.
    pub fn vars(&self) -> &[(&'static str, OsString)] {
        &self.vars
    }

    fn set(&mut self, key: &'static str, value: impl Into<OsString>) {
        self.vars.push((key, value.into()));
    }
}

/// Whether missing tools may be installed, or only looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Install what is missing.
    Install,
    /// Only find what is there (`--skip install`); missing tools are not exported.
    DetectOnly,
}

/// Makes sure every tool in `needs` is present (installing it in [`Mode::Install`]) and returns
/// the variables that tell the tests where each one is.
pub fn ensure(root: &Path, needs: Needs, mode: Mode) -> anyhow::Result<TestEnv> {
    let mut env = TestEnv::default();
    let mut apt = Apt::default();
    if needs.python_openai
        && let Some(python) = python_with_openai(root, mode)?
    {
        env.set("KEEL_TEST_PYTHON", python);
    }
    if needs.promtool
        && let Some(promtool) = tool_from_apt(&mut apt, mode, "promtool", "prometheus")?
    {
        env.set("PROMTOOL", promtool);
    }
    if needs.postgres
        && let Some(bin) = postgres_bindir(&mut apt, mode)?
    {
        env.set("KEEL_TEST_PG_BIN", bin);
    }
    if needs.chromium
        && let Some(chromium) = tool_from_apt(&mut apt, mode, "chromium", "chromium")?
    {
        env.set("KEEL_TEST_CHROMIUM", chromium);
    }
    if needs.wasm_tool
        && let Some(module) = example_wasm_tool(root, mode)?
    {
        env.set("KEEL_TEST_REFUND_WASM", module);
    }
    Ok(env)
}

// === The example Wasm tool ===

/// The Rust target Wasm tools are built for.
const WASM_TARGET: &str = "wasm32-wasip1";

/// `examples/tools/refund` built for [`WASM_TARGET`] (adding the target with rustup when
/// it is missing); cargo rebuilds it only when its source changed.
fn example_wasm_tool(root: &Path, mode: Mode) -> anyhow::Result<Option<PathBuf>> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let module = target_dir
        .join(WASM_TARGET)
        .join("release")
        .join("keel-example-refund.wasm");
    if mode == Mode::DetectOnly {
        return Ok(module.exists().then_some(module));
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root)
        .output()
        .context("rustup is not on PATH: it adds the wasm32-wasip1 target")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|t| t.trim() == WASM_TARGET)
    {
        println!("    adding the Rust target {WASM_TARGET} (rustup)");
        run_quiet(
            Command::new("rustup")
                .args(["target", "add", WASM_TARGET])
                .current_dir(root),
            "rustup target add wasm32-wasip1",
        )?;
    }
    run_quiet(
        cargo_command(root).args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "keel-example-refund",
            "--target",
            WASM_TARGET,
        ]),
        "cargo build -p keel-example-refund --target wasm32-wasip1",
    )?;
    if !module.exists() {
        bail!(
            "the example Wasm tool built, but {} is not there",
            module.display()
        );
    }
    Ok(Some(module))
}

// === Python venv with openai ===

/// `<root>/.venv/bin/python` with `openai` importable, creating the venv when needed.
fn python_with_openai(root: &Path, mode: Mode) -> anyhow::Result<Option<PathBuf>> {
    let venv = root.join(".venv");
    let python = venv.join("bin").join("python");
    if imports_openai(&python) {
        return Ok(Some(python));
    }
    if mode == Mode::DetectOnly {
        return Ok(None);
    }
    println!(
        "    installing python venv with openai at {}",
        venv.display()
    );
    if !is_executable(&python) {
        let system_python = find_on_path("python3").context("python3 is not on PATH")?;
        // `--clear` rebuilds a half-made venv left by an interrupted run.
        run_quiet(
            Command::new(system_python)
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
            "python3 -m venv",
        )?;
    }
    run_quiet(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "openai",
        ]),
        "pip install openai",
    )?;
    if !imports_openai(&python) {
        bail!(
            "{} still cannot import openai after pip install",
            python.display()
        );
    }
    Ok(Some(python))
}

fn imports_openai(python: &Path) -> bool {
    is_executable(python) && succeeds(Command::new(python).args(["-c", "import openai"]))
}

// === Debian packages ===

/// `program` from PATH, installing the Debian package `package` when it is missing.
fn tool_from_apt(
    apt: &mut Apt,
    mode: Mode,
    program: &str,
    package: &str,
) -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = find_on_path(program) {
        return Ok(Some(path));
    }
    if mode == Mode::DetectOnly {
        return Ok(None);
    }
    apt.install(&[package])?;
    find_on_path(program)
        .with_context(|| format!("`{program}` is not on PATH after installing {package}"))
        .map(Some)
}

/// The directory holding `pg_ctl`, `initdb` and `postgres`, installing PostgreSQL if needed.
///
/// Debian keeps the server binaries in `/usr/lib/postgresql/<major>/bin`, off PATH; some images
/// also link them into `/usr/local/bin`.
fn postgres_bindir(apt: &mut Apt, mode: Mode) -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = find_postgres_bindir() {
        return Ok(Some(dir));
    }
    if mode == Mode::DetectOnly {
        return Ok(None);
    }
    apt.install(&["postgresql"])?;
    find_postgres_bindir()
        .context("no PostgreSQL server binaries found after installing postgresql")
        .map(Some)
}

fn find_postgres_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| {
        ["pg_ctl", "initdb", "postgres"]
            .iter()
            .all(|bin| is_executable(&dir.join(bin)))
    };
    let on_path = find_on_path("pg_ctl")
        .and_then(|pg_ctl| std::fs::canonicalize(pg_ctl).ok())
        .and_then(|pg_ctl| pg_ctl.parent().map(Path::to_path_buf))
        .filter(|dir| has_server(dir));
    if on_path.is_some() {
        return on_path;
    }
    // Newest major version first.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// `apt-get`, run as root (through `sudo -n` when we are not root), updated once per run.
#[derive(Debug, Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        let list = packages.join(" ");
        println!("    installing {list} (apt-get)");
        if !self.updated {
            run_quiet(self.command().arg("update"), "apt-get update")?;
            self.updated = true;
        }
        run_quiet(
            self.command()
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages),
            &format!("apt-get install {list}"),
        )
    }

    fn command(&self) -> Command {
        let mut cmd = if is_root() {
            Command::new("apt-get")
        } else {
            // `-n`: fail instead of prompting for a password (CI has no stdin).
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd.args(["-q", "-o", "Dpkg::Use-Pty=0"]);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_only_never_installs_and_exports_only_what_exists() {
        let root = tempfile::tempdir().unwrap();
        let needs = Needs {
            python_openai: true,
            promtool: false,
            postgres: false,
            chromium: false,
            wasm_tool: false,
        };
        let env = ensure(root.path(), needs, Mode::DetectOnly).unwrap();
        assert!(env.vars().is_empty(), "no venv in an empty dir: {env:?}");
        assert!(!root.path().join(".venv").exists());
    }

    #[test]
    fn test_env_applies_only_to_the_given_command() {
        let mut env = TestEnv::default();
        env.set("KEEL_TEST_EXAMPLE", "value");
        let mut cmd = Command::new("true");
        env.apply(&mut cmd);
        let vars: Vec<_> = cmd.get_envs().collect();
        assert_eq!(vars.len(), 1);
        assert_eq!(vars[0].0, "KEEL_TEST_EXAMPLE");
    }
}
