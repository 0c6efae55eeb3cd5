//! LoRA merges and key matching checked against an independent reference.
//!
//! Every file under `tests/fixtures/lora/` was written by `make_lora_fixtures.py` there (see its
//! `README.md`) with Python's `safetensors` package: tiny SD 1.x and SDXL bases in the diffusers
//! and the original-SD checkpoint layouts (the same values in both), kohya / LyCORIS and PEFT
//! LoRAs, and malformed LoRAs. `expected.json` holds, for every (base, LoRA stack) case, which
//! base tensor each adapter must reach, the adapters that must be reported unmatched, and the
//! fused value of every adapted tensor, computed by numpy in float64 from the stored (rounded)
//! values (`expected_values.f64`, raw little-endian f64); plus the sha256 of every tensor
//! written.
//!
//! # Tolerances
//!
//! `rel = |got − ref| / max(|ref|, FLOOR)`, with [`FLOOR`] = 0.001 (the weights are about
//! N(0, 0.5)), must be ≤ 1e-6 for F32 weights and ≤ 1e-3 for F16. BF16 carries 8 significant
//! bits: rounding the exact value once already costs up to 2⁻⁸ ≈ 3.9e-3 relative, so no
//! implementation can meet 1e-3 there; BF16 is held to 2⁻⁸ instead. F16 and BF16 results must
//! also be the value nearest to the reference (within 2⁻¹⁶·max(|ref|, FLOOR), for near-ties),
//! the stronger check for both.
//!
//! fp8 weights (F8_E4M3, F8_E5M2) are rounded stochastically: each element must be one of the
//! two fp8 values around its reference (within one fp8 step of it), and the errors, in steps,
//! must average out (|mean| under 5 standard deviations of a mean of independent errors).
//!
//! The SDXL checkpoint's second text encoder is in OpenCLIP layout: q, k and v are row blocks of
//! one `attn.in_proj_weight`, which LoRAs name as three modules (`parts` in `expected.json`;
//! `rows` says which rows each adapter reaches).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::device::ClientDone;
use ferry::engine::lora_view::LoraMode;
use ferry::engine::{Engine, EngineError, ModelId};
use ferry::lora::export::{ExportReport, export_fused};
use ferry::lora::format::load;
use ferry::lora::keys::match_to;
use ferry::lora::{LoraError, LoraFile};
use ferry::store::SourceKind;
use ferry::{Dtype, Model};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lora");

/// Below this magnitude, errors are measured relative to `FLOOR` instead of `|ref|`.
const FLOOR: f64 = 1e-3;
const F32_TOL: f64 = 1e-6;
const F16_TOL: f64 = 1e-3;
/// One rounding to bf16 (unit roundoff 2⁻⁸): the least any bf16 result can promise.
const BF16_TOL: f64 = 1.0 / 256.0;
/// Accumulation slack allowed when deciding which f16 / bf16 value is nearest.
const NEAREST_SLACK: f64 = 1.0 / 65536.0;

#[derive(Debug, Deserialize)]
struct Expected {
    generator: BTreeMap<String, String>,
    values: ValuesFile,
    /// Every safetensors file written -> its tensors.
    files: BTreeMap<String, Vec<FileTensor>>,
    cases: Vec<Case>,
    rejections: Vec<Rejection>,
}

#[derive(Debug, Deserialize)]
struct ValuesFile {
    file: String,
    count: usize,
    sha256: String,
}

#[derive(Debug, Deserialize)]
struct FileTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    sha256: String,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    /// Cases of one group apply the same stack to the two layouts of one base.
    group: String,
    /// The path the base is opened by, relative to the fixtures.
    base: String,
    loras: Vec<StackEntry>,
    adapted: Vec<Adapted>,
}

#[derive(Debug, Deserialize)]
struct StackEntry {
    lora: String,
    strength: f32,
    /// Adapter name -> (weight file, tensor name) it reaches.
    matches: BTreeMap<String, (String, String)>,
    /// Adapter name -> (first row, rows), for adapters of a slice of a fused tensor.
    #[serde(default)]
    rows: BTreeMap<String, (u64, u64)>,
    unmatched: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Adapted {
    /// The module, named independently of the layout.
    module: String,
    /// For a fused tensor (OpenCLIP `in_proj_weight`): the modules whose rows it holds.
    #[serde(default)]
    parts: Vec<String>,
    file: String,
    tensor: String,
    dtype: String,
    shape: Vec<u64>,
    /// Elements `[offset, offset + count)` of `expected_values.f64`.
    offset: usize,
    count: usize,
}

#[derive(Debug, Deserialize)]
struct Rejection {
    lora: String,
    base: String,
    error: String,
    adapter: String,
    target: Option<String>,
    delta: Option<Vec<u64>>,
    weight: Option<Vec<u64>>,
    missing: Option<String>,
}

struct Fixtures {
    expected: Expected,
    values: Vec<f64>,
}

impl Fixtures {
    fn load() -> Fixtures {
        let text = std::fs::read_to_string(fixture("expected.json")).expect("read expected.json");
        let expected: Expected = serde_json::from_str(&text).expect("expected.json parses");
        let raw = std::fs::read(fixture(&expected.values.file)).expect("read the values");
        assert_eq!(sha256_hex(&raw), expected.values.sha256, "expected_values.f64 is intact");
        assert_eq!(raw.len(), expected.values.count * 8);
        let values = raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Fixtures { expected, values }
    }

    fn reference(&self, a: &Adapted) -> &[f64] {
        &self.values[a.offset..a.offset + a.count]
    }

    /// sha256 of every tensor written, by (file, tensor name).
    fn sha(&self) -> HashMap<(&str, &str), &str> {
        self.expected
            .files
            .iter()
            .flat_map(|(file, ts)| {
                ts.iter().map(move |t| ((file.as_str(), t.name.as_str()), t.sha256.as_str()))
            })
            .collect()
    }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

fn fixtures_root() -> PathBuf {
    std::fs::canonicalize(FIXTURES).expect("fixtures directory exists")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn open(rel: &str) -> Arc<Model> {
    Arc::new(Model::open(fixture(rel)).unwrap_or_else(|e| panic!("opening {rel}: {e}")))
}

fn load_lora(rel: &str) -> LoraFile {
    load(&fixture(rel)).unwrap_or_else(|e| panic!("loading {rel}: {e}"))
}

/// A tensor's weight file relative to the fixtures, and its name in that file.
fn file_and_name(model: &Model, id: usize) -> (String, String) {
    let t = &model.tensors()[id];
    let path = &model.files()[t.file].path;
    let rel = path.strip_prefix(fixtures_root()).unwrap_or_else(|_| panic!("{}", path.display()));
    (rel.to_str().expect("UTF-8").to_string(), t.name.clone())
}

/// Base tensor ids by (weight file, tensor name).
fn by_file_and_name(model: &Model) -> BTreeMap<(String, String), usize> {
    (0..model.tensors().len()).map(|id| (file_and_name(model, id), id)).collect()
}

/// A tensor's (component, local name): how engines and exports find it.
fn component_and_local(model: &Model, id: usize) -> (String, String) {
    let c = &model.components()[model.tensors()[id].component];
    (c.name.clone(), model.local_name(id).expect("local name").to_string())
}

fn dtype_of(name: &str) -> Dtype {
    match name {
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "F32" => Dtype::F32,
        "F8_E4M3" => Dtype::F8_E4M3,
        "F8_E5M2" => Dtype::F8_E5M2,
        other => panic!("no reference dtype {other}"),
    }
}

/// Worst relative error seen, per dtype.
#[derive(Debug, Default)]
struct Worst(BTreeMap<&'static str, f64>);

impl Worst {
    fn note(&mut self, dtype: Dtype, rel: f64) {
        let e = self.0.entry(dtype.as_str()).or_insert(0.0);
        *e = e.max(rel);
    }
}

fn half_value(dtype: Dtype, bits: u16) -> f64 {
    match dtype {
        Dtype::F16 => half::f16::from_bits(bits).to_f64(),
        _ => half::bf16::from_bits(bits).to_f64(),
    }
}

/// Whether no neighbour of `bits` is nearer to `want` (by more than `slack`).
fn is_nearest(dtype: Dtype, bits: u16, want: f64, slack: f64) -> bool {
    let err = (half_value(dtype, bits) - want).abs();
    let (sign, mag) = (bits & 0x8000, bits & 0x7fff);
    let larger = sign | (mag + 1);
    let smaller = if mag == 0 { (sign ^ 0x8000) | 1 } else { sign | (mag - 1) };
    [larger, smaller].iter().all(|&n| (half_value(dtype, n) - want).abs() + slack >= err)
}

/// The value of an fp8 code.
fn fp8_value(dtype: Dtype, code: u8) -> f64 {
    match dtype {
        Dtype::F8_E4M3 => float8::F8E4M3::from_bits(code).to_f64(),
        _ => float8::F8E5M2::from_bits(code).to_f64(),
    }
}

/// The fp8 values either side of `x` (both `x` when it is one).
fn fp8_neighbours(dtype: Dtype, x: f64) -> (f64, f64) {
    let max = if dtype == Dtype::F8_E4M3 { 0x7e } else { 0x7b };
    let mags: Vec<f64> = (0..=max).map(|c| fp8_value(dtype, c)).collect();
    let a = x.abs();
    let i = mags.partition_point(|&v| v <= a).saturating_sub(1);
    let (lo, hi) = if mags[i] == a { (a, a) } else { (mags[i], mags[(i + 1).min(max as usize)]) };
    if x < 0.0 { (-hi, -lo) } else { (lo, hi) }
}

/// fp8 results (module docs): each one of the two fp8 values around the reference (the f32
/// accumulation, about 2⁻²⁰ relative here, may put the sum on the other side of an fp8 value
/// the reference sits on); errors unbiased on average.
fn check_fp8(what: &str, dtype: Dtype, got: &[u8], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: byte length");
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, (&code, &r)) in got.iter().zip(want).enumerate() {
        let g = fp8_value(dtype, code);
        let slack = r.abs() * 1e-5;
        let near = [
            fp8_neighbours(dtype, r),
            fp8_neighbours(dtype, r - slack),
            fp8_neighbours(dtype, r + slack),
        ];
        assert!(
            near.iter().any(|&(lo, hi)| g == lo || g == hi),
            "{what}[{i}]: {g} is not an fp8 value next to {r} ({:?})",
            near[0]
        );
        let (lo, hi) = near[0];
        if hi > lo {
            sum += (g - r) / (hi - lo);
            n += 1;
        }
    }
    assert!(n > 100, "{what}: the deltas move most elements off fp8 values");
    let mean = sum / n as f64;
    assert!(mean.abs() < 5.0 * 0.5 / (n as f64).sqrt(), "{what}: mean rounding error {mean} steps");
}

/// Compares a fused tensor's bytes with its f64 reference (module docs).
fn check_values(what: &str, dtype: Dtype, got: &[u8], want: &[f64], worst: &mut Worst) {
    if matches!(dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2) {
        return check_fp8(what, dtype, got, want);
    }
    let size = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => panic!("{what}: unexpected dtype {other}"),
    };
    assert_eq!(got.len(), want.len() * size, "{what}: byte length");
    let tol = match dtype {
        Dtype::F32 => F32_TOL,
        Dtype::F16 => F16_TOL,
        _ => BF16_TOL,
    };
    for (i, (chunk, &r)) in got.chunks_exact(size).zip(want).enumerate() {
        let denom = r.abs().max(FLOOR);
        let g = if size == 4 {
            f64::from(f32::from_le_bytes(chunk.try_into().expect("4 bytes")))
        } else {
            let bits = u16::from_le_bytes(chunk.try_into().expect("2 bytes"));
            assert!(
                is_nearest(dtype, bits, r, NEAREST_SLACK * denom),
                "{what}[{i}]: {} is not the {dtype} nearest to {r}",
                half_value(dtype, bits)
            );
            half_value(dtype, bits)
        };
        let rel = (g - r).abs() / denom;
        assert!(
            rel <= tol,
            "{what}[{i}]: got {g}, reference {r}: relative error {rel:e} > {tol:e}"
        );
        worst.note(dtype, rel);
    }
}

fn stack(case: &Case) -> Vec<(LoraFile, f32)> {
    case.loras.iter().map(|l| (load_lora(&l.lora), l.strength)).collect()
}

fn path_stack(case: &Case) -> Vec<(PathBuf, f32)> {
    case.loras.iter().map(|l| (fixture(&l.lora), l.strength)).collect()
}

/// Checks what matching reported against the case: merged count and unmatched adapters (in
/// stack order; each list sorted).
fn check_report(case: &Case, report: &ExportReport) {
    assert_eq!(report.merged, case.adapted.len(), "{}: merged tensors", case.name);
    assert_eq!(report.unmatched.len(), case.loras.len(), "{}: one entry per LoRA", case.name);
    for ((path, got), want) in report.unmatched.iter().zip(&case.loras) {
        assert!(path.ends_with(&want.lora), "{}: {} in stack order", case.name, path.display());
        let mut got = got.clone();
        got.sort();
        assert_eq!(got, want.unmatched, "{}: unmatched adapters of {}", case.name, want.lora);
    }
    for (path, names) in &report.unrecognised {
        assert!(names.is_empty(), "{}: {} has unrecognised {names:?}", case.name, path.display());
    }
}

/// Exports `case` into `dir` and returns the report and the fused model.
fn export_case(case: &Case, dir: &Path) -> (Arc<Model>, ExportReport, Model) {
    let base = open(&case.base);
    let out = if base.kind() == SourceKind::SingleFile {
        dir.join("fused.safetensors")
    } else {
        dir.join("fused")
    };
    let report = export_fused(&base, &stack(case), &out)
        .unwrap_or_else(|e| panic!("{}: export: {e}", case.name));
    let fused = Model::open(&out).unwrap_or_else(|e| panic!("{}: open export: {e}", case.name));
    (base, report, fused)
}

#[test]
fn fixtures_are_what_python_wrote() {
    let f = Fixtures::load();
    for key in ["safetensors", "numpy", "ml_dtypes", "python"] {
        assert!(f.expected.generator.contains_key(key), "{key} version recorded");
    }
    let mut seen = BTreeSet::new();
    let mut models: Vec<&str> = f.expected.cases.iter().map(|c| c.base.as_str()).collect();
    models.extend(f.expected.cases.iter().flat_map(|c| c.loras.iter().map(|l| l.lora.as_str())));
    models.extend(f.expected.rejections.iter().map(|r| r.lora.as_str()));
    models.sort_unstable();
    models.dedup();
    for rel in models {
        let m = open(rel);
        for id in 0..m.tensors().len() {
            let (file, name) = file_and_name(&m, id);
            let want = f.expected.files[&file]
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{file}: {name} not in expected.json"));
            let t = &m.tensors()[id];
            assert_eq!((t.dtype.as_str(), &t.shape), (want.dtype.as_str(), &want.shape), "{name}");
            let bytes = m.tensor_bytes(id).expect("bytes");
            assert_eq!(sha256_hex(bytes), want.sha256, "{file}: {name}");
            seen.insert((file, name));
        }
    }
    let listed: BTreeSet<(String, String)> = f
        .expected
        .files
        .iter()
        .flat_map(|(file, ts)| ts.iter().map(move |t| (file.clone(), t.name.clone())))
        .collect();
    assert_eq!(seen, listed, "every tensor written is opened by some fixture");
    // Every base tensor of every dtype the merge writes is covered.
    let dtypes: BTreeSet<&str> =
        f.expected.cases.iter().flat_map(|c| c.adapted.iter().map(|a| a.dtype.as_str())).collect();
    assert_eq!(dtypes, BTreeSet::from(["BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"]));
}

#[test]
fn key_matching_reaches_the_documented_tensors() {
    let f = Fixtures::load();
    for case in &f.expected.cases {
        let base = open(&case.base);
        for entry in &case.loras {
            let lora = load_lora(&entry.lora);
            let m = match_to(&lora, &base)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", case.name, entry.lora));
            let got: BTreeMap<String, (String, String)> = m
                .matches
                .iter()
                .map(|x| (lora.adapters[x.adapter].name.clone(), file_and_name(&base, x.tensor)))
                .collect();
            assert_eq!(got.len(), m.matches.len(), "{}: one match per adapter", case.name);
            assert_eq!(got, entry.matches, "{}: {}", case.name, entry.lora);
            let rows: BTreeMap<String, (u64, u64)> = m
                .matches
                .iter()
                .filter_map(|x| Some((lora.adapters[x.adapter].name.clone(), x.rows?)))
                .map(|(a, r)| (a, (r.start, r.len)))
                .collect();
            assert_eq!(rows, entry.rows, "{}: {} row slices", case.name, entry.lora);
            let mut unmatched = m.unmatched.clone();
            unmatched.sort();
            assert_eq!(unmatched, entry.unmatched, "{}: {} unmatched", case.name, entry.lora);
        }
    }
}

#[test]
fn export_matches_the_f64_reference_and_copies_the_rest() {
    let f = Fixtures::load();
    let sha = f.sha();
    let mut worst = Worst::default();
    for case in &f.expected.cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, report, fused) = export_case(case, dir.path());
        check_report(case, &report);
        let ids = by_file_and_name(&base);
        let mut adapted = BTreeSet::new();
        for a in &case.adapted {
            let id = ids[&(a.file.clone(), a.tensor.clone())];
            let t = &base.tensors()[id];
            assert_eq!((t.dtype.as_str(), &t.shape), (a.dtype.as_str(), &a.shape), "{}", a.tensor);
            let (c, local) = component_and_local(&base, id);
            let fid = fused.find(&c, &local).unwrap_or_else(|| panic!("{c}/{local} exported"));
            let got = fused.tensor_bytes(fid).expect("bytes");
            assert_ne!(
                got,
                base.tensor_bytes(id).expect("bytes"),
                "{}: {local} changed",
                case.name
            );
            let what = format!("{}: export {}", case.name, a.tensor);
            check_values(&what, dtype_of(&a.dtype), got, f.reference(a), &mut worst);
            adapted.insert(id);
        }
        // Everything else: the bytes Python wrote.
        assert_eq!(fused.tensors().len(), base.tensors().len(), "{}", case.name);
        for id in (0..base.tensors().len()).filter(|id| !adapted.contains(id)) {
            let (file, name) = file_and_name(&base, id);
            let (c, local) = component_and_local(&base, id);
            let fid = fused.find(&c, &local).unwrap_or_else(|| panic!("{c}/{local} exported"));
            let got = fused.tensor_bytes(fid).expect("bytes");
            assert_eq!(
                sha256_hex(got),
                sha[&(file.as_str(), name.as_str())],
                "{}: {name}",
                case.name
            );
        }
    }
    eprintln!("worst relative error (floor {FLOOR}) per dtype, export: {:?}", worst.0);
}

/// Every tensor the engine serves for `id`, by (component, local name).
fn served(e: &Engine, id: ModelId, model: &Model) -> HashMap<(String, String), Vec<u8>> {
    let mut out = HashMap::new();
    for c in model.components() {
        for layer in 0..c.layers.len() {
            let lease = e.acquire(id, &c.name, layer).expect("acquire");
            for t in lease.tensors() {
                let bytes = e.read_tensor(&lease, t).expect("read");
                out.insert((c.name.clone(), t.name.clone()), bytes);
            }
            e.release(lease, ClientDone::Now).expect("release");
        }
    }
    out
}

#[test]
fn engine_serves_the_reference_in_both_modes_and_removal_restores_the_file() {
    let f = Fixtures::load();
    let sha = f.sha();
    let mut worst = Worst::default();
    for case in &f.expected.cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _, fused) = export_case(case, dir.path());
        let ids = by_file_and_name(&base);
        for mode in [LoraMode::Backup, LoraMode::Fuse] {
            for mapped_reads in [false, true] {
                let label = format!("{} {mode:?} mapped_reads={mapped_reads}", case.name);
                let e =
                    ferry_tests::host_engine(1 << 20, mapped_reads, Duration::from_secs(5), 512);
                let mid = e.open_model(fixture(&case.base)).expect("open");
                let before = served(&e, mid, &base);
                let report = e.set_loras(mid, &path_stack(case), mode).expect("set_loras");
                check_report(case, &report);

                let now = served(&e, mid, &base);
                let mut adapted = BTreeSet::new();
                for a in &case.adapted {
                    let id = ids[&(a.file.clone(), a.tensor.clone())];
                    let key = component_and_local(&base, id);
                    let got = &now[&key];
                    let what = format!("{label}: {}", a.tensor);
                    check_values(&what, dtype_of(&a.dtype), got, f.reference(a), &mut worst);
                    // The same bytes as the export.
                    let fid = fused.find(&key.0, &key.1).expect("exported");
                    assert_eq!(Some(got.as_slice()), fused.tensor_bytes(fid), "{what}: = export");
                    adapted.insert(id);
                }
                for id in (0..base.tensors().len()).filter(|id| !adapted.contains(id)) {
                    let (file, name) = file_and_name(&base, id);
                    let got = &now[&component_and_local(&base, id)];
                    assert_eq!(
                        sha256_hex(got),
                        sha[&(file.as_str(), name.as_str())],
                        "{label}: {name}"
                    );
                }

                // Removal: the file's bytes, exactly, for every tensor.
                e.set_loras(mid, &[], mode).expect("remove");
                let after = served(&e, mid, &base);
                assert_eq!(after, before, "{label}: removal restores what was served before");
                for id in 0..base.tensors().len() {
                    let key = component_and_local(&base, id);
                    assert_eq!(
                        Some(after[&key].as_slice()),
                        base.tensor_bytes(id),
                        "{label}: {key:?}"
                    );
                }
                assert_eq!(e.stats().lora_cache_bytes, 0, "{label}: cache dropped");
            }
        }
    }
    eprintln!("worst relative error (floor {FLOOR}) per dtype, engine: {:?}", worst.0);
}

#[test]
fn both_layouts_give_the_same_fused_values() {
    let f = Fixtures::load();
    let mut groups: BTreeMap<&str, Vec<&Case>> = BTreeMap::new();
    for case in &f.expected.cases {
        groups.entry(case.group.as_str()).or_default().push(case);
    }
    for (group, cases) in groups {
        if group.starts_with("fp8") {
            assert_eq!(cases.len(), 1, "{group}: one layout");
            continue;
        }
        let [diffusers, checkpoint] = cases.as_slice() else {
            panic!("{group}: expected two layouts, found {}", cases.len())
        };
        assert!(diffusers.base.contains("diffusers") && checkpoint.base.contains("checkpoint"));
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, _, df) = export_case(diffusers, &dir.path().join("d"));
        let (cb, _, cf) = export_case(checkpoint, &dir.path().join("c"));
        let fused_bytes = |base: &Model, fused: &Model, a: &Adapted| {
            let id = by_file_and_name(base)[&(a.file.clone(), a.tensor.clone())];
            let (c, l) = component_and_local(base, id);
            fused.tensor_bytes(fused.find(&c, &l).expect("exported")).expect("bytes").to_vec()
        };
        let c_by_module: BTreeMap<&str, &Adapted> =
            checkpoint.adapted.iter().map(|a| (a.module.as_str(), a)).collect();
        // A fused OpenCLIP tensor is its parts, fused separately in the diffusers layout, one
        // after the other.
        let d_by_module: BTreeMap<&str, &Adapted> =
            diffusers.adapted.iter().map(|a| (a.module.as_str(), a)).collect();
        let mut fused_parts = BTreeSet::new();
        for b in checkpoint.adapted.iter().filter(|b| !b.parts.is_empty()) {
            let mut joined = Vec::new();
            let mut reference = Vec::new();
            for p in &b.parts {
                let a = d_by_module
                    .get(p.as_str())
                    .unwrap_or_else(|| panic!("{group}: part {p} of {} not adapted", b.module));
                joined.extend(fused_bytes(&db, &df, a));
                reference.extend_from_slice(f.reference(a));
                fused_parts.insert(p.as_str());
            }
            assert_eq!(reference, f.reference(b), "{group}: {} reference = its parts", b.module);
            assert_eq!(joined, fused_bytes(&cb, &cf, b), "{group}: {} bytes = its parts", b.module);
        }
        let mut common = 0;
        for a in &diffusers.adapted {
            let Some(b) = c_by_module.get(a.module.as_str()) else {
                assert!(
                    a.module.starts_with("te") || fused_parts.contains(a.module.as_str()),
                    "{group}: {} only in diffusers",
                    a.module
                );
                continue;
            };
            common += 1;
            assert_eq!(f.reference(a), f.reference(b), "{group}: {} reference", a.module);
            assert_eq!(
                fused_bytes(&db, &df, a),
                fused_bytes(&cb, &cf, b),
                "{group}: {} fused bytes ({} vs {})",
                a.module,
                a.tensor,
                b.tensor
            );
        }
        let d_modules: BTreeSet<&str> =
            diffusers.adapted.iter().map(|a| a.module.as_str()).collect();
        for (m, b) in c_by_module.iter().filter(|(m, _)| !d_modules.contains(*m)) {
            assert!(
                m.starts_with("te") || !b.parts.is_empty(),
                "{group}: {m} only in the checkpoint"
            );
        }
        // The unknown-names group adapts nothing; every other group shares its UNet modules.
        assert!(common > 0 || diffusers.adapted.is_empty(), "{group}: nothing in common");
    }
}

#[test]
fn rejections_are_typed_errors_and_change_nothing() {
    let f = Fixtures::load();
    for r in &f.expected.rejections {
        let label = format!("{} on {}", r.lora, r.base);
        let path = fixture(&r.lora);
        let base = open(&r.base);
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("fused.safetensors");
        let e = ferry_tests::host_engine(1 << 20, false, Duration::from_secs(5), 512);
        let id = e.open_model(fixture(&r.base)).expect("open");
        let before = served(&e, id, &base);
        match r.error.as_str() {
            "ShapeMismatch" => {
                let check = |err: &LoraError| match err {
                    LoraError::ShapeMismatch { adapter, target, delta, weight } => {
                        assert_eq!(adapter, &r.adapter, "{label}");
                        assert_eq!(Some(target), r.target.as_ref(), "{label}");
                        assert_eq!(Some(delta), r.delta.as_ref(), "{label}");
                        assert_eq!(Some(weight), r.weight.as_ref(), "{label}");
                    }
                    other => panic!("{label}: expected ShapeMismatch, got {other}"),
                };
                let lora = load(&path).unwrap_or_else(|e| panic!("{label}: parses: {e}"));
                check(&match_to(&lora, &base).expect_err("match_to rejects it"));
                let err = export_fused(&base, &[(lora, 1.0)], &out).expect_err("export rejects it");
                check(&err);
                assert!(err.to_string().contains(&r.adapter), "{label}: {err}");
                match e.set_loras(id, &[(path.clone(), 1.0)], LoraMode::Fuse) {
                    Err(EngineError::Lora(err)) => check(&err),
                    other => panic!("{label}: engine: {other:?}"),
                }
            }
            "IncompleteAdapter" => {
                let check = |err: &LoraError| match err {
                    LoraError::IncompleteAdapter { path: p, adapter, missing } => {
                        assert!(p.ends_with(&r.lora), "{label}: {}", p.display());
                        assert_eq!(adapter, &r.adapter, "{label}");
                        assert_eq!(Some(*missing), r.missing.as_deref(), "{label}");
                    }
                    other => panic!("{label}: expected IncompleteAdapter, got {other}"),
                };
                check(&load(&path).expect_err("load rejects it"));
                match e.set_loras(id, &[(path.clone(), 1.0)], LoraMode::Backup) {
                    Err(EngineError::Lora(err)) => check(&err),
                    other => panic!("{label}: engine: {other:?}"),
                }
            }
            other => panic!("unknown rejection {other}"),
        }
        assert!(!out.exists(), "{label}: no export written");
        assert_eq!(served(&e, id, &base), before, "{label}: the engine serves the file as before");
    }
}
