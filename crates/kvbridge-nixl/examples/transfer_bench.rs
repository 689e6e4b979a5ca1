//! KV transfer throughput: kvbridge vs raw NIXL vs memcpy, for KV-shaped caches.
//!
//! Caches: 32 layers, K and V as separate regions (`[2, B, T, H, C/2]`), 16-token blocks,
//! 8 heads x 256 content bytes, so one block is 1 MiB over all layers. Requests of
//! 1 MiB .. 1 GiB (1 .. 1024 blocks), with contiguous block ids and fragmented ones (every
//! other block, reversed: no two adjacent). Two NIXL agents in one process, UCX over
//! loopback, DRAM.
//!
//! - `kvbridge`: what the D worker does per request: `TransferPlan::transfer` (descriptors
//!   for the block ids), then `NixlTransport::read` (descriptor lists, transfer request,
//!   post) and polling to completion.
//! - `raw-nixl-same-descs`: kvbridge's descriptors for the request, but the NIXL transfer
//!   request made once (untimed) and re-posted: NIXL's floor for the same memory, so the
//!   ratio to it is kvbridge's own per-request cost.
//! - `raw-nixl`: the same agents and bytes as one descriptor between two extra registered
//!   buffers, the transfer request made once and re-posted: NIXL's floor for contiguous memory.
//! - `nixl-prepped-per-block`: vLLM NixlConnector's method in Rust: one descriptor per
//!   (region, block) on each side, prepared once per peer (`prepare_xfer_dlist`, untimed),
//!   then per request `make_xfer_req` with the request's descriptor indices, post, poll.
//! - `memcpy`: kvbridge's pieces copied by the CPU in this process (no NIXL).
//!
//! Prints one JSON object per (size, ids, method) with the median and max seconds over
//! the repetitions. Used by `benches/transfer.py`. Needs the NIXL runtime
//! (`KVBRIDGE_NIXL_LIB_DIR`). Args: `[max_blocks (1024)] [reps (scaled per size)]`.
use std::time::{Duration, Instant};

use kvbridge_core::plan::{GroupBlocks, Piece};
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec};
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_nixl::{NixlOptions, NixlTransport};
use nixl_sys::{MemType, SystemStorage, XferDescList, XferOp, XferStatus};

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

/// Post `req` (made once) `reps` times, each to completion; seconds per repetition.
fn repost(d: &NixlTransport, req: &nixl_sys::XferRequest, reps: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        d.agent().post_xfer_req(req, None).expect("raw post");
        let deadline = Instant::now() + Duration::from_secs(120);
        while d.agent().get_xfer_status(req).expect("status") == XferStatus::InProgress {
            assert!(Instant::now() < deadline, "raw READ stuck");
            std::hint::spin_loop();
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    times
}

fn main() {
    let max_blocks: u32 = std::env::args().nth(1).and_then(|x| x.parse().ok()).unwrap_or(1024);
    let reps_arg: Option<usize> = std::env::args().nth(2).and_then(|x| x.parse().ok());
    let spec = Spec {
        layers: 32,
        total_heads: 8,
        content: 256,
        tp_size: 1,
        tp_rank: 0,
        block_tokens: 16,
        blocks_per_logical: 1,
        num_blocks: max_blocks * 2 + 2,
        layout: CacheLayout::KvSplitNhd,
        mla: false,
        swa_layers: 0,
        window: 0,
        state_layers: 0,
        state_bytes: 0,
        first_layer: 0,
    };
    let s = Scenario::new(&spec, &spec, vec![vec![1]], vec![vec![1]], 16);
    let opts = NixlOptions::default();
    let mut p = NixlTransport::new("xfer-bench-p", &opts).expect("P agent (is the NIXL runtime installed?)");
    let mut d = NixlTransport::new("xfer-bench-d", &opts).expect("D agent");
    p.register(&s.p[0].layout()).expect("register P");
    d.register(&s.d[0].layout()).expect("register D");
    // The raw baseline's buffers, registered on the same agents before P's metadata is taken.
    let raw_bytes = max_blocks as usize * (1 << 20);
    let raw_p = SystemStorage::new(raw_bytes).expect("alloc");
    let raw_d = SystemStorage::new(raw_bytes).expect("alloc");
    let _reg_p = p.agent().register_memory(&raw_p, None).expect("register raw P");
    let _reg_d = d.agent().register_memory(&raw_d, None).expect("register raw D");
    let mut md = s.p_metadata(0, p.local_metadata().expect("md"));
    md.agent_name = "xfer-bench-p".into();
    // First contact's NIXL part: loading P's agent metadata (UCX endpoint wire-up).
    let t0 = Instant::now();
    d.add_remote("P", &md).expect("load P");
    println!("{}", serde_json::json!({"method": "load_remote_md", "ms": t0.elapsed().as_secs_f64() * 1e3}));
    let plan = s.plan(0, std::slice::from_ref(&md)).expect("plan");
    let remote_agent = d.remote_agent("P").expect("loaded").to_string();
    let (p_base, d_base) = (raw_p.as_slice().as_ptr() as usize, raw_d.as_slice().as_ptr() as usize);
    let p_regions = s.p[0].layout().regions;
    let d_regions = s.d[0].layout().regions;
    // Prepared per-block lists (NixlConnector's scheme): descriptor r * n + b is block b
    // of region r; regions pair up by index (equal layouts here).
    let n_blocks = u64::from(spec.num_blocks);
    let prep = |regions: &[kvbridge_core::layout::Region], agent: &str| {
        let mut l = XferDescList::new(MemType::Dram).expect("dlist");
        for r in regions {
            for b in 0..n_blocks {
                l.add_desc(r.block_addr(b) as usize, r.block_len as usize, 0);
            }
        }
        d.agent().prepare_xfer_dlist(agent, &l, None).expect("prep dlist")
    };
    let prepped_local = prep(&d_regions, "");
    let prepped_remote = prep(&p_regions, &remote_agent);

    let mut blocks = 1u32;
    while blocks <= max_blocks {
        let reps = reps_arg.unwrap_or(if blocks <= 16 {
            40
        } else if blocks <= 128 {
            15
        } else {
            6
        });
        let bytes_req = u64::from(blocks) << 20;
        let contiguous: Vec<u32> = (1..=blocks).collect();
        let mut frag: Vec<u32> = (1..=blocks).map(|i| i * 2).collect();
        frag.reverse();
        for (ids_name, local) in [("contiguous", &contiguous), ("fragmented", &frag)] {
            let n_tokens = u64::from(blocks) * 16;
            // kvbridge: plan + post + poll, per request.
            let mut times = Vec::with_capacity(reps);
            let mut descs = 0;
            for _ in 0..reps {
                let t0 = Instant::now();
                let g = [GroupBlocks { local, remote: &contiguous }];
                let t = plan.transfer(&g, n_tokens, true).expect("transfer");
                let pieces = &t.reads[0].pieces;
                descs = pieces.len();
                assert_eq!(t.bytes, bytes_req, "request bytes");
                let x = d.read("P", pieces, b"").expect("post");
                let deadline = Instant::now() + Duration::from_secs(120);
                while d.poll(x).expect("poll") == XferPoll::Pending {
                    assert!(Instant::now() < deadline, "READ stuck");
                    std::hint::spin_loop();
                }
                times.push(t0.elapsed().as_secs_f64());
                d.release(x);
            }
            let (med, max) = stats(times);
            println!(
                "{}",
                serde_json::json!({"method": "kvbridge", "ids": ids_name, "bytes": bytes_req, "descriptors": descs,
                    "reps": reps, "median_s": med, "max_s": max})
            );
            // Raw NIXL on the same pieces: kvbridge's descriptors, but the transfer request
            // made once (outside the timing) and re-posted: the NIXL floor for this memory.
            {
                let g = [GroupBlocks { local, remote: &contiguous }];
                let t = plan.transfer(&g, n_tokens, true).expect("transfer");
                let mut ld = XferDescList::new(MemType::Dram).expect("dlist");
                let mut rd = XferDescList::new(MemType::Dram).expect("dlist");
                for pc in &t.reads[0].pieces {
                    ld.add_desc(pc.local as usize, pc.len as usize, 0);
                    rd.add_desc(pc.remote as usize, pc.len as usize, 0);
                }
                let req = d.agent().create_xfer_req(XferOp::Read, &ld, &rd, &remote_agent, None).expect("raw request");
                let (med, max) = stats(repost(&d, &req, reps));
                drop(req);
                println!(
                    "{}",
                    serde_json::json!({"method": "raw-nixl-same-descs", "ids": ids_name, "bytes": bytes_req,
                        "descriptors": t.reads[0].pieces.len(), "reps": reps, "median_s": med, "max_s": max})
                );
            }
            // NixlConnector's scheme: prepared per-block lists, indices per request.
            {
                let mut times = Vec::with_capacity(reps);
                let mut n_idx = 0;
                for _ in 0..reps {
                    let t0 = Instant::now();
                    let mut li = Vec::with_capacity(local.len() * d_regions.len());
                    let mut ri = Vec::with_capacity(local.len() * d_regions.len());
                    for r in 0..d_regions.len() as u64 {
                        for (&lb, &rb) in local.iter().zip(&contiguous) {
                            li.push((r * n_blocks + u64::from(lb)) as i32);
                            ri.push((r * n_blocks + u64::from(rb)) as i32);
                        }
                    }
                    n_idx = li.len();
                    let req = d
                        .agent()
                        .make_xfer_req(XferOp::Read, &prepped_local, &li, &prepped_remote, &ri, None)
                        .expect("make prepped request");
                    d.agent().post_xfer_req(&req, None).expect("post prepped");
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while d.agent().get_xfer_status(&req).expect("status") == XferStatus::InProgress {
                        assert!(Instant::now() < deadline, "prepped READ stuck");
                        std::hint::spin_loop();
                    }
                    drop(req);
                    times.push(t0.elapsed().as_secs_f64());
                }
                let (med, max) = stats(times);
                println!(
                    "{}",
                    serde_json::json!({"method": "nixl-prepped-per-block", "ids": ids_name, "bytes": bytes_req,
                        "descriptors": n_idx, "reps": reps, "median_s": med, "max_s": max})
                );
            }
            // memcpy of the same pieces (P's memory → D's), in this process.
            let g = [GroupBlocks { local, remote: &contiguous }];
            let t = plan.transfer(&g, n_tokens, true).expect("transfer");
            let pieces: Vec<Piece> = t.reads[0].pieces.clone();
            // Every remote address must lie in P's registered regions (as NIXL checks).
            for pc in &pieces {
                let ok = p_regions.iter().any(|r| pc.remote >= r.base && pc.remote + pc.len <= r.base + r.span());
                assert!(ok, "piece outside P's regions");
            }
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                let t0 = Instant::now();
                for pc in &pieces {
                    // SAFETY: both ranges lie inside the two caches' live buffers (checked
                    // above for P; the plan checks D's) and the caches do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(pc.remote as *const u8, pc.local as *mut u8, pc.len as usize) };
                }
                times.push(t0.elapsed().as_secs_f64());
            }
            let (med, max) = stats(times);
            println!(
                "{}",
                serde_json::json!({"method": "memcpy", "ids": ids_name, "bytes": bytes_req, "descriptors": pieces.len(),
                    "reps": reps, "median_s": med, "max_s": max})
            );
        }
        // Raw NIXL: one descriptor, request made once, re-posted.
        let mut local = XferDescList::new(MemType::Dram).expect("dlist");
        let mut remote = XferDescList::new(MemType::Dram).expect("dlist");
        local.add_desc(d_base, bytes_req as usize, 0);
        remote.add_desc(p_base, bytes_req as usize, 0);
        let req = d.agent().create_xfer_req(XferOp::Read, &local, &remote, &remote_agent, None).expect("raw request");
        let (med, max) = stats(repost(&d, &req, reps));
        drop(req);
        println!(
            "{}",
            serde_json::json!({"method": "raw-nixl", "ids": "one-descriptor", "bytes": bytes_req, "descriptors": 1,
                "reps": reps, "median_s": med, "max_s": max})
        );
        blocks *= 4;
    }
    println!("{}", serde_json::json!({"method": "kvbridge-requests", "prepared": d.made_prepped, "listed": d.made_listed}));
}
