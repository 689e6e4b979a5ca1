//! Hostile NIXL agent metadata through the path kvbridge loads a peer's with
//! (`Transport::add_remote`: the checks in front of `load_remote_md`, `load_remote_md`, the
//! agent-name check, `make_connection`, the warm-up READ, the peer's prepared list), over
//! real NIXL (UCX over loopback).
//!
//! A real peer agent's metadata blob is mutated (empty, truncated at every length, random
//! bit flips and byte overwrites, random bytes with and without NIXL's `nixlSerDes|` intro,
//! every length field inflated or deflated (past the end, 2^31, 2^32, 2^63, u64::MAX, and
//! values that wrap NIXL's offset arithmetic back into the blob), splices with a second
//! agent's blob at every pair of field boundaries, the agent name made invalid UTF-8,
//! NUL-bearing, empty, 64 KiB, another agent's or the loader's own) and loaded. Each load
//! must either succeed (the peer is then removed again) or return a typed error; none may
//! panic or abort, and a blob naming another agent than the handshake announced must not
//! load. Each case loads under an agent name of its own, so one that goes wrong cannot
//! spoil the next. Afterwards the same agent must still load the real blob, and a new
//! peer's, and READ their bytes exactly.
//!
//! Not mutated by default: the bytes only UCX reads (the connection info, a UCX worker
//! address, and each descriptor's packed rkey). NIXL hands them to UCX unchecked and UCX
//! aborts on malformed ones (`ucp_address_unpack` asserts on the address version;
//! `ucp_ep_rkey_unpack` segfaults), which kvbridge cannot check without reimplementing UCX's
//! formats. `KVBRIDGE_FUZZ_OPAQUE=1` mutates them too (and splices anywhere): expect an
//! abort within a few thousand cases.
//!
//! KNOWN ISSUE (NIXL 1.5.1): a blob that NIXL refuses after it has loaded the connection
//! info (in the memory section: a bad rkey, a section from another agent) leaves NIXL
//! holding the agent's backend connection, and nixl-sys only invalidates agents that
//! loaded, so that agent name cannot be loaded again by this process (each try is a typed
//! error). The test prints how many of its refused blobs did that.
//!
//! The cases run in a child process, so an abort inside NIXL or UCX fails this test with
//! the case that caused it (and its bytes) instead of taking the harness down. Seeded:
//! the seed is printed; `KVBRIDGE_FUZZ_SEED=<seed>` reruns the same cases,
//! `KVBRIDGE_FUZZ_CASES=<k>` multiplies the random cases (as in kvbridge-core's fuzz.rs),
//! and `KVBRIDGE_FUZZ_CASE=<i>` (with the seed) runs case `i` alone.
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::runtime_or_skip;
use kvbridge_core::layout::{KvLayout, MemKind, TensorInfo};
use kvbridge_core::plan::Piece;
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_core::wire::AgentMetadata;
use kvbridge_nixl::{NixlOptions, NixlTransport};

const TEST: &str = "hostile_agent_metadata_loads_or_fails_with_a_typed_error";
const BUF: usize = 1 << 16;
const INTRO: &[u8] = b"nixlSerDes|";

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn cases_multiplier() -> usize {
    std::env::var("KVBRIDGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1)
}

/// Where things are in a NIXL 1.5.1 metadata blob (`nixlSerDes|`, then fields: tag,
/// native-endian u64 length, value, `|`).
#[derive(Default)]
struct BlobLayout {
    /// Offsets of every field (its tag), and the blob's length.
    fields: Vec<usize>,
    /// Offsets of every field's length.
    lengths: Vec<usize>,
    /// Bytes only a backend (UCX) reads: the connection info (a UCX worker address) and
    /// each descriptor's metadata (a packed UCX rkey), after its address, length and device.
    opaque: Vec<std::ops::Range<usize>>,
}

impl BlobLayout {
    fn of(blob: &[u8]) -> Self {
        let mut l = BlobLayout::default();
        let mut at = INTRO.len();
        let mut field = |l: &mut BlobLayout, tag: &[u8]| -> (std::ops::Range<usize>, u64) {
            assert_eq!(&blob[at..at + tag.len()], tag, "unexpected NIXL metadata layout at {at}: {blob:?}");
            l.fields.push(at);
            let p = at + tag.len();
            let len = u64::from_ne_bytes(blob[p..p + 8].try_into().unwrap()) as usize;
            l.lengths.push(p);
            at = p + 8 + len + 1;
            let v = p + 8..p + 8 + len;
            let n = if len == 8 { u64::from_ne_bytes(blob[v.clone()].try_into().unwrap()) } else { 0 };
            (v, n)
        };
        field(&mut l, b"Agent");
        for _ in 0..field(&mut l, b"Conns").1 {
            field(&mut l, b"t");
            let c = field(&mut l, b"c").0;
            l.opaque.push(c);
        }
        field(&mut l, b"");
        for _ in 0..field(&mut l, b"nixlSecElms").1 {
            field(&mut l, b"bknd");
            field(&mut l, b"nixlDList");
            field(&mut l, b"t");
            for _ in 0..field(&mut l, b"n").1 {
                let d = field(&mut l, b"").0;
                l.opaque.push(d.start + 24..d.end);
            }
        }
        assert_eq!(at, blob.len(), "unexpected NIXL metadata layout (trailing bytes)");
        l.fields.push(at);
        l
    }

    fn is_opaque(&self, at: usize) -> bool {
        self.opaque.iter().any(|r| r.contains(&at))
    }
}

/// The byte range of the agent name (the value of the first serdes field).
fn name_range(blob: &[u8], name: &str) -> std::ops::Range<usize> {
    let p = blob.windows(name.len()).position(|w| w == name.as_bytes()).expect("the agent name is in its metadata");
    p..p + name.len()
}

/// Replace the agent name (and its length field) with `name`.
fn with_name(blob: &[u8], old: &str, name: &[u8]) -> Vec<u8> {
    let r = name_range(blob, old);
    let mut v = blob[..r.start - 8].to_vec();
    v.extend_from_slice(&(name.len() as u64).to_ne_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&blob[r.end..]);
    v
}

/// `blob` (a mutation of the peer's) with the agent name `old` turned into `new` (as long)
/// bytewise, so a flipped bit of the name stays flipped; unchanged if the name's length
/// field was mutated.
fn renamed(blob: &[u8], old: &str, new: &str) -> Vec<u8> {
    assert_eq!(old.len(), new.len());
    let at = INTRO.len() + b"Agent".len() + 8;
    let mut v = blob.to_vec();
    if v.get(at - 8..at) == Some(&(old.len() as u64).to_ne_bytes()[..]) {
        for (j, (o, n)) in old.bytes().zip(new.bytes()).enumerate() {
            if let Some(b) = v.get_mut(at + j) {
                *b ^= o ^ n;
            }
        }
    }
    v
}

fn set_u64(blob: &[u8], at: usize, value: u64) -> Vec<u8> {
    let mut v = blob.to_vec();
    v[at..at + 8].copy_from_slice(&value.to_ne_bytes());
    v
}

/// Every mutated blob, labelled. Byte flips and overwrites, splice points and length
/// fields stay out of the backend's opaque bytes unless `opaque` (see the module doc).
fn cases(rng: &mut Rng, real: &[u8], other: &[u8], name: &str, opaque: bool) -> Vec<(String, Vec<u8>)> {
    let k = cases_multiplier();
    let (lr, lo) = (BlobLayout::of(real), BlobLayout::of(other));
    let pick = |rng: &mut Rng, l: &BlobLayout, len: usize| loop {
        let at = rng.below(len);
        if opaque || !l.is_opaque(at) {
            return at;
        }
    };
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("intro only".into(), INTRO.to_vec()),
        ("the real blob twice".into(), [real, real].concat()),
        ("the other agent's blob after the real one".into(), [real, other].concat()),
    ];
    // Truncations at every length.
    for n in 0..real.len() {
        out.push((format!("truncated to {n} of {} bytes", real.len()), real[..n].to_vec()));
    }
    // Every length field inflated or deflated.
    for &p in &lr.lengths {
        let len = u64::from_ne_bytes(real[p..p + 8].try_into().unwrap());
        let after = p as u64 + 8; // NIXL's offset once the length is read
        let mut values = vec![
            0,
            len.saturating_sub(1),
            len + 1,
            len + 8,
            real.len() as u64,
            1 << 31,
            1 << 32,
            1 << 63,
            u64::MAX,
            u64::MAX - 1,
            i64::MAX as u64,
        ];
        // Lengths that wrap `offset + len + 1` to a spot inside the blob.
        for target in [0, after, p as u64, real.len() as u64 - 1, after + len / 2] {
            values.push(target.wrapping_sub(after).wrapping_sub(1));
        }
        for v in values {
            out.push((format!("length field at {p} ({len}) set to {v:#x}"), set_u64(real, p, v)));
        }
    }
    // The agent name.
    for (label, n) in [
        ("invalid UTF-8", b"\xff\xfe-peer".to_vec()),
        ("a NUL inside", format!("{}\0x", name).into_bytes()),
        ("empty", Vec::new()),
        ("64 KiB long", vec![b'a'; 64 << 10]),
        ("another agent's", b"mdfuzz-someone-else".to_vec()),
        ("the loader's own", b"mdfuzz-loader".to_vec()),
    ] {
        out.push((format!("agent name {label}"), with_name(real, name, &n)));
    }
    // Random bit flips and byte overwrites.
    for i in 0..4000 * k {
        let mut v = real.to_vec();
        let flips = 1 + rng.below(if i % 4 == 0 { 8 } else { 1 });
        let mut at = Vec::new();
        for _ in 0..flips {
            let bit = pick(rng, &lr, v.len()) * 8 + rng.below(8);
            v[bit / 8] ^= 1 << (bit % 8);
            at.push(bit);
        }
        out.push((format!("bits {at:?} flipped"), v));
    }
    for _ in 0..2000 * k {
        let mut v = real.to_vec();
        let start = pick(rng, &lr, v.len());
        let mut end = start + 1 + rng.below(16.min(v.len() - start));
        if !opaque {
            end = (start..end).find(|&j| lr.is_opaque(j)).unwrap_or(end);
        }
        let b = rng.bytes(end - start);
        v[start..end].copy_from_slice(&b);
        out.push((format!("bytes {start}..{end} overwritten"), v));
    }
    // Random bytes, with and without the intro; and splices of the two agents' blobs.
    for i in 0..300 * k {
        let n = rng.below(if i % 10 == 0 { 1 << 20 } else { 2048 });
        let mut v = if i % 2 == 0 { INTRO.to_vec() } else { Vec::new() };
        v.extend(rng.bytes(n));
        out.push((format!("{} random bytes{}", n, if i % 2 == 0 { " after the intro" } else { "" }), v));
    }
    // Splices at every pair of field boundaries (each backend value comes whole from one
    // agent: the real agent's connection with the other's memory, fields lost or repeated).
    for &a in &lr.fields {
        for &b in &lo.fields {
            out.push((format!("real[..{a}] + other[{b}..] (field boundaries)"), [&real[..a], &other[b..]].concat()));
        }
    }
    if opaque {
        for _ in 0..300 * k {
            let (a, b) = (rng.below(real.len()), rng.below(other.len()));
            out.push((format!("real[..{a}] + other[{b}..]"), [&real[..a], &other[b..]].concat()));
        }
    }
    out
}

/// A DRAM layout of one region over `buf` (16 blocks of 4 KiB).
fn layout(buf: &[u8]) -> KvLayout {
    let t = TensorInfo::opaque("l0", buf.as_ptr() as u64, &[16, 4096], &[4096, 1], 1, MemKind::Dram, 0);
    KvLayout::from_tensors(&[t], 16, 0, 1).expect("layout")
}

fn agent(name: &str, buf: &[u8]) -> (NixlTransport, AgentMetadata) {
    let mut t = NixlTransport::new(name, &NixlOptions::default()).expect("agent");
    let l = layout(buf);
    t.register(&l).expect("register");
    let md = AgentMetadata {
        engine_id: name.into(),
        agent_name: name.into(),
        tp_rank: 0,
        tp_size: 1,
        block_size: 16,
        blocks_per_logical: 1,
        regions: l.regions,
        nixl_md: t.local_metadata().expect("metadata"),
        staging_regions: vec![],
    };
    (t, md)
}

/// READ `len` bytes at `off` of the peer's buffer into ours and compare them.
fn read_and_compare(t: &mut NixlTransport, key: &str, local: &[u8], remote: &[u8], off: usize, len: usize) {
    let piece = Piece {
        local: local.as_ptr() as u64 + off as u64,
        remote: remote.as_ptr() as u64 + off as u64,
        len: len as u64,
        local_dev: 0,
        remote_dev: 0,
    };
    let x = t.read(key, &[piece], b"").expect("post a READ");
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.poll(x).expect("READ failed") == XferPoll::Pending {
        assert!(Instant::now() < deadline, "READ did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
    t.release(x);
    assert!(local[off..off + len] == remote[off..off + len], "READ bytes differ from the peer's");
}

fn hex(b: &[u8]) -> String {
    b.iter().take(4096).map(|x| format!("{x:02x}")).collect()
}

fn run_cases(seed: u64, progress: Option<&str>) {
    let t_start = Instant::now();
    let mut rng = Rng(seed);
    let peer_buf: Vec<u8> = (0..BUF).map(|i| (i * 7 + 3) as u8).collect();
    let fresh_buf: Vec<u8> = (0..BUF).map(|i| (i * 13 + 1) as u8).collect();
    let other_buf = vec![0x5au8; BUF];
    let local_buf = vec![0u8; BUF];
    let (mut local, _) = agent("mdfuzz-loader", &local_buf);
    let (_peer, peer_md) = agent("mdfuzz-peer", &peer_buf);
    let (_other, other_md) = agent("mdfuzz-other", &other_buf);
    let (_fresh, fresh_md) = agent("mdfuzz-fresh", &fresh_buf);
    // The real blob loads, reads, and unloads (the baseline the mutations start from).
    local.add_remote("peer@fuzz", &peer_md).expect("the real metadata loads");
    read_and_compare(&mut local, "peer@fuzz", &local_buf, &peer_buf, 0, 4096);
    local.remove_remote("peer@fuzz");

    let opaque = std::env::var("KVBRIDGE_FUZZ_OPAQUE").is_ok_and(|v| v == "1");
    let all = cases(&mut rng, &peer_md.nixl_md, &other_md.nixl_md, &peer_md.agent_name, opaque);
    let (mut loaded, mut by_kind, mut panics, mut misnamed) = (0usize, BTreeMap::<&str, usize>::new(), Vec::new(), Vec::new());
    let (mut poisoned, mut nixl_refused) = (Vec::new(), 0usize);
    let mut slowest = (Duration::ZERO, String::new());
    let only: Option<usize> = std::env::var("KVBRIDGE_FUZZ_CASE").ok().and_then(|v| v.parse().ok());
    for (i, (label, blob)) in all.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        // Each case under an agent name of its own (as long as the peer's, so the
        // mutations' offsets hold): a load that goes wrong cannot spoil the next case.
        // The name cases keep the peer's name: their blobs name another agent than the
        // handshake announces, and must be refused.
        let case_name = format!("mdfz{i:07}");
        let (announced, blob) = if label.starts_with("agent name") {
            (peer_md.agent_name.clone(), blob.clone())
        } else {
            (case_name.clone(), renamed(blob, &peer_md.agent_name, &case_name))
        };
        if let Some(p) = progress {
            let _ = std::fs::write(p, format!("case {i} ({label}), seed {seed}, {} bytes: {}", blob.len(), hex(&blob)));
        }
        let md = AgentMetadata { nixl_md: blob, agent_name: announced.clone(), ..peer_md.clone() };
        let t0 = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| local.add_remote("peer@fuzz", &md))) {
            Ok(Ok(())) => {
                loaded += 1;
                assert_eq!(local.remote_agent("peer@fuzz"), Some(announced.as_str()));
                local.remove_remote("peer@fuzz");
                if label.starts_with("agent name") {
                    misnamed.push(format!("case {i} ({label})"));
                }
            }
            Ok(Err(e)) => {
                *by_kind.entry(e.kind).or_default() += 1;
                if e.kind == "nixl" && announced == case_name {
                    // Can the real metadata still be loaded under this name?
                    nixl_refused += 1;
                    let real = AgentMetadata { nixl_md: renamed(&peer_md.nixl_md, &peer_md.agent_name, &case_name), ..md.clone() };
                    match local.add_remote("peer@fuzz", &real) {
                        Ok(()) => local.remove_remote("peer@fuzz"),
                        Err(_) => poisoned.push(format!("case {i} ({label}): {e}")),
                    }
                }
            }
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                panics.push(format!("case {i} ({label}): {}", msg.unwrap_or_default()));
            }
        }
        if t0.elapsed() > slowest.0 {
            slowest = (t0.elapsed(), label.clone());
        }
    }
    if !poisoned.is_empty() {
        // The KNOWN ISSUE in the module doc.
        println!(
            "metadata_fuzz: KNOWN ISSUE: {} of {nixl_refused} blobs NIXL refused left their agent name unloadable, e.g. {}",
            poisoned.len(),
            poisoned.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        );
    }
    // Still usable: the real metadata loads and a READ brings the peer's bytes, for a peer
    // never loaded before and for the peer whose blob was mutated.
    local.add_remote("fresh@fuzz", &fresh_md).expect("a new peer loads after the hostile blobs");
    read_and_compare(&mut local, "fresh@fuzz", &local_buf, &fresh_buf, 4096, 8192);
    local.add_remote("peer@fuzz", &peer_md).expect("the real metadata still loads after the hostile blobs");
    read_and_compare(&mut local, "peer@fuzz", &local_buf, &peer_buf, 4096, 8192);
    println!(
        "metadata_fuzz: seed {seed}: {} cases in {:.1} s: {loaded} loaded, refused by kind {by_kind:?}, {} panics, {} misnamed loads; \
         slowest case {:.0} ms ({}); then real loads + READs OK",
        all.len(),
        t_start.elapsed().as_secs_f64(),
        panics.len(),
        misnamed.len(),
        slowest.0.as_secs_f64() * 1e3,
        slowest.1,
    );
    assert!(panics.is_empty(), "{} loads panicked:\n{}", panics.len(), panics.join("\n"));
    assert!(misnamed.is_empty(), "blobs naming another agent than announced were loaded:\n{}", misnamed.join("\n"));
    if only.is_none() {
        assert!(by_kind.values().sum::<usize>() > all.len() / 2, "most hostile blobs must be refused: {by_kind:?}");
    }
}

#[test]
fn hostile_agent_metadata_loads_or_fails_with_a_typed_error() {
    if std::env::var("KVB_CHILD").is_ok() {
        let seed = std::env::var("KVBRIDGE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).expect("seed from the parent");
        return run_cases(seed, std::env::var("KVB_MD_FUZZ_PROGRESS").ok().as_deref());
    }
    if !runtime_or_skip() {
        return;
    }
    let seed: u64 = std::env::var("KVBRIDGE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    eprintln!("metadata_fuzz: seed {seed} (KVBRIDGE_FUZZ_SEED={seed} reruns these cases)");
    let progress = std::env::temp_dir().join(format!("kvbridge-metadata-fuzz-{}", std::process::id()));
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("KVB_CHILD", "1")
        .env("KVBRIDGE_FUZZ_SEED", seed.to_string())
        .env("KVB_MD_FUZZ_PROGRESS", &progress);
    if std::env::var_os("UCX_NET_DEVICES").is_none() {
        c.env("UCX_NET_DEVICES", "lo");
    }
    if std::env::var_os("NIXL_LOG_LEVEL").is_none() {
        c.env("NIXL_LOG_LEVEL", "FATAL"); // thousands of refused loads, each logged as an error
    }
    let st = c.status().expect("spawn the child");
    let last = std::fs::read_to_string(&progress).unwrap_or_default();
    let _ = std::fs::remove_file(&progress);
    assert!(st.success(), "the child failed ({st}; 134 = abort, 139 = segfault), last case (seed {seed}):\n{last}");
}
