//! Host copies: P-side staging (`kv_staging_blocks`) and the host buffer
//! (`kv_buffer_device="cpu"`), copied with `memcpy` for DRAM caches or through the
//! transport (CUDA) for GPU caches.
use kvbridge_core::error::Error;
use kvbridge_core::layout::MemKind;
use kvbridge_core::transport::Transport;
use kvbridge_core::wire::StageReq;
use kvbridge_core::worker::FinishedSets;

use super::WorkerDriver;
use crate::staging::StagingBuffer;

impl<T: Transport + 'static> WorkerDriver<T> {
    /// P: staging copies and `kv_integrity` digests wait for this step's `wait_for_save`
    /// (an engine may release its interpreter lock for them, and only then).
    pub fn has_staging_work(&self) -> bool {
        self.to_stage.lock().map(|v| !v.is_empty()).unwrap_or(false) || self.integrity.todo.lock().map(|v| !v.is_empty()).unwrap_or(false)
    }

    /// Pull, P with staging: copy the prefills this step completed into their slots.
    pub(crate) fn stage_now(&self) {
        let todo = match self.to_stage.lock() {
            Ok(mut v) if !v.is_empty() => std::mem::take(&mut *v),
            _ => return,
        };
        let st = self.staging.read().ok().and_then(|g| g.clone());
        for s in todo {
            let _span = tracing::debug_span!("stage", request_id = %s.req_id, blocks = s.block_ids.len()).entered();
            let t0 = std::time::Instant::now();
            let res = self.host_copy(st.as_deref(), &s, false);
            match res {
                Ok(bytes) => tracing::debug!(request_id = %s.req_id, bytes, us = t0.elapsed().as_secs_f64() * 1e6, "kvbridge: staged"),
                // Block ids come from vLLM and slots from our scheduler: an error here is
                // a bug. The slots hold stale bytes, and a READ is one-sided, so P cannot
                // stop one: the lease is ended on arrival instead, so D's heartbeats and
                // lease check report the KV gone (a READ started before that still reads
                // the stale slots).
                Err(e) => {
                    tracing::error!(request_id = %s.req_id, error = %e, "kvbridge: staging copy failed");
                    self.shared.state().core.base.refuse_lease(&s.req_id);
                }
            }
        }
    }

    /// Copy `s`'s blocks between the cache and `st` (staging or the host mirror): to the
    /// host, or back to the cache when `to_cache`. DRAM caches with `memcpy`, GPU caches
    /// through the transport (CUDA; on the engine's stream when it named one, see
    /// [`set_stream`](Self::set_stream)). Returns the bytes copied.
    fn host_copy(&self, st: Option<&StagingBuffer>, s: &StageReq, to_cache: bool) -> Result<u64, Error> {
        let st = st.ok_or_else(|| Error::Other("a host copy was ordered but no staging or host buffer is registered".into()))?;
        if st.source == MemKind::Dram {
            return if to_cache { st.restore(s) } else { st.copy(s) };
        }
        let c = st.copies(s)?;
        let bytes = c.iter().map(|x| x.2).sum();
        let mut t = self.shared.transport();
        let stream = self.stream();
        let res = if to_cache { t.copy_host_to_device(st.device, &c, stream) } else { t.copy_device_to_host(st.device, &c, stream) };
        res.map(|_| bytes).map_err(Error::from)
    }

    /// D with a host buffer: copy what finished loads read into the host mirror back to
    /// the cache, before vLLM hears the loads finished. A failed copy fails the load.
    pub(crate) fn restore_loads(&self, out: &mut FinishedSets) {
        let done = match self.host_loads.lock() {
            Ok(mut h) => h.take_finished(out),
            Err(_) => return,
        };
        if done.is_empty() {
            return;
        }
        let st = self.staging.read().ok().and_then(|g| g.clone());
        for (req, blocks) in done {
            let _span = tracing::debug_span!("host_to_cache", request_id = %req, blocks = blocks.len()).entered();
            let t0 = std::time::Instant::now();
            let s = StageReq { req_id: req.clone(), slots: blocks.clone(), block_ids: blocks };
            match self.host_copy(st.as_deref(), &s, true) {
                Ok(bytes) => {
                    tracing::debug!(request_id = %req, bytes, us = t0.elapsed().as_secs_f64() * 1e6, "kvbridge: host buffer copied to the cache")
                }
                Err(e) => {
                    tracing::error!(request_id = %req, error = %e, "kvbridge: copying the host buffer to the cache failed; the load fails");
                    out.invalid_block_ids.extend(s.block_ids);
                    out.failed_recving.push(req);
                }
            }
        }
    }
}
