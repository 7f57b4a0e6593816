//! rustls server configuration from the policy's certificate and key.
//!
//! This module owns everything TLS on the inbound side: loading the PEM certificate chain and
//! private key named by `[tls]`, checking that they belong together, generating a self-signed
//! certificate (for the embedded default policy and `portcullis gen-cert`), and describing a
//! finished handshake for the `Received:` header and the envelope ([`session_info`]).
//!
//! One crypto provider everywhere: the server config is built with aws-lc-rs explicitly, so it
//! never depends on a process-wide default being installed. 0-RTT is off (SMTP commands sent as
//! early data could be replayed); session resumption keeps the rustls defaults.
//!
//! It must not do I/O on sockets: the listener and connection driver own the streams and use
//! the [`rustls::ServerConfig`] built here.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio_rustls::rustls::{
    InconsistentKeys, ProtocolVersion, ServerConfig, ServerConnection, SupportedProtocolVersion,
};

use crate::config::{CertSource, Tls, TlsVersion};
use crate::envelope::TlsInfo;

/// File name of the certificate chain written by [`write_cert_files`].
pub const CERT_FILE_NAME: &str = "cert.pem";
/// File name of the private key written by [`write_cert_files`] (mode 0600).
pub const KEY_FILE_NAME: &str = "key.pem";

/// Validity of a generated self-signed certificate, in days from now (starting one day in the
/// past to tolerate clock skew between the relay and a test client).
const SELF_SIGNED_VALID_DAYS: i64 = 3650;

/// Why a TLS server configuration or certificate could not be produced. Every variant that
/// concerns a file names it, so an operator knows which one to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read (missing, unreadable, a directory…).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A file is not well-formed PEM (bad base64, unterminated section…).
    #[error("{path}: malformed PEM: {detail}")]
    Pem {
        /// The malformed file.
        path: PathBuf,
        /// What the PEM parser reported.
        detail: String,
    },
    /// The certificate file holds no `CERTIFICATE` PEM section.
    #[error("{path}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" section)")]
    NoCertificate {
        /// The certificate file.
        path: PathBuf,
    },
    /// The key file holds no private key PEM section (PKCS#8, PKCS#1 or SEC1).
    #[error("{path}: no private key found (expected a PEM \"BEGIN PRIVATE KEY\" section)")]
    NoPrivateKey {
        /// The key file.
        path: PathBuf,
    },
    /// The private key parsed as PEM but the crypto provider cannot use it.
    #[error("{path}: unusable private key: {reason}")]
    InvalidKey {
        /// The key file.
        path: PathBuf,
        /// What rustls reported.
        reason: String,
    },
    /// The first certificate of the chain cannot be parsed.
    #[error("{path}: unusable certificate: {reason}")]
    InvalidCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What rustls reported.
        reason: String,
    },
    /// The private key is not the key of the (first) certificate in the chain.
    #[error("private key {key} does not match certificate {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Generating a self-signed certificate failed (e.g. the host name is not a valid DNS name).
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the assembled configuration (should not happen with the fixed provider).
    #[error("TLS configuration rejected: {0}")]
    Config(#[source] rustls::Error),
    /// Writing a generated certificate or key file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file (or directory) that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
}

/// Build the rustls server configuration for the inbound listeners.
///
/// TLS 1.2 and 1.3 are offered when `min_version` is 1.2, only 1.3 when it is 1.3; clients are
/// not asked for certificates; 0-RTT is disabled. With [`CertSource::SelfSigned`] a certificate
/// for `hostname` is generated in memory and a warning is logged.
pub fn server_config(tls: &Tls, hostname: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

    let certified_key = match &tls.source {
        CertSource::Files { cert, key } => {
            let chain = load_cert_chain(cert)?;
            let key_der = load_private_key(key)?;
            certified_key(chain, key_der, &provider, cert, key)?
        }
        CertSource::SelfSigned => {
            tracing::warn!(
                hostname,
                "using a self-signed TLS certificate generated at start; clients cannot verify \
                 it. Configure [tls] cert and key for production"
            );
            let (cert, key_pair) = self_signed(hostname)?;
            let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
            let generated = Path::new("<generated>");
            certified_key(
                vec![cert.der().clone()],
                key_der,
                &provider,
                generated,
                generated,
            )?
        }
    };

    let versions: &[&'static SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)));
    // Early data would let a network attacker replay SMTP commands (MAIL, RCPT, DATA).
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Generate a self-signed ECDSA P-256 certificate for `hostname` and return `(cert PEM,
/// key PEM)`.
///
/// The subject alternative names are `hostname` (a DNS name, or an IP address if it parses as
/// one), plus `localhost` and `127.0.0.1` when `hostname` is `localhost`. The certificate is a
/// leaf (not a CA) that a client can use as its own trust anchor.
pub fn generate_self_signed(hostname: &str) -> Result<(String, String), TlsError> {
    let (cert, key_pair) = self_signed(hostname)?;
    Ok((cert.pem(), key_pair.serialize_pem()))
}

/// Write a self-signed certificate for `hostname` to `dir/cert.pem` and `dir/key.pem`,
/// creating `dir` if needed, and return both paths. The key file is mode 0600 (also when it
/// already existed). Used by `portcullis gen-cert`.
pub fn write_cert_files(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_pem, key_pem) = generate_self_signed(hostname)?;
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let cert_path = dir.join(CERT_FILE_NAME);
    let key_path = dir.join(KEY_FILE_NAME);
    write_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Describe the negotiated protocol version and cipher suite of a finished handshake, e.g.
/// `TLSv1.3` with `TLS13_AES_128_GCM_SHA256`. `None` while the handshake is incomplete.
pub fn session_info(conn: &ServerConnection) -> Option<TlsInfo> {
    let version = conn.protocol_version()?;
    let suite = conn.negotiated_cipher_suite()?;
    let version = match version {
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        other => format!("{other:?}"),
    };
    let cipher = suite
        .suite()
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:?}", suite.suite()));
    Some(TlsInfo { version, cipher })
}

/// The rcgen certificate and its key pair for `hostname` (see [`generate_self_signed`]).
fn self_signed(hostname: &str) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    let mut names = vec![hostname.to_owned()];
    if hostname.eq_ignore_ascii_case("localhost") {
        names.push("127.0.0.1".to_owned());
    }
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hostname);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(SELF_SIGNED_VALID_DAYS);

    let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key_pair)?;
    Ok((cert, key_pair))
}

/// Every certificate in the PEM file `path`, leaf first; at least one.
fn load_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// The first private key in the PEM file `path`.
fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read_pem(path)?).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        other => pem_error(path, other),
    })
}

/// Pair chain and key, refusing a key that is not the leaf certificate's.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &rustls::crypto::CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::InvalidKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // aws-lc-rs always knows the public key of the keys it loads; `Unknown` would mean a
        // provider that cannot tell, which we accept as rustls itself does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
        Err(e) => Err(TlsError::InvalidCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// The PEM file `path`, at most [`crate::config::files::MAX_FILE`] octets.
fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::config::files::read_limited(path, crate::config::files::MAX_FILE).map_err(|source| {
        TlsError::Read {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsError {
    // Parsed from memory (`read_pem`): a read failure is `TlsError::Read` already.
    match e {
        pem::Error::NoItemsFound => TlsError::NoCertificate {
            path: path.to_path_buf(),
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// Create or truncate `path` with `mode` (enforced also on an existing file, before the
/// contents are written) and write `contents`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn files_config(cert: &Path, key: &Path, min_version: TlsVersion) -> Tls {
        Tls {
            source: CertSource::Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
            min_version,
        }
    }

    fn client_config(
        root_pem: &str,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Run a handshake over an in-memory pipe, exchange one line, and return the server's view
    /// of the session, or the first error of either side.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> Result<TlsInfo, String> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut stream = TlsAcceptor::from(server)
                .accept(server_io)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let info = session_info(stream.get_ref().1).ok_or("server: no session info")?;
            stream
                .write_all(b"220 hello\r\n")
                .await
                .map_err(|e| format!("server write: {e}"))?;
            stream.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(info)
        };
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let client_side = async move {
            let mut stream = TlsConnector::from(client)
                .connect(server_name, client_io)
                .await
                .map_err(|e| format!("client: {e}"))?;
            let mut buf = Vec::new();
            stream
                .read_to_end(&mut buf)
                .await
                .map_err(|e| format!("client read: {e}"))?;
            assert_eq!(buf, b"220 hello\r\n");
            Ok::<_, String>(())
        };
        let (server_result, client_result) = tokio::join!(server_side, client_side);
        client_result?;
        server_result
    }

    #[tokio::test]
    async fn self_signed_cert_is_its_own_trust_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert_files(dir.path(), "localhost").unwrap();
        let root_pem = fs::read_to_string(&cert).unwrap();
        let server =
            server_config(&files_config(&cert, &key, TlsVersion::Tls12), "ignored").unwrap();
        assert_eq!(server.max_early_data_size, 0);

        let tls13 = client_config(&root_pem, &[&rustls::version::TLS13]);
        for name in ["localhost", "127.0.0.1"] {
            let info = handshake(server.clone(), tls13.clone(), name)
                .await
                .unwrap();
            assert_eq!(info.version, "TLSv1.3");
            assert!(info.cipher.starts_with("TLS13_"), "{}", info.cipher);
        }
        let tls12 = client_config(&root_pem, &[&rustls::version::TLS12]);
        let info = handshake(server, tls12, "localhost").await.unwrap();
        assert_eq!(info.version, "TLSv1.2");
        assert!(
            info.cipher.starts_with("TLS_ECDHE_ECDSA_"),
            "{}",
            info.cipher
        );
    }

    #[tokio::test]
    async fn generated_cert_names_only_the_given_host() {
        let (cert_pem, key_pem) = generate_self_signed("relay.test").unwrap();
        assert!(cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(key_pem.contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        fs::write(&cert, &cert_pem).unwrap();
        fs::write(&key, &key_pem).unwrap();
        let server = server_config(&files_config(&cert, &key, TlsVersion::Tls12), "x").unwrap();
        let client = client_config(&cert_pem, &[&rustls::version::TLS13]);
        handshake(server.clone(), client.clone(), "relay.test")
            .await
            .unwrap();
        let err = handshake(server, client, "localhost").await.unwrap_err();
        assert!(err.contains("client"), "{err}");
    }

    #[tokio::test]
    async fn in_memory_self_signed_config_handshakes() {
        let tls = Tls {
            source: CertSource::SelfSigned,
            min_version: TlsVersion::Tls13,
        };
        let server = server_config(&tls, "localhost").unwrap();
        assert_eq!(server.max_early_data_size, 0);
        // The client cannot know the in-memory certificate: the handshake must fail on
        // verification, which proves a certificate is served.
        let (other, _) = generate_self_signed("localhost").unwrap();
        let client = client_config(&other, &[&rustls::version::TLS13]);
        let err = handshake(server, client, "localhost").await.unwrap_err();
        assert!(err.contains("client"), "{err}");
    }

    #[tokio::test]
    async fn min_version_13_refuses_tls12_only_client() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert_files(dir.path(), "localhost").unwrap();
        let root_pem = fs::read_to_string(&cert).unwrap();
        let server = server_config(&files_config(&cert, &key, TlsVersion::Tls13), "x").unwrap();
        let tls12 = client_config(&root_pem, &[&rustls::version::TLS12]);
        let err = handshake(server.clone(), tls12, "localhost")
            .await
            .unwrap_err();
        assert!(err.to_lowercase().contains("version"), "{err}");
        let tls13 = client_config(&root_pem, &[&rustls::version::TLS13]);
        handshake(server, tls13, "localhost").await.unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert_files(dir.path(), "localhost").unwrap();
        let missing = dir.path().join("nope.pem");

        let err = server_config(&files_config(&missing, &key, TlsVersion::Tls12), "x").unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { path, .. } if path == &missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let err =
            server_config(&files_config(&cert, &missing, TlsVersion::Tls12), "x").unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { path, .. } if path == &missing),
            "{err:?}"
        );
    }

    #[test]
    fn files_without_certificate_or_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert_files(dir.path(), "localhost").unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "just some text\n").unwrap();

        // Key and certificate swapped: neither file has what is expected of it.
        let err = server_config(&files_config(&key, &cert, TlsVersion::Tls12), "x").unwrap_err();
        assert!(
            matches!(&err, TlsError::NoCertificate { path } if path == &key),
            "{err:?}"
        );
        let err = server_config(&files_config(&cert, &cert, TlsVersion::Tls12), "x").unwrap_err();
        assert!(
            matches!(&err, TlsError::NoPrivateKey { path } if path == &cert),
            "{err:?}"
        );
        assert!(err.to_string().contains("no private key"), "{err}");
        let err = server_config(&files_config(&empty, &key, TlsVersion::Tls12), "x").unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");

        let broken = dir.path().join("broken.pem");
        fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();
        let err = server_config(&files_config(&broken, &key, TlsVersion::Tls12), "x").unwrap_err();
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");
    }

    #[test]
    fn mismatched_key_is_detected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (cert_a, _) = write_cert_files(a.path(), "localhost").unwrap();
        let (_, key_b) = write_cert_files(b.path(), "localhost").unwrap();
        let err =
            server_config(&files_config(&cert_a, &key_b, TlsVersion::Tls12), "x").unwrap_err();
        assert!(
            matches!(&err, TlsError::KeyMismatch { cert, key } if cert == &cert_a && key == &key_b),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn key_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let key = out.join(KEY_FILE_NAME);
        fs::create_dir(&out).unwrap();
        fs::write(&key, "old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let (cert, key) = write_cert_files(&out, "relay.test").unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            fs::read_to_string(cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }

    #[test]
    fn invalid_hostname_is_a_generate_error() {
        let err = generate_self_signed("bad host\u{e9}").unwrap_err();
        assert!(matches!(err, TlsError::Generate(_)), "{err:?}");
    }
}
