//! Per-request costs on the connector's hot path, with no I/O: what the scheduler and
//! worker do for one 2048-token request (16 blocks of 128 tokens, 4 layers) once a peer's
//! plan exists, a whole decode-side scheduler step with 1, 64 and 512 requests in flight,
//! and metadata encode/decode. `cargo bench -p kvbridge-core`.
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::layout::{Axis, KvLayout, RegionKind, TensorInfo};
use kvbridge_core::params::KvParams;
use kvbridge_core::plan::{GroupBlocks, TransferPlan};
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::wire::{AgentMetadata, ConnectorMetadata};

/// vLLM's CPU cache: 4 layers of `[n, 2 heads, 128 tokens, 128]` bf16, axes labelled.
fn layout(n: u64) -> KvLayout {
    let t: Vec<TensorInfo> = (0..4u64)
        .map(|i| {
            TensorInfo::labelled(
                &format!("l{i}"),
                (i + 1) << 32,
                &[n, 2, 128, 128],
                &[32768, 16384, 128, 1],
                &[Axis::Block, Axis::Head, Axis::Token, Axis::Dim],
                2,
                RegionKind::Attention,
                2,
            )
        })
        .collect();
    KvLayout::from_tensors(&t, n, 0, 1).unwrap()
}

fn cfg(role: &str) -> ConnectorConfig {
    ConnectorConfig::from_json(
        &format!(r#"{{"kv_role":"{role}","engine_id":"e"}}"#),
        EngineInfo { tp_size: 1, compat: CompatInfo::default(), ..Default::default() },
        |_| None,
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let l = layout(4096);
    let md = AgentMetadata {
        engine_id: "p".into(),
        agent_name: "p".into(),
        tp_rank: 0,
        tp_size: 1,
        block_size: 128,
        blocks_per_logical: 1,
        regions: l.regions.clone(),
        nixl_md: vec![0; 4096],
        staging_regions: vec![],
    };
    let plan = TransferPlan::build(&l, 1, 0, 128, std::slice::from_ref(&md), Some(0)).unwrap();
    let local: Vec<u32> = (100..116).collect();
    let remote: Vec<u32> = (0..16).map(|i| 3000 - 7 * i).collect();
    let gb = [GroupBlocks { local: &local, remote: &remote }];
    c.bench_function("plan_transfer_16_blocks_4_layers", |b| b.iter(|| plan.transfer(&gb, 2048, true).unwrap()));
    c.bench_function("plan_build_4096_blocks", |b| {
        b.iter(|| TransferPlan::build(&l, 1, 0, 128, std::slice::from_ref(&md), Some(0)).unwrap())
    });

    let mut p = PullScheduler::new(cfg("kv_producer"));
    let params = p
        .request_finished("r", &remote, FinishReason::LengthCapped, 2048, Some(r#"{"do_remote_decode":true}"#), 0.0)
        .kv_transfer_params
        .unwrap()
        .to_string();
    c.bench_function("parse_kv_transfer_params", |b| b.iter(|| KvParams::parse_json(Some(&params)).unwrap()));
    c.bench_function("consumer_schedule_request_and_build_meta", |b| {
        b.iter_batched(
            || PullScheduler::new(cfg("kv_consumer")),
            |mut d| {
                let m = d.get_num_new_matched_tokens("d", 2048, 0, Some(&params));
                d.update_state_after_alloc("d", &local, m.num_tokens);
                d.build_connector_meta().to_bytes().unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    let mut d = PullScheduler::new(cfg("kv_consumer"));
    let m = d.get_num_new_matched_tokens("d", 2048, 0, Some(&params));
    d.update_state_after_alloc("d", &local, m.num_tokens);
    let bytes = d.build_connector_meta().to_bytes().unwrap();
    c.bench_function("decode_connector_metadata", |b| b.iter(|| ConnectorMetadata::from_bytes(&bytes).unwrap()));

    // One engine step on the decode side with `n` requests in flight (steady state: one
    // arrives, one finishes loading and ends): match + allocate the new one, build and
    // encode the step's metadata (with heartbeats for the waiting ones), take the
    // finished load, end the oldest request.
    for n in [1usize, 64, 512] {
        let mut d = PullScheduler::new(cfg("kv_consumer"));
        let mut q = std::collections::VecDeque::new();
        let mut next = 0u64;
        let mut add = |d: &mut PullScheduler, q: &mut std::collections::VecDeque<String>| {
            let id = format!("d{next}");
            next += 1;
            let m = d.get_num_new_matched_tokens(&id, 2048, 0, Some(&params));
            d.update_state_after_alloc(&id, &local, m.num_tokens);
            q.push_back(id);
        };
        for _ in 0..n {
            add(&mut d, &mut q);
        }
        d.build_connector_meta();
        let mut now = 0.0;
        c.bench_function(&format!("consumer_step_{n}_in_flight"), |b| {
            b.iter(|| {
                add(&mut d, &mut q);
                now += 0.01;
                d.tick(now);
                let bytes = d.build_connector_meta().to_bytes().unwrap();
                let done = q.pop_front().unwrap();
                d.update_connector_output(&[], std::slice::from_ref(&done));
                d.request_finished(&done, &local, FinishReason::LengthCapped, 2048, Some(&params), now);
                bytes
            })
        });
    }
    let mut d = PullScheduler::new(cfg("kv_consumer"));
    for i in 0..64 {
        let id = format!("m{i}");
        let m = d.get_num_new_matched_tokens(&id, 2048, 0, Some(&params));
        d.update_state_after_alloc(&id, &local, m.num_tokens);
    }
    let md64 = d.build_connector_meta();
    c.bench_function("encode_connector_metadata_64_requests", |b| b.iter(|| md64.to_bytes().unwrap()));
    let bytes64 = md64.to_bytes().unwrap();
    c.bench_function("decode_connector_metadata_64_requests", |b| b.iter(|| ConnectorMetadata::from_bytes(&bytes64).unwrap()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
