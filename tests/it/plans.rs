//! Claims cost what the batch costs, not what the table holds: the rows the claim statement
//! reads (EXPLAIN ANALYZE, rolled back) at 5,000 and 100,000 ready jobs, beside 51,000
//! jobs of blocked contacts, with statistics taken on an empty table and with fresh ones.

use crate::helpers::{Scratch, TestDb};
use contact_sync::outbox::claim::CLAIM_SQL;
use serde_json::Value;
use sqlx::{PgPool, Row};

const ACCOUNT: &str = "plan_jc";

/// Rows one claim of 256 reads from tables and indexes (and the jobs it returns), rolled back.
async fn claim_rows(pool: &PgPool) -> (i64, Vec<i64>) {
    let (buffers, ids, _) = claim_plan(pool).await;
    (buffers, ids)
}

/// The parameters of [`CLAIM_SQL`] for one claim of `limit` jobs of [`ACCOUNT`] from `floor`
/// (None: from the start).
fn claim_args(
    limit: i32,
    floor: Option<contact_sync::outbox::claim::Floor>,
) -> sqlx::postgres::PgArguments {
    use sqlx::Arguments;
    let mut args = sqlx::postgres::PgArguments::default();
    args.add(vec![ACCOUNT]).unwrap();
    args.add(vec![limit]).unwrap();
    args.add(30_000i64).unwrap();
    args.add("plan-test").unwrap();
    args.add(5i32).unwrap();
    args.add(16i64).unwrap();
    args.add(false).unwrap();
    args.add(Vec::<String>::new()).unwrap();
    args.add(vec![floor.map(|f| f.0)]).unwrap();
    args.add(vec![floor.map(|f| f.1)]).unwrap();
    args
}

/// Rows read, claimed ids and the plan (for failure messages).
async fn claim_plan(pool: &PgPool) -> (i64, Vec<i64>, String) {
    let mut tx = pool.begin().await.unwrap();
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CLAIM_SQL}");
    let plan: sqlx::types::Json<Value> = sqlx::query_scalar_with(&explain, claim_args(256, None))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let ids: Vec<i64> = sqlx::query_with(CLAIM_SQL, claim_args(256, None))
        .fetch_all(&mut *tx)
        .await
        .unwrap()
        .iter()
        .filter_map(|row| row.get::<Option<i64>, _>("id"))
        .collect();
    tx.rollback().await.unwrap();
    (
        rows_read(&plan.0[0]["Plan"]),
        ids,
        serde_json::to_string_pretty(&plan.0).unwrap_or_default(),
    )
}

/// Rows every scan node of a plan read: rows it returned plus rows it removed by filters and
/// rechecks, times its loops. (Not buffers: the rolled-back probes leave dead versions behind
/// that make later probes touch more pages without reading more rows.)
fn rows_read(node: &Value) -> i64 {
    let n = |k: &str| node[k].as_f64().unwrap_or(0.0);
    let own = if node.get("Relation Name").is_some() || node.get("Index Name").is_some() {
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops").max(1.0)
    } else {
        0.0
    };
    let children: i64 = node["Plans"]
        .as_array()
        .map(|plans| plans.iter().map(rows_read).sum())
        .unwrap_or(0);
    own.round() as i64 + children
}

async fn analyze(pool: &PgPool) {
    sqlx::query("ANALYZE contact_sync.jobs")
        .execute(pool)
        .await
        .unwrap();
}

/// `contacts` contacts, each with a head scheduled an hour later and `depth` changes behind it.
async fn blocked_contacts(pool: &PgPool, prefix: &str, contacts: i64, depth: i64) {
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, run_at)
         SELECT 'justclick', $1, $2 || c || '@example.com', '{}', now() + interval '1 hour'
         FROM generate_series(1, $3::bigint) c",
    )
    .bind(ACCOUNT)
    .bind(prefix)
    .bind(contacts)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload)
         SELECT 'justclick', $1, $2 || c || '@example.com', jsonb_build_object('lead_name', 'B' || d)
         FROM generate_series(1, $3::bigint) c, generate_series(1, $4::bigint) d",
    )
    .bind(ACCOUNT)
    .bind(prefix)
    .bind(contacts)
    .bind(depth)
    .execute(pool)
    .await
    .unwrap();
}

async fn ready(pool: &PgPool, from: i64, to: i64) {
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload)
         SELECT 'justclick', $1, 'ready' || g || '@example.com', '{\"lead_name\": \"R\"}'
         FROM generate_series($2::bigint, $3::bigint) g",
    )
    .bind(ACCOUNT)
    .bind(from)
    .bind(to)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_claim_costs_the_batch_not_the_backlog() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    // statistics of an empty table: the planner believes nothing is pending
    analyze(pool).await;
    ready(pool, 1, 5_000).await;
    let (small, ids) = claim_rows(pool).await;
    assert_eq!(ids.len(), 256);

    ready(pool, 5_001, 100_000).await;
    let (large, ids) = claim_rows(pool).await;
    assert_eq!(ids.len(), 256);

    // 1,000 contacts behind a head scheduled an hour later, 50 changes each
    blocked_contacts(pool, "blocked", 1000, 50).await;
    let (blocked, ids) = claim_rows(pool).await;
    assert_eq!(ids.len(), 256);
    let from_blocked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE id = ANY($1) AND email LIKE 'blocked%'",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(from_blocked, 0, "a blocked contact's job was claimed");

    analyze(pool).await;
    let (fresh, _, fresh_plan) = claim_plan(pool).await;
    if std::env::var("PLAN_DEBUG").is_ok() {
        eprintln!("{fresh_plan}");
    }

    // The same batch touches about the same pages whatever lies behind it (a little more for
    // deeper indexes); a probe per backlog row would be thousands.
    let bound = small * 3 / 2 + 100;
    for (name, buffers) in [
        ("100,000", large),
        ("blocked", blocked),
        ("fresh statistics", fresh),
    ] {
        assert!(
            buffers <= bound,
            "{name}: the claim touched {buffers} buffers, {small} at 5,000 jobs"
        );
    }
}

#[tokio::test]
async fn the_drain_probe_and_next_due_read_only_ready_contacts() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    // only blocked contacts: nothing is runnable, and finding that out is cheap
    blocked_contacts(pool, "b", 2000, 20).await;
    let accounts = vec![ACCOUNT.to_string()];
    // the claims find the changes behind the heads and set each waiting once
    let mut claims = 0;
    while contact_sync::outbox::claim::runnable_exists(pool, &accounts)
        .await
        .unwrap()
    {
        assert_eq!(claim_committed(pool).await, 0);
        claims += 1;
        assert!(
            claims <= 40,
            "40,000 changes not set waiting after {claims} claims"
        );
    }
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs j JOIN contact_sync.jobs h ON h.id = j.waits_for
         WHERE j.state = 'pending' AND h.contact_key = j.contact_key AND h.id < j.id AND h.run_at > now()",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        waiting, 40_000,
        "each change waits behind its contact's head"
    );
    assert!(
        !contact_sync::outbox::claim::runnable_exists(pool, &accounts)
            .await
            .unwrap()
    );
    let due = contact_sync::outbox::claim::next_due_in(pool, &accounts)
        .await
        .unwrap()
        .unwrap();
    assert!(due > std::time::Duration::from_secs(3500), "{due:?}");
    let (rows, ids, plan) = claim_plan(pool).await;
    assert!(ids.is_empty());
    assert!(rows < 10, "an empty claim read {rows} rows: {plan}");
}

/// Pages of the ready index one claim of 256 reads from `floor` (rolled back).
async fn ready_index_pages(
    pool: &PgPool,
    floor: Option<contact_sync::outbox::claim::Floor>,
) -> (i64, Vec<i64>) {
    let mut tx = pool.begin().await.unwrap();
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CLAIM_SQL}");
    let plan: sqlx::types::Json<Value> = sqlx::query_scalar_with(&explain, claim_args(256, floor))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    fn find(node: &Value, out: &mut Vec<i64>) {
        if node["Index Name"] == "jobs_ready_idx" {
            let n = |k: &str| node[k].as_i64().unwrap_or(0);
            out.push(n("Shared Hit Blocks") + n("Shared Read Blocks"));
        }
        for child in node["Plans"].as_array().into_iter().flatten() {
            find(child, out);
        }
    }
    let mut pages = Vec::new();
    find(&plan.0[0]["Plan"], &mut pages);
    (pages.iter().sum(), pages)
}

/// Regression: every claim read the ready index from its start, where each job claimed since
/// the last vacuum leaves an entry, dead: 10 ms a claim after 250,000 jobs, more than doubling
/// the database's time per job over a 1,000,000-job drain. A claim starts where the last one
/// stopped ([`contact_sync::outbox::claim::ReadyFloors`]), also among jobs queued by one
/// statement (one `run_at`, as a captured bulk `UPDATE` queues them).
#[tokio::test]
async fn a_claim_reads_the_ready_index_from_where_the_last_one_stopped() {
    use contact_sync::outbox::claim::ReadyFloors;
    let db = TestDb::new().await;
    let pool = &db.pool;
    sqlx::query("ALTER TABLE contact_sync.jobs SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .unwrap();
    // queued a minute ago by one statement (older than the floors' slack)
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, run_at)
         SELECT 'justclick', $1, 'r' || g || '@example.com', '{}', now() - interval '1 minute'
         FROM generate_series(1, 60000) g",
    )
    .bind(ACCOUNT)
    .execute(pool)
    .await
    .unwrap();
    // the first 50,000 delivered since the last vacuum
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'succeeded', finished_at = now()
         WHERE id < (SELECT min(id) + 50000 FROM contact_sync.jobs)",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut floors = ReadyFloors::default();
    let first = claim_committed_from(pool, &mut floors).await;
    assert_eq!(first.len(), 256);
    let floor = floors.floor(ACCOUNT);
    let last = first.iter().map(|j| j.id).max().unwrap();
    assert_eq!(floor.map(|f| f.1), Some(last), "{floor:?}");

    let from_start = ready_index_pages(pool, None).await;
    let from_floor = ready_index_pages(pool, floor).await;
    assert!(
        from_start.0 > 150 && from_floor.0 < 20,
        "pages of the ready index read from the start {from_start:?}, from the floor {from_floor:?}"
    );
    // the next claim goes on in order after the first
    let next = claim_committed_from(pool, &mut floors).await;
    let mut ids: Vec<i64> = next.iter().map(|j| j.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, ((last + 1)..=(last + 256)).collect::<Vec<_>>());
}

/// One claim of up to 256 jobs, committed (its passes set waiting what they find blocked); returns how
/// many it claimed.
async fn claim_committed(pool: &PgPool) -> usize {
    claim_committed_from(pool, &mut Default::default())
        .await
        .len()
}

/// One claim of up to 256 jobs, committed, starting from these floors (which it moves); returns
/// the jobs it claimed.
async fn claim_committed_from(
    pool: &PgPool,
    floors: &mut contact_sync::outbox::claim::ReadyFloors,
) -> Vec<contact_sync::outbox::ClaimedJob> {
    use contact_sync::outbox::claim::{claim, AccountQuota, ClaimOptions};
    let quotas = [AccountQuota {
        account: ACCOUNT.into(),
        limit: 256,
    }];
    let options = ClaimOptions {
        lease: std::time::Duration::from_secs(30),
        worker_id: "plan-test",
        default_max_attempts: 5,
        max_followers: 1,
        captured: &[],
    };
    claim(pool, &quotas, &options, floors).await.unwrap().jobs
}

/// Waiting changes come back, one at a time and in order, after every way the call they wait
/// for can end, hand-written SQL included (`claim::requeue_stale_waits`, the workers' sweep):
/// the head cancelled or deleted by hand, the next one rescheduled or moved to another address,
/// a running job put back to pending above one waiting for it, and a waiting job moved away.
#[tokio::test]
async fn waiting_changes_come_back_after_hand_written_changes() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let ids = one_contact(pool, "h@example.com", 4).await;
    let waiting = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM contact_sync.jobs WHERE waits_for IS NOT NULL AND state = 'pending' ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let sweep = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            let step = contact_sync::outbox::claim::requeue_stale_waits(&pool, "", 1000)
                .await
                .unwrap();
            assert_eq!(step.next, None, "one step covers one contact");
            step.requeued
        }
    };
    // the head is claimed, the three behind it set waiting
    assert_eq!(claim_committed(pool).await, 1);
    assert_eq!(waiting(pool).await, ids[1..].to_vec());
    assert_eq!(claim_committed(pool).await, 0);
    assert_eq!(
        sweep(pool).await,
        0,
        "nothing to bring back while the call is in flight"
    );
    // the head cancelled by hand: the next one comes back, the others wait on
    on_job(
        pool,
        "UPDATE contact_sync.jobs SET state = 'cancelled', finished_at = now() WHERE id = $1",
        ids[0],
    )
    .await;
    assert_eq!(sweep(pool).await, 1);
    assert_eq!(waiting(pool).await, ids[2..].to_vec());
    assert_eq!(claim_committed(pool).await, 1);
    // that one deleted by hand
    on_job(pool, "DELETE FROM contact_sync.jobs WHERE id = $1", ids[1]).await;
    assert_eq!(sweep(pool).await, 1);
    assert_eq!(waiting(pool).await, vec![ids[3]]);
    // rescheduled by hand: the contact waits for it
    on_job(
        pool,
        "UPDATE contact_sync.jobs SET run_at = now() + interval '1 hour' WHERE id = $1",
        ids[2],
    )
    .await;
    assert_eq!(claim_committed(pool).await, 0);
    assert_eq!(sweep(pool).await, 0);
    assert_eq!(waiting(pool).await, vec![ids[3]]);
    let (rows, claimed, _) = claim_plan(pool).await;
    assert!(claimed.is_empty(), "{claimed:?}");
    assert!(rows < 10);
    // its address edited by hand: it leaves the contact, whose next change comes back
    on_job(
        pool,
        "UPDATE contact_sync.jobs SET email = 'moved@example.com' WHERE id = $1",
        ids[2],
    )
    .await;
    assert_eq!(sweep(pool).await, 1);
    let (_, claimed, _) = claim_plan(pool).await;
    assert_eq!(claimed, vec![ids[3]]);
    // a running job put back to pending by hand, above one set waiting behind it: the lower
    // one comes back and goes first
    assert_eq!(claim_committed(pool).await, 1);
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'pending', finished_at = NULL, waits_for = $1 WHERE id = $2",
    )
    .bind(ids[3])
    .bind(ids[0])
    .execute(pool)
    .await
    .unwrap();
    on_job(
        pool,
        "UPDATE contact_sync.jobs SET state = 'pending', locked_by = NULL WHERE id = $1",
        ids[3],
    )
    .await;
    assert_eq!(sweep(pool).await, 1);
    assert_eq!(claim_committed(pool).await, 1);
    let running: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM contact_sync.jobs WHERE state = 'running' ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(running, vec![ids[0]], "the lower change goes first");
    assert_eq!(waiting(pool).await, vec![ids[3]]);
    // a waiting job moved to another address stops waiting for this contact's call
    on_job(
        pool,
        "UPDATE contact_sync.jobs SET email = 'elsewhere@example.com' WHERE id = $1",
        ids[3],
    )
    .await;
    assert!(waiting(pool).await.is_empty());
    assert_eq!(claim_committed(pool).await, 1);
}

/// The sweep looks at a bounded number of contacts per step, whatever the statistics say:
/// 3,000 contacts with waiting jobs behind heads due tomorrow, statistics taken while the
/// waiting index was empty; a step of 1,000 reads rows in proportion to its budget, and three
/// steps and a last one cover them all.
#[tokio::test]
async fn the_sweep_costs_its_budget_not_the_waiting_jobs() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    blocked_contacts(pool, "w", 3000, 4).await;
    analyze(pool).await;
    let accounts = vec![ACCOUNT.to_string()];
    while contact_sync::outbox::claim::runnable_exists(pool, &accounts)
        .await
        .unwrap()
    {
        assert_eq!(claim_committed(pool).await, 0);
    }
    let mut after = String::new();
    let mut steps = 0;
    loop {
        let started = std::time::Instant::now();
        let step = contact_sync::outbox::claim::requeue_stale_waits(pool, &after, 1000)
            .await
            .unwrap();
        let (n, next) = (step.requeued, step.next);
        assert_eq!(n, 0, "every contact's head is due tomorrow");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "a step of 1,000 contacts took {:?}",
            started.elapsed()
        );
        steps += 1;
        match next {
            Some(key) => after = key,
            None => break,
        }
    }
    assert_eq!(steps, 4);
    // the rows one step reads, with the statistics of an empty waiting index
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: sqlx::types::Json<Value> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {}",
        contact_sync::outbox::claim::REQUEUE_STALE_WAITS_SQL
    ))
    .bind("")
    .bind(1000i64)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let read = rows_read(&plan.0[0]["Plan"]);
    if std::env::var("PLAN_DEBUG").is_ok() {
        eprintln!("{}", serde_json::to_string(&plan.0).unwrap_or_default());
    }
    assert!(
        read <= 6 * 1000 + 100,
        "a step of 1,000 contacts read {read} rows"
    );
}

/// Runs one hand-written statement on one job (`$1`).
async fn on_job(pool: &PgPool, sql: &str, id: i64) {
    sqlx::query(sql).bind(id).execute(pool).await.unwrap();
}

async fn one_contact(pool: &PgPool, email: &str, n: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload)
         SELECT 'justclick', $1, $2, jsonb_build_object('lead_name', 'N' || g)
         FROM generate_series(1, $3::bigint) g ORDER BY g RETURNING id",
    )
    .bind(ACCOUNT)
    .bind(email)
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Found by the adversarial review: an operator's change under REPEATABLE READ computed the
/// contact's next head from its old snapshot and deleted the row under a newer job.
#[tokio::test]
async fn a_change_under_repeatable_read_strands_nothing() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    let first = one_contact(pool, "rr@example.com", 1).await;
    let mut op = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *op)
        .await
        .unwrap();
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&mut *op)
        .await
        .unwrap();
    // committed after the operator's snapshot
    let second = one_contact(pool, "rr@example.com", 1).await;
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'cancelled', finished_at = now() WHERE id = $1",
    )
    .bind(first[0])
    .execute(&mut *op)
    .await
    .unwrap();
    op.commit().await.unwrap();
    contact_sync::outbox::claim::requeue_stale_waits(pool, "", 1000)
        .await
        .unwrap();
    let (_, claimed, _) = claim_plan(pool).await;
    assert_eq!(claimed, second);
}

/// Found by an adversarial review of the earlier design: a completion waited for an operator's
/// open transaction (which held the contact's queue row through a trigger).
#[tokio::test]
async fn workers_never_wait_for_an_open_transaction() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    // x: one job running, one pending; an operator's open transaction reschedules the pending
    // one (and so holds x's queue row) while the running one finishes
    let x = one_contact(pool, "x@example.com", 2).await;
    sqlx::query("UPDATE contact_sync.jobs SET state = 'running', attempts = 1, locked_until = now() + interval '1 minute' WHERE id = $1")
        .bind(x[0])
        .execute(pool)
        .await
        .unwrap();
    let mut op = pool.begin().await.unwrap();
    sqlx::query("UPDATE contact_sync.jobs SET run_at = now() WHERE id = $1")
        .bind(x[1])
        .execute(&mut *op)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut worker = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL statement_timeout = '5s'")
        .execute(&mut *worker)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'succeeded', finished_at = now() WHERE id = $1",
    )
    .bind(x[0])
    .execute(&mut *worker)
    .await
    .unwrap();
    worker.commit().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    op.commit().await.unwrap();
    contact_sync::outbox::claim::requeue_stale_waits(pool, "", 1000)
        .await
        .unwrap();
    let (_, claimed, _) = claim_plan(pool).await;
    assert!(
        claimed.contains(&x[1]),
        "the contact's next job is ready once the row is free: {claimed:?}"
    );
}

/// `psql` of the installed server (the one the throwaway clusters run), or the one on PATH.
fn psql() -> std::path::PathBuf {
    contact_sync::pg::bin_dir().map_or_else(|| "psql".into(), |dir| dir.join("psql"))
}

/// Regression: completing a batch compared every finished contact with every locked one (a
/// semi-join the planner ran as a nested loop inside a trigger of the earlier design): 368
/// completions compared 67,528 pairs. Every plan a completion runs, nested statements included
/// (auto_explain, sent to this session as notices), compares rows in proportion to the batch.
#[tokio::test]
async fn completing_a_batch_compares_rows_in_proportion_to_it() {
    let db = TestDb::new().await;
    // completions of PER_STATEMENT jobs, STATEMENTS times in one session: PL/pgSQL switches to
    // a generic plan after five runs, and that is the plan a worker's session keeps
    const PER_STATEMENT: i64 = 200;
    const STATEMENTS: i64 = 8;
    ready(&db.pool, 1, PER_STATEMENT * STATEMENTS).await;
    let claimed: Vec<i64> = sqlx::query_with(
        CLAIM_SQL,
        claim_args((PER_STATEMENT * STATEMENTS) as i32, None),
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .iter()
    .filter_map(|row| row.get::<Option<i64>, _>("id"))
    .collect();
    assert_eq!(claimed.len(), (PER_STATEMENT * STATEMENTS) as usize);
    let mut script = String::new();
    for chunk in claimed.chunks(PER_STATEMENT as usize) {
        let ids: Vec<String> = chunk.iter().map(i64::to_string).collect();
        script.push_str(&format!(
            "UPDATE contact_sync.jobs SET state = 'succeeded', finished_at = now(), locked_until = NULL
             WHERE id IN ({}) AND state = 'running';\n",
            ids.join(",")
        ));
    }
    let notices = explained(&db.url, &script).await;
    assert!(notices.contains("Update on jobs"), "no plans: {notices}");
    let compared: Vec<i64> = notices
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Rows Removed by Join Filter: "))
        .map(|n| n.trim().parse().unwrap())
        .collect();
    assert!(
        compared.iter().all(|&n| n <= 2 * PER_STATEMENT),
        "a join compared {compared:?} rows for {PER_STATEMENT} completions:\n{notices}"
    );
}

/// Runs `script` in one psql session with every plan, nested statements included, sent back
/// as notices (auto_explain with row counts, no timing); returns them.
async fn explained(url: &str, script: &str) -> String {
    let script = format!(
        "LOAD 'auto_explain';
         SET auto_explain.log_min_duration = 0;
         SET auto_explain.log_analyze = on;
         SET auto_explain.log_timing = off;
         SET auto_explain.log_nested_statements = on;
         SET auto_explain.log_level = notice;\n{script}"
    );
    let file = Scratch::file("contact-sync-plans", ".sql", script);
    let out = tokio::process::Command::new(psql())
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    drop(file);
    let notices = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{notices}");
    notices
}

/// Rows × loops of every plan node in `notices` (auto_explain's ANALYZE output): the work a
/// node did, counted in rows.
fn node_work(notices: &str) -> Vec<(i64, String)> {
    notices
        .lines()
        .filter_map(|line| {
            let at = line.find("(actual rows=")?;
            let tail = &line[at + "(actual rows=".len()..];
            let rows: i64 = tail.split_whitespace().next()?.parse().ok()?;
            let loops: i64 = tail
                .split("loops=")
                .nth(1)?
                .trim_end_matches(')')
                .trim()
                .parse()
                .ok()?;
            Some((rows * loops, line.trim().to_string()))
        })
        .collect()
}

/// Regression: statements over many contacts tested set membership with `IN (SELECT unnest(..))`
/// and `NOT IN (..)`, which PostgreSQL hashes only while the set fits `work_mem` and otherwise
/// rescans for every row: `cancel --state pending` took 0.85 s at 20,000 contacts and did not
/// finish in 200 s at 200,000. With `work_mem` at its minimum, so that no set fits, a bulk
/// reschedule and a bulk cancel by hand over N contacts do
/// work in proportion to N in every plan node, nested statements included.
#[tokio::test]
async fn bulk_statements_over_many_contacts_cost_in_proportion_to_them() {
    let db = TestDb::new().await;
    const CONTACTS: i64 = 4_000;
    ready(&db.pool, 1, CONTACTS).await;
    analyze(&db.pool).await;
    let notices = explained(
        &db.url,
        "SET work_mem = '64kB';
         UPDATE contact_sync.jobs SET run_at = now() + interval '1 hour' WHERE state = 'pending';
         UPDATE contact_sync.jobs SET state = 'cancelled', finished_at = now() WHERE state = 'pending';\n",
    )
    .await;
    assert!(notices.contains("Update on jobs"), "no plans: {notices}");
    let worst = node_work(&notices).into_iter().max().unwrap();
    assert!(
        worst.0 <= 4 * CONTACTS,
        "a plan node did {} rows of work for {CONTACTS} contacts: {}\n{notices}",
        worst.0,
        worst.1
    );
    let cancelled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE state = 'cancelled'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(cancelled, CONTACTS);
}

/// The insert trigger keeps one plan per statement and session, whatever it was made for: made
/// at one-row inserts while the accounts table was empty (as a new installation's first
/// `enqueue()` calls make them), its plans still do work in proportion to the rows of a bulk
/// insert among 200 accounts, in every plan node. (Its account check joined the accounts
/// table: planned for an empty one, it read every account for every row.)
#[tokio::test]
async fn the_insert_trigger_plans_made_for_one_row_hold_for_many() {
    let db = TestDb::new().await;
    const ROWS: i64 = 4_000;
    const ACCOUNTS: i64 = 200;
    sqlx::query("ANALYZE contact_sync.accounts")
        .execute(&db.pool)
        .await
        .unwrap();
    let notices = explained(
        &db.url,
        &format!(
            "SELECT contact_sync.enqueue('justclick', 'a0', 'one@example.com');
             SELECT contact_sync.enqueue('smartlink', 'a1', 'two@example.com');
             INSERT INTO contact_sync.jobs (provider, account, email)
             VALUES ('justclick', 'a0', 'three@example.com'), ('smartlink', 'a1', 'four@example.com');
             INSERT INTO contact_sync.accounts (account, provider)
             SELECT 'a' || i, CASE WHEN i % 2 = 0 THEN 'justclick' ELSE 'smartlink' END
             FROM generate_series(0, {ACCOUNTS} - 1) i;
             INSERT INTO contact_sync.jobs (provider, account, email, payload)
             SELECT CASE WHEN i % 2 = 0 THEN 'justclick' ELSE 'smartlink' END, 'a' || (i % {ACCOUNTS}),
                    'u' || i || '@example.com', '{{}}'
             FROM generate_series(1, {ROWS}) i;
             INSERT INTO contact_sync.jobs (provider, account, email, payload)
             SELECT 'justclick', 'a' || (2 * (i % ({ACCOUNTS} / 2))), 'v' || i || '@example.com', '{{}}'
             FROM generate_series(1, {ROWS}) i;\n"
        ),
    )
    .await;
    assert!(notices.contains("new_jobs"), "no plans: {notices}");
    let worst = node_work(&notices).into_iter().max().unwrap();
    assert!(
        worst.0 <= 2 * ROWS,
        "a plan node did {} rows of work for {ROWS} rows: {}\n{notices}",
        worst.0,
        worst.1
    );
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 4 + 2 * ROWS);
    // and the check still refuses a row of the wrong provider among them
    let err = sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email)
         SELECT 'justclick', 'a' || i, 'w' || i || '@example.com' FROM generate_series(0, 9) i",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("account 'a1' is a smartlink account, not justclick"),
        "{err}"
    );
}

/// What the triggers read of the accounts table is what the statement names, by key, whatever
/// the session's plans were made for: a one-row insert among 20,000 accounts reads one account,
/// an insert of nothing reads none, and moving jobs to another account probes it by its key,
/// after plans made while the table held three accounts.
#[tokio::test]
async fn the_triggers_read_the_accounts_a_statement_names_by_key() {
    let db = TestDb::new().await;
    let session = db.another_pool().await;
    sqlx::query(
        "INSERT INTO contact_sync.accounts (account, provider)
         VALUES ('jc1', 'justclick'), ('jc2', 'justclick'), ('sl1', 'smartlink')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE contact_sync.accounts")
        .execute(&db.pool)
        .await
        .unwrap();
    // the session's plans, made on a three-row accounts table
    for i in 0..8 {
        sqlx::query(&format!(
            "SELECT contact_sync.enqueue('justclick', 'jc1', 'p{i}@example.com')"
        ))
        .execute(&session)
        .await
        .unwrap();
        sqlx::query(&format!(
            "UPDATE contact_sync.jobs SET account = 'jc{}' WHERE email = 'p{i}@example.com'",
            1 + (i % 2)
        ))
        .execute(&session)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO contact_sync.accounts (account, provider)
         SELECT 'x' || i, 'smartlink' FROM generate_series(1, 20000) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let read = || async {
        flush_stats(&[&session]).await;
        table_reads(&db.pool, "accounts").await
    };
    let before = read().await;
    for i in 0..20 {
        sqlx::query(&format!(
            "SELECT contact_sync.enqueue('justclick', 'jc1', 'q{i}@example.com')"
        ))
        .execute(&session)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email)
         SELECT 'justclick', 'jc1', 'none@example.com' WHERE false",
    )
    .execute(&session)
    .await
    .unwrap();
    let moved = sqlx::query("UPDATE contact_sync.jobs SET account = 'jc2' WHERE account = 'jc1'")
        .execute(&session)
        .await
        .unwrap()
        .rows_affected();
    assert!(moved >= 20, "{moved}");
    let after = read().await;
    let (seq, fetched) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(
        seq, 0,
        "the triggers read the accounts table through sequential scans"
    );
    assert!(
        fetched <= 20 + moved as i64 + 5,
        "20 one-row inserts and {moved} moved jobs fetched {fetched} accounts"
    );
}

/// `enqueue()` looks a repeated idempotency key up through its index, whatever the queue held
/// when the session first called it: a plan kept from a small queue read the whole table for
/// each repeated key once a backlog had arrived.
#[tokio::test]
async fn a_repeated_idempotency_key_is_looked_up_through_its_index() {
    let db = TestDb::new().await;
    let session = db.another_pool().await;
    analyze(&db.pool).await;
    for _ in 0..20 {
        sqlx::query("SELECT contact_sync.enqueue('justclick', 'jc', 'a@example.com', '{}', 'k-1')")
            .execute(&session)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, idempotency_key)
         SELECT 'justclick', 'jc', 'u' || i || '@example.com', 'bulk-' || i
         FROM generate_series(1, 20000) i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before = seq_rows_read(&db.pool, &[&session]).await;
    for i in 0..20 {
        let id: i64 = sqlx::query_scalar(&format!(
            "SELECT contact_sync.enqueue('justclick', 'jc', 'a@example.com', '{{}}', 'bulk-{}')",
            1 + i * 997
        ))
        .fetch_one(&session)
        .await
        .unwrap();
        assert!(id > 1, "the existing job's id");
    }
    let read = seq_rows_read(&db.pool, &[&session]).await - before;
    assert!(
        read < 1_000,
        "20 repeated keys read {read} rows of the queue through sequential scans"
    );
}

/// The insert trigger's check that a new job's id is not a delivered job's reads a few pages of
/// `jobs_delivered_pkey`, however many entries deleted delivered jobs left at its top (a purge,
/// or retention that deleted them all, before a vacuum). It read the newest id with `max(id)`,
/// which walked every such entry in every insert: about 6 ms a one-row enqueue after a million.
#[tokio::test]
async fn an_insert_reads_no_entries_of_deleted_delivered_jobs() {
    let db = TestDb::new().await;
    let session = one_session(&db);
    for sql in [
        "ALTER TABLE contact_sync.jobs_delivered SET (autovacuum_enabled = off)",
        "INSERT INTO contact_sync.jobs_delivered (id, provider, account, email, state, finished_at)
         SELECT i, 'justclick', 'jc', 'u' || i || '@example.com', 'succeeded', now()
         FROM generate_series(1, 200000) i",
        "SELECT setval('contact_sync.jobs_id_seq', 200000)",
        "DELETE FROM contact_sync.jobs_delivered",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    // the first scans mark the dead entries as such; what is measured is what every insert
    // after them reads
    sqlx::query("SELECT count(*) FROM contact_sync.jobs_delivered WHERE id > 0")
        .execute(&db.pool)
        .await
        .unwrap();
    let pages = |pool: PgPool| async move {
        flush_stats(&[&pool]).await;
        let n: i64 = sqlx::query_scalar(
            "SELECT coalesce(idx_blks_hit + idx_blks_read, 0)::bigint FROM pg_statio_user_indexes
             WHERE schemaname = 'contact_sync' AND indexrelname = 'jobs_delivered_pkey'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        n
    };
    let before = pages(session.clone()).await;
    for i in 0..10 {
        sqlx::query("SELECT contact_sync.enqueue('justclick', 'jc', $1, '{}')")
            .bind(format!("a{i}@example.com"))
            .execute(&session)
            .await
            .unwrap();
    }
    let read = pages(session.clone()).await - before;
    assert!(
        read < 100,
        "10 one-row enqueues read {read} pages of jobs_delivered_pkey (200,000 dead entries in it)"
    );
}

/// Rows read by sequential scans of the queue's tables so far (`pg_stat_user_tables`), after
/// the given sessions' statistics were flushed: the queue's own and `jobs_delivered`, its child
/// (a statement that named an open state wrongly would read the delivered jobs whole).
async fn seq_rows_read(reader: &PgPool, sessions: &[&PgPool]) -> i64 {
    flush_stats(sessions).await;
    table_reads(reader, "jobs").await.0 + table_reads(reader, "jobs_delivered").await.0
}

/// Rows of the queue's tables fetched through index scans so far (`pg_stat_user_tables`; the
/// sessions' statistics flushed by a [`seq_rows_read`] just before).
async fn index_rows_fetched(reader: &PgPool) -> i64 {
    table_reads(reader, "jobs").await.1 + table_reads(reader, "jobs_delivered").await.1
}

/// Makes the given sessions' table statistics visible to others: each flushes them when it next
/// goes idle (PostgreSQL 15 and later).
async fn flush_stats(sessions: &[&PgPool]) {
    for session in sessions {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(*session)
            .await
            .unwrap();
        sqlx::query("SELECT 1").execute(*session).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
}

/// A database whose jobs table's statistics were taken empty and stay so (autovacuum off, as
/// between two of its runs).
async fn queue_with_empty_statistics() -> TestDb {
    let db = TestDb::new().await;
    sqlx::query("ALTER TABLE contact_sync.jobs SET (autovacuum_enabled = off)")
        .execute(&db.pool)
        .await
        .unwrap();
    analyze(&db.pool).await;
    db
}

/// A pool of one connection: every statement through it runs in the same session.
fn one_session(db: &TestDb) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(db.options.clone())
}

/// Rows of one of contact-sync's tables read by sequential scans, and fetched through index
/// scans, so far (`pg_stat_user_tables`).
async fn table_reads(reader: &PgPool, table: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(seq_tup_read), 0)::bigint, coalesce(sum(idx_tup_fetch), 0)::bigint
         FROM pg_stat_user_tables WHERE schemaname = 'contact_sync' AND relname = $1",
    )
    .bind(table)
    .fetch_one(reader)
    .await
    .unwrap()
}

/// One claim of up to 256 jobs through the library, each completed as delivered; returns how
/// many.
async fn deliver(pool: &PgPool) -> usize {
    use contact_sync::outbox::claim::{claim, AccountQuota};
    use contact_sync::outbox::complete::{succeed_many, Success};
    let quotas = [AccountQuota {
        account: ACCOUNT.into(),
        limit: 256,
    }];
    let lease = std::time::Duration::from_secs(30);
    let options = contact_sync::outbox::claim::ClaimOptions {
        lease,
        worker_id: "plan-test",
        default_max_attempts: 5,
        max_followers: 16,
        captured: &[],
    };
    let jobs = claim(pool, &quotas, &options, &mut Default::default())
        .await
        .unwrap()
        .jobs;
    let done: Vec<Success> = jobs
        .iter()
        .map(|j| Success {
            lease: j.lease(),
            doi: None,
            sent_md5: j.payload_md5(),
            followers: Vec::new(),
            sets_status: false,
            modify_ts: None,
            outcome: None,
            synced: None,
            after_call: None,
        })
        .collect();
    let written = succeed_many(pool, &done).await.unwrap();
    assert_eq!(written, Default::default());
    jobs.len()
}

/// Regression: a worker that had run on an empty queue kept the plans it made then. Postgres
/// may switch a statement to a generic plan after five runs and keep it for the session; with
/// the earlier design's queue of contacts one page long, that plan scanned the table, and went
/// on scanning it whole, completion after completion, once 20,000 contacts were queued
/// (statistics unchanged: autovacuum off here, as it is between two of its runs). The worker's
/// statements and the triggers' functions are planned for the tables as they are: a claim and
/// completion of 256 jobs, and producers' changes (under READ COMMITTED and REPEATABLE READ),
/// read no table through a sequential scan.
#[tokio::test]
async fn plans_made_on_an_empty_queue_hold_for_a_full_one() {
    use contact_sync::outbox::{enqueue_batch, NewJob};
    use sqlx::postgres::PgPoolOptions;

    let db = queue_with_empty_statistics().await;
    // one connection each: every statement of a role runs in the same session
    let session = || one_session(&db);
    // the worker's claims and completions run on its hot path's sessions, plans kept
    let worker = contact_sync::outbox::hot::pool(&session());
    let producer = session();
    // a producer whose transactions run under REPEATABLE READ takes its own path in the trigger
    let rr_producer = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET default_transaction_isolation = 'repeatable read'")
                    .execute(conn)
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy_with(db.options.clone());
    let change = |email: String| {
        NewJob::new(
            "justclick",
            ACCOUNT,
            email,
            serde_json::json!({"lead_name": "P"}),
        )
    };
    let record = |pool: PgPool, jobs: Vec<NewJob>| async move {
        let mut conn = pool.acquire().await.unwrap();
        enqueue_batch(&mut conn, &jobs).await.unwrap();
    };
    // the queue is empty between changes: ten rounds of one change each, claimed and completed
    for round in 0..10 {
        let early = |who: &str| vec![change(format!("early-{who}{round}@example.com"))];
        record(producer.clone(), early("p")).await;
        record(rr_producer.clone(), early("rr")).await;
        assert_eq!(deliver(&worker).await, 2);
    }
    // then a backlog arrives (from another session), and the statistics stay as they were
    let other = session();
    ready(&other, 1, 20_000).await;
    // and 5,000 calls are in flight elsewhere in the fleet (a completion reads its own rows)
    sqlx::query(
        "UPDATE contact_sync.jobs SET state = 'running', attempts = 1, locked_by = 'elsewhere',
                locked_until = now() + interval '1 hour'
         WHERE id IN (SELECT id FROM contact_sync.jobs WHERE state = 'pending' ORDER BY id DESC LIMIT 5000)",
    )
    .execute(&other)
    .await
    .unwrap();
    let all = [&worker, &producer, &rr_producer, &other];
    let before = seq_rows_read(&db.pool, &all).await;
    let fetched_before = index_rows_fetched(&db.pool).await;
    assert_eq!(deliver(&worker).await, 256);
    let delivered = seq_rows_read(&db.pool, &all).await;
    // (a plan kept from the empty queue that walked a whole index would fetch 20,000)
    let fetched = index_rows_fetched(&db.pool).await - fetched_before;
    assert!(
        fetched < 4 * 256,
        "a claim and completion of 256 jobs fetched {fetched} rows of contact_sync.jobs through indexes, 20,000 queued"
    );
    // changes of contacts that have open work (their rows exist)
    let more = |from: usize| -> Vec<NewJob> {
        (from..from + 10)
            .map(|i| change(format!("ready{i}@example.com")))
            .collect()
    };
    record(producer.clone(), more(1_000)).await;
    record(rr_producer.clone(), more(2_000)).await;
    let recorded = seq_rows_read(&db.pool, &all).await;
    let jobs = delivered - before;
    // (before the fix: 10,285,140 rows of jobs)
    assert!(
        jobs < 1_000,
        "a claim and completion of 256 jobs read {jobs} rows of contact_sync.jobs through sequential scans, 20,000 queued"
    );
    let jobs = recorded - delivered;
    assert!(
        jobs < 1_000,
        "20 changes of queued contacts read {jobs} rows of jobs through sequential scans, 20,000 queued"
    );
}

/// Rows the queue's tables gave up (sequential and index scans' heap rows) to `pool`'s one
/// session since the last call (statistics flushed first).
async fn heap_rows_read(reader: &PgPool, session: &PgPool) -> i64 {
    flush_stats(&[session]).await;
    sqlx::query_scalar(
        "SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0)::bigint
         FROM pg_stat_user_tables WHERE schemaname = 'contact_sync'",
    )
    .fetch_one(reader)
    .await
    .unwrap()
}

/// The console's reads touch rows bounded by the page, not by the table: over 300,000 jobs
/// (260,000 delivered, 20,000 dead, 20,000 pending), each page's statements read at most
/// their window or cap, however large the table grows. (Wall times at 2,000,000 jobs are in
/// docs/console.md.)
#[tokio::test]
async fn console_statements_touch_rows_bounded_by_the_page() {
    use contact_sync::outbox::console as store;
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, attempts, finished_at, created_at)
         SELECT 'justclick', 'jc' || (g % 2), 'old' || g || '@example.com', jsonb_build_object('lead_city', 'C' || (g % 100)),
                'succeeded', 1, now() - interval '1 day', now() - interval '1 day'
         FROM generate_series(1, 260000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload, state, attempts, finished_at, last_error, errors)
         SELECT 'justclick', 'jc' || (g % 2), 'dead' || g || '@example.com', '{}', 'dead', 1, now(),
                'provider code 100: invalid e-mail',
                '[{\"attempt\": 1, \"code\": \"100\", \"kind\": \"permanent\", \"error\": \"invalid e-mail\"}]'
         FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO contact_sync.jobs (provider, account, email, payload)
         SELECT 'justclick', 'jc' || (g % 2), 'new' || g || '@example.com', '{\"lead_name\": \"N\"}'
         FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc0', 'justclick'), ('jc1', 'justclick')")
        .execute(&db.pool)
        .await
        .unwrap();
    analyze(&db.pool).await;
    let session = one_session(&db);
    let accounts = vec!["jc0".to_string(), "jc1".to_string()];
    let providers = vec![
        ("jc0".to_string(), "justclick".to_string()),
        ("jc1".to_string(), "justclick".to_string()),
    ];
    heap_rows_read(&db.pool, &session).await;
    let mut read = Vec::new();
    macro_rules! measure {
        ($name:expr, $bound:expr, $call:expr) => {{
            let before = heap_rows_read(&db.pool, &session).await;
            let out = $call.await.unwrap();
            let rows = heap_rows_read(&db.pool, &session).await - before;
            read.push(($name, rows, $bound));
            out
        }};
    }
    let page = measure!(
        "jobs, unfiltered",
        store::SEARCH_WINDOW,
        store::search(
            &session,
            &store::Search {
                limit: 100,
                ..Default::default()
            }
        )
    );
    assert_eq!(page.jobs.len(), 100);
    let page = measure!(
        "jobs, a filter nothing matches",
        store::SEARCH_WINDOW * store::SEARCH_STEPS as i64 + 100,
        store::search(
            &session,
            &store::Search {
                limit: 100,
                email: Some("nobody@example.com".into()),
                ..Default::default()
            }
        )
    );
    assert!(page.jobs.is_empty() && page.next_before.is_some());
    let page = measure!(
        "jobs, by payload field",
        store::SEARCH_WINDOW * store::SEARCH_STEPS as i64 + 100,
        store::search(
            &session,
            &store::Search {
                limit: 100,
                payload_field: Some((vec!["lead_city".into()], "C7".into())),
                ..Default::default()
            }
        )
    );
    assert!(!page.jobs.is_empty());
    // (each count reads at most the rows it counts, up to its cap; here 10,000 due changes,
    // 10,000 dead jobs, and the other account's contacts if the planner scans the small table)
    let counts = measure!(
        "overview counts",
        40_000,
        store::queue_counts(&session, "jc0")
    );
    assert_eq!((counts.due.n, counts.dead.n), (10_000, 10_000));
    measure!("overview chart", 200, store::last_hour(&session, &accounts));
    let (groups, _) = measure!(
        "dead letters",
        2 * store::DEAD_SAMPLE + 100,
        store::dead_groups(&session, &accounts)
    );
    assert_eq!(groups.len(), 2);
    let history = measure!(
        "contact",
        store::CONTACT_WINDOW + 100,
        store::contact(&session, "dead7@example.com", &providers)
    );
    assert_eq!(history.changes.len(), 1);
    // (two statements: the listed followers, and the count and merge of all of them)
    measure!(
        "job's followers",
        2 * store::FOLLOWER_WINDOW + 100,
        store::followers(&session, 5)
    );
    measure!("audit", 200, store::audit_page(&session, None, 100));
    for (name, rows, bound) in &read {
        assert!(
            rows <= bound,
            "{name}: {rows} rows read for a page, bound {bound}: {read:?}"
        );
    }
    // the bounds are far below the table: a statement that read it whole would fail them
    assert!(read.iter().all(|(_, _, bound)| *bound < 300_000));
}

/// Found by the adversarial review: `cancel` of a contact's first pending job left the next
/// one waiting until the sweep reached its contact (74 s among 100,000 waiting contacts). The
/// operator actions now bring back the contact's next job themselves.
#[tokio::test]
async fn a_cancelled_head_brings_back_the_next_change_at_once() {
    let db = TestDb::new().await;
    let pool = &db.pool;
    blocked_contacts(pool, "c", 3, 2).await;
    while claim_committed(pool).await > 0 || {
        let accounts = vec![ACCOUNT.to_string()];
        contact_sync::outbox::claim::runnable_exists(pool, &accounts)
            .await
            .unwrap()
    } {}
    let head: i64 =
        sqlx::query_scalar("SELECT min(id) FROM contact_sync.jobs WHERE email = 'c1@example.com'")
            .fetch_one(pool)
            .await
            .unwrap();
    let waiting = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM contact_sync.jobs WHERE email = 'c1@example.com' AND waits_for IS NOT NULL AND state = 'pending'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(waiting(pool).await, 2);
    let (result, _) = contact_sync::outbox::repair::cancel(pool, head)
        .await
        .unwrap();
    assert_eq!(result, contact_sync::outbox::repair::ActionResult::Done);
    assert_eq!(
        waiting(pool).await,
        1,
        "the next change is back, the last waits on"
    );
    // the bulk form too: the other contacts' heads, cancelled by filter
    let mut filter =
        contact_sync::outbox::repair::JobFilter::new(contact_sync::outbox::JobState::Pending);
    filter.ids = Some(
        sqlx::query_scalar(
            "SELECT min(id) FROM contact_sync.jobs WHERE email IN ('c2@example.com', 'c3@example.com') GROUP BY email",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    );
    let done = contact_sync::outbox::repair::cancel_matching(pool, &filter, false)
        .await
        .unwrap();
    assert_eq!(done.cancelled, 2);
    let back: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE email IN ('c2@example.com', 'c3@example.com') AND state = 'pending' AND waits_for IS NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(back, 2, "each contact's next change is back");
}

/// A round's failed calls (`complete::fail_many`, planned afresh on the worker's ordinary
/// session) read the rows of the batch, whatever the planner believes of the table: no
/// sequential scan of the jobs, a few index fetches per failure, with statistics taken on an
/// empty queue and 20,000 jobs in it.
#[tokio::test]
async fn a_batch_of_failed_calls_reads_rows_in_proportion_to_it() {
    use contact_sync::outbox::complete::{fail_many, Attempt, Failure};
    use contact_sync::outbox::job::AttemptError;
    use contact_sync::outbox::Lease;

    let db = queue_with_empty_statistics().await;
    let session = one_session(&db);
    ready(&db.pool, 1, 20_000).await;
    const FAILED: usize = 300;
    let ids: Vec<i64> = sqlx::query_scalar(
        "UPDATE contact_sync.jobs SET state = 'running', attempts = 1, locked_by = 'w',
                locked_until = now() + interval '1 hour'
         WHERE id IN (SELECT id FROM contact_sync.jobs ORDER BY id LIMIT $1) RETURNING id",
    )
    .bind(FAILED as i64)
    // (on the measured session, whose statistics are flushed before the count: this set-up may
    // read the table whole, and another session's statistics could land in the middle of the
    // measurement, up to ten seconds later)
    .fetch_all(&session)
    .await
    .unwrap();
    let error = AttemptError {
        kind: "permanent".into(),
        code: Some("500".into()),
        message: "Subscriber not found".into(),
    };
    let failures: Vec<Failure> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Failure {
            lease: Lease {
                id: *id,
                attempt: 1,
            },
            error: &error,
            retry_after: (i % 2 == 0).then_some(std::time::Duration::from_secs(60)),
            attempt: Attempt::Counts,
        })
        .collect();
    let seq_before = seq_rows_read(&db.pool, &[&session]).await;
    let idx_before = index_rows_fetched(&db.pool).await;
    let written = fail_many(&session, &failures).await.unwrap();
    assert_eq!(written.len(), FAILED);
    let seq = seq_rows_read(&db.pool, &[&session]).await - seq_before;
    let fetched = index_rows_fetched(&db.pool).await - idx_before;
    assert_eq!(
        seq, 0,
        "a batch of {FAILED} failures read the jobs table sequentially"
    );
    assert!(
        fetched <= 6 * FAILED as i64,
        "a batch of {FAILED} failures fetched {fetched} rows through indexes"
    );
}
