//! D's receive staging over real parts (pull schedulers, worker drivers, the ZMQ side
//! channel, NIXL agents over UCX loopback): vLLM-CPU caches (K dim-major) with P's blocks
//! 4x D's, where a direct READ needs one descriptor per K row. With staging (the default),
//! D reads P's whole blocks in a few descriptors and lays them out locally; without it
//! (`kv_recv_staging_mib: 0`), it reads row by row. Both must land byte-exact in D's cache,
//! with nothing else written, and staging must post at most 1/8 of the descriptors.
use std::time::{Duration, Instant};

mod common;
use common::{free_port, runtime_or_skip};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;
use kvbridge_nixl::NixlWorker;

const TOKENS: u64 = 600;

fn config(role: &str, engine: &str, port: u16, block: u32, extra: &str) -> ConnectorConfig {
    let compat = CompatInfo { model: "recv-staging-test".into(), block_size: block, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{port},"handshake_timeout":2{extra}}}}}"#
    );
    ConnectorConfig::from_json(&json, EngineInfo { tp_size: 1, compat, ..Default::default() }, |_| None).expect("config")
}

struct Side {
    sched: PullScheduler,
    worker: NixlWorker,
    cache: Cache,
}

fn side(role: &str, engine: &str, block: u32, extra: &str) -> Side {
    let port = free_port();
    // 2 layers, 2 KV heads, head size 32 (bf16-sized content: 128 bytes per head and token).
    let cache = Cache::new(Spec::dense(2, 2, 128, block, 48, CacheLayout::CpuVec));
    let worker = kvbridge_nixl::new_worker(config(role, engine, port, block, extra), None).expect("worker");
    worker.register(&cache.tensors(), 48).expect("register");
    Side { sched: PullScheduler::new(config(role, engine, port, block, extra)), worker, cache }
}

fn step(s: &mut Side) {
    s.worker.start_load(&s.sched.build_connector_meta().to_bytes().expect("metadata")).expect("start_load");
}

/// P (64-token blocks) prefills, D (16-token blocks) loads; returns the descriptors D posted.
fn run(extra: &str, tag: &str) -> u64 {
    let mut p = side("kv_producer", &format!("P-{tag}"), 64, extra);
    let mut d = side("kv_consumer", &format!("D-{tag}"), 16, extra);
    let p_blocks: Vec<u32> = vec![3, 9, 4, 20, 11, 7, 30, 2, 15, 16];
    let d_blocks: Vec<u32> = (0..TOKENS.div_ceil(16) as u32).map(|i| 47 - i).collect();
    let dec = r#"{"do_remote_decode":true}"#;
    p.sched.get_num_new_matched_tokens("p1", TOKENS, 0, Some(dec));
    step(&mut p);
    p.cache.fill(&[p_blocks.clone()], TOKENS);
    let f = p.sched.request_finished("p1", &p_blocks, FinishReason::LengthCapped, TOKENS, Some(dec), now_unix());
    step(&mut p);
    assert!(f.delay_free);
    let params = f.kv_transfer_params.expect("params").to_string();
    let m = d.sched.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&params));
    assert_eq!(m.num_tokens, TOKENS);
    d.sched.update_state_after_alloc("d1", &d_blocks, TOKENS);
    let (mut loaded, mut released, t0) = (false, false, Instant::now());
    while t0.elapsed() < Duration::from_secs(20) && !(loaded && released) {
        step(&mut d);
        step(&mut p);
        let (pf, df) = (p.worker.get_finished(), d.worker.get_finished());
        assert!(df.failed_recving.is_empty(), "{tag}: load failed: {df:?}");
        loaded |= df.recving.iter().any(|r| r == "d1");
        released |= pf.sending.iter().any(|r| r == "p1");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(loaded && released, "{tag}: loaded {loaded}, released {released}");
    d.cache.check(&[d_blocks], TOKENS).unwrap_or_else(|e| panic!("{tag}: {e}"));
    let stats = d.worker.take_xfer_stats().expect("D transfer stats");
    assert_eq!(stats.num_descriptors.len(), 1, "{tag}: one load");
    stats.num_descriptors[0]
}

#[test]
fn fragmented_reads_go_through_receive_staging_byte_exact() {
    if !runtime_or_skip() {
        return;
    }
    let direct = run(r#","kv_recv_staging_mib":0"#, "direct");
    let staged = run("", "staged");
    println!("FIGURE recv staging: 600 tokens, CPU K dim-major, P 64 -> D 16 blocks: direct {direct} descriptors, staged {staged}");
    assert!(direct >= 1000, "the direct read is row by row: {direct}");
    assert!(staged * 8 <= direct, "staging posts whole blocks: {staged} vs {direct}");
}
