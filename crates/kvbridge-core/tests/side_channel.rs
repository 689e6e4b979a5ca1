//! The real ZMQ side channel on loopback: serve, fetch, errors and timeouts.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvbridge_core::error::HandshakeError;
use kvbridge_core::side_channel::SideChannel;
use kvbridge_core::wire::{self, HandshakePayload, HandshakeRequest, WIRE_VERSION};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn req() -> HandshakeRequest {
    HandshakeRequest { version: WIRE_VERSION, from_engine: "d".into(), from_tp_rank: 0 }
}

#[test]
fn serves_payload_and_reports_unregistered() {
    let sc = SideChannel::new().unwrap();
    let port = free_port();
    let cell = Arc::new(Mutex::new(None));
    sc.serve("127.0.0.1", port, cell.clone()).unwrap();
    // Before registration the listener answers with an error payload.
    let b = sc.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(5)).unwrap();
    let p: HandshakePayload = wire::decode("p", &b, 1 << 20).unwrap();
    assert!(p.error.unwrap().contains("not registered"));
    let payload = wire::encode("p", &HandshakePayload { compat_hash: "h".into(), agent_metadata: vec![1, 2, 3], error: None }).unwrap();
    *cell.lock().unwrap() = Some(payload.clone());
    let client = SideChannel::new().unwrap();
    assert_eq!(client.fetch_blocking("localhost", port, req(), Duration::from_secs(5)).unwrap(), payload);
    // A wrong wire version gets an error payload, not silence.
    let mut old = req();
    old.version = 999;
    let p: HandshakePayload =
        wire::decode("p", &client.fetch_blocking("127.0.0.1", port, old, Duration::from_secs(5)).unwrap(), 1 << 20).unwrap();
    assert!(p.error.unwrap().contains("wire version"));
}

#[test]
fn dead_peer_and_bad_host_fail_in_bounded_time() {
    let sc = SideChannel::new().unwrap();
    let t0 = Instant::now();
    let e = sc.fetch_blocking("127.0.0.1", free_port(), req(), Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, HandshakeError::Timeout { .. } | HandshakeError::Io { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    let e = sc.fetch_blocking("no-such-host.invalid", 5600, req(), Duration::from_secs(2)).unwrap_err();
    assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    // A listener that accepts TCP but never answers (not ZMQ) times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let t0 = Instant::now();
    let e = sc.fetch_blocking("127.0.0.1", port, req(), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(e, HandshakeError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn garbage_requests_do_not_kill_the_listener() {
    use std::io::Write;
    let sc = SideChannel::new().unwrap();
    let port = free_port();
    let payload = wire::encode("p", &HandshakePayload { compat_hash: "h".into(), agent_metadata: vec![], error: None }).unwrap();
    sc.serve("127.0.0.1", port, Arc::new(Mutex::new(Some(payload.clone())))).unwrap();
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0xffu8; 64][..], &b""[..]] {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(junk);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let client = SideChannel::new().unwrap();
    assert_eq!(client.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(5)).unwrap(), payload);
}

fn registration(rank: u32, tp: u32) -> kvbridge_core::wire::PushRegistration {
    kvbridge_core::wire::PushRegistration {
        version: WIRE_VERSION,
        transfer_id: "t".into(),
        request_id: "d-req".into(),
        target_engine_id: "p".into(),
        engine_id: "d".into(),
        host: "127.0.0.1".into(),
        port: 5700,
        tp_size: tp,
        tp_rank: rank,
        block_ids: vec![vec![1, 2]],
        num_tokens: 20,
    }
}

fn register(client: &SideChannel, port: u16, reg: kvbridge_core::wire::PushRegistration) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    client.register("127.0.0.1".into(), port, reg, Duration::from_secs(5), move |r| {
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("registration answered")
}

#[test]
fn push_registrations_are_acked_refused_or_rejected_as_malformed() {
    let sc = SideChannel::new().unwrap();
    let port = free_port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let handler: kvbridge_core::side_channel::RegisterHandler = Arc::new(move |r| {
        seen2.lock().unwrap().push(r.request_id.clone());
        if r.transfer_id == "refuse-me" {
            Err("refused by the handler".into())
        } else {
            Ok(())
        }
    });
    sc.serve_with("127.0.0.1", port, Arc::new(Mutex::new(None)), Some(handler)).unwrap();
    let client = SideChannel::new().unwrap();
    assert_eq!(register(&client, port, registration(0, 2)), Ok(()));
    let mut refused = registration(1, 2);
    refused.transfer_id = "refuse-me".into();
    assert_eq!(register(&client, port, refused), Err("refused by the handler".into()));
    // Malformed (rank outside the TP size; empty block lists): refused before the handler.
    let e = register(&client, port, registration(2, 2)).unwrap_err();
    assert!(e.contains("malformed registration"), "{e}");
    let mut empty = registration(0, 1);
    empty.block_ids.clear();
    assert!(register(&client, port, empty).unwrap_err().contains("malformed"));
    assert_eq!(seen.lock().unwrap().len(), 2, "the handler saw only well-formed registrations");
    // A listener that takes no registrations (a pull engine) says so.
    let pull_port = free_port();
    let other = SideChannel::new().unwrap();
    other.serve("127.0.0.1", pull_port, Arc::new(Mutex::new(None))).unwrap();
    let e = register(&client, pull_port, registration(0, 1)).unwrap_err();
    assert!(e.contains("does not accept push registrations"), "{e}");
    // Nobody listening: a bounded error, not a hang.
    let t0 = Instant::now();
    assert!(register(&client, free_port(), registration(0, 1)).is_err());
    assert!(t0.elapsed() < Duration::from_secs(8));
}
