//! The files a policy names (users, recipients, upstream password, PEM certificates): read and
//! validated at load, so a bad file never starts and never replaces a running policy.
//!
//! Every error is reported under the policy key that names the file (`auth.users_file`), with
//! the place inside the file at the start of the message (`users[2].password_hash: …`,
//! `line 3: …`).

use std::collections::HashSet;
use std::path::Path;

use super::compile::check_sender;
use super::raw::RawUser;
use super::value::{HashProblem, ValueError};
use super::{ConfigError, User, load};

/// The most a file the policy names (the policy itself, users, recipients, a token, PEM
/// certificates and CA bundles) may hold: 64 MiB, far above any real one, so that a path to
/// `/dev/zero` or a runaway file is an error rather than a relay reading forever.
pub const MAX_FILE: u64 = 64 * 1024 * 1024;

/// Read at most `max` octets of `path`: a regular file, or a pipe such as `<(…)`. It is
/// opened without waiting (`O_NONBLOCK`, cleared once open), so a FIFO nobody writes to is an
/// error instead of a wait forever.
///
/// # Errors
/// The file's own I/O error; [`std::io::ErrorKind::WouldBlock`] for a FIFO with no writer;
/// [`std::io::ErrorKind::FileTooLarge`] when it holds more than `max` octets.
pub fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut bytes = Vec::new();
    if file.metadata()?.file_type().is_fifo() {
        // Opened without a writer, a FIFO reads as empty at once: an error, not an empty
        // file. With a writer it either has data or would block.
        let mut first = vec![0u8; 64 * 1024];
        match (&file).read(&mut first) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "a FIFO nobody writes to",
                ));
            }
            Ok(n) => bytes.extend_from_slice(&first[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    // SAFETY: fcntl on a descriptor this function owns, for the life of the call: reads wait
    // again (for the writer that is there).
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    let left = (max + 1).saturating_sub(bytes.len() as u64);
    file.take(left).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {}", super::units::format_size(max)),
        ));
    }
    Ok(bytes)
}

/// [`read_limited`] to [`MAX_FILE`], as UTF-8 text.
///
/// # Errors
/// As [`read_limited`], and [`std::io::ErrorKind::InvalidData`] for text that is not UTF-8.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, MAX_FILE)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// Reads a file named by `key`; a missing or unreadable file is an error on `key`. A leading
/// UTF-8 byte order mark (what Windows PowerShell 5.1's `-Encoding UTF8` writes) is dropped:
/// kept, it would become part of the first address, user name or password.
pub(super) fn read(path: &Path, key: &str, errors: &mut Vec<ConfigError>) -> Option<String> {
    match read_text(path) {
        Ok(text) => Some(match text.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_owned(),
            None => text,
        }),
        Err(e) => {
            errors.push(ConfigError::new(
                key,
                format!("cannot read {}: {e}", path.display()),
            ));
            None
        }
    }
}

/// Loads the users file (`[[users]]` with `name`, `password_hash`, `senders`).
pub(super) fn load_users(path: &Path, key: &str, errors: &mut Vec<ConfigError>) -> Vec<User> {
    let Some(text) = read(path, key, errors) else {
        return Vec::new();
    };
    // Errors inside the file are collected with paths relative to it, then prefixed with the
    // policy key that names the file.
    let mut inner = Vec::new();
    let users = parse_users(&text, &mut inner);
    errors.extend(
        inner
            .into_iter()
            .map(|e| ConfigError::new(key, format!("{}: {}", e.key, e.message))),
    );
    users
}

/// Parses and validates the text of a users file.
fn parse_users(text: &str, errors: &mut Vec<ConfigError>) -> Vec<User> {
    let document = match load::parse_document(text) {
        Ok(document) => document,
        Err(e) => {
            errors.push(e);
            return Vec::new();
        }
    };
    // Each top-level key of the file is a field of `raw::RawUsersFile`; entries are
    // deserialized one by one so that one bad entry hides nothing else.
    let mut raw_users = Vec::new();
    for (name, value) in document {
        if name == "users" {
            raw_users =
                load::array_of_tables::<RawUser>(value, "users", errors).unwrap_or_default();
        } else {
            errors.push(ConfigError::new(name, "unknown key"));
        }
    }

    let mut seen = HashSet::new();
    let mut users = Vec::new();
    for (i, raw) in raw_users.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let at = format!("users[{i}]");
        let before = errors.len();
        let name = match raw.name {
            Some(name) if !name.trim().is_empty() => {
                if !seen.insert(name.clone()) {
                    errors.push(ConfigError::new(
                        format!("{at}.name"),
                        format!("duplicate user {name:?}"),
                    ));
                }
                name
            }
            Some(_) => {
                errors.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
                String::new()
            }
            None => {
                errors.push(ConfigError::new(format!("{at}.name"), "is required"));
                String::new()
            }
        };
        let password_hash = match raw.password_hash {
            Some(hash) => {
                if let Err(message) = check_password_hash(&hash) {
                    let message = message.to_string();
                    errors.push(ConfigError::new(format!("{at}.password_hash"), message));
                }
                hash
            }
            None => {
                errors.push(ConfigError::new(
                    format!("{at}.password_hash"),
                    "is required (make one with `portcullis passwd`)",
                ));
                String::new()
            }
        };
        let mut senders = Vec::new();
        for (j, sender) in raw.senders.unwrap_or_default().iter().enumerate() {
            match check_sender(sender) {
                Ok(sender) => senders.push(sender),
                Err(message) => errors.push(ConfigError::new(
                    format!("{at}.senders[{j}]"),
                    message.to_string(),
                )),
            }
        }
        if errors.len() == before {
            users.push(User {
                name,
                password_hash,
                senders,
            });
        }
    }
    users
}

/// A password hash must be a PHC string for argon2id (what `portcullis passwd` prints).
pub(super) fn check_password_hash(hash: &str) -> Result<(), ValueError> {
    let parsed = argon2::PasswordHash::new(hash).map_err(HashProblem::NotPhc)?;
    if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
        return Err(HashProblem::NotArgon2id {
            algorithm: parsed.algorithm.to_string(),
        }
        .into());
    }
    if parsed.hash.is_none() {
        return Err(HashProblem::NoHashValue.into());
    }
    // Parameters argon2 refuses (e.g. m=1) would make every AUTH for this user a local failure
    // (454) that is quicker than a real check: refused here, not found at the first login.
    argon2::Params::try_from(&parsed).map_err(HashProblem::UnusableParams)?;
    if let Some(version) = parsed.version {
        argon2::Version::try_from(version).map_err(HashProblem::UnsupportedVersion)?;
    }
    let mut salt = [0u8; 64];
    parsed
        .salt
        .ok_or(HashProblem::NoSalt)?
        .decode_b64(&mut salt)
        .map_err(HashProblem::BadSalt)?;
    Ok(())
}

/// Loads a recipients file: one address or `@domain` per line, U-labels or A-labels, blank
/// lines and comments ignored. Entries are returned in canonical form (see `check_sender`); a
/// local part keeps its case, because matching ignores ASCII case only (see
/// [`crate::envelope::Address::matches`]).
pub(super) fn load_recipients(
    path: &Path,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<String> {
    let Some(text) = read(path, key, errors) else {
        return Vec::new();
    };
    let mut recipients = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = strip_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        match check_sender(line) {
            Ok(entry) => recipients.push(entry),
            Err(message) => errors.push(ConfigError::new(
                key,
                format!("{}: line {}: {message}", path.display(), n + 1),
            )),
        }
    }
    // An empty list refuses every recipient of the accepted domains but postmaster: what a
    // failed export leaves behind, never what an administrator means.
    if recipients.is_empty() && errors.iter().all(|e| e.key != key) {
        errors.push(ConfigError::new(
            key,
            format!(
                "{} holds no address: every recipient in accepted_domains would be refused \
                 (an empty export?); list at least one, or remove recipients_file",
                path.display()
            ),
        ));
    }
    recipients
}

/// A recipients file line without its comment: `#` starts one at the beginning of the line or
/// after white space, outside a quoted local part (`#` is a legal character of a local part:
/// `a#b@example.com` is one address).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '#' if !quoted && previous.is_whitespace() => return &line[..i],
            _ => {}
        }
        previous = c;
    }
    line
}

/// Reads a password file; one trailing newline (LF or CRLF) is removed. Empty is an error.
pub(super) fn load_password(
    path: &Path,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<String> {
    let text = read(path, key, errors)?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        errors.push(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
        return None;
    }
    Some(password.to_owned())
}

/// Checks that a file named by `key` is readable and holds at least one PEM block. Parsing the
/// certificate or key itself is the TLS module's job; this catches the wrong path early.
pub(super) fn check_pem(path: &Path, key: &str, errors: &mut Vec<ConfigError>) {
    if let Some(text) = read(path, key, errors)
        && !text.contains("-----BEGIN ")
    {
        errors.push(ConfigError::new(
            key,
            format!("{} is not a PEM file (no -----BEGIN line)", path.display()),
        ));
    }
}
