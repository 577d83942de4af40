//! Configuration: one typed [`Settings`] struct, loaded from a TOML file (`--config PATH` or
//! `CONTACT_SYNC_CONFIG`), then `CONTACT_SYNC__SECTION__KEY` environment overrides, with
//! `DATABASE_URL` honoured, and validated once at start with errors that name the key.
//! Secrets are [`Secret`]s: `Debug` of the settings prints `[redacted]`.

mod explain;

use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Everything a contact-sync process reads from its configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub database: DatabaseSettings,
    #[serde(default)]
    pub worker: WorkerSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub http: HttpSettings,
    /// Provider accounts by name (`[a-z0-9_]`, so env overrides can name them).
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://...`; may carry a password, hence a secret.
    pub url: Option<Secret>,
    /// Pool size of one process (the worker needs a few: claim, complete, heartbeat, listen).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: defaults::max_connections(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Provider calls in flight per process.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Jobs per claim statement.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// How long a claim is held without a heartbeat.
    #[serde(default = "defaults::lease", with = "crate::duration::serde_text")]
    pub lease: Duration,
    /// Fallback wake-up when no NOTIFY arrives (jittered by up to 10%).
    #[serde(
        default = "defaults::poll_interval",
        with = "crate::duration::serde_text"
    )]
    pub poll_interval: Duration,
    /// Attempts before a job goes `dead` (a job's own `max_attempts` column wins).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: i32,
    #[serde(
        default = "defaults::backoff_base",
        with = "crate::duration::serde_text"
    )]
    pub backoff_base: Duration,
    #[serde(
        default = "defaults::backoff_cap",
        with = "crate::duration::serde_text"
    )]
    pub backoff_cap: Duration,
    /// How long SIGTERM waits for in-flight calls before releasing them.
    #[serde(
        default = "defaults::shutdown_timeout",
        with = "crate::duration::serde_text"
    )]
    pub shutdown_timeout: Duration,
    /// Consecutive jobs of one contact merged into one call at most.
    #[serde(default = "defaults::max_coalesce")]
    pub max_coalesce: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: defaults::concurrency(),
            batch_size: defaults::batch_size(),
            lease: defaults::lease(),
            poll_interval: defaults::poll_interval(),
            max_attempts: defaults::max_attempts(),
            backoff_base: defaults::backoff_base(),
            backoff_cap: defaults::backoff_cap(),
            shutdown_timeout: defaults::shutdown_timeout(),
            max_coalesce: defaults::max_coalesce(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// `succeeded`, `coalesced` and `cancelled` rows older than this are pruned.
    #[serde(default = "defaults::retention", with = "crate::duration::serde_text")]
    pub finished: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            finished: defaults::retention(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// `/metrics`, `/healthz`, `/readyz`; loopback by default; `""` turns it off.
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(
        default = "defaults::connect_timeout",
        with = "crate::duration::serde_text"
    )]
    pub connect_timeout: Duration,
    /// Whole-request timeout of one provider call.
    #[serde(
        default = "defaults::request_timeout",
        with = "crate::duration::serde_text"
    )]
    pub request_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: defaults::connect_timeout(),
            request_timeout: defaults::request_timeout(),
        }
    }
}

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
/// within its one-hour window (DESIGN.md rule 5).
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

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        explain::explain(e, &[], None)
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

mod defaults {
    use std::time::Duration;
    pub fn max_connections() -> u32 {
        10
    }
    pub fn concurrency() -> usize {
        32
    }
    pub fn batch_size() -> usize {
        100
    }
    pub fn lease() -> Duration {
        Duration::from_secs(60)
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_attempts() -> i32 {
        20
    }
    pub fn backoff_base() -> Duration {
        Duration::from_secs(2)
    }
    pub fn backoff_cap() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_coalesce() -> usize {
        50
    }
    pub fn retention() -> Duration {
        Duration::from_secs(7 * 86_400)
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9187".to_string()
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

impl Settings {
    /// Loads from `path` (if any), then the environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(path, |name| std::env::var(name).ok(), None)
    }

    /// [`Settings::load`] with an explicit environment (for tests): `vars` lists
    /// `CONTACT_SYNC__…` pairs; `None` reads the process environment.
    pub fn load_from(
        path: Option<&Path>,
        var: impl Fn(&str) -> Option<String>,
        vars: Option<Vec<(String, String)>>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            // read here, not by the config crate: it calls anything but a regular file
            // (/dev/null) "not found", and says nothing of a permission problem
            let text = read_config_file(path).map_err(|e| {
                ConfigError::Load(match e.kind() {
                    std::io::ErrorKind::NotFound => format!(
                        "configuration file {} not found (check --config or CONTACT_SYNC_CONFIG)",
                        path.display()
                    ),
                    std::io::ErrorKind::InvalidData
                    | std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::FileTooLarge => {
                        format!("configuration file {} {e}", path.display())
                    }
                    _ => format!("cannot read configuration file {}: {e}", path.display()),
                })
            })?;
            builder = builder
                .add_source(config::File::from_str(&text, config::FileFormat::Toml).required(true));
        }
        let mut env = config::Environment::with_prefix("CONTACT_SYNC")
            .prefix_separator("__")
            .separator("__")
            // Strings verbatim: a secret "007" stays "007"; typed settings parse the text.
            .try_parsing(false);
        // the keys the environment sets, to name the variable in an error
        let env_names: Vec<String> = match &vars {
            Some(v) => v.iter().map(|(k, _)| k.clone()).collect(),
            None => std::env::vars().map(|(k, _)| k).collect(),
        };
        let env_keys: Vec<String> = env_names
            .iter()
            .filter_map(|k| k.strip_prefix("CONTACT_SYNC__"))
            .map(|k| k.to_lowercase().replace("__", "."))
            .collect();
        if let Some(vars) = vars {
            env = env.source(Some(vars.into_iter().collect()));
        }
        builder = builder.add_source(env);
        // DATABASE_URL sits between the file and CONTACT_SYNC__DATABASE__URL.
        if var("CONTACT_SYNC__DATABASE__URL").is_none() {
            if let Some(url) = var("DATABASE_URL") {
                builder = builder.set_override("database.url", url)?;
            }
        }
        let file_name = path.map(|p| p.display().to_string());
        let explain = |e| explain::explain(e, &env_keys, file_name.as_deref());
        let built = builder.build().map_err(explain)?;
        let settings: Settings = built.clone().try_deserialize().map_err(explain)?;
        // a value the environment set is named by its variable
        let checked = provider_only_fields(&built, &settings).and_then(|()| settings.validate());
        checked.map_err(|e| match e {
            ConfigError::Invalid { key, reason } if env_keys.contains(&key) => {
                ConfigError::Invalid {
                    key: format!("{} (environment)", explain::variable(&key)),
                    reason,
                }
            }
            other => other,
        })?;
        Ok(settings)
    }

    /// Checks every value once, at start; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        if w.concurrency == 0 || w.concurrency > 10_000 {
            return Err(invalid("worker.concurrency", "must be between 1 and 10000"));
        }
        if w.batch_size == 0 || w.batch_size > 10_000 {
            return Err(invalid("worker.batch_size", "must be between 1 and 10000"));
        }
        if w.lease < Duration::from_secs(1) {
            return Err(invalid("worker.lease", "must be at least 1s"));
        }
        if w.poll_interval < Duration::from_millis(10) {
            return Err(invalid("worker.poll_interval", "must be at least 10ms"));
        }
        if w.max_attempts < 1 {
            return Err(invalid("worker.max_attempts", "must be at least 1"));
        }
        if w.backoff_base.is_zero() {
            return Err(invalid("worker.backoff_base", "must be greater than 0"));
        }
        if w.backoff_cap < w.backoff_base {
            return Err(invalid(
                "worker.backoff_cap",
                "must not be smaller than worker.backoff_base",
            ));
        }
        if w.max_coalesce == 0 {
            return Err(invalid("worker.max_coalesce", "must be at least 1"));
        }
        if self.database.max_connections < 2 {
            return Err(invalid("database.max_connections", "must be at least 2"));
        }
        if !self.admin.listen.is_empty()
            && self.admin.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "admin.listen",
                "must be an address like 127.0.0.1:9187, or empty to turn it off",
            ));
        }
        for (name, account) in &self.accounts {
            let key = |field: &str| format!("accounts.{name}.{field}");
            if !valid_account_name(name) {
                return Err(invalid(
                    format!("accounts.{name}"),
                    "account names use only a-z, 0-9 and _ (at most 64 characters)",
                ));
            }
            if account.secret.is_empty() {
                return Err(invalid(key("secret"), "is required"));
            }
            match account.provider {
                ProviderKind::Justclick => {
                    let login = account.login.as_deref().unwrap_or_default();
                    if login.is_empty()
                        || !login
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(invalid(
                            key("login"),
                            "is required for justclick (letters, digits, - and _)",
                        ));
                    }
                    if account.game_id.is_some() {
                        return Err(invalid(
                            key("game_id"),
                            "applies to smartlink accounts only",
                        ));
                    }
                }
                ProviderKind::Smartlink => {
                    let game = account.game_id.as_deref().unwrap_or_default();
                    if game.is_empty() || !game.chars().all(|c| c.is_ascii_digit()) {
                        return Err(invalid(
                            key("game_id"),
                            "is required for smartlink (digits)",
                        ));
                    }
                    if account.login.is_some() {
                        return Err(invalid(key("login"), "applies to justclick accounts only"));
                    }
                }
            }
            if let Some(rate) = account.rate_limit_per_second {
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err(invalid(
                        key("rate_limit_per_second"),
                        "must be a positive number",
                    ));
                }
            }
            if account.burst == Some(0) {
                return Err(invalid(key("burst"), "must be at least 1"));
            }
            if account.burst.is_some() && account.rate_limit_per_second.is_none() {
                return Err(invalid(
                    key("burst"),
                    "applies with rate_limit_per_second only",
                ));
            }
            if account.max_in_flight == Some(0) || account.max_in_flight > Some(i32::MAX as u32) {
                return Err(invalid(key("max_in_flight"), "must be at least 1"));
            }
            crate::providers::http::check_base_url(
                &account.effective_base_url(),
                account.allow_insecure_http,
            )
            .map_err(|reason| invalid(key("base_url"), reason))?;
        }
        Ok(())
    }

    /// The database URL, or an error naming the ways to set it.
    pub fn database_url(&self) -> Result<&Secret, ConfigError> {
        self.database.url.as_ref().ok_or_else(|| {
            invalid(
                "database.url",
                "is not set (set DATABASE_URL, CONTACT_SYNC__DATABASE__URL or [database] url)",
            )
        })
    }
}

/// The most a configuration file may hold: a real one is a few kilobytes, and `/dev/zero` or a
/// log file given by mistake must not be read into memory without end.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file (a regular file, or a device such as `/dev/null`), at most
/// [`MAX_CONFIG_BYTES`], as UTF-8.
fn read_config_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    // a named pipe with no writer would block the open, and a socket cannot be read: say so
    // instead of waiting for ever
    let kind = std::fs::metadata(path)?.file_type();
    if kind.is_fifo() || kind.is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a pipe or a socket, not a file",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            "is larger than 1 MiB (is it the right file?)",
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text"))
}

/// Refuses a setting given to an account of the other provider (`double_opt_in` on a JustClick
/// account, `missing_contact` on a Smartlink one): the typed settings cannot tell a default
/// from a value written, the raw configuration can.
fn provider_only_fields(raw: &config::Config, settings: &Settings) -> Result<(), ConfigError> {
    for (name, account) in &settings.accounts {
        let (field, applies_to) = match account.provider {
            ProviderKind::Justclick => ("double_opt_in", "smartlink"),
            ProviderKind::Smartlink => ("missing_contact", "justclick"),
        };
        let key = format!("accounts.{name}.{field}");
        if raw.get::<config::Value>(&key).is_ok() {
            return Err(invalid(
                key,
                format!("applies to {applies_to} accounts only (remove it)"),
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9_]{1,64}`: the same rule as the jobs table's CHECK.
pub fn valid_account_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_toml(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut file = tempfile_in_target();
        file.1.write_all(toml.as_bytes()).unwrap();
        let vars: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = vars.clone();
        Settings::load_from(
            Some(&file.0),
            move |name| {
                lookup
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            },
            Some(vars),
        )
    }

    fn tempfile_in_target() -> (std::path::PathBuf, std::fs::File) {
        let path =
            std::env::temp_dir().join(format!("contact-sync-test-{}.toml", fastrand::u64(..)));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }

    const SAMPLE: &str = r#"
[worker]
concurrency = 8
lease = "30s"
[accounts.jc_main]
provider = "justclick"
login = "username"
secret = "jc-secret-value"
rate_limit_per_second = 5
[accounts.sl_main]
provider = "smartlink"
game_id = "12345"
secret = "sl-secret-value"
double_opt_in = "drop"
"#;

    #[test]
    fn errors_name_the_key_once_without_rust_names() {
        let err = |toml: &str, env: &[(&str, &str)]| load_toml(toml, env).unwrap_err().to_string();
        assert_eq!(
            err("[accounts.x]\nprovider = \"smartlnk\"\nsecret = \"s\"\n", &[]),
            "configuration key accounts.x.provider: unknown provider \"smartlnk\" (expected justclick or smartlink)"
        );
        assert_eq!(
            err("[worker]\nconcurency = 5\n", &[]),
            "configuration key worker.concurency: unknown setting (did you mean `concurrency`?)"
        );
        assert_eq!(
            err("", &[("CONTACT_SYNC__WORKER__CONCURENCY", "5")]),
            "configuration key CONTACT_SYNC__WORKER__CONCURENCY (environment): unknown setting (did you mean CONTACT_SYNC__WORKER__CONCURRENCY?)"
        );
        let e = err("", &[("CONTACT_SYNC__WORKER__CONCURRENCY", "many")]);
        assert!(
            e.starts_with("configuration key CONTACT_SYNC__WORKER__CONCURRENCY (environment): expected an integer"),
            "{e}"
        );
        assert_eq!(
            err(SAMPLE, &[("CONTACT_SYNC__ACCOUNTS__JC_MAIN__SECRET", "")]),
            "configuration key CONTACT_SYNC__ACCOUNTS__JC_MAIN__SECRET (environment): is required"
        );
        let e = err("worker = 5\n", &[]);
        assert!(e.ends_with("expected a table"), "{e}");
        for e in [e, err("[accounts.x]\nprovider = \"smartlnk\"\n", &[])] {
            assert!(!e.contains("Settings") && !e.contains("Kind"), "{e}");
        }
    }

    #[test]
    fn a_setting_of_the_other_provider_is_refused() {
        let err = |toml: &str, env: &[(&str, &str)]| load_toml(toml, env).unwrap_err().to_string();
        let jc = "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"u\"\nsecret = \"s\"\n";
        let sl = "[accounts.sl]\nprovider = \"smartlink\"\ngame_id = \"1\"\nsecret = \"s\"\n";
        assert_eq!(
            err(&format!("{jc}double_opt_in = \"drop\"\n"), &[]),
            "configuration key accounts.jc.double_opt_in: applies to smartlink accounts only (remove it)"
        );
        assert_eq!(
            err(&format!("{sl}missing_contact = \"skip\"\n"), &[]),
            "configuration key accounts.sl.missing_contact: applies to justclick accounts only (remove it)"
        );
        assert_eq!(
            err(jc, &[("CONTACT_SYNC__ACCOUNTS__JC__DOUBLE_OPT_IN", "drop")]),
            "configuration key CONTACT_SYNC__ACCOUNTS__JC__DOUBLE_OPT_IN (environment): applies to smartlink accounts only (remove it)"
        );
        assert!(load_toml(
            &format!("{jc}missing_contact = \"skip\"\n{sl}double_opt_in = \"drop\"\n"),
            &[]
        )
        .is_ok());
    }

    #[test]
    fn a_file_that_is_not_a_regular_file_is_read_and_a_missing_one_named() {
        let s = Settings::load_from(Some(Path::new("/dev/null")), |_| None, Some(vec![])).unwrap();
        assert!(s.accounts.is_empty());
        let e = Settings::load_from(
            Some(Path::new("/nonexistent/c.toml")),
            |_| None,
            Some(vec![]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "configuration: configuration file /nonexistent/c.toml not found (check --config or CONTACT_SYNC_CONFIG)");
        let e = Settings::load_from(Some(Path::new("/dev/zero")), |_| None, Some(vec![]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "configuration: configuration file /dev/zero is larger than 1 MiB (is it the right file?)"
        );
        let fifo = std::env::temp_dir().join(format!("contact-sync-fifo-{}", fastrand::u64(..)));
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = Settings::load_from(Some(&fifo), |_| None, Some(vec![]))
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_file(&fifo);
        assert_eq!(
            e,
            format!(
                "configuration: configuration file {} is a pipe or a socket, not a file",
                fifo.display()
            )
        );
        let e = Settings::load_from(Some(Path::new("/")), |_| None, Some(vec![]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("configuration: cannot read configuration file /: "),
            "{e}"
        );
        let mut file = tempfile_in_target();
        file.1.write_all(b"[worker]\nconcurrency = \n").unwrap();
        let e = Settings::load_from(Some(&file.0), |_| None, Some(vec![]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{} is not valid TOML", file.0.display())),
            "{e}"
        );
    }

    #[test]
    fn env_strings_are_taken_verbatim() {
        // Regression: "007" became 7 and a game id "012345" became 12345.
        let s = load_toml(
            SAMPLE,
            &[
                ("CONTACT_SYNC__ACCOUNTS__JC_MAIN__SECRET", "007"),
                ("CONTACT_SYNC__ACCOUNTS__SL_MAIN__GAME_ID", "012345"),
                ("CONTACT_SYNC__ACCOUNTS__SL_MAIN__SECRET", "1e3"),
                ("CONTACT_SYNC__WORKER__CONCURRENCY", "16"),
                (
                    "CONTACT_SYNC__ACCOUNTS__JC_MAIN__ALLOW_INSECURE_HTTP",
                    "true",
                ),
            ],
        )
        .unwrap();
        assert_eq!(s.accounts["jc_main"].secret.expose(), "007");
        assert_eq!(s.accounts["sl_main"].game_id.as_deref(), Some("012345"));
        assert_eq!(s.accounts["sl_main"].secret.expose(), "1e3");
        assert_eq!(s.worker.concurrency, 16);
        assert!(s.accounts["jc_main"].allow_insecure_http);
    }

    #[test]
    fn file_then_env_overrides() {
        let s = load_toml(
            SAMPLE,
            &[
                ("CONTACT_SYNC__WORKER__CONCURRENCY", "64"),
                ("CONTACT_SYNC__ACCOUNTS__SL_MAIN__SECRET", "from-env"),
                ("DATABASE_URL", "postgres://localhost/app"),
            ],
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 64);
        assert_eq!(s.worker.lease, Duration::from_secs(30));
        assert_eq!(s.worker.batch_size, 100);
        assert_eq!(s.accounts["sl_main"].secret.expose(), "from-env");
        assert_eq!(s.accounts["sl_main"].double_opt_in, DoubleOptIn::Drop);
        assert_eq!(
            s.database.url.as_ref().unwrap().expose(),
            "postgres://localhost/app"
        );
        assert_eq!(
            s.accounts["jc_main"].effective_base_url(),
            "https://username.justclick.ru"
        );
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = load_toml(SAMPLE, &[("DATABASE_URL", "postgres://u:pw@localhost/app")]).unwrap();
        let text = format!("{s:?}");
        assert!(text.contains("[redacted]"));
        assert!(!text.contains("jc-secret-value"));
        assert!(!text.contains("sl-secret-value"));
        assert!(!text.contains("pw@"));
    }

    #[test]
    fn errors_name_the_key() {
        // a value the environment set is named by its variable
        let err = load_toml(SAMPLE, &[("CONTACT_SYNC__WORKER__CONCURRENCY", "0")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("CONTACT_SYNC__WORKER__CONCURRENCY (environment): must be between"),
            "{err}"
        );
        let err = load_toml("[worker]\nlease = \"30\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("no unit"), "{err}");
        let err = load_toml("[worker]\nconcurency = 3\n", &[]).unwrap_err();
        assert!(err.to_string().contains("concurency"), "{err}");
        let err = load_toml(
            "[accounts.JC]\nprovider = \"justclick\"\nlogin = \"x\"\nsecret = \"s\"\n",
            &[],
        );
        // the config crate lower-cases keys; an upper-case name still fails one way or another
        let bad = load_toml(
            "[accounts.jc]\nprovider = \"justclick\"\nsecret = \"s\"\n",
            &[],
        )
        .unwrap_err();
        assert!(bad.to_string().contains("accounts.jc.login"), "{bad}");
        drop(err);
        let bad = load_toml(
            "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"x\"\nsecret = \"s\"\nbase_url = \"http://10.1.2.3\"\n",
            &[],
        )
        .unwrap_err();
        assert!(bad.to_string().contains("accounts.jc.base_url"), "{bad}");
    }

    #[test]
    fn insecure_http_needs_the_flag() {
        let ok = load_toml(
            "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"x\"\nsecret = \"s\"\nbase_url = \"http://10.1.2.3\"\nallow_insecure_http = true\n",
            &[],
        );
        assert!(ok.is_ok());
        let loopback = load_toml(
            "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"x\"\nsecret = \"s\"\nbase_url = \"http://127.0.0.1:9000/jc\"\n",
            &[],
        );
        assert!(loopback.is_ok());
    }

    #[test]
    fn account_names_are_restricted() {
        assert!(valid_account_name("jc_main2"));
        assert!(!valid_account_name("jc-main"));
        assert!(!valid_account_name("JC"));
        assert!(!valid_account_name(""));
    }
}
