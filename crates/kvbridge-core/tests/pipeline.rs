//! Pipeline parallelism in the plan: which P stages a D stage reads, how many notifications
//! each P rank expects, and peers whose stages make no sense. (Bytes over NIXL:
//! `crates/kvbridge-nixl/tests/pipeline.rs`.)
use kvbridge_core::plan::{stage_of, GroupBlocks, TransferPlan};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_core::wire::AgentMetadata;

fn spec(tp: u32, rank: u32, first_layer: u32, layers: u32) -> Spec {
    Spec { tp_size: tp, tp_rank: rank, first_layer, ..Spec::dense(layers, 4, 32, 16, 32, CacheLayout::Nhd) }
}

fn md(c: &Cache, pp: u32, rank: u32) -> AgentMetadata {
    let l = c.layout();
    AgentMetadata {
        engine_id: "P".into(),
        agent_name: format!("p{pp}.{rank}"),
        tp_rank: rank,
        tp_size: c.spec.tp_size,
        block_size: 16,
        blocks_per_logical: 1,
        regions: l.regions,
        nixl_md: Vec::new(),
        staging_regions: Vec::new(),
    }
}

/// P's stages, each `(first layer, layers)`, at TP `tp`: `(pp, metadata of every TP rank)`.
fn p_stages(cuts: &[(u32, u32)], tp: u32) -> Vec<(u32, Vec<AgentMetadata>)> {
    cuts.iter()
        .enumerate()
        .map(|(pp, &(first, n))| (pp as u32, (0..tp).map(|q| md(&Cache::new(spec(tp, q, first, n)), pp as u32, q)).collect()))
        .collect()
}

fn names(cuts: &[(u32, u32)]) -> Vec<Vec<String>> {
    cuts.iter().map(|&(f, n)| (f..f + n).map(|l| format!("model.layers.{l}")).collect()).collect()
}

#[test]
fn a_d_stage_reads_the_p_stages_holding_its_layers_and_counts_every_reader() {
    let p_cuts = [(0, 2), (2, 2)];
    let d_cuts = [(0, 3), (3, 1)];
    let p = p_stages(&p_cuts, 2);
    let blocks = [vec![3u32, 4, 5]];
    let d_blocks = [vec![10u32, 11, 12]];
    let groups = [GroupBlocks { local: &d_blocks[0], remote: &blocks[0] }];
    // D stage 0 (layers 0-2, TP 1) reads both P stages' two TP ranks: global ranks 0..4.
    let d0 = Cache::new(spec(1, 0, 0, 3)).layout();
    let plan = TransferPlan::build_stages(&d0, (1, 0), 16, &p, &names(&d_cuts), None).unwrap();
    assert_eq!(plan.sources, vec![0, 1, 2, 3]);
    // P stage 0 is read by D stage 0 only; P stage 1 by both D stages.
    assert_eq!(plan.expected, vec![1, 1, 2, 2]);
    assert_eq!(plan.remote_agents, vec!["p0.0", "p0.1", "p1.0", "p1.1"]);
    let t = plan.transfer(&groups, 40, true).unwrap();
    assert_eq!(t.reads.iter().map(|r| r.remote_rank).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    // 3 layers x 4 heads x 48 tokens x 32 bytes, each head from the P rank holding it.
    assert_eq!(t.bytes, 3 * 4 * 48 * 32);
    // D stage 1 (layer 3) reads P stage 1 only; P stage 0 is neither read nor notified.
    let d1 = Cache::new(spec(1, 0, 3, 1)).layout();
    let plan = TransferPlan::build_stages(&d1, (1, 0), 16, &p, &names(&d_cuts), None).unwrap();
    assert_eq!((plan.sources.clone(), plan.expected.clone()), (vec![2, 3], vec![2, 2]));
    assert_eq!(plan.transfer(&groups, 40, true).unwrap().bytes, 4 * 48 * 32);
    assert_eq!(stage_of(3, 2), (1, 1));
    // D TP 4 over P TP 2: two D ranks per P rank, times the D stages reading it.
    let d = Cache::new(spec(4, 3, 3, 1)).layout();
    let rank1: Vec<(u32, Vec<AgentMetadata>)> = p.iter().map(|(pp, m)| (*pp, vec![m[1].clone()])).collect();
    let plan = TransferPlan::build_stages(&d, (4, 3), 16, &rank1, &names(&d_cuts), None).unwrap();
    assert_eq!((plan.sources.clone(), plan.expected.clone()), (vec![3], vec![4]));
    // Without the other D stages' layers, each P rank expects this stage alone.
    let plan = TransferPlan::build_stages(&d1, (1, 0), 16, &p, &[], None).unwrap();
    assert_eq!(plan.expected, vec![1, 1]);
}

#[test]
fn stages_that_overlap_repeat_or_miss_layers_are_refused() {
    let d = Cache::new(spec(1, 0, 0, 4)).layout();
    let err = |p: &[(u32, Vec<AgentMetadata>)]| TransferPlan::build_stages(&d, (1, 0), 16, p, &[], None).unwrap_err().to_string();
    let overlap = p_stages(&[(0, 3), (2, 2)], 1);
    assert!(err(&overlap).contains("held by remote stages 0 and 1"), "{}", err(&overlap));
    let mut twice = p_stages(&[(0, 2), (2, 2)], 1);
    twice[1].0 = 0;
    assert!(err(&twice).contains("repeated"), "{}", err(&twice));
    // P has only layers 0-1 (a stage did not answer or lies): D's layer 2 has no source.
    let missing = p_stages(&[(0, 2)], 1);
    assert!(err(&missing).contains("layer model.layers.2"), "{}", err(&missing));
    // No P stage holds any of D's layers.
    let other = Cache::new(spec(1, 0, 8, 2)).layout();
    let p = p_stages(&[(0, 2), (2, 2)], 1);
    let e = TransferPlan::build_stages(&other, (1, 0), 16, &p, &[], None).unwrap_err().to_string();
    assert!(e.contains("no remote pipeline stage"), "{e}");
    // A stage whose TP ranks are not the ones asked for.
    let mut wrong = p_stages(&[(0, 2), (2, 2)], 2);
    wrong[1].1.swap(0, 1);
    let d2 = Cache::new(spec(1, 0, 0, 4)).layout();
    let e = TransferPlan::build_stages(&d2, (1, 0), 16, &wrong, &[], None).unwrap_err().to_string();
    assert!(e.contains("remote rank 0"), "{e}");
}
