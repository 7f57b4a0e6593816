//! DNS for the mail-authentication tests: a real authoritative server (Debian's `nsd`) on a
//! loopback port serving zones the test writes, a server that never answers, DKIM keys made
//! with `openssl`, and Python's dkimpy (Debian's `python3-dkim`) as the independent DKIM/ARC
//! implementation, which looks its keys up in the same `nsd` and nowhere else.
//!
//! Every query stays on loopback: `nsd` listens on 127.0.0.1 only, the relay's `[dns]
//! nameservers` names it, and dkimpy gets a `dnsfunc` that asks it (tests/dkim_tool.py).

use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{TestDir, free_port};

/// How long [`Nsd::start`] waits for the zones to be served.
pub const NSD_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The Python interpreter that has Debian's `dkim` module (a `python3` earlier on PATH may be
/// another installation without it).
pub const PYTHON: &str = "/usr/bin/python3";

/// The dkimpy helper script: sign, verify and ARC-seal through the test's `nsd`.
pub const DKIM_TOOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dkim_tool.py");

/// A loopback port free for both TCP and UDP a moment ago (a DNS server needs both).
pub fn free_dns_port() -> u16 {
    loop {
        let port = free_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One zone: its origin (`test`, `0.0.127.in-addr.arpa`) and its records, one per line, in
/// zone-file syntax relative to the origin (SOA and NS are added).
#[derive(Clone, Debug)]
pub struct Zone {
    pub origin: String,
    pub records: Vec<String>,
}

impl Zone {
    /// An empty zone at `origin` (no trailing dot).
    pub fn new(origin: &str) -> Zone {
        Zone {
            origin: origin.trim_end_matches('.').to_owned(),
            records: Vec::new(),
        }
    }

    /// Add one record line (`"good IN TXT \"v=spf1 -all\""`).
    pub fn record(mut self, line: impl Into<String>) -> Zone {
        self.records.push(line.into());
        self
    }

    /// Add a TXT record at `name` whose text is `text`, split into 255-octet strings as RFC
    /// 1035 §3.3.14 requires (a DKIM key is longer than one string).
    pub fn txt(self, name: &str, text: &str) -> Zone {
        let line = format!("{name} IN TXT {}", txt_strings(text, 255));
        self.record(line)
    }

    /// The zone file text.
    pub fn file_text(&self) -> String {
        let o = &self.origin;
        let mut text = format!(
            "$ORIGIN {o}.\n$TTL 300\n\
             @ IN SOA ns1.{o}. hostmaster.{o}. 1 3600 600 86400 300\n\
             @ IN NS ns1.{o}.\n"
        );
        if !o.ends_with("in-addr.arpa") {
            text.push_str("ns1 IN A 127.0.0.1\n");
        }
        for r in &self.records {
            text.push_str(r);
            text.push('\n');
        }
        text
    }
}

/// `text` as zone-file character-strings of at most `max` octets each, in parentheses.
pub fn txt_strings(text: &str, max: usize) -> String {
    assert!(text.is_ascii() && !text.contains('"') && !text.contains('\\'));
    let parts: Vec<String> = text
        .as_bytes()
        .chunks(max)
        .map(|c| format!("\"{}\"", std::str::from_utf8(c).expect("ascii")))
        .collect();
    format!("( {} )", parts.join(" "))
}

/// A running `nsd` on 127.0.0.1:[`Nsd::port`], serving zones from its own temporary
/// directory. Stopped with SIGTERM and reaped on drop.
pub struct Nsd {
    child: Option<Child>,
    port: u16,
    dir: TestDir,
}

impl Nsd {
    /// Write `zones` and an `nsd.conf` (loopback only, every file under the temporary
    /// directory), check them with `nsd-checkzone`, start `nsd -d`, and wait until it answers
    /// authoritatively for the first zone.
    pub fn start(zones: &[Zone]) -> Nsd {
        let dir = TestDir::new();
        let port = free_dns_port();
        let d = dir.path().display().to_string();
        let mut conf = format!(
            "server:\n  ip-address: 127.0.0.1\n  port: {port}\n  do-ip6: no\n  username: \"\"\n\
             \x20 chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n\
             \x20 zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n\
             \x20 logfile: \"{d}/nsd.log\"\n  verbosity: 1\n  server-count: 1\n\
             remote-control:\n  control-enable: no\n"
        );
        for zone in zones {
            let file = format!("{}.zone", zone.origin);
            let path = dir.write(&file, zone.file_text());
            let check = run_tool(Command::new("nsd-checkzone").arg(&zone.origin).arg(&path));
            assert!(
                check.status.success(),
                "nsd-checkzone {}: {}{}\n{}",
                zone.origin,
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr),
                zone.file_text()
            );
            conf.push_str(&format!(
                "zone:\n  name: \"{}\"\n  zonefile: \"{file}\"\n",
                zone.origin
            ));
        }
        let conf_path = dir.write("nsd.conf", conf);
        let child = Command::new("nsd")
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("nsd.stderr")).expect("nsd stderr file"))
            .spawn()
            .expect("nsd is required by the mail-authentication tests: apt-get install -y nsd");
        let mut nsd = Nsd {
            child: Some(child),
            port,
            dir,
        };
        nsd.wait_ready(&zones.first().expect("at least one zone").origin);
        nsd
    }

    /// Poll with `dig` until the server answers with the AA bit for `origin`'s SOA: nsd binds
    /// its sockets before it has loaded the zones.
    fn wait_ready(&mut self, origin: &str) {
        let deadline = Instant::now() + NSD_START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("nsd exited during start ({status}):\n{}", self.log());
            }
            let answer = dig(self.port, origin, "SOA");
            if answer.contains("flags: qr aa") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nsd does not answer for {origin} after {NSD_START_TIMEOUT:?}:\n{answer}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The UDP and TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for `[dns] nameservers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// nsd's log file and stderr.
    pub fn log(&self) -> String {
        let read =
            |p: PathBuf| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        format!(
            "{}{}",
            read(self.dir.join("nsd.log")),
            read(self.dir.join("nsd.stderr"))
        )
    }
}

impl Drop for Nsd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

/// `dig @127.0.0.1 -p PORT +norec +time=1 +tries=1 NAME TYPE`: its whole output.
pub fn dig(port: u16, name: &str, rtype: &str) -> String {
    let out = run_tool(
        Command::new("dig")
            .arg("@127.0.0.1")
            .args(["-p", &port.to_string(), "+norec", "+time=1", "+tries=1"])
            .args([name, rtype]),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dig … +short`: the answer's records, one per line.
pub fn dig_short(port: u16, name: &str, rtype: &str, tcp: bool) -> String {
    let mut cmd = Command::new("dig");
    cmd.arg("@127.0.0.1").args([
        "-p",
        &port.to_string(),
        "+norec",
        "+time=2",
        "+tries=1",
        "+short",
    ]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = run_tool(cmd.args([name, rtype]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
fn bind_udp_and_tcp() -> (UdpSocket, TcpListener, u16) {
    loop {
        let port = free_port();
        let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        return (udp, tcp, port);
    }
}

/// A DNS "server" on 127.0.0.1 that never answers: a UDP socket nobody reads and a TCP
/// listener nobody accepts from (the kernel completes the handshake, then nothing). Every
/// query to it times out.
pub struct SilentDns {
    _udp: UdpSocket,
    _tcp: TcpListener,
    port: u16,
}

impl SilentDns {
    /// Bind both sockets on one free port.
    pub fn start() -> SilentDns {
        let (udp, tcp, port) = bind_udp_and_tcp();
        SilentDns {
            _udp: udp,
            _tcp: tcp,
            port,
        }
    }

    /// `127.0.0.1:PORT`, for `[dns] nameservers`.
    pub fn address(&self) -> String {
        SocketAddr::from(([127, 0, 0, 1], self.port)).to_string()
    }
}

/// A DKIM key pair made by `openssl`, with its private key file and its DNS record.
#[derive(Clone, Debug)]
pub struct DkimKey {
    /// `rsa` or `ed25519` (the `k=` tag).
    pub kind: &'static str,
    /// The private key, PEM: PKCS#1 (`BEGIN RSA PRIVATE KEY`, as OpenDKIM's `opendkim-genkey`
    /// writes) for RSA, PKCS#8 for Ed25519.
    pub pem: String,
    /// The `p=` value: base64 of the SubjectPublicKeyInfo for RSA, of the raw 32-octet public
    /// key for Ed25519 (RFC 8463 §4.2).
    pub public: String,
}

impl DkimKey {
    /// A new RSA key of `bits` bits in PKCS#1 PEM (`openssl genrsa -traditional`).
    pub fn rsa(bits: u32) -> DkimKey {
        let dir = TestDir::new();
        let key = dir.join("key.pem");
        openssl(&[
            "genrsa",
            "-traditional",
            "-out",
            path_str(&key),
            &bits.to_string(),
        ]);
        let der = openssl(&["rsa", "-in", path_str(&key), "-pubout", "-outform", "DER"]);
        DkimKey {
            kind: "rsa",
            pem: fs::read_to_string(&key).expect("read RSA key"),
            public: b64(&der),
        }
    }

    /// A new Ed25519 key in PKCS#8 PEM (`openssl genpkey -algorithm ed25519`).
    pub fn ed25519() -> DkimKey {
        let dir = TestDir::new();
        let key = dir.join("key.pem");
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", path_str(&key)]);
        let der = openssl(&["pkey", "-in", path_str(&key), "-pubout", "-outform", "DER"]);
        // The SubjectPublicKeyInfo of an Ed25519 key is a fixed 12-octet prefix and the key.
        assert_eq!(der.len(), 44, "Ed25519 SubjectPublicKeyInfo");
        DkimKey {
            kind: "ed25519",
            pem: fs::read_to_string(&key).expect("read Ed25519 key"),
            public: b64(&der[12..]),
        }
    }

    /// The DKIM key record (`v=DKIM1; k=…; p=…`, RFC 6376 §3.6.1).
    pub fn record(&self) -> String {
        format!("v=DKIM1; k={}; p={}", self.kind, self.public)
    }

    /// Write the private key to `rel` under `dir` with mode 0600; the full path.
    pub fn write(&self, dir: &TestDir, rel: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.write(rel, &self.pem);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod key");
        path
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp path is UTF-8")
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Run `openssl ARGS`, which must succeed; its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = run_tool(Command::new("openssl").args(args));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run_tool(cmd: &mut Command) -> Output {
    let name = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{name} is required by the mail-authentication tests: {e}"))
}

/// Run tests/dkim_tool.py with `args` (its DNS through 127.0.0.1:`dns_port`), `message` on
/// stdin; its stdout. Panics with its stderr when it fails.
pub fn dkim_tool(dns_port: u16, args: &[&str], message: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(PYTHON)
        .arg(DKIM_TOOL)
        .args(["--dns-port", &dns_port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3-dkim is required by the mail-authentication tests: apt-get install -y python3-dkim");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(message)
        .expect("write message to dkim_tool.py");
    let out = child.wait_with_output().expect("wait for dkim_tool.py");
    assert!(
        out.status.success(),
        "dkim_tool.py {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Sign `message` with dkimpy as `d=domain`, `s=selector` with `key` (`algorithm`:
/// `rsa-sha256`, `rsa-sha1` or `ed25519-sha256`, relaxed/relaxed): the signed message.
pub fn dkimpy_sign(
    dns_port: u16,
    key: &DkimKey,
    domain: &str,
    selector: &str,
    algorithm: &str,
    message: &[u8],
) -> Vec<u8> {
    let dir = TestDir::new();
    let key_path = key.write(&dir, "key.pem");
    dkim_tool(
        dns_port,
        &[
            "sign",
            "--key",
            path_str(&key_path),
            "--domain",
            domain,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
        ],
        message,
    )
}

/// ARC-seal `message` with dkimpy as the forwarder `domain` whose authserv-id is `srv_id`
/// (the message must carry that forwarder's `Authentication-Results:`).
pub fn dkimpy_arc_seal(
    dns_port: u16,
    key: &DkimKey,
    domain: &str,
    selector: &str,
    srv_id: &str,
    message: &[u8],
) -> Vec<u8> {
    let dir = TestDir::new();
    let key_path = key.write(&dir, "key.pem");
    dkim_tool(
        dns_port,
        &[
            "arc-sign",
            "--key",
            path_str(&key_path),
            "--domain",
            domain,
            "--selector",
            selector,
            "--srv-id",
            srv_id,
        ],
        message,
    )
}

/// Verify every `DKIM-Signature:` of `message` with dkimpy (keys from the test's nsd): one
/// `(d=, s=, a=, verified)` per signature, in header order.
pub fn dkimpy_verify(dns_port: u16, message: &[u8]) -> Vec<(String, String, String, bool)> {
    let out = dkim_tool(dns_port, &["verify"], message);
    String::from_utf8(out)
        .expect("dkim_tool.py prints UTF-8")
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "dkim_tool.py verify line {line:?}");
            (
                f[0].to_owned(),
                f[1].to_owned(),
                f[2].to_owned(),
                f[3] == "pass",
            )
        })
        .collect()
}

/// A DNS server on 127.0.0.1 that answers over UDP like `upstream` (an [`Nsd`] port), each
/// answer held back `delay`: a slow list or a slow authoritative server. Its threads end
/// when it is dropped (the receiving thread within 50 ms, forwarding ones on their own).
pub struct SlowDns {
    port: u16,
    queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _tcp: TcpListener,
}

impl SlowDns {
    /// Listen on a free port (UDP; a TCP listener nobody accepts holds the TCP port) and
    /// forward each query to 127.0.0.1:`upstream` after `delay`.
    pub fn start(upstream: u16, delay: Duration) -> SlowDns {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (udp, tcp, port) = bind_udp_and_tcp();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set read timeout");
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, st) = (queries.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                q.fetch_add(1, Ordering::Relaxed);
                let query = buf[..n].to_vec();
                let reply_to = udp.try_clone().expect("clone UDP socket");
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let out = UdpSocket::bind(("127.0.0.1", 0)).expect("bind UDP");
                    out.set_read_timeout(Some(Duration::from_secs(2)))
                        .expect("timeout");
                    let mut answer = [0u8; 4096];
                    if out.send_to(&query, ("127.0.0.1", upstream)).is_ok()
                        && let Ok(n) = out.recv(&mut answer)
                    {
                        let _ = reply_to.send_to(&answer[..n], from);
                    }
                });
            }
        });
        SlowDns {
            port,
            queries,
            stop,
            _tcp: tcp,
        }
    }

    /// `127.0.0.1:PORT`, for `[dns] nameservers`.
    pub fn address(&self) -> String {
        SocketAddr::from(([127, 0, 0, 1], self.port)).to_string()
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for SlowDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
