//! The integer-only nonlinearities of I-BERT (Kim et al. 2021): i-exp and softmax, i-GELU with
//! the i-erf polynomial, LayerNorm with an integer square root by Newton's iteration. Each
//! kernel's constants are made once at conversion (`new`, where floats are allowed); `apply`
//! runs on integers only.

use super::quant::rounding_divide_by_pot;

/// floor(√n) by Newton's iteration from a power of two at or above the root.
pub fn isqrt(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let bits = 64 - n.leading_zeros();
    let mut x = 1u64 << bits.div_ceil(2);
    loop {
        let y = (x + n / x) / 2;
        if y >= x {
            return x;
        }
        x = y;
    }
}

/// `round(a / b)` for b > 0, halves away from zero.
pub fn round_div(a: i64, b: i64) -> i64 {
    if a >= 0 {
        (a + b / 2) / b
    } else {
        -((-a + b / 2) / b)
    }
}

/// I-BERT's i-exp for x ≤ 0 at input scale `s`: x = −z·ln2 + p with p in (−ln2, 0],
/// exp(p) ≈ 0.3585·(p + 1.353)² + 0.344, then a right shift by z. Output scale 0.3585·s².
#[derive(Clone, Debug)]
pub struct IExp {
    q_ln2: i64,
    q_b: i64,
    q_c: i64,
    /// Inputs below this are clamped (exp is then far below one output step).
    q_min: i64,
}

impl IExp {
    pub const A: f64 = 0.3585;
    pub const B: f64 = 1.353;
    pub const C: f64 = 0.344;

    /// Constants for input codes at scale `s`; inputs below −`range` clamp to it.
    pub fn new(s: f64, range: f64) -> IExp {
        IExp {
            q_ln2: (std::f64::consts::LN_2 / s).floor() as i64,
            q_b: (Self::B / s).floor() as i64,
            q_c: (Self::C / (Self::A * s * s)).floor() as i64,
            q_min: -(range / s).floor() as i64,
        }
    }

    /// The output scale (conversion time only).
    pub fn out_scale(s: f64) -> f64 {
        Self::A * s * s
    }

    pub fn apply(&self, q: i64) -> i64 {
        let q = q.clamp(self.q_min, 0);
        let z = -q / self.q_ln2; // q ≤ 0: truncation is floor(−q/q_ln2)
        let p = q + z * self.q_ln2;
        let l = (p + self.q_b) * (p + self.q_b) + self.q_c;
        if z >= 63 {
            0
        } else {
            l >> z
        }
    }
}

/// Integer softmax over one row of scores (codes at the scale `IExp` was made for): subtract
/// the row max, i-exp, then normalise to `prob_bits` fractional bits, rounding to nearest.
pub fn softmax_row(exp: &IExp, scores: &[i32], prob_bits: u32, out: &mut [i32]) {
    let mx = scores.iter().copied().max().unwrap_or(0) as i64;
    let mut sum = 0i64;
    for (o, &s) in out.iter_mut().zip(scores) {
        let e = exp.apply(s as i64 - mx);
        sum += e;
        *o = e as i32;
    }
    // The max's own term is at least q_c + q_b² > 0, so sum > 0.
    for o in out.iter_mut() {
        *o = round_div((*o as i64) << prob_bits, sum) as i32;
    }
}

/// I-BERT's i-GELU: x·½·(1 + erf(x/√2)) with erf(y) ≈ sgn(y)·[1 − 0.2888·(min(|y|, 1.769) −
/// 1.769)²]. For input codes q at scale `s` it returns q·(Q1 + L) at scale s·0.2888·s'²/2,
/// s' = s/√2, where L is the integer erf and Q1 = 1/(0.2888·s'²).
#[derive(Clone, Debug)]
pub struct IGelu {
    q_clip: i64,
    q_one: i64,
}

impl IGelu {
    pub const A: f64 = 0.2888;
    pub const CLIP: f64 = 1.769;

    pub fn new(s: f64) -> IGelu {
        let sp = s / std::f64::consts::SQRT_2;
        IGelu { q_clip: (Self::CLIP / sp).floor() as i64, q_one: (1.0 / (Self::A * sp * sp)).floor() as i64 }
    }

    pub fn out_scale(s: f64) -> f64 {
        let sp = s / std::f64::consts::SQRT_2;
        s * Self::A * sp * sp / 2.0
    }

    /// The largest |output| for inputs of at most `max_in` in magnitude.
    pub fn max_out(&self, max_in: i64) -> i64 {
        max_in * 2 * self.q_one
    }

    pub fn apply(&self, q: i64) -> i64 {
        let u = q.abs().min(self.q_clip) - self.q_clip;
        let erf = q.signum() * (self.q_one - u * u);
        q * (self.q_one + erf)
    }
}

/// The logistic function in integers: σ(x) = 1/(1 + e^−x) with e^−|x| from [`IExp`] at the
/// input's scale, as a Q15 fraction (what SiLU needs: silu(x) = x·σ(x)).
#[derive(Clone, Debug)]
pub struct ISigmoid {
    exp: IExp,
    /// 1 at i-exp's output scale.
    one: i64,
}

impl ISigmoid {
    pub fn new(s: f64) -> ISigmoid {
        ISigmoid { exp: IExp::new(s, 24.0), one: (1.0 / IExp::out_scale(s)).round() as i64 }
    }

    /// σ(q·s) · 2^15, rounded.
    pub fn apply(&self, q: i64) -> i64 {
        let e = self.exp.apply(-q.abs());
        let num = if q >= 0 { self.one } else { e };
        round_div(num << 15, self.one + e)
    }
}

/// LayerNorm on integer rows: mean and variance in i64, σ by an integer square root (Newton),
/// the normalised row in Q`F` fixed point, then γ and β folded into one per-channel integer
/// multiply and add that land on the output's int8 scale. Without centring it is RMSNorm.
#[derive(Clone, Debug)]
pub struct ILayerNorm {
    /// Subtract the mean (LayerNorm) or not (RMSNorm).
    center: bool,
    /// ε in input codes squared.
    eps_q: i64,
    /// γᵢ/s_out·2^GB.
    g: Vec<i64>,
    /// βᵢ/s_out·2^(F+GB).
    b: Vec<i64>,
}

impl ILayerNorm {
    /// Fractional bits of the normalised values.
    pub const F: u32 = 14;
    /// Fractional bits of the γ multiplier.
    pub const GB: u32 = 16;

    /// `s_in`: scale of the input codes; `s_out`: scale of the int8 output.
    pub fn new(gamma: &[f32], beta: Option<&[f32]>, eps: f32, s_in: f64, s_out: f64) -> ILayerNorm {
        let g = gamma.iter().map(|&x| (x as f64 / s_out * (1u64 << Self::GB) as f64).round() as i64).collect();
        let b = match beta {
            Some(b) => {
                b.iter().map(|&x| (x as f64 / s_out * (1u64 << (Self::F + Self::GB)) as f64).round() as i64).collect()
            }
            None => vec![0; gamma.len()],
        };
        ILayerNorm { center: true, eps_q: (eps as f64 / (s_in * s_in)).round() as i64, g, b }
    }

    /// RMSNorm: x/√(mean(x²) + ε)·γ.
    pub fn new_rms(gamma: &[f32], eps: f32, s_in: f64, s_out: f64) -> ILayerNorm {
        ILayerNorm { center: false, ..Self::new(gamma, None, eps, s_in, s_out) }
    }

    /// One row of input codes (at most 2^24 in magnitude) to int8 codes.
    pub fn apply(&self, x: &[i32], out: &mut [i8]) {
        let c = x.len() as i64;
        let sum: i64 = x.iter().map(|&v| v as i64).sum();
        let mean = if self.center { round_div(sum, c) } else { 0 };
        let ss: i64 = x.iter().map(|&v| (v as i64 - mean) * (v as i64 - mean)).sum();
        let var = (round_div(ss, c) + self.eps_q).max(1);
        // σ·2^p with p as large as keeps var·4^p under 2^62: about 31 bits of σ.
        let p = (62 - (64 - var.leading_zeros()) as i64).max(0) / 2;
        let r = isqrt((var as u64) << (2 * p)) as i64;
        for (i, o) in out.iter_mut().enumerate() {
            let d = x[i] as i64 - mean;
            let n = round_div(d << (p as u32 + Self::F), r);
            let y = rounding_divide_by_pot(n * self.g[i] + self.b[i], Self::F + Self::GB);
            *o = y.clamp(-127, 127) as i8;
        }
    }
}
