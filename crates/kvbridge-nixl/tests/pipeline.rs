//! Pipeline parallelism over real parts (NIXL READs, the ZMQ side channel), with different
//! stage cuts on P and D. A 4-layer model:
//!
//! - P: PP 2 × TP 2, stages `[0, 1] | [2, 3]`, every rank its own listener
//!   (`base + pp * tp_size + tp`);
//! - D: PP 3 × TP 1, stages `[0] | [1, 2] | [3]`: D stage 1 reads layer 1 from P stage 0
//!   and layer 2 from P stage 1.
//!
//! D is given only P's directory (rank (0, 0)). Every D stage reads only its own layers
//! (checked byte for byte, other layers' memory untouched) from the P stage that holds
//! them, and each P rank frees the request only once every D stage that reads it is done:
//! D stage 1 is started last, and until it finishes P holds the request on both stages.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, offer, runtime_or_skip};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::scheduler::{PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 40;
/// D's stages: (first layer, layers).
const D_STAGES: [(u32, u32); 3] = [(0, 1), (1, 2), (3, 1)];

fn spec(tp: u32, rank: u32, first_layer: u32, layers: u32) -> Spec {
    Spec { tp_size: tp, tp_rank: rank, first_layer, ..Spec::dense(layers, 4, 32, 16, 32, CacheLayout::Nhd) }
}

fn config(role: &str, engine: &str, port: u16, tp: (u32, u32), pp: (u32, u32)) -> ConnectorConfig {
    let compat = CompatInfo { model: "pipeline".into(), block_size: 16, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{port},"handshake_timeout":10}}}}"#
    );
    let info = EngineInfo { tp_size: tp.0, tp_rank: tp.1, pp_size: pp.0, pp_rank: pp.1, compat, ..Default::default() };
    ConnectorConfig::from_json(&json, info, |_| None).expect("config")
}

/// A base port with the next `n - 1` free too.
fn free_ports(n: u16) -> u16 {
    loop {
        let a = free_port();
        if a < 60000 && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", a + i)).is_ok()) {
            return a;
        }
    }
}

fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn d_stages_read_their_layers_from_the_p_stages_that_hold_them() {
    if !runtime_or_skip() {
        return;
    }
    let (pp_port, dp_port) = (free_ports(4), free_ports(3));
    // P: 2 stages x 2 TP ranks, layers [0, 1] and [2, 3].
    let (mut p, mut p_caches): (Vec<NixlWorker>, Vec<Cache>) = (Vec::new(), Vec::new());
    for stage in 0..2 {
        for q in 0..2 {
            let mut c = Cache::new(spec(2, q, 2 * stage, 2));
            c.fill(&[vec![3, 4, 5]], TOKENS);
            let w = kvbridge_nixl::new_worker(config("kv_producer", "P", pp_port, (2, q), (2, stage)), None).expect("P worker");
            w.register(&c.tensors(), 32).expect("P register");
            p.push(w);
            p_caches.push(c);
        }
    }
    assert_eq!(
        p[3].rank_table().iter().map(|a| (a.pp_rank, a.tp_rank, a.port)).collect::<Vec<_>>(),
        vec![(0, 0, pp_port), (0, 1, pp_port + 1), (1, 0, pp_port + 2), (1, 1, pp_port + 3)]
    );
    let mut p_sched = PullScheduler::new(config("kv_producer", "P", pp_port, (2, 0), (2, 0)));
    let params = offer(&mut p_sched, &p, "p1", &[3, 4, 5], TOKENS);
    assert_eq!(params["remote_port"].as_u64(), Some(u64::from(pp_port)), "P advertises its directory");

    // D: 3 stages x TP 1; every stage knows every stage's layers (vLLM: exchanged at start-up).
    let stage_layers: Vec<Vec<String>> =
        D_STAGES.iter().map(|&(first, n)| (first..first + n).map(|l| format!("model.layers.{l}")).collect()).collect();
    let (mut d, mut d_caches) = (Vec::new(), Vec::new());
    for (stage, &(first, n)) in D_STAGES.iter().enumerate() {
        let c = Cache::new(spec(1, 0, first, n));
        let w = kvbridge_nixl::new_worker(config("kv_consumer", "D", dp_port, (1, 0), (3, stage as u32)), None).expect("D worker");
        w.register(&c.tensors(), 32).expect("D register");
        w.set_stage_layers(stage_layers.clone());
        d.push(w);
        d_caches.push(c);
    }
    let mut d_sched = PullScheduler::new(config("kv_consumer", "D", dp_port, (1, 0), (3, 0)));
    assert_eq!(d_sched.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&params.to_string())).num_tokens, TOKENS);
    d_sched.update_state_after_alloc("d1", &[10, 11, 12], TOKENS);
    let d_md = d_sched.build_connector_meta().to_bytes().expect("metadata");

    // Stages 0 and 2 first: each reads one P stage, which must keep holding p1 for stage 1.
    let sent = |p: &[NixlWorker], freed: &mut [bool; 4]| {
        for (i, w) in p.iter().enumerate() {
            freed[i] |= w.get_finished().sending.iter().any(|r| r == "p1");
        }
    };
    let mut freed = [false; 4];
    for s in [0, 2] {
        d[s].start_load(&d_md).expect("D start_load");
    }
    let mut done = [false; 3];
    wait("D stages 0 and 2 load", || {
        for s in [0, 2] {
            let f = d[s].get_finished();
            assert!(f.failed_recving.is_empty(), "stage {s} failed: {f:?} {}", d[s].accounting());
            done[s] |= f.recving.iter().any(|r| r == "d1");
        }
        done[0] && done[2]
    });
    // Both P stages got their notifications from stages 0 / 2 (one of two each); let any
    // straggler land, then check nobody freed early.
    // (P takes notifications in get_finished, as vLLM polls it every step.)
    wait("P counts the first notifications", || {
        sent(&p, &mut freed);
        p.iter().all(|w| w.accounting()["notifs_received"].as_u64() >= Some(1))
    });
    std::thread::sleep(Duration::from_millis(200));
    sent(&p, &mut freed);
    assert_eq!(freed, [false; 4], "a P rank freed p1 before D stage 1 (which reads both P stages) read it");
    assert!(p.iter().all(|w| w.accounting()["held_requests"] == 1));

    d[1].start_load(&d_md).expect("D start_load");
    wait("D stage 1 loads and every P rank frees p1", || {
        let f = d[1].get_finished();
        assert!(f.failed_recving.is_empty(), "stage 1 failed: {f:?} {}", d[1].accounting());
        done[1] |= f.recving.iter().any(|r| r == "d1");
        sent(&p, &mut freed);
        done[1] && freed.iter().all(|&x| x)
    });
    for (s, c) in d_caches.iter().enumerate() {
        c.check(&[vec![10, 11, 12]], TOKENS).unwrap_or_else(|e| panic!("D stage {s}: {e}"));
        let st = d[s].stats();
        assert_eq!(st.handshakes_ok, 1, "stage {s}");
        // Each D stage reads exactly its own layers: layers x heads x tokens (whole 16-token
        // blocks) x content bytes.
        assert_eq!(st.bytes_read, u64::from(D_STAGES[s].1) * 4 * TOKENS.div_ceil(16) * 16 * 32, "stage {s} bytes");
    }
    for w in &p {
        let a = w.accounting();
        assert_eq!((a["held_requests"].as_u64(), a["expired_leases"].as_u64()), (Some(0), Some(0)), "{a}");
    }
}
