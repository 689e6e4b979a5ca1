//! The real ZMQ side channel on loopback: serve, fetch, errors and timeouts.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvbridge_core::config::CompatInfo;
use kvbridge_core::error::HandshakeError;
use kvbridge_core::wire::{self, HandshakePayload, HandshakeRequest, HeartbeatReply, HeartbeatRequest, WIRE_VERSION};
use kvbridge_driver::side_channel::{Handlers, Identity, SideChannel};

/// A client speaking for an engine with compatibility hash `hash`.
fn client(hash: &str) -> SideChannel {
    SideChannel::with_identity(Identity { engine_id: "d".into(), compat_hash: hash.into(), ..Default::default() }).unwrap()
}

fn payload(md: Vec<u8>) -> HandshakePayload {
    HandshakePayload { compat_hash: "h".into(), agent_metadata: md, ..Default::default() }
}

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
    let c = client("h");
    // Before registration the listener answers with an error, not silence.
    let e = c.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(5)).unwrap_err();
    assert!(matches!(&e, HandshakeError::Rejected { reason, .. } if reason.contains("not registered")), "{e}");
    *cell.lock().unwrap() = Some(payload(vec![1, 2, 3]));
    let b = c.fetch_blocking("localhost", port, req(), Duration::from_secs(5)).unwrap();
    let p: HandshakePayload = wire::decode("p", &b, 1 << 20).unwrap();
    assert_eq!(p.agent_metadata, vec![1, 2, 3]);
    assert!(p.now_unix > 1.0e9, "the payload carries the server's clock");
    // A wrong wire version gets an error, not silence.
    let mut old = req();
    old.version = 999;
    let e = c.fetch_blocking("127.0.0.1", port, old, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("wire version"), "{e}");
    // A client with no compatibility hash may only inspect.
    let e = SideChannel::new().unwrap().fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("only inspect"), "{e}");
}

#[test]
fn incompatible_peers_are_refused_naming_the_fields_unless_overridden() {
    let compat = |model: &str, dtype: &str| CompatInfo { model: model.into(), dtype: dtype.into(), num_layers: 4, ..Default::default() };
    let port = free_port();
    let listener = SideChannel::with_identity(Identity {
        engine_id: "p".into(),
        compat_hash: "hash-p".into(),
        compat: Some(compat("llama", "bfloat16")),
        mode: "pull".into(),
        enforce: true,
    })
    .unwrap();
    listener.serve("127.0.0.1", port, Arc::new(Mutex::new(Some(payload(vec![9]))))).unwrap();
    let d = SideChannel::with_identity(Identity {
        engine_id: "d".into(),
        compat_hash: "hash-d".into(),
        compat: Some(compat("llama", "float16")),
        mode: "push".into(),
        enforce: true,
    })
    .unwrap();
    let e = d.fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(5)).unwrap_err();
    let HandshakeError::Incompatible { detail, .. } = &e else { panic!("{e}") };
    assert!(detail.contains("dtype") && detail.contains("bfloat16") && detail.contains("float16"), "{detail}");
    assert!(detail.contains("transfer_mode"), "{detail}");
    assert!(!detail.contains("model"), "equal fields are not listed: {detail}");
    // enforce_handshake_compat=false on the listener: served anyway.
    let port2 = free_port();
    let lax = SideChannel::with_identity(Identity { compat_hash: "hash-p".into(), enforce: false, ..Default::default() }).unwrap();
    lax.serve("127.0.0.1", port2, Arc::new(Mutex::new(Some(payload(vec![9]))))).unwrap();
    assert!(d.fetch_blocking("127.0.0.1", port2, req(), Duration::from_secs(5)).is_ok());
}

#[test]
fn heartbeats_and_inspection_are_answered() {
    let port = free_port();
    let sc = SideChannel::new().unwrap();
    let handlers = Handlers {
        heartbeat: Some(Arc::new(|from: &str, hb: HeartbeatRequest| {
            assert_eq!(from, "d");
            HeartbeatReply {
                epoch: 7,
                held: vec![(hb.request_ids[0].clone(), 20.0)],
                unknown: hb.request_ids[1..].to_vec(),
                ..Default::default()
            }
        })),
        inspect: Some(Arc::new(|| r#"{"held_blocks":3}"#.to_string())),
        ..Default::default()
    };
    sc.serve_with("127.0.0.1", port, Arc::new(Mutex::new(None)), handlers).unwrap();
    let d = client("h");
    let (tx, rx) = std::sync::mpsc::channel();
    d.heartbeat(
        "127.0.0.1".into(),
        port,
        HeartbeatRequest { request_ids: vec!["a".into(), "b".into()], release: false },
        Duration::from_secs(5),
        move |r| {
            let _ = tx.send(r);
        },
    );
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!((r.epoch, r.held, r.unknown), (7, vec![("a".to_string(), 20.0)], vec!["b".to_string()]));
    // Inspection needs no identity (a diagnostic client).
    let v = SideChannel::new().unwrap().inspect_blocking("127.0.0.1", port, Duration::from_secs(5)).unwrap();
    assert_eq!(v, r#"{"held_blocks":3}"#);
    // Too many ids: refused, and the listener keeps serving.
    let (tx, rx) = std::sync::mpsc::channel();
    let ids = vec!["x".to_string(); wire::MAX_HEARTBEAT_IDS + 1];
    d.heartbeat("127.0.0.1".into(), port, HeartbeatRequest { request_ids: ids, release: false }, Duration::from_secs(5), move |r| {
        let _ = tx.send(r);
    });
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().is_err());
    assert!(SideChannel::new().unwrap().inspect_blocking("127.0.0.1", port, Duration::from_secs(5)).is_ok());
}

#[test]
fn handshakes_retry_with_backoff_until_the_listener_is_up() {
    let port = free_port();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        let sc = SideChannel::new().unwrap();
        sc.serve("127.0.0.1", port, Arc::new(Mutex::new(Some(payload(vec![5]))))).unwrap();
        std::thread::sleep(Duration::from_secs(5));
    });
    let c = client("h");
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    c.fetch("127.0.0.1".into(), port, req(), Duration::from_millis(300), 4, move |r| {
        let _ = tx.send(r);
    });
    let b = rx.recv_timeout(Duration::from_secs(10)).unwrap().expect("a retry reached the late listener");
    assert_eq!(wire::decode::<HandshakePayload>("p", &b, 1 << 20).unwrap().agent_metadata, vec![5]);
    assert!(t0.elapsed() >= Duration::from_millis(600));
    // Without retries the same wait fails at once.
    let (tx, rx) = std::sync::mpsc::channel();
    c.fetch("127.0.0.1".into(), free_port(), req(), Duration::from_millis(200), 0, move |r| {
        let _ = tx.send(r);
    });
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap().is_err());
    late.join().unwrap();
}

#[test]
fn dead_peer_and_bad_host_fail_in_bounded_time() {
    let sc = client("h");
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
    sc.serve("127.0.0.1", port, Arc::new(Mutex::new(Some(payload(vec![4]))))).unwrap();
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0xffu8; 64][..], &b""[..]] {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(junk);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let b = client("h").fetch_blocking("127.0.0.1", port, req(), Duration::from_secs(5)).unwrap();
    assert_eq!(wire::decode::<HandshakePayload>("p", &b, 1 << 20).unwrap().agent_metadata, vec![4]);
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
    let handler: kvbridge_driver::side_channel::RegisterHandler = Arc::new(move |r| {
        seen2.lock().unwrap().push(r.request_id.clone());
        if r.transfer_id == "refuse-me" {
            Err("refused by the handler".into())
        } else {
            Ok(())
        }
    });
    sc.serve_with("127.0.0.1", port, Arc::new(Mutex::new(None)), Handlers { register: Some(handler), ..Default::default() }).unwrap();
    let client = client("h");
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
