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
    // Heads that do not match the TP split, a strided content axis, aliasing axes.
    assert!(lab(&[4, 2, 16, 8], &[256, 128, 8, 1], &[Block, Head, Token, Dim], 8).is_err());
    assert!(lab(&[4, 2, 16, 8], &[256, 128, 8, 2], &[Block, Head, Token, Dim], 4).is_err());
    assert!(lab(&[4, 2, 16, 8], &[256, 64, 8, 1], &[Block, Head, Token, Dim], 4).is_err());
    // A gap inside a block (another view of the buffer fills it) is a block that spans it.
    let gap = lab(&[4, 2, 16, 8], &[512, 256, 8, 1], &[Block, Head, Token, Dim], 4).unwrap();
    assert_eq!((gap.regions[0].block_len, gap.regions[0].block_stride), (2 * (256 + 128), 2 * 512));
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

#[test]
fn heads_outside_the_block_axis_are_one_region_each() {
    // vLLM's LHBNC per-layer view: logical [B, H, N, C] = [8, 2, 16, 64] with the head
    // axis outermost (stride B*N*C), rank 1 of TP 2 over 4 KV heads.
    use Axis::*;
    let x =
        TensorInfo::labelled("l0", 0x1000, &[8, 2, 16, 64], &[1024, 8192, 64, 1], &[Block, Head, Token, Dim], 2, RegionKind::Attention, 4);
    let l = KvLayout::from_tensors(&[x], 8, 1, 2).unwrap();
    assert_eq!(l.regions.len(), 2);
    for (i, r) in l.regions.iter().enumerate() {
        assert_eq!(r.name, format!("l0.h{}", 2 + i));
        assert_eq!(r.layer, "l0");
        assert_eq!((r.first_head, r.num_heads, r.total_heads), (2 + i as u32, 1, 4));
        assert_eq!(r.base, 0x1000 + i as u64 * 8192 * 2);
        assert_eq!((r.block_len, r.block_stride, r.token_stride, r.unit_len), (2048, 2048, 128, 128));
    }
}

#[test]
fn cross_layer_views_span_their_block_with_gaps() {
    // vLLM's BHLNC: [B, H, L, N, C]; layer 1's view of 2 layers is [B, H, N, C] with the
    // head stride stepping over the other layer: a block spans both, units do not alias.
    use Axis::*;
    let (h, l, n, c) = (2u64, 2u64, 16u64, 64u64);
    let view = |layer: u64| {
        TensorInfo::labelled(
            &format!("l{layer}"),
            0x1000 + layer * n * c,
            &[8, h, n, c],
            &[h * l * n * c, l * n * c, c, 1],
            &[Block, Head, Token, Dim],
            1,
            RegionKind::Attention,
            2,
        )
    };
    let lay = KvLayout::from_tensors(&[view(0), view(1)], 8, 0, 1).unwrap();
    assert_eq!(lay.regions.len(), 2);
    let r = &lay.regions[1];
    assert_eq!((r.block_len, r.block_stride, r.head_stride), ((h - 1) * l * n * c + n * c, h * l * n * c, l * n * c));
    let (groups, of) = block_groups(&lay.regions).unwrap();
    assert_eq!(groups.len(), 1, "both layers' views share each block: one memory range per block");
    assert_eq!(of, vec![0, 0]);
    assert_eq!(groups[0].footprint, h * l * n * c);
    // Strides that alias inside a block are refused.
    let mut bad = view(0);
    bad.stride = vec![h * l * n * c, 32, c, 1];
    assert!(KvLayout::from_tensors(&[bad], 8, 0, 1).is_err());
}
