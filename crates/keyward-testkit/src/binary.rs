//! Locating the `redis-server` and `redis-cli` executables.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variable that, when set, names the `redis-server` binary to use.
pub const REDIS_SERVER_ENV: &str = "KEYWARD_REDIS_SERVER";

/// The panic message used when no `redis-server` binary can be found.
pub const MISSING_REDIS_MESSAGE: &str = "redis-server not found: keyward's tests run against a real Redis. \
     Install it with `sudo apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis`, \
     or point KEYWARD_REDIS_SERVER at the binary.";

/// Environment variable that, when set, names the `redis-cli` binary to use.
pub const REDIS_CLI_ENV: &str = "KEYWARD_REDIS_CLI";

/// The panic message used when no `redis-cli` binary can be found.
pub const MISSING_REDIS_CLI_MESSAGE: &str = "redis-cli not found: keyward's cluster tests form the cluster with \
     `redis-cli --cluster create`. Install it with `sudo apt-get install -y redis-server` (Debian/Ubuntu, it \
     brings redis-tools) or `brew install redis`, or point KEYWARD_REDIS_CLI at the binary.";

/// Directories searched after `PATH`, in order.
const FALLBACK_DIRS: &[&str] = &["/usr/bin", "/usr/sbin", "/usr/local/bin"];

/// The `redis-server` binary to spawn.
///
/// Uses the `KEYWARD_REDIS_SERVER` environment variable if it is set and
/// non-empty, otherwise the first executable `redis-server` on `PATH`,
/// otherwise `/usr/bin/redis-server`, `/usr/sbin/redis-server` or
/// `/usr/local/bin/redis-server`.
///
/// # Panics
///
/// Panics with [`MISSING_REDIS_MESSAGE`] if no binary is found, or if
/// `KEYWARD_REDIS_SERVER` names a file that is not an executable.
pub fn redis_server_binary() -> PathBuf {
    match find_binary(env::var_os(REDIS_SERVER_ENV), env::var_os("PATH")) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

/// The `redis-cli` binary, used to form clusters (`redis-cli --cluster create`).
///
/// Uses the `KEYWARD_REDIS_CLI` environment variable if it is set and non-empty, otherwise a `redis-cli` next
/// to the `redis-server` that [`redis_server_binary`] finds (so `KEYWARD_REDIS_SERVER` pointing at a build
/// directory brings its matching `redis-cli`), otherwise the first executable `redis-cli` on `PATH`, otherwise
/// `/usr/bin`, `/usr/sbin` or `/usr/local/bin`.
///
/// # Panics
///
/// Panics with [`MISSING_REDIS_CLI_MESSAGE`] if no binary is found, or if `KEYWARD_REDIS_CLI` names a file
/// that is not an executable.
pub fn redis_cli_binary() -> PathBuf {
    let beside_server = find_binary(env::var_os(REDIS_SERVER_ENV), env::var_os("PATH"))
        .ok()
        .and_then(|server| server.parent().map(Path::to_path_buf));
    let mut dirs: Vec<PathBuf> = beside_server.into_iter().collect();
    if let Some(path_var) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path_var));
    }
    let search = env::join_paths(dirs).ok();
    match find_named(
        "redis-cli",
        REDIS_CLI_ENV,
        MISSING_REDIS_CLI_MESSAGE,
        env::var_os(REDIS_CLI_ENV),
        search,
    ) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

/// The lookup behind [`redis_server_binary`], with its inputs made explicit.
fn find_binary(from_env: Option<OsString>, path_var: Option<OsString>) -> Result<PathBuf, String> {
    find_named(
        "redis-server",
        REDIS_SERVER_ENV,
        MISSING_REDIS_MESSAGE,
        from_env,
        path_var,
    )
}

/// Finds executable `name`: `from_env` (the value of `env_name`) if set, else the `path_var` directories, else
/// [`FALLBACK_DIRS`]; `missing` is the error when nothing is found.
fn find_named(
    name: &str,
    env_name: &str,
    missing: &str,
    from_env: Option<OsString>,
    path_var: Option<OsString>,
) -> Result<PathBuf, String> {
    if let Some(explicit) = from_env.filter(|value| !value.is_empty()) {
        let explicit = PathBuf::from(explicit);
        return if is_executable(&explicit) {
            Ok(explicit)
        } else {
            Err(format!(
                "{env_name}={} is not an executable file. {missing}",
                explicit.display()
            ))
        };
    }
    let path_dirs = path_var
        .as_deref()
        .map(|paths| env::split_paths(paths).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .filter(|dir| !dir.as_os_str().is_empty())
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| missing.to_owned())
}

/// Whether `path` is a regular file (after following symlinks) that someone may execute.
fn is_executable(path: &Path) -> bool {
    let Ok(metadata) = path.metadata() else {
        return false;
    };
    if !metadata.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        metadata.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake_binary(dir: &Path, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("redis-server");
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn explicit_env_var_wins() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_binary(dir.path(), 0o755);
        let found = find_binary(Some(bin.clone().into()), Some("/nonexistent".into())).unwrap();
        assert_eq!(found, bin);
    }

    #[test]
    fn explicit_env_var_must_be_executable() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_binary(dir.path(), 0o644);
        let err = find_binary(Some(bin.into()), None).unwrap_err();
        assert!(err.contains(REDIS_SERVER_ENV), "{err}");
        assert!(err.contains("redis-server not found"), "{err}");
    }

    #[test]
    fn searches_path_in_order() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        fake_binary(first.path(), 0o644); // not executable: skipped
        let expected = fake_binary(second.path(), 0o755);
        let path_var = env::join_paths([first.path(), second.path()]).unwrap();
        assert_eq!(find_binary(None, Some(path_var)).unwrap(), expected);
    }

    #[test]
    fn empty_env_var_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let expected = fake_binary(dir.path(), 0o755);
        let path_var = env::join_paths([dir.path()]).unwrap();
        assert_eq!(
            find_binary(Some("".into()), Some(path_var)).unwrap(),
            expected
        );
    }

    #[test]
    fn redis_cli_lookup_uses_its_own_env_var_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let not_exec = dir.path().join("redis-cli");
        fs::write(&not_exec, "#!/bin/sh\n").unwrap();
        let err = find_named(
            "redis-cli",
            REDIS_CLI_ENV,
            MISSING_REDIS_CLI_MESSAGE,
            Some(not_exec.into()),
            None,
        )
        .unwrap_err();
        assert!(err.contains("KEYWARD_REDIS_CLI="), "{err}");
        assert!(err.contains("apt-get install -y redis-server"), "{err}");
        let found = redis_cli_binary();
        assert!(found.ends_with("redis-cli"), "{}", found.display());
    }

    #[test]
    fn missing_binary_message_has_install_instructions() {
        let dir = tempfile::tempdir().unwrap();
        let path_var = env::join_paths([dir.path()]).unwrap();
        match find_binary(None, Some(path_var)) {
            // A fallback directory may legitimately hold redis-server.
            Ok(found) => assert!(FALLBACK_DIRS.iter().any(|d| found.starts_with(d))),
            Err(err) => {
                assert_eq!(err, MISSING_REDIS_MESSAGE);
                assert!(err.contains("apt-get install -y redis-server"));
                assert!(err.contains("brew install redis"));
                assert!(err.contains("KEYWARD_REDIS_SERVER"));
            }
        }
    }
}
