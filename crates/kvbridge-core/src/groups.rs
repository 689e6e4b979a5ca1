//! KV-cache groups (vLLM's hybrid allocator): what both sides must agree on per group, and
//! the sliding-window clipping of a group's block ids (pure functions).
use serde::{Deserialize, Serialize};

use crate::config::CompatInfo;

/// One KV-cache group as both sides must agree on it (block size aside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KvGroupSpec {
    /// `attention`, `mla` or `state`.
    pub kind: String,
    /// Sliding window in tokens (0: full attention).
    #[serde(default)]
    pub sliding_window: u32,
    /// Layers in the group.
    #[serde(default)]
    pub num_layers: u32,
}

impl CompatInfo {
    /// Per KV-cache group, the blocks a transfer needs at most: a sliding-window group's
    /// last `ceil(window / block_size) + 1` blocks (vLLM's NixlConnector rule: one more for
    /// a window not aligned with the blocks), 0 (all) for the others.
    pub fn window_blocks(&self) -> Vec<usize> {
        let bs = u64::from(self.block_size.max(1));
        self.kv_groups
            .iter()
            .map(|g| match g.sliding_window {
                0 => 0,
                w => usize::try_from(u64::from(w).div_ceil(bs) + 1).unwrap_or(usize::MAX),
            })
            .collect()
    }
}

/// `groups` with each sliding-window group cut to its last `window_blocks[g]` blocks (the
/// rest are out of the window: never read or written).
pub fn clip_to_windows(groups: &[Vec<u32>], window_blocks: &[usize]) -> Vec<Vec<u32>> {
    groups
        .iter()
        .enumerate()
        .map(|(g, ids)| match window_blocks.get(g).copied().unwrap_or(0) {
            0 => ids.clone(),
            n => ids.get(ids.len().saturating_sub(n)..).unwrap_or(&[]).to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_groups_keep_the_blocks_of_their_window() {
        let c = CompatInfo {
            block_size: 128,
            kv_groups: vec![
                KvGroupSpec { kind: "attention".into(), sliding_window: 0, num_layers: 2 },
                KvGroupSpec { kind: "attention".into(), sliding_window: 256, num_layers: 2 },
                KvGroupSpec { kind: "attention".into(), sliding_window: 100, num_layers: 2 },
            ],
            ..Default::default()
        };
        assert_eq!(c.window_blocks(), vec![0, 3, 2]);
        let g = vec![vec![1, 2, 3, 4, 5], vec![0, 0, 8, 9, 10], vec![11]];
        assert_eq!(clip_to_windows(&g, &c.window_blocks()), vec![vec![1, 2, 3, 4, 5], vec![8, 9, 10], vec![11]]);
        assert_eq!(clip_to_windows(&g, &[]), g, "no groups reported: nothing clipped");
    }
}
