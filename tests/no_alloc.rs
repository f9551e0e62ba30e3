//! The event path allocates nothing per event: decoding a captured event a
//! thousand times makes no heap allocation.

mod common;
use common::{allocations, datagrams, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn decoding_events_does_not_allocate() {
    let datagram = &datagrams("events-esn.bin")[0];
    let before = allocations();
    let mut seq_sum = 0u64;
    for _ in 0..1000 {
        for msg in xfrmsync::wire::Messages::new(datagram) {
            let msg = msg.unwrap();
            let ev = xfrmsync::wire::decode_aevent(&msg).unwrap();
            seq_sum += ev.replay.seq64();
        }
    }
    let after = allocations();
    assert!(seq_sum > 0);
    assert_eq!(after - before, 0, "allocations while decoding events");
}
