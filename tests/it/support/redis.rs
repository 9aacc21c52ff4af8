//! A `redis-server` of a test's own: a free loopback port, a temporary directory, no
//! persistence. Without the binary (Debian package `redis-server`) `RedisServer::start` says so
//! and returns `None` (the test passes), except with `CI` set: then it fails.

use super::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` started for one test, killed when dropped.
pub(crate) struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or `None` (after saying why) where the binary is missing outside CI.
    pub(crate) fn start() -> Option<RedisServer> {
        let found = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok();
        if !found {
            let msg =
                "redis-server not found: install the Debian package `redis-server` to run the Redis rate-limit tests";
            if std::env::var_os("CI").is_some() {
                panic!("{msg}");
            }
            eprintln!("skipped: {msg}");
            return None;
        }
        let mut s = RedisServer { port: free_port(), dir: tempfile::tempdir().unwrap(), child: None };
        s.spawn();
        Some(s)
    }

    /// (Re)starts the server on its port and waits until it answers.
    pub(crate) fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id();
        let sent = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
        assert!(sent.success(), "kill -{sig} {pid}");
    }

    pub(crate) fn config(&self) -> String {
        self.config_with_timeout("100ms")
    }

    pub(crate) fn config_with_timeout(&self, timeout: &str) -> String {
        format!(
            "rate_limits:\n  backend: redis\n  redis:\n    url: redis://127.0.0.1:{}/0\n    timeout: {timeout}\n",
            self.port
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
