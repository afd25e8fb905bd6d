//! The protobuf codec of the generated service, with small starting buffers.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// tonic's prost codec, starting each stream's encode and decode buffer at
/// 1 KiB instead of tonic's 8 KiB.
///
/// A supervisor holds ~20,000 streams that are idle almost all the time, and
/// every stream keeps both buffers for as long as it lives: at 8 KiB they were
/// half of what an idle device cost. Messages to and from a device are a few
/// hundred bytes, except configuration pushes, for which a buffer grows as
/// large as the message (up to the size limit).
pub(crate) struct LeanCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

const BUFFER_SIZE: usize = 1024;
/// tonic's default: how much encoded output is gathered before it is sent on.
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
