//! Splits the server's large websocket data frames into fragments of at most
//! [`PIECE`] bytes before tungstenite reads them (RFC 6455 §5.4: without an
//! extension the fragmentation of a message may change on the way).
//!
//! Why: tungstenite reads a frame whole into its read buffer, and once the
//! message is dropped it takes that allocation back as its read buffer for
//! the rest of the link. A single 16 MiB frame (deviceconnect sends each
//! message as one frame) would keep 16 MiB resident until the link ends.
//! Fragments are collected into a buffer of the message's own, freed with
//! it, and the read buffer stays at a few pieces.
//!
//! Everything else passes unchanged, so tungstenite still judges it: control
//! frames, masked frames, reserved bits or opcodes, frames over the message
//! limit, and the HTTP response head before the first frame.

use std::io::{self, Read};

use super::dial::MAX_INBOUND_MESSAGE;

/// Largest fragment handed to tungstenite.
pub const PIECE: usize = 16 * 1024;

/// Rewrites one server→client byte stream; see the module comment.
#[derive(Debug, Default)]
pub struct Reframer {
    /// The HTTP response head is over: frames follow.
    framing: bool,
    /// The head's current line is empty so far (a second line end ends it).
    line_empty: bool,
    /// Stream bytes read ahead and not yet delivered: `raw[lo..]`.
    raw: Vec<u8>,
    lo: usize,
    /// A fragment header being delivered: `out[out_lo..out_hi]`.
    out: [u8; 4],
    out_lo: usize,
    out_hi: usize,
    /// Bytes from the current position that pass unchanged.
    clear: u64,
    /// Payload of the frame being split that is not yet in a fragment.
    split_left: u64,
    /// Whether the frame being split was its message's last.
    split_fin: bool,
}

/// `clear` extended over the whole pass-through frames that start in `data`
/// (the bytes at the current position) where the clear bytes end.
fn clear_over(mut clear: u64, data: &[u8]) -> u64 {
    while let Some(rest) = usize::try_from(clear).ok().and_then(|c| data.get(c..)) {
        match header(rest) {
            Some(h) if !h.split => clear = clear.saturating_add(h.len as u64 + h.payload),
            _ => break,
        }
    }
    clear
}

/// A parsed frame header.
struct Header {
    len: usize,
    payload: u64,
    fin: bool,
    opcode: u8,
    /// Unmasked data frame without reserved bits, over `PIECE` and within
    /// the message limit.
    split: bool,
}

/// The frame header at the start of `b`, or `None` while incomplete.
fn header(b: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (b.first()?, b.get(1)?);
    let (payload, mut len) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])), 4),
        127 => {
            let ext: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(ext), 10)
        }
        short => (u64::from(short), 2),
    };
    let masked = b1 & 0x80 != 0;
    if masked {
        len += 4;
    }
    if b.len() < len {
        return None;
    }
    let opcode = b0 & 0x0f;
    let split = b0 & 0x70 == 0
        && !masked
        && opcode <= 2
        && payload > PIECE as u64
        && payload <= MAX_INBOUND_MESSAGE as u64;
    Some(Header {
        len,
        payload,
        fin: b0 & 0x80 != 0,
        opcode,
        split,
    })
}

impl Reframer {
    /// A reframer for a fresh connection (the response head comes first).
    pub fn new() -> Reframer {
        Reframer::default()
    }

    /// Reads from `inner` into `dst` what tungstenite is to see.
    pub fn read(&mut self, inner: &mut impl Read, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            if self.out_lo < self.out_hi {
                let n = (self.out_hi - self.out_lo).min(dst.len());
                dst[..n].copy_from_slice(&self.out[self.out_lo..self.out_lo + n]);
                self.out_lo += n;
                return Ok(n);
            }
            if self.clear == 0 && self.split_left > 0 {
                let piece = self.split_left.min(PIECE as u64);
                self.split_left -= piece;
                let fin = self.split_left == 0 && self.split_fin;
                self.fragment(fin, 0, piece);
                continue;
            }
            if self.lo < self.raw.len() {
                if self.split_left == 0 {
                    self.clear = clear_over(self.clear, &self.raw[self.lo..]);
                }
                let n = self.take_clear(self.raw.len() - self.lo, dst.len());
                if n > 0 {
                    dst[..n].copy_from_slice(&self.raw[self.lo..self.lo + n]);
                    self.lo += n;
                    if self.lo == self.raw.len() {
                        self.raw.clear();
                        self.lo = 0;
                    }
                    return Ok(n);
                }
                // at a frame header: to split, or not complete yet
                if let Some(h) = header(&self.raw[self.lo..]).filter(|h| h.split) {
                    self.lo += h.len;
                    self.split_left = h.payload - PIECE as u64;
                    self.split_fin = h.fin;
                    self.fragment(false, h.opcode, PIECE as u64);
                    continue;
                }
                self.raw.drain(..self.lo);
                self.lo = 0;
                let n = inner.read(dst)?;
                if n == 0 {
                    // the stream ends inside a header: tungstenite tells
                    self.clear = self.raw.len() as u64;
                } else {
                    self.raw.extend_from_slice(&dst[..n]);
                }
                continue;
            }
            // Nothing read ahead. Within a split frame read at most to the
            // fragment's end, so the next fragment header needs no copying.
            let limit = match usize::try_from(self.clear) {
                Ok(c) if self.split_left > 0 => c.min(dst.len()),
                _ => dst.len(),
            };
            let n = inner.read(&mut dst[..limit])?;
            if n == 0 {
                return Ok(0);
            }
            let k = if self.framing {
                if self.clear < n as u64 && self.split_left == 0 {
                    self.clear = clear_over(self.clear, &dst[..n]);
                }
                self.take_clear(n, n)
            } else {
                self.head(&dst[..n])
            };
            // the rest is looked at again on the next round
            self.raw.extend_from_slice(&dst[k..n]);
            if k > 0 {
                return Ok(k);
            }
        }
    }

    /// Follows the HTTP response head; returns how many of `bytes` belong
    /// to it. A line end right after another (`\r` aside, as httparse reads
    /// it) ends it: tungstenite must keep nothing past it unscanned.
    fn head(&mut self, bytes: &[u8]) -> usize {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if self.line_empty => {
                    self.framing = true;
                    return i + 1;
                }
                b'\n' => self.line_empty = true,
                b'\r' => {}
                _ => self.line_empty = false,
            }
        }
        bytes.len()
    }

    /// Takes up to `avail` and `room` bytes off `clear`; returns how many.
    fn take_clear(&mut self, avail: usize, room: usize) -> usize {
        let n = usize::try_from(self.clear)
            .unwrap_or(usize::MAX)
            .min(avail)
            .min(room);
        self.clear -= n as u64;
        n
    }

    /// Queues a fragment header for `len` payload bytes, which then pass.
    fn fragment(&mut self, fin: bool, opcode: u8, len: u64) {
        self.out[0] = if fin { 0x80 } else { 0 } | opcode;
        if len < 126 {
            self.out[1] = len as u8;
            self.out_hi = 2;
        } else {
            // len <= PIECE < 64 KiB: the 16-bit form
            self.out[1] = 126;
            self.out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            self.out_hi = 4;
        }
        self.out_lo = 0;
        self.clear = len;
    }
}
