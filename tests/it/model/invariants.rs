//! The invariants a round is held to once it has drained, each against the reference model
//! (`providers::model`) and the sandbox's record of every call, never against what the worker
//! happened to do.

use super::plan::Plan;
use super::round::{short, Ledger};
use super::{replay, Account, JC2_SECRET, PERMANENT_MARK, SECRETS};
use crate::helpers::*;
use contact_sync::config::ProviderKind;
use contact_sync::providers::justclick::form_fields;
use contact_sync::providers::model::{self, ContactState};
use contact_sync::providers::payload;
use contact_sync::sandbox::Sandbox;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Running a round.

/// Violations found in a round, each naming the invariant, the seed and the contact.
pub(crate) struct Violations {
    pub(crate) seed: u64,
    pub(crate) logs: PathBuf,
    pub(crate) items: Vec<String>,
}

impl Violations {
    pub(crate) fn add(&mut self, invariant: &str, contact: &str, detail: impl Display) {
        self.items.push(format!(
            "[{invariant}] seed {} contact {contact}: {detail}",
            self.seed
        ));
    }

    pub(crate) fn context(&self) -> String {
        format!(
            "seed {} (replay: {}; worker logs in {})",
            self.seed,
            replay(self.seed),
            self.logs.display()
        )
    }

    pub(crate) fn finish(&self) {
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

// ---------------------------------------------------------------------------------------------
// The invariants.

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Row {
    pub(crate) id: i64,
    pub(crate) provider: String,
    pub(crate) account: String,
    pub(crate) email: String,
    pub(crate) state: String,
    pub(crate) payload: Value,
    pub(crate) doi: Option<String>,
    pub(crate) coalesced_into: Option<i64>,
    pub(crate) resend_after: Option<i64>,
    pub(crate) last_error: Option<String>,
    pub(crate) errors: Value,
    pub(crate) attempts: i32,
    /// `finished_at` in ms (database time).
    pub(crate) finished_ms: Option<f64>,
    /// `unchanged`: its call was not made, the provider held the change already.
    pub(crate) outcome: Option<String>,
}

impl Row {
    pub(crate) fn delivered(&self) -> bool {
        self.state == "succeeded" || self.state == "coalesced"
    }

    /// Not delivered, but an attempt may have reached the provider before its answer was lost
    /// (a timeout, a transport error, a worker killed mid-call): the provider may have acted.
    pub(crate) fn maybe_applied(&self) -> bool {
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

    pub(crate) fn summary(&self) -> String {
        format!(
            "#{} {} attempts={} errors={:?} doi={:?} into={:?} resend_after={:?} last_error={:?} payload={}",
            self.id,
            self.state,
            self.attempts,
            self.errors
                .as_array()
                .map(|errors| errors
                    .iter()
                    .map(|e| format!(
                        "{}:{}",
                        e.get("attempt").map_or(Value::Null, Clone::clone),
                        e.get("kind").and_then(Value::as_str).unwrap_or("?")
                    ))
                    .collect::<Vec<_>>())
                .unwrap_or_default(),
            self.doi,
            self.coalesced_into,
            self.resend_after,
            self.last_error.as_deref().map(short),
            compact(&self.payload)
        )
    }
}

/// A payload for a failure message: every key, long texts and lists abbreviated.
pub(crate) fn compact(value: &Value) -> Value {
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

pub(crate) fn contact_of(plan: &Plan, row: &Row) -> Option<usize> {
    let email = row.email.to_lowercase();
    plan.contacts.iter().position(|c| {
        c.account.name == row.account && c.email == email && c.account.provider == row.provider
    })
}

/// a: every accepted change ended delivered, or dead for an injected permanent error.
/// a: a lease expires only under a worker that was killed (the heartbeat of a live worker keeps
/// every lease, however slow its calls and however long its housekeeping). Not checked in
/// rounds that restart Postgres: a database down for longer than a lease expires them.
pub(crate) fn check_leases(plan: &Plan, killed: &[u32], rows: &[Row], v: &mut Violations) {
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

pub(crate) fn check_jobs(plan: &Plan, ledger: &Ledger, rows: &[Row], v: &mut Violations) {
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
        // (the application's captured users have their own invariants: `app::check`)
        if ledger.accepted.contains_key(&row.id) || row.email.ends_with(super::app::DOMAIN) {
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
/// Equal fields and status, whatever the modify_ts.
pub(crate) fn same_but_modify_ts(a: &ContactState, b: &ContactState) -> bool {
    a.fields == b.fields && a.subscribe == b.subscribe
}

pub(crate) fn status_stripped(doi: Option<&str>) -> bool {
    doi.is_some_and(|d| d == "suppressed" || d.starts_with("deferred_until"))
}

/// b: the sandbox's contact equals the reference model over the delivered changes.
pub(crate) fn check_contacts(plan: &Plan, sandbox: &Sandbox, rows: &[Row], v: &mut Violations) {
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
        // (the application's captured users are checked against their table: `app::check`)
        if !known.contains(&id) && !id.2.ends_with(super::app::DOMAIN) {
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
        let unchanged_calls: HashSet<i64> = jobs
            .iter()
            .filter(|j| j.state == "succeeded" && j.outcome.as_deref() == Some("unchanged"))
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
        let model_with = |maybe: &HashSet<i64>,
                          maybe_stripped: &HashSet<i64>,
                          v: &mut Violations| {
            let mut expected = ContactState::default();
            // (of delivered changes, of changes that may have reached the provider): a change
            // whose answer was lost may or may not have asked for an email, and the worker may
            // have taken the status out of it (the confirmation window of an earlier call),
            // which a job that never succeeded does not record
            let mut confirmations = (0u64, 0u64);
            // (the skipped call being applied: its head, and the state before it)
            let mut skipped_from: Option<(i64, ContactState)> = None;
            let considered: Vec<&Row> = jobs
                .iter()
                .copied()
                .filter(|j| j.delivered() || maybe.contains(&j.id))
                .collect();
            for (at, job) in considered.iter().copied().enumerate() {
                // a call the worker did not make because the provider held it already (the
                // synced state of a captured account): applied as if sent, the call as a whole
                // (its head and the changes merged into it: a value changed and changed back
                // within one call is held already) must change no field or status; the
                // provider's own modify_ts stays where it was (the worker keeps the newer one
                // as its watermark, so later stale changes are dropped as the provider would
                // drop them)
                let skipped_head = if unchanged_calls.contains(&job.id) {
                    Some(job.id)
                } else {
                    job.coalesced_into.filter(|h| unchanged_calls.contains(h))
                };
                if let Some(head) = skipped_head {
                    if skipped_from.as_ref().is_none_or(|(h, _)| *h != head) {
                        skipped_from = Some((head, expected.clone()));
                    }
                    let mut with = expected.clone();
                    if contact.account.provider == "justclick" {
                        if let Ok(fields) =
                            form_fields(&job.email, job.payload.as_object().unwrap_or(&Map::new()))
                        {
                            let fields: Vec<(String, String)> = fields
                                .into_iter()
                                .map(|(k, v)| (k.to_string(), v))
                                .collect();
                            model::apply_justclick(&mut with, &fields);
                        }
                    } else if let Some(p) = job.payload.as_object() {
                        model::apply_smartlink(&mut with, p);
                    }
                    let last_of_call = !considered[at + 1..]
                        .iter()
                        .any(|j| j.id == head || j.coalesced_into == Some(head));
                    if last_of_call {
                        if let Some((_, before)) = skipped_from.take() {
                            if !same_but_modify_ts(&with, &before) {
                                v.add(
                                    "b: a call is skipped only when the provider holds it already",
                                    &contact.label(),
                                    format!("{}: {}", diff(&with, &before), job.summary()),
                                );
                            }
                        }
                    }
                    expected = with;
                    continue;
                }
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
        // (a skipped call leaves the provider's modify_ts behind the model's)
        let holds = |model: &ContactState, provider: &ContactState| {
            model == provider
                || (!unchanged_calls.is_empty()
                    && provider.modify_ts <= model.modify_ts
                    && same_but_modify_ts(model, provider))
        };
        let explaining: Vec<&(ContactState, (u64, u64))> = candidates
            .iter()
            .filter(|c| holds(&c.0, &held_state))
            .collect();
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
        let expected = if holds(&expected, &actual) {
            actual.clone()
        } else {
            expected
        };
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
pub(crate) fn replay_calls(account: Account, jobs: &[&Row]) -> ContactState {
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
        let mut call =
            payload::take_group(kind, payload::HeldModifyTs::default(), &changes).payload;
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

pub(crate) fn diff(expected: &ContactState, actual: &ContactState) -> String {
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
pub(crate) fn check_sandbox_stats(sandbox: &Sandbox, v: &mut Violations) {
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
pub(crate) fn forbidden(text: &str) -> Option<&'static str> {
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
pub(crate) fn check_texts(dir: &Path, rows: &[Row], v: &mut Violations) -> usize {
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
