//! D's receive staging (`kv_recv_staging_mib`): connector-owned DRAM, registered with NIXL
//! next to the cache, into which a fragmented READ (vLLM-CPU's dim-major K across a
//! block-size change: one descriptor per K row) reads the part of each of P's blocks that
//! its small pieces cover, with a few large descriptors; its large pieces (V, token-major)
//! still go straight into the cache in the same READ. The staged bytes are then laid out
//! into the cache with `memcpy`, using the plan's own pieces (see `kvbridge_core::staged`).
//! Requests share the buffer (first-fit ranges); one that does not fit, or does not gain,
//! reads directly.
//!
//! GPU caches do not use it yet (the relayout would be a kernel or a strided
//! `cuMemcpy2D`): they read directly.
use std::collections::HashMap;

use kvbridge_core::layout::{block_groups, BlockGroup, KvLayout, MemKind, Region};
use kvbridge_core::plan::Piece;
use kvbridge_core::staged::{self, StagedRead};
use kvbridge_core::transport::XferId;
use kvbridge_core::wire::AgentMetadata;

use crate::staging::Buf;

/// A staged READ in flight: its range of the buffer and the copies to make once it is done.
#[derive(Debug)]
pub(crate) struct Pending {
    off: u64,
    size: u64,
    /// `(cache address, offset in this READ's range, bytes)`.
    copies: Vec<(u64, u64, u64)>,
    /// Descriptors the direct READ would have posted, and the staged READ's.
    pub direct: u64,
    pub posted: u64,
}

/// The receive staging buffer and what uses it.
pub(crate) struct RecvStaging {
    buf: Buf,
    /// Free `(offset, len)` ranges, by offset.
    free: Vec<(u64, u64)>,
    /// Each loaded remote rank's blocks (its regions and staging regions).
    remotes: HashMap<String, Vec<BlockGroup>>,
    /// The local cache's memory: `(start, end)` per block group (copies must land inside).
    local: Vec<(u64, u64)>,
    pending: HashMap<XferId, Pending>,
    /// Largest merged READ piece (`KVBRIDGE_RECV_PIECE_KIB` overrides, for measurements).
    max_piece: u64,
    /// Smallest piece read straight into the cache (`KVBRIDGE_RECV_DIRECT_KIB` overrides).
    direct_min: u64,
}

impl std::fmt::Debug for RecvStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStaging").field("bytes", &self.buf.len()).field("in_flight", &self.pending.len()).finish()
    }
}

impl RecvStaging {
    /// A buffer of `bytes` for reads into `cache` (DRAM only; None for a GPU cache).
    pub fn new(bytes: u64, cache: &KvLayout) -> Result<Option<Self>, kvbridge_core::Error> {
        if bytes == 0 || cache.regions.iter().any(|r| r.mem != MemKind::Dram) {
            return Ok(None);
        }
        let Some((groups, _)) = block_groups(&cache.regions) else { return Ok(None) };
        let local = groups.iter().map(|g| (g.base, g.base + (g.num_blocks.saturating_sub(1)) * g.stride + g.footprint)).collect();
        let len = usize::try_from(bytes).map_err(|_| kvbridge_core::Error::Other("kv_recv_staging_mib too large".into()))?;
        let buf = Buf::new(len)?;
        let free = vec![(0, buf.len())];
        let max_piece = std::env::var("KVBRIDGE_RECV_PIECE_KIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(staged::MAX_READ_PIECE, |k| k.max(1) << 10);
        let direct_min = std::env::var("KVBRIDGE_RECV_DIRECT_KIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(staged::DIRECT_PIECE, |k| k.max(1) << 10);
        Ok(Some(Self { buf, free, remotes: HashMap::new(), local, pending: HashMap::new(), max_piece, direct_min }))
    }

    /// The region to register with the transport.
    pub fn region(&self) -> Region {
        Region::opaque("kvbridge.recv_staging", self.buf.addr(), self.buf.len(), self.buf.len(), 1)
    }

    /// Remote rank `key` was loaded with `md`.
    pub fn add_remote(&mut self, key: &str, md: &AgentMetadata) {
        let all = [md.regions.clone(), md.staging_regions.clone()].concat();
        match block_groups(&all) {
            Some((g, _)) => {
                self.remotes.insert(key.to_string(), g);
            }
            None => {
                self.remotes.remove(key);
            }
        }
    }

    /// Remote rank `key` was forgotten.
    pub fn remove_remote(&mut self, key: &str) {
        self.remotes.remove(key);
    }

    /// The READ to post for `pieces` from `key` through the buffer, when that posts far
    /// fewer descriptors and fits; None to read directly.
    pub fn prepare(&mut self, key: &str, pieces: &[Piece]) -> Option<(Vec<Piece>, Pending)> {
        if pieces.len() < staged::MIN_DIRECT_DESCRIPTORS {
            return None;
        }
        let st: StagedRead = staged::stage_with(pieces, self.remotes.get(key)?, self.max_piece, self.direct_min)?;
        if !staged::worth_it(pieces.len(), st.descriptors()) {
            return None;
        }
        // The copies come from our own plan; memcpy bypasses NIXL's checks, so check them.
        let mut hint = 0usize;
        let mut inside = |a: u64, n: u64| {
            let fits = |&(s, e): &(u64, u64)| a >= s && a.checked_add(n).is_some_and(|x| x <= e);
            if self.local.get(hint).is_some_and(fits) {
                return true;
            }
            self.local.iter().position(fits).map(|i| hint = i).is_some()
        };
        if !st.copies.iter().all(|&(l, o, n)| inside(l, n) && o.checked_add(n).is_some_and(|x| x <= st.size)) {
            tracing::warn!(key, "kvbridge: a staged copy would leave the cache; reading directly");
            return None;
        }
        let off = self.alloc(st.size)?;
        let base = self.buf.addr() + off;
        let mut reads = st.direct;
        reads.extend(st.reads.iter().map(|p| Piece { local: base + p.local, ..*p }));
        let pending = Pending { off, size: st.size, copies: st.copies, direct: pieces.len() as u64, posted: reads.len() as u64 };
        Some((reads, pending))
    }

    /// The staged READ was posted as `x`.
    pub fn posted(&mut self, x: XferId, p: Pending) {
        self.pending.insert(x, p);
    }

    /// The staged READ was not posted: give its range back.
    pub fn abandon(&mut self, p: Pending) {
        self.release(p.off, p.size);
    }

    /// Transfer `x` ended: when it was staged and succeeded (`ok`), copy its bytes into the
    /// cache; give its range back either way. Returns whether `x` was staged.
    pub fn finish(&mut self, x: XferId, ok: bool) -> bool {
        let Some(p) = self.pending.remove(&x) else { return false };
        if ok {
            let t0 = std::time::Instant::now();
            let base = self.buf.addr() + p.off;
            for &(l, o, n) in &p.copies {
                // SAFETY: `l..l+n` lies inside the registered cache and `o..o+n` inside this
                // READ's range of the buffer (both checked in `prepare`); they never overlap.
                unsafe { std::ptr::copy_nonoverlapping((base + o) as usize as *const u8, l as usize as *mut u8, n as usize) };
            }
            tracing::debug!(
                copies = p.copies.len(),
                bytes = p.size,
                us = t0.elapsed().as_secs_f64() * 1e6,
                "kvbridge: staged READ laid out"
            );
        }
        self.release(p.off, p.size);
        true
    }

    fn alloc(&mut self, size: u64) -> Option<u64> {
        let size = size.max(1).div_ceil(64) * 64;
        let i = self.free.iter().position(|&(_, n)| n >= size)?;
        let (off, n) = self.free[i];
        if n == size {
            self.free.remove(i);
        } else {
            self.free[i] = (off + size, n - size);
        }
        Some(off)
    }

    fn release(&mut self, off: u64, size: u64) {
        let size = size.max(1).div_ceil(64) * 64;
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, size));
        // Merge with the neighbours.
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Bytes free (tests: everything is given back).
    #[cfg(test)]
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|f| f.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_given_back_and_merged() {
        let cache = KvLayout { regions: vec![Region::opaque("c", 0x10000, 64, 64, 4)], num_blocks: 4, blocks_per_logical: 1 };
        let mut r = RecvStaging::new(1 << 12, &cache).unwrap().unwrap();
        let total = r.free_bytes();
        let a = r.alloc(1000).unwrap();
        let b = r.alloc(1000).unwrap();
        let c = r.alloc(1000).unwrap();
        assert!(r.alloc(2000).is_none(), "full");
        r.release(b, 1000);
        r.release(a, 1000);
        r.release(c, 1000);
        assert_eq!((r.free_bytes(), r.free.len()), (total, 1));
        let vram = KvLayout { regions: vec![Region { mem: MemKind::Vram, ..Region::opaque("c", 0x10000, 64, 64, 4) }], ..cache };
        assert!(RecvStaging::new(1 << 12, &vram).unwrap().is_none(), "GPU caches read directly");
    }
}
