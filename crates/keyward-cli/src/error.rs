//! The CLI's errors and what they exit with.
//!
//! Everything fails through `anyhow` (context chains print as one readable line); the one decision a reader
//! must know: the exit status is chosen by *type*, not by message. A [`UsageError`] anywhere in the chain means
//! the invocation is wrong (exit 2), a closed stdout is not a failure (exit 0), anything else is the
//! environment's fault (exit 1). See `main.rs` for the documented codes.

use std::io;
use std::process::ExitCode;

/// An error that exits with status 2 rather than 1: the invocation is wrong (bad usage, an invalid policy),
/// not the environment. Its message is printed as is, after `error: `; it names the flag, file, class or field
/// at fault and never contains a password (the URL parsers that feed it already redact them).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Bail out of a function returning `anyhow::Result` with a [`UsageError`] (exit status 2).
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::UsageError(format!($($arg)*))))
    };
}
pub(crate) use usage;

/// The exit status for a failed command: 0 for a closed stdout (`keyward … | head`), 2 for a [`UsageError`],
/// 1 otherwise.
pub(crate) fn exit_code(err: &anyhow::Error) -> ExitCode {
    if is_broken_pipe(err) {
        ExitCode::SUCCESS
    } else if err.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

/// Whether the error comes from writing to a closed stdout (`keyward … | head`): not a failure.
pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use anyhow::Context as _;

    use super::*;

    #[test]
    fn usage_errors_exit_2_even_under_context() {
        let err = anyhow::Error::new(UsageError("--keys must be at least 1".to_owned()))
            .context("while parsing");
        assert_eq!(exit_code(&err), ExitCode::from(2));
        assert_eq!(
            format!("{:#}", anyhow::Error::new(UsageError("bad".to_owned()))),
            "bad"
        );
    }

    #[test]
    fn broken_pipe_exits_0_and_other_failures_1() {
        let pipe: anyhow::Result<()> =
            Err(io::Error::from(io::ErrorKind::BrokenPipe)).context("cannot write to stdout");
        assert_eq!(exit_code(&pipe.unwrap_err()), ExitCode::SUCCESS);
        let down = anyhow::anyhow!("cannot connect");
        assert_eq!(exit_code(&down), ExitCode::FAILURE);
    }
}
