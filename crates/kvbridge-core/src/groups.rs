//! KV-cache groups (vLLM's hybrid allocator): what both sides must agree on per group, and
//! which of a group's block ids a transfer carries (pure functions): a sliding-window
//! group's last blocks, a state (Mamba/GDN) group's running-state block.
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
    /// State groups: how a state block is laid out (vLLM's Mamba type and conv-state
    /// layout); the bytes move as they are, so both sides must agree.
    #[serde(default)]
    pub layout: String,
    /// State groups: the speculative-decoding scratch blocks vLLM appends to a request's
    /// running-state block. Local (D's speculator is its own affair): not compared, not sent.
    #[serde(default, skip_serializing)]
    pub spec_blocks: u32,
}

/// Which of a group's block ids a transfer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Clip {
    /// Every block (full attention, MLA).
    #[default]
    All,
    /// The last `n` (a sliding window).
    Last(usize),
    /// The running-state block: the last one before `n` speculative scratch blocks (vLLM's
    /// `clip_ssm_state_blocks`).
    State(usize),
}

impl CompatInfo {
    /// Per KV-cache group, the blocks a transfer carries: a sliding-window group's last
    /// `ceil(window / block_size) + 1` blocks (vLLM's NixlConnector rule: one more for a
    /// window not aligned with the blocks), a state group's running-state block, all of
    /// the others.
    pub fn clips(&self) -> Vec<Clip> {
        let bs = u64::from(self.block_size.max(1));
        self.kv_groups
            .iter()
            .map(|g| match (g.kind.as_str(), g.sliding_window) {
                ("state", _) => Clip::State(g.spec_blocks as usize),
                (_, 0) => Clip::All,
                (_, w) => Clip::Last(usize::try_from(u64::from(w).div_ceil(bs) + 1).unwrap_or(usize::MAX)),
            })
            .collect()
    }

    /// Trailing prompt tokens P must not compute and D computes itself: 1 with state
    /// groups. A recurrent state cannot be rewound, so P hands over h(N-1) and D applies
    /// token N once (vLLM #37310: applied twice when P computed it too).
    pub fn prefill_backoff(&self) -> u64 {
        u64::from(self.kv_groups.iter().any(|g| g.kind == "state"))
    }
}

/// `groups` with each group cut to what a transfer carries ([`CompatInfo::clips`]).
pub fn clip_groups(groups: &[Vec<u32>], clips: &[Clip]) -> Vec<Vec<u32>> {
    groups
        .iter()
        .enumerate()
        .map(|(g, ids)| match clips.get(g).copied().unwrap_or_default() {
            Clip::All => ids.clone(),
            Clip::Last(n) => ids.get(ids.len().saturating_sub(n)..).unwrap_or(&[]).to_vec(),
            Clip::State(scratch) => {
                let keep = ids.len().saturating_sub(scratch.min(ids.len().saturating_sub(1)));
                ids.get(keep.saturating_sub(1)..keep).unwrap_or(&[]).to_vec()
            }
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
                KvGroupSpec { kind: "attention".into(), sliding_window: 0, num_layers: 2, spec_blocks: 0, layout: String::new() },
                KvGroupSpec { kind: "attention".into(), sliding_window: 256, num_layers: 2, spec_blocks: 0, layout: String::new() },
                KvGroupSpec { kind: "attention".into(), sliding_window: 100, num_layers: 2, spec_blocks: 0, layout: String::new() },
            ],
            ..Default::default()
        };
        assert_eq!(c.clips(), vec![Clip::All, Clip::Last(3), Clip::Last(2)]);
        assert_eq!(c.prefill_backoff(), 0);
        let g = vec![vec![1, 2, 3, 4, 5], vec![0, 0, 8, 9, 10], vec![11]];
        assert_eq!(clip_groups(&g, &c.clips()), vec![vec![1, 2, 3, 4, 5], vec![8, 9, 10], vec![11]]);
        assert_eq!(clip_groups(&g, &[]), g, "no groups reported: nothing clipped");
    }

    #[test]
    fn state_groups_keep_the_running_state_block_and_back_off_one_token() {
        let state =
            |spec_blocks| KvGroupSpec { kind: "state".into(), sliding_window: 0, num_layers: 1, spec_blocks, layout: "MAMBA2/DS".into() };
        let c = CompatInfo { block_size: 128, kv_groups: vec![state(0), state(2)], ..Default::default() };
        assert_eq!(c.clips(), vec![Clip::State(0), Clip::State(2)]);
        assert_eq!(c.prefill_backoff(), 1);
        // As vLLM's clip_ssm_state_blocks: scratch slots after the state go, and anything before it.
        let clip = |ids: Vec<u32>, s| clip_groups(&[ids], &[Clip::State(s)]);
        assert_eq!(clip(vec![0, 0, 7], 0), vec![vec![7]]);
        assert_eq!(clip(vec![0, 7, 8, 9], 2), vec![vec![7]]);
        assert_eq!(clip(vec![7], 2), vec![vec![7]], "before scratch is allocated the state slot stays");
        assert_eq!(clip(vec![], 2), vec![Vec::<u32>::new()]);
        // The scratch count is D's own: not part of what peers compare.
        let mut p = c.clone();
        p.kv_groups[1].spec_blocks = 0;
        assert!(crate::wire::compat_diff(&c, &p).is_empty());
    }
}
