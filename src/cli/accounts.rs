//! `accounts list|pause|resume` and `workers`: the fleet-wide account state and the live
//! replicas, as stored in Postgres.

use super::args::AccountsCommand;
use super::render::{print_as, render_accounts, render_workers};
use contact_sync::config::Settings;
use contact_sync::outbox;
use std::process::ExitCode;

pub async fn run(command: AccountsCommand, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        AccountsCommand::List { json } => {
            let pool = super::connect(settings).await?;
            let rows = outbox::accounts::list(&pool).await?;
            print_as(&rows, json, |v| render_accounts(v))?;
        }
        AccountsCommand::Pause { name, reason } => {
            let pool = super::connect(settings).await?;
            KnownAccounts::load(settings, &pool)
                .await?
                .check_name(&name)
                .map_err(anyhow::Error::msg)?;
            outbox::accounts::pause(&pool, &name, &reason).await?;
            println!("{name}: paused for every worker (jobs wait; `contact-sync accounts resume {name}` ends it)");
        }
        AccountsCommand::Resume { name } => {
            let pool = super::connect(settings).await?;
            KnownAccounts::load(settings, &pool)
                .await?
                .check_name(&name)
                .map_err(anyhow::Error::msg)?;
            if outbox::accounts::resume(&pool, &name).await? {
                println!("{name}: resumed");
            } else {
                println!("{name}: was not paused");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `workers`: the live replicas.
pub async fn workers(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let pool = super::connect(settings).await?;
    let rows = outbox::replicas::live_replicas(&pool).await?;
    print_as(&rows, json, |v| render_workers(v))?;
    Ok(ExitCode::SUCCESS)
}

/// The accounts a command may name: those of this configuration, and those a worker has
/// registered in the database (with their provider).
pub struct KnownAccounts {
    providers: std::collections::BTreeMap<String, String>,
}

impl KnownAccounts {
    pub async fn load(settings: &Settings, pool: &sqlx::PgPool) -> anyhow::Result<Self> {
        let mut providers: std::collections::BTreeMap<String, String> =
            outbox::accounts::providers(pool)
                .await?
                .into_iter()
                .collect();
        for (name, account) in &settings.accounts {
            providers.insert(name.clone(), account.provider.as_str().to_string());
        }
        Ok(Self { providers })
    }

    /// Refuses an account nobody knows; the error says which accounts there are.
    pub fn check_name(&self, account: &str) -> Result<(), String> {
        match self.providers.get(account) {
            Some(_) => Ok(()),
            None => self.unknown(account),
        }
    }

    /// Refuses an account nobody knows, or a provider that is not the account's; the error
    /// says which accounts there are.
    pub fn check(&self, provider: &str, account: &str) -> Result<(), String> {
        match self.providers.get(account) {
            Some(p) if p == provider => Ok(()),
            Some(p) => Err(format!(
                "account {account:?} is a {p} account, not {provider}: use --provider {p}, or one of the {provider} accounts ({})",
                self.of(provider)
            )),
            None => self.unknown(account),
        }
    }

    fn unknown(&self, account: &str) -> Result<(), String> {
        if !contact_sync::config::valid_account_name(account) {
            return Err(format!(
                "invalid account name {account:?}: account names use only a-z, 0-9 and _ (at most 64 characters)"
            ));
        }
        match self.providers.len() {
            0 => Err(format!(
                "unknown account {account:?}: no account is known (the configuration has no [accounts], and no worker has registered one in the database; pass --config)"
            )),
            _ => Err(format!(
                "unknown account {account:?}: known accounts are {} (add [accounts.{account}] to the configuration of the workers)",
                self.providers
                    .iter()
                    .map(|(a, p)| format!("{a} ({p})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn of(&self, provider: &str) -> String {
        let names: Vec<&str> = self
            .providers
            .iter()
            .filter(|(_, p)| *p == provider)
            .map(|(a, _)| a.as_str())
            .collect();
        if names.is_empty() {
            "none known".into()
        } else {
            names.join(", ")
        }
    }
}
