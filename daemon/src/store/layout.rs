//! Components and layers: how a model's tensors are grouped for streaming.
//!
//! **Components.** A diffusers folder is one component per sub-folder. A single file (or sharded
//! set) is split by the key prefixes of single-file checkpoints ([`CHECKPOINT_PREFIXES`]); a file
//! with none of them is one component named `model`, and tensors outside every known prefix of
//! a checkpoint (EMA copies, `alphas_cumprod`, ...) form a component named `extra`.
//!
//! **Layers** ([`LayerRule::Auto`]). Within a component, on the *local* name (the checkpoint
//! prefix removed). Some segments only wrap a model and say nothing about where a tensor runs
//! ([`WRAPPERS`]: `model`, `transformer`, `text_model`, `encoder`, ...); they stay in layer
//! names but are not counted below. A tensor belongs to:
//! 1. if its first all-digit segment (not the last segment) follows exactly one counted segment,
//!    the prefix through that digit: `down_blocks.1.attentions.0.proj.weight` → `down_blocks.1`,
//!    `text_model.encoder.layers.3.mlp.fc1.weight` → `text_model.encoder.layers.3`,
//!    `model.layers.12.…` → `model.layers.12`;
//! 2. otherwise its parent module cut after the first counted segment:
//!    `mid_block.resnets.0.conv1.weight` → `mid_block` (one layer, like a down block),
//!    `time_embedding.linear_1.weight` → `time_embedding`, `model.embed_tokens.weight` →
//!    `model.embed_tokens`, `encoder.conv_in.bias` → `encoder.conv_in`;
//! 3. a tensor directly under wrappers (`logit_scale`, `model.text_projection`) is its own layer.
//!
//! Layers are ordered as a pass runs through them, guessed from their names ([`layer_order`]):
//! path segment by segment, inputs and embeddings first (`conv_in`, `embed_tokens`, `img_in`),
//! then blocks, then middle blocks (`mid_block`, `single_blocks`), then up/output blocks and
//! decoders, then final norms and heads (`conv_out`, `norm`, `lm_head`); within a stage, natural
//! sort (`blocks.2` before `blocks.10`). The streaming engine replaces this guess by the order
//! clients actually use once it has seen a whole pass. Clients may
//! replace the rule with [`LayerRule::Prefixes`]: declared layers in the order given, each tensor
//! going to the longest prefix it starts with, and any tensor no prefix covers falling back to
//! the automatic rule after them.
//!
//! **Companions** ([`companion_of`]). Quantized checkpoints store, beside a weight, the tensors
//! needed to read it: scales, zero points, absmax, quant maps. These always travel in their
//! weight's layer, under either rule, because a runtime cannot use one without the other. A
//! tensor is a companion when its name is another tensor's name plus more segments (bitsandbytes:
//! `x.weight` + `x.weight.absmax`, `x.weight.quant_state.bitsandbytes__nf4`; a state dict cannot
//! otherwise nest a tensor under a tensor), or when its last segment is another tensor's last
//! segment plus a scale suffix ([`COMPANION_SUFFIXES`]: `text_projection` +
//! `text_projection_scale`). Companions that are siblings inside a module (`x.weight_scale`,
//! `x.scales`, `x.qzeros`, `x.SCB`) need no rule: a layer is decided by the module path, which
//! they share. The rule matters for parameters whose own name decides their layer: `blocks.7`
//! groups under `blocks`, but `blocks.7.absmax` alone would group under `blocks.7`.

use std::cmp::Ordering;
use std::collections::HashMap;

/// Single-file checkpoint prefixes and the component each one is.
pub const CHECKPOINT_PREFIXES: &[(&str, &str)] = &[
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("text_encoders.clip_l.", "text_encoder"),
    ("text_encoders.clip_g.", "text_encoder_2"),
    ("text_encoders.t5xxl.", "text_encoder_3"),
];

/// Local-name prefixes that mark a diffusion backbone as a transformer (Flux, SD3, DiT).
const TRANSFORMER_MARKERS: &[&str] = &["double_blocks.", "single_blocks.", "joint_blocks."];

/// The component a checkpoint key belongs to and the length of its prefix, if it has one.
/// `conditioner.embedders.N.` (SDXL) is text encoder N+1 (`text_encoder`, `text_encoder_2`, ...).
pub fn checkpoint_component(name: &str) -> Option<(String, usize)> {
    for (prefix, component) in CHECKPOINT_PREFIXES {
        if name.starts_with(prefix) {
            return Some((component.to_string(), prefix.len()));
        }
    }
    let rest = name.strip_prefix("conditioner.embedders.")?;
    let (digits, _) = rest.split_once('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    let component = match n.checked_add(1) {
        Some(1) => "text_encoder".to_string(),
        Some(k) => format!("text_encoder_{k}"),
        None => return None,
    };
    // The prefix is as long as the digits really are ("01" is two bytes, not one).
    Some((component, "conditioner.embedders.".len() + digits.len() + 1))
}

/// Renames the `unet` of a checkpoint to `transformer` when its keys are those of one.
pub fn backbone_name<'a>(local_names: impl IntoIterator<Item = &'a str>) -> &'static str {
    let is_transformer =
        local_names.into_iter().any(|n| TRANSFORMER_MARKERS.iter().any(|m| n.starts_with(m)));
    if is_transformer { "transformer" } else { "unet" }
}

/// How a component's tensors are grouped into layers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LayerRule {
    /// The documented naming rule (module docs).
    #[default]
    Auto,
    /// Layers declared by the client as tensor-name prefixes, in execution order.
    Prefixes(Vec<String>),
}

/// Segments that only wrap a model (the module docs).
pub const WRAPPERS: &[&str] = &[
    "model",
    "transformer",
    "text_model",
    "vision_model",
    "encoder",
    "decoder",
    "base_model",
    "diffusion_model",
    "module",
    "bert",
    "roberta",
];

/// The automatic layer key of a local tensor name (the module docs).
pub fn auto_layer_key(name: &str) -> &str {
    let mut counted = 0;
    // End (exclusive) of the first counted segment, for rule 2.
    let mut first_counted_end = None;
    let mut start = 0;
    // Every segment but the last (the parameter's own name).
    while let Some(dot) = name[start..].find('.') {
        let end = start + dot;
        let seg = &name[start..end];
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            if counted == 1 {
                return &name[..end];
            }
            break;
        }
        if !WRAPPERS.contains(&seg) {
            counted += 1;
            first_counted_end.get_or_insert(end);
        }
        start = end + 1;
    }
    match first_counted_end {
        Some(end) => &name[..end],
        None => name,
    }
}

/// The stage a module name usually runs in: 0 inputs and embeddings, 1 blocks (and anything
/// unknown), 2 middle blocks, 3 up/output blocks and decoders, 4 final norms and heads.
fn stage(segment: &str) -> u8 {
    match segment {
        "conv_in" | "embeddings" | "embed_tokens" | "embed_positions" | "wte" | "wpe"
        | "shared" | "encoder" | "time_embedding" | "time_embed" | "add_embedding"
        | "class_embedding" | "label_emb" | "pos_embed" | "patch_embed" | "x_embedder"
        | "t_embedder" | "y_embedder" | "context_embedder" | "time_text_embed" | "img_in"
        | "txt_in" | "time_in" | "vector_in" | "guidance_in" | "token_embedding"
        | "position_embedding" => 0,
        "mid_block"
        | "middle_block"
        | "single_blocks"
        | "single_transformer_blocks"
        | "post_quant_conv" => 2,
        "up_blocks" | "output_blocks" | "decoder" => 3,
        "conv_norm_out" | "norm_out" | "conv_out" | "out" | "final_layer_norm" | "final_layer"
        | "norm" | "ln_f" | "final_norm" | "lm_head" | "proj_out" | "head" | "ln_final"
        | "ln_post" | "text_projection" | "logit_scale" => 4,
        _ => 1,
    }
}

/// The order layers are streamed in before a pass has been observed (module docs).
pub fn layer_order(a: &str, b: &str) -> Ordering {
    let mut sa = a.split('.');
    let mut sb = b.split('.');
    loop {
        match (sa.next(), sb.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = stage(x).cmp(&stage(y)).then_with(|| natural_cmp(x, y));
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// Natural order: digit runs compare as numbers, so `blocks.2` < `blocks.10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb)).then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let n = digits.iter().take_while(|&&d| d == b'0').count();
    &digits[n.min(digits.len().saturating_sub(1))..]
}

/// Suffixes of a parameter's last segment that name a companion of the parameter without the
/// suffix (module docs): scales (fp8 `_scale`, DeepSeek-style `_scale_inv`, `_scales`),
/// bitsandbytes `_absmax`, zero points.
pub const COMPANION_SUFFIXES: &[&str] =
    &["_scale", "_scale_inv", "_scales", "_absmax", "_zero_point"];

/// The tensor (by position in `names`) whose layer `names[i]` must share, if it is a companion
/// of another tensor (module docs); `index` maps every name to its position. Follows chains to
/// the root (`x_scale.absmax` → `x_scale` → `x`).
pub fn companion_of(names: &[&str], index: &HashMap<&str, usize>, i: usize) -> Option<usize> {
    let mut owner = None;
    let mut cur = i;
    // Every step moves to a strictly shorter name, so this ends; the bound is belt and braces.
    for _ in 0..names.len() {
        match names.get(cur).and_then(|n| direct_owner(n, index)) {
            Some(o) if o != cur => {
                owner = Some(o);
                cur = o;
            }
            _ => break,
        }
    }
    owner
}

/// The tensor `name` is directly a companion of: the shortest other tensor name that is a
/// dot-prefix of it, else the sibling named without a [`COMPANION_SUFFIXES`] suffix.
fn direct_owner(name: &str, index: &HashMap<&str, usize>) -> Option<usize> {
    let nested = name.match_indices('.').find_map(|(d, _)| index.get(&name[..d]));
    if let Some(&o) = nested {
        return Some(o);
    }
    let (parent, last) = match name.rfind('.') {
        Some(d) => name.split_at(d + 1),
        None => ("", name),
    };
    COMPANION_SUFFIXES.iter().find_map(|suffix| {
        let base = last.strip_suffix(suffix).filter(|b| !b.is_empty())?;
        index.get(format!("{parent}{base}").as_str()).copied()
    })
}

/// Groups `names` (local tensor names, by position) into layers: `(layer name, positions)`.
/// Companions (module docs) go to their owner's layer, in header order among its tensors.
///
/// Returns `Err(prefix)` for a declared prefix that matches no tensor (companions, which go
/// where their owner goes, do not count).
pub fn group<'a>(names: &[&'a str], rule: &LayerRule) -> Result<Vec<(String, Vec<usize>)>, String> {
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let owners: Vec<Option<usize>> =
        (0..names.len()).map(|i| companion_of(names, &index, i)).collect();
    let own = |i: &usize| owners[*i].is_none();
    let mut declared: Vec<(String, Vec<usize>)> = Vec::new();
    let mut rest: Vec<usize> = Vec::new();
    match rule {
        LayerRule::Auto => rest.extend((0..names.len()).filter(own)),
        LayerRule::Prefixes(prefixes) => {
            declared = prefixes.iter().map(|p| (p.clone(), Vec::new())).collect();
            for (i, name) in names.iter().enumerate().filter(|(i, _)| own(i)) {
                let best = prefixes
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| name.starts_with(p.as_str()))
                    .max_by_key(|(_, p)| p.len());
                match best {
                    Some((li, _)) => declared[li].1.push(i),
                    None => rest.push(i),
                }
            }
            if let Some((p, _)) = declared.iter().find(|(_, t)| t.is_empty()) {
                return Err(p.clone());
            }
        }
    }
    let mut auto: HashMap<&'a str, Vec<usize>> = HashMap::new();
    for i in rest {
        auto.entry(auto_layer_key(names[i])).or_default().push(i);
    }
    let mut auto: Vec<(&str, Vec<usize>)> = auto.into_iter().collect();
    auto.sort_by(|a, b| layer_order(a.0, b.0));
    declared.extend(auto.into_iter().map(|(k, v)| (k.to_string(), v)));
    if owners.iter().any(Option::is_some) {
        // Owners are never companions themselves, so each is in exactly one layer by now.
        let mut layer_of: Vec<Option<usize>> = vec![None; names.len()];
        for (li, (_, members)) in declared.iter().enumerate() {
            for &m in members {
                layer_of[m] = Some(li);
            }
        }
        for (i, owner) in owners.iter().enumerate() {
            if let Some(li) = owner.and_then(|o| layer_of[o]) {
                declared[li].1.push(i);
            }
        }
        for (_, members) in &mut declared {
            members.sort_unstable();
        }
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keys() {
        let cases = [
            ("down_blocks.1.attentions.0.proj_in.weight", "down_blocks.1"),
            ("text_model.encoder.layers.3.mlp.fc1.weight", "text_model.encoder.layers.3"),
            ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3"),
            ("bert.encoder.layer.3.attention.self.query.weight", "bert.encoder.layer.3"),
            ("model.layers.12.self_attn.q_proj.weight", "model.layers.12"),
            ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.4"),
            ("mid_block.resnets.0.conv1.weight", "mid_block"),
            ("mid_block.attentions.0.proj_in.weight", "mid_block"),
            ("encoder.mid_block.resnets.1.conv1.weight", "encoder.mid_block"),
            ("final_layer.adaLN_modulation.1.weight", "final_layer"),
            ("conv_in.weight", "conv_in"),
            ("time_embedding.linear_1.weight", "time_embedding"),
            ("text_model.embeddings.token_embedding.weight", "text_model.embeddings"),
            (
                "transformer.text_model.embeddings.position_embedding.weight",
                "transformer.text_model.embeddings",
            ),
            (
                "transformer.text_model.final_layer_norm.weight",
                "transformer.text_model.final_layer_norm",
            ),
            ("model.transformer.resblocks.0.attn.in_proj_weight", "model.transformer.resblocks.0"),
            ("model.ln_final.weight", "model.ln_final"),
            ("model.text_projection", "model.text_projection"),
            ("model.embed_tokens.weight", "model.embed_tokens"),
            ("transformer.h.3.attn.c_attn.weight", "transformer.h.3"),
            ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0"),
            ("lm_head.weight", "lm_head"),
            ("logit_scale", "logit_scale"),
            ("blocks.7", "blocks"),
            ("a..b", "a"),
        ];
        for (name, key) in cases {
            assert_eq!(auto_layer_key(name), key, "{name}");
        }
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["blocks.10", "blocks.2", "blocks.1", "a", "blocks.02", "conv"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "blocks.1", "blocks.2", "blocks.02", "blocks.10", "conv"]);
    }

    #[test]
    fn pass_order_guess() {
        let sorted = |mut v: Vec<&'static str>| {
            v.sort_by(|a, b| layer_order(a, b));
            v
        };
        assert_eq!(
            sorted(vec![
                "up_blocks.0",
                "conv_out",
                "down_blocks.10",
                "mid_block.attentions.0",
                "conv_in",
                "down_blocks.2",
                "time_embedding.linear_1",
                "conv_norm_out",
            ]),
            [
                "conv_in",
                "time_embedding.linear_1",
                "down_blocks.2",
                "down_blocks.10",
                "mid_block.attentions.0",
                "up_blocks.0",
                "conv_norm_out",
                "conv_out",
            ]
        );
        assert_eq!(
            sorted(vec!["lm_head", "model.norm", "model.layers.1", "model.embed_tokens"]),
            ["model.embed_tokens", "model.layers.1", "model.norm", "lm_head"]
        );
        assert_eq!(
            sorted(vec![
                "final_layer",
                "single_blocks.0",
                "double_blocks.1",
                "img_in",
                "double_blocks.0"
            ]),
            ["img_in", "double_blocks.0", "double_blocks.1", "single_blocks.0", "final_layer"]
        );
        assert_eq!(
            sorted(vec![
                "decoder.conv_in",
                "post_quant_conv",
                "encoder.conv_out",
                "quant_conv",
                "encoder.conv_in"
            ]),
            [
                "encoder.conv_in",
                "encoder.conv_out",
                "quant_conv",
                "post_quant_conv",
                "decoder.conv_in"
            ]
        );
    }

    #[test]
    fn checkpoint_prefixes() {
        assert_eq!(
            checkpoint_component("conditioner.embedders.1.model.ln_final.weight"),
            Some(("text_encoder_2".to_string(), "conditioner.embedders.1.".len()))
        );
        assert_eq!(
            checkpoint_component("first_stage_model.decoder.conv_in.weight"),
            Some(("vae".to_string(), "first_stage_model.".len()))
        );
        assert_eq!(checkpoint_component("conditioner.embedders.x.y"), None);
        assert_eq!(checkpoint_component("model_ema.decay"), None);
    }

    #[test]
    fn declared_prefixes_take_precedence_longest_first() {
        let names = ["a.0.w", "a.0.x.w", "a.1.w", "b.w"];
        let rule = LayerRule::Prefixes(vec!["a.0.".into(), "a.0.x.".into()]);
        let layers = group(&names, &rule).expect("valid");
        assert_eq!(
            layers,
            vec![
                ("a.0.".to_string(), vec![0]),
                ("a.0.x.".to_string(), vec![1]),
                ("a.1".to_string(), vec![2]),
                ("b".to_string(), vec![3]),
            ]
        );
        assert_eq!(group(&names, &LayerRule::Prefixes(vec!["zzz".into()])), Err("zzz".into()));
    }

    /// The layer name each tensor lands in.
    fn layer_names(names: &[&str], rule: &LayerRule) -> Vec<(String, Vec<String>)> {
        let layers = group(names, rule).expect("valid");
        layers
            .into_iter()
            .map(|(l, m)| (l, m.into_iter().map(|i| names[i].to_string()).collect()))
            .collect()
    }

    #[test]
    fn quantization_companions_share_their_weights_layer() {
        let names = [
            // fp8 with sibling scales (same module: grouped by the module already).
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.down_proj.weight_scale",
            "model.layers.0.mlp.down_proj.input_scale",
            // bitsandbytes nf4: nested under the weight.
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight.absmax",
            "model.layers.1.mlp.down_proj.weight.quant_map",
            "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4",
            // GPTQ.
            "model.layers.2.self_attn.q_proj.qweight",
            "model.layers.2.self_attn.q_proj.scales",
            "model.layers.2.self_attn.q_proj.qzeros",
            // Parameters whose own name decides their layer: without the companion rule the
            // nested ones would land in `blocks.7`, `model.0.absmax`, `model.text_projection_scale`.
            "blocks.7",
            "blocks.7.absmax",
            "blocks.7.quant_state.bitsandbytes__nf4",
            "model.0",
            "model.0.absmax",
            "model.text_projection",
            "model.text_projection_scale",
            "model.text_projection_scale.absmax",
            // Not a companion: `logit` is not a tensor.
            "logit_scale",
        ];
        let layers = layer_names(&names, &LayerRule::Auto);
        let of = |t: &str| layers.iter().find(|(_, m)| m.iter().any(|n| n == t)).unwrap().0.clone();
        let pairs = [
            ("model.layers.0.mlp.down_proj.weight_scale", "model.layers.0.mlp.down_proj.weight"),
            ("model.layers.0.mlp.down_proj.input_scale", "model.layers.0.mlp.down_proj.weight"),
            ("model.layers.1.mlp.down_proj.weight.absmax", "model.layers.1.mlp.down_proj.weight"),
            (
                "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4",
                "model.layers.1.mlp.down_proj.weight",
            ),
            ("model.layers.2.self_attn.q_proj.scales", "model.layers.2.self_attn.q_proj.qweight"),
            ("blocks.7.absmax", "blocks.7"),
            ("blocks.7.quant_state.bitsandbytes__nf4", "blocks.7"),
            ("model.0.absmax", "model.0"),
            ("model.text_projection_scale", "model.text_projection"),
            ("model.text_projection_scale.absmax", "model.text_projection"),
        ];
        for (companion, weight) in pairs {
            assert_eq!(of(companion), of(weight), "{companion} vs {weight}");
        }
        assert_eq!(of("blocks.7"), "blocks");
        assert_eq!(of("model.0"), "model.0");
        assert_eq!(of("logit_scale"), "logit_scale");
        // No layer made only of companions; every tensor placed once, in header order.
        let placed: usize = layers.iter().map(|(_, m)| m.len()).sum();
        assert_eq!(placed, names.len());
        assert!(!layers.iter().any(|(l, _)| l == "blocks.7" || l == "model.0.absmax"));
        for (l, m) in group(&names, &LayerRule::Auto).unwrap() {
            assert!(m.windows(2).all(|w| w[0] < w[1]), "{l}: {m:?}");
        }
    }

    #[test]
    fn companions_follow_their_weight_into_declared_layers() {
        let names = ["a.0.w", "a.0.w.absmax", "a.1.w", "a.1.w_scale", "b"];
        let rule = LayerRule::Prefixes(vec!["a.1.".into(), "a.0.".into()]);
        assert_eq!(
            layer_names(&names, &rule),
            vec![
                ("a.1.".to_string(), vec!["a.1.w".to_string(), "a.1.w_scale".to_string()]),
                ("a.0.".to_string(), vec!["a.0.w".to_string(), "a.0.w.absmax".to_string()]),
                ("b".to_string(), vec!["b".to_string()]),
            ]
        );
        // A declared prefix that only a companion starts with matches nothing of its own: the
        // companion stays with its weight.
        let names = ["blocks.7", "blocks.7.absmax"];
        let rule = LayerRule::Prefixes(vec!["blocks.7.".into()]);
        assert_eq!(group(&names, &rule), Err("blocks.7.".into()));
        // ... and a prefix that covers the weight takes the companion along.
        let rule = LayerRule::Prefixes(vec!["blocks.7".into()]);
        assert_eq!(group(&names, &rule), Ok(vec![("blocks.7".to_string(), vec![0, 1])]));
    }
}
