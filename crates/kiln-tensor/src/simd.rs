//! A thin SIMD layer: one trait, three instruction sets (AVX-512, AVX2+FMA, scalar).
//!
//! Kernels are written once as `#[inline(always)]` bodies generic over [`Simd`] and
//! instantiated inside `#[target_feature]` entry points by [`multiversion!`], so the
//! binary runs on any x86-64 and picks the widest unit at run time.
#![allow(clippy::missing_safety_doc)]

use std::sync::OnceLock;

/// The instruction set a fast kernel runs on, chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// Widest supported set; `KILN_ISA=scalar|avx2|avx512` narrows it (for tests and comparisons).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Self::best_supported();
            match std::env::var("KILN_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") if best != Isa::Scalar => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// Every set this CPU can run, widest first; tests run each of them.
    pub fn all_supported() -> Vec<Isa> {
        let mut v = Vec::new();
        let best = Self::best_supported();
        if best == Isa::Avx512 {
            v.push(Isa::Avx512);
        }
        if best != Isa::Scalar {
            v.push(Isa::Avx2);
        }
        v.push(Isa::Scalar);
        v
    }

    fn best_supported() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// One vector register of f32 lanes and the operations the kernels need.
///
/// # Safety
/// Implementations use intrinsics that require their target features; callers reach them only
/// through `multiversion!` entry points compiled with those features, after run-time detection.
pub trait Simd: Copy {
    const LANES: usize;
    type V: Copy;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// a * b + c, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sqrt(a: Self::V) -> Self::V;
    unsafe fn reduce_sum(v: Self::V) -> f32;
    unsafe fn reduce_max(v: Self::V) -> f32;
    /// e^x, about 2 ulp over the f32 range; underflows to 0 below -87.3.
    unsafe fn exp(x: Self::V) -> Self::V;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        Self::splat(0.0)
    }

    /// tanh(x) = 1 - 2 / (e^{2x} + 1), with x clamped where tanh is ±1 in f32.
    #[inline(always)]
    unsafe fn tanh(x: Self::V) -> Self::V {
        let x = Self::min(Self::max(x, Self::splat(-9.0)), Self::splat(9.0));
        let e = Self::exp(Self::add(x, x));
        let one = Self::splat(1.0);
        Self::sub(one, Self::div(Self::splat(2.0), Self::add(e, one)))
    }
}

/// Cephes-style exp on any lane type: 2^n · p(r), r = x − n·ln2 in [−ln2/2, ln2/2].
macro_rules! exp_body {
    ($S:ty, $x:expr, $round:expr, $pow2n:expr) => {{
        let x = <$S>::min(<$S>::max($x, <$S>::splat(-87.3)), <$S>::splat(88.7));
        let n = $round(<$S>::mul(x, <$S>::splat(std::f32::consts::LOG2_E)));
        let r = <$S>::fma(n, <$S>::splat(-0.693_145_75), x);
        let r = <$S>::fma(n, <$S>::splat(-1.428_606_8e-6), r);
        let mut p = <$S>::splat(1.987_569_1e-4);
        p = <$S>::fma(p, r, <$S>::splat(1.398_199_9e-3));
        p = <$S>::fma(p, r, <$S>::splat(8.333_452e-3));
        p = <$S>::fma(p, r, <$S>::splat(4.166_579_6e-2));
        p = <$S>::fma(p, r, <$S>::splat(1.666_666_5e-1));
        p = <$S>::fma(p, r, <$S>::splat(0.5));
        let r2 = <$S>::mul(r, r);
        let y = <$S>::add(<$S>::fma(p, r2, r), <$S>::splat(1.0));
        <$S>::mul(y, $pow2n(n))
    }};
}

#[derive(Clone, Copy)]
pub struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        // Unfused on purpose: without the FMA unit, mul_add would call a slow libm routine.
        a * b + c
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn min(a: f32, b: f32) -> f32 {
        a.min(b)
    }
    #[inline(always)]
    unsafe fn sqrt(a: f32) -> f32 {
        a.sqrt()
    }
    #[inline(always)]
    unsafe fn reduce_sum(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn reduce_max(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn exp(x: f32) -> f32 {
        x.exp()
    }
    #[inline(always)]
    unsafe fn tanh(x: f32) -> f32 {
        x.tanh()
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Avx512;

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m512, b: __m512) -> __m512 {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m512, b: __m512) -> __m512 {
            _mm512_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            _mm512_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m512, b: __m512) -> __m512 {
            _mm512_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sqrt(a: __m512) -> __m512 {
            _mm512_sqrt_ps(a)
        }
        #[inline(always)]
        unsafe fn reduce_sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m512) -> f32 {
            _mm512_reduce_max_ps(v)
        }
        #[inline(always)]
        unsafe fn exp(x: __m512) -> __m512 {
            exp_body!(
                Avx512,
                x,
                |v| _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v),
                |n| _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                    _mm512_cvtps_epi32(n),
                    _mm512_set1_epi32(127)
                )))
            )
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2;

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: __m256, b: __m256) -> __m256 {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn div(a: __m256, b: __m256) -> __m256 {
            _mm256_div_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            _mm256_max_ps(a, b)
        }
        #[inline(always)]
        unsafe fn min(a: __m256, b: __m256) -> __m256 {
            _mm256_min_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sqrt(a: __m256) -> __m256 {
            _mm256_sqrt_ps(a)
        }
        #[inline(always)]
        unsafe fn reduce_sum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn reduce_max(v: __m256) -> f32 {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn exp(x: __m256) -> __m256 {
            exp_body!(Avx2, x, |v| _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v), |n| {
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(n),
                    _mm256_set1_epi32(127),
                )))
            })
        }
    }
}

/// Generates `pub(crate) fn $name(isa, args..)` that runs the generic body `$body::<S>` with
/// the widest instruction set `isa` allows, compiled under the matching `#[target_feature]`.
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $vis fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn on_avx512($($arg: $ty),*) $(-> $ret)? {
                unsafe { $body::<$crate::simd::Avx512>($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn on_avx2($($arg: $ty),*) $(-> $ret)? {
                unsafe { $body::<$crate::simd::Avx2>($($arg),*) }
            }
            match isa {
                // SAFETY: `isa` comes from `Isa::detect`/`all_supported`, which checked the CPU.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Isa::Avx512 => unsafe { on_avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Isa::Avx2 => unsafe { on_avx2($($arg),*) },
                _ => unsafe { $body::<$crate::simd::Scalar>($($arg),*) },
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe fn exp_via<S: Simd>(xs: &[f32]) -> Vec<f32> {
        xs.iter()
            .map(|&x| unsafe {
                let mut buf = [0.0f32; 16];
                S::store(buf.as_mut_ptr(), S::exp(S::splat(x)));
                buf[0]
            })
            .collect()
    }

    crate::multiversion!(fn exp_all(xs: &[f32]) -> Vec<f32> => exp_via);
    crate::multiversion!(fn tanh_all(xs: &[f32]) -> Vec<f32> => tanh_via);

    unsafe fn tanh_via<S: Simd>(xs: &[f32]) -> Vec<f32> {
        xs.iter()
            .map(|&x| unsafe {
                let mut buf = [0.0f32; 16];
                S::store(buf.as_mut_ptr(), S::tanh(S::splat(x)));
                buf[0]
            })
            .collect()
    }

    #[test]
    fn vector_exp_and_tanh_match_libm() {
        let xs: Vec<f32> = (0..20001).map(|i| -87.0 + i as f32 * (175.0 / 20000.0)).collect();
        for isa in Isa::all_supported() {
            for (x, y) in xs.iter().zip(exp_all(isa, &xs)) {
                let want = (*x as f64).exp();
                assert!(((y as f64 - want) / want).abs() < 4e-7, "{isa:?} exp({x}) = {y}, want {want}");
            }
            let ts: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
            for (x, y) in ts.iter().zip(tanh_all(isa, &ts)) {
                let want = (*x as f64).tanh();
                assert!((y as f64 - want).abs() < 3e-7, "{isa:?} tanh({x}) = {y}, want {want}");
            }
        }
    }
}
