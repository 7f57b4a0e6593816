//! Whether a relay is running on a spool: `SPOOL/relay.lock`, locked (`flock(2)`, exclusive)
//! by the relay for as long as it runs.
//!
//! The kernel drops the lock when the process ends, however it ends, so a crash leaves nothing
//! stale. A second relay on the same spool is refused at start, and `queue adopt` refuses a
//! spool whose relay is still running (it would deliver the same messages, and the relay would
//! go on accepting mail into a spool marked adopted). The lock says nothing across machines
//! (a spool on NFS, or a copy): `queue adopt` is for a node that is down.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The lock file under the spool.
pub const LOCK_FILE: &str = "relay.lock";

/// The relay's hold on its spool: the lock goes with it.
#[derive(Debug)]
pub struct RelayLock {
    _file: File,
}

/// Lock `spool_root` for this relay.
///
/// # Errors
/// `WouldBlock` when another relay runs on it; any other error of `open(2)` or `flock(2)`.
pub fn lock(spool_root: &Path) -> io::Result<RelayLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(spool_root.join(LOCK_FILE))?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
    Ok(RelayLock { _file: file })
}

/// Whether a relay holds `spool_root`'s lock now. A spool without the file (never run by a
/// relay of this version, or read-only) has none.
///
/// # Errors
/// The file exists and cannot be opened or tested.
pub fn is_running(spool_root: &Path) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(spool_root.join(LOCK_FILE))
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(e) => Err(e),
    }
}

fn flock(file: &File, how: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_relay_is_seen_and_a_second_one_refused_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_running(dir.path()).unwrap());
        let held = lock(dir.path()).unwrap();
        assert!(is_running(dir.path()).unwrap());
        let second = lock(dir.path()).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
        drop(held);
        assert!(!is_running(dir.path()).unwrap());
        let _again = lock(dir.path()).unwrap();
    }
}
