//! kiln-tensor: dtypes, shapes, contiguous CPU tensors, and the kernels a GPT training step
//! runs, each as a plain scalar reference beside a fast multi-threaded SIMD version.
//!
//! The kernel boundary is the [`Kernels`] trait: model code calls it and never sees which
//! backend (reference, CPU SIMD, later CUDA) does the work.

pub mod bf16;
pub mod gram;
pub mod kernels;
pub mod probe;
pub mod quant;
pub mod simd;
mod tensor;

pub use kernels::{CpuKernels, Kernels, LowPrecision, MixedPrecisionKernels, ReferenceKernels};
pub use simd::Isa;
pub use tensor::{DType, Shape, Tensor, TensorError};

#[cfg(test)]
pub(crate) mod testutil;

/// Runs `f` on one of the kernel worker threads. A thread outside the pool pays a hand-off
/// (wake a worker, sleep until it is done) on every parallel kernel call; a decode step makes
/// about ten such calls per layer on rows of a few kilobytes, so it runs the whole step on a
/// worker and pays the hand-off once.
pub fn on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
