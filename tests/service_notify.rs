//! systemd `Type=notify` without systemd: the relay sends `READY=1` to `NOTIFY_SOCKET` only
//! once its listeners accept, and `STOPPING=1` when it begins to stop (sd_notify(3)).

mod common;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, TestDir, config, free_port, listener};

#[test]
fn ready_is_sent_once_the_listeners_accept_and_stopping_at_sigterm() {
    let dir = TestDir::new();
    let port = free_port();
    let policy = config(&[listener("mx", port, "none")], free_port(), "")
        .replace("{dir}", &dir.path().display().to_string());
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let mut relay = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&policy_path)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("a notification within 20 s");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ready means accepting: the greeting comes at once, with no retry.
    let mut smtp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("accepting when ready");
    smtp.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 4];
    smtp.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ");
    drop(smtp);

    // SAFETY: kill(2) on the child's pid, which has not been waited for yet.
    unsafe { libc::kill(relay.id() as libc::pid_t, libc::SIGTERM) };
    let n = socket.recv(&mut buf).expect("STOPPING within 20 s");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let status = relay.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
