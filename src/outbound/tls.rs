//! TLS towards an upstream: one rustls client configuration per upstream, built at start.
//!
//! - `tls = "required"`: the certificate is verified against the upstream's `ca` bundle, or
//!   the system roots when `ca` is not set, for the host named in `address` (a DNS name or an
//!   IP address). A failed handshake or verification fails the attempt; portcullis never falls
//!   back to plaintext.
//! - `tls = "opportunistic"`: STARTTLS when the upstream offers it, without verifying the
//!   certificate (RFC 7435 opportunistic security: encryption against passive listeners, the
//!   same as Postfix's `may`). Use `required` where the upstream's identity matters.
//! - `tls = "none"`: no client configuration at all.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{CryptoProvider, aws_lc_rs};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore};

use crate::config::{Upstream, UpstreamTls};

/// Why the TLS configuration of an upstream could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// The `ca` bundle could not be read or holds no usable certificate.
    #[error("upstream {upstream}: ca {path}: {problem}")]
    Ca {
        upstream: String,
        path: String,
        problem: CaProblem,
    },
    /// `ca` is not set and the system has no usable root certificates.
    #[error("upstream {upstream}: no system root certificates found; set ca")]
    NoRoots { upstream: String },
    /// The host part of `address` is not a valid TLS server name.
    #[error("upstream {upstream}: {host:?} is not a valid TLS server name")]
    ServerName { upstream: String, host: String },
    /// rustls refused the configuration.
    #[error("upstream {upstream}: TLS configuration rejected: {source}")]
    Config {
        upstream: String,
        source: rustls::Error,
    },
}

/// What is wrong with an upstream's `ca` bundle.
#[derive(Debug, thiserror::Error)]
pub enum CaProblem {
    /// The file cannot be read, or is not PEM.
    #[error("{0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// A certificate rustls cannot use as a trust anchor.
    #[error("unusable certificate: {0}")]
    Unusable(#[from] rustls::Error),
    /// No `BEGIN CERTIFICATE` section.
    #[error("no certificate found")]
    Empty,
}

/// What an upstream connection needs for STARTTLS.
#[derive(Clone)]
pub struct ClientTls {
    /// The rustls configuration (verifying or not, per the policy).
    pub config: Arc<ClientConfig>,
    /// The name sent as SNI and verified in the certificate.
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The TLS client configuration for `upstream`, or `None` for `tls = "none"`.
pub fn client_tls(upstream: &Upstream) -> Result<Option<ClientTls>, ClientTlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| ClientTlsError::Config {
            upstream: upstream.name.clone(),
            source,
        })?;
    let config = match upstream.tls {
        UpstreamTls::None => return Ok(None),
        UpstreamTls::Required => builder
            .with_root_certificates(roots(upstream)?)
            .with_no_client_auth(),
        UpstreamTls::Opportunistic => unverified(builder, provider),
    };
    let host = upstream
        .tls_name
        .as_deref()
        .unwrap_or_else(|| host_of(&upstream.address));
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| ClientTlsError::ServerName {
            upstream: upstream.name.clone(),
            host: host.to_owned(),
        })?;
    Ok(Some(ClientTls {
        config: Arc::new(config),
        server_name,
    }))
}

/// A client configuration that encrypts without verifying the server's certificate but still
/// checks the handshake signatures (opportunistic TLS; also the benchmark's STARTTLS client).
pub fn unverified_client_config() -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    Ok(unverified(builder, provider))
}

fn unverified(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>,
    provider: Arc<CryptoProvider>,
) -> ClientConfig {
    builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
        .with_no_client_auth()
}

/// The host part of `host:port` or `[v6]:port`.
pub fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[')
        && let Some((host, _)) = rest.split_once(']')
    {
        return host;
    }
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

fn roots(upstream: &Upstream) -> Result<RootCertStore, ClientTlsError> {
    let mut store = RootCertStore::empty();
    match &upstream.ca {
        Some(path) => {
            let ca_error = |problem: CaProblem| ClientTlsError::Ca {
                upstream: upstream.name.clone(),
                path: path.display().to_string(),
                problem,
            };
            for cert in read_certs(path).map_err(|e| ca_error(e.into()))? {
                store.add(cert).map_err(|e| ca_error(e.into()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(native.certs);
        }
    }
    if store.is_empty() {
        return Err(match &upstream.ca {
            Some(path) => ClientTlsError::Ca {
                upstream: upstream.name.clone(),
                path: path.display().to_string(),
                problem: CaProblem::Empty,
            },
            None => ClientTlsError::NoRoots {
                upstream: upstream.name.clone(),
            },
        });
    }
    Ok(store)
}

/// Every certificate of the PEM file `path` (at most [`crate::config::files::MAX_FILE`]
/// octets).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, rustls_pki_types::pem::Error> {
    let pem = crate::config::files::read_limited(path, crate::config::files::MAX_FILE)
        .map_err(rustls_pki_types::pem::Error::Io)?;
    CertificateDer::pem_slice_iter(&pem).collect()
}

/// Accepts any certificate but still checks the handshake signatures, so the session keys
/// are bound to the key the server presented (opportunistic TLS only).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_part_of_addresses() {
        assert_eq!(
            host_of("exchange.example.internal:25"),
            "exchange.example.internal"
        );
        assert_eq!(host_of("127.0.0.1:2525"), "127.0.0.1");
        assert_eq!(host_of("[::1]:25"), "::1");
    }
}
