//! Running one round: the workers as real processes (killed, restarted, stopped), the changes
//! enqueued by every path with a ledger of what was accepted, the faults applied on schedule,
//! Postgres restarted, and the drain.

use super::invariants::{
    check_contacts, check_jobs, check_leases, check_sandbox_stats, check_texts, Row, Violations,
};
use super::plan::{
    percent, permanent_text, plan_round, Action, Body, Change, Plan, When, WorkerSpec,
};
use super::{
    replay, Account, ABANDONED_CALL_BOUND, BACKOFF_BASE, BACKOFF_CAP, CHAOS, DRAIN_TIMEOUT,
    HOUSEKEEPING_ACCOUNT, HOUSEKEEPING_BACKLOG, JC2_LOGIN, JC2_SECRET, LEASE, REQUEST_TIMEOUT,
    SL2_GAME, SL2_SECRET, SLOW_REQUEST_TIMEOUT,
};
use crate::helpers::*;
use chrono::Utc;
use contact_sync::outbox::{self, EnqueueError, JobId, NewJob};
use contact_sync::pg::ThrowawayPostgres;
use contact_sync::sandbox::{Fault, FaultRule, Sandbox, SandboxAccounts};
use fastrand::Rng;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub(crate) fn short(text: impl Display) -> String {
    let text = text.to_string();
    const MAX: usize = 160;
    if text.chars().count() <= MAX {
        return text;
    }
    let cut: String = text.chars().take(MAX).collect();
    format!("{cut}…({} chars)", text.chars().count())
}

pub(crate) fn sigkill(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

pub(crate) fn sigterm(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

pub(crate) struct Workers<'a> {
    pub(crate) env: &'a TestEnv,
    pub(crate) config: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) alive: Vec<(String, tokio::process::Child)>,
    pub(crate) next: usize,
    pub(crate) kills: usize,
    /// Process ids of the workers killed with kill -9.
    pub(crate) killed_pids: Vec<u32>,
}

impl Workers<'_> {
    pub(crate) fn spawn(&mut self, spec: WorkerSpec) {
        let name = format!("worker-{}", self.next);
        self.next += 1;
        let out = std::fs::File::create(self.dir.join(format!("{name}.stdout"))).unwrap();
        let err = std::fs::File::create(self.dir.join(format!("{name}.stderr"))).unwrap();
        let child = self
            .env
            .binary(&self.config)
            .arg("run")
            .env("RUST_LOG", "debug,sqlx=warn")
            .env(
                "CONTACT_SYNC__WORKER__MAX_COALESCE",
                spec.max_coalesce.to_string(),
            )
            .env(
                "CONTACT_SYNC__WORKER__CONCURRENCY",
                spec.concurrency.to_string(),
            )
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        self.alive.push((name, child));
    }

    /// kill -9 of one worker, unless it is the last one.
    pub(crate) async fn kill(&mut self, pick: usize) -> bool {
        if self.alive.len() <= 1 {
            return false;
        }
        let (_, mut child) = self.alive.remove(pick % self.alive.len());
        self.killed_pids.extend(child.id());
        sigkill(&child);
        child.wait().await.unwrap();
        self.kills += 1;
        true
    }

    /// SIGTERM to every worker; returns those that did not exit 0 in time.
    pub(crate) async fn stop(&mut self) -> Vec<String> {
        // A process signalled before its first instruction dies of the signal, as any program
        // does; the worker installs its handlers before it reads its configuration, and logs
        // only after that: wait for its first line.
        for (name, _) in &self.alive {
            let log = self.dir.join(format!("{name}.stderr"));
            let until = Instant::now() + Duration::from_secs(10);
            while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0
                && Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for (_, child) in &self.alive {
            sigterm(child);
        }
        let mut bad = Vec::new();
        for (name, mut child) in self.alive.drain(..) {
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(status) => bad.push(format!("{name}: {status:?}")),
                Err(_) => {
                    sigkill(&child);
                    bad.push(format!("{name}: still running 20 s after SIGTERM"));
                }
            }
        }
        bad
    }
}

/// What a round recorded while it enqueued.
pub(crate) struct Ledger {
    /// Accepted job id → (contact, change).
    pub(crate) accepted: BTreeMap<JobId, (usize, usize)>,
    /// (contact, change) → id, for idempotent replays.
    pub(crate) ids: HashMap<(usize, usize), JobId>,
    pub(crate) refused: usize,
    /// Contact → the permanent codes injected for it.
    pub(crate) permanent: HashMap<usize, Vec<i64>>,
    pub(crate) faults: BTreeMap<&'static str, u32>,
    pub(crate) restarts: usize,
    pub(crate) fast_forwarded: u64,
}

pub(crate) async fn enqueue_change(
    pool: &sqlx::PgPool,
    account: Account,
    change: &Change,
) -> Result<JobId, EnqueueError> {
    // each change in its own transaction, at the isolation level the plan drew for it
    let mut tx = pool.begin().await.map_err(EnqueueError::Database)?;
    sqlx::query(&format!(
        "SET TRANSACTION ISOLATION LEVEL {}",
        change.isolation.sql()
    ))
    .execute(&mut *tx)
    .await
    .map_err(EnqueueError::Database)?;
    let id = recorded(&mut tx, account, change).await?;
    tx.commit().await.map_err(EnqueueError::Database)?;
    Ok(id)
}

async fn recorded(
    conn: &mut sqlx::PgConnection,
    account: Account,
    change: &Change,
) -> Result<JobId, EnqueueError> {
    match (&change.body, change.when) {
        (Body::Json(payload), When::Now | When::Later(_)) => {
            outbox::enqueue(conn, &new_job(account, change, payload)).await
        }
        (body, when) => {
            let text = match body {
                Body::Json(v) => v.to_string(),
                Body::Raw(raw) => (*raw).to_string(),
            };
            let run_at = match when {
                When::Text(t) => Some(t),
                _ => None,
            };
            sqlx::query_scalar(
                "SELECT contact_sync.enqueue($1, $2, $3, $4::jsonb, $5, coalesce($6::timestamptz, now()))",
            )
            .bind(account.provider)
            .bind(account.name)
            .bind(&change.email)
            .bind(text)
            .bind(&change.key)
            .bind(run_at)
            .fetch_one(conn)
            .await
            .map_err(EnqueueError::from)
        }
    }
}

pub(crate) fn new_job(account: Account, change: &Change, payload: &Value) -> NewJob {
    let mut job = NewJob::new(
        account.provider,
        account.name,
        &change.email,
        payload.clone(),
    );
    if let Some(key) = &change.key {
        job = job.idempotency_key(key);
    }
    if let When::Later(ms) = change.when {
        job = job.run_at(Utc::now() + chrono::Duration::milliseconds(ms as i64));
    }
    job
}

/// Enqueues one change, retrying keyed ones across a database outage (the key makes a repeat
/// return the first id), and records the outcome.
pub(crate) async fn enqueue_and_record(
    env: &TestEnv,
    plan: &Plan,
    ledger: &mut Ledger,
    v: &mut Violations,
    (ci, chi): (usize, usize),
) {
    let contact = &plan.contacts[ci];
    let change = &contact.changes[chi];
    let mut tries = 0;
    let result = loop {
        let r = enqueue_change(&env.pool, contact.account, change).await;
        match r {
            Err(EnqueueError::Database(_)) if change.key.is_some() && tries < 120 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            r => break r,
        }
    };
    record(plan, ledger, v, (ci, chi), result);
}

pub(crate) fn record(
    plan: &Plan,
    ledger: &mut Ledger,
    v: &mut Violations,
    (ci, chi): (usize, usize),
    result: Result<JobId, EnqueueError>,
) {
    let contact = &plan.contacts[ci];
    let change = &contact.changes[chi];
    let what = format!("change #{chi} {}", short(format!("{:?}", change.body)));
    match (change.refuse, result) {
        (None, Ok(id)) => {
            if let Some(other) = ledger.accepted.insert(id, (ci, chi)) {
                v.add(
                    "e: enqueue",
                    &contact.label(),
                    format!("{what} got id {id}, already the id of {other:?}"),
                );
            }
            ledger.ids.insert((ci, chi), id);
        }
        (None, Err(e)) => v.add(
            "e: valid changes are accepted",
            &contact.label(),
            format!("{what} was refused: {e}"),
        ),
        (Some(expect), Ok(id)) => {
            v.add(
                "e: adversarial changes are refused",
                &contact.label(),
                format!("{what} (expected a refusal naming {expect:?}) was accepted as job {id}"),
            );
        }
        (Some(expect), Err(EnqueueError::Invalid { message, sqlstate })) => {
            ledger.refused += 1;
            if sqlstate != "22023" || !message.contains(expect) {
                v.add(
                    "e: refusals are SQLSTATE 22023 naming the field",
                    &contact.label(),
                    format!("{what}: SQLSTATE {sqlstate}, message {message:?}, expected one naming {expect:?}"),
                );
            }
        }
        (Some(_), Err(e)) => v.add(
            "e: refusals are SQLSTATE 22023 naming the field",
            &contact.label(),
            format!("{what}: not a validation error: {e}"),
        ),
    }
}

pub(crate) async fn count_rows(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE account <> $1")
        .bind(HOUSEKEEPING_ACCOUNT)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// A change that spoils a whole batch (batches are all or nothing), and what its refusal names.
pub(crate) fn poison(rng: &mut Rng) -> (NewJob, &'static str) {
    match rng.u8(..4) {
        0 => (
            NewJob::new("justclick", "jc", "a@b", json!({})),
            "malformed email",
        ),
        1 => {
            let attrs: Map<String, Value> = (0..51).map(|i| (format!("n{i}"), json!(i))).collect();
            (
                NewJob::new(
                    "smartlink",
                    "sl",
                    "poison@example.com",
                    json!({ "attributes": attrs }),
                ),
                "more than 50",
            )
        }
        2 => (
            NewJob::new(
                "justclick",
                "jc2",
                "poison@example.com",
                json!({"lead_nam": 1}),
            ),
            "'lead_nam'",
        ),
        _ => (
            NewJob::new("mailchimp", "jc", "poison@example.com", json!({})),
            "unknown provider",
        ),
    }
}

/// The initial load: batches of valid changes (some poisoned first: refused whole), adversarial
/// changes one by one, then idempotent replays of some keyed changes.
pub(crate) async fn initial_load(
    env: &TestEnv,
    plan: &Plan,
    ledger: &mut Ledger,
    v: &mut Violations,
) {
    let mut rng = Rng::with_seed(plan.seed ^ 0x10ad);
    let mut batch: Vec<(usize, usize)> = Vec::new();
    for &(ci, chi) in &plan.initial {
        let change = &plan.contacts[ci].changes[chi];
        let batchable = change.refuse.is_none()
            && matches!(change.body, Body::Json(_))
            && matches!(change.when, When::Now | When::Later(_));
        if batchable {
            batch.push((ci, chi));
            if batch.len() >= rng.usize(5..40) {
                enqueue_batch(env, plan, ledger, v, &mut rng, std::mem::take(&mut batch)).await;
            }
        } else {
            enqueue_and_record(env, plan, ledger, v, (ci, chi)).await;
        }
    }
    enqueue_batch(env, plan, ledger, v, &mut rng, batch).await;

    // idempotent replays: one by one and as a batch, same ids, no new rows
    let keyed: Vec<((usize, usize), JobId)> = ledger
        .ids
        .iter()
        .filter(|((ci, chi), _)| plan.contacts[*ci].changes[*chi].key.is_some())
        .map(|(k, id)| (*k, *id))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .filter(|_| percent(&mut rng, 15))
        .collect();
    let before = count_rows(env).await;
    let mut conn = env.pool.acquire().await.unwrap();
    let mut jobs = Vec::new();
    for ((ci, chi), id) in &keyed {
        let c = &plan.contacts[*ci];
        let change = &c.changes[*chi];
        let Body::Json(payload) = &change.body else {
            continue;
        };
        let job = new_job(c.account, change, payload);
        if rng.bool() {
            let again = outbox::enqueue(&mut conn, &job).await;
            if again.as_ref().ok() != Some(id) {
                v.add(
                    "e: idempotency keys",
                    &c.label(),
                    format!("replay of job {id} returned {again:?}"),
                );
            }
        } else {
            jobs.push((c.label(), *id, job));
        }
    }
    let batch: Vec<NewJob> = jobs.iter().map(|(_, _, j)| j.clone()).collect();
    match outbox::enqueue_batch(&mut conn, &batch).await {
        Ok(ids) => {
            for ((label, id, _), got) in jobs.iter().zip(ids) {
                if got != *id {
                    v.add(
                        "e: idempotency keys",
                        label,
                        format!("batch replay of job {id} returned {got}"),
                    );
                }
            }
        }
        Err(e) => v.add(
            "e: idempotency keys",
            "(batch)",
            format!("replay batch failed: {e}"),
        ),
    }
    let after = count_rows(env).await;
    if after != before {
        v.add(
            "e: idempotency keys",
            "(all)",
            format!(
                "replaying {} keyed changes added {} rows",
                keyed.len(),
                after - before
            ),
        );
    }
}

pub(crate) async fn enqueue_batch(
    env: &TestEnv,
    plan: &Plan,
    ledger: &mut Ledger,
    v: &mut Violations,
    rng: &mut Rng,
    items: Vec<(usize, usize)>,
) {
    if items.is_empty() {
        return;
    }
    let jobs: Vec<NewJob> = items
        .iter()
        .map(|&(ci, chi)| {
            let c = &plan.contacts[ci];
            let change = &c.changes[chi];
            let Body::Json(payload) = &change.body else {
                unreachable!("only JSON bodies are batched")
            };
            new_job(c.account, change, payload)
        })
        .collect();
    let mut conn = env.pool.acquire().await.unwrap();
    if percent(rng, 20) {
        let (bad, expect) = poison(rng);
        let mut poisoned = jobs.clone();
        poisoned.insert(rng.usize(..=poisoned.len()), bad);
        let before = count_rows(env).await;
        let result = outbox::enqueue_batch(&mut conn, &poisoned).await;
        let after = count_rows(env).await;
        let ok = matches!(&result, Err(EnqueueError::Invalid { message, sqlstate })
            if sqlstate == "22023" && message.contains(expect));
        if !ok || after != before {
            v.add(
                "e: a batch with one bad change is refused whole",
                &plan.contacts[items[0].0].label(),
                format!(
                    "result {:?} (expected 22023 naming {expect:?}), rows {before} -> {after}",
                    result.map(|ids| ids.len())
                ),
            );
        }
    }
    let result = outbox::enqueue_batch(&mut conn, &jobs).await;
    match result {
        Ok(ids) => {
            for (item, id) in items.iter().zip(ids) {
                record(plan, ledger, v, *item, Ok(id));
            }
        }
        Err(e) => {
            v.add(
                "e: valid changes are accepted",
                &plan.contacts[items[0].0].label(),
                format!("a batch of {} valid changes was refused: {e}", items.len()),
            );
            // one by one, to say which change the database refused
            for (ci, chi) in items {
                let c = &plan.contacts[ci];
                let one = enqueue_change(&env.pool, c.account, &c.changes[chi]).await;
                record(plan, ledger, v, (ci, chi), one);
            }
        }
    }
}

pub(crate) async fn wait_for_database(env: &TestEnv, v: &Violations) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if sqlx::query("SELECT 1").execute(&env.pool).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < until,
            "Postgres not reachable 60 s after its restart; {}",
            v.context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn open_jobs(env: &TestEnv) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE state IN ('pending', 'running')",
    )
    .fetch_one(&env.pool)
    .await
    .ok()
}

pub(crate) async fn run_round(seed: u64) {
    let started = Instant::now();
    let plan = plan_round(seed);
    let dir =
        std::env::temp_dir().join(format!("contact-sync-model-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut v = Violations {
        seed,
        logs: dir.clone(),
        items: Vec::new(),
    };
    eprintln!(
        "model round seed {seed}: {} contacts, {} changes ({} live), {} workers, {} actions{}{}; replay: {}",
        plan.contacts.len(),
        plan.contacts.iter().map(|c| c.changes.len()).sum::<usize>(),
        plan.live.len(),
        plan.workers.len(),
        plan.actions.len(),
        if plan.postgres_restarts {
            ", Postgres restarts (own cluster)"
        } else {
            ""
        },
        if plan.slow_calls {
            ", calls slower than the lease and a long retention run"
        } else {
            ""
        },
        replay(seed)
    );

    // Postgres restarts need a cluster of their own: restarting the shared one would cut every
    // other test's connections.
    let pg = if plan.postgres_restarts {
        let pg = tokio::task::spawn_blocking(|| ThrowawayPostgres::start(""))
            .await
            .unwrap()
            .unwrap();
        Some(pg)
    } else {
        None
    };
    let db = match &pg {
        Some(pg) => TestDb::on(&pg.url()).await,
        None => TestDb::new().await,
    };
    let sandbox = Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxAccounts::default()
            .with_justclick(JC_LOGIN, JC_SECRET)
            .with_justclick(JC2_LOGIN, JC2_SECRET)
            .with_smartlink(SL_GAME, SL_SECRET)
            .with_smartlink(SL2_GAME, SL2_SECRET)
            .create_missing_contacts(),
    )
    .await
    .unwrap();
    let mut settings = contact_sync::config::Settings::default();
    settings.worker.concurrency = 8;
    settings.worker.batch_size = 20;
    settings.worker.lease = LEASE;
    settings.worker.poll_interval = Duration::from_millis(100);
    settings.worker.max_attempts = 50;
    settings.worker.backoff_base = BACKOFF_BASE;
    settings.worker.backoff_cap = BACKOFF_CAP;
    settings.worker.shutdown_timeout = Duration::from_secs(5);
    settings.http.request_timeout = if plan.slow_calls {
        SLOW_REQUEST_TIMEOUT
    } else {
        REQUEST_TIMEOUT
    };
    settings.http.abandoned_call_bound = ABANDONED_CALL_BOUND;
    let mut sl2 = smartlink_account(&sandbox, SL2_GAME, SL2_SECRET);
    sl2.double_opt_in = contact_sync::config::DoubleOptIn::Drop;
    settings.accounts.insert(
        "jc".into(),
        justclick_account(&sandbox, JC_LOGIN, JC_SECRET),
    );
    settings.accounts.insert(
        "jc2".into(),
        justclick_account(&sandbox, JC2_LOGIN, JC2_SECRET),
    );
    settings
        .accounts
        .insert("sl".into(), smartlink_account(&sandbox, SL_GAME, SL_SECRET));
    settings.accounts.insert("sl2".into(), sl2);
    let env = TestEnv {
        pool: db.pool.clone(),
        db,
        sandbox,
        settings,
    };
    let config = env.config_file(&(format!(
        "[accounts.jc2]\nprovider = \"justclick\"\nlogin = \"{JC2_LOGIN}\"\nsecret = \"{JC2_SECRET}\"\nbase_url = \"{}\"\n\
         [accounts.sl2]\nprovider = \"smartlink\"\ngame_id = \"{SL2_GAME}\"\nsecret = \"{SL2_SECRET}\"\nbase_url = \"{}\"\ndouble_opt_in = \"drop\"\n{}",
        env.sandbox.justclick_base_url(JC2_LOGIN),
        env.sandbox.smartlink_base_url(),
        if plan.slow_calls {
            "[retention]\nfinished = \"1h\"\n"
        } else {
            ""
        },
    ) + super::app::SOURCES));
    if plan.slow_calls {
        sqlx::query(
            "INSERT INTO contact_sync.jobs (provider, account, email, state, finished_at) \
             SELECT 'justclick', $1, 'old' || g || '@example.com', 'succeeded', now() - interval '1 day' \
             FROM generate_series(1, $2::bigint) g",
        )
        .bind(HOUSEKEEPING_ACCOUNT)
        .bind(HOUSEKEEPING_BACKLOG)
        .execute(&env.pool)
        .await
        .unwrap();
    }

    let mut ledger = Ledger {
        accepted: BTreeMap::new(),
        ids: HashMap::new(),
        refused: 0,
        permanent: HashMap::new(),
        faults: BTreeMap::new(),
        restarts: 0,
        fast_forwarded: 0,
    };
    // the application's own table, captured, written before and while the workers run
    let (app_writes, app_addresses) = super::app::plan_writes(seed, CHAOS * 85 / 100);
    super::app::install(&env, &config, &mut v).await;
    let mut next_app = 0;
    while next_app < app_writes.len() && app_writes[next_app].at.is_zero() {
        super::app::write(&env.pool, &app_writes[next_app], &mut v).await;
        next_app += 1;
    }
    initial_load(&env, &plan, &mut ledger, &mut v).await;

    let mut workers = Workers {
        env: &env,
        config: config.to_path_buf(),
        dir: dir.clone(),
        alive: Vec::new(),
        next: 0,
        kills: 0,
        killed_pids: Vec::new(),
    };
    for spec in &plan.workers {
        workers.spawn(*spec);
    }

    // Chaos: live changes and the fault schedule, on time.
    let chaos_started = Instant::now();
    let mut next_live = 0;
    let mut next_action = 0;
    let mut respawns: Vec<(Duration, WorkerSpec)> = Vec::new();
    loop {
        let t = chaos_started.elapsed();
        while next_live < plan.live.len() && plan.live[next_live].0 <= t {
            let (_, ci, chi) = plan.live[next_live];
            enqueue_and_record(&env, &plan, &mut ledger, &mut v, (ci, chi)).await;
            next_live += 1;
        }
        while next_app < app_writes.len() && app_writes[next_app].at <= t {
            super::app::write(&env.pool, &app_writes[next_app], &mut v).await;
            next_app += 1;
        }
        while next_action < plan.actions.len() && plan.actions[next_action].0 <= t {
            match &plan.actions[next_action].1 {
                Action::Fault(rule) => {
                    let kind = match rule.fault {
                        Fault::Status { .. } => "status",
                        Fault::RateLimit { .. } => "rate_limit",
                        Fault::Stall { .. } => "stall",
                        Fault::Slow { .. } => "slow",
                        Fault::ForgeSignature => "forge_signature",
                        Fault::Unverifiable => "unverifiable",
                        Fault::ErrorCode { .. } => "error_code",
                        Fault::Malformed => "malformed",
                        Fault::Reset => "reset",
                    };
                    *ledger.faults.entry(kind).or_default() += rule.times;
                    env.sandbox.faults().push(rule.clone());
                }
                Action::Permanent { contact, code } => {
                    let c = &plan.contacts[*contact];
                    ledger.permanent.entry(*contact).or_default().push(*code);
                    *ledger.faults.entry("error_code (permanent)").or_default() += 1;
                    env.sandbox.faults().push(
                        FaultRule::new(
                            Fault::ErrorCode {
                                code: *code,
                                text: permanent_text(seed),
                            },
                            1,
                        )
                        .provider(c.account.provider)
                        .account(c.account.remote)
                        .email(&c.email),
                    );
                }
                Action::Kill {
                    pick,
                    respawn_after,
                    spec,
                } => {
                    if workers.kill(*pick).await {
                        respawns.push((t + *respawn_after, *spec));
                    }
                }
                Action::Delay(ms) => env.sandbox.faults().set_delay(Duration::from_millis(*ms)),
                Action::FastForwardDeferrals => {
                    ledger.fast_forwarded += sqlx::query(
                        "UPDATE contact_sync.doi_deferred SET due_at = now() WHERE due_at > now()",
                    )
                    .execute(&env.pool)
                    .await
                    .map_or(0, |done| done.rows_affected());
                }
                Action::RestartPostgres(mode) => {
                    if let Some(pg) = &pg {
                        let mode = *mode;
                        tokio::task::block_in_place(|| pg.restart(mode)).unwrap();
                        ledger.restarts += 1;
                        wait_for_database(&env, &v).await;
                    }
                }
            }
            next_action += 1;
        }
        let now = chaos_started.elapsed();
        let (due, later): (Vec<_>, Vec<_>) = respawns.into_iter().partition(|(at, _)| *at <= now);
        respawns = later;
        for (_, spec) in due {
            workers.spawn(spec);
        }
        if t >= CHAOS
            && next_live == plan.live.len()
            && next_action == plan.actions.len()
            && next_app == app_writes.len()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, spec) in respawns {
        workers.spawn(spec);
    }

    // Drain in peace.
    let leftover_faults = env.sandbox.faults().remaining();
    env.sandbox.faults().clear();
    let drain_started = Instant::now();
    loop {
        if open_jobs(&env).await == Some(0) {
            break;
        }
        if drain_started.elapsed() > DRAIN_TIMEOUT {
            let stuck: Vec<(i64, String, String, i32, Option<String>)> = sqlx::query_as(
                "SELECT id, state, contact_key, attempts, last_error FROM contact_sync.jobs \
                 WHERE state IN ('pending', 'running') ORDER BY id LIMIT 20",
            )
            .fetch_all(&env.pool)
            .await
            .unwrap_or_default();
            workers.stop().await;
            panic!(
                "[a: the queue drains] jobs still pending/running {DRAIN_TIMEOUT:?} after the faults stopped; {}\nfirst ones: {stuck:#?}",
                v.context()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = drain_started.elapsed();
    for failure in workers.stop().await {
        v.add("e: workers exit 0 on SIGTERM", "(none)", failure);
    }

    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, provider, account, email, state, payload, doi, coalesced_into, resend_after, \
                last_error, errors, attempts, \
                (extract(epoch FROM finished_at) * 1000)::float8 AS finished_ms, outcome \
         FROM contact_sync.jobs WHERE account <> $1 ORDER BY id",
    )
    .bind(HOUSEKEEPING_ACCOUNT)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    check_jobs(&plan, &ledger, &rows, &mut v);
    if !plan.postgres_restarts {
        check_leases(&plan, &workers.killed_pids, &rows, &mut v);
    }
    check_contacts(&plan, &env.sandbox, &rows, &mut v);
    super::app::check(&env, &app_addresses, &mut v).await;
    check_sandbox_stats(&env.sandbox, &mut v);
    let log_bytes = check_texts(&dir, &rows, &mut v);

    let stats = env.sandbox.stats();
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dois: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        *states.entry(r.state.as_str()).or_default() += 1;
        if let Some(doi) = &r.doi {
            let kind = doi.split(' ').next().unwrap_or_default().to_string();
            *dois.entry(kind).or_default() += 1;
        }
        if r.resend_after.is_some() {
            *dois.entry(format!("re-send {}", r.state)).or_default() += 1;
        }
        for e in r.errors.as_array().into_iter().flatten() {
            let kind = e.get("kind").and_then(Value::as_str).unwrap_or("?");
            *failures.entry(kind.to_string()).or_default() += 1;
        }
    }
    eprintln!(
        "model round seed {seed}: {:.1?} (drain {drained_in:.1?}); accepted {}, refused {}, rows by state {states:?}, \
         doi {dois:?} ({} deferrals fast-forwarded), failed attempts {failures:?}; faults pushed {:?} \
         ({leftover_faults} left unused), kills {}, Postgres restarts {}; sandbox {stats:?}; \
         {} KiB of worker output checked",
        started.elapsed(),
        ledger.accepted.len(),
        ledger.refused,
        ledger.fast_forwarded,
        ledger.faults,
        workers.kills,
        ledger.restarts,
        log_bytes / 1024,
    );
    v.finish();

    drop(workers);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&config).ok();
    env.pool.close().await;
    drop(env);
    drop(pg);
}
