//! Sub-allocation of a device arena: first fit over a free list, with coalescing.
//!
//! Offsets and sizes are aligned to [`ALIGN`] bytes, enough for any dtype and for the 256-byte
//! alignment CUDA's own allocator guarantees. Sizes never exceed the arena, so the device budget
//! (the arena's size) is a hard cap by construction.

use std::collections::BTreeMap;

/// Alignment of every allocation and of every tensor inside a layer.
pub const ALIGN: u64 = 256;

/// Rounds `n` up to [`ALIGN`]; `None` on overflow.
pub fn align_up(n: u64) -> Option<u64> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// A first-fit allocator over `len` bytes.
#[derive(Clone, Debug)]
pub struct Allocator {
    len: u64,
    /// Free ranges: offset → length, never adjacent (they are merged).
    free: BTreeMap<u64, u64>,
    used: u64,
    peak: u64,
}

impl Allocator {
    pub fn new(len: u64) -> Allocator {
        let len = len & !(ALIGN - 1);
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(0, len);
        }
        Allocator { len, free, used: 0, peak: 0 }
    }

    /// Allocates `bytes` (rounded up to [`ALIGN`]); the offset, or `None` if no free range is
    /// large enough. Zero bytes take no space and return offset 0.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        if bytes == 0 {
            return Some(0);
        }
        let size = align_up(bytes)?;
        let (&off, &len) = self.free.iter().find(|&(_, &len)| len >= size)?;
        self.free.remove(&off);
        if len > size {
            self.free.insert(off + size, len - size);
        }
        self.used += size;
        self.peak = self.peak.max(self.used);
        Some(off)
    }

    /// Frees an allocation made by [`Allocator::alloc`] with the same `bytes`.
    pub fn free(&mut self, offset: u64, bytes: u64) {
        let Some(size) = align_up(bytes).filter(|&s| s > 0) else { return };
        self.used = self.used.saturating_sub(size);
        let (mut start, mut len) = (offset, size);
        // Merge with the free range just before and the one just after.
        if let Some((&prev, &plen)) = self.free.range(..offset).next_back()
            && prev + plen == offset
        {
            self.free.remove(&prev);
            start = prev;
            len += plen;
        }
        if let Some(next) = self.free.remove(&(offset + size)) {
            len += next;
        }
        self.free.insert(start, len);
    }

    /// Bytes currently allocated (after alignment).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The most ever allocated at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Size of the arena this allocator manages.
    pub fn capacity(&self) -> u64 {
        self.len
    }

    /// The largest single allocation that would succeed now.
    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_coalescing() {
        let mut a = Allocator::new(4096);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(256).unwrap();
        let z = a.alloc(1000).unwrap();
        assert_eq!((x, y, z), (0, 256, 512));
        assert_eq!(a.used(), 256 + 256 + 1024);
        a.free(y, 256);
        assert_eq!(a.alloc(200), Some(256)); // reuses the hole
        a.free(256, 200);
        a.free(x, 100);
        a.free(z, 1000);
        assert_eq!(a.used(), 0);
        assert_eq!(a.largest_free(), 4096);
        assert_eq!(a.peak(), 1536);
        assert_eq!(a.alloc(4097), None);
        assert_eq!(a.alloc(4096), Some(0));
    }

    #[test]
    fn zero_bytes_take_no_space() {
        let mut a = Allocator::new(256);
        assert_eq!(a.alloc(0), Some(0));
        assert_eq!(a.alloc(256), Some(0));
        a.free(0, 0);
        assert_eq!(a.used(), 256);
    }

    #[test]
    fn never_hands_out_overlapping_ranges() {
        use proptest::prelude::*;
        proptest!(|(ops in proptest::collection::vec((1u64..5000, any::<bool>()), 1..200))| {
            let mut a = Allocator::new(64 * 1024);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (size, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (o, s) = live.remove(size as usize % live.len());
                    a.free(o, s);
                } else if let Some(o) = a.alloc(size) {
                    let end = o + align_up(size).unwrap();
                    prop_assert!(end <= a.capacity());
                    for &(lo, ls) in &live {
                        let lend = lo + align_up(ls).unwrap();
                        prop_assert!(end <= lo || o >= lend, "overlap");
                    }
                    live.push((o, size));
                }
                let sum: u64 = live.iter().map(|&(_, s)| align_up(s).unwrap()).sum();
                prop_assert_eq!(a.used(), sum);
            }
        });
    }
}
