//! A model seen through a LoRA stack: which tensors change, and how their bytes are made.
//!
//! - **backup**: a layer's original bytes are copied as usual; once they have landed, the
//!   adapted tensors are changed on the device. The source (the file mapping) never changes,
//!   so removing the stack and loading the layer again restores the original bytes exactly,
//!   with no copy of the weights kept anywhere.
//!   - On a device with GEMMs (CUDA with cuBLAS), each adapter's delta is accumulated into the
//!     landed weight by one GEMM on the copy stream (`W += scale · up @ down`, beta = 1, f32
//!     compute for f16 / bf16 / f32 weights, f64 for f64), queued right after the layer's
//!     copies and before its ready event: no host synchronisation, no CPU merge. The factors
//!     are uploaded once per stack ([`DeviceFactors`]).
//!   - Otherwise (host backend; fp8 weights; LoCon mid factors; factors whose dtype cannot be
//!     widened exactly to the weight's: see [`plan_tensor`]) the tensor is merged on the CPU
//!     ([`crate::lora::math`]) and written over the landed bytes with a synchronous copy.
//! - **fuse**: each adapted tensor is merged once on the CPU into a host buffer from the
//!   device's staging allocator (pinned memory on CUDA, so later loads are plain DMA copies
//!   straight from it; ordinary memory on the host backend), cached while the engine's fuse
//!   budget has room. The budget (`EngineConfig::fuse_cache_bytes`, default a quarter of the
//!   RAM limit) is one counter for every stack and view of the engine, and counts each buffer's
//!   real footprint (whole pages when pinned). A tensor that does not fit is merged afresh on
//!   each load and staged like file data. Removing the stack drops the cache; the original
//!   comes from the mapping again.
//!
//! # What the modes produce
//!
//! The CPU merge is deterministic, so fuse mode, backup mode on the host backend and
//! `ferryctl export` give the same bytes. Backup mode through cuBLAS rounds a 16-bit weight
//! once per adapter (each GEMM writes `C` in the weight's dtype) instead of once for the whole
//! stack, and sums in cuBLAS' order: for one adapter the result is within one ulp of the CPU
//! merge (both are the f32 value rounded once; the f32 sums differ in order only), for `k`
//! adapters within about `k` half-ulps. f32 and f64 weights differ only by summation order.
//!
//! # Device memory for factors
//!
//! The factors a stack merges on the device are uploaded once, on the first backup load that
//! needs them, into one device buffer sized exactly for them (each factor converted to the
//! GEMM type, 256-byte aligned). It is allocated **outside the arena**: the arena is the
//! engine's budget and is handed out whole to the scopes' quotas, so taking factors from it
//! would break the quota accounting the policies rely on. It comes from the device memory the
//! budget leaves free (by default a quarter of the device), is logged with its size, and is
//! freed with the stack. If it cannot be allocated the stack falls back to CPU merges.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde::{Deserialize, Serialize};

use super::error::EngineError;
use crate::device::{Device, DeviceBuffer, GemmAccumulate, GemmType, HostBuffer};
use crate::lora::export::{self, ExportReport, StackDelta};
use crate::lora::{LoraFile, math};
use crate::store::{Dtype, Model, TensorId};

/// How a LoRA stack is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraMode {
    Backup,
    Fuse,
}

/// The engine's fuse-cache budget: one counter of host bytes for every stack and view (owned
/// by the copy pipeline, which fills the caches); the limit is the engine's configuration,
/// which every stack carries.
#[derive(Debug, Default)]
pub(crate) struct FuseBudget {
    used: AtomicU64,
}

impl FuseBudget {
    pub fn new() -> Arc<FuseBudget> {
        Arc::new(FuseBudget::default())
    }

    /// Takes `n` bytes if they fit under `limit` (the engine's configured limit, which every
    /// stack carries).
    fn take(&self, n: u64, limit: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(n)));
    }
}

/// The fuse-mode cache of one stack.
#[derive(Debug, Default)]
struct FuseCache {
    bytes: HashMap<TensorId, Arc<HostBuffer>>,
    /// Bytes taken from the budget (buffer footprints).
    used: u64,
    /// Where the bytes were taken from, and the device whose copies may read the buffers: set
    /// by the first fill.
    owner: Option<(Arc<FuseBudget>, Arc<Device>)>,
}

/// Fused bytes of a tensor, ready to copy.
#[derive(Debug)]
pub(crate) enum Fused {
    /// In the cache: copy straight from the buffer (pinned on CUDA). It stays valid until the
    /// stack is dropped, which waits for the device's copies first.
    Cached(Arc<HostBuffer>),
    /// Did not fit the budget: plain memory, to go through the staging ring.
    Uncached(Vec<u8>),
}

/// One GEMM of a device merge (all addresses relative: factors to the buffer, the target to
/// the tensor's first byte).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PlannedGemm {
    /// Rows of the target (`up` rows), columns (`down` columns), rank.
    pub m: u64,
    pub n: u64,
    pub k: u64,
    /// `strength · alpha / rank`, exactly as the CPU merge uses it (an f32).
    pub alpha: f64,
    /// Byte offset of the target rows in the tensor.
    pub c_offset: u64,
    pub ab: GemmType,
    pub c_type: GemmType,
    /// Which adapter: index into the stack and into its file's adapters.
    pub lora: usize,
    pub adapter: usize,
}

/// Factors uploaded for device merges, and the GEMMs of every tensor that merges there.
#[derive(Debug)]
pub(crate) struct DeviceFactors {
    buffer: DeviceBuffer,
    /// Per tensor: (GEMM, byte offset of up, of down in `buffer`).
    gemms: HashMap<TensorId, Vec<(PlannedGemm, u64, u64)>>,
}

/// A LoRA stack applied to one model.
#[derive(Debug)]
pub(crate) struct LoraState {
    pub mode: LoraMode,
    model: Arc<Model>,
    loras: Vec<(LoraFile, f32)>,
    deltas: export::StackDeltas,
    cache: Mutex<FuseCache>,
    cache_limit: u64,
    /// Backup mode on a device with GEMMs: the uploaded factors (`None` inside when nothing
    /// merges on the device or the upload failed), made on first use.
    device: OnceLock<Option<DeviceFactors>>,
    /// What matching found (unmatched adapters, unrecognised tensors).
    pub report: ExportReport,
}

impl LoraState {
    pub fn new(
        model: Arc<Model>,
        loras: Vec<(LoraFile, f32)>,
        mode: LoraMode,
        cache_limit: u64,
    ) -> Result<LoraState, EngineError> {
        let mut report = ExportReport::default();
        let deltas = export::stack_deltas(&model, &loras, &mut report).map_err(lora_err)?;
        report.merged = deltas.len();
        Ok(LoraState {
            mode,
            model,
            loras,
            deltas,
            cache: Mutex::default(),
            cache_limit,
            device: OnceLock::new(),
            report,
        })
    }

    /// Whether the stack changes tensor `t`.
    pub fn touches(&self, t: TensorId) -> bool {
        self.deltas.contains_key(&t)
    }

    /// The adapted tensors, for invalidating the layers that hold them.
    pub fn tensors(&self) -> impl Iterator<Item = TensorId> + '_ {
        self.deltas.keys().copied()
    }

    /// The merged bytes of tensor `t`, computed on the CPU.
    pub fn merged(&self, t: TensorId) -> Result<Vec<u8>, EngineError> {
        let ds = self.deltas.get(&t).map(Vec::as_slice).unwrap_or_default();
        let original = self.model.tensor_bytes(t).ok_or(EngineError::ShuttingDown)?;
        export::merge_one(&self.model, t, original, &self.loras, ds).map_err(lora_err)
    }

    /// Fuse mode: the merged bytes of `t`, from the cache, or merged now and cached (in a
    /// staging buffer of `device`) when `budget` has room.
    pub fn fused(
        &self,
        t: TensorId,
        device: &Arc<Device>,
        budget: &Arc<FuseBudget>,
    ) -> Result<Fused, EngineError> {
        if let Some(b) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).bytes.get(&t) {
            return Ok(Fused::Cached(Arc::clone(b)));
        }
        let merged = self.merged(t)?;
        if merged.is_empty() {
            return Ok(Fused::Uncached(merged));
        }
        let mut buf = match device.alloc_staging(merged.len()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, bytes = merged.len(), "fuse cache: no host buffer; streaming uncached");
                return Ok(Fused::Uncached(merged));
            }
        };
        if !budget.take(buf.footprint(), self.cache_limit) {
            return Ok(Fused::Uncached(merged));
        }
        buf.write_at(0, &merged);
        let buf = Arc::new(buf);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = cache.bytes.get(&t) {
            // Another thread cached it meanwhile: keep theirs.
            budget.give_back(buf.footprint());
            return Ok(Fused::Cached(Arc::clone(b)));
        }
        cache.used += buf.footprint();
        cache.owner.get_or_insert_with(|| (Arc::clone(budget), Arc::clone(device)));
        cache.bytes.insert(t, Arc::clone(&buf));
        Ok(Fused::Cached(buf))
    }

    /// Backup mode: changes tensor `t`, whose original bytes were queued for copying to `dst`,
    /// into the merged tensor: GEMMs on the copy stream where the device can, else a CPU merge
    /// written synchronously after the copy.
    pub fn apply_backup(&self, t: TensorId, dst: u64, device: &Device) -> Result<(), EngineError> {
        if device.device_gemm()
            && let Some(factors) = self.device_factors(device)
            && let Some(gemms) = factors.gemms.get(&t)
        {
            for &(g, up, down) in gemms {
                let op = GemmAccumulate {
                    m: g.m,
                    n: g.n,
                    k: g.k,
                    alpha: g.alpha,
                    a: factors.buffer.addr + up,
                    b: factors.buffer.addr + down,
                    c: dst + g.c_offset,
                    ab: g.ab,
                    c_type: g.c_type,
                };
                // SAFETY: the factors live in `factors.buffer`, owned by this stack, whose drop
                // waits for the copy stream (so it outlives every GEMM queued here); `dst` is
                // this tensor's place in the arena, reserved for the layer until the job's
                // event (recorded after these GEMMs) completes, and nothing else writes it.
                unsafe { device.gemm_accumulate(&op)? };
            }
            return Ok(());
        }
        let merged = self.merged(t)?;
        device.write_sync(dst, &merged)?;
        Ok(())
    }

    /// The uploaded factors, uploading them on first use (once per stack).
    fn device_factors(&self, device: &Device) -> Option<&DeviceFactors> {
        self.device.get_or_init(|| match self.upload(device) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "LoRA factors could not be uploaded: merging on the CPU");
                None
            }
        })
        .as_ref()
    }

    fn upload(&self, device: &Device) -> Result<Option<DeviceFactors>, EngineError> {
        const ALIGN: u64 = 256;
        let mut layout: HashMap<TensorId, Vec<(PlannedGemm, u64, u64)>> = HashMap::new();
        let mut total = 0u64;
        let mut place = |bytes: u64| {
            let at = total.next_multiple_of(ALIGN);
            total = at + bytes;
            at
        };
        for (&t, ds) in &self.deltas {
            let Some(plan) = plan_tensor(&self.model, t, &self.loras, ds) else { continue };
            let mut gemms = Vec::with_capacity(plan.len());
            for g in plan {
                let up = place(g.m * g.k * g.ab.size());
                let down = place(g.k * g.n * g.ab.size());
                gemms.push((g, up, down));
            }
            layout.insert(t, gemms);
        }
        if layout.is_empty() {
            return Ok(None);
        }
        let mut buffer = device.alloc_device_buffer(total.max(1))?;
        for gemms in layout.values() {
            for (g, up, down) in gemms {
                let a = &self.loras[g.lora].0;
                let adapter = &a.adapters[g.adapter];
                for (id, at) in [(adapter.up, *up), (adapter.down, *down)] {
                    let (Some(info), Some(bytes)) = (a.model.tensor(id), a.model.tensor_bytes(id))
                    else {
                        return Err(EngineError::ShuttingDown);
                    };
                    let converted = convert(info.dtype, bytes, g.ab).ok_or_else(|| {
                        EngineError::Config(format!(
                            "LoRA factor {} cannot be converted",
                            info.name
                        ))
                    })?;
                    buffer.write(at, &converted)?;
                }
            }
        }
        tracing::info!(
            tensors = layout.len(),
            bytes = total,
            "LoRA factors uploaded for device merges (outside the arena)"
        );
        Ok(Some(DeviceFactors { buffer, gemms: layout }))
    }

    /// Host bytes held by the fuse cache (buffer footprints).
    pub fn cached_bytes(&self) -> u64 {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).used
    }
}

impl Drop for LoraState {
    fn drop(&mut self) {
        let cache = self.cache.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some((budget, device)) = cache.owner.take() {
            // Copies straight from cached buffers may still be running: the buffers are freed
            // only after them. (Pinned buffers also synchronise in their own drop; host
            // buffers do not.)
            if let Ok(e) = device.record() {
                let _ = e.wait();
            }
            cache.bytes.clear();
            budget.give_back(cache.used);
            cache.used = 0;
        }
    }
}

/// The GEMM type a weight of `dtype` merges in on the device.
fn gemm_type(dtype: Dtype) -> Option<GemmType> {
    match dtype {
        Dtype::F16 => Some(GemmType::F16),
        Dtype::BF16 => Some(GemmType::BF16),
        Dtype::F32 => Some(GemmType::F32),
        Dtype::F64 => Some(GemmType::F64),
        _ => None,
    }
}

/// Whether a factor of `dtype` widens exactly to `t` (so the device merge multiplies the same
/// values as the CPU merge).
fn widens_exactly(dtype: Dtype, t: GemmType) -> bool {
    match t {
        GemmType::F16 => dtype == Dtype::F16,
        GemmType::BF16 => dtype == Dtype::BF16,
        GemmType::F32 => matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32),
        GemmType::F64 => matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64),
    }
}

/// How tensor `t` merges on a device with GEMMs: one GEMM per contributing delta, or `None`
/// when it must merge on the CPU: a weight that is not f16 / bf16 / f32 / f64 (fp8 needs
/// stochastic rounding), a LoCon mid factor, a factor that does not widen exactly to the
/// weight's type (an f32 factor on an f16 weight would be rounded before the product), or
/// factors whose shapes do not make a plain `[m, k] @ [k, n]` over the target rows.
pub(crate) fn plan_tensor(
    model: &Model,
    t: TensorId,
    loras: &[(LoraFile, f32)],
    ds: &[StackDelta],
) -> Option<Vec<PlannedGemm>> {
    let info = model.tensor(t)?;
    let c_type = gemm_type(info.dtype)?;
    let row_bytes = info.shape.iter().skip(1).try_fold(c_type.size(), |a, &d| a.checked_mul(d))?;
    let mut out = Vec::with_capacity(ds.len());
    for d in ds {
        let file = &loras.get(d.lora)?.0;
        let a = file.adapters.get(d.adapter)?;
        if a.mid.is_some() {
            return None;
        }
        let (up, down) = (file.model.tensor(a.up)?, file.model.tensor(a.down)?);
        if !widens_exactly(up.dtype, c_type) || !widens_exactly(down.dtype, c_type) {
            return None;
        }
        let (m, k) = match up.shape.as_slice() {
            [m, k, rest @ ..] if rest.iter().all(|&x| x == 1) => (*m, *k),
            _ => return None,
        };
        let (k2, n) = match down.shape.as_slice() {
            [k2, rest @ ..] if !rest.is_empty() => {
                (*k2, rest.iter().try_fold(1u64, |a, &x| a.checked_mul(x))?)
            }
            _ => return None,
        };
        let rows = d.rows.map_or(info.shape.first().copied().unwrap_or(1), |r| r.len);
        // The delta covers the target rows exactly (matching checked the shapes).
        if k2 != k
            || m != rows
            || m.checked_mul(n)? != rows.checked_mul(row_bytes / c_type.size())?
        {
            return None;
        }
        let alpha = math::scale(d.strength, a.alpha, a.rank);
        if alpha == 0.0 || m == 0 || n == 0 || k == 0 {
            continue;
        }
        let c_offset = d.rows.map_or(Some(0), |r| r.start.checked_mul(row_bytes))?;
        out.push(PlannedGemm {
            m,
            n,
            k,
            alpha: f64::from(alpha),
            c_offset,
            ab: c_type,
            c_type,
            lora: d.lora,
            adapter: d.adapter,
        });
    }
    Some(out)
}

/// A factor's bytes converted to `t` (little-endian); `None` unless exact ([`widens_exactly`]).
fn convert(dtype: Dtype, bytes: &[u8], t: GemmType) -> Option<Vec<u8>> {
    if !widens_exactly(dtype, t) {
        return None;
    }
    let same = matches!(
        (dtype, t),
        (Dtype::F16, GemmType::F16)
            | (Dtype::BF16, GemmType::BF16)
            | (Dtype::F32, GemmType::F32)
            | (Dtype::F64, GemmType::F64)
    );
    if same {
        return Some(bytes.to_vec());
    }
    let values: Vec<f64> = match dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => return None,
    };
    Some(match t {
        // Exact: every f16 / bf16 value is an f32.
        GemmType::F32 => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
        GemmType::F64 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GemmType::F16 | GemmType::BF16 => return None,
    })
}

fn lora_err(e: crate::lora::LoraError) -> EngineError {
    EngineError::Lora(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_widen_only_where_exact() {
        let f16 = half::f16::from_f32(0.333).to_le_bytes().to_vec();
        let to32 = convert(Dtype::F16, &f16, GemmType::F32).expect("f16 -> f32");
        assert_eq!(
            f32::from_le_bytes(to32.try_into().expect("4")),
            half::f16::from_f32(0.333).to_f32()
        );
        let bf = half::bf16::from_f32(-1.5e-3).to_le_bytes().to_vec();
        let to64 = convert(Dtype::BF16, &bf, GemmType::F64).expect("bf16 -> f64");
        assert_eq!(
            f64::from_le_bytes(to64.try_into().expect("8")),
            half::bf16::from_f32(-1.5e-3).to_f64()
        );
        assert_eq!(convert(Dtype::F16, &f16, GemmType::F16).as_deref(), Some(f16.as_slice()));
        for (d, t) in [
            (Dtype::F32, GemmType::F16),
            (Dtype::BF16, GemmType::F16),
            (Dtype::F16, GemmType::BF16),
            (Dtype::F64, GemmType::F32),
            (Dtype::F8_E4M3, GemmType::F32),
        ] {
            assert!(!widens_exactly(d, t), "{d} -> {t:?}");
            assert_eq!(convert(d, &[0; 8], t), None, "{d} -> {t:?}");
        }
        assert_eq!(gemm_type(Dtype::F8_E4M3), None);
        assert_eq!(gemm_type(Dtype::I8), None);
    }

    #[test]
    fn the_fuse_budget_is_shared_and_never_exceeded() {
        let b = FuseBudget::new();
        assert!(b.take(600, 1000));
        assert!(!b.take(500, 1000), "600 + 500 > 1000");
        assert!(b.take(400, 1000));
        assert_eq!(b.used.load(Ordering::Relaxed), 1000);
        b.give_back(600);
        assert!(b.take(500, 1000));
        assert_eq!(b.used.load(Ordering::Relaxed), 900);
        assert!(!b.take(u64::MAX, u64::MAX), "no overflow");
    }
}
