//! What the agent refuses to start with, before it touches the kernel or the broker: a host
//! name the operator would never admit, and a state directory someone else can write.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn start(hostname: &str, state: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dog-agent"))
        .args(["--hostname", hostname, "--log-format", "json"])
        .arg("--state-dir")
        .arg(state)
        .args(["--operator-public-keys", "/nonexistent/operator.pub"])
        .output()
        .expect("dog-agent runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_group_or_world_writable_state_directory_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (ok, text) = start("node-1", &state);
    assert!(!ok, "{text}");
    assert!(
        text.contains("writable by its group or others")
            && text.contains(&state.display().to_string()),
        "{text}"
    );
    // once only the agent may write it, the start goes on (to the next missing thing)
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, text) = start("node-1", &state);
    assert!(!ok);
    assert!(!text.contains("writable by its group"), "{text}");
    assert!(text.contains("operator.pub"), "{text}");
}

#[test]
fn a_host_name_the_operator_never_admits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["Node_1", "../etc", "a b"] {
        let (ok, text) = start(bad, dir.path());
        assert!(!ok, "{text}");
        assert!(text.contains("DNS-1123"), "{bad}: {text}");
    }
}
