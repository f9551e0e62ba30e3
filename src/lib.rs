//! xfrmsync: keep IPsec SA replay and lifetime counters in sync through the
//! Linux kernel's XFRM asynchronous events (aevents).
//!
//! Layers, each a folder using only those before it: [`error`] ←
//! [`codec`] (SA identity [`sa`], the values [`aevent`], the wire codec
//! [`wire`]: bytes only, no socket) ← [`handle`] (sockets, requests,
//! dispatch; with [`events`] routing, [`netns`] a helper thread in another
//! network namespace, [`timer`] ms and jiffies, [`hz`] HZ without a live SA,
//! [`defaults`] a namespace's thresholds for new SAs) ← [`registry`]
//! (thresholds for SAs as they appear) ← [`sync`] (HA: sync records and a
//! standby's commit) ← `ffi` (the C ABI). The `xfrmsync` tool and the
//! strongSwan plugin are clients in their own folders.
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
pub mod codec;
/// cbindgen:ignore
pub mod error;
mod ffi;
/// cbindgen:ignore
pub mod handle;
/// cbindgen:ignore
pub mod registry;
/// cbindgen:ignore
pub mod sync;

// The layers' parts keep the short paths users know.
pub use codec::{aevent, sa, view, wire};
pub use handle::{defaults, events, hz, netns, timer};

pub use aevent::{AeUpdate, Aevent, Cause, EsnReplay, LegacyReplay, Lifetime, Replay};
pub use error::{Error, Result};
pub use handle::{Callback, Events, Handle, HandleBuilder, SaChange, SaNotice, ViewCallback};
pub use netns::NetnsRef;
pub use registry::{Registry, Rule, SaMatch, Thresholds};
pub use sa::{Mark, SaId};
pub use timer::HzSource;
pub use view::{AeventView, ReplayView};
