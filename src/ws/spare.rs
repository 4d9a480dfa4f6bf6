//! A worker thread's spare frame buffers: a relay hands its buffer back here once the frame
//! is sent and takes one again when its VNC server next has data.
//!
//! Why: a viewer holds no buffer while its server is quiet (idle memory stays small), yet at
//! thousands of sessions nearly every read comes after a quiet spell. Allocating and freeing
//! a 32-256 KiB buffer per frame then cost malloc's bin searches and page faults for memory
//! the heap had just trimmed (measured: about a tenth of the daemon's CPU at N = 5000). A few
//! warm buffers per thread, bounded in bytes, serve the next reader instead.

use std::cell::{Cell, RefCell};

use bytes::BytesMut;

/// Bytes of spare buffers one worker thread keeps at most (8 MiB).
const SPARE_BYTES: usize = 8 << 20;
/// A buffer larger than this is freed, not kept: one viewer's burst must not pin the budget.
const LARGEST_KEPT: usize = 512 * 1024;
/// Distinct sizes kept: the relay asks for four (32 to 256 KiB plus header room) and TLS one.
const SIZES: usize = 8;

thread_local! {
    /// Spare buffers by capacity: a handful of sizes, each with its stack of buffers.
    static SPARE: RefCell<Vec<(usize, Vec<BytesMut>)>> = const { RefCell::new(Vec::new()) };
    static KEPT: Cell<usize> = const { Cell::new(0) };
}

/// An empty buffer with room for `capacity` bytes: a spare one of this thread of exactly that
/// size, else a new allocation. Exact sizes, because readers ask for a few sizes only (powers
/// of two plus a frame header's room): a larger buffer lent to a small read would send the
/// next large read to malloc, and the heap's growing and trimming back cost page faults.
pub fn take(capacity: usize) -> BytesMut {
    let found = SPARE.with_borrow_mut(|spare| {
        let (_, stack) = spare.iter_mut().find(|(size, _)| *size == capacity)?;
        stack.pop()
    });
    match found {
        Some(buf) => {
            KEPT.set(KEPT.get().saturating_sub(buf.capacity()));
            buf
        }
        None => BytesMut::with_capacity(capacity),
    }
}

/// Keeps `buf` (emptied) for the next [`take`] of its size on this thread, or frees it when
/// the thread keeps enough bytes, or enough sizes, already.
pub fn give(mut buf: BytesMut) {
    let capacity = buf.capacity();
    if capacity == 0 || capacity > LARGEST_KEPT || KEPT.get() + capacity > SPARE_BYTES {
        return;
    }
    buf.clear();
    let kept = SPARE.with_borrow_mut(|spare| {
        let sizes = spare.len();
        match spare.iter_mut().find(|(size, _)| *size == capacity) {
            Some((_, stack)) => stack.push(buf),
            None if sizes < SIZES => spare.push((capacity, vec![buf])),
            None => return false,
        }
        true
    });
    if kept {
        KEPT.set(KEPT.get() + capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_comes_back_empty_and_the_budget_holds() {
        let mut buf = take(64 * 1024);
        buf.extend_from_slice(b"frame");
        let ptr = buf.as_ptr();
        give(buf);
        let again = take(64 * 1024);
        assert_eq!(again.as_ptr(), ptr, "the warm buffer is reused");
        assert!(again.is_empty());
        assert_eq!(again.capacity(), 64 * 1024);
        // A larger request than any spare gets a new buffer.
        give(again);
        let big = take(LARGEST_KEPT);
        assert!(big.capacity() >= LARGEST_KEPT);
        // Filling past the budget frees the rest.
        for _ in 0..(SPARE_BYTES / (256 * 1024) + 4) {
            give(BytesMut::with_capacity(256 * 1024));
        }
        assert!(KEPT.get() <= SPARE_BYTES);
    }

    #[test]
    fn only_a_few_sizes_are_kept() {
        let before = KEPT.get();
        for i in 0..(SIZES + 4) {
            give(BytesMut::with_capacity(1000 + i));
        }
        let sizes = SPARE.with_borrow(|spare| spare.len());
        assert!(sizes <= SIZES, "{sizes} sizes kept");
        assert!(KEPT.get() - before <= SIZES * (1000 + SIZES + 4));
    }
}
