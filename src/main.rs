//! `uapk-gateway` command line: parse, call into the library, map errors to exit codes
//! (0 ok, 1 invalid or verification failed, 2 usage or I/O error).

#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use uapk_gateway::{audit, config, identity, runtime};

mod demo;
mod tail;

/// mimalloc: the data path allocates many small, short-lived buffers per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "uapk-gateway", version, about = "Egress firewall and black-box recorder for AI agents")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve; with no config file, the built-in defaults (serving ./policies).
    Run {
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Demo mode: point every manifest connector that has a base_url at the local
        /// `demo-upstream` (plain HTTP, --demo-upstream) instead of the real API, and let the
        /// gateway dial that loopback address. The manifests on disk are not changed.
        #[arg(long)]
        demo: bool,
        /// The demo upstream's address, with --demo.
        #[arg(long, value_name = "ADDR", env = "UAPK_DEMO_UPSTREAM", default_value = "127.0.0.1:15090")]
        demo_upstream: std::net::SocketAddr,
    },
    /// A small local HTTP API for demos: Stripe-, helpdesk- and chat-completions-shaped, echoing
    /// what it received with credentials redacted. `run --demo` points the example manifests at it.
    #[command(name = "demo-upstream")]
    DemoUpstream {
        #[arg(long, value_name = "ADDR", env = "UAPK_DEMO_UPSTREAM", default_value = "127.0.0.1:15090")]
        listen: std::net::SocketAddr,
    },
    /// Validate the config and every manifest; exit 1 with file:line:col and key path.
    Check {
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Verify an audit log, an export bundle, a proof, or a running gateway's log (--admin).
    /// Exit 0 verified, 1 invalid or tampered, 2 usage or I/O error.
    Verify(VerifyArgs),
    /// Export a range of the audit log as a signed bundle directory (format:
    /// docs/evidence-format.md), from the database file or a running gateway (--admin).
    Export(ExportArgs),
    /// Print the audit log's entries from index --from on, one per line exactly as stored
    /// (NDJSON); with --follow keep printing new entries as they commit. Reads the log file, or
    /// a running gateway's live log through its admin API (--admin, or the config's admin
    /// listener when the gateway holds the file) with a viewer key.
    Tail(TailArgs),
    /// Inclusion and consistency proofs from an audit log (text format: see the README).
    Proof {
        #[command(subcommand)]
        cmd: ProofCmd,
    },
    /// Generate an Ed25519 key: PKCS#8 PEM (0600) and KEY.pub.pem.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Capability tokens.
    Token {
        #[command(subcommand)]
        cmd: Box<TokenCmd>,
    },
    /// Create or upgrade the fleet's database schema (`state.backend: postgres`): idempotent,
    /// under an advisory lock, never dropping data. `run` does the same at start.
    Migrate {
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Rotate the gateway key of a stopped gateway: a `key` entry signed by the current key
    /// (keys.gateway) announces NEW; then point keys.gateway at NEW and start the gateway.
    #[command(name = "rotate-key")]
    RotateKey {
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// The new Ed25519 key (from `uapk-gateway keygen`).
        #[arg(long)]
        new_key: PathBuf,
    },
    /// The interception CA.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Install (or print, with --dry-run) the pod's iptables and ip6tables rules: every agent TCP
    /// connection is redirected to the transparent listener, every other agent datagram is
    /// dropped but DNS to the resolvers. The init container's job; safe to run again.
    #[command(name = "init-iptables")]
    InitIptables {
        /// UID the gateway runs as: its own traffic is neither redirected nor dropped.
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// The transparent listener's port.
        #[arg(long, default_value_t = 15001)]
        port: u16,
        /// A further UID whose traffic is neither redirected nor dropped, e.g. 1337 for Istio's
        /// Envoy sidecar in the same pod; repeatable. Never the agent's UID.
        #[arg(long = "exempt-uid", value_name = "UID")]
        exempt_uid: Vec<u32>,
        /// A resolver DNS (UDP and TCP 53) may go to; repeatable. Default: the `nameserver` lines
        /// of /etc/resolv.conf.
        #[arg(long = "dns", value_name = "IP")]
        dns: Vec<std::net::IpAddr>,
        /// Print the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Admin API keys.
    #[command(name = "admin-key")]
    AdminKey {
        #[command(subcommand)]
        cmd: AdminKeyCmd,
    },
}

/// Reaching a running gateway's log through its admin API.
#[derive(Args, Clone)]
struct AdminArgs {
    /// The running gateway's admin listener, e.g. http://127.0.0.1:15021: read its live log (a
    /// consistent snapshot) instead of the database file, which the gateway holds locked.
    #[arg(long = "admin", value_name = "URL")]
    admin: Option<String>,
    /// File holding the admin key (default: the UAPK_ADMIN_KEY environment variable). Viewer
    /// role for verify, proof and tail, auditor role (or above) for export.
    #[arg(long, value_name = "FILE", requires = "admin")]
    admin_key_file: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    /// The redb audit file.
    #[arg(long, conflicts_with_all = ["bundle", "admin"], required_unless_present_any = ["bundle", "proof", "admin", "config"])]
    db: Option<PathBuf>,
    /// The gateway config: its log (audit.path, or the fleet's log in PostgreSQL with
    /// state.backend: postgres), and by default the public half of its keys.gateway.
    #[arg(short = 'c', long = "config", conflicts_with_all = ["db", "bundle", "admin", "proof"])]
    config: Option<PathBuf>,
    /// An export bundle directory.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Trusted gateway public key(s) (SPKI PEM), obtained independently of the evidence. Required
    /// with --bundle, --proof and --admin; default ./data/gateway.pub.pem for --db.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// A checkpoint kept from earlier: the log must extend it (catches truncation and rollback).
    /// With --proof: the signed checkpoint of the proof's old tree.
    #[arg(long)]
    trusted_checkpoint: Option<PathBuf>,
    /// Check a proof file written by `uapk-gateway proof` instead of a whole log.
    #[arg(long, conflicts_with_all = ["db", "bundle", "admin"])]
    proof: Option<PathBuf>,
    #[command(flatten)]
    remote: AdminArgs,
}

#[derive(Subcommand)]
enum ProofCmd {
    /// Prove that entry INDEX is in the tree of SIZE entries (default: the latest checkpoint).
    Inclusion {
        #[arg(long, required_unless_present_any = ["admin", "config"], conflicts_with = "admin")]
        db: Option<PathBuf>,
        /// The gateway config (its log: audit.path or the fleet's in PostgreSQL).
        #[arg(short = 'c', long = "config", conflicts_with_all = ["db", "admin"])]
        config: Option<PathBuf>,
        #[arg(long)]
        index: u64,
        #[arg(long)]
        size: Option<u64>,
        #[command(flatten)]
        remote: AdminArgs,
    },
    /// Prove that the tree of OLD entries is a prefix of the tree of NEW entries.
    Consistency {
        #[arg(long, required_unless_present_any = ["admin", "config"], conflicts_with = "admin")]
        db: Option<PathBuf>,
        /// The gateway config (its log: audit.path or the fleet's in PostgreSQL).
        #[arg(short = 'c', long = "config", conflicts_with_all = ["db", "admin"])]
        config: Option<PathBuf>,
        #[arg(long)]
        old: u64,
        #[arg(long)]
        new: u64,
        #[command(flatten)]
        remote: AdminArgs,
    },
}

#[derive(Args)]
struct ExportArgs {
    /// The gateway config: where the log (audit.path) and the signing key (keys.gateway) are,
    /// defaulting as `run` does.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// The redb audit file (default: the config's audit.path).
    #[arg(long)]
    db: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// First index (inclusive).
    #[arg(long)]
    from: Option<u64>,
    /// Last index (exclusive).
    #[arg(long)]
    to: Option<u64>,
    /// The gateway key that signs the bundle manifest (default: the config's keys.gateway).
    #[arg(long, conflicts_with = "admin")]
    gateway_key: Option<PathBuf>,
    #[command(flatten)]
    remote: AdminArgs,
}

#[derive(Args)]
struct TailArgs {
    /// The gateway config: where the log is (audit.path) and, while a gateway holds it, its
    /// admin listener (listeners.admin). Defaults as `run` does.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// First index to print (a shipper resumes with its last index + 1). Default 0, or where
    /// --state says.
    #[arg(long)]
    from: Option<u64>,
    /// Keep printing new entries as they commit, across gateway restarts.
    #[arg(long)]
    follow: bool,
    /// Keep the next index to print in FILE, rewritten after each batch reaches stdout; a later
    /// `tail --state FILE` (without --from) resumes there.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    #[command(flatten)]
    remote: AdminArgs,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Mint a capability token (printed on stdout).
    Mint(MintArgs),
}

#[derive(Args)]
struct MintArgs {
    /// Issuer private key (PKCS#8 PEM).
    #[arg(long)]
    issuer_key: PathBuf,
    /// Issuer id, as listed in the manifest.
    #[arg(long)]
    iss: String,
    /// Agent id.
    #[arg(long)]
    sub: String,
    /// Lifetime, e.g. 1h.
    #[arg(long, default_value = "1h")]
    ttl: String,
    #[arg(long, default_value = "uapk-gateway")]
    aud: String,
    /// Token id (default: random).
    #[arg(long)]
    jti: Option<String>,
    #[arg(long)]
    kid: Option<String>,
    /// Narrow to these connectors.
    #[arg(long, value_delimiter = ',')]
    connectors: Option<Vec<String>>,
    /// Narrow to these action types.
    #[arg(long, value_delimiter = ',')]
    actions: Option<Vec<String>>,
    /// Per-currency amount cap, e.g. USD=100 (repeatable).
    #[arg(long = "amount-max")]
    amount_max: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    jurisdictions: Option<Vec<String>>,
    #[arg(long, value_delimiter = ',')]
    counterparties_allow: Option<Vec<String>>,
    #[arg(long, value_delimiter = ',')]
    counterparties_deny: Option<Vec<String>>,
    /// Narrow a declared param to these values, e.g. model=gpt-4o-mini,gpt-4o (repeatable; lists
    /// match case-insensitively; denied otherwise with token_param_not_allowed).
    #[arg(long = "param-allow", value_name = "NAME=V1,V2")]
    param_allow: Vec<String>,
    /// Refuse these values of a declared param, e.g. model=gpt-4 (repeatable).
    #[arg(long = "param-deny", value_name = "NAME=V1,V2")]
    param_deny: Vec<String>,
    /// Lowest decimal a declared param may take, e.g. amount=0.50 (repeatable; below it:
    /// token_param_out_of_range).
    #[arg(long = "param-min", value_name = "NAME=DECIMAL")]
    param_min: Vec<String>,
    /// Highest decimal a declared param may take, e.g. amount=500 (repeatable).
    #[arg(long = "param-max", value_name = "NAME=DECIMAL")]
    param_max: Vec<String>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create ca.pem and ca-key.pem (0600) in DIR.
    Init {
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminKeyCmd {
    /// Print a new admin key once, and the line for gateway.yaml.
    New {
        /// viewer < auditor < approver < admin (see the README's admin API section).
        #[arg(long, value_parser = ["viewer", "auditor", "approver", "admin"])]
        role: String,
        #[arg(long, default_value = "operator")]
        id: String,
        /// Write the key to FILE (created 0600, never overwritten; its directory 0700 if new)
        /// instead of printing it; stdout then carries only the line for gateway.yaml.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// A command failure with its exit code.
struct Fail(u8, String);

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail(2, e.to_string())
    }
}

fn init_logging(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("UAPK_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        config::LogFormat::Json => b.json().flatten_event(true).with_current_span(false).init(),
        config::LogFormat::Text => b.init(),
    }
}

fn load_config(path: Option<&Path>) -> Result<config::GatewayConfig, Fail> {
    config::load_gateway(path).map_err(|e| Fail(1, e.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run { config, demo, demo_upstream } => {
            run(config.as_deref(), cli.log_format, demo.then_some(demo_upstream))
        }
        Cmd::DemoUpstream { listen } => demo_upstream(listen),
        Cmd::Check { config } => check(config.as_deref()),
        Cmd::Verify(a) => verify(a),
        Cmd::Export(a) => export(a),
        Cmd::Tail(a) => tail::run(a),
        Cmd::Proof { cmd } => proof(cmd),
        Cmd::Keygen { out, force } => identity::generate_key_files(&out, force)
            .map(|pubp| println!("wrote {} (0600) and {}", out.display(), pubp.display()))
            .map_err(|e| Fail(2, e.to_string())),
        Cmd::Token { cmd } => match *cmd {
            TokenCmd::Mint(a) => mint(a),
        },
        Cmd::Ca { cmd: CaCmd::Init { out_dir } } => {
            let (cert, key) = (out_dir.join("ca.pem"), out_dir.join("ca-key.pem"));
            uapk_gateway::proxy::tls::generate_ca(&cert, &key)
                .map(|()| println!("wrote {} and {} (0600)", cert.display(), key.display()))
                .map_err(|e| Fail(2, e))
        }
        Cmd::RotateKey { config, new_key } => rotate_key(config.as_deref(), &new_key),
        Cmd::Migrate { config } => migrate(config.as_deref()),
        Cmd::InitIptables { proxy_uid, port, exempt_uid, dns, dry_run } => {
            init_iptables(proxy_uid, &exempt_uid, port, &dns, dry_run)
        }
        Cmd::AdminKey { cmd: AdminKeyCmd::New { role, id, out } } => admin_key(&role, &id, out.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run(path: Option<&Path>, log: Option<LogFormatArg>, demo: Option<std::net::SocketAddr>) -> Result<(), Fail> {
    let mut cfg = load_config(path)?;
    init_logging(match log {
        Some(LogFormatArg::Text) => config::LogFormat::Text,
        Some(LogFormatArg::Json) => config::LogFormat::Json,
        None => cfg.log_format,
    });
    if let Some(addr) = demo {
        // Before anything is loaded, so the first load and every reload see it.
        config::enable_demo_upstream(addr);
        let only = config::Cidr { addr: addr.ip(), prefix: if addr.is_ipv4() { 32 } else { 128 } };
        cfg.allow_private_destinations.push(only);
        tracing::warn!(
            demo_upstream = %addr,
            "DEMO MODE: every connector with a base_url is pointed at http://{addr} (uapk-gateway demo-upstream), not at its real API"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let running = runtime::start(cfg).await.map_err(|e| Fail(2, format!("{e:#}")))?;
        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let second = tokio::spawn(async {
            shutdown_signal().await;
            tracing::warn!("second signal: exiting at once");
            std::process::exit(1);
        });
        running.shutdown().await;
        second.abort();
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn demo_upstream(listen: std::net::SocketAddr) -> Result<(), Fail> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        tokio::select! {
            r = demo::serve(listen) => r.map_err(|e| Fail(2, format!("demo upstream on {listen}: {e}"))),
            _ = shutdown_signal() => Ok(()),
        }
    })
}

fn check(path: Option<&Path>) -> Result<(), Fail> {
    let (cfg, warnings) = config::load_gateway_with_warnings(path).map_err(|e| Fail(1, e.to_string()))?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    match config::load_policies(&cfg.policies_dir, config::Strictness::Check) {
        Ok(set) => {
            for w in &set.warnings {
                eprintln!("warning: {w}");
            }
            if set.manifests.is_empty() {
                return Err(Fail(
                    1,
                    format!(
                        "no manifests in {}: every request would be refused manifest_not_found",
                        cfg.policies_dir.display()
                    ),
                ));
            }
            println!(
                "ok: {} manifest(s) in {}: {}",
                set.manifests.len(),
                cfg.policies_dir.display(),
                set.manifests.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Err(e) => Err(Fail(1, format!("invalid configuration:\n{e}"))),
    }
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<ed25519_dalek::VerifyingKey>, Fail> {
    paths
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p).map_err(|e| Fail(2, format!("{}: {e}", p.display())))?;
            identity::parse_verifying_key_pem(&pem).map_err(|e| Fail(2, format!("{}: {e}", p.display())))
        })
        .collect()
}

fn proof(cmd: ProofCmd) -> Result<(), Fail> {
    let read = |db: &Path| -> Result<(audit::Snapshot, redb::ReadTransaction), Fail> {
        let snap = audit::Snapshot::open(db).map_err(|e| Fail(2, e.to_string()))?;
        let tx = snap.begin_read().map_err(|e| Fail(2, e.to_string()))?;
        Ok((snap, tx))
    };
    let (remote, query) = match &cmd {
        ProofCmd::Inclusion { remote, index, size, .. } => (
            remote,
            format!("/v1/proof/inclusion?index={index}{}", size.map(|s| format!("&size={s}")).unwrap_or_default()),
        ),
        ProofCmd::Consistency { remote, old, new, .. } => {
            (remote, format!("/v1/proof/consistency?old={old}&new={new}"))
        }
    };
    if let Some(url) = &remote.admin {
        let admin = remote::Admin::connect(url, remote.admin_key_file.as_deref())?;
        let text = admin.get(&query)?;
        print!("{}", String::from_utf8_lossy(&text));
        return Ok(());
    }
    let db = |d: Option<PathBuf>, c: Option<PathBuf>| -> Result<(PathBuf, Option<LogCopy>), Fail> {
        match (d, c) {
            (Some(d), _) => Ok((d, None)),
            (None, Some(c)) => log_source(&load_config(Some(&c))?),
            (None, None) => Err(Fail(2, "give --db FILE, -c gateway.yaml or --admin URL".into())),
        }
    };
    let p = match cmd {
        ProofCmd::Inclusion { db: d, config, index, size, .. } => {
            let (path, _copy) = db(d, config)?;
            audit::proof::inclusion(&read(&path)?.1, index, size)
        }
        ProofCmd::Consistency { db: d, config, old, new, .. } => {
            let (path, _copy) = db(d, config)?;
            audit::proof::consistency(&read(&path)?.1, old, new)
        }
    }
    .map_err(|e| Fail(1, e.to_string()))?;
    print!("{}", p.to_text());
    Ok(())
}

fn read_text(p: &Path) -> Result<String, Fail> {
    std::fs::read_to_string(p).map_err(|e| Fail(2, format!("{}: {e}", p.display())))
}

fn verify(mut a: VerifyArgs) -> Result<(), Fail> {
    let mut key_paths = a.keys.clone();
    let mut _copy = None;
    let mut own_key = None;
    if let Some(c) = a.config.take() {
        let cfg = load_config(Some(&c))?;
        let (path, copy) = log_source(&cfg)?;
        a.db = Some(path);
        _copy = copy;
        if key_paths.is_empty() {
            let k = identity::load_signing_key(&cfg.gateway_key).map_err(|e| Fail(2, e.to_string()))?;
            eprintln!(
                "using the public key of keys.gateway {} (pass --key to choose the trusted key)",
                cfg.gateway_key.display()
            );
            own_key = Some(k.verifying_key());
        }
    }
    if key_paths.is_empty() && own_key.is_none() {
        if a.bundle.is_some() || a.proof.is_some() || a.remote.admin.is_some() {
            // A bundle or proof carries its own public key: trusting it would accept anything
            // re-signed by whoever made the copy.
            return Err(Fail(
                2,
                format!(
                    "{} needs --key PUB.pem: the gateway public key you trust, obtained independently of the \
                     evidence (never the key inside a bundle)",
                    if a.bundle.is_some() {
                        "--bundle"
                    } else if a.proof.is_some() {
                        "--proof"
                    } else {
                        "--admin"
                    }
                ),
            ));
        }
        key_paths.push(PathBuf::from("./data/gateway.pub.pem"));
        eprintln!("using key {} (pass --key to choose the trusted key)", key_paths[0].display());
    }
    let keys = match own_key {
        Some(k) => vec![k],
        None => read_keys(&key_paths)?,
    };
    let trusted = a.trusted_checkpoint.as_deref().map(read_text).transpose()?;
    if let Some(p) = &a.proof {
        let proof = audit::Proof::parse(&read_text(p)?).map_err(|e| Fail(1, e.to_string()))?;
        let (new, old) = match &proof {
            audit::Proof::Consistency { .. } => (None, trusted.as_deref()),
            audit::Proof::Inclusion { .. } => (trusted.as_deref(), None),
        };
        return match proof.verify(&keys, new, old) {
            Ok(msg) => {
                println!("ok: {msg}");
                Ok(())
            }
            Err(f) => Err(Fail(1, format!("proof verification failed: {}", f.reason))),
        };
    }
    if let Some(url) = &a.remote.admin {
        let admin = remote::Admin::connect(url, a.remote.admin_key_file.as_deref())?;
        let note = String::from_utf8(admin.get("/v1/checkpoint")?.to_vec())
            .map_err(|_| Fail(1, "verification failed: the served checkpoint is not UTF-8".into()))?;
        let opts = audit::VerifyOptions { trusted_checkpoint: trusted.as_deref(), progress: None };
        // The entries of the served checkpoint's tree, one by one (records past it are ignored).
        let size = audit::parse_unverified(&note).map_or(0, |cp| cp.size);
        let next = |idx: u64, buf: &mut Vec<u8>| -> Result<bool, audit::VerifyFailure> {
            if idx >= size {
                return Ok(false);
            }
            let bytes = admin.get(&format!("/v1/records/{idx}")).map_err(|Fail(_, m)| audit::fetch_failure(m))?;
            buf.extend_from_slice(&bytes);
            Ok(true)
        };
        return report_verify(audit::verify_served(&note, &keys, &opts, next));
    }
    let report = match (&a.db, &a.bundle) {
        (Some(db), _) => {
            if !db.exists() {
                return Err(Fail(2, format!("{}: no such file", db.display())));
            }
            use std::io::IsTerminal;
            let tty = std::io::stderr().is_terminal();
            let started = uapk_gateway::clock::instant();
            let progress = move |n: u64| {
                if tty {
                    let rate = n as f64 / uapk_gateway::clock::since(started).as_secs_f64().max(1e-6);
                    eprint!("\rverified {n} entries ({rate:.0}/s)");
                }
            };
            let opts = audit::VerifyOptions { trusted_checkpoint: trusted.as_deref(), progress: Some(&progress) };
            let r = audit::verify_db_with(db, &keys, &opts);
            if tty {
                eprintln!();
            }
            r
        }
        (None, Some(b)) => {
            let opts = audit::VerifyOptions { trusted_checkpoint: trusted.as_deref(), progress: None };
            audit::verify_bundle_with(b, &keys, &opts)
        }
        (None, None) => return Err(Fail(2, "give --db, --bundle or --proof".into())),
    };
    report_verify(report)
}

fn report_verify(report: Result<audit::VerifyReport, audit::VerifyFailure>) -> Result<(), Fail> {
    match report {
        Ok(r) => {
            let range = if r.from > 0 { format!(" (indexes {}..{})", r.from, r.size) } else { String::new() };
            let mut line = format!(
                "ok: {} entries verified{range}; {} checkpoints; tree size {}; root {}",
                r.entries, r.checkpoints, r.size, r.root_hex
            );
            if r.rotations > 0 {
                line += &format!("; {} key rotation(s) followed", r.rotations);
            }
            match r.trusted_size {
                Some(t) => line += &format!("; extends the trusted checkpoint of size {t}"),
                None => line += "; no trusted checkpoint given (truncation of the newest entries is not checked)",
            }
            println!("{line}");
            Ok(())
        }
        Err(f) if f.io => Err(Fail(2, format!("cannot verify: {}", f.reason))),
        Err(f) => Err(Fail(
            1,
            match f.index {
                Some(i) => format!("verification failed at index {i}: {}", f.reason),
                None => format!("verification failed: {}", f.reason),
            },
        )),
    }
}

fn export(a: ExportArgs) -> Result<(), Fail> {
    if let Some(url) = &a.remote.admin {
        if a.db.is_some() {
            return Err(Fail(2, "give --db FILE or --admin URL, not both".into()));
        }
        let admin = remote::Admin::connect(url, a.remote.admin_key_file.as_deref())?;
        let mut query = Vec::new();
        if let Some(f) = a.from {
            query.push(format!("from={f}"));
        }
        if let Some(t) = a.to {
            query.push(format!("to={t}"));
        }
        let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        let tar = admin.post(&format!("/v1/export{q}"))?;
        let files = audit::tar::extract(&tar, &a.out).map_err(|e| Fail(2, e.to_string()))?;
        let entries =
            std::fs::read(a.out.join("entries.jsonl")).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
        println!("exported {entries} entries to {} ({} files from {url})", a.out.display(), files.len());
        return Ok(());
    }
    let mut _copy = None;
    let (db, key_path) = match (a.db, a.gateway_key) {
        (Some(db), Some(k)) if a.config.is_none() => (db, k),
        (Some(db), k) => {
            let cfg = load_config(a.config.as_deref())?;
            (db, k.unwrap_or(cfg.gateway_key))
        }
        (None, k) => {
            let cfg = load_config(a.config.as_deref())?;
            let (path, copy) = log_source(&cfg)?;
            _copy = copy;
            (path, k.unwrap_or(cfg.gateway_key))
        }
    };
    let key = identity::load_signing_key(&key_path).map_err(|e| Fail(2, e.to_string()))?;
    if !db.exists() {
        return Err(Fail(2, format!("{}: no such file", db.display())));
    }
    let r = audit::export_bundle(&db, &a.out, a.from, a.to, &key).map_err(|e| Fail(2, e.to_string()))?;
    println!("exported {} entries to {}", r.entries, a.out.display());
    Ok(())
}

/// A consistent copy of the fleet's log in a temporary file, removed when dropped.
struct LogCopy(PathBuf);

impl Drop for LogCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where a config's log is read from: its `audit.path`, or (state.backend: postgres) a
/// snapshot of the fleet's log copied into a temporary file in the same format, so `verify`,
/// `export` and `proof` read it exactly like a gateway's own file.
fn log_source(cfg: &config::GatewayConfig) -> Result<(PathBuf, Option<LogCopy>), Fail> {
    let config::StateBackend::Postgres(pg) = &cfg.state else {
        return Ok((cfg.audit.path.clone(), None));
    };
    let nanos = uapk_gateway::clock::now_unix_nanos();
    let path = std::env::temp_dir().join(format!("uapk-fleet-snapshot-{}-{nanos}.redb", std::process::id()));
    let copy = LogCopy(path.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let n = rt
        .block_on(async {
            let db = uapk_gateway::state::postgres::Db::new(pg)?;
            uapk_gateway::state::postgres::snapshot_copy(&db, &cfg.audit.origin, &path).await
        })
        .map_err(|e| Fail(2, e))?;
    eprintln!("read {n} entries of log {} from PostgreSQL", cfg.audit.origin);
    Ok((path, Some(copy)))
}

fn migrate(path: Option<&Path>) -> Result<(), Fail> {
    let cfg = load_config(path)?;
    let config::StateBackend::Postgres(pg) = &cfg.state else {
        return Err(Fail(2, "migrate needs state.backend: postgres (the embedded log needs no migration)".into()));
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let applied = rt
        .block_on(async {
            let db = uapk_gateway::state::postgres::Db::new(pg)?;
            uapk_gateway::state::postgres::migrate(&db).await
        })
        .map_err(|e| Fail(1, e))?;
    if applied.is_empty() {
        println!("ok: the schema is current");
    } else {
        println!("ok: applied migration(s) {applied:?}");
    }
    Ok(())
}

fn mint(a: MintArgs) -> Result<(), Fail> {
    let key = identity::load_signing_key(&a.issuer_key).map_err(|e| Fail(2, e.to_string()))?;
    let ttl = config::parse_duration(&a.ttl).map_err(|e| Fail(2, format!("--ttl: {e}")))?;
    let now = uapk_gateway::clock::now_unix();
    let mut amount_max = std::collections::BTreeMap::new();
    for item in &a.amount_max {
        let (cur, amt) =
            item.split_once('=').ok_or_else(|| Fail(2, format!("--amount-max {item:?}: expected CUR=amount")))?;
        let d: rust_decimal::Decimal =
            amt.parse().map_err(|_| Fail(2, format!("--amount-max {item:?}: bad amount")))?;
        amount_max.insert(cur.to_ascii_uppercase(), d);
    }
    let counterparties = (a.counterparties_allow.is_some() || a.counterparties_deny.is_some()).then(|| {
        identity::CounterpartyConstraint {
            allow: a.counterparties_allow.clone().unwrap_or_default(),
            deny: a.counterparties_deny.clone().unwrap_or_default(),
        }
    });
    let params = param_constraints(&a)?;
    let constraints =
        (!amount_max.is_empty() || a.jurisdictions.is_some() || counterparties.is_some() || params.is_some()).then(
            || identity::Constraints { amount_max, jurisdictions: a.jurisdictions.clone(), counterparties, params },
        );
    let jti = a.jti.unwrap_or_else(|| {
        use rand::RngCore;
        let mut b = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut b);
        hex::encode(b)
    });
    let claims = identity::CapabilityClaims {
        iss: a.iss,
        sub: a.sub,
        aud: identity::Audience::from(vec![a.aud]),
        // Out of range saturates, and `identity::mint` then refuses it: never a wrapped exp.
        exp: i64::try_from(ttl.as_secs()).ok().and_then(|t| now.checked_add(t)).unwrap_or(i64::MAX),
        iat: now,
        nbf: None,
        jti: Some(jti),
        connectors: a.connectors,
        action_types: a.actions,
        constraints,
    };
    let token = identity::mint(&key, a.kid.as_deref(), &claims).map_err(|e| Fail(2, e.to_string()))?;
    println!("{token}");
    Ok(())
}

/// `--param-allow/--param-deny NAME=V1,V2` and `--param-min/--param-max NAME=DECIMAL` → the
/// token's `constraints.params`.
fn param_constraints(
    a: &MintArgs,
) -> Result<Option<std::collections::BTreeMap<String, identity::ParamConstraint>>, Fail> {
    let mut out: std::collections::BTreeMap<String, identity::ParamConstraint> = Default::default();
    let split = |flag: &str, item: &str| -> Result<(String, String), Fail> {
        match item.split_once('=') {
            Some((n, v)) if !n.trim().is_empty() && !v.trim().is_empty() => {
                Ok((n.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(Fail(2, format!("--{flag} {item:?}: expected NAME=VALUE"))),
        }
    };
    for (flag, items) in [("param-allow", &a.param_allow), ("param-deny", &a.param_deny)] {
        for item in items {
            let (name, list) = split(flag, item)?;
            let values: Vec<String> =
                list.split(',').map(str::trim).filter(|v| !v.is_empty()).map(str::to_string).collect();
            let c = out.entry(name).or_default();
            if flag == "param-allow" { c.allow.extend(values) } else { c.deny.extend(values) }
        }
    }
    for (flag, items) in [("param-min", &a.param_min), ("param-max", &a.param_max)] {
        for item in items {
            let (name, v) = split(flag, item)?;
            let d = rust_decimal::Decimal::from_str_exact(&v)
                .map_err(|_| Fail(2, format!("--{flag} {item:?}: {v:?} is not a decimal")))?;
            let c = out.entry(name).or_default();
            if flag == "param-min" { c.min = Some(d) } else { c.max = Some(d) }
        }
    }
    for (name, c) in &out {
        if let (Some(lo), Some(hi)) = (c.min, c.max)
            && lo > hi
        {
            return Err(Fail(2, format!("--param-min {name}={lo} is above --param-max {name}={hi}")));
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

fn rotate_key(path: Option<&Path>, new_key: &Path) -> Result<(), Fail> {
    let cfg = load_config(path)?;
    let old = identity::load_signing_key(&cfg.gateway_key).map_err(|e| Fail(2, e.to_string()))?;
    let new = identity::load_signing_key(new_key).map_err(|e| Fail(2, e.to_string()))?;
    let audit_cfg = audit::AuditConfig {
        path: cfg.audit.path.clone(),
        origin: cfg.audit.origin.clone(),
        durability: audit::Durability::Sync,
        sign_each_entry: cfg.audit.sign_each_entry,
        queue_capacity: 1,
        key_name: runtime::key_name(&cfg),
    };
    let idx = match &cfg.state {
        config::StateBackend::Embedded => audit::rotate_key(audit_cfg, old, new).map_err(|e| Fail(1, e.to_string()))?,
        config::StateBackend::Postgres(pg) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let db = uapk_gateway::state::postgres::Db::new(pg)?;
                uapk_gateway::state::postgres::rotate(&db, &audit_cfg, &old, &new, &runtime::gateway_name()).await
            })
            .map_err(|e| Fail(1, e))?
        }
    };
    println!(
        "key rotation recorded as entry {idx}; now set keys.gateway to {} and start the gateway (every gateway of a fleet)",
        new_key.display()
    );
    Ok(())
}

fn init_iptables(uid: u32, exempt: &[u32], port: u16, dns: &[std::net::IpAddr], dry_run: bool) -> Result<(), Fail> {
    use uapk_gateway::proxy::transparent;
    let resolvers = transparent::resolvers(dns);
    let rules = transparent::iptables_rules_exempting(uid, exempt, port, &resolvers);
    let conf = Path::new("/proc/sys/net/ipv6/conf");
    transparent::install(&rules, &resolvers, dry_run, &mut transparent::SystemRunner, conf, &mut std::io::stdout())
        .map_err(|e| Fail(2, e))
}

fn admin_key(role: &str, id: &str, out: Option<&Path>) -> Result<(), Fail> {
    use base64::Engine;
    use rand::RngCore;
    use sha2::Digest;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    let key = format!("uapk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b));
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let line = format!("  - {{ id: {id}, sha256: {hash}, role: {role} }}");
    let Some(path) = out else {
        println!("admin key (shown once; give it to the {role}): {key}");
        println!("add to gateway.yaml under admin.keys:");
        println!("{line}");
        return Ok(());
    };
    write_secret(path, format!("{key}\n").as_bytes())?;
    eprintln!("wrote the {role} admin key to {} (0600); its line for gateway.yaml admin.keys:", path.display());
    println!("{line}");
    Ok(())
}

/// Creates `path` readable by its owner only (its directory 0700 if new); an existing file is
/// never replaced.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), Fail> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Fail(2, format!("{}: {e}", dir.display())))?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Fail(2, format!("{} exists: not overwritten (remove it, or choose another --out)", path.display()))
        } else {
            Fail(2, format!("{}: {e}", path.display()))
        }
    })?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Fail(2, format!("{}: {e}", path.display())))
}

/// A small HTTP/1.1 client for the admin API of a running gateway (plain HTTP: the admin listener
/// is a loopback or pod-local port).
pub(crate) mod remote {
    use super::Fail;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::{Client, connect::HttpConnector};
    use std::path::Path;

    /// How a streamed response ended.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum StreamEnd {
        /// The admin API could not be reached.
        Unreachable,
        /// The body ended as the server ended it.
        Complete,
        /// The connection broke mid-body.
        CutOff,
    }

    pub(crate) struct Admin {
        base: String,
        key: String,
        rt: tokio::runtime::Runtime,
        client: Client<HttpConnector, Full<Bytes>>,
    }

    impl Admin {
        /// The admin key comes from `key_file`, else from `UAPK_ADMIN_KEY`; it never appears in
        /// messages.
        pub(crate) fn connect(url: &str, key_file: Option<&Path>) -> Result<Admin, Fail> {
            if !url.starts_with("http://") {
                return Err(Fail(2, format!("--admin {url:?}: give the admin listener's http:// URL")));
            }
            let key = match key_file {
                Some(p) => std::fs::read_to_string(p).map_err(|e| Fail(2, format!("{}: {e}", p.display())))?,
                None => std::env::var("UAPK_ADMIN_KEY").map_err(|_| {
                    Fail(2, "--admin needs an admin key: set UAPK_ADMIN_KEY or pass --admin-key-file FILE".into())
                })?,
            };
            let key = key.trim().to_string();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Fail(2, "the admin key is empty or not printable ASCII".into()));
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
            Ok(Admin { base: url.trim_end_matches('/').to_string(), key, rt, client })
        }

        pub(crate) fn get(&self, path: &str) -> Result<Bytes, Fail> {
            self.request(http::Method::GET, path)
        }

        pub(crate) fn post(&self, path: &str) -> Result<Bytes, Fail> {
            self.request(http::Method::POST, path)
        }

        /// GETs `path` and hands each piece of the body to `each` as it arrives.
        pub(crate) fn stream(
            &self,
            path: &str,
            mut each: impl FnMut(&[u8]) -> Result<(), Fail>,
        ) -> Result<StreamEnd, Fail> {
            let url = format!("{}{path}", self.base);
            let req = http::Request::builder()
                .uri(&url)
                .header(http::header::AUTHORIZATION, format!("Bearer {}", self.key))
                .body(Full::new(Bytes::new()))
                .map_err(|e| Fail(2, format!("{url}: {e}")))?;
            self.rt.block_on(async {
                let Ok(resp) = self.client.request(req).await else { return Ok(StreamEnd::Unreachable) };
                let status = resp.status();
                let mut body = resp.into_body();
                if status != http::StatusCode::OK {
                    let b = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    let what = if matches!(status.as_u16(), 401 | 403) { "the admin API refused the key" } else { "" };
                    return Err(Fail(
                        2,
                        format!("{url}: {status} {what}: {}", String::from_utf8_lossy(&b[..b.len().min(300)])),
                    ));
                }
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return Ok(StreamEnd::CutOff) };
                    if let Some(data) = frame.data_ref() {
                        each(data)?;
                    }
                }
                Ok(StreamEnd::Complete)
            })
        }

        fn request(&self, method: http::Method, path: &str) -> Result<Bytes, Fail> {
            let url = format!("{}{path}", self.base);
            let req = http::Request::builder()
                .method(method)
                .uri(&url)
                .header(http::header::AUTHORIZATION, format!("Bearer {}", self.key))
                .body(Full::new(Bytes::new()))
                .map_err(|e| Fail(2, format!("{url}: {e}")))?;
            self.rt.block_on(async {
                let resp = self
                    .client
                    .request(req)
                    .await
                    .map_err(|e| Fail(2, format!("cannot reach the admin API at {}: {e}", self.base)))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Fail(2, format!("{url}: the response was cut off: {e}")))?
                    .to_bytes();
                match status.as_u16() {
                    200 => Ok(body),
                    401 | 403 => Err(Fail(
                        2,
                        format!(
                            "the admin API refused the key ({status}): {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        ),
                    )),
                    _ => Err(Fail(
                        2,
                        format!("{url}: {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])),
                    )),
                }
            })
        }
    }
}
