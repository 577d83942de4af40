//! Scripted faults for the sandbox: each rule matches by provider, account and address, fires
//! `times` times, and is set through [`Faults::push`] or `POST /_sandbox/faults`.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;

/// What to do instead of (or before) the normal answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this HTTP status (e.g. 500, 502, 503) and a short text body.
    Status { status: u16 },
    /// HTTP 429 with `Retry-After: secs`.
    RateLimit { retry_after_secs: u64 },
    /// Apply the change, then wait this long before answering (past the client's timeout, the
    /// change is applied but the answer is lost).
    Stall { ms: u64 },
    /// Wait this long, then apply the change and answer: past the client's timeout, the change
    /// is applied after the client gave up, as a real service behind a gateway does.
    Slow { ms: u64 },
    /// A well-formed answer whose signature is wrong (JustClick `hash`; Smartlink `seq` echo).
    ForgeSignature,
    /// A success answer without what proves it (JustClick: no `hash`; Smartlink: no `seq`).
    Unverifiable,
    /// A signed answer with this provider code and text.
    ErrorCode { code: i64, text: String },
    /// A 200 answer that is not JSON.
    Malformed,
    /// Headers and half a body, then the connection is dropped (reset mid-response).
    Reset,
}

/// One scripted fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// `justclick` or `smartlink`; any when absent.
    #[serde(default)]
    pub provider: Option<String>,
    /// JustClick login or Smartlink game id; any when absent.
    #[serde(default)]
    pub account: Option<String>,
    /// Lower-cased address; any when absent.
    #[serde(default)]
    pub email: Option<String>,
    pub fault: Fault,
    /// How many matching requests it applies to.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

impl FaultRule {
    pub fn new(fault: Fault, times: u32) -> Self {
        Self {
            provider: None,
            account: None,
            email: None,
            fault,
            times,
        }
    }
    pub fn provider(mut self, provider: &str) -> Self {
        self.provider = Some(provider.into());
        self
    }
    pub fn account(mut self, account: &str) -> Self {
        self.account = Some(account.into());
        self
    }
    pub fn email(mut self, email: &str) -> Self {
        self.email = Some(email.to_lowercase());
        self
    }
}

/// The fault script and the per-request delay.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
    delay: Mutex<Duration>,
}

impl Faults {
    pub fn push(&self, rule: FaultRule) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.push(rule);
        }
    }

    pub fn clear(&self) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.clear();
        }
        self.set_delay(Duration::ZERO);
    }

    /// Every request waits this long before it is answered.
    pub fn set_delay(&self, delay: Duration) {
        if let Ok(mut d) = self.delay.lock() {
            *d = delay;
        }
    }

    pub fn delay(&self) -> Duration {
        self.delay.lock().map(|d| *d).unwrap_or_default()
    }

    /// Rules not used up yet.
    pub fn remaining(&self) -> u32 {
        self.rules
            .lock()
            .map(|r| r.iter().map(|r| r.times).sum())
            .unwrap_or(0)
    }

    /// Takes the first matching rule's fault (one use).
    pub fn take(&self, provider: &str, account: &str, email: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().ok()?;
        let email = email.to_lowercase();
        let index = rules.iter().position(|r| {
            r.times > 0
                && r.provider.as_deref().is_none_or(|p| p == provider)
                && r.account.as_deref().is_none_or(|a| a == account)
                && r.email.as_deref().is_none_or(|e| e == email)
        })?;
        let rule = &mut rules[index];
        rule.times -= 1;
        let fault = rule.fault.clone();
        if rule.times == 0 {
            rules.remove(index);
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_and_run_out() {
        let f = Faults::default();
        f.push(FaultRule::new(Fault::Status { status: 503 }, 2).provider("smartlink"));
        assert_eq!(f.take("justclick", "x", "a@b.c"), None);
        assert_eq!(
            f.take("smartlink", "1", "a@b.c"),
            Some(Fault::Status { status: 503 })
        );
        assert_eq!(
            f.take("smartlink", "1", "a@b.c"),
            Some(Fault::Status { status: 503 })
        );
        assert_eq!(f.take("smartlink", "1", "a@b.c"), None);
        let rule: FaultRule = serde_json::from_str(
            r#"{"fault":{"kind":"rate_limit","retry_after_secs":3},"times":1}"#,
        )
        .unwrap();
        assert_eq!(
            rule.fault,
            Fault::RateLimit {
                retry_after_secs: 3
            }
        );
    }
}
