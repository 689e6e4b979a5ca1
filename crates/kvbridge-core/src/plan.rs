//! The transfer plan: computed once per remote engine at handshake, then the hot path
//! only turns block ids into descriptor indices.
//!
//! Descriptor numbering (both sides, same rule): the prepared descriptor list of an
//! engine holds, for region `r` and block `b`, the descriptor at index
//! `r * num_blocks + b`. Indices are emitted region-major with blocks in request order,
//! so a run of consecutive blocks is a run of adjacent memory that NIXL can merge.
use crate::error::PlanError;
use crate::layout::{KvLayout, Region};
use crate::wire::{AgentMetadata, RegionDesc};

/// How a local worker rank maps onto the remote engine's ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpMapping {
    pub local_tp_size: u32,
    pub remote_tp_size: u32,
    /// The remote ranks this local rank reads from (homogeneous TP: exactly its own rank).
    pub remote_ranks: Vec<u32>,
}

impl TpMapping {
    /// Homogeneous TP only (equal sizes); heterogeneous TP is a later issue.
    pub fn new(local_tp_size: u32, local_tp_rank: u32, remote_tp_size: u32) -> Result<Self, PlanError> {
        if local_tp_size != remote_tp_size {
            return Err(PlanError::Layout(format!(
                "tensor-parallel sizes differ (local {local_tp_size}, remote {remote_tp_size}); \
                 kvbridge currently needs equal TP on P and D"
            )));
        }
        Ok(Self { local_tp_size, remote_tp_size, remote_ranks: vec![local_tp_rank] })
    }
}

/// Upper bound on one engine's prepared descriptors (regions x blocks): far above any real
/// cache (80 layers x K/V x 100k blocks = 16M), low enough that a hostile peer cannot make
/// us allocate without bound. Also keeps indices within `i32`.
pub const MAX_DESCRIPTORS: u64 = 1 << 25;

/// Everything needed to read a request's blocks from one remote worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferPlan {
    pub remote_engine_id: String,
    pub remote_agent: String,
    pub num_regions: usize,
    pub local_num_blocks: u64,
    pub remote_num_blocks: u64,
    pub block_len: Vec<u64>,
    pub tp: TpMapping,
}

/// Descriptor indices for one transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescIndices {
    pub local: Vec<i32>,
    pub remote: Vec<i32>,
    /// Bytes moved.
    pub bytes: u64,
    /// Contiguous runs (on both sides) — what NIXL can merge into one descriptor each.
    pub runs: usize,
}

impl TransferPlan {
    /// Check the two layouts match and build the plan. Every check is against data a peer
    /// sent, so nothing here panics.
    pub fn build(local: &KvLayout, local_tp_size: u32, local_tp_rank: u32, remote: &AgentMetadata) -> Result<Self, PlanError> {
        let tp = TpMapping::new(local_tp_size, local_tp_rank, remote.tp_size)?;
        if remote.regions.len() != local.regions.len() {
            return Err(PlanError::Layout(format!(
                "region count differs: local {} remote {} (different number of layers or K/V split)",
                local.regions.len(),
                remote.regions.len()
            )));
        }
        let remote_blocks = remote.regions.first().map(|r| r.num_blocks).unwrap_or(0);
        let mut block_len = Vec::with_capacity(local.regions.len());
        for (i, (l, r)) in local.regions.iter().zip(&remote.regions).enumerate() {
            check_region(i, l, r, remote_blocks)?;
            block_len.push(l.block_len);
        }
        let max_idx = (local.regions.len() as u64).saturating_mul(local.num_blocks.max(remote_blocks));
        if max_idx > MAX_DESCRIPTORS {
            return Err(PlanError::Layout(format!("peer advertises {max_idx} descriptors; the limit is {MAX_DESCRIPTORS}")));
        }
        Ok(Self {
            remote_engine_id: remote.engine_id.clone(),
            remote_agent: remote.agent_name.clone(),
            num_regions: local.regions.len(),
            local_num_blocks: local.num_blocks,
            remote_num_blocks: remote_blocks,
            block_len,
            tp,
        })
    }

    /// Map (local block, remote block) pairs to descriptor indices on both sides.
    pub fn indices(&self, local_blocks: &[u32], remote_blocks: &[u32]) -> Result<DescIndices, PlanError> {
        if local_blocks.len() != remote_blocks.len() {
            return Err(PlanError::BlockCountMismatch { local: local_blocks.len(), remote: remote_blocks.len() });
        }
        for &b in local_blocks {
            if u64::from(b) >= self.local_num_blocks {
                return Err(PlanError::BlockOutOfRange { side: "local", block: b.into(), num_blocks: self.local_num_blocks });
            }
        }
        for &b in remote_blocks {
            if u64::from(b) >= self.remote_num_blocks {
                return Err(PlanError::BlockOutOfRange { side: "remote", block: b.into(), num_blocks: self.remote_num_blocks });
            }
        }
        let n = local_blocks.len() * self.num_regions;
        let mut out = DescIndices { local: Vec::with_capacity(n), remote: Vec::with_capacity(n), bytes: 0, runs: 0 };
        // Runs of blocks consecutive on both sides.
        let mut runs_per_region = 0usize;
        for i in 0..local_blocks.len() {
            if i == 0 || local_blocks[i] != local_blocks[i - 1].wrapping_add(1) || remote_blocks[i] != remote_blocks[i - 1].wrapping_add(1)
            {
                runs_per_region += 1;
            }
        }
        for r in 0..self.num_regions {
            let lbase = r as u64 * self.local_num_blocks;
            let rbase = r as u64 * self.remote_num_blocks;
            for (&lb, &rb) in local_blocks.iter().zip(remote_blocks) {
                out.local.push((lbase + u64::from(lb)) as i32);
                out.remote.push((rbase + u64::from(rb)) as i32);
            }
            out.bytes += self.block_len[r] * local_blocks.len() as u64;
        }
        out.runs = runs_per_region * self.num_regions;
        Ok(out)
    }
}

fn check_region(i: usize, l: &Region, r: &RegionDesc, remote_blocks: u64) -> Result<(), PlanError> {
    if l.block_len != r.block_len {
        return Err(PlanError::Layout(format!(
            "region {i} ({}): block length differs (local {} bytes, remote {} bytes): block size, heads or dtype differ",
            l.name, l.block_len, r.block_len
        )));
    }
    if r.num_blocks != remote_blocks || r.num_blocks == 0 {
        return Err(PlanError::Layout(format!("region {i}: remote regions disagree on block count")));
    }
    if r.block_stride < r.block_len {
        return Err(PlanError::Layout(format!("region {i}: remote blocks overlap")));
    }
    // The whole region must be addressable: base + (n-1)*stride + len without overflow.
    let end = (r.num_blocks - 1).checked_mul(r.block_stride).and_then(|x| x.checked_add(r.block_len)).and_then(|x| x.checked_add(r.base));
    if end.is_none() {
        return Err(PlanError::Layout(format!("region {i}: remote address range overflows")));
    }
    Ok(())
}

/// The descriptors of one engine's prepared list, in index order: `(addr, len, device)`.
pub fn descriptors_of(regions: impl IntoIterator<Item = (u64, u64, u64, u64, u64)>) -> Vec<(u64, u64, u64)> {
    // (base, block_len, block_stride, num_blocks, device_id)
    let mut out = Vec::new();
    for (base, len, stride, n, dev) in regions {
        for b in 0..n {
            out.push((base + b * stride, len, dev));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemKind;

    fn layout(nregions: usize, nblocks: u64, len: u64) -> KvLayout {
        KvLayout {
            regions: (0..nregions)
                .map(|i| Region {
                    name: format!("r{i}"),
                    base: 1 << 20,
                    block_len: len,
                    block_stride: len,
                    num_blocks: nblocks,
                    mem: MemKind::Dram,
                    device_id: 0,
                })
                .collect(),
            num_blocks: nblocks,
        }
    }

    fn md(l: &KvLayout, tp: u32) -> AgentMetadata {
        AgentMetadata {
            engine_id: "p".into(),
            agent_name: "p-0".into(),
            tp_rank: 0,
            tp_size: tp,
            block_size: 16,
            regions: l.regions.iter().map(RegionDesc::from).collect(),
            nixl_md: vec![],
        }
    }

    #[test]
    fn indices_are_region_major_and_count_runs() {
        let l = layout(2, 10, 64);
        let r = layout(2, 20, 64);
        let p = TransferPlan::build(&l, 1, 0, &md(&r, 1)).unwrap();
        let d = p.indices(&[1, 2, 7], &[4, 5, 9]).unwrap();
        assert_eq!(d.local, vec![1, 2, 7, 11, 12, 17]);
        assert_eq!(d.remote, vec![4, 5, 9, 24, 25, 29]);
        assert_eq!(d.bytes, 6 * 64);
        assert_eq!(d.runs, 4);
    }

    #[test]
    fn peer_controlled_values_are_errors_not_panics() {
        let l = layout(2, 10, 64);
        let p = TransferPlan::build(&l, 1, 0, &md(&layout(2, 20, 64), 1)).unwrap();
        assert!(matches!(p.indices(&[10], &[0]), Err(PlanError::BlockOutOfRange { side: "local", .. })));
        assert!(matches!(p.indices(&[0], &[20]), Err(PlanError::BlockOutOfRange { side: "remote", .. })));
        assert!(matches!(p.indices(&[0, 1], &[0]), Err(PlanError::BlockCountMismatch { .. })));
        assert!(TransferPlan::build(&l, 1, 0, &md(&layout(3, 20, 64), 1)).is_err());
        assert!(TransferPlan::build(&l, 1, 0, &md(&layout(2, 20, 32), 1)).is_err());
        assert!(TransferPlan::build(&l, 1, 0, &md(&layout(2, 20, 64), 2)).is_err());
        let mut bad = md(&layout(2, 20, 64), 1);
        bad.regions[1].num_blocks = 3;
        assert!(TransferPlan::build(&l, 1, 0, &bad).is_err());
        // Hostile sizes: overflowing addresses, absurd block counts.
        let mut bad = md(&layout(2, 20, 64), 1);
        bad.regions[0].base = u64::MAX - 10;
        assert!(TransferPlan::build(&l, 1, 0, &bad).is_err());
        let mut bad = md(&layout(2, 20, 64), 1);
        for r in &mut bad.regions {
            r.num_blocks = 1 << 40;
        }
        assert!(TransferPlan::build(&l, 1, 0, &bad).is_err());
        let mut bad = md(&layout(2, 20, 64), 1);
        bad.regions[0].block_stride = u64::MAX / 2;
        assert!(TransferPlan::build(&l, 1, 0, &bad).is_err());
    }

    #[test]
    fn descriptor_list_matches_index_rule() {
        let d = descriptors_of([(100, 8, 16, 3, 0), (1000, 8, 8, 3, 0)]);
        assert_eq!(d[4], (1008, 8, 0)); // region 1, block 1 = index 1*3+1
        assert_eq!(d[2], (132, 8, 0));
    }
}
