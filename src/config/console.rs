//! `[console]`: where the operator console listens, how long a sign-in lasts, and who may sign
//! in (users with a role and an Argon2 password hash, never a password).

use super::{invalid, ConfigError};
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Where `contact-sync run` also serves the console (empty: it does not;
    /// `contact-sync console` listens on `--listen`, or here).
    #[serde(default)]
    pub listen: String,
    /// How long a sign-in lasts (then the browser is asked to sign in again).
    #[serde(default = "default_session_ttl", with = "crate::duration::serde_text")]
    pub session_ttl: Duration,
    /// The shortest interval at which the overview is read from the database again, however
    /// many browsers refresh it.
    #[serde(
        default = "default_refresh_interval",
        with = "crate::duration::serde_text"
    )]
    pub refresh_interval: Duration,
    /// Who may sign in, by user name.
    #[serde(default)]
    pub users: BTreeMap<String, ConsoleUser>,
    /// Host names the console answers to besides IP addresses and `localhost` (the name a
    /// reverse proxy passes on in `Host`); any other is refused (DNS rebinding).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Whether cookies carry `Secure` (default: unless the console listens on loopback; set it
    /// behind a TLS proxy on the same host).
    #[serde(default)]
    pub secure_cookies: Option<bool>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            listen: String::new(),
            session_ttl: default_session_ttl(),
            refresh_interval: default_refresh_interval(),
            users: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            secure_cookies: None,
        }
    }
}

fn default_session_ttl() -> Duration {
    Duration::from_secs(8 * 3600)
}

fn default_refresh_interval() -> Duration {
    Duration::from_secs(5)
}

/// One person who may sign in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUser {
    pub role: ConsoleRole,
    /// An Argon2 hash in PHC form (`$argon2id$...`), as `contact-sync console hash-password`
    /// prints it.
    pub password_hash: Secret,
}

/// What a user may do: a viewer reads, an operator also acts (retry, cancel, pause, resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleRole {
    Viewer,
    Operator,
}

impl ConsoleRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleRole::Viewer => "viewer",
            ConsoleRole::Operator => "operator",
        }
    }

    pub fn parse(text: &str) -> Option<ConsoleRole> {
        match text {
            "viewer" => Some(ConsoleRole::Viewer),
            "operator" => Some(ConsoleRole::Operator),
            _ => None,
        }
    }
}

impl ConsoleSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "console.listen",
                "must be an address like 127.0.0.1:8090, or empty",
            ));
        }
        if self.session_ttl < Duration::from_secs(60)
            || self.session_ttl > Duration::from_secs(30 * 86_400)
        {
            return Err(invalid("console.session_ttl", "must be between 1m and 30d"));
        }
        if self.refresh_interval < Duration::from_secs(1)
            || self.refresh_interval > Duration::from_secs(3600)
        {
            return Err(invalid(
                "console.refresh_interval",
                "must be between 1s and 1h",
            ));
        }
        for host in &self.allowed_hosts {
            if host.is_empty()
                || host.len() > 253
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            {
                return Err(invalid(
                    "console.allowed_hosts",
                    format!(
                        "{host:?} is not a host name (like console.example.com, without a port)"
                    ),
                ));
            }
        }
        for (name, user) in &self.users {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
            {
                return Err(invalid(
                    format!("console.users.{name}"),
                    "a user name is 1 to 64 of a-z, A-Z, 0-9 and . _ - @",
                ));
            }
            if argon2::PasswordHash::new(user.password_hash.expose()).is_err()
                || !user.password_hash.expose().starts_with("$argon2")
            {
                return Err(invalid(
                    format!("console.users.{name}.password_hash"),
                    "must be an Argon2 hash ($argon2id$...): print one with `contact-sync console hash-password`",
                ));
            }
        }
        Ok(())
    }
}
