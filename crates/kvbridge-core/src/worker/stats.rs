//! Per-interval transfer stats, in the shape vLLM's `NixlKVConnectorStats` uses.
//!
//! vLLM asks the worker for stats after every step (`get_kv_connector_stats`), ships them
//! to the logging process, aggregates them across workers and renders the periodic log
//! line and the Prometheus metrics (`vllm:nixl_*`). [`XferStats`] keeps the same keys, so
//! the Python side reuses vLLM's own aggregation, buckets and metric names unchanged;
//! kvbridge adds `handshake_duration`, `held_blocks` and `num_integrity_mismatches`.
use serde::Serialize;

/// Each list keeps at most this many entries between two collections, so an engine that
/// never collects (stats off) cannot grow memory without bound. Counts past the cap are
/// dropped, not wrapped.
pub const MAX_SAMPLES: usize = 65_536;

/// Observations since the last [`XferStats::take`]. Durations in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct XferStats {
    /// Per successful transfer (one request's READs, or one push job's WRITEs): from the
    /// post to the completion being seen.
    pub transfer_duration: Vec<f64>,
    /// Time spent in the post call itself.
    pub post_duration: Vec<f64>,
    /// Bytes moved, per successful transfer.
    pub bytes_transferred: Vec<u64>,
    /// NIXL descriptors posted (after coalescing), per successful transfer.
    pub num_descriptors: Vec<u64>,
    /// One `1` per failed transfer, notification, handshake, expired lease, and
    /// notification for a request whose lease had already expired (vLLM's encoding).
    pub num_failed_transfers: Vec<u32>,
    /// One `1` per notification that could not be sent.
    pub num_failed_notifications: Vec<u32>,
    /// One `1` per failed handshake with a remote engine.
    pub num_failed_handshakes: Vec<u32>,
    /// One `1` per lease that ran out before its readers were done (P).
    pub num_kv_expired_reqs: Vec<u32>,
    /// One `1` per notification that arrived after its request's lease had expired (P).
    pub num_notifications_after_expiry: Vec<u32>,
    /// kvbridge: first contact with a remote engine, from the first handshake request to
    /// the transfer plan being ready (all ranks fetched and loaded).
    pub handshake_duration: Vec<f64>,
    /// kvbridge: blocks this rank holds for remote readers, sampled at collection.
    pub held_blocks: Vec<u64>,
    /// kvbridge, D with `kv_integrity`: one `1` per loaded block whose bytes differed from
    /// P's digest.
    pub num_integrity_mismatches: Vec<u32>,
}

fn push<T>(v: &mut Vec<T>, x: T) {
    if v.len() < MAX_SAMPLES {
        v.push(x);
    }
}

impl XferStats {
    /// A transfer succeeded: `secs` from post to completion, `post_secs` in the post
    /// call, `bytes` moved in `descriptors` descriptors.
    pub fn record_transfer(&mut self, secs: f64, post_secs: f64, bytes: u64, descriptors: u64) {
        push(&mut self.transfer_duration, secs.max(0.0));
        push(&mut self.post_duration, post_secs.max(0.0));
        push(&mut self.bytes_transferred, bytes);
        push(&mut self.num_descriptors, descriptors);
    }
    /// A transfer failed.
    pub fn record_failed_transfer(&mut self) {
        push(&mut self.num_failed_transfers, 1);
    }
    /// A notification could not be sent.
    pub fn record_failed_notification(&mut self) {
        push(&mut self.num_failed_notifications, 1);
    }
    /// A handshake with a remote engine failed.
    pub fn record_failed_handshake(&mut self) {
        push(&mut self.num_failed_handshakes, 1);
    }
    /// A lease ran out before its readers were done.
    pub fn record_kv_expired_req(&mut self) {
        push(&mut self.num_kv_expired_reqs, 1);
    }
    /// A notification arrived for a request whose lease had already expired.
    pub fn record_notification_after_expiry(&mut self) {
        push(&mut self.num_notifications_after_expiry, 1);
    }
    /// A remote engine's handshake completed in `secs` (first request to plan ready).
    pub fn record_handshake(&mut self, secs: f64) {
        push(&mut self.handshake_duration, secs.max(0.0));
    }

    /// Nothing observed (the held-blocks sample alone does not count: vLLM is only sent
    /// intervals in which something happened).
    pub fn is_empty(&self) -> bool {
        self.transfer_duration.is_empty()
            && self.num_failed_transfers.is_empty()
            && self.num_failed_notifications.is_empty()
            && self.num_failed_handshakes.is_empty()
            && self.num_kv_expired_reqs.is_empty()
            && self.num_notifications_after_expiry.is_empty()
            && self.handshake_duration.is_empty()
            && self.num_integrity_mismatches.is_empty()
    }

    /// Append `other`'s observations (another part of the same worker).
    pub fn merge(&mut self, other: XferStats) {
        fn ext<T>(a: &mut Vec<T>, b: Vec<T>) {
            let room = MAX_SAMPLES.saturating_sub(a.len());
            a.extend(b.into_iter().take(room));
        }
        ext(&mut self.transfer_duration, other.transfer_duration);
        ext(&mut self.post_duration, other.post_duration);
        ext(&mut self.bytes_transferred, other.bytes_transferred);
        ext(&mut self.num_descriptors, other.num_descriptors);
        ext(&mut self.num_failed_transfers, other.num_failed_transfers);
        ext(&mut self.num_failed_notifications, other.num_failed_notifications);
        ext(&mut self.num_failed_handshakes, other.num_failed_handshakes);
        ext(&mut self.num_kv_expired_reqs, other.num_kv_expired_reqs);
        ext(&mut self.num_notifications_after_expiry, other.num_notifications_after_expiry);
        ext(&mut self.handshake_duration, other.handshake_duration);
        ext(&mut self.held_blocks, other.held_blocks);
        ext(&mut self.num_integrity_mismatches, other.num_integrity_mismatches);
    }

    /// The observations so far, leaving this empty.
    pub fn take(&mut self) -> XferStats {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_take_and_cap() {
        let mut s = XferStats::default();
        assert!(s.is_empty());
        s.held_blocks.push(3);
        assert!(s.is_empty(), "a held-blocks sample alone is not an observation");
        s.record_transfer(0.002, 0.0001, 1 << 20, 8);
        s.record_failed_notification();
        assert!(!s.is_empty());
        let t = s.take();
        assert_eq!((t.transfer_duration.len(), t.bytes_transferred[0], t.num_descriptors[0]), (1, 1 << 20, 8));
        assert_eq!(t.num_failed_notifications, vec![1]);
        assert!(s.is_empty() && s.held_blocks.is_empty());
        for _ in 0..MAX_SAMPLES + 10 {
            s.record_failed_transfer();
        }
        assert_eq!(s.num_failed_transfers.len(), MAX_SAMPLES);
        let mut a = XferStats::default();
        a.merge(s.clone());
        a.merge(s);
        assert_eq!(a.num_failed_transfers.len(), MAX_SAMPLES);
    }
}
