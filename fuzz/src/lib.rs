//! What every fuzz target shares: an allocator that refuses to serve any
//! single allocation larger than [`MAX_ALLOCATION`].
//!
//! libFuzzer's inputs are at most a few KiB, so an allocation that large can
//! only be sized by a length the input claims: a decoder trusting a length
//! before checking it. Without AddressSanitizer (which needs nightly)
//! libFuzzer's own `-malloc_limit_mb` does not see Rust's allocations; this
//! does, and the abort leaves the input in `fuzz/artifacts/<target>/`.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a target may make: 32 MiB.
pub const MAX_ALLOCATION: usize = 32 << 20;

struct Capped;

// SAFETY: every call is passed on to the system allocator unchanged, or
// refused by aborting before anything is allocated.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // No panic: unwinding would allocate, and this must stop the run.
        eprintln!("fuzz: an allocation of {size} bytes, over the {MAX_ALLOCATION}-byte cap: sized by the input?");
        std::process::abort();
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;
