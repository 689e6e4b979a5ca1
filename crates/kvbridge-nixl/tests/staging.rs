//! P-side staging (`kv_staging_blocks`) end to end in one process, over real parts: pull
//! schedulers, worker drivers, the ZMQ side channel and NIXL agents (UCX over loopback).
//!
//! - A staged request's blocks are freed by vLLM at once (`delay_free` false): P's cache is
//!   wiped right after, and D still reads every byte (from the staging slots).
//! - D's notification frees the slots; the scheduler hides the request from vLLM.
//! - Too few free slots: the request is held in place as without staging, and read there.
//! - A staged request that ends without a reader (abort) frees its slots at once.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, local_config, runtime_or_skip};
use kvbridge_core::config::ConnectorConfig;
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_core::worker::FinishedSets;
use kvbridge_driver::clock::now_unix;
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 40;
const SLOTS: u32 = 4;

fn spec(layout: CacheLayout) -> Spec {
    Spec::dense(2, 2, 32, 16, 32, layout)
}

fn config(role: &str, engine: &str, port: u16) -> ConnectorConfig {
    local_config(role, engine, port, "staging-test", &format!(",\"kv_staging_blocks\":{SLOTS}"))
}

struct Rig {
    p_sched: PullScheduler,
    p: NixlWorker,
    p_cache: Cache,
    d_sched: PullScheduler,
    d: NixlWorker,
    d_cache: Cache,
}

fn rig(layout: CacheLayout) -> Rig {
    let (p_port, d_port) = (free_port(), free_port());
    let p_cache = Cache::new(spec(layout));
    let p = kvbridge_nixl::new_worker(config("kv_producer", "P", p_port), None).expect("P worker");
    p.register(&p_cache.tensors(), 32).expect("P register");
    let d_cache = Cache::new(spec(layout));
    let d = kvbridge_nixl::new_worker(config("kv_consumer", "D", d_port), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D register");
    Rig {
        p_sched: PullScheduler::new(config("kv_producer", "P", p_port)),
        p,
        p_cache,
        d_sched: PullScheduler::new(config("kv_consumer", "D", d_port)),
        d,
        d_cache,
    }
}

impl Rig {
    /// P prefills `req` into `blocks` the way vLLM drives it: matched, its prefill
    /// completing in a step (staging ordered), the forward (KV written, `wait_for_save`),
    /// then finished. Returns `(delay_free, params)`.
    fn p_prefill(&mut self, req: &str, blocks: &[u32], reason: FinishReason) -> (bool, serde_json::Value) {
        let dec = r#"{"do_remote_decode":true}"#;
        self.p_sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(dec));
        self.p_sched.prefill_completing(req, blocks, TOKENS);
        self.p.start_load(&self.p_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
        self.p_cache.fill(&[blocks.to_vec()], TOKENS); // the forward
        self.p.wait_for_save();
        let f = self.p_sched.request_finished(req, blocks, reason, TOKENS, Some(dec), now_unix());
        self.p.start_load(&self.p_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
        (f.delay_free, f.kv_transfer_params.unwrap_or_default())
    }

    /// D loads `params` into `local` and steps both sides until D's load ends. Returns
    /// what P's worker reported and the ids P's scheduler hid from vLLM.
    fn d_load(&mut self, req: &str, params: &serde_json::Value, local: &[u32]) -> (FinishedSets, Vec<String>) {
        let text = params.to_string();
        let m = self.d_sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(&text));
        assert_eq!(m.num_tokens, TOKENS);
        self.d_sched.update_state_after_alloc(req, local, TOKENS);
        let (mut p_all, mut hidden, mut done) = (FinishedSets::default(), Vec::new(), false);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) && (!done || p_all.sending.is_empty()) {
            self.d.start_load(&self.d_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
            self.p.start_load(&self.p_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
            let (pf, df) = (self.p.get_finished(), self.d.get_finished());
            assert!(df.failed_recving.is_empty(), "load failed: {df:?}");
            done |= df.recving.iter().any(|r| r == req);
            self.d_sched.update_connector_output(&[], &df.recving);
            hidden.extend(self.p_sched.update_connector_output(&pf.sending, &[]));
            p_all.sending.extend(pf.sending);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(done, "D's load of {req} did not finish");
        (p_all, hidden)
    }

    fn free_slots(&self) -> u64 {
        let v = self.p_sched.accounting();
        v["staging_free_slots"].as_u64().unwrap()
    }
}

#[test]
fn staged_kv_survives_p_freeing_its_blocks() {
    if !runtime_or_skip() {
        return;
    }
    for layout in [CacheLayout::Nhd, CacheLayout::CpuVec] {
        let mut rig = rig(layout);
        // 1. Staged: vLLM frees P's blocks at once, and another request overwrites them.
        let (delay, params) = rig.p_prefill("p1", &[3, 4, 5], FinishReason::LengthCapped);
        assert!(!delay, "{layout:?}: a staged request's blocks are freed at once");
        assert_eq!(params["remote_staged"], true);
        let slots: Vec<u64> = params["remote_block_ids"][0].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(slots.len() == 3 && slots.iter().all(|&s| (1..=u64::from(SLOTS)).contains(&s)), "{slots:?}");
        assert_eq!(rig.free_slots(), 1);
        rig.p_cache.reset();
        let (pf, hidden) = rig.d_load("d1", &params, &[10, 11, 12]);
        rig.d_cache.check(&[vec![10, 11, 12]], TOKENS).unwrap_or_else(|e| panic!("{layout:?}: staged bytes: {e}"));
        assert_eq!(pf.sending, vec!["p1".to_string()]);
        assert_eq!(hidden, vec!["p1".to_string()], "vLLM must not see a staged request again");
        assert_eq!(rig.free_slots(), u64::from(SLOTS), "D's word frees the slots");

        // 2. More blocks than free slots: held in place, as without staging.
        rig.d_cache.reset();
        let blocks = [6, 7, 8, 9, 13];
        let (delay, params) = rig.p_prefill("p2", &blocks, FinishReason::LengthCapped);
        assert!(delay, "not staged: vLLM holds the blocks");
        assert!(params.get("remote_staged").is_none());
        let (pf, hidden) = rig.d_load("d2", &params, &[14, 15, 16]);
        rig.d_cache.check(&[vec![14, 15, 16]], TOKENS).unwrap_or_else(|e| panic!("{layout:?}: in-place bytes: {e}"));
        assert_eq!(pf.sending, vec!["p2".to_string()]);
        assert!(hidden.is_empty(), "an in-place request is vLLM's to free");

        // 3. Staged, then aborted before finishing: the slots are free at once.
        let (delay, params) = rig.p_prefill("p3", &[20, 21], FinishReason::Aborted);
        assert!(!delay && params.is_null());
        assert_eq!(rig.free_slots(), u64::from(SLOTS));
        assert_eq!(rig.p_sched.accounting()["staged_requests"], 0);
    }
}

#[test]
fn staging_needs_dram_and_one_group() {
    // The buffer mirrors group-0 DRAM caches only; anything else is a typed error at
    // registration, not a silent fallback.
    if !runtime_or_skip() {
        return;
    }
    let mut s = spec(CacheLayout::Nhd);
    s.swa_layers = 1;
    s.window = 16;
    let cache = Cache::new(s);
    let p = kvbridge_nixl::new_worker(config("kv_producer", "P2", free_port()), None).expect("P worker");
    let err = p.register(&cache.tensors(), 32).expect_err("two KV cache groups");
    assert!(err.to_string().contains("one KV cache group"), "{err}");
}
