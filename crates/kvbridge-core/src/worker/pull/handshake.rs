//! Pull mode: a peer's handshake answers checked and planned, its ranks loaded.
use super::*;

impl PullWorker {
    /// Check a handshake reply: the hash first, then the metadata.
    pub fn check_payload(&self, engine_id: &str, addr: &str, bytes: &[u8]) -> Result<(AgentMetadata, u64, f64), Error> {
        let p: HandshakePayload = wire::decode("HandshakePayload", bytes, MAX_HANDSHAKE_BYTES)?;
        if let Some(reason) = p.error {
            return Err(HandshakeError::Rejected { addr: addr.into(), reason }.into());
        }
        if p.compat_hash != self.compat_hash {
            let detail = wire::describe_mismatch(&self.compat, &self.mode, p.compat.as_ref(), &p.kvbridge_version, &p.mode);
            if self.enforce_compat {
                return Err(HandshakeError::Incompatible { addr: addr.into(), detail }.into());
            }
            tracing::warn!(addr, %detail, "kvbridge: compatibility hash differs but enforce_handshake_compat=false; continuing");
        }
        let md: AgentMetadata = wire::decode("AgentMetadata", &p.agent_metadata, MAX_HANDSHAKE_BYTES)?;
        if md.engine_id != engine_id {
            return Err(HandshakeError::EngineMismatch { addr: addr.into(), expected: engine_id.into(), actual: md.engine_id }.into());
        }
        Ok((md, p.epoch, p.now_unix))
    }

    /// Remote rank `rank`'s side channel answered (or failed). Once every rank has, the
    /// plan is built — or the handshake fails with the reason — before any transport work.
    ///
    /// `sent_unix`/`recv_unix` bracket the request: with the peer's clock in the payload
    /// they give the clock offset used to compare P's lease expiry times with ours.
    pub fn on_handshake_payload(
        &mut self,
        peer: &str,
        rank: u32,
        addr: &str,
        res: Result<Vec<u8>, HandshakeError>,
        sent_unix: f64,
        recv_unix: f64,
    ) -> Vec<Action> {
        let Some(Engine::Handshaking { engine_id, sources, mds, directory, .. }) = self.engines.get(peer) else { return Vec::new() };
        if rank == 0 && directory.is_some() {
            return self.on_directory(peer, addr, res, sent_unix, recv_unix);
        }
        let Some(slot) = sources.iter().position(|&q| q == rank) else { return Vec::new() };
        if mds.get(slot).map_or(true, Option::is_some) {
            return Vec::new();
        }
        let engine_id = engine_id.clone();
        let (md, peer_epoch, peer_now) = match res.map_err(Error::from).and_then(|b| self.check_payload(&engine_id, addr, &b)) {
            Ok(x) => x,
            Err(e) => {
                self.stats.handshakes_failed += 1;
                self.base.xfer.record_failed_handshake();
                return self.fail_engine(peer, &e);
            }
        };
        let Some(Engine::Handshaking { mds, epoch, clock_offset, .. }) = self.engines.get_mut(peer) else { return Vec::new() };
        if let Some(m) = mds.get_mut(slot) {
            *m = Some(md);
        }
        if *epoch == 0 {
            *epoch = peer_epoch;
        }
        if clock_offset.is_none() && peer_now > 0.0 && recv_unix >= sent_unix {
            *clock_offset = Some(peer_now - (sent_unix + recv_unix) / 2.0);
        }
        if mds.iter().any(Option::is_none) {
            return Vec::new();
        }
        let all: Vec<AgentMetadata> = mds.iter().flatten().cloned().collect();
        let Some(Engine::Handshaking { sources, tp, .. }) = self.engines.get(peer) else { return Vec::new() };
        let by_rank: HashMap<u32, AgentMetadata> = sources.iter().copied().zip(all).collect();
        let stages = group_stages(sources, tp.remote_tp_size, &by_rank);
        let _span = tracing::debug_span!("plan", peer, stages = stages.len()).entered();
        let built = self.plan_stages(&stages, |m| m.regions.clone());
        // P's staging buffer mirrors its cache region by region: the same plan, built on
        // the staging regions.
        let staging = by_rank.values().all(|m| m.staging_regions.len() == m.regions.len());
        let staged = staging.then(|| {
            self.plan_stages(&stages, |m| m.staging_regions.clone())
                .map_err(|e| tracing::warn!(peer, error = %e, "kvbridge: no plan for the peer's staging buffer"))
                .ok()
        });
        match built {
            Ok(plan) => {
                // Only the ranks of the stages this rank reads from are loaded.
                let kept = plan.sources.clone();
                let actions = kept
                    .iter()
                    .filter_map(|g| by_rank.get(g).map(|md| (g, md)))
                    .map(|(&g, md)| Action::AddRemote { peer: peer.to_string(), rank: g, key: remote_key(peer, g), md: md.clone() })
                    .collect();
                if let Some(Engine::Handshaking { plan: p, staged: s, sources, added, .. }) = self.engines.get_mut(peer) {
                    *p = Some(plan);
                    *s = staged.flatten();
                    *added = vec![false; kept.len()];
                    *sources = kept;
                }
                actions
            }
            Err(e) => {
                self.stats.handshakes_failed += 1;
                self.base.xfer.record_failed_handshake();
                self.fail_engine(peer, &e.into())
            }
        }
    }

    /// The transport loaded remote rank `rank` (or could not).
    pub fn on_remote_added(&mut self, peer: &str, rank: u32, res: Result<(), TransportError>, now_unix: f64) -> Vec<Action> {
        if let Err(e) = res {
            self.stats.handshakes_failed += 1;
            self.base.xfer.record_failed_handshake();
            return self.fail_engine(peer, &e.into());
        }
        let Some(Engine::Handshaking { sources, added, .. }) = self.engines.get_mut(peer) else { return Vec::new() };
        if let Some(slot) = sources.iter().position(|&q| q == rank) {
            if let Some(a) = added.get_mut(slot) {
                *a = true;
            }
        }
        if !added.iter().all(|&a| a) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some(Engine::Handshaking { queued, plan: Some(plan), staged, epoch, clock_offset, started_unix, .. }) =
            self.engines.remove(peer)
        {
            self.base.xfer.record_handshake(now_unix - started_unix);
            self.stats.handshakes_ok += 1;
            self.last_active.insert(peer.to_string(), now_unix);
            if epoch != 0 {
                // Every other incarnation met at this address is gone for good.
                let seen = self.retired.entry(peer.to_string()).or_default();
                if !seen.contains(&epoch) {
                    seen.push(epoch);
                }
                if seen.len() > 64 {
                    seen.remove(0);
                }
                let current = epoch;
                seen.sort_by_key(|&e| e == current); // the live one last
            }
            tracing::info!(
                peer,
                handshake_ms = (now_unix - started_unix) * 1e3,
                remote_ranks = ?plan.sources,
                regions = plan.num_regions,
                remote_blocks = plan.remote_num_blocks,
                ranges_per_block = plan.ranges_per_block,
                "kvbridge: handshake done, transfer plan ready"
            );
            self.engines.insert(
                peer.to_string(),
                Engine::Ready { plan: plan.clone(), staged: staged.clone(), epoch, clock_offset: clock_offset.unwrap_or(0.0) },
            );
            for r in queued {
                match plan_for(&r, peer, &plan, staged.as_ref()) {
                    Ok(p) => self.start(r, peer, p, now_unix, &mut actions),
                    Err(e) => self.fail(&r.req_id, &r.local_block_ids, r.notify_only, &e),
                }
            }
        }
        actions
    }

    /// Fail every request queued on `peer` and forget it (and any ranks already loaded).
    pub(super) fn fail_engine(&mut self, peer: &str, e: &Error) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(Engine::Handshaking { queued, sources, added, .. }) = self.engines.remove(peer) {
            for r in queued {
                self.fail(&r.req_id, &r.local_block_ids, r.notify_only, e);
            }
            for (q, a) in sources.iter().zip(added) {
                if a {
                    actions.push(Action::RemoveRemote { key: remote_key(peer, *q) });
                }
            }
        }
        actions
    }
}

/// The handshaken ranks' metadata by pipeline stage: `(pp, [metadata of each TP source])`,
/// stages in order (`sources` lists stage 0's TP sources, then stage 1's, ...).
fn group_stages(sources: &[u32], remote_tp_size: u32, by_rank: &HashMap<u32, AgentMetadata>) -> Vec<(u32, Vec<AgentMetadata>)> {
    let mut out: Vec<(u32, Vec<AgentMetadata>)> = Vec::new();
    for &g in sources {
        let (pp, _) = crate::plan::stage_of(g, remote_tp_size);
        let Some(md) = by_rank.get(&g) else { continue };
        match out.last_mut() {
            Some((p, v)) if *p == pp => v.push(md.clone()),
            _ => out.push((pp, vec![md.clone()])),
        }
    }
    out
}

impl PullWorker {
    /// The plan over `stages`, with each rank's regions taken by `regions` (the cache's, or
    /// the staging buffer's). One stage: the TP plan; several: [`TransferPlan::build_stages`].
    fn plan_stages(
        &self,
        stages: &[(u32, Vec<AgentMetadata>)],
        regions: impl Fn(&AgentMetadata) -> Vec<crate::layout::Region>,
    ) -> Result<TransferPlan, PlanError> {
        let l = self.layout.as_ref().ok_or(PlanError::NotRegistered)?;
        let stages: Vec<(u32, Vec<AgentMetadata>)> =
            stages.iter().map(|(pp, m)| (*pp, m.iter().map(|m| AgentMetadata { regions: regions(m), ..m.clone() }).collect())).collect();
        match stages.as_slice() {
            [(0, mds)] => TransferPlan::build(l, self.tp_size, self.tp_rank, self.block_size, mds, self.null_block),
            _ => TransferPlan::build_stages(l, (self.tp_size, self.tp_rank), self.block_size, &stages, &self.stage_layers, self.null_block),
        }
    }

    /// Pipeline parallel: the layer names of every local stage, index = PP rank (from the
    /// engine's ranks at start-up). A remote rank read by several local stages expects a
    /// notification from each.
    pub fn set_stage_layers(&mut self, layers: Vec<Vec<String>>) {
        self.stage_layers = layers;
    }
}
