//! A route's limits in the tunnel: the client-to-backend pump checks each
//! frame header (and a compressed message as it inflates) before the frame
//! goes on, and on a violation cuts the backend off and leaves the verdict
//! for the other pump, which closes the client with it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Context;

use tokio::io::{AsyncRead, AsyncWrite};

use super::super::frame::close_frame;
use super::super::limits::{Limits, Violation};
use super::{CUT_OFF_REASON, FIN_TIMEOUT, Pump};
use crate::close::GOING_AWAY as CLOSE_GOING_AWAY;

/// A limit the client broke, found by the client-to-backend pump and
/// turned into the client's close frame by the other one.
#[derive(Debug, Default)]
pub struct Verdict(AtomicU8);

impl Verdict {
    const ALL: [Violation; 3] = [
        Violation::TooBig,
        Violation::TooFast,
        Violation::BadCompression,
    ];

    fn set(&self, v: Violation) {
        let i = Self::ALL.iter().position(|x| *x == v).unwrap_or(0);
        self.0.store(i as u8 + 1, Ordering::Relaxed);
    }

    /// The limit broken, if any.
    pub fn get(&self) -> Option<Violation> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            i => Self::ALL.get(usize::from(i) - 1).copied(),
        }
    }
}

/// The client-to-backend pump's checks on a limited route, and the bytes
/// the client sent behind its request, which they must see first.
#[derive(Debug)]
pub(super) struct Guard {
    pub(super) limits: Limits,
    pub(super) early: Vec<u8>,
}

impl<'a, R, W> Pump<'a, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// [`Self::forward`] on a route with limits: frame by frame, each
    /// header checked before any of its frame goes out. A header cut by the
    /// end of a read is held back (it is in `scan`) until it is whole.
    pub(super) fn forward_checked(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Result<(), ()> {
        let Some(mut guard) = self.guard.take() else {
            return Ok(());
        };
        let result = self.check_and_emit(cx, data, &mut guard.limits);
        self.guard = Some(guard);
        result
    }

    fn check_and_emit(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        limits: &mut Limits,
    ) -> Result<(), ()> {
        // Header bytes from an earlier read, held back: they go out ahead
        // of this read's first bytes, once their frame has passed.
        let before = self.scan.clone();
        let prefix = before.partial_header();
        let held = prefix.len();
        // Where in `data` the current frame began, when it began here, and
        // whether a close frame had gone by before it.
        let mut frame_at = None;
        let mut close_before = self.scan.saw_close();
        let mut off = 0;
        let mut broken = None;
        // Frames whose header passed in this read (counted at the end, less
        // the one a clean cut keeps from the backend).
        let mut frames: u64 = 0;
        while off < data.len() {
            if self.scan.remaining() > 0 {
                let n = self.scan.remaining().min((data.len() - off) as u64) as usize;
                let piece = &data[off..off + n];
                self.scan.feed(piece);
                let mut check = limits.payload(piece);
                if check.is_ok() && self.scan.remaining() == 0 {
                    check = limits.frame_end();
                }
                if let Err(v) = check {
                    // Clean if none of the frame has gone out yet: it began
                    // in this read, or its header was held back until now.
                    // Then its header passed in this read, and was counted
                    // there: it is not, after all.
                    let cut = frame_at.or((held > 0).then_some(0));
                    if cut.is_some() {
                        frames = frames.saturating_sub(1);
                    }
                    broken = Some((v, cut));
                    break;
                }
                off += n;
                continue;
            }
            // Not inside a payload (that is above): between frames, or
            // inside a header.
            if self.scan.at_boundary() {
                frame_at = Some(off);
                close_before = self.scan.saw_close();
            }
            off += 1;
            if self.scan.feed(&data[off - 1..off]) == 0 {
                continue; // more header to come
            }
            let mut check = limits.header(self.scan.last_header(), self.scan.remaining());
            if check.is_ok() && self.scan.remaining() == 0 {
                check = limits.frame_end();
            }
            if let Err(v) = check {
                // None of this frame has gone out (a header from an
                // earlier read was held back).
                broken = Some((v, Some(frame_at.unwrap_or(0))));
                break;
            }
            frames += 1;
        }
        // What passed goes out: the held header bytes (if their frame
        // passed, which it did if anything of this read goes), then this
        // read up to `end`.
        // Only what goes out is counted in bytes.
        let pass = |pump: &mut Self, cx: &mut Context<'_>, end: usize| {
            if end > 0 && held > 0 {
                pump.count(held);
                pump.emit(cx, prefix)?;
            }
            pump.count(end);
            pump.emit(cx, &data[..end])
        };
        self.meter.frames.inc_by(frames);
        let Some((v, cut)) = broken else {
            // All good, but for a header still cut off at the end.
            let end = if !self.scan.partial_header().is_empty() {
                frame_at.unwrap_or(0)
            } else {
                data.len()
            };
            return pass(self, cx, end);
        };
        // Everything before the offending frame goes out; the frame does
        // not, when none of it has gone yet (then the backend gets a close
        // in its place); else its stream just stops.
        self.verdict.set(v);
        self.closed = true;
        self.linger = Some(Box::pin(tokio::time::sleep(FIN_TIMEOUT)));
        cx.waker().wake_by_ref(); // the other pump closes the client
        if let Some(at) = cut {
            pass(self, cx, at)?;
            if !close_before {
                self.emit(cx, &close_frame(CLOSE_GOING_AWAY, CUT_OFF_REASON, true))?;
            }
        }
        // Nothing more goes to the backend: its stream ends as soon as what
        // is pending is written (mid-frame, where no close could follow, or
        // right after the close).
        self.cut_off = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Meter;
    use super::*;
    use crate::upstream::frame::tests::frame;
    use crate::upstream::limits::Deflate;

    /// On a limited route the frame that breaks a limit never reaches the
    /// backend, whose stream gets a close in its place, whether the bytes
    /// come one at a time (headers cut by reads), in bigger pieces, or all
    /// behind the client's request.
    #[tokio::test]
    async fn a_limited_pump_cuts_before_the_offending_frame_however_it_arrives() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let allowed: Vec<u8> = [frame(0x1, 10, true), frame(0x2, 1000, true)].concat();
        let refused = frame(0x2, 1001, true);
        let stream = [allowed.clone(), refused, frame(0x1, 5, true)].concat();
        for chunk in [0, 1, 3, 7, 1000, stream.len()] {
            let (mut client_app, client_proxy) = tokio::io::duplex(64 * 1024);
            let (backend_proxy, mut backend_app) = tokio::io::duplex(64 * 1024);
            let (meter, verdict) = (Meter::default(), Verdict::default());
            let early = if chunk == 0 {
                stream.clone()
            } else {
                Vec::new()
            };
            let mut pump = Pump::new(
                (client_proxy, backend_proxy),
                &meter,
                None,
                early,
                (Some(Limits::new(1000, None, Deflate::Off)), &verdict),
            );
            let stream = stream.clone();
            let client = async move {
                for piece in
                    stream
                        .chunks(chunk.max(1))
                        .take(if chunk == 0 { 0 } else { usize::MAX })
                {
                    client_app.write_all(piece).await.expect("write");
                    tokio::task::yield_now().await;
                }
                drop(client_app); // the client leaves: the pump ends
            };
            let backend = async {
                let mut got = Vec::new();
                backend_app.read_to_end(&mut got).await.expect("read");
                got
            };
            let (_, _, got) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                tokio::join!(client, pump.run(), backend)
            })
            .await
            .expect("the pump ended");
            assert_eq!(verdict.get(), Some(Violation::TooBig), "chunk {chunk}");
            assert!(got.starts_with(&allowed), "chunk {chunk}");
            let close = &got[allowed.len()..];
            assert_eq!(close.len(), 6 + 2 + CUT_OFF_REASON.len(), "chunk {chunk}");
            assert_eq!(close[..2], [0x88, 0x80 | (2 + CUT_OFF_REASON.len() as u8)]);
            let key = &close[2..6];
            let payload: Vec<u8> = close[6..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(
                payload[..2],
                CLOSE_GOING_AWAY.to_be_bytes(),
                "chunk {chunk}"
            );
            assert_eq!(&payload[2..], CUT_OFF_REASON, "chunk {chunk}");
            // Counted: what went out of the client's, nothing of the rest.
            assert_eq!(meter.bytes.get(), allowed.len() as u64, "chunk {chunk}");
            assert_eq!(meter.frames.get(), 2, "chunk {chunk}");
        }
    }

    /// A compressed frame (under 126 bytes) of `inflated` bytes of 'a'.
    fn compressed_bomb(inflated: usize) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), false);
        let mut deflated = Vec::with_capacity(inflated / 100 + 64);
        c.compress_vec(&vec![b'a'; inflated], &mut deflated, FlushCompress::Sync)
            .expect("compress");
        deflated.truncate(deflated.len() - 4);
        assert!(deflated.len() < 126, "{} bytes", deflated.len());
        let key = [1u8, 2, 3, 4];
        let mut f = vec![0xc2, 0x80 | deflated.len() as u8];
        f.extend_from_slice(&key);
        f.extend(deflated.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    /// Runs a limited pump (deflate on, 1,000 bytes a message) over what
    /// the client writes, in the pieces given; returns what the backend got
    /// and when its stream ended (paused time: 0 unless a linger ran out),
    /// and the bytes and frames counted.
    async fn through_a_limited_pump(
        pieces: Vec<Vec<u8>>,
    ) -> (Vec<u8>, std::time::Duration, (u64, u64)) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_app, client_proxy) = tokio::io::duplex(64 * 1024);
        let (backend_proxy, mut backend_app) = tokio::io::duplex(64 * 1024);
        let (meter, verdict) = (Meter::default(), Verdict::default());
        let mut pump = Pump::new(
            (client_proxy, backend_proxy),
            &meter,
            None,
            Vec::new(),
            (
                Some(Limits::new(1000, None, Deflate::On { reset: false })),
                &verdict,
            ),
        );
        let start = tokio::time::Instant::now();
        let client = async move {
            for piece in pieces {
                client_app.write_all(&piece).await.expect("write");
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
            }
            // The client stays (as one waiting for its close would).
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        };
        let backend = async {
            let mut got = Vec::new();
            backend_app.read_to_end(&mut got).await.expect("read");
            (got, start.elapsed())
        };
        tokio::select! {
            _ = client => unreachable!("the client sleeps longer than the pump lingers"),
            (_, (got, ended)) = async { tokio::join!(pump.run(), backend) } => {
                assert_eq!(verdict.get(), Some(Violation::TooBig));
                (got, ended, (meter.bytes.get(), meter.frames.get()))
            }
        }
    }

    /// A compressed frame found too big while inflating, whose header came
    /// in an earlier read, still never reaches the backend: its held header
    /// bytes are not sent ahead of the check.
    #[tokio::test(start_paused = true)]
    async fn a_held_header_waits_for_its_frame_to_pass() {
        let bomb = compressed_bomb(100_000);
        let got = through_a_limited_pump(vec![bomb[..1].to_vec(), bomb[1..].to_vec()]).await;
        assert_eq!(got.0[0], 0x88, "the backend got {:02x?}", &got.0[..8]);
        assert_eq!(got.2, (0, 0), "nothing of the client's went out");
        let got = through_a_limited_pump(vec![bomb]).await;
        assert_eq!(got.0[0], 0x88, "the backend got {:02x?}", &got.0[..8]);
        assert_eq!(got.2, (0, 0), "nothing of the client's went out");
    }

    /// Too big in the middle of a frame whose start went out: the backend's
    /// stream ends there at once, not when the pump stops waiting for the
    /// client.
    #[tokio::test(start_paused = true)]
    async fn a_cut_in_the_middle_of_a_frame_ends_the_backend_stream_at_once() {
        let bomb = compressed_bomb(100_000);
        // The header and two bytes of payload, which inflate to little.
        let (got, ended, counted) =
            through_a_limited_pump(vec![bomb[..8].to_vec(), bomb[8..].to_vec()]).await;
        assert_eq!(got, bomb[..8], "the frame's start, then nothing");
        assert_eq!(counted, (8, 1), "what went out of the frame is counted");
        assert!(ended < FIN_TIMEOUT, "ended after {ended:?}");
    }

    /// A close frame over the size limit is cut like any frame: the backend
    /// gets the proxy's close in its place, at once.
    #[tokio::test(start_paused = true)]
    async fn an_oversized_close_frame_is_replaced_by_the_proxys_close() {
        let mut f = vec![0x88, 0x80 | 126];
        f.extend_from_slice(&1001u16.to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0u8, 1001));
        let (got, ended, _) = through_a_limited_pump(vec![f]).await;
        assert_eq!(got.len(), 6 + 2 + CUT_OFF_REASON.len(), "{got:02x?}");
        assert_eq!(got[0], 0x88);
        assert!(ended < FIN_TIMEOUT, "ended after {ended:?}");
    }
}
