//! Synthetic KV caches for tests and benchmarks: a logical KV tensor with known contents,
//! sharded per an engine's TP rank, block size and layout into real memory.
//!
//! Every byte of the logical cache is a function of (seed, layer, head, token, content
//! byte), so a receiver can check that each token it needs arrived byte-exact, wherever
//! its own layout puts it, and that nothing else was written.
use crate::layout::{heads_of_rank, Axis, KvLayout, MemKind, RegionKind, TensorInfo};

/// How a rank lays out each attention layer (`C` = content bytes per head and token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLayout {
    /// `[B, H, T, C]` with K|V packed in C (vLLM 0.32, HND).
    Hnd,
    /// `[B, T, H, C]` with K|V packed in C (NHD).
    Nhd,
    /// `[2, B, T, H, C/2]`: K and V are separate regions (FlashAttention, NHD).
    KvSplitNhd,
    /// `[B, 2, H, T, C/2]`: K and V inside each block (FlashInfer-style, HND).
    KvInnerHnd,
    /// `[H, B, T, C]` with K|V packed in C: heads outside the block axis (vLLM's `LHBNC`
    /// per-layer view), so each head is a region of its own.
    Lhbnc,
    /// vLLM's CPU kernel: `[B, H, 2, T*C/2]` with K dim-major (`[C/2, T]`) and V
    /// token-major (`[T, C/2]`); registered as two views (`kv_part` K and V).
    CpuVec,
}

/// One engine rank's cache.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Full-attention layers (KV-cache group 0).
    pub layers: u32,
    /// KV heads of the whole model, over all TP ranks.
    pub total_heads: u32,
    /// Content bytes per (head, token): K and V together (MLA: the latent).
    pub content: u32,
    /// The engine's TP size.
    pub tp_size: u32,
    /// This rank's TP rank.
    pub tp_rank: u32,
    /// Tokens per kernel block.
    pub block_tokens: u32,
    /// Kernel blocks per logical block.
    pub blocks_per_logical: u32,
    /// Logical blocks.
    pub num_blocks: u32,
    /// How each attention layer is laid out.
    pub layout: CacheLayout,
    /// Layers hold an MLA latent (one per token, replicated on every rank) instead of
    /// per-head K/V.
    pub mla: bool,
    /// Extra sliding-window layers (KV-cache group 1) and their window in tokens.
    pub swa_layers: u32,
    /// Sliding window of the `swa_layers`, in tokens.
    pub window: u32,
    /// Extra state (Mamba-style) layers (group 2), `state_bytes` per block.
    pub state_layers: u32,
    /// Bytes of state per block in each state layer.
    pub state_bytes: u32,
    /// Pipeline parallel: the model layer this stage's first tensor is (tensor `i` is
    /// layer `first_layer + i`, by name and content).
    pub first_layer: u32,
}

impl Spec {
    /// A single-rank attention cache: `layers` layers of `total_heads` heads, `content` bytes
    /// per (head, token), `num_blocks` blocks of `block_tokens` tokens, one KV-cache group.
    pub fn dense(layers: u32, total_heads: u32, content: u32, block_tokens: u32, num_blocks: u32, layout: CacheLayout) -> Self {
        Self {
            layers,
            total_heads,
            content,
            tp_size: 1,
            tp_rank: 0,
            block_tokens,
            blocks_per_logical: 1,
            num_blocks,
            layout,
            mla: false,
            swa_layers: 0,
            window: 0,
            state_layers: 0,
            state_bytes: 0,
            first_layer: 0,
        }
    }

    /// Tokens per logical (scheduler) block: `block_tokens * blocks_per_logical`.
    pub fn logical_block_size(&self) -> u32 {
        self.block_tokens * self.blocks_per_logical
    }
    fn heads(&self) -> (u32, u32) {
        if self.mla {
            (0, 1)
        } else {
            heads_of_rank(self.total_heads, self.tp_size, self.tp_rank).unwrap_or((0, 1))
        }
    }
    /// Number of KV-cache groups used (attention, then SWA, then state).
    pub fn groups(&self) -> usize {
        if self.state_layers > 0 {
            3
        } else if self.swa_layers > 0 {
            2
        } else {
            1
        }
    }
}

/// Block id 0 is the null block (as in vLLM): never filled, and must stay untouched.
pub const NULL_BLOCK: u32 = 0;

/// What fills unwritten memory.
pub const SENTINEL: u8 = 0xA5;

/// The logical KV value of one byte.
pub fn kv_byte(seed: u64, layer: u32, head: u32, token: u64, c: u32) -> u8 {
    let mut x = seed ^ (u64::from(layer) << 48) ^ (u64::from(head) << 40) ^ (token << 16) ^ u64::from(c);
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let b = (x >> 29) as u8;
    if b == SENTINEL {
        0x5A
    } else {
        b
    }
}

struct Tensor {
    buf: Vec<u8>,
    kind: RegionKind,
    group: u32,
    shape: Vec<u64>,
    stride: Vec<u64>,
    axes: Vec<Axis>,
    /// [`CacheLayout::CpuVec`]: shape/stride/axes describe `[B, H, 2, T, C/2]`, but K is
    /// stored dim-major.
    cpu_vec: bool,
}

/// A rank's cache in real (heap) memory.
pub struct Cache {
    /// What the cache was built from.
    pub spec: Spec,
    tensors: Vec<Tensor>,
}

impl Cache {
    /// Allocates the cache, every byte [`SENTINEL`].
    pub fn new(spec: Spec) -> Self {
        let mut tensors = Vec::new();
        let nb = u64::from(spec.num_blocks) * u64::from(spec.blocks_per_logical);
        let t = u64::from(spec.block_tokens);
        let (_, h) = spec.heads();
        let h = u64::from(h);
        let c = u64::from(spec.content);
        let attn = |kind: RegionKind, group: u32| -> Tensor {
            use Axis::*;
            let (shape, axes): (Vec<u64>, Vec<Axis>) = if kind == RegionKind::Mla {
                (vec![nb, t, c], vec![Block, Token, Dim])
            } else {
                match spec.layout {
                    CacheLayout::Hnd => (vec![nb, h, t, c], vec![Block, Head, Token, Dim]),
                    CacheLayout::Nhd => (vec![nb, t, h, c], vec![Block, Token, Head, Dim]),
                    CacheLayout::KvSplitNhd => (vec![2, nb, t, h, c / 2], vec![Kv, Block, Token, Head, Dim]),
                    CacheLayout::KvInnerHnd => (vec![nb, 2, h, t, c / 2], vec![Block, Kv, Head, Token, Dim]),
                    CacheLayout::CpuVec => (vec![nb, h, 2, t, c / 2], vec![Block, Head, Kv, Token, Dim]),
                    CacheLayout::Lhbnc => (vec![h, nb, t, c], vec![Head, Block, Token, Dim]),
                }
            };
            let mut stride = vec![1u64; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                stride[i] = stride[i + 1] * shape[i + 1];
            }
            let n: u64 = shape.iter().product();
            let cpu_vec = spec.layout == CacheLayout::CpuVec && kind == RegionKind::Attention;
            Tensor { buf: vec![SENTINEL; n as usize], kind, group, shape, stride, axes, cpu_vec }
        };
        let main = if spec.mla { RegionKind::Mla } else { RegionKind::Attention };
        for _ in 0..spec.layers {
            tensors.push(attn(main, 0));
        }
        for _ in 0..spec.swa_layers {
            tensors.push(attn(main, 1));
        }
        for _ in 0..spec.state_layers {
            let s = u64::from(spec.state_bytes);
            let n = u64::from(spec.num_blocks);
            tensors.push(Tensor {
                buf: vec![SENTINEL; (n * s) as usize],
                kind: RegionKind::State,
                group: 2,
                shape: vec![n, s],
                stride: vec![s, 1],
                axes: vec![Axis::Block, Axis::Dim],
                cpu_vec: false,
            });
        }
        Self { spec, tensors }
    }

    /// The tensors to register (pointers into this cache's buffers).
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let mut out = Vec::new();
        for (i, t) in self.tensors.iter().enumerate() {
            let info = TensorInfo {
                name: format!("model.layers.{}", self.spec.first_layer as usize + i),
                ptr: t.buf.as_ptr() as u64,
                shape: t.shape.clone(),
                stride: t.stride.clone(),
                itemsize: 1,
                mem: MemKind::Dram,
                device_id: 0,
                axes: t.axes.clone(),
                kind: t.kind,
                group: t.group,
                window: if t.group == 1 { self.spec.window } else { 0 },
                total_heads: if t.kind == RegionKind::Attention { self.spec.total_heads } else { 0 },
                kv_part: None,
            };
            if !t.cpu_vec {
                out.push(info);
                continue;
            }
            // Two views of [B, H, 2, T, C/2]: K as [B, H, C/2, T], V as [B, H, T, C/2].
            use Axis::*;
            let (nb, h, tk, half) = (t.shape[0], t.shape[1], t.shape[3], t.shape[4]);
            let (sb, sh) = (t.stride[0], t.stride[1]);
            out.push(TensorInfo {
                shape: vec![nb, h, half, tk],
                stride: vec![sb, sh, tk, 1],
                axes: vec![Block, Head, Dim, Token],
                kv_part: Some(0),
                ..info.clone()
            });
            out.push(TensorInfo {
                ptr: info.ptr + tk * half,
                shape: vec![nb, h, tk, half],
                stride: vec![sb, sh, half, 1],
                axes: vec![Block, Head, Token, Dim],
                kv_part: Some(1),
                ..info
            });
        }
        out
    }

    /// The layout of [`tensors`](Self::tensors), as the connector would register it.
    /// (Test and benchmark support: a testkit spec that yields no layout is a bug in the
    /// test, so it panics.)
    #[allow(clippy::expect_used)]
    pub fn layout(&self) -> KvLayout {
        KvLayout::from_tensors(&self.tensors(), u64::from(self.spec.num_blocks), self.spec.tp_rank, self.spec.tp_size)
            .expect("testkit layouts are valid")
    }

    /// Byte offset of (kernel block, head, token, content byte) in tensor `ti`.
    fn offset(&self, ti: usize, kb: u64, head: u32, tok: u64, c: u32) -> usize {
        let t = &self.tensors[ti];
        let (first, _) = self.spec.heads();
        let half = u64::from(self.spec.content / 2);
        if t.cpu_vec {
            let (kv, d, tk) = (u64::from(c) / half, u64::from(c) % half, t.shape[3]);
            let inner = if kv == 0 { d * tk + tok } else { tok * half + d };
            return (kb * t.stride[0] + u64::from(head - first) * t.stride[1] + kv * tk * half + inner) as usize;
        }
        let mut off = 0u64;
        for (i, a) in t.axes.iter().enumerate() {
            let v = match a {
                Axis::Block => kb,
                Axis::Head => u64::from(head - first),
                Axis::Token => tok,
                Axis::Kv => u64::from(c) / half,
                Axis::Dim if t.axes.contains(&Axis::Kv) => u64::from(c) % half,
                Axis::Dim => u64::from(c),
            };
            off += v * t.stride[i];
        }
        off as usize
    }

    /// Visit every (tensor, kernel block, head, token, content byte) this rank holds for
    /// tokens `[from, to)` of a request whose blocks (logical ids, per group) cover
    /// block positions `[first_pos, first_pos + len)`. State tensors: the last block.
    fn visit(&self, blocks: &[Vec<u32>], first_pos: &[u64], from: u64, to: u64, mut f: impl FnMut(usize, usize, u8)) {
        let s = &self.spec;
        let lbs = u64::from(s.logical_block_size());
        let kbs = u64::from(s.block_tokens);
        let (first, n) = s.heads();
        for (ti, t) in self.tensors.iter().enumerate() {
            let g = t.group as usize;
            let Some(ids) = blocks.get(g) else { continue };
            if t.kind == RegionKind::State {
                if let Some(&b) = ids.last().filter(|&&b| b != NULL_BLOCK) {
                    for c in 0..s.state_bytes {
                        let off = b as usize * s.state_bytes as usize + c as usize;
                        f(ti, off, kv_byte(0xC0FFEE, s.first_layer + ti as u32, 0, 0, c));
                    }
                }
                continue;
            }
            let lo = if g == 1 && to > u64::from(s.window) { from.max(to - u64::from(s.window)) } else { from };
            for tok in lo..to {
                let pos = tok / lbs;
                if pos < first_pos[g] {
                    continue;
                }
                let Some(&b) = ids.get((pos - first_pos[g]) as usize) else { continue };
                if b == NULL_BLOCK {
                    continue;
                }
                let within = tok % lbs;
                let kb = u64::from(b) * u64::from(s.blocks_per_logical) + within / kbs;
                for h in first..first + n {
                    for c in 0..s.content {
                        let off = self.offset(ti, kb, h, within % kbs, c);
                        f(ti, off, kv_byte(0x5EED, s.first_layer + ti as u32, h, tok, c));
                    }
                }
            }
        }
    }

    /// P side: write the logical KV of tokens `[0, num_tokens)` into `blocks` (per group,
    /// covering the request from its first token), and the state into the last state block.
    pub fn fill(&mut self, blocks: &[Vec<u32>], num_tokens: u64) {
        let mut writes = Vec::new();
        self.visit(blocks, &vec![0; blocks.len()], 0, num_tokens, |ti, off, v| writes.push((ti, off, v)));
        for (ti, off, v) in writes {
            self.tensors[ti].buf[off] = v;
        }
    }

    /// Like [`fill`](Self::fill), for tensor (layer) `ti` only: a layer "computed" on its own.
    pub fn fill_tensor(&mut self, blocks: &[Vec<u32>], num_tokens: u64, ti: usize) {
        let mut writes = Vec::new();
        self.visit(blocks, &vec![0; blocks.len()], 0, num_tokens, |t, off, v| {
            if t == ti {
                writes.push((t, off, v))
            }
        });
        for (t, off, v) in writes {
            self.tensors[t].buf[off] = v;
        }
    }

    /// Every byte back to [`SENTINEL`] (buffers stay where they are: registrations hold).
    pub fn reset(&mut self) {
        for t in &mut self.tensors {
            t.buf.fill(SENTINEL);
        }
    }

    /// Cache tensors (one per layer, before [`CacheLayout::CpuVec`]'s split into K and V
    /// views).
    pub fn num_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// D side: check that every token of `[0, num_tokens)` held in `blocks` (per group,
    /// covering the *end* of the request: a prefix hit skips the first positions) arrived,
    /// then that every other kernel block is untouched (still [`SENTINEL`]).
    pub fn check(&self, blocks: &[Vec<u32>], num_tokens: u64) -> Result<(), String> {
        let lbs = u64::from(self.spec.logical_block_size());
        let total = num_tokens.div_ceil(lbs);
        let first_pos: Vec<u64> = blocks.iter().map(|b| total.saturating_sub(b.len() as u64)).collect();
        let mut bad = Vec::new();
        let mut touched = std::collections::HashSet::new();
        self.visit(blocks, &first_pos, 0, num_tokens, |ti, off, v| {
            touched.insert((ti, off));
            let got = self.tensors[ti].buf[off];
            if got != v && bad.len() < 5 {
                bad.push(format!("tensor {ti} offset {off}: got {got:#x}, want {v:#x}"));
            }
        });
        if !bad.is_empty() {
            return Err(format!("wrong bytes: {}", bad.join("; ")));
        }
        // Bytes outside what this rank needed (other blocks, the null block, tokens out of
        // the window, padding past the last token) may only hold P's data for the same
        // token (a whole-block copy) — never garbage from elsewhere. Blocks not in the
        // request must be untouched.
        for (ti, t) in self.tensors.iter().enumerate() {
            let used: std::collections::HashSet<u64> = blocks
                .get(t.group as usize)
                .map(|ids| {
                    ids.iter()
                        .filter(|&&b| b != NULL_BLOCK)
                        .flat_map(|&b| {
                            let k = if t.kind == RegionKind::State { 1 } else { u64::from(self.spec.blocks_per_logical) };
                            (0..k).map(move |i| u64::from(b) * k + i)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let nb = t.shape[t.axes.iter().position(|a| *a == Axis::Block).unwrap_or(0)];
            let bstride = t.stride[t.axes.iter().position(|a| *a == Axis::Block).unwrap_or(0)] as usize;
            let inner: usize = t.shape.iter().zip(&t.axes).filter(|(_, a)| **a != Axis::Block).map(|(s, _)| *s as usize).product();
            // An axis outside the block axis (K/V, or LHBNC's heads) splits each block.
            let outer = t.axes.first().is_some_and(|a| *a != Axis::Block);
            for kb in 0..nb {
                if used.contains(&kb) {
                    continue;
                }
                let parts = if outer { t.shape[0] as usize } else { 1 };
                let len = inner / parts;
                for p in 0..parts {
                    let start = p * t.stride[0] as usize * usize::from(outer) + kb as usize * bstride;
                    if t.buf[start..start + len].iter().any(|&x| x != SENTINEL) {
                        return Err(format!("tensor {ti} kernel block {kb} (not in the request) was written"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The handshake metadata rank `rank` of engine `engine` advertises for cache `c`.
fn metadata(c: &Cache, engine: &str, agent_name: String, rank: usize, nixl_md: Vec<u8>) -> crate::wire::AgentMetadata {
    let l = c.layout();
    crate::wire::AgentMetadata {
        engine_id: engine.into(),
        agent_name,
        tp_rank: rank as u32,
        tp_size: c.spec.tp_size,
        block_size: c.spec.logical_block_size(),
        blocks_per_logical: l.blocks_per_logical,
        regions: l.regions,
        nixl_md,
        staging_regions: Vec::new(),
    }
}

/// A P engine and a D engine (all ranks of each), with one request's blocks.
pub struct Scenario {
    /// P's caches, one per TP rank.
    pub p: Vec<Cache>,
    /// D's caches, one per TP rank.
    pub d: Vec<Cache>,
    /// P's block ids per group, covering the whole prompt.
    pub p_blocks: Vec<Vec<u32>>,
    /// D's block ids per group, covering the end of the prompt (after a prefix hit).
    pub d_blocks: Vec<Vec<u32>>,
    /// The prompt length in tokens.
    pub num_tokens: u64,
}

impl Scenario {
    /// All ranks of P (`p`) and D (`d`), given rank-0 specs; P filled with the request.
    pub fn new(p: &Spec, d: &Spec, p_blocks: Vec<Vec<u32>>, d_blocks: Vec<Vec<u32>>, num_tokens: u64) -> Self {
        let ranks = |s: &Spec| -> Vec<Cache> { (0..s.tp_size).map(|r| Cache::new(Spec { tp_rank: r, ..s.clone() })).collect() };
        let mut pc = ranks(p);
        for c in &mut pc {
            c.fill(&p_blocks, num_tokens);
        }
        Self { p: pc, d: ranks(d), p_blocks, d_blocks, num_tokens }
    }

    /// What P rank `rank` advertises (its agent name `p{rank}`).
    pub fn p_metadata(&self, rank: usize, nixl_md: Vec<u8>) -> crate::wire::AgentMetadata {
        metadata(&self.p[rank], "P", format!("p{rank}"), rank, nixl_md)
    }

    /// What D rank `rank` advertises (its agent name `d{rank}`).
    pub fn d_metadata(&self, rank: usize, nixl_md: Vec<u8>) -> crate::wire::AgentMetadata {
        metadata(&self.d[rank], "D", format!("d{rank}"), rank, nixl_md)
    }

    /// The plan of D rank `rank`, from the metadata of every P rank.
    pub fn plan(&self, rank: usize, p_md: &[crate::wire::AgentMetadata]) -> Result<crate::plan::TransferPlan, crate::error::PlanError> {
        let c = &self.d[rank];
        let tp = crate::plan::TpMapping::new(c.spec.tp_size, rank as u32, self.p[0].spec.tp_size)?;
        let mds: Vec<_> = tp.sources.iter().map(|&q| p_md[q as usize].clone()).collect();
        crate::plan::TransferPlan::build(&c.layout(), c.spec.tp_size, rank as u32, c.spec.logical_block_size(), &mds, Some(NULL_BLOCK))
    }

    /// The request's block ids per group for [`TransferPlan::transfer`](crate::plan::TransferPlan::transfer):
    /// D's as local, P's as remote.
    pub fn groups(&self) -> Vec<crate::plan::GroupBlocks<'_>> {
        self.d_blocks
            .iter()
            .zip(&self.p_blocks)
            .map(|(l, r)| crate::plan::GroupBlocks { local: l.as_slice(), remote: r.as_slice() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_roundtrips_on_one_cache() {
        let spec = Spec {
            layers: 2,
            total_heads: 4,
            content: 8,
            tp_size: 2,
            tp_rank: 1,
            block_tokens: 4,
            blocks_per_logical: 2,
            num_blocks: 8,
            layout: CacheLayout::KvInnerHnd,
            mla: false,
            swa_layers: 1,
            window: 5,
            state_layers: 1,
            state_bytes: 16,
            first_layer: 0,
        };
        let mut c = Cache::new(spec);
        let blocks = vec![vec![3, 4], vec![NULL_BLOCK, 6], vec![7]];
        c.fill(&blocks, 13);
        c.check(&blocks, 13).unwrap();
        // A different block list must fail the check.
        assert!(c.check(&[vec![4, 3], vec![NULL_BLOCK, 6], vec![7]], 13).is_err());
    }
}
