//! Multi-node ranks: a D rank handshakes with P's rank 0 first (the directory, at the
//! `remote_host:remote_port` of the params), then dials every other P rank it reads from
//! where rank 0's table says, on whatever host that rank runs.
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::layout::{KvLayout, MemKind, TensorInfo};
use kvbridge_core::ranks::RankAddr;
use kvbridge_core::scheduler::{PullScheduler, SchedulerSide};
use kvbridge_core::wire::{self, AgentMetadata, ConnectorMetadata, HandshakePayload};
use kvbridge_core::worker::pull::{Action, PullWorker};

const PEER: &str = "P@127.0.0.2:7000";

fn cfg(engine_id: &str, extra: &str, tp_size: u32, tp_rank: u32, pp: (u32, u32)) -> ConnectorConfig {
    let json =
        format!(r#"{{"kv_role":"kv_producer","engine_id":"{engine_id}","kv_connector_extra_config":{{"side_channel_port":7000{extra}}}}}"#);
    let compat = CompatInfo { model: "m".into(), block_size: 16, ..Default::default() };
    ConnectorConfig::from_json(&json, EngineInfo { tp_size, tp_rank, pp_size: pp.0, pp_rank: pp.1, compat, ..Default::default() }, |_| None)
        .unwrap()
}

fn layout() -> KvLayout {
    let t = TensorInfo::opaque("l0", 0x10000, &[32, 128], &[128, 1], 2, MemKind::Dram, 0);
    KvLayout::from_tensors(&[t], 32, 0, 1).unwrap()
}

/// Rank `rank` of P (TP `tp`) answering, with rank table `ranks`.
fn payload(engine: &str, rank: u32, tp: u32, ranks: Vec<RankAddr>) -> Vec<u8> {
    let md = AgentMetadata {
        engine_id: engine.into(),
        agent_name: format!("{engine}-{rank}"),
        tp_rank: rank,
        tp_size: tp,
        block_size: 16,
        blocks_per_logical: 1,
        regions: layout().regions,
        nixl_md: vec![1],
        staging_regions: vec![],
    };
    let p = HandshakePayload { compat_hash: "H".into(), agent_metadata: wire::encode("m", &md).unwrap(), ranks, ..Default::default() };
    wire::encode("p", &p).unwrap()
}

fn table() -> Vec<RankAddr> {
    vec![
        RankAddr { pp_rank: 0, tp_rank: 0, host: "127.0.0.2".into(), port: 7000 },
        RankAddr { pp_rank: 0, tp_rank: 1, host: "127.0.0.3".into(), port: 7001 },
    ]
}

/// A D request for P's block 4, P having TP `tp`.
fn recv(tp: u32) -> ConnectorMetadata {
    let d_cfg = ConnectorConfig { role: kvbridge_core::config::KvRole::Consumer, ..cfg("D", "", 1, 0, (1, 0)) };
    let mut d = PullScheduler::new(d_cfg);
    let params = serde_json::json!({"do_remote_prefill": true, "remote_engine_id": "P", "remote_request_id": "r",
        "remote_block_ids": [[4]], "remote_host": "127.0.0.2", "remote_port": 7000, "tp_size": tp})
    .to_string();
    d.get_num_new_matched_tokens("d1", 16, 0, Some(&params));
    d.update_state_after_alloc("d1", &[1], 16);
    d.build_connector_meta()
}

fn worker(tp_size: u32, tp_rank: u32) -> PullWorker {
    let mut w = PullWorker::new("D".into(), tp_rank, tp_size, "H".into(), true);
    w.on_registered(layout(), 16);
    w
}

fn handshakes(a: &[Action]) -> Vec<(u32, String, u16)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Handshake { rank, host, port, .. } => Some((*rank, host.clone(), *port)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_rank_reading_another_p_rank_asks_the_directory_then_dials_that_rank_where_it_lives() {
    // D TP 2, rank 1 reads P rank 1 only (equal TP): rank 0 answers as the directory.
    let mut w = worker(2, 1);
    let a = w.on_metadata(recv(2), 0.0);
    assert_eq!(handshakes(&a), vec![(0, "127.0.0.2".into(), 7000)]);
    let a = w.on_handshake_payload(PEER, 0, "127.0.0.2:7000", Ok(payload("P", 0, 2, table())), 0.0, 0.0);
    assert_eq!(handshakes(&a), vec![(1, "127.0.0.3".into(), 7001)], "rank 1 dialled at its own host");
    assert!(!a.iter().any(|a| matches!(a, Action::AddRemote { .. })), "rank 0 is not read from: not loaded");
    let a = w.on_handshake_payload(PEER, 1, "127.0.0.3:7001", Ok(payload("P", 1, 2, table())), 0.0, 0.0);
    assert!(matches!(&a[..], [Action::AddRemote { rank: 1, .. }]), "{a:?}");
    let a = w.on_remote_added(PEER, 1, Ok(()), 0.0);
    assert!(matches!(&a[..], [Action::Read { key, .. }] if key == "P@127.0.0.2:7000#1"), "{a:?}");
}

#[test]
fn a_rank_reading_every_p_rank_takes_rank_0_and_dials_the_rest_from_its_table() {
    // D TP 1 reads both P ranks: rank 0's answer counts as its handshake too.
    let mut w = worker(1, 0);
    let a = w.on_metadata(recv(2), 0.0);
    assert_eq!(handshakes(&a), vec![(0, "127.0.0.2".into(), 7000)]);
    let a = w.on_handshake_payload(PEER, 0, "127.0.0.2:7000", Ok(payload("P", 0, 2, table())), 0.0, 0.0);
    assert_eq!(handshakes(&a), vec![(1, "127.0.0.3".into(), 7001)]);
    // Rank 1's answer completes the set: the plan is tried (this opaque layout cannot be
    // split by heads, so it is refused) and nothing is asked of rank 0 again.
    let a = w.on_handshake_payload(PEER, 1, "127.0.0.3:7001", Ok(payload("P", 1, 2, table())), 0.0, 0.0);
    assert!(handshakes(&a).is_empty(), "{a:?}");
}

#[test]
fn a_directory_without_a_table_means_single_node_port_arithmetic() {
    let mut w = worker(2, 1);
    w.on_metadata(recv(2), 0.0);
    let a = w.on_handshake_payload(PEER, 0, "127.0.0.2:7000", Ok(payload("P", 0, 2, vec![])), 0.0, 0.0);
    assert_eq!(handshakes(&a), vec![(1, "127.0.0.2".into(), 7001)]);
}

#[test]
fn a_directory_that_is_another_engine_or_unreachable_fails_the_request() {
    for res in [Ok(payload("Q", 0, 2, table())), Err(kvbridge_core::error::HandshakeError::Timeout { addr: "a".into(), timeout_ms: 1 })] {
        let mut w = worker(2, 1);
        w.on_metadata(recv(2), 0.0);
        let a = w.on_handshake_payload(PEER, 0, "127.0.0.2:7000", res, 0.0, 0.0);
        assert!(handshakes(&a).is_empty(), "{a:?}");
        let out = w.base.take_finished();
        assert_eq!(out.failed_recving, vec!["d1".to_string()]);
        // The peer is forgotten: the next request starts over at the directory.
        let a = w.on_metadata(recv(2), 1.0);
        assert_eq!(handshakes(&a), vec![(0, "127.0.0.2".into(), 7000)]);
    }
}

#[test]
fn ranks_listen_by_dp_pp_tp_at_their_own_hosts() {
    let hosts = r#","side_channel_hosts":["10.0.0.1","10.0.0.2","10.0.0.3","10.0.0.4"]"#;
    let mut c = cfg("P", hosts, 2, 1, (1, 0));
    assert_eq!((c.local_host(), c.local_listener_port()), ("10.0.0.2", Some(7001)));
    // Stage rows: every (pp, tp) rank its own port and host.
    (c.pp_size, c.pp_rank) = (2, 1);
    assert_eq!((c.local_host(), c.local_listener_port()), ("10.0.0.4", Some(7003)));
    assert_eq!((c.advertised_host(), c.advertised_port()), ("10.0.0.1", Some(7000)));
    let t = c.rank_table();
    assert_eq!(
        t.iter().map(|a| (a.pp_rank, a.tp_rank, a.host.as_str(), a.port)).collect::<Vec<_>>(),
        vec![(0, 0, "10.0.0.1", 7000), (0, 1, "10.0.0.2", 7001), (1, 0, "10.0.0.3", 7002), (1, 1, "10.0.0.4", 7003)]
    );
    // A DP rank's listeners start past the other DP ranks' (base + dp * pp * tp).
    c.dp_rank = 1;
    assert_eq!((c.advertised_port(), c.local_listener_port()), (Some(7004), Some(7007)));
    let json = r#"{"kv_role":"kv_producer","engine_id":"P","kv_connector_extra_config":{"transfer_mode":"push"}}"#;
    let e = ConnectorConfig::from_json(json, EngineInfo { pp_size: 2, ..Default::default() }, |_| None).unwrap_err();
    assert!(e.to_string().contains("pipeline_parallel_size") && e.to_string().contains("pull"), "{e}");
    let json = r#"{"kv_role":"kv_producer","engine_id":"P"}"#;
    let c = ConnectorConfig::from_json(json, EngineInfo { pp_size: 2, pp_rank: 1, ..Default::default() }, |_| None).unwrap();
    assert_eq!((c.pp_size, c.pp_rank), (2, 1), "pull mode runs with pipeline parallelism");
    // No per-rank hosts: every rank at side_channel_host.
    let c = cfg("P", r#","side_channel_host":"h""#, 2, 0, (1, 0));
    assert!(c.rank_table().iter().all(|a| a.host == "h"));
    for bad in [r#","side_channel_hosts":"h""#, r#","side_channel_hosts":[""]"#, r#","side_channel_hosts":[1]"#] {
        let json = format!(r#"{{"kv_role":"kv_producer","engine_id":"P","kv_connector_extra_config":{{"side_channel_port":7000{bad}}}}}"#);
        let e = ConnectorConfig::from_json(&json, EngineInfo::default(), |_| None).unwrap_err();
        assert!(e.to_string().contains("side_channel_hosts"), "{e}");
    }
}

#[test]
fn a_directory_listing_pipeline_stages_is_dialled_stage_by_stage_and_a_hostile_one_is_refused() {
    // P: PP 2 x TP 2 on four hosts. D TP 2 rank 1 reads P TP rank 1 of both stages
    // (global ranks 1 and 3), each where the table says.
    let mut t = table();
    t.push(RankAddr { pp_rank: 1, tp_rank: 0, host: "127.0.0.4".into(), port: 7002 });
    t.push(RankAddr { pp_rank: 1, tp_rank: 1, host: "127.0.0.5".into(), port: 7003 });
    let mut w = worker(2, 1);
    w.on_metadata(recv(2), 0.0);
    let a = w.on_handshake_payload(PEER, 0, "127.0.0.2:7000", Ok(payload("P", 0, 2, t.clone())), 0.0, 0.0);
    assert_eq!(handshakes(&a), vec![(1, "127.0.0.3".into(), 7001), (3, "127.0.0.5".into(), 7003)]);
    // A table claiming 300 stages: refused before any dialling, the request failed.
    let mut w = worker(2, 1);
    w.on_metadata(recv(2), 0.0);
    t.push(RankAddr { pp_rank: 299, tp_rank: 1, host: "10.9.9.9".into(), port: 9 });
    let a = w.on_handshake_payload(PEER, 0, "127.0.0.2:7000", Ok(payload("P", 0, 2, t)), 0.0, 0.0);
    assert!(handshakes(&a).is_empty(), "{a:?}");
    assert_eq!(w.base.take_finished().failed_recving, vec!["d1".to_string()]);
}
