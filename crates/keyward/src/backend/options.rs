//! Connection settings: timeouts, reconnection, the circuit breaker, TLS (verification, a custom CA, client
//! certificates), and the embedded backend's budgets.
//!
//! TLS material is only *named* here; files are read and every PEM is parsed when connecting
//! ([`ConnectOptions::tls_certificates`]), so that an unreadable file or a malformed PEM fails the connect with
//! an error naming it rather than a TLS handshake failure later. Key bytes never reach `Debug` or an error.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::MemoryOptions;
use crate::error::{Error, Result};

/// Connection settings. Credentials come only from the URL and are never logged.
///
/// ```
/// use std::time::Duration;
/// let options = keyward::ConnectOptions::default()
///     .connect_timeout(Duration::from_secs(2))
///     .response_timeout(Duration::from_millis(250));
/// ```
///
/// Mutual TLS with a private CA (for a `rediss://` URL; the files are read when connecting):
///
/// ```
/// let options = keyward::ConnectOptions::default()
///     .tls_ca_file("/etc/redis-tls/ca.pem")
///     .tls_client_cert_files("/etc/redis-tls/client.pem", "/etc/redis-tls/client.key");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// The CAs that verify the server, replacing the system's (None: the system's).
    pub(crate) tls_ca: Option<PemSource>,
    /// The client certificate chain and key for mutual TLS; its `Debug` never shows key material.
    pub(crate) client_cert: ClientCert,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) reconnect_retries: usize,
    pub(crate) memory: MemoryOptions,
    pub(crate) breaker_failures: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) danger_accept_invalid_certs: bool,
    pub(crate) group_invalidation_bound: Duration,
    pub(crate) lazy_connect: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            tls_ca: None,
            client_cert: ClientCert(None),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(1),
            reconnect_retries: 6,
            memory: MemoryOptions::default(),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
            danger_accept_invalid_certs: false,
            group_invalidation_bound: Duration::from_millis(500),
            lazy_connect: false,
        }
    }
}

impl ConnectOptions {
    /// How long to wait for a connection (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// How long to wait for any one command's answer (default 1 s).
    #[must_use]
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }
    /// Reconnection attempts, with exponential backoff, after the connection drops (default 6). Standalone
    /// servers only: behind Sentinel the old address is retried once, and the follower finds a moved master.
    #[must_use]
    pub fn reconnect_retries(mut self, n: usize) -> Self {
        self.reconnect_retries = n;
        self
    }
    /// The circuit breaker in front of Redis, shared by every capability of the handle: it opens after
    /// `failures` consecutive calls that found Redis unavailable (timed out, refused, dropped; default 3),
    /// fails every call at once with [`Error::CircuitOpen`] for `cooldown` (default 1 s) — caches then fail
    /// open, rate limits apply their `on_error` — and then lets one probe through, closing if it succeeds.
    #[must_use]
    pub fn breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures.max(1);
        self.breaker_cooldown = cooldown;
        self
    }
    /// **Turns off TLS certificate and hostname verification** for `rediss://` URLs. Anyone on the network
    /// path can then impersonate the server. For test set-ups with self-signed certificates only; it is
    /// logged at `warn` once and shown in `Debug`. A URL's `#insecure` fragment alone is refused: it must be
    /// this explicit call.
    #[must_use]
    pub fn danger_accept_invalid_certs(mut self) -> Self {
        self.danger_accept_invalid_certs = true;
        self
    }

    /// Trust only the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks) to verify the server,
    /// instead of the system's trust store: for a Redis whose certificate a private CA signed. Needs a
    /// `rediss://` URL. Replaces an earlier [`tls_ca_file`](Self::tls_ca_file).
    ///
    /// # Errors
    /// Connecting fails with [`Error::InvalidArgument`] ("the PEM given to tls_ca_pem") when `pem` holds no
    /// certificate or one that does not parse, and with [`Error::InvalidUrl`] for a URL that is not `rediss://`.
    #[must_use]
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(PemSource::Bytes(pem.into()));
        self
    }

    /// As [`tls_ca_pem`](Self::tls_ca_pem), with the PEM read from the file at `path` when connecting (not
    /// now). Replaces an earlier [`tls_ca_pem`](Self::tls_ca_pem).
    ///
    /// # Errors
    /// Connecting fails with [`Error::InvalidArgument`] naming the file when it cannot be read or holds no
    /// certificate that parses, and with [`Error::InvalidUrl`] for a URL that is not `rediss://`.
    #[must_use]
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(PemSource::File(path.into()));
        self
    }

    /// Present a client certificate (mutual TLS, for a Redis with `tls-auth-clients yes`): `cert` is the PEM
    /// certificate chain, the client's own certificate first; `key` its private key in PEM (PKCS#8, PKCS#1
    /// or SEC1). The key is kept in memory and never shown in `Debug` or errors. Needs a `rediss://` URL.
    /// Replaces an earlier [`tls_client_cert_files`](Self::tls_client_cert_files).
    ///
    /// # Errors
    /// Connecting fails with [`Error::InvalidArgument`] ("the PEM given to tls_client_cert_pem") when the
    /// chain or the key does not parse or the key does not belong to the certificate, and with
    /// [`Error::InvalidUrl`] for a URL that is not `rediss://`. A server that refuses the certificate fails
    /// the connect with [`Error::Connect`].
    #[must_use]
    pub fn tls_client_cert_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_cert = ClientCert(Some((
            PemSource::Bytes(cert.into()),
            PemSource::Bytes(key.into()),
        )));
        self
    }

    /// As [`tls_client_cert_pem`](Self::tls_client_cert_pem), with the certificate chain and the key read from
    /// the files at `cert_path` and `key_path` when connecting (not now). Replaces an earlier
    /// [`tls_client_cert_pem`](Self::tls_client_cert_pem).
    ///
    /// # Errors
    /// Connecting fails with [`Error::InvalidArgument`] naming the file that cannot be read or does not parse
    /// (or both, when the key does not belong to the certificate), and as
    /// [`tls_client_cert_pem`](Self::tls_client_cert_pem) otherwise.
    #[must_use]
    pub fn tls_client_cert_files(
        mut self,
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Self {
        self.client_cert = ClientCert(Some((
            PemSource::File(cert_path.into()),
            PemSource::File(key_path.into()),
        )));
        self
    }

    /// Connect in the background instead of at start-up, for services that may start before Redis does
    /// (containers start in any order). [`Keyward::connect_with`](crate::Keyward::connect_with) (and the
    /// `from_env` constructors) then return at once, after checking only the URL and the TLS material; a
    /// background task connects, retrying with backoff (100 ms doubling to 5 s, each attempt bounded by the
    /// connect timeout) until it succeeds or the handle is dropped.
    ///
    /// Until it is connected, every call fails at once as unavailable ([`Error::Connect`], for which
    /// [`Error::is_unavailable`] is true), so each capability answers per its failure mode, exactly as
    /// while Redis is down: caches with `on_error = "fail_open"` run the loader and write nothing, rate
    /// limits apply their `on_error`, sessions, locks, idempotency keys and streams return the error, and
    /// [`Keyward::ping`](crate::Keyward::ping) fails (a readiness probe says "not ready");
    /// [`Keyward::breaker_state`](crate::Keyward::breaker_state) reports `Open`. No call waits for the
    /// connection. Off by default: a service that cannot do without Redis should fail at start-up.
    ///
    /// ```no_run
    /// # async fn demo(policy: keyward::policy::Policy) -> keyward::Result<()> {
    /// let options = keyward::ConnectOptions::default().lazy_connect();
    /// let kw = keyward::Keyward::connect_with("redis://redis:6379", policy, options).await?; // at once
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn lazy_connect(mut self) -> Self {
        self.lazy_connect = true;
        self
    }

    /// Settings for the embedded backend, used for `mem://` or when no `REDIS_URL` is set.
    #[must_use]
    pub fn memory(mut self, m: MemoryOptions) -> Self {
        self.memory = m;
        self
    }

    /// Redis Cluster only: the staleness bound of a class or namespace invalidation (default 500 ms,
    /// at least 20 ms). On Cluster each handle reads the group epochs from a view refreshed by a push on every
    /// bump and re-read every quarter of this bound; a view older than half the bound is re-read before it is
    /// used, and a caller shares another's fetch in progress only if it started less than half the bound ago.
    /// So no cache call that starts later than this after [`Cache::invalidate_all`](crate::cache::Cache::invalidate_all)
    /// or [`Keyward::invalidate_namespace`](crate::Keyward::invalidate_namespace) returned, in any process,
    /// is served an entry filled before the invalidation. On a single server (and behind Sentinel) the epochs
    /// are read inside each script and the bound is zero. See `docs/operations.md`.
    #[must_use]
    pub fn group_invalidation_bound(mut self, d: Duration) -> Self {
        self.group_invalidation_bound = d.max(Duration::from_millis(20));
        self
    }
}

/// Where a PEM comes from: bytes given in code, or a file read when connecting.
#[derive(Clone)]
pub(crate) enum PemSource {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl fmt::Debug for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemSource::Bytes(bytes) => write!(f, "PEM ({} bytes)", bytes.len()),
            PemSource::File(path) => write!(f, "file {:?}", path.display().to_string()),
        }
    }
}

/// The client certificate chain and key, if set. Its `Debug` says `set` and where from, never the bytes.
#[derive(Clone)]
pub(crate) struct ClientCert(pub(crate) Option<(PemSource, PemSource)>);

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("not set"),
            Some((PemSource::File(cert), PemSource::File(key))) => write!(
                f,
                "set (files {:?}, {:?})",
                cert.display().to_string(),
                key.display().to_string()
            ),
            Some(_) => f.write_str("set (PEM given in code)"),
        }
    }
}

/// Which option a PEM came from, for messages: the file, or the method it was given to.
fn describe(source: &PemSource, file_kind: &str, method: &str, part: &str) -> String {
    match source {
        PemSource::File(path) => format!(
            "the {file_kind} file `{}` (ConnectOptions::{method})",
            path.display()
        ),
        PemSource::Bytes(_) => format!("the {part}PEM given to ConnectOptions::{method}"),
    }
}

fn tls_error(what: String) -> Error {
    Error::InvalidArgument {
        what: format!("TLS: {what}"),
    }
}

/// The bytes of `source`, reading a file now.
fn load(source: &PemSource, name: &str) -> Result<Vec<u8>> {
    match source {
        PemSource::Bytes(bytes) => Ok(bytes.clone()),
        // Read once per connect, before any connection: a blocking read of a small file is fine here.
        PemSource::File(path) => {
            std::fs::read(path).map_err(|e| tls_error(format!("cannot read {name}: {e}")))
        }
    }
}

/// The certificates in `pem`: at least one, and every block parses.
fn certificates(pem: &[u8], name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error(format!("{name} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "{name} holds no PEM `CERTIFICATE` block"
        )));
    }
    Ok(certs)
}

impl ConnectOptions {
    /// Whether any TLS material (a CA or a client certificate) is set; it then needs a `rediss://` URL.
    pub(crate) fn has_tls_material(&self) -> bool {
        self.tls_ca.is_some() || self.client_cert.0.is_some()
    }

    /// The CA and client certificate for redis-rs's `Client::build_with_tls`, read and checked now: `None`
    /// when neither is set.
    ///
    /// redis-rs silently skips what is not a certificate (an empty trust store then refuses every server),
    /// and reports a bad key only when connecting; checking here names the file or option at fault.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the file or the option: unreadable, not PEM, no certificate, a
    /// certificate that is not a usable trust anchor, a key that does not parse, is of an unsupported type or
    /// does not belong to the certificate.
    pub(crate) fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        if !self.has_tls_material() {
            return Ok(None);
        }
        let root_cert = match &self.tls_ca {
            None => None,
            Some(source) => {
                let method = match source {
                    PemSource::Bytes(_) => "tls_ca_pem",
                    PemSource::File(_) => "tls_ca_file",
                };
                let name = describe(source, "CA", method, "");
                let pem = load(source, &name)?;
                let mut store = rustls::RootCertStore::empty();
                for cert in certificates(&pem, &name)? {
                    store.add(cert).map_err(|e| {
                        tls_error(format!(
                            "{name} holds a certificate that cannot be a CA: {e}"
                        ))
                    })?;
                }
                Some(pem)
            }
        };
        let client_tls = match &self.client_cert.0 {
            None => None,
            Some((cert_source, key_source)) => {
                let method = match cert_source {
                    PemSource::Bytes(_) => "tls_client_cert_pem",
                    PemSource::File(_) => "tls_client_cert_files",
                };
                let cert_name = describe(cert_source, "client certificate", method, "certificate ");
                let key_name = describe(key_source, "client key", method, "key ");
                let client_cert = load(cert_source, &cert_name)?;
                let client_key = load(key_source, &key_name)?;
                let chain = certificates(&client_cert, &cert_name)?;
                // The parser's message names the PEM section, never its contents.
                let key = PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                    tls_error(format!("{key_name} holds no usable private key: {e}"))
                })?;
                let provider = rustls::crypto::ring::default_provider();
                rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                    tls_error(format!(
                        "{key_name} cannot sign for {cert_name} (a key of another certificate, or an \
                         unsupported key type): {e}"
                    ))
                })?;
                Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}
