//! ferryd's configuration file (`/etc/ferry/ferryd.toml`). Every key is optional; a flag given
//! on the command line overrides the file. Unknown keys are errors, so a typo cannot silently
//! fall back to a default. `deploy/ferryd.toml` is a commented example of every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::DeviceChoice;
use crate::devices::DeviceRef;
use crate::engine::policy::PolicyChoice;

/// Where ferryd looks when no `--config` is given (a missing file there is not an error).
pub const DEFAULT_PATH: &str = "/etc/ferry/ferryd.toml";

/// The file's contents.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FerrydConfig {
    /// `auto` (CUDA if a driver is present, else host), `cuda` or `host`.
    pub device: Option<DeviceChoice>,
    /// CUDA: the GPUs to serve (CUDA indices or UUIDs), in ferryd's device order (default:
    /// every visible GPU).
    #[serde(default)]
    pub devices: Vec<DeviceRef>,
    /// Host backend: how many devices to simulate (default 1).
    pub host_devices: Option<u32>,
    /// NUMA placement of each device's staging ring and I/O threads: `auto` (the node nearest
    /// the device, from sysfs) or `off`.
    pub numa: Option<NumaMode>,
    /// A NUMA node per device, overriding `numa` (keys: ferryd device index or UUID).
    #[serde(default)]
    pub numa_nodes: BTreeMap<String, u32>,
    /// Device memory the engine may use on each device, in bytes (default: 75% of the device).
    pub budget: Option<u64>,
    /// Bytes of "device memory" the host backend offers (default 4 GiB).
    pub host_memory: Option<u64>,
    /// The residency policy of models whose client sets none: `auto` (the default), a policy
    /// (`none`, `component`, `sequential`, `balanced`, `lru`) or a preset (`lowvram`,
    /// `medvram`, `model`).
    pub default_policy: Option<PolicyChoice>,
    /// Under `auto`, devices with at most this many bytes of memory get `sequential`, larger
    /// ones `balanced` (default 4 GiB).
    pub auto_sequential_max: Option<u64>,
    /// The Unix socket to listen on (ignored under socket activation).
    pub socket: Option<PathBuf>,
    /// Directories under which clients may open models and LoRA files by path.
    #[serde(default)]
    pub model_roots: Vec<PathBuf>,
    /// uids allowed to connect (none, with no `allow_gids` either: the daemon's uid and root).
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Primary gids allowed to connect.
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// Most clients connected at once.
    pub max_clients: Option<usize>,
    /// Most leases one client may hold at once.
    pub max_leases_per_client: Option<usize>,
    /// Most LoRA views one client may have open at once.
    pub max_views_per_client: Option<usize>,
    /// CUDA: offer interprocess ready events to clients (`acquire_event`); default false.
    pub cuda_events: Option<bool>,
    /// Models opened at start and kept open.
    #[serde(default)]
    pub preload: Vec<PathBuf>,
    /// Models opened at start on a named device (keys: ferryd device index or UUID).
    #[serde(default)]
    pub preload_on: BTreeMap<String, Vec<PathBuf>>,
    /// Log filter, tracing's EnvFilter syntax (`info`, `ferry=debug`, ...).
    pub log: Option<String>,
}

/// `numa = "auto" | "off"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NumaMode {
    /// Bind each device's staging ring and I/O threads to the node nearest it (sysfs); no
    /// binding where that is unknown.
    #[default]
    Auto,
    /// No binding.
    Off,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

impl FerrydConfig {
    /// Parses a configuration from TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<FerrydConfig, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Reads `path`; with `required` false a missing file is an empty configuration.
    pub fn load(path: &Path, required: bool) -> Result<FerrydConfig, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => FerrydConfig::parse(&text, path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(FerrydConfig::default())
            }
            Err(source) => Err(ConfigError::Io { path: path.to_path_buf(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses() {
        let text = r#"
            device = "host"
            budget = 1073741824
            host_memory = 2147483648
            default_policy = "lowvram"
            auto_sequential_max = 8589934592
            socket = "/run/ferry/ferryd.sock"
            model_roots = ["/models", "/srv/loras"]
            allow_uids = [1000]
            allow_gids = [44]
            max_clients = 64
            preload = ["/models/sdxl"]
            log = "ferry=debug"
        "#;
        let c = FerrydConfig::parse(text, Path::new("x.toml")).unwrap();
        assert_eq!(c.device, Some(DeviceChoice::Host));
        assert_eq!(c.budget, Some(1 << 30));
        assert_eq!(c.default_policy, Some(crate::engine::policy::Preset::LowVram.into()));
        assert_eq!(c.auto_sequential_max, Some(8 << 30));
        assert_eq!(c.model_roots.len(), 2);
        assert_eq!(c.allow_gids, [44]);
        assert_eq!(c.max_clients, Some(64));
        assert_eq!(c.log.as_deref(), Some("ferry=debug"));
    }

    #[test]
    fn device_keys_parse() {
        let text = r#"
            devices = [0, "GPU-0a1b2c3d-0000-1111-2222-333344445555", "2"]
            host_devices = 4
            numa = "off"
            numa_nodes = { "1" = 0, "HOST-0002" = 1 }
            preload_on = { "HOST-0001" = ["/models/sdxl", "/models/refiner"] }
            cuda_events = true
        "#;
        let c = FerrydConfig::parse(text, Path::new("x.toml")).unwrap();
        assert_eq!(
            c.devices,
            [
                DeviceRef::Index(0),
                DeviceRef::Uuid("GPU-0a1b2c3d-0000-1111-2222-333344445555".into()),
                DeviceRef::Index(2)
            ]
        );
        assert_eq!(c.host_devices, Some(4));
        assert_eq!(c.numa, Some(NumaMode::Off));
        assert_eq!(c.numa_nodes.get("HOST-0002"), Some(&1));
        assert_eq!(c.preload_on.get("HOST-0001").map(Vec::len), Some(2));
        assert_eq!(c.cuda_events, Some(true));
        for (bad, named) in [
            ("devices = [-1]", "negative"),
            ("devices = [\"GPU 1\"]", "neither a device index nor a UUID"),
            ("numa = \"near\"", "near"),
        ] {
            let err = FerrydConfig::parse(bad, Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = FerrydConfig::parse("budgte = 5", Path::new("/etc/ferry/ferryd.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/ferry/ferryd.toml") && err.contains("budgte"), "{err}");
        let err = FerrydConfig::parse("device = \"tpu\"", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("tpu"), "{err}");
        let err = FerrydConfig::parse("budget = -1", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("budget"), "{err}");
        let err = FerrydConfig::parse("default_policy = \"lowram\"", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("default_policy") && err.contains("\"lowram\"") && err.contains("lowvram"),
            "{err}"
        );
    }

    #[test]
    fn every_policy_name_and_preset_resolves_through_the_config() {
        use crate::engine::policy::{PolicySpec, Threshold};
        let gib = 1u64 << 30;
        let cases = [
            ("auto", 80 * gib, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) }),
            ("auto", 4 * gib, PolicySpec::Sequential { lookahead: 1 }),
            ("lowvram", 80 * gib, PolicySpec::Sequential { lookahead: 1 }),
            ("medvram", 80 * gib, PolicySpec::Component),
            ("model", 80 * gib, PolicySpec::Component),
            ("MedVRAM", gib, PolicySpec::Component),
            ("none", gib, PolicySpec::None),
            ("component", gib, PolicySpec::Component),
            ("sequential", gib, PolicySpec::Sequential { lookahead: 1 }),
            ("balanced", gib, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) }),
            ("lru", gib, PolicySpec::Lru { threshold: Threshold::Fraction(0.75) }),
        ];
        for (name, device, spec) in cases {
            let text = format!("default_policy = {name:?}");
            let c = FerrydConfig::parse(&text, Path::new("c.toml")).expect(name);
            let choice = c.default_policy.expect(name);
            let resolved =
                choice.resolve(device, crate::engine::policy::choice::AUTO_SEQUENTIAL_MAX);
            assert_eq!(resolved.spec, spec, "{name}");
        }
    }

    #[test]
    fn a_missing_default_file_is_empty_but_a_missing_given_file_is_an_error() {
        let missing = Path::new("/nonexistent/ferryd.toml");
        assert_eq!(FerrydConfig::load(missing, false).unwrap(), FerrydConfig::default());
        assert!(matches!(FerrydConfig::load(missing, true), Err(ConfigError::Io { .. })));
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ferryd.toml");
        let c = FerrydConfig::load(Path::new(path), true).unwrap();
        assert_eq!(c.device, Some(DeviceChoice::Auto));
        assert_eq!(c.default_policy, Some(PolicyChoice::Auto));
    }
}
