//! Push mode end to end in one process: real push schedulers, real worker drivers (P's
//! writer thread, D's registrations), real ZMQ side channels and real NIXL agents (UCX over
//! loopback, DRAM). P is TP 1 with 32-token HND blocks; D is TP 2 with 16-token NHD blocks.
//!
//! - Layer-wise, D registers first: P "computes" one layer at a time (fills it, then calls
//!   `save_layer`), so a WRITE posted before its layer was computed would copy stale bytes
//!   and fail the byte check on D.
//! - Whole-request, P finishes first: D registers afterwards.
//! - A registration for another engine fails D at once; one for a transfer P never sees
//!   fails D when P's registration TTL ends; neither leaves anything held.
use std::time::{Duration, Instant};

mod common;
use common::{free_port_pair, poll_until, runtime_or_skip};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::scheduler::{FinishReason, PushScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 150;
const LAYERS: u32 = 3;

fn spec_mla(tp: u32, rank: u32, block: u32, layout: CacheLayout, mla: bool) -> Spec {
    Spec {
        layers: LAYERS,
        total_heads: 4,
        content: 64,
        tp_size: tp,
        tp_rank: rank,
        block_tokens: block,
        blocks_per_logical: 1,
        num_blocks: 32,
        layout,
        mla,
        swa_layers: 0,
        window: 0,
        state_layers: 0,
        state_bytes: 0,
        first_layer: 0,
    }
}

fn config(role: &str, engine: &str, port: u16, tp: u32, rank: u32, block: u32, extra: &str) -> ConnectorConfig {
    let compat = CompatInfo { model: "push-test".into(), block_size: block, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"transfer_mode":"push","side_channel_host":"127.0.0.1","side_channel_port":{port},"kv_lease_duration":30,"push_registration_timeout":30{extra}}}}}"#
    );
    ConnectorConfig::from_json(&json, EngineInfo { tp_size: tp, tp_rank: rank, dp_rank: 0, compat, ..Default::default() }, |_| None)
        .expect("config")
}

struct Rig {
    p_sched: PushScheduler,
    p: NixlWorker,
    p_cache: Cache,
    d_sched: PushScheduler,
    d: Vec<NixlWorker>,
    d_caches: Vec<Cache>,
    p_port: u16,
    p_blocks: Vec<u32>,
    d_blocks: Vec<u32>,
}

fn rig(extra: &str) -> Rig {
    rig_with(extra, false)
}

fn rig_with(extra: &str, mla: bool) -> Rig {
    let (p_port, d_port) = (free_port_pair(), free_port_pair());
    let p_spec = spec_mla(1, 0, 32, CacheLayout::Hnd, mla);
    let p_cfg = config("kv_producer", "P", p_port, 1, 0, 32, extra);
    let p_cache = Cache::new(p_spec);
    let p = kvbridge_nixl::new_worker(p_cfg.clone(), None).expect("P worker");
    p.register(&p_cache.tensors(), 32).expect("P register");
    let (mut d, mut d_caches) = (Vec::new(), Vec::new());
    for r in 0..2 {
        let c = Cache::new(spec_mla(2, r, 16, CacheLayout::Nhd, mla));
        let w = kvbridge_nixl::new_worker(config("kv_consumer", "D", d_port, 2, r, 16, extra), None).expect("D worker");
        w.register(&c.tensors(), 32).expect("D register");
        d.push(w);
        d_caches.push(c);
    }
    Rig {
        p_sched: PushScheduler::new(p_cfg),
        p,
        p_cache,
        d_sched: PushScheduler::new(config("kv_consumer", "D", d_port, 2, 0, 16, extra)),
        d,
        d_caches,
        p_port,
        p_blocks: (1..=TOKENS.div_ceil(32) as u32).collect(),
        d_blocks: (5..5 + TOKENS.div_ceil(16) as u32).rev().collect(),
    }
}

impl Rig {
    fn d_params(&self, transfer: &str, engine: &str) -> String {
        format!(
            r#"{{"do_remote_prefill":true,"transfer_mode":"push","transfer_id":"{transfer}","remote_engine_id":"{engine}","remote_host":"127.0.0.1","remote_port":{},"tp_size":1}}"#,
            self.p_port
        )
    }

    /// D's scheduler matches and allocates; its workers send the registrations.
    fn d_register(&mut self, req: &str, transfer: &str, engine: &str) {
        let params = self.d_params(transfer, engine);
        let m = self.d_sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(&params));
        assert_eq!((m.num_tokens, m.load_async), (TOKENS, true));
        let blocks = self.d_blocks.clone();
        self.d_sched.update_state_after_alloc(req, &blocks, TOKENS);
        let md = self.d_sched.build_connector_meta().to_bytes().unwrap();
        for w in &self.d {
            w.start_load(&md).expect("D start_load");
        }
    }

    fn p_step(&mut self) {
        let md = self.p_sched.build_connector_meta().to_bytes().unwrap();
        self.p.start_load(&md).expect("P start_load");
    }

    fn p_finish(&mut self, req: &str, params: &str, reason: FinishReason) -> bool {
        let f = self.p_sched.request_finished(req, &self.p_blocks.clone(), reason, TOKENS, Some(params), now_unix());
        self.p_step();
        f.delay_free
    }

    fn wait_registered(&self, n: u64) {
        let t0 = Instant::now();
        while self.p.push_stats().registrations_accepted < n {
            assert!(t0.elapsed() < Duration::from_secs(20), "P never accepted the registrations: {:?}", self.p.push_stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn finish_and_check(rig: &mut Rig, req_d: &str, req_p: &str) {
    for (r, w) in rig.d.iter().enumerate() {
        let f = poll_until(w, 20, |f| !f.recving.is_empty());
        assert_eq!(f.recving, vec![req_d.to_string()], "D rank {r}: {f:?}");
        assert!(f.failed_recving.is_empty(), "D rank {r}: {f:?}");
    }
    let f = poll_until(&rig.p, 20, |f| !f.sending.is_empty());
    assert_eq!(f.sending, vec![req_p.to_string()], "P frees its blocks after both D ranks were written");
    rig.p_sched.update_connector_output(&f.sending, &[]);
    rig.d_sched.update_connector_output(&[], &[req_d.to_string()]);
    assert!(!rig.p_sched.has_pending_block_frees() && !rig.d_sched.has_pending_block_frees());
    let blocks = vec![rig.d_blocks.clone()];
    for (r, c) in rig.d_caches.iter().enumerate() {
        c.check(&blocks, TOKENS).unwrap_or_else(|e| panic!("D rank {r}: {e}"));
    }
    let (held, waiting) = rig.p.push_pending();
    assert_eq!((held, waiting), (0, 0));
    for w in &rig.d {
        assert_eq!(w.push_pending(), (0, 0));
    }
}

#[test]
fn layerwise_push_with_d_registering_first_is_byte_exact_and_never_writes_an_uncomputed_layer() {
    if !runtime_or_skip() {
        return;
    }
    let mut rig = rig("");
    rig.d_register("d-req-1", "t-1", "P");
    rig.wait_registered(2);
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-1"}"#;
    assert_eq!(rig.p_sched.get_num_new_matched_tokens("p-req-1", TOKENS, 0, Some(p_params)).num_tokens, 0);
    let p_blocks = rig.p_blocks.clone();
    rig.p_sched.prefill_completing("p-req-1", &p_blocks, TOKENS);
    rig.p_step();
    // The "forward": each layer is computed, then saved; a write ahead of its layer copies
    // sentinel bytes and the check below fails.
    let blocks = vec![rig.p_blocks.clone()];
    for i in 0..rig.p_cache.num_tensors() {
        std::thread::sleep(Duration::from_millis(20));
        rig.p_cache.fill_tensor(&blocks, TOKENS, i);
        rig.p.save_layer(&format!("model.layers.{i}"));
    }
    rig.p.wait_for_save();
    assert!(rig.p_finish("p-req-1", p_params, FinishReason::LengthCapped), "P holds its blocks");
    finish_and_check(&mut rig, "d-req-1", "p-req-1");
    let s = rig.p.push_stats();
    assert_eq!((s.writes_ok, s.writes_failed), (2, 0));
    assert_eq!(s.write_posts, 2 * u64::from(LAYERS), "layer-wise: one WRITE per layer and D rank: {s:?}");
}

#[test]
fn whole_request_push_with_p_finishing_first_is_byte_exact() {
    if !runtime_or_skip() {
        return;
    }
    let mut rig = rig(r#","push_layerwise":false"#);
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-2"}"#;
    rig.p_sched.get_num_new_matched_tokens("p-req-2", TOKENS, 0, Some(p_params));
    let p_blocks = rig.p_blocks.clone();
    rig.p_sched.prefill_completing("p-req-2", &p_blocks, TOKENS); // ignored: layer-wise is off
    rig.p_cache.fill(&[p_blocks], TOKENS);
    assert!(rig.p_finish("p-req-2", p_params, FinishReason::LengthCapped));
    std::thread::sleep(Duration::from_millis(50));
    rig.d_register("d-req-2", "t-2", "P");
    finish_and_check(&mut rig, "d-req-2", "p-req-2");
    assert_eq!(rig.p.push_stats().write_posts, 2, "whole-request: one WRITE per D rank");
}

#[test]
fn mla_push_writes_the_latent_to_every_d_rank() {
    if !runtime_or_skip() {
        return;
    }
    let mut rig = rig_with(r#","push_layerwise":false"#, true);
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-mla"}"#;
    rig.p_sched.get_num_new_matched_tokens("p-mla", TOKENS, 0, Some(p_params));
    let p_blocks = rig.p_blocks.clone();
    rig.p_cache.fill(&[p_blocks], TOKENS);
    rig.d_register("d-mla", "t-mla", "P");
    rig.wait_registered(2);
    assert!(rig.p_finish("p-mla", p_params, FinishReason::LengthCapped));
    finish_and_check(&mut rig, "d-mla", "p-mla");
    assert_eq!(rig.p.push_stats().write_posts, 2, "one WRITE per D rank: both get the whole latent");
}

#[test]
fn refused_and_unanswered_registrations_fail_d_and_hold_nothing() {
    if !runtime_or_skip() {
        return;
    }
    // P's registration TTL is its lease: 1 s here (a later duplicate key wins).
    let mut rig = rig(r#","kv_lease_duration":1"#);
    // Another engine's registration: refused at once by P's side channel.
    let t0 = Instant::now();
    rig.d_register("d-wrong", "t-3", "not-P");
    for w in &rig.d {
        let f = poll_until(w, 10, |f| !f.failed_recving.is_empty());
        assert_eq!(f.failed_recving, vec!["d-wrong".to_string()], "{f:?}");
        assert_eq!(f.invalid_block_ids.len(), rig.d_blocks.len(), "every D block is reported for recompute");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "refusal must not wait for a timeout");
    rig.d_sched.update_connector_output(&[], &["d-wrong".to_string()]);

    // A transfer P never sees: P rejects the registration when its 1 s TTL ends.
    let t0 = Instant::now();
    rig.d_register("d-orphan", "never", "P");
    for w in &rig.d {
        let f = poll_until(w, 10, |f| !f.failed_recving.is_empty());
        assert_eq!(f.failed_recving, vec!["d-orphan".to_string()], "{f:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(8));
    rig.d_sched.update_connector_output(&[], &["d-orphan".to_string()]);
    assert!(!rig.d_sched.has_pending_block_frees());
    assert_eq!(rig.p.push_pending(), (0, 0));
    for w in &rig.d {
        assert_eq!(w.push_pending(), (0, 0));
    }

    // P finishes a request nobody registers for: its blocks are released at lease end.
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-lonely"}"#;
    rig.p_sched.get_num_new_matched_tokens("p-lonely", TOKENS, 0, Some(p_params));
    assert!(rig.p_finish("p-lonely", p_params, FinishReason::LengthCapped));
    let f = poll_until(&rig.p, 10, |f| !f.sending.is_empty());
    assert_eq!(f.sending, vec!["p-lonely".to_string()]);

    // D aborts a registered request: its blocks stay held until P's answer settles it.
    rig.d_register("d-abort", "t-abort", "P");
    let fin = rig.d_sched.request_finished("d-abort", &[], FinishReason::Aborted, 0, None, now_unix());
    assert!(fin.delay_free, "D must not free blocks P may still write");
    assert!(rig.d_sched.has_pending_block_frees());
    let md = rig.d_sched.build_connector_meta().to_bytes().unwrap();
    for w in &rig.d {
        w.start_load(&md).unwrap();
        let f = poll_until(w, 10, |f| !f.sending.is_empty());
        assert_eq!(f.sending, vec!["d-abort".to_string()], "released once P rejected it (TTL): {f:?}");
        assert!(f.recving.is_empty() && f.failed_recving.is_empty());
    }
    rig.d_sched.update_connector_output(&["d-abort".to_string()], &[]);
    assert!(!rig.d_sched.has_pending_block_frees());
}

/// A stand-in for a CUDA event on the forward's stream: it passes once the test "kernel"
/// has written the layer (`open`), or fails (`broken`), as a CUDA error would.
#[derive(Debug, Clone)]
struct Gate(std::sync::Arc<(std::sync::Mutex<Option<bool>>, std::sync::Condvar)>);

impl Gate {
    fn new() -> Self {
        Self(std::sync::Arc::new((std::sync::Mutex::new(None), std::sync::Condvar::new())))
    }
    fn set(&self, ok: bool) {
        *self.0 .0.lock().unwrap() = Some(ok);
        self.0 .1.notify_all();
    }
    fn fence(&self) -> Option<Box<dyn kvbridge_driver::worker::Fence>> {
        Some(Box::new(self.clone()))
    }
}

impl kvbridge_driver::worker::Fence for Gate {
    fn wait(&self) -> Result<(), String> {
        let (m, cv) = &*self.0;
        let (g, _) = cv.wait_timeout_while(m.lock().unwrap(), Duration::from_secs(10), |s| s.is_none()).unwrap();
        match *g {
            Some(true) => Ok(()),
            _ => Err("the GPU work before the fence failed".into()),
        }
    }
}

fn fenced_forward(rig: &mut Rig, req: &str, p_params: &str, fill: bool, ok: bool) {
    assert_eq!(rig.p_sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(p_params)).num_tokens, 0);
    let p_blocks = rig.p_blocks.clone();
    rig.p_sched.prefill_completing(req, &p_blocks, TOKENS);
    rig.p_step();
    let blocks = vec![rig.p_blocks.clone()];
    for i in 0..rig.p_cache.num_tensors() {
        // The layer is "saved" while its kernel still runs: the writer would post now and
        // copy the sentinel if it did not wait for the fence.
        let gate = Gate::new();
        rig.p.save_layer_fenced(&format!("model.layers.{i}"), || Ok::<_, std::convert::Infallible>(gate.fence())).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        if fill {
            rig.p_cache.fill_tensor(&blocks, TOKENS, i);
        }
        gate.set(ok);
    }
    let end = Gate::new();
    end.set(ok);
    rig.p.wait_for_save_fenced(end.fence());
}

#[test]
fn fenced_layerwise_push_waits_for_the_gpu_and_a_failed_fence_fails_d() {
    if !runtime_or_skip() {
        return;
    }
    // Each layer's KV is written only after save_layer: byte-exact only if every WRITE
    // waited for its fence.
    let mut rig = rig("");
    rig.d_register("d-req-f", "t-f", "P");
    rig.wait_registered(2);
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-f"}"#;
    fenced_forward(&mut rig, "p-req-f", p_params, true, true);
    assert!(rig.p_finish("p-req-f", p_params, FinishReason::LengthCapped));
    finish_and_check(&mut rig, "d-req-f", "p-req-f");
    let s = rig.p.push_stats();
    assert_eq!((s.writes_ok, s.writes_failed, s.write_posts), (2, 0, 2 * u64::from(LAYERS)), "{s:?}");

    // A failed fence: nothing it guards is written; both D ranks fail the request (for
    // recompute) and P releases its blocks.
    let mut rig = self::rig("");
    rig.d_register("d-req-x", "t-x", "P");
    rig.wait_registered(2);
    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t-x"}"#;
    fenced_forward(&mut rig, "p-req-x", p_params, false, false);
    assert!(rig.p_finish("p-req-x", p_params, FinishReason::LengthCapped));
    for (r, w) in rig.d.iter().enumerate() {
        let f = poll_until(w, 20, |f| !f.failed_recving.is_empty());
        assert_eq!(f.failed_recving, vec!["d-req-x".to_string()], "D rank {r}: {f:?}");
    }
    let f = poll_until(&rig.p, 20, |f| !f.sending.is_empty());
    assert_eq!(f.sending, vec!["p-req-x".to_string()], "P releases its blocks");
    let s = rig.p.push_stats();
    assert_eq!((s.writes_ok, s.writes_failed, s.write_posts), (0, 2, 0), "no WRITE was posted: {s:?}");
    assert_eq!(rig.p.push_pending(), (0, 0));
}
