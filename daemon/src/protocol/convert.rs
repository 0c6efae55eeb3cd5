//! Conversions between the engine's types and their wire forms, for the server (and for
//! clients written in Rust).

use super::codes::ErrorCode;
use super::messages::{
    ComponentSummary, DeviceEntry, DeviceSel, DeviceSummary, ErrorReply, LayerSummary, LoraMode,
    LoraReport, ModelOpened, Policy, Preset, StatsReply, TensorDesc, Threshold, ViewCreated,
};
use crate::device::DeviceInfo;
use crate::devices::{DeviceRef, DeviceSlot, SelectError, SlotState};
use crate::engine::lora_view::LoraMode as EngineLoraMode;
use crate::engine::policy::{
    PolicyChoice, PolicySpec, Preset as EnginePreset, Threshold as EngineThreshold,
};
use crate::engine::{EngineError, ModelId, Stats, TensorView};
use crate::lora::export::ExportReport;
use crate::store::Model;

impl From<LoraMode> for EngineLoraMode {
    fn from(m: LoraMode) -> EngineLoraMode {
        match m {
            LoraMode::Backup => EngineLoraMode::Backup,
            LoraMode::Fuse => EngineLoraMode::Fuse,
        }
    }
}

impl From<EngineLoraMode> for LoraMode {
    fn from(m: EngineLoraMode) -> LoraMode {
        match m {
            EngineLoraMode::Backup => LoraMode::Backup,
            EngineLoraMode::Fuse => LoraMode::Fuse,
        }
    }
}

impl ViewCreated {
    /// The reply for view `view`, from what the engine's matching reported: one entry per
    /// stack entry, in stack order.
    pub fn from_report(view: u64, report: &ExportReport) -> ViewCreated {
        let n = report.unmatched.len().max(report.unrecognised.len());
        let at = |list: &[(std::path::PathBuf, Vec<String>)], i: usize| {
            list.get(i).map(|(_, v)| v.clone()).unwrap_or_default()
        };
        ViewCreated {
            view,
            merged: report.merged as u64,
            loras: (0..n)
                .map(|i| LoraReport {
                    unmatched: at(&report.unmatched, i),
                    unrecognised: at(&report.unrecognised, i),
                })
                .collect(),
        }
    }
}

impl From<EngineThreshold> for Threshold {
    fn from(t: EngineThreshold) -> Threshold {
        match t {
            EngineThreshold::Bytes(b) => Threshold::Bytes(b),
            EngineThreshold::Fraction(f) => Threshold::Fraction(f),
        }
    }
}

impl From<Threshold> for EngineThreshold {
    fn from(t: Threshold) -> EngineThreshold {
        match t {
            Threshold::Bytes(b) => EngineThreshold::Bytes(b),
            Threshold::Fraction(f) => EngineThreshold::Fraction(f),
        }
    }
}

impl From<PolicySpec> for Policy {
    /// A lookahead above `u32::MAX` saturates.
    fn from(p: PolicySpec) -> Policy {
        match p {
            PolicySpec::None => Policy::None,
            PolicySpec::Component => Policy::Component,
            PolicySpec::Sequential { lookahead } => {
                Policy::Sequential { lookahead: u32::try_from(lookahead).unwrap_or(u32::MAX) }
            }
            PolicySpec::Balanced { threshold } => Policy::Balanced { threshold: threshold.into() },
            PolicySpec::Lru { threshold } => Policy::Lru { threshold: threshold.into() },
        }
    }
}

impl From<Preset> for EnginePreset {
    fn from(p: Preset) -> EnginePreset {
        match p {
            Preset::LowVram => EnginePreset::LowVram,
            Preset::MedVram => EnginePreset::MedVram,
            Preset::Model => EnginePreset::Model,
        }
    }
}

impl From<EnginePreset> for Preset {
    fn from(p: EnginePreset) -> Preset {
        match p {
            EnginePreset::LowVram => Preset::LowVram,
            EnginePreset::MedVram => Preset::MedVram,
            EnginePreset::Model => Preset::Model,
        }
    }
}

impl From<PolicyChoice> for Policy {
    /// A preset travels as itself (so the server can say which one was asked for).
    fn from(c: PolicyChoice) -> Policy {
        match c {
            PolicyChoice::Auto => Policy::Auto,
            PolicyChoice::Spec { preset: Some(p), .. } => Policy::Preset { preset: p.into() },
            PolicyChoice::Spec { spec, preset: None } => spec.into(),
        }
    }
}

impl Policy {
    /// The engine's choice for this wire policy (presets and `Auto` are resolved by the
    /// engine), or why its values are invalid (a fraction outside `[0, 1]` or not a number):
    /// answer those with [`ErrorCode::BadRequest`].
    pub fn to_choice(self) -> Result<PolicyChoice, String> {
        match self {
            Policy::Auto => Ok(PolicyChoice::Auto),
            Policy::Preset { preset } => Ok(EnginePreset::from(preset).into()),
            p => p.to_spec().map(PolicyChoice::from),
        }
    }

    /// [`Policy::to_choice`] for a concrete policy; `Auto` and presets resolve to the policy
    /// they name on a device of unknown size (`Auto`: balanced at 75%), so prefer
    /// [`Policy::to_choice`].
    pub fn to_spec(self) -> Result<PolicySpec, String> {
        let check = |t: Threshold| match t {
            Threshold::Fraction(f) if !(0.0..=1.0).contains(&f) => {
                Err(format!("threshold fraction {f} is outside [0, 1]"))
            }
            t => Ok(EngineThreshold::from(t)),
        };
        Ok(match self {
            Policy::None => PolicySpec::None,
            Policy::Component => PolicySpec::Component,
            Policy::Sequential { lookahead } => {
                PolicySpec::Sequential { lookahead: lookahead as usize }
            }
            Policy::Balanced { threshold } => PolicySpec::Balanced { threshold: check(threshold)? },
            Policy::Lru { threshold } => PolicySpec::Lru { threshold: check(threshold)? },
            Policy::Auto => PolicySpec::Balanced { threshold: EngineThreshold::default() },
            Policy::Preset { preset } => EnginePreset::from(preset).spec(),
        })
    }
}

impl From<&Stats> for StatsReply {
    fn from(s: &Stats) -> StatsReply {
        StatsReply {
            acquires: s.acquires,
            hits: s.hits,
            misses: s.misses,
            loads: s.loads,
            evictions: s.evictions,
            bytes_streamed: s.bytes_streamed,
            stall_ns: s.stall_ns,
            device_bytes: s.device_bytes,
            peak_device_bytes: s.peak_device_bytes,
            budget: s.budget,
            lora_cache_bytes: s.lora_cache_bytes,
        }
    }
}

impl From<&TensorView> for TensorDesc {
    /// The device address stays out: it means nothing in another process (and would leak the
    /// server's address layout).
    fn from(t: &TensorView) -> TensorDesc {
        TensorDesc {
            name: t.name.clone(),
            dtype: t.dtype.as_str().to_string(),
            shape: t.shape.clone(),
            arena_offset: t.arena_offset,
            len: t.len,
        }
    }
}

impl DeviceSummary {
    /// The summary of a device whose engine has `budget` bytes.
    pub fn new(info: &DeviceInfo, budget: u64) -> DeviceSummary {
        DeviceSummary {
            backend: info.backend.to_string(),
            name: info.name.clone(),
            uuid: info.uuid.clone(),
            total_memory: info.total_memory,
            budget,
        }
    }
}

impl ModelOpened {
    /// The reply describing `model`, open as `id`.
    pub fn describe(id: ModelId, model: &Model) -> ModelOpened {
        let components = model
            .components()
            .iter()
            .map(|c| ComponentSummary {
                name: c.name.clone(),
                layers: c
                    .layers
                    .iter()
                    .map(|l| LayerSummary {
                        name: l.name.clone(),
                        bytes: l.bytes,
                        tensors: u32::try_from(l.tensors.len()).unwrap_or(u32::MAX),
                    })
                    .collect(),
            })
            .collect();
        ModelOpened { model: id, components }
    }
}

impl From<&EngineError> for ErrorReply {
    fn from(e: &EngineError) -> ErrorReply {
        ErrorReply::new(ErrorCode::from(e), e.to_string())
    }
}

impl From<DeviceSel> for DeviceRef {
    fn from(d: DeviceSel) -> DeviceRef {
        match d {
            DeviceSel::Index(i) => DeviceRef::Index(i),
            DeviceSel::Uuid(u) => DeviceRef::Uuid(u),
        }
    }
}

impl From<DeviceRef> for DeviceSel {
    fn from(d: DeviceRef) -> DeviceSel {
        match d {
            DeviceRef::Index(i) => DeviceSel::Index(i),
            DeviceRef::Uuid(u) => DeviceSel::Uuid(u),
        }
    }
}

impl From<&SelectError> for ErrorReply {
    fn from(e: &SelectError) -> ErrorReply {
        let code = match e {
            SelectError::NoSuchDevice { .. } => ErrorCode::UnknownDevice,
            SelectError::Unavailable { .. } => ErrorCode::DeviceUnavailable,
        };
        ErrorReply::new(code, e.to_string())
    }
}

impl DeviceEntry {
    /// The entry of `slot`, with `models` open on it.
    pub fn describe(slot: &DeviceSlot, models: u32) -> DeviceEntry {
        let uuid = slot.uuid.clone().unwrap_or_default();
        match &slot.state {
            SlotState::Ready(e) => {
                let info = e.device_info();
                let stats = e.stats();
                DeviceEntry {
                    index: slot.index,
                    label: slot.label.clone(),
                    uuid,
                    name: info.name.clone(),
                    total_memory: info.total_memory,
                    numa_node: e.placement().node_id(),
                    error: None,
                    stats: Some(StatsReply::from(&stats)),
                    models,
                    waiting: u32::try_from(stats.waiting_acquires).unwrap_or(u32::MAX),
                }
            }
            SlotState::Failed(reason) => DeviceEntry {
                index: slot.index,
                label: slot.label.clone(),
                uuid,
                name: String::new(),
                total_memory: 0,
                numa_node: None,
                error: Some(reason.clone()),
                stats: None,
                models,
                waiting: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_convert_both_ways() {
        let specs = [
            PolicySpec::None,
            PolicySpec::Component,
            PolicySpec::Sequential { lookahead: 2 },
            PolicySpec::Balanced { threshold: EngineThreshold::Fraction(0.75) },
            PolicySpec::Lru { threshold: EngineThreshold::Bytes(1 << 30) },
        ];
        for s in specs {
            assert_eq!(Policy::from(s).to_spec(), Ok(s));
        }
        let bad = Policy::Balanced { threshold: Threshold::Fraction(f64::NAN) };
        assert!(bad.to_spec().expect_err("NaN").contains("outside [0, 1]"));
        let bad = Policy::Lru { threshold: Threshold::Fraction(1.5) };
        assert!(bad.to_spec().is_err());
    }

    #[test]
    fn lora_reports_follow_the_stack() {
        let report = ExportReport {
            merged: 3,
            unmatched: vec![("/a".into(), vec!["x".into()]), ("/b".into(), vec![])],
            unrecognised: vec![("/a".into(), vec![]), ("/b".into(), vec!["y".into()])],
            ..ExportReport::default()
        };
        let v = ViewCreated::from_report(7, &report);
        assert_eq!(v.view, 7);
        assert_eq!(v.merged, 3);
        assert_eq!(v.loras.len(), 2);
        assert_eq!(v.loras[0].unmatched, ["x"]);
        assert_eq!(v.loras[1].unrecognised, ["y"]);
        for m in [LoraMode::Backup, LoraMode::Fuse] {
            assert_eq!(LoraMode::from(EngineLoraMode::from(m)), m);
        }
    }

    #[test]
    fn engine_errors_become_replies() {
        let r = ErrorReply::from(&EngineError::UnknownLease { lease: 4 });
        assert_eq!(r.error_code(), Some(ErrorCode::UnknownLease));
        assert!(r.message.contains("no lease 4"), "{}", r.message);
    }
}
