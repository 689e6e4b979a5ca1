//! The transfer plan: all geometry worked out once per remote engine at handshake, so the
//! hot path only walks a request's block ids and emits `(local, remote, len)` pieces.
//!
//! **TP mapping.** A local (D) rank reads from, and notifies, a fixed set of remote (P)
//! ranks ([`TpMapping`]). Each (K/V part, head) unit the local rank holds is read from the
//! first of those ranks that holds it, which deduplicates GQA heads and replicated KV; MLA
//! latents are read from one rank. Every rank of the set gets exactly one notification
//! per request, so P frees a request's blocks once every D rank that needs them is done.
//!
//! **Blocks and tokens.** Tokens are cut into segments of `gcd(local kernel block,
//! remote kernel block)` tokens; a segment lies inside one block on each side. For each
//! pairing of in-block offsets there is a precomputed *template*: the byte ranges to copy,
//! already merged where they are contiguous on both sides (one range for identical
//! layouts, one per head for a head split, one per token for a head split of an
//! NHD layout). Block-size ratios work both ways, and kernel blocks may be smaller than
//! the scheduler's logical blocks.
//!
//! **Coalescing.** Pieces that are contiguous on both sides merge, so a run of consecutive
//! block ids becomes one descriptor per region. A piece never crosses a region boundary.
//!
//! **Groups.** Each region belongs to a KV-cache group with its own block ids. Attention
//! groups align blocks from the end (a local prefix hit reads only the missing tail);
//! sliding-window groups read only the segments still in the window; state (Mamba/SSM)
//! groups copy whole blocks, emitted after the attention pieces (`[FA | SSM]`).
use crate::error::PlanError;
use crate::layout::{KvLayout, Region, RegionKind};
use crate::wire::AgentMetadata;

/// The largest TP size a peer may advertise (the same bound `kv_transfer_params` and the
/// wire metadata use).
pub const MAX_TP_SIZE: u32 = 4096;

/// How a local worker rank maps onto the remote engine's ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpMapping {
    /// The local side's TP size (D's, also in a push plan).
    pub local_tp_size: u32,
    /// The local side's TP rank.
    pub local_tp_rank: u32,
    /// The remote side's TP size.
    pub remote_tp_size: u32,
    /// Remote ranks this rank reads from or notifies, in preference order.
    pub sources: Vec<u32>,
    /// Notifications each of those remote ranks gets per request, from all local ranks.
    pub notifs_per_remote_rank: u32,
}

impl TpMapping {
    /// `local >= remote`: local rank `r` pairs with remote rank `r * remote / local`.
    /// `local < remote`: with the `remote / local` ranks starting at `r * remote / local`.
    pub fn new(local_tp_size: u32, local_tp_rank: u32, remote_tp_size: u32) -> Result<Self, PlanError> {
        if local_tp_size == 0 || remote_tp_size == 0 || local_tp_rank >= local_tp_size {
            return Err(PlanError::Layout(format!("bad TP sizes: local {local_tp_size} (rank {local_tp_rank}), remote {remote_tp_size}")));
        }
        // A peer's handshake sets `remote_tp_size`; refuse absurd ones before the source list
        // below is allocated (2^28 remote ranks would be a 1 GiB vector).
        if local_tp_size > MAX_TP_SIZE || remote_tp_size > MAX_TP_SIZE {
            return Err(PlanError::Layout(format!("TP size above {MAX_TP_SIZE}: local {local_tp_size}, remote {remote_tp_size}")));
        }
        let (big, small) = (local_tp_size.max(remote_tp_size), local_tp_size.min(remote_tp_size));
        if big % small != 0 {
            return Err(PlanError::Layout(format!(
                "TP sizes {local_tp_size} (local) and {remote_tp_size} (remote) must divide one another"
            )));
        }
        let (sources, notifs) = if local_tp_size >= remote_tp_size {
            (vec![local_tp_rank / (local_tp_size / remote_tp_size)], local_tp_size / remote_tp_size)
        } else {
            let k = remote_tp_size / local_tp_size;
            ((local_tp_rank * k..local_tp_rank * k + k).collect(), 1)
        };
        Ok(Self { local_tp_size, local_tp_rank, remote_tp_size, sources, notifs_per_remote_rank: notifs })
    }
}

/// Upper bound on blocks in one remote region, and on the work a handshake may cause:
/// far above real caches, low enough that a hostile peer cannot make us allocate without
/// bound.
pub const MAX_BLOCKS: u64 = 1 << 32;
const MAX_TEMPLATE_UNITS: u64 = 1 << 22;
/// Upper bound on rows per unit (content elements of a dim-major cache).
const MAX_ROWS: u32 = 1 << 16;

/// One copy: `len` bytes from remote address `remote` to local address `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Local address of the first byte.
    pub local: u64,
    /// Remote address of the first byte.
    pub remote: u64,
    /// Bytes to copy.
    pub len: u64,
    /// Device id of the local memory (its region's `device_id`).
    pub local_dev: u32,
    /// Device id of the remote memory (its region's `device_id`).
    pub remote_dev: u32,
}

impl Piece {
    /// The same copy seen from the other side: a D-side plan's READ piece becomes the
    /// WRITE piece P posts in push mode.
    pub fn swapped(self) -> Self {
        Self { local: self.remote, remote: self.local, len: self.len, local_dev: self.remote_dev, remote_dev: self.local_dev }
    }
}

/// The pieces to read from one remote rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceRead {
    /// Index into [`TpMapping::sources`].
    pub source: usize,
    /// The remote TP rank (`tp.sources[source]`).
    pub remote_rank: u32,
    /// The copies from that rank, in plan order.
    pub pieces: Vec<Piece>,
}

/// What one request needs: reads per remote rank (ranks with nothing to read are only
/// notified), plus counts for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestTransfer {
    /// One entry per remote rank that has something to read.
    pub reads: Vec<SourceRead>,
    /// Total bytes to copy.
    pub bytes: u64,
    /// Descriptors after coalescing.
    pub descriptors: u64,
    /// Descriptors without cross-block coalescing (one per region, block and template
    /// range): what a per-block scheme would post.
    pub uncoalesced: u64,
}

/// A request's block ids for one KV-cache group, local and remote (logical ids).
#[derive(Debug, Clone, Copy)]
pub struct GroupBlocks<'a> {
    /// Local logical block ids (the end of the request's blocks).
    pub local: &'a [u32],
    /// Remote logical block ids (all of the request's blocks).
    pub remote: &'a [u32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rel {
    dst: u64,
    src: u64,
    len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geo {
    base: u64,
    stride: u64,
    len: u64,
    num_blocks: u64,
    dev: u32,
}

impl Geo {
    fn of(r: &Region) -> Self {
        Self { base: r.base, stride: r.block_stride, len: r.block_len, num_blocks: r.num_blocks, dev: r.device_id as u32 }
    }
}

/// How a request's blocks turn into segments; jobs with equal keys share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SegKey {
    group: u32,
    window: u32,
    state: bool,
    kbs_d: u32,
    bpl_d: u32,
    kbs_p: u32,
    bpl_p: u32,
}

/// One segment: a local kernel block, a remote kernel block, and which template applies.
#[derive(Debug, Clone, Copy)]
struct Seg {
    d: u64,
    p: u64,
    combo: u32,
}

/// A (K/V part, head) a local region needs.
type Unit = (Option<u8>, u32);

/// Copy work between one local region and one region of one remote rank.
#[derive(Debug, Clone)]
struct Job {
    local: usize,
    src: usize,
    remote: usize,
    key: usize,
    templates: Vec<Vec<Rel>>,
}

/// Everything needed to read requests' blocks from one remote engine.
#[derive(Debug, Clone)]
pub struct TransferPlan {
    /// The remote side's engine id.
    pub remote_engine_id: String,
    /// Agent name per source rank (same order as `tp.sources`).
    pub remote_agents: Vec<String>,
    /// How the local rank maps onto the remote side's ranks.
    pub tp: TpMapping,
    /// The remote ranks read from or notified, as `pp * remote_tp_size + tp` (with one
    /// pipeline stage, `tp.sources`), in the order of `remote_agents`.
    pub sources: Vec<u32>,
    /// Notifications each of those ranks gets per request, from all local ranks of all
    /// local pipeline stages that read it.
    pub expected: Vec<u32>,
    /// Local regions the plan was built for.
    pub num_regions: usize,
    /// Kernel blocks per local region (the local layout's `num_blocks`).
    pub local_num_blocks: u64,
    /// Kernel blocks per remote region (the first remote region's count).
    pub remote_num_blocks: u64,
    /// Block ids equal to this are the engine's null block (vLLM: 0): never read or written.
    pub null_block: Option<u32>,
    /// Byte ranges per block in the templates (1.0 = whole blocks): a measure of how
    /// fragmented the layouts make the copy.
    pub ranges_per_block: f64,
    local: Vec<Geo>,
    remote: Vec<Vec<Geo>>,
    keys: Vec<SegKey>,
    jobs: Vec<Job>,
}

#[path = "plan_geo.rs"]
mod geo;
#[path = "plan_pp.rs"]
mod pp;
use geo::{check_ranks, check_remote, fuse_jobs, gcd, layout_err, merge_sorted, unit_off};
pub use pp::{stage_of, MAX_PP_SIZE};

impl TransferPlan {
    /// Push mode: the plan P uses to write into D rank `d`'s blocks. It is D's READ plan
    /// from P's ranks `p_ranks` (P swaps the pieces into WRITEs and keeps its own), built
    /// after checking D's advertised regions like any peer-controlled value.
    pub fn build_push(d: &AgentMetadata, p_ranks: &[AgentMetadata], null_block: Option<u32>) -> Result<Self, PlanError> {
        if d.blocks_per_logical == 0 || d.blocks_per_logical > 1024 || d.block_size == 0 || d.tp_size == 0 || d.tp_rank >= d.tp_size {
            return Err(layout_err(format!(
                "D rank {}: bad block size {} / {} or TP rank of {}",
                d.tp_rank, d.block_size, d.blocks_per_logical, d.tp_size
            )));
        }
        if d.regions.is_empty() {
            return Err(layout_err(format!("D rank {} advertises no regions", d.tp_rank)));
        }
        for (i, r) in d.regions.iter().enumerate() {
            check_remote(d.tp_rank, i, r)?;
        }
        Self::build(&d.layout(), d.tp_size, d.tp_rank, d.block_size, p_ranks, null_block)
    }

    /// Build the plan from the local layout and the metadata of every remote rank in
    /// `TpMapping::new(local_tp_size, local_tp_rank, remote_tp).sources` (same order).
    /// `local_block_size` is the scheduler's (logical) block size. Everything a peer sent
    /// is checked; nothing here panics.
    pub fn build(
        local: &KvLayout,
        local_tp_size: u32,
        local_tp_rank: u32,
        local_block_size: u32,
        remote: &[AgentMetadata],
        null_block: Option<u32>,
    ) -> Result<Self, PlanError> {
        let first = remote.first().ok_or_else(|| layout_err("no remote metadata".into()))?;
        let tp = TpMapping::new(local_tp_size, local_tp_rank, first.tp_size)?;
        if remote.len() != tp.sources.len() {
            return Err(layout_err(format!("expected metadata of {} remote ranks, got {}", tp.sources.len(), remote.len())));
        }
        check_ranks(remote, &tp.sources, first)?;
        Self::assemble(local, tp, local_block_size, remote, null_block)
    }

    /// The plan over already-checked remote metadata (`remote[i]` is source `i`).
    fn assemble(
        local: &KvLayout,
        tp: TpMapping,
        local_block_size: u32,
        remote: &[AgentMetadata],
        null_block: Option<u32>,
    ) -> Result<Self, PlanError> {
        let first = remote.first().ok_or_else(|| layout_err("no remote metadata".into()))?;
        let local_tp_size = tp.local_tp_size;
        let bpl_d = local.blocks_per_logical.max(1);
        let kbs = |r: &Region, block_size: u32, bpl: u32| -> Result<u32, PlanError> {
            if r.block_tokens > 0 {
                Ok(r.block_tokens)
            } else if block_size % bpl == 0 {
                Ok(block_size / bpl)
            } else {
                Err(layout_err(format!("block size {block_size} does not split into {bpl} kernel blocks")))
            }
        };
        let mut keys: Vec<SegKey> = Vec::new();
        let mut jobs: Vec<Job> = Vec::new();
        for (li, l) in local.regions.iter().enumerate() {
            let state_like = matches!(l.kind, RegionKind::State | RegionKind::Opaque);
            if state_like && local_tp_size != tp.remote_tp_size {
                return Err(layout_err(format!(
                    "region {} is {:?}: its blocks have no head structure, so P and D need equal TP (local {local_tp_size}, remote {})",
                    l.name, l.kind, tp.remote_tp_size
                )));
            }
            // Units this local region needs: (kv part, head).
            let kvs: Vec<Option<u8>> = if l.kv_parts.is_empty() { vec![None] } else { l.kv_parts.iter().map(|&k| Some(k)).collect() };
            let heads: Vec<u32> = match l.kind {
                RegionKind::Attention => (l.first_head..l.first_head + l.num_heads).collect(),
                _ => vec![0],
            };
            // (src, remote region) -> units
            let mut by_src: Vec<((usize, usize), Vec<Unit>)> = Vec::new();
            for &kv in &kvs {
                for &h in &heads {
                    // The first remote rank with a region of this layer and K/V part
                    // that holds head `h` (a layer may have one region per head).
                    let mut found = None;
                    'ranks: for (si, md) in remote.iter().enumerate() {
                        let same_part = |r: &&Region| {
                            r.layer == l.layer
                                && match kv {
                                    None => r.kv_parts.is_empty() || (state_like && r.kv_parts == l.kv_parts),
                                    Some(k) => r.kv_parts.contains(&k),
                                }
                        };
                        for (ri, r) in md.regions.iter().enumerate().filter(|(_, r)| same_part(r)) {
                            if r.kind != l.kind {
                                return Err(layout_err(format!("layer {}: local region is {:?}, remote is {:?}", l.layer, l.kind, r.kind)));
                            }
                            let holds = match l.kind {
                                RegionKind::Attention => {
                                    if r.total_heads != l.total_heads {
                                        return Err(layout_err(format!(
                                            "layer {}: {} KV heads locally, {} remotely",
                                            l.layer, l.total_heads, r.total_heads
                                        )));
                                    }
                                    h >= r.first_head && h < r.first_head + r.num_heads
                                }
                                _ => true,
                            };
                            if holds {
                                found = Some((si, ri));
                                break 'ranks;
                            }
                        }
                    }
                    let Some(k) = found else {
                        return Err(layout_err(format!(
                            "layer {} ({:?}{}): no remote rank of {:?} holds head {h} (or K/V packing differs)",
                            l.layer,
                            l.kind,
                            if l.kv_parts.is_empty() { "" } else { ", K/V split" },
                            tp.sources,
                        )));
                    };
                    match by_src.iter_mut().find(|(kk, _)| *kk == k) {
                        Some((_, u)) => u.push((kv, h)),
                        None => by_src.push((k, vec![(kv, h)])),
                    }
                }
            }
            for ((si, ri), units) in by_src {
                let md = &remote[si];
                let r = &md.regions[ri];
                let kd = kbs(l, local_block_size, bpl_d)?;
                let kp = kbs(r, md.block_size, md.blocks_per_logical)?;
                let state = l.kind == RegionKind::State;
                if state_like && l.block_len != r.block_len {
                    return Err(layout_err(format!(
                        "layer {}: {:?} blocks of {} bytes locally, {} remotely",
                        l.layer, l.kind, l.block_len, r.block_len
                    )));
                }
                if l.kind == RegionKind::Opaque && (kd != kp || bpl_d != md.blocks_per_logical) {
                    return Err(layout_err(format!(
                        "layer {}: block sizes differ ({kd} vs {kp} tokens) but the cache layout is opaque; \
                         label the tensor axes so kvbridge can split blocks",
                        l.layer
                    )));
                }
                if !state_like && (l.unit_len, l.rows) != (r.unit_len, r.rows) {
                    return Err(layout_err(format!(
                        "layer {}: {} row(s) of {} bytes per head and token locally, {} of {} remotely \
                         (head size, dtype, or content order — token-major vs dim-major — differ)",
                        l.layer, l.rows, l.unit_len, r.rows, r.unit_len
                    )));
                }
                let key = SegKey {
                    group: l.group,
                    window: l.window,
                    state,
                    kbs_d: if state { 1 } else { kd },
                    bpl_d: if state { 1 } else { bpl_d },
                    kbs_p: if state { 1 } else { kp },
                    bpl_p: if state { 1 } else { md.blocks_per_logical },
                };
                let key_ix = match keys.iter().position(|k| *k == key) {
                    Some(i) => i,
                    None => {
                        keys.push(key);
                        keys.len() - 1
                    }
                };
                let templates =
                    if state_like { vec![vec![Rel { dst: 0, src: 0, len: l.block_len }]] } else { Self::templates(l, r, &units, kd, kp)? };
                jobs.push(Job { local: li, src: si, remote: ri, key: key_ix, templates });
            }
        }
        let mut local_geo: Vec<Geo> = local.regions.iter().map(Geo::of).collect();
        let mut remote_geo: Vec<Vec<Geo>> = remote.iter().map(|m| m.regions.iter().map(Geo::of).collect()).collect();
        let mut jobs = fuse_jobs(jobs, &mut local_geo, &mut remote_geo);
        // [attention | state]: state jobs last.
        jobs.sort_by_key(|j| keys[j.key].state);
        let (mut ranges, mut blocks) = (0usize, 0usize);
        for j in &jobs {
            ranges += j.templates.iter().map(Vec::len).sum::<usize>();
            blocks += j.templates.len();
        }
        Ok(Self {
            remote_engine_id: first.engine_id.clone(),
            remote_agents: remote.iter().map(|m| m.agent_name.clone()).collect(),
            num_regions: local.regions.len(),
            local_num_blocks: local.num_blocks,
            remote_num_blocks: first.regions.first().map(|r| r.num_blocks).unwrap_or(0),
            null_block,
            sources: tp.sources.clone(),
            expected: vec![tp.notifs_per_remote_rank; tp.sources.len()],
            ranges_per_block: if blocks == 0 { 0.0 } else { ranges as f64 / blocks as f64 },
            local: local_geo,
            remote: remote_geo,
            keys,
            jobs,
            tp,
        })
    }

    /// Byte ranges for each pairing of in-block token offsets (local `od`, remote `op`,
    /// multiples of `g`): combo `c` is `(od/g) * (kp/g) + op/g`.
    fn templates(l: &Region, r: &Region, units: &[Unit], kd: u32, kp: u32) -> Result<Vec<Vec<Rel>>, PlanError> {
        let g = gcd(u64::from(kd), u64::from(kp));
        if g == 0 {
            return Err(layout_err(format!("layer {}: zero block size", l.layer)));
        }
        let (cd, cp) = (u64::from(kd) / g, u64::from(kp) / g);
        let rows = u64::from(l.rows.max(1));
        let work = (units.len() as u64).saturating_mul(g).saturating_mul(cd).saturating_mul(cp).saturating_mul(rows);
        if work > MAX_TEMPLATE_UNITS {
            return Err(layout_err(format!("layer {}: block geometry too large ({work} units)", l.layer)));
        }
        let oob = |side: &str| layout_err(format!("layer {}: {side} unit offsets fall outside the block", l.layer));
        let mut out = Vec::with_capacity((cd * cp) as usize);
        for c in 0..cd * cp {
            let (od, op) = ((c / cp) * g, (c % cp) * g);
            let mut v = Vec::with_capacity(units.len() * (g * rows) as usize);
            for &(kv, h) in units {
                for t in 0..g {
                    let dst = unit_off(l, kv, h, od + t).ok_or_else(|| oob("local"))?;
                    let src = unit_off(r, kv, h, op + t).ok_or_else(|| oob("remote"))?;
                    for row in 0..rows {
                        v.push(Rel { dst: dst + row * l.row_stride, src: src + row * r.row_stride, len: l.unit_len });
                    }
                }
            }
            out.push(merge_sorted(v));
        }
        Ok(out)
    }

    /// Segments of one key for a request.
    fn segments(&self, key: &SegKey, gb: &GroupBlocks<'_>, num_tokens: u64) -> Result<Vec<Seg>, PlanError> {
        let null = |b: u32| self.null_block == Some(b);
        let (nl, nr) = (gb.local.len(), gb.remote.len());
        let mut out = Vec::new();
        if key.state {
            let k = nl.min(nr);
            for i in 0..k {
                let (d, p) = (gb.local[nl - k + i], gb.remote[nr - k + i]);
                if !null(d) && !null(p) {
                    out.push(Seg { d: d.into(), p: p.into(), combo: 0 });
                }
            }
            return Ok(out);
        }
        let (kd, kp) = (u64::from(key.kbs_d), u64::from(key.kbs_p));
        let (ld, lp) = (kd * u64::from(key.bpl_d), kp * u64::from(key.bpl_p));
        let n = if num_tokens > 0 {
            num_tokens
        } else if ld == lp {
            nr as u64 * lp
        } else {
            return Err(layout_err("block sizes differ, so the request's token count is needed".into()));
        };
        let (nd, np) = (n.div_ceil(ld), n.div_ceil(lp));
        if nl as u64 > nd {
            return Err(PlanError::BlockCountMismatch { local: nl, remote: nd as usize });
        }
        let g = gcd(kd, kp);
        let cp = kp / g;
        let first_local = (nd - nl as u64) * ld;
        let mut start = first_local;
        if key.window > 0 && n > u64::from(key.window) {
            start = start.max((n - u64::from(key.window)) / g * g);
        }
        // Remote ids cover the whole prompt, or (a sliding window clipped by P) its end:
        // then they must still reach back to the first token read.
        let first_remote = np.saturating_sub(nr as u64) * lp;
        if first_remote > 0 && (key.window == 0 || first_remote > start / lp * lp) {
            return Err(PlanError::BlockCountMismatch { local: np as usize, remote: nr });
        }
        let end = n.div_ceil(g) * g;
        out.reserve(((end.saturating_sub(start)) / g) as usize);
        let mut t = start;
        while t < end {
            let lb = gb.local[((t - first_local) / ld) as usize];
            let pb = gb.remote[((t - first_remote) / lp) as usize];
            if !null(lb) && !null(pb) {
                let (lo, po) = (t % ld, t % lp);
                let (od, op) = (lo % kd, po % kp);
                out.push(Seg {
                    d: u64::from(lb) * u64::from(key.bpl_d) + lo / kd,
                    p: u64::from(pb) * u64::from(key.bpl_p) + po / kp,
                    combo: ((od / g) * cp + op / g) as u32,
                });
            }
            t += g;
        }
        Ok(out)
    }

    /// The pieces for one request. `groups[g]` holds the block ids of KV-cache group `g`:
    /// local ids cover the *end* of the request's blocks (a local prefix hit is skipped),
    /// remote ids all of them, or for a sliding-window group at least those of the window. `num_tokens` is the prompt length (0: `len(remote) * block
    /// size`, only when block sizes are equal). `coalesce=false` keeps one descriptor per
    /// block range (for comparison).
    pub fn transfer(&self, groups: &[GroupBlocks<'_>], num_tokens: u64, coalesce: bool) -> Result<RequestTransfer, PlanError> {
        // Segments per key (jobs of one key share them), with their highest block ids.
        let mut segs: Vec<Option<(Vec<Seg>, u64, u64)>> = vec![None; self.keys.len()];
        let mut reads: Vec<SourceRead> =
            self.sources.iter().enumerate().map(|(source, &remote_rank)| SourceRead { source, remote_rank, pieces: Vec::new() }).collect();
        let mut out = RequestTransfer::default();
        for job in &self.jobs {
            if segs[job.key].is_none() {
                let key = &self.keys[job.key];
                let gb = groups.get(key.group as usize).ok_or_else(|| {
                    layout_err(format!("request has block ids for {} KV-cache groups; group {} is needed", groups.len(), key.group))
                })?;
                let s = self.segments(key, gb, num_tokens)?;
                let max_d = s.iter().map(|x| x.d).max().unwrap_or(0);
                let max_p = s.iter().map(|x| x.p).max().unwrap_or(0);
                segs[job.key] = Some((s, max_d, max_p));
            }
            let Some((s, max_d, max_p)) = &segs[job.key] else { continue };
            if s.is_empty() {
                continue;
            }
            let (lg, rg) = (self.local[job.local], self.remote[job.src][job.remote]);
            if *max_d >= lg.num_blocks {
                return Err(PlanError::BlockOutOfRange { side: "local", block: *max_d, num_blocks: lg.num_blocks });
            }
            if *max_p >= rg.num_blocks {
                return Err(PlanError::BlockOutOfRange { side: "remote", block: *max_p, num_blocks: rg.num_blocks });
            }
            let pieces = &mut reads[job.src].pieces;
            let start = pieces.len();
            let mut push = |p: Piece, merge: bool| {
                if merge && pieces.len() > start {
                    if let Some(last) = pieces.last_mut() {
                        if last.local + last.len == p.local && last.remote + last.len == p.remote {
                            last.len += p.len;
                            return;
                        }
                    }
                }
                pieces.push(p);
            };
            for sg in s {
                let (lb, rb) = (lg.base + sg.d * lg.stride, rg.base + sg.p * rg.stride);
                for rel in &job.templates[sg.combo as usize] {
                    out.uncoalesced += 1;
                    out.bytes += rel.len;
                    push(
                        Piece { local: lb + rel.dst, remote: rb + rel.src, len: rel.len, local_dev: lg.dev, remote_dev: rg.dev },
                        coalesce,
                    );
                }
            }
        }
        reads.retain(|r| !r.pieces.is_empty());
        out.descriptors = reads.iter().map(|r| r.pieces.len() as u64).sum();
        out.reads = reads;
        Ok(out)
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
