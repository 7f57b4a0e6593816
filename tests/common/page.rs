//! Helpers of the status-page test: the OpenMetrics text and the `data-metric` elements of a
//! DOM read into comparable series, headless Chromium run with every flag that keeps it off
//! the network, and a PNG header check. Its HTTP requests go through [`super::http`].

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A series: family name and its labels, sorted by label name.
pub type SeriesKey = (String, Vec<(String, String)>);

/// Every sample of an OpenMetrics text (`name{l="v",…} value`), comments skipped.
pub fn parse_metrics(text: &str) -> BTreeMap<SeriesKey, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
            None => (series, Vec::new()),
        };
        out.insert((name.to_owned(), labels), value.parse().expect("a number"));
    }
    out
}

/// `a="x",b="y"` (values without quotes or backslashes, as ours are).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = text
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once("=\"").expect("label=\"value\"");
            (k.to_owned(), v.trim_end_matches('"').to_owned())
        })
        .collect();
    labels.sort();
    labels
}

/// Every element of `dom` with a `data-metric` attribute: its series (`data-LABEL` attributes
/// as labels) and its number (`data-value`, else its text).
pub fn dom_metrics(dom: &str) -> Vec<(SeriesKey, f64)> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find(" data-metric=\"") {
        let open = rest[..at].rfind('<').expect("inside a start tag");
        let tag_end = open + tag_length(&rest[open..]);
        let attrs = attributes(&rest[open..tag_end]);
        let text_end = rest[tag_end..]
            .find('<')
            .map_or(rest.len(), |e| tag_end + e);
        let text = unescape(rest[tag_end..text_end].trim());
        let mut name = String::new();
        let mut labels = Vec::new();
        let mut value = None;
        for (k, v) in attrs {
            match k.as_str() {
                "data-metric" => name = v,
                "data-value" => value = Some(v),
                k if k.starts_with("data-") => labels.push((k[5..].to_owned(), v)),
                _ => {}
            }
        }
        labels.sort();
        let number = value.unwrap_or(text);
        let number = number
            .parse()
            .unwrap_or_else(|e| panic!("{name} {labels:?}: {number:?} is not a number ({e})"));
        out.push(((name, labels), number));
        rest = &rest[tag_end..];
    }
    out
}

/// Length of the start tag at the beginning of `html`, up to and including its `>` (quoted
/// attribute values may hold `>`).
fn tag_length(html: &str) -> usize {
    let mut quoted = false;
    for (i, c) in html.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '>' if !quoted => return i + 1,
            _ => {}
        }
    }
    panic!("unterminated tag: {html:.80}")
}

/// The `name="value"` attributes of one start tag, values unescaped.
fn attributes(tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = tag;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].rsplit(' ').next().unwrap().to_owned();
        let value_end = rest[eq + 2..].find('"').expect("closing quote") + eq + 2;
        out.push((name, unescape(&rest[eq + 2..value_end])));
        rest = &rest[value_end + 1..];
    }
    out
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// Whether `chromium` and `unshare` can run here, as root (a network namespace needs it);
/// `Err` says what is missing.
pub fn chromium_available() -> Result<(), String> {
    for tool in ["chromium", "unshare", "ip"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("{tool} is not installed"));
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: cannot make a network namespace with unshare -n".into());
    }
    Ok(())
}

/// The network interfaces of this process's network namespace (`/proc/self/net/dev`, which,
/// unlike /sys/class/net, follows the namespace without a remount).
pub fn interfaces() -> Vec<String> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").expect("read /proc/self/net/dev");
    let mut names: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split_once(':')?.0.trim().to_owned()))
        .collect();
    names.sort();
    names
}

/// Run headless Chromium on `url` with `mode` (`--dump-dom`, or `--screenshot=PATH` and a
/// window size), its profile and caches under `home`, every flag of
/// shared/notes/real-components.md §4 that keeps it off the network; its stdout. Killed
/// after 20 s.
pub fn chromium(home: &Path, url: &str, mode: &[&str]) -> String {
    let mut child = Command::new("chromium")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-domain-reliability",
            "--disable-breakpad",
            "--disable-client-side-phishing-detection",
            "--metrics-recording-only",
            "--no-pings",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
        ])
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let mut status = None;
    if !super::wait_until(Duration::from_secs(20), || {
        status = child.try_wait().unwrap();
        status.is_some()
    }) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("chromium did not finish within 20 s");
    }
    let status = status.unwrap();
    assert!(status.success(), "chromium failed: {status}");
    reader.join().unwrap().expect("chromium's output is UTF-8")
}

/// Width and height from the IHDR chunk of a PNG, after checking its signature.
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "PNG of {} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "IHDR first");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}
