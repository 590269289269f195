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
//!   will inflate, not the wire size; inflating stops at the limit, so a
//!   small compressed "bomb" costs no more than a message of the limit.

use flate2::{Decompress, FlushDecompress, Status};

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
            Violation::TooBig => (1009, "message too big"),
            Violation::TooFast => (1008, "message rate limit exceeded"),
            Violation::BadCompression => (1007, "invalid compressed data"),
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

/// The permessage-deflate tail a sender strips from each message
/// (RFC 7692, 7.2.2); the receiver appends it before inflating the end.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Inflated output goes through this much stack at a time, and is dropped.
const SCRATCH: usize = 4096;

/// Limits on one connection's client-to-backend messages.
#[derive(Debug)]
pub struct Limits {
    max: u64,
    bucket: Option<Bucket>,
    /// Present when permessage-deflate was negotiated: inflates compressed
    /// messages to measure them (its window carries over between messages,
    /// as the sender's does unless it resets it).
    inflater: Option<Box<Decompress>>,
    /// The inflater's stream ended (a final block): start afresh.
    inflater_ended: bool,
    /// Payload bytes of the current message so far (inflated, if it is
    /// compressed).
    message: u64,
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
    /// `deflate` when the connection negotiated permessage-deflate.
    pub fn new(max: u64, rate: Option<(f64, f64)>, deflate: bool) -> Self {
        Self {
            max,
            bucket: rate.map(|(rate, burst)| Bucket {
                rate,
                burst,
                tokens: burst,
                last: std::time::Instant::now(),
            }),
            inflater: deflate.then(|| Box::new(Decompress::new(false))),
            inflater_ended: false,
            message: 0,
            compressed: false,
            data_frame: false,
            fin: false,
            mask: None,
            frame_off: 0,
        }
    }

    /// A frame header (complete) whose payload is `len` bytes.
    pub fn header(&mut self, h: &[u8], len: u64) -> Result<(), Violation> {
        let (fin, rsv1, opcode) = (h[0] & 0x80 != 0, h[0] & 0x40 != 0, h[0] & 0x0f);
        self.frame_off = 0;
        self.mask = (h[1] & 0x80 != 0).then(|| {
            let k = &h[h.len() - 4..];
            [k[0], k[1], k[2], k[3]]
        });
        match opcode {
            1 | 2 => {
                if let Some(b) = self.bucket.as_mut()
                    && !b.take()
                {
                    return Err(Violation::TooFast);
                }
                self.message = 0;
                self.compressed = rsv1 && self.inflater.is_some();
                if self.compressed
                    && std::mem::take(&mut self.inflater_ended)
                    && let Some(d) = self.inflater.as_mut()
                {
                    d.reset(false);
                }
            }
            0 => {}
            _ => {
                // Control frames are small (125 bytes at most, which the
                // backend checks) and not part of a message.
                self.data_frame = false;
                return Ok(());
            }
        }
        self.data_frame = true;
        self.fin = fin;
        if !self.compressed {
            self.message += len;
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
        let mut plain = [0u8; 1024];
        for chunk in piece.chunks(plain.len()) {
            let out = &mut plain[..chunk.len()];
            out.copy_from_slice(chunk);
            if let Some(key) = self.mask {
                // The key runs from the frame's first payload byte.
                let start = (self.frame_off % 4) as usize;
                for (i, b) in out.iter_mut().enumerate() {
                    *b ^= key[(start + i) % 4];
                }
            }
            self.frame_off += chunk.len() as u64;
            self.inflate(&plain[..chunk.len()], FlushDecompress::None)?;
        }
        Ok(())
    }

    /// The current frame's payload is complete.
    pub fn frame_end(&mut self) -> Result<(), Violation> {
        if self.data_frame && self.fin && self.compressed {
            self.inflate(&DEFLATE_TAIL, FlushDecompress::Sync)?;
        }
        Ok(())
    }

    /// Inflates `input` into scratch space, counting what comes out.
    fn inflate(&mut self, mut input: &[u8], flush: FlushDecompress) -> Result<(), Violation> {
        let Some(d) = self.inflater.as_mut() else {
            return Ok(());
        };
        if self.inflater_ended {
            return Ok(()); // bytes after a final block: the backend's to judge
        }
        let mut out = [0u8; SCRATCH];
        loop {
            let (in0, out0) = (d.total_in(), d.total_out());
            let status = d
                .decompress(input, &mut out, flush)
                .map_err(|_| Violation::BadCompression)?;
            let used = (d.total_in() - in0) as usize;
            let made = d.total_out() - out0;
            input = &input[used..];
            self.message += made;
            if self.message > self.max {
                return Err(Violation::TooBig);
            }
            if status == Status::StreamEnd {
                self.inflater_ended = true;
                return Ok(());
            }
            // Done when the input is used up and the output had room to
            // spare (nothing more is waiting inside), or when nothing moves.
            if (input.is_empty() && made < SCRATCH as u64) || (used == 0 && made == 0) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

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
        let mut l = Limits::new(10, None, false);
        assert_eq!(frame(&mut l, 0x01, b"12345", 5), Ok(())); // text, not final
        assert_eq!(frame(&mut l, 0x89, b"ping", 4), Ok(())); // control between
        assert_eq!(frame(&mut l, 0x80, b"67890", 5), Ok(())); // last: 10 bytes
        assert_eq!(frame(&mut l, 0x82, b"0123456789", 3), Ok(())); // new message
        assert_eq!(frame(&mut l, 0x02, b"012345", 6), Ok(()));
        assert_eq!(frame(&mut l, 0x80, b"01234", 5), Err(Violation::TooBig));
    }

    #[test]
    fn the_rate_counts_messages_not_fragments_or_control_frames() {
        let mut l = Limits::new(1000, Some((0.001, 2.0)), false);
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
        let mut l = Limits::new(10_000, None, true);
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
        let mut l = Limits::new(10, None, true);
        assert_eq!(frame(&mut l, 0x81, b"0123456789", 2), Ok(()));
        assert_eq!(
            frame(&mut l, 0x81, b"0123456789x", 2),
            Err(Violation::TooBig)
        );
    }

    #[test]
    fn garbage_that_does_not_inflate_is_refused() {
        let mut l = Limits::new(10_000, None, true);
        // A block type of 3 is reserved: invalid deflate data.
        assert_eq!(
            frame(&mut l, 0xc1, &[0xff, 0xff, 0xff, 0xff], 4),
            Err(Violation::BadCompression)
        );
    }

    #[test]
    fn a_final_block_starts_the_next_message_afresh() {
        let mut l = Limits::new(10_000, None, true);
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
