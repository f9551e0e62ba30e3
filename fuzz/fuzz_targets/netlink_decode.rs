#![no_main]
//! The netlink/XFRM decoder on arbitrary datagrams (see ../checks.rs).

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::netlink_decode(data));
