//! The command line: `keel config check` and what `keel serve` does with a bad config.

use std::process::Command;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

#[test]
fn config_check_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        "[providers.openai]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\n\n[routes.smart]\ntargets = [{ provider = \"opnai\", model = \"m\" }]\nretry = { base = \"20s\", cap = \"10s\" }\n",
    )
    .unwrap();
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("keel.toml:6: routes.smart.targets[0].provider"),
        "{stderr}"
    );
    assert!(stderr.contains("opnai"), "{stderr}");
    assert!(
        stderr.contains("keel.toml:7: routes.smart.retry.base"),
        "{stderr}"
    );
}

#[test]
fn config_check_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/keel.toml");
    let text = std::fs::read_to_string(example).unwrap();
    // Every env var the example names gets a dummy value.
    let mut cmd = keel();
    for (i, _) in text.match_indices("_env") {
        let rest = &text[i..];
        let Some(start) = rest.find('"') else {
            continue;
        };
        let rest = &rest[start + 1..];
        for name in rest.split('"').step_by(2).take_while(|n| {
            n.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
                && !n.is_empty()
        }) {
            cmd.env(name, "dummy-value");
        }
    }
    let out = cmd.args(["config", "check", example]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn serve_with_a_bad_config_exits_without_listening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    let out = keel()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("keel.toml:3"), "{stderr}");
    assert!(stderr.contains("lisen"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

#[test]
fn a_wasm_tool_that_cannot_run_is_named_by_config_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("lib.wat"),
        r#"(module (func (export "run")))"#,
    )
    .unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[tools.gone]\nwasm = \"missing.wasm\"\n\n[tools.lib]\nwasm = \"lib.wat\"\n",
    )
    .unwrap();
    let out = keel()
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("keel.toml:5: tools.gone.wasm: cannot read the module"),
        "{stderr}"
    );
    assert!(
        stderr.contains("keel.toml:8: tools.lib.wasm:") && stderr.contains("no _start export"),
        "{stderr}"
    );

    let out = keel()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tools.gone.wasm: cannot read the module"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}
