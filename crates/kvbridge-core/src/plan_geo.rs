//! The transfer plan's geometry helpers: remote regions checked, unit offsets, views of
//! one buffer fused, ranges merged.
use super::*;

pub(super) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(super) fn layout_err(msg: String) -> PlanError {
    PlanError::Layout(msg)
}

/// Remote ranks' metadata, checked: `remote[i]` is TP rank `ranks[i]` of `first`'s engine
/// and TP size, with a sane block size and regions.
pub(super) fn check_ranks(remote: &[AgentMetadata], ranks: &[u32], first: &AgentMetadata) -> Result<(), PlanError> {
    for (md, &rank) in remote.iter().zip(ranks) {
        if md.tp_rank != rank || md.tp_size != first.tp_size || md.engine_id != first.engine_id {
            return Err(layout_err(format!(
                "remote rank {rank}: metadata says engine {} rank {} of {} (expected {} rank {rank} of {})",
                md.engine_id, md.tp_rank, md.tp_size, first.engine_id, first.tp_size
            )));
        }
        if md.blocks_per_logical == 0 || md.blocks_per_logical > 1024 || md.block_size == 0 {
            return Err(layout_err(format!("remote rank {rank}: bad block size {} / {}", md.block_size, md.blocks_per_logical)));
        }
        for (i, r) in md.regions.iter().enumerate() {
            check_remote(rank, i, r)?;
        }
    }
    Ok(())
}

/// A remote region, checked: every value in it came from a peer.
pub(super) fn check_remote(rank: u32, i: usize, r: &Region) -> Result<(), PlanError> {
    let e = |why: &str| layout_err(format!("remote rank {rank} region {i} ({}): {why}", r.name));
    if r.num_blocks == 0 || r.num_blocks > MAX_BLOCKS {
        return Err(e(&format!("{} blocks", r.num_blocks)));
    }
    if r.block_len == 0 || r.block_stride < r.block_len {
        return Err(e("blocks overlap or are empty"));
    }
    let end = (r.num_blocks - 1).checked_mul(r.block_stride).and_then(|x| x.checked_add(r.block_len)).and_then(|x| x.checked_add(r.base));
    if end.is_none() {
        return Err(e("address range overflows"));
    }
    if r.kv_parts.iter().any(|&k| k > 1) || r.unit_len == 0 || r.rows == 0 || r.rows > MAX_ROWS {
        return Err(e("bad K/V parts, unit length or rows"));
    }
    if r.num_heads == 0 || u64::from(r.first_head) + u64::from(r.num_heads) > u64::from(r.total_heads) {
        return Err(e("heads out of range"));
    }
    Ok(())
}

/// Byte offset of unit (kv, head, token) in a block of `r` (its first row), checked
/// against the block: every row must fit.
pub(super) fn unit_off(r: &Region, kv: Option<u8>, head: u32, token: u64) -> Option<u64> {
    let kvpos = match kv {
        None => 0,
        Some(k) => r.kv_parts.iter().position(|&x| x == k)? as u64,
    };
    let h = u64::from(head.checked_sub(r.first_head)?);
    let off =
        kvpos.checked_mul(r.kv_stride)?.checked_add(h.checked_mul(r.head_stride)?)?.checked_add(token.checked_mul(r.token_stride)?)?;
    let last_row = u64::from(r.rows.checked_sub(1)?).checked_mul(r.row_stride)?;
    (off.checked_add(last_row)?.checked_add(r.unit_len)? <= r.block_len).then_some(off)
}

impl Geo {
    pub(super) fn end(&self) -> u64 {
        self.base + self.num_blocks.saturating_sub(1) * self.stride + self.len
    }
    /// Blocks in lockstep whose ranges overlap: views of one buffer (K and V of a vLLM CPU
    /// cache), which NIXL registration merges into one memory section.
    pub(super) fn interleaves(&self, o: &Geo) -> bool {
        self.stride == o.stride && self.num_blocks == o.num_blocks && self.dev == o.dev && self.base < o.end() && o.base < self.end()
    }
    /// The geometry covering both, and the offsets of `self` and `o` inside its blocks.
    pub(super) fn union(&self, o: &Geo) -> (Geo, u64, u64) {
        let base = self.base.min(o.base);
        let (a, b) = (self.base - base, o.base - base);
        (Geo { base, len: (a + self.len).max(b + o.len), ..*self }, a, b)
    }
}

/// Fuse jobs that copy between interleaved views on both sides (same source, same
/// segmentation) into one job over the union, so that ranges merge across the views:
/// when K and V are two regions of one buffer, equal geometries still copy whole blocks.
pub(super) fn fuse_jobs(mut jobs: Vec<Job>, local: &mut Vec<Geo>, remote: &mut [Vec<Geo>]) -> Vec<Job> {
    let mut out: Vec<Job> = Vec::with_capacity(jobs.len());
    while !jobs.is_empty() {
        let mut a = jobs.remove(0);
        let mut i = 0;
        while i < jobs.len() {
            let b = &jobs[i];
            let (la, lb) = (local[a.local], local[b.local]);
            let (ra, rb) = (remote[a.src][a.remote], remote[b.src][b.remote]);
            let (lu, la_off, lb_off) = la.union(&lb);
            let (ru, ra_off, rb_off) = ra.union(&rb);
            // Same source and segmentation, interleaved on both sides, and the union still
            // inside one block stride (it must not overlap the next block).
            let fusable = a.src == b.src
                && a.key == b.key
                && a.templates.len() == b.templates.len()
                && la.interleaves(&lb)
                && ra.interleaves(&rb)
                && lu.len <= lu.stride
                && ru.len <= ru.stride;
            if !fusable {
                i += 1;
                continue;
            }
            let b = jobs.remove(i);
            let shift = |v: &[Rel], dl: u64, dr: u64| -> Vec<Rel> {
                v.iter().map(|r| Rel { dst: r.dst + dl, src: r.src + dr, len: r.len }).collect()
            };
            a.templates = a
                .templates
                .iter()
                .zip(&b.templates)
                .map(|(x, y)| {
                    let mut v = shift(x, la_off, ra_off);
                    v.extend(shift(y, lb_off, rb_off));
                    merge_sorted(v)
                })
                .collect();
            local.push(lu);
            a.local = local.len() - 1;
            remote[a.src].push(ru);
            a.remote = remote[a.src].len() - 1;
        }
        out.push(a);
    }
    out
}

/// Merge ranges sorted by destination where both sides continue.
pub(super) fn merge_sorted(mut v: Vec<Rel>) -> Vec<Rel> {
    v.sort_by_key(|r| r.dst);
    let mut out: Vec<Rel> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if l.dst + l.len == r.dst && l.src + l.len == r.src => l.len += r.len,
            _ => out.push(r),
        }
    }
    out
}
