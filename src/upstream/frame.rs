//! The WebSocket frame format (RFC 6455, 5.2), as far as the proxy reads and
//! writes it: a header's length and fields, masking, the close frames the
//! proxy sends, and [`FrameScan`], which follows frame boundaries in a byte
//! stream.
//!
//! Only bytes: nothing here does I/O, keeps a stream, or knows a route or a
//! limit. [`super::tunnel`] and [`super::limits`] read frames through it.

/// The opcodes the proxy tells apart (the low four bits of a header's first
/// byte).
pub mod opcode {
    /// Continues a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// The first frame of a text message.
    pub const TEXT: u8 = 0x1;
    /// The first frame of a binary message.
    pub const BINARY: u8 = 0x2;
    /// A close frame.
    pub const CLOSE: u8 = 0x8;
}

/// First byte: the last frame of a message.
const FIN: u8 = 0x80;
/// First byte: RSV1, which permessage-deflate sets on a compressed
/// message's first frame.
pub const RSV1: u8 = 0x40;
/// First byte: the three reserved bits, RSV1 to RSV3.
const RSV: u8 = 0x70;
/// First byte: the opcode.
const OPCODE: u8 = 0x0f;
/// Second byte: the payload is masked (a client's always is).
const MASKED: u8 = 0x80;
/// Second byte: the payload length, or 126 / 127 for a 16 / 64-bit length
/// that follows.
const LEN: u8 = 0x7f;

/// Length of a frame header, from its second byte.
fn header_len(b1: u8) -> usize {
    let base = match b1 & LEN {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    if b1 & MASKED != 0 { base + 4 } else { base }
}

/// What a complete frame header says besides its payload length (which
/// [`FrameScan`] reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The last frame of its message.
    pub fin: bool,
    /// The reserved bits, where they stand in the first byte (see
    /// [`RSV1`]).
    pub rsv: u8,
    /// See [`opcode`].
    pub opcode: u8,
    /// The masking key, if the payload is masked.
    pub mask: Option<[u8; 4]>,
}

impl Header {
    /// Reads a complete header, masking key included, as
    /// [`FrameScan::last_header`] gives it.
    pub fn parse(h: &[u8]) -> Self {
        let b0 = h.first().copied().unwrap_or(0);
        let masked = h.get(1).is_some_and(|b1| b1 & MASKED != 0);
        Self {
            fin: b0 & FIN != 0,
            rsv: b0 & RSV,
            opcode: b0 & OPCODE,
            // The key is the header's last four bytes.
            mask: masked.then(|| h.last_chunk::<4>().copied()).flatten(),
        }
    }
}

/// Masks `data` with `key`, or unmasks it (the same XOR); `data` starts
/// `offset` bytes into a frame's payload, as the key runs from its first
/// byte.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let start = (offset % 4) as usize;
    for (b, k) in data.iter_mut().zip(key.iter().cycle().skip(start)) {
        *b ^= k;
    }
}

/// A close frame with `code` and `reason` (at most 123 bytes), masked with
/// a random key when it goes to a backend (a client's frames always are).
pub(super) fn close_frame(code: u16, reason: &[u8], masked: bool) -> Vec<u8> {
    let len = 2 + reason.len();
    let mut f = Vec::with_capacity(6 + len);
    f.push(FIN | opcode::CLOSE);
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    if masked {
        let key: [u8; 4] = rand::random();
        f.push(MASKED | len as u8);
        f.extend_from_slice(&key);
        apply_mask(&mut payload, key, 0);
    } else {
        f.push(len as u8);
    }
    f.extend_from_slice(&payload);
    f
}

/// Follows WebSocket frame boundaries in a byte stream without keeping the
/// stream: it only remembers the header being read (at most 14 bytes) and
/// how much payload is left of the current frame.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FrameScan {
    header: [u8; 14],
    have: u8,
    remaining: u64,
    /// A close frame has gone by.
    saw_close: bool,
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
                self.remaining = match h[1] & LEN {
                    126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                    127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                    n => u64::from(n),
                };
                if h[0] & OPCODE == opcode::CLOSE {
                    self.saw_close = true;
                }
                self.have = 0;
                frames += 1;
            }
        }
        frames
    }

    /// How many bytes of `data` reach the end of the current frame (0 when
    /// already between frames; all of it when the frame goes on past it).
    pub fn to_boundary(&self, data: &[u8]) -> usize {
        let mut probe = self.clone();
        let mut off = 0;
        while off < data.len() && !probe.at_boundary() {
            // Whole payload runs at once, header bytes one by one.
            let step = if probe.remaining > 0 {
                probe.remaining.min((data.len() - off) as u64) as usize
            } else {
                1
            };
            probe.feed(&data[off..off + step]);
            off += step;
        }
        off
    }

    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Payload bytes left of the current frame (0 between frames and
    /// inside a header).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The bytes read so far of a header not yet complete (none between
    /// frames and inside a payload).
    pub fn partial_header(&self) -> &[u8] {
        &self.header[..usize::from(self.have)]
    }

    /// The header [`Self::feed`] completed last (whole, masking key
    /// included), as [`super::limits::Limits::header`] takes it; only
    /// meaningful right after a feed that completed one and read no byte
    /// of the next header (as the limited pump feeds headers byte by byte).
    pub fn last_header(&self) -> &[u8] {
        &self.header[..header_len(self.header[1])]
    }

    /// A close frame's header has gone by.
    pub fn saw_close(&self) -> bool {
        self.saw_close
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A frame as a client (masked) or server would send it.
    pub(in crate::upstream) fn frame(opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
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
    fn the_distance_to_the_next_boundary_is_found() {
        let big = frame(0x2, 300, false); // 4-byte header + 300
        let mut scan = FrameScan::default();
        assert_eq!(scan.to_boundary(&big), 0, "between frames already");
        scan.feed(&big[..1]);
        assert_eq!(
            scan.to_boundary(&big[1..]),
            big.len() - 1,
            "inside the header"
        );
        scan.feed(&big[1..10]);
        let mut rest = big[10..].to_vec();
        rest.extend(frame(0x1, 5, false));
        assert_eq!(
            scan.to_boundary(&rest),
            big.len() - 10,
            "inside the payload"
        );
        assert_eq!(scan.to_boundary(&rest[..20]), 20, "the frame goes on");
        scan.feed(&big[10..]);
        assert_eq!(
            scan.to_boundary(&rest[big.len() - 10..]),
            0,
            "between frames"
        );
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

    #[test]
    fn a_header_says_its_bits_and_key() {
        let h = Header::parse(&frame(opcode::BINARY, 300, true)[..8]);
        assert_eq!(
            h,
            Header {
                fin: true,
                rsv: 0,
                opcode: opcode::BINARY,
                mask: Some([1, 2, 3, 4])
            }
        );
        let h = Header::parse(&[0x41, 0x05]);
        assert_eq!((h.fin, h.rsv, h.opcode, h.mask), (false, RSV1, 0x1, None));
    }

    #[test]
    fn a_masked_close_frame_unmasks_to_its_code_and_reason() {
        let f = close_frame(1001, b"bye", true);
        assert_eq!(f[..2], [0x88, 0x80 | 5]);
        let Header { mask, .. } = Header::parse(&f[..6]);
        let mut payload = f[6..].to_vec();
        apply_mask(&mut payload, mask.expect("masked"), 0);
        assert_eq!(payload, [0x03, 0xe9, b'b', b'y', b'e']);
        assert_eq!(close_frame(1000, b"", false), [0x88, 2, 0x03, 0xe8]);
        // Masking is the same XOR, wherever in the payload a piece starts.
        let mut piece = payload[3..].to_vec();
        apply_mask(&mut piece, [9, 8, 7, 6], 3);
        apply_mask(&mut piece, [9, 8, 7, 6], 7);
        assert_eq!(piece, payload[3..]);
    }
}
