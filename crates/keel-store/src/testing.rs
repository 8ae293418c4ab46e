//! Test support: a throwaway PostgreSQL server (with the `conformance` feature).
//!
//! [`PgServer::start`] runs `initdb` into a new directory under the system temp dir and
//! starts `postgres` on a free loopback port with trust authentication for the user
//! `postgres`. The server binaries come from `KEEL_TEST_PG_BIN` (what `cargo xtask test`
//! exports) or the newest `/usr/lib/postgresql/<major>/bin`. PostgreSQL refuses to run as
//! root, so as root every server command runs as the `postgres` user (`runuser`), which
//! Debian's `postgresql` package creates. Dropping the server stops it and removes its files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A PostgreSQL server for one test.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Extra server settings (`-c name=value ...`), after the defaults.
    settings: String,
}

impl PgServer {
    /// Creates and starts a new server with `fsync=off` (tests need no crash safety of the
    /// machine); errors say which step failed and what it printed.
    pub fn start() -> Result<Self, String> {
        Self::start_with("")
    }

    /// Like [`PgServer::start`], with extra server settings after the defaults
    /// (`"-c fsync=on"` for a benchmark that must pay for durability).
    pub fn start_with(settings: &str) -> Result<Self, String> {
        let bin = bin_dir()?;
        let as_postgres = run_capture(Command::new("id").arg("-u"))
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false);
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("keel-pg-{}-{}", std::process::id(), uuid_like()));
        std::fs::create_dir_all(dir.join("sock"))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let server = Self {
            dir,
            bin,
            port,
            as_postgres,
            settings: settings.to_owned(),
        };
        if as_postgres {
            server.check(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&server.dir),
                "chown",
            )?;
        }
        let data = server.data_dir();
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        server.check(&mut initdb, "initdb")?;
        server.pg_ctl_start()?;
        Ok(server)
    }

    /// The server's loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates the empty database `name` (`CREATE DATABASE`) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, String> {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("cannot connect to the test server: {e}"))?;
        let driver = tokio::runtime::Handle::current().spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        drop(client);
        let _ = driver.await;
        Ok(self.url(name))
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, commits kept).
    pub fn stop(&self) -> Result<(), String> {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"]);
        self.check(&mut stop, "pg_ctl stop")
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=300 {}",
            self.port,
            self.dir.join("sock").display(),
            self.settings
        );
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-o", &options, "-w", "-t", "30", "start"]);
        self.check(&mut start, "pg_ctl start")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `program` from the server's bin dir, as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn check(&self, cmd: &mut Command, what: &str) -> Result<(), String> {
        let out = run_capture(cmd)?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        Err(format!(
            "{what} failed ({}): {}{}\nserver log:\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = run_capture(&mut stop);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_capture(cmd: &mut Command) -> Result<Output, String> {
    cmd.output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))
}

/// `KEEL_TEST_PG_BIN`, or the newest `/usr/lib/postgresql/<major>/bin`.
fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KEEL_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("no PostgreSQL server found (KEEL_TEST_PG_BIN unset, /usr/lib/postgresql: {e}); `cargo xtask test` installs it")
        })?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, dir)| Path::new(&dir.join("initdb")).exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| "no PostgreSQL server binaries under /usr/lib/postgresql".to_owned())
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// A short unique suffix (time and a counter) for directory names.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}
