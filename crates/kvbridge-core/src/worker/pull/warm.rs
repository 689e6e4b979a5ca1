//! First contact: handshakes started before any request (`kv_peers`), and how long a
//! peer's first request waited from routing to its READ being posted.
use super::*;

/// Rank 0's address while its answer (the rank table) is awaited; None: not needed.
pub(super) type Directory = Option<(String, u16)>;

impl PullWorker {
    /// Start handshaking with engine `engine_id` (TP size `remote_tp_size`), whose
    /// side channel is at `host:port` (its base port), before any request names it. The
    /// peer is then loaded and planned as if a request had asked; requests that arrive
    /// meanwhile queue behind it. Nothing if the peer is known or the TP sizes cannot map.
    pub fn warm_up(&mut self, engine_id: &str, host: &str, port: u16, remote_tp_size: u32, now_unix: f64) -> Vec<Action> {
        let peer = peer_key_at(engine_id, host, port);
        if self.engines.contains_key(&peer) {
            return Vec::new();
        }
        let Ok((tp, actions, directory)) = self.handshake_actions(&peer, host, port, remote_tp_size) else { return Vec::new() };
        self.insert_handshaking(peer, engine_id.to_string(), (tp, directory), Vec::new(), now_unix);
        actions
    }

    /// The TP mapping to a remote engine of `remote_tp_size` ranks whose directory (rank
    /// 0's side channel) is `host:port`, and the first handshake: rank 0's. When this rank
    /// reads from other ranks too, rank 0's payload is also the directory that says where
    /// they listen ([`crate::ranks`]); their handshakes follow its answer.
    pub(super) fn handshake_actions(
        &self,
        peer: &str,
        host: &str,
        port: u16,
        remote_tp_size: u32,
    ) -> Result<(TpMapping, Vec<Action>, Directory), Error> {
        let tp = TpMapping::new(self.tp_size, self.tp_rank, remote_tp_size)?;
        let first = Action::Handshake { peer: peer.to_string(), rank: 0, host: host.to_string(), port };
        // Always the directory: its table also says how many pipeline stages P has.
        Ok((tp, vec![first], Some((host.to_string(), port))))
    }

    /// `peer` is being handshaken (its actions issued), with `queued` waiting for it, and
    /// `directory` set while rank 0's answer is awaited for the other ranks' addresses.
    pub(super) fn insert_handshaking(
        &mut self,
        peer: String,
        engine_id: String,
        hs: (TpMapping, Directory),
        queued: Vec<RecvReq>,
        now_unix: f64,
    ) {
        let (tp, directory) = hs;
        let n = tp.sources.len();
        self.engines.insert(
            peer,
            Engine::Handshaking {
                engine_id,
                sources: tp.sources.clone(),
                tp,
                directory,
                mds: vec![None; n],
                added: vec![false; n],
                queued,
                plan: None,
                staged: None,
                epoch: 0,
                clock_offset: None,
                started_unix: now_unix,
            },
        );
    }

    /// Rank 0 answered as the directory: check it is the engine asked for, then handshake
    /// with every other rank this rank reads from where its table says (or, with no table,
    /// at `port + rank`), and take rank 0's own answer if it is a source too.
    pub(super) fn on_directory(
        &mut self,
        peer: &str,
        addr: &str,
        res: Result<Vec<u8>, HandshakeError>,
        sent: f64,
        recv: f64,
    ) -> Vec<Action> {
        let Some(Engine::Handshaking { engine_id, tp, directory, .. }) = self.engines.get_mut(peer) else { return Vec::new() };
        let Some((host, port)) = directory.take() else { return Vec::new() };
        let (engine_id, tp) = (engine_id.clone(), tp.clone());
        let checked = res.clone().map_err(Error::from).and_then(|b| {
            self.check_payload(&engine_id, addr, &b)?;
            Ok(crate::ranks::table_of(&b)?)
        });
        let table = match checked {
            Ok(t) => t,
            Err(e) => {
                self.stats.handshakes_failed += 1;
                self.base.xfer.record_failed_handshake();
                return self.fail_engine(peer, &e);
            }
        };
        let mut actions = Vec::new();
        // Pipeline stages: as many as the table lists; every stage's TP sources are asked
        // (a stage holding none of this rank's layers is dropped once its answer shows it).
        let pp_size = table.iter().map(|a| a.pp_rank.saturating_add(1)).max().unwrap_or(1);
        // A hostile table must not make this rank dial without bound: stages x sources is
        // capped like the table itself.
        let too_many = (pp_size as usize).saturating_mul(tp.sources.len()) > crate::ranks::MAX_RANKS;
        if pp_size > crate::plan::MAX_PP_SIZE || too_many {
            let e = Error::Other(format!(
                "{peer} lists {pp_size} pipeline stages (at most {}, and {} ranks to dial in all)",
                crate::plan::MAX_PP_SIZE,
                crate::ranks::MAX_RANKS
            ));
            return self.fail_engine(peer, &e);
        }
        let p_tp = tp.remote_tp_size;
        let sources: Vec<u32> = (0..pp_size).flat_map(|pp| tp.sources.iter().map(move |&q| pp * p_tp + q)).collect();
        if let Some(Engine::Handshaking { sources: s, mds, added, .. }) = self.engines.get_mut(peer) {
            *mds = vec![None; sources.len()];
            *added = vec![false; sources.len()];
            *s = sources.clone();
        }
        if self.rank_addrs.len() < CONTACTED_CAP {
            self.rank_addrs.insert(peer.to_string(), table.clone());
        }
        for &g in sources.iter().filter(|&&g| g != 0) {
            let (pp, q) = crate::plan::stage_of(g, p_tp);
            match crate::ranks::resolve(&table, &host, port, pp, q, p_tp) {
                Some((host, port)) => actions.push(Action::Handshake { peer: peer.to_string(), rank: g, host, port }),
                None => {
                    return self.fail_engine(peer, &Error::Other(format!("no side-channel address for rank {q} of stage {pp} of {peer}")))
                }
            }
        }
        if sources.contains(&0) {
            actions.extend(self.on_handshake_payload(peer, 0, addr, res, sent, recv));
        }
        actions
    }

    /// If `req_id` was the first request routed to its peer: when it was routed (Unix
    /// seconds). The driver calls it once the READ is posted, to log first contact.
    pub fn take_first_contact(&mut self, req_id: &str) -> Option<f64> {
        self.first_contact.remove(req_id)
    }
}
