//! Model-based randomized end-to-end test. Each round draws, from one seed, a workload of
//! contact changes (valid ones at every limit, adversarial ones that must be refused at
//! enqueue), a fault schedule (kill -9 of workers, provider faults, Postgres restarts) and the
//! worker settings; it runs real `contact-sync run` processes against its own database and the
//! in-process sandbox, lets everything drain, and then holds the outcome to invariants:
//!
//! - **a** every accepted change ended `succeeded`/`coalesced`, or `dead` because the provider
//!   refused it permanently (an injected error code, named in `last_error`); nothing is left
//!   `pending`/`running`; a refused change never became a row.
//! - **b** each contact the sandbox holds equals the reference model (`providers::model`) applied
//!   to the changes the outbox says were delivered, in id order (with the pending status taken
//!   out of the changes asking for it where the `doi` column says so; any other status of the
//!   same call still applies). A change whose answer was lost and that never
//!   succeeded may or may not have reached the provider, with or without its status (the
//!   worker may have taken it out and a job that never succeeded records no `doi`): the contact
//!   must equal the model under one of those histories, and the confirmation emails sent must
//!   lie within what the histories that explain it ask for.
//! - **c** never two calls in flight for one contact; never a second confirmation email, and no
//!   second confirmation request inside the hour except a retry of a call whose answer was lost;
//!   a pending status taken out only when another call to the address asked for it.
//! - **d** no secret, `sig=`, `hash=`, ESC or NUL in any worker's output or the stored errors.
//! - **e** every refusal is SQLSTATE 22023 naming the field; idempotency keys and all-or-nothing
//!   batches hold; the sandbox verified every request; workers exit 0 on SIGTERM.
//!
//! Faults: kill -9 of a worker (replaced after up to 1.5 s), sandbox faults (5xx, 429 with
//! `Retry-After: 1`, stalls past the request timeout, slow answers applied after the worker gave
//! up on them (as a real service finishes a request whose client went away; the workers hold
//! such a contact for `http.abandoned_call_bound`), resets mid-response, forged and unverifiable
//! answers, malformed bodies, permanent error codes whose text holds a NUL and an ANSI escape),
//! per-request delays, deferred confirmation re-sends brought forward in database time, and in
//! every round whose seed is a multiple of 3, a fast and an immediate restart of Postgres (a
//! cluster of its own, so other tests keep theirs).
//!
//! `CONTACT_SYNC_MODEL_SEED` fixes the first round's seed (random otherwise; round `i` uses
//! `seed + i`), `CONTACT_SYNC_MODEL_SECS` the budget (default 150: five rounds of about 25 s, over two minutes).
//! Every failure prints the one command that replays its round. A seed fixes the workload, the
//! fault schedule and the settings; the interleaving of the processes still varies from run to
//! run (the invariants hold for every interleaving).

use crate::helpers::*;
use chrono::Utc;
use contact_sync::config::ProviderKind;
use contact_sync::outbox::{self, EnqueueError, JobId, NewJob};
use contact_sync::pg::ThrowawayPostgres;
use contact_sync::providers::justclick::form_fields;
use contact_sync::providers::model::{self, ContactState};
use contact_sync::providers::payload;
use contact_sync::sandbox::{Fault, FaultRule, Sandbox, SandboxAccounts};
use fastrand::Rng;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One round takes at most about this long (setup, chaos, drain, checks).
const ROUND_SECS: u64 = 30;
const DEFAULT_SECS: u64 = 150;
/// Workers run under injected faults for this long; then the queue drains in peace.
const CHAOS: Duration = Duration::from_secs(22);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

const LEASE: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Longer than any stall. (The sandbox applies a stalled change at once and only answers late,
/// so the provider has acted although the worker saw a timeout: the retry repeats the change.)
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_CAP: Duration = Duration::from_secs(4);
/// Stalls: longer than the request timeout, shorter than the backoff base and the lease.
const STALL_MS: std::ops::RangeInclusive<u64> = 1300..=1800;
/// In rounds with slow calls: stalls longer than the lease, answered before the request timeout.
const SLOW_STALL_MS: std::ops::RangeInclusive<u64> = 3500..=4500;
const SLOW_REQUEST_TIMEOUT: Duration = Duration::from_secs(6);
/// Slow answers (`Fault::Slow`): applied this long after the request timeout, when the worker
/// has given up (a real service finishes a request whose client went away).
const SLOW_PAST_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 200..=1200;
/// `http.abandoned_call_bound`: longer than any slow answer's time past the request timeout
/// (plus the per-request delay), so a held call is over before its contact is called again.
const ABANDONED_CALL_BOUND: Duration = Duration::from_millis(1600);
/// Finished rows a day old that the workers prune during a slow round (retention 1 h).
const HOUSEKEEPING_BACKLOG: i64 = 150_000;
/// Their account (no worker serves it; the checks leave it out).
const HOUSEKEEPING_ACCOUNT: &str = "housekeeping";

const JC2_LOGIN: &str = "model_jc2";
const JC2_SECRET: &str = "jc2-model-secret-5d1f0c93e2";
const SL2_GAME: &str = "4242";
const SL2_SECRET: &str = "sl2-model-secret-a7e2b4f81c";
/// In every injected permanent error text (with a NUL and an ANSI escape around it).
const PERMANENT_MARK: &str = "injected-permanent";

#[derive(Debug, Clone, Copy)]
struct Account {
    name: &'static str,
    provider: &'static str,
    /// JustClick login or Smartlink game id.
    remote: &'static str,
}

/// `sl` defers confirmation re-sends (the default), `sl2` drops them.
const ACCOUNTS: [Account; 4] = [
    Account {
        name: "jc",
        provider: "justclick",
        remote: JC_LOGIN,
    },
    Account {
        name: "jc2",
        provider: "justclick",
        remote: JC2_LOGIN,
    },
    Account {
        name: "sl",
        provider: "smartlink",
        remote: SL_GAME,
    },
    Account {
        name: "sl2",
        provider: "smartlink",
        remote: SL2_GAME,
    },
];

const SECRETS: [&str; 4] = [JC_SECRET, JC2_SECRET, SL_SECRET, SL2_SECRET];

fn replay(seed: u64) -> String {
    format!(
        "CONTACT_SYNC_MODEL_SEED={seed} CONTACT_SYNC_MODEL_SECS={ROUND_SECS} bash scripts/test.sh model"
    )
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a non-negative integer, got {text:?}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_based_randomized_rounds() {
    let first = env_u64("CONTACT_SYNC_MODEL_SEED").unwrap_or_else(|| fastrand::u64(1..1 << 40));
    let budget = env_u64("CONTACT_SYNC_MODEL_SECS").unwrap_or(DEFAULT_SECS);
    let rounds = (budget / ROUND_SECS).max(1);
    eprintln!(
        "model test: seed {first}, {rounds} round(s) (seeds {first}..={}); replay the first with: {}",
        first.wrapping_add(rounds - 1),
        replay(first)
    );
    for i in 0..rounds {
        run_round(first.wrapping_add(i)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The plan: everything a round does, drawn from its seed before anything runs.

#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    /// Payload text the JSON libraries cannot hold (numbers out of f64 range or precision).
    Raw(&'static str),
}

#[derive(Debug, Clone, Copy)]
enum When {
    Now,
    /// `run_at` this many ms after the enqueue.
    Later(u64),
    /// A literal `run_at` (e.g. `-infinity`).
    Text(&'static str),
}

#[derive(Debug, Clone)]
struct Change {
    email: String,
    body: Body,
    when: When,
    key: Option<String>,
    /// `Some(text)`: must be refused with SQLSTATE 22023 and a message containing `text`.
    refuse: Option<&'static str>,
}

struct ContactPlan {
    account: Account,
    /// Lower-cased address (changes may use other spellings of it).
    email: String,
    changes: Vec<Change>,
}

impl ContactPlan {
    fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            self.account.name, self.account.remote, self.email
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct WorkerSpec {
    max_coalesce: usize,
    concurrency: usize,
}

#[derive(Debug, Clone)]
enum Action {
    Fault(FaultRule),
    /// A permanent provider error for the next call of one contact.
    Permanent {
        contact: usize,
        code: i64,
    },
    /// kill -9 of one worker (index modulo those alive), replaced after a while.
    Kill {
        pick: usize,
        respawn_after: Duration,
        spec: WorkerSpec,
    },
    Delay(u64),
    RestartPostgres(&'static str),
    /// Deferred confirmation re-sends fall due now (database time) instead of in an hour; the
    /// ledger still holds the window, so they are deferred again rather than sent.
    FastForwardDeferrals,
}

struct Plan {
    seed: u64,
    contacts: Vec<ContactPlan>,
    /// (contact, change) enqueued before the workers start, in this order.
    initial: Vec<(usize, usize)>,
    /// (when, contact, change) enqueued while the workers run.
    live: Vec<(Duration, usize, usize)>,
    actions: Vec<(Duration, Action)>,
    workers: Vec<WorkerSpec>,
    postgres_restarts: bool,
    /// Calls slower than the lease (stalls past it, with a request timeout longer still) and a
    /// long housekeeping run (a large finished backlog past a 1 h retention): the heartbeat must
    /// keep every lease of a live worker.
    slow_calls: bool,
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn percent(rng: &mut Rng, p: u8) -> bool {
    rng.u8(..100) < p
}

fn worker_spec(rng: &mut Rng) -> WorkerSpec {
    WorkerSpec {
        max_coalesce: *pick(rng, &[1, 2, 3, 50, 50]),
        concurrency: *pick(rng, &[4, 8, 16]),
    }
}

fn plan_round(seed: u64) -> Plan {
    let mut rng = Rng::with_seed(seed);
    let now_ms = Utc::now().timestamp_millis();
    let n = rng.usize(60..=150);
    let locals = [
        "user",
        "jürgen.müller",
        "o'brien+tag",
        "first.last",
        "x_y-z",
        "日本",
    ];
    let domains = [
        "example.com",
        "mail.example.org",
        "пример.рф",
        "sub.domain.example.net",
    ];
    let mut taken = HashSet::new();
    let mut contacts = Vec::with_capacity(n);
    for _ in 0..n {
        let account = *pick(&mut rng, &ACCOUNTS);
        // the same address under several accounts: distinct contacts
        let mut j = rng.usize(..n * 2 / 3 + 1);
        let email = loop {
            // JustClick validates addresses as PHP does (ASCII only): Unicode ones go to Smartlink
            let (local, domain) = if account.provider == "justclick" {
                (locals[(j % 3) * 2], domains[(j % 2) * 3])
            } else {
                (locals[j % locals.len()], domains[j % domains.len()])
            };
            let e = format!("{local}{j}@{domain}");
            if taken.insert((account.name, e.clone())) {
                break e;
            }
            j += n;
        };
        let mut ts = now_ms + rng.i64(-5_000..20_000);
        let count = rng.usize(1..=8);
        let changes = (0..count)
            .map(|k| {
                let spelled = spelling(&mut rng, &email);
                if percent(&mut rng, 12) {
                    adversarial(&mut rng, account, spelled)
                } else {
                    let payload = if account.provider == "justclick" {
                        justclick_payload(&mut rng)
                    } else {
                        smartlink_payload(&mut rng, &mut ts)
                    };
                    Change {
                        email: spelled,
                        body: Body::Json(payload),
                        when: if percent(&mut rng, 4) {
                            When::Later(rng.u64(300..2500))
                        } else {
                            When::Now
                        },
                        key: percent(&mut rng, 70)
                            .then(|| format!("m{seed}-{}-{k}", contacts.len())),
                        refuse: None,
                    }
                }
            })
            .collect();
        contacts.push(ContactPlan {
            account,
            email,
            changes,
        });
    }
    // Which changes go before the workers start and which while they run.
    let mut queues: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut live = Vec::new();
    for (ci, c) in contacts.iter().enumerate() {
        let split = if percent(&mut rng, 55) {
            rng.usize(0..=c.changes.len())
        } else {
            c.changes.len()
        };
        queues.push((ci, (0..split).collect()));
        let last = (CHAOS.as_millis() as u64) * 85 / 100;
        let mut offsets: Vec<u64> = (split..c.changes.len()).map(|_| rng.u64(0..last)).collect();
        offsets.sort_unstable();
        for (chi, at) in (split..c.changes.len()).zip(offsets) {
            live.push((Duration::from_millis(at), ci, chi));
        }
    }
    live.sort();
    // interleave the contacts, keeping each one's order
    let mut initial = Vec::new();
    let mut cursors: Vec<(usize, std::collections::VecDeque<usize>)> = queues
        .into_iter()
        .filter(|(_, q)| !q.is_empty())
        .map(|(ci, q)| (ci, q.into()))
        .collect();
    while !cursors.is_empty() {
        let i = rng.usize(..cursors.len());
        let (ci, q) = &mut cursors[i];
        if let Some(chi) = q.pop_front() {
            initial.push((*ci, chi));
        }
        if q.is_empty() {
            cursors.swap_remove(i);
        }
    }
    let postgres_restarts = seed % 3 == 0;
    let slow_calls = seed % 2 == 1;
    let actions = plan_actions(&mut rng, &contacts, postgres_restarts, slow_calls);
    let workers = (0..rng.usize(2..=4))
        .map(|_| worker_spec(&mut rng))
        .collect();
    Plan {
        seed,
        contacts,
        initial,
        live,
        actions,
        workers,
        postgres_restarts,
        slow_calls,
    }
}

/// The address as one change spells it: ASCII letters in random case, sometimes.
fn spelling(rng: &mut Rng, email: &str) -> String {
    if !percent(rng, 15) {
        return email.to_string();
    }
    email
        .chars()
        .map(|c| {
            if c.is_ascii_alphabetic() && rng.bool() {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn text_value(rng: &mut Rng, max_chars: usize) -> String {
    const SAMPLES: [&str; 16] = [
        "Jane Doe",
        "Анна-Мария Łukasiewicz",
        "O'Brien & Sons; DROP TABLE x;--",
        "emoji 🙂👍🏽🇺🇦",
        "ctl \u{1}\u{7}\u{8}\t\r\n end",
        "esc \u{1b}[31mred\u{1b}[0m",
        "",
        " spaced out ",
        "a+b=c&d%20e#f?g",
        "bidi \u{202e}abc\u{202c}",
        "zero\u{200b}width\u{feff}",
        "quote \"q\" \\ back/slash",
        "日本語テキスト",
        "+",
        "%",
        "NULL",
    ];
    match rng.u8(..12) {
        0 => "я".repeat(max_chars),
        1 => "🙂".repeat(max_chars),
        _ => pick(rng, &SAMPLES).to_string(),
    }
}

fn justclick_payload(rng: &mut Rng) -> Value {
    let mut p = Map::new();
    if percent(rng, 50) {
        p.insert("lead_name".into(), json!(text_value(rng, 255)));
    }
    if percent(rng, 30) {
        p.insert("lead_phone".into(), json!(text_value(rng, 64)));
    }
    if percent(rng, 35) {
        p.insert("lead_city".into(), json!(text_value(rng, 255)));
    }
    if percent(rng, 35) {
        let tags = match rng.u8(..8) {
            0 => json!("vip,new"),
            1 => json!(""),
            2 => json!("тег,🙂,ctl\u{1}"),
            3 => json!("t".repeat(1000)),
            4 => json!(["vip", "b2b"]),
            5 => json!([]),
            6 => json!(["🙂", "ключ", "esc\u{1b}"]),
            _ => json!(["x".repeat(1000)]),
        };
        p.insert("lead_tags".into(), tags);
    }
    Value::Object(p)
}

fn string_list(rng: &mut Rng) -> Value {
    match rng.u8(..6) {
        0 => json!([]),
        1 => json!(["a"]),
        2 => json!(["🙂 emoji", "ctl\u{1}\u{1b}x", "кириллица"]),
        3 => Value::Array((0..100).map(|i| json!(format!("t{i}"))).collect()),
        4 => json!(["x".repeat(255)]),
        _ => json!(["news", "promo"]),
    }
}

fn attribute_value(rng: &mut Rng) -> Value {
    match rng.u8(..16) {
        0 => json!(0),
        1 => json!(-5),
        2 => json!(0.125),
        3 => json!(9_007_199_254_740_993_u64),
        4 => json!(i64::MAX),
        5 => json!(i64::MIN),
        6 => json!(true),
        7 => json!(false),
        8 => json!(""),
        9 => json!("🙂👍🏽"),
        10 => json!("ctl\u{1}\u{1b}[0m\u{7f}"),
        11 => json!("x".repeat(1000)),
        12 => json!(-0.001),
        13 => json!(123_456.789),
        14 => json!(1e-5),
        _ => json!(rng.i64(-1000..1000)),
    }
}

fn attribute_name(rng: &mut Rng) -> String {
    match rng.u8(..10) {
        0 => "ключ".into(),
        1 => "emoji🙂".into(),
        2 => "with space".into(),
        3 => "ctl\u{1}key".into(),
        4 => "k".repeat(255),
        5 => "0".into(),
        _ => format!("a{}", rng.u8(..6)),
    }
}

/// A valid Smartlink change; `ts` is the contact's `modify_ts` cursor (mostly increasing).
fn smartlink_payload(rng: &mut Rng, ts: &mut i64) -> Value {
    let mut p = Map::new();
    if percent(rng, 70) {
        if percent(rng, 12) {
            // older than an earlier change: the provider drops it
            p.insert("modify_ts".into(), json!(*ts - rng.i64(1..4000)));
        } else {
            *ts += rng.i64(0..1500);
            p.insert("modify_ts".into(), json!(*ts));
        }
    } // else: the enqueue sets it to the enqueue time
    let status = rng.u8(..100);
    if status < 40 {
        p.insert("subscribe".into(), json!(*pick(rng, &[3, 3, 1, 0, -1])));
        if rng.bool() {
            p.insert("update_strategy".into(), json!(rng.i64(0..=3)));
        }
    } else if status < 50 {
        // a strategy without a status means nothing
        p.insert("update_strategy".into(), json!(rng.i64(0..=3)));
    }
    if percent(rng, 30) {
        p.insert("tags".into(), string_list(rng));
    }
    if percent(rng, 15) {
        p.insert("preferences".into(), string_list(rng));
    }
    if percent(rng, 15) {
        p.insert(
            "openid".into(),
            json!(pick(rng, &["0", "12345678901234567890", "007", "42"])),
        );
    }
    if percent(rng, 20) {
        p.insert(
            "location".into(),
            json!(pick(rng, &["004", "250", "840", ""])),
        );
    }
    if percent(rng, 20) {
        p.insert(
            "language".into(),
            json!(pick(rng, &["en", "pt-BR", "zh_Hant", "deu", ""])),
        );
    }
    if percent(rng, 40) {
        let attrs: Map<String, Value> = if percent(rng, 8) {
            // exactly the limit
            (0..50)
                .map(|i| (format!("n{i}"), attribute_value(rng)))
                .collect()
        } else {
            (0..rng.usize(1..=6))
                .map(|_| (attribute_name(rng), attribute_value(rng)))
                .collect()
        };
        p.insert("attributes".into(), Value::Object(attrs));
    }
    Value::Object(p)
}

/// A change that must be refused at enqueue, and the text its refusal must contain.
fn adversarial(rng: &mut Rng, account: Account, email: String) -> Change {
    let refused = |body: Body, expect: &'static str| Change {
        email: email.clone(),
        body,
        when: When::Now,
        key: None,
        refuse: Some(expect),
    };
    let common = rng.u8(..100) < 25;
    if common {
        return match rng.u8(..3) {
            0 => Change {
                // a no-break space (U+00A0) is not a valid address character
                email: format!("no\u{a0}break{}@example.com", rng.u16(..)),
                ..refused(Body::Json(json!({})), "malformed email")
            },
            1 => Change {
                email: "a@b".into(),
                ..refused(Body::Json(json!({})), "malformed email")
            },
            _ => Change {
                when: When::Text("-infinity"),
                ..refused(Body::Json(json!({})), "run_at")
            },
        };
    }
    if account.provider == "justclick" {
        match rng.u8(..5) {
            0 => refused(Body::Json(json!({"lead_nam": "x"})), "'lead_nam'"),
            1 => refused(
                Body::Json(json!({"lead_name": "я".repeat(256)})),
                "lead_name",
            ),
            2 => refused(
                Body::Json(json!({"lead_phone": "1".repeat(65)})),
                "lead_phone",
            ),
            3 => refused(Body::Json(json!({"lead_tags": ["a,b"]})), "lead_tags"),
            _ => refused(Body::Json(json!({"lead_city": 5})), "lead_city"),
        }
    } else {
        match rng.u8(..14) {
            0 => refused(Body::Raw(r#"{"attributes": {"big": 1e400}}"#), "'big'"),
            1 => refused(
                Body::Raw(r#"{"attributes": {"huge": 123456789012345678901}}"#),
                "'huge'",
            ),
            // 17 significant digits: a 64-bit float cannot carry it exactly
            2 => refused(
                Body::Raw(r#"{"attributes": {"sci": 1.2345678901234567e300}}"#),
                "'sci'",
            ),
            3 => refused(
                Body::Raw(r#"{"attributes": {"fine": 0.1000000000000000055}}"#),
                "'fine'",
            ),
            4 => {
                let attrs: Map<String, Value> =
                    (0..51).map(|i| (format!("n{i}"), json!(i))).collect();
                refused(Body::Json(json!({ "attributes": attrs })), "attributes")
            }
            5 => {
                let tags: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
                refused(Body::Json(json!({ "tags": tags })), "tags")
            }
            6 => refused(
                Body::Json(json!({"attributes": {"long": "x".repeat(1001)}})),
                "attribute",
            ),
            7 => refused(Body::Json(json!({"subscribe": 2})), "subscribe"),
            8 => refused(Body::Json(json!({"update_strategy": 4})), "update_strategy"),
            9 => refused(Body::Json(json!({"location": "04"})), "location"),
            10 => refused(Body::Json(json!({"modify_ts": -1})), "modify_ts"),
            11 => refused(Body::Json(json!({"bogus": 1})), "'bogus'"),
            12 => refused(
                Body::Json(json!({"attributes": {"o": {"nested": 1}}})),
                "attributes",
            ),
            _ => refused(Body::Json(json!({"tags": ["x".repeat(256)]})), "tags"),
        }
    }
}

fn plan_actions(
    rng: &mut Rng,
    contacts: &[ContactPlan],
    restarts: bool,
    slow_calls: bool,
) -> Vec<(Duration, Action)> {
    let mut actions = Vec::new();
    let mut at = Duration::from_millis(rng.u64(200..800));
    let mut permanents = 0;
    let max_permanents = contacts.len() / 10 + 1;
    while at + Duration::from_secs(1) < CHAOS {
        let roll = rng.u8(..100);
        let action = if roll < 60 {
            Action::Fault(transient_fault(rng, contacts, slow_calls))
        } else if roll < 70 && permanents < max_permanents {
            permanents += 1;
            let contact = rng.usize(..contacts.len());
            let code = if contacts[contact].account.provider == "justclick" {
                *pick(rng, &[500, 100, 7])
            } else {
                *pick(rng, &[22010, 40001])
            };
            Action::Permanent { contact, code }
        } else if roll < 84 {
            Action::Kill {
                pick: rng.usize(..64),
                respawn_after: Duration::from_millis(rng.u64(0..1500)),
                spec: worker_spec(rng),
            }
        } else if roll < 92 {
            Action::Delay(*pick(rng, &[0, 0, 5, 20, 40, 150]))
        } else {
            Action::Fault(transient_fault(rng, contacts, slow_calls))
        };
        actions.push((at, action));
        at += Duration::from_millis(rng.u64(150..900));
    }
    for _ in 0..rng.usize(1..=2) {
        let at = CHAOS.mul_f64(0.3 + 0.5 * rng.f64());
        actions.push((at, Action::FastForwardDeferrals));
    }
    actions.sort_by_key(|(at, _)| *at);
    if restarts {
        actions.push((CHAOS * 35 / 100, Action::RestartPostgres("fast")));
        actions.push((CHAOS * 70 / 100, Action::RestartPostgres("immediate")));
        actions.sort_by_key(|(at, _)| *at);
    }
    actions
}

fn transient_fault(rng: &mut Rng, contacts: &[ContactPlan], slow_calls: bool) -> FaultRule {
    let fault = match rng.u8(..9) {
        0 => Fault::Status {
            status: *pick(rng, &[500, 502, 503]),
        },
        1 => Fault::RateLimit {
            retry_after_secs: 1,
        },
        2 => Fault::Stall {
            ms: rng.u64(if slow_calls { SLOW_STALL_MS } else { STALL_MS }),
        },
        3 => Fault::Reset,
        4 => Fault::ForgeSignature,
        5 => Fault::Unverifiable,
        6 => Fault::Malformed,
        // applied when its wait ends, past the request timeout: after the worker gave up
        7 => Fault::Slow {
            ms: (if slow_calls {
                SLOW_REQUEST_TIMEOUT
            } else {
                REQUEST_TIMEOUT
            })
            .as_millis() as u64
                + rng.u64(SLOW_PAST_TIMEOUT_MS),
        },
        _ => Fault::Status { status: 503 },
    };
    let rule = FaultRule::new(fault, rng.u32(1..=4));
    match rng.u8(..4) {
        0 => rule,
        1 => rule.provider(pick::<&str>(rng, &["justclick", "smartlink"])),
        2 => {
            let a = pick(rng, &ACCOUNTS);
            rule.provider(a.provider).account(a.remote)
        }
        _ => {
            let c = &contacts[rng.usize(..contacts.len())];
            rule.provider(c.account.provider)
                .account(c.account.remote)
                .email(&c.email)
        }
    }
}

fn permanent_text(round: u64) -> String {
    format!("bad\u{0}\u{1b}[31m {PERMANENT_MARK} r{round}\u{1b}[0m")
}

// ---------------------------------------------------------------------------------------------
// Running a round.

/// Violations found in a round, each naming the invariant, the seed and the contact.
struct Violations {
    seed: u64,
    logs: PathBuf,
    items: Vec<String>,
}

impl Violations {
    fn add(&mut self, invariant: &str, contact: &str, detail: impl Display) {
        self.items.push(format!(
            "[{invariant}] seed {} contact {contact}: {detail}",
            self.seed
        ));
    }

    fn context(&self) -> String {
        format!(
            "seed {} (replay: {}; worker logs in {})",
            self.seed,
            replay(self.seed),
            self.logs.display()
        )
    }

    fn finish(&self) {
        if self.items.is_empty() {
            return;
        }
        let shown: Vec<&str> = self.items.iter().take(25).map(String::as_str).collect();
        panic!(
            "{} invariant violation(s) in the round with {}\n\n{}{}",
            self.items.len(),
            self.context(),
            shown.join("\n\n"),
            if self.items.len() > shown.len() {
                format!("\n\n… and {} more", self.items.len() - shown.len())
            } else {
                String::new()
            }
        );
    }
}

fn short(text: impl Display) -> String {
    let text = text.to_string();
    const MAX: usize = 160;
    if text.chars().count() <= MAX {
        return text;
    }
    let cut: String = text.chars().take(MAX).collect();
    format!("{cut}…({} chars)", text.chars().count())
}

fn sigkill(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

fn sigterm(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

struct Workers<'a> {
    env: &'a TestEnv,
    config: PathBuf,
    dir: PathBuf,
    alive: Vec<(String, tokio::process::Child)>,
    next: usize,
    kills: usize,
    /// Process ids of the workers killed with kill -9.
    killed_pids: Vec<u32>,
}

impl Workers<'_> {
    fn spawn(&mut self, spec: WorkerSpec) {
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
    async fn kill(&mut self, pick: usize) -> bool {
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
    async fn stop(&mut self) -> Vec<String> {
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
struct Ledger {
    /// Accepted job id → (contact, change).
    accepted: BTreeMap<JobId, (usize, usize)>,
    /// (contact, change) → id, for idempotent replays.
    ids: HashMap<(usize, usize), JobId>,
    refused: usize,
    /// Contact → the permanent codes injected for it.
    permanent: HashMap<usize, Vec<i64>>,
    faults: BTreeMap<&'static str, u32>,
    restarts: usize,
    fast_forwarded: u64,
}

async fn enqueue_change(
    pool: &sqlx::PgPool,
    account: Account,
    change: &Change,
) -> Result<JobId, EnqueueError> {
    let mut conn = pool.acquire().await.map_err(EnqueueError::Database)?;
    match (&change.body, change.when) {
        (Body::Json(payload), When::Now | When::Later(_)) => {
            outbox::enqueue(&mut conn, &new_job(account, change, payload)).await
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
            .fetch_one(&mut *conn)
            .await
            .map_err(EnqueueError::from)
        }
    }
}

fn new_job(account: Account, change: &Change, payload: &Value) -> NewJob {
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
async fn enqueue_and_record(
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

fn record(
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

async fn count_rows(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM contact_sync.jobs WHERE account <> $1")
        .bind(HOUSEKEEPING_ACCOUNT)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// A change that spoils a whole batch (batches are all or nothing), and what its refusal names.
fn poison(rng: &mut Rng) -> (NewJob, &'static str) {
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
async fn initial_load(env: &TestEnv, plan: &Plan, ledger: &mut Ledger, v: &mut Violations) {
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

async fn enqueue_batch(
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

async fn wait_for_database(env: &TestEnv, v: &Violations) {
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

async fn open_jobs(env: &TestEnv) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.jobs WHERE state IN ('pending', 'running')",
    )
    .fetch_one(&env.pool)
    .await
    .ok()
}

async fn run_round(seed: u64) {
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
    let config = env.config_file(&format!(
        "[accounts.jc2]\nprovider = \"justclick\"\nlogin = \"{JC2_LOGIN}\"\nsecret = \"{JC2_SECRET}\"\nbase_url = \"{}\"\n\
         [accounts.sl2]\nprovider = \"smartlink\"\ngame_id = \"{SL2_GAME}\"\nsecret = \"{SL2_SECRET}\"\nbase_url = \"{}\"\ndouble_opt_in = \"drop\"\n{}",
        env.sandbox.justclick_base_url(JC2_LOGIN),
        env.sandbox.smartlink_base_url(),
        if plan.slow_calls {
            "[retention]\nfinished = \"1h\"\n"
        } else {
            ""
        },
    ));
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
    initial_load(&env, &plan, &mut ledger, &mut v).await;

    let mut workers = Workers {
        env: &env,
        config: config.clone(),
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
        if t >= CHAOS && next_live == plan.live.len() && next_action == plan.actions.len() {
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
                (extract(epoch FROM finished_at) * 1000)::float8 AS finished_ms \
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

// ---------------------------------------------------------------------------------------------
// The invariants.

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    provider: String,
    account: String,
    email: String,
    state: String,
    payload: Value,
    doi: Option<String>,
    coalesced_into: Option<i64>,
    resend_after: Option<i64>,
    last_error: Option<String>,
    errors: Value,
    attempts: i32,
    /// `finished_at` in ms (database time).
    finished_ms: Option<f64>,
}

impl Row {
    fn delivered(&self) -> bool {
        self.state == "succeeded" || self.state == "coalesced"
    }

    /// Not delivered, but an attempt may have reached the provider before its answer was lost
    /// (a timeout, a transport error, a worker killed mid-call): the provider may have acted.
    fn maybe_applied(&self) -> bool {
        !self.delivered()
            && self.errors.as_array().is_some_and(|errors| {
                errors.iter().any(|e| {
                    matches!(
                        e.get("kind").and_then(Value::as_str),
                        Some("timeout" | "transport" | "lease_expired" | "abandoned")
                    )
                })
            })
    }

    fn summary(&self) -> String {
        format!(
            "#{} {} attempts={} doi={:?} into={:?} resend_after={:?} last_error={:?} payload={}",
            self.id,
            self.state,
            self.attempts,
            self.doi,
            self.coalesced_into,
            self.resend_after,
            self.last_error.as_deref().map(short),
            compact(&self.payload)
        )
    }
}

/// A payload for a failure message: every key, long texts and lists abbreviated.
fn compact(value: &Value) -> Value {
    match value {
        Value::String(s) if s.chars().count() > 40 => {
            let head: String = s.chars().take(12).collect();
            json!(format!("{head}…({} chars)", s.chars().count()))
        }
        Value::Array(items) if items.len() > 6 => {
            let mut out: Vec<Value> = items.iter().take(3).map(compact).collect();
            out.push(json!(format!("…({} entries)", items.len())));
            Value::Array(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(compact).collect()),
        Value::Object(map) if map.len() > 8 => {
            let mut out: Map<String, Value> = map
                .iter()
                .take(4)
                .map(|(k, v)| (short(k), compact(v)))
                .collect();
            out.insert("…".into(), json!(format!("{} entries", map.len())));
            Value::Object(out)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = if k.chars().count() > 40 {
                        format!(
                            "{}…({} chars)",
                            k.chars().take(12).collect::<String>(),
                            k.chars().count()
                        )
                    } else {
                        k.clone()
                    };
                    (key, compact(v))
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

fn contact_of(plan: &Plan, row: &Row) -> Option<usize> {
    let email = row.email.to_lowercase();
    plan.contacts.iter().position(|c| {
        c.account.name == row.account && c.email == email && c.account.provider == row.provider
    })
}

/// a: every accepted change ended delivered, or dead for an injected permanent error.
/// a: a lease expires only under a worker that was killed (the heartbeat of a live worker keeps
/// every lease, however slow its calls and however long its housekeeping). Not checked in
/// rounds that restart Postgres: a database down for longer than a lease expires them.
fn check_leases(plan: &Plan, killed: &[u32], rows: &[Row], v: &mut Violations) {
    for row in rows {
        let Some(errors) = row.errors.as_array() else {
            continue;
        };
        for e in errors {
            if e.get("kind").and_then(Value::as_str) != Some("lease_expired") {
                continue;
            }
            let text = e.get("error").and_then(Value::as_str).unwrap_or_default();
            // "lease expired: the worker HOST:PID:TAG stopped renewing it"
            let pid = text
                .split_whitespace()
                .nth(4)
                .and_then(|w| w.split(':').nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if !pid.is_some_and(|p| killed.contains(&p)) {
                let label = contact_of(plan, row).map_or_else(
                    || format!("{}/{}/{}", row.account, row.provider, row.email),
                    |ci| plan.contacts[ci].label(),
                );
                v.add(
                    "a: a live worker never loses a lease",
                    &label,
                    format!("{text} (killed: {killed:?}): {}", row.summary()),
                );
            }
        }
    }
}

fn check_jobs(plan: &Plan, ledger: &Ledger, rows: &[Row], v: &mut Violations) {
    let by_id: HashMap<i64, &Row> = rows.iter().map(|r| (r.id, r)).collect();
    let mut dead_per_contact: HashMap<usize, usize> = HashMap::new();
    for (id, (ci, chi)) in &ledger.accepted {
        let label = plan.contacts[*ci].label();
        let Some(row) = by_id.get(id) else {
            v.add(
                "a: accepted changes are kept",
                &label,
                format!("job {id} (change #{chi}) is gone"),
            );
            continue;
        };
        match row.state.as_str() {
            "succeeded" | "coalesced" => {}
            "dead" => {
                *dead_per_contact.entry(*ci).or_default() += 1;
                let codes = ledger.permanent.get(ci).cloned().unwrap_or_default();
                let last = row.last_error.clone().unwrap_or_default();
                let entry = row.errors.as_array().and_then(|e| e.last());
                let code = entry
                    .and_then(|e| e.get("code"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let kind = entry
                    .and_then(|e| e.get("kind"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let named = last.contains(PERMANENT_MARK)
                    && kind == "permanent"
                    && codes.iter().any(|c| c.to_string() == code);
                if !named || last.contains("lease expired") {
                    v.add(
                        "a: only injected permanent errors kill a job",
                        &label,
                        format!(
                            "{} (permanent codes injected for this contact: {codes:?})",
                            row.summary()
                        ),
                    );
                }
            }
            _ => v.add(
                "a: every accepted change ends succeeded, coalesced or dead",
                &label,
                row.summary(),
            ),
        }
    }
    for (ci, dead) in dead_per_contact {
        let injected = ledger.permanent.get(&ci).map_or(0, Vec::len);
        if dead > injected {
            v.add(
                "a: only injected permanent errors kill a job",
                &plan.contacts[ci].label(),
                format!("{dead} dead jobs, {injected} permanent errors injected"),
            );
        }
    }
    for row in rows {
        if ledger.accepted.contains_key(&row.id) {
            continue;
        }
        let label = contact_of(plan, row).map_or_else(
            || format!("{}/{}/{}", row.account, row.provider, row.email),
            |ci| plan.contacts[ci].label(),
        );
        if row.resend_after.is_none() {
            v.add(
                "a: only accepted changes (and confirmation re-sends) become jobs",
                &label,
                row.summary(),
            );
        } else if !(row.delivered()
            || (row.state == "cancelled"
                && row
                    .doi
                    .as_deref()
                    .is_some_and(|d| d.starts_with("superseded")))
            // an injected permanent refusal aimed at the contact hits its re-sends too
            || (row.state == "dead"
                && row
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(PERMANENT_MARK))))
        {
            v.add(
                "a: confirmation re-sends end delivered, superseded, or refused by an injected fault",
                &label,
                row.summary(),
            );
        }
    }
}

/// Was the status (subscribe / update_strategy) taken out of the call that carried this job?
fn status_stripped(doi: Option<&str>) -> bool {
    doi.is_some_and(|d| d == "suppressed" || d.starts_with("deferred_until"))
}

/// b: the sandbox's contact equals the reference model over the delivered changes.
fn check_contacts(plan: &Plan, sandbox: &Sandbox, rows: &[Row], v: &mut Violations) {
    let mut per_contact: HashMap<usize, Vec<&Row>> = HashMap::new();
    for row in rows {
        if let Some(ci) = contact_of(plan, row) {
            per_contact.entry(ci).or_default().push(row);
        }
    }
    let known: HashSet<(String, String, String)> = plan
        .contacts
        .iter()
        .map(|c| {
            (
                c.account.provider.to_string(),
                c.account.remote.to_string(),
                c.email.clone(),
            )
        })
        .collect();
    for (id, _) in sandbox.contacts() {
        if !known.contains(&id) {
            v.add(
                "b: the sandbox holds only planned contacts",
                &format!("{}/{}/{}", id.0, id.1, id.2),
                "a contact no accepted change names",
            );
        }
    }
    for (ci, contact) in plan.contacts.iter().enumerate() {
        let jobs = per_contact.remove(&ci).unwrap_or_default();
        let stripped_heads: HashSet<i64> = jobs
            .iter()
            .filter(|j| j.delivered() && status_stripped(j.doi.as_deref()))
            .map(|j| j.id)
            .collect();
        // c: the worker takes a pending status out of a call only inside another call's
        // confirmation window: another change of the contact (each account here has its own
        // API key, and a window belongs to a key and an address) asked for the pending status,
        // or is a re-send, and its call was made before: delivered before this call was, or
        // never delivered (an attempt whose answer was lost). Without this, a worker that took
        // every status out would pass: the model above takes out what the `doi` column says.
        for head in jobs.iter().filter(|j| stripped_heads.contains(&j.id)) {
            let held = jobs.iter().any(|k| {
                k.id != head.id
                    && k.coalesced_into != Some(head.id)
                    && (k.payload.get("subscribe").and_then(Value::as_i64) == Some(model::PENDING)
                        || k.resend_after.is_some())
                    && (k.attempts > 0 || k.coalesced_into.is_some())
                    && match (k.delivered(), k.finished_ms, head.finished_ms) {
                        (true, Some(k_done), Some(head_done)) => k_done < head_done,
                        (true, _, _) => false,
                        (false, _, _) => true,
                    }
            });
            if !held {
                v.add(
                    "c: a pending status is taken out only inside another call's window",
                    &contact.label(),
                    format!(
                        "no other call to the address asked for confirmation: {}",
                        head.summary()
                    ),
                );
            }
        }
        // The model over the delivered changes, plus those of `maybe` (changes whose attempt may
        // have reached the provider although it was never recorded as delivered), those of
        // `maybe_stripped` without their status: the worker may have taken it out of the call
        // (the confirmation window of an earlier call), which a job that never succeeded does
        // not record.
        let model_with =
            |maybe: &HashSet<i64>, maybe_stripped: &HashSet<i64>, v: &mut Violations| {
                let mut expected = ContactState::default();
                // (of delivered changes, of changes that may have reached the provider): a change
                // whose answer was lost may or may not have asked for an email, and the worker may
                // have taken the status out of it (the confirmation window of an earlier call),
                // which a job that never succeeded does not record
                let mut confirmations = (0u64, 0u64);
                for job in jobs
                    .iter()
                    .filter(|j| j.delivered() || maybe.contains(&j.id))
                {
                    let Value::Object(mut payload) = job.payload.clone() else {
                        v.add(
                            "b: model",
                            &contact.label(),
                            format!("payload is not an object: {}", job.summary()),
                        );
                        continue;
                    };
                    // the double-opt-in rule takes out the pending status only: any other
                    // status of a change merged into that call must still apply
                    let asks_pending =
                        payload.get("subscribe").and_then(Value::as_i64) == Some(model::PENDING);
                    if asks_pending
                        && (stripped_heads.contains(&job.id)
                            || maybe_stripped.contains(&job.id)
                            || job
                                .coalesced_into
                                .is_some_and(|h| stripped_heads.contains(&h)))
                    {
                        payload.remove("subscribe");
                        payload.remove("update_strategy");
                    }
                    if contact.account.provider == "justclick" {
                        match form_fields(&job.email, &payload) {
                            Ok(fields) => {
                                let fields: Vec<(String, String)> = fields
                                    .into_iter()
                                    .map(|(k, v)| (k.to_string(), v))
                                    .collect();
                                model::apply_justclick(&mut expected, &fields);
                            }
                            Err(e) => v.add(
                                "b: model",
                                &contact.label(),
                                format!("delivered job cannot be sent: {e}: {}", job.summary()),
                            ),
                        }
                    } else {
                        let effect = model::apply_smartlink(&mut expected, &payload);
                        if job.delivered() {
                            confirmations.0 += u64::from(effect.confirmation);
                        } else {
                            confirmations.1 += u64::from(effect.confirmation);
                        }
                    }
                }
                (expected, confirmations)
            };
        let maybe: Vec<i64> = jobs
            .iter()
            .filter(|j| j.maybe_applied())
            .map(|j| j.id)
            .take(4)
            .collect();
        let held_state = sandbox
            .contact(
                contact.account.provider,
                contact.account.remote,
                &contact.email,
            )
            .map(|c| c.state())
            .unwrap_or_default();
        // each change that may have reached the provider: not applied, applied, or applied
        // without its status where the worker could have taken it out: the change asked for
        // the pending status (a change asking for it never shares its call with another
        // status) while another change of the contact (one asking for it, or a re-send) could
        // hold the window
        let asks_pending =
            |j: &Row| j.payload.get("subscribe").and_then(Value::as_i64) == Some(model::PENDING);
        let may_be_stripped = |id: &i64| {
            jobs.iter().any(|j| j.id == *id && asks_pending(j))
                && jobs
                    .iter()
                    .any(|j| j.id != *id && (asks_pending(j) || j.resend_after.is_some()))
        };
        let mut candidates = Vec::new();
        for choice in 0..3u32.pow(maybe.len() as u32) {
            let mut include = HashSet::new();
            let mut stripped = HashSet::new();
            let mut redundant = false;
            for (i, id) in maybe.iter().enumerate() {
                match choice / 3u32.pow(i as u32) % 3 {
                    0 => {}
                    1 => {
                        include.insert(*id);
                    }
                    _ if may_be_stripped(id) => {
                        include.insert(*id);
                        stripped.insert(*id);
                    }
                    _ => redundant = true,
                }
            }
            if redundant {
                continue;
            }
            candidates.push(model_with(&include, &stripped, v));
        }
        // the histories that explain the contact the sandbox holds (all of them, when none
        // does: the first is reported); the emails they ask for bound the emails sent
        let explaining: Vec<&(ContactState, (u64, u64))> =
            candidates.iter().filter(|c| c.0 == held_state).collect();
        let explaining = if explaining.is_empty() {
            candidates.iter().collect()
        } else {
            explaining
        };
        let expected = explaining.first().map(|c| c.0.clone()).unwrap_or_default();
        let emails_at_least = explaining.iter().map(|c| c.1 .0).min().unwrap_or(0);
        let emails_at_most = explaining
            .iter()
            .map(|c| c.1 .0 + c.1 .1)
            .max()
            .unwrap_or(0);
        let held = sandbox.contact(
            contact.account.provider,
            contact.account.remote,
            &contact.email,
        );
        let actual = held.as_ref().map(|c| c.state()).unwrap_or_default();
        let history = || {
            jobs.iter()
                .map(|j| format!("\n    {}", j.summary()))
                .collect::<String>()
        };
        if actual != expected {
            let calls = replay_calls(contact.account, &jobs);
            let diagnosis = if calls == actual {
                "the sandbox holds what the calls carried (replaying each head with its coalesced \
                 followers through payload::take_group gives the sandbox's state): merging the \
                 changes into one call changed the outcome"
            } else {
                "the sandbox differs even from a replay of the calls as the worker merged them: a \
                 delivery was lost, repeated, reordered or recorded wrongly"
            };
            v.add(
                "b: provider state equals the model over the delivered changes",
                &contact.label(),
                format!(
                    "{}\n  diagnosis: {diagnosis}\n  jobs:{}",
                    diff(&expected, &actual),
                    history()
                ),
            );
        }
        // A retry of a call whose answer was lost repeats its request inside the hour: the
        // provider does not send a second email for it, and that is the only way to be sure the
        // change arrived. Any other repeated confirmation request is the worker's mistake.
        let answer_lost = jobs.iter().any(|j| {
            j.errors.as_array().is_some_and(|errors| {
                errors.iter().any(|e| {
                    matches!(
                        e.get("kind").and_then(Value::as_str),
                        Some("timeout" | "transport" | "lease_expired" | "abandoned")
                    )
                })
            })
        });
        let suppressed = held.as_ref().map_or(0, |c| c.confirmations_suppressed);
        if suppressed > 0 && !answer_lost {
            v.add(
                "c: never a second confirmation email within the hour",
                &contact.label(),
                format!(
                    "{suppressed} confirmation request(s) inside the hour of the previous one, with no lost answer to repeat\n  jobs:{}",
                    history()
                ),
            );
        }
        let sent = held.as_ref().map_or(0, |c| c.confirmation_emails);
        if sent < emails_at_least || sent > emails_at_most || sent > 1 {
            let asks = if emails_at_least == emails_at_most {
                emails_at_least.to_string()
            } else {
                format!("{emails_at_least} to {emails_at_most}")
            };
            v.add(
                "c: at most one confirmation email, as the model says",
                &contact.label(),
                format!(
                    "the model asks for {asks} confirmation email(s), the sandbox sent {sent} \
                     (calls asking for the pending status: {})\n  jobs:{}",
                    held.as_ref().map_or(0, |c| c.pending_requests),
                    history()
                ),
            );
        }
    }
}

/// The contact as the calls the worker made would leave it: each delivered head with its
/// coalesced followers merged by `payload::take_group` (what the executor does), in id order.
fn replay_calls(account: Account, jobs: &[&Row]) -> ContactState {
    let kind = if account.provider == "justclick" {
        ProviderKind::Justclick
    } else {
        ProviderKind::Smartlink
    };
    let mut state = ContactState::default();
    for head in jobs
        .iter()
        .filter(|j| j.state == "succeeded" && j.coalesced_into.is_none())
    {
        let payloads: Vec<Map<String, Value>> = std::iter::once(*head)
            .chain(
                jobs.iter()
                    .copied()
                    .filter(|j| j.coalesced_into == Some(head.id)),
            )
            .map(|j| j.payload.as_object().cloned().unwrap_or_default())
            .collect();
        let changes: Vec<payload::Change<'_>> = payloads
            .iter()
            .map(|p| payload::Change {
                id: head.id,
                payload: p,
                created_at_ms: 0,
            })
            .collect();
        let mut call = payload::take_group(kind, None, &changes).payload;
        if status_stripped(head.doi.as_deref()) {
            call.remove("subscribe");
            call.remove("update_strategy");
        }
        match kind {
            ProviderKind::Justclick => {
                if let Ok(fields) = form_fields(&head.email, &call) {
                    let fields: Vec<(String, String)> = fields
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                    model::apply_justclick(&mut state, &fields);
                }
            }
            ProviderKind::Smartlink => {
                model::apply_smartlink(&mut state, &call);
            }
        }
    }
    state
}

fn diff(expected: &ContactState, actual: &ContactState) -> String {
    let mut out = Vec::new();
    if expected.subscribe != actual.subscribe {
        out.push(format!(
            "subscribe: model {:?}, sandbox {:?}",
            expected.subscribe, actual.subscribe
        ));
    }
    if expected.modify_ts != actual.modify_ts {
        out.push(format!(
            "modify_ts: model {}, sandbox {}",
            expected.modify_ts, actual.modify_ts
        ));
    }
    let keys: BTreeSet<&String> = expected.fields.keys().chain(actual.fields.keys()).collect();
    for key in keys {
        let (e, a) = (expected.fields.get(key), actual.fields.get(key));
        if e == a {
            continue;
        }
        if let (Some(Value::Object(e)), Some(Value::Object(a))) = (e, a) {
            let names: BTreeSet<&String> = e.keys().chain(a.keys()).collect();
            for name in names {
                if e.get(name) != a.get(name) {
                    out.push(format!(
                        "{key}.{}: model {}, sandbox {}",
                        short(format!("{name:?}")),
                        short(format!("{:?}", e.get(name))),
                        short(format!("{:?}", a.get(name)))
                    ));
                }
            }
        } else {
            out.push(format!(
                "{key}: model {}, sandbox {}",
                short(format!("{e:?}")),
                short(format!("{a:?}"))
            ));
        }
    }
    if out.len() > 8 {
        let more = out.len() - 8;
        out.truncate(8);
        out.push(format!("… and {more} more differences"));
    }
    out.join("; ")
}

/// c: one call in flight per contact, no second confirmation email, every request verified.
fn check_sandbox_stats(sandbox: &Sandbox, v: &mut Violations) {
    let stats = sandbox.stats();
    if stats.max_in_flight_per_contact > 1 {
        v.add(
            "c: never two calls in flight for one contact",
            "(the sandbox does not say which)",
            format!("{stats:?}"),
        );
    }
    // (second confirmation requests are checked per contact, where a lost answer explains them)
    if stats.bad_signatures > 0 {
        v.add(
            "e: every request the worker sends verifies",
            "(the sandbox does not say which)",
            format!("{stats:?}"),
        );
    }
}

/// What may never appear in a log line or a stored error text.
fn forbidden(text: &str) -> Option<&'static str> {
    if let Some(secret) = SECRETS.iter().find(|s| text.contains(**s)) {
        return Some(if *secret == JC_SECRET || *secret == JC2_SECRET {
            "a JustClick secret"
        } else {
            "a Smartlink secret"
        });
    }
    if text.contains("sig=") {
        return Some("a Smartlink signature (sig=)");
    }
    if text.contains("hash=") {
        return Some("a JustClick request hash (hash=)");
    }
    if text.contains('\u{1b}') {
        return Some("a raw ESC");
    }
    if text.contains('\0') {
        return Some("a raw NUL");
    }
    None
}

/// d: no secret, signature, ESC or NUL in any worker's output or the stored error texts.
/// Returns how many bytes of worker output it read.
fn check_texts(dir: &Path, rows: &[Row], v: &mut Violations) -> usize {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut read = 0;
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        read += bytes.len();
        let text = String::from_utf8_lossy(&bytes);
        if let Some(line) = text.lines().find(|l| forbidden(l).is_some()) {
            v.add(
                "d: logs hold no secret, signature or control character",
                "(log)",
                format!(
                    "{} in {}: {:?}",
                    forbidden(line).unwrap_or_default(),
                    file.display(),
                    short(line)
                ),
            );
        }
    }
    for row in rows {
        let mut texts: Vec<String> = row.last_error.iter().cloned().collect();
        texts.extend(row.doi.iter().cloned());
        for entry in row.errors.as_array().into_iter().flatten() {
            for key in ["kind", "code", "error"] {
                if let Some(s) = entry.get(key).and_then(Value::as_str) {
                    texts.push(s.to_string());
                }
            }
        }
        if let Some(text) = texts.iter().find(|t| forbidden(t).is_some()) {
            v.add(
                "d: stored errors hold no secret, signature or control character",
                &format!("{}/{}/{}", row.account, row.provider, row.email),
                format!(
                    "{} in job {}: {:?}",
                    forbidden(text).unwrap_or_default(),
                    row.id,
                    short(text)
                ),
            );
        }
    }
    read
}
