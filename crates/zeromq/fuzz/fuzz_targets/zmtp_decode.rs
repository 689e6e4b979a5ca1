//! Coverage-guided fuzzing of what a ZMTP peer can send kvbridge's side channel: the input
//! is the raw byte stream from a peer (greeting, READY command with properties, frames),
//! pushed through the vendored zeromq's own code:
//!
//! 1. the path a new connection takes: `greet_exchange`, `ready_exchange` (as kvbridge's
//!    ROUTER listener) and then the `FramedRead<_, ZmqCodec>` the socket reads messages
//!    from, until the stream ends or the peer would be dropped;
//! 2. the same again with the stream cut into small reads (sizes drawn from the input's
//!    hash): the events must be identical, whatever the TCP segmentation;
//! 3. the handshake as every socket type (compatibility checks on the peer's Socket-Type);
//! 4. `ZmqCodec::decode` straight on the bytes, and every greeting, command and message it
//!    yields encoded and decoded again (must round-trip), within the codec's limits.
//!
//! Memory: besides libFuzzer's `-rss_limit_mb`/`-malloc_limit_mb`, every allocation is
//! checked against the input's size: no single allocation may exceed
//! `ALLOC_SLACK + ALLOC_PER_INPUT_BYTE * input length`. Bytes a peer *declares* must not
//! cost memory before it sends them (an allocation bomb is a 10-byte header that makes us
//! reserve megabytes).
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use asynchronous_codec::{Decoder, Encoder};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use libfuzzer_sys::fuzz_target;
use zeromq::__fuzz::{self as z, FramedIo, Message, ZmqCodec, ZmqGreeting};
use zeromq::SocketType;

/// The largest single allocation (or reallocation) since the last reset.
static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

struct Tracking;

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(p, l, new_size)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Allowed for one allocation regardless of the input (buffers of fixed size, maps).
const ALLOC_SLACK: usize = 1 << 20;
/// ... plus this many bytes per byte the peer actually sent (buffers grow by doubling).
const ALLOC_PER_INPUT_BYTE: usize = 8;

/// Every socket type a local socket can have.
const LOCAL_TYPES: [SocketType; 11] = [
    SocketType::PAIR,
    SocketType::PUB,
    SocketType::SUB,
    SocketType::REQ,
    SocketType::REP,
    SocketType::DEALER,
    SocketType::ROUTER,
    SocketType::PULL,
    SocketType::PUSH,
    SocketType::XPUB,
    SocketType::XSUB,
];

/// xorshift64*: read sizes for the chunked pass.
struct Sizes(u64);

impl Sizes {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // Mostly tiny reads (headers split across them), sometimes a big one.
        if r.is_multiple_of(8) {
            1 + (r >> 8) as usize % 9000
        } else {
            1 + (r >> 8) as usize % 23
        }
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The peer's side of the connection: its bytes, in reads as large as the reader asks
/// for, or in the sizes `sizes` draws; then end of stream. Never pending.
struct PeerBytes {
    data: Bytes,
    pos: usize,
    sizes: Option<Sizes>,
}

impl futures_io::AsyncRead for PeerBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let want = match &mut self.sizes {
            Some(s) => s.next(),
            None => buf.len(),
        };
        let n = want.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(n))
    }
}

/// What the socket made of the peer's stream, in order.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Greeted,
    /// The peer's identity; None when the socket made one up (a random UUID: the peer
    /// sent none).
    Ready {
        identity: Option<Vec<u8>>,
    },
    Message(Vec<Vec<u8>>),
    /// A greeting or command after the handshake: the ROUTER drops the peer.
    NotAMessage(String),
    /// An error: the connection is dropped.
    Error(String),
    End,
}

/// Everything here is in memory and never pending: the future must finish in one poll
/// (pending would mean the socket task waits forever for bytes that are already there).
fn run_to_end<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the ZMTP session waited on an in-memory stream that never pends"),
    }
}

/// A connection from the peer sending `data`, as a `local` socket: greeting, READY, then
/// (if `messages`) every message until the stream ends or the peer would be dropped.
fn session(data: &Bytes, sizes: Option<Sizes>, local: SocketType, messages: bool) -> Vec<Event> {
    let peer = PeerBytes {
        data: data.clone(),
        pos: 0,
        sizes,
    };
    let mut io = FramedIo::new(Box::new(peer), Box::new(futures_util::io::sink()));
    run_to_end(async move {
        let mut ev = Vec::new();
        if let Err(e) = z::greet_exchange(&mut io).await {
            ev.push(Event::Error(e.to_string()));
            return ev;
        }
        ev.push(Event::Greeted);
        match z::ready_exchange(&mut io, local).await {
            Ok(id) => {
                let sent = id.is_empty() || data.windows(id.len()).any(|w| w == id.as_ref());
                ev.push(Event::Ready {
                    identity: sent.then(|| id.as_ref().to_vec()),
                })
            }
            Err(e) => {
                ev.push(Event::Error(e.to_string()));
                return ev;
            }
        }
        if !messages {
            return ev;
        }
        loop {
            match io.read_half.next().await {
                None => {
                    ev.push(Event::End);
                    return ev;
                }
                Some(Ok(Message::Message(m))) => {
                    let frames: Vec<Vec<u8>> = m.into_vec().iter().map(|f| f.to_vec()).collect();
                    let total: usize = frames.iter().map(Vec::len).sum();
                    assert!(
                        !frames.is_empty() && frames.len() <= z::MAX_FRAMES_PER_MESSAGE,
                        "{} frames",
                        frames.len()
                    );
                    assert!(total <= z::MAX_FRAME_BYTES, "a message of {total} bytes");
                    ev.push(Event::Message(frames));
                }
                Some(Ok(Message::Command(c))) => {
                    let mut props: Vec<_> = c.properties.iter().collect();
                    props.sort();
                    ev.push(Event::NotAMessage(format!("command {} {props:?}", c.name)));
                    return ev;
                }
                Some(Ok(other)) => {
                    ev.push(Event::NotAMessage(format!("{other:?}")));
                    return ev;
                }
                Some(Err(e)) => {
                    ev.push(Event::Error(e.to_string()));
                    return ev;
                }
            }
        }
    })
}

/// Encode `item` (a command or message) after a greeting and decode both again with a
/// fresh codec.
fn round_trip(item: &Message) -> Message {
    let mut enc = ZmqCodec::new();
    let mut buf = BytesMut::new();
    enc.encode(Message::Greeting(ZmqGreeting::default()), &mut buf)
        .expect("encode greeting");
    enc.encode(item.clone(), &mut buf).expect("encode");
    let mut dec = ZmqCodec::new();
    match dec.decode(&mut buf) {
        Ok(Some(Message::Greeting(_))) => {}
        other => panic!("greeting did not decode: {other:?}"),
    }
    let back = dec
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{item:?} encoded to bytes that do not decode: {e}"));
    assert!(
        buf.is_empty(),
        "{} bytes left after decoding {item:?}",
        buf.len()
    );
    back.unwrap_or_else(|| panic!("{item:?} encoded to an incomplete frame"))
}

/// The codec on its own over the whole stream; each item round-trips through the encoder.
fn codec_alone(data: &[u8]) {
    let mut codec = ZmqCodec::new();
    let mut buf = BytesMut::from(data);
    while let Ok(Some(item)) = codec.decode(&mut buf) {
        match &item {
            Message::Greeting(g) => {
                let bytes = Bytes::from(BytesMut::from(*g));
                let back = ZmqGreeting::try_from(bytes).expect("an encoded greeting decodes");
                assert_eq!(
                    (back.version, back.mechanism.as_str(), back.as_server),
                    (g.version, g.mechanism.as_str(), g.as_server)
                );
            }
            Message::Command(c) => match round_trip(&item) {
                Message::Command(back) => {
                    assert_eq!(back.name.as_str(), c.name.as_str());
                    assert_eq!(back.properties, c.properties);
                }
                other => panic!("{item:?} came back as {other:?}"),
            },
            Message::Message(m) => match round_trip(&item) {
                Message::Message(back) => assert_eq!(back.into_vec(), m.clone().into_vec()),
                other => panic!("{item:?} came back as {other:?}"),
            },
        }
    }
}

fuzz_target!(|data: &[u8]| {
    LARGEST_ALLOC.store(0, Ordering::Relaxed);
    let bytes = Bytes::copy_from_slice(data);
    // 1. As kvbridge's listener reads a connection.
    let whole = session(&bytes, None, SocketType::ROUTER, true);
    // 2. The same bytes in small reads.
    let chunked = session(
        &bytes,
        Some(Sizes(fnv1a(data) | 1)),
        SocketType::ROUTER,
        true,
    );
    assert_eq!(
        whole, chunked,
        "the events depend on how the stream was cut into reads"
    );
    // 3. The handshake as every socket type.
    for local in LOCAL_TYPES {
        session(&bytes, None, local, false);
    }
    // 4. The codec alone, with encoder round trips.
    codec_alone(data);
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    let allowed = ALLOC_SLACK + ALLOC_PER_INPUT_BYTE * data.len();
    assert!(largest <= allowed, "allocation bomb: {} input bytes made a single allocation of {largest} bytes (allowed {allowed})", data.len());
});
