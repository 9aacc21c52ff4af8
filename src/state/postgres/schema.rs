//! The schema (tables prefixed `uapk_`), created and upgraded by numbered migrations embedded
//! in the binary: `uapk-gateway migrate`, and `run` at start, under an advisory lock so
//! gateways starting together migrate once. A migration only adds; none drops data.

use super::{CallError, Db, DbError};

/// (version, statements). Append new versions; never edit or remove one that shipped.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
CREATE TABLE uapk_logs (
    origin      text PRIMARY KEY,
    size        bigint NOT NULL,
    prev        bytea NOT NULL,
    frontier    bytea NOT NULL,
    last_ts_us  bigint NOT NULL,
    active_key  text NOT NULL
);
CREATE TABLE uapk_entries (
    origin  text NOT NULL,
    idx     bigint NOT NULL,
    body    bytea NOT NULL,
    sig     bytea,
    PRIMARY KEY (origin, idx)
);
CREATE TABLE uapk_checkpoints (
    origin  text NOT NULL,
    size    bigint NOT NULL,
    note    text NOT NULL,
    PRIMARY KEY (origin, size)
);
CREATE TABLE uapk_budget_counters (
    origin    text NOT NULL,
    agent     text NOT NULL,
    win       text NOT NULL,
    start     bigint NOT NULL,
    scope     text NOT NULL,
    value     text NOT NULL,
    count     bigint NOT NULL DEFAULT 0,
    tokens    bigint NOT NULL DEFAULT 0,
    reserved  bigint NOT NULL DEFAULT 0,
    spend     text NOT NULL DEFAULT '{}',
    PRIMARY KEY (origin, agent, win, start, scope, value)
);
CREATE TABLE uapk_budget_holds (
    origin      text NOT NULL,
    request_id  text NOT NULL,
    agent       text NOT NULL,
    hold        text NOT NULL,
    forwarded   boolean NOT NULL DEFAULT false,
    since       bigint NOT NULL,
    PRIMARY KEY (origin, request_id)
);
CREATE TABLE uapk_approvals (
    origin      text NOT NULL,
    id          text PRIMARY KEY,
    agent       text NOT NULL,
    status      text NOT NULL,
    created_at  bigint NOT NULL,
    expires_at  bigint NOT NULL,
    body        text NOT NULL
);
CREATE INDEX uapk_approvals_pending ON uapk_approvals (origin, agent) WHERE status = 'pending';
CREATE INDEX uapk_approvals_by_time ON uapk_approvals (origin, created_at DESC, id DESC);
CREATE TABLE uapk_approval_slots (
    origin  text NOT NULL,
    slot    text PRIMARY KEY,
    agent   text NOT NULL,
    since   bigint NOT NULL
);
"#,
)];

const LOCK: i64 = 0x7561_706b_5f6d_6967; // "uapk_mig"

/// Creates or upgrades the schema; returns the versions applied now (empty when current).
pub async fn migrate(db: &Db) -> Result<Vec<i32>, DbError> {
    db.call("migrate", |mut c| async move {
        c.execute("SELECT pg_advisory_lock($1)", &[&LOCK]).await?;
        let r = async {
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS uapk_schema_migrations (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
            let current: i32 =
                c.query_one("SELECT coalesce(max(version), 0) FROM uapk_schema_migrations", &[]).await?.get(0);
            let mut applied = Vec::new();
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
                let tx = c.transaction().await?;
                tx.batch_execute(sql).await?;
                tx.execute("INSERT INTO uapk_schema_migrations (version) VALUES ($1)", &[version]).await?;
                tx.commit().await?;
                applied.push(*version);
            }
            Ok::<_, CallError>(applied)
        }
        .await;
        let unlocked = c.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]).await;
        let applied = r?;
        unlocked?;
        Ok(applied)
    })
    .await
}
