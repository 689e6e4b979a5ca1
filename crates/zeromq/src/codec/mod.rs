//! Implements a codec for ZMQ, providing a way to convert from a byte-oriented
//! io device to a protocal comprised of [`Message`] frames. See [`FramedIo`]

mod command;
mod error;
mod framed;
mod greeting;
pub(crate) mod mechanism;
mod zmq_codec;

pub(crate) use command::{ZmqCommand, ZmqCommandName};
pub(crate) use error::{CodecError, CodecResult};
pub(crate) use framed::{FrameableRead, FrameableWrite, FramedIo, ZmqFramedRead, ZmqFramedWrite};
pub(crate) use greeting::{ZmqGreeting, ZmtpVersion};
pub(crate) use zmq_codec::ZmqCodec;

use crate::message::ZmqMessage;
use crate::{ZmqError, ZmqResult};

use futures_task::noop_waker;
use futures_util::Sink;

use std::pin::Pin;
use std::task::{Context, Poll};

/// kvbridge patch: what the fuzz target in `fuzz/` drives (the decoder, the encoder and the
/// greeting/READY exchange a peer's bytes go through). DO NOT USE otherwise.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod __fuzz {
    pub use super::command::{ZmqCommand, ZmqCommandName};
    pub use super::error::CodecError;
    pub use super::framed::{FrameableRead, FrameableWrite, FramedIo};
    pub use super::greeting::{ZmqGreeting, ZmtpVersion};
    pub use super::zmq_codec::{
        ZmqCodec, MAX_COMMAND_BYTES, MAX_FRAMES_PER_MESSAGE, MAX_FRAME_BYTES,
    };
    pub use super::Message;
    use crate::util::PeerIdentity;
    use crate::{SocketType, ZmqResult};

    /// The greeting exchange of a new connection (`util::greet_exchange`).
    pub async fn greet_exchange(io: &mut FramedIo) -> ZmqResult<ZmtpVersion> {
        crate::util::greet_exchange(io).await
    }

    /// The READY exchange that follows it (`util::ready_exchange`), as a `socket_type`
    /// socket with no properties of its own.
    pub async fn ready_exchange(
        io: &mut FramedIo,
        socket_type: SocketType,
    ) -> ZmqResult<PeerIdentity> {
        crate::util::ready_exchange(io, socket_type, None).await
    }
}

#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone)]
pub enum Message {
    Greeting(ZmqGreeting),
    Command(ZmqCommand),
    Message(ZmqMessage),
}

pub(crate) trait TrySend {
    fn try_send(self: Pin<&mut Self>, item: Message) -> ZmqResult<()>;
}

impl TrySend for ZmqFramedWrite {
    fn try_send(mut self: Pin<&mut Self>, item: Message) -> ZmqResult<()> {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        match self.as_mut().poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {
                self.as_mut().start_send(item)?;
                let _ = self.as_mut().poll_flush(&mut cx); // ignore result just hope that it flush eventually
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(e.into()),
            Poll::Pending => Err(ZmqError::BufferFull("Sink is full")),
        }
    }
}
