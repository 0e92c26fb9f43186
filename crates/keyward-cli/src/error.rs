//! The CLI's errors and what they exit with.
//!
//! Everything fails through `anyhow` (context chains print as one readable line); the one decision a reader
//! must know: the exit status is chosen by *type*, not by message. A [`UsageError`] anywhere in the chain means
//! the invocation is wrong (exit 2), anything else is the environment's fault (exit 1). A closed stdout
//! (`keyward … | head`, `| grep -q`) is not a failure and never changes the exit status: reports are written
//! with [`print_stdout`], which ignores `EPIPE`, so `audit` exits 3 or 4 whether or not the reader was still
//! there (Rust ignores `SIGPIPE`, so a write to a closed pipe is an `EPIPE` error, never a signal). See
//! `main.rs` for the documented codes.

use std::io;

use anyhow::Context as _;
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

/// Writes `text` to stdout and flushes it. A closed stdout (`EPIPE`: the reader, e.g. `head` or `grep -q`,
/// has exited) is not an error: the rest is dropped and the command's exit status stands.
///
/// # Errors
/// Any other write error (a full disk behind a redirection).
pub(crate) fn print_stdout(text: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

/// The error as one readable line: its chain joined by `: `, a cause that only repeats what the line already
/// ends with left out (redis-rs's errors show their source's text again, which read `NoPerm: …: NoPerm: …`
/// and `broken pipe: broken pipe`).
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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
    fn a_cause_that_repeats_the_line_is_printed_once() {
        /// Shows its source's text, as redis-rs's errors do.
        #[derive(Debug)]
        struct Echo(io::Error);
        impl std::fmt::Display for Echo {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
        impl std::error::Error for Echo {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = anyhow::Error::new(Echo(io::Error::other("NoPerm: no permissions")))
            .context("the purge stopped");
        assert_eq!(one_line(&err), "the purge stopped: NoPerm: no permissions");
        let plain = anyhow::anyhow!("b").context("a");
        assert_eq!(one_line(&plain), "a: b");
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
