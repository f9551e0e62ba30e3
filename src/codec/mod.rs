//! The codec layer: what names an SA, the values the kernel reports, and
//! their netlink encoding, on bytes only (no socket below this line).

pub mod aevent;
pub mod sa;
pub mod view;
pub mod wire;
