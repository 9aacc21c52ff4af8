//! A private PostgreSQL cluster for the tests that need one (the fleet, the state conformance
//! suite): `initdb` into a temporary directory and a server on a free loopback port, run as the
//! `postgres` user when the tests run as root. Without the binaries, `Pg::start` says which
//! package to install and returns `None` (the test passes), except with `CI` set: then it fails.

use super::{free_port, is_root};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A private PostgreSQL cluster in a temporary directory.
pub(crate) struct Pg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// Runs a PostgreSQL program as the cluster's owner (`postgres` when we are root: the server
/// refuses to run as root).
fn as_owner(bin: &Path, args: &[&str]) -> std::process::Output {
    let root = is_root();
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    c.args(args).output().unwrap()
}

impl Pg {
    pub(crate) fn start() -> Option<Pg> {
        let Some(bin) = postgres_bin() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is not installed (Debian package `postgresql`): the fleet tests need initdb and postgres"
            );
            eprintln!("skipped: install the Debian package `postgresql` to run the fleet tests");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
        }
        let data = dir.path().join("data");
        let out = as_owner(
            &bin.join("initdb"),
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        );
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let pg = Pg { port: free_port(), dir, bin };
        pg.up();
        Some(pg)
    }

    pub(crate) fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Starts (or restarts) the server on its port.
    pub(crate) fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log");
        let out = as_owner(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "-t", "30", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server the way a crash does.
    pub(crate) fn kill(&self) {
        let out = as_owner(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }

    pub(crate) fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-At", "-c", sql, "postgres"])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub(crate) fn tool(&self, name: &str, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join(name))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = as_owner(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-m", "immediate", "stop"]);
    }
}
