//! The LoRA merge on the host: `W' = W + Σᵢ scaleᵢ · (upᵢ @ downᵢ)`, reshaped to `W`'s shape.
//!
//! # Precision
//!
//! `W` and every factor are widened to f32, every delta is accumulated into that one f32 buffer
//! (a GEMM with `beta = 1` per delta), and the sum is rounded **once** to the weight's dtype,
//! round-to-nearest-even ([`half::f16::from_f32`], [`half::bf16::from_f32`]). F32 weights are
//! written as accumulated. F64 weights are accumulated in f64 (dgemm) and written as such.
//! Factors may be F16, BF16, F32 or F64 whatever the weight's dtype; F64 factors are rounded to
//! f32 when the weight is not F64.
//!
//! **fp8 weights** (`F8_E4M3`, `F8_E5M2`) are decoded exactly and accumulated in f32 like the
//! others, then written back with deterministic stochastic rounding seeded by the tensor's name
//! ([`super::fp8`]): each element becomes one of the two fp8 values around the f32 result, with
//! probabilities that make the rounding unbiased, so the same merge gives the same bytes in
//! every run. Round-to-nearest would erase most LoRA deltas on fp8 weights (their steps are
//! 2⁻³ relative for E4M3). fp8 factors are decoded the same way. Integer and packed weights
//! (I8, U8, F4, F6) and the other fp8 variants are refused by name
//! ([`LoraError::UnsupportedDtype`]).
//!
//! Error bound: for one output element with `k` accumulated products in all (rank, summed over
//! the deltas; for a LoCon mid also the mid rank), the f32 result is within about
//! `(k + 4) · 2⁻²⁴ · m` of the exact value, where `m = |W| + Σ |scale|·Σ|up|·|down|` (with `|mid|`
//! in the product for a mid). Rounded once to f16 / bf16, that is the correctly rounded value
//! except where the exact value lies within that bound of a rounding midpoint, and then it is at
//! most one ulp away. The unit tests check exactly this against an f64 reference.
//!
//! A delta whose scale is 0 (or whose rank is 0) is skipped after validation, so a stack of
//! such deltas returns `W` bit for bit (NaN payloads included).
//!
//! # Shapes
//!
//! A [`Patch`] adds its delta to a block of rows of `W` only (the q, k, v thirds of a fused
//! OpenCLIP `in_proj_weight`): the shapes below then apply to that block.
//!
//! - Linear: `W [out, in]`, `up [out, r]`, `down [r, in]`.
//! - Conv: `W [out, in, kh, kw]`, `up [out, r, 1, 1]`, `down [r, in, kh, kw]` (flattened to
//!   `[r, in·kh·kw]`).
//! - The delta `[out, ...down[1..]]` must equal `W`'s shape once trailing 1s are dropped from
//!   both, so a 2-D LoRA applies to a 1×1 conv `[out, in, 1, 1]` and a 1×1 conv LoRA to a linear
//!   weight (row-major layouts identical). Any trailing dims of `up` must be 1.
//! - LoCon mid (CP / Tucker): `up [out, ra(, 1, 1)]`, `mid [ra, rb, kh, kw]`,
//!   `down [rb, in(, 1, 1)]`, and
//!   `delta[o, i, h, w] = Σ_{a,b} up[o, a] · mid[a, b, h, w] · down[b, i]`.
//!   This is the convention of ComfyUI's `LoRAAdapter.calculate_weight`
//!   (`comfy/weight_adapter/lora.py`: `mat2 = mm(down.transpose(0,1).flatten(1),
//!   mid.transpose(0,1).flatten(1)).reshape(in, r, kh, kw).transpose(0,1)`, then
//!   `mm(up.flatten(1), mat2.flatten(1))`), of AUTOMATIC1111's `rebuild_cp_decomposition`
//!   (`extensions-builtin/Lora/lyco_helpers.py`:
//!   `einsum('n m k l, i n, m j -> i j k l', mid, up, down)`), and of LyCORIS'
//!   `rebuild_tucker(t, wa, wb) = einsum("i j ..., i p, j r -> p r ...", t, wa, wb)`
//!   (`lycoris/functional/general.py`, where `wa` is `up` transposed to `[r, out]`).
//!
//! Wrong shapes give [`LoraError::ShapeMismatch`] (or [`LoraError::RankMismatch`] when up and
//! down of a plain LoRA disagree on the rank); byte lengths are checked against dtype × shape
//! ([`LoraError::ByteLength`]); element counts use checked arithmetic. Nothing here panics on
//! any input.
//!
//! # Performance
//!
//! GEMM is `matrixmultiply` (single-threaded, runtime-selected AVX/FMA/AVX-512 kernels): merges
//! of different layers can run on different threads. Merging a 4096×4096 F16 weight with one
//! rank-64 F16 LoRA took about 93 ms in release on one core of a 2-vCPU AMD EPYC (AVX2, FMA,
//! F16C) development machine, of which the GEMM was about 34 ms and the rest the f16 → f32 →
//! f16 passes and the first touch of the 64 MiB accumulator (the `perf_4096_rank_64` test,
//! ignored by default, prints it).
//!
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::fp8::{self, Fp8};
use super::{LoraError, Rows};
use crate::store::Dtype;

/// One tensor, borrowed: a weight or a LoRA factor, with its bytes as stored (little-endian).
#[derive(Clone, Copy, Debug)]
pub struct Factor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [u64],
    pub bytes: &'a [u8],
}

/// A weight to merge into in place.
#[derive(Debug)]
pub struct FactorMut<'a> {
    pub dtype: Dtype,
    pub shape: &'a [u64],
    pub bytes: &'a mut [u8],
}

/// One adapter's contribution to a weight: `scale · (up @ [mid ×] down)`.
#[derive(Clone, Copy, Debug)]
pub struct Delta<'a> {
    /// `up` / `lora_B`: `[out, r]` or `[out, r, 1, 1]`.
    pub up: Factor<'a>,
    /// `down` / `lora_A`: `[r, in]` or `[r, in, kh, kw]` (`[r, in, 1, 1]` with a mid).
    pub down: Factor<'a>,
    /// LoCon's mid factor `[r, r, kh, kw]`.
    pub mid: Option<Factor<'a>>,
    /// `strength · alpha / rank`: see [`scale`].
    pub scale: f32,
}

/// A delta added to some rows of the weight only (`rows`), or to all of it (`None`): a slice
/// of a fused weight, such as the q, k and v thirds of an OpenCLIP `in_proj_weight`. The delta
/// must have the shape of the slice, `[rows.len, W.shape[1..]…]` (trailing 1s aside).
#[derive(Clone, Copy, Debug)]
pub struct Patch<'a> {
    pub delta: Delta<'a>,
    pub rows: Option<Rows>,
}

/// The factor a delta is multiplied by: `strength · alpha / rank`, or `strength` when the file
/// has no alpha (alpha = rank). A rank-0 adapter has an empty delta and gets 0.
///
/// Computed in f64 and rounded once, as ComfyUI does (a Python float times the f32 tensor).
pub fn scale(strength: f32, alpha: Option<f32>, rank: u64) -> f32 {
    match alpha {
        _ if rank == 0 => 0.0,
        None => strength,
        Some(alpha) => (f64::from(strength) * (f64::from(alpha) / rank as f64)) as f32,
    }
}

/// Returns `W + Σ scaleᵢ · (upᵢ @ downᵢ)` in `weight`'s dtype and shape.
///
/// `name` is the weight's tensor name, used in errors. See the module docs for shapes and
/// precision.
pub fn merge(name: &str, weight: Factor<'_>, deltas: &[Delta<'_>]) -> Result<Vec<u8>, LoraError> {
    let plan = Plan::new(name, weight, whole(deltas))?;
    let mut out = vec![0; weight.bytes.len()];
    plan.run(weight.bytes, &mut out);
    Ok(out)
}

/// [`merge`] with deltas that may each cover only some rows of the weight ([`Patch`]).
pub fn merge_patches(
    name: &str,
    weight: Factor<'_>,
    patches: &[Patch<'_>],
) -> Result<Vec<u8>, LoraError> {
    let plan = Plan::new(name, weight, patches.iter().copied())?;
    let mut out = vec![0; weight.bytes.len()];
    plan.run(weight.bytes, &mut out);
    Ok(out)
}

/// [`merge`], writing into `out` (which must be exactly as long as `weight.bytes`), e.g. a
/// pinned staging buffer, so a mapped weight merges without an intermediate copy.
pub fn merge_into(
    name: &str,
    weight: Factor<'_>,
    deltas: &[Delta<'_>],
    out: &mut [u8],
) -> Result<(), LoraError> {
    let plan = Plan::new(name, weight, whole(deltas))?;
    if out.len() != weight.bytes.len() {
        return Err(byte_length(name.to_owned(), weight.dtype, weight.shape, out.len()));
    }
    plan.run(weight.bytes, out);
    Ok(())
}

/// [`merge`] in place: `weight.bytes` is replaced by the merged weight. On error it is untouched.
pub fn merge_in_place(
    name: &str,
    weight: FactorMut<'_>,
    deltas: &[Delta<'_>],
) -> Result<(), LoraError> {
    let view = Factor { dtype: weight.dtype, shape: weight.shape, bytes: weight.bytes };
    let plan = Plan::new(name, view, whole(deltas))?;
    plan.run_in_place(weight.bytes);
    Ok(())
}

/// Deltas that cover the whole weight.
fn whole<'a, 'b>(deltas: &'b [Delta<'a>]) -> impl Iterator<Item = Patch<'a>> + 'b {
    deltas.iter().map(|&delta| Patch { delta, rows: None })
}

/// The float types a merge reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Float {
    F16,
    BF16,
    F32,
    F64,
    /// Decoded exactly; written with deterministic stochastic rounding ([`super::fp8`]).
    F8(Fp8),
}

impl Float {
    fn of(dtype: Dtype) -> Option<Float> {
        match dtype {
            Dtype::F16 => Some(Float::F16),
            Dtype::BF16 => Some(Float::BF16),
            Dtype::F32 => Some(Float::F32),
            Dtype::F64 => Some(Float::F64),
            _ => Fp8::of(dtype).map(Float::F8),
        }
    }
}

/// A checked tensor: its float type, its bytes and its element count.
#[derive(Clone, Copy, Debug)]
struct Operand<'a> {
    float: Float,
    bytes: &'a [u8],
    len: usize,
}

/// The element count of `shape`; `None` on overflow. Any 0 dim makes it 0, whatever the others.
fn numel(shape: &[u64]) -> Option<u64> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

fn byte_length(tensor: String, dtype: Dtype, shape: &[u64], len: usize) -> LoraError {
    LoraError::ByteLength {
        tensor,
        dtype: dtype.to_string(),
        shape: shape.to_vec(),
        len: len as u64,
    }
}

/// Checks a tensor's dtype and that its bytes hold exactly dtype × shape.
fn check<'a>(label: impl Fn() -> String, t: Factor<'a>) -> Result<Operand<'a>, LoraError> {
    let Some(float) = Float::of(t.dtype) else {
        return Err(LoraError::UnsupportedDtype { tensor: label(), dtype: t.dtype.to_string() });
    };
    let expected = numel(t.shape).and_then(|n| Some((n, t.dtype.byte_len(n)?)));
    match expected {
        Some((n, bytes)) if bytes == t.bytes.len() as u64 => {
            // n ≤ bytes.len(), so it fits a usize.
            Ok(Operand { float, bytes: t.bytes, len: n as usize })
        }
        _ => Err(byte_length(label(), t.dtype, t.shape, t.bytes.len())),
    }
}

/// `shape` without its trailing 1s.
fn squeeze(shape: &[u64]) -> &[u64] {
    let keep = shape.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    &shape[..keep]
}

/// `[rows, cols]` of a factor that must be a matrix possibly padded with trailing 1s.
fn matrix(shape: &[u64]) -> Option<(u64, u64)> {
    match shape {
        [rows, cols, rest @ ..] if rest.iter().all(|&d| d == 1) => Some((*rows, *cols)),
        _ => None,
    }
}

/// One validated delta, with its GEMM dimensions.
#[derive(Debug)]
struct Term<'a> {
    scale: f32,
    up: Operand<'a>,
    down: Operand<'a>,
    kind: TermKind<'a>,
    /// The elements of the weight it adds to: `offset..offset + span` (all of it, or whole rows).
    offset: usize,
    span: usize,
}

#[derive(Debug)]
enum TermKind<'a> {
    /// `acc[out, n] += scale · up[out, r] @ down[r, n]`.
    Plain { out: usize, rank: usize, n: usize },
    /// `t[a, i, s] = Σ_b mid[a, b, s] · down[b, i]`, then `acc[out, i·s] += scale · up @ t`.
    Mid { mid: Operand<'a>, out: usize, ra: usize, rb: usize, inner: usize, spatial: usize },
}

/// A validated merge: everything is checked before anything is computed or written.
#[derive(Debug)]
struct Plan<'a> {
    weight: Float,
    len: usize,
    /// Deltas that contribute (scale ≠ 0 and a non-empty product).
    terms: Vec<Term<'a>>,
    /// fp8 stochastic rounding seed: the FNV-1a hash of the weight's name.
    seed: u64,
}

impl<'a> Plan<'a> {
    fn new(
        name: &str,
        weight: Factor<'_>,
        patches: impl Iterator<Item = Patch<'a>>,
    ) -> Result<Self, LoraError> {
        let w = check(|| name.to_owned(), weight)?;
        let mut terms = Vec::new();
        for patch in patches {
            if let Some(term) = Term::new(name, weight.shape, w.len, &patch)? {
                terms.push(term);
            }
        }
        Ok(Plan { weight: w.float, len: w.len, terms, seed: fp8::seed(name) })
    }

    fn run(&self, src: &[u8], out: &mut [u8]) {
        if self.terms.is_empty() {
            out.copy_from_slice(src);
        } else if self.weight == Float::F64 {
            let acc = self.accumulate::<f64>(src);
            encode(&acc, self.weight, out, self.seed);
        } else {
            let acc = self.accumulate::<f32>(src);
            encode(&acc, self.weight, out, self.seed);
        }
    }

    fn run_in_place(&self, buf: &mut [u8]) {
        if self.terms.is_empty() {
            return;
        }
        if self.weight == Float::F64 {
            let acc = self.accumulate::<f64>(buf);
            encode(&acc, self.weight, buf, self.seed);
        } else {
            let acc = self.accumulate::<f32>(buf);
            encode(&acc, self.weight, buf, self.seed);
        }
    }

    fn accumulate<T: Acc>(&self, src: &[u8]) -> Vec<T> {
        let mut acc = decode::<T>(Operand { float: self.weight, bytes: src, len: self.len });
        for term in &self.terms {
            term.add_to(&mut acc[term.offset..term.offset + term.span]);
        }
        acc
    }
}

impl<'a> Term<'a> {
    /// Validates one delta against the weight (`len` elements of shape `weight`), or against
    /// its rows `patch.rows`; `None` when it contributes nothing.
    fn new(
        name: &str,
        weight: &[u64],
        len: usize,
        patch: &Patch<'a>,
    ) -> Result<Option<Self>, LoraError> {
        let d = &patch.delta;
        // The shape the delta must have, and where it sits in the weight (in elements).
        let (target, offset) = match patch.rows {
            None => (weight.to_vec(), 0u64),
            Some(rows) => {
                let out_of_range = || LoraError::ShapeMismatch {
                    adapter: name.to_owned(),
                    target: format!("{name} rows {}..{}", rows.start, rows.end()),
                    delta: vec![rows.end()],
                    weight: weight.to_vec(),
                };
                let [n_rows, rest @ ..] = weight else { return Err(out_of_range()) };
                if rows.start.checked_add(rows.len).is_none_or(|end| end > *n_rows) {
                    return Err(out_of_range());
                }
                let row = numel(rest).ok_or_else(out_of_range)?;
                let offset = rows.start.checked_mul(row).ok_or_else(out_of_range)?;
                let mut target = vec![rows.len];
                target.extend_from_slice(rest);
                (target, offset)
            }
        };
        let weight = target.as_slice();
        let up = check(|| format!("{name} (LoRA up)"), d.up)?;
        let down = check(|| format!("{name} (LoRA down)"), d.down)?;
        let mid = match d.mid {
            Some(m) => Some((check(|| format!("{name} (LoRA mid)"), m)?, m.shape)),
            None => None,
        };
        let mismatch = |delta: Vec<u64>| LoraError::ShapeMismatch {
            adapter: name.to_owned(),
            target: name.to_owned(),
            delta,
            weight: weight.to_vec(),
        };
        // The shape to report when the factors do not even form a delta.
        let factor_shapes = || {
            let mut s = d.up.shape.to_vec();
            s.extend_from_slice(d.down.shape);
            s
        };
        let (out, ra) = matrix(d.up.shape).ok_or_else(|| mismatch(factor_shapes()))?;

        let (delta_shape, kind) = match mid {
            None => {
                let [rank, rest @ ..] = d.down.shape else {
                    return Err(mismatch(factor_shapes()));
                };
                if rest.is_empty() {
                    return Err(mismatch(factor_shapes()));
                }
                if *rank != ra {
                    return Err(LoraError::RankMismatch {
                        adapter: name.to_owned(),
                        up: d.up.shape.to_vec(),
                        down: d.down.shape.to_vec(),
                    });
                }
                let mut shape = vec![out];
                shape.extend_from_slice(rest);
                let n = numel(rest).ok_or_else(|| mismatch(shape.clone()))?;
                (shape, (ra, n, None))
            }
            Some((mid, mid_shape)) => {
                let (rb, inner) = matrix(d.down.shape).ok_or_else(|| mismatch(factor_shapes()))?;
                let [ma, mb, spatial @ ..] = mid_shape else {
                    return Err(mismatch(mid_shape.to_vec()));
                };
                let mut shape = vec![out, inner];
                shape.extend_from_slice(spatial);
                if (*ma, *mb) != (ra, rb) {
                    return Err(mismatch(shape));
                }
                let s = numel(spatial).ok_or_else(|| mismatch(shape.clone()))?;
                (shape, (ra, inner, Some((mid, rb, s))))
            }
        };
        if squeeze(&delta_shape) != squeeze(weight) {
            return Err(mismatch(delta_shape));
        }
        // Inside the weight's `len` elements: the rows were checked against its shape, whose
        // element count is `len`.
        let span = numel(weight).and_then(|n| usize::try_from(n).ok());
        let offset = usize::try_from(offset).ok();
        let (Some(span), Some(offset)) = (span, offset) else {
            return Err(mismatch(delta_shape));
        };
        if offset.checked_add(span).is_none_or(|end| end > len) {
            return Err(mismatch(delta_shape));
        }
        // The delta has the weight's element count, so every count below fits a usize: check
        // anyway, and treat an overflow as a shape the merge cannot hold.
        let fit = |x: u64| usize::try_from(x).ok();
        let too_big = || mismatch(delta_shape.clone());
        let (rank, n, mid) = kind;
        let (out, rank) = (fit(out).ok_or_else(too_big)?, fit(rank).ok_or_else(too_big)?);
        let kind = match mid {
            None => {
                let n = fit(n).ok_or_else(too_big)?;
                if out == 0 || rank == 0 || n == 0 {
                    return Ok(None);
                }
                TermKind::Plain { out, rank, n }
            }
            Some((mid, rb, s)) => {
                let (rb, inner, spatial) = (
                    fit(rb).ok_or_else(too_big)?,
                    fit(n).ok_or_else(too_big)?,
                    fit(s).ok_or_else(too_big)?,
                );
                if [out, rank, rb, inner, spatial].contains(&0) {
                    return Ok(None);
                }
                // The intermediate `t[ra, inner, spatial]` must be addressable.
                rank.checked_mul(inner)
                    .and_then(|x| x.checked_mul(spatial))
                    .and_then(|x| x.checked_mul(size_of::<f64>()))
                    .filter(|&b| isize::try_from(b).is_ok())
                    .ok_or_else(too_big)?;
                TermKind::Mid { mid, out, ra: rank, rb, inner, spatial }
            }
        };
        if d.scale == 0.0 {
            return Ok(None);
        }
        Ok(Some(Term { scale: d.scale, up, down, kind, offset, span }))
    }

    fn add_to<T: Acc>(&self, acc: &mut [T]) {
        let up = decode::<T>(self.up);
        let down = decode::<T>(self.down);
        let scale = T::from_f32(self.scale);
        match self.kind {
            TermKind::Plain { out, rank, n } => {
                gemm(out, rank, n, scale, (&up, rank, 1), (&down, n, 1), T::ONE, (acc, n, 1));
            }
            TermKind::Mid { mid, out, ra, rb, inner, spatial } => {
                let mid = decode::<T>(mid);
                let cols = inner * spatial;
                let mut t = vec![T::ZERO; ra * cols];
                // t[a] (inner × spatial) = downᵀ (inner × rb) @ mid[a] (rb × spatial).
                for (a, (t_a, mid_a)) in
                    t.chunks_exact_mut(cols).zip(mid.chunks_exact(rb * spatial)).enumerate()
                {
                    debug_assert!(a < ra);
                    gemm(
                        inner,
                        rb,
                        spatial,
                        T::ONE,
                        (&down, 1, inner),
                        (mid_a, spatial, 1),
                        T::ZERO,
                        (t_a, spatial, 1),
                    );
                }
                // acc[out, inner·spatial] += scale · up (out × ra) @ t (ra × inner·spatial).
                gemm(out, ra, cols, scale, (&up, ra, 1), (&t, cols, 1), T::ONE, (acc, cols, 1));
            }
        }
    }
}

/// The accumulator element: f32, or f64 for F64 weights.
trait Acc: Copy + std::fmt::Debug {
    const ZERO: Self;
    const ONE: Self;
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    /// `matrixmultiply`'s `sgemm` / `dgemm`: `C ← α A B + β C`.
    ///
    /// # Safety
    ///
    /// As `matrixmultiply::sgemm`: every element addressed through the pointers, dimensions and
    /// strides is in bounds, and the strides of `c` make no two elements alias.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract, which is sgemm's.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f32(x: f32) -> Self {
        f64::from(x)
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_f64(self) -> f64 {
        self
    }
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract, which is dgemm's.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// Whether a `rows × cols` matrix with strides `rs`, `cs` fits in `len` elements, with strides
/// that fit an `isize`.
fn fits(rows: usize, cols: usize, rs: usize, cs: usize, len: usize) -> bool {
    let (Some(r), Some(c)) = (rows.checked_sub(1), cols.checked_sub(1)) else {
        return true; // empty: addresses nothing
    };
    let last = r.checked_mul(rs).zip(c.checked_mul(cs));
    let last = last.and_then(|(r, c)| r.checked_add(c));
    matches!(last, Some(l) if l < len) && isize::try_from(rs.max(cs)).is_ok()
}

/// Safe `C ← α A B + β C` over slices; each matrix is `(slice, row stride, col stride)`.
/// An empty product leaves `C` as it is.
///
/// Panics if a matrix does not fit its slice: a bug in the caller, which validates every shape
/// against the byte lengths first.
#[allow(clippy::too_many_arguments)]
fn gemm<T: Acc>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    (a, rsa, csa): (&[T], usize, usize),
    (b, rsb, csb): (&[T], usize, usize),
    beta: T,
    (c, rsc, csc): (&mut [T], usize, usize),
) {
    if m == 0 || k == 0 || n == 0 {
        return;
    }
    assert!(
        fits(m, k, rsa, csa, a.len())
            && fits(k, n, rsb, csb, b.len())
            && fits(m, n, rsc, csc, c.len())
            && (m == 1 || rsc >= n * csc)
            && csc >= 1,
        "lora merge: GEMM operands out of bounds ({m}×{k}×{n})"
    );
    // The asserts above make every stride fit an isize.
    let s = |x: usize| x as isize;
    // SAFETY: the assert checks that the last element each matrix addresses (and so every
    // element, as strides are non-negative) lies inside its slice, and that C's rows and columns
    // do not overlap (csc ≥ 1, rsc ≥ n·csc); `c` is a unique borrow, so A and B do not alias it.
    unsafe {
        T::raw_gemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            s(rsa),
            s(csa),
            b.as_ptr(),
            s(rsb),
            s(csb),
            beta,
            c.as_mut_ptr(),
            s(rsc),
            s(csc),
        );
    }
}

/// Elements converted at a time between f16 and f32.
const BLOCK: usize = 256;

/// Widens a checked tensor to the accumulator type.
fn decode<T: Acc>(t: Operand<'_>) -> Vec<T> {
    let b = t.bytes;
    let v: Vec<T> = match t.float {
        Float::F16 => {
            // In blocks, through half's slice conversion: F16C / NEON eight at a time, where
            // the per-element call costs a function call each.
            let mut v = Vec::with_capacity(t.len);
            let (mut halves, mut floats) = ([f16::ZERO; BLOCK], [0f32; BLOCK]);
            for block in b.chunks(2 * BLOCK) {
                let n = block.len() / 2;
                for (h, c) in halves.iter_mut().zip(block.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                }
                halves[..n].convert_to_f32_slice(&mut floats[..n]);
                v.extend(floats[..n].iter().map(|&x| T::from_f32(x)));
            }
            v
        }
        Float::BF16 => b
            .chunks_exact(2)
            .map(|c| T::from_f32(bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
        Float::F32 => b
            .chunks_exact(4)
            .map(|c| T::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Float::F64 => b
            .chunks_exact(8)
            .map(|c| {
                T::from_f64(f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            })
            .collect(),
        Float::F8(f) => fp8::decode_all(f, b).map(T::from_f32).collect(),
    };
    debug_assert_eq!(v.len(), t.len);
    v
}

/// Rounds the accumulator once into `out` (round-to-nearest-even; fp8: stochastic rounding
/// seeded by `seed`, see [`super::fp8`]).
///
/// From an f64 accumulator, f16 and bf16 go through f32: f64 → f32 → f16 / bf16 is still a
/// single correct rounding, since f32 has at least 2p + 2 bits for p = 11 (f16) and 8 (bf16).
fn encode<T: Acc>(acc: &[T], float: Float, out: &mut [u8], seed: u64) {
    match float {
        Float::F8(f) => fp8::encode_all(f, acc.iter().map(|x| x.to_f32()), out, seed),
        Float::F16 => {
            // Blocks, as in `decode`; half's slice conversion rounds to nearest even as
            // `f16::from_f32` does.
            let (mut floats, mut halves) = ([0f32; BLOCK], [f16::ZERO; BLOCK]);
            for (block, acc) in out.chunks_mut(2 * BLOCK).zip(acc.chunks(BLOCK)) {
                let n = acc.len();
                for (f, &x) in floats.iter_mut().zip(acc) {
                    *f = x.to_f32();
                }
                halves[..n].convert_from_f32_slice(&floats[..n]);
                for (o, h) in block.chunks_exact_mut(2).zip(&halves[..n]) {
                    o.copy_from_slice(&h.to_bits().to_le_bytes());
                }
            }
        }
        Float::BF16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(acc) {
                o.copy_from_slice(&bf16::from_f32(x.to_f32()).to_bits().to_le_bytes());
            }
        }
        Float::F32 => {
            for (o, &x) in out.chunks_exact_mut(4).zip(acc) {
                o.copy_from_slice(&x.to_f32().to_le_bytes());
            }
        }
        Float::F64 => {
            for (o, &x) in out.chunks_exact_mut(8).zip(acc) {
                o.copy_from_slice(&x.to_f64().to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// splitmix64: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    /// `x` rounded once (round-to-nearest-even) to `dtype`, as an f64.
    ///
    /// f64 → f32 → f16 / bf16 is a single correct rounding (f32 has ≥ 2p + 2 bits).
    fn round_to(dtype: Dtype, x: f64) -> f64 {
        match dtype {
            Dtype::F16 => f64::from(f16::from_f32(x as f32).to_f32()),
            Dtype::BF16 => f64::from(bf16::from_f32(x as f32).to_f32()),
            Dtype::F32 => f64::from(x as f32),
            Dtype::F64 => x,
            _ => unreachable!(),
        }
    }

    fn to_bytes(dtype: Dtype, vals: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &x in vals {
            match dtype {
                Dtype::F16 => out.extend(f16::from_f32(x as f32).to_bits().to_le_bytes()),
                Dtype::BF16 => out.extend(bf16::from_f32(x as f32).to_bits().to_le_bytes()),
                Dtype::F32 => out.extend((x as f32).to_le_bytes()),
                Dtype::F64 => out.extend(x.to_le_bytes()),
                _ => unreachable!(),
            }
        }
        out
    }

    fn from_bytes(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
        let float = Float::of(dtype).expect("float");
        let len = bytes.len() / (dtype.bits() as usize / 8);
        decode::<f64>(Operand { float, bytes, len })
    }

    /// Bits of `x` (exactly representable in `dtype`) mapped to a monotone integer, so adjacent
    /// values differ by 1.
    fn ordinal(dtype: Dtype, x: f64) -> i64 {
        let (bits, sign) = match dtype {
            Dtype::F16 => (i64::from(f16::from_f64(x).to_bits()), 1 << 15),
            Dtype::BF16 => (i64::from(bf16::from_f64(x).to_bits()), 1 << 15),
            Dtype::F32 => (i64::from((x as f32).to_bits()), 1 << 31),
            Dtype::F64 => (x.to_bits() as i64, 0),
            _ => unreachable!(),
        };
        if dtype == Dtype::F64 {
            return if bits < 0 { i64::MIN - bits } else { bits };
        }
        if bits & sign != 0 { -(bits & (sign - 1)) } else { bits }
    }

    /// A random tensor, rounded to `dtype`: (exact values, bytes).
    struct T {
        dtype: Dtype,
        shape: Vec<u64>,
        vals: Vec<f64>,
        bytes: Vec<u8>,
    }

    impl T {
        fn random(rng: &mut Rng, dtype: Dtype, shape: &[u64], magnitude: f64) -> T {
            let n = shape.iter().product::<u64>() as usize;
            let vals: Vec<f64> = (0..n).map(|_| round_to(dtype, rng.unit() * magnitude)).collect();
            T { dtype, shape: shape.to_vec(), bytes: to_bytes(dtype, &vals), vals }
        }

        fn factor(&self) -> Factor<'_> {
            Factor { dtype: self.dtype, shape: &self.shape, bytes: &self.bytes }
        }
    }

    struct D {
        up: T,
        down: T,
        mid: Option<T>,
        scale: f32,
    }

    impl D {
        fn delta(&self) -> Delta<'_> {
            Delta {
                up: self.up.factor(),
                down: self.down.factor(),
                mid: self.mid.as_ref().map(T::factor),
                scale: self.scale,
            }
        }
    }

    const FLOATS: [Dtype; 4] = [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64];

    /// A delta with random factors: `mid` = `Some(spatial)` for a LoCon mid.
    fn random_delta(
        rng: &mut Rng,
        dtypes: [Dtype; 3],
        up: &[u64],
        down: &[u64],
        mid: Option<&[u64]>,
        scale: f32,
    ) -> D {
        D {
            up: T::random(rng, dtypes[0], up, 0.5),
            down: T::random(rng, dtypes[1], down, 0.5),
            mid: mid.map(|m| T::random(rng, dtypes[2], m, 0.5)),
            scale,
        }
    }

    /// The f64 reference `W + Σ scale · delta` and, per element, `m = |W| + Σ|scale|·Σ|terms|`
    /// and the number of products summed, computed naively from the definitions.
    fn reference(w: &T, deltas: &[D]) -> (Vec<f64>, Vec<f64>, usize) {
        let mut exact: Vec<f64> = w.vals.clone();
        let mut mag: Vec<f64> = w.vals.iter().map(|x| x.abs()).collect();
        let mut k_total = 0;
        let out = w.shape[0] as usize;
        let cols = exact.len() / out;
        for d in deltas {
            let s = f64::from(d.scale);
            let r = d.up.shape[1] as usize;
            match &d.mid {
                None => {
                    k_total += r;
                    for o in 0..out {
                        for j in 0..cols {
                            let (mut sum, mut abs) = (0.0, 0.0);
                            for a in 0..r {
                                let p = d.up.vals[o * r + a] * d.down.vals[a * cols + j];
                                sum += p;
                                abs += p.abs();
                            }
                            exact[o * cols + j] += s * sum;
                            mag[o * cols + j] += s.abs() * abs;
                        }
                    }
                }
                Some(mid) => {
                    let (ra, rb) = (mid.shape[0] as usize, mid.shape[1] as usize);
                    let inner = d.down.shape[1] as usize;
                    let sp = cols / inner;
                    k_total += ra + rb;
                    for o in 0..out {
                        for i in 0..inner {
                            for h in 0..sp {
                                let (mut sum, mut abs) = (0.0, 0.0);
                                for a in 0..ra {
                                    for b in 0..rb {
                                        let p = d.up.vals[o * ra + a]
                                            * mid.vals[(a * rb + b) * sp + h]
                                            * d.down.vals[b * inner + i];
                                        sum += p;
                                        abs += p.abs();
                                    }
                                }
                                let at = o * cols + i * sp + h;
                                exact[at] += s * sum;
                                mag[at] += s.abs() * abs;
                            }
                        }
                    }
                }
            }
        }
        (exact, mag, k_total)
    }

    /// Checks `got` against the f64 reference: each element is the reference rounded once to
    /// the weight's dtype, except where the reference lies within the accumulation error bound
    /// of a rounding midpoint, where it may be one ulp off. Returns how many were off by one.
    fn check_against_reference(w: &T, deltas: &[D], got: &[u8]) -> usize {
        let (exact, mag, k) = reference(w, deltas);
        let got = from_bytes(w.dtype, got);
        assert_eq!(got.len(), exact.len());
        // f32 accumulation (f64 for F64 weights): (2k + 8)·u·m covers the GEMM's k products,
        // the widening of F64 factors, the scale and the add into the accumulator.
        let u =
            if w.dtype == Dtype::F64 { f64::EPSILON / 2.0 } else { f64::from(f32::EPSILON) / 2.0 };
        let mut off_by_one = 0;
        for (idx, ((&g, &x), &m)) in got.iter().zip(&exact).zip(&mag).enumerate() {
            let bound = (2 * k + 8) as f64 * u * m;
            let want = round_to(w.dtype, x);
            if matches!(w.dtype, Dtype::F32 | Dtype::F64) {
                // No final rounding beyond the accumulator's own.
                assert!((g - x).abs() <= bound, "[{idx}] got {g}, exact {x}, bound {bound}");
                continue;
            }
            if g.to_bits() == want.to_bits() {
                continue;
            }
            let ulps = (ordinal(w.dtype, g) - ordinal(w.dtype, want)).abs();
            let midpoint = (g + want) / 2.0;
            assert!(
                ulps == 1 && (x - midpoint).abs() <= bound,
                "[{idx}] {}: got {g}, correctly rounded {want}, exact {x}, bound {bound}",
                w.dtype
            );
            off_by_one += 1;
        }
        off_by_one
    }

    fn run_case(seed: u64, w_shape: &[u64], build: impl Fn(&mut Rng, [Dtype; 3]) -> Vec<D>) {
        for (i, &wd) in FLOATS.iter().enumerate() {
            let mut rng = Rng(seed ^ (i as u64) << 32);
            let w = T::random(&mut rng, wd, w_shape, 1.0);
            // Cycle factor dtypes so every weight dtype meets every factor dtype.
            for j in 0..FLOATS.len() {
                let fd = [FLOATS[j], FLOATS[(j + 1) % 4], FLOATS[(j + 2) % 4]];
                let deltas = build(&mut rng, fd);
                let ds: Vec<Delta<'_>> = deltas.iter().map(D::delta).collect();
                let got = merge("w", w.factor(), &ds).expect("merge");
                assert_eq!(got.len(), w.bytes.len());
                let off = check_against_reference(&w, &deltas, &got);
                // Off-by-one results need the exact value next to a midpoint: rare.
                assert!(off * 100 <= got.len() / 2, "{wd}: {off} of {} off by one ulp", got.len());
                // The other entry points agree bit for bit.
                let mut into = vec![0xA5; w.bytes.len()];
                merge_into("w", w.factor(), &ds, &mut into).expect("merge_into");
                assert_eq!(into, got);
                let mut buf = w.bytes.clone();
                let place = FactorMut { dtype: wd, shape: &w.shape, bytes: &mut buf };
                merge_in_place("w", place, &ds).expect("merge_in_place");
                assert_eq!(buf, got);
            }
        }
    }

    #[test]
    fn scale_is_strength_times_alpha_over_rank() {
        assert_eq!(scale(1.0, None, 16), 1.0);
        assert_eq!(scale(0.8, None, 16), 0.8);
        assert_eq!(scale(1.0, Some(8.0), 16), 0.5);
        assert_eq!(scale(0.5, Some(1.0), 4), 0.125);
        assert_eq!(scale(1.0, Some(8.0), 0), 0.0);
        assert_eq!(scale(1.0, None, 0), 0.0);
        assert_eq!(scale(0.3, Some(3.0), 7), (0.3f32 as f64 * (3.0 / 7.0)) as f32);
    }

    #[test]
    fn hand_computed_linear() {
        // W = 0, up = [1; 2], down = [3 4], scale 0.5: 0.5 · [[3, 4], [6, 8]].
        let f = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let (w, up, down) = (f(&[0.0; 4]), f(&[1.0, 2.0]), f(&[3.0, 4.0]));
        let delta = Delta {
            up: Factor { dtype: Dtype::F32, shape: &[2, 1], bytes: &up },
            down: Factor { dtype: Dtype::F32, shape: &[1, 2], bytes: &down },
            mid: None,
            scale: 0.5,
        };
        let got = merge("w", Factor { dtype: Dtype::F32, shape: &[2, 2], bytes: &w }, &[delta]);
        assert_eq!(got.expect("merge"), f(&[1.5, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn linear_matches_the_f64_reference() {
        run_case(1, &[13, 17], |rng, fd| {
            vec![random_delta(rng, fd, &[13, 4], &[4, 17], None, 0.75)]
        });
        // Big enough for the GEMM's blocked and edge paths.
        run_case(2, &[67, 130], |rng, fd| {
            vec![random_delta(rng, fd, &[67, 16], &[16, 130], None, 1.0)]
        });
    }

    #[test]
    fn conv_3x3_matches_the_f64_reference() {
        run_case(3, &[8, 5, 3, 3], |rng, fd| {
            vec![random_delta(rng, fd, &[8, 3, 1, 1], &[3, 5, 3, 3], None, 1.25)]
        });
    }

    #[test]
    fn conv_1x1_with_2d_or_4d_factors_matches_the_f64_reference() {
        run_case(4, &[6, 7, 1, 1], |rng, fd| {
            vec![random_delta(rng, fd, &[6, 2], &[2, 7], None, 1.0)]
        });
        run_case(5, &[6, 7, 1, 1], |rng, fd| {
            vec![random_delta(rng, fd, &[6, 2, 1, 1], &[2, 7, 1, 1], None, 1.0)]
        });
        // A 1×1 conv LoRA on a linear weight.
        run_case(6, &[6, 7], |rng, fd| {
            vec![random_delta(rng, fd, &[6, 2, 1, 1], &[2, 7, 1, 1], None, -0.5)]
        });
    }

    #[test]
    fn locon_mid_matches_the_f64_reference() {
        run_case(7, &[8, 5, 3, 3], |rng, fd| {
            vec![random_delta(rng, fd, &[8, 4, 1, 1], &[4, 5, 1, 1], Some(&[4, 4, 3, 3]), 1.0)]
        });
        // Different ranks on both sides of mid, 2-D up and down.
        run_case(8, &[9, 11, 3, 3], |rng, fd| {
            vec![random_delta(rng, fd, &[9, 3], &[5, 11], Some(&[3, 5, 3, 3]), 0.5)]
        });
    }

    #[test]
    fn locon_mid_of_identity_is_the_plain_lora() {
        // mid[a, b] = δ_ab with a 1×1 kernel reduces the CP form to up @ down.
        let mut rng = Rng(9);
        let w = T::random(&mut rng, Dtype::F32, &[6, 5, 1, 1], 1.0);
        let up = T::random(&mut rng, Dtype::F32, &[6, 3, 1, 1], 1.0);
        let down = T::random(&mut rng, Dtype::F32, &[3, 5, 1, 1], 1.0);
        let eye: Vec<f64> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
        let mid = T {
            dtype: Dtype::F32,
            shape: vec![3, 3, 1, 1],
            bytes: to_bytes(Dtype::F32, &eye),
            vals: eye,
        };
        let plain = Delta { up: up.factor(), down: down.factor(), mid: None, scale: 0.7 };
        let cp = Delta { mid: Some(mid.factor()), ..plain };
        let a = merge("w", w.factor(), &[plain]).expect("plain");
        let b = merge("w", w.factor(), &[cp]).expect("cp");
        assert_eq!(a, b);
    }

    #[test]
    fn stacked_deltas_match_the_f64_reference() {
        run_case(10, &[24, 40], |rng, fd| {
            vec![
                random_delta(rng, fd, &[24, 4], &[4, 40], None, 1.0),
                random_delta(rng, fd, &[24, 8], &[8, 40], None, -0.6),
                random_delta(rng, fd, &[24, 1], &[1, 40], None, 0.125),
            ]
        });
        run_case(11, &[8, 6, 3, 3], |rng, fd| {
            vec![
                random_delta(rng, fd, &[8, 4, 1, 1], &[4, 6, 1, 1], Some(&[4, 4, 3, 3]), 0.9),
                random_delta(rng, fd, &[8, 2, 1, 1], &[2, 6, 3, 3], None, -1.5),
                random_delta(rng, fd, &[8, 3, 1, 1], &[3, 6, 3, 3], None, 0.0),
            ]
        });
    }

    #[test]
    fn scale_zero_returns_the_weight_bit_for_bit() {
        let mut rng = Rng(12);
        for wd in FLOATS {
            let mut w = T::random(&mut rng, wd, &[4, 6], 1.0);
            // NaN payloads and infinities survive: nothing is converted.
            if matches!(wd, Dtype::F16 | Dtype::BF16) {
                w.bytes[0..2].copy_from_slice(&0x7c01u16.to_le_bytes()); // signalling NaN in f16
                w.bytes[2..4].copy_from_slice(&0xff81u16.to_le_bytes());
            }
            let mut d = random_delta(&mut rng, [Dtype::F32; 3], &[4, 2], &[2, 6], None, 0.0);
            d.up.bytes[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
            let d2 = random_delta(&mut rng, [Dtype::F16; 3], &[4, 3], &[3, 6], None, 0.0);
            let got = merge("w", w.factor(), &[d.delta(), d2.delta()]).expect("merge");
            assert_eq!(got, w.bytes, "{wd}");
            assert_eq!(merge("w", w.factor(), &[]).expect("merge"), w.bytes);
        }
    }

    #[test]
    fn deterministic_across_runs() {
        let mut rng = Rng(13);
        let w = T::random(&mut rng, Dtype::BF16, &[96, 200], 1.0);
        let a = random_delta(&mut rng, [Dtype::F16; 3], &[96, 32], &[32, 200], None, 0.8);
        let b = random_delta(&mut rng, [Dtype::BF16; 3], &[96, 8], &[8, 200], None, -0.3);
        let ds = [a.delta(), b.delta()];
        let first = merge("w", w.factor(), &ds).expect("merge");
        for _ in 0..3 {
            assert_eq!(merge("w", w.factor(), &ds).expect("merge"), first);
        }
    }

    fn f32_tensor(shape: &[u64]) -> T {
        T::random(&mut Rng(14), Dtype::F32, shape, 1.0)
    }

    #[test]
    fn unsupported_dtypes_are_refused() {
        let up = f32_tensor(&[4, 2]);
        let down = f32_tensor(&[2, 4]);
        let delta = Delta { up: up.factor(), down: down.factor(), mid: None, scale: 1.0 };
        for dtype in Dtype::ALL {
            if Float::of(dtype).is_some() {
                continue;
            }
            let bytes = vec![0; dtype.byte_len(16).expect("16 elements") as usize];
            let w = Factor { dtype, shape: &[4, 4], bytes: &bytes };
            match merge("blk.w", w, &[delta]) {
                Err(LoraError::UnsupportedDtype { tensor, dtype: d }) => {
                    assert_eq!(tensor, "blk.w");
                    assert_eq!(d, dtype.as_str());
                }
                other => panic!("{dtype}: {other:?}"),
            }
            // The same dtype as a factor.
            let bad = Factor {
                dtype,
                shape: &[4, 2],
                bytes: &bytes[..dtype.byte_len(8).expect("8") as usize],
            };
            let w = f32_tensor(&[4, 4]);
            for (which, d) in [
                ("up", Delta { up: bad, ..delta }),
                ("down", Delta { down: Factor { shape: &[2, 4], ..bad }, ..delta }),
            ] {
                match merge("blk.w", w.factor(), &[d]) {
                    Err(LoraError::UnsupportedDtype { tensor, .. }) => {
                        assert_eq!(tensor, format!("blk.w (LoRA {which})"));
                    }
                    other => panic!("{dtype} {which}: {other:?}"),
                }
            }
        }
        // Named in the brief: int8 and U8-packed weights (and fp8 variants no merge writes).
        for dtype in [Dtype::I8, Dtype::U8, Dtype::F8_E4M3FNUZ, Dtype::F8_E8M0] {
            let w = Factor { dtype, shape: &[4, 4], bytes: &[0; 16] };
            match merge("blocks.0.w", w, &[delta]) {
                Err(e @ LoraError::UnsupportedDtype { .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("\"blocks.0.w\"") && msg.contains(dtype.as_str()),
                        "{msg}"
                    );
                    if matches!(dtype, Dtype::I8 | Dtype::U8) {
                        assert!(msg.contains("quantized"), "{msg}");
                    }
                }
                other => panic!("{dtype}: {other:?}"),
            }
        }
    }

    /// A weight of fp8 codes drawn at random among finite values of magnitude ≤ `max`.
    fn fp8_weight(rng: &mut Rng, f: Fp8, dtype: Dtype, shape: &[u64], max: f32) -> T {
        let n = shape.iter().product::<u64>() as usize;
        let mut bytes = Vec::with_capacity(n);
        while bytes.len() < n {
            let code = rng.next() as u8;
            let v = f.decode(code);
            if v.is_finite() && v.abs() <= max {
                bytes.push(code);
            }
        }
        let vals = bytes.iter().map(|&b| f64::from(f.decode(b))).collect();
        T { dtype, shape: shape.to_vec(), vals, bytes }
    }

    /// The fp8 values either side of `x` (equal when `x` is one).
    fn fp8_neighbours(f: Fp8, x: f64) -> (f64, f64) {
        let mags: Vec<f64> = (0..=f.max_code()).map(|c| f64::from(f.decode(c))).collect();
        let a = x.abs();
        let i = mags.partition_point(|&v| v <= a).saturating_sub(1);
        let (lo, hi) =
            if mags[i] == a { (a, a) } else { (mags[i], mags[(i + 1).min(mags.len() - 1)]) };
        if x < 0.0 { (-hi, -lo) } else { (lo, hi) }
    }

    #[test]
    fn fp8_merges_round_stochastically_within_one_step_and_unbiased() {
        for (f, dtype) in [(Fp8::E4M3, Dtype::F8_E4M3), (Fp8::E5M2, Dtype::F8_E5M2)] {
            let mut rng = Rng(81);
            let w = fp8_weight(&mut rng, f, dtype, &[64, 96], 4.0);
            let deltas = vec![random_delta(
                &mut rng,
                [Dtype::F16, Dtype::F32, Dtype::F32],
                &[64, 4],
                &[4, 96],
                None,
                0.7,
            )];
            let ds: Vec<Delta<'_>> = deltas.iter().map(D::delta).collect();
            let got = merge("blocks.3.attn.qkv.weight", w.factor(), &ds).expect("fp8 merge");
            // Deterministic: the same bytes again, from every entry point.
            assert_eq!(merge("blocks.3.attn.qkv.weight", w.factor(), &ds).expect("again"), got);
            let mut buf = w.bytes.clone();
            let place = FactorMut { dtype, shape: &w.shape, bytes: &mut buf };
            merge_in_place("blocks.3.attn.qkv.weight", place, &ds).expect("in place");
            assert_eq!(buf, got);
            // Another name is another seed.
            assert_ne!(merge("other", w.factor(), &ds).expect("other"), got);

            let (exact, mag, k) = reference(&w, &deltas);
            let u = f64::from(f32::EPSILON) / 2.0;
            let (mut sum, mut n) = (0.0, 0usize);
            for (i, ((&g, &x), &m)) in got.iter().zip(&exact).zip(&mag).enumerate() {
                let g = f64::from(f.decode(g));
                let bound = (2 * k + 8) as f64 * u * m;
                let (lo, hi) = fp8_neighbours(f, x);
                // One of the two fp8 values around the exact value (the f32 accumulation may
                // land on the other side of a value the exact one sits on).
                let ok = g == lo || g == hi || (g - x).abs() <= bound;
                let (lo2, hi2) = fp8_neighbours(f, x - bound);
                let (lo3, hi3) = fp8_neighbours(f, x + bound);
                assert!(
                    ok || [lo2, hi2, lo3, hi3].contains(&g),
                    "{dtype}[{i}]: {g} is not next to {x} ({lo}, {hi})"
                );
                if hi > lo {
                    sum += (g - x) / (hi - lo);
                    n += 1;
                }
            }
            // Each normalised error has mean 0 and |e| < 1 (sd ≤ 1/2): 5 sd of the mean.
            let mean = sum / n as f64;
            assert!(mean.abs() < 5.0 * 0.5 / (n as f64).sqrt(), "{dtype}: mean error {mean} steps");
        }
    }

    #[test]
    fn fp8_keeps_small_deltas_on_average_where_nearest_rounding_drops_them() {
        for (f, dtype) in [(Fp8::E4M3, Dtype::F8_E4M3), (Fp8::E5M2, Dtype::F8_E5M2)] {
            // W = 1.0 everywhere; the delta adds 0.3 of a step (nearest rounding: always 1.0).
            let one = f.round(1.0, 0);
            let step = f64::from(f.decode(one + 1) - 1.0);
            let (rows, cols) = (128u64, 128u64);
            let n = (rows * cols) as usize;
            let w = T { dtype, shape: vec![rows, cols], vals: vec![1.0; n], bytes: vec![one; n] };
            let ones = |shape: &[u64], v: f64| T {
                dtype: Dtype::F64,
                shape: shape.to_vec(),
                vals: vec![v; shape.iter().product::<u64>() as usize],
                bytes: to_bytes(Dtype::F64, &vec![v; shape.iter().product::<u64>() as usize]),
            };
            let d = D {
                up: ones(&[rows, 1], 1.0),
                down: ones(&[1, cols], 0.3 * step),
                mid: None,
                scale: 1.0,
            };
            let got = merge("w", w.factor(), &[d.delta()]).expect("merge");
            let ups = got.iter().filter(|&&c| c == one + 1).count();
            assert_eq!(ups + got.iter().filter(|&&c| c == one).count(), n, "{dtype}: 1.0 or next");
            // Binomial(n, 0.3): sd = sqrt(n·0.21) ≈ 58.7; 6 sd.
            let want = 0.3 * n as f64;
            assert!(
                (ups as f64 - want).abs() < 6.0 * (n as f64 * 0.21).sqrt(),
                "{dtype}: {ups} up of {n}"
            );
        }
    }

    #[test]
    fn row_patches_add_to_their_rows_only() {
        for &wd in &FLOATS {
            let mut rng = Rng(31);
            let w = T::random(&mut rng, wd, &[12, 5], 1.0);
            let d: Vec<D> = (0..2)
                .map(|_| random_delta(&mut rng, [Dtype::F32; 3], &[4, 2], &[2, 5], None, 0.9))
                .collect();
            let rows = [Rows { start: 0, len: 4 }, Rows { start: 8, len: 4 }];
            let patches: Vec<Patch<'_>> = d
                .iter()
                .zip(rows)
                .map(|(d, r)| Patch { delta: d.delta(), rows: Some(r) })
                .collect();
            let got = merge_patches("w", w.factor(), &patches).expect("patches");
            let size = (wd.bits() / 8) as usize;
            let row = 5 * size;
            // Each patched block is what merging that block alone gives; rows 4..8 are untouched.
            for (d, r) in d.iter().zip(rows) {
                let (a, b) = (r.start as usize * row, r.end() as usize * row);
                let block = Factor { dtype: wd, shape: &[4, 5], bytes: &w.bytes[a..b] };
                let alone = merge("w", block, &[d.delta()]).expect("block");
                assert_eq!(&got[a..b], alone.as_slice(), "{wd} rows {r:?}");
            }
            assert_eq!(&got[4 * row..8 * row], &w.bytes[4 * row..8 * row], "{wd}: untouched rows");
        }
        // Rows outside the weight, and a delta that does not fit its rows, are refused.
        let mut rng = Rng(32);
        let w = T::random(&mut rng, Dtype::F32, &[12, 5], 1.0);
        let d = random_delta(&mut rng, [Dtype::F32; 3], &[4, 2], &[2, 5], None, 1.0);
        for rows in [Rows { start: 10, len: 4 }, Rows { start: u64::MAX, len: 4 }] {
            let p = Patch { delta: d.delta(), rows: Some(rows) };
            let err = merge_patches("w", w.factor(), &[p]).expect_err("out of range");
            assert!(matches!(err, LoraError::ShapeMismatch { .. }), "{err}");
        }
        let p = Patch { delta: d.delta(), rows: Some(Rows { start: 0, len: 6 }) };
        match merge_patches("w", w.factor(), &[p]).expect_err("wrong slice shape") {
            LoraError::ShapeMismatch { delta, weight, .. } => {
                assert_eq!((delta, weight), (vec![4, 5], vec![6, 5]));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn byte_lengths_are_checked() {
        let w = f32_tensor(&[4, 4]);
        let up = f32_tensor(&[4, 2]);
        let down = f32_tensor(&[2, 4]);
        let mid = f32_tensor(&[2, 2, 1, 1]);
        let delta = Delta { up: up.factor(), down: down.factor(), mid: None, scale: 1.0 };
        let is_len = |r: Result<Vec<u8>, LoraError>, name: &str| match r {
            Err(LoraError::ByteLength { tensor, .. }) => assert_eq!(tensor, name),
            other => panic!("{name}: {other:?}"),
        };
        let cut = |f: Factor<'_>| -> Vec<u8> { f.bytes[..f.bytes.len() - 1].to_vec() };
        let w_cut = cut(w.factor());
        is_len(merge("w", Factor { bytes: &w_cut, ..w.factor() }, &[delta]), "w");
        let up_cut = cut(up.factor());
        let d = Delta { up: Factor { bytes: &up_cut, ..delta.up }, ..delta };
        is_len(merge("w", w.factor(), &[d]), "w (LoRA up)");
        let mut long = down.bytes.clone();
        long.extend([0; 4]);
        let d = Delta { down: Factor { bytes: &long, ..delta.down }, ..delta };
        is_len(merge("w", w.factor(), &[d]), "w (LoRA down)");
        let d = Delta { mid: Some(Factor { bytes: &mid.bytes[4..], ..mid.factor() }), ..delta };
        is_len(merge("w", w.factor(), &[d]), "w (LoRA mid)");
        // Element counts that overflow u64 are a length error, not a panic.
        let huge = Factor { dtype: Dtype::F16, shape: &[u64::MAX, 3], bytes: &[0; 6] };
        is_len(merge("w", huge, &[]), "w");
        let huge = Factor { dtype: Dtype::F64, shape: &[u64::MAX / 4], bytes: &[] };
        is_len(merge("w", huge, &[]), "w");
        // The output buffer of merge_into.
        let mut out = vec![0; w.bytes.len() + 2];
        match merge_into("w", w.factor(), &[delta], &mut out) {
            Err(LoraError::ByteLength { len, .. }) => assert_eq!(len, 66),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let w = f32_tensor(&[4, 6]);
        let conv = f32_tensor(&[4, 6, 3, 3]);
        let f = f32_tensor;
        let shape_err = |w: &T, up: &T, down: &T, mid: Option<&T>| {
            let d =
                Delta { up: up.factor(), down: down.factor(), mid: mid.map(T::factor), scale: 1.0 };
            merge("blk", w.factor(), &[d])
        };
        let expect_shape = |r: Result<Vec<u8>, LoraError>, delta: &[u64], weight: &[u64]| match r {
            Err(LoraError::ShapeMismatch { adapter, target, delta: d, weight: wt }) => {
                assert_eq!((adapter.as_str(), target.as_str()), ("blk", "blk"));
                assert_eq!((d.as_slice(), wt.as_slice()), (delta, weight));
            }
            other => panic!("{other:?}"),
        };
        // The delta is the wrong size for the weight.
        expect_shape(shape_err(&w, &f(&[5, 2]), &f(&[2, 6]), None), &[5, 6], &[4, 6]);
        expect_shape(shape_err(&w, &f(&[4, 2]), &f(&[2, 7]), None), &[4, 7], &[4, 6]);
        // Transposed weight.
        expect_shape(shape_err(&f(&[6, 4]), &f(&[4, 2]), &f(&[2, 6]), None), &[4, 6], &[6, 4]);
        // A 3×3 conv delta on a linear weight, and a linear one on a 3×3 conv.
        expect_shape(
            shape_err(&w, &f(&[4, 2, 1, 1]), &f(&[2, 6, 3, 3]), None),
            &[4, 6, 3, 3],
            &[4, 6],
        );
        expect_shape(shape_err(&conv, &f(&[4, 2]), &f(&[2, 6]), None), &[4, 6], &[4, 6, 3, 3]);
        // up with a kernel, up or down 1-D.
        expect_shape(
            shape_err(&conv, &f(&[4, 2, 3, 3]), &f(&[2, 6, 3, 3]), None),
            &[4, 2, 3, 3, 2, 6, 3, 3],
            &[4, 6, 3, 3],
        );
        expect_shape(shape_err(&w, &f(&[4]), &f(&[1, 6]), None), &[4, 1, 6], &[4, 6]);
        expect_shape(shape_err(&w, &f(&[4, 1]), &f(&[6]), None), &[4, 1, 6], &[4, 6]);
        // Ranks disagree.
        match shape_err(&w, &f(&[4, 2]), &f(&[3, 6]), None) {
            Err(LoraError::RankMismatch { adapter, up, down }) => {
                assert_eq!((adapter.as_str(), up, down), ("blk", vec![4, 2], vec![3, 6]));
            }
            other => panic!("{other:?}"),
        }
        // Mid: down with a kernel, mid ranks that do not meet up/down, mid 1-D, wrong kernel.
        let (up, down) = (f(&[4, 2, 1, 1]), f(&[2, 6, 1, 1]));
        expect_shape(
            shape_err(&conv, &up, &f(&[2, 6, 3, 3]), Some(&f(&[2, 2, 3, 3]))),
            &[4, 2, 1, 1, 2, 6, 3, 3],
            &[4, 6, 3, 3],
        );
        expect_shape(
            shape_err(&conv, &up, &down, Some(&f(&[3, 2, 3, 3]))),
            &[4, 6, 3, 3],
            &[4, 6, 3, 3],
        );
        expect_shape(
            shape_err(&conv, &up, &down, Some(&f(&[2, 3, 3, 3]))),
            &[4, 6, 3, 3],
            &[4, 6, 3, 3],
        );
        expect_shape(shape_err(&conv, &up, &down, Some(&f(&[4]))), &[4], &[4, 6, 3, 3]);
        expect_shape(
            shape_err(&conv, &up, &down, Some(&f(&[2, 2, 5, 5]))),
            &[4, 6, 5, 5],
            &[4, 6, 3, 3],
        );
        // Nothing is written on error.
        let mut buf = conv.bytes.clone();
        let bad_down = f(&[2, 7, 1, 1]);
        let d = Delta { up: up.factor(), down: bad_down.factor(), mid: None, scale: 1.0 };
        let place = FactorMut { dtype: Dtype::F32, shape: &conv.shape, bytes: &mut buf };
        assert!(merge_in_place("blk", place, &[d]).is_err());
        assert_eq!(buf, conv.bytes);
    }

    #[test]
    fn empty_tensors_merge() {
        // Rank 0 and zero-sized weights are valid and change nothing.
        let w = f32_tensor(&[4, 6]);
        let d = Delta {
            up: Factor { dtype: Dtype::F16, shape: &[4, 0], bytes: &[] },
            down: Factor { dtype: Dtype::F16, shape: &[0, 6], bytes: &[] },
            mid: None,
            scale: 1.0,
        };
        assert_eq!(merge("w", w.factor(), &[d]).expect("rank 0"), w.bytes);
        let empty = Factor { dtype: Dtype::BF16, shape: &[0, 6], bytes: &[] };
        let d = Delta {
            up: Factor { dtype: Dtype::F16, shape: &[0, 2], bytes: &[] },
            down: Factor { dtype: Dtype::F16, shape: &[2, 6], bytes: &[0; 24] },
            mid: None,
            scale: 1.0,
        };
        assert_eq!(merge("w", empty, &[d]).expect("empty weight"), Vec::<u8>::new());
    }

    fn any_dtype() -> impl Strategy<Value = Dtype> {
        prop_oneof![
            4 => prop::sample::select(FLOATS.to_vec()),
            1 => prop::sample::select(Dtype::ALL.to_vec()),
        ]
    }

    fn any_shape() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(
            prop_oneof![8 => 0u64..5, 1 => Just(u64::MAX), 1 => any::<u64>()],
            0..5,
        )
    }

    /// A tensor whose byte length is usually right for its shape.
    fn any_tensor() -> impl Strategy<Value = (Dtype, Vec<u64>, Vec<u8>)> {
        (any_dtype(), any_shape(), 0usize..3, any::<u64>()).prop_map(|(dtype, shape, off, seed)| {
            let len = numel(&shape)
                .and_then(|n| dtype.byte_len(n))
                .filter(|&b| b <= 4096)
                .map_or(seed as usize % 64, |b| b as usize);
            let len = if off == 2 { len + 1 } else { len };
            let mut rng = Rng(seed);
            let bytes = (0..len).map(|_| rng.next() as u8).collect();
            (dtype, shape, bytes)
        })
    }

    fn factor(t: &(Dtype, Vec<u64>, Vec<u8>)) -> Factor<'_> {
        Factor { dtype: t.0, shape: &t.1, bytes: &t.2 }
    }

    proptest! {
        #[test]
        fn merge_never_panics(
            weight in any_tensor(),
            deltas in prop::collection::vec(
                (any_tensor(), any_tensor(), prop::option::of(any_tensor()), -2.0f32..2.0),
                0..3,
            ),
        ) {
            let ds: Vec<Delta<'_>> = deltas
                .iter()
                .map(|(u, d, m, s)| Delta { up: factor(u), down: factor(d), mid: m.as_ref().map(factor), scale: *s })
                .collect();
            if let Ok(out) = merge("w", factor(&weight), &ds) {
                prop_assert_eq!(out.len(), weight.2.len());
            }
        }

        #[test]
        fn consistent_shapes_always_merge(
            (out, inn, r, k) in (0u64..9, 0u64..9, 0u64..5, 1u64..4),
            dtypes in prop::collection::vec(prop::sample::select(FLOATS.to_vec()), 4),
            conv in any::<bool>(),
            use_mid in any::<bool>(),
            seed in any::<u64>(),
            scale in -4.0f32..4.0,
        ) {
            let mut rng = Rng(seed);
            // Random bytes: NaN, infinities and subnormals included.
            let mut tensor = |dtype: Dtype, shape: Vec<u64>| {
                let n = shape.iter().product::<u64>();
                let len = dtype.byte_len(n).expect("small") as usize;
                (dtype, shape, (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>())
            };
            let kk = if conv { k } else { 1 };
            let w = tensor(dtypes[0], vec![out, inn, kk, kk]);
            let (up, down, mid) = if use_mid {
                (
                    tensor(dtypes[1], vec![out, r, 1, 1]),
                    tensor(dtypes[2], vec![r, inn, 1, 1]),
                    Some(tensor(dtypes[3], vec![r, r, kk, kk])),
                )
            } else {
                (tensor(dtypes[1], vec![out, r]), tensor(dtypes[2], vec![r, inn, kk, kk]), None)
            };
            let d = Delta { up: factor(&up), down: factor(&down), mid: mid.as_ref().map(factor), scale };
            let got = merge("w", factor(&w), &[d]);
            prop_assert!(got.is_ok(), "{:?}", got.err());
        }
    }

    /// Prints the time to merge a 4096×4096 F16 weight with one rank-64 F16 LoRA.
    /// `cargo test --release -p ferry --lib lora::math::tests::perf -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, run in release"]
    fn perf_4096_rank_64() {
        let mut rng = Rng(15);
        let w = T::random(&mut rng, Dtype::F16, &[4096, 4096], 1.0);
        let d = random_delta(&mut rng, [Dtype::F16; 3], &[4096, 64], &[64, 4096], None, 0.5);
        let mut out = vec![0; w.bytes.len()];
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            merge_into("w", w.factor(), &[d.delta()], &mut out).expect("merge");
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!("merge 4096x4096 f16 + rank-64 LoRA: best of 5 {:.1} ms", best * 1e3);
    }
}
