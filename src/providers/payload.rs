//! Provider-native payloads as the outbox stores them (a JSON object per job) and the
//! coalescing planner: which consecutive changes of one contact can ride in one call, and what
//! that call sends. The rule it keeps, proven against [`super::model`] by a property test:
//! **the merged call leaves the provider in the state the changes applied one by one would**
//! (same fields, same status, same confirmation emails asked for), and never exceeds a provider
//! limit. Where no single call can do that, the group ends and the rest waits for the next call.
//! Field-level validation lives in the database (`contact_sync.validate_job`) and again in each
//! client before sending.

use super::model::{self, StatusOp};
use crate::config::ProviderKind;
use serde_json::{Map, Value};

pub type Payload = Map<String, Value>;

/// Smartlink's cap on attributes in one call.
pub const SMARTLINK_MAX_ATTRIBUTES: usize = 50;

/// One change of a contact, in queue order.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub id: i64,
    pub payload: &'a Payload,
    /// When it was enqueued (ms): Smartlink's `modify_ts` when the payload has none.
    pub created_at_ms: i64,
}

/// The call for a group of consecutive changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub payload: Payload,
    /// How many of the changes (from the first) the call covers; at least 1.
    pub taken: usize,
    /// Smartlink: the change (index) whose status the call carries last, if any. When the call
    /// asks for the pending status it is the one change that does (no other status shares
    /// its call), and the confirmation window is held in that change's name: a retry of it,
    /// alone or merged into a later call, is the same request.
    pub status_from: Option<usize>,
}

/// What the worker knows of the Smartlink `modify_ts` the provider holds for a contact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeldModifyTs {
    /// The newest `modify_ts` a delivered call carried: the provider holds at least this.
    pub known: Option<i64>,
    /// The newest `modify_ts` a call whose answer was lost (a timeout, a worker gone mid-call)
    /// may have carried: the provider may hold anything up to this.
    pub uncertain: Option<i64>,
}

/// Takes the longest prefix of `changes` (non-empty, head first) that one call can carry
/// exactly, and the payload of that call.
///
/// `held`: what the provider holds for the contact, as far as the worker knows. A head older
/// than `held.known` is discarded by the provider, so it must not lend its fields to the later
/// changes of its group. A change older than `held.uncertain` (and not older than what comes
/// before it) may or may not be discarded, depending on whether that lost call arrived: merged
/// into a later change it would apply for certain, so it goes alone and the provider decides.
pub fn take_group(provider: ProviderKind, held: HeldModifyTs, changes: &[Change<'_>]) -> Group {
    let Some(head) = changes.first() else {
        return Group {
            payload: Payload::new(),
            taken: 0,
            status_from: None,
        };
    };
    let smartlink = provider == ProviderKind::Smartlink;
    let head = normalized(provider, head);
    // (a change a lost call may have made stale, unless it is stale for certain)
    let uncertain = |ts_of: i64| smartlink && held.uncertain.is_some_and(|u| ts_of < u);
    let mut acc = match held.known {
        Some(known) if smartlink && ts(&head) < known => {
            // The provider will discard the head: the call starts from "no change".
            let mut empty = Payload::new();
            empty.insert("modify_ts".into(), Value::from(known));
            empty
        }
        _ if uncertain(ts(&head)) => {
            return Group {
                status_from: StatusOp::of(&head).is_some().then_some(0),
                payload: head,
                taken: 1,
            };
        }
        _ => head,
    };
    let mut status_from = (smartlink && StatusOp::of(&acc).is_some()).then_some(0);
    let mut taken = 1;
    for change in &changes[1..] {
        let later = normalized(provider, change);
        if ts(&later) >= ts(&acc) && uncertain(ts(&later)) {
            break;
        }
        let merged = match provider {
            ProviderKind::Justclick => Some(merge_justclick(&acc, &later)),
            ProviderKind::Smartlink => merge_smartlink(&acc, &later),
        };
        match merged {
            Some(m) => {
                // a stale change rides along without effect
                if smartlink && ts(&later) >= ts(&acc) && StatusOp::of(&later).is_some() {
                    status_from = Some(taken);
                }
                acc = m;
                taken += 1;
            }
            None => break,
        }
    }
    Group {
        payload: acc,
        taken,
        status_from,
    }
}

fn normalized(provider: ProviderKind, change: &Change<'_>) -> Payload {
    let mut p = change.payload.clone();
    if provider == ProviderKind::Smartlink && p.get("modify_ts").and_then(Value::as_i64).is_none() {
        p.insert("modify_ts".into(), Value::from(change.created_at_ms));
    }
    p
}

/// JustClick: every field replaces; the later value wins.
fn merge_justclick(acc: &Payload, later: &Payload) -> Payload {
    let mut out = acc.clone();
    for (k, v) in later {
        out.insert(k.clone(), v.clone());
    }
    out
}

fn ts(p: &Payload) -> i64 {
    p.get("modify_ts").and_then(Value::as_i64).unwrap_or(0)
}

/// Smartlink: `None` when no single call equals `acc` then `later`.
fn merge_smartlink(acc: &Payload, later: &Payload) -> Option<Payload> {
    // After `acc` the contact's modify_ts is at least acc's: an older change is discarded by
    // the provider whatever it holds, so it rides along with no effect.
    if ts(later) < ts(acc) {
        return Some(acc.clone());
    }
    // The double-opt-in rule may take the pending status out of a call (another call holds
    // the confirmation window), and any status merged with it would go too:
    // an unsubscribe followed by a re-subscription asking for confirmation became one call
    // asking for confirmation, and with that taken out the unsubscribe was lost. A change that
    // asks for the pending status shares its call with no other status.
    if let (Some(a), Some(b)) = (StatusOp::of(acc), StatusOp::of(later)) {
        if a.subscribe == model::PENDING || b.subscribe == model::PENDING {
            return None;
        }
    }
    let mut out = acc.clone();
    out.insert("modify_ts".into(), Value::from(ts(later)));
    for key in ["tags", "openid", "preferences"] {
        if let Some(v) = later.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    for key in ["location", "language"] {
        match later.get(key) {
            Some(Value::String(s)) if s.is_empty() => {} // empty does not overwrite
            Some(v) => {
                out.insert(key.into(), v.clone());
            }
            None => {}
        }
    }
    if let Some(Value::Object(new)) = later.get("attributes") {
        let mut attrs = match out.get("attributes") {
            Some(Value::Object(a)) => a.clone(),
            _ => Map::new(),
        };
        for (k, v) in new {
            attrs.insert(k.clone(), v.clone());
        }
        if attrs.len() > SMARTLINK_MAX_ATTRIBUTES {
            return None;
        }
        out.insert("attributes".into(), Value::Object(attrs));
    }
    let status = compose(StatusOp::of(acc), StatusOp::of(later))?;
    out.remove("subscribe");
    out.remove("update_strategy");
    if let Some(op) = status {
        out.insert("subscribe".into(), Value::from(op.subscribe));
        if op.strategy != model::default_strategy(op.subscribe) {
            out.insert("update_strategy".into(), Value::from(op.strategy));
        }
    }
    Some(out)
}

/// Every status a contact can have before a call.
const STATUSES: [Option<i64>; 5] = [None, Some(-1), Some(0), Some(1), Some(3)];

fn run(ops: &[Option<StatusOp>], start: Option<i64>) -> (Option<i64>, u32) {
    let mut status = start;
    let mut emails = 0;
    for op in ops.iter().flatten() {
        let (next, asked) = op.apply(status);
        status = next;
        emails += u32::from(asked);
    }
    (status, emails)
}

/// One status operation equal to `first` then `second` on every starting status (same final
/// status, same confirmation emails asked for); `Some(None)` is "no status in the call";
/// `None`: no single operation does it.
fn compose(first: Option<StatusOp>, second: Option<StatusOp>) -> Option<Option<StatusOp>> {
    let target: Vec<_> = STATUSES.iter().map(|s| run(&[first, second], *s)).collect();
    let same = |op: Option<StatusOp>| {
        STATUSES
            .iter()
            .map(|s| run(&[op], *s))
            .eq(target.iter().copied())
    };
    let mut candidates = vec![second, first, None];
    for subscribe in [1, 0, -1, 3] {
        for strategy in 0..=3 {
            candidates.push(Some(StatusOp {
                subscribe,
                strategy,
            }));
        }
    }
    candidates.into_iter().find(|op| same(*op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::model::{apply_justclick, apply_smartlink, ContactState};
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Payload {
        v.as_object().unwrap().clone()
    }

    fn group(provider: ProviderKind, payloads: &[Payload]) -> Group {
        group_after(provider, None, payloads)
    }

    fn group_after(provider: ProviderKind, known: Option<i64>, payloads: &[Payload]) -> Group {
        group_held(
            provider,
            HeldModifyTs {
                known,
                uncertain: None,
            },
            payloads,
        )
    }

    fn group_held(provider: ProviderKind, held: HeldModifyTs, payloads: &[Payload]) -> Group {
        let changes: Vec<Change<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Change {
                id: i as i64,
                payload: p,
                created_at_ms: 1000 + i as i64,
            })
            .collect();
        take_group(provider, held, &changes)
    }

    #[test]
    fn justclick_later_fields_win() {
        let g = group(
            ProviderKind::Justclick,
            &[
                obj(json!({"lead_name": "A", "lead_city": "X"})),
                obj(json!({"lead_name": "B"})),
            ],
        );
        assert_eq!(g.taken, 2);
        assert_eq!(
            Value::Object(g.payload),
            json!({"lead_name": "B", "lead_city": "X"})
        );
    }

    #[test]
    fn an_unsubscribe_is_not_lost_to_a_later_strategy() {
        // Regression: {"subscribe":0} then {"update_strategy":2,"tags":["x"]} kept the
        // contact subscribed.
        let g = group(
            ProviderKind::Smartlink,
            &[
                obj(json!({"subscribe": 0, "modify_ts": 1})),
                obj(json!({"update_strategy": 2, "tags": ["x"], "modify_ts": 2})),
            ],
        );
        assert_eq!(g.taken, 2);
        assert_eq!(g.payload["subscribe"], json!(0));
        let mut c = ContactState {
            subscribe: Some(1),
            ..Default::default()
        };
        apply_smartlink(&mut c, &g.payload);
        assert_eq!(c.subscribe, Some(0));
    }

    #[test]
    fn an_unsubscribe_is_not_merged_into_a_call_asking_for_confirmation() {
        // Regression (the model test, seed 927240252511): {"subscribe":0} then
        // {"subscribe":3,"update_strategy":1} became one call asking for the pending status;
        // inside another call's confirmation window the worker took that status out, and the
        // unsubscribe went with it.
        let changes = [
            obj(json!({"subscribe": 0, "update_strategy": 3, "modify_ts": 1})),
            obj(json!({"subscribe": 3, "update_strategy": 1, "modify_ts": 2})),
        ];
        let g = group(ProviderKind::Smartlink, &changes);
        assert_eq!(g.taken, 1);
        assert_eq!(g.payload["subscribe"], json!(0));
        // and the other way round: the confirmation request keeps its own call
        let g = group(
            ProviderKind::Smartlink,
            &[
                obj(json!({"subscribe": 3, "modify_ts": 1})),
                obj(json!({"subscribe": 1, "modify_ts": 2})),
            ],
        );
        assert_eq!(g.taken, 1);
        // a change without a status still rides along with either
        let g = group(
            ProviderKind::Smartlink,
            &[
                changes[1].clone(),
                obj(json!({"tags": ["x"], "modify_ts": 3})),
            ],
        );
        assert_eq!(g.taken, 2);
        assert_eq!(g.payload["subscribe"], json!(3));
    }

    #[test]
    fn attributes_over_the_cap_split_the_group() {
        // Regression: two valid changes of 30 attributes each merged into one call of 60.
        let a: Map<String, Value> = (0..30).map(|i| (format!("a{i}"), json!(i))).collect();
        let b: Map<String, Value> = (0..30).map(|i| (format!("b{i}"), json!(i))).collect();
        let g = group(
            ProviderKind::Smartlink,
            &[
                obj(json!({"attributes": a, "modify_ts": 1})),
                obj(json!({"attributes": b, "modify_ts": 2})),
            ],
        );
        assert_eq!(g.taken, 1);
        assert_eq!(g.payload["attributes"].as_object().unwrap().len(), 30);
    }

    #[test]
    fn stale_followers_ride_along_without_effect() {
        let g = group(
            ProviderKind::Smartlink,
            &[
                obj(json!({"tags": ["new"], "modify_ts": 200})),
                obj(json!({"tags": ["old"], "modify_ts": 100})),
            ],
        );
        assert_eq!(g.taken, 2);
        assert_eq!(
            Value::Object(g.payload),
            json!({"tags": ["new"], "modify_ts": 200})
        );
    }

    // ---- the property: coalesced calls == one by one, against the reference model ----

    fn smartlink_change() -> impl Strategy<Value = Payload> {
        let status = prop_oneof![
            Just(None),
            (
                prop_oneof![Just(1i64), Just(0), Just(-1), Just(3)],
                proptest::option::of(0i64..=3)
            )
                .prop_map(Some),
        ];
        let strategy_alone = proptest::option::of(0i64..=3);
        (
            0i64..6, // modify_ts: small range so equal and decreasing values are frequent
            status,
            strategy_alone,
            proptest::option::of(proptest::collection::vec("[ab]", 0..3)),
            proptest::option::of(prop_oneof![Just(""), Just("004"), Just("250")]),
            proptest::option::of(prop_oneof![Just(""), Just("en"), Just("pt-BR")]),
            proptest::option::of(proptest::collection::btree_map(
                "k[0-9]{1,2}",
                0i64..3,
                0..30,
            )),
            proptest::option::of(prop_oneof![Just("1"), Just("22")]),
        )
            .prop_map(
                |(ts, status, lone_strategy, tags, location, language, attrs, openid)| {
                    let mut p = Payload::new();
                    p.insert("modify_ts".into(), json!(ts));
                    match status {
                        Some((s, strategy)) => {
                            p.insert("subscribe".into(), json!(s));
                            if let Some(st) = strategy {
                                p.insert("update_strategy".into(), json!(st));
                            }
                        }
                        None => {
                            if let Some(st) = lone_strategy {
                                p.insert("update_strategy".into(), json!(st));
                            }
                        }
                    }
                    if let Some(t) = tags {
                        p.insert("tags".into(), json!(t));
                    }
                    if let Some(l) = location {
                        p.insert("location".into(), json!(l));
                    }
                    if let Some(l) = language {
                        p.insert("language".into(), json!(l));
                    }
                    if let Some(a) = attrs {
                        p.insert("attributes".into(), json!(a));
                    }
                    if let Some(o) = openid {
                        p.insert("openid".into(), json!(o));
                    }
                    p
                },
            )
    }

    fn justclick_change() -> impl Strategy<Value = Payload> {
        proptest::collection::btree_map(
            prop_oneof![
                Just("lead_name"),
                Just("lead_phone"),
                Just("lead_city"),
                Just("lead_tags")
            ],
            prop_oneof![Just(""), Just("x"), Just("y,z")],
            0..4,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect()
        })
    }

    fn initial_contact() -> impl Strategy<Value = ContactState> {
        (
            proptest::option::of(prop_oneof![Just(1i64), Just(0), Just(-1), Just(3)]),
            0i64..6,
        )
            .prop_map(|(subscribe, modify_ts)| ContactState {
                subscribe,
                modify_ts,
                ..Default::default()
            })
    }

    fn jc_fields(p: &Payload) -> Vec<(String, String)> {
        crate::providers::justclick::form_fields("a@b.co", p)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn smartlink_coalescing_equals_one_by_one(start in initial_contact(),
                                                  changes in proptest::collection::vec(smartlink_change(), 1..8)) {
            let mut one_by_one = start.clone();
            let mut emails_one = 0;
            for c in &changes {
                emails_one += u32::from(apply_smartlink(&mut one_by_one, c).confirmation);
            }
            let mut coalesced = start.clone();
            let mut emails_co = 0;
            let mut rest: &[Payload] = &changes;
            while !rest.is_empty() {
                let g = group_after(ProviderKind::Smartlink, Some(coalesced.modify_ts), rest);
                prop_assert!(g.taken >= 1);
                let n_attrs = g.payload.get("attributes").and_then(Value::as_object).map_or(0, Map::len);
                prop_assert!(n_attrs <= SMARTLINK_MAX_ATTRIBUTES);
                // the merged call is itself a valid body
                prop_assert!(crate::providers::smartlink::body("a@b.co", &g.payload, 0).is_ok());
                emails_co += u32::from(apply_smartlink(&mut coalesced, &g.payload).confirmation);
                rest = &rest[g.taken..];
            }
            prop_assert_eq!(&coalesced, &one_by_one, "changes {:?}", changes);
            prop_assert_eq!(emails_co, emails_one);
        }

        #[test]
        fn smartlink_coalescing_equals_one_by_one_whether_or_not_a_lost_call_arrived(
            start in initial_contact(),
            lost in smartlink_change(),
            arrived in any::<bool>(),
            changes in proptest::collection::vec(smartlink_change(), 1..8)) {
            // A call whose answer was lost may have reached the provider, or not (regression:
            // the model test, seed 622952402601: a change older than the lost call was merged
            // into a newer one and applied, where the provider, having taken the lost call,
            // discards it). The worker knows what its delivered calls carried, and that the
            // lost one carried at most its own modify_ts; either way, its calls must leave the
            // contact as the changes one by one would.
            let mut actual = start.clone();
            if arrived {
                apply_smartlink(&mut actual, &lost);
            }
            let mut one_by_one = actual.clone();
            for c in &changes {
                apply_smartlink(&mut one_by_one, c);
            }
            let mut coalesced = actual;
            let mut held = HeldModifyTs { known: Some(start.modify_ts), uncertain: Some(ts(&lost)) };
            let mut rest: &[Payload] = &changes;
            while !rest.is_empty() {
                let g = group_held(ProviderKind::Smartlink, held, rest);
                prop_assert!(g.taken >= 1);
                apply_smartlink(&mut coalesced, &g.payload);
                // (the watermark a delivered call leaves)
                held.known = held.known.max(Some(ts(&g.payload)));
                rest = &rest[g.taken..];
            }
            prop_assert_eq!(&coalesced, &one_by_one, "lost {:?} (arrived: {}), changes {:?}", lost, arrived, changes);
        }

        #[test]
        fn smartlink_coalescing_loses_no_status_when_confirmation_is_taken_out(
            start in initial_contact(),
            changes in proptest::collection::vec(smartlink_change(), 1..8)) {
            // Another call holds the confirmation window: the worker takes the pending status
            // out of every call asking for it. Only those statuses may be
            // lost, never one merged into the same call (an unsubscribe followed by a
            // re-subscription asking for confirmation kept the contact pending).
            let asks_pending = |p: &Payload| p.get("subscribe").and_then(Value::as_i64) == Some(model::PENDING);
            let taken_out = |p: &Payload| {
                let mut p = p.clone();
                if asks_pending(&p) {
                    p.remove("subscribe");
                    p.remove("update_strategy");
                }
                p
            };
            let mut one_by_one = start.clone();
            for c in &changes {
                apply_smartlink(&mut one_by_one, &taken_out(c));
            }
            let mut coalesced = start.clone();
            let mut rest: &[Payload] = &changes;
            while !rest.is_empty() {
                let g = group_after(ProviderKind::Smartlink, Some(coalesced.modify_ts), rest);
                if asks_pending(&g.payload) {
                    // the window is held in the name of the one change asking for it
                    let from = g.status_from.expect("a call with a status names its change");
                    prop_assert!(from < g.taken && asks_pending(&rest[from]), "{:?}", g);
                }
                apply_smartlink(&mut coalesced, &taken_out(&g.payload));
                rest = &rest[g.taken..];
            }
            prop_assert_eq!(&coalesced, &one_by_one, "changes {:?}", changes);
        }

        #[test]
        fn justclick_coalescing_equals_one_by_one(changes in proptest::collection::vec(justclick_change(), 1..8)) {
            let mut one_by_one = ContactState::default();
            for c in &changes {
                apply_justclick(&mut one_by_one, &jc_fields(c));
            }
            let mut coalesced = ContactState::default();
            let mut rest: &[Payload] = &changes;
            while !rest.is_empty() {
                let g = group(ProviderKind::Justclick, rest);
                apply_justclick(&mut coalesced, &jc_fields(&g.payload));
                rest = &rest[g.taken..];
            }
            prop_assert_eq!(coalesced, one_by_one);
        }
    }
}
