//! The byte tunnel: what a proxied connection becomes after the handshake
//! when its route has no per-message limit.
//!
//! Bytes are copied both ways as they come; nothing is decoded, so every
//! frame type, close code and compressed message passes untouched. The
//! tunnel still follows the frame *headers* (a few bytes per frame, see
//! [`FrameScan`]) so that it can
//! - count frames and bytes each way, live, in the route's metrics, and
//! - on shutdown, put a close frame (1001) into the backend-to-client stream
//!   at a frame boundary, which a blind copy could not do without
//!   corrupting a frame. Everything the backend sends after it is dropped,
//!   as the protocol requires after a close; the client's answering close
//!   goes on to the backend, so each side sees one orderly close.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::Either;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::connect::BackendStream;
use crate::server::Draining;
use crate::ws::CLOSE_GOING_AWAY;

/// Live counters for one direction of a route.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    /// Bytes forwarded.
    pub bytes: Counter,
    /// Frames whose header was forwarded.
    pub frames: Counter,
}

/// The read buffer of one `poll`: on the stack, never zeroed.
const CHUNK: usize = 16 * 1024;

/// How long the second direction may stay open once the first has ended.
const FIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reason sent with the shutdown close frame.
const SHUTDOWN_REASON: &[u8] = b"server shutting down";

/// Follows WebSocket frame boundaries in a byte stream without keeping the
/// stream: it only remembers the header being read (at most 14 bytes) and
/// how much payload is left of the current frame.
#[derive(Debug, Default)]
pub struct FrameScan {
    header: [u8; 14],
    have: u8,
    remaining: u64,
    /// A close frame has gone by.
    saw_close: bool,
}

/// Length of a frame header, from its second byte.
fn header_len(b1: u8) -> usize {
    let base = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    if b1 & 0x80 != 0 { base + 4 } else { base }
}

impl FrameScan {
    /// Feeds the next bytes of the stream; returns how many frame headers
    /// they completed.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut frames = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.len() as u64);
                self.remaining -= skip;
                data = &data[skip as usize..];
                continue;
            }
            let have = usize::from(self.have);
            let need = if have < 2 {
                2
            } else {
                header_len(self.header[1])
            };
            let take = (need - have).min(data.len());
            self.header[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            let have = have + take;
            self.have = have as u8;
            if have >= 2 && have == header_len(self.header[1]) {
                let h = &self.header;
                self.remaining = match h[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                    127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                    n => u64::from(n),
                };
                if h[0] & 0x0f == 0x8 {
                    self.saw_close = true;
                }
                self.have = 0;
                frames += 1;
            }
        }
        frames
    }

    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

/// One direction of the tunnel. It owns its two halves, so that the task's
/// state holds each of them once.
struct Pump<'a, R, W> {
    from: R,
    to: W,
    meter: &'a Meter,
    scan: FrameScan,
    /// Bytes read but not yet written, and how many of them were written.
    pending: Vec<u8>,
    sent: usize,
    total: u64,
    /// Backend-to-client only: when it fires, close the client with 1001.
    stop: Option<&'a Draining>,
    /// The close frame went out: what comes after is read and dropped.
    closed: bool,
}

impl<'a, R, W> Pump<'a, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// A pump whose first bytes to write are `first` (already read by
    /// someone else), counted and followed like the rest.
    fn new(from: R, to: W, meter: &'a Meter, stop: Option<&'a Draining>, first: Vec<u8>) -> Self {
        let mut scan = FrameScan::default();
        meter.bytes.inc_by(first.len() as u64);
        meter.frames.inc_by(scan.feed(&first));
        Self {
            from,
            to,
            meter,
            scan,
            total: first.len() as u64,
            pending: first,
            sent: 0,
            stop,
            closed: false,
        }
    }

    /// Takes bytes read from `from`: counts them, follows their frames and
    /// writes what `to` takes at once, keeping the rest.
    fn forward(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Result<(), ()> {
        self.total += data.len() as u64;
        self.meter.bytes.inc_by(data.len() as u64);
        self.meter.frames.inc_by(self.scan.feed(data));
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut self.to).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(n)) if n > 0 => off += n,
                Poll::Ready(_) => return Err(()),
                Poll::Pending => break,
            }
        }
        self.pending.extend_from_slice(&data[off..]);
        Ok(())
    }

    /// Runs until `from` ends or either side fails.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            while self.sent < self.pending.len() {
                match Pin::new(&mut self.to).poll_write(cx, &self.pending[self.sent..]) {
                    Poll::Ready(Ok(n)) if n > 0 => self.sent += n,
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.pending.capacity() > 0 {
                // Give the memory back: an idle connection keeps none.
                self.pending = Vec::new();
                self.sent = 0;
            }
            if !self.closed && self.scan.at_boundary() && self.stop.is_some_and(Draining::has_begun)
            {
                self.closed = true;
                if !self.scan.saw_close {
                    // The backend has not closed: say goodbye in its place.
                    let mut frame = Vec::with_capacity(4 + SHUTDOWN_REASON.len());
                    frame.extend_from_slice(&[0x88, 2 + SHUTDOWN_REASON.len() as u8]);
                    frame.extend_from_slice(&CLOSE_GOING_AWAY.to_be_bytes());
                    frame.extend_from_slice(SHUTDOWN_REASON);
                    self.pending = frame;
                    continue;
                }
            }
            let mut buf = [const { MaybeUninit::<u8>::uninit() }; CHUNK];
            let mut rb = ReadBuf::uninit(&mut buf);
            match Pin::new(&mut self.from).poll_read(cx, &mut rb) {
                // The drain wakes this task through its waiter (see
                // `run`), so pending here is enough.
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            let data = rb.filled();
            if data.is_empty() {
                return Poll::Ready(()); // end of stream
            }
            if self.closed {
                continue; // after the close frame nothing more may go out
            }
            if self.forward(cx, data).is_err() {
                return Poll::Ready(());
            }
        }
    }

    /// Pumps, then ends the other side's writing; returns the bytes moved.
    async fn run(&mut self) -> u64 {
        match self.stop {
            Some(stop) => {
                let mut waiter = std::pin::pin!(stop.waiter());
                std::future::poll_fn(|cx| {
                    // Registers this task once, so that the drain wakes an
                    // idle tunnel; `poll_pump` then sees it and closes.
                    let _ = stop.poll(waiter.as_mut(), cx);
                    self.poll_pump(cx)
                })
                .await
            }
            None => std::future::poll_fn(|cx| self.poll_pump(cx)).await,
        }
        let _ = self.to.shutdown().await;
        self.total
    }
}

/// The tunnel both ways, until both have ended. `early` is what the client
/// sent behind its request (already read by the HTTP parser), `leftover`
/// what the backend sent behind its 101. The future returns (client to
/// backend, backend to client) bytes.
///
/// Not an `async fn`: its arguments would stay in the future beside the
/// pumps they are moved into.
fn both_ways<'a, CR, CW, BR, BW>(
    (cr, cw): (CR, CW),
    (br, bw): (BR, BW),
    (early, leftover): (Vec<u8>, Vec<u8>),
    (up, down): (&'a Meter, &'a Meter),
    stop: &'a Draining,
) -> impl Future<Output = (u64, u64)> + Send + 'a
where
    CR: AsyncRead + Unpin + Send + 'a,
    CW: AsyncWrite + Unpin + Send + 'a,
    BR: AsyncRead + Unpin + Send + 'a,
    BW: AsyncWrite + Unpin + Send + 'a,
{
    let mut to_backend = Pump::new(cr, bw, up, None, early);
    let mut to_client = Pump::new(br, cw, down, Some(stop), leftover);
    async move {
        // Once one direction has ended, the other has `FIN_TIMEOUT` to
        // follow (a client that never closes its end must not hold the
        // tunnel open).
        let (up, down) = {
            let mut a = std::pin::pin!(to_backend.run());
            let mut b = std::pin::pin!(to_client.run());
            tokio::select! {
                up = &mut a => (Some(up), tokio::time::timeout(FIN_TIMEOUT, b).await.ok()),
                down = &mut b => (tokio::time::timeout(FIN_TIMEOUT, a).await.ok(), Some(down)),
            }
        };
        (
            up.unwrap_or(to_backend.total),
            down.unwrap_or(to_client.total),
        )
    }
}

/// Tunnels a proxied connection (see the module documentation): the
/// returned future runs until both directions have ended and returns
/// (client to backend, backend to client) bytes.
pub fn tunnel<'a>(
    client: TokioIo<hyper::upgrade::Upgraded>,
    (backend, leftover): (BackendStream, Vec<u8>),
    meters: (&'a Meter, &'a Meter),
    stop: &'a Draining,
) -> impl Future<Output = (u64, u64)> + Send + 'a {
    type Boxed<'a> = Pin<Box<dyn Future<Output = (u64, u64)> + Send + 'a>>;
    match (
        client
            .into_inner()
            .downcast::<TokioIo<tokio::net::TcpStream>>(),
        backend,
    ) {
        (Ok(parts), BackendStream::Plain(backend)) => {
            // `read_buf` is a view into hyper's whole request buffer (8 KiB
            // or more): keeping it, even empty, would keep that buffer for
            // the connection's life. Copy out what it holds (almost always
            // nothing) and let it go.
            let early = parts.read_buf.to_vec();
            let client = parts.io.into_inner().into_split();
            Either::Left(both_ways(
                client,
                backend.into_split(),
                (early, leftover),
                meters,
                stop,
            ))
        }
        // TLS on either side: boxed, so that its state is not reserved in
        // every plain connection's task.
        (Ok(parts), tls) => {
            let early = parts.read_buf.to_vec();
            let client = parts.io.into_inner().into_split();
            let boxed: Boxed<'a> = Box::pin(both_ways(
                client,
                tokio::io::split(tls),
                (early, leftover),
                meters,
                stop,
            ));
            Either::Right(boxed)
        }
        (Err(upgraded), backend) => {
            let boxed: Boxed<'a> = Box::pin(both_ways(
                tokio::io::split(TokioIo::new(upgraded)),
                tokio::io::split(backend),
                (Vec::new(), leftover),
                meters,
                stop,
            ));
            Either::Right(boxed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client (masked) or server would send it.
    fn frame(opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend((0..payload_len).map(|i| i as u8));
        f
    }

    #[test]
    fn frame_boundaries_are_found_however_the_stream_is_cut() {
        let mut stream = Vec::new();
        for (op, len, masked) in [
            (0x1, 0, false),
            (0x2, 5, true),
            (0x1, 125, false),
            (0x2, 126, true),
            (0x9, 3, false),
            (0x2, 70_000, false),
            (0x8, 2, true),
        ] {
            stream.extend(frame(op, len, masked));
        }
        for chunk in [1, 2, 3, 7, 13, 100, 4096, stream.len()] {
            let mut scan = FrameScan::default();
            let mut frames = 0;
            for piece in stream.chunks(chunk) {
                frames += scan.feed(piece);
            }
            assert_eq!(frames, 7, "chunk {chunk}");
            assert!(scan.at_boundary(), "chunk {chunk}");
            assert!(scan.saw_close, "chunk {chunk}");
        }
    }

    #[test]
    fn a_partial_frame_is_not_a_boundary() {
        let f = frame(0x2, 300, false);
        let mut scan = FrameScan::default();
        assert!(scan.at_boundary());
        scan.feed(&f[..1]);
        assert!(!scan.at_boundary(), "inside the header");
        scan.feed(&f[1..10]);
        assert!(!scan.at_boundary(), "inside the payload");
        scan.feed(&f[10..]);
        assert!(scan.at_boundary());
        assert!(!scan.saw_close);
    }
}
