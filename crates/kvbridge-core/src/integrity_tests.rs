use super::*;

fn sig(n: usize) -> Vec<RegionSig> {
    (0..n).map(|i| RegionSig { name: format!("layer{i}"), block_len: 4096, group: 0 }).collect()
}

/// P's set for `offered` with every block digested as `f(index, region)`.
fn set(offered: Vec<u32>, regions: usize, f: impl Fn(u32, usize) -> u32) -> DigestSet {
    let checked: Vec<u32> = (0..offered.len() as u32).collect();
    let digests = checked.iter().flat_map(|&i| (0..regions).map(move |r| (i, r))).map(|(i, r)| f(i, r)).collect();
    DigestSet { missing: None, tp_size: 1, blocks_per_logical: 1, regions: sig(regions), offered, checked, digests, group_lens: vec![] }
}

fn expect(local: Vec<u32>, offered: Option<Vec<u32>>) -> Expect {
    Expect { key: "p".into(), local, num_tokens: 0, offered, host: "h".into(), port: 1, group_lens: vec![], clipped: vec![] }
}

#[test]
fn modes_parse_and_sampling_is_a_stable_fraction() {
    for m in ["off", "sampled", "full"] {
        assert_eq!(IntegrityMode::parse(m).map(IntegrityMode::as_str), Some(m));
    }
    assert_eq!(IntegrityMode::parse("on"), None);
    assert_eq!(chosen(IntegrityMode::Full, "r", 5, 8), vec![0, 1, 2, 3, 4]);
    assert!(chosen(IntegrityMode::Off, "r", 5, 8).is_empty());
    let s = chosen(IntegrityMode::Sampled, "req-1", 64, 8);
    assert_eq!(s.len(), 8, "{s:?}");
    assert!(s.windows(2).all(|w| w[1] - w[0] == 8));
    assert_eq!(s, chosen(IntegrityMode::Sampled, "req-1", 64, 8), "the same request samples the same blocks");
    // A short request still checks one block.
    for key in ["a", "b", "c", "d"] {
        assert_eq!(chosen(IntegrityMode::Sampled, key, 1, 8), vec![0]);
    }
    assert!(chosen(IntegrityMode::Sampled, "x", 0, 8).is_empty());
}

#[test]
fn tail_alignment_pairs_d_blocks_with_ps_last_blocks() {
    let s = set(vec![10, 11, 12, 13], 2, |i, r| i * 10 + r as u32);
    // D had a prefix hit on P's first two blocks and loads the last two into 7, 8.
    let p = pairs(&expect(vec![7, 8], Some(vec![10, 11, 12, 13])), &s, &sig(2), 1, 1, 0).unwrap();
    assert_eq!(p, vec![(7, 2), (8, 3)]);
    let got = vec![vec![20, 21], vec![30, 31]];
    assert_eq!(compare(&s, &p, &got), Verdict::Pass { blocks: 2 });
    let bad = vec![vec![20, 21], vec![30, 99]];
    assert_eq!(
        compare(&s, &p, &bad),
        Verdict::Mismatch(vec![Mismatch { local_block: 8, index: 3, region: "layer1".into(), expected: 31, got: 99 }])
    );
}

#[test]
fn p_blocks_past_the_prompt_are_not_part_of_the_load() {
    // P offered 5 blocks, the 48-token prompt uses 3 (16-token blocks); D loads the last 2.
    let s = set(vec![6, 7, 8, 9, 13], 1, |i, _| i);
    let mut e = expect(vec![15, 16], Some(vec![6, 7, 8, 9, 13]));
    e.num_tokens = 48;
    assert_eq!(pairs(&e, &s, &sig(1), 1, 1, 16).unwrap(), vec![(15, 1), (16, 2)]);
    e.num_tokens = 33;
    assert_eq!(pairs(&e, &s, &sig(1), 1, 1, 16).unwrap(), vec![(15, 1), (16, 2)], "a partial last block counts");
}

#[test]
fn sampled_sets_compare_only_digested_blocks() {
    let mut s = set(vec![1, 2, 3, 4], 1, |i, _| i);
    s.checked = vec![1, 3];
    s.digests = vec![1, 3];
    let p = pairs(&expect(vec![5, 6, 7, 8], None), &s, &sig(1), 1, 1, 0).unwrap();
    assert_eq!(p, vec![(6, 0), (8, 1)]);
}

#[test]
fn incomparable_or_inconsistent_sets_are_unverified_not_passed() {
    let s = set(vec![1, 2], 2, |_, _| 0);
    let e = expect(vec![5, 6], Some(vec![1, 2]));
    assert!(pairs(&e, &DigestSet::missing("off"), &sig(2), 1, 1, 0).is_err());
    assert!(pairs(&e, &s, &sig(3), 1, 1, 0).is_err(), "different regions");
    assert!(pairs(&e, &s, &sig(2), 2, 1, 0).is_err(), "different kernel blocks per block");
    assert!(pairs(&e, &s, &sig(2), 1, 2, 0).is_err(), "different TP");
    assert!(pairs(&expect(vec![5, 6], Some(vec![1, 9])), &s, &sig(2), 1, 1, 0).is_err(), "P digested other blocks than it offered");
    assert!(pairs(&expect(vec![4, 5, 6], None), &s, &sig(2), 1, 1, 0).is_err(), "more local blocks than remote");
    let mut m = s.clone();
    m.digests.pop();
    assert!(pairs(&e, &m, &sig(2), 1, 1, 0).is_err(), "malformed");
}

#[test]
fn store_expires_and_bounds_its_sets() {
    let mut st = DigestStore::default();
    st.insert("a".into(), set(vec![1], 1, |_, _| 7), 10.0);
    st.insert("b".into(), set(vec![1], 1, |_, _| 8), 20.0);
    assert_eq!(st.get("a", 5.0).digests, vec![7]);
    assert!(st.get("a", 15.0).missing.is_some(), "expired");
    assert_eq!(st.get("b", 15.0).digests, vec![8]);
    assert_eq!(st.len(), 1);
    for i in 0..MAX_STORED + 10 {
        st.insert(format!("k{i}"), DigestSet::default(), 100.0);
    }
    assert_eq!(st.len(), MAX_STORED);
    assert!(st.get("k0", 50.0).missing.is_some(), "the oldest went first");
}

#[test]
fn verifier_holds_landed_loads_until_their_digests_arrive() {
    let mut v = Verifier::default();
    v.expect("early", expect(vec![1], None), true, 90.0, 60.0);
    v.expect("late", expect(vec![2], None), false, 90.0, 60.0);
    v.expect("failed", expect(vec![3], None), true, 90.0, 60.0);
    v.expect("lost", expect(vec![4], None), true, 90.0, 60.0);
    v.expect("never", expect(vec![5], None), true, 90.0, 60.0);
    v.on_reply("early", set(vec![9], 1, |_, _| 1));
    let mut out = FinishedSets {
        recving: vec!["early".into(), "late".into(), "failed".into(), "lost".into(), "other".into()],
        failed_recving: vec!["failed".into()],
        ..Default::default()
    };
    let ready = v.on_finished(&mut out, 100.0, 5.0);
    assert_eq!(ready.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), vec!["early"]);
    assert_eq!(out.recving, vec!["early", "failed", "other"], "late and lost wait; a failed load is reported as it is");
    assert_eq!(v.waiting(), 2);
    let asked = v.take_unfetched_landed();
    assert_eq!(asked.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(), vec!["late"], "push: asked once it landed");
    assert!(v.take_unfetched_landed().is_empty(), "and only once");
    assert!(v.poll(101.0).is_empty());
    v.on_reply("late", set(vec![9], 1, |_, _| 1));
    let r = v.poll(101.0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, "late");
    let r = v.poll(106.0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, "lost");
    assert!(r[0].2.missing.is_some(), "no reply in time: unverified");
    assert_eq!(v.held(), (2, 7.0), "late was held 1 s, lost 6 s; early was never held");
    assert_eq!(v.len(), 1, "a load that never landed is kept a while");
    assert!(v.poll(151.0).is_empty());
    assert!(v.is_empty(), "then forgotten");
}

fn scheduler(extra: &str) -> crate::scheduler::PullScheduler {
    use crate::config::{CompatInfo, ConnectorConfig, EngineInfo};
    let json = format!(r#"{{"kv_role":"kv_producer","engine_id":"P","kv_connector_extra_config":{{{extra}}}}}"#);
    let info =
        EngineInfo { tp_size: 1, compat: CompatInfo { model: "m".into(), block_size: 16, ..Default::default() }, ..Default::default() };
    crate::scheduler::PullScheduler::new(ConnectorConfig::from_json(&json, info, |_| None).unwrap())
}

#[test]
fn p_orders_digests_of_producing_prefills_with_the_ids_it_offers() {
    use crate::scheduler::SchedulerSide;
    const DECODE: &str = r#"{"do_remote_decode":true}"#;
    // Default (sampled): ordered for producing requests only.
    let mut p = scheduler("");
    p.get_num_new_matched_tokens("a", 64, 0, Some(DECODE));
    p.prefill_completing("a", &[7, 8, 9], 64);
    p.prefill_completing("plain", &[1], 16);
    let md = p.build_connector_meta();
    assert_eq!(md.digest, vec![DigestReq { key: "a".into(), block_ids: vec![7, 8, 9], offered: vec![7, 8, 9], group_lens: vec![] }]);
    // Staged: the cache's blocks are digested, D is told the slots.
    let mut p = scheduler(r#""kv_integrity":"full","kv_staging_blocks":4"#);
    p.get_num_new_matched_tokens("b", 64, 0, Some(DECODE));
    p.prefill_completing("b", &[3, 4], 64);
    let md = p.build_connector_meta();
    assert_eq!(md.digest.len(), 1);
    assert_eq!(md.digest[0].block_ids, vec![3, 4]);
    assert_eq!(md.digest[0].offered, md.stage[0].slots, "D reads the slots");
    // Off: nothing.
    let mut p = scheduler(r#""kv_integrity":"off""#);
    p.get_num_new_matched_tokens("c", 64, 0, Some(DECODE));
    p.prefill_completing("c", &[1], 16);
    assert!(p.build_connector_meta().digest.is_empty());
}

#[test]
fn config_rejects_unknown_modes_and_bad_sample_rates() {
    use crate::config::{ConnectorConfig, EngineInfo};
    let mk = |extra: &str| {
        let json = format!(r#"{{"kv_role":"kv_producer","engine_id":"P","kv_connector_extra_config":{{{extra}}}}}"#);
        ConnectorConfig::from_json(&json, EngineInfo::default(), |_| None)
    };
    assert_eq!(mk("").unwrap().kv_integrity, crate::config::DEFAULT_INTEGRITY);
    assert_eq!(mk(r#""kv_integrity":"full""#).unwrap().kv_integrity, IntegrityMode::Full);
    assert!(mk(r#""kv_integrity":"on""#).unwrap_err().to_string().contains("kv_integrity"));
    assert!(mk(r#""kv_integrity":true"#).is_err());
    assert!(mk(r#""kv_integrity_sample_every":0"#).is_err());
    assert_eq!(mk(r#""kv_integrity_sample_every":4"#).unwrap().kv_integrity_sample_every, 4);
}

#[test]
fn several_groups_pair_group_by_group() {
    // P offered a sliding group cut to its window (3 blocks) and a full group (8 blocks).
    let offered: Vec<u32> = [26, 27, 28].into_iter().chain(1..=8).collect();
    let mut s = set(offered.clone(), 2, |b, r| b * 10 + r as u32);
    s.group_lens = vec![3, 8];
    assert_eq!((s.group_of(2), s.group_of(3), s.group_of(10)), (0, 1, 1));
    // D loads the window's 3 blocks and, after a 2-block prefix hit, 6 of the full group's.
    let local: Vec<u32> = [206, 207, 208].into_iter().chain(103..=108).collect();
    let mut e = expect(local, Some(offered));
    e.num_tokens = 1000;
    e.group_lens = vec![3, 6];
    e.clipped = vec![true, false];
    let p = pairs(&e, &s, &s.regions, 1, 1, 128).unwrap();
    let got: Vec<(u32, u32)> = p.iter().map(|&(b, row)| (b, s.offered[s.checked[row] as usize])).collect();
    let want: Vec<(u32, u32)> = vec![(206, 26), (207, 27), (208, 28), (103, 3), (104, 4), (105, 5), (106, 6), (107, 7), (108, 8)];
    assert_eq!(got, want);
    // Groups that do not line up are not compared.
    e.group_lens = vec![9];
    assert!(pairs(&e, &s, &s.regions, 1, 1, 128).is_err());
    e.group_lens = vec![4, 5];
    e.clipped = vec![true, false];
    assert!(pairs(&e, &s, &s.regions, 1, 1, 128).unwrap_err().contains("group 0"));
}
