//! Every device of a box, one engine each: what ferryd serves.
//!
//! A [`DeviceSet`] opens one [`Engine`] per device: its own arena (budget), staging ring, I/O
//! threads, copy stream (CUDA) or copy threads (host), lock and counters. Nothing is shared
//! between them but the page cache, so a client streaming on one device never waits on
//! another device's lock, queue or memory.
//!
//! - **Index and identity.** Devices are numbered in the order the set was configured (ferryd's
//!   *device index*, as `ferryctl devices` lists them). The UUID is the stable identity
//!   (`GPU-…` from the driver; `HOST-000N` for the host backend's simulated devices):
//!   `CUDA_VISIBLE_DEVICES` and the configuration change indices, never UUIDs.
//! - **Ids.** Engine `i` hands out model, view and lease ids with `i` in their top 16 bits
//!   ([`crate::engine::ID_SHIFT`]), so an id alone routes a request to its device.
//! - **Failure.** A device that fails to open (a GPU that errors, a NUMA node that does not
//!   exist, a UUID no GPU has) is kept in the set as failed, with the reason: it is listed and
//!   every request naming it gets that reason, while the other devices serve. Only a set with
//!   no working device is an error.
//! - **Host simulation.** The host backend can stand in for several devices
//!   ([`DeviceSetConfig::host_devices`]), each a separate arena with its own budget and copy
//!   threads, so placement, budgets and isolation are tested without GPUs.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::device::{Backend, DeviceChoice, DeviceError, cuda};
use crate::engine::{Engine, EngineConfig, NumaChoice, Stats, id_prefix_of};

/// How a client or the configuration names a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DeviceRef {
    /// ferryd's device index (CUDA ordinals are only the default order).
    Index(u32),
    /// The device's UUID (`GPU-…`, `HOST-0001`).
    Uuid(String),
}

impl DeviceRef {
    /// Whether this names the device at `index` with `uuid` (UUIDs compared without regard
    /// to ASCII case, as nvidia-smi and NVML differ in case).
    pub fn names(&self, index: u32, uuid: Option<&str>) -> bool {
        match self {
            DeviceRef::Index(i) => *i == index,
            DeviceRef::Uuid(u) => uuid.is_some_and(|x| x.eq_ignore_ascii_case(u)),
        }
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRef::Index(i) => write!(f, "device {i}"),
            DeviceRef::Uuid(u) => write!(f, "device {u}"),
        }
    }
}

/// From configuration files: an integer is an index, a string is parsed by [`FromStr`].
impl<'de> serde::Deserialize<'de> for DeviceRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DeviceRef, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DeviceRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a device index (integer) or UUID (string)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DeviceRef, E> {
                u32::try_from(v)
                    .map(DeviceRef::Index)
                    .map_err(|_| E::custom(format!("device index {v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DeviceRef, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("device index {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DeviceRef, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The longest UUID accepted (a GPU's is 40 characters; MIG UUIDs are longer).
pub const MAX_UUID_LEN: usize = 128;

impl FromStr for DeviceRef {
    type Err = String;
    /// `3` is an index; anything else is a UUID (printable ASCII without spaces).
    fn from_str(s: &str) -> Result<DeviceRef, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a device is named by its index or its UUID; got an empty name".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u32>()
                .map(DeviceRef::Index)
                .map_err(|_| format!("device index {s} is too large"));
        }
        if s.len() > MAX_UUID_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{s:?} is neither a device index nor a UUID (printable, at most {MAX_UUID_LEN} characters)"
            ));
        }
        Ok(DeviceRef::Uuid(s.to_string()))
    }
}

/// Why a device cannot serve a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("there is no {wanted} (this server has {count} device(s): {listed})")]
    NoSuchDevice { wanted: DeviceRef, count: usize, listed: String },
    #[error("device {index} ({label}) is unavailable: {reason}")]
    Unavailable { index: u32, label: String, reason: String },
}

/// Everything that keeps a whole set from starting.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetError {
    #[error("{0}")]
    Device(#[from] DeviceError),
    #[error("the configuration names no device")]
    Empty,
    #[error("more than {max} devices configured ({count})")]
    TooMany { count: usize, max: usize },
    #[error("no device could be opened: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    #[error("{first} and {second} name the same GPU ({uuid}): a GPU is served once")]
    Duplicate { first: DeviceRef, second: DeviceRef, uuid: String },
    #[error("numa_nodes names {0}, which is not one of the configured devices")]
    UnknownNumaDevice(DeviceRef),
    #[error(
        "staging rings of {total} bytes over {devices} devices exceed a quarter of the memory \
         available to this process ({available} bytes): fewer or smaller staging slots"
    )]
    Staging { total: u64, devices: usize, available: u64 },
}

/// The most devices one set holds (ids keep the index in 16 bits; boxes have 8 or 16 GPUs).
pub const MAX_DEVICES: usize = 256;

/// What to open.
#[derive(Clone, Debug)]
pub struct DeviceSetConfig {
    /// The engine settings every device starts from (budget, policy, staging, host memory...).
    /// Its `device_config.ordinal`, `id_prefix` and `numa` are set per device.
    pub engine: EngineConfig,
    /// CUDA: the GPUs to serve, in ferryd's index order (`None`: every visible GPU, by
    /// ordinal). Indices here are CUDA ordinals as this process sees them.
    pub select: Option<Vec<DeviceRef>>,
    /// Host backend: how many devices to simulate (at least 1).
    pub host_devices: u32,
    /// NUMA node per device, by ferryd index or UUID; the others use `engine.numa`.
    pub numa_nodes: Vec<(DeviceRef, u32)>,
}

impl Default for DeviceSetConfig {
    fn default() -> Self {
        DeviceSetConfig {
            engine: EngineConfig::default(),
            select: None,
            host_devices: 1,
            numa_nodes: Vec::new(),
        }
    }
}

/// One device of the set.
#[derive(Debug)]
pub struct DeviceSlot {
    /// ferryd's device index.
    pub index: u32,
    /// `cuda:0`, `host:1`: the backend and its ordinal.
    pub label: String,
    /// Known once the device is (or could be) identified.
    pub uuid: Option<String>,
    pub state: SlotState,
}

/// A device serves, or why it does not.
#[derive(Debug)]
pub enum SlotState {
    Ready(Engine),
    Failed(String),
}

impl DeviceSlot {
    pub fn engine(&self) -> Option<&Engine> {
        match &self.state {
            SlotState::Ready(e) => Some(e),
            SlotState::Failed(_) => None,
        }
    }
}

/// The devices ferryd serves (module docs).
#[derive(Debug)]
pub struct DeviceSet {
    slots: Vec<DeviceSlot>,
}

impl From<Engine> for DeviceSet {
    fn from(e: Engine) -> DeviceSet {
        DeviceSet::single(e)
    }
}

/// One device to open: its label, ordinal, UUID if known, or the reason it cannot be.
struct Plan {
    label: String,
    ordinal: usize,
    uuid: Option<String>,
    unusable: Option<String>,
}

impl DeviceSet {
    /// A set of one engine (embedding, tests, the C ABI). The engine sits at its id prefix's
    /// index (0 unless it was configured otherwise), so its ids route to it; any indices
    /// before it are listed as not configured.
    pub fn single(engine: Engine) -> DeviceSet {
        let info = engine.device_info();
        let at = u32::from(engine.id_prefix());
        let mut slots: Vec<DeviceSlot> = (0..at)
            .map(|index| DeviceSlot {
                index,
                label: format!("{}:?", info.backend),
                uuid: None,
                state: SlotState::Failed("no device is configured at this index".into()),
            })
            .collect();
        slots.push(DeviceSlot {
            index: at,
            label: format!("{}:{}", info.backend, info.ordinal),
            uuid: Some(info.uuid.clone()),
            state: SlotState::Ready(engine),
        });
        DeviceSet { slots }
    }

    /// Opens every configured device (in parallel: pinning a staging ring takes a while per
    /// GPU). Devices that fail are kept as failed (module docs); the set fails only if none
    /// opened.
    pub fn open(config: &DeviceSetConfig) -> Result<DeviceSet, DeviceSetError> {
        let choice = config.engine.device;
        let (mut backend, _) = crate::device::select(choice)?;
        let mut gpus = Vec::new();
        if backend == Backend::Cuda {
            match cuda::CudaDevice::enumerate() {
                Ok(list) if !list.is_empty() => gpus = list,
                Ok(_) | Err(DeviceError::NoCudaDriver) if choice == DeviceChoice::Auto => {
                    tracing::warn!("auto: no usable CUDA device; using host memory");
                    backend = Backend::Host;
                }
                Ok(_) => {
                    return Err(DeviceError::NoSuchDevice { ordinal: 0, count: 0 }.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let plans: Vec<Plan> = match backend {
            Backend::Host => {
                if config.select.is_some() {
                    tracing::warn!(
                        "devices selects GPUs; the host backend simulates host_devices devices \
                         instead (devices ignored)"
                    );
                }
                let n = config.host_devices.max(1) as usize;
                if n > MAX_DEVICES {
                    return Err(DeviceSetError::TooMany { count: n, max: MAX_DEVICES });
                }
                (0..n)
                    .map(|i| Plan {
                        label: format!("host:{i}"),
                        ordinal: i,
                        uuid: Some(format!("HOST-{i:04}")),
                        unusable: None,
                    })
                    .collect()
            }
            Backend::Cuda => {
                if config.host_devices > 1 {
                    tracing::warn!("host_devices applies to the host backend only (ignored)");
                }
                cuda_plans(config.select.as_deref(), &gpus)?
            }
        };
        let names = |r: &DeviceRef, index: usize, plan: &Plan| {
            u32::try_from(index).is_ok_and(|i| r.names(i, plan.uuid.as_deref()))
        };
        for (r, _) in &config.numa_nodes {
            if !plans.iter().enumerate().any(|(i, p)| names(r, i, p)) {
                return Err(DeviceSetError::UnknownNumaDevice(r.clone()));
            }
        }
        // Host memory the engines take is per device: check the sum, and split the default
        // fuse-cache budget (a quarter of RAM) between the devices.
        let ram = crate::sysmem::detect();
        let staging = (config.engine.staging_slots as u64)
            .saturating_mul(config.engine.staging_slot_bytes as u64)
            .saturating_mul(plans.len() as u64);
        if plans.len() > 1 && staging > ram.effective / 4 {
            return Err(DeviceSetError::Staging {
                total: staging,
                devices: plans.len(),
                available: ram.effective,
            });
        }
        let fuse_cache = config
            .engine
            .fuse_cache_bytes
            .or_else(|| (plans.len() > 1).then(|| ram.effective / 4 / plans.len() as u64));
        let device = match backend {
            Backend::Host => DeviceChoice::Host,
            Backend::Cuda => DeviceChoice::Cuda,
        };
        let configs: Vec<EngineConfig> = plans
            .iter()
            .enumerate()
            .map(|(index, plan)| {
                let mut c = config.engine.clone();
                c.device = device;
                c.device_config.ordinal = plan.ordinal;
                c.id_prefix = index as u16;
                c.fuse_cache_bytes = fuse_cache;
                if let Some((_, node)) =
                    config.numa_nodes.iter().find(|(r, _)| names(r, index, plan))
                {
                    c.numa = NumaChoice::Node(*node);
                }
                c
            })
            .collect();
        let opened: Vec<Result<Engine, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = plans
                .iter()
                .zip(&configs)
                .map(|(plan, c)| {
                    s.spawn(move || match &plan.unusable {
                        Some(reason) => Err(reason.clone()),
                        None => Engine::new(c.clone()).map_err(|e| e.to_string()),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("opening the device panicked".into())))
                .collect()
        });
        let mut slots = Vec::with_capacity(plans.len());
        for (index, (plan, result)) in plans.into_iter().zip(opened).enumerate() {
            let index = index as u32;
            let state = match result {
                Ok(e) => SlotState::Ready(e),
                Err(reason) => {
                    tracing::error!(index, device = %plan.label, "device unavailable: {reason}");
                    SlotState::Failed(reason)
                }
            };
            let uuid = match &state {
                SlotState::Ready(e) => Some(e.device_info().uuid.clone()),
                SlotState::Failed(_) => plan.uuid,
            };
            slots.push(DeviceSlot { index, label: plan.label, uuid, state });
        }
        if slots.iter().all(|s| s.engine().is_none()) {
            return Err(DeviceSetError::AllFailed(
                slots
                    .iter()
                    .map(|s| match &s.state {
                        SlotState::Failed(r) => format!("{}: {r}", s.label),
                        SlotState::Ready(_) => String::new(),
                    })
                    .collect(),
            ));
        }
        Ok(DeviceSet { slots })
    }

    pub fn slots(&self) -> &[DeviceSlot] {
        &self.slots
    }

    /// The devices that serve, with their index.
    pub fn ready(&self) -> impl Iterator<Item = (u32, &Engine)> {
        self.slots.iter().filter_map(|s| s.engine().map(|e| (s.index, e)))
    }

    /// The device of requests that name none: the first that serves.
    pub fn default_engine(&self) -> &Engine {
        match self.ready().next() {
            Some((_, e)) => e,
            // `open` and `single` never build a set without a working device.
            None => unreachable!("a DeviceSet always has a working device"),
        }
    }

    /// The device `wanted` names.
    pub fn select(&self, wanted: &DeviceRef) -> Result<(u32, &Engine), SelectError> {
        let slot = self.slots.iter().find(|s| wanted.names(s.index, s.uuid.as_deref()));
        let Some(slot) = slot else {
            return Err(SelectError::NoSuchDevice {
                wanted: wanted.clone(),
                count: self.slots.len(),
                listed: self
                    .slots
                    .iter()
                    .map(|s| format!("{} {}", s.index, s.uuid.as_deref().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        match &slot.state {
            SlotState::Ready(e) => Ok((slot.index, e)),
            SlotState::Failed(reason) => Err(SelectError::Unavailable {
                index: slot.index,
                label: slot.label.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// The engine that handed out `id` (a model, view or lease id), if it serves.
    pub fn for_id(&self, id: u64) -> Option<&Engine> {
        self.slots.get(usize::from(id_prefix_of(id)))?.engine()
    }

    /// Every working device's counters, summed (`peak_device_bytes` is the sum of the
    /// per-device peaks, an upper bound of the peak of the sum).
    pub fn total_stats(&self) -> Stats {
        let mut t = Stats::default();
        for (_, e) in self.ready() {
            t.add(&e.stats());
        }
        t
    }
}

/// The GPUs `select` names among `gpus` (UUIDs by ordinal), in order.
fn cuda_plans(select: Option<&[DeviceRef]>, gpus: &[String]) -> Result<Vec<Plan>, DeviceSetError> {
    let plan = |ordinal: usize| Plan {
        label: format!("cuda:{ordinal}"),
        ordinal,
        uuid: gpus.get(ordinal).cloned(),
        unusable: None,
    };
    let plans: Vec<Plan> = match select {
        None => (0..gpus.len()).map(plan).collect(),
        Some(list) => list
            .iter()
            .map(|r| match r {
                DeviceRef::Index(i) if (*i as usize) < gpus.len() => plan(*i as usize),
                DeviceRef::Index(i) => Plan {
                    label: format!("cuda:{i}"),
                    ordinal: *i as usize,
                    uuid: None,
                    unusable: Some(
                        DeviceError::NoSuchDevice { ordinal: *i as usize, count: gpus.len() }
                            .to_string(),
                    ),
                },
                DeviceRef::Uuid(u) => match gpus.iter().position(|g| g.eq_ignore_ascii_case(u)) {
                    // Known GPUs are checked for duplicates below.
                    Some(o) => plan(o),
                    None => Plan {
                        label: "cuda:?".into(),
                        ordinal: 0,
                        uuid: Some(u.clone()),
                        unusable: Some(format!(
                            "no visible GPU has UUID {u} (visible: {})",
                            gpus.join(", ")
                        )),
                    },
                },
            })
            .collect(),
    };
    if plans.is_empty() {
        return Err(DeviceSetError::Empty);
    }
    if let Some(list) = select {
        for (i, p) in plans.iter().enumerate() {
            let Some(uuid) = p.uuid.as_deref().filter(|_| p.unusable.is_none()) else { continue };
            if let Some(j) = plans[..i].iter().position(|q| {
                q.unusable.is_none()
                    && q.uuid.as_deref().is_some_and(|u| u.eq_ignore_ascii_case(uuid))
            }) {
                return Err(DeviceSetError::Duplicate {
                    first: list[j].clone(),
                    second: list[i].clone(),
                    uuid: uuid.to_string(),
                });
            }
        }
    }
    if plans.len() > MAX_DEVICES {
        return Err(DeviceSetError::TooMany { count: plans.len(), max: MAX_DEVICES });
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_refs_parse_as_index_or_uuid() {
        assert_eq!("3".parse(), Ok(DeviceRef::Index(3)));
        assert_eq!(
            "GPU-0a1b2c3d-0000-1111-2222-333344445555".parse(),
            Ok(DeviceRef::Uuid("GPU-0a1b2c3d-0000-1111-2222-333344445555".into()))
        );
        assert_eq!(" HOST-0001\n".parse(), Ok(DeviceRef::Uuid("HOST-0001".into())));
        assert!("".parse::<DeviceRef>().is_err());
        assert_eq!(
            "99999999999".parse::<DeviceRef>(),
            Err("device index 99999999999 is too large".into())
        );
        assert!("GPU 1".parse::<DeviceRef>().is_err());
        assert!("x".repeat(129).parse::<DeviceRef>().is_err());
    }

    #[test]
    fn a_ref_names_a_device_by_index_or_uuid_in_any_case() {
        assert!(DeviceRef::Index(2).names(2, None));
        assert!(!DeviceRef::Index(2).names(1, Some("GPU-a")));
        assert!(DeviceRef::Uuid("gpu-A".into()).names(7, Some("GPU-a")));
        assert!(!DeviceRef::Uuid("GPU-a".into()).names(0, None));
        assert!(!DeviceRef::Uuid("GPU-a".into()).names(0, Some("GPU-b")));
    }

    #[test]
    fn cuda_selection_keeps_unknown_devices_as_failed() {
        let gpus = vec!["GPU-a".to_string(), "GPU-b".to_string()];
        let plans = cuda_plans(None, &gpus).expect("all");
        assert_eq!(plans.iter().map(|p| p.ordinal).collect::<Vec<_>>(), [0, 1]);
        let sel =
            [DeviceRef::Uuid("gpu-B".into()), DeviceRef::Index(5), DeviceRef::Uuid("x".into())];
        let plans = cuda_plans(Some(&sel), &gpus).expect("some");
        assert_eq!(plans[0].ordinal, 1);
        assert!(plans[0].unusable.is_none());
        assert_eq!(plans[1].unusable.as_deref(), Some("CUDA device 5 does not exist (2 visible)"));
        assert_eq!(
            plans[2].unusable.as_deref(),
            Some("no visible GPU has UUID x (visible: GPU-a, GPU-b)")
        );
        assert!(matches!(cuda_plans(Some(&[]), &gpus), Err(DeviceSetError::Empty)));
        let twice = [DeviceRef::Index(0), DeviceRef::Uuid("gpu-A".into())];
        let err = cuda_plans(Some(&twice), &gpus).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("device 0 and device gpu-A name the same GPU (GPU-a): a GPU is served once")
        );
    }
}
