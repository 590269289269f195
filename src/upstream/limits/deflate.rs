//! Compressed client messages (permessage-deflate): what the connection
//! agreed on, and the inflater that measures a message as it passes.

use flate2::{Decompress, FlushDecompress, Status};

use super::Violation;

/// What the connection agreed on for the client's compressed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// No extension: frames with reserved bits are the backend's to refuse.
    Off,
    /// permessage-deflate; `reset` when the client resets its compressor
    /// for each message (`client_no_context_takeover`), as the backend then
    /// resets its inflater: the proxy must do the same to read the bytes as
    /// the backend does.
    On { reset: bool },
    /// Some other extension, whose use of the reserved bits the proxy
    /// cannot measure: a data frame with any of them set is refused.
    Other,
}

impl Deflate {
    /// From the backend's `Sec-WebSocket-Extensions` in its 101.
    pub fn negotiated(extensions: Option<&str>) -> Self {
        let Some(x) = extensions.filter(|x| !x.trim().is_empty()) else {
            return Deflate::Off;
        };
        let mut found = None;
        for ext in x.split(',') {
            let mut params = ext.split(';').map(str::trim);
            if params
                .next()
                .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
                && found.is_none()
            {
                let reset = params.any(|p| {
                    p.split('=').next().is_some_and(|k| {
                        k.trim().eq_ignore_ascii_case("client_no_context_takeover")
                    })
                });
                found = Some(Deflate::On { reset });
            } else {
                return Deflate::Other;
            }
        }
        found.unwrap_or(Deflate::Other)
    }
}

/// The permessage-deflate tail a sender strips from each message
/// (RFC 7692, 7.2.2); the receiver appends it before inflating the end.
pub(super) const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Inflated output goes through this much scratch space at a time, and is
/// dropped.
pub(super) const SCRATCH: usize = 4096;

/// Measures compressed messages by inflating them. Allocated at a
/// connection's first compressed message (tens of KiB, with the window).
pub(super) struct Inflater {
    pub(super) stream: Stream,
    /// Unmasked input.
    pub(super) plain: [u8; 1024],
}

/// The inflating stream and where its output goes.
pub(super) struct Stream {
    /// Its window carries over between messages, as the sender's does
    /// unless it resets it.
    pub(super) d: Decompress,
    /// A final block ended the stream in the current message (one may,
    /// for a sender that finishes its stream per message; a second is
    /// refused, so that resets stay bounded at two a message).
    pub(super) ended: bool,
    /// Input was fed after that final block.
    pub(super) after: bool,
    pub(super) out: [u8; SCRATCH],
}

impl Stream {
    /// A new message starts: a sender that resets per message, or that
    /// ended its stream and then fed more, starts anew.
    pub(super) fn begin_message(&mut self, reset: bool) {
        let ended = std::mem::take(&mut self.ended);
        let after = std::mem::take(&mut self.after);
        // A stream that ended with nothing after is fresh already.
        let restart = if ended { after } else { reset };
        if restart {
            self.d.reset(false);
        }
    }

    /// Inflates `input`, adding what comes out to `message`, up to `max`.
    /// What follows a final block is measured as a new stream: a backend
    /// that inflates it would deliver it too.
    pub(super) fn inflate(
        &mut self,
        mut input: &[u8],
        flush: FlushDecompress,
        message: &mut u64,
        max: u64,
    ) -> Result<(), Violation> {
        loop {
            let (in0, out0) = (self.d.total_in(), self.d.total_out());
            let result = self.d.decompress(input, &mut self.out, flush);
            let used = (self.d.total_in() - in0) as usize;
            let made = self.d.total_out() - out0;
            input = &input[used..];
            // What inflated before bad data counts first, so that the
            // verdict does not depend on where the reads cut the message
            // (in one piece, bad data found in the same call as the bytes
            // that pass the limit used to make it BadCompression; in small
            // ones, TooBig).
            *message = message.saturating_add(made);
            if *message > max {
                return Err(Violation::TooBig);
            }
            let status = result.map_err(|_| Violation::BadCompression)?;
            if self.ended && used > 0 {
                self.after = true;
            }
            if status == Status::StreamEnd {
                if self.ended {
                    return Err(Violation::BadCompression);
                }
                self.d.reset(false);
                (self.ended, self.after) = (true, false);
                if input.is_empty() {
                    return Ok(());
                }
                continue;
            }
            // Done when the input is used up and the output had room to
            // spare (nothing more is waiting inside), or when nothing moves.
            if (input.is_empty() && made < SCRATCH as u64) || (used == 0 && made == 0) {
                return Ok(());
            }
        }
    }
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("total_in", &self.stream.d.total_in())
            .field("total_out", &self.stream.d.total_out())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agreed_extension_is_read_from_the_backends_answer() {
        use Deflate::*;
        assert_eq!(Deflate::negotiated(None), Off);
        assert_eq!(Deflate::negotiated(Some(" ")), Off);
        assert_eq!(
            Deflate::negotiated(Some("permessage-deflate")),
            On { reset: false }
        );
        assert_eq!(
            Deflate::negotiated(Some("Permessage-Deflate; server_no_context_takeover")),
            On { reset: false }
        );
        assert_eq!(
            Deflate::negotiated(Some(
                "permessage-deflate; client_max_window_bits=10; client_no_context_takeover"
            )),
            On { reset: true }
        );
        assert_eq!(Deflate::negotiated(Some("x-webkit-deflate-frame")), Other);
        assert_eq!(
            Deflate::negotiated(Some("permessage-deflate, x-custom")),
            Other
        );
    }
}
