//! Plan build and per-request piece computation, timed (used by benches/plan_vs_numpy.py).
//! `cargo run --release -p kvbridge-core --example plan_bench -- <layers> <blocks>` prints
//! one JSON line. The plan is pure, so the addresses are synthetic: no memory is touched.
use std::time::Instant;

use kvbridge_core::layout::{Axis, KvLayout, RegionKind, TensorInfo};
use kvbridge_core::plan::{GroupBlocks, TransferPlan};
use kvbridge_core::wire::AgentMetadata;

fn layout(layers: u64, n: u64, base: u64) -> KvLayout {
    // [n, 8 heads, 16 tokens, 256 bytes]: vLLM's [B, H, N, C], bf16.
    let t: Vec<TensorInfo> = (0..layers)
        .map(|i| {
            TensorInfo::labelled(
                &format!("l{i}"),
                base + i * (n * 65536 + 4096),
                &[n, 8, 16, 128],
                &[16384, 2048, 128, 1],
                &[Axis::Block, Axis::Head, Axis::Token, Axis::Dim],
                2,
                RegionKind::Attention,
                8,
            )
        })
        .collect();
    KvLayout::from_tensors(&t, n, 0, 1).expect("layout")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let a: Vec<u64> = std::env::args().skip(1).map(|x| x.parse().expect("integer")).collect();
    let (layers, n) = (a.first().copied().unwrap_or(32), a.get(1).copied().unwrap_or(1000));
    let l = layout(layers, n + 1, 1 << 40);
    let r = layout(layers, n + 1, 1 << 44);
    let md = AgentMetadata {
        engine_id: "p".into(),
        agent_name: "p".into(),
        tp_rank: 0,
        tp_size: 1,
        block_size: 16,
        blocks_per_logical: 1,
        regions: r.regions.clone(),
        nixl_md: vec![],
        staging_regions: vec![],
    };
    let reps = if n >= 100_000 { 5 } else { 20 };
    let build: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            let p = TransferPlan::build(&l, 1, 0, 16, std::slice::from_ref(&md), Some(0)).expect("plan");
            std::hint::black_box(&p);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    let plan = TransferPlan::build(&l, 1, 0, 16, std::slice::from_ref(&md), Some(0)).expect("plan");
    let contiguous: Vec<u32> = (1..=n as u32).collect();
    // Fragmented: a fixed pseudo-random permutation (no two neighbours adjacent in general).
    let mut frag = contiguous.clone();
    let mut x = 0x9E37_79B9u64;
    for i in (1..frag.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        frag.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut out = serde_json::json!({"layers": layers, "blocks": n, "build_s": median(build)});
    for (name, ids) in [("contiguous", &contiguous), ("fragmented", &frag)] {
        for coalesce in [true, false] {
            let g = [GroupBlocks { local: ids, remote: &contiguous }];
            let mut descs = 0;
            let times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t0 = Instant::now();
                    let t = plan.transfer(&g, n * 16, coalesce).expect("transfer");
                    descs = t.descriptors;
                    std::hint::black_box(&t);
                    t0.elapsed().as_secs_f64()
                })
                .collect();
            let k = format!("{name}_{}", if coalesce { "coalesced" } else { "per_block" });
            out[format!("{k}_s")] = median(times).into();
            out[format!("{k}_descs")] = descs.into();
        }
    }
    println!("{out}");
}
