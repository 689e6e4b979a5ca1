//! Where an engine's ranks listen: one side-channel listener per worker, keyed by
//! (DP, PP, TP) rank, each at its own host when the engine spans several nodes.
//!
//! - Ports: `base + (dp * pp_size + pp) * tp_size + tp` ([`listener_port`]). An engine
//!   advertises the port of its (pp 0, tp 0) rank as `remote_port`: its *directory*.
//! - Hosts: each rank binds and advertises its own host (`side_channel_host`, or its entry
//!   of `side_channel_hosts`). Every rank's handshake payload carries the table of all of
//!   its engine's ranks ([`RankAddr`]), so a reader that must reach rank `q` asks the
//!   directory first and dials `q` where the table says, on whichever node it runs.
//! - A payload without a table (an older peer) means the single-node arithmetic:
//!   `remote_host`, `remote_port + q`.
use serde::{Deserialize, Serialize};

/// Most ranks one table may list (a hostile payload is capped before use).
pub const MAX_RANKS: usize = 4096;

/// One rank's side-channel address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankAddr {
    /// Its pipeline-parallel rank.
    pub pp_rank: u32,
    /// Its tensor-parallel rank.
    pub tp_rank: u32,
    /// The host its listener binds (what readers dial).
    pub host: String,
    /// Its listener's port.
    pub port: u16,
}

/// Where this engine's ranks listen, from its config.
impl crate::config::ConnectorConfig {
    /// The TCP port this worker's handshake listener binds: one listener per worker, keyed
    /// by (DP, PP, TP) rank ([`listener_port`]), so a D rank talks straight to
    /// the P rank whose memory it reads.
    pub fn local_listener_port(&self) -> Option<u16> {
        listener_port(self.side_channel_port, self.dp_rank, self.pp_rank, self.pp_size, self.tp_rank, self.tp_size)
    }

    /// The port the engine advertises in `kv_transfer_params` (`remote_port`): its
    /// directory, rank (pp 0, tp 0) of its DP rank.
    pub fn advertised_port(&self) -> Option<u16> {
        listener_port(self.side_channel_port, self.dp_rank, 0, self.pp_size, 0, self.tp_size)
    }

    /// The host rank (`pp`, `tp`) binds and advertises.
    pub fn host_of(&self, pp: u32, tp: u32) -> &str {
        let i = pp.saturating_mul(self.tp_size).saturating_add(tp) as usize;
        self.side_channel_hosts.get(i).map_or(self.side_channel_host.as_str(), String::as_str)
    }

    /// The host this worker's listener binds and advertises.
    pub fn local_host(&self) -> &str {
        self.host_of(self.pp_rank, self.tp_rank)
    }

    /// The host P advertises as `remote_host`: its directory rank's.
    pub fn advertised_host(&self) -> &str {
        self.host_of(0, 0)
    }

    /// This engine's rank table as the config describes it: every (pp, tp) rank of its DP
    /// rank at its host and port. A multi-node engine whose hosts only each node knows
    /// replaces it with the table its ranks exchange at start-up.
    pub fn rank_table(&self) -> Vec<RankAddr> {
        let mut t = single_host(&self.side_channel_host, self.side_channel_port, self.dp_rank, self.pp_size, self.tp_size);
        for a in &mut t {
            a.host = self.host_of(a.pp_rank, a.tp_rank).to_string();
        }
        t
    }
}

/// The rank table in a peer's encoded handshake payload, capped at [`MAX_RANKS`] entries
/// (empty: an older peer, which means the single-node arithmetic).
pub fn table_of(payload: &[u8]) -> Result<Vec<RankAddr>, crate::error::WireError> {
    let p: crate::wire::HandshakePayload = crate::wire::decode("HandshakePayload", payload, crate::wire::MAX_HANDSHAKE_BYTES)?;
    Ok(p.ranks.into_iter().take(MAX_RANKS).collect())
}

/// The listener port of rank (`dp`, `pp`, `tp`) of an engine whose base port is `base`.
pub fn listener_port(base: u16, dp: u32, pp: u32, pp_size: u32, tp: u32, tp_size: u32) -> Option<u16> {
    let off = dp.checked_mul(pp_size.max(1))?.checked_add(pp)?.checked_mul(tp_size.max(1))?.checked_add(tp)?;
    u16::try_from(u32::from(base).checked_add(off)?).ok()
}

/// Where remote TP rank `tp` of stage `pp` listens: its table entry, or (no table, or no
/// entry) the single-node arithmetic from the directory's `host:port`. `None`: the port
/// overflows.
pub fn resolve(table: &[RankAddr], host: &str, port: u16, pp: u32, tp: u32, tp_size: u32) -> Option<(String, u16)> {
    if let Some(a) = table.iter().take(MAX_RANKS).find(|a| a.pp_rank == pp && a.tp_rank == tp) {
        return Some((a.host.clone(), a.port));
    }
    let off = pp.checked_mul(tp_size.max(1))?.checked_add(tp)?;
    Some((host.to_string(), u16::try_from(u32::from(port).checked_add(off)?).ok()?))
}

/// The table of an engine on one host: every (pp, tp) rank of DP rank `dp` at `host`.
pub fn single_host(host: &str, base: u16, dp: u32, pp_size: u32, tp_size: u32) -> Vec<RankAddr> {
    let mut out = Vec::new();
    for pp in 0..pp_size.max(1) {
        for tp in 0..tp_size.max(1) {
            if let Some(port) = listener_port(base, dp, pp, pp_size, tp, tp_size) {
                out.push(RankAddr { pp_rank: pp, tp_rank: tp, host: host.to_string(), port });
            }
            if out.len() >= MAX_RANKS {
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_keyed_by_dp_pp_tp_and_never_collide() {
        let mut seen = std::collections::HashSet::new();
        for dp in 0..2 {
            for pp in 0..2 {
                for tp in 0..4 {
                    assert!(seen.insert(listener_port(5600, dp, pp, 2, tp, 4).unwrap()));
                }
            }
        }
        assert_eq!(listener_port(5600, 1, 1, 2, 3, 4), Some(5600 + 15));
        assert_eq!(listener_port(5600, 0, 0, 1, 0, 1), Some(5600));
        assert_eq!(listener_port(65535, 0, 0, 1, 1, 2), None);
    }

    #[test]
    fn resolve_prefers_the_table_and_falls_back_to_port_arithmetic() {
        let t = vec![
            RankAddr { pp_rank: 0, tp_rank: 0, host: "10.0.0.1".into(), port: 5600 },
            RankAddr { pp_rank: 0, tp_rank: 1, host: "10.0.0.2".into(), port: 5600 },
        ];
        assert_eq!(resolve(&t, "10.0.0.1", 5600, 0, 1, 2), Some(("10.0.0.2".into(), 5600)));
        assert_eq!(resolve(&[], "h", 5600, 0, 1, 2), Some(("h".into(), 5601)));
        assert_eq!(resolve(&[], "h", 5600, 1, 1, 2), Some(("h".into(), 5603)));
        assert_eq!(resolve(&t, "h", 5600, 1, 0, 2), Some(("h".into(), 5602)), "no entry: arithmetic");
        assert_eq!(resolve(&[], "h", 65535, 0, 1, 2), None);
        let s = single_host("h", 5600, 1, 1, 2);
        assert_eq!(s.iter().map(|a| a.port).collect::<Vec<_>>(), vec![5602, 5603]);
    }
}
