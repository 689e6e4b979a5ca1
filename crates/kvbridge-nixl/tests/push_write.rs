//! Push mode's data path over real NIXL (UCX over loopback, DRAM): D ranks register
//! their blocks with P, P's [`PushSender`] matches them with its finished request (in
//! either order), P plans each write from D's advertised layout (TP 1 → 2, block 32 →
//! 16, HND → NHD), WRITEs with a notification, and each D rank's [`PushReceiver`] sees
//! the request finished. D's caches must then hold P's KV byte-exact, P must free its
//! blocks only after the last write, and a write that cannot be posted must fail D's
//! request through a notification instead of leaving D waiting.
use std::time::{Duration, Instant};

mod common;
use common::runtime_or_skip;
use kvbridge_core::plan::{GroupBlocks, Piece, TransferPlan};
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec, NULL_BLOCK};
use kvbridge_core::transport::{Transport, XferPoll};
use kvbridge_core::wire::{AgentMetadata, Notif, PushRegistration, WIRE_VERSION};
use kvbridge_core::worker::push::{PushAction, PushReceiver, PushSender};
use kvbridge_nixl::{NixlOptions, NixlTransport};

const TOKENS: u64 = 150;

fn spec(tp: u32, block: u32, layout: CacheLayout) -> Spec {
    Spec { tp_size: tp, ..Spec::dense(2, 4, 64, block, 32, layout) }
}

struct Rig {
    s: Scenario,
    p: NixlTransport,
    p_md: AgentMetadata,
    d: Vec<NixlTransport>,
    d_md: Vec<AgentMetadata>,
}

fn rig(tag: &str) -> Rig {
    let opts = NixlOptions::default();
    let p_blocks = vec![(1..=TOKENS.div_ceil(32) as u32).collect::<Vec<_>>()];
    let d_blocks = vec![(5..5 + TOKENS.div_ceil(16) as u32).rev().collect::<Vec<_>>()];
    let s = Scenario::new(&spec(1, 32, CacheLayout::Hnd), &spec(2, 16, CacheLayout::Nhd), p_blocks, d_blocks, TOKENS);
    let name = format!("{tag}-p0");
    let mut p = NixlTransport::new(&name, &opts).expect("P agent");
    p.register(&s.p[0].layout()).expect("register P");
    let mut p_md = s.p_metadata(0, p.local_metadata().expect("P md"));
    p_md.agent_name = name;
    let (mut d, mut d_md) = (Vec::new(), Vec::new());
    for r in 0..s.d.len() {
        let name = format!("{tag}-d{r}");
        let mut t = NixlTransport::new(&name, &opts).expect("D agent");
        t.register(&s.d[r].layout()).expect("register D");
        let mut md = s.d_metadata(r, t.local_metadata().expect("D md"));
        md.agent_name = name;
        p.add_remote(&format!("D#{r}"), &md).expect("P loads D");
        d.push(t);
        d_md.push(md);
    }
    Rig { s, p, p_md, d, d_md }
}

fn registration(rig: &Rig, rank: usize) -> PushRegistration {
    PushRegistration {
        version: WIRE_VERSION,
        transfer_id: "xfer-1".into(),
        request_id: "d-req".into(),
        target_engine_id: "P".into(),
        engine_id: "D".into(),
        host: "127.0.0.1".into(),
        port: 1,
        tp_size: rig.s.d.len() as u32,
        tp_rank: rank as u32,
        block_ids: rig.s.d_blocks.clone(),
        num_tokens: TOKENS,
    }
}

fn notif(ok: bool) -> Vec<u8> {
    Notif { version: WIRE_VERSION, request_id: "d-req".into(), from_engine: "P".into(), from_tp_rank: 0, ok, expected: 1 }
        .to_bytes()
        .unwrap()
}

/// P's side of one Write action: plan from D's layout, swap the READ pieces into WRITEs.
fn write_pieces(rig: &Rig, a: &PushAction) -> (usize, Vec<Piece>) {
    let PushAction::Write { p_blocks, num_tokens, reg, .. } = a else { panic!("expected a write, got {a:?}") };
    let d = &rig.d_md[reg.tp_rank as usize];
    let plan = TransferPlan::build(&d.layout(), reg.tp_size, reg.tp_rank, d.block_size, std::slice::from_ref(&rig.p_md), Some(NULL_BLOCK))
        .expect("plan");
    let groups: Vec<GroupBlocks<'_>> =
        reg.block_ids.iter().zip(p_blocks).map(|(l, r)| GroupBlocks { local: l.as_slice(), remote: r.as_slice() }).collect();
    let t = plan.transfer(&groups, *num_tokens, true).expect("transfer");
    let pieces = t.reads.iter().filter(|x| x.remote_rank == 0).flat_map(|x| x.pieces.iter().map(|p| p.swapped())).collect();
    (reg.tp_rank as usize, pieces)
}

fn wait(t: &mut NixlTransport, x: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.poll(x).expect("write failed") == XferPoll::Pending {
        assert!(Instant::now() < deadline, "WRITE did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
    t.release(x);
}

/// Drain D rank notifications into its receiver until it reports something.
fn receive(t: &mut NixlTransport, rx: &mut PushReceiver) -> (Vec<String>, Vec<(String, String)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in t.take_notifs().expect("notifs") {
            assert!(rx.on_notif(&Notif::from_bytes(&n).expect("notif")));
        }
        let got = rx.take();
        if !got.0.is_empty() || !got.1.is_empty() || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn run(tag: &str, registrations_first: bool) {
    let mut rig = rig(tag);
    let mut tx = PushSender::new("P".into(), 60.0);
    let mut rx: Vec<PushReceiver> = (0..rig.d.len()).map(|_| PushReceiver::default()).collect();
    let mut actions = Vec::new();
    let p_blocks = rig.s.p_blocks.clone();
    if !registrations_first {
        actions.extend(tx.on_finished("p-req", "xfer-1", p_blocks.clone(), TOKENS, 1e12, 2));
    }
    for (r, rx) in rx.iter_mut().enumerate() {
        rx.on_registered("d-req", 1, 1e12);
        actions.extend(tx.on_registration(registration(&rig, r), 0.0).expect("registration accepted"));
    }
    if registrations_first {
        assert!(actions.is_empty(), "nothing to write before P finishes");
        actions.extend(tx.on_finished("p-req", "xfer-1", p_blocks, TOKENS, 1e12, 2));
    }
    assert_eq!(actions.len(), 2, "one write per D rank: {actions:?}");
    for a in &actions {
        let (r, pieces) = write_pieces(&rig, a);
        assert!(!pieces.is_empty());
        let x = rig.p.write(&format!("D#{r}"), &pieces, &notif(true)).expect("post WRITE");
        wait(&mut rig.p, x);
        tx.on_write_done("p-req");
        let sending = tx.take_sending();
        assert_eq!(sending.is_empty(), r == 0, "P frees its blocks exactly after the last D rank's write");
    }
    for (r, (d, rx)) in rig.d.iter_mut().zip(rx.iter_mut()).enumerate() {
        let (ok, failed) = receive(d, rx);
        assert_eq!((ok, failed), (vec!["d-req".to_string()], vec![]), "D rank {r}");
    }
    drop(rig.p);
    for (r, d) in rig.s.d.iter().enumerate() {
        d.check(&rig.s.d_blocks, TOKENS).unwrap_or_else(|e| panic!("D rank {r}: {e}"));
    }
}

#[test]
fn push_writes_are_byte_exact_in_either_order() {
    if !runtime_or_skip() {
        return;
    }
    run("push-reg-first", true);
    run("push-p-first", false);
}

#[test]
fn a_write_that_cannot_be_posted_fails_d_instead_of_leaving_it_waiting() {
    if !runtime_or_skip() {
        return;
    }
    let mut rig = rig("push-fail");
    let mut tx = PushSender::new("P".into(), 60.0);
    let mut rx = PushReceiver::default();
    rx.on_registered("d-req", 1, 1e12);
    tx.on_finished("p-req", "xfer-1", rig.s.p_blocks.clone(), TOKENS, 1e12, 1);
    let actions = tx.on_registration(registration(&rig, 0), 0.0).unwrap();
    let (_, mut pieces) = write_pieces(&rig, &actions[0]);
    // A destination outside D's registered memory: NIXL refuses the descriptor list.
    pieces[0].remote = 16;
    let err = rig.p.write("D#0", &pieces, &notif(true));
    assert!(err.is_err(), "NIXL must refuse a write outside D's registered memory");
    // The driver's answer to a failed post: tell D, and free P's blocks.
    rig.p.notify("D#0", &notif(false)).expect("notify D");
    tx.on_write_done("p-req");
    assert_eq!(tx.take_sending(), vec!["p-req".to_string()]);
    let (ok, failed) = receive(&mut rig.d[0], &mut rx);
    assert!(ok.is_empty());
    assert_eq!(failed.len(), 1, "D's request fails at once: {failed:?}");
    assert_eq!(rx.waiting(), 0);
}
