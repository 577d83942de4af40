//! The provider seam: the [`Provider`] trait every client implements, the [`Registry`] from
//! account name to client, and the shared pieces (HTTP hygiene, outcome classification,
//! payload merging). The worker sees providers only through this module.

#[doc(hidden)]
pub mod address;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod justclick;
#[doc(hidden)]
pub mod model;
#[doc(hidden)]
pub mod outcome;
#[doc(hidden)]
pub mod payload;
#[doc(hidden)]
pub mod smartlink;

use crate::config::{DoubleOptIn, ProviderKind, Settings};
#[doc(hidden)]
pub use outcome::{DeliveryError, RetryReason};
use payload::Payload;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

#[doc(hidden)]
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[doc(hidden)]
/// One call to make: the (possibly merged) change of one contact.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub job_id: i64,
    pub attempt: i32,
    pub email: &'a str,
    pub payload: &'a Payload,
    /// When the change was enqueued (ms since the epoch); Smartlink's `modify_ts` fallback.
    pub created_at_ms: i64,
}

#[doc(hidden)]
/// A successful call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The provider's own words (`error_text` / `msg`).
    pub detail: String,
    /// The provider does not have the contact and the account skips such changes
    /// (`missing_contact = "skip"`): finished, nothing changed at the provider.
    pub not_found: bool,
}

#[doc(hidden)]
/// A provider account's client.
pub trait Provider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;

    /// Sends one change, verifies the answer, classifies the outcome.
    fn deliver<'a>(
        &'a self,
        delivery: Delivery<'a>,
    ) -> BoxFuture<'a, Result<Delivered, DeliveryError>>;

    /// For providers with a confirmation-email window: the key that window is counted per
    /// (never the secret itself) and the account's policy.
    fn double_opt_in(&self) -> Option<(&str, DoubleOptIn)> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("could not build the HTTP client: {0}")]
    Client(String),
    #[error("configuration key accounts.{account}.base_url: {reason}")]
    BaseUrl { account: String, reason: String },
}

/// Account name → client. Jobs of accounts not in the registry wait in the queue.
#[derive(Clone, Default)]
pub struct Registry {
    accounts: BTreeMap<String, Arc<dyn Provider>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.accounts.keys()).finish()
    }
}

impl Registry {
    /// Builds a client per configured account, all sharing one HTTP client.
    pub fn from_settings(settings: &Settings) -> Result<Registry, RegistryError> {
        let client = http::build_client(&settings.http, settings.worker.concurrency)
            .map_err(|e| RegistryError::Client(crate::text::error_chain(&e)))?;
        let mut registry = Registry::default();
        for (name, account) in &settings.accounts {
            let base = crate::config::check_base_url(
                &account.effective_base_url(),
                account.allow_insecure_http,
            )
            .map_err(|reason| RegistryError::BaseUrl {
                account: name.clone(),
                reason,
            })?;
            let provider: Arc<dyn Provider> = match account.provider {
                ProviderKind::Justclick => {
                    Arc::new(justclick::JustClick::new(account, base, client.clone()))
                }
                ProviderKind::Smartlink => {
                    Arc::new(smartlink::Smartlink::new(account, base, client.clone()))
                }
            };
            registry.accounts.insert(name.clone(), provider);
        }
        Ok(registry)
    }

    /// Adds or replaces one account's client (tests, embedding applications).
    pub fn insert(&mut self, account: impl Into<String>, provider: Arc<dyn Provider>) {
        self.accounts.insert(account.into(), provider);
    }

    pub fn get(&self, account: &str) -> Option<&Arc<dyn Provider>> {
        self.accounts.get(account)
    }

    pub fn account_names(&self) -> Vec<String> {
        self.accounts.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }
}

#[doc(hidden)]
/// Lower-case hex md5, the digest both providers sign with.
pub fn md5_hex(parts: &[&[u8]]) -> String {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(32);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[doc(hidden)]
/// Compares two hex digests without an early exit.
pub fn digest_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn md5_hex_is_lowercase() {
        assert_eq!(
            super::md5_hex(&[b"a", b"bc"]),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert!(super::digest_eq("ABCDEF", "abcdef"));
        assert!(!super::digest_eq("abcdee", "abcdef"));
        assert!(!super::digest_eq("abc", "abcdef"));
    }
}
