//! Reading a LoRA file: its tensors grouped into [`Adapter`]s.
//!
//! Recognised factor names (`x` is the module name the adapter keeps):
//!
//! | family | up | down | mid |
//! |---|---|---|---|
//! | kohya / LyCORIS LoCon | `x.lora_up.weight` | `x.lora_down.weight` | `x.lora_mid.weight` |
//! | old diffusers | `x.lora.up.weight`, `x_lora.up.weight`, `x.lora_linear_layer.up.weight` | (same, `down`) | — |
//! | PEFT / diffusers | `x.lora_B.weight`, `x.lora_B.<adapter>.weight` | `x.lora_A[.<adapter>].weight` | — |
//!
//! Factors must be F16, BF16, F32 or F64 (what [`super::math`] merges), else
//! [`LoraError::UnsupportedDtype`]. `x.alpha` is a one-element tensor (shape `[]` or `[1]`) of any
//! float (or integer) dtype, finite and positive; it applies to every adapter of module `x`. The up/down families are reported as [`Format::Kohya`], the A/B family as
//! [`Format::Peft`]; a file mixing the two is rejected. A file with neither (only LoHa, LoKr,
//! ... tensors) parses as [`Format::Kohya`] with no adapters.
//!
//! **PEFT adapter names.** A file whose A/B factors carry one adapter name (usually `default`),
//! or none, yields plain module names. A file carrying several keeps every adapter, named
//! `module@adapter` (see [`split_adapter_name`]); [`peft_adapter_names`] lists them and
//! [`retain_peft_adapter`] keeps one. Without a choice, all of them stack.
//!
//! Tensors of adapter kinds ferry does not apply (LoHa `hada_*`, LoKr `lokr_*`, GLoRA, OFT,
//! `.diff`, `.diff_b`, `.set_weight`, PEFT `lora_B.bias`, embedding LoRA, orphan alphas, ...)
//! are listed in [`LoraFile::unrecognised`]. A LoRA adapter that comes with a DoRA magnitude
//! (`x.dora_scale`, `x.lora_magnitude_vector`) is an [`LoraError::UnsupportedAdapter`]: merging
//! it without the magnitude would silently give wrong weights.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use super::{Adapter, Format, LoraError, LoraFile};
use crate::store::{Dtype, Model, TensorId};

/// Name prefixes of kohya-style flattened module names.
pub const KOHYA_PREFIXES: &[&str] = &[
    "lora_unet_",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_transformer_",
    "lycoris_",
];

/// Opens (maps) the LoRA file at `path` and parses it.
pub fn load(path: &Path) -> Result<LoraFile, LoraError> {
    let model = Model::open(path)?;
    parse(Arc::new(model))
}

/// Splits an adapter name into its module name and its PEFT adapter name, if it has one
/// (`unet.x.proj@style` → (`unet.x.proj`, `Some("style")`)).
pub fn split_adapter_name(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('@') {
        Some((module, adapter)) => (module, Some(adapter)),
        None => (name, None),
    }
}

/// The PEFT adapter names a parsed file keeps apart (empty unless it holds several).
pub fn peft_adapter_names(file: &LoraFile) -> Vec<&str> {
    let names: BTreeSet<&str> =
        file.adapters.iter().filter_map(|a| split_adapter_name(&a.name).1).collect();
    names.into_iter().collect()
}

/// Keeps only the adapters of PEFT adapter `adapter` (and those without an adapter name);
/// returns how many adapters remain.
pub fn retain_peft_adapter(file: &mut LoraFile, adapter: &str) -> usize {
    file.adapters.retain(|a| split_adapter_name(&a.name).1.is_none_or(|n| n == adapter));
    file.adapters.len()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Up,
    Down,
    Mid,
}

/// How a file spells its factors; names the missing factor in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// `.lora_up.weight`
    Kohya,
    /// `.lora.up.weight`, `_lora.up.weight`, `.lora_linear_layer.up.weight`
    UpDown,
    /// `.lora_B.weight`
    Peft,
}

impl Style {
    fn factor(self, role: Role) -> &'static str {
        match (self, role) {
            (Style::Kohya, Role::Up) => "lora_up",
            (Style::Kohya, Role::Down) => "lora_down",
            (Style::Kohya, Role::Mid) => "lora_mid",
            (Style::UpDown, Role::Up) => "up",
            (Style::UpDown, Role::Down) => "down",
            (Style::UpDown, Role::Mid) => "mid",
            (Style::Peft, Role::Up) => "lora_B",
            (Style::Peft, Role::Down) => "lora_A",
            (Style::Peft, Role::Mid) => "mid",
        }
    }
}

/// One tensor recognised as a LoRA factor.
struct Factor<'a> {
    module: &'a str,
    adapter: Option<&'a str>,
    role: Role,
    style: Style,
}

/// Recognises a LoRA factor by its name.
fn classify(name: &str) -> Option<Factor<'_>> {
    const SUFFIXES: &[(&str, Role, Style)] = &[
        (".lora_up.weight", Role::Up, Style::Kohya),
        (".lora_down.weight", Role::Down, Style::Kohya),
        (".lora_mid.weight", Role::Mid, Style::Kohya),
        (".lora_linear_layer.up.weight", Role::Up, Style::UpDown),
        (".lora_linear_layer.down.weight", Role::Down, Style::UpDown),
        (".lora.up.weight", Role::Up, Style::UpDown),
        (".lora.down.weight", Role::Down, Style::UpDown),
        ("_lora.up.weight", Role::Up, Style::UpDown),
        ("_lora.down.weight", Role::Down, Style::UpDown),
        (".lora_B.weight", Role::Up, Style::Peft),
        (".lora_A.weight", Role::Down, Style::Peft),
    ];
    for &(suffix, role, style) in SUFFIXES {
        if let Some(module) = name.strip_suffix(suffix) {
            if module.is_empty() {
                return None;
            }
            return Some(Factor { module, adapter: None, role, style });
        }
    }
    // `x.lora_A.<adapter>.weight`
    let (head, adapter) = name.strip_suffix(".weight")?.rsplit_once('.')?;
    if adapter.is_empty() || adapter.contains('@') {
        return None;
    }
    let (module, role) = if let Some(m) = head.strip_suffix(".lora_B") {
        (m, Role::Up)
    } else if let Some(m) = head.strip_suffix(".lora_A") {
        (m, Role::Down)
    } else {
        return None;
    };
    if module.is_empty() {
        return None;
    }
    Some(Factor { module, adapter: Some(adapter), role, style: Style::Peft })
}

/// The module of a DoRA magnitude tensor.
fn dora_module(name: &str) -> Option<&str> {
    if let Some(m) = name.strip_suffix(".dora_scale") {
        return Some(m);
    }
    name.find(".lora_magnitude_vector").map(|i| &name[..i])
}

/// Whether a tensor belongs to some adapter kind ferry does not apply.
fn other_adapter_like(name: &str) -> bool {
    const MARKERS: &[&str] = &[
        ".hada_",
        ".lokr_",
        ".oft_",
        ".boft_",
        ".dora_scale",
        ".lora_magnitude_vector",
        ".lora_embedding_",
        ".lora_A.",
        ".lora_B.",
        ".lora_up.",
        ".lora_down.",
        ".lora_mid.",
    ];
    const SUFFIXES: &[&str] = &[
        ".diff",
        ".diff_b",
        ".set_weight",
        ".w_norm",
        ".b_norm",
        ".reshape_weight",
        ".a1.weight",
        ".a2.weight",
        ".b1.weight",
        ".b2.weight",
        ".alpha",
    ];
    MARKERS.iter().any(|m| name.contains(m))
        || SUFFIXES.iter().any(|s| name.ends_with(s))
        || KOHYA_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[derive(Default)]
struct Slots {
    up: Option<TensorId>,
    down: Option<TensorId>,
    mid: Option<TensorId>,
    style: Option<Style>,
}

/// Groups the tensors of an opened LoRA file into adapters.
pub fn parse(model: Arc<Model>) -> Result<LoraFile, LoraError> {
    let path = model.root().to_path_buf();
    let not_a_lora = |reason: String| LoraError::NotALora { path: path.clone(), reason };

    let mut groups: BTreeMap<(String, Option<String>), Slots> = BTreeMap::new();
    let mut alphas: HashMap<&str, TensorId> = HashMap::new();
    let mut dora: HashSet<&str> = HashSet::new();
    let mut rest: Vec<TensorId> = Vec::new();
    let (mut updown, mut ab) = (None::<&str>, None::<&str>);
    let mut peft_names: BTreeSet<Option<&str>> = BTreeSet::new();

    for (id, t) in model.tensors().iter().enumerate() {
        let name = t.name.as_str();
        if let Some(f) = classify(name) {
            if f.style == Style::Peft {
                ab.get_or_insert(name);
                peft_names.insert(f.adapter);
            } else {
                updown.get_or_insert(name);
            }
            let slots =
                groups.entry((f.module.to_string(), f.adapter.map(str::to_string))).or_default();
            let slot = match f.role {
                Role::Up => &mut slots.up,
                Role::Down => &mut slots.down,
                Role::Mid => &mut slots.mid,
            };
            if slot.is_some() {
                return Err(not_a_lora(format!(
                    "module {:?} has two {} factors ({name:?})",
                    f.module,
                    f.style.factor(f.role)
                )));
            }
            if slots.style.is_some_and(|s| s != f.style) {
                return Err(not_a_lora(format!(
                    "module {:?} spells its factors two ways ({name:?})",
                    f.module
                )));
            }
            *slot = Some(id);
            slots.style = Some(f.style);
            continue;
        }
        if let Some(module) = name.strip_suffix(".alpha") {
            alphas.insert(module, id);
        }
        if let Some(module) = dora_module(name) {
            dora.insert(module);
        }
        rest.push(id);
    }

    if let (Some(u), Some(a)) = (updown, ab) {
        return Err(not_a_lora(format!(
            "mixes kohya up/down factors ({u:?}) with PEFT A/B factors ({a:?})"
        )));
    }
    let adapter_like = rest.iter().any(|&id| other_adapter_like(&model.tensors()[id].name));
    if groups.is_empty() && !adapter_like {
        let first: Vec<&str> = model.tensors().iter().take(3).map(|t| t.name.as_str()).collect();
        return Err(not_a_lora(if first.is_empty() {
            "the file holds no tensors".to_string()
        } else {
            format!("no tensor looks like an adapter (first tensors: {first:?})")
        }));
    }
    let format = if ab.is_some() { Format::Peft } else { Format::Kohya };
    let keep_apart = peft_names.len() > 1;

    let mut adapters = Vec::with_capacity(groups.len());
    let mut used_alphas: HashSet<TensorId> = HashSet::new();
    for ((module, adapter), slots) in &groups {
        let style = slots.style.unwrap_or(Style::Kohya);
        let display = match adapter {
            Some(a) if keep_apart => format!("{module}@{a}"),
            _ => module.clone(),
        };
        let incomplete = |role| LoraError::IncompleteAdapter {
            path: path.clone(),
            adapter: display.clone(),
            missing: style.factor(role),
        };
        let up = slots.up.ok_or_else(|| incomplete(Role::Up))?;
        let down = slots.down.ok_or_else(|| incomplete(Role::Down))?;
        if dora.contains(module.as_str()) {
            return Err(LoraError::UnsupportedAdapter { adapter: display, kind: "DoRA".into() });
        }
        let (ut, dt) = match (model.tensor(up), model.tensor(down)) {
            (Some(u), Some(d)) => (u, d),
            _ => return Err(incomplete(Role::Up)),
        };
        let mt = match slots.mid {
            Some(m) => Some(model.tensor(m).ok_or_else(|| incomplete(Role::Mid))?),
            None => None,
        };
        for t in [Some(ut), Some(dt), mt].into_iter().flatten() {
            if !matches!(t.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
                return Err(LoraError::UnsupportedDtype {
                    tensor: t.name.clone(),
                    dtype: t.dtype.to_string(),
                });
            }
        }
        let rank = check_ranks(&display, &ut.shape, &dt.shape, mt.map(|m| m.shape.as_slice()))?;
        let alpha = match alphas.get(module.as_str()) {
            Some(&id) => {
                used_alphas.insert(id);
                let value = read_alpha(&model, id).map_err(|reason| LoraError::BadAlpha {
                    path: path.clone(),
                    adapter: display.clone(),
                    reason,
                })?;
                Some(value)
            }
            None => None,
        };
        adapters.push(Adapter { name: display, up, down, mid: slots.mid, alpha, rank });
    }

    let mut unrecognised: Vec<String> = rest
        .into_iter()
        .filter(|id| !used_alphas.contains(id))
        .filter_map(|id| model.tensor(id).map(|t| t.name.clone()))
        .collect();
    unrecognised.sort();
    Ok(LoraFile { model, format, adapters, unrecognised })
}

/// Checks that the factors share a rank and returns it.
///
/// up: `(out, rank)` or `(out, rank, 1, 1)`; down: `(rank, in)` or `(rank, in, kh, kw)`;
/// mid (LoCon CP): `(ra, rb, kh, kw)` with `up (out, ra)` and `down (rb, in)` or `(rb, in, 1, 1)`;
/// the rank is down's.
fn check_ranks(
    adapter: &str,
    up: &[u64],
    down: &[u64],
    mid: Option<&[u64]>,
) -> Result<u64, LoraError> {
    let mismatch = |up: &[u64], down: &[u64]| LoraError::RankMismatch {
        adapter: adapter.to_string(),
        up: up.to_vec(),
        down: down.to_vec(),
    };
    let up_rank = match up {
        [_, r] | [_, r, 1, 1] => *r,
        _ => return Err(mismatch(up, down)),
    };
    let rank = match down {
        [d, _] | [d, _, _, _] => *d,
        _ => return Err(mismatch(up, down)),
    };
    if rank == 0 {
        return Err(mismatch(up, down));
    }
    let Some(mid) = mid else {
        return if up_rank == rank { Ok(rank) } else { Err(mismatch(up, down)) };
    };
    match mid {
        [_, _, _, _] if down.len() == 4 && down[2..] != [1, 1] => Err(mismatch(mid, down)),
        [a, b, _, _] if *a == up_rank && *b == rank => Ok(rank),
        [a, _, _, _] if *a != up_rank => Err(mismatch(up, mid)),
        _ => Err(mismatch(mid, down)),
    }
}

/// Reads a one-element alpha tensor as f32; it must be finite and positive.
fn read_alpha(model: &Model, id: TensorId) -> Result<f32, String> {
    let t = model.tensor(id).ok_or("tensor missing")?;
    if t.shape.iter().product::<u64>() != 1 {
        return Err(format!("expected one value, found shape {:?}", t.shape));
    }
    let bytes = model.tensor_bytes(id).ok_or("tensor bytes out of the file")?;
    let arr = |n: usize| -> Result<&[u8], String> {
        bytes
            .get(..n)
            .filter(|_| bytes.len() == n)
            .ok_or_else(|| format!("{} bytes for one {}", bytes.len(), t.dtype))
    };
    macro_rules! le {
        ($ty:ty, $n:expr) => {{
            let b = arr($n)?;
            let mut a = [0u8; $n];
            a.copy_from_slice(b);
            <$ty>::from_le_bytes(a)
        }};
    }
    let value: f64 = match t.dtype {
        Dtype::F16 => f64::from(le!(half::f16, 2).to_f32()),
        Dtype::BF16 => f64::from(le!(half::bf16, 2).to_f32()),
        Dtype::F32 => f64::from(le!(f32, 4)),
        Dtype::F64 => le!(f64, 8),
        Dtype::I8 => f64::from(le!(i8, 1)),
        Dtype::U8 => f64::from(le!(u8, 1)),
        Dtype::I16 => f64::from(le!(i16, 2)),
        Dtype::U16 => f64::from(le!(u16, 2)),
        Dtype::I32 => f64::from(le!(i32, 4)),
        Dtype::U32 => f64::from(le!(u32, 4)),
        Dtype::I64 => le!(i64, 8) as f64,
        Dtype::U64 => le!(u64, 8) as f64,
        d => return Err(format!("dtype {d} is not a number ferry reads")),
    };
    let alpha = value as f32;
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(format!("{value} is not a finite positive number"));
    }
    Ok(alpha)
}

/// Writers of small safetensors files for the LoRA tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::borrow::Cow;
    use std::path::Path;

    use safetensors::{Dtype, View};

    /// A tensor to write.
    #[derive(Clone, Debug)]
    pub(crate) struct T {
        pub dtype: Dtype,
        pub shape: Vec<usize>,
        pub data: Vec<u8>,
    }

    impl View for &T {
        fn dtype(&self) -> Dtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }

    /// An f32 tensor of `shape`, filled with small distinct values.
    pub(crate) fn f32s(shape: &[usize]) -> T {
        let n: usize = shape.iter().product();
        let data = (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
        T { dtype: Dtype::F32, shape: shape.to_vec(), data }
    }

    pub(crate) fn f16s(shape: &[usize]) -> T {
        let n: usize = shape.iter().product();
        let data = (0..n).flat_map(|_| half::f16::from_f32(0.5).to_le_bytes()).collect();
        T { dtype: Dtype::F16, shape: shape.to_vec(), data }
    }

    pub(crate) fn f16_scalar(v: f32) -> T {
        T { dtype: Dtype::F16, shape: vec![], data: half::f16::from_f32(v).to_le_bytes().to_vec() }
    }

    /// A scalar f32 (`shape []`).
    pub(crate) fn scalar(v: f32) -> T {
        T { dtype: Dtype::F32, shape: vec![], data: v.to_le_bytes().to_vec() }
    }

    pub(crate) fn write(path: &Path, tensors: &[(&str, T)]) {
        let items: Vec<(String, &T)> = tensors.iter().map(|(n, t)| (n.to_string(), t)).collect();
        safetensors::serialize_to_file(items, None, path).expect("write safetensors");
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{T, f16_scalar, f16s, f32s, scalar, write};
    use super::*;

    fn parse_file(tensors: &[(&str, T)]) -> Result<LoraFile, LoraError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lora.safetensors");
        write(&path, tensors);
        load(&path)
    }

    fn find<'a>(f: &'a LoraFile, name: &str) -> &'a Adapter {
        f.adapters.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no adapter {name}"))
    }

    fn factor_name(f: &LoraFile, id: TensorId) -> &str {
        &f.model.tensors()[id].name
    }

    #[test]
    fn kohya_with_alpha_mid_and_loha_leftovers() {
        let f = parse_file(&[
            ("lora_unet_a_proj_in.lora_up.weight", f16s(&[8, 4])),
            ("lora_unet_a_proj_in.lora_down.weight", f16s(&[4, 6])),
            ("lora_unet_a_proj_in.alpha", f16_scalar(2.0)),
            ("lora_unet_conv.lora_up.weight", f32s(&[8, 4, 1, 1])),
            ("lora_unet_conv.lora_down.weight", f32s(&[4, 6, 1, 1])),
            ("lora_unet_conv.lora_mid.weight", f32s(&[4, 4, 3, 3])),
            ("lora_te_x.lora_up.weight", f32s(&[3, 2])),
            ("lora_te_x.lora_down.weight", f32s(&[2, 5])),
            ("lora_unet_h.hada_w1_a", f32s(&[2, 2])),
            ("lora_unet_h.hada_w1_b", f32s(&[2, 2])),
            ("lora_unet_h.alpha", scalar(1.0)),
        ])
        .expect("parse");
        assert_eq!(f.format, Format::Kohya);
        assert_eq!(f.adapters.len(), 3);
        let a = find(&f, "lora_unet_a_proj_in");
        assert_eq!((a.rank, a.alpha, a.mid), (4, Some(2.0), None));
        assert_eq!(factor_name(&f, a.up), "lora_unet_a_proj_in.lora_up.weight");
        assert_eq!(factor_name(&f, a.down), "lora_unet_a_proj_in.lora_down.weight");
        let c = find(&f, "lora_unet_conv");
        assert_eq!(c.rank, 4);
        assert_eq!(c.mid.map(|m| factor_name(&f, m)), Some("lora_unet_conv.lora_mid.weight"));
        assert_eq!(find(&f, "lora_te_x").alpha, None);
        assert_eq!(
            f.unrecognised,
            ["lora_unet_h.alpha", "lora_unet_h.hada_w1_a", "lora_unet_h.hada_w1_b"]
        );
    }

    #[test]
    fn alpha_in_every_float_dtype_and_shape() {
        let st = safetensors::Dtype::BF16;
        let cases = [
            T { dtype: st, shape: vec![1], data: half::bf16::from_f32(3.0).to_le_bytes().to_vec() },
            T {
                dtype: safetensors::Dtype::F64,
                shape: vec![],
                data: 3.0f64.to_le_bytes().to_vec(),
            },
            T {
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: 3.0f32.to_le_bytes().to_vec(),
            },
            T { dtype: safetensors::Dtype::I64, shape: vec![], data: 3i64.to_le_bytes().to_vec() },
        ];
        for alpha in cases {
            let f = parse_file(&[
                ("lora_unet_a.lora_up.weight", f32s(&[2, 1])),
                ("lora_unet_a.lora_down.weight", f32s(&[1, 2])),
                ("lora_unet_a.alpha", alpha.clone()),
            ])
            .expect("parse");
            assert_eq!(f.adapters[0].alpha, Some(3.0), "{alpha:?}");
            assert!(f.unrecognised.is_empty());
        }
    }

    #[test]
    fn bad_alphas() {
        let cases = [
            scalar(0.0),
            scalar(-1.0),
            scalar(f32::NAN),
            scalar(f32::INFINITY),
            f32s(&[2]),
            T {
                dtype: safetensors::Dtype::F64,
                shape: vec![],
                data: 1e300f64.to_le_bytes().to_vec(),
            },
            T { dtype: safetensors::Dtype::BOOL, shape: vec![], data: vec![1] },
        ];
        for alpha in cases {
            let err = parse_file(&[
                ("lora_unet_a.lora_up.weight", f32s(&[2, 1])),
                ("lora_unet_a.lora_down.weight", f32s(&[1, 2])),
                ("lora_unet_a.alpha", alpha.clone()),
            ])
            .expect_err("bad alpha");
            assert!(
                matches!(&err, LoraError::BadAlpha { adapter, .. } if adapter == "lora_unet_a"),
                "{alpha:?}: {err}"
            );
        }
    }

    #[test]
    fn peft_single_adapter_name_gives_plain_names() {
        let f = parse_file(&[
            ("unet.a.to_q.lora_A.default.weight", f32s(&[4, 8])),
            ("unet.a.to_q.lora_B.default.weight", f32s(&[8, 4])),
            ("base_model.model.b.lora_A.default.weight", f32s(&[2, 8])),
            ("base_model.model.b.lora_B.default.weight", f32s(&[3, 2])),
            ("base_model.model.b.alpha", scalar(4.0)),
        ])
        .expect("parse");
        assert_eq!(f.format, Format::Peft);
        assert_eq!(find(&f, "unet.a.to_q").rank, 4);
        assert_eq!(find(&f, "base_model.model.b").alpha, Some(4.0));
        assert!(peft_adapter_names(&f).is_empty());

        let f =
            parse_file(&[("x.lora_A.weight", f32s(&[4, 8])), ("x.lora_B.weight", f32s(&[8, 4]))])
                .expect("parse");
        assert_eq!(f.adapters[0].name, "x");
    }

    #[test]
    fn peft_several_adapter_names_are_kept_apart() {
        let mut f = parse_file(&[
            ("x.lora_A.style.weight", f32s(&[4, 8])),
            ("x.lora_B.style.weight", f32s(&[8, 4])),
            ("x.lora_A.face.weight", f32s(&[2, 8])),
            ("x.lora_B.face.weight", f32s(&[8, 2])),
            ("x.alpha", scalar(1.0)),
        ])
        .expect("parse");
        let names: Vec<&str> = f.adapters.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["x@face", "x@style"]);
        assert_eq!(find(&f, "x@face").rank, 2);
        assert_eq!(find(&f, "x@style").alpha, Some(1.0));
        assert_eq!(peft_adapter_names(&f), ["face", "style"]);
        assert_eq!(split_adapter_name("x@face"), ("x", Some("face")));
        assert_eq!(retain_peft_adapter(&mut f, "style"), 1);
        assert_eq!(f.adapters[0].name, "x@style");
    }

    #[test]
    fn old_diffusers_spellings() {
        let f = parse_file(&[
            ("unet.b.attn1.processor.to_q_lora.up.weight", f32s(&[8, 4])),
            ("unet.b.attn1.processor.to_q_lora.down.weight", f32s(&[4, 8])),
            ("c.lora.up.weight", f32s(&[8, 2])),
            ("c.lora.down.weight", f32s(&[2, 8])),
            ("text_encoder.q_proj.lora_linear_layer.up.weight", f32s(&[8, 2])),
            ("text_encoder.q_proj.lora_linear_layer.down.weight", f32s(&[2, 8])),
        ])
        .expect("parse");
        assert_eq!(f.format, Format::Kohya);
        let names: Vec<&str> = f.adapters.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["c", "text_encoder.q_proj", "unet.b.attn1.processor.to_q"]);
    }

    #[test]
    fn missing_factors() {
        let err =
            parse_file(&[("lora_unet_a.lora_down.weight", f32s(&[1, 2]))]).expect_err("incomplete");
        assert!(
            matches!(&err, LoraError::IncompleteAdapter { adapter, missing: "lora_up", .. } if adapter == "lora_unet_a"),
            "{err}"
        );
        let err = parse_file(&[("m.lora_B.weight", f32s(&[2, 1]))]).expect_err("incomplete");
        assert!(matches!(&err, LoraError::IncompleteAdapter { missing: "lora_A", .. }), "{err}");
        let err = parse_file(&[
            ("lora_unet_a.lora_mid.weight", f32s(&[1, 1, 3, 3])),
            ("lora_unet_a.lora_up.weight", f32s(&[2, 1])),
        ])
        .expect_err("incomplete");
        assert!(matches!(&err, LoraError::IncompleteAdapter { missing: "lora_down", .. }), "{err}");
    }

    #[test]
    fn rank_mismatches() {
        type Case = (&'static [usize], &'static [usize], Option<&'static [usize]>);
        let cases: [Case; 8] = [
            (&[8, 4], &[3, 8], None),
            (&[8, 4, 3, 3], &[4, 8, 3, 3], None),
            (&[8], &[4, 8], None),
            (&[8, 0], &[0, 8], None),
            (&[8, 4, 1, 1], &[4, 6, 1, 1], Some(&[4, 3, 3, 3])),
            (&[8, 4, 1, 1], &[4, 6, 1, 1], Some(&[2, 4, 3, 3])),
            (&[8, 4, 1, 1], &[4, 6, 1, 1], Some(&[4, 4])),
            (&[8, 4, 1, 1], &[4, 6, 3, 3], Some(&[4, 4, 3, 3])),
        ];
        for (up, down, mid) in cases {
            let mut t = vec![
                ("lora_unet_a.lora_up.weight", f32s(up)),
                ("lora_unet_a.lora_down.weight", f32s(down)),
            ];
            if let Some(mid) = mid {
                t.push(("lora_unet_a.lora_mid.weight", f32s(mid)));
            }
            let err = parse_file(&t).expect_err("rank mismatch");
            assert!(matches!(&err, LoraError::RankMismatch { .. }), "{up:?} {down:?}: {err}");
        }
    }

    #[test]
    fn unsupported_factor_dtype_and_dora() {
        let int = T { dtype: safetensors::Dtype::I32, shape: vec![2, 1], data: vec![0; 8] };
        let err = parse_file(&[
            ("lora_unet_a.lora_up.weight", int),
            ("lora_unet_a.lora_down.weight", f32s(&[1, 2])),
        ])
        .expect_err("int factor");
        assert!(matches!(&err, LoraError::UnsupportedDtype { dtype, .. } if dtype == "I32"));

        let err = parse_file(&[
            ("lora_unet_a.lora_up.weight", f32s(&[2, 1])),
            ("lora_unet_a.lora_down.weight", f32s(&[1, 2])),
            ("lora_unet_a.dora_scale", f32s(&[2, 1])),
        ])
        .expect_err("dora");
        assert!(matches!(&err, LoraError::UnsupportedAdapter { kind, .. } if kind == "DoRA"));
    }

    #[test]
    fn only_other_adapter_kinds_give_an_empty_lora() {
        let f = parse_file(&[
            ("lora_unet_a.lokr_w1", f32s(&[2, 2])),
            ("lora_unet_a.lokr_w2", f32s(&[2, 2])),
            ("b.diff", f32s(&[2])),
        ])
        .expect("parse");
        assert!(f.adapters.is_empty());
        assert_eq!(f.unrecognised, ["b.diff", "lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2"]);
    }

    #[test]
    fn not_a_lora() {
        let err = parse_file(&[("model.diffusion_model.conv_in.weight", f32s(&[2, 2]))])
            .expect_err("plain model");
        assert!(matches!(&err, LoraError::NotALora { .. }), "{err}");
        let err = parse_file(&[
            ("a.lora_up.weight", f32s(&[2, 1])),
            ("a.lora_down.weight", f32s(&[1, 2])),
            ("b.lora_A.weight", f32s(&[1, 2])),
            ("b.lora_B.weight", f32s(&[2, 1])),
        ])
        .expect_err("mixed");
        assert!(
            matches!(&err, LoraError::NotALora { reason, .. } if reason.contains("mixes")),
            "{err}"
        );
        let err = parse_file(&[
            ("a.lora_up.weight", f32s(&[2, 1])),
            ("a.lora.up.weight", f32s(&[2, 1])),
            ("a.lora_down.weight", f32s(&[1, 2])),
        ])
        .expect_err("two ups");
        assert!(matches!(&err, LoraError::NotALora { .. }), "{err}");
    }

    #[test]
    fn stray_tensors_are_reported() {
        let f = parse_file(&[
            ("lora_unet_a.lora_up.weight", f32s(&[2, 1])),
            ("lora_unet_a.lora_down.weight", f32s(&[1, 2])),
            ("emb_params", f32s(&[2])),
            ("x.lora_B.bias", f32s(&[2])),
        ])
        .expect("parse");
        assert_eq!(f.adapters.len(), 1);
        assert_eq!(f.unrecognised, ["emb_params", "x.lora_B.bias"]);
    }
}
