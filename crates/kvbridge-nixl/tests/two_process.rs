//! Two processes, each with a real NIXL agent (UCX over loopback, DRAM), driven through
//! the real scheduler and worker state machines and the real ZMQ side channel.
//!
//! The test process is D. It re-executes itself as P (env `KVB_TEST_ROLE=p`). P fills
//! KV-shaped caches (4 layers, K and V regions, 16-token blocks) with known bytes, runs a
//! request to completion in its scheduler, and hands the resulting `kv_transfer_params`
//! to D through a file. D reads the request's non-contiguous blocks into different block
//! ids, verifies every byte, and P exits 0 only after it saw the completion notification
//! and its worker reported the blocks free.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, runtime_or_skip};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::layout::{MemKind, TensorInfo};
use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};

const LAYERS: usize = 4;
const NUM_BLOCKS: u64 = 64;
const BLOCK_TOKENS: u64 = 16;
const HEADS: u64 = 2;
const HEAD: u64 = 64;
const ITEM: u64 = 2; // bf16
const BLOCK_BYTES: usize = (BLOCK_TOKENS * HEADS * HEAD * ITEM) as usize; // per K or V block

const P_BLOCKS: [u32; 6] = [5, 9, 10, 11, 40, 63];
const D_BLOCKS: [u32; 6] = [1, 2, 30, 31, 7, 50];

/// One layer's cache, `[2, NUM_BLOCKS, BLOCK_TOKENS, HEADS, HEAD]` (K/V first), as bytes.
struct Cache {
    layers: Vec<Vec<u8>>,
}

impl Cache {
    fn new() -> Self {
        Self { layers: (0..LAYERS).map(|_| vec![0u8; 2 * NUM_BLOCKS as usize * BLOCK_BYTES]).collect() }
    }
    fn tensors(&self) -> Vec<TensorInfo> {
        let inner = BLOCK_TOKENS * HEADS * HEAD;
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                TensorInfo::opaque(
                    &format!("model.layers.{i}.self_attn.attn"),
                    l.as_ptr() as u64,
                    &[2, NUM_BLOCKS, BLOCK_TOKENS, HEADS, HEAD],
                    &[NUM_BLOCKS * inner, inner, HEADS * HEAD, HEAD, 1],
                    ITEM,
                    MemKind::Dram,
                    0,
                )
            })
            .collect()
    }
    fn block(&self, layer: usize, kv: usize, b: u32) -> &[u8] {
        let off = (kv * NUM_BLOCKS as usize + b as usize) * BLOCK_BYTES;
        &self.layers[layer][off..off + BLOCK_BYTES]
    }
    fn fill_pattern(&mut self) {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (i, byte) in layer.iter_mut().enumerate() {
                *byte = pattern(l, i);
            }
        }
    }
}

fn pattern(layer: usize, i: usize) -> u8 {
    let x = (layer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 29) as u8
}

fn config(role: &str, engine: &str, port: u16) -> ConnectorConfig {
    let compat = CompatInfo {
        model: "test-kv".into(),
        dtype: "bfloat16".into(),
        num_layers: LAYERS as u32,
        num_kv_heads: HEADS as u32,
        head_size: HEAD as u32,
        block_size: BLOCK_TOKENS as u32,
        ..Default::default()
    };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{port},"kv_lease_duration":60,"progress_delay_us":{}}}}}"#,
        std::env::var("KVB_TEST_PROGRESS_US").unwrap_or_else(|_| "100".into())
    );
    ConnectorConfig::from_json(&json, EngineInfo { tp_size: 1, tp_rank: 0, dp_rank: 0, compat, ..Default::default() }, |_| None)
        .expect("config")
}

fn wait_for(path: &Path, timeout: Duration) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The prefill side, run in the child process.
fn run_prefill(dir: &Path, port: u16) {
    let mut cache = Cache::new();
    cache.fill_pattern();
    let cfg = config("kv_producer", "engine-p", port);
    let mut sched = PullScheduler::new(cfg.clone());
    let worker = kvbridge_nixl::new_worker(cfg, None).expect("P worker");
    worker.register(&cache.tensors(), NUM_BLOCKS).expect("P register");

    // The request arrives with do_remote_decode, is prefilled, and finishes (max_tokens=1).
    let m = sched.get_num_new_matched_tokens("req-p", 96, 0, Some(r#"{"do_remote_decode":true}"#));
    assert_eq!((m.num_tokens, m.load_async), (0, false));
    let fin = sched.request_finished(
        "req-p",
        &P_BLOCKS,
        FinishReason::LengthCapped,
        96,
        Some(r#"{"do_remote_decode":true}"#),
        kvbridge_driver::clock::now_unix(),
    );
    assert!(fin.delay_free);
    let params = fin.kv_transfer_params.expect("params").to_string();
    // The lease goes to the worker with the next step's metadata.
    worker.start_load(&sched.build_connector_meta().to_bytes().unwrap()).unwrap();
    assert_eq!(worker.held_requests(), 1);
    std::fs::write(dir.join("params.json.tmp"), format!("{params}\n")).unwrap();
    std::fs::rename(dir.join("params.json.tmp"), dir.join("params.json")).unwrap();

    // Step until the worker reports the blocks free (D's READ notification).
    let t0 = Instant::now();
    loop {
        let f = worker.get_finished();
        if f.sending.contains(&"req-p".to_string()) {
            sched.update_connector_output(&f.sending, &f.recving);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "P never saw the completion notification");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!sched.has_pending_block_frees(), "scheduler still holds blocks");
    assert_eq!(worker.held_requests(), 0);
    std::fs::write(dir.join("p-done"), "ok\n").unwrap();
}

#[test]
fn two_process_pull_read_with_notification() {
    if let Ok(f) = std::env::var("KVBRIDGE_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(f)).with_writer(std::io::stderr).try_init();
    }
    if std::env::var("KVB_TEST_ROLE").as_deref() == Ok("p") {
        let dir = PathBuf::from(std::env::var("KVB_TEST_DIR").unwrap());
        let port: u16 = std::env::var("KVB_TEST_PORT").unwrap().parse().unwrap();
        run_prefill(&dir, port);
        return;
    }
    if !runtime_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvb-2proc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p_port = free_port();
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["--exact", "two_process_pull_read_with_notification", "--nocapture", "--test-threads=1"])
        .env("KVB_TEST_ROLE", "p")
        .env("KVB_TEST_DIR", &dir)
        .env("KVB_TEST_PORT", p_port.to_string())
        .env("UCX_NET_DEVICES", "lo")
        .spawn()
        .expect("spawn P");

    let params = wait_for(&dir.join("params.json"), Duration::from_secs(60));

    // D: the request arrives with P's params.
    let mut cache = Cache::new();
    let cfg = config("kv_consumer", "engine-d", free_port());
    let mut sched = PullScheduler::new(cfg.clone());
    let worker = kvbridge_nixl::new_worker(cfg, None).expect("D worker");
    worker.register(&cache.tensors(), NUM_BLOCKS).expect("D register");
    let n_tokens = P_BLOCKS.len() as u64 * BLOCK_TOKENS;
    let m = sched.get_num_new_matched_tokens("req-d", n_tokens, 0, Some(params.trim()));
    assert_eq!((m.num_tokens, m.load_async), (n_tokens, true));
    sched.update_state_after_alloc("req-d", &D_BLOCKS, m.num_tokens);
    let t0 = Instant::now();
    worker.start_load(&sched.build_connector_meta().to_bytes().unwrap()).unwrap();
    loop {
        let f = worker.get_finished();
        assert!(f.failed_recving.is_empty(), "load failed: {f:?}");
        if f.recving.contains(&"req-d".to_string()) {
            sched.update_connector_output(&f.sending, &f.recving);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "READ never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = worker.stats();
    assert_eq!(stats.reads_ok, 1);
    assert_eq!(stats.bytes_read, (P_BLOCKS.len() * 2 * LAYERS * BLOCK_BYTES) as u64);

    // Every moved block equals P's bytes; every other block is still zero.
    let mut expect = Cache::new();
    expect.fill_pattern();
    for l in 0..LAYERS {
        for kv in 0..2 {
            for (pb, db) in P_BLOCKS.iter().zip(D_BLOCKS) {
                assert!(cache.block(l, kv, db) == expect.block(l, kv, *pb), "layer {l} kv {kv}: D block {db} != P block {pb}");
            }
            for b in 0..NUM_BLOCKS as u32 {
                if !D_BLOCKS.contains(&b) {
                    assert!(cache.block(l, kv, b).iter().all(|&x| x == 0), "untouched block {b} was written");
                }
            }
        }
    }
    cache.layers[0][0] ^= 0; // keep `cache` alive (registered memory) until here

    let status = child.wait().expect("wait P");
    assert!(status.success(), "P failed: {status}");
    assert_eq!(std::fs::read_to_string(dir.join("p-done")).unwrap(), "ok\n");
    let _ = std::fs::remove_dir_all(&dir);
}
