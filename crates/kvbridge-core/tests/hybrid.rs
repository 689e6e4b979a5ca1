//! Hybrid models (vLLM's hybrid allocator: several KV-cache groups): the schedulers carry
//! each group's block ids on their own, a sliding-window group offers, loads and writes
//! only the blocks inside its window, and the plan reads a clipped group byte for byte
//! where its window needs it and refuses one clipped too far.
use std::sync::Arc;

use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::groups::KvGroupSpec;
use kvbridge_core::params::ReqParams;
use kvbridge_core::scheduler::{FinishReason, PullScheduler, PushScheduler, SchedulerSide};
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec};

/// 128-token blocks; group 0 full attention, group 1 a 256-token sliding window (3 blocks).
fn cfg(role: &str, engine: &str, mode: &str) -> ConnectorConfig {
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":7000,"transfer_mode":"{mode}","kv_integrity":"off"}}}}"#
    );
    let groups = vec![
        KvGroupSpec { kind: "attention".into(), sliding_window: 0, num_layers: 2, spec_blocks: 0, layout: String::new() },
        KvGroupSpec { kind: "attention".into(), sliding_window: 256, num_layers: 2, spec_blocks: 0, layout: String::new() },
    ];
    let compat = CompatInfo { model: "m".into(), block_size: 128, kv_groups: groups, ..Default::default() };
    ConnectorConfig::from_json(&json, EngineInfo { tp_size: 1, compat, ..Default::default() }, |_| None).unwrap()
}

const DECODE: &str = r#"{"do_remote_decode":true}"#;

#[test]
fn pull_offers_and_loads_each_group_with_sliding_windows_clipped() {
    // P: a 1000-token prompt (8 blocks); vLLM already swapped the sliding group's
    // out-of-window blocks for its null block 0.
    let mut p = PullScheduler::new(cfg("kv_producer", "P", "pull"));
    p.get_num_new_matched_tokens("r", 1000, 0, Some(DECODE));
    let full: Vec<u32> = (1..=8).collect();
    let swa = vec![0, 0, 0, 0, 0, 26, 27, 28];
    let decode = Arc::new(ReqParams::from_json(DECODE));
    let f = p.request_finished_groups("r", &[full.clone(), swa], FinishReason::LengthCapped, 1000, Some(&decode), 100.0);
    assert!(f.delay_free, "{f:?}");
    let params = f.kv_transfer_params.unwrap();
    assert_eq!(params["remote_block_ids"], serde_json::json!([full, [26, 27, 28]]), "P offers the window's 3 blocks only");
    let md = p.build_connector_meta();
    assert_eq!(md.reqs_to_send[0].num_blocks, 11, "the lease counts the blocks P holds: 8 + 3");

    // D: allocates the whole prompt in both groups; it loads group 1's window only.
    let mut d = PullScheduler::new(cfg("kv_consumer", "D", "pull"));
    let text = params.to_string();
    assert_eq!(d.get_num_new_matched_tokens("d", 1000, 0, Some(&text)).num_tokens, 1000);
    let local_full: Vec<u32> = (101..=108).collect();
    let local_swa: Vec<u32> = (201..=208).collect();
    d.update_state_after_alloc_groups("d", &[local_full.clone(), local_swa], 1000);
    let md = d.build_connector_meta();
    let r = &md.reqs_to_recv[0];
    assert_eq!(r.local_block_ids, vec![local_full, vec![206, 207, 208]]);
    assert_eq!(r.remote.block_ids, vec![full, vec![26, 27, 28]]);
    assert_eq!(r.num_tokens, 1000);
    assert!(!r.notify_only);
}

#[test]
fn one_group_keeps_the_single_list_calls() {
    let mut p = PullScheduler::new(cfg("kv_producer", "P", "pull"));
    p.get_num_new_matched_tokens("r", 300, 0, Some(DECODE));
    let f = p.request_finished("r", &[4, 5, 6], FinishReason::LengthCapped, 300, Some(DECODE), 100.0);
    assert_eq!(f.kv_transfer_params.unwrap()["remote_block_ids"], serde_json::json!([[4, 5, 6]]));
}

#[test]
fn push_registers_and_writes_each_group_with_sliding_windows_clipped() {
    let mut d = PushScheduler::new(cfg("kv_consumer", "D", "push"));
    let pp = r#"{"do_remote_prefill":true,"transfer_mode":"push","remote_engine_id":"P","remote_host":"127.0.0.1","remote_port":7000,"transfer_id":"t1"}"#;
    assert_eq!(d.get_num_new_matched_tokens("d", 1000, 0, Some(pp)).num_tokens, 1000);
    let local_full: Vec<u32> = (101..=108).collect();
    d.update_state_after_alloc_groups("d", &[local_full.clone(), (201..=208).collect()], 1000);
    let md = d.build_connector_meta();
    assert_eq!(md.push_register[0].local_block_ids, vec![local_full, vec![206, 207, 208]]);

    let mut p = PushScheduler::new(cfg("kv_producer", "P", "push"));
    let decode = r#"{"do_remote_decode":true,"transfer_mode":"push","transfer_id":"t1"}"#;
    p.get_num_new_matched_tokens("r", 1000, 0, Some(decode));
    let full: Vec<u32> = (1..=8).collect();
    // Layer-wise writes start with the prefill: out-of-window blocks are still real here.
    p.prefill_completing_groups("r", &[full.clone(), (21..=28).collect()], 1000);
    let md = p.build_connector_meta();
    assert_eq!(md.push_saves[0].block_ids, vec![full.clone(), vec![26, 27, 28]]);
    let f = p.request_finished_groups("r", &[full.clone(), vec![0, 0, 0, 0, 0, 26, 27, 28]], FinishReason::LengthCapped, 1000, None, 100.0);
    assert!(f.delay_free);
    let md = p.build_connector_meta();
    assert_eq!(md.push_finished[0].block_ids, vec![full, vec![26, 27, 28]]);
}

/// Apply a transfer's pieces as memcpys (P and D caches live in this process).
fn apply(t: &kvbridge_core::plan::RequestTransfer) {
    for read in &t.reads {
        for p in &read.pieces {
            // SAFETY: the plan keeps pieces inside the registered regions of the scenario's
            // live P and D buffers, which do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(p.remote as usize as *const u8, p.local as usize as *mut u8, p.len as usize) };
        }
    }
}

#[test]
fn the_plan_reads_a_clipped_window_byte_for_byte_and_refuses_one_clipped_too_far() {
    // Group 0: 2 full-attention layers; group 1: a sliding-window layer (5 tokens).
    let spec = Spec { swa_layers: 1, window: 5, ..Spec::dense(2, 2, 8, 4, 64, CacheLayout::Hnd) };
    let n = 22; // 6 blocks of 4; the window needs tokens 17..22 (blocks 4 and 5)
    let p_blocks = vec![(10..16).collect::<Vec<u32>>(), (20..26).collect()];
    let d_blocks = vec![(30..36).collect::<Vec<u32>>(), (40..46).collect()];
    let whole = Scenario::new(&spec, &spec, p_blocks.clone(), d_blocks.clone(), n);
    let md = [whole.p_metadata(0, vec![])];
    let plan = whole.plan(0, &md).unwrap();
    let all = plan.transfer(&whole.groups(), n, true).unwrap();

    // P offers group 1's last ceil(5 / 4) + 1 = 3 blocks, D loads into its last 3.
    let mut s = Scenario::new(&spec, &spec, p_blocks.clone(), d_blocks.clone(), n);
    s.p_blocks[1] = vec![23, 24, 25];
    s.d_blocks[1] = vec![43, 44, 45];
    let md = [s.p_metadata(0, vec![])];
    let plan = s.plan(0, &md).unwrap();
    let t = plan.transfer(&s.groups(), n, true).unwrap();
    assert!(t.bytes > 0);
    assert_eq!(t.bytes, all.bytes, "the window needs nothing from the clipped blocks");
    apply(&t);
    s.d[0].check(&s.d_blocks, n).unwrap();

    // Clipped to 1 block, P no longer covers the window: refused, not read short.
    s.p_blocks[1] = vec![25];
    assert!(plan.transfer(&s.groups(), n, true).is_err());
    // A full-attention group cannot be clipped.
    s.p_blocks[1] = vec![23, 24, 25];
    s.p_blocks[0] = (11..16).collect();
    assert!(plan.transfer(&s.groups(), n, true).is_err());
}

#[test]
fn d_refuses_a_window_p_computed_past_the_prompt() {
    // P ran 1100 tokens (max_tokens > 1): the tail of its sliding group is not the prompt's.
    let mut d = PullScheduler::new(cfg("kv_consumer", "D", "pull"));
    let params = r#"{"do_remote_prefill":true,"remote_engine_id":"P","remote_request_id":"r","remote_block_ids":[[1,2,3,4,5,6,7,8,9],[7,8,9]],"remote_host":"127.0.0.1","remote_port":7000,"remote_num_tokens":1100}"#;
    d.get_num_new_matched_tokens("d", 1000, 0, Some(params));
    d.update_state_after_alloc_groups("d", &[(101..=108).collect(), (206..=208).collect()], 0);
    let md = d.build_connector_meta();
    assert!(md.reqs_to_recv.is_empty());
    assert_eq!(md.reqs_failed.len(), 1, "{md:?}");
    assert!(md.reqs_failed[0].reason.contains("sliding-window"), "{:?}", md.reqs_failed[0]);
}

#[test]
fn a_peer_with_other_groups_or_another_speculator_is_refused_by_name() {
    use kvbridge_core::config::TransferMode;
    use kvbridge_core::wire::{compat_diff, compat_hash};
    let d = cfg("kv_consumer", "D", "pull").compat;
    let mut p = d.clone();
    assert_eq!(compat_hash(&p, TransferMode::Pull), compat_hash(&d, TransferMode::Pull));
    // A draft model's KV exists on D only: refused at handshake, naming the field.
    p.spec_decode = "eagle:tiny-eagle".into();
    assert_ne!(compat_hash(&p, TransferMode::Pull), compat_hash(&d, TransferMode::Pull));
    let diff = compat_diff(&d, &p);
    assert!(diff.len() == 1 && diff[0].starts_with("spec_decode:"), "{diff:?}");
    // Another window, or the model run without the hybrid allocator (one group).
    let mut p = d.clone();
    p.kv_groups[1].sliding_window = 512;
    assert!(compat_diff(&d, &p)[0].starts_with("kv_groups:"));
    p.kv_groups.clear();
    assert!(compat_diff(&d, &p)[0].starts_with("kv_groups:"));
}

#[test]
fn with_state_groups_d_loads_all_but_the_last_token_and_one_state_block() {
    // A NemotronH-like model: two Mamba groups (4096-token state blocks, 2 speculative scratch
    // blocks on D), one attention group of 128-token blocks.
    let json = r#"{"kv_role":"kv_consumer","engine_id":"D","kv_connector_extra_config":{"side_channel_host":"127.0.0.1","side_channel_port":7000,"kv_integrity":"off"}}"#;
    let state =
        |spec_blocks| KvGroupSpec { kind: "state".into(), sliding_window: 0, num_layers: 1, spec_blocks, layout: "MAMBA2/SD".into() };
    let attn = KvGroupSpec { kind: "attention".into(), sliding_window: 0, num_layers: 1, spec_blocks: 0, layout: String::new() };
    let compat = CompatInfo { model: "m".into(), block_size: 128, kv_groups: vec![state(2), state(2), attn], ..Default::default() };
    let mut d =
        PullScheduler::new(ConnectorConfig::from_json(json, EngineInfo { tp_size: 1, compat, ..Default::default() }, |_| None).unwrap());
    // P stopped one token short: it computed 699 of the 700 prompt tokens.
    let params = r#"{"do_remote_prefill":true,"remote_engine_id":"P","remote_request_id":"r","remote_block_ids":[[1],[2],[3,4,5,6,7,8]],"remote_host":"127.0.0.1","remote_port":7000,"remote_num_tokens":699}"#;
    let m = d.get_num_new_matched_tokens("d", 700, 0, Some(params));
    assert_eq!((m.num_tokens, m.load_async), (699, true), "D computes token 700 itself, from P's state");
    // vLLM hands D each state group's block plus its scratch blocks.
    d.update_state_after_alloc_groups("d", &[vec![11, 12, 13], vec![21, 22, 23], (31..=36).collect()], 699);
    let md = d.build_connector_meta();
    let r = &md.reqs_to_recv[0];
    assert_eq!(r.num_tokens, 699);
    assert_eq!(r.local_block_ids, vec![vec![11], vec![21], (31..=36).collect::<Vec<u32>>()], "the running-state block, not the scratch");
}
