//! Configuration: `gateway.yaml` and the per-agent manifests in the policies directory.
//!
//! Raw serde shapes (`raw`) deny unknown keys; `load_*` validates them completely into the
//! model (`model`) that the rest of the gateway trusts. Every problem becomes a [`Diagnostic`]
//! naming the file, line, column and key path. This module is data only: it reads files and
//! never touches sockets.

mod locate;
pub mod model;
mod raw;
mod validate;

pub use model::*;
pub(crate) use validate::is_currency;
pub use validate::parse_duration;

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// One problem in a configuration file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in (`<defaults>` when `gateway.yaml` was not given).
    pub file: PathBuf,
    /// Line of the problem, 1-based.
    pub line: usize,
    /// Column of the problem, 1-based.
    pub col: usize,
    /// Key path, e.g. `connectors[0].routes[1].path`.
    pub key: String,
    /// What is wrong, without the location and key path.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// A list of diagnostics, displayed one per line.
#[derive(Debug, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Who is loading the configuration: `check` or a running gateway. Both judge everything the
/// same way; in particular a missing credential source is a warning for both, and the connector
/// is then unavailable (its requests are denied `connector_unavailable`), so `check` never passes
/// a configuration `run` would refuse, nor refuses one `run` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// `uapk-gateway check`: the files are validated, nothing is served.
    Check,
    /// A running gateway, at start and at each reload.
    Run,
}

/// The local demo upstream of `run --demo`, set once for the whole process before anything is
/// loaded. Unset (always, but in that mode) the manifests are served exactly as written.
static DEMO_UPSTREAM: OnceLock<SocketAddr> = OnceLock::new();

/// Demo mode (`uapk-gateway run --demo`): every manifest loaded from now on, at start and at each
/// reload, has its `base_url` connectors pointed at `addr` (see `point_at_demo_upstream`). The
/// files on disk are not changed; a gateway started without `--demo` never calls this. Returns
/// false if demo mode was already set to another address.
pub fn enable_demo_upstream(addr: SocketAddr) -> bool {
    *DEMO_UPSTREAM.get_or_init(|| addr) == addr
}

#[cfg(test)]
/// The demo upstream address, when demo mode is on.
pub(crate) fn demo_upstream() -> Option<SocketAddr> {
    DEMO_UPSTREAM.get().copied()
}

/// Points every connector that has a `base_url` at the plain-HTTP demo upstream `addr`, keeping
/// its path prefix, routes, params, credentials and policy: `https://api.stripe.com` becomes
/// `http://127.0.0.1:15090`, `https://acme.zendesk.com/api/v2` becomes
/// `http://127.0.0.1:15090/api/v2`. Its `hosts` and `ports` become that address alone, so in
/// demo mode nothing reaches the real upstreams (CONNECT to them is `host_not_allowed`).
/// Connectors without a `base_url` are left as they are.
pub(crate) fn point_at_demo_upstream(m: &mut Manifest, addr: SocketAddr) {
    for c in &mut m.connectors {
        // Freshly validated: this is the only reference, so the connector is changed in place.
        let Some(c) = Arc::get_mut(c) else { continue };
        let Some(b) = c.base_url.as_mut() else { continue };
        b.scheme = Scheme::Http;
        b.host = addr.ip().to_string();
        b.port = addr.port();
        c.hosts = vec![addr.ip().to_string()];
        c.ports = vec![addr.port()];
    }
}

/// Parses YAML text into `T`, turning serde errors into located diagnostics.
fn parse_yaml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, Diagnostic> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        let (line, col) = match inner.location() {
            Some(loc) => (loc.line(), loc.column()),
            None => locate::locate(text, &key),
        };
        // serde_yaml prefixes its message with the path and position; keep only the reason.
        let msg = inner.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        let msg = match msg.split_once(": ") {
            Some((p, rest)) if !key.is_empty() && p == key => rest.to_string(),
            _ => msg,
        };
        Diagnostic { file: file.to_path_buf(), line, col, key, message: msg }
    })
}

/// Loads `gateway.yaml`, or the built-in defaults when `path` is `None`.
pub fn load_gateway(path: Option<&Path>) -> Result<GatewayConfig, Diagnostics> {
    load_gateway_with_warnings(path).map(|(cfg, _)| cfg)
}

/// [`load_gateway`], with the warnings `check` shows.
pub fn load_gateway_with_warnings(path: Option<&Path>) -> Result<(GatewayConfig, Vec<Diagnostic>), Diagnostics> {
    let (file, text) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Diagnostics(vec![Diagnostic {
                    file: p.to_path_buf(),
                    line: 1,
                    col: 1,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }])
            })?;
            (p.to_path_buf(), text)
        }
        None => (PathBuf::from("<defaults>"), String::new()),
    };
    let raw: raw::RawGateway = if text.trim().is_empty() {
        raw::RawGateway::default()
    } else {
        parse_yaml(&file, &text).map_err(|d| Diagnostics(vec![d]))?
    };
    let mut cx = validate::Cx::new(&file, &text);
    let cfg = validate::gateway(&mut cx, raw);
    let warnings = cx.warnings.clone();
    cx.finish(cfg).map(|cfg| (cfg, warnings))
}

/// A validated set of manifests, keyed by agent id, and the manifest files that failed
/// validation (served as refusals: SPEC §17).
#[derive(Debug, Default)]
pub struct PolicySet {
    /// The valid manifests, by `agent.id`.
    pub manifests: BTreeMap<String, Arc<Manifest>>,
    /// Warnings of the valid manifests (e.g. a route that never matches); they do not stop a
    /// manifest from loading.
    pub warnings: Vec<Diagnostic>,
    /// Manifest files that failed validation; their agents' requests are refused
    /// `manifest_invalid`.
    pub invalid: Vec<InvalidManifest>,
    /// SHA-256 (hex) of each file of `PolicySet::watched_files` when the set was loaded; `None`:
    /// not readable then.
    pub file_hashes: BTreeMap<PathBuf, Option<String>>,
}

/// A manifest file that failed validation: its agent's requests are refused
/// `manifest_invalid` until it is fixed.
#[derive(Debug, Clone)]
pub struct InvalidManifest {
    /// The manifest file.
    pub file: PathBuf,
    /// The `agent.id` the file names, when it can be read at all.
    pub agent: Option<String>,
    /// Every error found in it.
    pub errors: Vec<Diagnostic>,
    /// The other files it reads (watched, so that a Secret appearing later fixes it).
    pub files: Vec<PathBuf>,
}

impl PolicySet {
    pub(crate) fn get(&self, agent: &str) -> Option<&Arc<Manifest>> {
        self.manifests.get(agent)
    }
    /// The invalid manifest that names `agent` (and no valid one does).
    pub(crate) fn invalid_for(&self, agent: &str) -> Option<&InvalidManifest> {
        if self.manifests.contains_key(agent) {
            return None;
        }
        self.invalid.iter().find(|i| i.agent.as_deref() == Some(agent))
    }
    /// Every file the set depends on besides the manifests themselves, sorted.
    pub(crate) fn watched_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .manifests
            .values()
            .flat_map(|m| m.files.iter().cloned())
            .chain(self.invalid.iter().flat_map(|i| i.files.iter().cloned()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
    /// SHA-256 over every manifest's hash, in agent order: one value that changes when any does.
    pub(crate) fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (id, m) in &self.manifests {
            h.update(id.as_bytes());
            h.update(b"=");
            h.update(m.sha256.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// Loads one manifest file.
pub fn load_manifest(path: &Path, strictness: Strictness) -> Result<(Manifest, Vec<Diagnostic>), Diagnostics> {
    let bytes = std::fs::read(path).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse_manifest(path, &bytes, &base, strictness)
}

/// Parses and validates manifest bytes as if read from `path`; relative key and credential
/// paths resolve against `base`.
pub fn parse_manifest(
    path: &Path,
    bytes: &[u8],
    base: &Path,
    strictness: Strictness,
) -> Result<(Manifest, Vec<Diagnostic>), Diagnostics> {
    parse_manifest_tracked(path, bytes, base, strictness).0
}

/// A validated manifest and its warnings, or every problem found.
type Parsed = Result<(Manifest, Vec<Diagnostic>), Diagnostics>;

/// [`parse_manifest`], also returning the other files the manifest reads (even when it is
/// invalid, e.g. an issuer key file that is not there yet).
fn parse_manifest_tracked(path: &Path, bytes: &[u8], base: &Path, strictness: Strictness) -> (Parsed, Vec<PathBuf>) {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let raw: raw::RawManifest = match parse_yaml(path, &text) {
        Ok(r) => r,
        Err(d) => return (Err(Diagnostics(vec![d])), Vec::new()),
    };
    let mut cx = validate::Cx::new(path, &text);
    let mut m = validate::manifest(&mut cx, raw, base, strictness, hex::encode(Sha256::digest(bytes)));
    m.source = path.to_path_buf();
    let mut files = std::mem::take(&mut cx.reads);
    files.sort();
    files.dedup();
    m.files = files.clone();
    if let Some(addr) = DEMO_UPSTREAM.get() {
        point_at_demo_upstream(&mut m, *addr);
    }
    let warnings = cx.warnings.clone();
    (cx.finish(m).map(|m| (m, warnings)), files)
}

/// The `agent.id` a manifest file names, read as plain YAML (for a file that fails validation).
fn agent_id_of(bytes: &[u8]) -> Option<String> {
    let v: serde_yaml::Value = serde_yaml::from_slice(bytes).ok()?;
    let id = v.get("agent")?.get("id")?.as_str()?;
    validate::is_agent_id(id).then(|| id.to_string())
}

/// The manifest files of a policies directory: `*.yaml` / `*.yml`, skipping hidden entries
/// (Kubernetes ConfigMap mounts keep their real files under `..data`, linked from the top).
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads and validates every manifest in `dir`. Any error fails the whole set (`check`).
pub fn load_policies(dir: &Path, strictness: Strictness) -> Result<PolicySet, Diagnostics> {
    let set = load_policies_lenient(dir, strictness)?;
    if set.invalid.is_empty() {
        Ok(set)
    } else {
        Err(Diagnostics(set.invalid.into_iter().flat_map(|i| i.errors).collect()))
    }
}

/// Loads every manifest in `dir`, keeping the valid ones and listing the files that fail
/// validation in [`PolicySet::invalid`] (`run`: one broken manifest must not stop every agent).
/// Two files naming one agent make that agent invalid (which of them applies is ambiguous).
/// Only an unreadable directory is an error.
pub(crate) fn load_policies_lenient(dir: &Path, strictness: Strictness) -> Result<PolicySet, Diagnostics> {
    let files = manifest_files(dir).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: dir.to_path_buf(),
            line: 1,
            col: 1,
            key: String::new(),
            message: format!("cannot read policies directory: {e}"),
        }])
    })?;
    let mut set = PolicySet::default();
    let mut sources: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in files {
        let bytes = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) => {
                let errors = vec![Diagnostic {
                    file: f.clone(),
                    line: 1,
                    col: 1,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }];
                set.invalid.push(InvalidManifest { file: f, agent: None, errors, files: Vec::new() });
                continue;
            }
        };
        let base = f.parent().map(Path::to_path_buf).unwrap_or_default();
        match parse_manifest_tracked(&f, &bytes, &base, strictness) {
            (Ok((m, warnings)), files) => {
                set.warnings.extend(warnings);
                if let Some(prev) = sources.get(&m.agent.id) {
                    let (line, col) = locate::locate(&String::from_utf8_lossy(&bytes), "agent.id");
                    let errors = vec![Diagnostic {
                        file: f.clone(),
                        line,
                        col,
                        key: "agent.id".into(),
                        message: format!("agent {:?} is already defined in {}", m.agent.id, prev.display()),
                    }];
                    set.manifests.remove(&m.agent.id);
                    set.invalid.push(InvalidManifest { file: f, agent: Some(m.agent.id.clone()), errors, files });
                    continue;
                }
                sources.insert(m.agent.id.clone(), f.clone());
                set.manifests.insert(m.agent.id.clone(), Arc::new(m));
            }
            (Err(Diagnostics(errors)), files) => {
                set.invalid.push(InvalidManifest { file: f, agent: agent_id_of(&bytes), errors, files });
            }
        }
    }
    // An agent named by an invalid file as well as a valid one is ambiguous: refused.
    for i in &set.invalid {
        if let Some(a) = &i.agent {
            set.manifests.remove(a);
        }
    }
    set.file_hashes = set
        .watched_files()
        .into_iter()
        .map(|f| {
            let sha = std::fs::read(&f).ok().map(|b| hex::encode(Sha256::digest(b)));
            (f, sha)
        })
        .collect();
    Ok(set)
}

#[cfg(test)]
mod tests;
