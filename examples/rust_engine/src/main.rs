//! Two tiny Rust "engines" hand a prompt's KV cache from prefill (P) to decode (D) through
//! kvbridge over NIXL, in two processes, with no Python anywhere.
//!
//! ```text
//! cargo run -p kvbridge-example-engine -- demo --mode pull     # or --mode push
//! ```
//!
//! `demo` is the decode engine; it starts the prefill engine as a child process
//! (`rust_engine prefill ...`) and talks to it over the child's stdin/stdout the way a proxy
//! would: it hands P the request and gets P's `kv_transfer_params` back (pull), or hands
//! both sides a transfer id (push). The KV itself moves over NIXL (UCX over loopback, DRAM),
//! with the handshake on kvbridge's ZMQ side channel.
//!
//! Each engine owns a paged KV cache per layer (`[blocks, 2, heads, tokens, head_dim]` on P
//! with 16-token blocks, `[blocks, 2, tokens, heads, head_dim]` on D with 32-token blocks: the
//! transfer plan maps one onto the other), a free-block list, a scheduler-side connector and a
//! worker-side connector, and drives them the way vLLM drives a `KVConnectorBase_V1` (see
//! `docs/rust-api.md`). P "computes" each token's K and V as a function of the prompt; D
//! checks every byte it received against that function.
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::layout::{Axis, RegionKind, TensorInfo};
use kvbridge_core::scheduler::{new_scheduler, FinishReason, SchedulerSide};
use kvbridge_driver::clock::now_unix;
use kvbridge_nixl::NixlWorker;

const LAYERS: usize = 4;
const HEADS: u64 = 2;
/// Elements per (K/V, head, token), of `ITEM` bytes each.
const HEAD_DIM: u64 = 16;
const ITEM: u64 = 2;
const NUM_BLOCKS: u64 = 64;
/// The prompt of the one request the demo moves.
const PROMPT_TOKENS: u64 = 300;

type Error = Box<dyn std::error::Error>;

/// How an engine lays out one layer's cache.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// `[block, kv, head, token, dim]`
    Hnd,
    /// `[block, kv, token, head, dim]`
    Nhd,
}

/// One engine's paged KV cache in DRAM: one buffer per layer.
struct PagedCache {
    layout: Layout,
    block_tokens: u64,
    layers: Vec<Vec<u8>>,
}

impl PagedCache {
    fn new(layout: Layout, block_tokens: u64) -> Self {
        let len = (NUM_BLOCKS * 2 * HEADS * block_tokens * HEAD_DIM * ITEM) as usize;
        Self { layout, block_tokens, layers: (0..LAYERS).map(|_| vec![0u8; len]).collect() }
    }

    fn layer_name(l: usize) -> String {
        format!("model.layers.{l}.self_attn.attn")
    }

    /// What kvbridge needs to know about the cache: one labelled tensor per layer.
    fn tensors(&self) -> Vec<TensorInfo> {
        let (t, h, d) = (self.block_tokens, HEADS, HEAD_DIM);
        let (shape, axes) = match self.layout {
            Layout::Hnd => ([NUM_BLOCKS, 2, h, t, d], [Axis::Block, Axis::Kv, Axis::Head, Axis::Token, Axis::Dim]),
            Layout::Nhd => ([NUM_BLOCKS, 2, t, h, d], [Axis::Block, Axis::Kv, Axis::Token, Axis::Head, Axis::Dim]),
        };
        // Contiguous strides, in elements (as torch reports them).
        let mut stride = [1u64; 5];
        for i in (0..4).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        self.layers
            .iter()
            .enumerate()
            .map(|(l, buf)| {
                let name = Self::layer_name(l);
                TensorInfo::labelled(&name, buf.as_ptr() as u64, &shape, &stride, &axes, ITEM, RegionKind::Attention, HEADS as u32)
            })
            .collect()
    }

    /// Byte offset of element byte `byte` of (kv, head, token position `pos`) in a layer,
    /// for a request whose blocks are `blocks`.
    fn offset(&self, blocks: &[u32], kv: u64, head: u64, pos: u64, byte: u64) -> usize {
        let (t, h, d) = (self.block_tokens, HEADS, HEAD_DIM * ITEM);
        let (block, slot) = (u64::from(blocks[(pos / t) as usize]), pos % t);
        let in_block = match self.layout {
            Layout::Hnd => ((kv * h + head) * t + slot) * d,
            Layout::Nhd => ((kv * t + slot) * h + head) * d,
        };
        (block * 2 * h * t * d + in_block + byte) as usize
    }

    /// The "forward" for layer `l`: every prompt token's K and V, from the prompt.
    fn compute_layer(&mut self, l: usize, blocks: &[u32], prompt: &[u32]) {
        for (pos, &tok) in prompt.iter().enumerate() {
            for kv in 0..2 {
                for head in 0..HEADS {
                    for b in 0..HEAD_DIM * ITEM {
                        let at = self.offset(blocks, kv, head, pos as u64, b);
                        self.layers[l][at] = kv_byte(tok, pos as u64, l, kv, head, b);
                    }
                }
            }
        }
    }

    /// D: the bytes that should have arrived, checked. Returns the bytes checked.
    fn verify(&self, blocks: &[u32], prompt: &[u32]) -> Result<u64, String> {
        let mut n = 0;
        for l in 0..LAYERS {
            for (pos, &tok) in prompt.iter().enumerate() {
                for kv in 0..2 {
                    for head in 0..HEADS {
                        for b in 0..HEAD_DIM * ITEM {
                            let (want, got) =
                                (kv_byte(tok, pos as u64, l, kv, head, b), self.layers[l][self.offset(blocks, kv, head, pos as u64, b)]);
                            if want != got {
                                return Err(format!("layer {l} token {pos} kv {kv} head {head} byte {b}: {got} != {want}"));
                            }
                            n += 1;
                        }
                    }
                }
            }
        }
        Ok(n)
    }
}

/// The KV byte a token "computes" (any function of its inputs would do).
fn kv_byte(tok: u32, pos: u64, layer: usize, kv: u64, head: u64, b: u64) -> u8 {
    let x = u64::from(tok).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (pos << 20) ^ ((layer as u64) << 12) ^ (kv << 9) ^ (head << 6) ^ b;
    (x ^ (x >> 29) ^ (x >> 47)) as u8
}

fn prompt() -> Vec<u32> {
    (0..PROMPT_TOKENS as u32).map(|i| (i * 7919 + 13) % 32_000).collect()
}

/// An engine: its cache, its block allocator, and kvbridge's two connector halves.
struct Engine {
    name: &'static str,
    cache: PagedCache,
    free: Vec<u32>,
    sched: Box<dyn SchedulerSide + Send + Sync>,
    worker: NixlWorker,
}

impl Engine {
    fn new(name: &'static str, role: &str, mode: &str, port: u16, layout: Layout, block_tokens: u64) -> Result<Self, Error> {
        let json = serde_json::json!({
            "kv_role": role,
            "engine_id": name,
            "kv_connector_extra_config": {
                "transfer_mode": mode,
                "side_channel_host": "127.0.0.1",
                "side_channel_port": port,
            },
        })
        .to_string();
        let compat = CompatInfo {
            model: "tiny-rust-engine".into(),
            num_layers: LAYERS as u32,
            num_kv_heads: HEADS as u32,
            head_size: HEAD_DIM as u32,
            ..Default::default()
        };
        let info = EngineInfo { tp_size: 1, tp_rank: 0, compat, ..Default::default() };
        let cfg = ConnectorConfig::from_json(&json, info, |k| std::env::var(k).ok())?;
        // Scheduler side (pure state machine) and worker side (NIXL agent + side channel).
        let sched = new_scheduler(cfg.clone());
        let worker = kvbridge_nixl::new_worker(cfg, None)?;
        let cache = PagedCache::new(layout, block_tokens);
        worker.register(&cache.tensors(), NUM_BLOCKS)?;
        // Block 0 is the null block (never moved), as in vLLM.
        Ok(Self { name, cache, free: (1..NUM_BLOCKS as u32).rev().collect(), sched, worker })
    }

    fn alloc(&mut self, tokens: u64) -> Result<Vec<u32>, Error> {
        let n = tokens.div_ceil(self.cache.block_tokens) as usize;
        if n > self.free.len() {
            return Err(format!("{}: {n} blocks wanted, {} free", self.name, self.free.len()).into());
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// One engine step's connector calls, before the forward: the scheduler's metadata to
    /// the worker, which starts loads (D) and releases (P).
    fn begin_step(&mut self) -> Result<(), Error> {
        self.sched.tick(now_unix());
        let md = self.sched.build_connector_meta();
        self.worker.start_load(&md.to_bytes()?)?;
        Ok(())
    }

    /// The end of a step: what the worker finished goes back to the scheduler. Returns it.
    fn end_step(&mut self) -> kvbridge_core::worker::FinishedSets {
        let f = self.worker.get_finished();
        self.sched.update_connector_output(&f.sending, &f.recving);
        f
    }
}

/// The prefill engine (a child process of `demo`). Reads the request from stdin, writes
/// `READY` and `PARAMS <json>` lines to stdout, exits once D has its KV.
fn prefill(mode: &str, port: u16) -> Result<(), Error> {
    let mut p = Engine::new("P", "kv_producer", mode, port, Layout::Hnd, 16)?;
    println!("READY");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let params = line.trim().to_string(); // {"do_remote_decode":true,...} from the "proxy"
    let (req, prompt) = ("p-req-1", prompt());
    let n = prompt.len() as u64;
    // Scheduling: nothing to load; blocks allocated; the prefill completes in this step.
    let m = p.sched.get_num_new_matched_tokens(req, n, 0, Some(&params));
    let blocks = p.alloc(n)?;
    p.sched.update_state_after_alloc(req, &[], m.num_tokens);
    p.sched.prefill_completing(req, &blocks, n);
    // The step: metadata to the worker, the forward layer by layer (push writes each layer
    // as soon as it is saved), then the end of the forward.
    p.begin_step()?;
    for l in 0..LAYERS {
        p.cache.compute_layer(l, &blocks, &prompt);
        p.worker.save_layer(&PagedCache::layer_name(l));
    }
    p.worker.wait_for_save();
    // max_tokens=1: the request ends here. The connector keeps its blocks for D.
    let fin = p.sched.request_finished(req, &blocks, FinishReason::LengthCapped, n, Some(&params), now_unix());
    let out = fin.kv_transfer_params.ok_or("P: no kv_transfer_params for D")?;
    println!("PARAMS {out}");
    std::io::stdout().flush()?;
    if !fin.delay_free {
        p.free.extend(&blocks);
    }
    // Keep stepping until the worker says D is done with the blocks, then free them.
    let t0 = Instant::now();
    loop {
        p.begin_step()?;
        let f = p.end_step();
        if f.sending.iter().any(|r| r == req) {
            p.free.extend(&blocks);
            eprintln!("P: D has the KV of {req}; {} blocks freed ({} free)", blocks.len(), p.free.len());
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("P: D never took the KV".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A free TCP port on 127.0.0.1 (for a side-channel listener).
fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The decode engine, which also plays the proxy: starts P, routes the request, loads the
/// KV, checks it.
fn demo(mode: &str) -> Result<(), Error> {
    let (p_port, d_port) = (free_port()?, free_port()?);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["prefill", "--mode", mode, "--port", &p_port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_p = child.stdin.take().ok_or("no stdin for P")?;
    let mut from_p = BufReader::new(child.stdout.take().ok_or("no stdout for P")?).lines();
    // Lines from P; anything else on its stdout (UCX may log there) is skipped.
    let mut expect = |tag: &str| -> Result<String, Error> {
        for line in from_p.by_ref() {
            if let Some(rest) = line?.strip_prefix(tag) {
                return Ok(rest.trim().to_string());
            }
        }
        Err(format!("P exited before printing {tag}").into())
    };
    let mut d = Engine::new("D", "kv_consumer", mode, d_port, Layout::Nhd, 32)?;
    expect("READY")?;
    let (req, prompt) = ("d-req-1", prompt());
    let n = prompt.len() as u64;
    let t0 = Instant::now();
    // The "proxy": pull sends P the request first and D the params P returns; push tells
    // both sides a transfer id, and P writes into the blocks D registers.
    let d_params = if mode == "push" {
        writeln!(to_p, r#"{{"do_remote_decode":true,"transfer_id":"t-1"}}"#)?;
        serde_json::json!({
            "do_remote_prefill": true, "transfer_mode": "push", "transfer_id": "t-1",
            "remote_engine_id": "P", "remote_host": "127.0.0.1", "remote_port": p_port, "tp_size": 1,
        })
        .to_string()
    } else {
        writeln!(to_p, r#"{{"do_remote_decode":true}}"#)?;
        expect("PARAMS")?
    };
    // Scheduling on D: the prompt's KV is external and loads asynchronously.
    d.sched.on_new_request(req, Some(&d_params));
    let m = d.sched.get_num_new_matched_tokens(req, n, 0, Some(&d_params));
    if !m.load_async || m.num_tokens != n {
        return Err(format!("D: expected an async load of {n} tokens, got {m:?}").into());
    }
    let blocks = d.alloc(n)?;
    d.sched.update_state_after_alloc(req, &blocks, m.num_tokens);
    // Steps until the worker reports the load (no forward runs for the request meanwhile).
    loop {
        d.begin_step()?;
        let f = d.end_step();
        if f.failed_recving.iter().any(|r| r == req) {
            return Err(format!("D: the load of {req} failed (invalid blocks {:?})", f.invalid_block_ids).into());
        }
        if f.recving.iter().any(|r| r == req) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("D: the load did not finish in 30 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let took = t0.elapsed();
    let bytes = d.cache.verify(&blocks, &prompt).map_err(|e| format!("D: KV differs: {e}"))?;
    let stats = d.worker.stats();
    println!(
        "{mode}: {n}-token prompt, P blocks of 16 tokens (HND) -> D blocks {blocks:?} of 32 tokens (NHD); \
         {bytes} KV bytes verified in {:.1} ms (descriptors: {})",
        took.as_secs_f64() * 1e3,
        if mode == "push" { "written by P".to_string() } else { stats.last_descriptors.to_string() },
    );
    // The request decodes and ends; D frees its blocks. P exits once it has freed its own.
    d.sched.request_finished(req, &blocks, FinishReason::LengthCapped, n, Some(&d_params), now_unix());
    d.free.extend(&blocks);
    drop(to_p);
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("P exited with {status}").into());
    }
    println!("{mode}: P released its blocks; OK");
    Ok(())
}

fn main() {
    // kvbridge logs through `tracing`: warnings and errors by default, more with RUST_LOG.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let mode = arg("--mode").unwrap_or_else(|| "pull".into());
    let res = match (args.get(1).map(String::as_str), mode.as_str()) {
        (Some("demo"), "pull" | "push") => demo(&mode),
        (Some("prefill"), "pull" | "push") => match arg("--port").and_then(|p| p.parse().ok()) {
            Some(port) => prefill(&mode, port),
            None => Err("prefill needs --port".into()),
        },
        _ => Err("usage: rust_engine demo [--mode pull|push]".into()),
    };
    if let Err(e) = res {
        eprintln!("rust_engine: {e}");
        std::process::exit(1);
    }
}
