//! GPU lane, push (a module of the `gpu` test binary): layer-wise WRITEs from a VRAM cache racing the "kernel" that writes each
//! layer. Runs where a CUDA driver and device exist (skips, saying so, elsewhere;
//! `KVBRIDGE_GPU_TESTS=require` makes a missing GPU a failure).
//!
//! P (TP 1, 32-token HND blocks) keeps its cache in VRAM; D (TP 1, 16-token NHD blocks) in
//! DRAM. Each layer's KV write is queued on a non-blocking stream behind 8 GiB of memsets,
//! and `save_layer` is called at once, as vLLM calls `save_kv_layer` while the GPU still
//! runs the forward. With a CUDA event recorded on that stream (`CudaFence`, what the
//! connector does) every WRITE waits and D's bytes are exact; the deliberate run without the
//! fence must corrupt (D's check fails), which shows the race the fence closes is real.
use std::time::{Duration, Instant};

use super::common::{free_port_pair, poll_until};
use super::{gpu_or_skip, runtime_or_skip, DevBuf, Stream};
use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::layout::MemKind;
use kvbridge_core::scheduler::{FinishReason, PushScheduler, SchedulerSide};
use kvbridge_core::testkit::{Cache, CacheLayout, Spec};
use kvbridge_driver::clock::now_unix;
use kvbridge_driver::worker::Fence;
use kvbridge_nixl::cuda;

const TOKENS: u64 = 150;
const LAYERS: u32 = 3;
/// Memsets queued ahead of each layer's KV write (1 GiB each).
const DELAY_GIB: usize = 8;

fn spec(block: u32, layout: CacheLayout) -> Spec {
    Spec::dense(LAYERS, 4, 64, block, 32, layout)
}

fn config(role: &str, engine: &str, port: u16, block: u32, cuda: Option<u32>) -> ConnectorConfig {
    let compat = CompatInfo { model: "gpu-push".into(), block_size: block, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"transfer_mode":"push","side_channel_host":"127.0.0.1","side_channel_port":{port},"kv_lease_duration":30,"push_registration_timeout":30}}}}"#
    );
    ConnectorConfig::from_json(
        &json,
        EngineInfo { tp_size: 1, tp_rank: 0, dp_rank: 0, compat, cuda_device: cuda, ..Default::default() },
        |_| None,
    )
    .expect("config")
}

/// One layer-wise push of a request from P's VRAM to D's DRAM, each layer written on a
/// busy stream; `fenced`: with a CUDA event per layer (and at the end of the forward).
/// Returns D's byte check and the time from the first `save_layer` to D's completion.
fn push_once(fenced: bool) -> (Result<(), String>, Duration) {
    let (pp, dp) = (free_port_pair(), free_port_pair());
    let p_cfg = config("kv_producer", "P", pp, 32, Some(0));
    let p = kvbridge_nixl::new_worker(p_cfg.clone(), None).expect("P worker on the GPU");
    let mut p_host = Cache::new(spec(32, CacheLayout::Hnd));
    // P's cache in VRAM: one device buffer per tensor, the host cache as the source of truth.
    let host = p_host.tensors();
    let dev: Vec<DevBuf> = host.iter().map(|t| DevBuf::new(t.shape.iter().product::<u64>() as usize)).collect();
    let vram: Vec<_> = host
        .iter()
        .zip(&dev)
        .map(|(t, d)| kvbridge_core::layout::TensorInfo { ptr: d.ptr, mem: MemKind::Vram, device_id: 0, ..t.clone() })
        .collect();
    p.register(&vram, 32).expect("P registers VRAM");
    let d_cache = Cache::new(spec(16, CacheLayout::Nhd));
    let d = kvbridge_nixl::new_worker(config("kv_consumer", "D", dp, 16, None), None).expect("D worker");
    d.register(&d_cache.tensors(), 32).expect("D registers DRAM");
    let (mut ps, mut ds) = (PushScheduler::new(p_cfg), PushScheduler::new(config("kv_consumer", "D", dp, 16, None)));

    // D registers its blocks with P first (the layer-wise case).
    let params = format!(
        r#"{{"do_remote_prefill":true,"transfer_mode":"push","transfer_id":"t","remote_engine_id":"P","remote_host":"127.0.0.1","remote_port":{pp},"tp_size":1}}"#
    );
    assert_eq!(ds.get_num_new_matched_tokens("d1", TOKENS, 0, Some(&params)).num_tokens, TOKENS);
    let d_blocks: Vec<u32> = (5..5 + TOKENS.div_ceil(16) as u32).rev().collect();
    ds.update_state_after_alloc("d1", &d_blocks, TOKENS);
    d.start_load(&ds.build_connector_meta().to_bytes().unwrap()).unwrap();
    let t0 = Instant::now();
    while p.push_stats().registrations_accepted < 1 {
        assert!(t0.elapsed() < Duration::from_secs(20), "P never accepted D's registration");
        std::thread::sleep(Duration::from_millis(5));
    }

    let p_params = r#"{"do_remote_decode":true,"transfer_id":"t"}"#;
    ps.get_num_new_matched_tokens("p1", TOKENS, 0, Some(p_params));
    let p_blocks: Vec<u32> = (1..=TOKENS.div_ceil(32) as u32).collect();
    ps.prefill_completing("p1", &p_blocks, TOKENS);
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();

    // The forward, on its own stream: per layer a long busy period, then the KV write.
    let stream = Stream::new();
    let scratch = DevBuf::new(1 << 30);
    let fence = |fenced: bool| -> Result<Option<Box<dyn Fence>>, kvbridge_nixl::NixlError> {
        if fenced {
            Ok(Some(Box::new(cuda::CudaFence::record(stream.0 as u64)?)))
        } else {
            Ok(None)
        }
    };
    let blocks = vec![p_blocks.clone()];
    let t_save = Instant::now();
    for (i, buf) in dev.iter().enumerate() {
        p_host.fill_tensor(&blocks, TOKENS, i);
        for _ in 0..DELAY_GIB {
            // SAFETY: the scratch buffer holds 1 GiB; the stream is live.
            unsafe { cudarc::driver::result::memset_d8_async(scratch.ptr, 0x11, 1 << 30, stream.0) }.expect("memset");
        }
        let t = &p_host.tensors()[i];
        let len = t.shape.iter().product::<u64>() as usize;
        // SAFETY: the host tensor holds `len` bytes and lives until the end of this test;
        // the device buffer was allocated with the same size.
        let src = unsafe { std::slice::from_raw_parts(t.ptr as usize as *const u8, len) };
        // SAFETY: as above.
        unsafe { cudarc::driver::result::memcpy_htod_async(buf.ptr, src, stream.0) }.expect("htod");
        p.save_layer_fenced(&format!("model.layers.{i}"), || fence(fenced)).expect("fence");
    }
    p.wait_for_save_fenced(fence(fenced).expect("fence"));
    let f = ps.request_finished("p1", &p_blocks, FinishReason::LengthCapped, TOKENS, Some(p_params), now_unix());
    assert!(f.delay_free, "P holds its blocks until D was written");
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
    let got = poll_until(&d, 60, |f| !f.recving.is_empty() || !f.failed_recving.is_empty());
    let took = t_save.elapsed();
    assert_eq!(got.recving, vec!["d1".to_string()], "D's load: {got:?}");
    let sent = poll_until(&p, 30, |f| !f.sending.is_empty());
    assert_eq!(sent.sending, vec!["p1".to_string()], "P releases its blocks");
    std::mem::forget(scratch); // a free would synchronise the context; the stream's drop waits
    (d_cache.check(&[d_blocks], TOKENS), took)
}

#[test]
fn layerwise_push_from_vram_waits_for_the_kernel_and_corrupts_without_the_fence() {
    if !runtime_or_skip() || !gpu_or_skip() {
        return;
    }
    let (fenced, t_fenced) = push_once(true);
    fenced.expect("with the fence D's bytes must be exact");
    let (unfenced, t_unfenced) = push_once(false);
    println!(
        "FIGURE gpu_push_fence fenced=exact fenced_ms={:.2} unfenced={} unfenced_ms={:.2} delay_gib_per_layer={DELAY_GIB}",
        t_fenced.as_secs_f64() * 1e3,
        if unfenced.is_err() { "corrupt" } else { "exact" },
        t_unfenced.as_secs_f64() * 1e3
    );
    assert!(unfenced.is_err(), "without the fence a WRITE should have read a layer the stream had not written yet");
}
