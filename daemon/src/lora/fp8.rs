//! fp8 weights (`F8_E4M3`, `F8_E5M2`): decoding, and writing merged values back with
//! deterministic stochastic rounding.
//!
//! # Formats
//!
//! - `F8_E4M3` is the OCP "E4M3FN" format (PyTorch's `float8_e4m3fn`, ml_dtypes'
//!   `float8_e4m3fn`): bias 7, no infinities, NaN = `S.1111.111`, largest finite 448.
//! - `F8_E5M2` is IEEE-like (`float8_e5m2`): bias 15, ±inf = `S.11111.00`, NaNs above, largest
//!   finite 57344.
//!
//! Decoding is the `float8` crate's (exact: every fp8 value is an f32).
//!
//! # Stochastic rounding
//!
//! A merged value `x` (accumulated in f32) that is not an fp8 value lies between two adjacent
//! fp8 values `lo < x < hi`; it becomes `hi` with probability `(x − lo) / (hi − lo)` and `lo`
//! otherwise, so the expected result is `x` itself: rounding adds noise but no bias, where
//! round-to-nearest would drop every delta smaller than half a step (most of a LoRA's delta on
//! fp8 weights, whose steps are 2⁻³ relative for E4M3). The result is always `lo` or `hi`: within
//! one fp8 step of the merged value. An `x` that is an fp8 value is returned exactly, so
//! elements a delta does not change keep their bytes.
//!
//! The randomness is deterministic, so the same merge gives the same bytes in every run, on
//! every machine, and in backup and fuse modes alike:
//!
//! - the seed is the 64-bit FNV-1a hash of the base tensor's full name (its UTF-8 bytes;
//!   offset basis `0xcbf29ce484222325`, prime `0x100000001b3`);
//! - element `i` (row-major index in the tensor) draws `r = splitmix64(seed + (i + 1)·γ)`, with
//!   `γ = 0x9e3779b97f4a7c15` and splitmix64's finaliser (`z ^= z >> 30; z *= 0xbf58476d1ce4e5b9;
//!   z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31`): exactly the `i + 1`-th output of a
//!   splitmix64 generator seeded with `seed`, but addressable by index, so the order (or
//!   threading) of the encoding never changes a result;
//! - `u = (r >> 11) · 2⁻⁵³ ∈ [0, 1)`, and the value rounds up iff `u < (x − lo) / (hi − lo)`
//!   (computed in f64 from the exact f32 and fp8 values).
//!
//! # Edge cases
//!
//! NaN stays NaN (the format's NaN with the input's sign). A magnitude at or beyond the largest
//! finite value saturates to it (E4M3FN has no infinity, and a merge should not turn a weight
//! into one); an infinite E5M2 weight stays infinite. Zero keeps its sign.

use std::sync::LazyLock;

use float8::{F8E4M3, F8E5M2};

use crate::store::Dtype;

/// An fp8 format LoRA can be merged into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8 {
    E4M3,
    E5M2,
}

/// The decoded values of one format: all 256 codes, and the positive finite ones in code
/// order (which is value order).
struct Table {
    all: [f32; 256],
    /// Codes `0..=max_code`, increasing.
    positive: Vec<f32>,
}

impl Table {
    fn build(f: Fp8) -> Table {
        let mut all = [0f32; 256];
        for (code, v) in all.iter_mut().enumerate() {
            *v = f.decode_slow(code as u8);
        }
        let positive = all[..=usize::from(f.max_code())].to_vec();
        Table { all, positive }
    }
}

static E4M3: LazyLock<Table> = LazyLock::new(|| Table::build(Fp8::E4M3));
static E5M2: LazyLock<Table> = LazyLock::new(|| Table::build(Fp8::E5M2));

impl Fp8 {
    pub fn of(dtype: Dtype) -> Option<Fp8> {
        match dtype {
            Dtype::F8_E4M3 => Some(Fp8::E4M3),
            Dtype::F8_E5M2 => Some(Fp8::E5M2),
            _ => None,
        }
    }

    fn table(self) -> &'static Table {
        match self {
            Fp8::E4M3 => &E4M3,
            Fp8::E5M2 => &E5M2,
        }
    }

    fn decode_slow(self, code: u8) -> f32 {
        match self {
            Fp8::E4M3 => F8E4M3::from_bits(code).to_f32(),
            Fp8::E5M2 => F8E5M2::from_bits(code).to_f32(),
        }
    }

    /// The value of `code`.
    pub fn decode(self, code: u8) -> f32 {
        self.table().all[usize::from(code)]
    }

    /// The code of the largest finite positive value (448 for E4M3, 57344 for E5M2).
    pub fn max_code(self) -> u8 {
        match self {
            Fp8::E4M3 => 0x7e,
            Fp8::E5M2 => 0x7b,
        }
    }

    fn nan_code(self) -> u8 {
        match self {
            Fp8::E4M3 => 0x7f,
            Fp8::E5M2 => 0x7e,
        }
    }

    /// Writes `x` as an fp8 code, rounding stochastically with the random bits `r` (module
    /// docs).
    pub fn round(self, x: f32, r: u64) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | self.nan_code();
        }
        let a = x.abs();
        if a.is_infinite() && self == Fp8::E5M2 {
            return sign | 0x7c;
        }
        let positive = &self.table().positive;
        let max = self.max_code();
        if a >= positive[usize::from(max)] {
            return sign | max;
        }
        // positive[0] = 0 ≤ a, so at least one value is ≤ a; a < max, so lo < max.
        let lo = positive.partition_point(|&v| v <= a).saturating_sub(1);
        let (vlo, vhi) = (positive[lo], positive[lo + 1]);
        if vlo == a {
            return sign | lo as u8;
        }
        let frac = (f64::from(a) - f64::from(vlo)) / (f64::from(vhi) - f64::from(vlo));
        let u = (r >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let code = if u < frac { lo + 1 } else { lo };
        sign | code as u8
    }
}

/// 64-bit FNV-1a of `name`: the stochastic-rounding seed of a tensor (module docs).
pub fn seed(name: &str) -> u64 {
    name.bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The random bits element `index` of a tensor with seed `seed` rounds with (module docs).
pub fn draw(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Decodes fp8 bytes to f32 (exact).
pub(crate) fn decode_all(f: Fp8, bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    let all = &f.table().all;
    bytes.iter().map(move |&b| all[usize::from(b)])
}

/// Encodes `acc` into `out` (one byte each) with stochastic rounding seeded by `seed`.
pub(crate) fn encode_all(f: Fp8, acc: impl Iterator<Item = f32>, out: &mut [u8], seed: u64) {
    for (i, (o, x)) in out.iter_mut().zip(acc).enumerate() {
        *o = f.round(x, draw(seed, i as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_matches_the_formats() {
        // E4M3FN: bias 7, 3 mantissa bits, subnormals m/8 · 2⁻⁶, no inf.
        for code in 0u8..=0xff {
            let (s, e, m) = (code >> 7, (code >> 3) & 0xf, code & 7);
            let v = Fp8::E4M3.decode(code);
            if e == 0xf && m == 7 {
                assert!(v.is_nan(), "{code:#x}");
                continue;
            }
            let mag = if e == 0 {
                f64::from(m) / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + f64::from(m) / 8.0) * 2f64.powi(i32::from(e) - 7)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(f64::from(v), want, "E4M3 {code:#x}");
        }
        assert_eq!(Fp8::E4M3.decode(0x7e), 448.0);
        // E5M2: bias 15, 2 mantissa bits, inf and NaN at exponent 31.
        for code in 0u8..=0xff {
            let (s, e, m) = (code >> 7, (code >> 2) & 0x1f, code & 3);
            let v = Fp8::E5M2.decode(code);
            if e == 0x1f {
                if m == 0 {
                    assert_eq!(v, if s == 1 { f32::NEG_INFINITY } else { f32::INFINITY });
                } else {
                    assert!(v.is_nan(), "{code:#x}");
                }
                continue;
            }
            let mag = if e == 0 {
                f64::from(m) / 4.0 * 2f64.powi(-14)
            } else {
                (1.0 + f64::from(m) / 4.0) * 2f64.powi(i32::from(e) - 15)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(f64::from(v), want, "E5M2 {code:#x}");
        }
        assert_eq!(Fp8::E5M2.decode(0x7b), 57344.0);
    }

    #[test]
    fn representable_values_round_to_themselves_whatever_the_draw() {
        for f in [Fp8::E4M3, Fp8::E5M2] {
            for code in 0u8..=0xff {
                let v = f.decode(code);
                if v.is_nan() {
                    assert!(f.decode(f.round(v, 0)).is_nan());
                    continue;
                }
                for r in [0, u64::MAX, 0x8000_0000_0000_0000, 12345] {
                    assert_eq!(f.round(v, r), code, "{f:?} {code:#x} r={r}");
                }
            }
        }
    }

    #[test]
    fn rounding_picks_a_neighbour_with_the_right_probability() {
        for f in [Fp8::E4M3, Fp8::E5M2] {
            // 1.0 and the next value up; x a quarter of the way from 1.0.
            let one = f.round(1.0, 0);
            let (lo, hi) = (f.decode(one), f.decode(one + 1));
            let x = lo + 0.25 * (hi - lo);
            let n = 100_000u64;
            let seed = seed("w");
            let ups = (0..n).filter(|&i| f.round(x, draw(seed, i)) == one + 1).count() as f64;
            // Binomial(n, 0.25): sd ≈ 137; 6 sd either way.
            assert!((ups - 25_000.0).abs() < 6.0 * 137.0, "{f:?}: {ups} of {n} up");
            // Negative values mirror positive ones.
            let neg = (0..n).filter(|&i| f.round(-x, draw(seed, i)) == 0x80 | (one + 1)).count();
            assert_eq!(neg as f64, ups, "{f:?}: sign-symmetric");
            // Extremes: just above lo almost never rounds up, u = 0 always does.
            assert_eq!(f.round(x, 0), one + 1);
            assert_eq!(f.round(x, u64::MAX), one);
        }
    }

    #[test]
    fn specials_saturate_or_stay() {
        let e4 = Fp8::E4M3;
        assert_eq!(e4.round(1e6, 0), 0x7e);
        assert_eq!(e4.round(-1e6, 0), 0xfe);
        assert_eq!(e4.round(f32::INFINITY, 0), 0x7e);
        assert_eq!(e4.round(448.5, 0), 0x7e);
        assert!(e4.decode(e4.round(f32::NAN, 0)).is_nan());
        assert_eq!(e4.round(-0.0, 0), 0x80);
        let e5 = Fp8::E5M2;
        assert_eq!(e5.round(1e6, 0), 0x7b);
        assert_eq!(e5.round(f32::NEG_INFINITY, 0), 0xfc);
        assert!(e5.decode(e5.round(f32::NAN, 0)).is_nan());
        // Below the smallest subnormal: 0 or the smallest subnormal.
        let tiny = e5.decode(1) * 0.5;
        assert!(matches!(e5.round(tiny, draw(1, 2)), 0 | 1));
    }

    #[test]
    fn seed_and_draw_are_the_documented_functions() {
        // FNV-1a 64 test vectors.
        assert_eq!(seed(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(seed("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(seed("foobar"), 0x8594_4171_f739_67e8);
        // splitmix64 seeded with 0: its first outputs.
        assert_eq!(draw(0, 0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(draw(0, 1), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(draw(0, 2), 0x06c4_5d18_8009_454f);
    }
}
