//! End-to-end KV integrity (`kv_integrity`), sans-IO.
//!
//! P digests each block of a finished prefill, per region, after the forward that computed
//! it (the worker's `wait_for_save`, ordered by the scheduler as [`DigestReq`]) and keeps
//! the digests in a [`DigestStore`] for a while, by request. D asks P's rank for them over
//! the side channel ([`DigestsRequest`]) while it loads, digests what landed in its own
//! cache (after any staging or host-buffer copy) and compares ([`Verifier`], [`compare`])
//! before it reports the load finished. A mismatch fails the load with the bad blocks
//! invalid, so vLLM fails or recomputes the request (`kv_load_failure_policy`).
//!
//! What is compared: P's block `i` of the request (its `i`-th block id, in prompt order)
//! against the D block paired with it (D loads the tail of P's blocks), region by region,
//! when both sides cut the cache the same way (same regions, block lengths, kernel blocks
//! per block and TP size). Otherwise the load is counted *unverified*: layouts that differ
//! put different bytes in a block on each side (see `docs/reliability.md`).
//!
//! The digest function (CRC-32C) and the memory reads are the driver's.
use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::worker::FinishedSets;

/// `kv_integrity`: which blocks are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IntegrityMode {
    /// Nothing is digested or checked.
    Off,
    /// One block in `kv_integrity_sample_every` per request (at least one), chosen from the
    /// request id so P digests only those.
    #[default]
    Sampled,
    /// Every block.
    Full,
}

impl IntegrityMode {
    /// Parse `off` | `sampled` | `full`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "sampled" => Some(Self::Sampled),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Sampled => "sampled",
            Self::Full => "full",
        }
    }
}

/// Default `kv_integrity_sample_every`: `sampled` checks one block in this many.
pub const DEFAULT_SAMPLE_EVERY: u32 = 8;
/// Digest sets a P rank keeps at most (the oldest go first).
pub const MAX_STORED: usize = 8192;
/// Digests one reply may carry (blocks x regions): past this P answers "too large" and D
/// counts the load unverified.
pub const MAX_DIGESTS: usize = 1 << 20;

/// The indices of a request's `n` blocks to digest under `mode`.
pub fn chosen(mode: IntegrityMode, key: &str, n: usize, every: u32) -> Vec<usize> {
    match mode {
        IntegrityMode::Off => Vec::new(),
        IntegrityMode::Full => (0..n).collect(),
        IntegrityMode::Sampled => {
            let every = every.max(1) as usize;
            // FNV-1a of the key: the same request starts at the same block on every rank.
            let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
            let start = (h % every as u64) as usize;
            let mut v: Vec<usize> = (start..n).step_by(every).collect();
            if v.is_empty() && n > 0 {
                v.push(n - 1);
            }
            v
        }
    }
}

/// The store key of a push-mode request: its transfer id, else the base request id (how
/// P matches D's registrations).
pub fn push_key(transfer_id: &str, base_request_id: &str) -> String {
    if transfer_id.is_empty() {
        format!("push:{base_request_id}")
    } else {
        format!("push:{transfer_id}")
    }
}

/// P's scheduler → worker: digest these blocks after this step's forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestReq {
    /// The store key: P's request id (pull) or [`push_key`] (push).
    pub key: String,
    /// The request's block ids in prompt order (what the forward wrote).
    pub block_ids: Vec<u32>,
    /// The ids D is told to read, one per block (staging slots when staged; else the
    /// block ids).
    pub offered: Vec<u32>,
    /// Several KV-cache groups: how many of `block_ids` (and `offered`) each group holds,
    /// in order; empty for one group. A block is digested in its own group's regions only.
    #[serde(default)]
    pub group_lens: Vec<u32>,
}

/// One region as both sides must cut it for block digests to be comparable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSig {
    /// The region's name (layer, `.k`/`.v`).
    pub name: String,
    /// Bytes per kernel block.
    pub block_len: u64,
    /// The KV-cache group whose blocks the region holds.
    #[serde(default)]
    pub group: u32,
}

/// D → P: the digests of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestsRequest {
    /// The store key ([`DigestReq::key`]).
    pub key: String,
}

/// P → D: what P digested for a request, or why nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestSet {
    /// Why there is nothing to compare (integrity off on P, unknown or expired request,
    /// too large); `None` when the fields below hold digests.
    pub missing: Option<String>,
    /// P's TP size.
    pub tp_size: u32,
    /// Kernel blocks per logical block on P.
    pub blocks_per_logical: u32,
    /// P's regions, in order.
    pub regions: Vec<RegionSig>,
    /// The ids D was told to read ([`DigestReq::offered`]), in prompt order.
    pub offered: Vec<u32>,
    /// Indices into `offered` that were digested, ascending.
    pub checked: Vec<u32>,
    /// `checked.len() * regions.len()` CRC-32C values, block-major; 0 for a region of
    /// another group than the block's.
    pub digests: Vec<u32>,
    /// [`DigestReq::group_lens`]: `offered` split by KV-cache group (empty: one group).
    #[serde(default)]
    pub group_lens: Vec<u32>,
}

impl DigestSet {
    /// A reply saying why there are no digests.
    pub fn missing(why: impl Into<String>) -> Self {
        Self { missing: Some(why.into()), ..Default::default() }
    }
}

/// P: the digest sets of recent requests, kept until D fetched them from every rank that
/// needs them, or `ttl` passed.
#[derive(Debug, Default)]
pub struct DigestStore {
    sets: HashMap<String, (DigestSet, f64)>,
    order: VecDeque<String>,
}

impl DigestStore {
    /// Keep `set` under `key` until `expiry_unix`.
    pub fn insert(&mut self, key: String, set: DigestSet, expiry_unix: f64) {
        if self.sets.insert(key.clone(), (set, expiry_unix)).is_none() {
            self.order.push_back(key);
        }
        while self.sets.len() > MAX_STORED {
            match self.order.pop_front() {
                Some(k) => {
                    self.sets.remove(&k);
                }
                None => break,
            }
        }
    }

    /// The set under `key`, or why there is none.
    pub fn get(&mut self, key: &str, now_unix: f64) -> DigestSet {
        self.expire(now_unix);
        match self.sets.get(key) {
            Some((s, _)) => s.clone(),
            None => DigestSet::missing(format!("no digests for {key:?} (unknown, expired or not a producing request)")),
        }
    }

    /// Drop sets past their expiry.
    pub fn expire(&mut self, now_unix: f64) {
        while let Some(k) = self.order.front() {
            match self.sets.get(k) {
                Some((_, e)) if *e > now_unix => break,
                _ => {
                    if let Some(k) = self.order.pop_front() {
                        self.sets.remove(&k);
                    }
                }
            }
        }
    }

    /// Sets held.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// No set held.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

/// D: one load to verify once it has landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The store key to fetch.
    pub key: String,
    /// D's blocks, in prompt order: the tail of the P blocks the prompt uses.
    pub local: Vec<u32>,
    /// The prompt's tokens (P's blocks past them are not part of the load).
    pub num_tokens: u64,
    /// Pull: the ids P offered (checked against the digest set's). Push: unknown.
    pub offered: Option<Vec<u32>>,
    /// Several KV-cache groups: how many of `local` each group holds (empty: one group),
    /// and whether the group's lists are cut to their end (a sliding window, a state).
    pub group_lens: Vec<u32>,
    /// Per group: its lists hold only their last blocks (both sides cut them the same way).
    pub clipped: Vec<bool>,
    /// P's side-channel host and this rank's P port.
    pub host: String,
    /// The P rank's side-channel port.
    pub port: u16,
}

/// A block whose bytes differ from P's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// D's block id.
    pub local_block: u32,
    /// The block's index in P's list (prompt order).
    pub index: u32,
    /// The region where it differs (the first one).
    pub region: String,
    /// P's digest.
    pub expected: u32,
    /// D's digest of what landed.
    pub got: u32,
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every compared block matched.
    Pass {
        /// Blocks compared.
        blocks: usize,
    },
    /// These blocks differ.
    Mismatch(Vec<Mismatch>),
    /// Nothing could be compared, and why.
    Unverified(String),
}

/// The `(local block, digest row)` pairs to compare for `e` against `set`, given D's own
/// regions, kernel blocks per block, TP size and tokens per block (0: unknown), or why none
/// can be. D's blocks pair with the tail of the P blocks the prompt uses, as the load does.
pub fn pairs(
    e: &Expect,
    set: &DigestSet,
    local: &[RegionSig],
    local_bpl: u32,
    local_tp: u32,
    block_tokens: u64,
) -> Result<Vec<(u32, usize)>, String> {
    if let Some(why) = &set.missing {
        return Err(why.clone());
    }
    if set.tp_size != local_tp || set.blocks_per_logical != local_bpl || set.regions != local {
        return Err("P and D cut the cache differently (TP, block or region geometry): block digests are not comparable".into());
    }
    if set.digests.len() != set.checked.len() * set.regions.len() {
        return Err("malformed digest set".into());
    }
    if let Some(o) = &e.offered {
        if *o != set.offered {
            return Err(format!("P digested blocks {:?} but offered {:?}", set.offered, o));
        }
    }
    if set.group_lens.len() > 1 || e.group_lens.len() > 1 {
        return group_pairs(e, set, block_tokens);
    }
    let n = match block_tokens {
        0 => set.offered.len(),
        bt => set.offered.len().min(usize::try_from(e.num_tokens.div_ceil(bt)).unwrap_or(usize::MAX)),
    };
    let Some(skip) = n.checked_sub(e.local.len()) else {
        return Err(format!("{} local blocks for {n} remote ones", e.local.len()));
    };
    let mut out = Vec::new();
    for (row, &i) in set.checked.iter().enumerate() {
        if let Some(k) = (i as usize).checked_sub(skip) {
            if let Some(&b) = e.local.get(k) {
                out.push((b, row));
            }
        }
    }
    Ok(out)
}

/// [`pairs`] for several KV-cache groups: group by group, D's blocks pair with the tail of
/// P's (a full group: of the blocks the prompt uses; a cut one: of what P offered).
fn group_pairs(e: &Expect, set: &DigestSet, block_tokens: u64) -> Result<Vec<(u32, usize)>, String> {
    let (pl, dl) = (&set.group_lens, &e.group_lens);
    let sum = |v: &[u32]| v.iter().map(|&n| n as usize).sum::<usize>();
    if pl.len() != dl.len() || sum(pl) != set.offered.len() || sum(dl) != e.local.len() {
        return Err(format!("KV-cache groups differ: P offered {pl:?}, D loads {dl:?}"));
    }
    // Per group: where its part starts in P's list and in D's, and how many of P's leading
    // blocks D does not load.
    let mut spans = Vec::with_capacity(pl.len());
    let (mut p0, mut d0) = (0usize, 0usize);
    for (g, (&np, &nd)) in pl.iter().zip(dl).enumerate() {
        let (np, nd) = (np as usize, nd as usize);
        let used = match (e.clipped.get(g).copied().unwrap_or(false), block_tokens) {
            (true, _) | (false, 0) => np,
            (false, bt) => np.min(usize::try_from(e.num_tokens.div_ceil(bt)).unwrap_or(usize::MAX)),
        };
        let Some(skip) = used.checked_sub(nd) else {
            return Err(format!("group {g}: {nd} local blocks for {used} remote ones"));
        };
        spans.push((p0, np, d0, nd, skip));
        p0 += np;
        d0 += nd;
    }
    let mut out = Vec::new();
    for (row, &i) in set.checked.iter().enumerate() {
        let i = i as usize;
        let Some(&(p0, _, d0, nd, skip)) = spans.iter().find(|(p0, np, ..)| i >= *p0 && i < p0 + np) else { continue };
        match (i - p0).checked_sub(skip) {
            Some(k) if k < nd => {
                if let Some(&b) = e.local.get(d0 + k) {
                    out.push((b, row));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

impl DigestSet {
    /// The KV-cache group of `offered[index]` (0 with one group).
    pub fn group_of(&self, index: u32) -> u32 {
        let mut end = 0u64;
        for (g, &n) in self.group_lens.iter().enumerate() {
            end += u64::from(n);
            if u64::from(index) < end {
                return g as u32;
            }
        }
        0
    }
}

/// Compare D's digests (`got[j]`: the regions of `pairs[j]`'s block) with P's.
pub fn compare(set: &DigestSet, pairs: &[(u32, usize)], got: &[Vec<u32>]) -> Verdict {
    let nr = set.regions.len();
    let mut bad = Vec::new();
    for (&(b, row), g) in pairs.iter().zip(got) {
        let want = set.digests.get(row * nr..(row + 1) * nr).unwrap_or(&[]);
        if let Some((r, (w, d))) = want.iter().zip(g).enumerate().find(|(_, (w, d))| w != d) {
            bad.push(Mismatch {
                local_block: b,
                index: set.checked.get(row).copied().unwrap_or(0),
                region: set.regions.get(r).map(|x| x.name.clone()).unwrap_or_default(),
                expected: *w,
                got: *d,
            });
        }
    }
    if bad.is_empty() {
        Verdict::Pass { blocks: pairs.len() }
    } else {
        Verdict::Mismatch(bad)
    }
}

#[derive(Debug)]
struct Pending {
    expect: Expect,
    reply: Option<DigestSet>,
    /// The load landed (reported by the transport) and waits for the reply.
    landed: bool,
    /// P was asked for the digests.
    fetched: bool,
    /// Before it lands: when to forget it. Once landed: when to report it unverified.
    deadline: f64,
    /// When it landed and was held back for its digests (unix seconds; 0: not held).
    held_since: f64,
}

/// D: the loads to verify, by request: what to fetch, the replies, and the loads that
/// landed before their reply.
#[derive(Debug, Default)]
pub struct Verifier {
    pending: HashMap<String, Pending>,
    /// Loads held back from vLLM for their digests, and the seconds they were held.
    held: (u64, f64),
}

/// A landed load with its digests, ready to be compared.
pub type Ready = (String, Expect, DigestSet);

impl Verifier {
    /// Verify `req`'s load; its digests are fetched (by the driver) from now on, and a load
    /// that lands is held back from vLLM until they arrive (or the wait given to
    /// [`on_finished`](Self::on_finished) passes).
    /// `fetched`: the driver asked P already (else it does once the load lands, see
    /// [`take_unfetched_landed`](Self::take_unfetched_landed)).
    /// An entry whose load never lands (a request failed or aborted where no finished
    /// set names it) is dropped after `forget_after` seconds from `now_unix`.
    pub fn expect(&mut self, req: &str, e: Expect, fetched: bool, now_unix: f64, forget_after: f64) {
        let p = Pending { expect: e, reply: None, landed: false, fetched, deadline: now_unix + forget_after, held_since: 0.0 };
        self.pending.insert(req.to_string(), p);
    }

    /// Landed loads whose digests were not asked for yet (push: P digests at the end of
    /// its prefill, which may follow D's registration): marked asked.
    pub fn take_unfetched_landed(&mut self) -> Vec<(String, Expect)> {
        let mut out = Vec::new();
        for (r, p) in self.pending.iter_mut().filter(|(_, p)| p.landed && !p.fetched) {
            p.fetched = true;
            out.push((r.clone(), p.expect.clone()));
        }
        out
    }

    /// P's answer (an error becomes a `missing` set).
    pub fn on_reply(&mut self, req: &str, set: DigestSet) {
        if let Some(p) = self.pending.get_mut(req) {
            p.reply = Some(set);
        }
    }

    /// Take from `out` the landed loads this verifier holds: those with digests are
    /// returned to compare now; the others are removed from `out.recving` until their
    /// reply arrives ([`poll`](Self::poll)), for at most `wait` seconds from `now_unix`.
    /// Failed or aborted loads are forgotten.
    pub fn on_finished(&mut self, out: &mut FinishedSets, now_unix: f64, wait: f64) -> Vec<Ready> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        for r in out.failed_recving.iter().chain(&out.sending) {
            self.pending.remove(r);
        }
        let mut ready = Vec::new();
        let mut keep = Vec::with_capacity(out.recving.len());
        for r in out.recving.drain(..) {
            match self.pending.get_mut(&r) {
                Some(p) if p.reply.is_none() => {
                    p.landed = true;
                    p.deadline = now_unix + wait;
                    p.held_since = now_unix;
                }
                Some(_) => {
                    if let Some(p) = self.pending.remove(&r) {
                        ready.push((r.clone(), p.expect, p.reply.unwrap_or_default()));
                    }
                    keep.push(r);
                }
                None => keep.push(r),
            }
        }
        out.recving = keep;
        ready
    }

    /// Landed loads whose reply came since, or whose deadline passed (with a `missing`
    /// set): to compare and report now.
    pub fn poll(&mut self, now_unix: f64) -> Vec<Ready> {
        self.pending.retain(|_, p| p.landed || now_unix <= p.deadline);
        let due: Vec<String> =
            self.pending.iter().filter(|(_, p)| p.landed && (p.reply.is_some() || now_unix > p.deadline)).map(|(r, _)| r.clone()).collect();
        due.into_iter()
            .filter_map(|r| {
                let p = self.pending.remove(&r)?;
                self.held.0 += 1;
                self.held.1 += (now_unix - p.held_since).max(0.0);
                let set = p.reply.unwrap_or_else(|| DigestSet::missing("P's digests did not arrive in time"));
                Some((r, p.expect, set))
            })
            .collect()
    }

    /// Forget a load (aborted, or failed before it landed).
    pub fn forget(&mut self, req: &str) {
        self.pending.remove(req);
    }

    /// Loads that landed before their digests and were held back from vLLM until they
    /// came (or their wait passed), and the seconds they were held in all.
    pub fn held(&self) -> (u64, f64) {
        self.held
    }

    /// Landed loads waiting for their digests.
    pub fn waiting(&self) -> usize {
        self.pending.values().filter(|p| p.landed).count()
    }

    /// Loads tracked.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// No load tracked.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
#[path = "integrity_tests.rs"]
mod tests;
