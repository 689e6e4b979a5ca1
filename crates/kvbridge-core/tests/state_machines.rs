//! Scheduler and worker state machines, driven with no NIXL and no network: request
//! lifecycle, aborts before and after scheduling, prefix hits on D, role errors,
//! malformed params and hostile peer bytes.
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::error::HandshakeError;
use kvbridge_core::layout::{KvLayout, MemKind, TensorInfo};
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::wire::{self, AgentMetadata, ConnectorMetadata, HandshakePayload, Notif, WIRE_VERSION};
use kvbridge_core::worker::pull::{Action, PullWorker};

fn cfg(role: &str, engine: &str) -> ConnectorConfig {
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":7000,"kv_lease_duration":30}}}}"#
    );
    ConnectorConfig::from_json(
        &json,
        EngineInfo { tp_size: 1, compat: CompatInfo { model: "m".into(), block_size: 16, ..Default::default() }, ..Default::default() },
        |_| None,
    )
    .unwrap()
}

const PEER: &str = "P@127.0.0.1:7000";
const DECODE: &str = r#"{"do_remote_decode":true}"#;

/// P finishes a request and returns the params D will get.
fn prefill(p: &mut PullScheduler, req: &str, blocks: &[u32]) -> String {
    assert_eq!(p.get_num_new_matched_tokens(req, 64, 0, Some(DECODE)).num_tokens, 0);
    let f = p.request_finished(req, blocks, FinishReason::LengthCapped, 64, Some(DECODE), 1000.0);
    assert!(f.delay_free);
    f.kv_transfer_params.unwrap().to_string()
}

#[test]
fn producer_holds_blocks_until_workers_report() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let params = prefill(&mut p, "r1", &[3, 4, 5, 6]);
    let v: serde_json::Value = serde_json::from_str(&params).unwrap();
    assert_eq!(v["do_remote_prefill"], true);
    assert_eq!(v["remote_block_ids"], serde_json::json!([[3, 4, 5, 6]]));
    assert_eq!(v["remote_engine_id"], "P");
    assert_eq!(v["remote_port"], 7000);
    assert!(p.has_pending_block_frees());
    let md = p.build_connector_meta();
    assert_eq!(md.reqs_to_send.len(), 1);
    assert_eq!(md.reqs_to_send[0].expiry_unix, 1030.0);
    assert!(p.build_connector_meta().is_empty(), "per-step lists reset");
    p.update_connector_output(&["r1".into()], &[]);
    assert!(!p.has_pending_block_frees());
}

#[test]
fn producer_frees_at_once_on_abort() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    p.get_num_new_matched_tokens("r", 64, 0, Some(DECODE));
    let f = p.request_finished("r", &[1, 2], FinishReason::Aborted, 10, Some(DECODE), 0.0);
    assert!(!f.delay_free && f.kv_transfer_params.is_none());
    assert!(p.build_connector_meta().is_empty());
    assert!(!p.has_pending_block_frees());
}

#[test]
fn consumer_lifecycle_and_prefix_hit() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let params = prefill(&mut p, "r1", &[10, 11, 12, 13]);
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));

    // No local hit: load all 64 tokens asynchronously into 4 local blocks.
    let m = d.get_num_new_matched_tokens("d1", 64, 0, Some(&params));
    assert_eq!((m.num_tokens, m.load_async), (64, true));
    d.update_state_after_alloc("d1", &[1, 2, 3, 4], 64);
    let md = d.build_connector_meta();
    assert_eq!(md.reqs_to_recv.len(), 1);
    let r = &md.reqs_to_recv[0];
    assert_eq!(
        (r.local_block_ids.clone(), r.remote.block_ids.clone(), r.notify_only),
        (vec![vec![1, 2, 3, 4]], vec![vec![10, 11, 12, 13]], false)
    );
    assert_eq!(r.num_tokens, 64);
    assert_eq!(r.remote.request_id, "r1");
    d.update_connector_output(&[], &["d1".into()]);
    // Back in WAITING after the load, vLLM asks again: no second transfer.
    let m = d.get_num_new_matched_tokens("d1", 64, 63, Some(&params));
    assert_eq!((m.num_tokens, m.load_async), (0, false));
    d.update_state_after_alloc("d1", &[1, 2, 3, 4], 0);
    assert!(d.build_connector_meta().is_empty());
    d.request_finished("d1", &[1, 2, 3, 4], FinishReason::LengthCapped, 80, Some(&params), 0.0);
    assert!(d.build_connector_meta().is_empty());

    // Partial prefix hit (2 blocks cached locally): the local blocks cover the tail; the
    // worker's plan aligns them with the last remote blocks.
    let m = d.get_num_new_matched_tokens("d2", 64, 32, Some(&params));
    assert_eq!(m.num_tokens, 32);
    d.update_state_after_alloc("d2", &[7, 8], 32);
    let r = d.build_connector_meta().reqs_to_recv.remove(0);
    assert_eq!((r.local_block_ids, r.remote.block_ids), (vec![vec![7, 8]], vec![vec![10, 11, 12, 13]]));

    // Full prefix hit: nothing to load, but P must still be notified (zero blocks).
    let m = d.get_num_new_matched_tokens("d3", 64, 64, Some(&params));
    assert_eq!((m.num_tokens, m.load_async), (0, false));
    d.update_state_after_alloc("d3", &[], 0);
    let r = d.build_connector_meta().reqs_to_recv.remove(0);
    assert!(r.local_block_ids.concat().is_empty() && r.notify_only);
}

#[test]
fn consumer_abort_before_scheduling_still_frees_p() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let params = prefill(&mut p, "r1", &[10, 11]);
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));
    d.get_num_new_matched_tokens("d1", 32, 0, Some(&params));
    // Aborted while waiting for blocks: never allocated.
    let f = d.request_finished("d1", &[], FinishReason::Aborted, 0, Some(&params), 0.0);
    assert!(!f.delay_free);
    let md = d.build_connector_meta();
    assert_eq!(md.reqs_to_recv.len(), 1);
    assert!(md.reqs_to_recv[0].notify_only && md.reqs_to_recv[0].local_block_ids.concat().is_empty());
    // Finishing again is harmless.
    d.request_finished("d1", &[], FinishReason::Aborted, 0, Some(&params), 0.0);
    assert!(d.build_connector_meta().is_empty());
}

#[test]
fn role_errors_and_malformed_params_fail_only_that_request() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));
    let params = prefill(&mut PullScheduler::new(cfg("kv_producer", "X")), "x", &[1]);

    // do_remote_prefill to a producer.
    let m = p.get_num_new_matched_tokens("bad1", 20, 0, Some(&params));
    assert_eq!((m.num_tokens, m.load_async), (20, true));
    p.update_state_after_alloc("bad1", &[5, 6], 20);
    let md = p.build_connector_meta();
    assert_eq!(md.reqs_failed.len(), 1);
    assert!(md.reqs_failed[0].reason.contains("kv_producer"), "{}", md.reqs_failed[0].reason);

    // do_remote_decode to a consumer.
    d.get_num_new_matched_tokens("bad2", 20, 0, Some(DECODE));
    d.update_state_after_alloc("bad2", &[5, 6], 20);
    let md = d.build_connector_meta();
    assert!(md.reqs_failed[0].reason.contains("kv_consumer"));

    // Malformed: wrong type, missing field, bad host.
    for (i, bad) in [
        r#"{"do_remote_prefill":true,"remote_engine_id":"P","remote_request_id":"r","remote_block_ids":[1],"remote_host":"h","remote_port":"abc"}"#,
        r#"{"do_remote_prefill":true,"remote_engine_id":"P","remote_request_id":"r","remote_host":"h","remote_port":1}"#,
        r#"{"do_remote_prefill":true,"remote_engine_id":"P","remote_request_id":"r","remote_block_ids":[1],"remote_host":"a b","remote_port":1}"#,
        r#"not json"#,
    ]
    .iter()
    .enumerate()
    {
        let id = format!("m{i}");
        assert!(d.get_num_new_matched_tokens(&id, 20, 0, Some(bad)).load_async);
        d.update_state_after_alloc(&id, &[1], 20);
        let md = d.build_connector_meta();
        assert_eq!(md.reqs_failed.len(), 1, "{bad}");
        assert!(md.reqs_to_recv.is_empty());
        // Under kv_load_failure_policy=recompute the request comes back: it runs locally.
        assert_eq!(d.get_num_new_matched_tokens(&id, 20, 0, Some(bad)), kvbridge_core::scheduler::Matched::NONE);
    }

    // A good request right after still works.
    let m = d.get_num_new_matched_tokens("good", 16, 0, Some(&params));
    assert!(m.load_async);
    d.update_state_after_alloc("good", &[9], 16);
    let md = d.build_connector_meta();
    assert!(md.reqs_failed.is_empty());
    assert_eq!(md.reqs_to_recv.len(), 1);
}

// ------------------------------------------------------------------------- worker

fn layout(blocks: u64) -> KvLayout {
    KvLayout {
        regions: (0..4)
            .map(|i| {
                let name = format!("l{i}");
                let t = TensorInfo::opaque(&name, 0x10000 * (i + 1), &[blocks, 128], &[128, 1], 2, MemKind::Dram, 0);
                KvLayout::from_tensors(&[t], blocks, 0, 1).unwrap().regions.remove(0)
            })
            .collect(),
        num_blocks: blocks,
        blocks_per_logical: 1,
    }
}

fn payload(engine: &str, hash: &str, blocks: u64) -> Vec<u8> {
    let l = layout(blocks);
    let md = AgentMetadata {
        engine_id: engine.into(),
        agent_name: format!("{engine}-agent"),
        tp_rank: 0,
        tp_size: 1,
        block_size: 16,
        blocks_per_logical: 1,
        regions: l.regions,
        nixl_md: vec![1, 2, 3],
    };
    wire::encode("p", &HandshakePayload { compat_hash: hash.into(), agent_metadata: wire::encode("m", &md).unwrap(), ..Default::default() })
        .unwrap()
}

fn d_worker() -> PullWorker {
    let mut w = PullWorker::new("D".into(), 0, 1, "H".into(), true);
    w.on_registered(layout(32), 16);
    w
}

fn d_meta(
    d: &mut PullScheduler,
    p: &mut PullScheduler,
    req: &str,
    remote_blocks: &[u32],
    local: &[u32],
    computed: u64,
) -> ConnectorMetadata {
    let params = prefill(p, &format!("p-{req}"), remote_blocks);
    let n = remote_blocks.len() as u64 * 16;
    let m = d.get_num_new_matched_tokens(req, n, computed, Some(&params));
    d.update_state_after_alloc(req, local, m.num_tokens);
    d.build_connector_meta()
}

#[test]
fn worker_handshakes_once_then_reads_and_reports() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    let a = w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4, 5, 9], &[1, 2, 3], 0), 0.0);
    assert!(matches!(&a[..], [Action::Handshake { peer, port: 7000, .. }] if peer == "P@127.0.0.1:7000"));
    // A second request for the same engine queues behind the same handshake.
    assert!(w.on_metadata(d_meta(&mut d, &mut p, "d2", &[6], &[7], 0), 0.0).is_empty());
    let a = w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 0.0, 0.0);
    assert!(matches!(&a[..], [Action::AddRemote { .. }]));
    let a = w.on_remote_added(PEER, 0, Ok(()), 1.0);
    assert_eq!(a.len(), 2);
    match &a[0] {
        Action::Read { req_id, key, pieces, notif, bytes } => {
            assert_eq!(req_id, "d1");
            assert_eq!(key, &format!("{PEER}#0"));
            // Local 1,2,3 <- remote 4,5,9: runs [1,2]<-[4,5] and [3]<-[9], per region.
            assert_eq!(pieces.len(), 8);
            assert_eq!((pieces[0].local, pieces[0].remote, pieces[0].len), (0x10000 + 256, 0x10000 + 4 * 256, 512));
            assert_eq!(*bytes, 12 * 256);
            assert_eq!(Notif::from_bytes(notif).unwrap().request_id, "p-d1");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.on_read_done("d1", &format!("{PEER}#0"), Ok(()), 2.0).is_empty());
    let f = w.base.take_finished();
    assert_eq!(f.recving, vec!["d1"]);
    assert!(f.failed_recving.is_empty());
    assert_eq!(w.stats.bytes_read, 12 * 256);
    // Engine is ready: the next request reads at once.
    let a = w.on_metadata(d_meta(&mut d, &mut p, "d3", &[1], &[2], 0), 3.0);
    assert!(matches!(&a[..], [Action::Read { .. }]));
}

#[test]
fn worker_zero_block_request_notifies_without_reporting() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4, 5], &[], 32), 0.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 0.0, 0.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 0.0);
    assert!(matches!(&a[..], [Action::Notify { key, .. }] if *key == format!("{PEER}#0")));
    assert_eq!(w.base.take_finished(), Default::default(), "a full prefix hit is not reported to vLLM");
}

#[test]
fn worker_handshake_failures_fail_queued_requests() {
    let cases: Vec<(Result<Vec<u8>, HandshakeError>, &str)> = vec![
        (Err(HandshakeError::Timeout { addr: "h:1".into(), timeout_ms: 5 }), "timed out"),
        (Ok(payload("P", "OTHER", 32)), "incompatible"),
        (Ok(payload("NOT-P", "H", 32)), "engine"),
        (Ok(b"\xc1\xc1garbage".to_vec()), "decode"),
        (Ok(vec![0u8; 3]), "decode"),
    ];
    for (res, _what) in cases {
        let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
        let mut w = d_worker();
        w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4], &[1], 0), 0.0);
        assert!(w.on_handshake_payload(PEER, 0, "h:1", res, 0.0, 0.0).is_empty());
        let f = w.base.take_finished();
        assert_eq!(f.failed_recving, vec!["d1"]);
        assert_eq!(f.recving, vec!["d1"], "failed loads are also finished, so vLLM releases them");
        assert_eq!(f.invalid_block_ids, vec![1]);
        // The engine is forgotten: the next request handshakes again.
        let a = w.on_metadata(d_meta(&mut d, &mut p, "d2", &[4], &[1], 0), 0.0);
        assert!(matches!(&a[..], [Action::Handshake { .. }]));
    }
}

#[test]
fn worker_rejects_out_of_range_remote_blocks() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4, 999], &[1, 2], 0), 0.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 0.0, 0.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 0.0);
    // P is told the read failed so it frees; D fails the request.
    assert!(matches!(&a[..], [Action::Notify { .. }]));
    assert_eq!(w.base.take_finished().failed_recving, vec!["d1"]);
}

#[test]
fn worker_block_count_mismatch_fails_the_request_and_frees_p() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    // 64 tokens but P offers one 16-token block.
    let params = prefill(&mut p, "r1", &[10]);
    d.get_num_new_matched_tokens("d1", 64, 0, Some(&params));
    d.update_state_after_alloc("d1", &[1, 2, 3, 4], 64);
    w.on_metadata(d.build_connector_meta(), 0.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 0.0, 0.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 0.0);
    match &a[..] {
        [Action::Notify { msg, .. }] => assert!(!Notif::from_bytes(msg).unwrap().ok),
        other => panic!("{other:?}"),
    }
    let f = w.base.take_finished();
    assert_eq!((f.failed_recving, f.invalid_block_ids), (vec!["d1".to_string()], vec![1, 2, 3, 4]));
}

#[test]
fn worker_read_failure_forgets_peer() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4], &[1], 0), 0.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 0.0, 0.0);
    w.on_remote_added(PEER, 0, Ok(()), 0.0);
    let a = w.on_read_done("d1", &format!("{PEER}#0"), Err(kvbridge_core::error::TransportError::new("nixl", "peer died")), 1.0);
    assert!(matches!(&a[..], [Action::Notify { .. }, Action::RemoveRemote { .. }]));
    assert_eq!(w.base.take_finished().failed_recving, vec!["d1"]);
    assert!(!w.is_peer_ready(PEER));
}

#[test]
fn producer_worker_frees_on_notif_early_or_late_and_on_expiry() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let mut w = PullWorker::new("P".into(), 0, 1, "H".into(), true);
    prefill(&mut p, "a", &[1]);
    prefill(&mut p, "b", &[2]);
    let notif = |r: &str| {
        Notif { version: WIRE_VERSION, request_id: r.into(), from_engine: "D".into(), from_tp_rank: 0, ok: true, expected: 1 }
            .to_bytes()
            .unwrap()
    };
    // "b" is read before its lease reaches the worker.
    w.base.on_notif(&notif("b"), 1000.0);
    w.on_metadata(p.build_connector_meta(), 1000.0);
    assert_eq!(w.base.take_finished().sending, vec!["b"]);
    w.base.on_notif(&notif("a"), 1001.0);
    assert_eq!(w.base.take_finished().sending, vec!["a"]);
    // Garbage and unknown notifications are dropped, bounded.
    w.base.on_notif(b"\xff\xff", 1001.0);
    w.base.on_notif(&notif("unknown"), 1001.0);
    assert!(w.base.take_finished().sending.is_empty());
    assert_eq!(w.base.notifs_rejected, 1);
    // A lease nobody reads expires and frees the blocks.
    prefill(&mut p, "c", &[3]);
    w.on_metadata(p.build_connector_meta(), 1000.0);
    w.base.tick(1029.0);
    assert!(w.base.take_finished().sending.is_empty());
    w.base.tick(1031.0);
    assert_eq!(w.base.take_finished().sending, vec!["c"]);
    assert_eq!(w.base.expired_leases, 1);
    assert_eq!(w.base.held_requests(), 0);
}

#[test]
fn scheduler_failed_requests_reach_worker_as_failed() {
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));
    let mut w = d_worker();
    d.get_num_new_matched_tokens("bad", 20, 0, Some(DECODE));
    d.update_state_after_alloc("bad", &[3], 20);
    assert!(w.on_metadata(d.build_connector_meta(), 0.0).is_empty());
    let f = w.base.take_finished();
    assert_eq!((f.recving, f.failed_recving), (vec!["bad".to_string()], vec!["bad".to_string()]));
}

#[test]
fn consumer_abort_after_scheduling_lets_the_load_finish() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    let md = d_meta(&mut d, &mut p, "d1", &[4, 5], &[1, 2], 0);
    // Aborted while its READ is in flight: vLLM keeps the blocks until finished_recving,
    // so the scheduler must not send a second (zero-block) notification.
    let f = d.request_finished("d1", &[1, 2], FinishReason::Aborted, 0, None, 0.0);
    assert!(!f.delay_free);
    assert!(d.build_connector_meta().is_empty());
    w.on_metadata(md, 0.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 0.0, 0.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 0.0);
    assert!(matches!(&a[..], [Action::Read { .. }]));
    w.on_read_done("d1", &format!("{PEER}#0"), Ok(()), 1.0);
    assert_eq!(w.base.take_finished().recving, vec!["d1"], "reported so vLLM frees the blocks");
    d.update_connector_output(&[], &["d1".into()]);
    assert!(d.base.loading.is_empty());
}

#[test]
fn producer_abort_during_prefill_holds_nothing() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    p.get_num_new_matched_tokens("r", 500, 0, Some(DECODE));
    let f = p.request_finished("r", &[1, 2, 3, 4], FinishReason::Aborted, 256, Some(DECODE), 0.0);
    assert!(!f.delay_free);
    assert!(!p.has_pending_block_frees());
    let f = p.request_finished("r2", &[1], FinishReason::Error, 256, Some(DECODE), 0.0);
    assert!(!f.delay_free && f.kv_transfer_params.is_none());
}
