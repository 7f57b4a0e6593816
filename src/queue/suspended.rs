//! Suspended logins, kept under the spool: `SPOOL/suspended/NAME`, one file per login.
//!
//! A login is suspended by containment ([`crate::policy::containment`]) in the running relay,
//! or by `portcullis user suspend` from another process; `portcullis user resume` lifts it.
//! The file is the suspension: the relay keeps a copy in memory and follows the directory
//! (about every [`crate::policy::containment::POLL_INTERVAL`]), so a suspension survives
//! restarts and reloads, and both sides see each other's changes without a socket.
//!
//! A file is written as every spool file is (created in `tmp/`, fsynced, renamed without
//! replacing, directory fsynced) and holds one JSON [`Suspension`]. Its name is the login in
//! lower-case hex, so any octet of a login is safe in it; a login longer than
//! [`HEX_NAME_MAX`] octets is named by its first octets and a hash of the whole. The record
//! inside names the login in full, and is what counts; a file whose record cannot be read
//! still suspends the login its name decodes to (never fail open).
//!
//! With `[cluster] redis` the records are this node's durable copy of the suspensions every
//! node shares through the store ([`crate::policy::containment::shared`]); a record says
//! whether the store is known to hold it ([`Suspension::shared`], [`Suspension::store`]).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SpoolError, create_new, give_to, rename_noreplace, sync_dir};

/// The directory under the spool.
pub const DIR: &str = "suspended";

/// Longest login, in octets, whose file name is its whole hex form (2 characters an octet,
/// within the 255 of a file name).
pub const HEX_NAME_MAX: usize = 120;

/// The rule of a suspension made by an operator (and of a damaged record).
pub const OPERATOR_RULE: &str = "operator";

/// Largest record read, in octets (a record is a few hundred).
const MAX_RECORD: u64 = 64 * 1024;

/// Why a login is suspended, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The login (the SASL authentication identity, as in the users file).
    pub login: String,
    /// The rule that suspended it: `containment_rate_limit_hits`,
    /// `containment_recipient_domains`, `containment_client_ips`, or `operator`.
    pub rule: String,
    /// One line for a person: what tripped, or the operator's `--reason`.
    pub reason: String,
    /// When it was suspended, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The `[cluster] node` that suspended it; `None` without `[cluster]` (and in records
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Whether the shared store (`[cluster] redis`) is known to hold it: a shared record whose
    /// login is no longer in the store was resumed on another node. False in records written
    /// before it was recorded, and without `[cluster]`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// The id of the store that holds it (`portcullis:suspended:id`) when `shared`: a store
    /// found with another id lost its data (a restart without persistence, a flush), and the
    /// suspension is put in it again rather than taken for resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// The file name of `login`'s suspension.
pub fn file_name(login: &str) -> String {
    let bytes = login.as_bytes();
    if bytes.len() <= HEX_NAME_MAX {
        return hex(bytes);
    }
    format!("{}~{:016x}", hex(&bytes[..HEX_NAME_MAX - 20]), fnv1a(bytes))
}

/// The login a file name encodes, when it is a whole hex form (not a long login's).
fn login_of(name: &str) -> Option<String> {
    if !name.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..name.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(name.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// FNV-1a, 64 bits: stable across builds and releases (unlike the standard hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl super::Spool {
    fn suspended_dir(&self) -> PathBuf {
        self.root().join(DIR)
    }

    /// The path of `login`'s record; an empty login has none (its name would be the
    /// directory's).
    fn record_path(&self, login: &str) -> Result<PathBuf, SpoolError> {
        let dir = self.suspended_dir();
        if login.is_empty() {
            return Err(SpoolError::Io {
                op: "name",
                path: dir,
                source: io::Error::new(io::ErrorKind::InvalidInput, "an empty login"),
            });
        }
        Ok(dir.join(file_name(login)))
    }

    /// Record `s` durably. Returns false, changing nothing, when its login is suspended
    /// already (the first reason and time stay). Blocking.
    ///
    /// # Errors
    /// An empty login; the step that failed (create, write, fsync, chown, rename, directory
    /// fsync), and nothing is left in `suspended/` then.
    pub fn suspend_login(&self, s: &Suspension) -> Result<bool, SpoolError> {
        let dir = self.suspended_dir();
        let path = self.record_path(&s.login)?;
        if fs::symlink_metadata(&path).is_ok() {
            return Ok(false);
        }
        let tmp = self.stage_suspension(s)?;
        match rename_noreplace(&tmp, &path) {
            Ok(()) => {}
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    return Ok(false);
                }
                return Err(SpoolError::io("rename", &path)(e));
            }
        }
        sync_dir(&dir)?;
        Ok(true)
    }

    /// Lift `login`'s suspension durably. Returns false when it was not suspended. Blocking.
    ///
    /// # Errors
    /// An empty login; `unlink(2)` or the directory's fsync failed.
    pub fn resume_login(&self, login: &str) -> Result<bool, SpoolError> {
        let dir = self.suspended_dir();
        let path = self.record_path(login)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SpoolError::io("unlink", &path)(e)),
        }
        sync_dir(&dir)?;
        Ok(true)
    }

    /// Mark `login`'s record as held by the shared store whose id is `store` (`shared`), replacing it
    /// durably (written in `tmp/`, fsynced, renamed over, directory fsynced). Returns false,
    /// writing nothing, when it has no sound record (resumed meanwhile, or damaged: a damaged
    /// record is left as it is). Blocking.
    ///
    /// # Errors
    /// An empty login; the step that failed (the record is then left as it was).
    pub fn mark_shared(&self, login: &str, store: &str) -> Result<bool, SpoolError> {
        let dir = self.suspended_dir();
        let path = self.record_path(login)?;
        let mut record = match self.read_suspension(&path, &file_name(login)) {
            Entry::Record(s) if s.login == login => s,
            _ => return Ok(false),
        };
        if record.shared && record.store.as_deref() == Some(store) {
            return Ok(true);
        }
        record.shared = true;
        record.store = Some(store.to_owned());
        let tmp = self.stage_suspension(&record)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(SpoolError::io("rename", &path)(e));
        }
        sync_dir(&dir)?;
        Ok(true)
    }

    /// `s` written as a record into a new file in `tmp/`, fsynced and owned as spool files
    /// are: its path, for the caller to rename into `suspended/`. Blocking.
    ///
    /// # Errors
    /// The step that failed (create, encode, write, fsync, chown); nothing is left in `tmp/`.
    fn stage_suspension(&self, s: &Suspension) -> Result<std::path::PathBuf, SpoolError> {
        let tmp = self.temp_path("suspension");
        let written = (|| {
            let mut file = create_new(&tmp)?;
            let mut record = serde_json::to_vec(s).map_err(|source| SpoolError::Encode {
                what: "suspension",
                source,
            })?;
            record.push(b'\n');
            file.write_all(&record)
                .and_then(|()| file.sync_all())
                .map_err(SpoolError::io("write", &tmp))?;
            give_to(&tmp, self.inner.owner)
        })();
        match written {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// `login`'s suspension, if it is suspended. A record that cannot be read or trusted still
    /// suspends its login (with why, as the reason). Blocking.
    ///
    /// # Errors
    /// An empty login; the record's directory entry cannot be looked at.
    pub fn suspension(&self, login: &str) -> Result<Option<Suspension>, SpoolError> {
        let path = self.record_path(login)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SpoolError::io("stat", &path)(e)),
        }
        Ok(match self.read_suspension(&path, &file_name(login)) {
            Entry::Record(s) | Entry::Damaged(s, _) => Some(s),
            Entry::Stray(why) => Some(damaged(login.to_owned(), why)),
            Entry::Gone => None,
        })
    }

    /// Every suspension, in no particular order ([`Spool::list_suspended`] without its
    /// strays). Blocking.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn suspensions(&self) -> Result<Vec<Suspension>, SpoolError> {
        Ok(self.list_suspended()?.suspensions)
    }

    /// What `suspended/` holds. A record that cannot be read or trusted still suspends the
    /// login its name encodes, and is also listed among the strays with why; an entry whose
    /// name encodes no login is only a stray. A missing directory (a spool made before
    /// suspensions existed) holds none. Blocking.
    ///
    /// # Errors
    /// The directory cannot be read: nothing can be said of any login.
    pub fn list_suspended(&self) -> Result<Listing, SpoolError> {
        let dir = self.suspended_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(SpoolError::io("readdir", &dir)(e)),
        };
        let mut listing = Listing::default();
        for entry in entries {
            let entry = entry.map_err(SpoolError::io("readdir", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match self.read_suspension(&entry.path(), &name) {
                Entry::Record(s) => listing.suspensions.push(s),
                Entry::Damaged(s, why) => {
                    listing.strays.push(format!("{name}: {why}"));
                    listing.suspensions.push(s);
                }
                Entry::Stray(why) => listing.strays.push(format!("{name}: {why}")),
                Entry::Gone => {}
            }
        }
        Ok(listing)
    }

    /// Read the record in `path`, named `name`, as every spool file is read (no link
    /// followed, owned by the spool's owner, writable by no one else).
    fn read_suspension(&self, path: &Path, name: &str) -> Entry {
        let mut text = Vec::new();
        let read = match super::open_trusted(path, self.inner.owner.0, false) {
            Ok(file) => file
                .take(MAX_RECORD)
                .read_to_end(&mut text)
                .map_err(|e| e.to_string()),
            Err(super::Opened::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
                return Entry::Gone;
            }
            Err(super::Opened::Io(e)) => Err(e.to_string()),
            Err(super::Opened::Untrusted(why)) => Err(format!("untrusted record: {why}")),
        };
        let why = match read.map(|_| serde_json::from_slice::<Suspension>(&text)) {
            Ok(Ok(s)) if file_name(&s.login) == name => return Entry::Record(s),
            Ok(Ok(_)) => "the record names another login".to_owned(),
            Ok(Err(_)) => "unreadable record".to_owned(),
            Err(why) => why,
        };
        match login_of(name) {
            Some(login) => Entry::Damaged(damaged(login, why.clone()), why),
            None => Entry::Stray(why),
        }
    }
}

/// What `suspended/` holds ([`Spool::list_suspended`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The suspended logins.
    pub suspensions: Vec<Suspension>,
    /// Entries that are not a sound record: `NAME: why`.
    pub strays: Vec<String>,
}

/// One entry of `suspended/`, read.
enum Entry {
    Record(Suspension),
    /// Not a sound record, for a login its name encodes: still suspended.
    Damaged(Suspension, String),
    /// Not a record, and its name encodes no login.
    Stray(String),
    /// Removed meanwhile (resumed).
    Gone,
}

/// The suspension a damaged record of `login` stands for.
fn damaged(login: String, why: String) -> Suspension {
    Suspension {
        login,
        rule: OPERATOR_RULE.into(),
        reason: format!("damaged suspension record ({why})"),
        since_ms: 0,
        node: None,
        shared: false,
        store: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Spool;

    fn suspension(login: &str) -> Suspension {
        Suspension {
            login: login.into(),
            rule: "operator".into(),
            reason: "stolen password".into(),
            since_ms: 1_700_000_000_000,
            node: None,
            shared: false,
            store: None,
        }
    }

    #[test]
    fn a_suspension_is_kept_until_resumed_and_the_first_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.suspensions().unwrap(), vec![]);
        assert!(
            spool
                .suspend_login(&suspension("alice@example.com"))
                .unwrap()
        );
        let mut later = suspension("alice@example.com");
        later.reason = "again".into();
        assert!(!spool.suspend_login(&later).unwrap());
        assert_eq!(
            spool.suspension("alice@example.com").unwrap(),
            Some(suspension("alice@example.com"))
        );
        assert_eq!(
            spool.suspensions().unwrap(),
            vec![suspension("alice@example.com")]
        );
        assert!(spool.resume_login("alice@example.com").unwrap());
        assert!(!spool.resume_login("alice@example.com").unwrap());
        assert_eq!(spool.suspension("alice@example.com").unwrap(), None);
        // Nothing left behind in tmp/.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn any_login_makes_a_safe_file_name_and_long_ones_stay_distinct() {
        let long_a = format!("{}a", "x".repeat(300));
        let long_b = format!("{}b", "x".repeat(300));
        for login in ["../../etc/passwd", "a/b\0c\n", "é@例え.jp", &long_a] {
            let name = file_name(login);
            assert!(name.len() <= 255, "{login}");
            assert!(name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'~'));
        }
        assert_ne!(file_name(&long_a), file_name(&long_b));
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.suspend_login(&suspension("")).is_err());
        assert!(spool.resume_login("").is_err());
        assert!(spool.suspension("").is_err());
        assert_eq!(
            login_of(&file_name("bob@example.com")).unwrap(),
            "bob@example.com"
        );
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.suspend_login(&suspension(&long_a)).unwrap());
        assert_eq!(spool.suspension(&long_b).unwrap(), None);
        assert_eq!(spool.suspensions().unwrap(), vec![suspension(&long_a)]);
    }

    #[test]
    fn a_damaged_record_still_suspends_the_login_its_name_names() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let path = dir.path().join(DIR).join(file_name("carol"));
        fs::write(&path, b"{not json").unwrap();
        let found = spool.suspension("carol").unwrap().unwrap();
        assert_eq!(found.login, "carol");
        assert_eq!(
            found.reason,
            "damaged suspension record (unreadable record)"
        );
        assert_eq!(spool.suspensions().unwrap(), vec![found.clone()]);
        // A stray whose name encodes no login is reported, and hides no sound record.
        fs::write(dir.path().join(DIR).join("zz"), b"junk").unwrap();
        assert!(spool.suspend_login(&suspension("dave")).unwrap());
        let listing = spool.list_suspended().unwrap();
        let mut logins: Vec<&str> = listing
            .suspensions
            .iter()
            .map(|s| s.login.as_str())
            .collect();
        logins.sort_unstable();
        assert_eq!(logins, ["carol", "dave"]);
        let mut strays = listing.strays.clone();
        strays.sort();
        assert_eq!(
            strays,
            [
                format!("{}: unreadable record", file_name("carol")),
                "zz: unreadable record".into()
            ]
        );
        // A link planted in the login's name is not followed, and still suspends it.
        let erin = dir.path().join(DIR).join(file_name("erin"));
        std::os::unix::fs::symlink("/etc/passwd", &erin).unwrap();
        let found = spool.suspension("erin").unwrap().unwrap();
        assert!(
            found.reason.starts_with("damaged suspension record ("),
            "{}",
            found.reason
        );
    }
}
