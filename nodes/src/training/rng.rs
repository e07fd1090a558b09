//! The trainer's randomness, derived from (seed, purpose, index) rather than
//! carried along: the draws of step `n` depend only on the seed and `n`, so a
//! resumed run replays exactly what an uninterrupted one would, with no generator
//! state to save.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// What a stream is for; each purpose gets its own independent stream.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    /// Weight initialisation from scratch.
    Init = 1,
    /// The order of the data in one epoch.
    Order = 2,
    /// Timesteps, caption dropout, posterior and diffusion noise of one step.
    Step = 3,
    /// Scenes of the shapes world, one stream per image.
    World = 4,
    /// Wording choices of a scene's sparse caption.
    Caption = 5,
}

pub struct TrainRng(ChaCha20Rng);

impl TrainRng {
    pub fn new(seed: u64, stream: Stream, index: u64) -> TrainRng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&(stream as u64).to_le_bytes());
        key[16..24].copy_from_slice(&index.to_le_bytes());
        TrainRng(ChaCha20Rng::from_seed(key))
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in 0..n (n > 0), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.0.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// `n` standard normals, drawn as the noise nodes draw them.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        crate::noise::normals(&mut self.0, n)
    }

    /// A uniformly random permutation of 0..n (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a = TrainRng::new(7, Stream::Step, 3).normals(5);
        assert_eq!(a, TrainRng::new(7, Stream::Step, 3).normals(5));
        assert_ne!(a, TrainRng::new(7, Stream::Step, 4).normals(5));
        assert_ne!(a, TrainRng::new(7, Stream::Order, 3).normals(5));
        let mut p = TrainRng::new(1, Stream::Order, 0).permutation(10);
        p.sort();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
    }
}
