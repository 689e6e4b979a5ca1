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
