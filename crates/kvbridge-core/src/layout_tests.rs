//! Unit tests of `layout.rs`.
use super::*;

fn t(shape: &[u64], stride: &[u64]) -> TensorInfo {
    TensorInfo::opaque("l0", 0x1000, shape, stride, 2, MemKind::Dram, 0)
}

#[test]
fn cpu_layout_is_one_region_per_layer() {
    // [num_blocks, kv_heads, block_size, 2*head] bf16, as vLLM's CPU backend.
    let l = KvLayout::from_tensors(&[t(&[4096, 2, 128, 128], &[32768, 16384, 128, 1])], 4096, 0, 1).unwrap();
    assert_eq!(l.regions.len(), 1);
    assert_eq!(l.regions[0].block_len, 65536);
    assert_eq!(l.regions[0].block_stride, 65536);
    assert_eq!(l.regions[0].block_addr(2), 0x1000 + 2 * 65536);
}

#[test]
fn labelled_cpu_layout_knows_heads_and_tokens() {
    use Axis::*;
    let mut x = TensorInfo::labelled(
        "l0",
        0x1000,
        &[64, 2, 128, 128],
        &[32768, 16384, 128, 1],
        &[Block, Head, Token, Dim],
        2,
        RegionKind::Attention,
        4,
    );
    x.group = 1;
    let l = KvLayout::from_tensors(&[x], 32, 1, 2).unwrap();
    let r = &l.regions[0];
    assert_eq!(l.blocks_per_logical, 2, "64 kernel blocks over 32 logical ones");
    assert_eq!((r.first_head, r.num_heads, r.total_heads), (2, 2, 4));
    assert_eq!((r.head_stride, r.token_stride, r.unit_len, r.block_tokens), (32768, 256, 256, 128));
    assert_eq!(r.group, 1);
}

#[test]
fn kv_first_layout_splits_k_and_v() {
    let l = KvLayout::from_tensors(&[t(&[2, 10, 16, 2, 64], &[10 * 2048, 2048, 128, 64, 1])], 10, 0, 1).unwrap();
    assert_eq!(l.regions.len(), 2);
    assert_eq!(l.regions[1].base, 0x1000 + 10 * 2048 * 2);
    assert_eq!(l.regions[0].block_len, 4096);
    use Axis::*;
    // The same, labelled: NHD inside each block.
    let x = TensorInfo::labelled(
        "l0",
        0x1000,
        &[2, 10, 16, 2, 64],
        &[10 * 2048, 2048, 128, 64, 1],
        &[Kv, Block, Token, Head, Dim],
        2,
        RegionKind::Attention,
        2,
    );
    let l = KvLayout::from_tensors(&[x], 10, 0, 1).unwrap();
    assert_eq!(l.regions.len(), 2);
    assert_eq!((l.regions[1].kv_parts.clone(), l.regions[1].head_stride, l.regions[1].token_stride), (vec![1], 128, 256));
}

#[test]
fn block_groups_fuse_interleaved_views_and_refuse_bad_regions() {
    // K at +0 and V at +50 of a 100-byte block: one group; a dense region apart.
    let k = Region::opaque("l.k", 9000, 50, 100, 4);
    let v = Region::opaque("l.v", 9050, 50, 100, 4);
    let other = Region::opaque("m", 1000, 100, 100, 4);
    let (groups, of) = block_groups(&[k, v, other.clone()]).expect("groups");
    assert_eq!(groups.len(), 2);
    assert_eq!(of[0], of[1]);
    assert_eq!((groups[of[0]].base, groups[of[0]].footprint), (9000, 100));
    assert_eq!((groups[of[2]].base, groups[of[2]].footprint), (1000, 100));
    // A peer's regions may say anything: empty blocks, overlap, addresses that overflow.
    assert!(block_groups(&[Region::opaque("z", 0, 0, 8, 1)]).is_none());
    assert!(block_groups(&[Region::opaque("o", 0, 16, 8, 1)]).is_none());
    assert!(block_groups(&[Region::opaque("m", u64::MAX - 4, 8, 8, 1), other]).is_none());
}

#[test]
fn rejects_unknown_layouts() {
    use Axis::*;
    assert!(KvLayout::from_tensors(&[t(&[3, 5], &[5, 1])], 7, 0, 1).is_err());
    assert!(KvLayout::from_tensors(&[t(&[7, 4, 2], &[8, 1, 4])], 7, 0, 1).is_err());
    assert!(KvLayout::from_tensors(&[], 7, 0, 1).is_err());
    assert!(KvLayout::from_tensors(&[t(&[7, 5], &[5])], 7, 0, 1).is_err());
    let lab = |shape: &[u64], stride: &[u64], axes: &[Axis], heads| {
        KvLayout::from_tensors(&[TensorInfo::labelled("x", 0, shape, stride, axes, 2, RegionKind::Attention, heads)], 4, 0, 2)
    };
    // Heads that do not match the TP split, a strided content axis, a gap in a block.
    assert!(lab(&[4, 2, 16, 8], &[256, 128, 8, 1], &[Block, Head, Token, Dim], 8).is_err());
    assert!(lab(&[4, 2, 16, 8], &[256, 128, 8, 2], &[Block, Head, Token, Dim], 4).is_err());
    assert!(lab(&[4, 2, 16, 8], &[512, 256, 8, 1], &[Block, Head, Token, Dim], 4).is_err());
    assert!(lab(&[4, 2, 16, 8], &[256, 128, 8, 1], &[Block, Head, Head, Dim], 4).is_err());
    assert!(lab(&[4, 2, 16, 8], &[256, 128, 8, 1], &[Block, Head, Token, Dim], 4).is_ok());
}

#[test]
fn head_split_matches_vllm() {
    assert_eq!(heads_of_rank(8, 2, 1).unwrap(), (4, 4));
    assert_eq!(heads_of_rank(2, 4, 3).unwrap(), (1, 1));
    assert_eq!(heads_of_rank(1, 4, 2).unwrap(), (0, 1));
    assert!(heads_of_rank(3, 2, 0).is_err());
    assert!(heads_of_rank(2, 3, 0).is_err());
    assert!(heads_of_rank(2, 2, 2).is_err());
}
