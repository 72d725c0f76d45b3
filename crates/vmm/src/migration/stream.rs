//! The migration stream's framing: every frame is a kind, a length and a CRC-32 of its
//! payload, so a damaged or cut stream is caught at the first bad frame, before anything it
//! carried is used.
//!
//! ```text
//! 0  1  kind
//! 1  4  payload length, little endian (at most MAX_PAYLOAD)
//! 5  4  CRC-32 (IEEE) of the payload
//! 9  .. payload
//! ```

use std::io::{Read, Write};

/// The most one frame carries: 256 pages and their header, with room to spare.
pub const MAX_PAYLOAD: usize = 2 << 20;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source to destination, first: magic, format version, the VM's configuration.
    Hello = 1,
    /// Destination: the configuration fits, send the pages.
    Accept = 2,
    /// Destination: refused, with the reason as text.
    Refuse = 3,
    /// Guest pages: first page index (u64), then whole 4 KiB pages.
    Pages = 4,
    /// Pages that are now all zeros: first page index (u64), count (u32).
    Zeros = 5,
    /// The paused VM's state (a state file's bytes).
    State = 6,
    /// Nothing more: build the VM and run it.
    Done = 7,
    /// Destination: the VM runs here now.
    Running = 8,
    /// Source: answer once everything sent before this is in guest memory.
    Sync = 9,
    /// Destination: everything before the `Sync` is in guest memory.
    Synced = 10,
    /// Post-copy, source: pages the destination holds stale copies of, to drop and fetch
    /// later: (first page u64, count u32) ranges.
    Discard = 11,
    /// Post-copy, source, after `State`: run the VM now; the stale pages follow, those asked
    /// for first.
    Postcopy = 12,
    /// Post-copy, destination: pages the guest is waiting for (u64 page indexes).
    Request = 13,
    /// Post-copy: every stale page is sent (source), or in guest memory (destination).
    Complete = 14,
    /// Disk data: disk index u32, byte offset u64, whole sectors.
    Blocks = 15,
    /// Disk bytes that read as zeros: disk index u32, byte offset u64, length u64.
    BlockZeros = 16,
    /// Source, before the guest pauses: the migration is called off (why, as text); the
    /// guest runs on at the source.
    Cancel = 17,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::Zeros,
            6 => Kind::State,
            7 => Kind::Done,
            8 => Kind::Running,
            9 => Kind::Sync,
            10 => Kind::Synced,
            11 => Kind::Discard,
            12 => Kind::Postcopy,
            13 => Kind::Request,
            14 => Kind::Complete,
            15 => Kind::Blocks,
            16 => Kind::BlockZeros,
            17 => Kind::Cancel,
            _ => return None,
        })
    }
}

/// A stream that does not frame correctly.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed or closed.
    #[error("the migration connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// A frame's checksum does not match its payload.
    #[error("a corrupted migration frame (kind {kind}, checksum {found:#010x}, expected {expected:#010x})")]
    Checksum {
        /// The frame's kind byte.
        kind: u8,
        /// CRC of what arrived.
        found: u32,
        /// CRC the frame carried.
        expected: u32,
    },
    /// A frame kind nobody sends, or an absurd length.
    #[error("a malformed migration frame: {0}")]
    Malformed(String),
}

/// Writes one frame.
pub fn write_frame(out: &mut (impl Write + ?Sized), kind: Kind, payload: &[u8]) -> Result<(), StreamError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(StreamError::Malformed(format!("a {} byte payload", payload.len())));
    }
    let mut head = [0u8; 9];
    head[0] = kind as u8;
    head[1..5].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[5..9].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.write_all(&head)?;
    out.write_all(payload)?;
    Ok(())
}

/// Reads one frame into `payload` (reused between frames); returns its kind.
pub fn read_frame(input: &mut (impl Read + ?Sized), payload: &mut Vec<u8>) -> Result<Kind, StreamError> {
    let mut head = [0u8; 9];
    input.read_exact(&mut head)?;
    let kind =
        Kind::from_u8(head[0]).ok_or_else(|| StreamError::Malformed(format!("unknown kind {}", head[0])))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(StreamError::Malformed(format!("a {len} byte payload")));
    }
    let expected = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
    payload.resize(len, 0);
    input.read_exact(payload)?;
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(StreamError::Checksum { kind: head[0], found, expected });
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_caught() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Pages, &[7u8; 4104]).unwrap();
        write_frame(&mut wire, Kind::Done, &[]).unwrap();
        let mut payload = Vec::new();
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r, &mut payload).unwrap(), Kind::Pages);
        assert_eq!(payload, vec![7u8; 4104]);
        assert_eq!(read_frame(&mut r, &mut payload).unwrap(), Kind::Done);
        assert!(read_frame(&mut r, &mut payload).is_err(), "the end of the stream is an error");

        let mut flipped = wire.clone();
        flipped[100] ^= 1;
        let err = read_frame(&mut &flipped[..], &mut payload).unwrap_err();
        assert!(err.to_string().contains("corrupted"), "{err}");
        let mut unknown = wire.clone();
        unknown[0] = 99;
        assert!(read_frame(&mut &unknown[..], &mut payload)
            .unwrap_err()
            .to_string()
            .contains("unknown kind"));
        let mut huge = wire.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..], &mut payload).unwrap_err().to_string().contains("payload"));
        let cut = &wire[..50];
        assert!(matches!(read_frame(&mut &cut[..], &mut payload), Err(StreamError::Io(_))));
    }
}
