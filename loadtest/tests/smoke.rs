//! `loadtest run`, `plan` and `soak` against a real `reelbatch serve` they start
//! themselves (`--serve`, the binary `cargo test --workspace` builds beside this one):
//! provisioning works, every op of the default mix is answered without errors, the
//! summary and its JSON agree, and the plan writes its report and charts.

use std::path::PathBuf;
use std::process::Command;

fn reelbatch() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_loadtest")).with_file_name("reelbatch");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace)",
        p.display()
    );
    p
}

const FAST: [&str; 4] = [
    "--serve-env",
    "REELBATCH_PROVIDER__SIMULATED__LATENCY_MS=[5, 20]",
    "--serve-env",
    "REELBATCH_PROVIDER__SIMULATED__PERMANENT_FAILURE_RATE=0",
];

/// Runs `loadtest SUB --serve reelbatch` (fast provider) with `args` and `--json`; it must
/// succeed. Returns what it printed and the JSON it wrote.
fn loadtest_json(sub: &str, args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join(format!("{sub}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([sub, "--serve"])
        .arg(reelbatch())
        .args(FAST)
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (text, v)
}

#[test]
fn a_run_answers_every_op_and_reports_it() {
    let (text, v) = loadtest_json(
        "run",
        &["--tenants", "8", "--rate", "100", "--duration-s", "2"],
    );
    assert_eq!(v["sent"], 200);
    assert_eq!(v["all"]["count"], 200);
    assert_eq!(v["all"]["errors"], 0, "{v:#}");
    assert_eq!(v["tenants"], 8);
    for op in [
        "quote", "create", "batch", "items", "wallet", "ledger", "download", "topup",
    ] {
        assert!(v["ops"][op]["count"].as_u64().unwrap() > 0, "{op}: {v:#}");
        assert!(text.contains(op), "{op} in\n{text}");
    }
    assert!(v["server"]["cpu_cores"].as_f64().unwrap() > 0.0);
    assert!(v["server"]["wal_bytes"].as_u64().unwrap() > 0);
    assert!(text.contains("200 sent, 200 answered"), "{text}");
}

#[test]
fn a_plan_writes_its_report_and_charts() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["plan", "--serve"])
        .arg(reelbatch())
        .args(FAST)
        .args([
            "--tenants",
            "4",
            "--start-rate",
            "50",
            "--factor",
            "2",
            "--step-s",
            "1",
            "--steps-max",
            "2",
            // The objective is not what this test checks (a loaded CI machine).
            "--slo-p99-ms",
            "5000",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("Highest sustainable rate"), "{md}");
    assert!(md.contains("| tenants | videos/day each |"), "{md}");
    let steps: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("steps.json")).unwrap()).unwrap();
    assert_eq!(
        steps.as_array().unwrap().len(),
        2,
        "both steps hold: no bisection"
    );
    if md.contains("![latency]") {
        for png in ["latency.png", "throughput.png", "server.png"] {
            let bytes = std::fs::read(out_dir.join(png)).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{png}");
        }
    } else {
        // Only without any TrueType font on the machine; the report says so.
        assert!(md.contains("Charts not drawn"), "{md}");
    }
}

#[test]
fn a_soak_reports_every_window_and_the_trend() {
    let (text, v) = loadtest_json(
        "soak",
        &[
            "--tenants",
            "4",
            "--rate",
            "40",
            "--duration-s",
            "3",
            "--window-s",
            "1",
        ],
    );
    let windows = v["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 3, "{v:#}");
    for w in windows {
        assert!(w["answered"].as_u64().unwrap() > 0, "{w}");
        assert_eq!(w["errors"], 0, "{w}");
        assert!(w["rss_bytes"].as_u64().unwrap() > 0, "{w}");
    }
    assert_eq!(
        v["answered"],
        windows
            .iter()
            .map(|w| w["answered"].as_u64().unwrap())
            .sum::<u64>()
    );
    assert!(v["rss_mib_per_hour"].is_number(), "{v:#}");
    assert!(text.contains("trend"), "{text}");
}

#[test]
fn steady_funding_tops_up_what_the_creations_were_charged() {
    let (text, v) = loadtest_json(
        "run",
        &[
            "--tenants",
            "4",
            "--rate",
            "100",
            "--duration-s",
            "3",
            "--mix",
            "create=1,topup=1",
            "--funding",
            "steady",
        ],
    );
    assert_eq!(v["all"]["errors"], 0, "{v:#}\n{text}");
    let f = &v["funding"];
    assert_eq!(f["mode"], "steady", "{v:#}");
    let charged = f["charged_credits"].as_u64().unwrap();
    let topped = f["topped_up_credits"].as_u64().unwrap();
    let topups = v["ops"]["topup"]["count"].as_u64().unwrap();
    // About 150 creations at a two-item price: real charges, and top-ups that returned
    // them. What is still owed is at most the creations answered after each tenant's last
    // top-up; a top-up with nothing owed adds 1 credit.
    assert!(charged >= 1_000, "{v:#}");
    assert!(topped <= charged + topups, "{v:#}");
    assert!(topped * 10 >= charged * 7, "{v:#}");
}
