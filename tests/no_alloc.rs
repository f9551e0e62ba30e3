//! The event path allocates nothing per event: decoding a captured event a
//! thousand times makes no heap allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    // Per thread: the test harness allocates on its own threads meanwhile.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decoding_events_does_not_allocate() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/linux-6.1/events-esn.bin");
    let data = std::fs::read(path).unwrap();
    let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    let datagram = &data[4..4 + len];
    let before = ALLOCATIONS.with(Cell::get);
    let mut seq_sum = 0u64;
    for _ in 0..1000 {
        for msg in xfrmsync::wire::Messages::new(datagram) {
            let msg = msg.unwrap();
            let ev = xfrmsync::wire::decode_aevent(msg.payload).unwrap();
            seq_sum += ev.replay.seq64();
        }
    }
    let after = ALLOCATIONS.with(Cell::get);
    assert!(seq_sum > 0);
    assert_eq!(after - before, 0, "allocations while decoding events");
}
