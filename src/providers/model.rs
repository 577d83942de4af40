//! The reference model of each provider's update semantics: what one accepted change does to
//! the contact the provider holds. Written once and used everywhere it matters: the sandbox
//! applies changes with it, the coalescing planner ([`super::payload::take_group`]) is proven
//! against it (merging changes must equal applying them one by one), and the randomized
//! end-to-end test replays delivered changes through it.
//!
//! - **JustClick** `UpdateSubscriberData`: every field sent replaces the stored one; an omitted
//!   field stays (`lead_tags` is stored as the comma-joined text sent).
//! - **Smartlink** `SyncUserByEmail`: a change whose `modify_ts` is older than the contact's is
//!   discarded whole; otherwise `tags`, `openid`, `preferences` replace, `location` and
//!   `language` replace unless empty, `attributes` merge key by key, and `subscribe` overwrites
//!   the status only where the `update_strategy` table says so (absent strategy: the status's
//!   default). Setting the pending status (3) where the table says "update" asks for a
//!   confirmation email.

use serde::Serialize;
use serde_json::{Map, Value};

/// A contact as a provider holds it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ContactState {
    /// Current field values (Smartlink `attributes` is an object merged key by key).
    pub fields: Map<String, Value>,
    /// Smartlink status (1, 0, -1, 3); `None` for a contact that never had one.
    pub subscribe: Option<i64>,
    /// Smartlink: the newest `modify_ts` applied.
    pub modify_ts: i64,
}

/// What applying one change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effect {
    /// False when the change was discarded as stale (Smartlink `modify_ts`).
    pub applied: bool,
    /// The change asked for a confirmation email (Smartlink pending status written).
    pub confirmation: bool,
}

/// JustClick: each field sent replaces the stored value.
pub fn apply_justclick(contact: &mut ContactState, fields: &[(String, String)]) -> Effect {
    for (k, v) in fields.iter().filter(|(k, _)| k != "lead_email") {
        contact.fields.insert(k.clone(), Value::String(v.clone()));
    }
    Effect {
        applied: true,
        confirmation: false,
    }
}

/// The documented default `update_strategy` for a status.
pub fn default_strategy(subscribe: i64) -> i64 {
    match subscribe {
        1 => 0,
        0 => 1,
        -1 => 2,
        _ => 3,
    }
}

/// Does `update_strategy` let `subscribe` overwrite the `current` status?
/// Columns: subscribed (1) / unsubscribed (0) / unknown (-1 or none) / pending (3).
pub fn overwrites(strategy: i64, current: Option<i64>) -> bool {
    let column = match current {
        Some(1) => 0,
        Some(0) => 1,
        Some(3) => 3,
        _ => 2,
    };
    const TABLE: [[bool; 4]; 4] = [
        [true, true, true, false],
        [true, true, true, true],
        [false, false, true, false],
        [false, true, true, true],
    ];
    usize::try_from(strategy)
        .ok()
        .and_then(|s| TABLE.get(s))
        .is_some_and(|row| row[column])
}

/// Smartlink's pending status (`subscribe = 3`): importing a contact as pending asks for a
/// confirmation email (double opt-in).
pub const PENDING: i64 = 3;

/// The status part of one change: `subscribe` with its effective strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusOp {
    pub subscribe: i64,
    pub strategy: i64,
}

impl StatusOp {
    /// Reads `subscribe` / `update_strategy` of a Smartlink body (a strategy without a status
    /// means nothing and is ignored, as the provider does).
    pub fn of(doc: &Map<String, Value>) -> Option<StatusOp> {
        let subscribe = doc.get("subscribe").and_then(Value::as_i64)?;
        let strategy = doc
            .get("update_strategy")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| default_strategy(subscribe));
        Some(StatusOp {
            subscribe,
            strategy,
        })
    }

    /// New status and whether a confirmation email is asked for.
    pub fn apply(self, current: Option<i64>) -> (Option<i64>, bool) {
        if overwrites(self.strategy, current) {
            (Some(self.subscribe), self.subscribe == PENDING)
        } else {
            (current, false)
        }
    }
}

/// Smartlink: applies one (valid) request body. `modify_ts` must be present.
pub fn apply_smartlink(contact: &mut ContactState, doc: &Map<String, Value>) -> Effect {
    let modify_ts = doc.get("modify_ts").and_then(Value::as_i64).unwrap_or(0);
    if modify_ts < contact.modify_ts {
        return Effect::default();
    }
    contact.modify_ts = modify_ts;
    for key in ["tags", "openid", "location", "language", "preferences"] {
        match doc.get(key) {
            Some(Value::String(s)) if s.is_empty() && (key == "location" || key == "language") => {}
            Some(v) => {
                contact.fields.insert(key.to_string(), v.clone());
            }
            None => {}
        }
    }
    if let Some(Value::Object(attrs)) = doc.get("attributes") {
        let entry = contact
            .fields
            .entry("attributes")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(current) = entry {
            for (k, v) in attrs {
                current.insert(k.clone(), v.clone());
            }
        }
    }
    let mut confirmation = false;
    if let Some(op) = StatusOp::of(doc) {
        let (status, asked) = op.apply(contact.subscribe);
        contact.subscribe = status;
        confirmation = asked;
    }
    Effect {
        applied: true,
        confirmation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn strategy_table() {
        // 0 → yes / yes / yes / no
        assert!(
            overwrites(0, Some(1))
                && overwrites(0, Some(0))
                && overwrites(0, Some(-1))
                && !overwrites(0, Some(3))
        );
        // 1 → yes everywhere
        assert!([Some(1), Some(0), None, Some(3)]
            .iter()
            .all(|c| overwrites(1, *c)));
        // 2 → no / no / yes / no
        assert!(
            !overwrites(2, Some(1))
                && !overwrites(2, Some(0))
                && overwrites(2, None)
                && !overwrites(2, Some(3))
        );
        // 3 → no / yes / yes / yes
        assert!(!overwrites(3, Some(1)) && overwrites(3, Some(0)) && overwrites(3, Some(3)));
        assert_eq!(default_strategy(3), 3);
        assert!(!overwrites(9, None));
    }

    #[test]
    fn stale_changes_are_discarded_whole() {
        let mut c = ContactState::default();
        apply_smartlink(
            &mut c,
            &obj(json!({"modify_ts": 200, "tags": ["a"], "subscribe": 1})),
        );
        let before = c.clone();
        let e = apply_smartlink(
            &mut c,
            &obj(json!({"modify_ts": 100, "tags": ["b"], "subscribe": 0})),
        );
        assert!(!e.applied);
        assert_eq!(c, before);
    }

    #[test]
    fn empty_location_does_not_overwrite_and_attributes_merge() {
        let mut c = ContactState::default();
        apply_smartlink(
            &mut c,
            &obj(json!({"modify_ts": 1, "location": "004", "attributes": {"a": 1}})),
        );
        apply_smartlink(
            &mut c,
            &obj(json!({"modify_ts": 2, "location": "", "attributes": {"b": 2}})),
        );
        assert_eq!(c.fields["location"], json!("004"));
        assert_eq!(c.fields["attributes"], json!({"a": 1, "b": 2}));
    }

    #[test]
    fn unsubscribe_then_strategy_without_status_keeps_unsubscribed() {
        let mut c = ContactState {
            subscribe: Some(1),
            ..Default::default()
        };
        apply_smartlink(&mut c, &obj(json!({"modify_ts": 1, "subscribe": 0})));
        apply_smartlink(
            &mut c,
            &obj(json!({"modify_ts": 2, "update_strategy": 2, "tags": ["x"]})),
        );
        assert_eq!(c.subscribe, Some(0));
    }
}
