//! How a policy is *named*: a policy, a preset (another name for one), or `auto`.
//!
//! Every interface that takes a policy by name (ferryd's config file and flags, ferryctl, the
//! engine's default) parses it here, with [`PolicyChoice::from_str`], so a name means the same
//! thing everywhere:
//!
//! | name | policy |
//! | --- | --- |
//! | `none`, `component`, `sequential`, `balanced`, `lru` | themselves, default parameters |
//! | `lowvram` | `sequential` (lookahead 1): SD.Next's sequential offload |
//! | `medvram`, `model` | `component`: SD.Next's model offload |
//! | `auto` | `sequential` on a device with at most [`AUTO_SEQUENTIAL_MAX`] bytes of memory (configurable), else `balanced` |
//!
//! A choice is [`resolve`](PolicyChoice::resolve)d into a concrete [`PolicySpec`] when the
//! engine builds a scope; the [`Resolved`] value remembers how (the preset's name, or why `auto`
//! chose what it chose), so stats and logs show `balanced (auto: device 80.0 GiB > 4.0 GiB; …)`
//! rather than a bare policy name.

use std::fmt;
use std::str::FromStr;

use super::{PolicySpec, Threshold};
use crate::units::bytes;

/// Under `auto`, devices with at most this much memory get `sequential` (4 GiB).
pub const AUTO_SEQUENTIAL_MAX: u64 = 4 << 30;

/// The lookahead `sequential` gets when named without one (double buffering).
pub const DEFAULT_LOOKAHEAD: usize = 1;

/// Another name for a policy, as users of other offloading tools know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// `lowvram` = `sequential`.
    LowVram,
    /// `medvram` = `component`.
    MedVram,
    /// `model` = `component` (SD.Next's "model offload").
    Model,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::LowVram, Preset::MedVram, Preset::Model];

    /// The name it is given by.
    pub const fn name(self) -> &'static str {
        match self {
            Preset::LowVram => "lowvram",
            Preset::MedVram => "medvram",
            Preset::Model => "model",
        }
    }

    /// The policy it stands for, with default parameters.
    pub const fn spec(self) -> PolicySpec {
        match self {
            Preset::LowVram => PolicySpec::Sequential { lookahead: DEFAULT_LOOKAHEAD },
            Preset::MedVram | Preset::Model => PolicySpec::Component,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PolicySpec {
    /// The policy's name (`none`, `component`, `sequential`, `balanced`, `lru`).
    pub const fn name(&self) -> &'static str {
        match self {
            PolicySpec::None => "none",
            PolicySpec::Component => "component",
            PolicySpec::Sequential { .. } => "sequential",
            PolicySpec::Balanced { .. } => "balanced",
            PolicySpec::Lru { .. } => "lru",
        }
    }

    /// The policy named `name` with default parameters (lookahead 1, threshold 75% of the
    /// device), if `name` is one of the five policies (not a preset, not `auto`).
    pub fn with_defaults(name: &str) -> Option<PolicySpec> {
        Some(match name {
            "none" => PolicySpec::None,
            "component" => PolicySpec::Component,
            "sequential" => PolicySpec::Sequential { lookahead: DEFAULT_LOOKAHEAD },
            "balanced" => PolicySpec::Balanced { threshold: Threshold::default() },
            "lru" => PolicySpec::Lru { threshold: Threshold::default() },
            _ => return None,
        })
    }

    /// The parameters, for display (`lookahead 1`, `threshold 75% of device`); `None` for
    /// policies without any.
    fn params(&self) -> Option<String> {
        match self {
            PolicySpec::None | PolicySpec::Component => None,
            PolicySpec::Sequential { lookahead } => Some(format!("lookahead {lookahead}")),
            PolicySpec::Balanced { threshold } | PolicySpec::Lru { threshold } => {
                Some(format!("threshold {threshold}"))
            }
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Bytes(b) => f.write_str(&bytes(*b)),
            // Rounded to a hundredth of a percent: 0.3 reads `30%`, not `30.000000000000004%`.
            Threshold::Fraction(x) => write!(f, "{}% of device", (x * 10_000.0).round() / 100.0),
        }
    }
}

/// `sequential (lookahead 1)`, `balanced (threshold 75% of device)`, `none`.
impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.params() {
            Some(p) => write!(f, "{} ({p})", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// A policy as a client or an operator names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum PolicyChoice {
    /// Decided from the device's total memory when the scope is built: `sequential` up to
    /// the engine's `auto_sequential_max` (default [`AUTO_SEQUENTIAL_MAX`]), `balanced` (75% of
    /// the device) above. The engine's default.
    #[default]
    Auto,
    /// A policy, named directly (`preset` `None`) or through a preset.
    Spec { spec: PolicySpec, preset: Option<Preset> },
}

impl From<PolicySpec> for PolicyChoice {
    fn from(spec: PolicySpec) -> Self {
        PolicyChoice::Spec { spec, preset: None }
    }
}

impl From<Preset> for PolicyChoice {
    fn from(p: Preset) -> Self {
        PolicyChoice::Spec { spec: p.spec(), preset: Some(p) }
    }
}

/// A policy name that is none of the known ones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown policy {name:?}: expected auto, none, component, sequential, balanced, lru, or a preset: lowvram (= sequential), medvram or model (= component)"
)]
pub struct UnknownPolicy {
    pub name: String,
}

/// Names are matched ignoring ASCII case and surrounding spaces; the policy gets default
/// parameters (lookahead 1, threshold 75% of the device).
impl FromStr for PolicyChoice {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        if name == "auto" {
            return Ok(PolicyChoice::Auto);
        }
        if let Some(p) = Preset::ALL.into_iter().find(|p| p.name() == name) {
            return Ok(p.into());
        }
        PolicySpec::with_defaults(&name)
            .map(PolicyChoice::from)
            .ok_or_else(|| UnknownPolicy { name: s.to_string() })
    }
}

impl TryFrom<String> for PolicyChoice {
    type Error = UnknownPolicy;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// The name it was given by: `auto`, a preset's name, or the policy's.
impl fmt::Display for PolicyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyChoice::Auto => f.write_str("auto"),
            PolicyChoice::Spec { preset: Some(p), .. } => f.write_str(p.name()),
            PolicyChoice::Spec { spec, preset: None } => f.write_str(spec.name()),
        }
    }
}

impl PolicyChoice {
    /// The concrete policy on a device with `device_total` bytes of memory, where `auto` picks
    /// `sequential` up to `auto_sequential_max` bytes.
    pub fn resolve(self, device_total: u64, auto_sequential_max: u64) -> Resolved {
        match self {
            PolicyChoice::Spec { spec, preset } => {
                let origin = match preset {
                    Some(p) => Origin::Preset(p),
                    None => Origin::Explicit,
                };
                Resolved { spec, origin }
            }
            PolicyChoice::Auto => {
                let spec = if device_total <= auto_sequential_max {
                    PolicySpec::Sequential { lookahead: DEFAULT_LOOKAHEAD }
                } else {
                    PolicySpec::Balanced { threshold: Threshold::default() }
                };
                Resolved { spec, origin: Origin::Auto { device_total, auto_sequential_max } }
            }
        }
    }
}

/// How a scope's policy came to be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Origin {
    /// Named directly.
    Explicit,
    /// Named through a preset.
    Preset(Preset),
    /// Chosen by `auto` from the device's total memory.
    Auto { device_total: u64, auto_sequential_max: u64 },
}

/// A [`PolicyChoice`] made concrete, remembering how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved {
    pub spec: PolicySpec,
    pub origin: Origin,
}

impl Resolved {
    /// The policy's own name (`sequential` for `lowvram`, `balanced` for `auto` on a GPU).
    pub fn name(&self) -> &'static str {
        self.spec.name()
    }

    /// The name the policy was asked for by, when it is not the policy's own: the preset's
    /// name, or `auto`.
    pub fn alias(&self) -> Option<&'static str> {
        match self.origin {
            Origin::Explicit => None,
            Origin::Preset(p) => Some(p.name()),
            Origin::Auto { .. } => Some("auto"),
        }
    }

    /// Why the policy is what it is, for stats and logs: `auto: device 80.0 GiB > 4.0 GiB`,
    /// `preset lowvram`; `None` when it was named directly.
    pub fn reason(&self) -> Option<String> {
        match self.origin {
            Origin::Explicit => None,
            Origin::Preset(p) => Some(format!("preset {p}")),
            Origin::Auto { device_total, auto_sequential_max } => {
                let cmp = if device_total <= auto_sequential_max { "<=" } else { ">" };
                Some(format!(
                    "auto: device {} {cmp} {}",
                    bytes(device_total),
                    bytes(auto_sequential_max)
                ))
            }
        }
    }
}

/// `balanced (auto: device 80.0 GiB > 4.0 GiB; threshold 75% of device)`,
/// `sequential (preset lowvram; lookahead 1)`, `component (preset model)`, `none`.
impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.reason().into_iter().chain(self.spec.params()).collect();
        if parts.is_empty() {
            f.write_str(self.name())
        } else {
            write!(f, "{} ({})", self.name(), parts.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn parse(s: &str) -> PolicyChoice {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn names_presets_and_auto_parse() {
        assert_eq!(parse("auto"), PolicyChoice::Auto);
        assert_eq!(parse("none"), PolicySpec::None.into());
        assert_eq!(parse("component"), PolicySpec::Component.into());
        assert_eq!(parse("sequential"), PolicySpec::Sequential { lookahead: 1 }.into());
        assert_eq!(
            parse("balanced"),
            PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) }.into()
        );
        assert_eq!(parse("lru"), PolicySpec::Lru { threshold: Threshold::Fraction(0.75) }.into());
        assert_eq!(
            parse("lowvram"),
            PolicyChoice::Spec {
                spec: PolicySpec::Sequential { lookahead: 1 },
                preset: Some(Preset::LowVram)
            }
        );
        assert_eq!(
            parse("medvram"),
            PolicyChoice::Spec { spec: PolicySpec::Component, preset: Some(Preset::MedVram) }
        );
        assert_eq!(
            parse("model"),
            PolicyChoice::Spec { spec: PolicySpec::Component, preset: Some(Preset::Model) }
        );
        // Case and surrounding blanks do not matter.
        assert_eq!(parse(" LowVRAM "), Preset::LowVram.into());
        assert_eq!(parse("AUTO"), PolicyChoice::Auto);
        // Every name prints back as itself.
        for name in [
            "auto",
            "none",
            "component",
            "sequential",
            "balanced",
            "lru",
            "lowvram",
            "medvram",
            "model",
        ] {
            assert_eq!(parse(name).to_string(), name);
        }
    }

    #[test]
    fn unknown_names_are_named_with_the_choices() {
        for bad in ["", "fast", "low-vram", "sequential:2", "balanced 0.5"] {
            let e = bad.parse::<PolicyChoice>().expect_err(bad);
            assert_eq!(e, UnknownPolicy { name: bad.to_string() });
            let msg = e.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.contains("lowvram") && msg.contains("auto"), "{msg}");
        }
    }

    #[test]
    fn auto_is_sequential_up_to_the_threshold_and_balanced_above() {
        let r = PolicyChoice::Auto.resolve(4 * GIB, AUTO_SEQUENTIAL_MAX);
        assert_eq!(r.spec, PolicySpec::Sequential { lookahead: 1 });
        assert_eq!(r.to_string(), "sequential (auto: device 4.0 GiB <= 4.0 GiB; lookahead 1)");
        let r = PolicyChoice::Auto.resolve(4 * GIB + 1, AUTO_SEQUENTIAL_MAX);
        assert_eq!(r.spec, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) });
        let r = PolicyChoice::Auto.resolve(80 * GIB, AUTO_SEQUENTIAL_MAX);
        assert_eq!(r.spec, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) });
        assert_eq!(r.alias(), Some("auto"));
        assert_eq!(
            r.to_string(),
            "balanced (auto: device 80.0 GiB > 4.0 GiB; threshold 75% of device)"
        );
        // The threshold is a parameter.
        let r = PolicyChoice::Auto.resolve(80 * GIB, 80 * GIB);
        assert_eq!(r.spec, PolicySpec::Sequential { lookahead: 1 });
        let r = PolicyChoice::Auto.resolve(2 * GIB, GIB);
        assert_eq!(r.name(), "balanced");
    }

    #[test]
    fn presets_resolve_to_their_policy_whatever_the_device() {
        for total in [GIB, 80 * GIB] {
            let r = parse("lowvram").resolve(total, AUTO_SEQUENTIAL_MAX);
            assert_eq!((r.spec, r.alias()), (Preset::LowVram.spec(), Some("lowvram")));
            assert_eq!(r.to_string(), "sequential (preset lowvram; lookahead 1)");
            let r = parse("medvram").resolve(total, AUTO_SEQUENTIAL_MAX);
            assert_eq!((r.spec, r.alias()), (PolicySpec::Component, Some("medvram")));
            assert_eq!(r.to_string(), "component (preset medvram)");
            let r = parse("model").resolve(total, AUTO_SEQUENTIAL_MAX);
            assert_eq!((r.spec, r.alias()), (PolicySpec::Component, Some("model")));
            let r = parse("none").resolve(total, AUTO_SEQUENTIAL_MAX);
            assert_eq!((r.to_string(), r.alias()), ("none".to_string(), None));
        }
        let r = PolicyChoice::from(PolicySpec::Lru { threshold: Threshold::Bytes(3 << 20) })
            .resolve(GIB, AUTO_SEQUENTIAL_MAX);
        assert_eq!(r.to_string(), "lru (threshold 3.0 MiB)");
    }
}
