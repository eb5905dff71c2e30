//! [`FramePool`]: frame buffers recycled between the switch side and the driver, so a warm
//! gateway copies each guest frame into a buffer it already has.

use std::sync::Mutex;

/// Buffers kept at most (frames in flight beyond this are allocated and freed).
pub const POOL_MAX: usize = 2048;

/// A free list of frame buffers.
#[derive(Debug, Default)]
pub struct FramePool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl FramePool {
    /// A zeroed buffer of `len` bytes (a recycled one when there is one).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let b = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut b = b.unwrap_or_else(|| Vec::with_capacity(len.max(1514)));
        b.clear();
        b.resize(len, 0);
        b
    }

    /// Give a buffer back.
    pub fn give(&self, b: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_MAX {
            free.push(b);
        }
    }

    /// Buffers on the free list.
    pub fn free(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_capacity() {
        let p = FramePool::default();
        let mut b = p.take(60);
        assert_eq!(b.len(), 60);
        b[0] = 7;
        let ptr = b.as_ptr();
        p.give(b);
        assert_eq!(p.free(), 1);
        let b = p.take(100);
        assert_eq!(
            (b.as_ptr(), b.len(), b[0]),
            (ptr, 100, 0),
            "same buffer, zeroed"
        );
        assert_eq!(p.free(), 0);
    }

    #[test]
    fn the_free_list_is_bounded() {
        let p = FramePool::default();
        for _ in 0..POOL_MAX + 10 {
            p.give(Vec::new());
        }
        assert_eq!(p.free(), POOL_MAX);
    }
}
