//! The tunnel's frame-header scanner (`FrameScan`) and a limited route's
//! checks (`Limits`), on any byte stream cut anywhere.
//!
//! Input (see `fuzz/make_corpus.py`):
//! - byte 0: bits 0-1 the extension (0 none, 1 permessage-deflate, 2 the
//!   same with client_no_context_takeover, 3 another one), bit 2 a rate
//!   limit (burst: bits 3-5, plus 1);
//! - bytes 1-2: the size limit, 16 plus a little-endian u16 times 4;
//! - byte 3: how many cuts follow; then one byte each, the length of a
//!   piece of the stream (0: a read of nothing);
//! - the rest: the client's byte stream.
//!
//! Checked: the scanner finds the same frames and boundaries however the
//! stream is cut, as a plain parse of the whole stream does; `to_boundary`
//! agrees; `Limits`, driven as the tunnel drives it, never panics and
//! reaches the same verdict on the same frame however the stream is cut.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::upstream::frame::FrameScan;
use wsproxy::upstream::limits::{Deflate, Limits, Violation};

/// Frames as a plain parse of the whole stream sees them.
struct Reference {
    /// Offsets at which a frame header ends.
    header_ends: Vec<usize>,
    /// Offsets at which a frame (header and payload) ends, within the
    /// stream; with 0, the offsets that are boundaries.
    boundaries: Vec<usize>,
    /// Payload ranges (start, end), the last maybe past the stream's end.
    payloads: Vec<(usize, u128)>,
    /// Offset just past the header of the first close frame.
    close_at: Option<usize>,
}

fn reference(s: &[u8]) -> Reference {
    let mut r = Reference {
        header_ends: Vec::new(),
        boundaries: vec![0],
        payloads: Vec::new(),
        close_at: None,
    };
    let mut pos = 0usize;
    while pos + 2 <= s.len() {
        let b1 = s[pos + 1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let hl = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
        if pos + hl > s.len() {
            break;
        }
        let len: u64 = match ext {
            2 => u64::from(u16::from_be_bytes([s[pos + 2], s[pos + 3]])),
            8 => u64::from_be_bytes(s[pos + 2..pos + 10].try_into().expect("8 bytes")),
            _ => u64::from(b1 & 0x7f),
        };
        let header_end = pos + hl;
        r.header_ends.push(header_end);
        if s[pos] & 0x0f == 0x8 && r.close_at.is_none() {
            r.close_at = Some(header_end);
        }
        let end = header_end as u128 + u128::from(len);
        r.payloads.push((header_end, end));
        if end > s.len() as u128 {
            break;
        }
        pos = end as usize;
        r.boundaries.push(pos);
    }
    r
}

impl Reference {
    fn is_boundary(&self, at: usize) -> bool {
        self.boundaries.binary_search(&at).is_ok()
    }

    /// Payload bytes left of the frame in progress at `at`.
    fn remaining(&self, at: usize) -> u64 {
        let i = self.payloads.partition_point(|&(start, _)| start <= at);
        match i.checked_sub(1).map(|i| self.payloads[i]) {
            Some((_, end)) if (at as u128) < end => (end - at as u128) as u64,
            _ => 0,
        }
    }

    fn headers_in(&self, from: usize, to: usize) -> u64 {
        let lo = self.header_ends.partition_point(|&e| e <= from);
        let hi = self.header_ends.partition_point(|&e| e <= to);
        (hi - lo) as u64
    }

    /// What `to_boundary` must say at `at` of a read ending at `end`.
    fn to_boundary(&self, at: usize, end: usize) -> usize {
        if self.is_boundary(at) {
            return 0;
        }
        let i = self.boundaries.partition_point(|&b| b <= at);
        match self.boundaries.get(i) {
            Some(&b) if b <= end => b - at,
            _ => end - at,
        }
    }
}

/// Feeds `piece` as the limited pump does (`check_and_emit`): header bytes
/// one by one, each complete header to `Limits::header`, payload pieces to
/// `Limits::payload`, then `Limits::frame_end`. Returns the first
/// violation, with how many headers the scanner had completed by then.
fn drive(
    scan: &mut FrameScan,
    limits: &mut Limits,
    headers: &mut u64,
    piece: &[u8],
) -> Result<(), (Violation, u64)> {
    let mut off = 0;
    while off < piece.len() {
        if scan.remaining() > 0 {
            let n = scan.remaining().min((piece.len() - off) as u64) as usize;
            let payload = &piece[off..off + n];
            scan.feed(payload);
            let mut check = limits.payload(payload);
            if check.is_ok() && scan.remaining() == 0 {
                check = limits.frame_end();
            }
            check.map_err(|v| (v, *headers))?;
            off += n;
            continue;
        }
        off += 1;
        if scan.feed(&piece[off - 1..off]) == 0 {
            continue;
        }
        *headers += 1;
        let header = scan.last_header();
        assert!((2..=14).contains(&header.len()));
        let mut check = limits.header(header, scan.remaining());
        if check.is_ok() && scan.remaining() == 0 {
            check = limits.frame_end();
        }
        check.map_err(|v| (v, *headers))?;
    }
    Ok(())
}

struct Setup {
    deflate: Deflate,
    rate: Option<(f64, f64)>,
    max: u64,
}

impl Setup {
    fn limits(&self) -> Limits {
        Limits::new(self.max, self.rate, self.deflate)
    }
}

/// Runs `Limits` over the stream in the given pieces; the first violation.
fn verdict(setup: &Setup, pieces: &[&[u8]]) -> Option<(Violation, u64)> {
    let (mut scan, mut limits, mut headers) = (FrameScan::default(), setup.limits(), 0);
    pieces
        .iter()
        .try_for_each(|p| drive(&mut scan, &mut limits, &mut headers, p))
        .err()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let deflate = match data[0] & 3 {
        0 => Deflate::Off,
        1 => Deflate::On { reset: false },
        2 => Deflate::On { reset: true },
        _ => Deflate::Other,
    };
    // A rate so low that no token comes back while the input runs: the
    // burst alone decides, the same way each time.
    let rate = (data[0] & 4 != 0).then(|| (1e-6, f64::from((data[0] >> 3) & 7) + 1.0));
    let max = 16 + 4 * u64::from(u16::from_le_bytes([data[1], data[2]]));
    let setup = Setup { deflate, rate, max };
    let cuts = usize::from(data[3]).min(data.len() - 4);
    let (lengths, stream) = data[4..].split_at(cuts);

    // The pieces: the given lengths, then the rest.
    let mut pieces = Vec::with_capacity(lengths.len() + 1);
    let mut at = 0;
    for &n in lengths {
        let n = usize::from(n).min(stream.len() - at);
        pieces.push(&stream[at..at + n]);
        at += n;
    }
    pieces.push(&stream[at..]);

    let r = reference(stream);

    // In one piece.
    let mut whole = FrameScan::default();
    assert_eq!(whole.feed(stream), r.header_ends.len() as u64);
    assert_eq!(whole.at_boundary(), r.is_boundary(stream.len()));
    assert_eq!(whole.remaining(), r.remaining(stream.len()));
    assert_eq!(whole.saw_close(), r.close_at.is_some());

    // Cut, with every intermediate state checked.
    let mut cut = FrameScan::default();
    let mut at = 0;
    for piece in &pieces {
        let end = at + piece.len();
        assert_eq!(cut.to_boundary(piece), r.to_boundary(at, end), "at {at}");
        assert_eq!(cut.feed(piece), r.headers_in(at, end), "{at}..{end}");
        at = end;
        assert_eq!(cut.at_boundary(), r.is_boundary(at), "at {at}");
        assert_eq!(cut.remaining(), r.remaining(at), "at {at}");
        assert_eq!(
            cut.saw_close(),
            r.close_at.is_some_and(|c| c <= at),
            "at {at}"
        );
    }
    assert_eq!(cut, whole, "the same state, however the stream is cut");

    // Limits: the same verdict, on the same frame, in one piece, in the
    // given pieces, and byte by byte (for short streams).
    let one = verdict(&setup, &[stream]);
    assert_eq!(verdict(&setup, &pieces), one, "{pieces:02x?}");
    if stream.len() <= 512 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdict(&setup, &bytes), one, "byte by byte");
    }
    // The extension header a backend answers with: never a panic.
    let _ = Deflate::negotiated(std::str::from_utf8(stream).ok());
});
