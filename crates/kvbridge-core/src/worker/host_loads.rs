//! D with a host buffer (`kv_buffer_device="cpu"`): which local blocks each load fills, so
//! the driver copies exactly those from the host mirror to the cache once the load is done
//! (pull: the READ; push: P's writes), before vLLM hears it finished.
use std::collections::HashMap;

use super::FinishedSets;
use crate::wire::ConnectorMetadata;

/// The blocks of the loads in flight, by request.
#[derive(Debug, Default)]
pub struct HostLoads {
    loads: HashMap<String, Vec<u32>>,
}

impl HostLoads {
    /// Remember the blocks of a step's loads (pull `RecvReq`s and push registrations that
    /// load), never the null block.
    pub fn on_metadata(&mut self, md: &ConnectorMetadata, null_block: Option<u32>) {
        let pull = md.reqs_to_recv.iter().filter(|r| !r.notify_only).map(|r| (&r.req_id, &r.local_block_ids));
        let push = md.push_register.iter().filter(|r| !r.notify_only).map(|r| (&r.req_id, &r.local_block_ids));
        for (req, blocks) in pull.chain(push) {
            let ids = blocks.iter().flatten().copied().filter(|&b| Some(b) != null_block);
            self.loads.insert(req.clone(), ids.collect());
        }
    }

    /// The loads `out` reports finished whose blocks must be copied to the cache: not
    /// failed, with blocks. Every load `out` ends is forgotten, including a push load
    /// aborted while P could still write (reported in `sending`; nothing is copied for it).
    pub fn take_finished(&mut self, out: &FinishedSets) -> Vec<(String, Vec<u32>)> {
        if self.loads.is_empty() {
            return Vec::new();
        }
        let done: Vec<(String, Vec<u32>)> = out.recving.iter().filter_map(|r| self.loads.remove(r).map(|b| (r.clone(), b))).collect();
        for r in &out.sending {
            self.loads.remove(r);
        }
        done.into_iter().filter(|(r, b)| !b.is_empty() && !out.failed_recving.contains(r)).collect()
    }

    /// Loads remembered and not yet finished.
    pub fn len(&self) -> usize {
        self.loads.len()
    }

    /// No load remembered.
    pub fn is_empty(&self) -> bool {
        self.loads.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{RecvReq, RemoteRef};

    fn recv(req: &str, blocks: Vec<u32>, notify_only: bool) -> RecvReq {
        let remote = RemoteRef {
            engine_id: "P".into(),
            host: "h".into(),
            port: 1,
            request_id: "p".into(),
            block_ids: vec![],
            tp_size: 1,
            epoch: 0,
            expiry_unix: 0.0,
            staged: false,
        };
        RecvReq { req_id: req.into(), local_block_ids: vec![blocks], num_tokens: 0, notify_only, remote }
    }

    #[test]
    fn copies_only_finished_successful_loads_and_forgets_every_ended_one() {
        let mut h = HostLoads::default();
        let md = ConnectorMetadata {
            reqs_to_recv: vec![
                recv("ok", vec![0, 4, 5], false),
                recv("bad", vec![6], false),
                recv("hit", vec![], false),
                recv("n", vec![9], true),
            ],
            ..Default::default()
        };
        h.on_metadata(&md, Some(0));
        assert_eq!(h.len(), 3, "notify-only requests load nothing");
        let out = FinishedSets {
            recving: vec!["ok".into(), "bad".into(), "hit".into()],
            failed_recving: vec!["bad".into()],
            ..Default::default()
        };
        assert_eq!(h.take_finished(&out), vec![("ok".to_string(), vec![4, 5])], "the null block is never copied");
        assert!(h.is_empty());
    }
}
