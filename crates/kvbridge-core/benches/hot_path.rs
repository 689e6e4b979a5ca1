//! Per-request costs on the connector's hot path, with no I/O: what the scheduler and
//! worker do for one 2048-token request (16 blocks of 128 tokens, 4 layers) once a peer's
//! plan exists. `cargo bench -p kvbridge-core`.
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
