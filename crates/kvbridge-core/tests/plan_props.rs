//! Property tests on the transfer plan, with no NIXL: random P/D geometries (TP sizes,
//! head counts, block sizes both ways, kernel blocks, layouts, MLA, sliding window, state
//! regions, prefix hits, fragmented or contiguous block ids). For every D rank:
//! - no piece crosses a region boundary, on either side;
//! - no local byte is written twice (every byte D needs is read exactly once);
//! - applying the pieces as memcpys yields exactly the expected sharding, and blocks
//!   outside the request stay untouched;
//! - every P rank is notified by exactly as many D ranks as the notification count says.
use kvbridge_core::plan::{Piece, TpMapping};
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    p: Spec,
    d: Spec,
    p_blocks: Vec<Vec<u32>>,
    d_blocks: Vec<Vec<u32>>,
    num_tokens: u64,
    coalesce: bool,
}

#[allow(clippy::too_many_arguments)]
fn spec(tp: u32, heads: u32, bt: u32, bpl: u32, layout: CacheLayout, mla: bool, swa: bool, state: bool) -> Spec {
    Spec {
        layers: 2,
        total_heads: if mla { 1 } else { heads },
        content: 8,
        tp_size: tp,
        tp_rank: 0,
        block_tokens: bt,
        blocks_per_logical: bpl,
        num_blocks: 48,
        layout,
        mla,
        swa_layers: u32::from(swa),
        window: 7,
        state_layers: u32::from(state),
        state_bytes: 24,
        first_layer: 0,
    }
}

/// Distinct non-null block ids in 1..48: contiguous runs or shuffled.
fn ids(n: usize, seed: u64, contiguous: bool) -> Vec<u32> {
    let mut v: Vec<u32> = (1..48).collect();
    if !contiguous {
        let mut x = seed | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
    } else {
        v.rotate_left((seed % 20) as usize);
    }
    v.truncate(n);
    v
}

fn case() -> impl Strategy<Value = Case> {
    let tps = prop::sample::select(vec![1u32, 2, 4]);
    let heads = prop::sample::select(vec![1u32, 2, 8]);
    let bts = prop::sample::select(vec![2u32, 4, 8]);
    let bpls = prop::sample::select(vec![1u32, 2]);
    // Layout families that can pair: K|V packed (HND/NHD), K/V split, vLLM CPU (K dim-major),
    // LHBNC (heads outside blocks) with HND.
    let family = prop::sample::select(vec![0u8, 1, 2, 3]);
    (
        (tps.clone(), tps, heads, bts.clone(), bts, bpls.clone(), bpls),
        (family, any::<[bool; 2]>(), any::<bool>(), any::<bool>(), any::<bool>()),
        (1u64..60, 0usize..4, any::<u64>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |((tp_p, tp_d, heads, bt_p, bt_d, bpl_p, bpl_d), (family, flip, mla, swa, state), (n, hit, seed, contig, coalesce))| {
                let l = match family {
                    0 => [CacheLayout::Hnd, CacheLayout::Nhd],
                    1 => [CacheLayout::KvSplitNhd, CacheLayout::KvInnerHnd],
                    // Heads outside the block axis (one region per head) against HND.
                    3 => [CacheLayout::Lhbnc, CacheLayout::Hnd],
                    _ => [CacheLayout::CpuVec, CacheLayout::CpuVec],
                };
                let (lp, ld) = (l[flip[0] as usize], l[flip[1] as usize]);
                // State (Mamba) regions need equal TP.
                let state = state && tp_p == tp_d;
                let p = spec(tp_p, heads, bt_p, bpl_p, lp, mla, swa, state);
                let d = spec(tp_d, heads, bt_d, bpl_d, ld, mla, swa, state);
                let (lbp, lbd) = (u64::from(p.logical_block_size()), u64::from(d.logical_block_size()));
                let (np, nd) = (n.div_ceil(lbp) as usize, n.div_ceil(lbd) as usize);
                let mut p_blocks = vec![ids(np, seed, contig)];
                let hit = hit.min(nd - 1);
                let mut d_blocks = vec![ids(nd, seed.rotate_left(17), contig)[hit..].to_vec()];
                if swa {
                    p_blocks.push(ids(np, seed ^ 1, contig));
                    d_blocks.push(ids(nd, seed ^ 2, contig)[hit..].to_vec());
                }
                if state {
                    if !swa {
                        p_blocks.push(vec![]);
                        d_blocks.push(vec![]);
                    }
                    p_blocks.push(vec![ids(1, seed ^ 3, false)[0]]);
                    d_blocks.push(vec![ids(1, seed ^ 4, false)[0]]);
                }
                Case { p, d, p_blocks, d_blocks, num_tokens: n, coalesce }
            },
        )
}

fn within(a: u64, len: u64, spans: &[(u64, u64)]) -> bool {
    spans.iter().any(|&(b, s)| a >= b && a + len <= b + s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn every_needed_byte_is_read_exactly_once(c in case()) {
        let s = Scenario::new(&c.p, &c.d, c.p_blocks.clone(), c.d_blocks.clone(), c.num_tokens);
        let p_md: Vec<_> = (0..s.p.len()).map(|r| s.p_metadata(r, vec![])).collect();
        let mut notifs = vec![0u32; s.p.len()];
        let mut expected = None;
        for rank in 0..s.d.len() {
            let plan = s.plan(rank, &p_md).map_err(|e| TestCaseError::fail(format!("plan: {e}")))?;
            let t = plan.transfer(&s.groups(), c.num_tokens, c.coalesce).map_err(|e| TestCaseError::fail(format!("transfer: {e}")))?;
            let tp = TpMapping::new(c.d.tp_size, rank as u32, c.p.tp_size).unwrap();
            prop_assert_eq!(&tp.sources, &plan.tp.sources);
            for &q in &tp.sources {
                notifs[q as usize] += 1;
            }
            expected = Some(tp.notifs_per_remote_rank);
            let local_spans: Vec<(u64, u64)> = s.d[rank].layout().regions.iter().map(|r| (r.base, r.span())).collect();
            let mut written: Vec<(u64, u64)> = Vec::new();
            let mut all: Vec<(Piece, u32)> = Vec::new();
            for read in &t.reads {
                let remote_spans: Vec<(u64, u64)> = p_md[read.remote_rank as usize].regions.iter().map(|r| (r.base, r.span())).collect();
                for p in &read.pieces {
                    prop_assert!(p.len > 0);
                    prop_assert!(within(p.local, p.len, &local_spans), "local piece crosses a region: {:?}", p);
                    prop_assert!(within(p.remote, p.len, &remote_spans), "remote piece crosses a region: {:?}", p);
                    written.push((p.local, p.len));
                    all.push((*p, read.remote_rank));
                }
            }
            written.sort();
            for w in written.windows(2) {
                prop_assert!(w[0].0 + w[0].1 <= w[1].0, "a local byte is written twice: {:?}", w);
            }
            prop_assert_eq!(written.iter().map(|w| w.1).sum::<u64>(), t.bytes);
            if !c.coalesce {
                prop_assert_eq!(t.descriptors, t.uncoalesced);
            } else {
                prop_assert!(t.descriptors <= t.uncoalesced);
            }
            if c.num_tokens % 2 == 0 {
                // Half the cases go through a staged read (whole remote blocks into a
                // staging area, then local copies): the same bytes must land.
                for read in &t.reads {
                    let (groups, _) = kvbridge_core::layout::block_groups(&p_md[read.remote_rank as usize].regions).unwrap();
                    // Everything staged, the large pieces direct, or the defaults.
                    let direct_min = [u64::MAX, 64, kvbridge_core::staged::DIRECT_PIECE][(c.num_tokens as usize / 2) % 3];
                    let st = kvbridge_core::staged::stage_with(&read.pieces, &groups, kvbridge_core::staged::MAX_READ_PIECE, direct_min)
                        .ok_or_else(|| TestCaseError::fail("not stageable"))?;
                    prop_assert!(st.reads.len() <= read.pieces.len() || st.reads.len() <= groups.len() * 64);
                    prop_assert!(st.direct.iter().all(|p| p.len >= direct_min));
                    prop_assert_eq!(st.direct.iter().map(|p| p.len).sum::<u64>() + st.copies.iter().map(|c| c.2).sum::<u64>(), read.pieces.iter().map(|p| p.len).sum::<u64>());
                    for p in &st.direct {
                        // SAFETY: a piece of the plan checked above: inside live buffers of `s`.
                        unsafe { std::ptr::copy_nonoverlapping(p.remote as usize as *const u8, p.local as usize as *mut u8, p.len as usize) };
                    }
                    let mut area = vec![0u8; st.size as usize];
                    for p in &st.reads {
                        prop_assert!(p.local + p.len <= st.size);
                        // SAFETY: the remote range is a whole block of a live P buffer (its
                        // group), the destination inside `area`.
                        unsafe { std::ptr::copy_nonoverlapping(p.remote as usize as *const u8, area.as_mut_ptr().add(p.local as usize), p.len as usize) };
                    }
                    for &(l, off, len) in &st.copies {
                        prop_assert!(within(l, len, &local_spans) && off + len <= st.size);
                        // SAFETY: checked just above: inside this D rank's cache and `area`.
                        unsafe { std::ptr::copy_nonoverlapping(area.as_ptr().add(off as usize), l as usize as *mut u8, len as usize) };
                    }
                }
            } else {
                for (p, _) in &all {
                    // SAFETY: both ranges were just checked to lie inside live buffers of `s`
                    // (a P cache and this D rank's cache), which do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(p.remote as usize as *const u8, p.local as usize as *mut u8, p.len as usize) };
                }
            }
            s.d[rank].check(&s.d_blocks, c.num_tokens).map_err(|e| TestCaseError::fail(format!("D rank {rank}: {e}")))?;
        }
        let e = expected.unwrap();
        for n in notifs {
            prop_assert_eq!(n, e, "a P rank would not free its blocks exactly at the last reader");
        }
    }
}

#[test]
fn coalescing_turns_contiguous_runs_into_one_descriptor_per_region() {
    let p = spec(1, 2, 16, 1, CacheLayout::Hnd, false, false, false);
    let s = Scenario::new(&p, &p, vec![(1..11).collect()], vec![(20..30).collect()], 160);
    let md = [s.p_metadata(0, vec![])];
    let plan = s.plan(0, &md).unwrap();
    let t = plan.transfer(&s.groups(), 160, true).unwrap();
    assert_eq!((t.descriptors, t.uncoalesced), (2, 20), "2 layers x 10 blocks -> one piece per layer");
    // A head split (D TP 2 from P TP 1, HND): one range per block per layer, no merging
    // across blocks since the head slice of consecutive blocks is not adjacent.
    let d = Spec { tp_size: 2, ..p.clone() };
    let s = Scenario::new(&p, &d, vec![(1..11).collect()], vec![(20..30).collect()], 160);
    let plan = s.plan(1, &md).unwrap();
    assert_eq!(plan.transfer(&s.groups(), 160, true).unwrap().descriptors, 20);
}

#[test]
fn dim_major_k_splits_blocks_row_by_row_and_refuses_a_token_major_peer() {
    // vLLM's CPU cache: K is [head_dim, tokens] per head, registered as K and V views of
    // one buffer. Same block size: the views' jobs fuse, so a run of blocks is one range
    // per layer, as for a packed layout.
    let p = spec(1, 2, 16, 1, CacheLayout::CpuVec, false, false, false);
    let s = Scenario::new(&p, &p, vec![(1..5).collect()], vec![(20..24).collect()], 64);
    let plan = s.plan(0, &[s.p_metadata(0, vec![])]).unwrap();
    let t = plan.transfer(&s.groups(), 64, true).unwrap();
    assert_eq!(t.descriptors, 2, "2 layers: K, V and consecutive blocks merge");
    // D's blocks half the size: every K row (one per content element) of every head is
    // its own range; V rows of a head merge.
    let d = Spec { block_tokens: 8, ..p.clone() };
    let s = Scenario::new(&p, &d, vec![(1..5).collect()], vec![(20..28).collect()], 64);
    let plan = s.plan(0, &[s.p_metadata(0, vec![])]).unwrap();
    let t = plan.transfer(&s.groups(), 64, true).unwrap();
    let half = u64::from(p.content / 2);
    let k_rows = 2 * 8 * 2 * half; // layers x D blocks x heads x K rows: never contiguous in P
    assert!(t.descriptors >= k_rows && t.descriptors <= k_rows + 2 * 8 * 2, "{} descriptors", t.descriptors);
    // A token-major peer cannot be paired row by row: a typed error at plan time.
    let d = Spec { layout: CacheLayout::KvInnerHnd, ..p.clone() };
    let s = Scenario::new(&p, &d, vec![(1..5).collect()], vec![(20..24).collect()], 64);
    let e = s.plan(0, &[s.p_metadata(0, vec![])]).unwrap_err().to_string();
    assert!(e.contains("dim-major"), "{e}");
}
