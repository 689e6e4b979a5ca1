//! Host-buffer transfers (vLLM's `kv_buffer_device="cpu"`; forced here on DRAM caches with
//! `kv_host_buffer`) end to end in one process, over real parts: pull schedulers, worker
//! drivers, the ZMQ side channel and NIXL agents (UCX over loopback).
//!
//! NIXL moves a host mirror of each cache, never the cache: P copies a finished prefill's
//! blocks into its mirror in `wait_for_save`, D reads into its own mirror and copies the
//! blocks it read into its cache before reporting the load. Each check below fails if either
//! copy is left out: P's cache is wiped before D reads (so D must read P's mirror, filled by
//! P's copy), and D's cache must hold the bytes afterwards (only D's copy puts them there).
//! On a GPU the two copies are CUDA memcpys (`tests/gpu/main.rs`); everything else is this path.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, local_config, runtime_or_skip};
use kvbridge_core::config::ConnectorConfig;
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 40;

fn spec(layout: CacheLayout) -> Spec {
    Spec::dense(2, 2, 32, 16, 32, layout)
}

fn config(role: &str, engine: &str, port: u16, host_buffer: bool) -> ConnectorConfig {
    local_config(role, engine, port, "host-buffer-test", &format!(",\"kv_host_buffer\":{host_buffer}"))
}

struct Side {
    sched: PullScheduler,
    worker: NixlWorker,
    cache: Cache,
}

fn side(role: &str, engine: &str, layout: CacheLayout, host_buffer: bool) -> Side {
    let port = free_port();
    let cache = Cache::new(spec(layout));
    let worker = kvbridge_nixl::new_worker(config(role, engine, port, host_buffer), None).expect("worker");
    worker.register(&cache.tensors(), 32).expect("register");
    Side { sched: PullScheduler::new(config(role, engine, port, host_buffer)), worker, cache }
}

fn step(s: &mut Side) {
    s.worker.start_load(&s.sched.build_connector_meta().to_bytes().expect("metadata")).expect("start_load");
}

/// P prefills `req` into `blocks` as vLLM drives it; `report` says whether the step in
/// which the prefill completes is reported. Then P's cache is wiped. Returns
/// `(delay_free, params)`.
fn p_prefill(p: &mut Side, req: &str, blocks: &[u32], report: bool) -> (bool, serde_json::Value) {
    let dec = r#"{"do_remote_decode":true}"#;
    p.sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(dec));
    if report {
        p.sched.prefill_completing(req, blocks, TOKENS);
    }
    step(p);
    p.cache.fill(&[blocks.to_vec()], TOKENS); // the forward
    p.worker.wait_for_save();
    let f = p.sched.request_finished(req, blocks, FinishReason::LengthCapped, TOKENS, Some(dec), now_unix());
    step(p);
    p.cache.reset(); // whatever D reads now, it reads from P's host buffer
    (f.delay_free, f.kv_transfer_params.unwrap_or_default())
}

/// D loads `params` into `local`, stepping both sides until the load and P's release end.
fn d_load(p: &mut Side, d: &mut Side, req: &str, params: &serde_json::Value, local: &[u32]) {
    let text = params.to_string();
    let m = d.sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(&text));
    assert_eq!(m.num_tokens, TOKENS);
    d.sched.update_state_after_alloc(req, local, TOKENS);
    let (mut loaded, mut released) = (false, false);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) && !(loaded && released) {
        step(d);
        step(p);
        let (pf, df) = (p.worker.get_finished(), d.worker.get_finished());
        assert!(df.failed_recving.is_empty() && df.invalid_block_ids.is_empty(), "load failed: {df:?}");
        loaded |= df.recving.iter().any(|r| r == req);
        released |= !pf.sending.is_empty();
        d.sched.update_connector_output(&[], &df.recving);
        p.sched.update_connector_output(&pf.sending, &[]);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(loaded && released, "load {req}: loaded {loaded}, P released {released}");
}

#[test]
fn host_buffers_carry_the_kv_on_either_or_both_sides() {
    if !runtime_or_skip() {
        return;
    }
    for layout in [CacheLayout::Nhd, CacheLayout::CpuVec] {
        for (p_hb, d_hb) in [(true, true), (false, true), (true, false)] {
            let what = format!("{layout:?}, P host buffer {p_hb}, D host buffer {d_hb}");
            let mut p = side("kv_producer", &format!("P-{p_hb}{d_hb}"), layout, p_hb);
            let mut d = side("kv_consumer", &format!("D-{p_hb}{d_hb}"), layout, d_hb);
            let (delay, params) = p_prefill(&mut p, "p1", &[3, 4, 5], true);
            assert!(delay, "{what}: P's blocks stay held until D has read");
            assert!(params.get("remote_staged").is_none(), "{what}: {params}");
            if !p_hb {
                // In place, P's cache is what D reads: put the bytes back.
                p.cache.fill(&[vec![3, 4, 5]], TOKENS);
            }
            d_load(&mut p, &mut d, "d1", &params, &[10, 11, 12]);
            // Every read byte reached D's cache, and no other block changed.
            d.cache.check(&[vec![10, 11, 12]], TOKENS).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(p.sched.accounting()["held_blocks"], 0, "{what}: P still holds blocks");
        }
    }
}

#[test]
fn a_prefill_never_copied_to_the_host_buffer_is_not_offered() {
    // D would read stale host memory: P's scheduler refuses to hand out params for a
    // request whose completing step it never heard of, and frees its blocks.
    if !runtime_or_skip() {
        return;
    }
    let mut p = side("kv_producer", "P-unreported", CacheLayout::Nhd, true);
    let (delay, params) = p_prefill(&mut p, "p1", &[3, 4], false);
    assert!(!delay && params.is_null(), "{delay} {params}");
    assert_eq!(p.sched.accounting()["held_blocks"], 0);
}

/// Push mode with host buffers on both sides: P copies to its mirror in `wait_for_save` and
/// writes the whole request from there (never layer by layer), P's cache is wiped before
/// D even registers, and D's cache must hold the bytes once D reports the load.
#[test]
fn push_writes_from_and_into_host_buffers() {
    if !runtime_or_skip() {
        return;
    }
    use kvbridge_core::scheduler::PushScheduler;
    let push_cfg = |role: &str, engine: &str, port: u16| {
        local_config(role, engine, port, "host-buffer-test", r#","kv_host_buffer":true,"transfer_mode":"push""#)
    };
    let (pp, dp) = (free_port(), free_port());
    let mut p_cache = Cache::new(spec(CacheLayout::Nhd));
    let p = kvbridge_nixl::new_worker(push_cfg("kv_producer", "P-push", pp), None).expect("P worker");
    p.register(&p_cache.tensors(), 32).expect("P register");
    let d_cache = Cache::new(spec(CacheLayout::Nhd));
    let d = kvbridge_nixl::new_worker(push_cfg("kv_consumer", "D-push", dp), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D register");
    let (mut ps, mut ds) =
        (PushScheduler::new(push_cfg("kv_producer", "P-push", pp)), PushScheduler::new(push_cfg("kv_consumer", "D-push", dp)));
    assert!(!ps.config().push_layerwise, "a host buffer turns layer-wise writes off");
    // P prefills and finishes first.
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-hb"}"#;
    let blocks = [3u32, 4, 5];
    ps.get_num_new_matched_tokens("p1", TOKENS, 0, Some(p_params));
    ps.prefill_completing("p1", &blocks, TOKENS);
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
    p_cache.fill(&[blocks.to_vec()], TOKENS);
    p.wait_for_save(); // → P's host buffer
    let f = ps.request_finished("p1", &blocks, FinishReason::LengthCapped, TOKENS, Some(p_params), now_unix());
    assert!(f.delay_free);
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
    p_cache.reset();
    // D registers; P writes into D's host buffer; D copies it into its cache.
    let d_params = format!(
        r#"{{"do_remote_prefill":true,"transfer_mode":"push","transfer_id":"t-hb","remote_engine_id":"P-push","remote_host":"127.0.0.1","remote_port":{pp},"tp_size":1}}"#
    );
    let local = [10u32, 11, 12];
    assert_eq!(ds.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&d_params)).num_tokens, TOKENS);
    ds.update_state_after_alloc("d1", &local, TOKENS);
    d.start_load(&ds.build_connector_meta().to_bytes().unwrap()).unwrap();
    let (mut loaded, mut released) = (false, false);
    let t0 = Instant::now();
    while !(loaded && released) {
        assert!(t0.elapsed() < Duration::from_secs(20), "push: loaded {loaded}, P released {released}");
        let (pf, df) = (p.get_finished(), d.get_finished());
        assert!(df.failed_recving.is_empty(), "{df:?}");
        loaded |= df.recving.iter().any(|r| r == "d1");
        released |= pf.sending.iter().any(|r| r == "p1");
        ds.update_connector_output(&[], &df.recving);
        ps.update_connector_output(&pf.sending, &[]);
        d.start_load(&ds.build_connector_meta().to_bytes().unwrap()).unwrap();
        p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    d_cache.check(&[local.to_vec()], TOKENS).unwrap_or_else(|e| panic!("push into a host buffer: {e}"));
    assert_eq!(p.push_stats().write_posts, 1, "one whole-request WRITE");
}
