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
fn producer_stages_frees_vllm_blocks_and_recycles_slots() {
    let json = r#"{"kv_role":"kv_producer","engine_id":"P","kv_connector_extra_config":{"side_channel_host":"127.0.0.1","side_channel_port":7000,"kv_staging_blocks":5}}"#;
    let info =
        EngineInfo { tp_size: 1, compat: CompatInfo { model: "m".into(), block_size: 16, ..Default::default() }, ..Default::default() };
    let mut p = PullScheduler::new(ConnectorConfig::from_json(json, info, |_| None).unwrap());
    assert_eq!(p.staging_slots(), 5);
    // A producing request whose prefill completes: slots reserved, a copy ordered.
    p.get_num_new_matched_tokens("a", 64, 0, Some(DECODE));
    p.prefill_completing("a", &[7, 8, 9], 64);
    p.prefill_completing("not-producing", &[1], 16); // no do_remote_decode: ignored
    let md = p.build_connector_meta();
    assert_eq!(md.stage.len(), 1);
    assert_eq!(md.stage[0].block_ids, vec![7, 8, 9]);
    let slots = md.stage[0].slots.clone();
    assert!(slots.iter().all(|&s| (1..=5).contains(&s)), "{slots:?}");
    // Finished: vLLM frees its blocks now; D gets the slots.
    let f = p.request_finished("a", &[7, 8, 9], FinishReason::LengthCapped, 64, Some(DECODE), 1000.0);
    assert!(!f.delay_free);
    let v = f.kv_transfer_params.unwrap();
    assert_eq!(v["remote_staged"], true);
    assert_eq!(v["remote_block_ids"], serde_json::json!([slots]));
    assert!(!p.has_pending_block_frees(), "vLLM holds nothing for this request");
    assert_eq!(p.build_connector_meta().reqs_to_send.len(), 1, "the worker holds the lease");
    // Too few free slots left (2): the next request is held in place.
    p.get_num_new_matched_tokens("b", 64, 0, Some(DECODE));
    p.prefill_completing("b", &[1, 2, 3], 64);
    assert!(p.build_connector_meta().stage.is_empty());
    let f = p.request_finished("b", &[1, 2, 3], FinishReason::LengthCapped, 64, Some(DECODE), 1000.0);
    assert!(f.delay_free && f.kv_transfer_params.unwrap().get("remote_staged").is_none());
    // The workers report both: the staged one is hidden from vLLM, its slots are free.
    let hidden = p.update_connector_output(&["a".into(), "b".into()], &[]);
    assert_eq!(hidden, vec!["a".to_string()]);
    assert_eq!(p.accounting()["staging_free_slots"], 5);
    // Staged then aborted: the slots come back at once, no params.
    p.get_num_new_matched_tokens("c", 64, 0, Some(DECODE));
    p.prefill_completing("c", &[4, 5], 64);
    assert_eq!(p.accounting()["staging_free_slots"], 3);
    let f = p.request_finished("c", &[4, 5], FinishReason::Aborted, 64, Some(DECODE), 1000.0);
    assert!(!f.delay_free && f.kv_transfer_params.is_none());
    assert_eq!(p.accounting()["staging_free_slots"], 5);
    // A consumer never stages, whatever the config says.
    let json = r#"{"kv_role":"kv_consumer","engine_id":"D","kv_connector_extra_config":{"kv_staging_blocks":5}}"#;
    let info = EngineInfo { tp_size: 1, ..Default::default() };
    assert_eq!(PullScheduler::new(ConnectorConfig::from_json(json, info, |_| None).unwrap()).staging_slots(), 0);
}

#[test]
fn producer_with_a_host_buffer_copies_before_offering() {
    let json = r#"{"kv_role":"kv_producer","engine_id":"P","kv_buffer_device":"cpu","kv_connector_extra_config":{"side_channel_host":"127.0.0.1","side_channel_port":7000}}"#;
    let info = EngineInfo { tp_size: 1, cuda_device: Some(0), ..Default::default() };
    let mut p = PullScheduler::new(ConnectorConfig::from_json(json, info, |_| None).unwrap());
    // The completing step orders a copy of each block to its own id in the host mirror.
    p.get_num_new_matched_tokens("a", 64, 0, Some(DECODE));
    p.prefill_completing("a", &[7, 2, 9], 64);
    p.prefill_completing("not-producing", &[1], 16);
    let md = p.build_connector_meta();
    assert_eq!(md.stage.len(), 1);
    assert_eq!((md.stage[0].block_ids.clone(), md.stage[0].slots.clone()), (vec![7, 2, 9], vec![7, 2, 9]));
    // Offered as usual: vLLM holds the blocks until D has read (the mirror is not a copy
    // P may keep past them).
    let f = p.request_finished("a", &[7, 2, 9], FinishReason::LengthCapped, 64, Some(DECODE), 1000.0);
    assert!(f.delay_free);
    let v = f.kv_transfer_params.unwrap();
    assert_eq!(v["remote_block_ids"], serde_json::json!([[7, 2, 9]]));
    assert!(v.get("remote_staged").is_none());
    // A request whose completing step was never reported has no copy: not offered, freed.
    p.get_num_new_matched_tokens("b", 64, 0, Some(DECODE));
    let f = p.request_finished("b", &[3, 4], FinishReason::LengthCapped, 64, Some(DECODE), 1000.0);
    assert!(!f.delay_free && f.kv_transfer_params.is_none());
    p.update_connector_output(&["a".into()], &[]);
    assert!(!p.has_pending_block_frees());
}

#[test]
fn push_producer_with_a_host_buffer_writes_only_what_it_copied() {
    use kvbridge_core::scheduler::PushScheduler;
    let json = r#"{"kv_role":"kv_producer","engine_id":"P","kv_buffer_device":"cpu","kv_connector_extra_config":{"side_channel_host":"127.0.0.1","side_channel_port":7000,"transfer_mode":"push"}}"#;
    let info = EngineInfo { tp_size: 1, cuda_device: Some(0), ..Default::default() };
    let mut p = PushScheduler::new(ConnectorConfig::from_json(json, info, |_| None).unwrap());
    let dec = r#"{"do_remote_decode":true,"transfer_id":"t1"}"#;
    p.get_num_new_matched_tokens("a", 64, 0, Some(dec));
    p.prefill_completing("a", &[7, 2], 64);
    let md = p.build_connector_meta();
    assert!(md.push_saves.is_empty(), "no layer-wise writes from a host buffer");
    assert_eq!((md.stage[0].block_ids.clone(), md.stage[0].slots.clone()), (vec![7, 2], vec![7, 2]));
    let f = p.request_finished("a", &[7, 2], FinishReason::LengthCapped, 64, Some(dec), 1000.0);
    assert!(f.delay_free && f.kv_transfer_params.is_some());
    let md = p.build_connector_meta();
    assert!(md.push_finished.len() == 1 && !md.push_finished[0].aborted);
    // Never copied: registrations for it are refused and its blocks freed.
    let dec = r#"{"do_remote_decode":true,"transfer_id":"t2"}"#;
    p.get_num_new_matched_tokens("b", 64, 0, Some(dec));
    let f = p.request_finished("b", &[3], FinishReason::LengthCapped, 64, Some(dec), 1000.0);
    assert!(!f.delay_free && f.kv_transfer_params.is_none());
    let md = p.build_connector_meta();
    assert!(md.push_finished.len() == 1 && md.push_finished[0].aborted);
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
        staging_regions: vec![],
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

// ---------------------------------------------------------------------------------------
// Leases, heartbeats, incarnations (issue 5)

fn payload_with(engine: &str, hash: &str, epoch: u64, now_unix: f64, compat: Option<CompatInfo>) -> Vec<u8> {
    let p: HandshakePayload = wire::decode("p", &payload(engine, hash, 32), 1 << 20).unwrap();
    wire::encode("p", &HandshakePayload { epoch, now_unix, compat, mode: "pull".into(), ..p }).unwrap()
}

/// D worker with a ready peer P (incarnation `epoch`, clock `offset` s ahead of ours).
fn ready_worker(epoch: u64, offset: f64) -> PullWorker {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    w.on_metadata(d_meta(&mut d, &mut p, "warm", &[4], &[], 16), 1000.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload_with("P", "H", epoch, 1000.5 + offset, None)), 1000.0, 1001.0);
    w.on_remote_added(PEER, 0, Ok(()), 1001.0);
    w.base.take_finished();
    w
}

/// A D request for P's blocks, as the D scheduler ships it.
fn recv(req: &str, remote: &str, epoch: u64, expiry_unix: f64) -> ConnectorMetadata {
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));
    let params = serde_json::json!({"do_remote_prefill": true, "remote_engine_id": "P", "remote_request_id": remote,
        "remote_block_ids": [[4]], "remote_host": "127.0.0.1", "remote_port": 7000, "tp_size": 1,
        "remote_epoch": epoch, "remote_blocks_expiry_time": expiry_unix})
    .to_string();
    d.get_num_new_matched_tokens(req, 16, 0, Some(&params));
    d.update_state_after_alloc(req, &[1], 16);
    d.build_connector_meta()
}

#[test]
fn consumer_sends_batched_heartbeats_from_arrival_until_the_load_ends() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let (a, b) = (prefill(&mut p, "pa", &[1]), prefill(&mut p, "pb", &[2]));
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));
    // Both arrive (still queued: never matched); one batch for engine P, every lease/6 s.
    d.on_new_request("da", Some(&a));
    d.on_new_request("db", Some(&b));
    d.on_new_request("plain", None);
    d.tick(2000.0);
    let hb = d.build_connector_meta().heartbeats;
    assert_eq!(hb.len(), 1);
    assert_eq!((hb[0].engine_id.as_str(), hb[0].port, hb[0].request_ids.clone()), ("P", 7000, vec!["pa".to_string(), "pb".to_string()]));
    d.tick(2002.0);
    assert!(d.build_connector_meta().heartbeats.is_empty(), "not before lease/6 = 5 s");
    // "da" loads and finishes loading: no more heartbeats for it.
    d.get_num_new_matched_tokens("da", 16, 0, Some(&a));
    d.update_state_after_alloc("da", &[5], 16);
    d.update_connector_output(&[], &["da".into()]);
    d.tick(2005.0);
    assert_eq!(d.build_connector_meta().heartbeats[0].request_ids, vec!["pb".to_string()]);
    // "db" is aborted while still queued: P is told at once (a zero-block notification),
    // not at lease expiry, and heartbeats stop.
    assert!(!d.request_finished("db", &[], FinishReason::Aborted, 0, Some(&b), 2006.0).delay_free);
    let md = d.build_connector_meta();
    assert_eq!(md.reqs_to_recv.len(), 1);
    assert!(md.reqs_to_recv[0].notify_only && md.reqs_to_recv[0].remote.request_id == "pb");
    d.tick(2020.0);
    assert!(d.build_connector_meta().is_empty());
    // A finished, loaded request is not notified twice.
    d.request_finished("da", &[5], FinishReason::LengthCapped, 20, Some(&a), 2021.0);
    assert!(d.build_connector_meta().reqs_to_recv.is_empty());
}

#[test]
fn producer_worker_renews_leases_and_reports_how_they_ended() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let mut w = PullWorker::new("P".into(), 0, 1, "H".into(), true);
    for r in ["a", "b", "c"] {
        prefill(&mut p, r, &[1, 2]); // leased at 1000 for 30 s
    }
    w.on_metadata(p.build_connector_meta(), 1000.0);
    assert_eq!((w.base.held_requests(), w.base.held_blocks()), (3, 6));
    // Heartbeats at 1025 extend "a" to 1025 + 20 = 1045; "b" is not renewed.
    let hb = |ids: &[&str]| wire::HeartbeatRequest { request_ids: ids.iter().map(|s| s.to_string()).collect(), release: false };
    let r = w.base.on_heartbeat(&hb(&["a", "zzz"]), 1025.0, 20.0);
    assert_eq!(r.held, vec![("a".to_string(), 20.0)]);
    assert_eq!(r.unknown, vec!["zzz".to_string()]);
    let notif = Notif { version: WIRE_VERSION, request_id: "c".into(), from_engine: "D".into(), from_tp_rank: 0, ok: true, expected: 1 };
    w.base.on_notif(&notif.to_bytes().unwrap(), 1026.0);
    w.base.tick(1031.0);
    let f = w.base.take_finished();
    assert_eq!(f.sending, vec!["c".to_string(), "b".to_string()]);
    assert_eq!((w.base.held_requests(), w.base.held_blocks()), (1, 2));
    let r = w.base.on_heartbeat(&hb(&["a", "b", "c"]), 1031.0, 20.0);
    assert_eq!((r.held.len(), r.expired, r.released), (1, vec!["b".to_string()], vec!["c".to_string()]));
    w.base.tick(1052.0);
    assert_eq!(w.base.take_finished().sending, vec!["a".to_string()]);
    assert_eq!((w.base.expired_leases, w.base.released_leases, w.base.held_blocks()), (2, 1, 0));
}

#[test]
fn consumer_never_reads_blocks_whose_lease_ended() {
    // P's own expiry has passed (clocks in step): fail, tell P, no READ.
    let mut w = ready_worker(0, 0.0);
    let a = w.on_metadata(recv("d1", "r1", 0, 1005.0), 1010.0);
    assert!(matches!(&a[..], [Action::Notify { msg, .. }] if !Notif::from_bytes(msg).unwrap().ok), "{a:?}");
    let f = w.base.take_finished();
    assert_eq!((f.failed_recving, f.invalid_block_ids), (vec!["d1".to_string()], vec![1]));
    assert_eq!(w.stats.leases_lost, 1);
    // P's clock runs 100 s ahead: its expiry 1105 is our 1005.
    let mut w = ready_worker(0, 100.0);
    assert!(matches!(&w.on_metadata(recv("d1", "r1", 0, 1105.0), 1010.0)[..], [Action::Notify { .. }]));
    assert!(matches!(&w.on_metadata(recv("d2", "r2", 0, 1115.0), 1010.0)[..], [Action::Read { .. }]));
    // A heartbeat extended the lease past the params' expiry: read.
    let mut w = ready_worker(0, 0.0);
    let reply = wire::HeartbeatReply { held: vec![("r1".into(), 20.0)], ..Default::default() };
    w.on_heartbeat_reply(PEER, Ok(reply), 1004.0, 1004.1);
    assert!(matches!(&w.on_metadata(recv("d1", "r1", 0, 1005.0), 1010.0)[..], [Action::Read { .. }]));
    // A heartbeat said the lease expired: fail before reading...
    let reply = wire::HeartbeatReply { expired: vec!["r2".into()], ..Default::default() };
    w.on_heartbeat_reply(PEER, Ok(reply), 1011.0, 1011.1);
    assert!(matches!(&w.on_metadata(recv("d2", "r2", 0, 0.0), 1012.0)[..], [Action::Notify { .. }]));
    assert_eq!(w.base.take_finished().failed_recving, vec!["d2".to_string()]);
    // ...or, with the READ in flight, fail it even if it completes.
    let reply = wire::HeartbeatReply { expired: vec!["r1".into()], ..Default::default() };
    w.on_heartbeat_reply(PEER, Ok(reply), 1012.0, 1012.1);
    w.on_read_done("d1", &format!("{PEER}#0"), Ok(()), 1013.0);
    let f = w.base.take_finished();
    assert_eq!((f.recving, f.failed_recving), (vec!["d1".to_string()], vec!["d1".to_string()]));
    // Released on a reader's word (not expired) is not a loss.
    let reply = wire::HeartbeatReply { released: vec!["r3".into()], ..Default::default() };
    w.on_heartbeat_reply(PEER, Ok(reply), 1013.0, 1013.1);
    assert!(matches!(&w.on_metadata(recv("d3", "r3", 0, 0.0), 1014.0)[..], [Action::Read { .. }]));
}

#[test]
fn consumer_rehandshakes_a_restarted_prefill_engine_and_fails_its_old_requests() {
    let mut w = ready_worker(111, 0.0);
    // Same incarnation: read at once.
    assert!(matches!(&w.on_metadata(recv("d1", "r1", 111, 0.0), 1002.0)[..], [Action::Read { .. }]));
    // While that READ is in flight, an unknown incarnation does not tear the plan down.
    assert!(w.on_metadata(recv("d0", "r0", 999, 0.0), 1002.0).is_empty());
    assert_eq!(w.base.take_finished().failed_recving, vec!["d0".to_string()]);
    w.on_read_done("d1", &format!("{PEER}#0"), Ok(()), 1002.5);
    w.base.take_finished();
    // A request from an incarnation never met: forget the peer and handshake again.
    let a = w.on_metadata(recv("d2", "r2", 222, 0.0), 1003.0);
    assert!(matches!(&a[..], [Action::RemoveRemote { .. }, Action::Handshake { .. }]), "{a:?}");
    w.on_handshake_payload(PEER, 0, "x", Ok(payload_with("P", "H", 222, 1003.0, None)), 1003.0, 1003.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 1003.1);
    assert!(matches!(&a[..], [Action::Read { req_id, .. }] if req_id == "d2"), "{a:?}");
    // Old incarnation now: its blocks are gone, fail without a READ or a re-handshake.
    let a = w.on_metadata(recv("d3", "r3", 111, 0.0), 1004.0);
    assert!(a.is_empty(), "{a:?}");
    let f = w.base.take_finished();
    assert_eq!(f.failed_recving, vec!["d3".to_string()]);
    // A request prepared before a restart that the handshake reveals: fails after it.
    let mut w = ready_worker(111, 0.0);
    w.on_metadata(recv("d4", "r4", 333, 0.0), 1005.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload_with("P", "H", 444, 1005.0, None)), 1005.0, 1005.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 1005.1);
    assert!(matches!(&a[..], [Action::Notify { .. }]), "{a:?}");
    assert_eq!(w.base.take_finished().failed_recving, vec!["d4".to_string()]);
}

#[test]
fn idle_engines_are_forgotten_after_engine_ttl() {
    let mut w = ready_worker(0, 0.0);
    assert!(w.is_peer_ready(PEER));
    assert!(w.evict_idle(1500.0, 3600.0).is_empty());
    // A READ in flight keeps it.
    w.on_metadata(recv("d1", "r1", 0, 0.0), 1500.0);
    assert!(w.evict_idle(9000.0, 3600.0).is_empty());
    w.on_read_done("d1", &format!("{PEER}#0"), Ok(()), 1501.0);
    let a = w.evict_idle(9000.0, 3600.0);
    assert!(matches!(&a[..], [Action::RemoveRemote { .. }]));
    assert!(!w.is_peer_ready(PEER));
    assert_eq!(w.stats.engines_evicted, 1);
}

#[test]
fn incompatible_handshake_names_the_differing_fields() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    w.compat = CompatInfo { model: "m".into(), dtype: "bfloat16".into(), num_kv_heads: 2, ..Default::default() };
    w.mode = "pull".into();
    w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4], &[1], 0), 0.0);
    let theirs = CompatInfo { model: "m".into(), dtype: "float16".into(), num_kv_heads: 8, ..Default::default() };
    w.on_handshake_payload(PEER, 0, "x", Ok(payload_with("P", "OTHER", 0, 0.0, Some(theirs))), 0.0, 0.0);
    assert_eq!(w.base.take_finished().failed_recving, vec!["d1".to_string()]);
    assert_eq!(w.stats.handshakes_failed, 1);
}

/// vLLM's per-interval stats (`get_kv_connector_stats`) record what actually happened:
/// the handshake time, each READ's time, bytes and descriptors, and the failures, in the
/// keys of vLLM's `NixlKVConnectorStats`.
#[test]
fn worker_stats_record_transfers_handshakes_and_failures() {
    let (mut p, mut d) = (PullScheduler::new(cfg("kv_producer", "P")), PullScheduler::new(cfg("kv_consumer", "D")));
    let mut w = d_worker();
    assert!(w.base.xfer.take().is_empty());
    w.on_metadata(d_meta(&mut d, &mut p, "d1", &[4, 5, 9], &[1, 2, 3], 0), 10.0);
    w.on_handshake_payload(PEER, 0, "x", Ok(payload("P", "H", 32)), 10.0, 10.0);
    let a = w.on_remote_added(PEER, 0, Ok(()), 10.25);
    assert!(matches!(&a[..], [Action::Read { .. }]));
    w.mark_posted("d1", 10.25, 0.001);
    w.on_read_done("d1", &format!("{PEER}#0"), Ok(()), 10.75);
    let s = w.base.xfer.take();
    assert_eq!(s.handshake_duration, vec![0.25]);
    assert_eq!(s.transfer_duration, vec![0.5], "from the READ being issued to its completion");
    assert_eq!(s.post_duration, vec![0.001]);
    assert_eq!((s.bytes_transferred.clone(), s.num_descriptors.clone()), (vec![12 * 256], vec![8]));
    assert!(s.num_failed_transfers.is_empty() && s.num_failed_handshakes.is_empty());
    assert!(w.base.xfer.take().is_empty(), "taking empties the interval");

    // A failed READ and a failed handshake are counted, and nothing else is.
    w.on_metadata(d_meta(&mut d, &mut p, "d2", &[6], &[7], 0), 11.0);
    w.on_read_done("d2", &format!("{PEER}#0"), Err(kvbridge_core::error::TransportError::new("nixl", "peer died")), 11.5);
    let s = w.base.xfer.take();
    assert_eq!((s.num_failed_transfers, s.transfer_duration.len()), (vec![1], 0));
    w.on_metadata(d_meta(&mut d, &mut p, "d3", &[6], &[7], 0), 12.0);
    w.on_handshake_payload(PEER, 0, "h:1", Err(HandshakeError::Timeout { addr: "h:1".into(), timeout_ms: 5 }), 12.0, 12.0);
    let s = w.base.xfer.take();
    assert_eq!((s.num_failed_handshakes, s.handshake_duration.len()), (vec![1], 0));
}

/// P: an expired lease is vLLM's `num_kv_expired_reqs`; a reader finishing after that is
/// `num_notifications_after_expiry` (and is not kept as an early notification).
#[test]
fn producer_stats_count_expiries_and_late_notifications() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let mut w = PullWorker::new("P".into(), 0, 1, "H".into(), true);
    prefill(&mut p, "c", &[3]);
    w.on_metadata(p.build_connector_meta(), 1000.0);
    w.base.tick(1031.0);
    assert_eq!(w.base.take_finished().sending, vec!["c"]);
    let late = Notif { version: WIRE_VERSION, request_id: "c".into(), from_engine: "D".into(), from_tp_rank: 0, ok: true, expected: 1 };
    w.base.on_notif(&late.to_bytes().unwrap(), 1032.0);
    let s = w.base.xfer.take();
    assert_eq!((s.num_kv_expired_reqs, s.num_notifications_after_expiry), (vec![1], vec![1]));
    assert!(w.base.take_finished().sending.is_empty(), "reported free once");
}

/// D parses a request's params once, in `on_new_request`; the match reuses them only if
/// the text is the same, so params that changed in between are parsed (and checked) afresh.
#[test]
fn consumer_reuses_params_parsed_on_arrival_only_when_unchanged() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P"));
    let params = prefill(&mut p, "r1", &[10, 11]);
    let mut d = PullScheduler::new(cfg("kv_consumer", "D"));
    d.on_new_request("d1", Some(&params));
    let m = d.get_num_new_matched_tokens("d1", 32, 0, Some(&params));
    assert_eq!((m.num_tokens, m.load_async), (32, true));
    d.update_state_after_alloc("d1", &[1, 2], 32);
    assert_eq!(d.build_connector_meta().reqs_to_recv[0].remote.block_ids, vec![vec![10, 11]]);

    // Changed to something malformed after arrival: rejected, not served from the cache.
    d.on_new_request("d2", Some(&params));
    let m = d.get_num_new_matched_tokens("d2", 32, 0, Some(r#"{"do_remote_prefill": 5}"#));
    assert!(m.load_async, "a rejected request is failed through the load path");
    d.update_state_after_alloc("d2", &[3, 4], m.num_tokens);
    assert!(d.build_connector_meta().reqs_to_recv.is_empty(), "no READ for malformed params");
}

/// The `*_parsed` calls (params decoded once, the same `Arc` handed to every call, as the
/// Python binding does) decide exactly as the text calls: the same answers and the same
/// metadata, for D's whole lifecycle, a retry, an abort before allocation, a request aborted
/// while queued, malformed params, and P's producing requests.
#[test]
fn decoded_params_drive_the_scheduler_like_text() {
    use kvbridge_core::params::ReqParams;
    use std::sync::Arc;
    let p_params = prefill(&mut PullScheduler::new(cfg("kv_producer", "P")), "r1", &[3, 4, 5, 6]);
    let bad = r#"{"do_remote_prefill":true,"remote_engine_id":"P"}"#;
    for role in ["kv_consumer", "kv_producer", "kv_both"] {
        let (mut by_text, mut by_arc) = (PullScheduler::new(cfg(role, "D")), PullScheduler::new(cfg(role, "D")));
        let cases: [(&str, &str, bool, bool); 6] = [
            ("load", &p_params, true, false),
            ("retry", &p_params, false, true),
            ("queued-abort", &p_params, false, false),
            ("bad", bad, true, false),
            ("decode", DECODE, true, false),
            ("none", "{}", true, false),
        ];
        for (rid, text, alloc, rematch) in cases {
            let arc = Arc::new(ReqParams::from_json(text));
            let mut steps = Vec::new();
            by_text.on_new_request(rid, Some(text));
            by_arc.on_new_request_parsed(rid, Some(&arc));
            if rid != "queued-abort" {
                let a = by_text.get_num_new_matched_tokens(rid, 64, 16, Some(text));
                let b = by_arc.get_num_new_matched_tokens_parsed(rid, 64, 16, Some(&arc));
                assert_eq!(a, b, "{role} {rid}");
                if rematch {
                    let b2 = by_arc.get_num_new_matched_tokens_parsed(rid, 64, 16, Some(&arc));
                    assert_eq!(by_text.get_num_new_matched_tokens(rid, 64, 16, Some(text)), b2, "{role} {rid}");
                }
                if alloc {
                    by_text.update_state_after_alloc(rid, &[9, 10, 11], a.num_tokens);
                    by_arc.update_state_after_alloc(rid, &[9, 10, 11], b.num_tokens);
                    assert_eq!(
                        by_text.get_num_new_matched_tokens(rid, 64, 16, Some(text)),
                        by_arc.get_num_new_matched_tokens_parsed(rid, 64, 16, Some(&arc)),
                        "{role} {rid}: acted on once"
                    );
                }
            }
            steps.push((by_text.build_connector_meta(), by_arc.build_connector_meta()));
            by_text.update_connector_output(&[], &[rid.to_string()]);
            by_arc.update_connector_output(&[], &[rid.to_string()]);
            let a = by_text.request_finished(rid, &[9, 10, 11], FinishReason::LengthCapped, 64, Some(text), 5.0);
            let b = by_arc.request_finished_parsed(rid, &[9, 10, 11], FinishReason::LengthCapped, 64, Some(&arc), 5.0);
            let strip = |v: Option<serde_json::Value>| {
                v.map(|mut v| {
                    v.as_object_mut().map(|o| o.remove("remote_epoch"));
                    v
                })
            };
            assert_eq!((a.delay_free, strip(a.kv_transfer_params)), (b.delay_free, strip(b.kv_transfer_params)), "{role} {rid}");
            steps.push((by_text.build_connector_meta(), by_arc.build_connector_meta()));
            for (mut x, mut y) in steps {
                (x.epoch, y.epoch) = (0, 0);
                for s in x.reqs_to_send.iter_mut().chain(y.reqs_to_send.iter_mut()) {
                    s.expiry_unix = 0.0;
                }
                assert_eq!(format!("{x:?}"), format!("{y:?}"), "{role} {rid}");
            }
            assert_eq!(by_text.accounting()["loading_requests"], by_arc.accounting()["loading_requests"]);
            assert_eq!(by_text.accounting()["heartbeat_requests"], by_arc.accounting()["heartbeat_requests"]);
        }
    }
}
