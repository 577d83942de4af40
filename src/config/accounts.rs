//! Provider accounts as the configuration names them: which provider, its credentials and
//! endpoint, its fleet-wide limits and its per-provider choices.

use crate::secret::Secret;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Justclick,
    Smartlink,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Justclick => "justclick",
            ProviderKind::Smartlink => "smartlink",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "justclick" => Some(ProviderKind::Justclick),
            "smartlink" => Some(ProviderKind::Smartlink),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a Smartlink account does with a confirmation email the provider would not send again
/// within its one-hour window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DoubleOptIn {
    /// Send the other fields now, re-send the pending status when the window ends.
    #[default]
    Defer,
    /// Send the other fields, record that no email was triggered.
    Drop,
}

/// What a JustClick account does when the provider does not have the contact (code 500
/// "subscriber not found": `UpdateSubscriberData` updates existing contacts only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingContact {
    /// The job goes `dead` with the provider's code and text (an operator looks at it).
    #[default]
    Dead,
    /// The job finishes `succeeded` with `outcome = not_found`: for applications that sync
    /// every user to a provider that holds only its subscribers.
    Skip,
}

/// One provider account. Which fields apply depends on `provider`; `validate` checks them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    pub provider: ProviderKind,
    /// JustClick login (also its third-level domain).
    pub login: Option<String>,
    /// Smartlink project id (`gameid`).
    pub game_id: Option<String>,
    /// The account's API key.
    pub secret: Secret,
    /// Defaults to the provider's public endpoint.
    pub base_url: Option<String>,
    /// Calls per second for the account across every worker sharing the database (unset:
    /// unlimited).
    pub rate_limit_per_second: Option<f64>,
    /// Token-bucket burst, fleet-wide (default: one second's worth, at least 1).
    pub burst: Option<u32>,
    /// Calls in flight at once for the account across every worker (unset: unlimited).
    pub max_in_flight: Option<u32>,
    /// Allow an `http://` base URL that is not loopback.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Smartlink only.
    #[serde(default)]
    pub double_opt_in: DoubleOptIn,
    /// Provider codes to treat as retryable on top of the built-in ones.
    #[serde(default)]
    pub retryable_codes: Vec<i64>,
    /// JustClick only: `dead` (default) or `skip` for a contact the provider does not have.
    #[serde(default)]
    pub missing_contact: MissingContact,
}

impl AccountSettings {
    /// The base URL the client calls: the configured one or the provider's public endpoint.
    pub fn effective_base_url(&self) -> String {
        if let Some(url) = &self.base_url {
            return url.trim_end_matches('/').to_string();
        }
        match self.provider {
            ProviderKind::Justclick => {
                format!(
                    "https://{}.justclick.ru",
                    self.login.as_deref().unwrap_or_default()
                )
            }
            ProviderKind::Smartlink => "https://openapi.smartlink.intlgame.com".to_string(),
        }
    }
}

/// `[a-z0-9_]{1,64}`: the same rule as the jobs table's CHECK.
pub fn valid_account_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
