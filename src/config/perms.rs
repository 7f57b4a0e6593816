//! Who may read the secrets a policy names: the TLS private key, the AUTH users file (password
//! hashes), the upstream password files, the DKIM signing keys and the admin token file.
//!
//! [`secret_file_warnings`] warns when such a file is readable (or writable) by every user, or
//! by a group the relay's user is not in: whoever is in that group can read the key or the
//! hashes, and the relay does not need the group to read it. Debian's layout passes: a key
//! `0640 root:ssl-cert` with the relay's user in `ssl-cert`.
//!
//! The relay's user is the owner of the spool directory when it exists (the relay refuses to
//! start on a spool owned by anyone else, so `check-config` run as root judges the files as
//! the relay will), else the user running the check. Its groups are its primary group and the
//! supplementary groups of the system's group database (`getgrouplist`).

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{CertSource, Config};

/// Permission bits that give access to others (read, write, execute).
const OTHER_ANY: u32 = 0o007;
/// Group read and write.
const GROUP_RW: u32 = 0o060;

/// The relay's user: its uid, name (when the user database has one) and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUser {
    /// User id.
    pub uid: u32,
    /// Login name, when known.
    pub name: Option<String>,
    /// Primary and supplementary group ids.
    pub groups: Vec<u32>,
}

impl RelayUser {
    /// The owner of `spool_dir` when it exists, else the effective user of this process.
    pub fn for_spool(spool_dir: &Path) -> RelayUser {
        let (uid, gid) = match std::fs::metadata(spool_dir) {
            Ok(meta) => (meta.uid(), None),
            // SAFETY: geteuid and getegid have no preconditions.
            Err(_) => unsafe { (libc::geteuid(), Some(libc::getegid())) },
        };
        let (name, primary) = match passwd(uid) {
            Some((name, gid)) => (Some(name), gid),
            None => (None, gid.unwrap_or(u32::MAX)),
        };
        let mut groups = match &name {
            Some(name) => group_list(name, primary),
            None => Vec::new(),
        };
        if primary != u32::MAX && !groups.contains(&primary) {
            groups.push(primary);
        }
        RelayUser { uid, name, groups }
    }

    fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }
}

/// The secret files `config` names, with the key that names each.
fn secret_files(config: &Config) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    if let Some(tls) = &config.tls
        && let CertSource::Files { key, .. } = &tls.source
    {
        files.push(("tls.key".to_string(), key.clone()));
    }
    if let Some(path) = config.auth.as_ref().and_then(|a| a.users_file.clone()) {
        files.push(("auth.users_file".to_string(), path));
    }
    for (i, u) in config.upstreams.iter().enumerate() {
        if let Some(path) = &u.auth_password_file {
            files.push((format!("upstreams[{i}].auth_password_file"), path.clone()));
        }
    }
    for (i, s) in config.dkim.sign.iter().enumerate() {
        files.push((format!("dkim.sign[{i}].key"), s.key_path.clone()));
    }
    if let Some(path) = config.admin.as_ref().and_then(|a| a.token_file.clone()) {
        files.push(("admin.token_file".to_string(), path));
    }
    files
}

/// One sentence per secret file that users other than the relay's can read (see the module
/// docs). Files that cannot be inspected are left to the loader, which reports them.
pub fn secret_file_warnings(config: &Config) -> Vec<String> {
    let user = RelayUser::for_spool(&config.server.spool_dir);
    secret_files(config)
        .into_iter()
        .filter_map(|(key, path)| {
            let meta = std::fs::metadata(&path).ok()?;
            exposure(meta.mode(), meta.gid(), &user).map(|why| {
                format!(
                    "{key} {} is {why}; it holds a secret only the relay's user {} needs to read. \
                     Fix: {}",
                    path.display(),
                    user.describe(),
                    fix(meta.mode(), meta.gid(), &user, &path)
                )
            })
        })
        .collect()
}

/// Why a file of `mode` and group `gid` is exposed to users other than `user`, if it is.
fn exposure(mode: u32, gid: u32, user: &RelayUser) -> Option<String> {
    if mode & OTHER_ANY != 0 {
        return Some(format!(
            "readable by every user (mode {:04o})",
            mode & 0o7777
        ));
    }
    if mode & GROUP_RW != 0 && !user.groups.contains(&gid) {
        return Some(format!(
            "open to group {} (mode {:04o}), which the relay's user is not in",
            group_name(gid),
            mode & 0o7777
        ));
    }
    None
}

fn fix(mode: u32, gid: u32, user: &RelayUser, path: &Path) -> String {
    if mode & OTHER_ANY != 0 && (mode & GROUP_RW == 0 || user.groups.contains(&gid)) {
        format!("chmod o-rwx {}", path.display())
    } else {
        format!(
            "chmod 600 {0} with owner {1}, or chmod 640 {0} with a group of {1}",
            path.display(),
            user.describe()
        )
    }
}

/// The login name of `uid` in the user database (`getpwuid_r`), if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    passwd(uid).map(|(name, _)| name)
}

/// Login name and primary group of `uid` from the user database.
fn passwd(uid: u32) -> Option<(String, u32)> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data, valid when zeroed.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives the use of `pwd`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Some((name, pwd.pw_gid))
}

/// Every group of `name` (with primary group `primary`) in the group database.
fn group_list(name: &str, primary: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else {
        return vec![primary];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let asked = n;
        // SAFETY: `groups` holds `n` entries; getgrouplist writes at most that many and sets
        // `n` to the number it found.
        let rc =
            unsafe { libc::getgrouplist(cname.as_ptr(), primary, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if n <= asked || n > 65536 {
            return vec![primary];
        }
    }
}

/// `name (gid N)` or `gid N`.
fn group_name(gid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: group is plain old data, valid when zeroed.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return format!("gid {gid}");
    }
    // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(grp.gr_name) }.to_string_lossy();
    format!("{name} (gid {gid})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(groups: &[u32]) -> RelayUser {
        RelayUser {
            uid: 120,
            name: Some("portcullis".into()),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn debian_ssl_cert_layout_does_not_warn() {
        // Key 0640 root:ssl-cert (gid 103), the relay's user in ssl-cert.
        assert_eq!(exposure(0o100640, 103, &user(&[120, 103])), None);
        assert_eq!(exposure(0o100600, 0, &user(&[120])), None);
        assert_eq!(exposure(0o100400, 0, &user(&[120])), None);
    }

    #[test]
    fn readable_by_others_or_a_foreign_group_warns() {
        let u = user(&[120, 103]);
        assert!(exposure(0o100644, 103, &u).unwrap().contains("every user"));
        assert!(exposure(0o100604, 120, &u).unwrap().contains("every user"));
        // Group read by a group the relay's user is not in (root's group here).
        let why = exposure(0o100640, 0, &u).unwrap();
        assert!(why.contains("not in") && why.contains("0640"), "{why}");
        assert!(exposure(0o100620, 0, &u).is_some());
    }

    #[test]
    fn the_relay_user_is_the_spool_owner() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let u = RelayUser::for_spool(dir.path());
        assert_eq!(u.uid, 65534);
        assert!(u.groups.contains(&65534), "{u:?}");
    }
}
