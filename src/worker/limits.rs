//! Per-account admission in this process: how free slots are shared among accounts, and what
//! this worker knows about holds that are the fleet's (kept in `contact_sync.accounts`): pauses
//! (a provider's throttle answer, an operator's `accounts pause`), and when a limited account's
//! bucket or in-flight cap is worth asking again. The limits themselves are enforced in the
//! claim transaction ([`crate::outbox::claim::claim_within_limits`]); this only avoids asking
//! when the answer is known to be "nothing".

use crate::config::Settings;
use crate::outbox::accounts::AccountHold;
use crate::outbox::claim::{AccountQuota, Held};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How soon to ask again for an account whose `max_in_flight` calls are all in flight
/// (another worker's completion is not announced; this worker's own wakes it sooner).
const IN_FLIGHT_RECHECK: Duration = Duration::from_millis(50);

/// The longest this worker holds an account back on its own before asking the database again
/// (a pause recorded for longer is still the database's).
const LONGEST_HOLD: Duration = Duration::from_secs(86_400);

/// How soon to ask again for an account another worker was claiming for.
const BUSY_RECHECK: Duration = Duration::from_millis(10);

/// How soon to look again while the limits could not be registered yet.
const UNREGISTERED_RECHECK: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct Hold {
    /// Paused (throttle, operator) until then; `None` with `indefinite`: until resumed.
    paused_until: Option<Instant>,
    indefinite: bool,
    /// The bucket or the in-flight cap: not worth a claim before then.
    not_before: Option<Instant>,
}

/// What the producer may claim now, and when to look again if something is held back.
#[derive(Debug, Default)]
pub struct Plan {
    /// Accounts without fleet-wide limits: claimed in one statement.
    pub open: Vec<AccountQuota>,
    /// Accounts with `rate_limit_per_second` or `max_in_flight`: claimed within their budget.
    pub limited: Vec<AccountQuota>,
    /// Earliest moment a held-back account may take work again.
    pub wake_in: Option<Duration>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.limited.is_empty()
    }
}

#[derive(Debug)]
pub struct Limits {
    /// Accounts whose claims go through the shared budget: configured so here, or so in the
    /// database (another replica's limits are the account's too).
    configured: HashSet<String>,
    limited: Mutex<HashSet<String>>,
    holds: Mutex<HashMap<String, Hold>>,
    /// Rotates which accounts get the odd slots when slots are scarce.
    rotation: Mutex<usize>,
    /// Whether this worker's limits are in `contact_sync.accounts` (until then its limited
    /// accounts are not claimed: their rows might not carry the limits yet).
    registered: AtomicBool,
    /// Accounts this worker must not serve (its configuration gives them another provider
    /// than the fleet's).
    excluded: Mutex<HashSet<String>>,
}

impl Limits {
    pub fn from_settings(settings: &Settings) -> Self {
        let limited: HashSet<String> = settings
            .accounts
            .iter()
            .filter(|(_, a)| a.rate_limit_per_second.is_some() || a.max_in_flight.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        Self {
            configured: limited.clone(),
            limited: Mutex::new(limited),
            holds: Mutex::new(HashMap::new()),
            rotation: Mutex::new(0),
            registered: AtomicBool::new(false),
            excluded: Mutex::new(HashSet::new()),
        }
    }

    /// This worker never claims `account` again.
    pub fn exclude(&self, account: &str) {
        if let Ok(mut e) = self.excluded.lock() {
            e.insert(account.to_string());
        }
    }

    /// Whether this worker stands down from `account`.
    pub fn is_excluded(&self, account: &str) -> bool {
        self.excluded.lock().is_ok_and(|e| e.contains(account))
    }

    /// This worker's limits are registered: its limited accounts may be claimed.
    pub fn set_registered(&self) {
        self.registered.store(true, Ordering::Relaxed);
    }

    /// Shares `free` slots among the `accounts` not held back (at most `batch` each).
    pub fn plan(&self, accounts: &[String], free: usize, batch: usize) -> Plan {
        let now = Instant::now();
        let mut plan = Plan::default();
        let mut ready: Vec<&String> = Vec::new();
        let registered = self.registered.load(Ordering::Relaxed);
        let limited = self.limited.lock().map(|l| l.clone()).unwrap_or_default();
        let excluded = self.excluded.lock().map(|e| e.clone()).unwrap_or_default();
        {
            let Ok(mut holds) = self.holds.lock() else {
                return plan;
            };
            for account in accounts {
                if excluded.contains(account) {
                    continue;
                }
                if !registered && limited.contains(account) {
                    plan.wake_in = min_opt(plan.wake_in, UNREGISTERED_RECHECK);
                    continue;
                }
                if let Some(hold) = holds.get_mut(account) {
                    if hold.indefinite {
                        continue;
                    }
                    match hold.paused_until {
                        Some(until) if until > now => {
                            plan.wake_in = min_opt(plan.wake_in, until - now);
                            continue;
                        }
                        Some(_) => hold.paused_until = None,
                        None => {}
                    }
                    match hold.not_before {
                        Some(at) if at > now => {
                            plan.wake_in = min_opt(plan.wake_in, at - now);
                            continue;
                        }
                        Some(_) => hold.not_before = None,
                        None => {}
                    }
                }
                ready.push(account);
            }
        }
        if ready.is_empty() || free == 0 {
            return plan;
        }
        let n = ready.len();
        let start = self
            .rotation
            .lock()
            .map(|mut r| {
                *r = r.wrapping_add(1);
                *r % n
            })
            .unwrap_or(0);
        let (base, extra) = (free / n, free % n);
        for i in 0..n {
            let account = ready[(start + i) % n];
            let limit = (base + usize::from(i < extra)).min(batch);
            if limit == 0 {
                continue;
            }
            let quota = AccountQuota {
                account: account.clone(),
                limit: i32::try_from(limit).unwrap_or(i32::MAX),
            };
            if limited.contains(account) {
                plan.limited.push(quota);
            } else {
                plan.open.push(quota);
            }
        }
        plan
    }

    /// Takes in what a claim of limited accounts said held them back.
    pub fn held(&self, account: &str, held: Held) {
        let now = Instant::now();
        let later = |d: Duration| now + d.min(LONGEST_HOLD);
        let Ok(mut holds) = self.holds.lock() else {
            return;
        };
        let hold = holds.entry(account.to_string()).or_default();
        match held {
            Held::Paused(d) if d == Duration::MAX => hold.indefinite = true,
            Held::Paused(d) => hold.paused_until = Some(later(d)),
            // ±5% so replicas waiting for the same bucket do not all ask at once
            Held::Tokens(d) => {
                hold.not_before = Some(later(
                    d.min(LONGEST_HOLD).mul_f64(0.95 + fastrand::f64() * 0.1),
                ))
            }
            Held::InFlight => hold.not_before = Some(later(IN_FLIGHT_RECHECK)),
            Held::Busy => hold.not_before = Some(later(BUSY_RECHECK)),
        }
    }

    /// Holds the account back for `delay` (a throttle answer this worker saw; the fleet learns
    /// it from `contact_sync.accounts`).
    pub fn pause(&self, account: &str, delay: Duration) {
        let until = Instant::now() + delay.min(LONGEST_HOLD);
        if let Ok(mut holds) = self.holds.lock() {
            let hold = holds.entry(account.to_string()).or_default();
            hold.paused_until = Some(hold.paused_until.map_or(until, |u| u.max(until)));
        }
    }

    /// Replaces what this worker knows of pauses and limits with the database's (`rows`, for
    /// some of `accounts`; the others are neither paused nor limited beyond this worker's
    /// configuration).
    pub fn set_from_database(&self, accounts: &[String], rows: &[AccountHold]) {
        let now = Instant::now();
        if let Ok(mut limited) = self.limited.lock() {
            for account in accounts {
                let in_db = rows.iter().any(|r| &r.account == account && r.limited);
                if in_db || self.configured.contains(account) {
                    limited.insert(account.clone());
                } else {
                    limited.remove(account);
                }
            }
        }
        let Ok(mut holds) = self.holds.lock() else {
            return;
        };
        for account in accounts {
            let hold = holds.entry(account.clone()).or_default();
            let paused = rows
                .iter()
                .find(|r| &r.account == account)
                .and_then(|r| r.paused_for);
            match paused.as_ref() {
                Some(left) if *left == Duration::MAX => {
                    hold.indefinite = true;
                    hold.paused_until = None;
                }
                Some(left) => {
                    hold.indefinite = false;
                    hold.paused_until = Some(now + (*left).min(LONGEST_HOLD));
                }
                None => {
                    hold.indefinite = false;
                    hold.paused_until = None;
                }
            }
        }
    }

    /// How long the account stays paused as far as this worker knows (checked right before a
    /// call, so a pause another worker recorded stops calls already claimed).
    pub fn paused_for(&self, account: &str) -> Option<Duration> {
        let now = Instant::now();
        let holds = self.holds.lock().ok()?;
        let hold = holds.get(account)?;
        if hold.indefinite {
            return Some(Duration::MAX);
        }
        hold.paused_until.filter(|u| *u > now).map(|u| u - now)
    }

    /// The accounts an operator has not paused (a drain does not wait for those).
    pub fn not_paused_by_operator(&self, accounts: &[String]) -> Vec<String> {
        let Ok(holds) = self.holds.lock() else {
            return accounts.to_vec();
        };
        let excluded = self.excluded.lock().map(|e| e.clone()).unwrap_or_default();
        accounts
            .iter()
            .filter(|a| !holds.get(*a).is_some_and(|h| h.indefinite))
            // nor one this worker does not serve (a provider conflict)
            .filter(|a| !excluded.contains(*a))
            .cloned()
            .collect()
    }
}

fn min_opt(current: Option<Duration>, candidate: Duration) -> Option<Duration> {
    Some(current.map_or(candidate, |c| c.min(candidate)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountSettings, ProviderKind};

    fn settings(rate: Option<f64>) -> Settings {
        let mut s = Settings::default();
        for name in ["a", "b"] {
            s.accounts.insert(
                name.into(),
                AccountSettings {
                    provider: ProviderKind::Justclick,
                    login: Some("x".into()),
                    game_id: None,
                    secret: crate::secret::Secret::new("s"),
                    base_url: None,
                    rate_limit_per_second: if name == "a" { rate } else { None },
                    burst: None,
                    max_in_flight: None,
                    allow_insecure_http: false,
                    double_opt_in: Default::default(),
                    retryable_codes: vec![],
                    missing_contact: Default::default(),
                },
            );
        }
        s
    }

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn total(plan: &Plan) -> i32 {
        plan.open.iter().chain(&plan.limited).map(|q| q.limit).sum()
    }

    #[test]
    fn slots_are_shared_and_never_exceeded() {
        let limits = Limits::from_settings(&settings(None));
        limits.set_registered();
        for free in [1, 2, 3, 31, 32] {
            let plan = limits.plan(&names(), free, 100);
            assert_eq!(total(&plan) as usize, free);
            assert!(plan.limited.is_empty());
        }
        let plan = limits.plan(&names(), 32, 10);
        assert!(plan.open.iter().all(|q| q.limit == 10));
    }

    #[test]
    fn a_limited_account_goes_through_the_budget_and_waits_when_told() {
        let limits = Limits::from_settings(&settings(Some(2.0)));
        // not registered yet: the limited account waits
        let plan = limits.plan(&names(), 32, 100);
        assert!(plan.limited.is_empty());
        assert_eq!(plan.wake_in, Some(UNREGISTERED_RECHECK));
        limits.set_registered();
        let plan = limits.plan(&names(), 32, 100);
        assert_eq!(plan.limited.len(), 1);
        assert_eq!(plan.limited[0].account, "a");
        assert_eq!(plan.open[0].account, "b");
        limits.held("a", Held::Tokens(Duration::from_millis(400)));
        let plan = limits.plan(&names(), 32, 100);
        assert!(plan.limited.is_empty());
        assert_eq!(plan.open[0].limit, 32);
        let wake = plan.wake_in.unwrap();
        assert!(wake > Duration::from_millis(350) && wake <= Duration::from_millis(420));
    }

    #[test]
    fn pauses_hold_back_one_account_and_follow_the_database() {
        let limits = Limits::from_settings(&settings(None));
        limits.set_registered();
        limits.pause("a", Duration::from_secs(60));
        let plan = limits.plan(&names(), 32, 100);
        assert_eq!(plan.open.len(), 1);
        assert_eq!(plan.open[0].account, "b");
        assert!(plan.wake_in.unwrap() > Duration::from_secs(50));
        assert!(limits.paused_for("a").is_some());
        // resumed elsewhere: the database says nothing is paused
        limits.set_from_database(&names(), &[]);
        assert_eq!(limits.paused_for("a"), None);
        assert_eq!(limits.plan(&names(), 32, 100).open.len(), 2);
        // an operator's pause: until resumed, and a drain does not wait for it
        limits.set_from_database(
            &names(),
            &[AccountHold {
                account: "b".into(),
                paused_for: Some(Duration::MAX),
                limited: false,
            }],
        );
        assert_eq!(limits.paused_for("b"), Some(Duration::MAX));
        assert_eq!(
            limits.not_paused_by_operator(&names()),
            vec!["a".to_string()]
        );
        let plan = limits.plan(&names(), 32, 100);
        assert_eq!(plan.open.len(), 1);
        assert_eq!(plan.wake_in, None);
        // limits another replica registered apply here too
        limits.set_from_database(
            &names(),
            &[AccountHold {
                account: "a".into(),
                paused_for: None,
                limited: true,
            }],
        );
        let plan = limits.plan(&names(), 32, 100);
        assert_eq!(plan.limited.len(), 1);
        assert_eq!(plan.limited[0].account, "a");
    }
}
