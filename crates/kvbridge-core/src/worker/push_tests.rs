//! Unit tests of `push.rs`.
use super::*;
use crate::wire::WIRE_VERSION;

fn reg(transfer: &str, d_req: &str, rank: u32, tp: u32) -> PushRegistration {
    PushRegistration {
        version: WIRE_VERSION,
        transfer_id: transfer.into(),
        request_id: d_req.into(),
        target_engine_id: "P".into(),
        engine_id: "D".into(),
        host: "127.0.0.1".into(),
        port: 5700,
        tp_size: tp,
        tp_rank: rank,
        block_ids: vec![vec![7, 8]],
        num_tokens: 200,
    }
}

fn notif(req: &str, ok: bool) -> Notif {
    Notif { version: WIRE_VERSION, request_id: req.into(), from_engine: "P".into(), from_tp_rank: 0, ok, expected: 1 }
}

fn writes(a: &[PushAction]) -> Vec<(String, u32)> {
    a.iter()
        .filter_map(|x| match x {
            PushAction::Write { p_req, reg, .. } => Some((p_req.clone(), reg.tp_rank)),
            _ => None,
        })
        .collect()
}

#[test]
fn registration_first_then_finish_writes_once_and_frees() {
    let mut p = PushSender::new("P".into(), 60.0);
    assert!(p.on_registration(reg("t1", "d-1", 0, 1), 0.0).unwrap().is_empty());
    assert_eq!(p.waiting_registrations(), 1);
    let a = p.on_finished("p-1", "t1", vec![vec![3, 4]], 200, 100.0, 1);
    assert_eq!(writes(&a), vec![("p-1".into(), 0)]);
    assert!(p.take_sending().is_empty(), "blocks stay held while the write is in flight");
    p.on_write_done("p-1");
    assert_eq!(p.take_sending(), vec!["p-1".to_string()]);
    assert_eq!((p.held(), p.waiting_registrations()), (0, 0));
}

#[test]
fn finish_first_then_registration_writes() {
    let mut p = PushSender::new("P".into(), 60.0);
    assert!(p.on_finished("p-1", "t1", vec![vec![3]], 100, 100.0, 1).is_empty());
    let a = p.on_registration(reg("t1", "d-1", 0, 1), 1.0).unwrap();
    assert_eq!(writes(&a), vec![("p-1".into(), 0)]);
    p.on_write_done("p-1");
    assert_eq!(p.take_sending(), vec!["p-1".to_string()]);
}

#[test]
fn two_d_ranks_free_after_both_writes() {
    let mut p = PushSender::new("P".into(), 60.0);
    p.on_finished("p-1", "t1", vec![vec![3]], 100, 100.0, 2);
    assert_eq!(writes(&p.on_registration(reg("t1", "d-1", 1, 2), 0.0).unwrap()).len(), 1);
    p.on_write_done("p-1");
    assert!(p.take_sending().is_empty(), "one of two D ranks written");
    assert_eq!(writes(&p.on_registration(reg("t1", "d-1", 0, 2), 0.0).unwrap()).len(), 1);
    p.on_write_done("p-1");
    assert_eq!(p.take_sending(), vec!["p-1".to_string()]);
}

#[test]
fn duplicate_wrong_engine_and_surplus_registrations_are_refused() {
    let mut p = PushSender::new("P".into(), 60.0);
    p.on_registration(reg("t1", "d-1", 0, 1), 0.0).unwrap();
    assert!(matches!(p.on_registration(reg("t1", "d-1", 0, 1), 0.0), Err(PushError::Duplicate { .. })));
    let mut other = reg("t2", "d-2", 0, 1);
    other.target_engine_id = "someone-else".into();
    assert!(matches!(p.on_registration(other, 0.0), Err(PushError::WrongEngine { .. })));
    let mut tp2 = PushSender::new("P".into(), 60.0);
    tp2.set_tp_size(2);
    assert!(matches!(tp2.on_registration(reg("t3", "d-3", 0, 3), 0.0), Err(PushError::Invalid(_))), "TP 3 cannot map to TP 2");
    p.on_finished("p-3", "t3", vec![vec![1]], 10, 100.0, 1);
    p.on_registration(reg("t3", "d-3", 0, 2), 0.0).unwrap();
    assert!(matches!(p.on_registration(reg("t3", "d-3", 1, 2), 0.0), Err(PushError::Invalid(_))));
}

#[test]
fn a_reused_transfer_id_never_strands_either_request_s_blocks() {
    let mut p = PushSender::new("P".into(), 60.0);
    p.on_finished("p-1", "t1", vec![vec![1]], 10, 100.0, 1);
    assert!(p.on_finished("p-2", "t1", vec![vec![2]], 10, 100.0, 1).is_empty());
    assert_eq!(p.take_sending(), vec!["p-2".to_string()], "the second request's blocks are released at once");
    assert_eq!(writes(&p.on_registration(reg("t1", "d-1", 0, 1), 0.0).unwrap()), vec![("p-1".into(), 0)]);
    p.on_write_done("p-1");
    assert_eq!(p.take_sending(), vec!["p-1".to_string()]);
    assert_eq!(p.held(), 0);
}

#[test]
fn base_request_id_matches_without_a_transfer_id() {
    let mut p = PushSender::new("P".into(), 60.0);
    p.on_registration(reg("", "cmpl-abc-0-1a2b3c4d", 0, 1), 0.0).unwrap();
    let a = p.on_finished("cmpl-abc-0-deadbeef", "", vec![vec![1]], 10, 100.0, 1);
    assert_eq!(writes(&a), vec![("cmpl-abc-0-deadbeef".into(), 0)]);
}

#[test]
fn unknown_transfer_id_is_rejected_after_the_ttl_and_unclaimed_blocks_expire() {
    let mut p = PushSender::new("P".into(), 30.0);
    p.on_registration(reg("nobody", "d-1", 0, 1), 0.0).unwrap();
    p.on_finished("p-2", "t2", vec![vec![1]], 10, 50.0, 1);
    assert!(p.tick(10.0).is_empty());
    let a = p.tick(31.0);
    assert!(matches!(&a[..], [PushAction::Reject { reg, .. }] if reg.request_id == "d-1"), "{a:?}");
    assert!(p.take_sending().is_empty(), "P's lease has not run out yet");
    p.tick(51.0);
    assert_eq!(p.take_sending(), vec!["p-2".to_string()]);
    assert_eq!(p.expired, 1);
}

#[test]
fn a_lease_never_frees_blocks_under_an_in_flight_write() {
    let mut p = PushSender::new("P".into(), 30.0);
    p.on_finished("p-1", "t1", vec![vec![1]], 10, 5.0, 1);
    p.on_registration(reg("t1", "d-1", 0, 1), 0.0).unwrap();
    p.tick(100.0);
    assert!(p.take_sending().is_empty(), "write in flight: blocks still in use");
    p.on_write_done("p-1");
    assert_eq!(p.take_sending(), vec!["p-1".to_string()]);
}

#[test]
fn abort_on_p_rejects_waiting_and_later_registrations() {
    let mut p = PushSender::new("P".into(), 30.0);
    p.on_registration(reg("t1", "d-1", 0, 2), 0.0).unwrap();
    let a = p.on_aborted("p-1", "t1", 1.0, false);
    assert!(matches!(&a[..], [PushAction::Reject { .. }]));
    assert!(matches!(p.on_registration(reg("t1", "d-1", 1, 2), 2.0), Err(PushError::Aborted(_))));
    assert_eq!(p.waiting_registrations(), 0);
}

#[test]
fn receiver_finishes_on_all_notifs_fails_on_a_failed_post_or_timeout() {
    let mut d = PushReceiver::default();
    d.on_registered("a", 2, 10.0);
    d.on_registered("b", 1, 10.0);
    d.on_registered("c", 1, 10.0);
    assert!(d.on_notif(&notif("a", true)));
    assert_eq!(d.take(), (vec![], vec![]));
    assert!(d.on_notif(&notif("a", true)), "the same rank again");
    assert_eq!(d.take(), (vec![], vec![]), "a's second P rank has not written yet");
    d.on_notif(&Notif { from_tp_rank: 1, ..notif("a", true) });
    d.on_notif(&notif("b", false)); // P's post failed: P tells D
    assert!(!d.on_notif(&notif("unknown", true)));
    let (ok, failed) = d.take();
    assert_eq!(ok, vec!["a".to_string()]);
    assert_eq!(failed.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), vec!["b"]);
    d.tick(11.0);
    let (_, failed) = d.take();
    assert_eq!(failed.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), vec!["c"], "registration timeout");
    assert_eq!(d.waiting(), 0);
}

#[test]
fn notifications_from_more_ranks_than_registered_are_dropped() {
    let mut d = PushReceiver::default();
    d.on_registered("e", 1, 10.0);
    let two = |rank| Notif { from_tp_rank: rank, expected: 2, ..notif("e", true) };
    d.on_notif(&two(7));
    d.on_notif(&two(8));
    d.on_notif(&two(9));
    assert_eq!(d.take(), (vec![], vec![]), "other ranks do not stand in for rank 7's second write");
    d.on_notif(&two(7));
    assert_eq!(d.take().0, vec!["e".to_string()]);
}

#[test]
fn layerwise_notifications_complete_a_rank_only_after_its_last_layer() {
    let mut d = PushReceiver::default();
    d.on_registered("a", 1, 10.0);
    let layer = Notif { expected: 3, ..notif("a", true) };
    d.on_notif(&layer);
    d.on_notif(&layer);
    assert_eq!(d.take(), (vec![], vec![]), "2 of 3 layer writes");
    d.on_notif(&layer);
    assert_eq!(d.take().0, vec!["a".to_string()]);
}

#[test]
fn layerwise_sender_claims_early_registrations_defers_late_ones_and_frees_only_after_finish() {
    let mut p = PushSender::new("P".into(), 30.0);
    p.on_registration(reg("t1", "d-1", 0, 1), 0.0).unwrap();
    let a = p.on_computing("p-1", "t1", vec![vec![1, 2]], 200);
    assert!(matches!(&a[..], [PushAction::Write { .. }]), "claimed for layer-wise writes: {a:?}");
    p.on_write_done("p-1");
    assert!(p.take_sending().is_empty(), "never free a request P has not finished");
    assert!(p.on_finished("p-1", "t1", vec![vec![1, 2]], 200, 100.0, 0).is_empty());
    assert_eq!(p.take_sending(), vec!["p-1".to_string()]);

    // A registration during the forward waits for it, then is written whole.
    let mut p = PushSender::new("P".into(), 30.0);
    p.on_computing("p-2", "t2", vec![vec![1]], 100);
    assert!(p.on_registration(reg("t2", "d-2", 0, 1), 0.0).unwrap().is_empty());
    assert!(matches!(&p.on_computed("p-2")[..], [PushAction::Write { .. }]));
    // Aborted after computing with a write in flight: freed once it ends.
    assert!(p.on_aborted("p-2", "t2", 1.0, true).is_empty());
    assert!(p.take_sending().is_empty());
    p.on_write_done("p-2");
    assert_eq!(p.take_sending(), vec!["p-2".to_string()]);
}

#[test]
fn abort_on_d_forgets_the_request() {
    let mut d = PushReceiver::default();
    d.on_registered("a", 1, 10.0);
    assert!(d.on_abort("a"));
    assert!(!d.on_notif(&notif("a", true)), "a late write's notification is not reported");
    d.tick(100.0);
    assert_eq!(d.take(), (vec![], vec![]));
}

#[test]
fn registration_wire_checks() {
    let r = reg("t", "d", 0, 1);
    assert_eq!(PushRegistration::from_bytes(&r.to_bytes().unwrap()).unwrap(), r);
    assert!(PushRegistration::from_bytes(b"\xc1junk").is_err());
    let bad = PushRegistration { tp_rank: 3, ..r.clone() };
    assert!(PushRegistration::from_bytes(&bad.to_bytes().unwrap()).is_err());
    let bad = PushRegistration { block_ids: vec![], ..r.clone() };
    assert!(PushRegistration::from_bytes(&bad.to_bytes().unwrap()).is_err());
    let bad = PushRegistration { version: 1, ..r };
    assert!(PushRegistration::from_bytes(&bad.to_bytes().unwrap()).is_err());
    assert_eq!(base_request_id("cmpl-x-0-0123abcd"), "cmpl-x-0");
    assert_eq!(base_request_id("plain"), "plain");
    assert_eq!(base_request_id("a-notHex!!"), "a-notHex!!");
}
