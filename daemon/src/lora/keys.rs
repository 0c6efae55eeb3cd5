//! Matching a LoRA's adapters to the base model's tensors.
//!
//! Every adapter adds to one base tensor `{module}.weight`. Nothing is un-flattened or guessed:
//! the base's own module paths (local names without `.weight`) are indexed under every name a
//! LoRA may give them, and each adapter name is looked up.
//!
//! **Module path variants** of a base tensor: its path; for a UNet (component `unet`, or a lone
//! `model` holding UNet blocks) the same module in the other UNet layout (original SD ↔
//! diffusers, [`sd_unet_to_diffusers`], [`diffusers_unet_to_sd`]); and any of those with a
//! leading `transformer.` removed (the CLIP text encoder of a checkpoint,
//! `cond_stage_model.transformer.text_model.…`, is `text_model.…` to a LoRA).
//!
//! **kohya names** (`lora_unet_…`, see [`super::format::KOHYA_PREFIXES`]): each variant with `.`
//! replaced by `_`, behind the prefixes of its component: `unet` / `transformer` / `prior` →
//! `lora_unet_`, `lora_transformer_`, `lycoris_`; `text_encoder` → `lora_te_`, `lora_te1_`;
//! `text_encoder_N` → `lora_teN_`; a lone `model` → all of them.
//!
//! **Dotted names** (PEFT, diffusers, ComfyUI): `base_model.model.` is dropped; then, in order,
//! (1) a component prefix (`unet.`, `transformer.`, `diffusion_model.`, `text_encoder.`,
//! `text_encoder_2.`, `text_encoder_3.`) picks the component and is removed, (2) the name as it
//! is, in any component, (3) the name without a leading `model.`, in any component. The first
//! of these that names any tensor decides. Old diffusers attention-processor names
//! (`attn1.processor.to_out`) are read as the module they patch (`attn1.to_out.0`).
//!
//! A name that reaches two different tensors is ambiguous and left unmatched, with a warning
//! naming the candidates. PEFT `module@adapter` names ([`super::format`]) match by their module.
//!
//! **Shapes.** The delta is `[up[0], down[1], mid[2], mid[3]]` with a mid, else
//! `[up[0], down[1..]…]`; it must equal the target's shape once trailing 1s are dropped from
//! both (so a 2-D LoRA fits a 1×1 conv and back), else [`LoraError::ShapeMismatch`].
//!
//! **OpenCLIP text encoders** (SD 2.x `cond_stage_model.model.…`, SDXL's second encoder
//! `conditioner.embedders.1.model.…`) are indexed under the Hugging Face CLIP names LoRAs use
//! (kohya `lora_te2_text_model_encoder_layers_N_…`, PEFT `text_encoder_2.text_model.…`), see
//! [`open_clip_to_hf`]. Their attention keeps q, k and v in one fused `attn.in_proj_weight`
//! `[3d, d]`: a `q_proj` adapter adds to its rows `0..d`, `k_proj` to `d..2d`, `v_proj` to
//! `2d..3d` (a [`Match`] with `rows`).
//!
//! **Dtypes.** A target whose dtype no merge can write (int8, packed 4-bit `U8`, fp4/fp6, other
//! fp8 variants) fails the whole match with [`LoraError::UnsupportedDtype`] naming the tensor,
//! before any shape check (a packed weight's shape says nothing about the module).
//!
//! Not handled: LoRAs written for the diffusers names of Flux / SD3 applied to a
//! checkpoint-layout transformer (and back), and OpenCLIP's `text_projection` (stored
//! transposed); their adapters come back unmatched.

use std::collections::{HashMap, HashSet};

use super::format::{KOHYA_PREFIXES, split_adapter_name};
use super::{LoraError, LoraFile, Match, Matched, Rows};
use crate::store::{Dtype, Model, TensorId};

/// What an adapter name reaches: a base tensor, or some rows of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    tensor: TensorId,
    rows: Option<Rows>,
}

/// Whether a LoRA merge can write tensors of `dtype` ([`super::math`]).
pub fn mergeable(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8_E4M3 | Dtype::F8_E5M2
    )
}

/// Matches every adapter of `lora` to the base tensor it adds to (module docs).
pub fn match_to(lora: &LoraFile, base: &Model) -> Result<Matched, LoraError> {
    let index = BaseIndex::build(base);
    let mut matched = Matched::default();
    for (i, adapter) in lora.adapters.iter().enumerate() {
        let candidates = index.resolve(&adapter.name);
        let target = match candidates.as_slice() {
            [] => {
                tracing::debug!(adapter = %adapter.name, "LoRA adapter matches no base tensor");
                matched.unmatched.push(adapter.name.clone());
                continue;
            }
            [one] => *one,
            several => {
                let names: Vec<&str> = several
                    .iter()
                    .filter_map(|t| base.tensor(t.tensor))
                    .map(|t| t.name.as_str())
                    .collect();
                tracing::warn!(
                    adapter = %adapter.name,
                    candidates = ?names,
                    "LoRA adapter name is ambiguous in this base model; left unmatched"
                );
                matched.unmatched.push(adapter.name.clone());
                continue;
            }
        };
        if let Some(t) = base.tensor(target.tensor)
            && !mergeable(t.dtype)
        {
            return Err(LoraError::UnsupportedDtype {
                tensor: t.name.clone(),
                dtype: t.dtype.to_string(),
            });
        }
        check_shape(lora, i, base, target)?;
        matched.matches.push(Match { adapter: i, tensor: target.tensor, rows: target.rows });
    }
    if !matched.unmatched.is_empty() {
        const SHOWN: usize = 20;
        let shown: Vec<&str> = matched.unmatched.iter().take(SHOWN).map(String::as_str).collect();
        tracing::warn!(
            lora = %lora.model.root().display(),
            base = %base.root().display(),
            unmatched = matched.unmatched.len(),
            of = lora.adapters.len(),
            first = ?shown,
            "LoRA adapters match no tensor of the base model"
        );
    }
    Ok(matched)
}

/// The shape an adapter's delta has, from its factors' shapes.
fn delta_shape(up: &[u64], down: &[u64], mid: Option<&[u64]>) -> Option<Vec<u64>> {
    let out = *up.first()?;
    match mid {
        Some(mid) => Some(vec![out, *down.get(1)?, *mid.get(2)?, *mid.get(3)?]),
        None => {
            let mut shape = vec![out];
            shape.extend_from_slice(down.get(1..)?);
            Some(shape)
        }
    }
}

fn trim_ones(shape: &[u64]) -> &[u64] {
    let keep = shape.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    &shape[..keep]
}

fn check_shape(
    lora: &LoraFile,
    adapter: usize,
    base: &Model,
    target: Target,
) -> Result<(), LoraError> {
    let a = &lora.adapters[adapter];
    let (target_name, weight) = match base.tensor(target.tensor) {
        Some(t) => match target.rows {
            // The slice's shape: its rows, and the weight's other dims.
            Some(rows) => {
                let mut shape = vec![rows.len];
                shape.extend(t.shape.iter().skip(1));
                (format!("{} rows {}..{}", t.name, rows.start, rows.end()), shape)
            }
            None => (t.name.clone(), t.shape.clone()),
        },
        None => (String::new(), Vec::new()),
    };
    let shape_of = |id: TensorId| lora.model.tensor(id).map(|t| t.shape.as_slice());
    let delta = match (shape_of(a.up), shape_of(a.down)) {
        (Some(up), Some(down)) => {
            let mid = match a.mid {
                Some(m) => shape_of(m),
                None => Some(&[][..]),
            };
            mid.and_then(|mid| delta_shape(up, down, a.mid.map(|_| mid)))
        }
        _ => None,
    };
    match delta {
        Some(delta) if trim_ones(&delta) == trim_ones(&weight) => Ok(()),
        delta => Err(LoraError::ShapeMismatch {
            adapter: a.name.clone(),
            target: target_name,
            delta: delta.unwrap_or_default(),
            weight,
        }),
    }
}

/// The kohya prefixes a component's modules are named under.
fn kohya_prefixes(component: &str) -> &'static [&'static str] {
    match component {
        "unet" | "transformer" | "prior" => &["lora_unet_", "lora_transformer_", "lycoris_"],
        "text_encoder" => &["lora_te_", "lora_te1_"],
        "text_encoder_2" => &["lora_te2_"],
        "text_encoder_3" => &["lora_te3_"],
        "model" => KOHYA_PREFIXES,
        _ => &[],
    }
}

/// Dotted-name prefixes that pick a component, and the components they pick.
const COMPONENT_HINTS: &[(&str, &[&str])] = &[
    ("unet.", &["unet"]),
    ("transformer.", &["transformer"]),
    ("diffusion_model.", &["unet", "transformer"]),
    ("text_encoder.", &["text_encoder"]),
    ("text_encoder_2.", &["text_encoder_2"]),
    ("text_encoder_3.", &["text_encoder_3"]),
];

/// Local-name prefixes that make a lone `model` component a UNet.
const UNET_BLOCKS: &[&str] = &[
    "input_blocks.",
    "middle_block.",
    "output_blocks.",
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
];

/// Every name a LoRA may give the base's modules.
struct BaseIndex<'m> {
    /// Full kohya name (`lora_unet_down_blocks_0_…`) → targets.
    kohya: HashMap<String, Vec<Target>>,
    /// Dotted module path → (component name, target).
    dotted: HashMap<String, Vec<(&'m str, Target)>>,
}

fn push_unique<T: PartialEq>(v: &mut Vec<T>, x: T) {
    if !v.contains(&x) {
        v.push(x);
    }
}

impl<'m> BaseIndex<'m> {
    fn build(base: &'m Model) -> BaseIndex<'m> {
        let components = base.components();
        // Per component: whether it is a UNet, and which diffusers up blocks have attentions.
        let mut unet_like = vec![false; components.len()];
        let mut up_attn: Vec<HashSet<u64>> = vec![HashSet::new(); components.len()];
        for (id, t) in base.tensors().iter().enumerate() {
            let (Some(c), Some(local)) = (components.get(t.component), base.local_name(id)) else {
                continue;
            };
            if c.name == "unet"
                || (c.name == "model" && UNET_BLOCKS.iter().any(|p| local.starts_with(p)))
            {
                unet_like[t.component] = true;
            }
            if let Some(i) = local
                .strip_prefix("up_blocks.")
                .and_then(|r| r.split_once(".attentions."))
                .and_then(|(i, _)| parse_index(i))
            {
                up_attn[t.component].insert(i);
            }
        }

        let mut index = BaseIndex { kohya: HashMap::new(), dotted: HashMap::new() };
        for (id, t) in base.tensors().iter().enumerate() {
            let Some(c) = components.get(t.component) else { continue };
            let Some(local) = base.local_name(id) else { continue };
            // OpenCLIP modules under their Hugging Face names (possibly row slices).
            for (module, rows) in open_clip_to_hf(local, &t.shape) {
                index.insert(&c.name, &module, Target { tensor: id, rows });
            }
            let Some(module) = local.strip_suffix(".weight") else {
                continue;
            };
            if module.is_empty() {
                continue;
            }
            let mut variants = vec![module.to_string()];
            if unet_like[t.component] {
                let attn = &up_attn[t.component];
                let other = sd_unet_to_diffusers(module)
                    .or_else(|| diffusers_unet_to_sd(module, |i| attn.contains(&i)));
                variants.extend(other);
            }
            for i in 0..variants.len() {
                if let Some(rest) = variants[i].strip_prefix("transformer.") {
                    let rest = rest.to_string();
                    variants.push(rest);
                }
            }
            for v in &variants {
                index.insert(&c.name, v, Target { tensor: id, rows: None });
            }
        }
        index
    }

    /// Indexes `target` (of component `component`) under dotted module path `module` and its
    /// kohya names.
    fn insert(&mut self, component: &'m str, module: &str, target: Target) {
        let flat = module.replace('.', "_");
        for p in kohya_prefixes(component) {
            push_unique(self.kohya.entry(format!("{p}{flat}")).or_default(), target);
        }
        push_unique(self.dotted.entry(module.to_string()).or_default(), (component, target));
    }

    /// The targets an adapter name reaches (module docs); one unless ambiguous or unknown.
    fn resolve(&self, name: &str) -> Vec<Target> {
        let (module, _) = split_adapter_name(name);
        if KOHYA_PREFIXES.iter().any(|p| module.starts_with(p)) {
            return self.kohya.get(module).cloned().unwrap_or_default();
        }
        let module = module.strip_prefix("base_model.model.").unwrap_or(module);
        let module = processor_to_module(module);
        let mut tries: Vec<(Option<&[&str]>, &str)> = Vec::new();
        for (prefix, components) in COMPONENT_HINTS {
            if let Some(rest) = module.strip_prefix(prefix) {
                tries.push((Some(components), rest));
            }
        }
        tries.push((None, &module));
        if let Some(rest) = module.strip_prefix("model.") {
            tries.push((None, rest));
        }
        for (components, path) in tries {
            let Some(entries) = self.dotted.get(path) else { continue };
            let mut found = Vec::new();
            for &(component, target) in entries {
                let accepted = match components {
                    None => true,
                    Some(cs) => component == "model" || cs.contains(&component),
                };
                if accepted {
                    push_unique(&mut found, target);
                }
            }
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }
}

/// The Hugging Face CLIP names (`text_model.encoder.layers.N.…`) of an OpenCLIP text encoder
/// tensor, given its local name (`[model.]transformer.resblocks.N.…`) and shape, each with the
/// rows it covers (`None`: all of it). Empty for anything else.
///
/// | OpenCLIP | Hugging Face |
/// | --- | --- |
/// | `attn.in_proj_weight` `[3d, d]` rows `0..d`, `d..2d`, `2d..3d` | `self_attn.q_proj`, `k_proj`, `v_proj` |
/// | `attn.out_proj.weight` | `self_attn.out_proj` |
/// | `mlp.c_fc.weight` | `mlp.fc1` |
/// | `mlp.c_proj.weight` | `mlp.fc2` |
///
/// These are the renames of diffusers' `convert_open_clip_checkpoint` and kohya's
/// `sdxl_model_util`; norms, embeddings and `text_projection` take no LoRA and are left out.
pub fn open_clip_to_hf(local: &str, shape: &[u64]) -> Vec<(String, Option<Rows>)> {
    let rest = local.strip_prefix("model.").unwrap_or(local);
    let Some(rest) = rest.strip_prefix("transformer.resblocks.") else { return Vec::new() };
    let Some((n, module)) = rest.split_once('.') else { return Vec::new() };
    let Some(n) = parse_index(n) else { return Vec::new() };
    let layer = format!("text_model.encoder.layers.{n}");
    match module {
        "attn.in_proj_weight" => match shape {
            [rows, _] if rows % 3 == 0 && *rows > 0 => {
                let d = rows / 3;
                ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .zip(0u64..)
                    .map(|(p, i)| {
                        (format!("{layer}.self_attn.{p}"), Some(Rows { start: i * d, len: d }))
                    })
                    .collect()
            }
            _ => Vec::new(),
        },
        "attn.out_proj.weight" => vec![(format!("{layer}.self_attn.out_proj"), None)],
        "mlp.c_fc.weight" => vec![(format!("{layer}.mlp.fc1"), None)],
        "mlp.c_proj.weight" => vec![(format!("{layer}.mlp.fc2"), None)],
        _ => Vec::new(),
    }
}

/// An old diffusers attention-processor LoRA name as the module it patches:
/// `….attn1.processor.to_q` → `….attn1.to_q`, `….processor.to_out` → `….to_out.0`.
fn processor_to_module(name: &str) -> String {
    match name.rsplit_once(".processor.") {
        Some((head, "to_out")) => format!("{head}.to_out.0"),
        Some((head, tail)) if !tail.contains('.') => format!("{head}.{tail}"),
        _ => name.to_string(),
    }
}

/// An all-digit path segment as a number (no sign, no overflow).
fn parse_index(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Joins a translated prefix and the untranslated rest of a path.
fn join(prefix: String, rest: &[&str]) -> String {
    if rest.is_empty() { prefix } else { format!("{prefix}.{}", rest.join(".")) }
}

/// Resnet sub-modules: (original SD, diffusers).
const RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

fn resnet_sd_to_diffusers(prefix: String, rest: &[&str]) -> Option<String> {
    for (sd, diffusers) in RESNET {
        let n = sd.split('.').count();
        if rest.len() >= n && rest[..n].join(".") == *sd {
            return Some(join(format!("{prefix}.{diffusers}"), &rest[n..]));
        }
    }
    None
}

fn resnet_diffusers_to_sd(prefix: String, rest: &[&str]) -> Option<String> {
    let (first, tail) = rest.split_first()?;
    let (sd, _) = RESNET.iter().find(|(_, d)| d == first)?;
    Some(join(format!("{prefix}.{sd}"), tail))
}

/// A module path of an original-SD (LDM / SGM) UNet as diffusers names it, for SD 1.x, 2.x and
/// SDXL UNets; `None` for a path outside the known blocks.
///
/// `input_blocks.{3i+j+1}.0` ↔ `down_blocks.{i}.resnets.{j}`, `….1` ↔ `….attentions.{j}`,
/// `input_blocks.{3(i+1)}.0.op` ↔ `down_blocks.{i}.downsamplers.0.conv`, `middle_block.{0,1,2}`
/// ↔ `mid_block.{resnets.0, attentions.0, resnets.1}`, `output_blocks.{3i+j}.0` ↔
/// `up_blocks.{i}.resnets.{j}`, `….1` ↔ `….attentions.{j}`, `output_blocks.{3i+2}.{1|2}.conv` ↔
/// `up_blocks.{i}.upsamplers.0.conv`, `conv_in` / `conv_norm_out` / `conv_out` ↔
/// `input_blocks.0.0` / `out.0` / `out.2`, `time_embed.{0,2}` ↔ `time_embedding.linear_{1,2}`,
/// `label_emb.0.{0,2}` ↔ `add_embedding.linear_{1,2}`; resnet insides
/// `in_layers.{0,2}` ↔ `norm1`/`conv1`, `out_layers.{0,3}` ↔ `norm2`/`conv2`, `emb_layers.1` ↔
/// `time_emb_proj`, `skip_connection` ↔ `conv_shortcut`. Attention insides keep their names.
pub fn sd_unet_to_diffusers(module: &str) -> Option<String> {
    let seg: Vec<&str> = module.split('.').collect();
    match seg.as_slice() {
        ["time_embed", "0", rest @ ..] => Some(join("time_embedding.linear_1".into(), rest)),
        ["time_embed", "2", rest @ ..] => Some(join("time_embedding.linear_2".into(), rest)),
        ["label_emb", "0", "0", rest @ ..] => Some(join("add_embedding.linear_1".into(), rest)),
        ["label_emb", "0", "2", rest @ ..] => Some(join("add_embedding.linear_2".into(), rest)),
        ["out", "0", rest @ ..] => Some(join("conv_norm_out".into(), rest)),
        ["out", "2", rest @ ..] => Some(join("conv_out".into(), rest)),
        ["input_blocks", "0", "0", rest @ ..] => Some(join("conv_in".into(), rest)),
        ["input_blocks", n, k, rest @ ..] => {
            let n = parse_index(n)?.checked_sub(1)?;
            let (i, j) = (n / 3, n % 3);
            match (j, *k, rest) {
                (0 | 1, "0", _) => {
                    resnet_sd_to_diffusers(format!("down_blocks.{i}.resnets.{j}"), rest)
                }
                (0 | 1, "1", _) => Some(join(format!("down_blocks.{i}.attentions.{j}"), rest)),
                (2, "0", ["op", tail @ ..]) => {
                    Some(join(format!("down_blocks.{i}.downsamplers.0.conv"), tail))
                }
                _ => None,
            }
        }
        ["middle_block", "0", rest @ ..] => {
            resnet_sd_to_diffusers("mid_block.resnets.0".into(), rest)
        }
        ["middle_block", "1", rest @ ..] => Some(join("mid_block.attentions.0".into(), rest)),
        ["middle_block", "2", rest @ ..] => {
            resnet_sd_to_diffusers("mid_block.resnets.1".into(), rest)
        }
        ["output_blocks", n, k, rest @ ..] => {
            let n = parse_index(n)?;
            let (i, j) = (n / 3, n % 3);
            match (j, *k, rest) {
                (_, "0", _) => resnet_sd_to_diffusers(format!("up_blocks.{i}.resnets.{j}"), rest),
                (2, "1" | "2", ["conv", tail @ ..]) => {
                    Some(join(format!("up_blocks.{i}.upsamplers.0.conv"), tail))
                }
                // Only upsamplers have a `conv` child at this depth.
                (_, "1", ["conv", ..]) => None,
                (_, "1", _) => Some(join(format!("up_blocks.{i}.attentions.{j}"), rest)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The inverse of [`sd_unet_to_diffusers`]. Where an up block's upsampler sits depends on
/// whether that block has attentions (`output_blocks.{3i+2}.2.conv` after a resnet and an
/// attention, `.1.conv` after a resnet alone): `up_block_has_attention(i)` says.
pub fn diffusers_unet_to_sd(
    module: &str,
    up_block_has_attention: impl Fn(u64) -> bool,
) -> Option<String> {
    let seg: Vec<&str> = module.split('.').collect();
    let below = |j: &str, limit: u64| parse_index(j).filter(|&j| j < limit);
    match seg.as_slice() {
        ["time_embedding", "linear_1", rest @ ..] => Some(join("time_embed.0".into(), rest)),
        ["time_embedding", "linear_2", rest @ ..] => Some(join("time_embed.2".into(), rest)),
        ["add_embedding", "linear_1", rest @ ..] => Some(join("label_emb.0.0".into(), rest)),
        ["add_embedding", "linear_2", rest @ ..] => Some(join("label_emb.0.2".into(), rest)),
        ["conv_norm_out", rest @ ..] => Some(join("out.0".into(), rest)),
        ["conv_out", rest @ ..] => Some(join("out.2".into(), rest)),
        ["conv_in", rest @ ..] => Some(join("input_blocks.0.0".into(), rest)),
        ["down_blocks", i, kind, j, rest @ ..] => {
            let i = parse_index(i)?;
            let base = i.checked_mul(3)?;
            match (*kind, rest) {
                ("resnets", _) => {
                    let n = base.checked_add(below(j, 2)? + 1)?;
                    resnet_diffusers_to_sd(format!("input_blocks.{n}.0"), rest)
                }
                ("attentions", _) => {
                    let n = base.checked_add(below(j, 2)? + 1)?;
                    Some(join(format!("input_blocks.{n}.1"), rest))
                }
                ("downsamplers", ["conv", tail @ ..]) if *j == "0" => {
                    let n = base.checked_add(3)?;
                    Some(join(format!("input_blocks.{n}.0.op"), tail))
                }
                _ => None,
            }
        }
        ["mid_block", "resnets", j, rest @ ..] => {
            let n = below(j, 2)? * 2;
            resnet_diffusers_to_sd(format!("middle_block.{n}"), rest)
        }
        ["mid_block", "attentions", "0", rest @ ..] => Some(join("middle_block.1".into(), rest)),
        ["up_blocks", i, kind, j, rest @ ..] => {
            let i = parse_index(i)?;
            let base = i.checked_mul(3)?;
            match (*kind, rest) {
                ("resnets", _) => {
                    let n = base.checked_add(below(j, 3)?)?;
                    resnet_diffusers_to_sd(format!("output_blocks.{n}.0"), rest)
                }
                ("attentions", _) => {
                    let n = base.checked_add(below(j, 3)?)?;
                    Some(join(format!("output_blocks.{n}.1"), rest))
                }
                ("upsamplers", ["conv", tail @ ..]) if *j == "0" => {
                    let n = base.checked_add(2)?;
                    let k = if up_block_has_attention(i) { 2 } else { 1 };
                    Some(join(format!("output_blocks.{n}.{k}.conv"), tail))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::super::format::test_support::{T, f32s, write};
    use super::super::format::{load, parse};
    use super::*;

    /// (original SD, diffusers) for SD 1.x.
    const SD1_PAIRS: &[(&str, &str)] = &[
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
        ("input_blocks.1.0.in_layers.0", "down_blocks.0.resnets.0.norm1"),
        ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks.1.0.emb_layers.1", "down_blocks.0.resnets.0.time_emb_proj"),
        ("input_blocks.1.0.out_layers.0", "down_blocks.0.resnets.0.norm2"),
        ("input_blocks.1.0.out_layers.3", "down_blocks.0.resnets.0.conv2"),
        ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
        (
            "input_blocks.2.1.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
        ),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        (
            "input_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
        ),
        ("input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
        ("input_blocks.10.0.in_layers.2", "down_blocks.3.resnets.0.conv1"),
        ("input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
        ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
        ("middle_block.1.proj_out", "mid_block.attentions.0.proj_out"),
        ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
        ("output_blocks.0.0.in_layers.2", "up_blocks.0.resnets.0.conv1"),
        ("output_blocks.2.0.skip_connection", "up_blocks.0.resnets.2.conv_shortcut"),
        ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.3.1.proj_in", "up_blocks.1.attentions.0.proj_in"),
        (
            "output_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
        ),
        ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks.8.2.conv", "up_blocks.2.upsamplers.0.conv"),
        ("output_blocks.11.1.norm", "up_blocks.3.attentions.2.norm"),
        ("output_blocks.11.0.out_layers.0", "up_blocks.3.resnets.2.norm2"),
    ];

    /// SDXL: down block 0 and up block 2 have no attentions, 3 blocks each way, label_emb.
    const SDXL_PAIRS: &[(&str, &str)] = &[
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.4.1.proj_in", "down_blocks.1.attentions.0.proj_in"),
        (
            "input_blocks.8.1.transformer_blocks.9.attn1.to_k",
            "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_k",
        ),
        (
            "middle_block.1.transformer_blocks.3.attn2.to_v",
            "mid_block.attentions.0.transformer_blocks.3.attn2.to_v",
        ),
        ("output_blocks.0.1.proj_out", "up_blocks.0.attentions.0.proj_out"),
        ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ];

    #[test]
    fn sd1_names_translate_both_ways() {
        // SD 1.x: up block 0 has no attentions.
        let attn = |i: u64| i > 0;
        for (sd, diffusers) in SD1_PAIRS {
            assert_eq!(sd_unet_to_diffusers(sd).as_deref(), Some(*diffusers), "{sd}");
            assert_eq!(diffusers_unet_to_sd(diffusers, attn).as_deref(), Some(*sd), "{diffusers}");
        }
    }

    #[test]
    fn sdxl_names_translate_both_ways() {
        // SDXL: up blocks 0 and 1 have attentions, 2 does not.
        let attn = |i: u64| i < 2;
        for (sd, diffusers) in SDXL_PAIRS {
            assert_eq!(sd_unet_to_diffusers(sd).as_deref(), Some(*diffusers), "{sd}");
            assert_eq!(diffusers_unet_to_sd(diffusers, attn).as_deref(), Some(*sd), "{diffusers}");
        }
    }

    #[test]
    fn untranslatable_names() {
        let attn = |_| true;
        for sd in [
            "input_blocks.0.1",
            "input_blocks.3.1.proj_in",
            "input_blocks.x.0.in_layers.2",
            "input_blocks.+4.0.in_layers.2",
            "input_blocks.99999999999999999999999.0",
            "input_blocks.1.0.in_layers.1",
            "middle_block.3.proj_in",
            "output_blocks.1.1.conv",
            "output_blocks.2.3.conv",
            "text_model.encoder.layers.0.mlp.fc1",
            "encoder.down.0.block.0.conv1",
            "",
        ] {
            assert_eq!(sd_unet_to_diffusers(sd), None, "{sd}");
        }
        for d in [
            "down_blocks.0.resnets.2.conv1",
            "down_blocks.0.attentions.2.proj_in",
            "down_blocks.0.downsamplers.1.conv",
            "down_blocks.0.resnets.0.conv3",
            "down_blocks.18446744073709551615.resnets.0.conv1",
            "mid_block.resnets.2.conv1",
            "mid_block.attentions.1.proj_in",
            "up_blocks.0.resnets.3.conv1",
            "up_blocks.0.upsamplers.0.proj",
            "encoder.down_blocks.0.resnets.0.conv1",
            "text_model.encoder.layers.0.mlp.fc1",
        ] {
            assert_eq!(diffusers_unet_to_sd(d, attn), None, "{d}");
        }
        assert_eq!(processor_to_module("a.attn1.processor.to_out"), "a.attn1.to_out.0");
        assert_eq!(processor_to_module("a.attn1.processor.to_k"), "a.attn1.to_k");
        assert_eq!(processor_to_module("a.attn1.to_k"), "a.attn1.to_k");
    }

    // A tiny SD 1.x-like base: (diffusers UNet name, SD name, shape) for the UNet and
    // (transformers name) for the text encoder.
    const UNET: &[(&str, &str, &[usize])] = &[
        ("conv_in", "input_blocks.0.0", &[4, 4, 3, 3]),
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", &[4, 4, 3, 3]),
        ("down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in", &[4, 4, 1, 1]),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            &[4, 4],
        ),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
            &[4, 4],
        ),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv", &[4, 4, 3, 3]),
        ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out", &[4, 4, 1, 1]),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv", &[4, 4, 3, 3]),
    ];
    const TE: &[(&str, &[usize])] = &[
        ("text_model.encoder.layers.0.self_attn.q_proj", &[6, 6]),
        ("text_model.encoder.layers.0.mlp.fc1", &[12, 6]),
    ];

    fn weights(names: impl IntoIterator<Item = (String, &'static [usize])>) -> Vec<(String, T)> {
        names
            .into_iter()
            .flat_map(|(n, s)| {
                [(format!("{n}.weight"), f32s(s)), (format!("{n}.bias"), f32s(&s[..1]))]
            })
            .collect()
    }

    fn write_owned(path: &Path, tensors: Vec<(String, T)>) {
        let borrowed: Vec<(&str, T)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        write(path, &borrowed);
    }

    /// A diffusers folder with `unet` and `text_encoder` (and `text_encoder_2`, a copy).
    fn diffusers_base(dir: &Path, with_te2: bool) -> Arc<Model> {
        let root = dir.join("pipe");
        let mut index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
        });
        let mut components = vec!["unet", "text_encoder"];
        if with_te2 {
            index["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModel"]);
            components.push("text_encoder_2");
        }
        for c in components {
            std::fs::create_dir_all(root.join(c)).expect("mkdir");
            let (file, tensors) = if c == "unet" {
                (
                    "diffusion_pytorch_model.safetensors",
                    weights(UNET.iter().map(|(d, _, s)| (d.to_string(), *s))),
                )
            } else {
                ("model.safetensors", weights(TE.iter().map(|(n, s)| (n.to_string(), *s))))
            };
            write_owned(&root.join(c).join(file), tensors);
        }
        std::fs::write(root.join("model_index.json"), index.to_string()).expect("index");
        Arc::new(Model::open(&root).expect("open diffusers base"))
    }

    /// The same model as an original-SD single-file checkpoint.
    fn checkpoint_base(dir: &Path) -> Arc<Model> {
        let path = dir.join("sd.safetensors");
        let mut tensors =
            weights(UNET.iter().map(|(_, sd, s)| (format!("model.diffusion_model.{sd}"), *s)));
        tensors.extend(weights(
            TE.iter().map(|(n, s)| (format!("cond_stage_model.transformer.{n}"), *s)),
        ));
        tensors.extend(weights([(
            "first_stage_model.decoder.conv_in".to_string(),
            &[3, 4, 3, 3][..],
        )]));
        write_owned(&path, tensors);
        Arc::new(Model::open(&path).expect("open checkpoint"))
    }

    fn lora(dir: &Path, tensors: Vec<(String, T)>) -> LoraFile {
        let path = dir.join("lora.safetensors");
        write_owned(&path, tensors);
        load(&path).expect("parse lora")
    }

    /// A rank-2 LoRA for `name` with factor suffixes (`up`, `down`) and a delta of `shape`.
    fn factors(name: &str, (up, down): (&str, &str), shape: &[usize]) -> Vec<(String, T)> {
        let mut up_shape = vec![shape[0], 2];
        let mut down_shape = vec![2];
        down_shape.extend_from_slice(&shape[1..]);
        if shape.len() == 4 {
            up_shape.extend([1, 1]);
        }
        vec![
            (format!("{name}.{up}"), f32s(&up_shape)),
            (format!("{name}.{down}"), f32s(&down_shape)),
        ]
    }

    const KOHYA: (&str, &str) = ("lora_up.weight", "lora_down.weight");
    const PEFT: (&str, &str) = ("lora_B.weight", "lora_A.weight");

    /// Matches, as (adapter name, base tensor name), sorted.
    fn pairs(lora: &LoraFile, base: &Model) -> (Vec<(String, String)>, Vec<String>) {
        let m = match_to(lora, base).expect("match");
        let mut out: Vec<(String, String)> = m
            .matches
            .iter()
            .map(|x| (lora.adapters[x.adapter].name.clone(), base.tensors()[x.tensor].name.clone()))
            .collect();
        out.sort();
        let mut unmatched = m.unmatched;
        unmatched.sort();
        (out, unmatched)
    }

    fn kohya_lora(dir: &Path) -> LoraFile {
        let mut t = Vec::new();
        // diffusers-named UNet modules, one SD-named, CLIP text encoder, one unknown.
        t.extend(factors("lora_unet_down_blocks_0_attentions_0_proj_in", KOHYA, &[4, 4]));
        t.extend(factors(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
            KOHYA,
            &[4, 4],
        ));
        t.extend(factors("lora_unet_down_blocks_0_resnets_0_conv1", KOHYA, &[4, 4, 3, 3]));
        t.extend(factors("lora_unet_up_blocks_0_upsamplers_0_conv", KOHYA, &[4, 4, 3, 3]));
        t.extend(factors("lora_unet_output_blocks_5_2_conv", KOHYA, &[4, 4, 3, 3]));
        t.extend(factors("lora_te_text_model_encoder_layers_0_self_attn_q_proj", KOHYA, &[6, 6]));
        t.extend(factors("lora_unet_nowhere_proj", KOHYA, &[4, 4]));
        lora(dir, t)
    }

    #[test]
    fn kohya_matches_both_base_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = kohya_lora(dir.path());

        let base = diffusers_base(dir.path(), false);
        let (m, unmatched) = pairs(&l, &base);
        assert_eq!(
            m,
            [
                (
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                    "text_model.encoder.layers.0.self_attn.q_proj.weight"
                ),
                (
                    "lora_unet_down_blocks_0_attentions_0_proj_in",
                    "down_blocks.0.attentions.0.proj_in.weight"
                ),
                (
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
                ),
                ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight"),
                ("lora_unet_output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv.weight"),
                ("lora_unet_up_blocks_0_upsamplers_0_conv", "up_blocks.0.upsamplers.0.conv.weight"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(unmatched, ["lora_unet_nowhere_proj"]);

        let base = checkpoint_base(dir.path());
        let (m, unmatched) = pairs(&l, &base);
        assert_eq!(
            m,
            [
                ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
                ("lora_unet_down_blocks_0_attentions_0_proj_in", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"),
                ("lora_unet_down_blocks_0_resnets_0_conv1", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"),
                ("lora_unet_output_blocks_5_2_conv", "model.diffusion_model.output_blocks.5.2.conv.weight"),
                ("lora_unet_up_blocks_0_upsamplers_0_conv", "model.diffusion_model.output_blocks.2.1.conv.weight"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(unmatched, ["lora_unet_nowhere_proj"]);
    }

    #[test]
    fn peft_matches_both_base_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = Vec::new();
        t.extend(factors(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            PEFT,
            &[4, 4],
        ));
        t.extend(factors("base_model.model.up_blocks.1.attentions.0.proj_out", PEFT, &[4, 4]));
        t.extend(factors("text_encoder.text_model.encoder.layers.0.mlp.fc1", PEFT, &[12, 6]));
        t.extend(factors("diffusion_model.input_blocks.0.0", PEFT, &[4, 4, 3, 3]));
        t.extend(factors("unet.text_model.encoder.layers.0.mlp.fc1", PEFT, &[12, 6]));
        let l = lora(dir.path(), t);

        let base = diffusers_base(dir.path(), false);
        let (m, unmatched) = pairs(&l, &base);
        let got: Vec<&str> = m.iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(
            got,
            [
                "up_blocks.1.attentions.0.proj_out.weight",
                "conv_in.weight",
                "text_model.encoder.layers.0.mlp.fc1.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ]
        );
        // A prefix picks the component: a text encoder module under `unet.` is not found.
        assert_eq!(unmatched, ["unet.text_model.encoder.layers.0.mlp.fc1"]);

        let base = checkpoint_base(dir.path());
        let (m, _) = pairs(&l, &base);
        let got: Vec<&str> = m.iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(
            got,
            [
                "model.diffusion_model.output_blocks.3.1.proj_out.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            ]
        );
    }

    #[test]
    fn ambiguous_and_unknown_names_are_unmatched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = Vec::new();
        t.extend(factors("text_model.encoder.layers.0.mlp.fc1", PEFT, &[12, 6]));
        t.extend(factors("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", PEFT, &[12, 6]));
        t.extend(factors("vae.decoder.conv_in", PEFT, &[4, 4]));
        let l = lora(dir.path(), t);
        let base = diffusers_base(dir.path(), true);
        let (m, unmatched) = pairs(&l, &base);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1");
        assert_eq!(unmatched, ["text_model.encoder.layers.0.mlp.fc1", "vae.decoder.conv_in"]);
    }

    #[test]
    fn peft_adapters_with_names_match_the_same_module() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = Vec::new();
        t.extend(factors("unet.conv_in", ("lora_B.a.weight", "lora_A.a.weight"), &[4, 4, 3, 3]));
        t.extend(factors("unet.conv_in", ("lora_B.b.weight", "lora_A.b.weight"), &[4, 4, 3, 3]));
        let l = lora(dir.path(), t);
        let base = checkpoint_base(dir.path());
        let (m, unmatched) = pairs(&l, &base);
        assert!(unmatched.is_empty());
        assert_eq!(
            m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>(),
            [
                ("unet.conv_in@a", "model.diffusion_model.input_blocks.0.0.weight"),
                ("unet.conv_in@b", "model.diffusion_model.input_blocks.0.0.weight"),
            ]
        );
    }

    #[test]
    fn shapes_are_checked_with_1x1_convs_either_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = diffusers_base(dir.path(), false);
        // proj_in is a 1x1 conv [4,4,1,1] in this base: a linear LoRA fits; to_q is linear
        // [4,4]: a 1x1-conv LoRA fits.
        let mut t = factors("lora_unet_down_blocks_0_attentions_0_proj_in", KOHYA, &[4, 4]);
        t.extend(factors(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            KOHYA,
            &[4, 4, 1, 1],
        ));
        // A LoCon with a mid factor on a 3x3 conv.
        t.push(("lora_unet_conv_in.lora_up.weight".into(), f32s(&[4, 2, 1, 1])));
        t.push(("lora_unet_conv_in.lora_mid.weight".into(), f32s(&[2, 2, 3, 3])));
        t.push(("lora_unet_conv_in.lora_down.weight".into(), f32s(&[2, 4, 1, 1])));
        let l = lora(dir.path(), t);
        let (m, unmatched) = pairs(&l, &base);
        assert_eq!(m.len(), 3);
        assert!(unmatched.is_empty());

        for (name, shape) in [
            ("lora_unet_down_blocks_0_attentions_0_proj_in", &[5, 4][..]),
            ("lora_unet_conv_in", &[4, 4][..]),
            ("lora_unet_down_blocks_0_resnets_0_conv1", &[4, 4, 1, 1][..]),
        ] {
            let sub = tempfile::tempdir().expect("tempdir");
            let l = lora(sub.path(), factors(name, KOHYA, shape));
            let err = match_to(&l, &base).expect_err("shape mismatch");
            assert!(
                matches!(&err, LoraError::ShapeMismatch { adapter, target, .. }
                    if adapter == name && target.ends_with(".weight")),
                "{err}"
            );
        }
    }

    #[test]
    fn sdxl_upsampler_follows_attention_presence() {
        let dir = tempfile::tempdir().expect("tempdir");
        // SDXL-like checkpoint: up block 0 has attentions, so its upsampler is at .2.
        let path = dir.path().join("xl.safetensors");
        write_owned(
            &path,
            weights([
                ("model.diffusion_model.output_blocks.0.1.proj_in".to_string(), &[4, 4][..]),
                ("model.diffusion_model.output_blocks.2.2.conv".to_string(), &[4, 4, 3, 3][..]),
                (
                    "model.diffusion_model.output_blocks.8.0.in_layers.2".to_string(),
                    &[4, 4, 3, 3][..],
                ),
                ("model.diffusion_model.label_emb.0.0".to_string(), &[8, 4][..]),
                (
                    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1"
                        .to_string(),
                    &[12, 6][..],
                ),
            ]),
        );
        let base = Model::open(&path).expect("open");
        let mut t = factors("lora_unet_up_blocks_0_upsamplers_0_conv", KOHYA, &[4, 4, 3, 3]);
        t.extend(factors("lora_unet_add_embedding_linear_1", KOHYA, &[8, 4]));
        t.extend(factors("lora_unet_up_blocks_2_resnets_1_conv1", KOHYA, &[4, 4, 3, 3]));
        t.extend(factors("lora_te1_text_model_encoder_layers_0_mlp_fc1", KOHYA, &[12, 6]));
        let l = lora(dir.path(), t);
        let (m, unmatched) = pairs(&l, &base);
        assert_eq!(unmatched, ["lora_unet_up_blocks_2_resnets_1_conv1"]);
        assert_eq!(m.len(), 3);

        // The diffusers-layout SDXL UNet in a bare file, matched by an SD-named LoRA.
        let path = dir.path().join("unet.safetensors");
        write_owned(
            &path,
            weights([
                ("up_blocks.0.attentions.0.proj_in".to_string(), &[4, 4][..]),
                ("up_blocks.0.upsamplers.0.conv".to_string(), &[4, 4, 3, 3][..]),
                ("up_blocks.2.resnets.0.conv1".to_string(), &[4, 4, 3, 3][..]),
                ("up_blocks.2.upsamplers.0.conv".to_string(), &[4, 4, 3, 3][..]),
            ]),
        );
        let base = Model::open(&path).expect("open");
        let mut t = factors("lora_unet_output_blocks_2_2_conv", KOHYA, &[4, 4, 3, 3]);
        t.extend(factors("lora_unet_output_blocks_8_1_conv", KOHYA, &[4, 4, 3, 3]));
        t.extend(factors("lora_unet_output_blocks_6_0_in_layers_2", KOHYA, &[4, 4, 3, 3]));
        let sub = tempfile::tempdir().expect("tempdir");
        let l = lora(sub.path(), t);
        let (m, unmatched) = pairs(&l, &base);
        assert!(unmatched.is_empty(), "{unmatched:?}");
        assert_eq!(
            m.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(),
            [
                "up_blocks.0.upsamplers.0.conv.weight",
                "up_blocks.2.resnets.0.conv1.weight",
                "up_blocks.2.upsamplers.0.conv.weight",
            ]
        );
    }

    #[test]
    fn open_clip_names_map_to_hugging_face_names() {
        let rows = |start, len| Some(Rows { start, len });
        assert_eq!(
            open_clip_to_hf("model.transformer.resblocks.11.attn.in_proj_weight", &[30, 10]),
            [
                ("text_model.encoder.layers.11.self_attn.q_proj".to_string(), rows(0, 10)),
                ("text_model.encoder.layers.11.self_attn.k_proj".to_string(), rows(10, 10)),
                ("text_model.encoder.layers.11.self_attn.v_proj".to_string(), rows(20, 10)),
            ]
        );
        for (local, hf) in [
            ("transformer.resblocks.0.attn.out_proj.weight", "self_attn.out_proj"),
            ("model.transformer.resblocks.0.mlp.c_fc.weight", "mlp.fc1"),
            ("model.transformer.resblocks.0.mlp.c_proj.weight", "mlp.fc2"),
        ] {
            assert_eq!(
                open_clip_to_hf(local, &[4, 4]),
                [(format!("text_model.encoder.layers.0.{hf}"), None)],
                "{local}"
            );
        }
        for (local, shape) in [
            ("model.transformer.resblocks.0.attn.in_proj_weight", &[31, 10][..]),
            ("model.transformer.resblocks.0.attn.in_proj_weight", &[30][..]),
            ("model.transformer.resblocks.0.attn.in_proj_bias", &[30][..]),
            ("model.transformer.resblocks.0.ln_1.weight", &[10][..]),
            ("model.transformer.resblocks.x.mlp.c_fc.weight", &[4, 4][..]),
            ("model.token_embedding.weight", &[4, 4][..]),
            ("text_model.encoder.layers.0.mlp.fc1.weight", &[4, 4][..]),
        ] {
            assert!(open_clip_to_hf(local, shape).is_empty(), "{local}");
        }
    }

    /// An SDXL checkpoint whose second text encoder is in OpenCLIP layout (d = 6), with a
    /// CLIP-L first encoder; and an SD 2.x-style OpenCLIP `cond_stage_model.model.`.
    fn open_clip_bases(dir: &Path) -> (Model, Model) {
        let te2 = "conditioner.embedders.1.model.transformer.resblocks.0";
        let mut t = vec![
            (format!("{te2}.attn.in_proj_weight"), f32s(&[18, 6])),
            (format!("{te2}.attn.in_proj_bias"), f32s(&[18])),
            (format!("{te2}.ln_1.weight"), f32s(&[6])),
        ];
        t.extend(weights([
            (format!("{te2}.attn.out_proj"), &[6, 6][..]),
            (format!("{te2}.mlp.c_fc"), &[24, 6][..]),
            (format!("{te2}.mlp.c_proj"), &[6, 24][..]),
            (
                "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj"
                    .to_string(),
                &[6, 6][..],
            ),
            ("model.diffusion_model.input_blocks.0.0".to_string(), &[4, 4, 3, 3][..]),
        ]));
        let xl = dir.join("xl.safetensors");
        write_owned(&xl, t);
        let sd2 = dir.join("sd2.safetensors");
        write_owned(
            &sd2,
            vec![
                (
                    "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight".into(),
                    f32s(&[12, 4]),
                ),
                ("model.diffusion_model.input_blocks.0.0.weight".into(), f32s(&[4, 4, 3, 3])),
            ],
        );
        (Model::open(&xl).expect("open xl"), Model::open(&sd2).expect("open sd2"))
    }

    #[test]
    fn te2_loras_reach_an_open_clip_base_through_row_slices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (xl, sd2) = open_clip_bases(dir.path());
        let mut t = Vec::new();
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.extend(factors(
                &format!("lora_te2_text_model_encoder_layers_0_self_attn_{p}"),
                KOHYA,
                &[6, 6],
            ));
        }
        t.extend(factors("lora_te2_text_model_encoder_layers_0_mlp_fc1", KOHYA, &[24, 6]));
        t.extend(factors("lora_te2_text_model_encoder_layers_0_mlp_fc2", KOHYA, &[6, 24]));
        t.extend(factors("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", KOHYA, &[6, 6]));
        // No such layer.
        t.extend(factors("lora_te2_text_model_encoder_layers_1_self_attn_q_proj", KOHYA, &[6, 6]));
        let l = lora(dir.path(), t);
        let m = match_to(&l, &xl).expect("match");
        let got: Vec<(&str, &str, Option<Rows>)> = m
            .matches
            .iter()
            .map(|x| {
                let name = xl.tensors()[x.tensor].name.as_str();
                (
                    l.adapters[x.adapter].name.as_str(),
                    name.rsplit_once("resblocks.0.").map_or(name, |(_, r)| r),
                    x.rows,
                )
            })
            .collect();
        let rows = |start, len| Some(Rows { start, len });
        let mut got = got;
        got.sort();
        assert_eq!(
            got,
            [
                (
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                    None
                ),
                ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "mlp.c_fc.weight", None),
                ("lora_te2_text_model_encoder_layers_0_mlp_fc2", "mlp.c_proj.weight", None),
                (
                    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
                    "attn.in_proj_weight",
                    rows(6, 6)
                ),
                (
                    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
                    "attn.out_proj.weight",
                    None
                ),
                (
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                    "attn.in_proj_weight",
                    rows(0, 6)
                ),
                (
                    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj",
                    "attn.in_proj_weight",
                    rows(12, 6)
                ),
            ]
        );
        assert_eq!(m.unmatched, ["lora_te2_text_model_encoder_layers_1_self_attn_q_proj"]);

        // PEFT names the same modules.
        let sub = tempfile::tempdir().expect("tempdir");
        let l = lora(
            sub.path(),
            factors("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", PEFT, &[6, 6]),
        );
        let m = match_to(&l, &xl).expect("match peft");
        assert_eq!(m.matches.len(), 1, "{:?}", m.unmatched);
        assert!(xl.tensors()[m.matches[0].tensor].name.ends_with("attn.in_proj_weight"));
        assert_eq!(m.matches[0].rows, rows(12, 6));

        // SD 2.x: the one text encoder is OpenCLIP, LoRAs call it lora_te_.
        let sub = tempfile::tempdir().expect("tempdir");
        let l = lora(
            sub.path(),
            factors("lora_te_text_model_encoder_layers_3_self_attn_k_proj", KOHYA, &[4, 4]),
        );
        let m = match_to(&l, &sd2).expect("match sd2");
        assert_eq!(m.matches.len(), 1, "{:?}", m.unmatched);
        assert_eq!(m.matches[0].rows, rows(4, 4));

        // A q delta that is not d × d is refused, naming the slice.
        let sub = tempfile::tempdir().expect("tempdir");
        let l = lora(
            sub.path(),
            factors("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", KOHYA, &[5, 6]),
        );
        match match_to(&l, &xl).expect_err("shape") {
            LoraError::ShapeMismatch { target, delta, weight, .. } => {
                assert!(target.ends_with("attn.in_proj_weight rows 0..6"), "{target}");
                assert_eq!((delta, weight), (vec![5, 6], vec![6, 6]));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn quantized_targets_are_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (dtype, name, shape) in [
            (safetensors::Dtype::I8, "I8", vec![8usize, 4]),
            (safetensors::Dtype::U8, "U8", vec![16, 1]),
        ] {
            let path = dir.path().join(format!("{name}.safetensors"));
            let n: usize = shape.iter().product();
            let w = T { dtype, shape: shape.clone(), data: vec![0; n] };
            write(&path, &[("blocks.0.proj.weight", w), ("blocks.0.proj.bias", f32s(&[8]))]);
            let base = Model::open(&path).expect("open");
            let sub = tempfile::tempdir().expect("tempdir");
            let l = lora(sub.path(), factors("lora_unet_blocks_0_proj", KOHYA, &[8, 4]));
            match match_to(&l, &base).expect_err("refused") {
                LoraError::UnsupportedDtype { tensor, dtype: d } => {
                    assert_eq!((tensor.as_str(), d.as_str()), ("blocks.0.proj.weight", name));
                }
                other => panic!("{name}: {other}"),
            }
        }
    }

    #[test]
    fn parse_of_an_open_model_matches_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.safetensors");
        write_owned(&path, factors("lora_unet_conv_in", KOHYA, &[4, 4, 3, 3]));
        let l = parse(Arc::new(Model::open(&path).expect("open"))).expect("parse");
        let base = diffusers_base(dir.path(), false);
        let m = match_to(&l, &base).expect("match");
        assert_eq!(m.matches.len(), 1);
        assert_eq!(base.local_name(m.matches[0].tensor), Some("conv_in.weight"));
    }
}
