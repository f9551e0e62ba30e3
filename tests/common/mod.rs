//! Test support shared by the integration tests: the captured corpus, an
//! allocation counter, and a fake kernel. Each test binary uses what it
//! needs of it.
#![allow(dead_code)]

pub mod fake_kernel;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/linux-6.1")
}

/// The datagrams of a corpus file: each a 4-byte little-endian length, then
/// the bytes (tests/corpus/linux-6.1/README.md).
pub fn datagrams(name: &str) -> Vec<Vec<u8>> {
    let data = std::fs::read(corpus_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        out.push(data[at..at + len].to_vec());
        at += len;
    }
    assert_eq!(at, data.len(), "{name}: framing");
    out
}

/// A global allocator that counts this thread's allocations (the test
/// harness allocates on its own threads meanwhile). Install it with
/// `#[global_allocator] static GLOBAL: CountingAllocator = CountingAllocator;`.
pub struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// Allocations made on this thread so far.
pub fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}
