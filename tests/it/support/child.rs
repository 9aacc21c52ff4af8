//! The real `uapk-gateway` binary run as a child process: for what only a process shows (its
//! exit status, SIGKILL, SIGTERM, its own memory and open-file limit, its log).

use super::gateway::{gateway_yaml, write_policies};
use super::log::Log;
use super::{bin, client, eventually, free_port};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Starts `uapk-gateway run -c config` with its stderr appended to `log` (`UAPK_LOG=warn`
/// unless `env` says otherwise).
pub(crate) fn spawn_gateway(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    spawn_limited(config, log, env, None)
}

/// `spawn_gateway` under an open-file limit of `nofile` when given.
fn spawn_limited(config: &Path, log: &Path, env: &[(&str, &str)], nofile: Option<u32>) -> Child {
    let mut c = match nofile {
        // `ulimit -n` is setrlimit(RLIMIT_NOFILE) in the shell that then becomes the gateway.
        Some(n) => {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin()]);
            c
        }
        None => Command::new(bin()),
    };
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    c.args(["run", "-c"]).arg(config).env("UAPK_LOG", "warn").envs(env.iter().copied()).stderr(log).spawn().unwrap()
}

/// Waits until the gateway `child` (its stderr in `log`) answers `/readyz` with 200 on `admin`;
/// panics with its log when it exits first or is not ready within 30 s.
pub(crate) async fn wait_ready(admin: SocketAddr, child: &mut Child, log: &Path) {
    eventually(format!("the gateway on {admin} to be ready"), Duration::from_secs(30), async || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the gateway exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        let r = client().get(format!("http://{admin}/readyz")).timeout(Duration::from_secs(2)).send().await;
        r.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await
}

/// A gateway running as a child process, on free loopback ports, in a directory of its own.
pub(crate) struct ChildGateway {
    child: Child,
    /// SIGTERM was sent (a second one makes the gateway exit at once, without draining).
    terminated: std::sync::atomic::AtomicBool,
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl ChildGateway {
    /// Starts `uapk-gateway run` serving `manifests` with `extra_yaml` appended to gateway.yaml,
    /// under an open-file limit of `nofile` when given.
    pub(crate) async fn start(manifests: &[(&str, String)], extra_yaml: &str, nofile: Option<u32>) -> ChildGateway {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_policies(d, manifests);
        let (proxy, admin): (SocketAddr, SocketAddr) = (
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        );
        let cfg = d.join("gateway.yaml");
        std::fs::write(&cfg, gateway_yaml(d, &proxy.to_string(), &admin.to_string(), extra_yaml)).unwrap();
        let log = d.join("gateway.log");
        let mut child = spawn_limited(&cfg, &log, &[], nofile);
        wait_ready(admin, &mut child, &log).await;
        ChildGateway { child, terminated: Default::default(), dir, proxy, admin }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the gateway logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// Asks the gateway to stop (SIGTERM, once), without waiting.
    pub(crate) fn terminate(&self) {
        if !self.terminated.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        }
    }

    /// SIGTERM (unless sent already), wait for a clean exit, and return every committed entry and the gateway's log.
    pub(crate) fn stop(&mut self) -> (Vec<Value>, String) {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "the gateway exited with {status}: {}", self.log());
        (Log::file(self.dir.path().join("data/audit.redb")).entries(), self.log())
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
