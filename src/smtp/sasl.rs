//! SASL PLAIN and LOGIN decoding (RFC 4616, draft-murchison-sasl-login), strict.
//!
//! Only the decoding lives here; verifying the password is the driver's business (it runs
//! argon2 off the reactor).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Supported mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// A decoded login attempt.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub mechanism: Mechanism,
    pub login: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// Why a SASL response was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `*` (RFC 4954 §4).
    #[error("client cancelled the exchange")]
    Cancelled,
    /// Not valid base64.
    #[error("malformed base64")]
    BadBase64,
    /// Decoded, but not a valid PLAIN message (wrong number of NULs, empty login, not UTF-8).
    #[error("malformed SASL message")]
    Malformed,
    /// PLAIN authorization identity differs from the login: portcullis does not let one user
    /// act as another.
    #[error("authorization identity differs from login")]
    AuthzidMismatch,
}

/// Decode one base64 response line (`*` cancels; `=` is an empty initial response).
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    if line == b"*" {
        return Err(SaslError::Cancelled);
    }
    if line == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslError::BadBase64)
}

/// Parse a PLAIN message `authzid NUL authcid NUL passwd`.
pub fn parse_plain(decoded: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed);
    let (authzid, login, password) = (text(authzid)?, text(authcid)?, text(password)?);
    if login.is_empty() || password.is_empty() {
        return Err(SaslError::Malformed);
    }
    if !authzid.is_empty() && authzid != login {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(Credentials {
        mechanism: Mechanism::Plain,
        login,
        password,
    })
}

/// Decode one LOGIN field (user name or password) into text.
pub fn parse_login_field(decoded: Vec<u8>) -> Result<String, SaslError> {
    let s = String::from_utf8(decoded).map_err(|_| SaslError::Malformed)?;
    if s.is_empty() || s.contains('\0') {
        return Err(SaslError::Malformed);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> Vec<u8> {
        STANDARD.encode(s).into_bytes()
    }

    #[test]
    fn plain_table() {
        let ok = parse_plain(b"\0alice\0secret").unwrap();
        assert_eq!(
            (ok.login.as_str(), ok.password.as_str()),
            ("alice", "secret")
        );
        assert!(parse_plain(b"alice\0alice\0secret").is_ok());
        assert_eq!(
            parse_plain(b"bob\0alice\0secret"),
            Err(SaslError::AuthzidMismatch)
        );
        assert_eq!(parse_plain(b"alice\0secret"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0\0secret"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0a\0b\0c"), Err(SaslError::Malformed));
        assert_eq!(parse_plain(b"\0a\xff\0b"), Err(SaslError::Malformed));
    }

    #[test]
    fn response_decoding() {
        assert_eq!(decode_response(b"*"), Err(SaslError::Cancelled));
        assert_eq!(decode_response(b"=").unwrap(), b"");
        assert_eq!(decode_response(&b64(b"hi")).unwrap(), b"hi");
        assert_eq!(decode_response(b"!!!"), Err(SaslError::BadBase64));
        assert_eq!(decode_response(b"aGk"), Err(SaslError::BadBase64));
    }

    #[test]
    fn debug_hides_password() {
        let c = parse_plain(b"\0alice\0hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
