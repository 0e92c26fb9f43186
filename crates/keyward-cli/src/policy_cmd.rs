//! `keyward policy check FILE`: validate a policy file and print everything it declares.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use keyward::policy::Policy;

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

fn check(file: &Path) -> anyhow::Result<()> {
    // The PolicyError already names the file, class and field: print it without extra context.
    let policy = Policy::from_file(file).map_err(|e| UsageError(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    write!(out, "{policy}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}
