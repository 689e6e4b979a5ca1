//! Multi-node ranks over real parts (NIXL READs, the ZMQ side channel): P's two TP ranks
//! listen on different hosts (127.0.0.2 and 127.0.0.3, as two nodes would), D (TP 1) is
//! given only P's directory address (`remote_host:remote_port`, rank 0) and reads both
//! ranks. A decoy that accepts and never answers sits where the single-node arithmetic
//! would send D for rank 1 (127.0.0.2, port + 1): D must dial rank 1 where rank 0's table
//! says, or its handshake times out. Every byte D needs is checked.
use std::net::TcpListener;
use std::time::{Duration, Instant};

mod common;
use common::{free_port_pair, offer, runtime_or_skip};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::scheduler::{PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;

const TOKENS: u64 = 40;
const HOSTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

fn spec(tp: u32, rank: u32) -> Spec {
    Spec { tp_size: tp, tp_rank: rank, ..Spec::dense(2, 4, 32, 16, 32, CacheLayout::Nhd) }
}

fn config(role: &str, engine: &str, port: u16, tp: u32, rank: u32, extra: &str) -> ConnectorConfig {
    let compat = CompatInfo { model: "ranks".into(), block_size: 16, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{port},"handshake_timeout":2,"handshake_retries":0{extra}}}}}"#
    );
    ConnectorConfig::from_json(&json, EngineInfo { tp_size: tp, tp_rank: rank, compat, ..Default::default() }, |_| None).expect("config")
}

#[test]
fn d_reads_p_ranks_on_different_hosts_from_the_directory_table() {
    if !runtime_or_skip() {
        return;
    }
    let (pp, dp) = (free_port_pair(), free_port_pair());
    let decoy = TcpListener::bind((HOSTS[0], pp + 1)).expect("decoy");
    decoy.set_nonblocking(true).expect("nonblocking");
    let hosts = format!(r#","side_channel_hosts":["{}","{}"]"#, HOSTS[0], HOSTS[1]);
    let (mut p, mut p_caches) = (Vec::new(), Vec::new());
    for q in 0..2 {
        let mut c = Cache::new(spec(2, q));
        c.fill(&[vec![3, 4, 5]], TOKENS);
        let w = kvbridge_nixl::new_worker(config("kv_producer", "P", pp, 2, q, &hosts), None).expect("P worker");
        w.register(&c.tensors(), 32).expect("P register");
        p.push(w);
        p_caches.push(c);
    }
    // Every rank serves the whole table: rank q at its own host.
    let table = p[1].rank_table();
    assert_eq!(
        table.iter().map(|a| (a.tp_rank, a.host.as_str(), a.port)).collect::<Vec<_>>(),
        vec![(0, HOSTS[0], pp), (1, HOSTS[1], pp + 1)]
    );

    let mut p_sched = PullScheduler::new(config("kv_producer", "P", pp, 2, 0, &hosts));
    let params = offer(&mut p_sched, &p, "p1", &[3, 4, 5], TOKENS);
    assert_eq!((params["remote_host"].as_str(), params["remote_port"].as_u64()), (Some(HOSTS[0]), Some(u64::from(pp))));

    let d_cfg = config("kv_consumer", "D", dp, 1, 0, "");
    let d_cache = Cache::new(spec(1, 0));
    let d = kvbridge_nixl::new_worker(d_cfg.clone(), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D register");
    let mut d_sched = PullScheduler::new(d_cfg);
    assert_eq!(d_sched.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&params.to_string())).num_tokens, TOKENS);
    d_sched.update_state_after_alloc("d1", &[10, 11, 12], TOKENS);
    d.start_load(&d_sched.build_connector_meta().to_bytes().expect("metadata")).expect("D start_load");

    let t0 = Instant::now();
    let (mut done, mut sent) = (Vec::new(), [false, false]);
    while done.is_empty() || !sent.iter().all(|&s| s) {
        assert!(t0.elapsed() < Duration::from_secs(15), "load unfinished: done {done:?}, P freed {sent:?}, D {}", d.accounting());
        let f = d.get_finished();
        assert!(f.failed_recving.is_empty(), "the load failed: {f:?} (D dialled the decoy?)");
        done.extend(f.recving);
        for (q, w) in p.iter().enumerate() {
            sent[q] |= w.get_finished().sending.iter().any(|r| r == "p1");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    d_cache.check(&[vec![10, 11, 12]], TOKENS).expect("every byte of both P ranks read");
    // Both P ranks freed p1: each got D's notification, which rides on its READ.
    assert!(d.stats().bytes_read > 0 && sent == [true, true]);
    assert_eq!(d.stats().handshakes_ok, 1);
    assert!(decoy.accept().is_err(), "D dialled rank 1 by port arithmetic at {}:{}", HOSTS[0], pp + 1);

    // D shuts down with requests it has heard of but not read (P holds p2, then p3): it
    // tells both P ranks, at their own hosts, and they free them at once instead of at
    // lease expiry.
    let params = offer(&mut p_sched, &p, "p2", &[6, 7, 8], TOKENS).to_string();
    let mut d_sched = PullScheduler::new(config("kv_consumer", "D", dp, 1, 0, ""));
    d_sched.get_num_new_matched_tokens("d2", TOKENS, 0, Some(&params));
    d_sched.tick(now_unix()); // the heartbeat batch falls due
    d.start_load(&d_sched.build_connector_meta().to_bytes().expect("metadata")).expect("D start_load (heartbeats)");
    let t0 = Instant::now();
    while p.iter().any(|w| w.accounting()["heartbeats_received"] == 0) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no heartbeat reached both P ranks");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.iter().all(|w| w.accounting()["held_requests"] == 1));
    // p3 reaches D after that batch (the next one is a sixth of the lease away): D's
    // scheduler reports it in the step's `tracked`, so the shutdown releases it too.
    let params = offer(&mut p_sched, &p, "p3", &[13, 14, 15], TOKENS).to_string();
    d_sched.get_num_new_matched_tokens("d3", TOKENS, 0, Some(&params));
    let md = d_sched.build_connector_meta();
    assert!(md.heartbeats.is_empty() && md.tracked.len() == 1, "no batch due, p3 tracked: {md:?}");
    d.start_load(&md.to_bytes().expect("metadata")).expect("D start_load (tracked)");
    assert!(p.iter().all(|w| w.accounting()["held_requests"] == 2));
    assert_eq!(d.shutdown(Duration::from_secs(5)), 4, "each P rank released p2 and p3");
    for w in &p {
        let a = w.accounting();
        assert_eq!((a["held_requests"].as_u64(), a["expired_leases"].as_u64()), (Some(0), Some(0)), "{a}");
        let freed = w.get_finished().sending;
        assert!(["p2", "p3"].iter().all(|r| freed.iter().any(|f| f == r)), "P reports p2's and p3's blocks free: {freed:?}");
    }
    assert!(decoy.accept().is_err(), "a heartbeat went to the port arithmetic's address");
}
