//! Unit tests of `plan.rs`.
use super::*;

fn region(name: &str, base: u64, nblocks: u64, len: u64) -> Region {
    Region::opaque(name, base, len, len, nblocks)
}

fn layout(nregions: usize, nblocks: u64, len: u64) -> KvLayout {
    KvLayout {
        regions: (0..nregions).map(|i| region(&format!("r{i}"), (i as u64 + 1) << 32, nblocks, len)).collect(),
        num_blocks: nblocks,
        blocks_per_logical: 1,
    }
}

fn md(l: &KvLayout, tp: u32) -> AgentMetadata {
    AgentMetadata {
        engine_id: "p".into(),
        agent_name: "p-0".into(),
        tp_rank: 0,
        tp_size: tp,
        block_size: 16,
        blocks_per_logical: 1,
        regions: l.regions.clone(),
        nixl_md: vec![],
        staging_regions: vec![],
    }
}

#[test]
fn tp_mapping_matches_vllm() {
    let m = TpMapping::new(4, 3, 2).unwrap();
    assert_eq!((m.sources.clone(), m.notifs_per_remote_rank), (vec![1], 2));
    let m = TpMapping::new(2, 1, 4).unwrap();
    assert_eq!((m.sources.clone(), m.notifs_per_remote_rank), (vec![2, 3], 1));
    assert!(TpMapping::new(2, 0, 3).is_err());
    assert!(TpMapping::new(2, 2, 2).is_err());
    assert!(TpMapping::new(0, 0, 2).is_err());
}

#[test]
fn contiguous_runs_coalesce_per_region() {
    let l = layout(2, 10, 64);
    let r = layout(2, 20, 64);
    let p = TransferPlan::build(&l, 1, 0, 16, &[md(&r, 1)], None).unwrap();
    let gb = [GroupBlocks { local: &[1, 2, 7], remote: &[4, 5, 9] }];
    let t = p.transfer(&gb, 0, true).unwrap();
    assert_eq!(t.bytes, 6 * 64);
    assert_eq!(t.descriptors, 4, "runs [1,2]<-[4,5] and [7]<-[9], per region");
    assert_eq!(t.uncoalesced, 6);
    let pcs = &t.reads[0].pieces;
    assert_eq!(pcs[0], Piece { local: (1 << 32) + 64, remote: (1 << 32) + 4 * 64, len: 128, local_dev: 0, remote_dev: 0 });
    assert_eq!(p.transfer(&gb, 0, false).unwrap().descriptors, 6);
    // Partial prefix hit: 2 local blocks, 3 remote: the last two are read.
    let t = p.transfer(&[GroupBlocks { local: &[3, 4], remote: &[7, 8, 9] }], 0, true).unwrap();
    assert_eq!(t.reads[0].pieces[0].remote, (1 << 32) + 8 * 64);
}

#[test]
fn peer_controlled_values_are_errors_not_panics() {
    let l = layout(2, 10, 64);
    let p = TransferPlan::build(&l, 1, 0, 16, &[md(&layout(2, 20, 64), 1)], None).unwrap();
    let t = |a: &[u32], b: &[u32]| p.transfer(&[GroupBlocks { local: a, remote: b }], 0, true);
    assert!(matches!(t(&[10], &[0]), Err(PlanError::BlockOutOfRange { side: "local", .. })));
    assert!(matches!(t(&[0], &[20]), Err(PlanError::BlockOutOfRange { side: "remote", .. })));
    assert!(matches!(t(&[0, 1], &[0]), Err(PlanError::BlockCountMismatch { .. })));
    assert!(p.transfer(&[], 0, true).is_err(), "no block ids for group 0");
    let b = |m: AgentMetadata| TransferPlan::build(&l, 1, 0, 16, &[m], None);
    assert!(b(md(&layout(2, 20, 32), 1)).is_err(), "block length differs");
    assert!(b(md(&layout(2, 20, 64), 3)).is_err(), "TP sizes do not divide");
    assert!(b(md(&layout(2, 20, 64), 2)).is_err(), "opaque blocks need equal TP");
    let mut bad = md(&layout(2, 20, 64), 1);
    bad.regions[0].base = u64::MAX - 10;
    assert!(b(bad).is_err());
    let mut bad = md(&layout(2, 20, 64), 1);
    bad.regions[0].num_blocks = 1 << 40;
    assert!(b(bad).is_err());
    let mut bad = md(&layout(2, 20, 64), 1);
    bad.regions[0].block_stride = u64::MAX / 2;
    assert!(b(bad).is_err());
    let mut bad = md(&layout(2, 20, 64), 1);
    bad.regions[1].layer = "other".into();
    assert!(b(bad).is_err(), "a local layer the peer lacks");
    let mut bad = md(&layout(2, 20, 64), 1);
    bad.blocks_per_logical = 0;
    assert!(b(bad).is_err());
    let mut bad = md(&layout(2, 20, 64), 1);
    bad.tp_rank = 1;
    assert!(b(bad).is_err(), "metadata from the wrong rank");
}
