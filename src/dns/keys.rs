//! DKIM private keys: PEM files holding PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA, what most
//! OpenDKIM keys are), as `[[dkim.sign]] key` names them.
//!
//! A key is loaded once, when the policy is compiled (so `check-config` and a reload refuse a
//! bad one), and kept as mail-auth's [`DkimKey`] for signing. RSA keys under 2048 bits are
//! refused: RFC 8301 §3.2 forbids signing with fewer than 1024, and receivers increasingly
//! treat 1024 as weak. The public half is kept in the form a DKIM key record's `p=` carries,
//! so `portcullis doctor` can compare it with what is published.

use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

/// The smallest RSA modulus accepted for signing, in bits.
pub const MIN_RSA_BITS: u32 = 2048;

/// The largest key file read, in bytes (a PEM RSA-8192 key is under 7 KiB).
const MAX_KEY_FILE: u64 = 64 * 1024;

/// DER OID content of rsaEncryption (1.2.840.113549.1.1.1, RFC 8017 appendix C).
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// DER OID content of id-Ed25519 (1.3.101.112, RFC 8410 §3).
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// Why a key file cannot be used for signing. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read (missing, permissions, a directory).
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any key file ([`MAX_KEY_FILE`] bytes).
    #[error("{} is larger than {MAX_KEY_FILE} bytes: not a key file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// No unencrypted private key in PEM form (`BEGIN PRIVATE KEY` or `BEGIN RSA PRIVATE
    /// KEY`), or broken PEM.
    #[error(
        "{} holds no unencrypted PEM private key (\"BEGIN PRIVATE KEY\" or \"BEGIN RSA PRIVATE \
         KEY\"): {reason}",
        path.display()
    )]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What the PEM reader found.
        reason: String,
    },
    /// A private key of a kind DKIM cannot sign with here (an EC key, another algorithm):
    /// RSA (RFC 6376) and Ed25519 (RFC 8463) only.
    #[error("{} holds {kind}; DKIM signs with RSA or Ed25519 keys only", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The kind of key found.
        kind: &'static str,
    },
    /// An RSA key under [`MIN_RSA_BITS`] bits.
    #[error(
        "{} is an RSA key of {} bits; at least {MIN_RSA_BITS} are required (make one with \
         `openssl genrsa -out KEY 2048`)",
        path.display(),
        bits.map_or_else(|| "fewer".to_owned(), |b| b.to_string())
    )]
    RsaTooSmall {
        /// The file.
        path: PathBuf,
        /// The modulus size, when it could be read.
        bits: Option<u32>,
    },
    /// The key is PEM of the right kind but its contents are refused (corrupt, inconsistent,
    /// an RSA key over 8192 bits).
    #[error("{} holds an unusable {kind} key: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// `RSA` or `Ed25519`.
        kind: &'static str,
        /// The crypto library's reason.
        reason: String,
    },
}

/// The algorithm and size of a signing key (the `a=` of its signatures, RFC 6376 §3.5 and
/// RFC 8463 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// `rsa-sha256`, with a modulus of `bits` bits (2048 to 8192).
    Rsa {
        /// The modulus size in bits.
        bits: u32,
    },
    /// `ed25519-sha256`.
    Ed25519,
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyAlgorithm::Rsa { bits } => write!(f, "rsa-sha256 ({bits} bits)"),
            KeyAlgorithm::Ed25519 => f.write_str("ed25519-sha256"),
        }
    }
}

/// A loaded DKIM signing key.
pub struct SigningKey {
    key: DkimKey,
    algorithm: KeyAlgorithm,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads the PEM key at `path`: PKCS#8 (`BEGIN PRIVATE KEY`) holding an RSA or Ed25519
    /// key, or PKCS#1 (`BEGIN RSA PRIVATE KEY`). The first private key in the file is used.
    ///
    /// # Errors
    /// [`KeyError`]: unreadable file, no PEM private key, a key type other than RSA or
    /// Ed25519, an RSA key under 2048 bits, or key contents the crypto library refuses.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let pem = read_limited(path)?;
        SigningKey::from_pem(&pem, path)
    }

    /// Parses PEM text as [`SigningKey::load`] does; `path` is only used in errors.
    ///
    /// # Errors
    /// As [`SigningKey::load`], except for reading.
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<SigningKey, KeyError> {
        let path_buf = || path.to_path_buf();
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| KeyError::NotPem {
            path: path_buf(),
            reason: match e {
                rustls_pki_types::pem::Error::NoItemsFound => "no private key found".to_owned(),
                other => other.to_string(),
            },
        })?;
        match &der {
            PrivateKeyDer::Pkcs1(pkcs1) => rsa_key(
                path,
                pkcs1.secret_pkcs1_der(),
                RsaDer::Pkcs1,
                der.clone_key(),
            ),
            PrivateKeyDer::Pkcs8(pkcs8) => {
                let bytes = pkcs8.secret_pkcs8_der();
                match pkcs8_algorithm(bytes) {
                    Some(oid) if oid == OID_RSA_ENCRYPTION => {
                        rsa_key(path, bytes, RsaDer::Pkcs8, der.clone_key())
                    }
                    Some(oid) if oid == OID_ED25519 => ed25519_key(path, bytes),
                    Some(_) => Err(KeyError::Unsupported {
                        path: path_buf(),
                        kind: "a PKCS#8 key of another algorithm",
                    }),
                    None => Err(KeyError::Invalid {
                        path: path_buf(),
                        kind: "PKCS#8",
                        reason: "malformed PKCS#8 structure".to_owned(),
                    }),
                }
            }
            PrivateKeyDer::Sec1(_) => Err(KeyError::Unsupported {
                path: path_buf(),
                kind: "an EC key (BEGIN EC PRIVATE KEY)",
            }),
            _ => Err(KeyError::Unsupported {
                path: path_buf(),
                kind: "a private key of an unknown kind",
            }),
        }
    }

    /// The key for mail-auth's DKIM signer.
    pub fn dkim_key(&self) -> &DkimKey {
        &self.key
    }

    /// The key's algorithm (and RSA modulus size).
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The public key as a DKIM key record's `p=` carries it, base64-decoded (RFC 6376
    /// §3.6.1): for RSA the DER SubjectPublicKeyInfo (what OpenDKIM's `opendkim-genkey`
    /// publishes); for Ed25519 the raw 32-octet key (RFC 8463 §4.2).
    pub fn public_key(&self) -> Vec<u8> {
        self.public_key.clone()
    }

    /// The TXT record to publish at `SELECTOR._domainkey.DOMAIN` for this key:
    /// `v=DKIM1; k=rsa; p=…` or `v=DKIM1; k=ed25519; p=…` (RFC 6376 §3.6.1, RFC 8463 §4.2).
    pub fn dns_record(&self) -> String {
        let k = match self.algorithm {
            KeyAlgorithm::Rsa { .. } => "rsa",
            KeyAlgorithm::Ed25519 => "ed25519",
        };
        let p = base64::engine::general_purpose::STANDARD.encode(&self.public_key);
        format!("v=DKIM1; k={k}; p={p}")
    }
}

/// Reads at most [`MAX_KEY_FILE`] bytes of `path` ([`crate::config::files::read_limited`]).
fn read_limited(path: &Path) -> Result<Vec<u8>, KeyError> {
    crate::config::files::read_limited(path, MAX_KEY_FILE).map_err(|source| {
        if source.kind() == std::io::ErrorKind::FileTooLarge {
            KeyError::TooLarge {
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Unreadable {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// How an RSA private key is encoded.
#[derive(Clone, Copy)]
enum RsaDer {
    /// RFC 8017 `RSAPrivateKey`.
    Pkcs1,
    /// RFC 5208 `PrivateKeyInfo` around an `RSAPrivateKey`.
    Pkcs8,
}

fn rsa_key(
    path: &Path,
    der: &[u8],
    encoding: RsaDer,
    key_der: PrivateKeyDer<'static>,
) -> Result<SigningKey, KeyError> {
    let invalid = |reason: String| KeyError::Invalid {
        path: path.to_path_buf(),
        kind: "RSA",
        reason,
    };
    let parsed = match encoding {
        RsaDer::Pkcs1 => RsaKeyPair::from_der(der),
        RsaDer::Pkcs8 => RsaKeyPair::from_pkcs8(der),
    };
    let pair = match parsed {
        Ok(pair) => pair,
        // aws-lc-rs refuses keys under 2048 bits itself; read the size for the message.
        Err(e) if e.description_() == "TooSmall" => {
            let pkcs1 = match encoding {
                RsaDer::Pkcs1 => Some(der),
                RsaDer::Pkcs8 => pkcs8_private_key(der),
            };
            return Err(KeyError::RsaTooSmall {
                path: path.to_path_buf(),
                bits: pkcs1.and_then(rsa_modulus_bits),
            });
        }
        Err(e) => return Err(invalid(e.to_string())),
    };
    let modulus = pair.public_key().modulus();
    let modulus = modulus.big_endian_without_leading_zero();
    let bits = bit_length(modulus);
    if bits < MIN_RSA_BITS {
        return Err(KeyError::RsaTooSmall {
            path: path.to_path_buf(),
            bits: Some(bits),
        });
    }
    let public_key = pair
        .public_key()
        .as_der()
        .map_err(|e| invalid(e.to_string()))?
        .as_ref()
        .to_vec();
    let key = RsaKey::<Sha256>::from_key_der(key_der).map_err(|e| invalid(e.to_string()))?;
    Ok(SigningKey {
        key: DkimKey::Rsa(key),
        algorithm: KeyAlgorithm::Rsa { bits },
        public_key,
    })
}

fn ed25519_key(path: &Path, pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
    let key = Ed25519Key::from_pkcs8_der(pkcs8).map_err(|e| KeyError::Invalid {
        path: path.to_path_buf(),
        kind: "Ed25519",
        reason: e.to_string(),
    })?;
    let public_key = key.public_key();
    Ok(SigningKey {
        key: DkimKey::Ed25519(key),
        algorithm: KeyAlgorithm::Ed25519,
        public_key,
    })
}

/// The number of significant bits of a big-endian unsigned integer.
fn bit_length(big_endian: &[u8]) -> u32 {
    let digits: Vec<u8> = big_endian.iter().copied().skip_while(|b| *b == 0).collect();
    match digits.first() {
        Some(first) => {
            let bytes = u32::try_from(digits.len()).unwrap_or(u32::MAX / 8);
            bytes * 8 - first.leading_zeros()
        }
        None => 0,
    }
}

// ----- a minimal DER reader: just enough to tell key kinds and sizes apart -----

/// One DER TLV at the start of `input`: (tag, contents, the rest). `None` when malformed.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;

/// The contents of `input`'s first TLV if its tag is `tag`, and the rest.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = tlv(input)?;
    (t == tag).then_some((contents, rest))
}

/// The algorithm OID (contents) of a PKCS#8 `PrivateKeyInfo` (RFC 5208 §5, RFC 5958 §2).
fn pkcs8_algorithm(der: &[u8]) -> Option<&[u8]> {
    let (info, _) = expect(der, SEQUENCE)?;
    let (_version, rest) = expect(info, INTEGER)?;
    let (algorithm, _) = expect(rest, SEQUENCE)?;
    let (oid, _) = expect(algorithm, OID)?;
    Some(oid)
}

/// The `privateKey` octets of a PKCS#8 `PrivateKeyInfo`.
fn pkcs8_private_key(der: &[u8]) -> Option<&[u8]> {
    let (info, _) = expect(der, SEQUENCE)?;
    let (_version, rest) = expect(info, INTEGER)?;
    let (_algorithm, rest) = expect(rest, SEQUENCE)?;
    let (key, _) = expect(rest, OCTET_STRING)?;
    Some(key)
}

/// The modulus size in bits of an RFC 8017 `RSAPrivateKey`.
fn rsa_modulus_bits(der: &[u8]) -> Option<u32> {
    let (key, _) = expect(der, SEQUENCE)?;
    let (_version, rest) = expect(key, INTEGER)?;
    let (modulus, _) = expect(rest, INTEGER)?;
    Some(bit_length(modulus))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `openssl` with `args` in `dir`, returning its standard output.
    fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (Debian's openssl package)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The DER SubjectPublicKeyInfo of the key in `file`, as openssl writes it.
    fn openssl_spki(dir: &Path, file: &str) -> Vec<u8> {
        openssl(dir, &["pkey", "-in", file, "-pubout", "-outform", "DER"])
    }

    fn load(dir: &Path, file: &str) -> Result<SigningKey, KeyError> {
        SigningKey::load(&dir.join(file))
    }

    #[test]
    fn rsa_keys_load_from_pkcs1_and_pkcs8_with_their_size_and_published_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        openssl(d, &["genrsa", "-traditional", "-out", "pkcs1.pem", "2048"]);
        let pkcs8 = openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:3072",
            ],
        );
        std::fs::write(d.join("pkcs8.pem"), pkcs8).expect("write");
        let pem = std::fs::read_to_string(d.join("pkcs1.pem")).expect("read");
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{pem}");
        for (file, bits) in [("pkcs1.pem", 2048), ("pkcs8.pem", 3072)] {
            let key = load(d, file).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(key.algorithm(), KeyAlgorithm::Rsa { bits }, "{file}");
            assert!(matches!(key.dkim_key(), DkimKey::Rsa(_)));
            // p= is the SubjectPublicKeyInfo OpenDKIM publishes (not the bare RSAPublicKey).
            let spki = openssl_spki(d, file);
            assert_eq!(key.public_key(), spki, "{file}");
            let p = base64::engine::general_purpose::STANDARD.encode(&spki);
            assert_eq!(key.dns_record(), format!("v=DKIM1; k=rsa; p={p}"));
        }
    }

    #[test]
    fn ed25519_key_loads_and_publishes_the_raw_32_octets() {
        use mail_auth::common::crypto::SigningKey as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
        let key = load(d, "ed.pem").expect("an Ed25519 PKCS#8 key loads");
        assert_eq!(key.algorithm(), KeyAlgorithm::Ed25519);
        // RFC 8463 §4.2: p= is the raw key, the last 32 octets of the SubjectPublicKeyInfo.
        let spki = openssl_spki(d, "ed.pem");
        let raw = spki[spki.len() - 32..].to_vec();
        assert_eq!(key.public_key(), raw);
        let p = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert_eq!(key.dns_record(), format!("v=DKIM1; k=ed25519; p={p}"));
        // The key signs, and the published half verifies what it signed.
        let input: &[u8] = b"canonicalized header section";
        let signature = key.dkim_key().sign(input).expect("sign");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input);
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, &raw)
            .verify(digest.as_ref(), &signature)
            .expect("the published key verifies the signature");
    }

    #[test]
    fn rsa_under_2048_bits_is_refused_with_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        openssl(d, &["genrsa", "-traditional", "-out", "pkcs1.pem", "1024"]);
        let pkcs8 = openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:1024",
            ],
        );
        std::fs::write(d.join("pkcs8.pem"), pkcs8).expect("write");
        for file in ["pkcs1.pem", "pkcs8.pem"] {
            let err = load(d, file).expect_err("1024-bit RSA is refused");
            assert!(
                matches!(
                    err,
                    KeyError::RsaTooSmall {
                        bits: Some(1024),
                        ..
                    }
                ),
                "{file}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains("1024 bits") && text.contains("2048"),
                "{text}"
            );
        }
    }

    #[test]
    fn unusable_files_get_typed_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ec8.pem",
            ],
        );
        openssl(
            d,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sec1.pem",
            ],
        );
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "ed25519",
                "-aes256",
                "-pass",
                "pass:x",
                "-out",
                "enc.pem",
            ],
        );
        std::fs::write(
            d.join("cert.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        std::fs::write(
            d.join("broken.pem"),
            "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK==\n-----END RSA PRIVATE KEY-----\n",
        )
        .expect("write");
        std::fs::write(d.join("big.pem"), vec![b'A'; 70 * 1024]).expect("write");
        let kind = |e: &KeyError| match e {
            KeyError::Unreadable { .. } => "unreadable",
            KeyError::TooLarge { .. } => "too large",
            KeyError::NotPem { .. } => "not pem",
            KeyError::Unsupported { .. } => "unsupported",
            KeyError::RsaTooSmall { .. } => "rsa too small",
            KeyError::Invalid { .. } => "invalid",
        };
        let cases = [
            ("missing.pem", "unreadable"),
            ("ec8.pem", "unsupported"),
            ("sec1.pem", "unsupported"),
            ("enc.pem", "not pem"),
            ("cert.pem", "not pem"),
            ("broken.pem", "invalid"),
            ("big.pem", "too large"),
        ];
        for (file, expected) in cases {
            let err = load(d, file).expect_err(file);
            assert_eq!(kind(&err), expected, "{file}: {err:?}");
            assert!(err.to_string().contains(file), "{file}: {err}");
        }
    }

    #[test]
    fn bit_length_ignores_leading_zero_octets() {
        for (bytes, bits) in [
            (&[][..], 0),
            (&[0, 0][..], 0),
            (&[1][..], 1),
            (&[0x00, 0x80, 0][..], 16),
            (&[0x7f, 0xff][..], 15),
        ] {
            assert_eq!(bit_length(bytes), bits, "{bytes:?}");
        }
    }

    #[test]
    fn der_reader_refuses_truncated_and_oversized_lengths() {
        for bad in [
            &[][..],
            &[0x30][..],
            &[0x30, 0x05, 0x00][..],
            &[0x30, 0x80][..],
            &[0x30, 0x85, 1, 1, 1, 1, 1][..],
            &[0x30, 0x82, 0xff][..],
        ] {
            assert!(tlv(bad).is_none(), "{bad:?}");
            assert!(pkcs8_algorithm(bad).is_none());
            assert!(pkcs8_private_key(bad).is_none());
            assert!(rsa_modulus_bits(bad).is_none());
        }
        // Well-formed DER of the wrong shape: a SET, a SEQUENCE without its INTEGER, one
        // whose inner lengths overrun the outer one.
        for bad in [
            &[0x31, 0x03, 0x02, 0x01, 0x00][..],
            &[0x30, 0x02, 0x04, 0x00][..],
            &[0x30, 0x04, 0x02, 0x01, 0x00, 0x30][..],
            &[0x30, 0x05, 0x02, 0x01, 0x00, 0x02, 0x05][..],
        ] {
            assert!(pkcs8_algorithm(bad).is_none(), "{bad:?}");
            assert!(pkcs8_private_key(bad).is_none(), "{bad:?}");
            assert!(rsa_modulus_bits(bad).is_none(), "{bad:?}");
        }
        assert_eq!(
            tlv(&[0x02, 0x81, 0x01, 0x07, 0xaa]),
            Some((0x02, &[0x07][..], &[0xaa][..]))
        );
    }

    /// PEM `PRIVATE KEY` around `der`.
    fn pkcs8_pem(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    }

    #[test]
    fn hostile_pkcs8_is_refused_without_panicking() {
        let path = Path::new("hostile.pem");
        // PrivateKeyInfo { 0, { rsaEncryption, NULL }, OCTET STRING { SEQUENCE { 0 } } }:
        // an RSA key with no modulus.
        let rsa_without_modulus = [
            0x30, 0x19, 0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7,
            0x0d, 0x01, 0x01, 0x01, 0x05, 0x00, 0x04, 0x05, 0x30, 0x03, 0x02, 0x01, 0x00,
        ];
        // The same around an unknown OID (1.2.3).
        let unknown = [
            0x30, 0x10, 0x02, 0x01, 0x00, 0x30, 0x04, 0x06, 0x02, 0x2a, 0x03, 0x04, 0x05, 0x30,
            0x03, 0x02, 0x01, 0x00,
        ];
        // An outer length longer than the input.
        let truncated = [0x30, 0x7f, 0x02, 0x01, 0x00];
        let err = SigningKey::from_pem(pkcs8_pem(&rsa_without_modulus).as_bytes(), path)
            .expect_err("an RSA key without a modulus");
        assert!(
            matches!(
                err,
                KeyError::Invalid { kind: "RSA", .. } | KeyError::RsaTooSmall { bits: None, .. }
            ),
            "{err:?}"
        );
        let err = SigningKey::from_pem(pkcs8_pem(&unknown).as_bytes(), path)
            .expect_err("an unknown algorithm");
        assert!(matches!(err, KeyError::Unsupported { .. }), "{err:?}");
        let err = SigningKey::from_pem(pkcs8_pem(&truncated).as_bytes(), path)
            .expect_err("truncated DER");
        assert!(
            matches!(err, KeyError::Invalid { kind: "PKCS#8", .. }),
            "{err:?}"
        );
    }
}
