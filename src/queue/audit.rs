//! The audit log: every operator command that changes something (delete, purge, hold, release,
//! restore, retry, suspend, resume, pause, resume of the listeners) appends one line to
//! `SPOOL/audit.jsonl`: when, which command with which arguments, who ran it, what it affected.
//! `portcullis audit [--since DUR] [--json]` prints it ([`read`], [`text_line`],
//! [`json_value`]).
//!
//! One JSON object per line ([`Entry`]), appended with `O_APPEND` and fsynced before the command
//! reports success: an action the operator was told about is in the log. The file is private
//! (0600) and belongs to the spool's owner, like every spool file. A command run with
//! `--dry-run` changes nothing and is not logged. Entries are recorded after the action: a
//! command whose action succeeded but whose entry could not be written says so and exits 1 (the
//! action stays done).
//!
//! # Concurrent writers
//!
//! A writer holds an exclusive `flock(2)` on the open log while it checks, rotates and writes,
//! so the lines of concurrent commands never interleave and a rotation never loses a line: a
//! writer that waited on a file rotated meanwhile sees that the name no longer leads to it,
//! and opens the new one.
//!
//! # Bounded growth
//!
//! Before appending, a log of [`ROTATE_AT`] bytes (16 MiB) or more is renamed to
//! `audit.jsonl.1` (replacing the previous one) and a new `audit.jsonl` is started: the two
//! files hold at most 2 × 16 MiB plus one entry. One entry lists every message its command
//! affected (about 20 bytes per id: a purge of 100,000 messages is a 2 MB line), so 16 MiB
//! keeps at least several such incidents and years of ordinary use. [`read`] reads both files,
//! oldest first.
//!
//! # A crash mid-write
//!
//! A line cut short by a crash (no newline at the end of the file) is skipped by [`read`] with
//! a note, never a panic; the next writer first ends it with a newline, so the torn line stays
//! a line of its own and never corrupts the entry written after it.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FILE_MODE, Spool, SpoolError, report, sync_dir};
use crate::envelope::QueueId;

/// Name of the audit log under the spool root.
pub const FILE_NAME: &str = "audit.jsonl";

/// Name of the previous audit log under the spool root (the one rotated out).
pub const OLD_FILE_NAME: &str = "audit.jsonl.1";

/// Size in bytes at which the audit log is rotated to [`OLD_FILE_NAME`] before the next entry
/// (16 MiB).
pub const ROTATE_AT: u64 = 16 * 1024 * 1024;

/// How many ids or names the text form shows before `…`.
const SHOWN: usize = 3;

/// How many arguments the text form shows before `…`.
const SHOWN_ARGS: usize = 8;

/// How many times a writer reopens a log that was rotated under it before it gives up. A
/// rotation happens once per 16 MiB, so more than a few in a row mean something else renames
/// the file; the bound is loose because, with a small rotation size (tests) and many writers
/// on a loaded machine, one writer can lose the race several times running.
const REOPEN_TRIES: usize = 64;

/// One operator action, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When the command acted, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The command, as typed after `portcullis` (e.g. `queue purge`, `user suspend`).
    pub command: String,
    /// Its arguments and options, as given (e.g. `["--from", "@spam.example"]`).
    pub args: Vec<String>,
    /// The real user id of the process that ran it.
    pub uid: u32,
    /// The login uid of its session (`/proc/self/loginuid`), so that `sudo` still names the
    /// person; absent when the kernel does not know one (no login session, or no audit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
    /// What it affected: queue ids, logins, or `listeners` (empty in a quarantine record).
    #[serde(default)]
    pub affected: Vec<String>,
}

impl Entry {
    /// An entry for `command` with `args` and `affected`, stamped now with this process's
    /// user ids.
    pub fn now(command: &str, args: &[String], affected: Vec<String>) -> Entry {
        Entry {
            at_ms: crate::observe::event::unix_millis(),
            command: command.to_owned(),
            args: args.to_vec(),
            // SAFETY: getuid has no preconditions.
            uid: unsafe { libc::getuid() },
            login_uid: login_uid(),
            affected,
        }
    }
}

/// The audit log's path under `root`.
pub fn path(root: &Path) -> PathBuf {
    root.join(FILE_NAME)
}

impl Spool {
    /// Append `entry` to the audit log and fsync it (the file and, when it is new, the spool
    /// directory), rotating the log first when it has reached [`ROTATE_AT`] bytes.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when the log cannot be opened, locked, rotated, written or synced;
    /// [`SpoolError::Untrusted`] when its name leads to something else than a private file of
    /// the spool's owner (a hard link, a FIFO, a file of another user; a symlink is an `Io`
    /// error). The caller reports it (the action itself has already been taken).
    pub fn audit(&self, entry: &Entry) -> Result<(), SpoolError> {
        append(self.root(), self.inner.owner, entry, ROTATE_AT)
    }
}

/// [`Spool::audit`] with the rotation size as a parameter.
fn append(root: &Path, owner: (u32, u32), entry: &Entry, rotate_at: u64) -> Result<(), SpoolError> {
    let path = path(root);
    let mut line = serde_json::to_vec(entry).map_err(|source| SpoolError::Encode {
        what: "audit entry",
        source,
    })?;
    line.push(b'\n');
    let (mut file, len) = open_locked(root, owner, rotate_at)?;
    if len > 0 && !ends_with_newline(&file, len).map_err(SpoolError::io("read", &path))? {
        // A line torn by a crash: end it, so that it stays a line of its own.
        line.insert(0, b'\n');
    }
    file.write_all(&line)
        .map_err(SpoolError::io("write", &path))?;
    file.sync_data().map_err(SpoolError::io("fsync", &path))?;
    if len == 0 {
        // A new file: its name must survive a crash too.
        sync_dir(root)?;
    }
    Ok(())
    // The lock goes with the descriptor.
}

/// Open the current log for appending, locked exclusively, rotated first when it has
/// `rotate_at` bytes or more; the file and its length.
fn open_locked(root: &Path, owner: (u32, u32), rotate_at: u64) -> Result<(File, u64), SpoolError> {
    let path = path(root);
    for _ in 0..REOPEN_TRIES {
        let file = open_checked(&path, owner)?;
        // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(SpoolError::io("flock", &path)(io::Error::last_os_error()));
        }
        let meta = file.metadata().map_err(SpoolError::io("stat", &path))?;
        // Rotated while this writer waited for the lock: the name leads to another file (or,
        // for a moment, to none).
        let current = fs::symlink_metadata(&path)
            .is_ok_and(|now| now.ino() == meta.ino() && now.dev() == meta.dev());
        if !current {
            continue;
        }
        if meta.len() < rotate_at {
            return Ok((file, meta.len()));
        }
        let old = root.join(OLD_FILE_NAME);
        fs::rename(&path, &old).map_err(SpoolError::io("rename", &path))?;
        sync_dir(root)?;
        // Writers waiting on this file's lock reopen by name, as this one does now.
    }
    Err(SpoolError::io("open", &path)(io::Error::other(
        "the audit log was renamed under this writer again and again",
    )))
}

/// Open (or create) the log at `path` for appending. A command run as root writes here, in a
/// directory the relay's user owns: a symlink is not followed, and a file that is not a plain
/// private file of the spool's owner (or of this process, which just made it) is refused, so
/// that neither a symlink nor a hard link can make root append to, or give away, another file.
/// A file this process made is given to the spool's owner.
pub(super) fn open_checked(path: &Path, owner: (u32, u32)) -> Result<File, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        // Not waiting on a FIFO put in its place (then refused below).
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(FILE_MODE)
        .open(path)
        .map_err(SpoolError::io("open", path))?;
    let meta = file.metadata().map_err(SpoolError::io("stat", path))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let problem = if !meta.file_type().is_file() {
        Some("not a regular file".to_owned())
    } else if meta.nlink() != 1 {
        Some(format!("{} hard links", meta.nlink()))
    } else if meta.uid() != owner.0 && meta.uid() != euid {
        Some(format!(
            "owned by uid {}, not the spool's owner",
            meta.uid()
        ))
    } else {
        None
    };
    if let Some(reason) = problem {
        return Err(SpoolError::Untrusted {
            path: path.to_path_buf(),
            reason,
        });
    }
    if meta.uid() != owner.0 {
        std::os::unix::fs::fchown(&file, Some(owner.0), Some(owner.1))
            .map_err(SpoolError::io("chown", path))?;
    }
    Ok(file)
}

/// Whether the last of the `len` bytes of `file` is a newline.
fn ends_with_newline(file: &File, len: u64) -> io::Result<bool> {
    let mut last = [0u8];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] == b'\n')
}

/// What [`read`] found: the entries, oldest first, and the lines it could not read.
#[derive(Debug, Default)]
pub struct Log {
    /// Entries at or after the time asked for, in the order they were written.
    pub entries: Vec<Entry>,
    /// Lines skipped because they are not an entry (a line torn by a crash, or damage).
    pub skipped: Vec<Skipped>,
}

/// One line of the audit log that [`read`] skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file it is in.
    pub path: PathBuf,
    /// Its line number in that file, from 1.
    pub line: usize,
    /// Why it was skipped.
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} line {} skipped: {}",
            self.path.display(),
            self.line,
            self.reason
        )
    }
}

/// Every entry of the audit log under `root` (the rotated file, then the current one) stamped
/// at or after `since_ms` (milliseconds since the Unix epoch; 0 for all). Missing files read as
/// empty. A line that is not an entry is skipped and reported in [`Log::skipped`]; a torn last
/// line (a crash mid-write) is said to be one. Blocking; reads both files whole (at most
/// 2 × [`ROTATE_AT`] plus an entry).
///
/// # Errors
/// [`SpoolError::Io`] when a file exists but cannot be opened or read.
pub fn read(root: &Path, since_ms: u64) -> Result<Log, SpoolError> {
    // The current file first: a rotation between the two opens makes the "old" file the very
    // one already open, which is then read once.
    let current = open_if_present(&path(root))?;
    let old = open_if_present(&root.join(OLD_FILE_NAME))?;
    let same = |a: &File, b: &File| match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    let old = match (&current, old) {
        (Some((cur, _)), Some((old, _))) if same(cur, &old) => None,
        (_, old) => old,
    };
    let mut log = Log::default();
    for (file, path) in old.into_iter().chain(current) {
        read_lines(file, &path, since_ms, &mut log)?;
    }
    Ok(log)
}

/// Open a log file for reading, unless absent. Neither a symlink nor anything but a regular
/// file is read (a FIFO in its place would leave the reader waiting forever).
fn open_if_present(path: &Path) -> Result<Option<(File, PathBuf)>, SpoolError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SpoolError::io("open", path)(e)),
    };
    let meta = file.metadata().map_err(SpoolError::io("stat", path))?;
    if !meta.file_type().is_file() {
        return Err(SpoolError::Untrusted {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    Ok(Some((file, path.to_path_buf())))
}

fn read_lines(mut file: File, path: &Path, since_ms: u64, log: &mut Log) -> Result<(), SpoolError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(SpoolError::io("read", path))?;
    let torn_at = (!bytes.is_empty() && !bytes.ends_with(b"\n")).then_some(bytes.len());
    let mut start = 0;
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let end = start + line.len();
        start = end + 1;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(entry) if entry.at_ms >= since_ms => log.entries.push(entry),
            Ok(_) => {}
            Err(e) => log.skipped.push(Skipped {
                path: path.to_path_buf(),
                line: n + 1,
                reason: if torn_at == Some(end) {
                    "a torn last line (no end of line: a write cut short by a crash)".to_owned()
                } else {
                    format!("not an audit entry ({e})")
                },
            }),
        }
    }
    Ok(())
}

/// An entry as one line of text: time (RFC 3339, UTC), who, the command and its arguments,
/// and what it affected, each separated by two spaces. Who is `NAME(UID)`, or `uid UID` when
/// `name` does not know it, followed by ` login NAME(UID)` for a login uid other than the uid
/// (`root(0) login alice(1000)`: alice, through sudo). Long lists are shortened: at most 8
/// arguments, and `37 messages: ID ID ID …` for queue ids. Control and invisible characters
/// are replaced (see [`report::clean`]).
pub fn text_line(entry: &Entry, name: &dyn Fn(u32) -> Option<String>) -> String {
    let mut who = user(entry.uid, name);
    if let Some(login) = entry.login_uid.filter(|&l| l != entry.uid) {
        let _ = write!(who, " login {}", user(login, name));
    }
    let mut command = entry.command.clone();
    for arg in entry.args.iter().take(SHOWN_ARGS) {
        command.push(' ');
        command.push_str(&quote(arg));
    }
    if entry.args.len() > SHOWN_ARGS {
        let _ = write!(command, " … ({} arguments)", entry.args.len());
    }
    report::clean(&format!(
        "{}  {who}  {command}  → {}",
        super::journal::show::rfc3339_ms(entry.at_ms),
        affected(&entry.affected)
    ))
}

/// `NAME(UID)`, or `uid UID`.
fn user(uid: u32, name: &dyn Fn(u32) -> Option<String>) -> String {
    name(uid).map_or_else(|| format!("uid {uid}"), |n| format!("{n}({uid})"))
}

/// An argument as the operator would type it in a shell: bare when it holds only ASCII
/// letters, digits and characters no shell treats specially, else in single quotes (a `'`
/// inside written `'\''`).
pub fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `nothing`, `1 message: ID`, `37 messages: ID ID ID …`, or names (`listeners`, logins):
/// `a, b, c … (5 in all)`.
fn affected(affected: &[String]) -> String {
    if affected.is_empty() {
        return "nothing".to_owned();
    }
    let more = if affected.len() > SHOWN { " …" } else { "" };
    let shown = &affected[..affected.len().min(SHOWN)];
    if affected.iter().all(|a| a.parse::<QueueId>().is_ok()) {
        let n = affected.len();
        let noun = if n == 1 { "message" } else { "messages" };
        format!("{n} {noun}: {}{more}", shown.join(" "))
    } else if more.is_empty() {
        shown.join(", ")
    } else {
        format!("{}{more} ({} in all)", shown.join(", "), affected.len())
    }
}

/// An entry as a JSON object: its fields ([`Entry`]), `time` (RFC 3339, UTC), and `user` and
/// `login_user`, the names of `uid` and `login_uid` when `name` knows them.
pub fn json_value(entry: &Entry, name: &dyn Fn(u32) -> Option<String>) -> serde_json::Value {
    let mut value = serde_json::to_value(entry).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "time".into(),
            super::journal::show::rfc3339_ms(entry.at_ms).into(),
        );
        if let Some(user) = name(entry.uid) {
            object.insert("user".into(), user.into());
        }
        if let Some(login) = entry.login_uid.and_then(name) {
            object.insert("login_user".into(), login.into());
        }
    }
    value
}

/// `/proc/self/loginuid`, unless unset or unreadable.
fn login_uid() -> Option<u32> {
    parse_login_uid(&std::fs::read_to_string("/proc/self/loginuid").ok()?)
}

/// The contents of `/proc/self/loginuid`: a number, 4294967295 (`(uid_t) -1`) when the process
/// is in no login session (a daemon, a container, a kernel without audit support).
fn parse_login_uid(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|&uid| uid != u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64, command: &str, affected: &[&str]) -> Entry {
        Entry {
            at_ms,
            command: command.to_owned(),
            args: vec!["--all".to_owned()],
            uid: 0,
            login_uid: None,
            affected: affected.iter().map(|&a| a.to_owned()).collect(),
        }
    }

    fn owner(dir: &Path) -> (u32, u32) {
        let meta = fs::metadata(dir).unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn entries_are_read_back_in_order_and_since_filters_them() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            entry(1_000, "queue purge", &[]),
            entry(2_000, "queue delete", &[]),
        );
        append(dir.path(), owner(dir.path()), &a, ROTATE_AT).unwrap();
        append(dir.path(), owner(dir.path()), &b, ROTATE_AT).unwrap();
        assert_eq!(read(dir.path(), 0).unwrap().entries, [a, b.clone()]);
        let since = read(dir.path(), 2_000).unwrap();
        assert_eq!(since.entries, [b]);
        assert!(since.skipped.is_empty());
        let mode = fs::metadata(path(dir.path())).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_missing_log_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let log = read(dir.path(), 0).unwrap();
        assert!(log.entries.is_empty() && log.skipped.is_empty());
    }

    /// A crash mid-write leaves a line without its end: it is skipped with a note, and the next
    /// entry, written after it, is read whole.
    #[test]
    fn a_torn_line_is_skipped_and_the_next_entry_survives_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = entry(1_000, "queue purge", &[]);
        append(dir.path(), owner(dir.path()), &first, ROTATE_AT).unwrap();
        let mut file = OpenOptions::new()
            .append(true)
            .open(path(dir.path()))
            .unwrap();
        file.write_all(br#"{"at_ms":1500,"command":"queue del"#)
            .unwrap();
        let log = read(dir.path(), 0).unwrap();
        assert_eq!(log.entries, std::slice::from_ref(&first));
        assert_eq!(
            log.skipped,
            [Skipped {
                path: path(dir.path()),
                line: 2,
                reason: "a torn last line (no end of line: a write cut short by a crash)".into(),
            }]
        );

        let next = entry(2_000, "queue delete", &[]);
        append(dir.path(), owner(dir.path()), &next, ROTATE_AT).unwrap();
        let log = read(dir.path(), 0).unwrap();
        assert_eq!(log.entries, [first, next]);
        assert_eq!(log.skipped.len(), 1);
        assert_eq!(log.skipped[0].line, 2);
        assert!(
            log.skipped[0].reason.starts_with("not an audit entry"),
            "{}",
            log.skipped[0]
        );
    }

    /// Past the rotation size the log moves to audit.jsonl.1 (replacing the previous one):
    /// two files at most, read oldest first.
    #[test]
    fn the_log_rotates_into_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let owner = owner(dir.path());
        let entries: Vec<Entry> = (0..5)
            .map(|n| entry(1_000 + n, "queue retry", &[]))
            .collect();
        let size = serde_json::to_vec(&entries[0]).unwrap().len() as u64 + 1;
        // Room for two entries per file.
        for e in &entries {
            append(dir.path(), owner, e, 2 * size).unwrap();
        }
        let old = dir.path().join(OLD_FILE_NAME);
        assert_eq!(fs::metadata(&old).unwrap().len(), 2 * size);
        assert_eq!(fs::metadata(path(dir.path())).unwrap().len(), size);
        // The first two went with the second rotation.
        assert_eq!(read(dir.path(), 0).unwrap().entries, entries[2..]);
    }

    /// Commands running at once (threads here, each with its own open file as a process
    /// would have), across rotations: every line is a whole entry.
    #[test]
    fn concurrent_writers_never_interleave_or_tear_lines() {
        let dir = tempfile::tempdir().unwrap();
        let owner = owner(dir.path());
        let ids: Vec<String> = (0..50).map(|n| format!("2QBQXBTZBCKWR{n:03}")).collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (root, ids) = (dir.path(), &ids);
                s.spawn(move || {
                    for n in 0..40 {
                        let affected: Vec<&str> = ids.iter().map(String::as_str).collect();
                        let e = entry(t * 1000 + n, "queue purge", &affected);
                        append(root, owner, &e, 16 * 1024).unwrap();
                    }
                });
            }
        });
        let log = read(dir.path(), 0).unwrap();
        assert!(log.skipped.is_empty(), "{:?}", log.skipped);
        assert!(dir.path().join(OLD_FILE_NAME).exists());
        // Per writer, its entries in the order it wrote them.
        for t in 0..8 {
            let mine: Vec<u64> = (log.entries.iter())
                .map(|e| e.at_ms)
                .filter(|ms| ms / 1000 == t)
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        }
    }

    #[test]
    fn a_symlink_or_a_hard_link_in_place_of_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"precious\n").unwrap();
        std::os::unix::fs::symlink(&target, path(dir.path())).unwrap();
        let e = entry(1, "queue purge", &[]);
        assert!(append(dir.path(), owner(dir.path()), &e, ROTATE_AT).is_err());
        fs::remove_file(path(dir.path())).unwrap();
        fs::hard_link(&target, path(dir.path())).unwrap();
        let err = append(dir.path(), owner(dir.path()), &e, ROTATE_AT).unwrap_err();
        assert!(matches!(err, SpoolError::Untrusted { .. }), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"precious\n");
    }

    #[test]
    fn a_fifo_in_place_of_the_log_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo =
            std::ffi::CString::new(path(dir.path()).into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let err = read(dir.path(), 0).unwrap_err();
        assert!(matches!(err, SpoolError::Untrusted { .. }), "{err}");
        let e = entry(1, "queue purge", &[]);
        assert!(append(dir.path(), owner(dir.path()), &e, ROTATE_AT).is_err());
    }

    #[test]
    fn the_text_line_names_users_and_shortens_long_lists() {
        let names = |uid: u32| (uid == 0).then(|| "root".to_owned());
        let mut e = entry(1_764_576_000_250, "queue purge", &[]);
        e.args = vec!["--from".into(), "<>".into()];
        e.affected = [
            "2QBQXBTZBCKWRXDM",
            "2QBQXBTZBCKWRXDN",
            "2QBQXBTZBCKWRXDP",
            "2QBQXBTZBCKWRXDQ",
        ]
        .map(String::from)
        .to_vec();
        e.login_uid = Some(1000);
        assert_eq!(
            text_line(&e, &names),
            "2025-12-01T08:00:00.250Z  root(0) login uid 1000  queue purge --from '<>'  \
             → 4 messages: 2QBQXBTZBCKWRXDM 2QBQXBTZBCKWRXDN 2QBQXBTZBCKWRXDP …"
        );
        let mut e = entry(0, "listeners pause", &["listeners"]);
        e.args.clear();
        e.login_uid = Some(0);
        assert_eq!(
            text_line(&e, &names),
            "1970-01-01T00:00:00.000Z  root(0)  listeners pause  → listeners"
        );
        e.affected.clear();
        assert!(text_line(&e, &names).ends_with("  → nothing"));
        let e = entry(0, "user suspend", &["a", "b", "c", "d"]);
        assert!(text_line(&e, &names).ends_with("→ a, b, c … (4 in all)"));
        let mut e = entry(0, "queue delete", &["2QBQXBTZBCKWRXDM"]);
        e.args = (0..10).map(|n| n.to_string()).collect();
        assert_eq!(
            text_line(&e, &|_| None),
            "1970-01-01T00:00:00.000Z  uid 0  queue delete 0 1 2 3 4 5 6 7 … (10 arguments)  \
             → 1 message: 2QBQXBTZBCKWRXDM"
        );
    }

    #[test]
    fn arguments_from_the_command_line_cannot_forge_a_line() {
        let mut e = entry(0, "queue purge", &[]);
        e.args = vec!["--from".into(), "a\n1970 root(0) x@\u{202e}y".into()];
        let line = text_line(&e, &|_| None);
        assert!(!line.contains('\n') && !line.contains('\u{202e}'), "{line}");
    }

    #[test]
    fn json_adds_the_time_and_the_names() {
        let names = |uid: u32| (uid == 0).then(|| "root".to_owned());
        let mut e = entry(1_000, "queue retry", &["2QBQXBTZBCKWRXDM"]);
        e.login_uid = Some(1000);
        let value = json_value(&e, &names);
        assert_eq!(value["time"], "1970-01-01T00:00:01.000Z");
        assert_eq!(value["user"], "root");
        assert_eq!(value["login_uid"], 1000);
        assert!(value.get("login_user").is_none());
        assert_eq!(serde_json::from_value::<Entry>(value).unwrap(), e);
    }

    #[test]
    fn an_unset_login_uid_is_absent() {
        assert_eq!(parse_login_uid("4294967295"), None);
        assert_eq!(parse_login_uid("1000\n"), Some(1000));
        assert_eq!(parse_login_uid(""), None);
    }
}
