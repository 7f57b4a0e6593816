//! `portcullis completions bash|zsh|fish`: a script each shell accepts, naming every command.

mod common;

use std::process::Command;

fn completions(shell: &str) -> std::process::Output {
    Command::new(common::BIN)
        .args(["completions", shell])
        .output()
        .expect("run portcullis completions")
}

#[test]
fn each_shell_gets_a_script_naming_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = completions(shell);
        assert_eq!(out.status.code(), Some(0), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).expect("UTF-8 script");
        for command in [
            "run",
            "check-config",
            "queue",
            "status",
            "trace",
            "listeners",
            "doctor",
        ] {
            assert!(
                script.contains(command),
                "{shell}: no {command} in the script"
            );
        }
    }
    // bash itself parses the bash script (bash is what runs the tests' tools).
    let out = completions("bash");
    let dir = common::TestDir::new();
    let path = dir.path().join("portcullis.bash");
    std::fs::write(&path, &out.stdout).unwrap();
    let parsed = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(parsed.success(), "bash -n refused the completion script");
}

#[test]
fn another_shell_is_a_usage_error() {
    let out = completions("powershell");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
}
