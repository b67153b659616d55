//! Watching one fuzz case: the largest single allocation it made and the
//! panics it raised, on the calling thread only (the cases run on a
//! current-thread runtime, so every task of the case runs there too).
//!
//! A peer that claims a length of 4 GiB must not make us allocate 4 GiB
//! before the bytes arrive; the allocator below records the largest
//! request so a test can say so. A panic inside a spawned task would be
//! swallowed by tokio; the hook below counts it so a test can fail on it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Once;

/// The allocator that records the largest allocation of a watched case;
/// linking this crate installs it in the test binary.
pub struct Tracking;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static PANICS: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown must not fail.
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// What one watched case did.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    /// Bytes of the largest single allocation.
    pub largest_alloc: usize,
    /// Panics raised on this thread, caught or not.
    pub panics: usize,
}

/// Runs `f` on this thread with allocations and panics watched.
pub fn watch<T>(f: impl FnOnce() -> T) -> (T, Watched) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = PANICS.try_with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
    LARGEST.with(|l| l.set(0));
    PANICS.with(|p| p.set(0));
    WATCHING.with(|w| w.set(true));
    let out = f();
    WATCHING.with(|w| w.set(false));
    let watched = Watched {
        largest_alloc: LARGEST.with(Cell::get),
        panics: PANICS.with(Cell::get),
    };
    (out, watched)
}

/// A current-thread runtime, so every task of a case runs on the watched
/// thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_allocation_and_panics_are_seen() {
        let (_, watched) = watch(|| std::hint::black_box(vec![1u8; 3 << 20]));
        assert!(watched.largest_alloc >= 3 << 20, "{watched:?}");
        let (_, watched) = watch(|| std::panic::catch_unwind(|| panic!("seen")).is_err());
        assert_eq!(watched.panics, 1);
    }
}
