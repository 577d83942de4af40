//! Provider accounts as the fleet shares them (`contact_sync.accounts`): registration at
//! start-up (with the replica's row, [`super::replicas`]), throttle pauses a provider asked for,
//! operator pauses, and what `status` and `accounts list` show.
//! The token bucket and the in-flight cap are taken in [`super::claim::claim_within_limits`].

use super::replicas::{upsert_replica, Replica};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;

/// The NOTIFY channel a pause or resume is announced on (payload: the account, followed by a
/// space and the pause in milliseconds for a throttle pause).
pub const CHANNEL: &str = "contact_sync_accounts";

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A transaction that waits at most `ms` for a row lock (an account row a stopped claimer or
/// an operator's open transaction holds): it fails instead, and the caller tries again later.
async fn bounded_tx(
    pool: &PgPool,
    ms: u32,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL lock_timeout = '{ms}ms'"))
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// An operator's reason as stored and shown: printable, at most 200 characters.
fn clean_reason(reason: &str) -> String {
    crate::text::printable(reason.trim(), 200)
}

/// One account as a worker registers it: its provider and its fleet-wide limits.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountLimits {
    pub account: String,
    pub provider: String,
    pub rate_per_second: Option<f64>,
    pub burst: Option<f64>,
    pub max_in_flight: Option<i32>,
}

impl AccountLimits {
    /// Whether claims of this account go through the shared bucket.
    pub fn is_limited(&self) -> bool {
        self.rate_per_second.is_some() || self.max_in_flight.is_some()
    }
}

/// An account's row where another replica's limits differ from this one's (they are the
/// account's, so the last registration wins).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsChanged {
    pub account: String,
    pub before: AccountLimits,
}

/// An account this replica may not serve: its configuration gives it another provider than
/// the one its open jobs, or the live replicas that serve it, were registered with.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConflict {
    pub account: String,
    /// The provider the database knows the account by.
    pub registered: String,
    /// This replica's.
    pub configured: String,
    /// Why the registered provider stands: open jobs of it, or live replicas serving it.
    pub because: String,
}

/// What a registration did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registration {
    pub changed: Vec<LimitsChanged>,
    /// Not registered, not to be served by this replica.
    pub refused: Vec<ProviderConflict>,
}

/// Records this replica and its accounts. Limits are the account's, shared by every replica:
/// this registration sets them, and returns the accounts whose limits were different before.
/// `end_refused`: a worker's start, which may bring corrected credentials, ends the accounts'
/// pauses for refused credentials ([`pause_refused`]).
pub async fn register(
    pool: &PgPool,
    replica: &Replica,
    accounts: &[AccountLimits],
    lease: Duration,
    end_refused: bool,
) -> Result<Registration, sqlx::Error> {
    let mut tx = bounded_tx(pool, 2000).await?;
    upsert_replica(&mut tx, replica, lease).await?;
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    // in name order, as claims lock them: two registrations or a claim never deadlock
    let mut accounts: Vec<&AccountLimits> = accounts.iter().collect();
    accounts.sort_by(|a, b| a.account.cmp(&b.account));
    for a in accounts {
        // the old values, locked, then the new ones; a new bucket starts full
        type Registered = (Option<String>, Option<f64>, Option<f64>, Option<i32>, bool);
        let before: Option<Registered> = sqlx::query_as(
            // language=PostgreSQL
            "SELECT provider, rate_per_second, burst, max_in_flight, paused_by IS NOT DISTINCT FROM 'credentials' FROM contact_sync.accounts WHERE account = $1 FOR UPDATE",
        ).persistent(false)
        .bind(&a.account)
        .fetch_optional(&mut *tx)
        .await?;
        // Another provider's name on the row: this replica's configuration may be the wrong
        // one. It stands down (and serves nothing of the account) while the account has open
        // jobs of the registered provider, or live replicas that serve it; otherwise the
        // account was reconfigured and takes this provider.
        if let Some((Some(registered), ..)) = &before {
            if registered != &a.provider {
                let because: Option<String> = sqlx::query_scalar(
                    // language=PostgreSQL
                    r#"
                    SELECT CASE
                        WHEN EXISTS (SELECT 1 FROM contact_sync.workers w
                                     WHERE $1 = ANY(w.accounts) AND w.expires_at >= now() AND w.id <> $3)
                            THEN 'live workers serve it'
                        WHEN EXISTS (SELECT 1 FROM ONLY contact_sync.jobs j
                                     WHERE j.account = $1 AND j.provider = $2 AND j.state IN ('pending', 'running'))
                            THEN 'it has open ' || $2 || ' jobs'
                        END
                    "#,
                ).persistent(false)
                .bind(&a.account)
                .bind(registered)
                .bind(&replica.id)
                .fetch_one(&mut *tx)
                .await?;
                if let Some(because) = because {
                    refused.push(ProviderConflict {
                        account: a.account.clone(),
                        registered: registered.clone(),
                        configured: a.provider.clone(),
                        because,
                    });
                    continue;
                }
            }
        }
        sqlx::query(
            // language=PostgreSQL
            r#"
            INSERT INTO contact_sync.accounts AS t (account, provider, rate_per_second, burst, max_in_flight, tokens)
            VALUES ($1, $2, $3, $4, $5, coalesce($4, 0))
            ON CONFLICT (account) DO UPDATE
            SET provider = EXCLUDED.provider, rate_per_second = EXCLUDED.rate_per_second,
                burst = EXCLUDED.burst, max_in_flight = EXCLUDED.max_in_flight,
                -- a new bucket starts full; a changed one keeps what is left (a replica
                -- restarting with another burst must not refill it)
                tokens = CASE WHEN t.rate_per_second IS NULL THEN coalesce(EXCLUDED.burst, 0)
                              ELSE least(t.tokens, coalesce(EXCLUDED.burst, t.tokens)) END,
                -- a start may bring corrected credentials: a pause for refused ones ends
                paused_at = CASE WHEN $6 AND t.paused_by = 'credentials' THEN NULL ELSE t.paused_at END,
                pause_reason = CASE WHEN $6 AND t.paused_by = 'credentials' THEN NULL ELSE t.pause_reason END,
                paused_by = CASE WHEN $6 AND t.paused_by = 'credentials' THEN NULL ELSE t.paused_by END,
                updated_at = now()
            "#,
        ).persistent(false)
        .bind(&a.account)
        .bind(&a.provider)
        .bind(a.rate_per_second)
        .bind(a.burst)
        .bind(a.max_in_flight)
        .bind(end_refused)
        .execute(&mut *tx)
        .await?;
        if let (true, Some((_, _, _, _, true))) = (end_refused, &before) {
            // the other workers take the account up again at once
            sqlx::query("SELECT pg_notify('contact_sync_accounts', $1)")
                .persistent(false)
                .bind(&a.account)
                .execute(&mut *tx)
                .await?;
        }
        if let Some((Some(provider), rate, burst, max_in_flight, _)) = before {
            let before = AccountLimits {
                account: a.account.clone(),
                provider,
                rate_per_second: rate,
                burst,
                max_in_flight,
            };
            if before != *a {
                changed.push(LimitsChanged {
                    account: a.account.clone(),
                    before,
                });
            }
        }
    }
    if !refused.is_empty() {
        // the replica does not serve what it stands down from: `workers` and the next
        // registration's "live workers serve it" must not count it
        let names: Vec<&str> = refused.iter().map(|r| r.account.as_str()).collect();
        sqlx::query(
            // language=PostgreSQL
            "UPDATE contact_sync.workers SET accounts = array(SELECT a FROM unnest(accounts) a WHERE a <> ALL($2)) WHERE id = $1",
        ).persistent(false)
        .bind(&replica.id)
        .bind(&names)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Registration { changed, refused })
}

/// Reads a [`CHANNEL`] payload: the account, and for a throttle pause how long it holds.
pub fn parse_announcement(payload: &str) -> (&str, Option<Duration>) {
    match payload.split_once(' ') {
        Some((account, ms)) => (account, ms.parse::<u64>().ok().map(Duration::from_millis)),
        None => (payload, None),
    }
}

/// What a throttle answer did to the account's fleet-wide pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// The account was not paused: this answer paused it.
    Started,
    /// Already paused: the pause now ends later (or stays as it was).
    Extended,
}

/// Pauses `account` for every worker until `until` from now (a provider's throttle answer);
/// a longer pause already in place stays. Announced on [`CHANNEL`].
///
/// One statement, one round trip: the pause's way to the other workers is on the critical
/// path (calls keep going out until it arrives). A claimer holding the account's row ends its
/// transaction within `idle_in_transaction_session_timeout` (5 s) at worst.
pub async fn throttle(
    pool: &PgPool,
    account: &str,
    provider: &str,
    for_: Duration,
    reason: &str,
) -> Result<Throttle, sqlx::Error> {
    let was_paused: bool = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH before AS (
            SELECT throttled_until FROM contact_sync.accounts WHERE account = $1
        ), upsert AS (
            INSERT INTO contact_sync.accounts AS t (account, provider, throttled_until, throttle_reason)
            VALUES ($1, $2, now() + make_interval(secs => $3::bigint / 1000.0), $4)
            ON CONFLICT (account) DO UPDATE
            SET throttled_until = greatest(t.throttled_until, EXCLUDED.throttled_until),
                throttle_reason = CASE WHEN t.throttled_until >= EXCLUDED.throttled_until
                                       THEN t.throttle_reason ELSE EXCLUDED.throttle_reason END,
                updated_at = now()
        ), announced AS (
            -- "account ms": the listeners hold the account back at once, without a query
            SELECT pg_notify('contact_sync_accounts', $1 || ' ' || $3::text)
        )
        SELECT coalesce((SELECT throttled_until > now() FROM before), false) FROM announced
        "#,
    ).persistent(false)
    .bind(account)
    .bind(provider)
    .bind(millis(for_))
    .bind(reason)
    .fetch_one(pool)
    .await?;
    Ok(if was_paused {
        Throttle::Extended
    } else {
        Throttle::Started
    })
}

/// An operator's pause: no worker claims the account's jobs until [`resume`].
pub async fn pause(pool: &PgPool, account: &str, reason: &str) -> Result<(), sqlx::Error> {
    let mut tx = bounded_tx(pool, 5000).await?;
    sqlx::query(
        // language=PostgreSQL
        r#"
        WITH paused AS (
            INSERT INTO contact_sync.accounts AS t (account, paused_at, pause_reason, paused_by)
            VALUES ($1, now(), $2, 'operator')
            ON CONFLICT (account) DO UPDATE
            SET paused_at = coalesce(t.paused_at, now()), pause_reason = $2, paused_by = 'operator',
                updated_at = now()
            RETURNING account
        )
        SELECT pg_notify('contact_sync_accounts', account) FROM paused
        "#,
    )
    .persistent(false)
    .bind(account)
    .bind(clean_reason(reason))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Pauses `account` for every worker because the provider refused its credentials (an
/// operator's pause already in place stays as it is). Returns true if this call paused it.
/// Ended by [`resume`], or by the next worker start ([`register`]), which may bring a
/// corrected configuration.
pub async fn pause_refused(
    pool: &PgPool,
    account: &str,
    provider: &str,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = bounded_tx(pool, 2000).await?;
    let paused: Option<String> = sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH paused AS (
            INSERT INTO contact_sync.accounts AS t (account, provider, paused_at, pause_reason, paused_by)
            VALUES ($1, $2, now(), $3, 'credentials')
            ON CONFLICT (account) DO UPDATE
            SET paused_at = now(), pause_reason = EXCLUDED.pause_reason, paused_by = 'credentials',
                updated_at = now()
            WHERE t.paused_at IS NULL
            RETURNING account
        )
        SELECT p.account FROM paused p, LATERAL (SELECT pg_notify('contact_sync_accounts', p.account)) n
        "#,
    ).persistent(false)
    .bind(account)
    .bind(provider)
    .bind(clean_reason(reason))
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(paused.is_some())
}

/// Ends an operator's pause and any throttle pause, and brings the jobs a throttle answer
/// scheduled for the pause's end back to now. Returns false if it was not paused.
pub async fn resume(pool: &PgPool, account: &str) -> Result<bool, sqlx::Error> {
    let mut tx = bounded_tx(pool, 5000).await?;
    let n = sqlx::query(
        // language=PostgreSQL
        r#"
        WITH resumed AS (
            UPDATE contact_sync.accounts
            SET paused_at = NULL, pause_reason = NULL, paused_by = NULL, throttled_until = NULL,
                throttle_reason = NULL, updated_at = now()
            WHERE account = $1 AND (paused_at IS NOT NULL OR throttled_until > now())
            RETURNING account
        )
        SELECT pg_notify('contact_sync_accounts', account) FROM resumed
        "#,
    )
    .persistent(false)
    .bind(account)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // the jobs waiting out a throttle answer (from the claim's own index)
    sqlx::query(
        // language=PostgreSQL
        r#"
        WITH waiting AS (
            SELECT j.id FROM ONLY contact_sync.jobs j
            WHERE j.account = $1 AND j.state = 'pending' AND j.waits_for IS NULL AND j.run_at > now()
              AND j.errors -> -1 ->> 'kind' IN ('rate_limited', 'account_refused')
            FOR NO KEY UPDATE OF j
        )
        UPDATE ONLY contact_sync.jobs j SET run_at = now()
        FROM waiting w
        WHERE j.id = w.id AND j.state = 'pending'
          AND j.errors -> -1 ->> 'kind' IN ('rate_limited', 'account_refused')
        "#,
    )
    .persistent(false)
    .bind(account)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(n > 0)
}

/// An account as `status`, `accounts list` and `/metrics` show it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct AccountRow {
    pub account: String,
    pub provider: Option<String>,
    pub rate_per_second: Option<f64>,
    pub burst: Option<f64>,
    pub max_in_flight: Option<i32>,
    /// Jobs `running` now.
    pub in_flight: i64,
    /// Set while an operator's pause, or a pause for refused credentials, holds.
    pub paused_at: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
    /// `operator` or `credentials` (the provider refused the account).
    pub paused_by: Option<String>,
    /// Set while a provider's throttle pause holds (in the future).
    pub throttled_until: Option<DateTime<Utc>>,
    pub throttle_reason: Option<String>,
    /// Live replicas that serve it.
    pub workers: i64,
}

impl AccountRow {
    pub fn is_paused(&self) -> bool {
        self.paused_at.is_some() || self.throttled_until.is_some()
    }
}

/// Every known account, with what holds it back now.
pub async fn list(pool: &PgPool) -> Result<Vec<AccountRow>, sqlx::Error> {
    sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT a.account, a.provider, a.rate_per_second, a.burst, a.max_in_flight,
               (SELECT count(*) FROM ONLY contact_sync.jobs j WHERE j.account = a.account AND j.state = 'running') AS in_flight,
               a.paused_at, a.pause_reason, a.paused_by,
               CASE WHEN a.throttled_until > now() THEN a.throttled_until END AS throttled_until,
               CASE WHEN a.throttled_until > now() THEN a.throttle_reason END AS throttle_reason,
               (SELECT count(*) FROM contact_sync.workers w
                WHERE a.account = ANY(w.accounts) AND w.expires_at >= now()) AS workers
        FROM contact_sync.accounts a ORDER BY a.account
        "#,
    ).persistent(false)
    .fetch_all(pool)
    .await
}

/// Every registered account with its provider (what the command line checks names against).
pub async fn providers(pool: &PgPool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        // language=PostgreSQL
        "SELECT account, provider FROM contact_sync.accounts WHERE provider IS NOT NULL",
    )
    .persistent(false)
    .fetch_all(pool)
    .await
}

/// What holds an account back, as the database says.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountHold {
    pub account: String,
    /// Paused for this long from now (`Duration::MAX`: an operator's pause, until resumed).
    pub paused_for: Option<Duration>,
    /// The row carries fleet-wide limits: claims go through the shared budget, whatever this
    /// worker's own configuration says.
    pub limited: bool,
}

/// The pauses and limits of these accounts (accounts without a row are left out).
pub async fn holds(pool: &PgPool, accounts: &[String]) -> Result<Vec<AccountHold>, sqlx::Error> {
    let rows: Vec<(String, bool, Option<i64>, bool)> = sqlx::query_as(
        // language=PostgreSQL
        r#"
        SELECT account, paused_at IS NOT NULL,
               CASE WHEN throttled_until > now()
                    THEN ceil(extract(epoch FROM throttled_until - now()) * 1000)::bigint END,
               rate_per_second IS NOT NULL OR max_in_flight IS NOT NULL
        FROM contact_sync.accounts
        WHERE account = ANY($1)
        "#,
    )
    .persistent(false)
    .bind(accounts)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(account, paused, throttled_ms, limited)| AccountHold {
            account,
            paused_for: if paused {
                Some(Duration::MAX)
            } else {
                throttled_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
            },
            limited,
        })
        .collect())
}

/// Accounts with jobs waiting (pending, due or scheduled) that no live worker serves: a typo in
/// an account name, or a configuration that lacks it. One index probe per account with work
/// (a loose scan of the claim index), at most 100 accounts.
pub async fn unserved(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        // language=PostgreSQL
        r#"
        WITH RECURSIVE waiting(account) AS (
            (SELECT j.account FROM ONLY contact_sync.jobs j
             WHERE j.state = 'pending' AND j.waits_for IS NULL ORDER BY j.account LIMIT 1)
            UNION ALL
            SELECT (SELECT j.account FROM ONLY contact_sync.jobs j
                    WHERE j.state = 'pending' AND j.waits_for IS NULL AND j.account > w.account
                    ORDER BY j.account LIMIT 1)
            FROM waiting w WHERE w.account IS NOT NULL
        )
        SELECT w.account FROM waiting w
        WHERE w.account IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM contact_sync.workers r
                          WHERE w.account = ANY(r.accounts) AND r.expires_at >= now())
        LIMIT 100
        "#,
    )
    .persistent(false)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_carry_the_account_and_a_throttle_pause() {
        assert_eq!(
            parse_announcement("jc_main 1500"),
            ("jc_main", Some(Duration::from_millis(1500)))
        );
        assert_eq!(parse_announcement("jc_main"), ("jc_main", None));
        assert_eq!(parse_announcement("jc_main soon"), ("jc_main", None));
    }
}
