//! Leases end to end in one process, over real parts: pull schedulers, worker drivers,
//! the ZMQ side channel (heartbeats, inspection) and NIXL agents (UCX over loopback, DRAM).
//!
//! - D's heartbeats keep P's blocks past the lease; the READ then gets every byte.
//! - With no heartbeat the lease ends and P frees the blocks; D then refuses to read them
//!   (a failed load, its blocks left untouched), never a read of reused blocks.
//! - A D request aborted while still queued frees P's blocks at once, not at lease end.
//! - `inspect` over the side channel shows what each side holds, down to zero.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, local_config, runtime_or_skip};
use kvbridge_core::config::ConnectorConfig;
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_core::worker::FinishedSets;
use kvbridge_driver::clock::now_unix;
use kvbridge_driver::side_channel::SideChannel;
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 40;
const LEASE: f64 = 2.0;

fn spec() -> Spec {
    Spec::dense(2, 2, 32, 16, 32, CacheLayout::Nhd)
}

fn config(role: &str, engine: &str, port: u16) -> ConnectorConfig {
    local_config(role, engine, port, "lease-test", &format!(",\"kv_lease_duration\":{LEASE}"))
}

struct Rig {
    p_sched: PullScheduler,
    p: NixlWorker,
    p_cache: Cache,
    d_sched: PullScheduler,
    d: NixlWorker,
    d_cache: Cache,
    p_port: u16,
    d_port: u16,
}

fn rig() -> Rig {
    let (p_port, d_port) = (free_port(), free_port());
    let p_cache = Cache::new(spec());
    let p = kvbridge_nixl::new_worker(config("kv_producer", "P", p_port), None).expect("P worker");
    p.register(&p_cache.tensors(), 32).expect("P register");
    let d_cache = Cache::new(spec());
    let d = kvbridge_nixl::new_worker(config("kv_consumer", "D", d_port), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D register");
    Rig {
        p_sched: PullScheduler::new(config("kv_producer", "P", p_port)),
        p,
        p_cache,
        d_sched: PullScheduler::new(config("kv_consumer", "D", d_port)),
        d,
        d_cache,
        p_port,
        d_port,
    }
}

fn accumulate(all: &mut FinishedSets, f: FinishedSets) {
    all.sending.extend(f.sending);
    all.recving.extend(f.recving);
    all.failed_recving.extend(f.failed_recving);
    all.invalid_block_ids.extend(f.invalid_block_ids);
}

impl Rig {
    /// P prefills `req` into `blocks` (fills them with its KV) and leases them.
    fn p_prefill(&mut self, req: &str, blocks: &[u32]) -> String {
        self.p_cache.fill(&[blocks.to_vec()], TOKENS);
        let dec = r#"{"do_remote_decode":true}"#;
        self.p_sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(dec));
        let f = self.p_sched.request_finished(req, blocks, FinishReason::LengthCapped, TOKENS, Some(dec), now_unix());
        assert!(f.delay_free);
        self.p.start_load(&self.p_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
        f.kv_transfer_params.unwrap().to_string()
    }

    /// One engine step on each side for `secs` (D's scheduler ticks, so heartbeats go out).
    fn run(&mut self, secs: f64) -> (FinishedSets, FinishedSets) {
        let (mut p_all, mut d_all) = (FinishedSets::default(), FinishedSets::default());
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            self.d_sched.tick(now_unix());
            self.d.start_load(&self.d_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
            self.p.start_load(&self.p_sched.build_connector_meta().to_bytes().unwrap()).unwrap();
            let (pf, df) = (self.p.get_finished(), self.d.get_finished());
            self.p_sched.update_connector_output(&pf.sending, &[]);
            self.d_sched.update_connector_output(&[], &df.recving);
            accumulate(&mut p_all, pf);
            accumulate(&mut d_all, df);
            std::thread::sleep(Duration::from_millis(10));
        }
        (p_all, d_all)
    }

    /// D matches and allocates `local`, and its worker starts the load.
    fn d_load(&mut self, req: &str, params: &str, local: &[u32]) {
        let m = self.d_sched.get_num_new_matched_tokens(req, TOKENS, 0, Some(params));
        assert_eq!(m.num_tokens, TOKENS);
        self.d_sched.update_state_after_alloc(req, local, TOKENS);
    }

    fn held(&self, port: u16) -> (u64, u64) {
        let v: serde_json::Value = serde_json::from_str(
            &SideChannel::new().unwrap().inspect_blocking("127.0.0.1", port, Duration::from_secs(5)).expect("inspect"),
        )
        .unwrap();
        (v["held_blocks"].as_u64().unwrap(), v["loading_blocks"].as_u64().unwrap())
    }
}

#[test]
fn heartbeats_keep_the_lease_and_a_lost_lease_is_never_read() {
    if !runtime_or_skip() {
        return;
    }
    let mut rig = rig();
    // 1. Heartbeats from the moment D sees the request keep P's blocks past the lease.
    let params = rig.p_prefill("p1", &[3, 4, 5]);
    rig.d_sched.on_new_request("d1", Some(&params));
    let (pf, _) = rig.run(2.0 * LEASE);
    assert!(pf.sending.is_empty(), "P kept the blocks while D heartbeated: {pf:?}");
    assert_eq!(rig.held(rig.p_port).0, 3);
    let hb: serde_json::Value = serde_json::from_str(&rig.d.accounting().to_string()).unwrap();
    assert!(hb["heartbeats_sent"].as_u64().unwrap() >= 4, "{hb}");
    rig.d_load("d1", &params, &[10, 11, 12]);
    let (pf, df) = rig.run(1.0);
    assert_eq!((df.recving, df.failed_recving), (vec!["d1".to_string()], vec![]));
    assert_eq!(pf.sending, vec!["p1".to_string()]);
    rig.d_cache.check(&[vec![10, 11, 12]], TOKENS).expect("every byte read");

    // 2. No heartbeat (D never saw the request): the lease ends and P frees; a late load
    //    fails without reading the freed blocks.
    let params = rig.p_prefill("p2", &[6, 7, 8]);
    let t0 = Instant::now();
    let mut pf = FinishedSets::default();
    while pf.sending.is_empty() && t0.elapsed().as_secs_f64() < LEASE + 2.0 {
        accumulate(&mut pf, rig.run(0.02).0);
    }
    assert_eq!(pf.sending, vec!["p2".to_string()]);
    let freed_after = t0.elapsed().as_secs_f64();
    assert!(freed_after >= LEASE - 0.1, "not before the lease ends: {freed_after}");
    println!("FIGURE lease_free_no_heartbeat_s={freed_after:.2} lease_s={LEASE}");
    rig.p_cache.fill(&[vec![6, 7, 8]], 1); // "another request" reuses the blocks
    rig.d_load("d2", &params, &[20, 21, 22]);
    let (_, df) = rig.run(0.5);
    assert_eq!(df.failed_recving, vec!["d2".to_string()], "a lost lease fails the load");
    assert_eq!(df.invalid_block_ids.len(), 3);
    assert!(rig.d_cache.check(&[vec![20, 21, 22]], TOKENS).is_err(), "nothing was read into D's blocks");

    // 3. Aborted on D while still queued: P frees at once.
    let params = rig.p_prefill("p3", &[13, 14]);
    rig.d_sched.on_new_request("d3", Some(&params));
    let t0 = Instant::now();
    assert!(!rig.d_sched.request_finished("d3", &[], FinishReason::Aborted, 0, Some(&params), now_unix()).delay_free);
    let mut freed = None;
    while t0.elapsed().as_secs_f64() < LEASE - 0.5 {
        let (pf, _) = rig.run(0.02);
        if pf.sending.contains(&"p3".to_string()) {
            freed = Some(t0.elapsed().as_secs_f64());
            break;
        }
    }
    let freed = freed.expect("P freed the aborted request's blocks before the lease ended");
    println!("FIGURE abort_queued_free_s={freed:.3}");
    assert_eq!(rig.held(rig.p_port), (0, 0), "P holds nothing");
    assert_eq!(rig.held(rig.d_port), (0, 0), "D loads nothing");
    assert!(!rig.p_sched.has_pending_block_frees() && !rig.d_sched.has_pending_block_frees());
}
