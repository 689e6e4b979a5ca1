//! Hostile peers against the real side-channel listener, speaking raw ZMTP 3.0 over TCP:
//! a frame claiming a terabyte, a message of too many frames, a command frame after the
//! handshake, garbage greetings. Each peer is dropped and the listener keeps serving; the
//! process never allocates what a peer claims (the vendored zeromq codec caps frames at
//! 80 MiB; without the cap the 1 TiB frame below aborts the test process). Also: the
//! listener binds the configured host only.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvbridge_core::side_channel::{Identity, SideChannel};
use kvbridge_core::wire::{self, HandshakePayload, HandshakeRequest, WIRE_VERSION};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn listener() -> (SideChannel, u16) {
    let sc = SideChannel::new().unwrap();
    let port = free_port();
    let payload = HandshakePayload { compat_hash: "h".into(), agent_metadata: vec![42], ..Default::default() };
    sc.serve("127.0.0.1", port, Arc::new(Mutex::new(Some(payload)))).unwrap();
    (sc, port)
}

/// A normal client still gets the payload.
fn still_serves(port: u16) {
    let c = SideChannel::with_identity(Identity { engine_id: "d".into(), compat_hash: "h".into(), ..Default::default() }).unwrap();
    let req = HandshakeRequest { version: WIRE_VERSION, from_engine: "d".into(), from_tp_rank: 0 };
    let b = c.fetch_blocking("127.0.0.1", port, req, Duration::from_secs(5)).expect("listener still serves");
    assert_eq!(wire::decode::<HandshakePayload>("p", &b, 1 << 20).unwrap().agent_metadata, vec![42]);
}

fn greeting() -> Vec<u8> {
    let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    let mut mech = b"NULL".to_vec();
    mech.resize(20, 0);
    g.extend(mech);
    g.push(0); // as-server
    g.extend([0u8; 31]);
    assert_eq!(g.len(), 64);
    g
}

fn ready() -> Vec<u8> {
    let mut body = vec![5];
    body.extend(b"READY");
    body.push(11);
    body.extend(b"Socket-Type");
    body.extend(6u32.to_be_bytes());
    body.extend(b"DEALER");
    let mut f = vec![0x04, body.len() as u8];
    f.extend(body);
    f
}

/// Connect and complete the ZMTP handshake as a DEALER.
fn hostile_peer(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(&greeting()).unwrap();
    s.write_all(&ready()).unwrap();
    // Read (and ignore) the listener's greeting and READY.
    let mut buf = [0u8; 256];
    let _ = s.read(&mut buf);
    s
}

/// True once the listener closed the connection (a read returns 0 or an error).
fn dropped(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    for _ in 0..20 {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn a_frame_claiming_a_terabyte_drops_the_peer_without_allocating() {
    let (_sc, port) = listener();
    let mut s = hostile_peer(port);
    let mut f = vec![0x02]; // long frame, last
    f.extend((1u64 << 40).to_be_bytes());
    f.extend([0u8; 32]);
    s.write_all(&f).unwrap();
    assert!(dropped(&mut s), "the listener drops a peer that claims a 1 TiB frame");
    still_serves(port);
}

#[test]
fn too_many_frames_in_one_message_drop_the_peer() {
    let (_sc, port) = listener();
    let mut s = hostile_peer(port);
    let mut f = Vec::new();
    for _ in 0..70 {
        f.extend([0x01, 1, b'x']); // short frame, more follows
    }
    s.write_all(&f).unwrap();
    assert!(dropped(&mut s), "a 70-frame message is refused");
    still_serves(port);
}

#[test]
fn a_command_after_the_handshake_and_garbage_greetings_are_survived() {
    let (_sc, port) = listener();
    let mut s = hostile_peer(port);
    s.write_all(&ready()).unwrap(); // a command frame where a message is expected
    assert!(dropped(&mut s));
    for junk in [vec![0x00u8; 64], b"GET / HTTP/1.1\r\n\r\n".to_vec(), greeting()[..20].to_vec(), vec![0xFF; 200]] {
        if let Ok(mut t) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = t.write_all(&junk);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    still_serves(port);
}

#[test]
fn the_listener_binds_only_the_configured_host() {
    let (_sc, port) = listener();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    // 127.0.0.2 is loopback too on Linux: a listener on 0.0.0.0 would accept it.
    let other = TcpStream::connect_timeout(&format!("127.0.0.2:{port}").parse().unwrap(), Duration::from_secs(2));
    assert!(other.is_err(), "the listener must not accept connections on other addresses");
    still_serves(port);
}
