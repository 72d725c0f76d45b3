//! Frames: the unit of the wire protocol (`u8 kind, u32 LE length, payload`).

use std::io::{self, Read, Write};

/// Largest payload a frame may carry (1 MiB); a bigger length is a protocol error.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Bytes before the payload: the kind and the length.
pub const HEADER_LEN: usize = 5;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host to guest, first frame of a connection: a JSON [`crate::Request`].
    Request = 1,
    /// Guest to host, answer to the request: a JSON [`crate::Response`].
    Response = 2,
    /// Host to guest during `exec`: bytes for the program's stdin.
    Stdin = 3,
    /// Host to guest during `exec`: no more stdin (empty payload); the program's stdin is closed.
    StdinEof = 4,
    /// Guest to host during `exec`: bytes the program wrote to stdout.
    Stdout = 5,
    /// Guest to host during `exec`: bytes the program wrote to stderr.
    Stderr = 6,
    /// Guest to host, last frame of an `exec`: a JSON [`crate::ExitStatus`].
    Exit = 7,
}

impl Kind {
    /// The kind with wire value `byte`, if there is one.
    pub fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::Stdin,
            4 => Kind::StdinEof,
            5 => Kind::Stdout,
            6 => Kind::Stderr,
            7 => Kind::Exit,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: Kind,
    /// The payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the stream cleanly, between frames.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The kind byte is not one of [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The length is over [`MAX_PAYLOAD`].
    #[error("frame of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// Reading failed (including read timeouts: `WouldBlock`/`TimedOut`).
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Checks a header, returning the kind and payload length.
fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(Kind, usize), FrameError> {
    let kind = Kind::from_u8(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len as usize))
}

/// Appends the encoding of one frame to `out`.
///
/// # Panics
/// If `payload` is over [`MAX_PAYLOAD`]: callers chunk their data, so that is a bug here, not input.
pub fn encode(kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    assert!(payload.len() <= MAX_PAYLOAD, "frame payload of {} bytes", payload.len());
    out.reserve(HEADER_LEN + payload.len());
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Writes one frame with a single `write_all`, so frames from one writer never interleave.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::new();
    encode(kind, payload, &mut buf);
    w.write_all(&buf)
}

/// Reads exactly one frame (blocking).
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    // The first byte tells a clean close apart from a truncated frame.
    loop {
        match r.read(&mut header[..1]) {
            Ok(0) => return Err(FrameError::Closed),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    read_exact(r, &mut header[1..])?;
    let (kind, len) = parse_header(&header)?;
    let mut payload = vec![0u8; len];
    read_exact(r, &mut payload)?;
    Ok(Frame { kind, payload })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), FrameError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })
}

/// Incremental decoder for a non-blocking reader: push bytes as they arrive, take frames out.
///
/// A bad header is reported as soon as its five bytes are in, without waiting for the payload.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not form a complete frame yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else { return Ok(None) };
        let (kind, len) = parse_header(header)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Frame { kind, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kind, payload, &mut out);
        out
    }

    #[test]
    fn header_layout() {
        assert_eq!(encoded(Kind::Stdout, b"hi"), [5, 2, 0, 0, 0, b'h', b'i']);
        assert_eq!(encoded(Kind::StdinEof, b""), [4, 0, 0, 0, 0]);
        let big = encoded(Kind::Stdin, &vec![7u8; 0x1234]);
        assert_eq!(big[..HEADER_LEN], [3, 0x34, 0x12, 0, 0]);
    }

    #[test]
    fn every_kind_round_trips() {
        for byte in 0..=255u8 {
            if let Some(kind) = Kind::from_u8(byte) {
                assert_eq!(kind as u8, byte);
                let bytes = encoded(kind, &[byte; 3]);
                let frame = read_frame(&mut &bytes[..]).unwrap();
                assert_eq!(frame, Frame { kind, payload: vec![byte; 3] });
            }
        }
        assert!(Kind::from_u8(0).is_none() && Kind::from_u8(8).is_none());
    }

    #[test]
    fn max_payload_is_accepted_one_more_is_not() {
        let bytes = encoded(Kind::Stdin, &vec![1u8; MAX_PAYLOAD]);
        assert_eq!(read_frame(&mut &bytes[..]).unwrap().payload.len(), MAX_PAYLOAD);
        let mut over = vec![Kind::Stdin as u8];
        over.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(
            matches!(read_frame(&mut &over[..]), Err(FrameError::TooLarge(n)) if n as usize == MAX_PAYLOAD + 1)
        );
        let mut huge = vec![Kind::Request as u8];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_frame(&mut &huge[..]), Err(FrameError::TooLarge(u32::MAX))));
    }

    #[test]
    fn read_errors() {
        assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Closed)));
        assert!(matches!(read_frame(&mut &[1u8, 4, 0][..]), Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut &[1u8, 4, 0, 0, 0, b'{'][..]), Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut &[0xffu8, 0, 0, 0, 0][..]), Err(FrameError::UnknownKind(0xff))));
    }

    #[test]
    #[should_panic]
    fn encoding_an_oversized_payload_is_a_bug() {
        encoded(Kind::Stdout, &vec![0u8; MAX_PAYLOAD + 1]);
    }

    #[test]
    fn decoder_reassembles_byte_by_byte() {
        let mut stream = encoded(Kind::Stdin, b"hello");
        stream.extend(encoded(Kind::StdinEof, b""));
        stream.extend(encoded(Kind::Stdin, &[9u8; 70_000]));
        let mut d = Decoder::new();
        let mut frames = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(d.buffered(), 0);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], Frame { kind: Kind::Stdin, payload: b"hello".to_vec() });
        assert_eq!(frames[1], Frame { kind: Kind::StdinEof, payload: vec![] });
        assert_eq!(frames[2].payload, vec![9u8; 70_000]);
    }

    #[test]
    fn decoder_rejects_a_bad_header_before_its_payload() {
        let mut d = Decoder::new();
        d.push(&[Kind::Stdin as u8, 0, 0, 0x20]);
        assert!(d.next_frame().unwrap().is_none());
        d.push(&[0]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(0x20_0000))));
        let mut d = Decoder::new();
        d.push(&[42, 0, 0, 0, 0]);
        assert!(matches!(d.next_frame(), Err(FrameError::UnknownKind(42))));
    }
}
