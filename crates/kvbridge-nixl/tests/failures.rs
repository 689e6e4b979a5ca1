//! Failure paths that must return typed errors instead of aborting the process. Each runs
//! in a child process (the runtime loader's outcome is per process, and an abort must be
//! observable as a failed exit rather than taking the test harness down).
use std::process::Command;

use kvbridge_core::layout::{KvLayout, MemKind, Region};
use kvbridge_core::transport::Transport;
use kvbridge_core::wire::{AgentMetadata, RegionDesc};
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
    let layout = KvLayout {
        regions: vec![Region {
            name: "l0".into(),
            base: buf.as_ptr() as u64,
            block_len: 4096,
            block_stride: 4096,
            num_blocks: 16,
            mem: MemKind::Dram,
            device_id: 0,
        }],
        num_blocks: 16,
    };
    t.register(&layout).expect("register");
    let md = AgentMetadata {
        engine_id: "evil".into(),
        agent_name: "evil-agent".into(),
        tp_rank: 0,
        tp_size: 1,
        block_size: 16,
        regions: vec![RegionDesc { base: 0x1000, block_len: 4096, block_stride: 4096, num_blocks: 16, device_id: 0, mem: MemKind::Dram }],
        nixl_md: b"this is not nixl metadata".to_vec(),
    };
    assert!(t.add_remote("evil@h:1", &md).is_err(), "garbage metadata accepted");
    // Reads and notifications to an unknown peer are errors too.
    assert!(t.read("evil@h:1", &[0], &[0], b"n").is_err());
    assert!(t.notify("evil@h:1", b"n").is_err());
    assert!(t.poll(12345).is_err());
    // Indices out of range never reach NIXL.
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
    assert!(matches!(t.read("peer", &[0], &[16], b"n"), Err(e) if e.kind == "index"));
    assert!(matches!(t.read("peer", &[-1], &[0], b"n"), Err(e) if e.kind == "index"));
    // A name mismatch between the handshake and the NIXL metadata is refused.
    let mut liar = pm.clone();
    liar.agent_name = "someone-else".into();
    t.remove_remote("peer");
    assert!(matches!(t.add_remote("liar", &liar), Err(e) if e.kind == "agent_mismatch"));
    drop(t);
    drop(peer);
    drop((buf, buf2));
}
