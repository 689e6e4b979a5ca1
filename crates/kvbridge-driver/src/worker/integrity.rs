//! `kv_integrity`'s I/O around the core's [`kvbridge_core::integrity`]: P digests a
//! completed prefill's blocks in `wait_for_save` and serves the digests on the side
//! channel; D fetches them while it loads, digests what landed in its cache (after any
//! staging or host-buffer copy) and fails the blocks that differ before vLLM hears the
//! load finished.
//!
//! Digests are CRC-32C (SSE 4.2 / ARMv8 CRC instructions through the `crc32c` crate) of
//! each logical block, per region, read from DRAM: the cache itself, or on a GPU engine
//! the host mirror NIXL moves (`kv_buffer_device="cpu"`). A GPU cache read in place has
//! no host copy to digest; its loads are counted unverified.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use kvbridge_core::integrity::{
    self, DigestReq, DigestSet, DigestStore, DigestsRequest, Expect, IntegrityMode, RegionSig, Verdict, Verifier,
};
use kvbridge_core::layout::{KvLayout, MemKind};
use kvbridge_core::side::DigestsHandler;
use kvbridge_core::transport::Transport;
use kvbridge_core::wire::{self, ConnectorMetadata};
use kvbridge_core::worker::FinishedSets;

use super::{now_unix, WorkerDriver};

/// Counters, served in the accounting view and the stats.
#[derive(Debug, Default)]
pub struct Counters {
    /// Loads compared block by block (every compared block matched or not).
    pub verified_loads: AtomicU64,
    /// Blocks compared.
    pub checked_blocks: AtomicU64,
    /// Blocks whose bytes differed from P's.
    pub mismatched_blocks: AtomicU64,
    /// Loads failed for a mismatch.
    pub failed_loads: AtomicU64,
    /// Loads that could not be compared (no digests, layouts that differ, GPU cache).
    pub unverified_loads: AtomicU64,
    /// P: blocks digested.
    pub digested_blocks: AtomicU64,
    /// D: microseconds spent digesting and comparing landed loads (on the load's path).
    pub check_us: AtomicU64,
}

/// The driver's integrity state.
#[derive(Default)]
pub(crate) struct Integrity {
    pub mode: IntegrityMode,
    pub every: u32,
    /// The memory digests are taken over (a DRAM cache, or a GPU cache's host mirror), set
    /// at registration; `None`: nothing to digest.
    pub source: RwLock<Option<Arc<KvLayout>>>,
    pub store: Arc<Mutex<DigestStore>>,
    /// Tokens per logical block (set at registration; 0: unknown).
    pub block_tokens: AtomicU64,
    pub todo: Mutex<Vec<DigestReq>>,
    pub verifier: Mutex<Verifier>,
    pub counters: Arc<Counters>,
    /// Mismatches since the last stats collection (vLLM's one-`1`-per-event encoding).
    pub new_mismatches: AtomicU64,
    #[cfg(feature = "fault-inject")]
    pub fault: Mutex<super::fault::Faults>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The region signatures both sides compare.
pub fn sigs(l: &KvLayout) -> Vec<RegionSig> {
    l.regions.iter().map(|r| RegionSig { name: r.name.clone(), block_len: r.block_len, group: r.group }).collect()
}

/// CRC-32C of logical block `b` in each region of `l` (its kernel blocks back to back),
/// appended to `out`. `l` must be DRAM that stays mapped (the engine's cache or our mirror).
pub fn block_digests(l: &KvLayout, b: u32, out: &mut Vec<u32>) -> Result<(), String> {
    group_block_digests(l, b, None, out)
}

/// [`block_digests`] of a block of KV-cache group `group` (`None`: any): a region of
/// another group gets 0 (the block holds none of its data; under vLLM's hybrid allocator
/// the same bytes may be another group's layer, or padding never transferred).
pub fn group_block_digests(l: &KvLayout, b: u32, group: Option<u32>, out: &mut Vec<u32>) -> Result<(), String> {
    let bpl = u64::from(l.blocks_per_logical.max(1));
    for r in &l.regions {
        if group.is_some_and(|g| g != r.group) {
            out.push(0);
            continue;
        }
        let first = u64::from(b) * bpl;
        if r.mem != MemKind::Dram || first + bpl > r.num_blocks {
            return Err(format!("block {b} is not a DRAM block of region {}", r.name));
        }
        let mut crc = 0;
        for k in first..first + bpl {
            // SAFETY: `k < num_blocks` was checked; the region's blocks are `block_len`
            // bytes of registered DRAM at `block_addr(k)`, mapped while the engine runs.
            let bytes = unsafe { std::slice::from_raw_parts(r.block_addr(k) as usize as *const u8, r.block_len as usize) };
            crc = crc32c::crc32c_append(crc, bytes);
        }
        out.push(crc);
    }
    Ok(())
}

/// Digest threads at most, and the bytes below which one thread does it all.
const MAX_DIGEST_THREADS: usize = 4;
const PARALLEL_MIN_BYTES: u64 = 4 << 20;

/// [`block_digests`] of each of `blocks` (one vector per block), split over up to four
/// threads when there is enough to read (the digest is memory-bound: a lone core reads
/// about 8 GB/s here, UCX over loopback moves about 3).
pub fn digest_blocks(l: &KvLayout, blocks: &[u32]) -> Result<Vec<Vec<u32>>, String> {
    digest_group_blocks(l, blocks, None)
}

/// [`digest_blocks`] with each block's KV-cache group (`groups[i]` for `blocks[i]`; `None`:
/// every region of every block).
pub fn digest_group_blocks(l: &KvLayout, blocks: &[u32], groups: Option<&[u32]>) -> Result<Vec<Vec<u32>>, String> {
    let per_block: u64 = l.regions.iter().map(|r| r.block_len).sum::<u64>() * u64::from(l.blocks_per_logical.max(1));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (per_block * blocks.len() as u64 / PARALLEL_MIN_BYTES).clamp(1, cores.min(MAX_DIGEST_THREADS) as u64) as usize;
    let one = |start: usize, chunk: &[u32]| -> Result<Vec<Vec<u32>>, String> {
        chunk
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let mut d = Vec::with_capacity(l.regions.len());
                let g = groups.and_then(|g| g.get(start + i).copied());
                group_block_digests(l, b, g, &mut d).map(|()| d)
            })
            .collect()
    };
    if threads <= 1 {
        return one(0, blocks);
    }
    let size = blocks.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = blocks.chunks(size).enumerate().map(|(k, c)| s.spawn(move || one(k * size, c))).collect();
        let mut out = Vec::with_capacity(blocks.len());
        for h in handles {
            out.extend(h.join().map_err(|_| "a digest thread panicked".to_string())??);
        }
        Ok(out)
    })
}

impl Integrity {
    pub(crate) fn new(mode: IntegrityMode, every: u32) -> Self {
        Self { mode, every, ..Default::default() }
    }

    /// Registration: digest `cache` when it is DRAM, else `mirror` (a GPU cache's host copy).
    pub(crate) fn on_registered(&self, cache: &KvLayout, mirror: Option<&KvLayout>, block_tokens: u32) {
        self.block_tokens.store(u64::from(block_tokens), Ordering::Relaxed);
        let src = if cache.regions.iter().all(|r| r.mem == MemKind::Dram) { Some(cache) } else { mirror };
        if self.mode != IntegrityMode::Off && src.is_none() {
            tracing::warn!("kvbridge: kv_integrity needs a DRAM copy of the KV; a GPU cache read in place is not checked (use kv_buffer_device=\"cpu\")");
        }
        if let Ok(mut s) = self.source.write() {
            *s = src.map(|l| Arc::new(l.clone()));
        }
    }

    /// D: loads tracked for a check (landed or not).
    pub(crate) fn pending(&self) -> usize {
        lock(&self.verifier).len()
    }

    /// D: loads held back for their digests, and the microseconds they were held in all.
    pub(crate) fn held(&self) -> (u64, u64) {
        let (n, s) = lock(&self.verifier).held();
        (n, (s * 1e6) as u64)
    }

    fn source(&self) -> Option<Arc<KvLayout>> {
        self.source.read().ok().and_then(|g| g.clone())
    }

    /// P: the digest set of one completed prefill.
    fn digest(&self, l: &KvLayout, tp_size: u32, d: &DigestReq) -> DigestSet {
        let checked = integrity::chosen(self.mode, &d.key, d.block_ids.len(), self.every);
        let Some(blocks) = checked.iter().map(|&i| d.block_ids.get(i).copied()).collect::<Option<Vec<u32>>>() else {
            return DigestSet::missing("block index out of range");
        };
        // Several KV-cache groups: each block is digested in its own group's regions.
        let lens = DigestSet { group_lens: d.group_lens.clone(), ..Default::default() };
        let groups: Option<Vec<u32>> = (!d.group_lens.is_empty()).then(|| checked.iter().map(|&i| lens.group_of(i as u32)).collect());
        let digests: Vec<u32> = match digest_group_blocks(l, &blocks, groups.as_deref()) {
            Ok(v) => v.into_iter().flatten().collect(),
            Err(e) => return DigestSet::missing(e),
        };
        if digests.len() > integrity::MAX_DIGESTS {
            return DigestSet::missing("too many blocks to digest");
        }
        self.counters.digested_blocks.fetch_add(checked.len() as u64, Ordering::Relaxed);
        DigestSet {
            missing: None,
            tp_size,
            blocks_per_logical: l.blocks_per_logical,
            regions: sigs(l),
            offered: d.offered.clone(),
            checked: checked.iter().map(|&i| i as u32).collect(),
            digests,
            group_lens: d.group_lens.clone(),
        }
    }
}

impl<T: Transport + 'static> WorkerDriver<T> {
    /// P: digest the prefills this step completed (after the forward, in `wait_for_save`),
    /// kept for twice the lease.
    pub(crate) fn digest_now(&self) {
        let todo = std::mem::take(&mut *lock(&self.integrity.todo));
        if todo.is_empty() {
            return;
        }
        let src = self.integrity.source();
        let expiry = now_unix() + 2.0 * self.cfg.kv_lease_duration.as_secs_f64();
        for d in todo {
            let t0 = std::time::Instant::now();
            let set = match &src {
                Some(l) => self.integrity.digest(l, self.cfg.tp_size, &d),
                None => DigestSet::missing("this engine's KV cache is not in DRAM (no digests)"),
            };
            tracing::debug!(key = %d.key, blocks = set.checked.len(), us = t0.elapsed().as_secs_f64() * 1e6, missing = ?set.missing, "kvbridge: digested");
            lock(&self.integrity.store).insert(d.key, set, expiry);
        }
    }

    /// P: serve digest sets on the side channel.
    pub(crate) fn digests_handler(&self) -> DigestsHandler {
        let store = self.integrity.store.clone();
        Arc::new(move |r: &DigestsRequest| lock(&store).get(&r.key, now_unix()))
    }

    /// Queue a step's digest orders (P) and remember the loads to verify (D); pull loads'
    /// digests are fetched now, while the READ runs.
    pub(crate) fn integrity_metadata(&self, md: &mut ConnectorMetadata) {
        let orders = std::mem::take(&mut md.digest);
        if !orders.is_empty() {
            lock(&self.integrity.todo).extend(orders);
        }
        if self.integrity.mode == IntegrityMode::Off || !self.cfg.role.can_consume() {
            return;
        }
        if md.reqs_to_recv.is_empty() && md.push_register.is_empty() {
            return; // most steps
        }
        let rank = self.cfg.tp_rank;
        // Groups whose lists hold only their last blocks (sliding windows, states).
        let clipped: Vec<bool> = self.cfg.compat.clips().iter().map(|c| *c != kvbridge_core::groups::Clip::All).collect();
        let port_of = |base: u16| u16::try_from(rank).ok().and_then(|r| base.checked_add(r));
        let mut fetch = Vec::new();
        let (now, forget) = (now_unix(), 4.0 * self.cfg.kv_lease_duration.as_secs_f64() + 60.0);
        {
            let mut v = lock(&self.integrity.verifier);
            for r in md.reqs_to_recv.iter().filter(|r| !r.notify_only) {
                let ((local, group_lens), (offered, _)) = (flat(&r.local_block_ids), flat(&r.remote.block_ids));
                let Some(port) = port_of(r.remote.port) else {
                    self.integrity.counters.unverified_loads.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if r.remote.tp_size != self.cfg.tp_size {
                    self.integrity.counters.unverified_loads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let e = Expect {
                    key: r.remote.request_id.clone(),
                    local,
                    num_tokens: r.num_tokens,
                    offered: Some(offered),
                    host: r.remote.host.clone(),
                    port,
                    group_lens,
                    clipped: clipped.clone(),
                };
                // Pipeline stages: which P rank holds this stage's layers is known once
                // the peer is handshaken, so the digests are fetched when the load lands.
                let now_fetch = self.cfg.pp_size <= 1;
                v.expect(&r.req_id, e.clone(), now_fetch, now, forget);
                if now_fetch {
                    fetch.push((r.req_id.clone(), e));
                }
            }
            for r in md.push_register.iter().filter(|r| !r.notify_only) {
                let (local, group_lens) = flat(&r.local_block_ids);
                let Some(port) = port_of(r.port) else {
                    self.integrity.counters.unverified_loads.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if r.tp_size != self.cfg.tp_size {
                    self.integrity.counters.unverified_loads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // P digests at the end of its prefill, which may not have run yet: fetched
                // once the writes have landed.
                let key = integrity::push_key(&r.transfer_id, wire::base_request_id(&r.req_id));
                v.expect(
                    &r.req_id,
                    Expect {
                        key,
                        local,
                        num_tokens: r.num_tokens,
                        offered: None,
                        host: r.host.clone(),
                        port,
                        group_lens,
                        clipped: clipped.clone(),
                    },
                    false,
                    now,
                    forget,
                );
            }
        }
        for (req, e) in fetch {
            self.fetch_digests(req, &e);
        }
    }

    fn fetch_digests(&self, req: String, e: &Expect) {
        let me = Arc::downgrade(&self.integrity);
        self.side.digests(e.host.clone(), e.port, DigestsRequest { key: e.key.clone() }, self.cfg.handshake_timeout, move |res| {
            let set = res.unwrap_or_else(|e| DigestSet::missing(format!("fetching digests failed: {e}")));
            if let Some(i) = me.upgrade() {
                lock(&i.verifier).on_reply(&req, set);
            }
        });
    }

    /// D: hold back loads that landed before their digests, compare the others, and turn
    /// mismatches into failed loads with their blocks invalid.
    pub(crate) fn verify_loads(&self, out: &mut FinishedSets) {
        if self.integrity.mode == IntegrityMode::Off {
            return;
        }
        let now = now_unix();
        let wait = self.cfg.handshake_timeout.as_secs_f64() * 2.0;
        let (mut ready, fetch) = {
            let mut v = lock(&self.integrity.verifier);
            if v.is_empty() {
                return;
            }
            let mut r = v.on_finished(out, now, wait);
            r.extend(v.poll(now));
            (r, v.take_unfetched_landed())
        };
        for (req, mut e) in fetch {
            if self.cfg.pp_size > 1 && e.offered.is_some() {
                // A pull load under pipeline parallelism: its P rank, if comparable.
                let src = self.shared.state().core.digest_source(&e.host, e.port, self.cfg.pp_rank, self.cfg.tp_rank);
                let Some((host, port)) = src else {
                    let why = "P's pipeline stages or TP ranks hold other layers or heads than this D rank: not comparable";
                    lock(&self.integrity.verifier).on_reply(&req, DigestSet::missing(why));
                    continue;
                };
                (e.host, e.port) = (host, port);
            }
            self.fetch_digests(req, &e);
        }
        for (req, e, set) in ready.drain(..) {
            self.check(req, &e, &set, out);
        }
    }

    fn check(&self, req: String, e: &Expect, set: &DigestSet, out: &mut FinishedSets) {
        let c = &self.integrity.counters;
        let Some(l) = self.integrity.source() else {
            c.unverified_loads.fetch_add(1, Ordering::Relaxed);
            return;
        };
        #[cfg(feature = "fault-inject")]
        lock(&self.integrity.fault).inject(&l, &req, &e.local);
        let t0 = std::time::Instant::now();
        let mut compared = 0;
        let verdict = match integrity::pairs(
            e,
            set,
            &sigs(&l),
            l.blocks_per_logical,
            self.cfg.tp_size,
            self.integrity.block_tokens.load(Ordering::Relaxed),
        ) {
            Err(why) => Verdict::Unverified(why),
            Ok(pairs) => {
                // Null blocks on either side are never transferred.
                let null = |b: Option<u32>| b.is_some() && b == self.cfg.null_block_id;
                let offered = |row: usize| set.checked.get(row).and_then(|&i| set.offered.get(i as usize).copied());
                let pairs: Vec<(u32, usize)> = pairs.into_iter().filter(|&(b, row)| !null(Some(b)) && !null(offered(row))).collect();
                let blocks: Vec<u32> = pairs.iter().map(|p| p.0).collect();
                let groups: Option<Vec<u32>> = (!set.group_lens.is_empty())
                    .then(|| pairs.iter().map(|&(_, row)| set.group_of(set.checked.get(row).copied().unwrap_or(0))).collect());
                compared = blocks.len();
                match digest_group_blocks(&l, &blocks, groups.as_deref()) {
                    Err(e) => Verdict::Unverified(e),
                    Ok(got) => integrity::compare(set, &pairs, &got),
                }
            }
        };
        c.check_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        if !out.recving.contains(&req) {
            out.recving.push(req.clone());
        }
        match verdict {
            Verdict::Pass { blocks } => {
                c.verified_loads.fetch_add(1, Ordering::Relaxed);
                c.checked_blocks.fetch_add(blocks as u64, Ordering::Relaxed);
            }
            Verdict::Unverified(why) => {
                c.unverified_loads.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(request_id = %req, key = %e.key, reason = %why, "kvbridge: load not verified (kv_integrity)");
            }
            Verdict::Mismatch(bad) => {
                c.verified_loads.fetch_add(1, Ordering::Relaxed);
                c.checked_blocks.fetch_add(compared as u64, Ordering::Relaxed);
                c.mismatched_blocks.fetch_add(bad.len() as u64, Ordering::Relaxed);
                c.failed_loads.fetch_add(1, Ordering::Relaxed);
                self.integrity.new_mismatches.fetch_add(bad.len() as u64, Ordering::Relaxed);
                if let Some(m) = bad.first() {
                    tracing::error!(request_id = %req, remote_request = %e.key, block = m.local_block, remote_index = m.index,
                        region = %m.region, expected = format_args!("{:08x}", m.expected), got = format_args!("{:08x}", m.got),
                        bad_blocks = bad.len(), "kvbridge: KV integrity mismatch; the load fails (kv_load_failure_policy)");
                }
                out.invalid_block_ids.extend(bad.iter().map(|m| m.local_block));
                if !out.failed_recving.contains(&req) {
                    out.failed_recving.push(req);
                }
            }
        }
    }

    /// D: loads that landed and wait for their digests.
    pub(crate) fn verifying(&self) -> usize {
        lock(&self.integrity.verifier).waiting()
    }

    /// D: loads tracked for a check (landed or not).
    pub fn integrity_pending(&self) -> usize {
        self.integrity.pending()
    }

    /// The integrity counters (accounting view, tests).
    pub fn integrity_counters(&self) -> &Counters {
        &self.integrity.counters
    }
}

/// A request's block lists as one list, with each KV-cache group's length (none for one
/// group).
fn flat(groups: &[Vec<u32>]) -> (Vec<u32>, Vec<u32>) {
    match groups {
        [g] => (g.clone(), Vec::new()),
        _ => (groups.concat(), groups.iter().map(|g| u32::try_from(g.len()).unwrap_or(u32::MAX)).collect()),
    }
}
