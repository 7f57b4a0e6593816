//! Records the commit the binary is built from, for `portcullis --version`: the short hash of
//! HEAD when the crate is built inside its own git checkout, else `unknown` (a source tarball,
//! a checkout without git installed). The build script runs again when HEAD moves, so the
//! version of a developer's build is never stale. The commit's date dates the manual pages.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let commit = commit(&manifest);
    // The commit's date (YYYY-MM-DD) dates the manual pages; empty outside a checkout.
    let date = commit
        .as_ref()
        .and_then(|_| git(&manifest, &["log", "-1", "--format=%cs", "HEAD"]))
        .unwrap_or_default();
    let commit = commit.unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=PORTCULLIS_COMMIT={commit}");
    println!("cargo:rustc-env=PORTCULLIS_COMMIT_DATE={date}");
    println!("cargo:rerun-if-changed=build.rs");
}

/// The short hash of HEAD, when `manifest` is the top of a git work tree (not a directory inside
/// some other repository), and the files to watch for HEAD moving.
fn commit(manifest: &Path) -> Option<String> {
    let top = git(manifest, &["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != manifest.canonicalize().ok()? {
        return None;
    }
    let hash = git(manifest, &["rev-parse", "--short=12", "HEAD"])?;
    // HEAD names the branch; the branch's ref file (or packed-refs once git packs it) moves
    // with each commit. Paths come from git, so a linked worktree watches the right files.
    for name in ["HEAD", "packed-refs"] {
        watch(manifest, name);
    }
    if let Some(branch) = git(manifest, &["symbolic-ref", "-q", "HEAD"]) {
        // A packed branch has no file of its own until its next commit writes one: then the
        // directory that will hold it is watched.
        if !watch(manifest, &branch)
            && let Some((dir, _)) = branch.rsplit_once('/')
        {
            watch(manifest, dir);
        }
    }
    Some(hash)
}

/// Asks cargo to run this script again when the git file `name` changes; false when it does
/// not exist.
fn watch(manifest: &Path, name: &str) -> bool {
    match git(
        manifest,
        &["rev-parse", "--path-format=absolute", "--git-path", name],
    ) {
        Some(path) if Path::new(&path).exists() => {
            println!("cargo:rerun-if-changed={path}");
            true
        }
        _ => false,
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
