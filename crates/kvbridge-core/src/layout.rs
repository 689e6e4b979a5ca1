//! How a KV cache is laid out in memory: which regions to register, and where block `b`
//! of each region starts. Built from the engine's tensors (pointer, shape, strides).
use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// Where a region's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemKind {
    Dram,
    Vram,
}

/// One KV cache tensor as the engine sees it. Strides are in elements, as in torch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub ptr: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
    pub itemsize: u64,
    pub mem: MemKind,
    pub device_id: u64,
}

/// A registered memory range made of `num_blocks` equally sized blocks:
/// block `b` is the `block_len` bytes at `base + b * block_stride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub name: String,
    pub base: u64,
    pub block_len: u64,
    pub block_stride: u64,
    pub num_blocks: u64,
    pub mem: MemKind,
    pub device_id: u64,
}

impl Region {
    /// Bytes spanned from the first block's start to the last block's end.
    pub fn span(&self) -> u64 {
        if self.num_blocks == 0 {
            0
        } else {
            (self.num_blocks - 1) * self.block_stride + self.block_len
        }
    }
    pub fn block_addr(&self, b: u64) -> u64 {
        self.base + b * self.block_stride
    }
}

/// The regions of one engine's KV cache, in a fixed order (tensor order, K before V).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub regions: Vec<Region>,
    pub num_blocks: u64,
}

impl KvLayout {
    /// Work out the regions from tensors, given the number of blocks in the cache.
    ///
    /// Supported shapes (the block axis is found by its size):
    /// - blocks first, e.g. CPU `[num_blocks, kv_heads, block_size, 2*head]` or
    ///   FlashInfer `[num_blocks, 2, block_size, kv_heads, head]`: one region per tensor;
    /// - K/V first, e.g. FlashAttention `[2, num_blocks, block_size, kv_heads, head]`:
    ///   two regions per tensor (K then V).
    pub fn from_tensors(tensors: &[TensorInfo], num_blocks: u64) -> Result<Self, PlanError> {
        if tensors.is_empty() {
            return Err(PlanError::NotRegistered);
        }
        if num_blocks == 0 {
            return Err(PlanError::Layout("cache has zero blocks".into()));
        }
        let mut regions = Vec::with_capacity(tensors.len() * 2);
        for t in tensors {
            let bad = |why: &str| PlanError::Layout(format!("tensor {}: {why} (shape {:?}, stride {:?})", t.name, t.shape, t.stride));
            if t.shape.len() != t.stride.len() || t.shape.is_empty() {
                return Err(bad("shape and stride disagree"));
            }
            if t.itemsize == 0 {
                return Err(bad("zero itemsize"));
            }
            let bytes = |elems: u64| elems.checked_mul(t.itemsize).ok_or_else(|| bad("size overflow"));
            if t.shape[0] == num_blocks {
                // Blocks first: everything after dim 0 must be one dense block.
                let inner: u64 = t.shape[1..].iter().product();
                if t.stride[0] < inner {
                    return Err(bad("blocks overlap"));
                }
                if !dense(&t.shape[1..], &t.stride[1..]) {
                    return Err(bad("a block is not contiguous"));
                }
                regions.push(Region {
                    name: t.name.clone(),
                    base: t.ptr,
                    block_len: bytes(inner)?,
                    block_stride: bytes(t.stride[0])?,
                    num_blocks,
                    mem: t.mem,
                    device_id: t.device_id,
                });
            } else if t.shape.len() >= 2 && t.shape[0] == 2 && t.shape[1] == num_blocks {
                let inner: u64 = t.shape[2..].iter().product();
                if !dense(&t.shape[2..], &t.stride[2..]) || t.stride[1] < inner {
                    return Err(bad("a block is not contiguous"));
                }
                for (i, kv) in ["k", "v"].iter().enumerate() {
                    regions.push(Region {
                        name: format!("{}.{kv}", t.name),
                        base: t.ptr + bytes(t.stride[0] * i as u64)?,
                        block_len: bytes(inner)?,
                        block_stride: bytes(t.stride[1])?,
                        num_blocks,
                        mem: t.mem,
                        device_id: t.device_id,
                    });
                }
            } else {
                return Err(bad(&format!("no axis of size num_blocks={num_blocks} in position 0 (or 1 after a K/V axis of 2)")));
            }
        }
        Ok(Self { regions, num_blocks })
    }
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
mod tests {
    use super::*;

    fn t(shape: &[u64], stride: &[u64]) -> TensorInfo {
        TensorInfo {
            name: "l0".into(),
            ptr: 0x1000,
            shape: shape.into(),
            stride: stride.into(),
            itemsize: 2,
            mem: MemKind::Dram,
            device_id: 0,
        }
    }

    #[test]
    fn cpu_layout_is_one_region_per_layer() {
        // [num_blocks, kv_heads, block_size, 2*head] bf16, as vLLM's CPU backend.
        let l = KvLayout::from_tensors(&[t(&[4096, 2, 128, 128], &[32768, 16384, 128, 1])], 4096).unwrap();
        assert_eq!(l.regions.len(), 1);
        assert_eq!(l.regions[0].block_len, 65536);
        assert_eq!(l.regions[0].block_stride, 65536);
        assert_eq!(l.regions[0].block_addr(2), 0x1000 + 2 * 65536);
    }

    #[test]
    fn kv_first_layout_splits_k_and_v() {
        let l = KvLayout::from_tensors(&[t(&[2, 10, 16, 2, 64], &[10 * 2048, 2048, 128, 64, 1])], 10).unwrap();
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[1].base, 0x1000 + 10 * 2048 * 2);
        assert_eq!(l.regions[0].block_len, 4096);
    }

    #[test]
    fn rejects_unknown_layouts() {
        assert!(KvLayout::from_tensors(&[t(&[3, 5], &[5, 1])], 7).is_err());
        assert!(KvLayout::from_tensors(&[t(&[7, 4, 2], &[8, 1, 4])], 7).is_err());
        assert!(KvLayout::from_tensors(&[], 7).is_err());
        assert!(KvLayout::from_tensors(&[t(&[7, 5], &[5])], 7).is_err());
    }
}
