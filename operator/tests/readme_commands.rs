//! The README's `dog-operator` commands run as written (the demo and the test command are run
//! by scripts/test.sh itself).

use std::path::Path;
use std::process::Command;

#[test]
fn readme_compile_commands_run() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let prefix = "cargo run -p dog-operator -- ";
    let commands: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .collect();
    assert!(
        commands.len() >= 2,
        "expected the README's compile commands"
    );
    for cmd in commands {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        let out = Command::new(env!("CARGO_BIN_EXE_dog-operator"))
            .args(&args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`dog-operator {cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.stdout.is_empty(),
            "`dog-operator {cmd}` printed nothing"
        );
        if cmd.starts_with("explain") {
            let printed = String::from_utf8_lossy(&out.stdout);
            assert!(
                readme.contains(printed.trim_end()),
                "the README shows other output for `dog-operator {cmd}` than it prints:\n{printed}"
            );
        }
    }
}
