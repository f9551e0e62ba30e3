//! xfrmsync: keep IPsec SA replay and lifetime counters in sync through the
//! Linux kernel's XFRM asynchronous events (aevents).
//!
//! Layers, each using only those before it: [`error`] ← [`sa`] (SA identity)
//! ← [`aevent`] (the values) ← [`wire`] (the codec, bytes only) ← [`events`]
//! (routing) ← [`handle`] (sockets, requests, dispatch) ← `ffi` (the C ABI).

/// cbindgen:ignore
pub mod aevent;
/// cbindgen:ignore
pub mod error;
/// cbindgen:ignore
pub mod events;
mod ffi;
/// cbindgen:ignore
pub mod handle;
/// cbindgen:ignore
pub mod sa;
/// cbindgen:ignore
pub mod timer;
/// cbindgen:ignore
pub mod wire;

pub use aevent::{AeUpdate, Aevent, Cause, EsnReplay, LegacyReplay, Lifetime, Replay};
pub use error::{Error, Result};
pub use events::Callback;
pub use handle::{Events, Handle, HandleBuilder};
pub use sa::{Mark, SaId};
