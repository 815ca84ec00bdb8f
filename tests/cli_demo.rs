//! `reelbatch demo`, the README's run command, runs to completion on embedded defaults
//! (the default simulated provider: 200–800 ms, random failures) with an empty
//! reconciliation and every webhook signature verified.

use std::process::Command;

#[test]
fn the_demo_runs_to_an_empty_reconciliation() {
    let out = Command::new(env!("CARGO_BIN_EXE_reelbatch"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .env_remove("REELBATCH_ADMIN_TOKEN")
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for needle in [
        "quote           20 videos × 40 credits = 800 credits",
        "credits         held 800",
        "statement       opening 0  top-ups 2000  held 800",
        "0 discrepancies",
        "signatures verified",
        "batch.created ×1",
        "refunded        #",
        "safety.prompt_rejected",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    // Every webhook received verified.
    let line = stdout
        .lines()
        .find(|l| l.contains("signatures verified"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(nums[1], nums[3], "{line}");
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("data kept in "))
        .and_then(|l| l.split(" (").next())
        .expect("the data directory is reported");
    assert!(std::path::Path::new(dir).join("wal").is_dir());
    // The offline tools agree on the data the demo leaves behind.
    for args in [
        &["reconcile", "--data-dir", dir][..],
        &["ledger", "verify", "--data-dir", dir][..],
        &["wal", "verify", "--data-dir", dir][..],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_reelbatch"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}
