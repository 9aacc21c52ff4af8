//! Budget counters shared by a fleet (SPEC §15.3): one row per (agent, window, window start,
//! scope, scope value) in `uapk_budget_counters`, one row per request holding a reservation in
//! `uapk_budget_holds`. Every change to an agent's counters runs in a transaction holding that
//! agent's advisory lock, so N concurrent requests against one remaining unit, on any number of
//! gateways, reserve exactly one. Admission applies the same rule as the embedded store
//! (`limits::admit`) to what the rows hold; windows are UTC hours/days by the database's clock.
//! A reservation is kept in the commit of its `decision` entry ([`keep_in`]), released when the
//! request stops before, and turned into the tokens its outcome charged.

use super::{CallError, Db, DbError, lock_key};
use crate::config::{Manifest, Scope, Window};
use crate::limits::{Ask, BudgetCheck, Reservation, Settlement, Spend, Used, admit};
use deadpool_postgres::GenericClient;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

const WINDOWS: [Window; 2] = [Window::Day, Window::Hour];
const SCOPES: [Scope; 3] = [Scope::Agent, Scope::Connector, Scope::Action];
/// A forwarded LLM call whose outcome never settled (its gateway died) is charged its estimate
/// after this long.
const FORWARDED_TOKENS_MAX_AGE: i64 = 3600;

/// The fleet's budget store.
#[derive(Clone)]
pub struct PgBudgets {
    db: Db,
    origin: Arc<str>,
}

/// What a request holds, as stored in `uapk_budget_holds.hold`.
#[derive(Debug, Serialize, Deserialize)]
struct Hold {
    connector: String,
    action: String,
    amount: Option<(Decimal, String)>,
    /// The window instant the request was counted in (database clock, Unix seconds).
    at: i64,
    /// The action is counted but not yet kept.
    counted: bool,
    tokens: Option<u64>,
}

impl Hold {
    fn spend(&self, agent: &str) -> Spend {
        Spend {
            agent: agent.to_string(),
            connector: self.connector.clone(),
            action: self.action.clone(),
            amount: self.amount.clone(),
            at: self.at,
        }
    }
}

/// One counter row.
#[derive(Debug, Default, Clone)]
struct Row {
    count: i64,
    tokens: i64,
    reserved: i64,
    spend: BTreeMap<String, Decimal>,
}

type Key = (Window, i64, Scope, String);

fn win_str(w: Window) -> &'static str {
    w.as_str()
}

fn scope_str(s: Scope) -> &'static str {
    s.as_str()
}

fn window_start(at: i64, w: Window) -> i64 {
    at.div_euclid(w.seconds()) * w.seconds()
}

fn scope_value(s: &Spend, scope: Scope) -> &str {
    match scope {
        Scope::Agent => &s.agent,
        Scope::Connector => &s.connector,
        Scope::Action => &s.action,
    }
}

/// The counters of `spend`'s windows and scope values, as stored.
async fn load<C: GenericClient>(c: &C, origin: &str, spend: &Spend) -> Result<HashMap<Key, Row>, CallError> {
    let (day, hour) = (window_start(spend.at, Window::Day), window_start(spend.at, Window::Hour));
    let rows = c
        .query(
            "SELECT win, start, scope, value, count, tokens, reserved, spend FROM uapk_budget_counters
             WHERE origin = $1 AND agent = $2 AND ((win = 'day' AND start = $3) OR (win = 'hour' AND start = $4))",
            &[&origin, &spend.agent, &day, &hour],
        )
        .await?;
    let mut out = HashMap::new();
    for r in rows {
        let w = if r.get::<_, &str>(0) == "day" { Window::Day } else { Window::Hour };
        let scope = match r.get::<_, &str>(2) {
            "agent" => Scope::Agent,
            "connector" => Scope::Connector,
            _ => Scope::Action,
        };
        let spend: BTreeMap<String, Decimal> = serde_json::from_str(r.get::<_, &str>(7)).unwrap_or_default();
        out.insert(
            (w, r.get::<_, i64>(1), scope, r.get::<_, String>(3)),
            Row { count: r.get(4), tokens: r.get(5), reserved: r.get(6), spend },
        );
    }
    Ok(out)
}

/// Applies `f` to the counter of every window/scope of `spend` and writes them back (one
/// statement for the six rows).
async fn change<C: GenericClient>(
    c: &C,
    origin: &str,
    spend: &Spend,
    rows: &mut HashMap<Key, Row>,
    f: impl Fn(&mut Row),
) -> Result<(), CallError> {
    let (mut wins, mut starts, mut scopes, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut counts, mut tokens, mut reserved, mut spends) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for w in WINDOWS {
        let start = window_start(spend.at, w);
        for scope in SCOPES {
            let value = scope_value(spend, scope).to_string();
            let row = rows.entry((w, start, scope, value.clone())).or_default();
            f(row);
            wins.push(win_str(w));
            starts.push(start);
            scopes.push(scope_str(scope));
            values.push(value);
            counts.push(row.count);
            tokens.push(row.tokens);
            reserved.push(row.reserved);
            spends.push(serde_json::to_string(&row.spend).unwrap_or_else(|_| "{}".into()));
        }
    }
    c.execute(
        "INSERT INTO uapk_budget_counters (origin, agent, win, start, scope, value, count, tokens, reserved, spend)
         SELECT $1, $2, * FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[])
         ON CONFLICT (origin, agent, win, start, scope, value) DO UPDATE
         SET count = EXCLUDED.count, tokens = EXCLUDED.tokens, reserved = EXCLUDED.reserved, spend = EXCLUDED.spend",
        &[&origin, &spend.agent, &wins, &starts, &scopes, &values, &counts, &tokens, &reserved, &spends],
    )
    .await?;
    Ok(())
}

fn count_action(spend: &Spend, sign: i64) -> impl Fn(&mut Row) + '_ {
    move |r: &mut Row| {
        r.count = (r.count + sign).max(0);
        if let Some((amt, cur)) = &spend.amount {
            let e = r.spend.entry(cur.clone()).or_default();
            *e = if sign > 0 { e.saturating_add(*amt) } else { e.saturating_sub(*amt).max(Decimal::ZERO) };
        }
    }
}

async fn lock_agent<C: GenericClient>(c: &C, origin: &str, agent: &str) -> Result<(), CallError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&["budget", origin, agent])]).await?;
    Ok(())
}

/// `lock_agent`, returning the database's clock (Unix seconds) in the same round trip.
async fn lock_agent_at<C: GenericClient>(c: &C, origin: &str, agent: &str) -> Result<i64, CallError> {
    let row = c
        .query_one(
            "SELECT pg_advisory_xact_lock($1), floor(extract(epoch FROM clock_timestamp()))::bigint",
            &[&lock_key(&["budget", origin, agent])],
        )
        .await?;
    Ok(row.get(1))
}

async fn db_now<C: GenericClient>(c: &C) -> Result<i64, CallError> {
    Ok(c.query_one("SELECT floor(extract(epoch FROM clock_timestamp()))::bigint", &[]).await?.get(0))
}

/// Keeps request `request_id`'s reservation in the caller's transaction (the commit of its
/// `decision` entry): from now on it is never released; `counted: false` (a dry-run
/// escalation) takes its action back. A reservation not held (any more) changes nothing.
pub(super) async fn keep_in<C: GenericClient>(
    c: &C,
    origin: &str,
    request_id: &str,
    counted: bool,
) -> Result<(), CallError> {
    let Some(row) = c
        .query_opt(
            "SELECT agent, hold FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2 AND NOT forwarded",
            &[&origin, &request_id],
        )
        .await?
    else {
        return Ok(());
    };
    let agent: String = row.get(0);
    let Ok(mut hold) = serde_json::from_str::<Hold>(row.get::<_, &str>(1)) else { return Ok(()) };
    if hold.counted && !counted {
        lock_agent(c, origin, &agent).await?;
        let spend = hold.spend(&agent);
        let mut rows = load(c, origin, &spend).await?;
        change(c, origin, &spend, &mut rows, count_action(&spend, -1)).await?;
    }
    hold.counted = false;
    if hold.tokens.is_none() {
        c.execute("DELETE FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2", &[&origin, &request_id])
            .await?;
    } else {
        let h = serde_json::to_string(&hold).unwrap_or_default();
        c.execute(
            "UPDATE uapk_budget_holds SET forwarded = true, hold = $3 WHERE origin = $1 AND request_id = $2",
            &[&origin, &request_id, &h],
        )
        .await?;
    }
    Ok(())
}

impl PgBudgets {
    pub(crate) fn new(db: Db, origin: &str) -> PgBudgets {
        PgBudgets { db, origin: origin.into() }
    }

    /// See [`crate::limits::Budgets::reserve`]: the same admission rule, over the fleet's rows,
    /// under the agent's lock; idempotent by request id.
    /// An agent without budgets reserves nothing in the database (its requests take no lock
    /// and no row): its actions are counted from the moment a budget is added to its manifest.
    pub(crate) async fn reserve(&self, manifest: &Manifest, ask: Ask) -> Result<BudgetCheck, DbError> {
        if manifest.policy.budgets.is_empty() {
            return Ok(BudgetCheck::Reserved { reservation: Reservation::new(ask.id, false), threshold: None });
        }
        let origin = self.origin.clone();
        self.db
            .call("reserve", move |mut c| async move {
                let tx = c.transaction().await?;
                let mut spend = ask.spend.clone();
                spend.at = lock_agent_at(&tx, &origin, &ask.spend.agent).await?;
                let held = tx
                    .query_opt(
                        "SELECT 1 FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2",
                        &[&&*origin, &ask.id],
                    )
                    .await?;
                if held.is_some() {
                    tx.commit().await?;
                    return Ok(BudgetCheck::Reserved { reservation: Reservation::new(ask.id, true), threshold: None });
                }
                let mut rows = load(&tx, &origin, &spend).await?;
                let currency = spend.amount.as_ref().map(|(_, c)| c.clone());
                let verdict = admit(manifest, &ask, |b| {
                    let key = (b.window, window_start(spend.at, b.window), b.scope, scope_value(&spend, b.scope).to_string());
                    rows.get(&key).map_or_else(Used::default, |r| Used {
                        count: r.count.max(0) as u64,
                        spend: currency.as_ref().and_then(|c| r.spend.get(c)).copied().unwrap_or_default(),
                        tokens: r.tokens.max(0) as u64,
                        reserved: r.reserved.max(0) as u64,
                    })
                });
                let threshold = match verdict {
                    Err(reason) => {
                        tx.commit().await?;
                        return Ok(BudgetCheck::Exceeded(reason));
                    }
                    Ok(t) => t,
                };
                change(&tx, &origin, &spend, &mut rows, count_action(&spend, 1)).await?;
                if let Some(n) = ask.tokens {
                    let n = n.min(i64::MAX as u64) as i64;
                    change(&tx, &origin, &spend, &mut rows, |r| r.reserved = r.reserved.saturating_add(n)).await?;
                }
                let hold = Hold {
                    connector: spend.connector.clone(),
                    action: spend.action.clone(),
                    amount: spend.amount.clone(),
                    at: spend.at,
                    counted: true,
                    tokens: ask.tokens,
                };
                tx.execute(
                    "INSERT INTO uapk_budget_holds (origin, request_id, agent, hold, since) VALUES ($1, $2, $3, $4, $5)",
                    &[&&*origin, &ask.id, &spend.agent, &serde_json::to_string(&hold).unwrap_or_default(), &spend.at],
                )
                .await?;
                tx.commit().await?;
                Ok(BudgetCheck::Reserved { reservation: Reservation::new(ask.id, true), threshold })
            })
            .await
    }

    /// See [`crate::limits::Budgets::settle`]. `Forwarded` was kept in the decision's commit;
    /// here it changes nothing. A settlement the database does not take is retried a few times
    /// in the background; one lost to a long outage is finished by
    /// [`PgBudgets::expire_unforwarded`] (a release) or charged the estimate.
    pub(crate) async fn settle(&self, id: &str, settlement: Settlement) {
        if matches!(settlement, Settlement::Forwarded { .. }) {
            // Kept by the decision's own commit (`keep_in`): nothing left to do.
            return;
        }
        // Once now; if the database does not take it, retried in the background, so a refusal
        // answered during an outage is not held back by the retries.
        match self.settle_once(id, &settlement).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "budget settlement failed; retrying in the background");
                let (this, id) = (self.clone(), id.to_string());
                tokio::spawn(async move {
                    for attempt in 0..5u32 {
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        if this.settle_once(&id, &settlement).await.is_ok() {
                            return;
                        }
                    }
                    tracing::error!(request_id = %id, "budget settlement not stored; the fleet's sweep settles it");
                });
            }
        }
    }

    async fn settle_once(&self, id: &str, settlement: &Settlement) -> Result<(), DbError> {
        let origin = self.origin.clone();
        let (id, settlement) = (id.to_string(), settlement.clone());
        self.db
            .call("settle", move |mut c| async move {
                let tx = c.transaction().await?;
                let hold = tx
                    .query_opt(
                        "SELECT agent, hold, forwarded FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2",
                        &[&&*origin, &id],
                    )
                    .await?;
                match settlement {
                    Settlement::Release => {
                        if let Some(row) = hold.filter(|r| !r.get::<_, bool>(2)) {
                            let agent: String = row.get(0);
                            if let Ok(h) = serde_json::from_str::<Hold>(row.get::<_, &str>(1)) {
                                release_in(&tx, &origin, &agent, &h).await?;
                            }
                            tx.execute(
                                "DELETE FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2",
                                &[&&*origin, &id],
                            )
                            .await?;
                        }
                    }
                    Settlement::Forwarded { .. } => {}
                    Settlement::Tokens(t) => {
                        let spend = Spend {
                            agent: t.agent.clone(),
                            connector: t.connector.clone(),
                            action: t.action.clone(),
                            amount: None,
                            at: 0,
                        };
                        lock_agent(&tx, &origin, &spend.agent).await?;
                        if let Some(row) = hold {
                            let agent: String = row.get(0);
                            if let Ok(mut h) = serde_json::from_str::<Hold>(row.get::<_, &str>(1)) {
                                h.counted = h.counted && !row.get::<_, bool>(2);
                                release_in(&tx, &origin, &agent, &h).await?;
                            }
                            tx.execute(
                                "DELETE FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2",
                                &[&&*origin, &id],
                            )
                            .await?;
                        }
                        if t.tokens > 0 {
                            let spend = Spend { at: db_now(&tx).await?, ..spend };
                            let n = t.tokens.min(i64::MAX as u64) as i64;
                            let mut rows = load(&tx, &origin, &spend).await?;
                            change(&tx, &origin, &spend, &mut rows, |r| r.tokens = r.tokens.saturating_add(n)).await?;
                        }
                    }
                }
                Ok(tx.commit().await?)
            })
            .await
    }

    /// Releases the fleet's reservations never forwarded nor released after `max_age` (their
    /// gateway died, or lost them), and charges a forwarded LLM call whose outcome never
    /// settled its estimate after an hour. Returns how many it ended.
    pub(crate) async fn expire_unforwarded(&self, max_age: Duration) -> usize {
        let origin = self.origin.clone();
        let age = max_age.as_secs().max(1) as i64;
        let r = self
            .db
            .call("sweep", move |mut c| async move {
                let now = db_now(&c).await?;
                let stale = c
                    .query(
                        "SELECT request_id, agent, hold, forwarded FROM uapk_budget_holds
                         WHERE origin = $1 AND ((NOT forwarded AND since < $2) OR (forwarded AND since < $3))
                         LIMIT 1000",
                        &[&&*origin, &(now - age), &(now - FORWARDED_TOKENS_MAX_AGE)],
                    )
                    .await?;
                let mut n = 0;
                for row in stale {
                    let (id, agent): (String, String) = (row.get(0), row.get(1));
                    let forwarded: bool = row.get(3);
                    let tx = c.transaction().await?;
                    let still = tx
                        .query_opt(
                            "DELETE FROM uapk_budget_holds WHERE origin = $1 AND request_id = $2 AND forwarded = $3 RETURNING hold",
                            &[&&*origin, &id, &forwarded],
                        )
                        .await?;
                    if let Some(h) = still.and_then(|r| serde_json::from_str::<Hold>(r.get::<_, &str>(0)).ok()) {
                        release_in(&tx, &origin, &agent, &h).await?;
                        if forwarded && let Some(est) = h.tokens {
                            // The call was sent and its usage never settled: charged its estimate.
                            let spend = Spend { at: now, ..h.spend(&agent) };
                            let mut rows = load(&tx, &origin, &spend).await?;
                            let est = est.min(i64::MAX as u64) as i64;
                            change(&tx, &origin, &spend, &mut rows, |r| r.tokens = r.tokens.saturating_add(est)).await?;
                        }
                        n += 1;
                    }
                    tx.commit().await?;
                }
                c.execute(
                    "DELETE FROM uapk_budget_counters WHERE origin = $1 AND start < $2",
                    &[&&*origin, &(now - 2 * 86_400)],
                )
                .await?;
                Ok(n)
            })
            .await;
        match r {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "sweeping the fleet's budget reservations failed");
                0
            }
        }
    }
}

/// Gives back what a hold has counted (its action, if not kept) and reserved (its tokens).
async fn release_in<C: GenericClient>(c: &C, origin: &str, agent: &str, h: &Hold) -> Result<(), CallError> {
    if !h.counted && h.tokens.is_none() {
        return Ok(());
    }
    lock_agent(c, origin, agent).await?;
    let spend = h.spend(agent);
    let mut rows = load(c, origin, &spend).await?;
    if h.counted {
        change(c, origin, &spend, &mut rows, count_action(&spend, -1)).await?;
    }
    if let Some(n) = h.tokens {
        let n = n.min(i64::MAX as u64) as i64;
        change(c, origin, &spend, &mut rows, |r| r.reserved = (r.reserved - n).max(0)).await?;
    }
    Ok(())
}
