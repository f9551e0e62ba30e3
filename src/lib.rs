//! xfrmsync: keep IPsec SA replay and lifetime counters in sync through the
//! Linux kernel's XFRM asynchronous events (aevents).
//!
//! Layers, each using only those before it: [`error`] ← [`sa`] (SA identity)
//! ← [`aevent`] (the values) ← [`wire`] (the codec, bytes only) ← [`events`]
//! (routing) ← [`handle`] (sockets, requests, dispatch) ← [`hz`] (HZ without
//! a live SA), [`defaults`] (a namespace's thresholds for new SAs) ←
//! [`registry`] (thresholds for SAs as they appear) ← `ffi` (the C ABI).
//! [`timer`] (ms and jiffies) and [`netns`] (a helper thread in another
//! network namespace) serve them.
//!
//! SAs are named as `ip xfrm state` names them, SPI in host byte order:
//!
//! ```
//! use xfrmsync::SaId;
//! let sa = SaId::esp("10.9.0.2".parse().unwrap(), 0x1001).with_mark(7, 0xff);
//! assert_eq!(sa.to_string(), "esp dst 10.9.0.2 spi 0x00001001 mark 0x7/0xff");
//! ```
//!
//! Timer thresholds are milliseconds; the kernel wants jiffies (see [`timer`]):
//!
//! ```
//! assert_eq!(xfrmsync::timer::ms_to_jiffies(1000, 250).unwrap(), 250);
//! ```

/// cbindgen:ignore
pub mod aevent;
/// cbindgen:ignore
pub mod defaults;
/// cbindgen:ignore
pub mod error;
/// cbindgen:ignore
pub mod events;
mod ffi;
/// cbindgen:ignore
pub mod handle;
/// cbindgen:ignore
pub mod hz;
/// cbindgen:ignore
pub mod netns;
/// cbindgen:ignore
pub mod registry;
/// cbindgen:ignore
pub mod sa;
/// cbindgen:ignore
pub mod timer;
/// cbindgen:ignore
pub mod wire;

pub use aevent::{AeUpdate, Aevent, Cause, EsnReplay, LegacyReplay, Lifetime, Replay};
pub use error::{Error, Result};
pub use handle::{Callback, Events, Handle, HandleBuilder, SaChange, SaNotice};
pub use netns::NetnsRef;
pub use registry::{Registry, Rule, SaMatch, Thresholds};
pub use timer::HzSource;
pub use sa::{Mark, SaId};
