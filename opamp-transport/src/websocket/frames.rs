//! WebSocket framing (RFC 6455, section 5) for the server side of OpAMP
//! connections.
//!
//! The server reads and writes frames itself, not through a WebSocket
//! library, so that an idle connection holds no buffer: bytes are read into
//! a buffer allocated when they arrive and freed once every frame in them has
//! been handled. A server holds tens of thousands of idle agents; a library
//! stream keeps its read buffer (and more) for each of them.
//!
//! What a client sends is checked as the RFC requires of a server: frames
//! must be masked, reserved bits clear (no extension is negotiated), control
//! frames short and unfragmented, fragments in order, close codes valid.
//! Anything else is a [`Problem`] that names what was wrong, and the
//! connection is closed with the matching code.

use std::fmt;

/// Opcodes (section 5.2).
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// The longest payload a control frame may carry.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// The close codes this server sends (section 7.4.1).
pub(super) mod close {
    /// The work is done: the supervisor closed the session.
    pub(crate) const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub(crate) const PROTOCOL: u16 = 1002;
    /// The client sent a kind of message OpAMP does not use (text).
    pub(crate) const UNSUPPORTED: u16 = 1003;
    /// A message's content was not what it should be (not an `AgentToServer`).
    pub(crate) const INVALID: u16 = 1007;
    /// The client broke a rule of this server (its credential does not admit the agent).
    pub(crate) const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub(crate) const TOO_BIG: u16 = 1009;
}

/// A whole message or control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Incoming {
    /// A binary message, its fragments joined.
    Binary(Vec<u8>),
    /// The start of a text message (OpAMP does not use them; the server closes).
    Text,
    /// A ping, with the payload the pong must echo.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The client is closing, with its close code if it sent one.
    Close(Option<u16>),
}

/// What was wrong with what a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Problem {
    /// It broke the framing rules (close code 1002).
    Protocol(String),
    /// A message larger than the limit (close code 1009).
    TooBig {
        /// Its size, or as much of it as was announced before the limit was passed.
        size: u64,
        /// The limit.
        limit: usize,
    },
}

impl Problem {
    /// The close code that answers it.
    pub(super) fn close_code(&self) -> u16 {
        match self {
            Problem::Protocol(_) => close::PROTOCOL,
            Problem::TooBig { .. } => close::TOO_BIG,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Protocol(problem) => write!(f, "WebSocket protocol error: {problem}"),
            Problem::TooBig { size, limit } => {
                write!(f, "message of {size} bytes is larger than the limit of {limit} bytes")
            }
        }
    }
}

fn protocol(problem: impl Into<String>) -> Problem {
    Problem::Protocol(problem.into())
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Where the payload starts in the buffer.
    start: usize,
    len: usize,
}

/// Reads a client's frames from the bytes it sent.
///
/// Bytes go into [`buffer`](Self::buffer); [`next`](Self::next) takes whole
/// messages out; [`settle`](Self::settle) frees the buffer when nothing is
/// left in it.
#[derive(Debug)]
pub(super) struct Reader {
    /// Bytes read and not yet taken as frames.
    buf: Vec<u8>,
    /// The payload so far of a fragmented binary message.
    message: Vec<u8>,
    /// Whether a fragmented message is being received.
    continuing: bool,
    limit: usize,
}

impl Reader {
    /// A reader of messages up to `limit` bytes.
    pub(super) fn new(limit: usize) -> Self {
        Reader {
            buf: Vec::new(),
            message: Vec::new(),
            continuing: false,
            limit,
        }
    }

    /// Reads messages up to `limit` bytes from now on.
    pub(super) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Takes bytes read from the socket. The buffer grows by exactly their
    /// size: a connection's reads come through a scratch buffer on the
    /// stack, so the heap holds only bytes that have arrived.
    pub(super) fn extend(&mut self, bytes: &[u8]) {
        self.buf.reserve_exact(bytes.len());
        self.buf.extend_from_slice(bytes);
    }

    /// When the frame being received still lacks more than `at_least`
    /// bytes: the buffer, with room for more of it, to read into directly (a
    /// large message is not copied through the scratch buffer). The room
    /// grows with what has arrived (at most doubling, at least 256 KiB at a
    /// time), never to the whole announced length at once: a client that
    /// announces a large frame and sends nothing holds no large buffer.
    pub(super) fn rest_of_large_frame(&mut self, at_least: usize) -> Option<&mut Vec<u8>> {
        const STEP: usize = 256 * 1024;
        let header = self.header().ok()??;
        let rest = (header.start + header.len).saturating_sub(self.buf.len());
        if rest <= at_least {
            return None;
        }
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve_exact(rest.min(self.buf.len().max(STEP)));
        }
        Some(&mut self.buf)
    }

    /// The next whole message or control frame, `None` until more bytes
    /// arrive, or what was wrong with them (the connection is then done).
    pub(super) fn next(&mut self) -> Result<Option<Incoming>, Problem> {
        loop {
            let Some(header) = self.header()? else {
                return Ok(None);
            };
            let end = header.start + header.len;
            if self.buf.len() < end {
                return Ok(None);
            }
            let mut payload = if end == self.buf.len() {
                // The usual case, one frame per read: its bytes become the payload.
                let mut payload = std::mem::take(&mut self.buf);
                payload.drain(..header.start);
                payload
            } else {
                let payload = self.buf[header.start..end].to_vec();
                self.buf.drain(..end);
                payload
            };
            for (at, byte) in payload.iter_mut().enumerate() {
                *byte ^= header.mask[at % 4];
            }
            if let Some(incoming) = self.take(header.fin, header.opcode, payload)? {
                return Ok(Some(incoming));
            }
        }
    }

    /// Frees the buffers if nothing is pending in them: an idle connection holds none.
    pub(super) fn settle(&mut self) {
        if self.buf.is_empty() {
            self.buf = Vec::new();
        }
        if !self.continuing {
            self.message = Vec::new();
        }
    }

    /// The bytes of buffer it holds, for tests of what an idle connection costs.
    #[cfg(any(test, feature = "testkit"))]
    pub(super) fn held(&self) -> usize {
        self.buf.capacity() + self.message.capacity()
    }

    /// Whether some of a frame or message has arrived and not the rest.
    pub(super) fn is_partway(&self) -> bool {
        !self.buf.is_empty() || self.continuing
    }

    fn take(&mut self, fin: bool, opcode: u8, payload: Vec<u8>) -> Result<Option<Incoming>, Problem> {
        match opcode {
            CONTINUATION => {
                if !self.continuing {
                    return Err(protocol("a continuation frame with no message to continue"));
                }
                self.message.extend_from_slice(&payload);
                if !fin {
                    return Ok(None);
                }
                self.continuing = false;
                Ok(Some(Incoming::Binary(std::mem::take(&mut self.message))))
            }
            TEXT | BINARY if self.continuing => Err(protocol("a new message began before the last one ended")),
            TEXT => Ok(Some(Incoming::Text)),
            BINARY if fin => Ok(Some(Incoming::Binary(payload))),
            BINARY => {
                self.continuing = true;
                self.message = payload;
                Ok(None)
            }
            PING => Ok(Some(Incoming::Ping(payload))),
            PONG => Ok(Some(Incoming::Pong)),
            CLOSE => match payload.len() {
                0 => Ok(Some(Incoming::Close(None))),
                1 => Err(protocol("a close frame with a one-byte payload")),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !valid_close_code(code) {
                        return Err(protocol(format!("close code {code} may not be sent")));
                    }
                    Ok(Some(Incoming::Close(Some(code))))
                }
            },
            other => Err(protocol(format!("unknown opcode {other:#x}"))),
        }
    }

    /// The header at the front of the buffer, once all of it has arrived.
    fn header(&self) -> Result<Option<Header>, Problem> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (buf[0], buf[1]);
        let fin = first & 0x80 != 0;
        if first & 0x70 != 0 {
            return Err(protocol("reserved bits are set, but no extension was agreed"));
        }
        let opcode = first & 0x0F;
        if second & 0x80 == 0 {
            return Err(protocol("a frame from a client must be masked"));
        }
        let (len, at) = match second & 0x7F {
            126 if buf.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() < 10 => return Ok(None),
            127 => {
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(protocol("a payload length with its most significant bit set"));
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        if opcode >= CLOSE {
            if !fin {
                return Err(protocol("a fragmented control frame"));
            }
            if len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(protocol(format!(
                    "a control frame with {len} bytes of payload (at most {MAX_CONTROL_PAYLOAD})"
                )));
            }
        } else {
            let so_far = if opcode == CONTINUATION {
                self.message.len() as u64
            } else {
                0
            };
            let size = so_far.saturating_add(len);
            if size > self.limit as u64 {
                return Err(Problem::TooBig {
                    size,
                    limit: self.limit,
                });
            }
        }
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let mask = buf[at..at + 4].try_into().expect("4 bytes");
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            start: at + 4,
            // At most the limit, which is a usize.
            len: len as usize,
        }))
    }
}

/// Whether a client may send `code` (section 7.4): the defined codes that
/// may appear on the wire, and the ranges for libraries and applications.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Appends an unmasked frame header (a server's frames are not masked).
fn header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// A binary message: `message` after OpAMP's varint header 0, in one frame.
pub(super) fn message(message: &impl prost::Message) -> Vec<u8> {
    let len = 1 + message.encoded_len();
    let mut out = Vec::with_capacity(len + 10);
    header(&mut out, BINARY, len);
    out.push(0);
    message.encode_raw(&mut out);
    out
}

/// A pong answering a ping's `payload`.
pub(super) fn pong(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + payload.len());
    header(&mut out, PONG, payload.len());
    out.extend_from_slice(payload);
    out
}

/// A close frame with `code` and as much of `reason` as fits (123 bytes, on a character boundary).
pub(super) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(4 + end);
    header(&mut out, CLOSE, 2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// A frame as a client sends it, masked with `mask`: for tests and the fuzz checks.
#[cfg(any(test, feature = "testkit"))]
pub(super) fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    header(&mut out, opcode, payload.len());
    if !fin {
        out[0] &= 0x7F;
    }
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(at, byte)| byte ^ mask[at % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn read_all(reader: &mut Reader, bytes: &[u8]) -> Result<Vec<Incoming>, Problem> {
        reader.extend(bytes);
        let mut out = Vec::new();
        while let Some(incoming) = reader.next()? {
            out.push(incoming);
        }
        Ok(out)
    }

    #[test]
    fn rfc_examples_read_as_sent() {
        // RFC 6455 section 5.7: a masked "Hello" (as text, which OpAMP refuses) and the same as binary.
        let mut reader = Reader::new(1024);
        let text = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(read_all(&mut reader, &text).unwrap(), vec![Incoming::Text]);
        let mut binary = text;
        binary[0] = 0x82;
        assert_eq!(
            read_all(&mut Reader::new(1024), &binary).unwrap(),
            vec![Incoming::Binary(b"Hello".to_vec())]
        );
    }

    #[test]
    fn frames_arriving_a_byte_at_a_time_read_the_same() {
        let mut wire = client_frame(false, BINARY, b"frag", MASK);
        wire.extend(client_frame(true, PING, b"are you there", MASK));
        wire.extend(client_frame(true, CONTINUATION, &[7u8; 300], MASK));
        wire.extend(client_frame(true, BINARY, &vec![9u8; 70_000], MASK));
        wire.extend(client_frame(true, CLOSE, &[0x03, 0xe8, b'b', b'y', b'e'], MASK));
        let mut expected_message = b"frag".to_vec();
        expected_message.extend([7u8; 300]);
        let expected = vec![
            Incoming::Ping(b"are you there".to_vec()),
            Incoming::Binary(expected_message),
            Incoming::Binary(vec![9u8; 70_000]),
            Incoming::Close(Some(1000)),
        ];
        let mut reader = Reader::new(100_000);
        let mut got = Vec::new();
        for byte in &wire {
            got.extend(read_all(&mut reader, std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(got, expected);
        assert!(!reader.is_partway());
        reader.settle();
        assert_eq!(
            (reader.buf.capacity(), reader.message.capacity()),
            (0, 0),
            "an idle reader holds nothing"
        );
    }

    #[test]
    fn the_rest_of_a_large_frame_is_read_in_place_as_it_arrives() {
        let mut reader = Reader::new(8 << 20);
        let wire = client_frame(true, BINARY, &vec![1u8; 2_000_000], MASK);
        reader.extend(&wire[..512]);
        assert!(
            reader.rest_of_large_frame(wire.len()).is_none(),
            "not larger than asked"
        );
        let mut sent = 512;
        let mut rooms = Vec::new();
        while sent < wire.len() {
            let buffer = reader.rest_of_large_frame(4096).expect("a large rest");
            let room = buffer.capacity() - buffer.len();
            rooms.push(room);
            let piece = room.min(wire.len() - sent);
            buffer.extend_from_slice(&wire[sent..sent + piece]);
            sent += piece;
        }
        assert_eq!(rooms[0], 256 * 1024, "not the whole announced 2 MB at once");
        assert!(rooms.len() < 6, "grown by doubling: {rooms:?}");
        assert!(reader.rest_of_large_frame(0).is_none(), "nothing left to read");
        assert_eq!(reader.next().unwrap(), Some(Incoming::Binary(vec![1u8; 2_000_000])));
    }

    #[test]
    fn broken_framing_is_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x82, 0x05, b'H', b'e', b'l', b'l', b'o'], "must be masked"),
            (
                {
                    let mut frame = client_frame(true, BINARY, b"x", MASK);
                    frame[0] |= 0x40;
                    frame
                },
                "reserved bits",
            ),
            (client_frame(true, 0x3, b"", MASK), "unknown opcode 0x3"),
            (client_frame(true, CONTINUATION, b"x", MASK), "no message to continue"),
            (
                {
                    let mut frames = client_frame(false, BINARY, b"a", MASK);
                    frames.extend(client_frame(true, BINARY, b"b", MASK));
                    frames
                },
                "before the last one ended",
            ),
            (client_frame(false, PING, b"", MASK), "fragmented control frame"),
            (client_frame(true, PING, &[0u8; 126], MASK), "126 bytes"),
            (client_frame(true, CLOSE, &[3], MASK), "one-byte payload"),
            (
                client_frame(true, CLOSE, &1005u16.to_be_bytes(), MASK),
                "close code 1005",
            ),
            (
                {
                    let mut frame = vec![0x82, 0xFF];
                    frame.extend(u64::MAX.to_be_bytes());
                    frame
                },
                "most significant bit",
            ),
        ];
        for (wire, expected) in cases {
            let problem = read_all(&mut Reader::new(1024), &wire).unwrap_err();
            assert_eq!(problem.close_code(), close::PROTOCOL, "{problem}");
            assert!(
                problem.to_string().contains(expected),
                "{problem} should say {expected:?}"
            );
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_from_its_header() {
        let mut reader = Reader::new(100);
        // Only the header of a 1 MB frame: refused before the payload is waited for.
        let wire = client_frame(true, BINARY, &vec![0u8; 1 << 20], MASK);
        let problem = read_all(&mut reader, &wire[..14]).unwrap_err();
        assert_eq!(
            problem,
            Problem::TooBig {
                size: 1 << 20,
                limit: 100
            }
        );
        assert_eq!(problem.close_code(), close::TOO_BIG);

        // Fragments that pass the limit together.
        let mut wire = client_frame(false, BINARY, &[0u8; 60], MASK);
        wire.extend(client_frame(true, CONTINUATION, &[0u8; 60], MASK));
        let problem = read_all(&mut Reader::new(100), &wire).unwrap_err();
        assert_eq!(problem, Problem::TooBig { size: 120, limit: 100 });
    }

    #[test]
    fn server_frames_have_the_right_headers() {
        let reply = super::super::proto::ServerToAgent {
            instance_uid: vec![1; 16],
            ..Default::default()
        };
        let framed = message(&reply);
        assert_eq!(framed[0], 0x82);
        assert_eq!(framed[1] as usize, framed.len() - 2);
        assert_eq!(framed[2], 0, "OpAMP's varint header");
        let big = vec![0u8; 70_000];
        let pong = pong(&big[..125]);
        assert_eq!(&pong[..2], &[0x8A, 125]);
        let close = close_frame(close::GOING_AWAY, &"é".repeat(100));
        assert_eq!(close[0], 0x88);
        assert_eq!(&close[2..4], &1001u16.to_be_bytes());
        assert!(close.len() - 2 <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&close[4..]).is_ok(), "cut on a character boundary");
        let mut long = Vec::new();
        header(&mut long, BINARY, 70_000);
        assert_eq!(long, [0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        let mut medium = Vec::new();
        header(&mut medium, BINARY, 300);
        assert_eq!(medium, [0x82, 126, 0x01, 0x2c]);
    }
}
