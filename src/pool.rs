//! The VM's allocator: blocks of up to 256 bytes come from free lists of 16 size classes
//! (16, 32, …, 256 bytes), larger ones from the system allocator (wasi-libc's dlmalloc).
//!
//! A counted request allocates and frees about five small blocks (the buffers the host returns
//! the path, the method, the address and the counter set in, and the HTTP context); through
//! dlmalloc each malloc and free took ~100–170 wasm instructions, ~1k of a request's ~7.6k.
//! Here each is a list push or pop. Small blocks are never handed back to the system, so the
//! memory they hold is the peak of small blocks live at once (bounded by what a VM holds:
//! requests in flight, the configuration's strings), and is reused.
//!
//! Sound because a proxy-wasm VM runs one thread (built without the `atomics` feature, there
//! is no other; the module is not compiled otherwise) and because Rust hands `dealloc` and
//! `realloc` the layout the block was allocated with, so a block always goes back to the list
//! of the class it came from.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use std::alloc::System;

const CLASS_BYTES: usize = 16;
const CLASSES: usize = 16;
/// Every small block is aligned to 8 (what wasm32's widest scalar needs); a layout asking
/// for more goes to the system allocator.
const ALIGN: usize = 8;

/// The head of each class's free list; a free block holds the next one's address.
struct FreeLists(UnsafeCell<[*mut u8; CLASSES]>);

// SAFETY: one thread per VM (see the module documentation).
unsafe impl Sync for FreeLists {}

static FREE: FreeLists = FreeLists(UnsafeCell::new([null_mut(); CLASSES]));

pub struct Pool;

/// The class of a layout served from the free lists, or `None` for the system allocator.
fn class(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (size != 0 && size <= CLASSES * CLASS_BYTES && layout.align() <= ALIGN)
        .then(|| (size - 1) / CLASS_BYTES)
}

/// The layout a block of class `c` has in the system allocator.
fn class_layout(c: usize) -> Layout {
    // (c + 1) * 16 <= 256 and 8 is a power of two: always a valid layout.
    Layout::from_size_align((c + 1) * CLASS_BYTES, ALIGN).unwrap_or(Layout::new::<u64>())
}

unsafe impl GlobalAlloc for Pool {
    // Not inlined: every allocation site in the filter would otherwise carry a copy (+30 KB).
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            return System.alloc(layout);
        };
        // SAFETY: single-threaded, and no reference to the lists outlives this call.
        let lists = &mut *FREE.0.get();
        match lists.get_mut(c) {
            Some(head) if !head.is_null() => {
                let block = *head;
                // SAFETY: a free block of this class holds the next free block's address.
                *head = block.cast::<*mut u8>().read();
                block
            }
            _ => System.alloc(class_layout(c)),
        }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(c) = class(layout) else {
            return System.dealloc(ptr, layout);
        };
        // SAFETY: as in `alloc`; `ptr` is a block of class `c`, at least 16 bytes, aligned
        // to 8: it can hold the list's link.
        let lists = &mut *FREE.0.get();
        if let Some(head) = lists.get_mut(c) {
            ptr.cast::<*mut u8>().write(*head);
            *head = ptr;
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if class(layout).is_none() {
            return System.alloc_zeroed(layout);
        }
        let block = self.alloc(layout);
        if !block.is_null() {
            block.write_bytes(0, layout.size());
        }
        block
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, fits isize.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (class(layout), class(new_layout)) {
            (None, None) => System.realloc(ptr, layout, new_size),
            (Some(a), Some(b)) if a == b => ptr,
            _ => {
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    ptr.copy_to_nonoverlapping(new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

#[global_allocator]
static GLOBAL: Pool = Pool;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    /// Run inside wasm by `make unit-wasm`, where this is the global allocator: blocks of
    /// every class and beyond, freed in a scrambled order, reused, grown and shrunk across
    /// classes, never overlap (each keeps the bytes written into it).
    #[test]
    fn blocks_keep_their_bytes_through_reuse_and_realloc() {
        let mut live: Vec<Vec<u8>> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20_000u32 {
            let r = next();
            match r % 4 {
                0 | 1 => {
                    let size = (r >> 8) as usize % 600;
                    let tag = (round % 251) as u8;
                    live.push(vec![tag; size]);
                }
                2 if !live.is_empty() => {
                    let i = (r >> 8) as usize % live.len();
                    let v = live.swap_remove(i);
                    assert!(v.iter().all(|b| Some(b) == v.first()), "block overwritten");
                }
                _ if !live.is_empty() => {
                    let i = (r >> 8) as usize % live.len();
                    let v = &mut live[i];
                    let tag = v.first().copied().unwrap_or(7);
                    let new_len = (r >> 20) as usize % 600;
                    v.resize(new_len, tag);
                    v.shrink_to_fit();
                    assert!(v.iter().all(|b| *b == tag), "realloc lost bytes");
                }
                _ => {}
            }
        }
        for v in &live {
            assert!(v.iter().all(|b| Some(b) == v.first()));
        }
        // Over-aligned small layouts go to the system allocator and stay aligned.
        #[repr(align(32))]
        struct Wide([u8; 32]);
        let wide: Vec<Box<Wide>> = (0..64).map(|_| Box::new(Wide([1; 32]))).collect();
        assert!(wide
            .iter()
            .all(|w| (&**w as *const Wide as usize) % 32 == 0 && w.0[31] == 1));
    }
}
