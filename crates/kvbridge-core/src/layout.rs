//! How a KV cache is laid out in memory: which regions to register, where block `b` of
//! each region starts, and — inside a block — where each (K/V, head, token) unit lives.
//! Built from the engine's tensors (pointer, shape, strides, and what each axis means).
//!
//! The geometry inside a block is what lets two engines with different tensor-parallel
//! sizes, block sizes or layouts exchange KV byte-exactly: see [`crate::plan`].
use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// Where a region's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemKind {
    /// Host memory.
    Dram,
    /// GPU (CUDA device) memory.
    Vram,
}

/// What an axis of a cache tensor means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// The block (page) index.
    Block,
    /// K or V (size 2). Outside the block axis (FlashAttention `[2, B, ...]`) it splits the
    /// tensor into a K region and a V region; inside (FlashInfer `[B, 2, ...]`) K and V
    /// share each block.
    Kv,
    /// KV heads held by this rank.
    Head,
    /// Token slot within a block (the kernel block size).
    Token,
    /// The content of one (K/V, head, token): head_dim, or vLLM's packed `2*head_size`
    /// K|V content, or an MLA latent. Usually contiguous; when it is not (vLLM's CPU
    /// kernel stores K dim-major, `[head_dim, tokens]` per head), each content element
    /// is a row and a run of tokens is contiguous within a row instead.
    Dim,
}

/// How a region's blocks relate to tokens and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// Per-token K/V, split over KV heads across TP ranks.
    #[default]
    Attention,
    /// Per-token latent, replicated on every TP rank (MLA).
    Mla,
    /// Per-request state (Mamba/SSM): a block is an opaque whole, no token axis.
    State,
    /// A block of unknown structure (axes not given): transferable only between identical
    /// geometries.
    Opaque,
}

/// One KV cache tensor as the engine sees it. Strides are in elements, as in torch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// The tensor's (layer's) name.
    pub name: String,
    /// Address of the tensor's first element.
    pub ptr: u64,
    /// Size of each axis, in elements.
    pub shape: Vec<u64>,
    /// Stride of each axis, in elements.
    pub stride: Vec<u64>,
    /// Bytes per element.
    pub itemsize: u64,
    /// Where the memory lives.
    pub mem: MemKind,
    /// The device holding the memory (CUDA ordinal for VRAM, 0 for DRAM).
    pub device_id: u64,
    /// What each axis means (same length as `shape`). Empty: inferred, and the block is
    /// treated as [`RegionKind::Opaque`].
    #[serde(default)]
    pub axes: Vec<Axis>,
    #[serde(default)]
    /// What the blocks hold. With unlabelled axes only [`RegionKind::State`] is kept;
    /// anything else becomes [`RegionKind::Opaque`].
    pub kind: RegionKind,
    /// The KV-cache group (hybrid models): which list of block ids a request uses for it.
    #[serde(default)]
    pub group: u32,
    /// Sliding window in tokens (0: full attention). Only the blocks still in the window
    /// are transferred.
    #[serde(default)]
    pub window: u32,
    /// KV heads of the whole model (all ranks). 0: this tensor's heads × TP size.
    #[serde(default)]
    pub total_heads: u32,
    /// This tensor holds only K (0) or only V (1) of its layer, and has no K/V axis: for
    /// caches whose K and V parts are laid out differently (two views of one buffer,
    /// both named after the layer).
    #[serde(default)]
    pub kv_part: Option<u8>,
}

impl TensorInfo {
    /// A tensor with unlabelled axes (opaque blocks, full attention, group 0).
    pub fn opaque(name: &str, ptr: u64, shape: &[u64], stride: &[u64], itemsize: u64, mem: MemKind, device_id: u64) -> Self {
        Self {
            name: name.into(),
            ptr,
            shape: shape.into(),
            stride: stride.into(),
            itemsize,
            mem,
            device_id,
            axes: Vec::new(),
            kind: RegionKind::Opaque,
            group: 0,
            window: 0,
            total_heads: 0,
            kv_part: None,
        }
    }

    /// A tensor whose axes are labelled.
    #[allow(clippy::too_many_arguments)]
    pub fn labelled(
        name: &str,
        ptr: u64,
        shape: &[u64],
        stride: &[u64],
        axes: &[Axis],
        itemsize: u64,
        kind: RegionKind,
        total_heads: u32,
    ) -> Self {
        Self { axes: axes.into(), kind, total_heads, ..Self::opaque(name, ptr, shape, stride, itemsize, MemKind::Dram, 0) }
    }
}

/// A registered memory range of `num_blocks` equally sized blocks: block `b` is the
/// `block_len` bytes at `base + b * block_stride`. The fields after `device_id` say
/// where unit (kv, head, token) sits inside a block:
/// `kv_index * kv_stride + (head - first_head) * head_stride + token * token_stride`,
/// as `rows` rows of `unit_len` contiguous bytes, `row_stride` apart (one row when the
/// content is contiguous).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// The tensor (layer) name, suffixed `.k`/`.v` when K and V are separate regions.
    pub name: String,
    /// The tensor (layer) name: regions of the same layer pair up across engines.
    pub layer: String,
    /// Address of block 0.
    pub base: u64,
    /// Bytes in one block.
    pub block_len: u64,
    /// Bytes from one block's start to the next's (at least `block_len`).
    pub block_stride: u64,
    /// Blocks in the region (kernel blocks; state regions may differ).
    pub num_blocks: u64,
    /// Where the memory lives.
    pub mem: MemKind,
    /// The device holding the memory (CUDA ordinal for VRAM, 0 for DRAM).
    pub device_id: u64,
    /// What the blocks hold.
    pub kind: RegionKind,
    /// The KV-cache group: which of a request's block-id lists addresses this region.
    pub group: u32,
    /// Sliding window in tokens (0: full attention).
    pub window: u32,
    /// Tokens per (kernel) block; 0 when the block has no token axis.
    pub block_tokens: u32,
    /// Which of K (0) and V (1) this region holds, in order of `kv_stride`. Empty when the
    /// tensor has no K/V axis (vLLM packs K|V into the content; MLA; state).
    pub kv_parts: Vec<u8>,
    /// Bytes between the K and V parts within a block (unused with fewer than two parts).
    pub kv_stride: u64,
    /// The first KV head this region holds, counted over the whole model.
    pub first_head: u32,
    /// KV heads this region holds (1 for MLA, state and opaque regions).
    pub num_heads: u32,
    /// KV heads of the whole model, over all TP ranks.
    pub total_heads: u32,
    /// Bytes between consecutive heads within a block.
    pub head_stride: u64,
    /// Bytes between consecutive token slots within a block.
    pub token_stride: u64,
    /// Bytes in one row of a unit, contiguous.
    pub unit_len: u64,
    /// Rows per unit: 1 when the content is contiguous, else its elements (dim-major).
    pub rows: u32,
    /// Bytes between a unit's rows (0 with one row).
    pub row_stride: u64,
}

impl Region {
    /// A region of `num_blocks` opaque blocks of `block_len` bytes every `block_stride`
    /// bytes from `base`, in DRAM on device 0 (set the other fields with struct update).
    pub fn opaque(name: &str, base: u64, block_len: u64, block_stride: u64, num_blocks: u64) -> Self {
        Self {
            name: name.into(),
            layer: name.into(),
            base,
            block_len,
            block_stride,
            num_blocks,
            mem: MemKind::Dram,
            device_id: 0,
            kind: RegionKind::Opaque,
            group: 0,
            window: 0,
            block_tokens: 0,
            kv_parts: vec![],
            kv_stride: 0,
            first_head: 0,
            num_heads: 1,
            total_heads: 1,
            head_stride: 0,
            token_stride: 0,
            unit_len: block_len,
            rows: 1,
            row_stride: 0,
        }
    }

    /// Bytes spanned from the first block's start to the last block's end.
    pub fn span(&self) -> u64 {
        if self.num_blocks == 0 {
            0
        } else {
            (self.num_blocks - 1) * self.block_stride + self.block_len
        }
    }
    /// Address of block `b` (not checked against `num_blocks`).
    pub fn block_addr(&self, b: u64) -> u64 {
        self.base + b * self.block_stride
    }
    /// Blocks are back to back, so a run of consecutive blocks is one contiguous range.
    pub fn dense_blocks(&self) -> bool {
        self.block_stride == self.block_len
    }
}

/// Regions whose blocks share memory block by block, seen as one range per block: views of
/// one buffer interleaved within each block (vLLM's CPU cache registers a block's K part
/// and V part as two regions) fuse into one group; every other region is a group of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGroup {
    /// The lowest member base: where the group's block 0 starts.
    pub base: u64,
    /// Bytes from one block's start to the next's, shared by all members.
    pub stride: u64,
    /// Bytes from a block's start to the furthest member's block end (at most `stride`).
    pub footprint: u64,
    /// Blocks in each member region.
    pub num_blocks: u64,
    /// The device holding the members' memory.
    pub device_id: u64,
}

/// The [`BlockGroup`]s of `regions`, ordered by (device, stride, blocks, base), and each
/// region's group index. None if a region's blocks are empty or overlap their stride, or
/// its addresses overflow (regions may come from a peer).
pub fn block_groups(regions: &[Region]) -> Option<(Vec<BlockGroup>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| {
        let r = &regions[i];
        (r.device_id, r.block_stride, r.num_blocks, r.base)
    });
    let mut groups: Vec<BlockGroup> = Vec::new();
    let mut group_of = vec![0usize; regions.len()];
    for i in order {
        let r = &regions[i];
        if r.block_len == 0 || r.block_stride == 0 || r.block_len > r.block_stride {
            return None;
        }
        r.base.checked_add(r.block_stride)?;
        match groups.last_mut() {
            // Same key as the last group, so `r.base >= g.base`; `g.base + g.stride` was checked.
            Some(g)
                if g.device_id == r.device_id
                    && g.stride == r.block_stride
                    && g.num_blocks == r.num_blocks
                    && r.base < g.base + g.stride
                    && r.base - g.base + r.block_len <= g.stride =>
            {
                g.footprint = g.footprint.max(r.base - g.base + r.block_len);
            }
            _ => groups.push(BlockGroup {
                base: r.base,
                stride: r.block_stride,
                footprint: r.block_len,
                num_blocks: r.num_blocks,
                device_id: r.device_id,
            }),
        }
        group_of[i] = groups.len() - 1;
    }
    Some((groups, group_of))
}

/// The regions of one engine's KV cache, in tensor order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    /// The regions, in tensor order (a tensor split into K and V gives two).
    pub regions: Vec<Region>,
    /// Kernel blocks per tensor (what the block axis counts).
    pub num_blocks: u64,
    /// Kernel blocks per logical block (the scheduler's block ids are logical): vLLM's
    /// `physical_blocks_per_logical_kv_block`.
    pub blocks_per_logical: u32,
}

/// Heads `[first, first + count)` held by `rank` of `tp_size`, for `total` KV heads:
/// split when `tp_size <= total`, one replicated head per rank otherwise (as vLLM does).
pub fn heads_of_rank(total: u32, tp_size: u32, rank: u32) -> Result<(u32, u32), PlanError> {
    if total == 0 || tp_size == 0 || rank >= tp_size {
        return Err(PlanError::Layout(format!("bad head split: {total} KV heads, TP size {tp_size}, rank {rank}")));
    }
    if tp_size <= total {
        if total % tp_size != 0 {
            return Err(PlanError::Layout(format!("{total} KV heads do not split over TP size {tp_size}")));
        }
        let n = total / tp_size;
        Ok((rank * n, n))
    } else {
        if tp_size % total != 0 {
            return Err(PlanError::Layout(format!("TP size {tp_size} is not a multiple of {total} KV heads")));
        }
        Ok((rank / (tp_size / total), 1))
    }
}

impl KvLayout {
    /// Work out the regions from tensors. `num_blocks` is the number of *logical* blocks
    /// (the scheduler's); a labelled block axis may hold a multiple of it (kernel blocks).
    /// `tp_rank`/`tp_size` place this rank's heads among the model's.
    pub fn from_tensors(tensors: &[TensorInfo], num_blocks: u64, tp_rank: u32, tp_size: u32) -> Result<Self, PlanError> {
        if tensors.is_empty() {
            return Err(PlanError::NotRegistered);
        }
        if num_blocks == 0 {
            return Err(PlanError::Layout("cache has zero blocks".into()));
        }
        let mut regions = Vec::with_capacity(tensors.len() * 2);
        let mut kernel_blocks: Option<u64> = None;
        for t in tensors {
            let before = regions.len();
            if t.axes.is_empty() {
                infer_opaque(t, num_blocks, &mut regions)?;
            } else {
                labelled(t, tp_rank, tp_size, &mut regions)?;
            }
            for r in &regions[before..] {
                match kernel_blocks {
                    None => kernel_blocks = Some(r.num_blocks),
                    Some(n) if n != r.num_blocks && r.kind != RegionKind::State => {
                        return Err(PlanError::Layout(format!("tensor {}: {} blocks, other tensors have {n}", t.name, r.num_blocks)));
                    }
                    _ => {}
                }
            }
        }
        let nb = kernel_blocks.unwrap_or(num_blocks);
        if nb % num_blocks != 0 {
            return Err(PlanError::Layout(format!("{nb} kernel blocks is not a multiple of {num_blocks} logical blocks")));
        }
        let bpl = u32::try_from(nb / num_blocks).map_err(|_| PlanError::Layout("absurd kernel/logical block ratio".into()))?;
        Ok(Self { regions, num_blocks: nb, blocks_per_logical: bpl })
    }
}

fn bad(t: &TensorInfo, why: &str) -> PlanError {
    PlanError::Layout(format!("tensor {}: {why} (shape {:?}, stride {:?}, axes {:?})", t.name, t.shape, t.stride, t.axes))
}

/// Old-style inference: the block axis first, or second after a K/V axis of 2.
fn infer_opaque(t: &TensorInfo, num_blocks: u64, out: &mut Vec<Region>) -> Result<(), PlanError> {
    if t.shape.len() != t.stride.len() || t.shape.is_empty() {
        return Err(bad(t, "shape and stride disagree"));
    }
    if t.itemsize == 0 {
        return Err(bad(t, "zero itemsize"));
    }
    let bytes = |elems: u64| elems.checked_mul(t.itemsize).ok_or_else(|| bad(t, "size overflow"));
    let kind = if t.kind == RegionKind::State { RegionKind::State } else { RegionKind::Opaque };
    let region = |name: String, base: u64, len: u64, stride: u64, kv: Vec<u8>| Region {
        name,
        layer: t.name.clone(),
        mem: t.mem,
        device_id: t.device_id,
        kind,
        group: t.group,
        window: t.window,
        kv_parts: kv,
        ..Region::opaque("", base, len, stride, num_blocks)
    };
    if t.shape[0] == num_blocks {
        let inner: u64 = t.shape[1..].iter().product();
        if t.stride[0] < inner {
            return Err(bad(t, "blocks overlap"));
        }
        if !dense(&t.shape[1..], &t.stride[1..]) {
            return Err(bad(t, "a block is not contiguous"));
        }
        out.push(region(t.name.clone(), t.ptr, bytes(inner)?, bytes(t.stride[0])?, vec![]));
    } else if t.shape.len() >= 2 && t.shape[0] == 2 && t.shape[1] == num_blocks {
        let inner: u64 = t.shape[2..].iter().product();
        if !dense(&t.shape[2..], &t.stride[2..]) || t.stride[1] < inner {
            return Err(bad(t, "a block is not contiguous"));
        }
        for (i, kv) in ["k", "v"].iter().enumerate() {
            let base = t.ptr.checked_add(bytes(t.stride[0] * i as u64)?).ok_or_else(|| bad(t, "address overflow"))?;
            out.push(region(format!("{}.{kv}", t.name), base, bytes(inner)?, bytes(t.stride[1])?, vec![i as u8]));
        }
    } else {
        return Err(bad(t, &format!("no axis of size num_blocks={num_blocks} in position 0 (or 1 after a K/V axis of 2)")));
    }
    Ok(())
}

/// A tensor with labelled axes.
fn labelled(t: &TensorInfo, tp_rank: u32, tp_size: u32, out: &mut Vec<Region>) -> Result<(), PlanError> {
    let n = t.shape.len();
    if t.axes.len() != n || t.stride.len() != n {
        return Err(bad(t, "shape, stride and axes disagree"));
    }
    if t.itemsize == 0 {
        return Err(bad(t, "zero itemsize"));
    }
    let find = |a: Axis| -> Result<Option<usize>, PlanError> {
        let mut it = t.axes.iter().enumerate().filter(|(_, x)| **x == a).map(|(i, _)| i);
        let first = it.next();
        if it.next().is_some() {
            return Err(bad(t, &format!("axis {a:?} appears twice")));
        }
        Ok(first)
    };
    let blk = find(Axis::Block)?.ok_or_else(|| bad(t, "no block axis"))?;
    let dim = find(Axis::Dim)?.ok_or_else(|| bad(t, "no content (dim) axis"))?;
    let kv = find(Axis::Kv)?;
    let head = find(Axis::Head)?;
    let tok = find(Axis::Token)?;
    // Content is contiguous, or (dim-major) the token axis is and each content element
    // is a row.
    let dim_major = t.stride[dim] != 1 && t.shape[dim] != 1;
    if dim_major && (t.kind != RegionKind::Attention || tok.map(|i| t.stride[i]) != Some(1)) {
        return Err(bad(t, "the content axis must be contiguous (stride 1), or, for attention, the token axis"));
    }
    if let Some(k) = kv {
        if t.shape[k] != 2 && t.shape[k] != 1 {
            return Err(bad(t, "the K/V axis must have size 1 or 2"));
        }
    }
    if t.kv_part.is_some_and(|p| p > 1 || kv.is_some()) {
        return Err(bad(t, "kv_part must be 0 (K) or 1 (V), on a tensor without a K/V axis"));
    }
    match t.kind {
        RegionKind::Mla if kv.is_some() || head.map(|h| t.shape[h]).unwrap_or(1) != 1 => {
            return Err(bad(t, "an MLA cache has one latent per token: no K/V axis and at most one head"));
        }
        RegionKind::Attention | RegionKind::Mla if tok.is_none() => return Err(bad(t, "attention caches need a token axis")),
        RegionKind::Opaque => return Err(bad(t, "labelled axes need a kind other than opaque")),
        _ => {}
    }
    let item = t.itemsize;
    let b = |elems: u64| elems.checked_mul(item).ok_or_else(|| bad(t, "size overflow"));
    // K/V or head axes outside the block axis (FlashAttention's `[2, B, ...]`, vLLM's
    // `LHBNC`: `[H, B, N, C]` per layer) split the tensor into one region per index.
    let kv_outer = kv.map(|k| t.shape[k] == 2 && t.stride[k] > t.stride[blk]).unwrap_or(false);
    let head_outer = t.kind == RegionKind::Attention && head.is_some_and(|h| t.shape[h] > 1 && t.stride[h] > t.stride[blk]);
    // The axes inside a block must not alias: ordered by stride, each steps over
    // everything the smaller ones span. The block is the range they span; it may have
    // gaps (a per-layer view of a cross-layer cache such as vLLM's `BHLNC` holds every
    // `L`-th run of its block), which other views of the buffer fill.
    let inner: Vec<usize> = (0..n).filter(|&i| i != blk && !(kv_outer && Some(i) == kv) && !(head_outer && Some(i) == head)).collect();
    if inner.iter().any(|&i| t.shape[i] == 0) {
        return Err(bad(t, "an axis inside a block has size 0"));
    }
    let mut by_stride: Vec<(u64, u64)> = inner.iter().map(|&i| (t.stride[i], t.shape[i])).filter(|&(_, sz)| sz != 1).collect();
    by_stride.sort();
    let mut expect = 1u64;
    for (st, sz) in by_stride {
        if st < expect {
            return Err(bad(t, "axes inside a block overlap (their strides alias)"));
        }
        expect = (sz - 1).checked_mul(st).and_then(|x| x.checked_add(expect)).ok_or_else(|| bad(t, "size overflow"))?;
    }
    if t.stride[blk] < expect && t.shape[blk] > 1 {
        return Err(bad(t, "blocks overlap"));
    }
    let block_len = b(expect)?;
    let size = |a: Option<usize>| a.map(|i| t.shape[i]).unwrap_or(1);
    let stride_b = |a: Option<usize>| -> Result<u64, PlanError> { a.map(|i| b(t.stride[i])).unwrap_or(Ok(0)) };
    let local_heads = u32::try_from(size(head)).map_err(|_| bad(t, "too many heads"))?;
    let (first_head, num_heads, total_heads) = match t.kind {
        RegionKind::Attention => {
            let total = if t.total_heads > 0 { t.total_heads } else { local_heads.saturating_mul(tp_size.max(1)) };
            let (first, count) = heads_of_rank(total, tp_size.max(1), tp_rank)?;
            if count != local_heads {
                return Err(bad(
                    t,
                    &format!("rank {tp_rank} of {tp_size} should hold {count} of {total} KV heads, tensor has {local_heads}"),
                ));
            }
            (first, count, total)
        }
        _ => (0, 1, 1),
    };
    let kv_count = size(kv);
    let parts: Vec<Vec<u8>> = if let Some(p) = t.kv_part {
        vec![vec![p]]
    } else if kv_outer {
        vec![vec![0], vec![1]]
    } else if kv.is_some() {
        vec![(0..kv_count as u8).collect()]
    } else {
        vec![vec![]]
    };
    // One region per (outer K/V part, outer head), or per K/V part.
    let outer_heads: Vec<Option<u32>> = if head_outer { (0..num_heads).map(Some).collect() } else { vec![None] };
    for (i, kv_parts) in parts.into_iter().enumerate() {
        for &oh in &outer_heads {
            let kv_off = if kv_outer { b(t.stride[kv.unwrap_or(0)] * i as u64)? } else { 0 };
            let head_off = match (oh, head) {
                (Some(h), Some(hx)) => b(t.stride[hx].checked_mul(u64::from(h)).ok_or_else(|| bad(t, "size overflow"))?)?,
                _ => 0,
            };
            let off = kv_off.checked_add(head_off).ok_or_else(|| bad(t, "address overflow"))?;
            let mut name = match t.kv_part {
                Some(p) => format!("{}.{}", t.name, ["k", "v"][usize::from(p)]),
                None if kv_outer => format!("{}.{}", t.name, ["k", "v"][i]),
                None => t.name.clone(),
            };
            if let Some(h) = oh {
                name = format!("{name}.h{}", first_head + h);
            }
            out.push(Region {
                name,
                layer: t.name.clone(),
                base: t.ptr.checked_add(off).ok_or_else(|| bad(t, "address overflow"))?,
                block_len,
                block_stride: b(t.stride[blk])?,
                num_blocks: t.shape[blk],
                mem: t.mem,
                device_id: t.device_id,
                kind: t.kind,
                group: t.group,
                window: t.window,
                block_tokens: if t.kind == RegionKind::State {
                    0
                } else {
                    u32::try_from(size(tok)).map_err(|_| bad(t, "block too large"))?
                },
                kv_parts: kv_parts.clone(),
                kv_stride: if kv_outer { 0 } else { stride_b(kv)? },
                first_head: first_head + oh.unwrap_or(0),
                num_heads: if oh.is_some() { 1 } else { num_heads },
                total_heads,
                head_stride: if oh.is_some() { 0 } else { stride_b(head)? },
                token_stride: stride_b(tok)?,
                unit_len: if t.kind == RegionKind::State {
                    block_len
                } else if dim_major {
                    item
                } else {
                    b(t.shape[dim])?
                },
                rows: if dim_major { u32::try_from(t.shape[dim]).map_err(|_| bad(t, "content too large"))? } else { 1 },
                row_stride: if dim_major { b(t.stride[dim])? } else { 0 },
            });
        }
    }
    Ok(())
}

/// True if `shape` with `stride` (elements) is C-contiguous.
fn dense(shape: &[u64], stride: &[u64]) -> bool {
    let mut expect = 1u64;
    for (s, st) in shape.iter().zip(stride).rev() {
        if *s != 1 && *st != expect {
            return false;
        }
        expect = expect.saturating_mul(*s);
    }
    true
}

#[cfg(test)]
#[path = "layout_tests.rs"]
mod tests;
