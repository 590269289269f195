//! A route's per-connection limits on the client's messages, checked on the
//! frames as they go through the tunnel (see [`super::tunnel`]), so that a
//! limited route keeps everything a tunnel passes end to end: compression,
//! subprotocols, pings.
//!
//! - **Rate**: each data message (its first frame) takes a token from a
//!   bucket; an empty bucket is a violation (close 1008).
//! - **Size**: a message's payload, summed over its fragments, may not pass
//!   the limit (close 1009). The check is on the frame header, before any of
//!   the frame's payload is forwarded. A message compressed with
//!   permessage-deflate is inflated as it passes, only to be measured (the
//!   compressed bytes go on untouched), so the limit bounds what the backend
//!   will inflate; inflating stops at the limit, so a small compressed
//!   "bomb" costs no more than a message of the limit. The proxy reads the
//!   bytes as a receiver does (RFC 7692, 7.2.2: the tail appended to every
//!   message; a fresh inflater per message under
//!   `client_no_context_takeover`) so that the two cannot be made to
//!   disagree. (The inflater is zlib-rs: miniz_oxide rebuilt its tables for
//!   every block, so a message of empty 10-bit blocks cost it 1.8 s of CPU
//!   per MiB of wire, against 52 ms for zlib-rs, in a release build.) What
//!   follows a final deflate block is measured as a new stream (a second
//!   final block in one message is refused: each resets the inflater); and on the wire
//!   a compressed message may take at most twice the limit plus 1 KiB.
//! - Other frames (control frames, and reserved opcodes, which the backend
//!   must refuse) are not messages, but may not pass the size limit either.
//!   Whether they are valid is left to the backend, so that the proxy
//!   changes nothing about how a connection goes.

mod deflate;

use flate2::{Decompress, FlushDecompress};

use super::frame::{self, Header, RSV1, opcode};

pub use deflate::Deflate;
use deflate::{DEFLATE_TAIL, Inflater, SCRATCH, Stream};

/// What a client did to lose its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A message over the size limit.
    TooBig,
    /// Messages faster than the rate limit.
    TooFast,
    /// A compressed message that does not inflate.
    BadCompression,
}

impl Violation {
    /// Close code and reason for the client.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            Violation::TooBig => (crate::close::TOO_BIG, "message too big"),
            Violation::TooFast => (crate::close::POLICY, "message rate limit exceeded"),
            Violation::BadCompression => (crate::close::INVALID_DATA, "invalid compressed data"),
        }
    }

    /// The `reason` label of `wsproxy_upstream_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            Violation::TooBig => "too_big",
            Violation::TooFast => "too_fast",
            Violation::BadCompression => "bad_compression",
        }
    }
}

/// Token bucket for a connection's message rate.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Limits on one connection's client-to-backend messages.
#[derive(Debug)]
pub struct Limits {
    max: u64,
    bucket: Option<Bucket>,
    deflate: Deflate,
    inflater: Option<Box<Inflater>>,
    /// Payload bytes of the current message so far: inflated, if it is
    /// compressed (`wire` then counts what it takes on the wire).
    message: u64,
    wire: u64,
    /// The current message is compressed.
    compressed: bool,
    /// The frame being read: a data frame (else control), its FIN bit, its
    /// masking key, and how much of its payload has gone by.
    data_frame: bool,
    fin: bool,
    mask: Option<[u8; 4]>,
    frame_off: u64,
}

impl Limits {
    /// `max` bytes per message; `rate` (messages per second, burst);
    /// `deflate` as the connection negotiated it.
    pub fn new(max: u64, rate: Option<(f64, f64)>, deflate: Deflate) -> Self {
        Self {
            max,
            bucket: rate.map(|(rate, burst)| Bucket {
                rate,
                burst,
                tokens: burst,
                last: std::time::Instant::now(),
            }),
            deflate,
            inflater: None,
            message: 0,
            wire: 0,
            compressed: false,
            data_frame: false,
            fin: false,
            mask: None,
            frame_off: 0,
        }
    }

    /// The most a compressed message of at most `max` inflated bytes may
    /// take on the wire. Deflate's stored blocks add 5 bytes per 64 KiB of
    /// data that does not compress, but a sender that flushes each of many
    /// small fragments adds about 6 bytes to each: twice the limit allows
    /// for both, and still bounds what inflates to nothing.
    fn max_wire(&self) -> u64 {
        self.max.saturating_mul(2).saturating_add(1024)
    }

    /// A frame header (complete) whose payload is `len` bytes.
    pub fn header(&mut self, h: &[u8], len: u64) -> Result<(), Violation> {
        let head = Header::parse(h);
        let (fin, rsv1) = (head.fin, head.rsv & RSV1 != 0);
        self.frame_off = 0;
        self.mask = head.mask;
        match head.opcode {
            opcode::TEXT | opcode::BINARY => {
                if let Some(b) = self.bucket.as_mut()
                    && !b.take()
                {
                    return Err(Violation::TooFast);
                }
                self.message = 0;
                self.wire = 0;
                if head.rsv != 0 && self.deflate == Deflate::Other {
                    return Err(Violation::BadCompression);
                }
                self.compressed = rsv1 && matches!(self.deflate, Deflate::On { .. });
                if self.compressed {
                    let inflater = self.inflater.get_or_insert_with(|| {
                        Box::new(Inflater {
                            stream: Stream {
                                d: Decompress::new(false),
                                ended: false,
                                after: false,
                                out: [0; SCRATCH],
                            },
                            plain: [0; 1024],
                        })
                    });
                    inflater
                        .stream
                        .begin_message(self.deflate == Deflate::On { reset: true });
                }
            }
            opcode::CONTINUATION => {}
            _ => {
                // Not part of a message (control frames should be 125 bytes
                // at most, and reserved opcodes not be there at all: the
                // backend's to judge), but no bigger than one either.
                self.data_frame = false;
                return if len > self.max {
                    Err(Violation::TooBig)
                } else {
                    Ok(())
                };
            }
        }
        self.data_frame = true;
        self.fin = fin;
        if self.compressed {
            self.wire = self.wire.saturating_add(len);
            if self.wire > self.max_wire() {
                return Err(Violation::TooBig);
            }
        } else {
            self.message = self.message.saturating_add(len);
            if self.message > self.max {
                return Err(Violation::TooBig);
            }
        }
        Ok(())
    }

    /// The next `piece` of the current frame's payload.
    pub fn payload(&mut self, piece: &[u8]) -> Result<(), Violation> {
        if !(self.data_frame && self.compressed) {
            return Ok(());
        }
        let Some(inf) = self.inflater.as_deref_mut() else {
            return Ok(());
        };
        let Inflater { stream, plain } = inf;
        for chunk in piece.chunks(plain.len()) {
            let plain = &mut plain[..chunk.len()];
            plain.copy_from_slice(chunk);
            if let Some(key) = self.mask {
                frame::apply_mask(plain, key, self.frame_off);
            }
            self.frame_off += chunk.len() as u64;
            stream.inflate(plain, FlushDecompress::None, &mut self.message, self.max)?;
        }
        Ok(())
    }

    /// The current frame's payload is complete.
    pub fn frame_end(&mut self) -> Result<(), Violation> {
        if !(self.data_frame && self.fin && self.compressed) {
            return Ok(());
        }
        match self.inflater.as_deref_mut() {
            // Receivers append the tail to every message (RFC 7692, 7.2.2),
            // but one whose stream ended there ignores it.
            Some(Inflater { stream, .. }) if !stream.ended || stream.after => stream.inflate(
                &DEFLATE_TAIL,
                FlushDecompress::Sync,
                &mut self.message,
                self.max,
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress, Status};

    const ON: Deflate = Deflate::On { reset: false };

    /// A client frame header (masked with `key`).
    fn header(first: u8, len: usize, key: [u8; 4]) -> Vec<u8> {
        let mut h = vec![first];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=65535 => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        h.extend_from_slice(&key);
        h
    }

    fn mask(data: &[u8], key: [u8; 4]) -> Vec<u8> {
        data.iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect()
    }

    /// One message as permessage-deflate sends it: sync-flushed, the tail
    /// removed.
    fn deflate(c: &mut Compress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Sync)
            .expect("compress");
        while out.len() == out.capacity() {
            out.reserve(1024);
            c.compress_vec(&[], &mut out, FlushCompress::Sync)
                .expect("compress");
        }
        assert!(out.ends_with(&DEFLATE_TAIL));
        out.truncate(out.len() - 4);
        out
    }

    /// Feeds a whole frame, its payload in pieces of `step` bytes.
    fn frame(l: &mut Limits, first: u8, payload: &[u8], step: usize) -> Result<(), Violation> {
        let key = [0x11, 0x22, 0x33, 0x44];
        l.header(&header(first, payload.len(), key), payload.len() as u64)?;
        let masked = mask(payload, key);
        for piece in masked.chunks(step.max(1)) {
            l.payload(piece)?;
        }
        l.frame_end()
    }

    #[test]
    fn sizes_add_up_over_fragments_and_reset_per_message() {
        let mut l = Limits::new(10, None, Deflate::Off);
        assert_eq!(frame(&mut l, 0x01, b"12345", 5), Ok(())); // text, not final
        assert_eq!(frame(&mut l, 0x89, b"ping", 4), Ok(())); // control between
        assert_eq!(frame(&mut l, 0x80, b"67890", 5), Ok(())); // last: 10 bytes
        assert_eq!(frame(&mut l, 0x82, b"0123456789", 3), Ok(())); // new message
        assert_eq!(frame(&mut l, 0x02, b"012345", 6), Ok(()));
        assert_eq!(frame(&mut l, 0x80, b"01234", 5), Err(Violation::TooBig));
    }

    #[test]
    fn the_rate_counts_messages_not_fragments_or_control_frames() {
        let mut l = Limits::new(1000, Some((0.001, 2.0)), Deflate::Off);
        assert_eq!(frame(&mut l, 0x01, b"a", 1), Ok(()));
        assert_eq!(frame(&mut l, 0x00, b"b", 1), Ok(()));
        assert_eq!(frame(&mut l, 0x80, b"c", 1), Ok(()));
        assert_eq!(frame(&mut l, 0x89, b"", 1), Ok(()));
        assert_eq!(frame(&mut l, 0x81, b"d", 1), Ok(()));
        assert_eq!(frame(&mut l, 0x81, b"e", 1), Err(Violation::TooFast));
    }

    #[test]
    fn compressed_messages_are_measured_inflated() {
        let mut c = Compress::new(Compression::default(), false);
        let mut l = Limits::new(10_000, None, ON);
        // 9,000 bytes that compress to a few dozen: allowed, several times
        // (the window carries over from message to message).
        let ok = deflate(&mut c, &[b'a'; 9000]);
        assert!(ok.len() < 100, "{}", ok.len());
        for step in [1, 7, 4096] {
            assert_eq!(frame(&mut l, 0xc1, &ok, step), Ok(()));
        }
        // Fragmented: RSV1 on the first frame only.
        let again = deflate(&mut c, &[b'b'; 5000]);
        let (x, y) = again.split_at(again.len() / 2);
        assert_eq!(frame(&mut l, 0x41, x, 3), Ok(()));
        assert_eq!(frame(&mut l, 0x80, y, 3), Ok(()));
        // 20,000 bytes inflated: over, though tiny on the wire.
        let bomb = deflate(&mut c, &[b'c'; 20_000]);
        assert!(bomb.len() < 100);
        assert_eq!(frame(&mut l, 0xc2, &bomb, 5), Err(Violation::TooBig));
    }

    #[test]
    fn uncompressed_messages_on_a_deflate_connection_count_as_sent() {
        let mut l = Limits::new(10, None, ON);
        assert_eq!(frame(&mut l, 0x81, b"0123456789", 2), Ok(()));
        assert_eq!(
            frame(&mut l, 0x81, b"0123456789x", 2),
            Err(Violation::TooBig)
        );
    }

    /// A message that inflates past the limit and then turns out not to
    /// inflate is too big, however the reads cut it: what came out before
    /// the bad data is counted first.
    #[test]
    fn too_big_before_bad_data_is_too_big_in_one_piece_or_many() {
        let mut c = Compress::new(Compression::default(), false);
        // 2,000 bytes inflated (less than one call's scratch space, so
        // that the bad data comes in the same call), then a block of the
        // reserved type 3.
        let mut payload = deflate(&mut c, &[b'a'; 2000]);
        payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        for step in [payload.len(), 1] {
            let mut l = Limits::new(1000, None, ON);
            assert_eq!(
                frame(&mut l, 0xc1, &payload, step),
                Err(Violation::TooBig),
                "in pieces of {step}"
            );
        }
    }

    #[test]
    fn garbage_that_does_not_inflate_is_refused() {
        let mut l = Limits::new(10_000, None, ON);
        // A block type of 3 is reserved: invalid deflate data.
        assert_eq!(
            frame(&mut l, 0xc1, &[0xff, 0xff, 0xff, 0xff], 4),
            Err(Violation::BadCompression)
        );
    }

    #[test]
    fn a_compressed_message_is_bounded_on_the_wire_too() {
        // Empty stored blocks inflate to nothing, at 5 bytes each.
        let mut l = Limits::new(10_000, None, ON);
        let padding = [0u8, 0, 0, 0xff, 0xff].repeat(5000);
        assert_eq!(frame(&mut l, 0xc2, &padding, 4096), Err(Violation::TooBig));
        assert_eq!(l.message, 0, "refused on the header, before inflating");
    }

    #[test]
    fn what_follows_a_final_block_is_measured_as_a_new_stream() {
        let mut l = Limits::new(10_000, None, ON);
        let mut c = Compress::new(Compression::default(), false);
        let mut bomb = Vec::with_capacity(4096);
        c.compress_vec(&[b'c'; 100_000], &mut bomb, FlushCompress::Finish)
            .expect("compress");
        // An empty final block, then a second stream.
        let payload = [vec![0x03, 0x00], bomb].concat();
        assert_eq!(frame(&mut l, 0xc2, &payload, 4096), Err(Violation::TooBig));
    }

    #[test]
    fn a_final_block_with_a_trailing_empty_block_is_fine() {
        // RFC 7692, 7.2.3.3: "Hello" in a final block, then 0x00.
        let hello = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        let mut l = Limits::new(100, None, ON);
        for _ in 0..3 {
            assert_eq!(frame(&mut l, 0xc1, &hello, 3), Ok(()));
            assert_eq!(l.message, 5);
        }
    }

    #[test]
    fn huge_lengths_do_not_wrap_around() {
        let key = [1, 2, 3, 4];
        let mut l = Limits::new(10, None, Deflate::Off);
        assert_eq!(l.header(&header(0x01, 10, key), 10), Ok(()));
        let len = u64::MAX - 5;
        assert_eq!(
            l.header(
                &header(0x80, 200_000, key)[..2]
                    .iter()
                    .copied()
                    .chain([0u8; 8])
                    .chain(key)
                    .collect::<Vec<_>>(),
                len
            ),
            Err(Violation::TooBig)
        );
    }

    #[test]
    fn other_frames_are_held_to_the_size_limit_too() {
        let mut l = Limits::new(1000, None, Deflate::Off);
        // Invalid, but the backend's to refuse.
        assert_eq!(frame(&mut l, 0x89, &[0; 126], 126), Ok(()));
        assert_eq!(frame(&mut l, 0x83, b"x", 1), Ok(()));
        assert_eq!(
            frame(&mut l, 0x89, &[0; 1001], 1001),
            Err(Violation::TooBig)
        );
        let mut l = Limits::new(1000, None, Deflate::Off);
        assert_eq!(
            frame(&mut l, 0x8b, &[0; 1001], 1001),
            Err(Violation::TooBig)
        );
    }

    #[test]
    fn the_inflater_is_only_made_for_a_compressed_message() {
        let mut l = Limits::new(10_000, None, ON);
        assert_eq!(frame(&mut l, 0x81, b"plain", 5), Ok(()));
        assert!(l.inflater.is_none());
        let mut c = Compress::new(Compression::default(), false);
        assert_eq!(frame(&mut l, 0xc1, &deflate(&mut c, b"packed"), 5), Ok(()));
        assert!(l.inflater.is_some());
    }

    /// A receiver as RFC 7692 describes it: one inflater for the
    /// connection, the tail appended to every message; returns what the
    /// message inflated to (nothing after a final block).
    fn receiver(d: &mut flate2::Decompress, payload: &[u8]) -> u64 {
        let input = [payload, &DEFLATE_TAIL[..]].concat();
        let (mut rest, mut made, mut out) = (&input[..], 0, vec![0u8; 1 << 16]);
        loop {
            let (i0, o0) = (d.total_in(), d.total_out());
            let status = d
                .decompress(rest, &mut out, FlushDecompress::Sync)
                .expect("the receiver inflates");
            rest = &rest[(d.total_in() - i0) as usize..];
            let m = d.total_out() - o0;
            made += m;
            let stalled = d.total_in() == i0 && m == 0;
            if status == Status::StreamEnd || stalled || rest.is_empty() && m < out.len() as u64 {
                return made;
            }
        }
    }

    /// A stored block of `raw` (not final), then the first byte of the next.
    fn stored(raw: &[u8]) -> Vec<u8> {
        let n = raw.len() as u16;
        [
            &[0x00][..],
            &n.to_le_bytes(),
            &(!n).to_le_bytes(),
            raw,
            &[0x00],
        ]
        .concat()
    }

    /// An empty compressed message leaves a receiver inside a stored block
    /// (the tail it appends starts one); the proxy must read the bytes that
    /// follow as the receiver does, or a client can hide a bomb in what the
    /// proxy takes for stored bytes.
    #[test]
    fn an_empty_compressed_message_is_read_as_the_backend_reads_it() {
        let max = 10_000;
        let mut l = Limits::new(max, None, ON);
        let mut backend = flate2::Decompress::new(false);
        assert_eq!(frame(&mut l, 0xc1, &[], 1), Ok(()));
        assert_eq!(receiver(&mut backend, &[]), 0);
        // Fill the receiver's 0xff00-byte stored block with what the proxy
        // would take for whole stored blocks, then a bomb that the proxy
        // would see stored and the receiver inflate.
        let mut left: i64 = 0xff00;
        let mut first = true;
        while left != 5 {
            let overhead = if first { 9 } else { 10 };
            let len = (left - 5 - overhead).min(9000) as usize;
            let p = stored(&vec![b'x'; len]);
            if frame(&mut l, 0xc2, &p, 1000).is_err() {
                return; // the proxy saw through it
            }
            receiver(&mut backend, &p);
            left -= len as i64 + overhead;
            first = false;
        }
        let mut c = Compress::new(Compression::best(), false);
        let mut bomb = Vec::with_capacity(64 * 1024);
        c.compress_vec(&vec![0u8; 8 << 20], &mut bomb, FlushCompress::Sync)
            .expect("compress");
        let p = stored(&bomb);
        let proxy = frame(&mut l, 0xc2, &p, 1000);
        let inflated = receiver(&mut backend, &p);
        assert!(
            proxy.is_err() || inflated <= max,
            "the proxy let through what the backend inflates to {inflated} bytes"
        );
    }

    /// With client_no_context_takeover the backend inflates each message
    /// afresh, and so must the proxy: else an empty message leaves it
    /// inside a stored block that the backend has forgotten, and a bomb
    /// behind it looks stored to the proxy alone.
    #[test]
    fn without_context_takeover_each_message_is_read_afresh() {
        let max = 10_000;
        let mut l = Limits::new(max, None, Deflate::On { reset: true });
        let fresh_receiver =
            |payload: &[u8]| receiver(&mut flate2::Decompress::new(false), payload);
        assert_eq!(frame(&mut l, 0xc1, &[], 1), Ok(()));
        let mut c = Compress::new(Compression::best(), false);
        let bomb = deflate(&mut c, &vec![0u8; 8 << 20]);
        let p = [&[0x00, 0x00, 0x00, 0xff, 0xff][..], &bomb].concat();
        let proxy = frame(&mut l, 0xc2, &p, 1000);
        let inflated = fresh_receiver(&p);
        assert!(inflated > max);
        assert_eq!(proxy, Err(Violation::TooBig));
    }

    #[test]
    fn reserved_bits_under_an_unknown_extension_are_refused() {
        let mut l = Limits::new(10_000, None, Deflate::Other);
        assert_eq!(frame(&mut l, 0x81, b"plain", 5), Ok(()));
        assert_eq!(
            frame(&mut l, 0xc1, b"packed?", 5),
            Err(Violation::BadCompression)
        );
        // Without any extension they are the backend's to refuse.
        let mut l = Limits::new(10_000, None, Deflate::Off);
        assert_eq!(frame(&mut l, 0xc1, b"packed?", 5), Ok(()));
    }

    #[test]
    fn one_final_block_a_message_is_enough() {
        let mut l = Limits::new(10_000, None, ON);
        for _ in 0..3 {
            assert_eq!(frame(&mut l, 0xc1, &[0x03, 0x00], 2), Ok(()));
        }
        // Each final block resets the inflater, which clears its window.
        assert_eq!(
            frame(&mut l, 0xc1, &[0x03, 0x00].repeat(1000), 100),
            Err(Violation::BadCompression)
        );
    }

    #[test]
    fn a_message_flushed_fragment_by_fragment_fits() {
        // Some senders sync-flush each fragment (about 6 bytes each on the
        // wire) and strip the tail from the last one only.
        let mut l = Limits::new(2000, None, ON);
        let mut c = Compress::new(Compression::default(), false);
        let flushed = |c: &mut Compress, data: &[u8]| {
            let mut out = Vec::with_capacity(data.len() + 64);
            c.compress_vec(data, &mut out, FlushCompress::Sync)
                .expect("compress");
            out
        };
        let first = flushed(&mut c, &[b'a'; 1024]);
        assert_eq!(frame(&mut l, 0x41, &first, 64), Ok(()));
        for i in 0..400u16 {
            let mut f = flushed(&mut c, &[b'0' + (i % 10) as u8]);
            let last = i == 399;
            if last {
                f.truncate(f.len() - 4);
            }
            assert_eq!(
                frame(&mut l, if last { 0x80 } else { 0x00 }, &f, 64),
                Ok(()),
                "{i}"
            );
        }
        assert_eq!(l.message, 1424);
    }

    #[test]
    fn a_final_block_starts_the_next_message_afresh() {
        let mut l = Limits::new(10_000, None, ON);
        for _ in 0..3 {
            // A whole zlib-less stream per message (no context takeover,
            // ended with a final block), as some senders do.
            let mut c = Compress::new(Compression::default(), false);
            let mut out = Vec::with_capacity(256);
            c.compress_vec(&[b'z'; 3000], &mut out, FlushCompress::Finish)
                .expect("compress");
            assert_eq!(frame(&mut l, 0xc1, &out, 16), Ok(()));
            assert_eq!(l.message, 3000);
        }
    }
}
