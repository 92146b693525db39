//! Test helpers for the size of futures: a task is allocated with room for
//! the largest state its future can reach, and a future is copied whole
//! each time it moves, so the tests that hold these sizes down (per
//! connection, per request) read them here without calling the function.

#![cfg(test)]

use std::future::Future;

pub fn of2<A, B, F: Future>(_: impl Fn(A, B) -> F) -> usize {
    std::mem::size_of::<F>()
}

pub fn of3<A, B, C, F: Future>(_: impl Fn(A, B, C) -> F) -> usize {
    std::mem::size_of::<F>()
}

pub fn of5<A, B, C, D, E, F: Future>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
    std::mem::size_of::<F>()
}

pub fn of6<A, B, C, D, E, G, F: Future>(_: impl Fn(A, B, C, D, E, G) -> F) -> usize {
    std::mem::size_of::<F>()
}

pub fn of7<A, B, C, D, E, G, H, F: Future>(_: impl Fn(A, B, C, D, E, G, H) -> F) -> usize {
    std::mem::size_of::<F>()
}

#[allow(clippy::many_single_char_names)]
pub fn of10<A, B, C, D, E, G, H, I, J, K, F: Future>(
    _: impl Fn(A, B, C, D, E, G, H, I, J, K) -> F,
) -> usize {
    std::mem::size_of::<F>()
}

/// Fails naming the first `(what, size, bound)` whose size is over its bound.
pub fn assert_within(sizes: &[(&str, usize, usize)]) {
    for &(what, size, bound) in sizes {
        assert!(size <= bound, "{what}: {size} bytes, more than {bound}");
    }
}
