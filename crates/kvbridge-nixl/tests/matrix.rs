//! The byte-exact heterogeneity matrix over real NIXL (UCX over loopback, DRAM).
//!
//! Each case builds a logical KV tensor with known contents, shards it into real caches
//! per P's config (TP size, block size, kernel block size, layout) and per D's, gives
//! every rank its own NIXL agent, builds each D rank's transfer plan from the metadata of
//! the P ranks it maps to, READs, and then checks that:
//! - every token each D rank needs is byte-exact in its own layout, and no block outside
//!   the request (the null block included) was written;
//! - each P rank got exactly the number of notifications the plan promised, i.e. it frees
//!   the request's blocks exactly when the last D rank that needs them is done.
//!
//! Cases are a pairwise selection covering every value of each axis: TP 1→1, 1→2, 2→1,
//! 1→4, 4→1, 2→4, 4→2; 1, 2 and 8 KV heads (replicated KV on either side); block sizes
//! 16→16, 16→32, 32→16, 16→64; kernel blocks smaller than logical blocks; NHD, HND,
//! LHBNC (heads outside the block axis) and K/V-split layouts; MLA; partial prefix hits; a sliding-window + full-attention hybrid
//! with null blocks; a Mamba-style state region.
use std::time::{Duration, Instant};

mod common;
use common::runtime_or_skip;
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec, NULL_BLOCK};
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_core::wire::Notif;
use kvbridge_nixl::{NixlOptions, NixlTransport};

#[derive(Clone, Copy, PartialEq)]
struct Side {
    tp: u32,
    block: u32,
    bpl: u32,
    layout: CacheLayout,
}

fn spec(s: Side, heads: u32, mla: bool, swa: bool, state: bool) -> Spec {
    Spec {
        layers: 2,
        total_heads: if mla { 1 } else { heads },
        content: 64,
        tp_size: s.tp,
        tp_rank: 0,
        block_tokens: s.block / s.bpl,
        blocks_per_logical: s.bpl,
        num_blocks: 64,
        layout: s.layout,
        mla,
        swa_layers: u32::from(swa),
        window: 40,
        state_layers: u32::from(state),
        state_bytes: 96,
        first_layer: 0,
    }
}

struct Case {
    name: &'static str,
    p: Side,
    d: Side,
    heads: u32,
    mla: bool,
    hybrid: bool,
    state: bool,
    tokens: u64,
    /// Leading D blocks already cached locally (prefix hit).
    hit: usize,
}

/// Block ids: a contiguous run then scattered ids, all distinct and non-null.
fn block_ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| if i < n as u32 / 2 { 3 + salt + i } else { 40 + ((i * 7 + salt) % 23) }).collect()
}

fn run_case(ci: usize, c: &Case) {
    let opts = NixlOptions::default();
    let ps = spec(c.p, c.heads, c.mla, c.hybrid, c.state);
    let ds = spec(c.d, c.heads, c.mla, c.hybrid, c.state);
    let (np, nd) = (c.tokens.div_ceil(c.p.block.into()) as usize, c.tokens.div_ceil(c.d.block.into()) as usize);
    let mut p_blocks = vec![block_ids(np, 0)];
    let mut d_blocks = vec![block_ids(nd, 5)[c.hit..].to_vec()];
    if c.hybrid {
        // Sliding-window group: blocks wholly before the window are the null block on
        // both sides (vLLM frees them), and must be neither read nor written.
        let w0 = c.tokens.saturating_sub(40);
        let null_before = |bs: u32, ids: Vec<u32>, first: usize| -> Vec<u32> {
            ids.into_iter()
                .enumerate()
                .map(|(i, b)| if (((i + first) as u64 + 1) * u64::from(bs)) <= w0 { NULL_BLOCK } else { b })
                .collect()
        };
        p_blocks.push(null_before(c.p.block, block_ids(np, 9), 0));
        d_blocks.push(null_before(c.d.block, block_ids(nd, 11)[c.hit..].to_vec(), c.hit));
    } else if c.state {
        p_blocks.push(vec![]);
        d_blocks.push(vec![]);
    }
    if c.state {
        p_blocks.push(vec![17]);
        d_blocks.push(vec![33]);
    }
    let mut s = Scenario::new(&ps, &ds, p_blocks, d_blocks, c.tokens);

    let mut p_agents: Vec<NixlTransport> = Vec::new();
    let mut p_md = Vec::new();
    for r in 0..s.p.len() {
        let name = format!("m{ci}-p{r}");
        let mut t = NixlTransport::new(&name, &opts).expect("P agent");
        t.register(&s.p[r].layout()).expect("register P");
        let mut md = s.p_metadata(r, t.local_metadata().expect("P metadata"));
        md.agent_name = name;
        p_md.push(md);
        p_agents.push(t);
    }
    let mut d_agents: Vec<NixlTransport> = Vec::new();
    let mut reads = Vec::new(); // per D rank: (remote key, pieces or None for a notification)
    let mut expected = 0;
    let (mut descs, mut unco, mut bytes) = (0, 0, 0);
    for r in 0..s.d.len() {
        let mut t = NixlTransport::new(&format!("m{ci}-d{r}"), &opts).expect("D agent");
        t.register(&s.d[r].layout()).expect("register D");
        let plan = s.plan(r, &p_md).unwrap_or_else(|e| panic!("{}: D rank {r}: plan: {e}", c.name));
        expected = plan.tp.notifs_per_remote_rank;
        let xfer = plan.transfer(&s.groups(), c.tokens, true).unwrap_or_else(|e| panic!("{}: D rank {r}: transfer: {e}", c.name));
        descs += xfer.descriptors;
        unco += xfer.uncoalesced;
        bytes += xfer.bytes;
        let mut mine = Vec::new();
        for (i, &q) in plan.tp.sources.iter().enumerate() {
            let key = format!("P#{q}");
            t.add_remote(&key, &p_md[q as usize]).expect("load P metadata");
            mine.push((key, xfer.reads.iter().find(|x| x.source == i).map(|x| x.pieces.clone())));
        }
        reads.push(mine);
        d_agents.push(t);
    }
    // Twice: the first READ to a peer uses per-request descriptor lists (and prepares the
    // peer's per-block list); the second uses the prepared lists where pieces are whole
    // blocks. D's caches are reset in between, so each round's bytes are checked on their own.
    for round in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut posted = Vec::new();
        for (r, mine) in reads.iter().enumerate() {
            let msg = Notif {
                version: kvbridge_core::wire::WIRE_VERSION,
                request_id: format!("req{round}"),
                from_engine: "D".into(),
                from_tp_rank: r as u32,
                ok: true,
                expected,
            }
            .to_bytes()
            .unwrap();
            for (key, pieces) in mine {
                match pieces {
                    Some(pieces) => posted.push((r, d_agents[r].read(key, pieces, &msg).expect("post READ"))),
                    None => d_agents[r].notify(key, &msg).expect("notify"),
                }
            }
        }
        for (r, x) in posted {
            loop {
                match d_agents[r].poll(x).expect("transfer failed") {
                    XferPoll::Done => break,
                    XferPoll::Pending => {
                        assert!(Instant::now() < deadline, "{}: READ did not finish", c.name);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            d_agents[r].release(x);
        }
        // Every P rank hears from every D rank that depends on it, exactly once each.
        for (q, t) in p_agents.iter_mut().enumerate() {
            let mut got = Vec::new();
            while got.len() < expected as usize && Instant::now() < deadline {
                got.extend(t.take_notifs().expect("notifs"));
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            got.extend(t.take_notifs().expect("notifs"));
            assert_eq!(got.len(), expected as usize, "{}: P rank {q} got {} notifications, expected {expected}", c.name, got.len());
            for n in got {
                let n = Notif::from_bytes(&n).expect("notif");
                assert!(n.ok && n.expected == expected && n.request_id == format!("req{round}"));
            }
        }
        for (r, d) in s.d.iter_mut().enumerate() {
            d.check(&s.d_blocks, c.tokens).unwrap_or_else(|e| panic!("{}: round {round}: D rank {r}: {e}", c.name));
            d.reset();
        }
    }
    let prepped: u64 = d_agents.iter().map(|t| t.made_prepped).sum();
    let listed: u64 = d_agents.iter().map(|t| t.made_listed).sum();
    if c.p == c.d && !c.mla && !c.hybrid && !c.state && c.hit == 0 {
        // Equal geometry: every piece is whole blocks, and the peer's list is prepared when it
        // is loaded, so every request, the first included, is made from indices.
        assert!(prepped > 0 && listed == 0, "{}: {prepped} prepared vs {listed} listed requests", c.name);
    }
    drop(d_agents);
    drop(p_agents);
    eprintln!(
        "{:<44} bytes {bytes:>8}  descriptors {descs:>5} (uncoalesced {unco:>5})  requests prepared/listed {prepped}/{listed}",
        c.name
    );
}

#[test]
fn heterogeneous_pd_matrix_is_byte_exact() {
    if !runtime_or_skip() {
        return;
    }
    use CacheLayout::*;
    let side = |tp, block, layout| Side { tp, block, bpl: 1, layout };
    let base =
        Case { name: "", p: side(1, 16, Hnd), d: side(1, 16, Hnd), heads: 8, mla: false, hybrid: false, state: false, tokens: 150, hit: 0 };
    let cases = [
        Case { name: "tp1->1 h8 bs16->16 HND", ..base },
        Case { name: "tp1->2 h8 bs16->32 NHD->HND prefix", p: side(1, 16, Nhd), d: side(2, 32, Hnd), hit: 1, ..base },
        Case { name: "tp2->1 h2 bs32->16 HND->NHD", p: side(2, 32, Hnd), d: side(1, 16, Nhd), heads: 2, ..base },
        Case { name: "tp1->4 h8 bs16->64 HND", p: side(1, 16, Hnd), d: side(4, 64, Hnd), ..base },
        Case { name: "tp4->1 h8 bs16->16 NHD prefix", p: side(4, 16, Nhd), d: side(1, 16, Nhd), hit: 2, ..base },
        Case { name: "tp2->4 h2 (D replicated) bs16->32", p: side(2, 16, Hnd), d: side(4, 32, Hnd), heads: 2, ..base },
        Case { name: "tp4->2 h2 (P replicated) bs32->16 NHD->HND", p: side(4, 32, Nhd), d: side(2, 16, Hnd), heads: 2, ..base },
        Case { name: "tp4->2 MLA bs16->32", p: side(4, 16, Hnd), d: side(2, 32, Hnd), mla: true, ..base },
        Case { name: "tp1->2 MLA bs32->16 prefix", p: side(1, 32, Hnd), d: side(2, 16, Hnd), mla: true, hit: 1, ..base },
        Case { name: "tp2->2 h8 KV-split NHD->KV-inner HND 16->64", p: side(2, 16, KvSplitNhd), d: side(2, 64, KvInnerHnd), ..base },
        Case { name: "tp1->1 h2 SWA+full+state bs16->32 prefix", d: side(1, 32, Hnd), heads: 2, hybrid: true, state: true, hit: 1, ..base },
        Case {
            name: "tp2->1 h8 P kernel 16 / logical 32 -> 32",
            p: Side { tp: 2, block: 32, bpl: 2, layout: Nhd },
            d: side(1, 32, Hnd),
            ..base
        },
        Case { name: "tp2->2 h1 (replicated) + state bs32", p: side(2, 32, Hnd), d: side(2, 32, Hnd), heads: 1, state: true, ..base },
        Case { name: "tp1->1 h2 vLLM-CPU (K dim-major) bs64->16", p: side(1, 64, CpuVec), d: side(1, 16, CpuVec), heads: 2, ..base },
        Case { name: "tp1->2 h2 vLLM-CPU bs16->32 prefix", p: side(1, 16, CpuVec), d: side(2, 32, CpuVec), heads: 2, hit: 1, ..base },
        Case { name: "tp2->1 h8 LHBNC (heads outside blocks) bs16->32 -> HND", p: side(2, 16, Lhbnc), d: side(1, 32, Hnd), ..base },
        Case { name: "tp1->2 h2 NHD bs32->16 -> LHBNC prefix", p: side(1, 32, Nhd), d: side(2, 16, Lhbnc), heads: 2, hit: 1, ..base },
        Case { name: "tp1->1 h2 vLLM-CPU bs32->32 (equal)", p: side(1, 32, CpuVec), d: side(1, 32, CpuVec), heads: 2, ..base },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(i, c);
    }
}
