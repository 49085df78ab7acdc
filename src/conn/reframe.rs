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
// fragment headers use the 16-bit length form at most
const _: () = assert!(PIECE < 1 << 16);

/// Rewrites one server→client byte stream; see the module comment.
#[derive(Debug)]
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
    /// Fragment size (`PIECE`; smaller for fuzzing).
    piece: u64,
}

/// `clear` extended over the whole pass-through frames that start in `data`
/// (the bytes at the current position) where the clear bytes end.
fn clear_over(mut clear: u64, data: &[u8], piece: u64) -> u64 {
    while let Some(rest) = usize::try_from(clear).ok().and_then(|c| data.get(c..)) {
        match header(rest, piece) {
            // a peer may claim a 2^64-1 byte payload: saturate, never wrap
            Some(h) if !h.split => {
                clear = clear.saturating_add(h.payload.saturating_add(h.len as u64))
            }
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
    /// Unmasked data frame without reserved bits, over the fragment size
    /// and within the message limit.
    split: bool,
}

/// The frame header at the start of `b`, or `None` while incomplete; frames
/// over `piece` bytes are to be split.
fn header(b: &[u8], piece: u64) -> Option<Header> {
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
        && payload > piece
        && payload <= MAX_INBOUND_MESSAGE as u64;
    Some(Header {
        len,
        payload,
        fin: b0 & 0x80 != 0,
        opcode,
        split,
    })
}

impl Default for Reframer {
    fn default() -> Reframer {
        Reframer {
            framing: false,
            line_empty: false,
            raw: Vec::new(),
            lo: 0,
            out: [0; 4],
            out_lo: 0,
            out_hi: 0,
            clear: 0,
            split_left: 0,
            split_fin: false,
            piece: PIECE as u64,
        }
    }
}

impl Reframer {
    /// A reframer for a fresh connection (the response head comes first).
    pub fn new() -> Reframer {
        Reframer::default()
    }

    /// For fuzzing: frames from the first byte (no response head), split
    /// into fragments of `piece` bytes (1 to `PIECE`).
    pub fn frames_only(piece: usize) -> Reframer {
        Reframer {
            framing: true,
            piece: piece.clamp(1, PIECE) as u64,
            ..Reframer::new()
        }
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
                let piece = self.split_left.min(self.piece);
                self.split_left -= piece;
                let fin = self.split_left == 0 && self.split_fin;
                self.fragment(fin, 0, piece);
                continue;
            }
            if self.lo < self.raw.len() {
                if self.split_left == 0 {
                    self.clear = clear_over(self.clear, &self.raw[self.lo..], self.piece);
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
                if let Some(h) = header(&self.raw[self.lo..], self.piece).filter(|h| h.split) {
                    self.lo += h.len;
                    self.split_left = h.payload - self.piece;
                    self.split_fin = h.fin;
                    self.fragment(false, h.opcode, self.piece);
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
                    self.clear = clear_over(self.clear, &dst[..n], self.piece);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::judge;

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";

    /// A server→client frame (never masked unless `mask`).
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame_with(if fin { 0x80 } else { 0 } | opcode, None, payload)
    }

    fn frame_with(b0: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let m = if mask.is_some() { 0x80 } else { 0 };
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// Hands out `data` in chunks of the sizes given (cycled), with a
    /// `WouldBlock` before every third chunk, like a non-blocking socket.
    struct Chunky {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        calls: usize,
    }

    impl Read for Chunky {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let size = self.sizes[self.calls % self.sizes.len()];
            let n = size.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    struct Reframed {
        inner: Chunky,
        rf: Reframer,
        /// Everything `read` returned.
        out: Vec<u8>,
    }

    impl Read for Reframed {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.rf.read(&mut self.inner, buf)?;
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn chunky(data: Vec<u8>, sizes: &[usize]) -> Chunky {
        Chunky {
            data,
            pos: 0,
            sizes: sizes.to_vec(),
            calls: 0,
        }
    }

    /// Runs `frames` after the response head through the reframer; checks
    /// that exactly the head comes first, that tungstenite reads the same
    /// as from the original, and returns the output's frame stream.
    fn same_for_tungstenite(frames: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut stream = HEAD.to_vec();
        stream.extend_from_slice(frames);
        let mut r = Reframed {
            inner: chunky(stream, sizes),
            rf: Reframer::new(),
            out: Vec::new(),
        };
        // the handshake reads through the reframer and must get no byte more
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut buf = [0; 4096];
            match r.read(&mut buf) {
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(head, HEAD);
        r.out.clear();
        let want = judge(chunky(frames.to_vec(), &[usize::MAX]));
        let got = judge(&mut r);
        assert_eq!(got, want, "chunks {sizes:?}");
        r.out
    }

    /// Payload sizes of the data frames in `stream` (unmasked, as sent).
    fn data_frame_sizes(mut stream: &[u8]) -> Vec<u64> {
        let mut sizes = Vec::new();
        while let Some(h) = header(stream, PIECE as u64) {
            if h.opcode <= 2 {
                sizes.push(h.payload);
            }
            let end = h.len + h.payload as usize;
            if end > stream.len() {
                break;
            }
            stream = &stream[end..];
        }
        sizes
    }

    const CHUNKINGS: &[&[usize]] = &[&[usize::MAX], &[1], &[7, 1, 3], &[1000, 20_000, 13]];

    #[test]
    fn large_frames_arrive_as_fragments_of_the_same_messages() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        // multi-byte characters, so fragment ends fall inside some of them
        let text = "äöü€𝄞x".repeat(6000);
        let mut s = Vec::new();
        s.extend(frame(true, 2, b"small"));
        s.extend(frame(true, 2, &big));
        s.extend(frame(true, 1, text.as_bytes()));
        s.extend(frame(true, 2, &big[..PIECE]));
        s.extend(frame(true, 2, &big[..PIECE + 1]));
        s.extend(frame(true, 2, &big[..2 * PIECE + 125]));
        // a fragmented message with large fragments and a ping between
        s.extend(frame(false, 2, &big[..40_000]));
        s.extend(frame(true, 9, b"ping"));
        s.extend(frame(false, 0, &big[..PIECE + 7]));
        s.extend(frame(true, 0, &big[..50_000]));
        s.extend(frame(true, 2, b""));
        s.extend(frame(true, 8, &[0x03, 0xe8]));
        for sizes in CHUNKINGS {
            let out = same_for_tungstenite(&s, sizes);
            let frames = data_frame_sizes(&out);
            assert!(frames.iter().all(|&n| n <= PIECE as u64), "{frames:?}");
            assert!(frames.len() > 20, "{frames:?}");
        }
    }

    #[test]
    fn what_tungstenite_must_refuse_passes_unchanged() {
        let big = vec![0x41; 3 * PIECE];
        let cases: Vec<Vec<u8>> = vec![
            frame_with(0x82, Some([1, 2, 3, 4]), &big),
            frame_with(0xc2, None, &big),
            frame_with(0x83, None, &big),
            frame(true, 9, &big[..200]),
            frame(true, 0, &big),
            [frame(false, 2, &big), frame(true, 2, &big)].concat(),
            [frame(true, 1, &[0xff; 40_000])].concat(),
        ];
        for case in cases {
            for sizes in CHUNKINGS {
                let mut s = frame(true, 2, b"before");
                s.extend_from_slice(&case);
                same_for_tungstenite(&s, sizes);
            }
        }
    }

    #[test]
    fn oversized_and_cut_frames_fail_as_before() {
        let mut over = vec![0x82, 127];
        over.extend_from_slice(&((MAX_INBOUND_MESSAGE as u64) + 1).to_be_bytes());
        over.extend_from_slice(&[0; 64]);
        let big = vec![7; 3 * PIECE];
        let whole = frame(true, 2, &big);
        for sizes in CHUNKINGS {
            same_for_tungstenite(&over, sizes);
            // the stream ends inside a split frame, and inside a header
            same_for_tungstenite(&whole[..2 * PIECE + 100], sizes);
            same_for_tungstenite(&whole[..3], sizes);
        }
    }

    #[test]
    fn random_frame_streams_read_the_same_with_tiny_fragments() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut data = vec![next() as u8];
            for _ in 0..next() % 6 {
                let r = next();
                // mostly valid data frames, sometimes anything
                let b0 = match r % 8 {
                    0 => (r >> 8) as u8,
                    1 => 0x89,
                    2 | 3 => 0x02,
                    4 => 0x00,
                    5 => 0x80,
                    _ => 0x81,
                };
                let len = (r >> 16) as usize % 300;
                let payload: Vec<u8> = (0..len).map(|i| (r >> 32) as u8 ^ i as u8).collect();
                data.extend(frame_with(b0, None, &payload));
                if r % 13 == 0 {
                    data.truncate(data.len() - 1);
                }
            }
            crate::fuzzing::reframe(&data);
        }
    }

    #[test]
    fn a_frame_claiming_the_largest_payload_passes_to_tungstenite_without_overflow() {
        // found by the reframe fuzz target: two frames claiming 2^64-1 bytes
        crate::fuzzing::reframe(&[
            0x82, 0x23, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, 0x23, 0x00, 0x23, 0x00, 0x82,
        ]);
    }

    #[test]
    fn a_frame_cut_off_after_a_close_may_show_as_sent_after_the_close() {
        // found by the reframe fuzz target: a close, then a continuation
        // frame claiming 5 bytes of which 3 arrive
        crate::fuzzing::reframe(&[0x41, 0x88, 0x00, 0x80, 0x05, 0x2c, 0x6c, 0x65]);
    }
}
