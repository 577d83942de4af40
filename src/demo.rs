//! The zero-setup demo.
use crate::sandbox::SandboxAccounts;

/// The demo's provider accounts (also the sandbox's default credentials).
pub fn sandbox_accounts() -> SandboxAccounts {
    SandboxAccounts::default()
        .with_justclick("demo", "demo-justclick-secret")
        .with_smartlink("12345", "demo-smartlink-secret")
}
