//! Descriptor count and READ throughput with and without coalescing, for contiguous and
//! fragmented block ids, against raw NIXL moving the same bytes as one descriptor per
//! layer. Two agents in one process, UCX over loopback, DRAM. Prints one JSON line per
//! case (used by benches/plan_vs_numpy.py). Needs the NIXL runtime (KVBRIDGE_NIXL_LIB_DIR).
use std::time::{Duration, Instant};

use kvbridge_core::plan::{GroupBlocks, Piece};
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec};
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_nixl::{NixlOptions, NixlTransport};

fn main() {
    let blocks: u32 = std::env::args().nth(1).and_then(|x| x.parse().ok()).unwrap_or(256);
    let reps = 15;
    let spec = Spec {
        layers: 8,
        total_heads: 8,
        content: 256,
        tp_size: 1,
        tp_rank: 0,
        block_tokens: 16,
        blocks_per_logical: 1,
        num_blocks: blocks * 2 + 2,
        layout: CacheLayout::Hnd,
        mla: false,
        swa_layers: 0,
        window: 0,
        state_layers: 0,
        state_bytes: 0,
        first_layer: 0,
    };
    let contiguous: Vec<u32> = (1..=blocks).collect();
    let mut frag: Vec<u32> = (1..=blocks).map(|i| i * 2).collect(); // every other block: no two adjacent
    frag.reverse();
    let n = u64::from(blocks) * 16;
    let s = Scenario::new(&spec, &spec, vec![contiguous.clone()], vec![contiguous.clone()], n);
    let opts = NixlOptions::default();
    let mut p = NixlTransport::new("bench-p", &opts).expect("P agent (is the NIXL runtime installed?)");
    p.register(&s.p[0].layout()).expect("register");
    let mut md = s.p_metadata(0, p.local_metadata().expect("md"));
    md.agent_name = "bench-p".into();
    let mut d = NixlTransport::new("bench-d", &opts).expect("D agent");
    d.register(&s.d[0].layout()).expect("register");
    d.add_remote("P", &md).expect("load P");
    let plan = s.plan(0, std::slice::from_ref(&md)).expect("plan");

    let mut run = |pieces: &[Piece]| -> (f64, f64) {
        let (mut post, mut total) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            let x = d.read("P", pieces, b"bench").expect("post");
            let t1 = t0.elapsed().as_secs_f64();
            let deadline = Instant::now() + Duration::from_secs(60);
            while d.poll(x).expect("poll") == XferPoll::Pending {
                assert!(Instant::now() < deadline, "READ stuck");
                std::hint::spin_loop();
            }
            total.push(t0.elapsed().as_secs_f64());
            post.push(t1);
            d.release(x);
            let _ = p.take_notifs();
        }
        post.sort_by(|a, b| a.total_cmp(b));
        total.sort_by(|a, b| a.total_cmp(b));
        (post[reps / 2], total[reps / 2])
    };
    for (name, local) in [("contiguous", &contiguous), ("fragmented", &frag)] {
        for coalesce in [true, false] {
            let g = [GroupBlocks { local, remote: &contiguous }];
            let t = plan.transfer(&g, n, coalesce).expect("transfer");
            let pieces = &t.reads[0].pieces;
            let (post_s, total_s) = run(pieces);
            println!(
                "{}",
                serde_json::json!({"case": format!("{name}/{}", if coalesce { "coalesced" } else { "per-block" }),
                    "bytes": t.bytes, "descriptors": pieces.len(), "post_s": post_s, "total_s": total_s,
                    "gib_s": t.bytes as f64 / total_s / (1u64 << 30) as f64})
            );
        }
    }
    // Raw NIXL: the same bytes as one descriptor per layer (what a hand-written transfer
    // of contiguous memory would post).
    // Built by hand from the registered regions, not by the plan.
    let (lr, rr) = (s.d[0].layout().regions, s.p[0].layout().regions);
    let raw: Vec<Piece> = lr
        .iter()
        .zip(&rr)
        .map(|(l, r)| Piece {
            local: l.block_addr(1),
            remote: r.block_addr(1),
            len: u64::from(blocks) * l.block_len,
            local_dev: 0,
            remote_dev: 0,
        })
        .collect();
    let bytes: u64 = raw.iter().map(|p| p.len).sum();
    let (post_s, total_s) = run(&raw);
    println!(
        "{}",
        serde_json::json!({"case": "raw-nixl/one-per-layer", "bytes": bytes, "descriptors": raw.len(),
            "post_s": post_s, "total_s": total_s, "gib_s": bytes as f64 / total_s / (1u64 << 30) as f64})
    );
}
