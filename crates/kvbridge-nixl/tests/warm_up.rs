//! First contact off the request path (`kv_peers`), over real parts: D handshakes with,
//! loads and plans P at start-up, so its first request posts its READ inside the very
//! `start_load` that brings it (no handshake on the request path), and every byte arrives.
//! Without `kv_peers` the same first request has to wait for the handshake.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, local_config, runtime_or_skip};
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 40;

fn spec() -> Spec {
    Spec::dense(2, 2, 32, 16, 32, CacheLayout::Nhd)
}

/// P prefilled `req` into blocks 3..6 and leased them: its params.
fn p_prefill(sched: &mut PullScheduler, p: &NixlWorker, cache: &mut Cache, req: &str) -> String {
    cache.fill(&[vec![3, 4, 5]], TOKENS);
    let dec = r#"{"do_remote_decode":true}"#;
    sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(dec));
    let f = sched.request_finished(req, &[3, 4, 5], FinishReason::LengthCapped, TOKENS, Some(dec), now_unix());
    p.start_load(&sched.build_connector_meta().to_bytes().unwrap()).unwrap();
    f.kv_transfer_params.unwrap().to_string()
}

/// D's first request (blocks 10..13): whether its READ was posted (or done) by the end of
/// the `start_load` that brought it, then the load to its end; D's cache checked.
fn first_request(warm: bool) -> (bool, u64) {
    let (pp, dp) = (free_port(), free_port());
    let mut p_cache = Cache::new(spec());
    let p = kvbridge_nixl::new_worker(local_config("kv_producer", "P", pp, "warm", ""), None).unwrap();
    p.register(&p_cache.tensors(), 32).unwrap();
    let peers = if warm { format!(",\"kv_peers\":[\"127.0.0.1:{pp}\"]") } else { String::new() };
    let d_cfg = local_config("kv_consumer", "D", dp, "warm", &peers);
    assert_eq!(d_cfg.peers.len(), usize::from(warm));
    let d_cache = Cache::new(spec());
    let d = kvbridge_nixl::new_worker(d_cfg.clone(), None).unwrap();
    d.register(&d_cache.tensors(), 32).unwrap();
    if warm {
        // The warm-up runs on the side-channel thread: P gets loaded with no request.
        let t0 = Instant::now();
        while d.accounting()["ready_peers"] != 1 {
            assert!(t0.elapsed() < Duration::from_secs(10), "D never warmed up P: {}", d.accounting());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(d.stats().handshakes_ok, 1);
    }
    let mut p_sched = PullScheduler::new(local_config("kv_producer", "P", pp, "warm", ""));
    let params = p_prefill(&mut p_sched, &p, &mut p_cache, "p1");
    let mut d_sched = PullScheduler::new(d_cfg);
    let m = d_sched.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&params));
    assert_eq!(m.num_tokens, TOKENS);
    d_sched.update_state_after_alloc("d1", &[10, 11, 12], TOKENS);
    d.start_load(&d_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
    let posted_at_once = d.in_flight() > 0 || d.stats().reads_ok > 0;
    let t0 = Instant::now();
    let mut done = Vec::new();
    while done.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the load never finished");
        let f = d.get_finished();
        assert!(f.failed_recving.is_empty(), "{f:?}");
        done = f.recving;
        let pf = p.get_finished();
        p_sched.update_connector_output(&pf.sending, &[]);
        std::thread::sleep(Duration::from_millis(1));
    }
    d_cache.check(&[vec![10, 11, 12]], TOKENS).expect("every byte read");
    (posted_at_once, d.stats().handshakes_ok)
}

#[test]
fn kv_peers_takes_first_contact_off_the_request_path() {
    if !runtime_or_skip() {
        return;
    }
    let (at_once, handshakes) = first_request(true);
    assert!(at_once, "with kv_peers the first READ is posted inside start_load");
    assert_eq!(handshakes, 1, "the warm-up handshake served the request; no second one");
    // The control: without kv_peers, the first request waits for its handshake.
    let (at_once, handshakes) = first_request(false);
    assert!(!at_once, "without kv_peers the first READ waits for the handshake");
    assert_eq!(handshakes, 1);
}
