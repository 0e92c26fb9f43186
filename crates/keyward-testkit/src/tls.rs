//! TLS test fixtures: a throwaway certificate authority with server and client certificates
//! ([`TestCerts`]), and a `redis-server` that speaks TLS on a TCP port ([`TlsServer`]).
//!
//! The one decision to know: the server's readiness is still checked over its **Unix socket**, in plain text.
//! Redis binds every listener before it answers anything, so once the socket answers `PING` the TLS port is
//! listening too — and the readiness probe needs no certificate, whichever client authentication the test
//! sets up.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::server::{RedisServer, ServerOptions, free_tcp_port};

/// How many free ports [`TlsServer::spawn`] tries before giving up (another process may take the port
/// between picking it and the server binding it).
const TLS_ATTEMPTS: usize = 5;

/// File names inside [`TestCerts::dir`].
const CA: &str = "ca.pem";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";
const CLIENT_CERT: &str = "client.pem";
const CLIENT_KEY: &str = "client.key";
const OTHER_CA: &str = "other-ca.pem";
const OTHER_CLIENT_CERT: &str = "other-client.pem";
const OTHER_CLIENT_KEY: &str = "other-client.key";

/// A freshly generated set of certificates, as PEM strings and as files in a temporary directory (removed on
/// drop):
///
/// - a **CA** (`ca.pem`), which signed
///   - a **server** certificate for `localhost` and `127.0.0.1` (`server.pem`, `server.key`), and
///   - a **client** certificate (`client.pem`, `client.key`);
/// - an **unrelated CA** (`other-ca.pem`), which signed another client certificate (`other-client.pem`,
///   `other-client.key`): what a client or a server must refuse.
///
/// ```no_run
/// use keyward_testkit::{TestCerts, TlsServer};
///
/// let certs = TestCerts::generate();
/// let server = TlsServer::spawn(&certs, true); // clients must present a certificate signed by the CA
/// println!("{} trusts {}", server.url(), certs.ca_file().display());
/// ```
pub struct TestCerts {
    dir: TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    other_ca_pem: String,
    other_client_cert_pem: String,
    other_client_key_pem: String,
}

impl std::fmt::Debug for TestCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCerts")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// A CA's certificate (PEM) and the issuer that signs with its key.
struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn authority(name: &str) -> Authority {
    let key = KeyPair::generate().expect("generate a CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign the CA");
    Authority {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A certificate signed by `ca` for `names`, with `purpose`: `(certificate PEM, key PEM)`.
fn leaf(
    ca: &Authority,
    common_name: &str,
    names: &[&str],
    purpose: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("generate a key");
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>(),
    )
    .expect("certificate parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .expect("sign a certificate");
    (cert.pem(), key.serialize_pem())
}

impl TestCerts {
    /// Generates the CAs and certificates and writes them into a fresh temporary directory.
    ///
    /// # Panics
    ///
    /// Panics if a key cannot be generated or a file cannot be written (test set-up failures).
    pub fn generate() -> TestCerts {
        let ca = authority("keyward test CA");
        let other_ca = authority("keyward unrelated test CA");
        let (server_cert_pem, server_key_pem) = leaf(
            &ca,
            "keyward test server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) = leaf(
            &ca,
            "keyward test client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (other_client_cert_pem, other_client_key_pem) = leaf(
            &other_ca,
            "keyward unrelated test client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let dir = tempfile::Builder::new()
            .prefix("keyward-tls-")
            .tempdir()
            .unwrap_or_else(|err| {
                panic!("cannot create a temporary directory for certificates: {err}")
            });
        for (name, pem) in [
            (CA, &ca.pem),
            (SERVER_CERT, &server_cert_pem),
            (SERVER_KEY, &server_key_pem),
            (CLIENT_CERT, &client_cert_pem),
            (CLIENT_KEY, &client_key_pem),
            (OTHER_CA, &other_ca.pem),
            (OTHER_CLIENT_CERT, &other_client_cert_pem),
            (OTHER_CLIENT_KEY, &other_client_key_pem),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, pem)
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        }
        TestCerts {
            dir,
            ca_pem: ca.pem,
            client_cert_pem,
            client_key_pem,
            other_ca_pem: other_ca.pem,
            other_client_cert_pem,
            other_client_key_pem,
        }
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(CA)
    }

    /// The server certificate file (signed by the CA, for `localhost` and `127.0.0.1`).
    pub fn server_cert_file(&self) -> PathBuf {
        self.dir.path().join(SERVER_CERT)
    }

    /// The server's private key file.
    pub fn server_key_file(&self) -> PathBuf {
        self.dir.path().join(SERVER_KEY)
    }

    /// The client certificate (PEM, signed by the CA).
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert_pem
    }

    /// The client's private key (PEM).
    pub fn client_key_pem(&self) -> &str {
        &self.client_key_pem
    }

    /// The client certificate file.
    pub fn client_cert_file(&self) -> PathBuf {
        self.dir.path().join(CLIENT_CERT)
    }

    /// The client's private key file.
    pub fn client_key_file(&self) -> PathBuf {
        self.dir.path().join(CLIENT_KEY)
    }

    /// The unrelated CA's certificate (PEM): it signed neither the server's nor the client's certificate.
    pub fn other_ca_pem(&self) -> &str {
        &self.other_ca_pem
    }

    /// The unrelated CA's certificate file.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.path().join(OTHER_CA)
    }

    /// A client certificate signed by the unrelated CA (PEM), which a server trusting only the CA refuses.
    pub fn other_client_cert_pem(&self) -> &str {
        &self.other_client_cert_pem
    }

    /// The private key of [`TestCerts::other_client_cert_pem`] (PEM).
    pub fn other_client_key_pem(&self) -> &str {
        &self.other_client_key_pem
    }

    /// The files a TLS server (a data node, a cluster node or a sentinel) is started with, for
    /// [`SentinelOptions::tls`](crate::SentinelOptions::tls) and
    /// [`ClusterOptions::tls`](crate::ClusterOptions::tls); `require_client_cert` sets
    /// `tls-auth-clients yes`. The paths point into this [`TestCerts`]' directory: keep it alive as long as
    /// the servers.
    pub fn server_files(&self, require_client_cert: bool) -> TlsFiles {
        TlsFiles {
            ca: self.ca_file(),
            cert: self.server_cert_file(),
            key: self.server_key_file(),
            client_cert: self.client_cert_file(),
            client_key: self.client_key_file(),
            require_client_cert,
        }
    }
}

/// What a TLS test server is configured with, from [`TestCerts::server_files`]: the server certificate and
/// key, the CA it trusts, the client certificate it presents when it dials another server (a replica to its
/// master, a sentinel to a data node or another sentinel, a cluster node to its peers), and whether clients
/// must present a certificate signed by the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    require_client_cert: bool,
}

impl TlsFiles {
    /// The CA file (`redis-cli --cacert`).
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// The client certificate file (`redis-cli --cert`).
    pub fn client_cert_file(&self) -> &Path {
        &self.client_cert
    }

    /// The client key file (`redis-cli --key`).
    pub fn client_key_file(&self) -> &Path {
        &self.client_key
    }

    /// Whether clients must present a certificate (`tls-auth-clients yes`).
    pub fn require_client_cert(&self) -> bool {
        self.require_client_cert
    }

    /// The configuration as `(directive, value)` pairs, without the port: `tls-cert-file`, `tls-key-file`,
    /// `tls-client-cert-file`, `tls-client-key-file`, `tls-ca-cert-file`, `tls-auth-clients` and
    /// `tls-replication yes` (replicas, sentinels and the cluster bus dial over TLS too).
    pub(crate) fn directives(&self) -> Vec<(&'static str, String)> {
        vec![
            ("tls-cert-file", self.cert.display().to_string()),
            ("tls-key-file", self.key.display().to_string()),
            (
                "tls-client-cert-file",
                self.client_cert.display().to_string(),
            ),
            ("tls-client-key-file", self.client_key.display().to_string()),
            ("tls-ca-cert-file", self.ca.display().to_string()),
            (
                "tls-auth-clients",
                if self.require_client_cert {
                    "yes"
                } else {
                    "no"
                }
                .to_owned(),
            ),
            ("tls-replication", "yes".to_owned()),
        ]
    }

    /// [`TlsFiles::directives`] as `redis-server` arguments, after `--tls-port <port>`.
    pub(crate) fn server_args(&self, port: u16) -> Vec<String> {
        let mut args = vec!["--tls-port".to_owned(), port.to_string()];
        for (directive, value) in self.directives() {
            args.push(format!("--{directive}"));
            args.push(value);
        }
        args
    }
}

/// Spawns `base` plus `--tls-port <free port>` and `files`' TLS arguments (and `extra(tls_port)`), retrying
/// with another port a few times when the server does not start (the port was taken meanwhile). Returns the
/// server and its TLS port.
///
/// # Panics
///
/// When every attempt failed, with each attempt's reason and log.
pub(crate) fn spawn_tls(
    files: &TlsFiles,
    base: &ServerOptions,
    extra: impl Fn(u16) -> Vec<String>,
) -> (RedisServer, u16) {
    let mut failures = Vec::new();
    for _ in 0..TLS_ATTEMPTS {
        let port = free_tcp_port();
        let opts = base.clone().args(files.server_args(port)).args(extra(port));
        // `spawn_with` panics with the server log when the server exits (say, the port was taken).
        match panic::catch_unwind(AssertUnwindSafe(|| RedisServer::spawn_with(opts))) {
            Ok(server) => return (server, port),
            Err(payload) => failures.push(
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "redis-server did not start".to_owned()),
            ),
        }
    }
    panic!(
        "failed to start a TLS redis-server in {TLS_ATTEMPTS} attempts:\n{}",
        failures.join("\n")
    );
}

/// A throwaway `redis-server` listening with TLS on a free TCP port of 127.0.0.1 (server certificate and
/// trusted client CA from a [`TestCerts`]), and in plain text on a Unix socket for set-up and assertions
/// ([`TlsServer::server`]). Dropping it kills the server.
#[derive(Debug)]
pub struct TlsServer {
    server: RedisServer,
    port: u16,
}

impl TlsServer {
    /// Spawns the server: `--tls-port <free port>` and [`TestCerts::server_files`]' arguments
    /// (`--tls-cert-file … --tls-key-file … --tls-ca-cert-file <CA> --tls-auth-clients yes|no`, `yes` when
    /// `require_client_cert`: a client without a certificate signed by the CA is refused during the
    /// handshake).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::spawn`]; a port taken meanwhile by another process is retried a few times first.
    pub fn spawn(certs: &TestCerts, require_client_cert: bool) -> TlsServer {
        let (server, port) = spawn_tls(
            &certs.server_files(require_client_cert),
            &ServerOptions::default(),
            |_| Vec::new(),
        );
        TlsServer { server, port }
    }

    /// The TLS URL, `rediss://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The underlying server; its [`RedisServer::url`], [`RedisServer::client`] and
    /// [`RedisServer::connection`] use the plain-text Unix socket.
    pub fn server(&self) -> &RedisServer {
        &self.server
    }
}
