//! GPU lane: VRAM KV caches over NIXL. Runs where a CUDA driver and device exist; on a
//! machine without one it says SKIP and passes (the only tests allowed to skip under
//! `CI=true`). `KVBRIDGE_GPU_TESTS=require` turns a missing GPU into a failure, for the
//! GPU runner.
//!
//! - VRAM → VRAM READs between two agents, each with its device's context made current
//!   before UCX starts: every byte checked, at several block counts and sizes, scattered
//!   block ids; throughput against a raw NIXL transfer of the same descriptors made once
//!   and re-posted (printed as `FIGURE` lines).
//! - P-side staging and host buffers: device↔host copies byte-exact; with the engine's
//!   stream named (`set_stream`), the copies follow a KV write still queued on a
//!   non-blocking stream (no context-wide synchronise).
//! - Layer-wise push from VRAM racing the kernel that writes each layer: exact with the
//!   CUDA fence, corrupt in a deliberate run without it (`push.rs`).
//! - Without a driver: the CUDA paths are typed errors (also covered by unit tests).
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;
mod push;
use common::{free_port, runtime_or_skip};
use kvbridge_core::layout::{KvLayout, MemKind, TensorInfo};
use kvbridge_core::plan::Piece;
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_core::wire::AgentMetadata;
use kvbridge_nixl::{cuda, NixlError, NixlOptions, NixlTransport};
use nixl_sys::{MemType, XferDescList, XferOp, XferStatus};

/// True if a CUDA device is here. Without one: skip, unless KVBRIDGE_GPU_TESTS=require.
fn gpu_or_skip() -> bool {
    let here = cuda::driver_present()
        && cudarc::driver::result::init().is_ok()
        && cudarc::driver::result::device::get_count().map(|n| n > 0).unwrap_or(false);
    if !here {
        assert!(
            std::env::var("KVBRIDGE_GPU_TESTS").map(|v| v != "require").unwrap_or(true),
            "KVBRIDGE_GPU_TESTS=require but no CUDA device is usable here"
        );
        eprintln!("SKIP: no CUDA driver or device (GPU tests run where one is)");
    }
    here
}

/// Device memory, freed on drop (the context must be current on this thread).
struct DevBuf {
    ptr: u64,
}

impl DevBuf {
    fn new(len: usize) -> Self {
        // SAFETY: a context is current (bound by `cuda::bind_device`); len > 0.
        Self { ptr: unsafe { cudarc::driver::result::malloc_sync(len) }.expect("cuMemAlloc") }
    }
    fn upload(&self, data: &[u8]) {
        // SAFETY: `data.len()` bytes fit in the allocation (callers pass its size).
        unsafe { cudarc::driver::result::memcpy_htod_sync(self.ptr, data) }.expect("htod");
    }
    fn download(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: as above.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, self.ptr) }.expect("dtoh");
        out
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_sync`, freed once.
        let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
    }
}

fn layout(ptr: u64, blocks: u64, block_bytes: u64) -> KvLayout {
    let t = TensorInfo::opaque("model.layers.0.self_attn.attn", ptr, &[blocks, block_bytes], &[block_bytes, 1], 1, MemKind::Vram, 0);
    KvLayout::from_tensors(&[t], blocks, 0, 1).expect("layout")
}

fn wait(t: &mut NixlTransport, x: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while t.poll(x).expect("transfer failed") == XferPoll::Pending {
        assert!(Instant::now() < deadline, "VRAM READ did not finish");
        std::hint::spin_loop();
    }
    t.release(x);
}

#[test]
fn vram_to_vram_reads_are_byte_exact_and_near_raw_nixl() {
    if !runtime_or_skip() || !gpu_or_skip() {
        return;
    }
    let opts = NixlOptions { cuda_device: Some(0), ..Default::default() };
    for (blocks, block_bytes) in [(16u64, 4096u64), (128, 64 << 10), (512, 256 << 10)] {
        let mut p = NixlTransport::new(&format!("gpu-p-{blocks}"), &opts).expect("P agent");
        let mut d = NixlTransport::new(&format!("gpu-d-{blocks}"), &opts).expect("D agent");
        let bytes = (blocks * block_bytes) as usize;
        let (pb, db) = (DevBuf::new(bytes), DevBuf::new(bytes));
        let pattern: Vec<u8> = (0..bytes).map(|i| ((i as u64 * 2_654_435_761) >> 13) as u8).collect();
        pb.upload(&pattern);
        db.upload(&vec![0u8; bytes]);
        let (pl, dl) = (layout(pb.ptr, blocks, block_bytes), layout(db.ptr, blocks, block_bytes));
        p.register(&pl).expect("register P VRAM");
        d.register(&dl).expect("register D VRAM");
        let md = AgentMetadata {
            engine_id: "P".into(),
            agent_name: format!("gpu-p-{blocks}"),
            tp_rank: 0,
            tp_size: 1,
            block_size: 16,
            blocks_per_logical: 1,
            regions: pl.regions.clone(),
            nixl_md: p.local_metadata().expect("P metadata"),
            staging_regions: vec![],
        };
        d.add_remote("P", &md).expect("load P");
        // Half of P's blocks, scattered, into other D blocks.
        let pairs: Vec<(u64, u64)> = (0..blocks / 2).map(|i| ((i * 7 + 3) % blocks, blocks - 1 - i)).collect();
        let pieces: Vec<Piece> = pairs
            .iter()
            .map(|&(src, dst)| Piece {
                local: db.ptr + dst * block_bytes,
                remote: pb.ptr + src * block_bytes,
                len: block_bytes,
                local_dev: 0,
                remote_dev: 0,
            })
            .collect();
        let reps = 10;
        let mut ours = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            let x = d.read("P", &pieces, b"").expect("post READ");
            wait(&mut d, x);
            ours.push(t0.elapsed().as_secs_f64());
        }
        let got = db.download(bytes);
        for &(src, dst) in &pairs {
            let (s, e) = ((src * block_bytes) as usize, (dst * block_bytes) as usize);
            assert!(got[e..e + block_bytes as usize] == pattern[s..s + block_bytes as usize], "block {src} → {dst} differs");
        }
        // Raw NIXL: the same descriptors in one request made once, re-posted.
        let remote_agent = d.remote_agent("P").expect("loaded").to_string();
        let mut lo = XferDescList::new(MemType::Vram).expect("dlist");
        let mut ro = XferDescList::new(MemType::Vram).expect("dlist");
        for pc in &pieces {
            lo.add_desc(pc.local as usize, pc.len as usize, 0);
            ro.add_desc(pc.remote as usize, pc.len as usize, 0);
        }
        let req = d.agent().create_xfer_req(XferOp::Read, &lo, &ro, &remote_agent, None).expect("raw request");
        let mut raw = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            d.agent().post_xfer_req(&req, None).expect("raw post");
            while d.agent().get_xfer_status(&req).expect("status") == XferStatus::InProgress {
                std::hint::spin_loop();
            }
            raw.push(t0.elapsed().as_secs_f64());
        }
        drop(req);
        let med = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (o, r) = (med(ours), med(raw));
        let moved = (pairs.len() as u64 * block_bytes) as f64;
        println!(
            "FIGURE gpu_vram_read blocks={} block_bytes={block_bytes} kvbridge_gib_s={:.2} raw_nixl_gib_s={:.2} ratio={:.2}",
            pairs.len(),
            moved / o / f64::from(1 << 30),
            moved / r / f64::from(1 << 30),
            r / o
        );
    }
}

#[test]
fn cuda_paths_without_a_driver_are_typed_errors() {
    if cuda::driver_present() {
        eprintln!("SKIP: a CUDA driver is present (the GPU test covers this machine)");
        return;
    }
    assert!(matches!(cuda::bind_device(0), Err(NixlError::CudaUnavailable)));
    if !runtime_or_skip() {
        return;
    }
    // An agent asked to start on a GPU refuses cleanly, and so does VRAM registration.
    let opts = NixlOptions { cuda_device: Some(0), ..Default::default() };
    assert!(matches!(NixlTransport::new("no-gpu", &opts), Err(NixlError::CudaUnavailable)));
    let mut t = NixlTransport::new("no-gpu-dram", &NixlOptions::default()).expect("DRAM agent");
    let err = t.register(&layout(0x10_0000, 4, 4096)).expect_err("VRAM without CUDA");
    assert!(err.to_string().contains("CUDA"), "{err}");
    // The host-buffer and staging copies of a GPU cache refuse too (nothing is touched).
    let copy = [(0x10_0000u64, 0x20_0000u64, 16u64)];
    for stream in [None, Some(0), Some(0x7f00_0000_1000)] {
        let err = t.copy_device_to_host(0, &copy, stream).expect_err("device→host without CUDA");
        assert!(err.to_string().contains("CUDA"), "{err}");
        let err = t.copy_host_to_device(0, &copy, stream).expect_err("host→device without CUDA");
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}

/// A single-rank pull config on 127.0.0.1: `top` is added to the top-level JSON (`,"key":v`),
/// `extra` to `kv_connector_extra_config`.
fn gpu_cfg(role: &str, engine: &str, port: u16, cuda: Option<u32>, top: &str, extra: &str) -> kvbridge_core::ConnectorConfig {
    use kvbridge_core::config::{CompatInfo, EngineInfo};
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}"{top},"kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{port},"handshake_timeout":5{extra}}}}}"#
    );
    let compat = CompatInfo { model: "gpu-lane".into(), block_size: 16, ..Default::default() };
    kvbridge_core::ConnectorConfig::from_json(&json, EngineInfo { tp_size: 1, compat, cuda_device: cuda, ..Default::default() }, |_| None)
        .expect("config")
}

/// Step D and P until D's load of `req` is reported; returns how long that took.
fn load_until_done(
    p: &kvbridge_nixl::NixlWorker,
    ps: &mut kvbridge_core::scheduler::PullScheduler,
    d: &kvbridge_nixl::NixlWorker,
    ds: &mut kvbridge_core::scheduler::PullScheduler,
    req: &str,
) -> Duration {
    use kvbridge_core::scheduler::SchedulerSide;
    let t0 = Instant::now();
    loop {
        d.start_load(&ds.build_connector_meta().to_bytes().unwrap()).unwrap();
        p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
        let (pf, df) = (p.get_finished(), d.get_finished());
        assert!(df.failed_recving.is_empty(), "{df:?}");
        ps.update_connector_output(&pf.sending, &[]);
        if df.recving.iter().any(|r| r == req) {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "D's load did not finish");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// P on the GPU with `kv_staging_blocks`: the staged KV is copied device→host in
/// `wait_for_save`, P's VRAM blocks are then overwritten, and D (a DRAM cache here) still
/// reads every byte from P's host staging buffer.
#[test]
fn gpu_p_stages_to_host_and_d_reads_it() {
    if !runtime_or_skip() || !gpu_or_skip() {
        return;
    }
    p_stages_to_host_and_d_reads_it(false);
}

/// As above, with the forward's KV write queued on a non-blocking stream behind a long
/// memset (the legacy stream does not wait for it) and that stream named to the worker
/// (`set_stream`, as vLLM's connector does from torch's current stream): the staging
/// copies must run after the write on that stream, with no context-wide synchronise.
#[test]
fn gpu_staging_copies_follow_the_engine_stream() {
    if !runtime_or_skip() || !gpu_or_skip() {
        return;
    }
    p_stages_to_host_and_d_reads_it(true);
}

/// A non-blocking CUDA stream, destroyed on drop.
pub(crate) struct Stream(pub(crate) cudarc::driver::sys::CUstream);
impl Stream {
    pub(crate) fn new() -> Self {
        let mut s: cudarc::driver::sys::CUstream = std::ptr::null_mut();
        // SAFETY: a context is current; writes one handle.
        let r = unsafe { cudarc::driver::sys::cuStreamCreate(&mut s, cudarc::driver::sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) };
        assert_eq!(r, cudarc::driver::sys::CUresult::CUDA_SUCCESS, "cuStreamCreate");
        Self(s)
    }
}
impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created above, destroyed once.
        let _ = unsafe { cudarc::driver::sys::cuStreamDestroy_v2(self.0) };
    }
}

fn p_stages_to_host_and_d_reads_it(on_stream: bool) {
    use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
    use kvbridge_driver::clock::now_unix;
    const BLOCKS: u64 = 32;
    const BB: u64 = 64 << 10;
    let (pp, dp) = (free_port(), free_port());
    let staging = r#","kv_staging_blocks":8"#;
    let cfg = |role: &str, engine: &str, port: u16, cuda: Option<u32>| gpu_cfg(role, engine, port, cuda, "", staging);
    let p = kvbridge_nixl::new_worker(cfg("kv_producer", "P", pp, Some(0)), None).expect("P worker on the GPU");
    let bytes = (BLOCKS * BB) as usize;
    let pb = DevBuf::new(bytes);
    let pattern: Vec<u8> = (0..bytes).map(|i| ((i as u64 * 40_503) >> 7) as u8).collect();
    let vram = TensorInfo::opaque("model.layers.0.self_attn.attn", pb.ptr, &[BLOCKS, BB], &[BB, 1], 1, MemKind::Vram, 0);
    p.register(&[vram], BLOCKS).expect("P registers VRAM + host staging");
    let d_cache = vec![0u8; bytes];
    let d = kvbridge_nixl::new_worker(cfg("kv_consumer", "D", dp, None), None).expect("D worker");
    let dram = TensorInfo::opaque("model.layers.0.self_attn.attn", d_cache.as_ptr() as u64, &[BLOCKS, BB], &[BB, 1], 1, MemKind::Dram, 0);
    d.register(&[dram], BLOCKS).expect("D registers DRAM");
    let (mut ps, mut ds) =
        (PullScheduler::new(cfg("kv_producer", "P", pp, Some(0))), PullScheduler::new(cfg("kv_consumer", "D", dp, None)));
    let dec = r#"{"do_remote_decode":true}"#;
    let p_blocks = [3u32, 4, 9];
    ps.get_num_new_matched_tokens("p1", 48, 0, Some(dec));
    ps.prefill_completing("p1", &p_blocks, 48);
    let stream = on_stream.then(Stream::new);
    p.set_stream(stream.as_ref().map(|s| s.0 as u64));
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
    match &stream {
        None => pb.upload(&pattern), // the forward
        Some(s) => {
            // The forward on its own stream: a long memset (4 GiB of scratch, several ms)
            // and then the KV write, both still queued when `wait_for_save` runs.
            let scratch = DevBuf::new(1 << 30);
            for _ in 0..4 {
                // SAFETY: the scratch buffer holds 1 GiB; `s` is a live stream.
                unsafe { cudarc::driver::result::memset_d8_async(scratch.ptr, 0x11, 1 << 30, s.0) }.expect("memset");
            }
            // SAFETY: `pattern` holds `bytes` and outlives the synchronise in wait_for_save.
            unsafe { cudarc::driver::result::memcpy_htod_async(pb.ptr, &pattern, s.0) }.expect("htod async");
            std::mem::forget(scratch); // freed with the context (a free would synchronise)
        }
    }
    p.wait_for_save(); // device → host
    let f = ps.request_finished("p1", &p_blocks, FinishReason::LengthCapped, 48, Some(dec), now_unix());
    assert!(!f.delay_free, "staged: P's VRAM blocks are free at once");
    p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
    pb.upload(&vec![0xEE; bytes]); // another request reuses P's blocks
    let params = f.kv_transfer_params.unwrap().to_string();
    assert_eq!(ds.get_num_new_matched_tokens("d1", 48, 0, Some(&params)).num_tokens, 48);
    let d_blocks = [20u32, 7, 30];
    ds.update_state_after_alloc("d1", &d_blocks, 48);
    load_until_done(&p, &mut ps, &d, &mut ds, "d1");
    for (&src, &dst) in p_blocks.iter().zip(&d_blocks) {
        let (s, e) = ((u64::from(src) * BB) as usize, (u64::from(dst) * BB) as usize);
        assert!(d_cache[e..e + BB as usize] == pattern[s..s + BB as usize], "block {src} → {dst} differs");
    }
}

/// Host buffers (`kv_buffer_device="cpu"`) on two GPU engines: P copies device→host in
/// `wait_for_save` and its VRAM is then overwritten; D reads into its host buffer and copies
/// host→device before reporting the load. D's VRAM must hold P's bytes at D's block ids,
/// and every other D block must be untouched. Block counts and sizes vary.
#[test]
fn gpu_host_buffer_round_trip_is_byte_exact() {
    use kvbridge_core::scheduler::{FinishReason, PullScheduler, SchedulerSide};
    use kvbridge_driver::clock::now_unix;

    if !runtime_or_skip() || !gpu_or_skip() {
        return;
    }
    const BLOCKS: u64 = 64;
    let cpu_buffer = r#","kv_buffer_device":"cpu""#;
    for (round, (bb, n)) in [(16u64 << 10, 3usize), (256 << 10, 17), (1 << 20, 40)].into_iter().enumerate() {
        let (pp, dp) = (free_port(), free_port());
        let cfg = |role: &str, engine: &str, port: u16| gpu_cfg(role, engine, port, Some(0), cpu_buffer, "");
        let (pe, de) = (format!("P{round}"), format!("D{round}"));
        assert!(cfg("kv_producer", &pe, pp).host_buffer, "kv_buffer_device=cpu on a GPU engine is a host buffer");
        let bytes = (BLOCKS * bb) as usize;
        let p = kvbridge_nixl::new_worker(cfg("kv_producer", &pe, pp), None).expect("P worker on the GPU");
        let pb = DevBuf::new(bytes);
        let pattern: Vec<u8> = (0..bytes).map(|i| ((i as u64 * 40_503 + round as u64) >> 7) as u8).collect();
        let t = |ptr| TensorInfo::opaque("model.layers.0.self_attn.attn", ptr, &[BLOCKS, bb], &[bb, 1], 1, MemKind::Vram, 0);
        p.register(&[t(pb.ptr)], BLOCKS).expect("P registers its host buffer");
        let d = kvbridge_nixl::new_worker(cfg("kv_consumer", &de, dp), None).expect("D worker on the GPU");
        let db = DevBuf::new(bytes);
        db.upload(&vec![0x5A; bytes]);
        d.register(&[t(db.ptr)], BLOCKS).expect("D registers its host buffer");
        let (mut ps, mut ds) = (PullScheduler::new(cfg("kv_producer", &pe, pp)), PullScheduler::new(cfg("kv_consumer", &de, dp)));
        let dec = r#"{"do_remote_decode":true}"#;
        // Scattered, distinct, never block 0 (the null block, which is never moved).
        let p_blocks: Vec<u32> = (0..n as u32).map(|i| 1 + (i * 5) % 63).collect();
        let d_blocks: Vec<u32> = (0..n as u32).map(|i| 63 - (i * 4) % 63).collect();
        let tokens = 16 * n as u64;
        ps.get_num_new_matched_tokens("p1", tokens, 0, Some(dec));
        ps.prefill_completing("p1", &p_blocks, tokens);
        p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
        pb.upload(&pattern); // the forward
        let t0 = Instant::now();
        p.wait_for_save(); // device → host
        let d2h = t0.elapsed();
        let f = ps.request_finished("p1", &p_blocks, FinishReason::LengthCapped, tokens, Some(dec), now_unix());
        assert!(f.delay_free, "host buffer: P's blocks stay held until D reads");
        p.start_load(&ps.build_connector_meta().to_bytes().unwrap()).unwrap();
        pb.upload(&vec![0xEE; bytes]); // D must read P's host buffer, not its VRAM
        let params = f.kv_transfer_params.unwrap().to_string();
        assert_eq!(ds.get_num_new_matched_tokens("d1", tokens, 0, Some(&params)).num_tokens, tokens);
        ds.update_state_after_alloc("d1", &d_blocks, tokens);
        let load = load_until_done(&p, &mut ps, &d, &mut ds, "d1");
        let got = db.download(bytes);
        for b in 0..BLOCKS as usize {
            let at = b * bb as usize..(b + 1) * bb as usize;
            match d_blocks.iter().position(|&x| x as usize == b) {
                Some(i) => {
                    let src = p_blocks[i] as usize * bb as usize;
                    assert!(got[at] == pattern[src..src + bb as usize], "{bb}-byte blocks: P block {} → D block {b} differs", p_blocks[i]);
                }
                None => assert!(got[at].iter().all(|&x| x == 0x5A), "{bb}-byte blocks: D block {b} was written"),
            }
        }
        let mib = (n as u64 * bb) as f64 / f64::from(1 << 20);
        println!(
            "FIGURE host_buffer block_bytes={bb} blocks={n} mib={mib:.2} p_d2h_ms={:.3} d_load_ms={:.3} (read + h2d)",
            d2h.as_secs_f64() * 1e3,
            load.as_secs_f64() * 1e3
        );
    }
}
