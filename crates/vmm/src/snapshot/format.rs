//! The state file's envelope: a fixed header (magic, format version, payload length, CRC-32 of
//! the payload) and the payload, `VmState` encoded with postcard. The version is checked
//! before anything is decoded; this build writes `CURRENT` and reads `CURRENT` and the
//! version before it (`v1`), so an upgrade never strands a saved VM.
//!
//! ```text
//! 0   8   magic "STRATUS\x01"
//! 8   4   format version, little endian
//! 12  8   payload length
//! 20  4   CRC-32 (IEEE) of the payload
//! 24  ..  payload
//! ```

use super::VmState;

/// Identifies a Stratus state file.
pub const MAGIC: [u8; 8] = *b"STRATUS\x01";
/// The format this build writes.
pub const CURRENT: u32 = 2;
/// The oldest format this build reads.
pub const OLDEST_READABLE: u32 = 1;
const HEADER_LEN: usize = 24;
/// A state file is a few tens of KiB; refuse anything absurd before allocating for it.
const MAX_PAYLOAD: u64 = 64 << 20;

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not a state file at all.
    #[error("not a Stratus snapshot state file (bad magic)")]
    NotAStateFile,
    /// Cut short.
    #[error("the state file is truncated ({have} bytes, {want} expected)")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes the header promises.
        want: usize,
    },
    /// From a version this build does not read.
    #[error("snapshot format version {found}: this build of Stratus reads versions {OLDEST_READABLE} to {CURRENT}")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// The checksum does not match: the file was damaged.
    #[error("the state file is damaged (checksum {found:#010x}, expected {expected:#010x})")]
    Checksum {
        /// CRC of the payload as read.
        found: u32,
        /// CRC the header records.
        expected: u32,
    },
    /// The payload does not decode.
    #[error("the state file is damaged: {0}")]
    Decode(String),
    /// Encoding failed (a bug, not a user error).
    #[error("encoding the state: {0}")]
    Encode(String),
}

/// Encodes `state` as a complete state file.
pub fn encode(state: &VmState) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&CURRENT.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a state file, checking magic, version, length and checksum first.
pub fn decode(bytes: &[u8]) -> Result<VmState, FormatError> {
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(FormatError::NotAStateFile);
        }
        return Err(FormatError::Truncated { have: bytes.len(), want: HEADER_LEN });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::NotAStateFile);
    }
    let field = |range: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..range.len()].copy_from_slice(&bytes[range]);
        u64::from_le_bytes(b)
    };
    let version = field(8..12) as u32;
    let length = field(12..20);
    let expected = field(20..24) as u32;
    if !(OLDEST_READABLE..=CURRENT).contains(&version) {
        return Err(FormatError::Version { found: version });
    }
    if length > MAX_PAYLOAD || (bytes.len() - HEADER_LEN) as u64 != length {
        return Err(FormatError::Truncated {
            have: bytes.len(),
            want: HEADER_LEN.saturating_add(length.min(MAX_PAYLOAD) as usize),
        });
    }
    let payload = &bytes[HEADER_LEN..];
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(FormatError::Checksum { found, expected });
    }
    let decoded = match version {
        1 => postcard::from_bytes::<super::v1::State>(payload).map(VmState::from),
        _ => postcard::from_bytes(payload),
    };
    decoded.map_err(|e| FormatError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{MachineState, MemoryKind};
    use crate::vcpu::VcpuState;
    use crate::vm::VmConfig;

    fn sample() -> VmState {
        VmState {
            config: VmConfig {
                vcpus: 1,
                memory: 64 << 20,
                boot: crate::BootSource {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "console=ttyS0".into(),
                },
                disks: Vec::new(),
                nets: Vec::new(),
                rng: true,
                vsock: None,
                balloon: None,
            },
            uptime_ms: 1234,
            machine: MachineState {
                irqchips: vec![Default::default(); 3],
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                id: 0,
                mp_state: Default::default(),
                regs: kvm_bindings::kvm_regs { rip: 0x1234_5678, ..Default::default() },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                msrs: vec![(0x10, 99)],
                events: Default::default(),
            }],
            serial: Default::default(),
            devices: Vec::new(),
            memory: MemoryKind::Full,
            generation_id: [7; 16],
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(&sample()).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x1234_5678);
        assert_eq!(back.vcpus[0].msrs, vec![(0x10, 99)]);
        assert_eq!(back.config, sample().config);
        assert_eq!(back.uptime_ms, 1234);
    }

    #[test]
    fn refuses_damaged_foreign_and_future_files_with_a_clear_error() {
        let good = encode(&sample()).unwrap();
        let err = |bytes: &[u8]| decode(bytes).err().map(|e| e.to_string()).unwrap_or_default();

        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(err(&flipped).contains("damaged (checksum"), "{}", err(&flipped));

        assert!(err(&good[..good.len() - 10]).contains("truncated"), "{}", err(&good[..good.len() - 10]));
        assert!(err(&good[..10]).contains("truncated"));
        assert!(err(b"\x7fELF\x02\x01\x01\0garbage garbage garbage").contains("not a Stratus snapshot"));

        let mut future = good.clone();
        future[8..12].copy_from_slice(&(CURRENT + 1).to_le_bytes());
        assert!(err(&future).contains(&format!("version {}", CURRENT + 1)), "{}", err(&future));
        let mut ancient = good.clone();
        ancient[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(err(&ancient).contains("reads versions"), "{}", err(&ancient));

        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("truncated"));

        // A payload that passes the checksum but does not decode.
        let mut forged = good[..24].to_vec();
        let junk = vec![0xffu8; 40];
        forged[12..20].copy_from_slice(&(junk.len() as u64).to_le_bytes());
        forged[20..24].copy_from_slice(&crc32fast::hash(&junk).to_le_bytes());
        forged.extend_from_slice(&junk);
        assert!(err(&forged).contains("damaged"), "{}", err(&forged));
    }
}

/// State files kept from earlier format versions must always decode: an upgrade never strands
/// a saved VM. (The integration tests also restore them and talk to the guest.)
#[cfg(test)]
mod kept_files {
    use super::*;

    #[test]
    fn version_1_state_file_decodes() {
        let bytes = include_bytes!("../../../../tests/snapshots/v1/echo.state");
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1, "the kept file is version 1");
        let state = decode(bytes).unwrap();
        assert_eq!(state.config.memory, 16 << 20);
        assert!(state.config.boot.cmdline.contains("test=echo"));
        assert_eq!(state.vcpus.len(), 1);
        assert_eq!(state.memory, super::super::MemoryKind::Full);
    }
}
