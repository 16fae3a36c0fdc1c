//! The README's demo runs as written and says what it did.

use std::process::Command;

use qnet_tests::workspace_binary;

#[test]
fn the_demo_runs_every_step_and_cleans_up() {
    qnet_tests::require_root();
    let out = Command::new(workspace_binary("qnet-demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for step in 1..=8 {
        assert!(
            stdout.contains(&format!("[{step}] ")),
            "step {step} missing:\n{stdout}"
        );
    }
    assert!(stdout.contains("Done:"), "{stdout}");
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("qnet-test-demo"),
        "the demo left a namespace behind"
    );
}
