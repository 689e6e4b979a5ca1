//! Pipeline parallelism: a local stage reads its layers from the remote stages that hold
//! them.
//!
//! - Remote ranks are numbered `pp * remote_tp_size + tp` across stages ([`stage_of`]).
//! - Each stage keeps one stage's TP mapping; a region is read from the stage that holds
//!   its layer. Layers are matched by name, so P and D may cut the model into stages
//!   differently (different PP sizes, or vLLM's `VLLM_PP_LAYER_PARTITION`).
//! - Stages holding none of this rank's layers are left out: neither read nor notified.
//! - A remote rank that is read gets one notification per request from each local rank of
//!   each local stage that reads it ([`TransferPlan::expected`]), so P frees a request's
//!   blocks once every D stage that needs them is done.
use std::collections::HashSet;

use super::*;

/// The most pipeline stages a peer may advertise.
pub const MAX_PP_SIZE: u32 = 256;

/// Remote rank `g`'s `(pp, tp)` rank, for a remote TP size of `tp_size`.
pub fn stage_of(g: u32, tp_size: u32) -> (u32, u32) {
    let t = tp_size.max(1);
    (g / t, g % t)
}

impl TransferPlan {
    /// The plan over a remote engine's pipeline stages: `stages` holds, per stage `pp`,
    /// the metadata of the TP ranks `TpMapping::new(local_tp_size, local_tp_rank,
    /// remote TP size).sources` (same order). `local_stage_layers` lists the layer names of
    /// every local stage (empty: this one only), to count the notifications each remote
    /// rank gets. Everything a peer sent is checked; nothing here panics.
    pub fn build_stages(
        local: &KvLayout,
        local_tp: (u32, u32),
        local_block_size: u32,
        stages: &[(u32, Vec<AgentMetadata>)],
        local_stage_layers: &[Vec<String>],
        null_block: Option<u32>,
    ) -> Result<Self, PlanError> {
        let first = stages.iter().find_map(|(_, m)| m.first()).ok_or_else(|| layout_err("no remote metadata".into()))?;
        let tp = TpMapping::new(local_tp.0, local_tp.1, first.tp_size)?;
        let mine: HashSet<&str> = local.regions.iter().map(|r| r.layer.as_str()).collect();
        let (mut flat, mut sources, mut expected) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen_pp = HashSet::new();
        let mut owner: std::collections::HashMap<&str, u32> = Default::default();
        for (pp, mds) in stages {
            if *pp >= MAX_PP_SIZE || !seen_pp.insert(*pp) {
                return Err(layout_err(format!("remote pipeline stage {pp}: repeated, or above {MAX_PP_SIZE}")));
            }
            if mds.len() != tp.sources.len() {
                return Err(layout_err(format!("stage {pp}: expected metadata of {} remote ranks, got {}", tp.sources.len(), mds.len())));
            }
            check_ranks(mds, &tp.sources, first)?;
            let held: HashSet<&str> = mds.iter().flat_map(|m| m.regions.iter().map(|r| r.layer.as_str())).collect();
            for l in &held {
                if let Some(other) = owner.insert(l, *pp) {
                    return Err(layout_err(format!("layer {l} is held by remote stages {other} and {pp}")));
                }
            }
            if !held.iter().any(|l| mine.contains(l)) {
                continue;
            }
            let readers = local_stage_layers.iter().filter(|s| s.iter().any(|l| held.contains(l.as_str()))).count().max(1) as u32;
            for (m, &q) in mds.iter().zip(&tp.sources) {
                flat.push(m.clone());
                sources.push(pp * first.tp_size + q);
                expected.push(readers.saturating_mul(tp.notifs_per_remote_rank));
            }
        }
        if flat.is_empty() {
            return Err(layout_err("no remote pipeline stage holds any of this rank's layers".into()));
        }
        let mut plan = Self::assemble(local, tp, local_block_size, &flat, null_block)?;
        plan.sources = sources;
        plan.expected = expected;
        Ok(plan)
    }
}
