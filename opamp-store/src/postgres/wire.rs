//! The part of PostgreSQL's frontend/backend protocol (version 3.0) that a
//! pipelined lookup connection speaks: the startup packet and its
//! authentication (trust, cleartext password, MD5, SCRAM-SHA-256 without
//! channel binding), `Parse`, and `Bind`/`Execute`/`Sync` per lookup, with
//! the backend messages that answer them.
//!
//! Every frontend message but the startup packet is a type byte, a
//! big-endian `Int32` length that counts itself, and a body; backend
//! messages have the same frame.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha2::Sha256;

/// Protocol version 3.0, the startup packet's first field.
const PROTOCOL_3_0: i32 = 196_608;
/// The code that asks for TLS before the startup packet.
const SSL_REQUEST_CODE: i32 = 80_877_103;
/// The largest backend message this client accepts: an answer is one short
/// row, and the largest other message (an error, a parameter) is far smaller.
const MAX_MESSAGE: usize = 1 << 20;

/// Type OIDs of the lookup's parameters.
pub(super) const TEXT_OID: u32 = 25;
pub(super) const TIMESTAMPTZ_OID: u32 = 1184;

/// What went wrong on the wire, in words for a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for WireError {
    fn from(err: std::io::Error) -> Self {
        WireError(err.to_string())
    }
}

fn malformed(what: &str) -> WireError {
    WireError(format!("malformed {what} from the server"))
}

/// One backend message: its type byte and its body.
pub(super) struct Message {
    pub tag: u8,
    pub body: Bytes,
}

/// Takes the first whole message off `buf`, or `None` if it does not hold one yet.
pub(super) fn next_message(buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let length = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let length = usize::try_from(length)
        .ok()
        .filter(|length| (4..=MAX_MESSAGE).contains(length))
        .ok_or_else(|| WireError(format!("a backend message of length {length}")))?;
    if buf.len() < 1 + length {
        buf.reserve(1 + length - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(1 + length);
    let tag = frame[0];
    frame.advance(5);
    Ok(Some(Message {
        tag,
        body: frame.freeze(),
    }))
}

/// Appends a message of type `tag` whose body `body` writes.
fn framed(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let length = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&length.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, text: &str) {
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

/// The request for TLS, answered by one byte: `S` (yes) or `N` (no).
pub(super) fn ssl_request(out: &mut BytesMut) {
    out.put_i32(8);
    out.put_i32(SSL_REQUEST_CODE);
}

/// The startup packet with `params` (`user` first; names and values must hold no NUL).
pub(super) fn startup(out: &mut BytesMut, params: &[(&str, &str)]) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (name, value) in params {
        put_cstr(out, name);
        put_cstr(out, value);
    }
    out.put_u8(0);
    let length = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&length.to_be_bytes());
}

/// `Parse` of the named statement `name`, its parameters typed by `oids`.
pub(super) fn parse(out: &mut BytesMut, name: &str, query: &str, oids: &[u32]) {
    framed(out, b'P', |out| {
        put_cstr(out, name);
        put_cstr(out, query);
        out.put_i16(oids.len() as i16);
        for oid in oids {
            out.put_u32(*oid);
        }
    });
}

/// `Sync`: ends a pipeline step; the server answers `ReadyForQuery`.
pub(super) fn sync(out: &mut BytesMut) {
    framed(out, b'S', |_| {});
}

/// `Terminate`: a polite goodbye before closing.
pub(super) fn terminate(out: &mut BytesMut) {
    framed(out, b'X', |_| {});
}

/// One run of `statement` with a text and a `timestamptz` parameter, both
/// and the result in binary: `Bind`, `Execute`, `Sync`. The server answers
/// `BindComplete`, at most one `DataRow`, `CommandComplete` and
/// `ReadyForQuery`, or an `ErrorResponse` and `ReadyForQuery`.
pub(super) fn bind_execute_sync(out: &mut BytesMut, statement: &str, text: &str, micros_since_2000: i64) {
    framed(out, b'B', |out| {
        put_cstr(out, ""); // the unnamed portal
        put_cstr(out, statement);
        out.put_i16(1); // one format code for every parameter:
        out.put_i16(1); // binary (a text's binary form is its bytes)
        out.put_i16(2);
        out.put_i32(text.len() as i32);
        out.put_slice(text.as_bytes());
        out.put_i32(8);
        out.put_i64(micros_since_2000);
        out.put_i16(1); // every result column binary too
        out.put_i16(1);
    });
    framed(out, b'E', |out| {
        put_cstr(out, "");
        out.put_i32(0); // no row limit
    });
    sync(out);
}

/// The first column of a `DataRow` body: `None` for SQL NULL.
pub(super) fn first_column(mut body: Bytes) -> Result<Option<Bytes>, WireError> {
    if body.remaining() < 2 || body.get_i16() < 1 || body.remaining() < 4 {
        return Err(malformed("data row"));
    }
    let length = body.get_i32();
    if length < 0 {
        return Ok(None);
    }
    let length = length as usize;
    if body.remaining() < length {
        return Err(malformed("data row"));
    }
    Ok(Some(body.split_to(length)))
}

/// An `ErrorResponse` (or `NoticeResponse`) body as `SEVERITY CODE: message`.
pub(super) fn error_text(body: &[u8]) -> String {
    let (mut severity, mut code, mut message) = ("ERROR", "", "");
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = std::str::from_utf8(value).unwrap_or("(not UTF-8)");
        match kind {
            b'V' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    format!("{severity} {code}: {message}")
}

/// How the server asked us to authenticate, from an `Authentication*` body.
pub(super) enum AuthRequest {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Kerberos, GSSAPI, SSPI: not spoken here.
    Other(i32),
}

pub(super) fn auth_request(mut body: Bytes) -> Result<AuthRequest, WireError> {
    if body.remaining() < 4 {
        return Err(malformed("authentication request"));
    }
    Ok(match body.get_i32() {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 if body.remaining() >= 4 => AuthRequest::Md5 {
            salt: [body[0], body[1], body[2], body[3]],
        },
        10 => AuthRequest::Sasl {
            mechanisms: body
                .split(|b| *b == 0)
                .filter(|name| !name.is_empty())
                .map(|name| String::from_utf8_lossy(name).into_owned())
                .collect(),
        },
        11 => AuthRequest::SaslContinue(body),
        12 => AuthRequest::SaslFinal(body),
        5 => return Err(malformed("MD5 authentication request")),
        other => AuthRequest::Other(other),
    })
}

/// `PasswordMessage` with `password` as text (cleartext or an MD5 digest).
pub(super) fn password_message(out: &mut BytesMut, password: &str) {
    framed(out, b'p', |out| put_cstr(out, password));
}

/// The MD5 answer: `md5` and hex(md5(hex(md5(password ‖ user)) ‖ salt)).
pub(super) fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex(&Md5::new().chain_update(password).chain_update(user).finalize());
    let outer = Md5::new().chain_update(inner).chain_update(salt).finalize();
    format!("md5{}", hex(&outer))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `SASLInitialResponse`: the chosen mechanism and its first message.
pub(super) fn sasl_initial_response(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    framed(out, b'p', |out| {
        put_cstr(out, mechanism);
        out.put_i32(data.len() as i32);
        out.put_slice(data);
    });
}

/// `SASLResponse`: a later SASL message.
pub(super) fn sasl_response(out: &mut BytesMut, data: &[u8]) {
    framed(out, b'p', |out| out.put_slice(data));
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts a key of any length.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// A SCRAM-SHA-256 exchange (RFC 5802, RFC 7677) without channel binding,
/// as PostgreSQL runs it: the user name in the messages is empty (the
/// startup packet named the user).
pub(super) struct Scram {
    client_nonce: String,
    client_first_bare: String,
    /// The server's signature to expect, once the proof is sent.
    server_signature: Option<[u8; 32]>,
}

pub(super) const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

impl Scram {
    /// Starts an exchange with `nonce` (printable, no comma: base64 of random bytes).
    pub(super) fn new(nonce: String) -> Self {
        Scram {
            client_first_bare: format!("n=,r={nonce}"),
            client_nonce: nonce,
            server_signature: None,
        }
    }

    /// The client-first message.
    pub(super) fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// The client-final message answering `server_first`, with its proof of `password`.
    pub(super) fn client_final(&mut self, password: &str, server_first: &[u8]) -> Result<String, WireError> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| malformed("SCRAM server-first message"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in server_first.split(',') {
            match attribute.split_at_checked(2) {
                Some(("r=", value)) => nonce = Some(value),
                Some(("s=", value)) => salt = BASE64.decode(value).ok(),
                Some(("i=", value)) => iterations = value.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(malformed("SCRAM server-first message"));
        };
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() || iterations == 0 {
            return Err(WireError(
                "the server's SCRAM nonce or iteration count is not acceptable".into(),
            ));
        }
        let salted = salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        // `biws` is base64 of the GS2 header `n,,` (no channel binding).
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        let server_key = hmac(&salted, &[b"Server Key"]);
        self.server_signature = Some(hmac(&server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final message: the server proves it knew the password too.
    pub(super) fn verify_server(&self, server_final: &[u8]) -> Result<(), WireError> {
        let expected = self
            .server_signature
            .ok_or_else(|| WireError("a SCRAM server-final message before the proof".into()))?;
        let text = std::str::from_utf8(server_final).map_err(|_| malformed("SCRAM server-final message"))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(WireError(format!("SCRAM authentication failed: {error}")));
        }
        let signature = text
            .split(',')
            .find_map(|attribute| attribute.strip_prefix("v="))
            .and_then(|value| BASE64.decode(value).ok())
            .ok_or_else(|| malformed("SCRAM server-final message"))?;
        if signature != expected {
            return Err(WireError("the server's SCRAM signature does not match".into()));
        }
        Ok(())
    }
}

/// `Hi(password, salt, i)` of RFC 5802: PBKDF2 with HMAC-SHA-256, one block.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        for (r, b) in result.iter_mut().zip(u) {
            *r ^= b;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange (user "user", password "pencil"), with
    /// the user name left out as PostgreSQL does: the proof changes with the
    /// messages, so this checks the derivation against the RFC's salted
    /// keys through its server signature.
    #[test]
    fn scram_follows_rfc_7677() {
        // The RFC's client-first-bare names the user; PostgreSQL's does not.
        let mut scram = Scram::new("rOprNGfwEbeRWgbNEkqO".into());
        scram.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = scram.client_final("pencil", server_first).unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram
            .verify_server(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        let forged = scram.verify_server(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        assert!(forged.unwrap_err().0.contains("does not match"));
        let refused = scram.verify_server(b"e=invalid-proof");
        assert!(refused.unwrap_err().0.contains("invalid-proof"));
    }

    #[test]
    fn a_scram_nonce_must_extend_ours() {
        let mut scram = Scram::new("abc".into());
        let err = scram.client_final("pw", b"r=xyz123,s=c2FsdA==,i=4096").unwrap_err();
        assert!(err.0.contains("nonce"), "{err}");
        let err = scram.client_final("pw", b"r=abc123,i=4096").unwrap_err();
        assert!(err.0.contains("server-first"), "{err}");
    }

    #[test]
    fn messages_are_framed_and_split() {
        let mut out = BytesMut::new();
        bind_execute_sync(&mut out, "s", "device-5", 42);
        assert_eq!(out[0], b'B');
        // Bind, Execute, Sync: three frames whose lengths add up.
        let mut frames = 0;
        let mut at = 0;
        while at < out.len() {
            let length = i32::from_be_bytes(out[at + 1..at + 5].try_into().unwrap()) as usize;
            at += 1 + length;
            frames += 1;
        }
        assert_eq!((frames, at), (3, out.len()));

        let mut input = BytesMut::from(&b"Z\0\0\0\x05IZ\0\0"[..]);
        let first = next_message(&mut input).unwrap().unwrap();
        assert_eq!((first.tag, &first.body[..]), (b'Z', &b"I"[..]));
        assert!(next_message(&mut input).unwrap().is_none(), "half a message waits");
        let mut bad = BytesMut::from(&b"D\xff\xff\xff\xff"[..]);
        assert!(next_message(&mut bad).is_err());
    }

    #[test]
    fn rows_and_errors_are_read() {
        let row = Bytes::from_static(b"\0\x01\0\0\0\x02s1");
        assert_eq!(first_column(row).unwrap().as_deref(), Some(&b"s1"[..]));
        let null = Bytes::from_static(b"\0\x01\xff\xff\xff\xff");
        assert_eq!(first_column(null).unwrap(), None);
        assert!(first_column(Bytes::from_static(b"\0\x01\0\0\0\x09s1")).is_err());
        let error = b"SERROR\0VERROR\0C42P01\0Mrelation \"device_lease\" does not exist\0\0";
        assert_eq!(
            error_text(error),
            "ERROR 42P01: relation \"device_lease\" does not exist"
        );
    }
}
