//! Push mode, a D rank whose layout P cannot write (P: NHD; D: vLLM-CPU's dim-major K, which
//! the push plan refuses): P tells D at once with a failure notification, so D fails the
//! request in well under its registration timeout (60 s here) instead of waiting it out, and
//! P frees its blocks. Real schedulers, drivers, ZMQ side channels and NIXL agents.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, local_config, runtime_or_skip};
use kvbridge_core::scheduler::{FinishReason, PushScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;

const TOKENS: u64 = 40;

#[test]
fn a_d_layout_p_cannot_write_fails_d_at_once() {
    if !runtime_or_skip() {
        return;
    }
    let cfg = |role: &str, engine: &str, port: u16| {
        local_config(role, engine, port, "push-refused", r#","transfer_mode":"push","push_registration_timeout":60,"push_layerwise":false"#)
    };
    let (pp, dp) = (free_port(), free_port());
    let mut p_cache = Cache::new(Spec::dense(2, 2, 32, 16, 32, CacheLayout::Nhd));
    let p = kvbridge_nixl::new_worker(cfg("kv_producer", "P", pp), None).expect("P worker");
    p.register(&p_cache.tensors(), 32).expect("P register");
    let d_cache = Cache::new(Spec::dense(2, 2, 32, 16, 32, CacheLayout::CpuVec));
    let d = kvbridge_nixl::new_worker(cfg("kv_consumer", "D", dp), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D register");
    let (mut ps, mut ds) = (PushScheduler::new(cfg("kv_producer", "P", pp)), PushScheduler::new(cfg("kv_consumer", "D", dp)));
    // D registers first; P prefills and finishes.
    let d_params = format!(
        r#"{{"do_remote_prefill":true,"transfer_mode":"push","transfer_id":"t-x","remote_engine_id":"P","remote_host":"127.0.0.1","remote_port":{pp},"tp_size":1}}"#
    );
    let local = [10u32, 11, 12];
    ds.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&d_params));
    ds.update_state_after_alloc("d1", &local, TOKENS);
    d.start_load(&ds.build_connector_meta().to_bytes().unwrap()).unwrap();
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-x"}"#;
    let blocks = [3u32, 4, 5];
    ps.get_num_new_matched_tokens("p1", TOKENS, 0, Some(p_params));
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
    p_cache.fill(&[blocks.to_vec()], TOKENS);
    p.wait_for_save();
    assert!(ps.request_finished("p1", &blocks, FinishReason::LengthCapped, TOKENS, Some(p_params), now_unix()).delay_free);
    let t0 = Instant::now();
    let (mut failed, mut released) = (None, false);
    while failed.is_none() || !released {
        assert!(t0.elapsed() < Duration::from_secs(20), "D failed: {failed:?}, P released: {released}");
        p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
        d.start_load(&ds.build_connector_meta().to_bytes().unwrap()).unwrap();
        let (pf, df) = (p.get_finished(), d.get_finished());
        if df.failed_recving.iter().any(|r| r == "d1") {
            assert!(df.recving.contains(&"d1".to_string()), "a failed load is also finished: {df:?}");
            assert_eq!(df.invalid_block_ids.len(), local.len(), "{df:?}");
            failed = Some(t0.elapsed());
        }
        released |= pf.sending.iter().any(|r| r == "p1");
        ps.update_connector_output(&pf.sending, &[]);
        ds.update_connector_output(&[], &df.recving);
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = failed.unwrap_or_default();
    assert!(took < Duration::from_secs(10), "D failed after {took:?}: the registration timeout, not P's word");
    assert_eq!(p.push_stats().writes_failed, 1);
    assert!(!ps.has_pending_block_frees() && !ds.has_pending_block_frees());
    assert_eq!((p.push_pending(), d.push_pending()), ((0, 0), (0, 0)));
}
