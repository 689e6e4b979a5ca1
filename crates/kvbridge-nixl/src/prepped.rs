//! Prepared descriptor lists: one NIXL descriptor per (region, block), prepared once per
//! side (NIXL's `prepXferDlist`), so a request whose pieces are whole blocks is made from
//! descriptor *indices* (`makeXferReq`) instead of fresh descriptor lists NIXL must check
//! against the registrations on every request. This is vLLM NixlConnector's scheme; here
//! it is a fast path under the plan's pieces, not a replacement for them: a piece that is
//! not a whole number of blocks on both sides (TP head splits, different block sizes, K
//! rows) sends the whole request through per-request lists, as before.
use kvbridge_core::layout::{block_groups, Region};
use kvbridge_core::plan::Piece;
use nixl_sys::{MemType, XferDescList, XferDlistHandle};

/// Most descriptors prepared per side (vLLM prepares blocks x regions too; beyond this the
/// lists cost more memory than they save time, and indices must fit NIXL's `int`).
pub const MAX_PREPARED_DESCS: u64 = 1 << 22;

/// One block group's blocks (a region, or interleaved views fused) as numbered descriptors.
#[derive(Debug, Clone, Copy)]
struct Unit {
    base: u64,
    len: u64,
    stride: u64,
    blocks: u64,
    /// Index of this region's block 0 in the prepared list.
    first: u64,
    dev: u64,
}

/// The descriptor numbering of one side's regions: group `g`'s block `b` is descriptor
/// `first(g) + b`, groups in [`block_groups`]' order.
#[derive(Debug, Clone)]
pub struct Units {
    /// In list order.
    ordered: Vec<Unit>,
    /// Indices into `ordered`, by base address (for lookups).
    by_base: Vec<usize>,
    total: u64,
}

impl Units {
    /// The numbering for `regions`, or None when there are too many descriptors.
    ///
    /// Views of one buffer interleaved block by block (vLLM's CPU cache registers K and V
    /// as two regions of one tensor) become one unit over their union, as the plan copies
    /// them when both sides' geometries are equal (`plan::fuse_jobs`).
    pub fn new(regions: &[Region]) -> Option<Self> {
        let (groups, _) = block_groups(regions)?;
        let mut ordered: Vec<Unit> = groups
            .iter()
            .map(|g| Unit { base: g.base, len: g.footprint, stride: g.stride, blocks: g.num_blocks, first: 0, dev: g.device_id })
            .collect();
        let mut total = 0u64;
        for u in &mut ordered {
            u.first = total;
            total = total.checked_add(u.blocks)?;
        }
        if total == 0 || total > MAX_PREPARED_DESCS {
            return None;
        }
        let mut by_base: Vec<usize> = (0..ordered.len()).collect();
        by_base.sort_by_key(|&i| ordered[i].base);
        Some(Self { ordered, by_base, total })
    }

    /// How many descriptors the list holds.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True if the list holds no descriptors.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The descriptor list to prepare, in index order.
    pub fn desc_list(&self, mem: MemType) -> Result<XferDescList<'_>, nixl_sys::NixlError> {
        let mut l = XferDescList::new(mem)?;
        for u in &self.ordered {
            for b in 0..u.blocks {
                l.add_desc((u.base + b * u.stride) as usize, u.len as usize, u.dev);
            }
        }
        Ok(l)
    }

    /// The group block that starts at `addr`: (unit, block). Groups of different strides
    /// could overlap, so a few groups below `addr` are tried.
    fn find(&self, addr: u64) -> Option<(&Unit, u64)> {
        let i = self.by_base.partition_point(|&k| self.ordered[k].base <= addr);
        self.by_base[..i].iter().rev().take(8).map(|&k| &self.ordered[k]).find_map(|u| {
            let off = addr - u.base;
            (off % u.stride == 0 && off / u.stride < u.blocks).then_some((u, off / u.stride))
        })
    }

    /// Append the indices of the blocks `[addr, addr + len)` covers exactly, with the block
    /// length, or None if the range is not whole blocks of one region.
    fn push_range(&self, addr: u64, len: u64, out: &mut Vec<i32>) -> Option<u64> {
        let (u, b) = self.find(addr)?;
        let n = if len == u.len {
            1
        } else if u.stride == u.len && len % u.len == 0 {
            len / u.len // a coalesced run of adjacent blocks
        } else {
            return None;
        };
        if b + n > u.blocks {
            return None;
        }
        for k in 0..n {
            out.push(i32::try_from(u.first + b + k).ok()?);
        }
        Some(u.len)
    }
}

/// The indices for `pieces` on both sides, or None if some piece is not whole blocks of
/// equal length on both sides (the request then uses per-request lists).
pub fn indices(local: &Units, remote: &Units, pieces: &[Piece]) -> Option<(Vec<i32>, Vec<i32>)> {
    let mut li = Vec::with_capacity(pieces.len());
    let mut ri = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (nl, nr) = (li.len(), ri.len());
        let ll = local.push_range(p.local, p.len, &mut li)?;
        let rl = remote.push_range(p.remote, p.len, &mut ri)?;
        if ll != rl || li.len() - nl != ri.len() - nr {
            return None;
        }
    }
    Some((li, ri))
}

/// A prepared list. NIXL's handle is a plain pointer pair, so it is not `Send` by itself.
pub struct Prepped {
    /// The numbering the list was prepared with (block → descriptor index).
    pub units: Units,
    /// NIXL's handle to the prepared list.
    pub handle: XferDlistHandle,
}

// SAFETY: the handle is only used through `&mut NixlTransport` (one thread at a time; the
// worker driver holds its mutex), and NIXL's agent, which owns the list, is itself used
// from whichever thread holds that lock, as nixl-sys allows for `XferRequest`.
unsafe impl Send for Prepped {}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, len: u64, stride: u64, blocks: u64) -> Region {
        Region::opaque("l", base, len, stride, blocks)
    }

    fn piece(local: u64, remote: u64, len: u64) -> Piece {
        Piece { local, remote, len, local_dev: 0, remote_dev: 0 }
    }

    #[test]
    fn whole_blocks_map_to_indices_and_others_do_not() {
        // Two dense regions of 4 blocks of 100 bytes, and two interleaved views (K at +0,
        // V at +50, 50 bytes each in a 100-byte stride) of a third buffer: one unit.
        let regions = vec![region(5000, 100, 100, 4), region(1000, 100, 100, 4), region(9050, 50, 100, 4), region(9000, 50, 100, 4)];
        let u = Units::new(&regions).expect("units");
        assert_eq!(u.len(), 12);
        // Units are numbered by base: 1000 → 0.., 5000 → 4.., 9000 (K|V) → 8..
        // A run of 3 dense blocks starting at block 1 of the region at 5000 → 5, 6, 7.
        let (l, r) = indices(&u, &u, &[piece(5100, 1100, 300)]).expect("whole blocks");
        assert_eq!(l, vec![5, 6, 7]);
        assert_eq!(r, vec![1, 2, 3]);
        // The fused K|V block 2, and a run of the fused unit (dense once fused).
        assert_eq!(indices(&u, &u, &[piece(9200, 9200, 100)]).expect("K|V").0, vec![10]);
        assert_eq!(indices(&u, &u, &[piece(9100, 9100, 200)]).expect("K|V run").0, vec![9, 10]);
        // Half a block, one view's part alone, a range past the end, an address between
        // blocks, an address below every region: none map.
        assert!(indices(&u, &u, &[piece(1000, 1000, 50)]).is_none());
        assert!(indices(&u, &u, &[piece(9050, 9050, 50)]).is_none());
        assert!(indices(&u, &u, &[piece(1300, 1300, 200)]).is_none());
        assert!(indices(&u, &u, &[piece(1010, 1010, 100)]).is_none());
        assert!(indices(&u, &u, &[piece(10, 10, 100)]).is_none());
        // Different block lengths on the two sides: no mapping.
        let other = Units::new(&[region(1000, 50, 50, 8)]).expect("units");
        assert!(indices(&u, &other, &[piece(1000, 1000, 100)]).is_none());
        // Views that do not interleave (K and V halves of a [2, B, ...] tensor) stay apart.
        let split = Units::new(&[region(0, 100, 100, 4), region(400, 100, 100, 4)]).expect("units");
        assert_eq!(split.len(), 8);
    }

    #[test]
    fn too_many_descriptors_or_degenerate_regions_are_refused() {
        assert!(Units::new(&[region(0, 1, 1, MAX_PREPARED_DESCS + 1)]).is_none());
        assert!(Units::new(&[region(0, 0, 1, 4)]).is_none());
        assert!(Units::new(&[]).is_none());
    }
}
