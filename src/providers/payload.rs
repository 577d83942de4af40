//! Provider-native payloads as the outbox stores them (a JSON object per job) and the merge rule
//! for coalescing: applying the merged payload once has the same effect as applying each in
//! order. Field-level validation lives in the database (`contact_sync.validate_job`) and again in
//! each client before sending.

use crate::config::ProviderKind;
use serde_json::{Map, Value};

pub type Payload = Map<String, Value>;

/// Folds `later` into `acc` (DESIGN.md rule 2): later scalar fields override earlier ones.
/// Smartlink extras: `attributes` merge key by key (the provider always applies each one),
/// `modify_ts` keeps the newest, and a later `subscribe` brings its own `update_strategy` (or
/// none), because the strategy only means something next to the status it guards.
pub fn merge(provider: ProviderKind, acc: &mut Payload, later: &Payload) {
    if provider == ProviderKind::Smartlink && later.contains_key("subscribe") {
        acc.remove("update_strategy");
    }
    for (key, value) in later {
        match (provider, key.as_str()) {
            (ProviderKind::Smartlink, "attributes") => {
                if let (Some(Value::Object(current)), Value::Object(new)) =
                    (acc.get_mut("attributes"), value)
                {
                    for (k, v) in new {
                        current.insert(k.clone(), v.clone());
                    }
                    continue;
                }
                acc.insert(key.clone(), value.clone());
            }
            (ProviderKind::Smartlink, "modify_ts") => {
                let newest = match (acc.get("modify_ts").and_then(Value::as_i64), value.as_i64()) {
                    (Some(a), Some(b)) => Value::from(a.max(b)),
                    _ => value.clone(),
                };
                acc.insert(key.clone(), newest);
            }
            _ => {
                acc.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Payload {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn later_scalars_override() {
        let mut acc = obj(json!({"lead_name": "A", "lead_city": "X"}));
        merge(
            ProviderKind::Justclick,
            &mut acc,
            &obj(json!({"lead_name": "B"})),
        );
        assert_eq!(
            Value::Object(acc),
            json!({"lead_name": "B", "lead_city": "X"})
        );
    }

    #[test]
    fn smartlink_attributes_merge_and_modify_ts_is_newest() {
        let mut acc = obj(json!({"attributes": {"a": "1", "b": "1"}, "modify_ts": 200}));
        merge(
            ProviderKind::Smartlink,
            &mut acc,
            &obj(json!({"attributes": {"b": "2"}, "modify_ts": 100})),
        );
        assert_eq!(
            Value::Object(acc),
            json!({"attributes": {"a": "1", "b": "2"}, "modify_ts": 200})
        );
    }

    #[test]
    fn later_subscribe_carries_its_own_strategy() {
        let mut acc = obj(json!({"subscribe": 0, "update_strategy": 1}));
        merge(
            ProviderKind::Smartlink,
            &mut acc,
            &obj(json!({"subscribe": 1})),
        );
        assert_eq!(Value::Object(acc), json!({"subscribe": 1}));
        let mut acc = obj(json!({"subscribe": 0, "update_strategy": 1}));
        merge(
            ProviderKind::Smartlink,
            &mut acc,
            &obj(json!({"tags": ["x"]})),
        );
        assert_eq!(
            Value::Object(acc),
            json!({"subscribe": 0, "update_strategy": 1, "tags": ["x"]})
        );
    }
}
