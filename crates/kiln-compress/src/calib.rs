//! Calibration statistics of one linear layer's inputs, gathered batch by batch.
//!
//! - the GPTQ Hessian `H = 2/N · Σ xᵀx` (`[k, k]`, f64, summed with a single-threaded GEMM per
//!   block of rows so the result does not depend on the thread count);
//! - per-channel `max|x|` (SmoothQuant) and `mean|x|` (AWQ);
//! - a uniform sample of up to `cap` input rows (reservoir sampling, Vitter's algorithm R, with
//!   a seeded SplitMix64), on which AWQ measures the output error of candidate scales.

use crate::{check_finite, check_len, CompressError, Result};

/// Input statistics of one linear layer with `k` input channels.
#[derive(Clone, Debug)]
pub struct LinearCalib {
    k: usize,
    rows: usize,
    /// Σ xᵀx, `[k, k]`.
    xtx: Vec<f64>,
    absmax: Vec<f32>,
    abssum: Vec<f64>,
    cap: usize,
    reservoir: Vec<f32>,
    rng: u64,
}

impl LinearCalib {
    /// Rows AWQ's search samples by default (its reference uses 512 tokens per layer as well).
    pub const DEFAULT_RESERVOIR: usize = 512;

    /// Statistics for `k` input channels, keeping [`LinearCalib::DEFAULT_RESERVOIR`] sample rows (seed 0).
    pub fn new(k: usize) -> LinearCalib {
        LinearCalib::with_reservoir(k, Self::DEFAULT_RESERVOIR, 0)
    }

    /// Everything but the Hessian (AWQ and SmoothQuant do not need it, and it costs `rows·k²`
    /// multiply-adds per batch and `8·k²` bytes).
    pub fn without_hessian(k: usize) -> LinearCalib {
        LinearCalib { xtx: Vec::new(), ..LinearCalib::with_reservoir(k, Self::DEFAULT_RESERVOIR, 0) }
    }

    /// Whether the Hessian is being gathered (GPTQ needs it).
    pub fn has_hessian(&self) -> bool {
        self.xtx.len() == self.k * self.k
    }

    /// As [`LinearCalib::new`] with a reservoir of `cap` rows drawn with `seed`.
    pub fn with_reservoir(k: usize, cap: usize, seed: u64) -> LinearCalib {
        LinearCalib {
            k,
            rows: 0,
            xtx: vec![0.0; k * k],
            absmax: vec![0.0; k],
            abssum: vec![0.0; k],
            cap,
            reservoir: Vec::new(),
            rng: seed,
        }
    }

    /// Adds `rows` input rows `x [rows, k]` (row-major) to the statistics.
    pub fn observe(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let k = self.k;
        check_len("calibration rows", rows * k, x.len())?;
        check_finite("calibration rows", x)?;
        if rows == 0 {
            return Ok(());
        }
        let xd: Vec<f64> = if self.has_hessian() { x.iter().map(|&v| v as f64).collect() } else { Vec::new() };
        if self.has_hessian() {
            kiln_tensor::gram::gram_accumulate_f64(&mut self.xtx, &xd, rows, k);
        }
        for row in x.chunks_exact(k) {
            for ((m, s), &v) in self.absmax.iter_mut().zip(&mut self.abssum).zip(row) {
                *m = m.max(v.abs());
                *s += v.abs() as f64;
            }
            self.sample(row);
        }
        Ok(())
    }

    /// Algorithm R: the t-th row seen replaces a random slot with probability cap / (t + 1).
    fn sample(&mut self, row: &[f32]) {
        let seen = self.rows;
        self.rows += 1;
        if seen < self.cap {
            self.reservoir.extend_from_slice(row);
        } else {
            let j = (self.next_u64() % (seen as u64 + 1)) as usize;
            if j < self.cap {
                self.reservoir[j * self.k..(j + 1) * self.k].copy_from_slice(row);
            }
        }
    }

    /// SplitMix64.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows observed so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `H = 2/N · Σ xᵀx`, `[k, k]` row-major (all zeros before any row).
    pub fn hessian(&self) -> Vec<f64> {
        let f = if self.rows == 0 { 0.0 } else { 2.0 / self.rows as f64 };
        self.xtx.iter().map(|&v| v * f).collect()
    }

    /// Per-channel `max|x|`.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// Per-channel `mean|x|`.
    pub fn absmean(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.abssum.iter().map(|&s| (s / n) as f32).collect()
    }

    /// The sampled rows, `[sample_rows, k]`.
    pub fn samples(&self) -> &[f32] {
        &self.reservoir
    }

    /// How many rows [`LinearCalib::samples`] holds.
    pub fn sample_rows(&self) -> usize {
        self.reservoir.len() / self.k.max(1)
    }

    /// Errors unless these statistics fit a weight with `k` inputs and saw at least one row.
    pub(crate) fn check_for(&self, k: usize) -> Result<()> {
        if self.k != k {
            return Err(CompressError::CalibK { calib: self.k, weight: k });
        }
        if self.rows == 0 {
            return Err(CompressError::NoCalibration);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn statistics_match_direct_sums() {
        let (k, rows) = (70, 150);
        let x = randn(&mut rng(1), rows * k, 1.0);
        let mut c = LinearCalib::with_reservoir(k, 40, 9);
        // In uneven batches: the sums do not depend on how rows arrive.
        c.observe(&x[..17 * k], 17).unwrap();
        c.observe(&x[17 * k..], rows - 17).unwrap();
        let h = c.hessian();
        for i in [0, 5, 69] {
            for j in [0, 33, 69] {
                let want: f64 =
                    (0..rows).map(|r| x[r * k + i] as f64 * x[r * k + j] as f64).sum::<f64>() * 2.0 / rows as f64;
                assert!((h[i * k + j] - want).abs() < 1e-12 * rows as f64, "H[{i},{j}]");
            }
            let amax = (0..rows).map(|r| x[r * k + i].abs()).fold(0.0f32, f32::max);
            assert_eq!(c.absmax()[i], amax);
            let mean = (0..rows).map(|r| x[r * k + i].abs() as f64).sum::<f64>() / rows as f64;
            assert!((c.absmean()[i] as f64 - mean).abs() < 1e-6);
        }
        assert_eq!((c.rows(), c.sample_rows()), (rows, 40));
        // Every sampled row is one of the inputs, and the draw is reproducible.
        for s in c.samples().chunks_exact(k) {
            assert!(x.chunks_exact(k).any(|r| r == s));
        }
        let mut again = LinearCalib::with_reservoir(k, 40, 9);
        again.observe(&x, rows).unwrap();
        assert_eq!(again.samples(), c.samples());
    }

    #[test]
    fn bad_batches_are_errors() {
        let mut c = LinearCalib::new(8);
        assert!(matches!(c.observe(&[0.0; 15], 2), Err(CompressError::Len { .. })));
        assert!(matches!(c.observe(&[f32::INFINITY; 8], 1), Err(CompressError::NonFinite { .. })));
        assert!(matches!(c.check_for(8), Err(CompressError::NoCalibration)));
        c.observe(&[1.0; 8], 1).unwrap();
        assert!(matches!(c.check_for(9), Err(CompressError::CalibK { .. })));
    }
}
