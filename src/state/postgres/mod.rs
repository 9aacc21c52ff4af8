//! The fleet backend (`state.backend: postgres`, SPEC §15): one PostgreSQL database shared by
//! every gateway of a fleet holds the log of each `audit.origin` (`ledger`), the budget
//! counters and reservations (`budgets`) and the approvals queue (`approvals`).
//!
//! Every call has a deadline (`connect_timeout` + `statement_timeout`, enforced here as well as
//! by the server's `statement_timeout` and `lock_timeout`); on any error the caller refuses the
//! request and nothing is forwarded. The pool reconnects by itself, so the gateway recovers
//! without a restart once the database answers again. A URL's password is never printed.

mod approvals;
mod budgets;
mod ledger;
mod schema;

pub(crate) use approvals::{CHANNEL as APPROVALS_CHANNEL, PgApprovals};
pub(crate) use budgets::PgBudgets;
pub(crate) use ledger::FleetLog;
pub use ledger::{rotate, snapshot_copy};
pub use schema::migrate;

use crate::config::{PostgresSettings, redact_url};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A connection pool and the deadline of one call.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// How to open a connection of its own (`listen`).
    config: Arc<tokio_postgres::Config>,
    tls: Option<Arc<tokio_postgres_rustls::MakeRustlsConnect>>,
    /// `connect_timeout` + `statement_timeout`: a call that takes longer fails closed.
    deadline: Duration,
    /// The last call's outcome (`/readyz` `"state"`, `uapk_state_up{backend="postgres"}`).
    up: Arc<AtomicBool>,
    observe: Option<Observe>,
}

/// Called after every database call with its op name, seconds taken and success.
pub(crate) type Observe = Arc<dyn Fn(&'static str, f64, bool) + Send + Sync>;

/// A database error as the gateway reports it: what failed, never the URL or its password.
pub(crate) type DbError = String;

/// What a call's body may fail with: the database, or a row it cannot read.
#[derive(Debug)]
pub(crate) enum CallError {
    Db(tokio_postgres::Error),
    Bad(String),
}

impl From<tokio_postgres::Error> for CallError {
    fn from(e: tokio_postgres::Error) -> Self {
        CallError::Db(e)
    }
}

impl Db {
    /// Builds the pool (connections open on first use). Fails only on a bad URL or CA file.
    pub fn new(s: &PostgresSettings) -> Result<Db, DbError> {
        let url = s.url.read().map_err(|e| format!("state.postgres.url_file: {e}"))?;
        let (url, sslmode) = split_sslmode(&url);
        let mut cfg: tokio_postgres::Config =
            url.parse().map_err(|e| format!("state.postgres url {}: {e}", redact_url(&url)))?;
        cfg.connect_timeout(s.connect_timeout);
        cfg.application_name("uapk-gateway");
        cfg.keepalives(true);
        cfg.keepalives_idle(Duration::from_secs(30));
        let ms = s.statement_timeout.as_millis().max(1);
        cfg.options(format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout=60000"
        ));
        let mgr_cfg = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let (mgr, tls) = match sslmode.as_deref() {
            Some("disable") => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                (Manager::from_config(cfg.clone(), tokio_postgres::NoTls, mgr_cfg), None)
            }
            mode => {
                cfg.ssl_mode(match mode {
                    None | Some("prefer") | Some("allow") => tokio_postgres::config::SslMode::Prefer,
                    Some("require" | "verify-ca" | "verify-full") => tokio_postgres::config::SslMode::Require,
                    Some(o) => {
                        return Err(format!(
                            "state.postgres url: sslmode {o:?} is not one of disable, prefer, require, verify-full"
                        ));
                    }
                });
                let tls = tls(s.ca_file.as_deref())?;
                (Manager::from_config(cfg.clone(), tls.clone(), mgr_cfg), Some(tls))
            }
        };
        let timeout = Some(s.connect_timeout);
        let pool = Pool::builder(mgr)
            .max_size(s.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| format!("state.postgres pool: {e}"))?;
        Ok(Db {
            pool,
            config: Arc::new(cfg),
            tls: tls.map(Arc::new),
            deadline: s.connect_timeout + s.statement_timeout,
            up: Arc::new(AtomicBool::new(true)),
            observe: None,
        })
    }

    /// Observes every call (`uapk_state_duration_seconds`).
    pub(crate) fn with_observer(mut self, f: Observe) -> Db {
        self.observe = Some(f);
        self
    }

    /// True when the last call succeeded.
    pub(crate) fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Runs `f` on a pooled connection within the deadline; `op` names it in metrics.
    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, DbError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let started = crate::clock::instant();
        let r = tokio::time::timeout(self.deadline, async {
            let client = self.pool.get().await.map_err(|e| format!("postgres: {}", pool_error(&e)))?;
            f(client).await.map_err(|e| match e {
                CallError::Db(e) => format!("postgres: {}", db_error(&e)),
                CallError::Bad(why) => why,
            })
        })
        .await
        .unwrap_or_else(|_| Err(format!("postgres: no answer within {} ms", self.deadline.as_millis())));
        self.up.store(r.is_ok(), Ordering::SeqCst);
        if let Some(f) = &self.observe {
            f(op, crate::clock::since(started).as_secs_f64(), r.is_ok());
        }
        r
    }

    /// Calls `on` with the payload of every `NOTIFY` on `channel`, over a connection of its own
    /// (not from the pool), reconnecting a second after it fails. Runs until dropped; callers
    /// keep polling as well, so a lost notification only delays.
    pub(crate) async fn listen(&self, channel: &'static str, on: impl Fn(String) + Send + Sync + 'static) {
        loop {
            let r = match &self.tls {
                None => listen_once(&self.config, tokio_postgres::NoTls, channel, &on).await,
                Some(t) => listen_once(&self.config, (**t).clone(), channel, &on).await,
            };
            if let Err(e) = r {
                tracing::debug!(error = %db_error(&e), channel, "LISTEN connection lost; reconnecting");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Checks the database answers (the readiness probe's loop).
    pub(crate) async fn ping(&self) -> Result<(), DbError> {
        self.call("ping", |c| async move { Ok(c.simple_query("SELECT 1").await.map(|_| ())?) }).await
    }
}

async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    channel: &str,
    on: &(dyn Fn(String) + Send + Sync),
) -> Result<(), tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    use futures_util::StreamExt;
    let (client, mut conn) = config.connect(tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    while let Some(payload) = rx.recv().await {
        on(payload);
    }
    driver.abort();
    Ok(())
}

/// The URL without its `sslmode` parameter (tokio-postgres knows fewer modes than libpq), and
/// the mode.
fn split_sslmode(url: &str) -> (String, Option<String>) {
    let Ok(mut u) = url::Url::parse(url) else { return (url.to_string(), None) };
    let mut mode = None;
    let rest: Vec<(String, String)> = u
        .query_pairs()
        .into_owned()
        .filter(|(k, v)| {
            if k == "sslmode" {
                mode = Some(v.to_ascii_lowercase());
                false
            } else {
                true
            }
        })
        .collect();
    if rest.is_empty() {
        u.set_query(None);
    } else {
        u.query_pairs_mut().clear().extend_pairs(rest);
    }
    (u.to_string(), mode)
}

/// rustls (ring) verifying the server against `ca_file`, else the bundled web roots.
fn tls(ca_file: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| format!("state.postgres.ca_file {}: {e}", p.display()))?;
            let mut n = 0;
            for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let c: rustls::pki_types::CertificateDer<'static> =
                    c.map_err(|e| format!("state.postgres.ca_file {}: {e}", p.display()))?;
                roots.add(c).map_err(|e| format!("state.postgres.ca_file {}: {e}", p.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("state.postgres.ca_file {}: no certificate", p.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("postgres TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn pool_error(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        deadpool_postgres::PoolError::Timeout(_) => "no connection within state.postgres.connect_timeout".into(),
        other => other.to_string(),
    }
}

/// An error's text with the server's message when there is one (never the URL).
fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// Sixty-four bits of a text, for advisory locks (FNV-1a: stable across versions and hosts).
pub(crate) fn lock_key(parts: &[&str]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h as i64
}
