//! `keyward policy check FILE`: validate a policy file and print everything it declares.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use keyward::policy::{APP_VAR, ENV_VAR, Policy};

use crate::error::UsageError;

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate a policy file and print every class it declares. An invalid policy exits with status 2 and
    /// an error naming the file, the class and the field at fault.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
}

pub(crate) fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { file } => check(&file),
    }
}

/// The policy file at `path` as a service deploying it sees it: parsed, validated, and with its namespace's
/// `env` and `app` taken from `KEYWARD_ENV` / `KEYWARD_APP` where they are set
/// ([`Policy::with_env_overrides`]), so that `KEYWARD_ENV=prod keyward …` acts on `prod:…` as the service
/// with that environment does. Every command that reads a policy loads it here.
///
/// # Errors
/// A [`UsageError`] (exit 2) naming the file, class and field, or the variable, at fault.
pub(crate) fn load(path: &Path) -> Result<Policy, UsageError> {
    Policy::from_file(path)
        .and_then(Policy::with_env_overrides)
        .map_err(|e| UsageError(e.to_string()))
}

fn check(file: &Path) -> anyhow::Result<()> {
    // The PolicyError already names the file, class and field (or the variable): print it without extra
    // context.
    let declared = Policy::from_file(file).map_err(|e| UsageError(e.to_string()))?;
    let policy = load(file)?;
    let mut text = policy.to_string();
    for (var, field, from_file, value) in [
        (ENV_VAR, "env", declared.env(), policy.env()),
        (APP_VAR, "app", declared.app(), policy.app()),
    ] {
        if std::env::var_os(var).is_some() {
            text.push_str(&format!(
                "\nnamespace.{field} = {value} comes from {var} (the file declares {from_file})\n"
            ));
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}
