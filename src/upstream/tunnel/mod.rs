//! The byte tunnel: what a proxied connection becomes after the handshake.
//!
//! Bytes are copied both ways as they come; nothing is decoded or
//! re-framed, so every frame type, close code, subprotocol and compressed
//! message passes untouched. The tunnel still follows the frame *headers*
//! (a few bytes per frame, see [`super::frame::FrameScan`]) so that it can
//! - count frames and bytes each way, live, in the route's metrics;
//! - on shutdown, put a close frame (1001) into the backend-to-client stream
//!   at a frame boundary, which a blind copy could not do without
//!   corrupting a frame. Everything the backend sends after it is dropped,
//!   as the protocol requires after a close; the client's answering close
//!   goes on to the backend, so each side sees one orderly close;
//! - on a route with limits, check the client's messages (see
//!   [`super::limits`]). A violation is found on a frame header, before the
//!   frame is forwarded: the backend gets a close (1001) in the frame's
//!   place, the client a close (1008 / 1009) at the next boundary of its
//!   stream, and what either sends after that is dropped. (Only a compressed
//!   message, measured as it inflates, can turn out too big in the middle
//!   of a frame; its backend then sees the stream end there instead.)
//!
//! This is the copy loop only, over any pair of streams; which streams, and
//! on which thread's event loop, is [`super::handoff`]'s to decide.

mod limited;

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::frame::{FrameScan, close_frame};
use super::limits::Limits;
use crate::close::GOING_AWAY as CLOSE_GOING_AWAY;
use crate::context::Draining;
use limited::Guard;
pub use limited::Verdict;

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
const FIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Reason sent with the shutdown close frame.
const SHUTDOWN_REASON: &[u8] = b"server shutting down";

/// Reason sent to the backend in place of a client's frame that broke a
/// limit.
const CUT_OFF_REASON: &[u8] = b"client disconnected by the proxy";

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
    /// The close frame went out: what comes after is read and dropped,
    /// for at most `FIN_TIMEOUT` (`linger`, allocated only then).
    closed: bool,
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The linger ran out: the peer never finished closing.
    gave_up: bool,
    /// A limit was broken: shut the destination's writing down (pending
    /// bytes first).
    cut_off: bool,
    /// Written since the last flush: a TLS writer may still hold it.
    unflushed: bool,
    /// Client-to-backend only, on a route with limits.
    guard: Option<Box<Guard>>,
    /// Shared by both pumps (see [`Verdict`]).
    verdict: &'a Verdict,
}

impl<'a, R, W> Pump<'a, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// A pump whose first bytes to write are `first` (already read by
    /// someone else), counted, followed and checked like the rest.
    fn new(
        (from, to): (R, W),
        meter: &'a Meter,
        stop: Option<&'a Draining>,
        first: Vec<u8>,
        (limits, verdict): (Option<Limits>, &'a Verdict),
    ) -> Self {
        let mut pump = Self {
            from,
            to,
            meter,
            scan: FrameScan::default(),
            total: 0,
            pending: Vec::new(),
            sent: 0,
            stop,
            closed: false,
            linger: None,
            gave_up: false,
            cut_off: false,
            unflushed: false,
            guard: None,
            verdict,
        };
        match limits {
            // Checked on the first poll, where it can be written.
            Some(limits) => {
                pump.guard = Some(Box::new(Guard {
                    limits,
                    early: first,
                }))
            }
            None => {
                pump.total = first.len() as u64;
                meter.bytes.inc_by(first.len() as u64);
                meter.frames.inc_by(pump.scan.feed(&first));
                pump.pending = first;
            }
        }
        pump
    }

    /// Writes `data` after whatever is still pending: at once as far as
    /// `to` takes it, the rest kept.
    fn emit(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Result<(), ()> {
        let mut off = 0;
        while off < data.len() && self.sent == self.pending.len() {
            match Pin::new(&mut self.to).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    off += n;
                    self.unflushed = true;
                }
                Poll::Ready(_) => return Err(()),
                Poll::Pending => break,
            }
        }
        self.pending.extend_from_slice(&data[off..]);
        Ok(())
    }

    /// Takes bytes read from `from`: counts them, follows their frames and
    /// writes what `to` takes at once, keeping the rest.
    fn forward(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Result<(), ()> {
        if self.guard.is_some() {
            return self.forward_checked(cx, data);
        }
        self.total += data.len() as u64;
        self.meter.bytes.inc_by(data.len() as u64);
        self.meter.frames.inc_by(self.scan.feed(data));
        self.emit(cx, data)
    }

    fn count(&mut self, n: usize) {
        self.total += n as u64;
        self.meter.bytes.inc_by(n as u64);
    }

    /// What the backend-to-client pump must close the client for, if
    /// anything: a limit the client broke, or shutdown.
    fn closing(&self) -> Option<(u16, &'static [u8])> {
        let stop = self.stop?;
        if let Some(v) = self.verdict.get() {
            let (code, reason) = v.close();
            return Some((code, reason.as_bytes()));
        }
        stop.has_begun()
            .then_some((CLOSE_GOING_AWAY, SHUTDOWN_REASON))
    }

    /// Runs until `from` ends or either side fails.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(linger) = self.linger.as_mut()
                && linger.as_mut().poll(cx).is_ready()
            {
                self.gave_up = true; // the peer never finished closing
                return Poll::Ready(());
            }
            while self.sent < self.pending.len() {
                match Pin::new(&mut self.to).poll_write(cx, &self.pending[self.sent..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.sent += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.pending.capacity() > 0 {
                // Give the memory back: an idle connection keeps none.
                self.pending = Vec::new();
                self.sent = 0;
            }
            if self.cut_off && Pin::new(&mut self.to).poll_shutdown(cx).is_ready() {
                self.cut_off = false;
            }
            if let Some(guard) = self.guard.as_mut()
                && !guard.early.is_empty()
            {
                let early = std::mem::take(&mut guard.early);
                if self.forward(cx, &early).is_err() {
                    return Poll::Ready(());
                }
                continue;
            }
            if !self.closed
                && self.scan.at_boundary()
                && let Some((code, reason)) = self.closing()
            {
                self.closed = true;
                self.linger = Some(Box::pin(tokio::time::sleep(FIN_TIMEOUT)));
                if !self.scan.saw_close() {
                    // The backend has not closed: say goodbye in its place.
                    self.pending = close_frame(code, reason, false);
                    continue;
                }
            }
            let mut buf = [const { MaybeUninit::<u8>::uninit() }; CHUNK];
            let mut rb = ReadBuf::uninit(&mut buf);
            match Pin::new(&mut self.from).poll_read(cx, &mut rb) {
                // The drain wakes this task through its waiter (see
                // `run`), so pending here is enough.
                Poll::Pending => {
                    // Nothing more to read for now: push out what a TLS
                    // writer may still hold (nothing to do on plain TCP).
                    if self.unflushed {
                        match Pin::new(&mut self.to).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(_)) => return Poll::Ready(()),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            let mut data = rb.filled();
            if data.is_empty() {
                return Poll::Ready(()); // end of stream
            }
            if self.closed {
                continue; // after the close frame nothing more may go out
            }
            if self.closing().is_some() {
                // Closing: only up to the end of the current frame, where
                // the close goes in; the rest could not follow it anyway.
                // (Under steady traffic reads rarely end on a boundary.)
                data = &data[..self.scan.to_boundary(data)];
            }
            if self.forward(cx, data).is_err() {
                return Poll::Ready(());
            }
        }
    }

    /// Pumps, then ends the other side's writing; returns the bytes moved,
    /// and whether the pump gave up waiting for a close to be finished.
    async fn run(&mut self) -> (u64, bool) {
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
        (self.total, self.gave_up)
    }
}

/// The tunnel both ways, until both have ended. `early` is what the client
/// sent behind its request (already read by the HTTP parser), `leftover`
/// what the backend sent behind its 101. The future returns (client to
/// backend, backend to client) bytes.
///
/// Not an `async fn`: its arguments would stay in the future beside the
/// pumps they are moved into.
pub(super) fn both_ways<'a, CR, CW, BR, BW>(
    (cr, cw): (CR, CW),
    (br, bw): (BR, BW),
    (early, leftover): (Vec<u8>, Vec<u8>),
    (up, down): (&'a Meter, &'a Meter),
    (stop, limits, verdict): (&'a Draining, Option<Limits>, &'a Verdict),
) -> impl Future<Output = (u64, u64)> + Send + 'a
where
    CR: AsyncRead + Unpin + Send + 'a,
    CW: AsyncWrite + Unpin + Send + 'a,
    BR: AsyncRead + Unpin + Send + 'a,
    BW: AsyncWrite + Unpin + Send + 'a,
{
    let mut to_backend = Pump::new((cr, bw), up, None, early, (limits, verdict));
    let mut to_client = Pump::new((br, cw), down, Some(stop), leftover, (None, verdict));
    async move {
        // Once one direction has ended, the other has `FIN_TIMEOUT` to
        // follow (a client that never closes its end must not hold the
        // tunnel open), or none if the first already waited that long for
        // a close to be finished (say a backend that stopped reading, on
        // shutdown).
        let then = |gave_up: bool| if gave_up { Duration::ZERO } else { FIN_TIMEOUT };
        let (up, down) = {
            let mut a = std::pin::pin!(to_backend.run());
            let mut b = std::pin::pin!(to_client.run());
            tokio::select! {
                (up, gave_up) = &mut a => {
                    (Some(up), tokio::time::timeout(then(gave_up), b).await.ok().map(|d| d.0))
                }
                (down, gave_up) = &mut b => {
                    (tokio::time::timeout(then(gave_up), a).await.ok().map(|u| u.0), Some(down))
                }
            }
        };
        (
            up.unwrap_or(to_backend.total),
            down.unwrap_or(to_client.total),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::frame::tests::frame;

    /// While draining, a backend that never pauses still gets its client a
    /// close frame right after the frame in flight, though its reads almost
    /// never end on a frame boundary.
    #[tokio::test]
    async fn draining_closes_a_busy_stream_at_the_next_frame_boundary() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut backend_app, backend_proxy) = tokio::io::duplex(64 * 1024);
        let (client_proxy, mut client_app) = tokio::io::duplex(64 * 1024);
        let big = frame(0x2, 65_536, false);
        let size = big.len();
        let writer =
            tokio::spawn(async move { while backend_app.write_all(&big).await.is_ok() {} });
        let draining = Draining::default();
        let meter = Meter::default();
        let verdict = Verdict::default();
        let mut pump = Pump::new(
            (backend_proxy, client_proxy),
            &meter,
            Some(&draining),
            Vec::new(),
            (None, &verdict),
        );
        let collect = async {
            let mut out = Vec::new();
            let mut scan = FrameScan::default();
            let mut begun_at = None;
            let mut buf = vec![0u8; 8192];
            loop {
                let n = client_app.read(&mut buf).await.expect("read");
                if n == 0 {
                    return (out, begun_at);
                }
                out.extend_from_slice(&buf[..n]);
                scan.feed(&buf[..n]);
                if begun_at.is_none() && out.len() > 100_000 {
                    begun_at = Some(out.len());
                    draining.begin();
                }
                if scan.saw_close() {
                    writer.abort(); // the backend goes away: the pump ends
                }
            }
        };
        let ((out, begun_at), _) =
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                tokio::join!(collect, pump.run())
            })
            .await
            .expect("the close frame never came");
        let begun_at = begun_at.expect("began");
        let close_at = out.len() - 24;
        assert_eq!(close_at % size, 0, "the close is at a frame boundary");
        // What the collector had not read yet when draining began: the
        // pipe's 64 KiB and one 16 KiB read, then the rest of that frame.
        assert!(
            close_at - begun_at < size + 80 * 1024,
            "{} bytes went out after draining began",
            close_at - begun_at
        );
        assert_eq!(&out[close_at..close_at + 4], &[0x88, 22, 0x03, 0xe9]);
        assert_eq!(&out[close_at + 4..], SHUTDOWN_REASON);
    }

    /// Over TLS a write can stop in rustls's buffer; the tunnel must flush it
    /// when it has nothing more to read, not wait for more traffic.
    #[tokio::test]
    async fn a_tls_destination_gets_every_byte_while_the_client_stays() {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls;
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rustls_pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // A backend link that takes 1 KiB at a time, so writes fill it.
        let (backend_wire, proxy_wire) = tokio::io::duplex(1024);
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let (backend, to_backend) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(backend_wire),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, proxy_wire),
        );
        let (mut backend, to_backend) = (backend.expect("accept"), to_backend.expect("connect"));
        let (mut client_app, client_proxy) = tokio::io::duplex(256 * 1024);
        let (up, down, draining) = (Meter::default(), Meter::default(), Draining::default());
        let verdict = Verdict::default();
        let tunnel = both_ways(
            tokio::io::split(client_proxy),
            tokio::io::split(to_backend),
            (Vec::new(), Vec::new()),
            (&up, &down),
            (&draining, None, &verdict),
        );
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let exchange = async move {
            client_app.write_all(&data).await.expect("client write");
            let mut got = vec![0u8; data.len()];
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                backend.read_exact(&mut got),
            )
            .await;
            assert!(
                matches!(read, Ok(Ok(_))),
                "the backend did not get all 64 KiB"
            );
            assert!(got == data);
            drop((client_app, backend)); // now both leave
        };
        let _ = tokio::join!(exchange, tunnel);
    }
}
