//! What the Debian package is built from, checked without building it (packaging/package-check
//! installs the real package in CI): the manual pages cover every subcommand and render without
//! warnings, `--version` names the commit, the shipped policy checks clean with loopback
//! listeners only, and the unit's sandbox keeps its exposure score.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn portcullis(args: &[&str]) -> String {
    let out = Command::new(common::BIN)
        .args(args)
        .output()
        .expect("run portcullis");
    assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The subcommands `--help` lists under "Commands:" (without clap's `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every page the help output implies: portcullis, portcullis-queue, portcullis-queue-list, …
fn expected_pages(path: &[String], pages: &mut BTreeSet<String>) {
    pages.insert(format!("{}.8", path.join("-")));
    let mut args: Vec<&str> = path[1..].iter().map(String::as_str).collect();
    args.push("--help");
    for sub in subcommands(&portcullis(&args)) {
        let mut deeper = path.to_vec();
        deeper.push(sub);
        expected_pages(&deeper, pages);
    }
}

#[test]
fn man_pages_cover_every_subcommand_and_render_without_warnings() {
    let dir = common::TestDir::new();
    let out = dir.path().join("man");
    let listed = portcullis(&["man-pages", "--out", out.to_str().unwrap()]);
    let written: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut expected = BTreeSet::new();
    expected_pages(&["portcullis".to_owned()], &mut expected);
    assert!(
        expected.contains("portcullis-queue-purge.8"),
        "{expected:?}"
    );
    assert_eq!(written, expected);
    assert_eq!(listed.lines().count(), expected.len(), "{listed}");
    // The hidden packaging command gets no page.
    assert!(!written.iter().any(|p| p.contains("man-pages")));

    for page in &written {
        let rendered = Command::new("groff")
            .args(["-ww", "-man", "-Tutf8"])
            .arg(out.join(page))
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("groff (Debian's groff-base, which man-db needs)");
        assert!(rendered.status.success(), "{page}: {rendered:?}");
        assert!(
            rendered.stderr.is_empty(),
            "{page}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let text = overstruck(&rendered.stdout);
        assert!(text.contains("NAME"), "{page}: {text}");
        assert!(text.contains("SEE ALSO"), "{page}: {text}");
    }
    let main = std::fs::read_to_string(out.join("portcullis.8")).unwrap();
    for section in ["EXIT STATUS", "SIGNALS", "FILES", "ENVIRONMENT"] {
        assert!(
            main.contains(&format!(".SH \"{section}\""))
                || main.contains(&format!(".SH {section}")),
            "{section}"
        );
    }
}

/// grotty's output without its overstrikes: bold "N\x08N" and underlined "_\x08N" become "N".
fn overstruck(bytes: &[u8]) -> String {
    let mut text: Vec<char> = Vec::new();
    let mut chars = String::from_utf8_lossy(bytes)
        .chars()
        .collect::<Vec<_>>()
        .into_iter();
    while let Some(c) = chars.next() {
        if c == '\x08' {
            text.pop();
            if let Some(next) = chars.next() {
                text.push(next);
            }
        } else {
            text.push(c);
        }
    }
    text.into_iter().collect()
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let version = portcullis(&["--version"]);
    let manifest = env!("CARGO_MANIFEST_DIR");
    let head = Command::new("git")
        .args(["-C", manifest, "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned());
    let commit = head.unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        version.trim(),
        format!("portcullis {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

#[test]
fn shipped_policy_checks_clean_and_listens_on_loopback_only() {
    let dir = common::TestDir::new();
    let users = dir.path().join("users.toml");
    std::fs::copy(packaging("users.toml"), &users).unwrap();
    // The installed paths, moved into the test's directory; nothing else changes.
    let text = std::fs::read_to_string(packaging("portcullis.toml"))
        .unwrap()
        .replace(
            "/var/spool/portcullis",
            dir.path().join("spool").to_str().unwrap(),
        )
        .replace("/etc/portcullis/users.toml", users.to_str().unwrap());
    let settings: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !settings.contains("/etc/portcullis/"),
        "a file the package does not ship: {settings}"
    );
    let policy = dir.path().join("portcullis.toml");
    std::fs::write(&policy, &text).unwrap();

    let summary = portcullis(&["check-config", "--config", policy.to_str().unwrap()]);
    assert!(summary.contains(": OK"), "{summary}");
    assert!(summary.contains("auth: 0 users"), "{summary}");
    let binds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("bind = \""))
        .map(|l| l.split('"').next().unwrap())
        .collect();
    assert_eq!(
        binds,
        [
            "127.0.0.1:25",
            "127.0.0.1:587",
            "127.0.0.1:465",
            "127.0.0.1:9025"
        ]
    );
}

#[test]
fn unit_sandbox_keeps_its_exposure_score() {
    let unit = packaging("debian/portcullis.service");
    // The threshold is on systemd's 0-100 scale: 20 is an exposure of 2.0 (measured: 1.4).
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var_os("PORTCULLIS_REQUIRE_SYSTEMD").is_none() => {
            eprintln!("skipped: no systemd-analyze ({e})");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Overall exposure level for portcullis.service"),
        "{text}"
    );
}
