//! Configuration: one typed [`Settings`] struct, loaded from a TOML file (`--config PATH` or
//! `CONTACT_SYNC_CONFIG`), then `CONTACT_SYNC__SECTION__KEY` environment overrides, with
//! `DATABASE_URL` honoured, and validated once at start with errors that name the key.
//! Secrets are [`Secret`]s: `Debug` of the settings prints `[redacted]`.

mod accounts;
mod console;
mod explain;
pub(crate) mod sources;
mod validate;

pub use accounts::{
    valid_account_name, AccountSettings, DoubleOptIn, MissingContact, ProviderKind,
};
pub use console::{ConsoleRole, ConsoleSettings, ConsoleUser};
pub use sources::{provider_fields, OnDelete, SourceSettings, TargetSettings};
pub use validate::bounds;
#[doc(hidden)]
pub use validate::check_base_url;

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
    /// The operator console (`contact-sync console`, or served by `run`).
    #[serde(default)]
    pub console: ConsoleSettings,
    /// Provider accounts by name (`[a-z0-9_]`, so env overrides can name them).
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountSettings>,
    /// Application tables captured into the queue, by source name.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://...`; may carry a password, hence a secret.
    pub url: Option<Secret>,
    /// Pool size of one process (housekeeping, heartbeat, listen, the double-opt-in ledger; the
    /// claim and the completion open three connections of their own besides: `outbox::hot`).
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
    /// How long a provider may go on acting on a request after contact-sync stopped waiting
    /// for it (a timeout, a connection reset after the request was sent, a 504 from its
    /// gateway, a worker killed or cut off mid-call): nothing more is sent for that contact,
    /// and the account's in-flight slot stays taken, until it has passed. `0s`: the provider
    /// never acts on a request whose client went away (the behaviour before this setting).
    #[serde(
        default = "defaults::abandoned_call_bound",
        with = "crate::duration::serde_text"
    )]
    pub abandoned_call_bound: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: defaults::connect_timeout(),
            request_timeout: defaults::request_timeout(),
            abandoned_call_bound: defaults::abandoned_call_bound(),
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
    /// Well past the usual gateway and PHP limits (nginx's 60 s read timeout, PHP's 30 s
    /// execution limit): a request the client gave up on is over by then.
    pub fn abandoned_call_bound() -> Duration {
        Duration::from_secs(300)
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

    /// A configuration file of the test's own: its path, the file, and a guard that removes it.
    fn tempfile_in_target() -> (std::path::PathBuf, std::fs::File, RemoveOnDrop) {
        let path =
            std::env::temp_dir().join(format!("contact-sync-test-{}.toml", fastrand::u64(..)));
        let file = std::fs::File::create(&path).unwrap();
        (path.clone(), file, RemoveOnDrop(path))
    }

    struct RemoveOnDrop(std::path::PathBuf);

    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
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

    /// Regression: `rate_limit_per_second = 1e307` passed, overflowed the
    /// token bucket in Postgres, and every claim of the worker's limited accounts failed.
    #[test]
    fn every_numeric_setting_is_bounded_with_the_key_and_the_range() {
        let jc = "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"u\"\nsecret = \"s\"\n";
        let err = |toml: &str| match load_toml(toml, &[]) {
            Ok(_) => panic!("accepted: {toml}"),
            Err(e) => e.to_string(),
        };
        let rate = "configuration key accounts.jc.rate_limit_per_second: must be a number from 0.000001 to 1000000 (calls per second)";
        for bad in [
            "1e307",
            "1e308",
            "1.7976931348623157e308",
            "nan",
            "+nan",
            "-nan",
            "inf",
            "+inf",
            "-inf",
            "-1",
            "-1e307",
            "0",
            "0.0",
            "-0.0",
            "1e-7",
            "5e-324",
            "1000000.5",
            "1e7",
        ] {
            let toml = format!("{jc}rate_limit_per_second = {bad}\n");
            assert_eq!(err(&toml), rate, "{bad}");
        }
        for (setting, bad, expected) in [
            ("burst", "0", "must be between 1 and 1000000"),
            ("burst", "1000001", "must be between 1 and 1000000"),
            ("burst", "4294967295", "must be between 1 and 1000000"),
            ("max_in_flight", "0", "must be between 1 and 1000000"),
            ("max_in_flight", "1000001", "must be between 1 and 1000000"),
            // was "must be at least 1"
            (
                "max_in_flight",
                "4294967295",
                "must be between 1 and 1000000",
            ),
        ] {
            let toml = format!("{jc}rate_limit_per_second = 5\n{setting} = {bad}\n");
            assert_eq!(
                err(&toml),
                format!("configuration key accounts.jc.{setting}: {expected}"),
                "{setting} = {bad}"
            );
        }
        // values no unsigned or whole-number setting can hold are named too
        for (setting, bad) in [
            ("burst", "-1"),
            ("burst", "1e307"),
            ("burst", "nan"),
            ("max_in_flight", "-1"),
            ("max_in_flight", "inf"),
            ("max_in_flight", "4294967296"),
        ] {
            let e = err(&format!(
                "{jc}rate_limit_per_second = 5\n{setting} = {bad}\n"
            ));
            assert!(
                e.starts_with(&format!("configuration key accounts.jc.{setting}: ")),
                "{setting} = {bad}: {e}"
            );
        }
        for (section, setting, bad, range) in [
            ("database", "max_connections", "1", "between 2 and 1000"),
            ("database", "max_connections", "1001", "between 2 and 1000"),
            ("worker", "concurrency", "0", "between 1 and 10000"),
            ("worker", "concurrency", "10001", "between 1 and 10000"),
            ("worker", "batch_size", "0", "between 1 and 10000"),
            ("worker", "batch_size", "10001", "between 1 and 10000"),
            ("worker", "max_attempts", "0", "between 1 and 1000"),
            ("worker", "max_attempts", "-5", "between 1 and 1000"),
            (
                "worker",
                "max_attempts",
                "-2147483648",
                "between 1 and 1000",
            ),
            ("worker", "max_attempts", "1001", "between 1 and 1000"),
            ("worker", "max_attempts", "2147483647", "between 1 and 1000"),
            ("worker", "max_coalesce", "0", "between 1 and 1000"),
            ("worker", "max_coalesce", "1001", "between 1 and 1000"),
            ("worker", "lease", "\"999ms\"", "between 1s and 1d"),
            ("worker", "lease", "\"25h\"", "between 1s and 1d"),
            ("worker", "lease", "\"106751991167d\"", "between 1s and 1d"),
            ("worker", "poll_interval", "\"9ms\"", "between 10ms and 1h"),
            ("worker", "poll_interval", "\"61m\"", "between 10ms and 1h"),
            ("worker", "backoff_base", "\"0s\"", "between 1ms and 30d"),
            ("worker", "backoff_base", "\"31d\"", "between 1ms and 30d"),
            ("worker", "backoff_cap", "\"31d\"", "between 1ms and 30d"),
            (
                "worker",
                "shutdown_timeout",
                "\"61m\"",
                "between 0ms and 1h",
            ),
            (
                "retention",
                "finished",
                "\"36501d\"",
                "between 0ms and 36500d",
            ),
            (
                "retention",
                "finished",
                "\"99999999d\"",
                "between 0ms and 36500d",
            ),
            ("http", "connect_timeout", "\"0s\"", "between 10ms and 1h"),
            ("http", "connect_timeout", "\"2h\"", "between 10ms and 1h"),
            ("http", "request_timeout", "\"9ms\"", "between 10ms and 1h"),
            ("http", "request_timeout", "\"2h\"", "between 10ms and 1h"),
        ] {
            let toml = format!("[{section}]\n{setting} = {bad}\n");
            assert_eq!(
                err(&toml),
                format!("configuration key {section}.{setting}: must be {range}"),
                "{setting} = {bad}"
            );
        }
        // negative or non-whole values of unsigned settings and durations: named, never taken
        for (section, setting, bad) in [
            ("worker", "concurrency", "-1"),
            ("worker", "batch_size", "1e307"),
            ("worker", "max_coalesce", "nan"),
            ("database", "max_connections", "-2"),
            ("worker", "lease", "\"-5s\""),
            ("worker", "max_attempts", "1e307"),
            ("retention", "finished", "\"-1d\""),
            ("http", "request_timeout", "\"inf\""),
        ] {
            let e = err(&format!("[{section}]\n{setting} = {bad}\n"));
            assert!(
                e.starts_with(&format!("configuration key {section}.{setting}: ")),
                "{setting} = {bad}: {e}"
            );
        }
        // from the environment: named by the variable
        for bad in ["1e307", "NaN", "inf", "-3"] {
            let e = load_toml(
                SAMPLE,
                &[(
                    "CONTACT_SYNC__ACCOUNTS__JC_MAIN__RATE_LIMIT_PER_SECOND",
                    bad,
                )],
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("configuration key CONTACT_SYNC__ACCOUNTS__JC_MAIN__RATE_LIMIT_PER_SECOND (environment): must be a number from 0.000001 to 1000000"),
                "{bad}: {e}"
            );
        }
        // every bound itself is accepted
        let edges = format!(
            "[database]\nmax_connections = 1000\n[worker]\nconcurrency = 10000\nbatch_size = 10000\nmax_attempts = 1000\nmax_coalesce = 1000\nlease = \"1d\"\npoll_interval = \"1h\"\nbackoff_base = \"30d\"\nbackoff_cap = \"30d\"\nshutdown_timeout = \"1h\"\n[retention]\nfinished = \"36500d\"\n[http]\nconnect_timeout = \"1h\"\nrequest_timeout = \"1h\"\n{jc}rate_limit_per_second = 1000000\nburst = 1000000\nmax_in_flight = 1000000\n[accounts.jc2]\nprovider = \"justclick\"\nlogin = \"v\"\nsecret = \"s\"\nrate_limit_per_second = 0.000001\nburst = 1\nmax_in_flight = 1\n"
        );
        let s = load_toml(&edges, &[]).unwrap();
        assert_eq!(s.accounts["jc"].rate_limit_per_second, Some(1e6));
        let low = "[database]\nmax_connections = 2\n[worker]\nconcurrency = 1\nbatch_size = 1\nmax_attempts = 1\nmax_coalesce = 1\nlease = \"1s\"\npoll_interval = \"10ms\"\nbackoff_base = \"1ms\"\nbackoff_cap = \"1ms\"\nshutdown_timeout = \"0s\"\n[retention]\nfinished = \"0s\"\n[http]\nconnect_timeout = \"10ms\"\nrequest_timeout = \"10ms\"\n";
        assert!(load_toml(low, &[]).is_ok());
        // the bucket's arithmetic at the largest rate stays finite for any time Postgres holds
        let (_, max_rate) = bounds::RATE_PER_SECOND;
        let longest_idle_seconds = 300_000.0 * 365.25 * 86_400.0;
        assert!((max_rate * longest_idle_seconds).is_finite());
        let (_, max_burst) = bounds::BURST;
        assert!(f64::from(max_burst) * 2.0 < f64::from(i32::MAX));
    }

    #[test]
    fn account_names_are_restricted() {
        assert!(valid_account_name("jc_main2"));
        assert!(!valid_account_name("jc-main"));
        assert!(!valid_account_name("JC"));
        assert!(!valid_account_name(""));
    }

    const SOURCE_ACCOUNTS: &str =
        "[accounts.jc]\nprovider = \"justclick\"\nlogin = \"u\"\nsecret = \"s\"\n\
        [accounts.sl]\nprovider = \"smartlink\"\ngame_id = \"1\"\nsecret = \"s\"\n";

    #[test]
    fn sources_map_columns_to_fields() {
        let toml = format!(
            "{SOURCE_ACCOUNTS}[sources.users]\ntable = \"public.users\"\nkey = \"id\"\nemail = \"email\"\n\
             where = \"marketing_opt_in\"\n\
             [sources.users.targets.jc]\nlead_name = \"first_name || ' ' || last_name\"\nlead_city = \"city\"\n\
             [sources.users.targets.sl]\nsubscribe = \"1\"\n\"attributes.Plan\" = \"plan\"\non_delete = \"unsubscribe\"\n"
        );
        let s = load_toml(&toml, &[]).unwrap();
        let users = &s.sources["users"];
        assert_eq!(users.schema_and_table(), ("public", "users"));
        assert_eq!(users.filter.as_deref(), Some("marketing_opt_in"));
        assert_eq!(
            users.targets["jc"].fields["lead_name"],
            "first_name || ' ' || last_name"
        );
        assert_eq!(users.targets["jc"].on_delete, OnDelete::Ignore);
        // an attribute's name keeps its case and its dot
        assert_eq!(users.targets["sl"].fields["attributes.Plan"], "plan");
        assert_eq!(users.targets["sl"].on_delete, OnDelete::Unsubscribe);
    }

    #[test]
    fn source_mistakes_name_the_setting() {
        let source = |target: &str| {
            format!(
                "{SOURCE_ACCOUNTS}[sources.users]\ntable = \"public.users\"\nkey = \"id\"\nemail = \"email\"\n{target}"
            )
        };
        let err = |toml: String| load_toml(&toml, &[]).unwrap_err().to_string();
        let e = err(source("[sources.users.targets.jc]\nlead_nam = \"name\"\n"));
        assert!(
            e.contains("sources.users.targets.jc.lead_nam")
                && e.contains("did you mean lead_name?"),
            "{e}"
        );
        let e = err(source(
            "[sources.users.targets.jcc]\nlead_name = \"name\"\n",
        ));
        assert!(
            e.contains("names no configured account (did you mean jc?)"),
            "{e}"
        );
        let e = err(source(
            "[sources.users.targets.jc]\nlead_name = \"name\"\non_delete = \"unsubscribe\"\n",
        ));
        assert!(e.contains("smartlink accounts only"), "{e}");
        let e = err(source(
            "[sources.users.targets.jc]\n\"attributes.x\" = \"name\"\n",
        ));
        assert!(e.contains("is not a justclick field"), "{e}");
        let e = err(source(
            "[sources.users.targets.jc]\nlead_name = \"name; DROP TABLE users\"\n",
        ));
        assert!(e.contains("one SQL expression"), "{e}");
        let e = err(source(""));
        assert!(e.contains("names no account"), "{e}");
        let e = err(source(
            "[sources.users.targets.sl]\non_delete = \"unsubscribe\"\n",
        ));
        assert!(e.contains("maps no field"), "{e}");
        let e = err(format!(
            "{SOURCE_ACCOUNTS}[sources.users]\ntable = \"users\"\nkey = \"id\"\nemail = \"email\"\n[sources.users.targets.jc]\nlead_name = \"n\"\n"
        ));
        assert!(
            e.contains("sources.users.table") && e.contains("schema-qualified"),
            "{e}"
        );
    }
}
