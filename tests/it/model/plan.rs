//! A round's plan, drawn from its seed: the contact changes (valid ones at every limit,
//! adversarial ones enqueue must refuse), the worker settings and the fault schedule.

use super::{
    Account, ACCOUNTS, CHAOS, PERMANENT_MARK, REQUEST_TIMEOUT, SLOW_PAST_TIMEOUT_MS,
    SLOW_REQUEST_TIMEOUT, SLOW_STALL_MS, STALL_MS,
};
use chrono::Utc;
use contact_sync::sandbox::{Fault, FaultRule};
use fastrand::Rng;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// The plan: everything a round does, drawn from its seed before anything runs.

#[derive(Debug, Clone)]
pub(crate) enum Body {
    Json(Value),
    /// Payload text the JSON libraries cannot hold (numbers out of f64 range or precision).
    Raw(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum When {
    Now,
    /// `run_at` this many ms after the enqueue.
    Later(u64),
    /// A literal `run_at` (e.g. `-infinity`).
    Text(&'static str),
}

#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) email: String,
    pub(crate) body: Body,
    pub(crate) when: When,
    pub(crate) key: Option<String>,
    /// `Some(text)`: must be refused with SQLSTATE 22023 and a message containing `text`.
    pub(crate) refuse: Option<&'static str>,
    /// The isolation level of the transaction that records it.
    pub(crate) isolation: Isolation,
}

/// A producer transaction's isolation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isolation {
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Isolation {
    pub(crate) fn draw(rng: &mut Rng) -> Isolation {
        match rng.u8(..10) {
            0..=5 => Isolation::ReadCommitted,
            6 | 7 => Isolation::RepeatableRead,
            _ => Isolation::Serializable,
        }
    }

    pub(crate) fn sql(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "READ COMMITTED",
            Isolation::RepeatableRead => "REPEATABLE READ",
            Isolation::Serializable => "SERIALIZABLE",
        }
    }
}

pub(crate) struct ContactPlan {
    pub(crate) account: Account,
    /// Lower-cased address (changes may use other spellings of it).
    pub(crate) email: String,
    pub(crate) changes: Vec<Change>,
}

impl ContactPlan {
    pub(crate) fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            self.account.name, self.account.remote, self.email
        )
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSpec {
    pub(crate) max_coalesce: usize,
    pub(crate) concurrency: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum Action {
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

pub(crate) struct Plan {
    pub(crate) seed: u64,
    pub(crate) contacts: Vec<ContactPlan>,
    /// (contact, change) enqueued before the workers start, in this order.
    pub(crate) initial: Vec<(usize, usize)>,
    /// (when, contact, change) enqueued while the workers run.
    pub(crate) live: Vec<(Duration, usize, usize)>,
    pub(crate) actions: Vec<(Duration, Action)>,
    pub(crate) workers: Vec<WorkerSpec>,
    pub(crate) postgres_restarts: bool,
    /// Calls slower than the lease (stalls past it, with a request timeout longer still) and a
    /// long housekeeping run (a large finished backlog past a 1 h retention): the heartbeat must
    /// keep every lease of a live worker.
    pub(crate) slow_calls: bool,
}

pub(crate) fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

pub(crate) fn percent(rng: &mut Rng, p: u8) -> bool {
    rng.u8(..100) < p
}

pub(crate) fn worker_spec(rng: &mut Rng) -> WorkerSpec {
    WorkerSpec {
        max_coalesce: *pick(rng, &[1, 2, 3, 50, 50]),
        concurrency: *pick(rng, &[4, 8, 16]),
    }
}

pub(crate) fn plan_round(seed: u64) -> Plan {
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
                        isolation: Isolation::draw(&mut rng),
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
pub(crate) fn spelling(rng: &mut Rng, email: &str) -> String {
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

pub(crate) fn text_value(rng: &mut Rng, max_chars: usize) -> String {
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

pub(crate) fn justclick_payload(rng: &mut Rng) -> Value {
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

pub(crate) fn string_list(rng: &mut Rng) -> Value {
    match rng.u8(..6) {
        0 => json!([]),
        1 => json!(["a"]),
        2 => json!(["🙂 emoji", "ctl\u{1}\u{1b}x", "кириллица"]),
        3 => Value::Array((0..100).map(|i| json!(format!("t{i}"))).collect()),
        4 => json!(["x".repeat(255)]),
        _ => json!(["news", "promo"]),
    }
}

pub(crate) fn attribute_value(rng: &mut Rng) -> Value {
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

pub(crate) fn attribute_name(rng: &mut Rng) -> String {
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
pub(crate) fn smartlink_payload(rng: &mut Rng, ts: &mut i64) -> Value {
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
pub(crate) fn adversarial(rng: &mut Rng, account: Account, email: String) -> Change {
    let refused = |body: Body, expect: &'static str| Change {
        email: email.clone(),
        body,
        when: When::Now,
        key: None,
        refuse: Some(expect),
        isolation: Isolation::ReadCommitted,
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

pub(crate) fn plan_actions(
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

pub(crate) fn transient_fault(
    rng: &mut Rng,
    contacts: &[ContactPlan],
    slow_calls: bool,
) -> FaultRule {
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

pub(crate) fn permanent_text(round: u64) -> String {
    format!("bad\u{0}\u{1b}[31m {PERMANENT_MARK} r{round}\u{1b}[0m")
}
