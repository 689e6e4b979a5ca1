//! `kv_integrity`'s cost against the transfer it checks, on DRAM, and the corruptions it
//! catches.
//!
//! Caches as `transfer_bench`'s (32 layers, K and V regions, 16-token blocks, 1 MiB per
//! block over all layers); two NIXL agents in one process, UCX over loopback. For requests
//! of 16, 64 and 256 blocks: the kvbridge READ (plan, post, poll), D's digest of what
//! landed (every block: `full`; one in eight: `sampled`), P's digest of its blocks, with
//! the digests compared (equal: the READ moved P's bytes). Then each corruption the test
//! hook injects (garbage, swapped pair, stale block, shifted blocks), at every block
//! index of a 16-block request, against `full` and `sampled`.
//!
//! Prints one JSON object per line; `benches/integrity.py` writes
//! `benches/results/integrity.json`. Args: `[reps (9)]`.
use std::time::{Duration, Instant};

use kvbridge_core::integrity::{self, compare, DigestSet, Expect, IntegrityMode, Verdict};
use kvbridge_core::layout::KvLayout;
use kvbridge_core::plan::GroupBlocks;
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec};
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_driver::worker::integrity::{digest_blocks, sigs};
use kvbridge_nixl::{NixlOptions, NixlTransport};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// P's digest set for `blocks` under `mode`.
fn digest_set(l: &KvLayout, blocks: &[u32], mode: IntegrityMode) -> DigestSet {
    let checked = integrity::chosen(mode, "bench-request", blocks.len(), integrity::DEFAULT_SAMPLE_EVERY);
    let ids: Vec<u32> = checked.iter().map(|&i| blocks[i]).collect();
    let digests: Vec<u32> = digest_blocks(l, &ids).expect("digest").into_iter().flatten().collect();
    DigestSet {
        missing: None,
        tp_size: 1,
        blocks_per_logical: l.blocks_per_logical,
        regions: sigs(l),
        offered: blocks.to_vec(),
        checked: checked.iter().map(|&i| i as u32).collect(),
        digests,
        group_lens: Vec::new(),
    }
}

/// D's check of `local` against `set`: the verdict.
fn check(l: &KvLayout, local: &[u32], set: &DigestSet) -> Verdict {
    let e = Expect {
        key: "bench-request".into(),
        local: local.to_vec(),
        num_tokens: 0,
        offered: None,
        host: String::new(),
        port: 0,
        group_lens: vec![],
        clipped: vec![],
    };
    let pairs = integrity::pairs(&e, set, &sigs(l), l.blocks_per_logical, 1, 0).expect("comparable");
    let ids: Vec<u32> = pairs.iter().map(|p| p.0).collect();
    let got = digest_blocks(l, &ids).expect("digest");
    compare(set, &pairs, &got)
}

fn block_ranges(l: &KvLayout, b: u32) -> Vec<(usize, usize)> {
    l.regions.iter().map(|r| (r.block_addr(u64::from(b)) as usize, r.block_len as usize)).collect()
}
fn read_block(l: &KvLayout, b: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for (a, n) in block_ranges(l, b) {
        v.extend_from_slice(unsafe { std::slice::from_raw_parts(a as *const u8, n) });
    }
    v
}
fn write_block(l: &KvLayout, b: u32, bytes: &[u8]) {
    let mut off = 0;
    for (a, n) in block_ranges(l, b) {
        unsafe { std::ptr::copy_nonoverlapping(bytes[off..off + n].as_ptr(), a as *mut u8, n) };
        off += n;
    }
}

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|x| x.parse().ok()).unwrap_or(9);
    let max_blocks = 256u32;
    let spec = Spec {
        layers: 32,
        total_heads: 8,
        content: 256,
        tp_size: 1,
        tp_rank: 0,
        block_tokens: 16,
        blocks_per_logical: 1,
        num_blocks: max_blocks + 2,
        layout: CacheLayout::KvSplitNhd,
        mla: false,
        swa_layers: 0,
        window: 0,
        state_layers: 0,
        state_bytes: 0,
        first_layer: 0,
    };
    let all: Vec<u32> = (1..=max_blocks).collect();
    let mut s = Scenario::new(&spec, &spec, vec![all.clone()], vec![all.clone()], u64::from(max_blocks) * 16);
    s.p[0].fill(&[all.clone()], u64::from(max_blocks) * 16);
    let opts = NixlOptions::default();
    let mut p = NixlTransport::new("integrity-bench-p", &opts).expect("P agent (is the NIXL runtime installed?)");
    let mut d = NixlTransport::new("integrity-bench-d", &opts).expect("D agent");
    let (pl, dl) = (s.p[0].layout(), s.d[0].layout());
    p.register(&pl).expect("register P");
    d.register(&dl).expect("register D");
    let mut md = s.p_metadata(0, p.local_metadata().expect("md"));
    md.agent_name = "integrity-bench-p".into();
    d.add_remote("P", &md).expect("load P");
    let plan = s.plan(0, std::slice::from_ref(&md)).expect("plan");
    for blocks in [16u32, 64, 256] {
        let ids: Vec<u32> = (1..=blocks).collect();
        let n_tokens = u64::from(blocks) * 16;
        let (mut read, mut d_full, mut d_sampled, mut p_full, mut p_sampled) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            // D's landing area zeroed, so equal digests show the READ moved P's bytes.
            for &b in &ids {
                write_block(&dl, b, &vec![0u8; 1 << 20]);
            }
            let t0 = Instant::now();
            let t = plan.transfer(&[GroupBlocks { local: &ids, remote: &ids }], n_tokens, true).expect("transfer");
            let x = d.read("P", &t.reads[0].pieces, b"").expect("post");
            let deadline = Instant::now() + Duration::from_secs(120);
            while d.poll(x).expect("poll") == XferPoll::Pending {
                assert!(Instant::now() < deadline, "READ stuck");
                std::hint::spin_loop();
            }
            read.push(t0.elapsed().as_secs_f64());
            d.release(x);
            for (mode, p_t, d_t) in
                [(IntegrityMode::Full, &mut p_full, &mut d_full), (IntegrityMode::Sampled, &mut p_sampled, &mut d_sampled)]
            {
                let t0 = Instant::now();
                let set = digest_set(&pl, &ids, mode);
                p_t.push(t0.elapsed().as_secs_f64());
                let t0 = Instant::now();
                let v = check(&dl, &ids, &set);
                d_t.push(t0.elapsed().as_secs_f64());
                assert!(matches!(v, Verdict::Pass { .. }), "the READ must land P's bytes: {v:?}");
            }
        }
        let r = median(read);
        println!(
            "{}",
            serde_json::json!({"blocks": blocks, "mib": blocks, "reps": reps, "read_s": r,
                "d_full_s": median(d_full.clone()), "d_sampled_s": median(d_sampled.clone()),
                "p_full_s": median(p_full.clone()), "p_sampled_s": median(p_sampled.clone()),
                "full_cost_ratio": (r + median(d_full)) / r, "sampled_cost_ratio": (r + median(d_sampled)) / r,
                "p_full_ratio": median(p_full) / r})
        );
    }
    // Corruptions of a landed 16-block request, every kind at every index it applies to.
    let ids: Vec<u32> = (1..=16).collect();
    let t = plan.transfer(&[GroupBlocks { local: &ids, remote: &ids }], 256, true).expect("transfer");
    let x = d.read("P", &t.reads[0].pieces, b"").expect("post");
    while d.poll(x).expect("poll") == XferPoll::Pending {
        std::hint::spin_loop();
    }
    d.release(x);
    let stale = read_block(&dl, 200); // a block of an "earlier request" (P's pattern at 200 is never read here)
    let stale = if stale.iter().all(|&b| b == 0) { read_block(&pl, 200) } else { stale };
    for mode in [IntegrityMode::Full, IntegrityMode::Sampled] {
        let set = digest_set(&pl, &ids, mode);
        let (mut injected, mut caught) = (0, 0);
        for kind in ["garbage", "swap", "stale", "shift"] {
            for i in 0..ids.len() {
                let saved: Vec<Vec<u8>> = ids.iter().map(|&b| read_block(&dl, b)).collect();
                let b = ids[i];
                match kind {
                    "garbage" => {
                        write_block(&dl, b, &(0..1u32 << 20).map(|k| (k.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>())
                    }
                    "swap" if i + 1 < ids.len() => {
                        write_block(&dl, b, &saved[i + 1]);
                        write_block(&dl, ids[i + 1], &saved[i]);
                    }
                    "stale" => write_block(&dl, b, &stale),
                    "shift" if i + 1 < ids.len() => {
                        for k in i + 1..ids.len() {
                            write_block(&dl, ids[k], &saved[k - 1]);
                        }
                    }
                    _ => continue,
                }
                injected += 1;
                if matches!(check(&dl, &ids, &set), Verdict::Mismatch(_)) {
                    caught += 1;
                }
                for (k, &b) in ids.iter().enumerate() {
                    write_block(&dl, b, &saved[k]);
                }
            }
        }
        println!("{}", serde_json::json!({"corruptions": mode.as_str(), "injected": injected, "caught": caught}));
    }
}
