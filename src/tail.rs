//! `uapk-gateway tail`: the audit log's entries on stdout, one per line exactly as stored
//! (NDJSON, the same lines as `GET /v1/records/stream`), from `--from` on; with `--follow`, new
//! entries as they commit.
//!
//! Where the entries come from: a stopped gateway's log file is read directly; a running
//! gateway holds its file locked, so its live log is read through its admin API (`--admin URL`,
//! else the config's `listeners.admin`) with a viewer key. Following switches between the two
//! as the gateway stops and starts, resuming each time at the next index: every entry is printed
//! once, in order. While reading the file, `tail` holds it only for the read itself and looks at
//! it again only when the file changed, so it does not keep a gateway from starting.

use super::remote::{self, StreamEnd};
use super::{AdminArgs, Fail, TailArgs, load_config};
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use uapk_gateway::audit::{self, AuditError};

/// Entries read from the file per step.
const CHUNK: usize = 512;
/// How often a followed file is looked at (its size and modification time only).
const FILE_POLL: Duration = Duration::from_millis(250);
/// How long to wait before reconnecting to a gateway that went away.
const RECONNECT: Duration = Duration::from_secs(1);

/// How one round of reading ended.
enum Round {
    /// The file was read to its end; its (length, modification time) from before the read.
    File(Option<Stamp>),
    /// A gateway's admin API, and how its stream ended.
    Admin(StreamEnd),
}

type Stamp = (u64, std::time::SystemTime);

pub(crate) fn run(a: TailArgs) -> Result<(), Fail> {
    let cfg = load_config(a.config.as_deref())?;
    let path = cfg.audit.path.clone();
    let admin_url = a.remote.admin.clone().unwrap_or_else(|| {
        // A wildcard listener is reached on loopback.
        let mut addr = cfg.admin_listener;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        format!("http://{addr}")
    });
    let from = match (a.from, &a.state) {
        (Some(n), _) => n,
        (None, Some(state)) => match std::fs::read_to_string(state) {
            Ok(text) => text.trim().parse().map_err(|_| {
                Fail(2, format!("{}: not a tail state file (it holds the next index to print)", state.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Fail(2, format!("{}: {e}", state.display()))),
        },
        (None, None) => 0,
    };
    let mut out = Output { next: from, partial: Vec::new(), state: a.state.clone() };
    let mut first = true;
    let mut unreachable_said = false;
    loop {
        let round = if a.remote.admin.is_some() {
            Round::Admin(from_admin(&admin_url, &a.remote, &mut out, a.follow)?)
        } else {
            // Taken before the read: a change made during it is seen by the next wait.
            let before = stamp(&path);
            match read_file(&path, &mut out, first) {
                Ok(()) => Round::File(before),
                Err(FileRead::Locked(why)) => {
                    // The gateway runs: its admin API serves the same entries, live.
                    if remote_key_missing(&a.remote) {
                        return Err(Fail(
                            2,
                            format!(
                                "{why}. To read it live, give a viewer key (UAPK_ADMIN_KEY or --admin-key-file) \
                                 for the admin API at {admin_url}"
                            ),
                        ));
                    }
                    Round::Admin(from_admin(&admin_url, &a.remote, &mut out, a.follow)?)
                }
                Err(FileRead::Fail(f)) => return Err(f),
            }
        };
        first = false;
        if !a.follow {
            return match round {
                Round::Admin(StreamEnd::Unreachable) => {
                    Err(Fail(2, format!("cannot reach the admin API at {admin_url}")))
                }
                Round::Admin(StreamEnd::CutOff) => {
                    Err(Fail(2, format!("the stream from {admin_url} broke off; run again with --from {}", out.next)))
                }
                _ => Ok(()),
            };
        }
        match round {
            Round::File(Some(was)) => wait_for_change(&path, was),
            Round::File(None) => std::thread::sleep(FILE_POLL),
            // The stream ended: the gateway is stopping. Its last entries are read next, from
            // the file once it is released or from the gateway that takes over.
            Round::Admin(StreamEnd::Complete | StreamEnd::CutOff) => {
                unreachable_said = false;
                std::thread::sleep(FILE_POLL);
            }
            Round::Admin(StreamEnd::Unreachable) => {
                if !unreachable_said {
                    eprintln!("tail: the gateway at {admin_url} is not answering; retrying every second");
                    unreachable_said = true;
                }
                std::thread::sleep(RECONNECT);
            }
        }
    }
}

fn remote_key_missing(r: &AdminArgs) -> bool {
    r.admin_key_file.is_none() && std::env::var_os("UAPK_ADMIN_KEY").is_none()
}

/// What stdout has been given: the next index to print, and the start of a line not yet
/// complete (never printed half).
struct Output {
    next: u64,
    partial: Vec<u8>,
    /// `--state`: where `next` is kept.
    state: Option<std::path::PathBuf>,
}

impl Output {
    /// Prints whole lines of `bytes` (after what is held back); each is one entry.
    fn lines(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        self.partial.extend_from_slice(bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Ok(()) };
        let whole: Vec<u8> = self.partial.drain(..=end).collect();
        self.write(&whole)?;
        self.next += whole.iter().filter(|&&b| b == b'\n').count() as u64;
        self.save()
    }

    /// Writes `next` to the state file: a temporary file renamed over it, so a crash leaves the
    /// old value or the new one.
    fn save(&self) -> Result<(), Fail> {
        let Some(path) = &self.state else { return Ok(()) };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, format!("{}\n", self.next))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| Fail(2, format!("{}: {e}", path.display())))
    }

    fn write(&self, bytes: &[u8]) -> Result<(), Fail> {
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
            Ok(()) => Ok(()),
            // The reader went away (`| head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            Err(e) => Err(Fail(2, format!("writing to stdout: {e}"))),
        }
    }
}

enum FileRead {
    Locked(String),
    Fail(Fail),
}

/// Prints the file's entries from `out.next` to its end. The first read refuses a `--from`
/// past the end (a different or restored log), as the admin API does.
fn read_file(path: &Path, out: &mut Output, first: bool) -> Result<(), FileRead> {
    if !path.exists() {
        return Err(FileRead::Fail(Fail(2, format!("{}: no such file (audit.path)", path.display()))));
    }
    let snap = match audit::Snapshot::open(path) {
        Ok(s) => s,
        Err(AuditError::Locked(why)) => return Err(FileRead::Locked(why)),
        Err(e) => return Err(FileRead::Fail(Fail(2, e.to_string()))),
    };
    let fail = |e: AuditError| FileRead::Fail(Fail(2, format!("{}: {e}", path.display())));
    let size = snap.size().map_err(fail)?;
    if first && out.next > size {
        return Err(FileRead::Fail(Fail(
            2,
            format!("--from {} is past the end of the log ({size} entries in {})", out.next, path.display()),
        )));
    }
    while out.next < size {
        let rows = snap.read_entries(out.next, CHUNK).map_err(fail)?;
        let mut buf = Vec::new();
        for (expect, (idx, bytes)) in (out.next..).zip(&rows) {
            // The log is dense: a gap is a lost entry, never something to skip.
            if *idx != expect {
                return Err(FileRead::Fail(Fail(1, format!("entry {expect} is missing from the log"))));
            }
            buf.extend_from_slice(bytes);
            buf.push(b'\n');
        }
        if rows.is_empty() {
            break;
        }
        out.lines(&buf).map_err(FileRead::Fail)?;
    }
    Ok(())
}

/// Streams from the admin API from `out.next` on.
fn from_admin(url: &str, args: &AdminArgs, out: &mut Output, follow: bool) -> Result<StreamEnd, Fail> {
    let admin = remote::Admin::connect(url, args.admin_key_file.as_deref())?;
    let path = format!("/v1/records/stream?from={}&follow={follow}", out.next);
    let reached = admin.stream(&path, |bytes| out.lines(bytes))?;
    // A line cut off with the connection is asked for again from its start.
    out.partial.clear();
    Ok(reached)
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn wait_for_change(path: &Path, was: Stamp) {
    loop {
        std::thread::sleep(FILE_POLL);
        if stamp(path) != Some(was) {
            return;
        }
    }
}
