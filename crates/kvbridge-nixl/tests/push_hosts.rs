//! Push mode across hosts over real parts (NIXL WRITEs, the ZMQ side channel): P's two TP
//! ranks listen on different addresses (127.0.0.2 and 127.0.0.3, as two nodes would). D
//! (TP 1) knows only P's directory (`remote_host:remote_port`, rank 0): it registers with
//! rank 0 there and with rank 1 where rank 0's rank table says. A decoy that accepts and
//! never answers sits where the single-host arithmetic would send D (127.0.0.2, port + 1).
//! Both P ranks write their heads into D's blocks, checked byte for byte; a second request
//! registers at once from the table D kept.
use std::net::TcpListener;
use std::time::{Duration, Instant};

mod common;
use common::{free_port_pair, poll_until, runtime_or_skip};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::scheduler::{FinishReason, PushScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;

const TOKENS: u64 = 40;
const HOSTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

fn spec(tp: u32, rank: u32) -> Spec {
    Spec { tp_size: tp, tp_rank: rank, ..Spec::dense(2, 4, 32, 16, 32, CacheLayout::Nhd) }
}

fn config(role: &str, engine: &str, port: u16, tp: u32, rank: u32, extra: &str) -> ConnectorConfig {
    let compat = CompatInfo { model: "push-hosts".into(), block_size: 16, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"transfer_mode":"push","push_layerwise":false,"side_channel_host":"127.0.0.1","side_channel_port":{port},"handshake_timeout":2,"handshake_retries":0,"push_registration_timeout":10{extra}}}}}"#
    );
    ConnectorConfig::from_json(&json, EngineInfo { tp_size: tp, tp_rank: rank, compat, ..Default::default() }, |_| None).expect("config")
}

#[test]
fn d_registers_with_p_ranks_on_different_hosts_from_the_directory_table() {
    if !runtime_or_skip() {
        return;
    }
    let (pp, dp) = (free_port_pair(), free_port_pair());
    let decoy = TcpListener::bind((HOSTS[0], pp + 1)).expect("decoy");
    decoy.set_nonblocking(true).expect("nonblocking");
    let hosts = format!(r#","side_channel_hosts":["{}","{}"]"#, HOSTS[0], HOSTS[1]);
    let (mut p, mut p_caches) = (Vec::new(), Vec::new());
    for q in 0..2 {
        let c = Cache::new(spec(2, q));
        let w = kvbridge_nixl::new_worker(config("kv_producer", "P", pp, 2, q, &hosts), None).expect("P worker");
        w.register(&c.tensors(), 32).expect("P register");
        p.push(w);
        p_caches.push(c);
    }
    let mut p_sched = PushScheduler::new(config("kv_producer", "P", pp, 2, 0, &hosts));
    let d_cfg = config("kv_consumer", "D", dp, 1, 0, "");
    let mut d_cache = Cache::new(spec(1, 0));
    let d = kvbridge_nixl::new_worker(d_cfg.clone(), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D register");
    let mut d_sched = PushScheduler::new(d_cfg);

    for (i, t0) in [(1, Instant::now()), (2, Instant::now())] {
        let (p_req, d_req, transfer) = (format!("p{i}"), format!("d{i}"), format!("t{i}"));
        let d_params = format!(
            r#"{{"do_remote_prefill":true,"transfer_mode":"push","transfer_id":"{transfer}","remote_engine_id":"P","remote_host":"{}","remote_port":{pp},"tp_size":2}}"#,
            HOSTS[0]
        );
        assert_eq!(d_sched.get_num_new_matched_tokens(&d_req, TOKENS, 0, Some(&d_params)).num_tokens, TOKENS);
        d_sched.update_state_after_alloc(&d_req, &[10, 11, 12], TOKENS);
        d.start_load(&d_sched.build_connector_meta().to_bytes().expect("metadata")).expect("D start_load");
        while p.iter().map(|w| w.push_stats().registrations_accepted).sum::<u64>() < 2 * i {
            assert!(t0.elapsed() < Duration::from_secs(15), "P ranks accepted {:?}", p.iter().map(|w| w.push_stats()).collect::<Vec<_>>());
            let f = d.get_finished();
            assert!(f.failed_recving.is_empty(), "D's registration failed (dialled the decoy?): {f:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        // P prefills (every rank fills its heads) and finishes: each rank writes to D.
        let p_params = format!(r#"{{"do_remote_decode":true,"transfer_id":"{transfer}"}}"#);
        p_sched.get_num_new_matched_tokens(&p_req, TOKENS, 0, Some(&p_params));
        for c in &mut p_caches {
            c.fill(&[vec![3, 4, 5]], TOKENS);
        }
        let f = p_sched.request_finished(&p_req, &[3, 4, 5], FinishReason::LengthCapped, TOKENS, Some(&p_params), now_unix());
        assert!(f.delay_free);
        let md = p_sched.build_connector_meta().to_bytes().expect("metadata");
        for w in &p {
            w.start_load(&md).expect("P start_load");
        }
        let f = poll_until(&d, 20, |f| !f.recving.is_empty() || !f.failed_recving.is_empty());
        assert_eq!((f.recving, f.failed_recving), (vec![d_req.clone()], vec![]));
        for w in &p {
            let f = poll_until(w, 20, |f| !f.sending.is_empty());
            assert_eq!(f.sending, vec![p_req.clone()], "each P rank frees its blocks once it wrote them");
        }
        d_cache.check(&[vec![10, 11, 12]], TOKENS).expect("both P ranks' heads written");
        d_cache.reset();
        for c in &mut p_caches {
            c.reset();
        }
    }
    let s: Vec<_> = p.iter().map(|w| w.push_stats()).collect();
    assert!(s.iter().all(|s| s.writes_ok == 2 && s.writes_failed == 0), "{s:?}");
    assert!(decoy.accept().is_err(), "D dialled rank 1 by port arithmetic at {}:{}", HOSTS[0], pp + 1);
}
