//! The Stratus guest agent: a daemon inside each Linux guest that the host reaches over vsock,
//! and the host-side [`Client`] the control plane uses.
//!
//! # Transport
//!
//! The agent listens on AF_VSOCK port [`PORT`] (any CID). The host reaches it through the VMM's
//! vsock device, whose host side is a Unix socket: a host program connects to it, writes
//! `CONNECT 1024\n`, reads `OK <n>\n`, and from then on the stream is connected to the agent.
//! For tests the agent can listen on a plain Unix socket instead (`--listen unix:PATH`).
//!
//! # Frames
//!
//! Both directions are a sequence of frames:
//!
//! ```text
//! +--------+---------------------+-------------------------+
//! | kind   | length              | payload                 |
//! | u8     | u32 little-endian   | `length` bytes          |
//! +--------+---------------------+-------------------------+
//! ```
//!
//! `length` is at most [`MAX_PAYLOAD`] (1 MiB); a larger one, or an unknown kind, is a protocol
//! error. Kinds ([`Kind`]):
//!
//! | kind | name        | direction     | payload                                   |
//! |------|-------------|---------------|-------------------------------------------|
//! | 1    | request     | host to guest | JSON [`Request`]                          |
//! | 2    | response    | guest to host | JSON [`Response`]: `{"ok": V}` or `{"error": "..."}` |
//! | 3    | stdin       | host to guest | bytes for the program's stdin             |
//! | 4    | stdin EOF   | host to guest | empty: close the program's stdin          |
//! | 5    | stdout      | guest to host | bytes the program wrote to stdout         |
//! | 6    | stderr      | guest to host | bytes the program wrote to stderr         |
//! | 7    | exit        | guest to host | JSON [`ExitStatus`] `{"code": N}`         |
//!
//! # Conversation
//!
//! A connection carries exactly one request, the first frame the host sends:
//!
//! - `{"op": "info"}` is answered with `{"ok": GuestInfo}` ([`GuestInfo`]). It is also the
//!   readiness probe.
//! - `{"op": "configure", ...Identity}` ([`Identity`]) is answered with `{"ok": null}` once the
//!   identity is applied.
//! - `{"op": "exec", "argv": [...], "env": [[k, v], ...], "cwd": ...}` ([`ExecRequest`]) is
//!   answered with `{"ok": null}` once the program runs (or an error if it cannot start). Then
//!   the host sends stdin and finally stdin-EOF frames, while the agent sends stdout and stderr
//!   frames as the program writes, and last one exit frame (code, or 128 + N if signal N killed
//!   it) after the program exited and its output was relayed.
//!
//! Any request can be answered with `{"error": "..."}` instead, which ends the conversation;
//! so does a malformed first frame. After its last frame the agent waits for the host to close
//! the connection (up to a few seconds) before closing it itself: the host must not half-close
//! (the VMM turns that into a full close), so stdin's end is a frame, not a shutdown.
//!
//! If the host goes away during an exec, the program keeps running without stdin and its
//! output is discarded.

pub mod agent;
mod client;
mod frame;
mod message;

pub use client::{AgentError, Client};
pub use frame::{encode, read_frame, write_frame, Decoder, Frame, FrameError, Kind, HEADER_LEN, MAX_PAYLOAD};
pub use message::{ExecRequest, ExitStatus, GuestInfo, Identity, Request, Response};

/// The vsock port the agent listens on.
pub const PORT: u32 = 1024;
