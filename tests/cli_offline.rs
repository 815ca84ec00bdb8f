//! The offline money tools on a real server's data directory: `reelbatch reconcile`,
//! `ledger verify` and `ledger export` agree with the live server, read without modifying
//! a byte (a torn tail stays for the server to cut), and catch damage: a ledger entry
//! altered inside a snapshot whose envelope still checks (what a buggy writer or a
//! tamperer leaves), and a flipped bit in the middle of the log.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use support::{rt, Server};

fn reelbatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reelbatch"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("reelbatch runs")
}

/// Every file under `dir` with its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Copies a data directory (wal and snapshots; the videos are not needed).
fn copy_data(src: &Path, dst: &Path) {
    for sub in ["wal", "snapshots"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        if let Ok(rd) = std::fs::read_dir(src.join(sub)) {
            for e in rd {
                let p = e.unwrap().path();
                std::fs::copy(&p, dst.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
}

fn newest_segment(data: &Path) -> PathBuf {
    wal::list_segments(&data.join("wal"))
        .unwrap()
        .last()
        .unwrap()
        .1
        .clone()
}

#[test]
fn offline_tools_agree_with_the_server_and_catch_damage() {
    let rt = rt();
    let mut s = Server::start(&[]);
    let data = s.dir.clone();
    let d = data.to_str().unwrap().to_owned();

    // A tenant with money movements of every common kind: top-ups, a finished batch with a
    // refused item (settles and a release), an adjustment.
    let (tenant, key) = rt.block_on(async {
        let api = s.api();
        let (t, k) = api.funded("pro", 5_000).await;
        let b = api
            .post(
                &k,
                "/v1/batches",
                &json!({"template": "{a} of {b}", "variables": {
                    "a": ["calm", "neon"], "b": ["rain", "dawn", "a market [reject]"]}}),
                Some("b1"),
            )
            .await;
        assert_eq!(b.status, 201, "{}", b.text);
        let fin = api.wait_batch(&k, b.body["id"].as_str().unwrap()).await;
        assert_eq!(fin["status"], "partial", "{fin}");
        let adj = api
            .admin(
                "POST",
                &format!("/admin/v1/tenants/{t}/adjustments"),
                Some(&json!({"amount": -100, "reason": "goodwill reversal"})),
                Some("adj-1"),
            )
            .await;
        assert_eq!(adj.status, 201, "{}", adj.text);
        let recon = api.reconcile().await;
        assert_eq!(recon["discrepancies"], json!([]), "{recon}");
        (t, k)
    });
    // A graceful stop writes a snapshot.
    assert!(s.terminate().success());

    let before = tree(&data);
    let r = reelbatch(&["reconcile", "--data-dir", &d]);
    assert_eq!(r.status.code(), Some(0), "{}", support::output_text(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("snapshot at LSN"), "{out}");
    assert!(out.contains("checked: 1 tenants, 1 batches"), "{out}");
    assert!(out.contains("discrepancies: 0"), "{out}");

    // --json is the admin endpoint's document, alone on stdout.
    let r = reelbatch(&["reconcile", "--data-dir", &d, "--json"]);
    assert_eq!(r.status.code(), Some(0), "{}", support::output_text(&r));
    let v: Value = serde_json::from_slice(&r.stdout).expect("json");
    assert_eq!(
        v,
        json!({"tenants_checked": 1, "batches_checked": 1, "discrepancies": []})
    );

    let r = reelbatch(&["ledger", "verify", "--data-dir", &d]);
    assert_eq!(r.status.code(), Some(0), "{}", support::output_text(&r));
    assert!(String::from_utf8_lossy(&r.stdout).contains("0 broken chain(s)"));

    // The export: every entry chained to the one before, the chain line last.
    let r = reelbatch(&["ledger", "export", "--data-dir", &d, "--tenant", &tenant]);
    assert_eq!(r.status.code(), Some(0), "{}", support::output_text(&r));
    let lines: Vec<Value> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let (chain, entries) = lines.split_last().unwrap();
    assert_eq!(chain["object"], "chain");
    assert_eq!(chain["verified"], true);
    assert_eq!(chain["entries"], entries.len());
    // top-up, hold, 4 settles, 2 releases (the [reject] scene × 2 styles), adjust.
    assert_eq!(entries.len(), 9, "{lines:?}");
    let mut prev = "0".repeat(64);
    for e in entries {
        assert_eq!(e["prev_hash"], prev.as_str());
        prev = e["hash"].as_str().unwrap().to_owned();
    }
    assert_eq!(chain["head"], prev.as_str());
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "release").count(), 2);
    assert_eq!(*kinds.last().unwrap(), "adjust");
    // The same lines as the admin export of the running server.
    s.spawn().unwrap();
    let admin_export = rt.block_on(async {
        let api = s.api();
        let r = api
            .admin(
                "GET",
                &format!("/admin/v1/tenants/{tenant}/ledger/export"),
                None,
                None,
            )
            .await;
        assert_eq!(r.status, 200);
        r.text
    });
    assert_eq!(admin_export.as_bytes(), &r.stdout[..]);
    assert!(s.terminate().success());
    let before = {
        // The restart wrote (a snapshot at least); re-take the baseline.
        let _ = before;
        tree(&data)
    };
    assert_eq!(
        reelbatch(&["ledger", "export", "--data-dir", &d, "--tenant", "ten_nope"])
            .status
            .code(),
        Some(1)
    );
    assert_eq!(tree(&data), before, "the offline tools modified the data");

    // Records after the snapshot (a crash, no final snapshot) are replayed, and a torn
    // tail is reported and left in place.
    s.spawn().unwrap();
    rt.block_on(async {
        let api = s.api();
        api.top_up(&tenant, 250, "after-snapshot").await;
        let b = api
            .post(
                &key,
                "/v1/batches",
                &json!({"template": "{a}", "variables": {"a": ["x", "y"]}}),
                Some("b2"),
            )
            .await;
        assert_eq!(b.status, 201, "{}", b.text);
        api.wait_batch(&key, b.body["id"].as_str().unwrap()).await;
    });
    s.kill9();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(newest_segment(&data))
            .unwrap();
        f.write_all(&[0u8; 7]).unwrap();
    }
    let before = tree(&data);
    let r = reelbatch(&["reconcile", "--data-dir", &d]);
    assert_eq!(r.status.code(), Some(0), "{}", support::output_text(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("torn tail"), "{out}");
    assert!(out.contains("checked: 1 tenants, 2 batches"), "{out}");
    assert!(!out.contains(" 0 records replayed"), "{out}");
    assert_eq!(tree(&data), before, "the torn tail is the server's to cut");
    let r = reelbatch(&["ledger", "verify", "--data-dir", &d]);
    assert_eq!(r.status.code(), Some(0), "{}", support::output_text(&r));

    // A ledger entry altered inside a snapshot whose checksum is recomputed: the envelope
    // is valid, the money is not.
    let tampered = tempfile::tempdir().unwrap();
    let t = tampered.path();
    copy_data(&data, t);
    let snaps = t.join("snapshots");
    let snap = wal::find_latest_snapshot(&snaps, 1 << 30)
        .unwrap()
        .snapshot
        .expect("a snapshot");
    let mut image = reelbatch::engine::snapshot::decode(snap.payload.as_slice()).unwrap();
    let w = image
        .wallets
        .iter_mut()
        .find(|w| w.tenant.to_string() == tenant)
        .unwrap();
    let settle = w
        .ledger
        .iter_mut()
        .find(|e| e.kind.as_str() == "settle")
        .unwrap();
    settle.amount += 1;
    let seq = settle.seq;
    wal::write_snapshot(
        &snaps,
        snap.lsn,
        &reelbatch::engine::snapshot::encode(&image),
    )
    .unwrap();
    let td = t.to_str().unwrap();
    let r = reelbatch(&["reconcile", "--data-dir", td]);
    assert_eq!(r.status.code(), Some(2), "{}", support::output_text(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains(&format!("{tenant} ledger_chain")), "{out}");
    assert!(!out.contains("discrepancies: 0"), "{out}");
    let r = reelbatch(&["ledger", "verify", "--data-dir", td]);
    assert_eq!(r.status.code(), Some(2), "{}", support::output_text(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains(&format!("{tenant} BROKEN")), "{out}");
    assert!(out.contains(&seq.to_string()), "{out}");
    assert!(out.contains("1 broken chain(s)"), "{out}");
    let r = reelbatch(&["ledger", "export", "--data-dir", td, "--tenant", &tenant]);
    assert_eq!(r.status.code(), Some(2), "{}", support::output_text(&r));
    let last: Value =
        serde_json::from_str(String::from_utf8_lossy(&r.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["verified"], false);

    // A flipped bit in the middle of the log: corruption, named, exit 2.
    let flipped = tempfile::tempdir().unwrap();
    let f = flipped.path();
    copy_data(&data, f);
    let mut frames = Vec::new();
    wal::scan(&f.join("wal"), |fr| {
        frames.push((fr.segment.to_path_buf(), fr.offset, fr.len))
    })
    .unwrap();
    assert!(frames.len() > 10);
    let (seg, off, _) = frames[frames.len() / 2].clone();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[off as usize + wal::FRAME_HEADER_BYTES + 1] ^= 0x10;
    std::fs::write(&seg, bytes).unwrap();
    let fd = f.to_str().unwrap();
    let r = reelbatch(&["reconcile", "--data-dir", fd]);
    assert_eq!(r.status.code(), Some(2), "{}", support::output_text(&r));
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("CORRUPTION"),
        "{}",
        support::output_text(&r)
    );
    assert_eq!(
        reelbatch(&["ledger", "verify", "--data-dir", fd])
            .status
            .code(),
        Some(2)
    );

    // No data directory at all: unreadable, exit 1.
    let r = reelbatch(&["reconcile", "--data-dir", "/nonexistent/reelbatch"]);
    assert_eq!(r.status.code(), Some(1), "{}", support::output_text(&r));
}
