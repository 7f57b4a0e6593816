//! DKIM private keys: PEM files holding PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA, what most
//! OpenDKIM keys are), as `[[dkim.sign]] key` names them.

use std::path::Path;

use base64::Engine as _;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};

/// A key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    /// The file holds no PEM private key.
    #[error("{path} holds no PEM private key (PKCS#8 or PKCS#1)")]
    NotPem { path: String },
    /// The key is neither RSA nor Ed25519.
    #[error("{path}: unsupported key type (RSA or Ed25519 only): {reason}")]
    Unsupported { path: String, reason: String },
}

/// The algorithm of a signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// RSA (`a=rsa-sha256`), with its modulus size in bits.
    Rsa { bits: usize },
    /// Ed25519 (`a=ed25519-sha256`, RFC 8463).
    Ed25519,
}

/// A loaded DKIM signing key.
pub struct SigningKey {
    key: DkimKey,
    public_key: Vec<u8>,
    algorithm: KeyAlgorithm,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Load the PEM key at `path`.
    ///
    /// # Errors
    /// [`KeyError`] when the file cannot be read, holds no PEM key, or a key of another type.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let shown = || path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| KeyError::Unreadable {
            path: shown(),
            source,
        })?;
        let unsupported = |e: mail_auth::Error| KeyError::Unsupported {
            path: shown(),
            reason: e.to_string(),
        };
        if let Ok(der) = PrivatePkcs1KeyDer::from_pem_slice(&pem) {
            let rsa =
                RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(der)).map_err(unsupported)?;
            return Ok(SigningKey::rsa(rsa));
        }
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .map_err(|_| KeyError::NotPem { path: shown() })?;
        if let Ok(ed) = Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_pkcs8_der()) {
            let public_key = ed.public_key();
            return Ok(SigningKey {
                key: DkimKey::Ed25519(ed),
                public_key,
                algorithm: KeyAlgorithm::Ed25519,
            });
        }
        let rsa = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(der)).map_err(unsupported)?;
        Ok(SigningKey::rsa(rsa))
    }

    fn rsa(rsa: RsaKey<Sha256>) -> SigningKey {
        let pkcs1 = rsa.public_key();
        let bits = rsa_modulus_bits(&pkcs1).unwrap_or_default();
        SigningKey {
            key: DkimKey::Rsa(rsa),
            public_key: spki_of_rsa(&pkcs1),
            algorithm: KeyAlgorithm::Rsa { bits },
        }
    }

    /// The key, for mail-auth's signer.
    pub fn dkim_key(&self) -> &DkimKey {
        &self.key
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The bytes of a DKIM record's `p=`, base64-decoded: RSA: SubjectPublicKeyInfo DER;
    /// Ed25519: the raw 32 bytes (RFC 8463 §4.2).
    pub fn public_key(&self) -> Vec<u8> {
        self.public_key.clone()
    }

    /// The DKIM TXT record to publish at `selector._domainkey.domain` (RFC 6376 §3.6.1).
    pub fn dns_record(&self) -> String {
        let k = match self.algorithm {
            KeyAlgorithm::Rsa { .. } => "rsa",
            KeyAlgorithm::Ed25519 => "ed25519",
        };
        let p = base64::engine::general_purpose::STANDARD.encode(&self.public_key);
        format!("v=DKIM1; k={k}; p={p}")
    }
}

/// DER length octets.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// SubjectPublicKeyInfo { rsaEncryption, NULL, BIT STRING { RSAPublicKey } }.
fn spki_of_rsa(pkcs1: &[u8]) -> Vec<u8> {
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x03];
    der_len(pkcs1.len() + 1, &mut bit_string);
    bit_string.push(0);
    bit_string.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(ALGORITHM.len() + bit_string.len(), &mut out);
    out.extend_from_slice(&ALGORITHM);
    out.extend_from_slice(&bit_string);
    out
}

/// The modulus size of an RSAPublicKey DER.
fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    fn len(bytes: &[u8]) -> Option<(usize, &[u8])> {
        let first = *bytes.first()?;
        if first & 0x80 == 0 {
            return Some((usize::from(first), bytes.get(1..)?));
        }
        let n = usize::from(first & 0x7f);
        let value = bytes
            .get(1..1 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        Some((value, bytes.get(1 + n..)?))
    }
    let (_, rest) = len(der.strip_prefix(&[0x30])?)?;
    let (n, rest) = len(rest.strip_prefix(&[0x02])?)?;
    let modulus = rest.get(..n)?;
    let zeros = modulus.iter().take_while(|b| **b == 0).count();
    let first = *modulus.get(zeros)?;
    Some((n - zeros - 1) * 8 + (8 - first.leading_zeros() as usize))
}
