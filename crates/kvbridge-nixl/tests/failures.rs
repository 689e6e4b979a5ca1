//! Failure paths that must return typed errors instead of aborting the process. Each runs
//! in a child process (the runtime loader's outcome is per process, and an abort must be
//! observable as a failed exit rather than taking the test harness down).
use std::process::Command;

use kvbridge_core::layout::{KvLayout, MemKind, TensorInfo};
use kvbridge_core::plan::Piece;
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_core::wire::AgentMetadata;
use kvbridge_nixl::{NixlError, NixlOptions, NixlTransport};

fn child(test: &str, envs: &[(&str, Option<&str>)]) -> std::process::ExitStatus {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"]).env("KVB_CHILD", "1");
    for (k, v) in envs {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.status().expect("spawn")
}

fn in_child() -> bool {
    std::env::var("KVB_CHILD").is_ok()
}

#[test]
fn missing_runtime_is_an_error_not_an_abort() {
    if in_child() {
        let r = NixlTransport::new("t", &NixlOptions::default());
        match r {
            Err(NixlError::RuntimeMissing { searched }) => {
                assert!(searched.iter().any(|s| s.contains("/nonexistent")), "{searched:?}");
                let msg = NixlError::RuntimeMissing { searched }.to_string();
                assert!(msg.contains("KVBRIDGE_NIXL_LIB_DIR"), "{msg}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("agent created without a runtime"),
        }
        assert!(!NixlTransport::runtime_available(None));
        return;
    }
    let st = child(
        "missing_runtime_is_an_error_not_an_abort",
        &[("KVBRIDGE_NIXL_LIB_DIR", Some("/nonexistent")), ("NIXL_LIB_DIR", None), ("LD_LIBRARY_PATH", None)],
    );
    assert!(st.success(), "child failed (134 = abort): {st}");
}

fn runtime_or_skip() -> bool {
    if NixlTransport::runtime_available(None) {
        return true;
    }
    assert!(std::env::var("CI").map(|v| v != "true").unwrap_or(true), "CI=true but the NIXL runtime is missing");
    eprintln!("SKIP: NIXL runtime not found");
    false
}

#[test]
fn hostile_peer_metadata_is_an_error() {
    if !in_child() {
        if !runtime_or_skip() {
            return;
        }
        let st = child("hostile_peer_metadata_is_an_error", &[("UCX_NET_DEVICES", Some("lo"))]);
        assert!(st.success(), "child failed: {st}");
        return;
    }
    let mut t = NixlTransport::new("hostile-test", &NixlOptions::default()).expect("agent");
    let buf = vec![0u8; 1 << 16];
    let t0 = TensorInfo::opaque("l0", buf.as_ptr() as u64, &[16, 4096], &[4096, 1], 1, MemKind::Dram, 0);
    let layout = KvLayout::from_tensors(&[t0], 16, 0, 1).expect("layout");
    t.register(&layout).expect("register");
    let md = AgentMetadata {
        engine_id: "evil".into(),
        agent_name: "evil-agent".into(),
        tp_rank: 0,
        tp_size: 1,
        block_size: 16,
        blocks_per_logical: 1,
        regions: layout.regions.clone(),
        nixl_md: b"this is not nixl metadata".to_vec(),
        staging_regions: vec![],
    };
    assert!(t.add_remote("evil@h:1", &md).is_err(), "garbage metadata accepted");
    // Reads and notifications to an unknown peer are errors too.
    let piece = |l: u64, r: u64, len: u64| Piece { local: l, remote: r, len, local_dev: 0, remote_dev: 0 };
    assert!(t.read("evil@h:1", &[piece(buf.as_ptr() as u64, 0x1000, 8)], b"n").is_err());
    assert!(t.notify("evil@h:1", b"n").is_err());
    assert!(t.poll(12345).is_err());
    // Pieces outside registered memory, on either side, are refused by NIXL (no stray
    // read or write).
    let mut peer = NixlTransport::new("hostile-peer", &NixlOptions::default()).expect("peer agent");
    let buf2 = vec![0u8; 1 << 16];
    let mut l2 = layout.clone();
    l2.regions[0].base = buf2.as_ptr() as u64;
    peer.register(&l2).expect("register peer");
    let mut pm = md.clone();
    pm.agent_name = "hostile-peer".into();
    pm.nixl_md = peer.local_metadata().unwrap();
    pm.regions[0].base = buf2.as_ptr() as u64;
    t.add_remote("peer", &pm).expect("load peer metadata");
    let (lb, rb) = (buf.as_ptr() as u64, buf2.as_ptr() as u64);
    assert!(t.read("peer", &[piece(lb, rb + (1 << 16), 64)], b"n").is_err(), "remote piece past the registration");
    assert!(t.read("peer", &[piece(lb + (1 << 16) - 8, rb, 64)], b"n").is_err(), "local piece past the registration");
    let ok = t.read("peer", &[piece(lb, rb, 64)], b"n").expect("an in-range read posts");
    let t_end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while t.poll(ok).expect("poll") == XferPoll::Pending && std::time::Instant::now() < t_end {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    t.release(ok);
    // A name mismatch between the handshake and the NIXL metadata is refused.
    let mut liar = pm.clone();
    liar.agent_name = "someone-else".into();
    t.remove_remote("peer");
    assert!(matches!(t.add_remote("liar", &liar), Err(e) if e.kind == "agent_mismatch"));
    drop(t);
    drop(peer);
    drop((buf, buf2));
}
