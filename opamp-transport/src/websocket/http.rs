//! Plain HTTP on the server side: each `POST` is a report, its response what
//! waited for the agent since its last poll.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use opamp_core::transport::{FromDevice, Receiver, ToDevice};
use prost::Message as _;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::proto::{AgentToServer, ServerToAgent};
use super::server::{self, Credential, HTTP_OWNER, Link, Refusal, Reply, Reported, Shared};
use super::{convert, lock};

/// The media type of OpAMP's plain HTTP bodies.
pub(super) const PROTOBUF: &str = "application/x-protobuf";

/// A plain HTTP agent between polls.
pub(super) struct HttpAgent {
    link: Link,
    queue: Receiver<ToDevice>,
    /// A message taken from the queue that did not fit the last response.
    held: Option<ToDevice>,
    last_request: Instant,
}

fn protobuf(status: StatusCode, message: &ServerToAgent, gzip: bool) -> Reply {
    let body = message.encode_to_vec();
    let (body, encoded) = if gzip { (compress(&body), true) } else { (body, false) };
    let mut response = server::reply(status, body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF));
    if encoded {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

pub(super) fn compress(bytes: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 2 + 32), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

/// Decompresses gzip `bytes`; `Err(true)` when the result exceeds `limit`.
pub(super) fn decompress(bytes: &[u8], limit: usize) -> Result<Vec<u8>, Option<String>> {
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(bytes).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|err| Some(format!("the gzip body does not decompress: {err}")))?;
    if out.len() > limit {
        return Err(None);
    }
    Ok(out)
}

/// Why a POST body carries no message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyProblem {
    /// Over the size limit once decompressed (413).
    TooLarge,
    /// A `Content-Encoding` other than gzip or none (415).
    Encoding(String),
    /// A gzip body that does not decompress (400).
    Compression(String),
    /// Not an `AgentToServer` (400 with an `ErrorResponse`).
    Message(String),
}

/// A POST body's plain bytes, built chunk by chunk as the body arrives: a
/// gzip body is decompressed as it comes, so the compressed body is never
/// held whole, and a bomb stops as soon as its output passes the limit.
pub(super) enum Unpacking {
    Plain(Vec<u8>, usize),
    Gzip(Box<flate2::write::GzDecoder<Capped>>),
}

/// Decompressed output, refused past its limit.
pub(super) struct Capped {
    out: Vec<u8>,
    limit: usize,
}

/// What [`Capped`] answers a write past its limit with.
#[derive(Debug)]
struct OverLimit;

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("over the size limit")
    }
}

impl std::error::Error for OverLimit {}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::Error::other(OverLimit));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Unpacking {
    /// For a body whose `Content-Encoding` is `encoding` (lowercase), of at
    /// most `limit` bytes once decompressed.
    pub(super) fn new(encoding: Option<&str>, limit: usize) -> Result<Self, BodyProblem> {
        match encoding {
            None | Some("identity") => Ok(Unpacking::Plain(Vec::new(), limit)),
            Some("gzip") => Ok(Unpacking::Gzip(Box::new(flate2::write::GzDecoder::new(Capped {
                out: Vec::new(),
                limit,
            })))),
            Some(other) => Err(BodyProblem::Encoding(format!(
                "Content-Encoding {other:?} is not supported: use gzip or none"
            ))),
        }
    }

    fn is_gzip(&self) -> bool {
        matches!(self, Unpacking::Gzip(_))
    }

    /// Takes the next chunk of the body.
    pub(super) fn feed(&mut self, chunk: &[u8]) -> Result<(), BodyProblem> {
        match self {
            Unpacking::Plain(out, limit) => {
                if out.len() + chunk.len() > *limit {
                    return Err(BodyProblem::TooLarge);
                }
                out.extend_from_slice(chunk);
                Ok(())
            }
            Unpacking::Gzip(decoder) => decoder.write_all(chunk).map_err(inflating),
        }
    }

    /// The whole body's plain bytes, once it has all come.
    pub(super) fn finish(self) -> Result<Bytes, BodyProblem> {
        match self {
            Unpacking::Plain(out, _) => Ok(out.into()),
            Unpacking::Gzip(decoder) => decoder.finish().map(|capped| capped.out.into()).map_err(inflating),
        }
    }
}

fn inflating(err: std::io::Error) -> BodyProblem {
    if err.get_ref().is_some_and(|inner| inner.is::<OverLimit>()) {
        BodyProblem::TooLarge
    } else {
        BodyProblem::Compression(format!("the gzip body does not decompress: {err}"))
    }
}

fn decode(plain: Bytes) -> Result<AgentToServer, BodyProblem> {
    AgentToServer::decode(plain)
        .map_err(|err| BodyProblem::Message(format!("the body is not a valid AgentToServer: {err}")))
}

/// The message in a whole POST body whose `Content-Encoding` is `encoding`
/// (lowercase): decompressed within `limit` bytes first if it is gzip.
pub(super) fn read_body(encoding: Option<&str>, body: Bytes, limit: usize) -> Result<AgentToServer, BodyProblem> {
    let mut unpacking = Unpacking::new(encoding, limit)?;
    unpacking.feed(&body)?;
    decode(unpacking.finish()?)
}

/// Chunks of a gzip body larger than this are decompressed on the blocking
/// pool: their output, up to about a thousand times their size, is
/// milliseconds of CPU that would otherwise hold a runtime worker and every
/// connection on it.
const INLINE_GZIP: usize = 4 * 1024;

/// Why a POST body was not received.
enum Unreceived {
    Body(BodyProblem),
    /// Reading it failed (the client went, or sent bad chunking).
    Read(String),
}

/// The message in the POST body `body`, read and decompressed as it
/// arrives (see [`Unpacking`]), each large gzip chunk off the runtime's
/// workers.
async fn receive(mut body: Limited<Incoming>, mut unpacking: Unpacking) -> Result<AgentToServer, Unreceived> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Unreceived::Body(BodyProblem::TooLarge)
            } else {
                Unreceived::Read(format!("reading the body: {err}"))
            }
        })?;
        let Ok(chunk) = frame.into_data() else {
            // Trailers carry nothing OpAMP reads.
            continue;
        };
        if unpacking.is_gzip() && chunk.len() > INLINE_GZIP {
            unpacking = tokio::task::spawn_blocking(move || unpacking.feed(&chunk).map(|()| unpacking))
                .await
                .map_err(|err| Unreceived::Read(format!("decompressing the body failed: {err}")))?
                .map_err(Unreceived::Body)?;
        } else {
            unpacking.feed(&chunk).map_err(Unreceived::Body)?;
        }
    }
    unpacking.finish().and_then(decode).map_err(Unreceived::Body)
}

pub(super) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// Serves one plain HTTP report.
pub(super) async fn post(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    certified: &server::Certified,
    request: Request<Incoming>,
) -> Reply {
    let config = &shared.config;
    let is_protobuf = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(PROTOBUF))
        });
    if !is_protobuf {
        return server::reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("an OpAMP POST has Content-Type: {PROTOBUF}"),
        );
    }
    let credential = match server::credential(shared, request.headers(), certified) {
        Ok(credential) => credential,
        Err(problem) => return server::unauthorized(problem),
    };
    let gzip_response = accepts_gzip(request.headers());
    let encoding = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    // A bearer token is checked only once the message names its device:
    // until then the body may cost only so much.
    let limit = config.message_limit(&credential);
    let too_large = || {
        let unverified = if limit < config.max_message_size {
            " for a client whose v1 bearer token is not yet checked (send a v2 token, which names its device, or Basic device:token to be allowed more)"
        } else {
            ""
        };
        server::reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {limit} bytes{unverified}"),
        )
    };
    // A declared length over the limit is refused before a byte of it is read.
    if request.body().size_hint().lower() > limit as u64 {
        return too_large();
    }
    let bad_request = |uid: &[u8], problem: String| {
        protobuf(
            StatusCode::BAD_REQUEST,
            &convert::error_response(uid, problem, None),
            gzip_response,
        )
    };
    // An encoding not spoken is refused before a byte of the body is read.
    let unpacking = match Unpacking::new(encoding.as_deref(), limit) {
        Ok(unpacking) => unpacking,
        Err(BodyProblem::Encoding(problem)) => return server::reply(StatusCode::UNSUPPORTED_MEDIA_TYPE, problem),
        Err(_) => return server::reply(StatusCode::BAD_REQUEST, "the body cannot be read".to_owned()),
    };
    // The compressed body is held to the limit too, however it inflates.
    let body = Limited::new(request.into_body(), limit);
    let message = match tokio::time::timeout(config.message_timeout, receive(body, unpacking)).await {
        Ok(Ok(message)) => message,
        Ok(Err(Unreceived::Body(BodyProblem::TooLarge))) => return too_large(),
        Ok(Err(Unreceived::Body(BodyProblem::Encoding(problem)))) => {
            return server::reply(StatusCode::UNSUPPORTED_MEDIA_TYPE, problem);
        }
        Ok(Err(Unreceived::Body(BodyProblem::Compression(problem)))) => {
            return server::reply(StatusCode::BAD_REQUEST, problem);
        }
        Ok(Err(Unreceived::Body(BodyProblem::Message(problem)))) => return bad_request(&[], problem),
        Ok(Err(Unreceived::Read(problem))) => return server::reply(StatusCode::BAD_REQUEST, problem),
        Err(_) => {
            return server::reply(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive whole within {} (message_timeout)",
                    opamp_core::time::duration_text::format(config.message_timeout)
                ),
            );
        }
    };
    let uid = match super::instance_uid(&message.instance_uid) {
        Ok(uid) => uid,
        Err(problem) => return bad_request(&message.instance_uid, problem),
    };
    let peer = format!("opamp-http {peer}");

    let existing = lock(&shared.http_agents).get(&uid).cloned();
    if let Some(agent) = existing {
        let mut agent = agent.lock().await;
        if !(agent.queue.is_closed() && agent.queue.is_empty() && agent.held.is_none()) {
            if let Err(problem) = credential.admits(shared, &agent.link.device) {
                return server::unauthorized(problem);
            }
            agent.last_request = Instant::now();
            let reply = match agent.link.report(&message, Some(&shared.config.device_limits)).await {
                Ok(Reported::Passed(reply)) => reply,
                Ok(Reported::Throttled { wait, why }) => {
                    return server::retry_later(StatusCode::TOO_MANY_REQUESTS, why, wait);
                }
                Err(problem) => {
                    agent.link.fail(&problem);
                    drop(agent);
                    forget(shared, &uid);
                    return bad_request(&uid, problem);
                }
            };
            let reply = respond(shared, &mut agent, *reply).await;
            if message.agent_disconnect.is_some() {
                drop(agent);
                forget(shared, &uid);
            }
            return protobuf(StatusCode::OK, &reply, gzip_response);
        }
        // The supervisor ended the session (a takeover, say): tell the
        // agent, whose next full report registers it again.
        drop(agent);
        forget(shared, &uid);
        let ended = convert::error_response(
            &uid,
            "the supervisor ended this agent's session; register again".into(),
            Some(Duration::ZERO),
        );
        return protobuf(StatusCode::OK, &ended, gzip_response);
    }
    register(shared, &credential, uid, &message, &peer, gzip_response).await
}

async fn register(
    shared: &Arc<Shared>,
    credential: &Credential,
    uid: [u8; 16],
    message: &AgentToServer,
    peer: &str,
    gzip_response: bool,
) -> Reply {
    match server::register(shared, HTTP_OWNER, credential, uid, message, peer).await {
        Ok((mut link, queue, mut first)) => {
            match link.report(message, None).await {
                Ok(reply) => first.flags |= reply.flags(),
                Err(problem) => {
                    link.fail(&problem);
                    return protobuf(
                        StatusCode::BAD_REQUEST,
                        &convert::error_response(&uid, problem, None),
                        gzip_response,
                    );
                }
            }
            if message.agent_disconnect.is_some() {
                return protobuf(StatusCode::OK, &first, gzip_response);
            }
            let mut agent = HttpAgent {
                link,
                queue,
                held: None,
                last_request: Instant::now(),
            };
            let first = respond(shared, &mut agent, first).await;
            lock(&shared.http_agents).insert(uid, Arc::new(tokio::sync::Mutex::new(agent)));
            protobuf(StatusCode::OK, &first, gzip_response)
        }
        Err(Refusal::Unauthenticated(problem)) => server::unauthorized(problem),
        Err(Refusal::BadRequest(problem)) => protobuf(
            StatusCode::BAD_REQUEST,
            &convert::error_response(&uid, problem, None),
            gzip_response,
        ),
        Err(Refusal::Throttled { message, too_many }) => {
            let status = if too_many {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            server::retry_later(status, message, shared.config.retry_after)
        }
        Err(refusal) => match server::refusal_reply(shared, &uid, &refusal) {
            Some(reply) => protobuf(StatusCode::OK, &reply, gzip_response),
            None => server::reply(StatusCode::INTERNAL_SERVER_ERROR, "no answer for this refusal"),
        },
    }
}

fn forget(shared: &Shared, uid: &[u8; 16]) {
    lock(&shared.http_agents).remove(uid);
}

/// Adds what waited for the agent to `reply`, as much as one `ServerToAgent`
/// holds (one remote config, one custom message, a command alone); the rest
/// waits for the next poll.
async fn respond(shared: &Shared, agent: &mut HttpAgent, mut reply: ServerToAgent) -> ServerToAgent {
    let limit = shared.config.max_message_size;
    let mut sent: Vec<FromDevice> = Vec::new();
    loop {
        let next = match agent.held.take() {
            Some(held) => held,
            None => match agent.queue.try_recv() {
                Ok(message) => message,
                Err(_) => break,
            },
        };
        if matches!(next, ToDevice::Registered(_)) {
            continue;
        }
        let outgoing = convert::to_agent(&next, agent.link.uid(), agent.link.fleet);
        let part = outgoing.message;
        let taken = reply.remote_config.is_some() || reply.custom_message.is_some() || reply.command.is_some();
        let fits = !(part.remote_config.is_some() && reply.remote_config.is_some()
            || part.custom_message.is_some() && reply.custom_message.is_some()
            || part.command.is_some() && taken
            || reply.command.is_some());
        if !fits {
            agent.held = Some(next);
            break;
        }
        let mut merged = reply.clone();
        merged.remote_config = merged.remote_config.or(part.remote_config);
        merged.custom_message = merged.custom_message.or(part.custom_message);
        merged.command = merged.command.or(part.command);
        if merged.encoded_len() > limit {
            if !taken {
                warn!(device = %agent.link.device, limit, "not sending a message over the OpAMP size limit");
                if let Some(refused) = outgoing.on_refused {
                    agent.link.tell(refused).await;
                }
                continue;
            }
            agent.held = Some(next);
            break;
        }
        reply = merged;
        sent.extend(outgoing.on_sent);
    }
    for message in sent {
        agent.link.tell(message).await;
    }
    reply
}

/// Disconnects plain HTTP agents that stopped polling, until the transport stops.
pub(super) async fn reap(shared: Arc<Shared>) {
    let timeout = shared.config.http_session_timeout;
    let every = (timeout / 4).max(Duration::from_millis(50));
    let mut stop = shared.stop.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = server::stopped(&mut stop) => {
                lock(&shared.http_agents).clear();
                return;
            }
        }
        let mut agents = lock(&shared.http_agents);
        agents.retain(|_, agent| match agent.try_lock() {
            // Busy answering a request: alive.
            Err(_) => true,
            Ok(agent) => {
                let alive =
                    agent.last_request.elapsed() < timeout && !(agent.queue.is_closed() && agent.queue.is_empty());
                if !alive {
                    debug!(device = %agent.link.device, "plain HTTP agent stopped polling; ending its session");
                }
                alive
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_round_trips_within_the_limit() {
        let body = vec![b'x'; 10_000];
        let packed = compress(&body);
        assert!(packed.len() < body.len());
        assert_eq!(decompress(&packed, 10_000).unwrap(), body);
        assert_eq!(
            decompress(&packed, 9_999),
            Err(None),
            "over the limit after decompression"
        );
        assert!(
            decompress(b"not gzip", 100)
                .unwrap_err()
                .unwrap()
                .contains("does not decompress")
        );
    }

    #[test]
    fn accept_encoding_is_read() {
        let mut headers = HeaderMap::new();
        assert!(!accepts_gzip(&headers));
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("deflate, gzip;q=0.8"));
        assert!(accepts_gzip(&headers));
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip;q=0"));
        assert!(!accepts_gzip(&headers));
    }
}
