//! HTTP/1.1 event streams served without hyper, so that a held stream
//! costs what a WebSocket does.
//!
//! hyper keeps two 8 KiB buffers per HTTP/1 connection (the read buffer,
//! and the write buffer it allocates up front) for the connection's whole
//! life. A WebSocket leaves hyper at its upgrade; an event stream never
//! does, so each held stream cost about 9 KB more than a WebSocket.
//!
//! So a plain-TCP connection whose **first** request is `GET
//! /{agent_id}/sse/{session_id}` over HTTP/1.1 without `Upgrade` is served
//! here: its head is read and parsed (`httparse`), the request goes
//! through the same router as any other (admission, refusals, proxy routes
//! all unchanged), and the response is written by a small loop, the body
//! chunked, one write for everything the body has ready. The connection
//! closes after that one response (`Connection: close`). The first bytes
//! are only peeked at, so every other connection reaches hyper untouched;
//! an event stream on a reused keep-alive connection or over TLS is
//! served by hyper as before, with its buffers.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::Response;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::context::{App, ConnectionSlot};
use crate::session::sse::{DriverFuture, InlineDriver};

/// How much of a connection's first bytes are looked at to tell an event
/// stream's request line.
const PEEK: usize = 512;
/// The largest request head taken here (hyper's own limit is larger; a
/// head this long is refused `431`).
const MAX_HEAD: usize = 16 * 1024;
/// The most header lines taken.
const MAX_HEADERS: usize = 64;
/// A response body that is not an event stream (a refusal) is at most
/// this long.
const MAX_PLAIN_BODY: usize = 64 * 1024;

/// Whether `stream`'s first request is an event stream's `GET` (peeked at,
/// not read). `false` as well when it cannot tell in one look (the line
/// has not fully arrived, or is longer than [`PEEK`]): hyper serves it.
///
/// The bytes are peeked into a buffer on the stack of each poll, so the
/// look costs no allocation, and the accept task's future (which every
/// connection's serving future is part of) holds no buffer while it waits.
pub(super) async fn is_event_stream(stream: &TcpStream) -> bool {
    std::future::poll_fn(|cx| {
        let mut bytes = [0u8; PEEK];
        let mut buf = tokio::io::ReadBuf::new(&mut bytes);
        match stream.poll_peek(cx, &mut buf) {
            std::task::Poll::Ready(Ok(_)) => {
                std::task::Poll::Ready(request_line_is_event_stream(buf.filled()))
            }
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(false),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// `GET /<one segment>/sse/<one segment>[?query] HTTP/1.1\r\n`: whether
/// `bytes` (a connection's first bytes) start with an event stream's
/// request line. Public for the fuzz target `event_stream_head`.
pub fn request_line_is_event_stream(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let Ok(line) = std::str::from_utf8(&bytes[..end]) else {
        return false;
    };
    let mut parts = line.split(' ');
    let (Some("GET"), Some(target), Some("HTTP/1.1"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let path = target.split('?').next().unwrap_or_default();
    let mut segments = path.split('/');
    matches!(
        (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next()
        ),
        (Some(""), Some(a), Some("sse"), Some(s), None) if !a.is_empty() && !s.is_empty()
    )
}

/// Reads the request head, runs it through `router` and writes a whole
/// response (a refusal); an event stream is returned instead, for the
/// connection's task to run ([`Streaming`]). A head that does not arrive
/// within `AUTH_TIMEOUT_SECS` (as hyper's header read timeout) drops the
/// connection.
///
/// The caller boxes this future: it is big (the head, the router's call)
/// and short, while [`Streaming`] is small and stays for the stream's
/// life.
pub(super) async fn respond(
    mut stream: TcpStream,
    slot: ConnectionSlot,
    router: Router,
    app: Arc<App>,
) -> Option<Streaming> {
    let limit = app.config.auth_timeout;
    let request = match tokio::time::timeout(limit, read_head(&mut stream)).await {
        Ok(Ok(First::Request(request))) => request,
        Ok(Ok(First::Refused(refusal))) => {
            let _ = write_plain(&mut stream, *refusal).await;
            return None;
        }
        Ok(Ok(First::ForHyper(read))) => {
            let stream = Prefixed {
                prefix: bytes::Bytes::from(read),
                inner: stream,
            };
            // Boxed: hyper's connection must not size every stream's task.
            Box::pin(super::connection::serve_connection(
                stream, slot, router, app,
            ))
            .await;
            return None;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "reading an event stream's request failed");
            return None;
        }
        Err(_) => {
            tracing::debug!("an event stream's request head timed out");
            return None;
        }
    };
    let mut request = *request;
    request.extensions_mut().insert(slot);
    // The stream's driver runs in the connection's task, beside the writer.
    request
        .extensions_mut()
        .insert(crate::session::sse::DriveInline);
    let Ok(response) = Box::pin(router.oneshot(request)).await;
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        return Some(Streaming::new(stream, response));
    }
    if let Err(e) = write_plain(&mut stream, response).await {
        tracing::debug!(error = %e, "writing a response failed");
    }
    None
}

/// What the first request turned out to be once its head is read.
enum First {
    /// Served here.
    Request(Box<Request>),
    /// Refused here (a head too long or not HTTP).
    Refused(Box<Response>),
    /// hyper's, with the bytes read so far.
    ForHyper(Vec<u8>),
}

/// The head, read up to its blank line. Bytes after it are not read: the
/// connection ends with this response.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<First> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return Ok(First::Refused(Box::new(refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_too_large",
                "the request head is over 16 KiB",
            ))));
        }
        buf.reserve(1024);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match parse_head(&buf) {
            Ok(Some(Head::Request(request))) => return Ok(First::Request(request)),
            Ok(Some(Head::ForHyper)) => return Ok(First::ForHyper(buf)),
            Ok(None) => continue,
            Err(refused) => return Ok(First::Refused(refused)),
        }
    }
}

/// The request in `bytes`, `None` while its head is incomplete; a head
/// that is not HTTP/1.1 is refused `400` (`431` when too many header
/// lines). Public for the fuzz target `event_stream_head`.
pub fn parse_head(bytes: &[u8]) -> Result<Option<Head>, Box<Response>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let bad = |why: &str| Box::new(refusal(StatusCode::BAD_REQUEST, "bad_request", why));
    match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Box::new(refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_too_large",
                "more than 64 header lines",
            )));
        }
        Err(e) => return Err(bad(&format!("the request is not HTTP/1.1: {e}"))),
    }
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Err(bad("the request line is incomplete"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| bad("a bad method"))?;
    let uri: Uri = path.parse().map_err(|_| bad("a bad request target"))?;
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad("a bad header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("a bad header value"))?;
        map.append(name, value);
    }
    if map.contains_key(header::UPGRADE)
        || map.contains_key(header::TRANSFER_ENCODING)
        || map
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
    {
        // Not an event stream after all (a WebSocket through a proxy route
        // on such a path, a GET with a body): hyper's.
        return Ok(Some(Head::ForHyper));
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    Ok(Some(Head::Request(Box::new(request))))
}

/// What a complete head turned out to be.
#[derive(Debug)]
pub enum Head {
    /// An event stream's request, served here.
    Request(Box<Request>),
    /// Anything else: hyper serves it, from the bytes read so far.
    ForHyper,
}

/// A connection with bytes already read from it in front, for hyper.
struct Prefixed {
    prefix: bytes::Bytes,
    inner: TcpStream,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A JSON refusal, as wsproxy's own (`{"error","message"}`).
fn refusal(status: StatusCode, error: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": error, "message": message }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The status line and `response`'s headers, with `Connection: close` and
/// the framing header given.
fn head(response: &Response, framing: (&str, &str)) -> Vec<u8> {
    let status = response.status();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        if name == header::CONNECTION
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n");
    out.extend_from_slice(framing.0.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(framing.1.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// A whole response (a refusal): `Content-Length`, then close.
async fn write_plain(stream: &mut TcpStream, response: Response) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_PLAIN_BODY)
        .await
        .map_err(std::io::Error::other)?;
    let response = Response::from_parts(parts, Body::empty());
    let mut out = head(&response, ("content-length", &bytes.len().to_string()));
    out.extend_from_slice(&bytes);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// An event stream being written: the head, then the body chunked, every
/// frame the body has ready in one write, until the body ends (its close
/// event) or the client leaves (end of file, or anything sent: this
/// connection takes no second request). The stream's driver, when the
/// handler handed it over, is polled here too, and always to its end (it
/// unregisters the connection), also after the client has left.
///
/// A future written by hand rather than an `async fn`: it is what every
/// held stream keeps, so it holds only the socket, the body, the driver
/// and the bytes being written (none while the stream waits).
pub(super) struct Streaming {
    stream: TcpStream,
    /// `None` once the stream is over (ended, or the client left).
    body: Option<axum::body::BodyDataStream>,
    /// `None` once it has ended (or when it runs in a task of its own).
    driver: Option<DriverFuture>,
    /// Bytes to write; `out[written..]` are not written yet.
    out: Vec<u8>,
    written: usize,
    /// The body has ended: `out` holds the last chunk.
    ended: bool,
}

impl Streaming {
    fn new(stream: TcpStream, mut response: Response) -> Self {
        let driver = response
            .extensions_mut()
            .remove::<InlineDriver>()
            .and_then(|d| d.take());
        let out = head(&response, ("transfer-encoding", "chunked"));
        Self {
            stream,
            body: Some(response.into_body().into_data_stream()),
            driver,
            out,
            written: 0,
            ended: false,
        }
    }

    fn poll_driver(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver
            && driver.as_mut().poll(cx).is_ready()
        {
            self.driver = None;
        }
    }

    /// Writes until the stream is over (`Ready`) or nothing can move.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Self {
            stream,
            body,
            out,
            written,
            ended,
            ..
        } = self;
        // Anything from the client, or its end of file, ends the stream.
        let mut scratch = [0u8; 16];
        let mut read = tokio::io::ReadBuf::new(&mut scratch);
        if Pin::new(&mut *stream).poll_read(cx, &mut read).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let Some(body) = body else {
            return Poll::Ready(Ok(()));
        };
        loop {
            if *written < out.len() {
                match Pin::new(&mut *stream).poll_write(cx, &out[*written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => {
                        *written += n;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if *ended {
                return Pin::new(&mut *stream).poll_shutdown(cx);
            }
            // Not kept while the stream waits: a held stream is mostly
            // idle, and what it holds counts for every one of them.
            *out = Vec::new();
            *written = 0;
            // Everything the body has ready goes in one write.
            while let Poll::Ready(frame) = body.poll_next_unpin(cx) {
                if !chunk(out, frame)? {
                    out.extend_from_slice(b"0\r\n\r\n");
                    *ended = true;
                    break;
                }
            }
            if out.is_empty() {
                return Poll::Pending;
            }
        }
    }
}

impl Future for Streaming {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // The driver first: what it writes is then written in this poll.
        this.poll_driver(cx);
        if this.body.is_some()
            && let Poll::Ready(result) = this.poll_write(cx)
        {
            if let Err(e) = result {
                tracing::debug!(error = %e, "an event stream's connection ended with an error");
            }
            // The driver sees the body gone and ends.
            this.body = None;
            this.out = Vec::new();
            this.poll_driver(cx);
        }
        if this.body.is_none() && this.driver.is_none() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Appends one piece of the body as a chunk; `false` when the body has
/// ended.
fn chunk(
    out: &mut Vec<u8>,
    data: Option<Result<bytes::Bytes, axum::Error>>,
) -> std::io::Result<bool> {
    match data {
        None => Ok(false),
        Some(Err(e)) => Err(std::io::Error::other(e)),
        Some(Ok(data)) => {
            if !data.is_empty() {
                use std::io::Write;
                write!(out, "{:x}\r\n", data.len())?;
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_event_streams_request_line_is_taken() {
        let yes = |s: &str| request_line_is_event_stream(s.as_bytes());
        assert!(yes("GET /a/sse/s HTTP/1.1\r\nHost: x\r\n"));
        assert!(yes(
            "GET /a/sse/s?access_token=t&reliable=true HTTP/1.1\r\n"
        ));
        for no in [
            "GET /a/ws/s HTTP/1.1\r\n",
            "POST /a/sse/s HTTP/1.1\r\n",
            "GET /a/sse/s HTTP/1.0\r\n",
            "GET /a/sse/s HTTP/1.1",
            "GET /a/sse/s/x HTTP/1.1\r\n",
            "GET //sse/s HTTP/1.1\r\n",
            "GET /a/sse/ HTTP/1.1\r\n",
            "GET /sse/s HTTP/1.1\r\n",
            "GET  /a/sse/s HTTP/1.1\r\n",
            "",
        ] {
            assert!(!yes(no), "{no:?}");
        }
    }

    #[test]
    fn a_head_is_parsed_whole_or_refused() {
        let Some(Head::Request(req)) =
            parse_head(b"GET /a/sse/s?x=1 HTTP/1.1\r\nHost: h\r\nLast-Event-ID: e:1-0\r\n\r\n")
                .expect("parsed")
        else {
            panic!("not a complete event stream request");
        };
        assert_eq!(req.uri(), "/a/sse/s?x=1");
        assert_eq!(req.headers()["last-event-id"], "e:1-0");
        assert!(
            parse_head(b"GET /a/sse/s HTTP/1.1\r\nHost: h\r\n")
                .expect("ok")
                .is_none()
        );
        for hypers in [
            &b"GET /a/sse/s HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"GET /a/sse/s HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            b"GET /a/sse/s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parse_head(hypers), Ok(Some(Head::ForHyper))));
        }
        let refused =
            parse_head(b"GET /a/sse/s HTTP/1.1\r\nBad Header: x\r\n\r\n").expect_err("refused");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn frames_become_chunks() {
        let mut out = Vec::new();
        let data = bytes::Bytes::from_static(b"data: x\n\n");
        assert!(chunk(&mut out, Some(Ok(data))).expect("chunk"));
        assert_eq!(out, b"9\r\ndata: x\n\n\r\n");
        assert!(!chunk(&mut out, None).expect("end"));
    }
}
