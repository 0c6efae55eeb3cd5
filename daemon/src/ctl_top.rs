//! `ferryctl top`: a refreshing view of a running ferryd.
//!
//! Each frame is two samples of the daemon's `Stats`, `ListModels` and `ListClients` replies
//! (through [`crate::client::Client`]) taken `--interval` apart: rates (bytes streamed per
//! second, acquires, hit rate, loads, evictions, stall time per second) come from the
//! difference, residency and clients from the second sample. `--once` prints one frame and
//! exits (scripts, tests); otherwise the screen is redrawn every interval until interrupted
//! (or `--count` frames).
//!
//! The protocol's counters are engine-wide: stall time and bytes per model or per client are
//! not reported by ferryd yet, so the per-model rows show residency and the per-client rows
//! models and leases.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, ClientError};
use crate::protocol::{
    ClientInfo, DeviceEntry, ModelInfo, Policy, StatsReply, Threshold, Welcome, features,
};
use crate::units::bytes;

/// `ferryctl top`'s arguments.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// ferryd's socket (default: as `ferryctl status`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between samples (rates are over this interval).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many frames.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Print each frame as one line of JSON instead.
    #[arg(long)]
    pub json: bool,
}

/// One sample of the daemon.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub stats: StatsReply,
    pub models: Vec<ModelInfo>,
    pub clients: Vec<ClientInfo>,
    /// Every device with its counters (empty from a server without `DEVICES`).
    pub devices: Vec<DeviceEntry>,
}

/// Rates between two samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    pub seconds: f64,
    pub bytes_streamed_per_s: f64,
    pub acquires_per_s: f64,
    /// Hits over acquires in the interval (`None` without acquires).
    pub hit_rate: Option<f64>,
    pub loads_per_s: f64,
    pub evictions_per_s: f64,
    /// Seconds of client stall per second (can exceed 1 with several clients).
    pub stall_per_s: f64,
}

impl Rates {
    pub fn between(a: &Sample, b: &Sample) -> Rates {
        Rates::of(a.at, &a.stats, b.at, &b.stats)
    }

    /// Rates between two readings of one set of counters (the daemon's, or one device's).
    pub fn of(t0: Instant, a: &StatsReply, t1: Instant, b: &StatsReply) -> Rates {
        let secs = t1.saturating_duration_since(t0).as_secs_f64().max(1e-9);
        let d = |f: fn(&StatsReply) -> u64| f(b).saturating_sub(f(a)) as f64;
        let acquires = d(|s| s.acquires);
        Rates {
            seconds: secs,
            bytes_streamed_per_s: d(|s| s.bytes_streamed) / secs,
            acquires_per_s: acquires / secs,
            hit_rate: (acquires > 0.0).then(|| d(|s| s.hits) / acquires),
            loads_per_s: d(|s| s.loads) / secs,
            evictions_per_s: d(|s| s.evictions) / secs,
            stall_per_s: d(|s| s.stall_ns) / 1e9 / secs,
        }
    }
}

/// A frame as JSON (`--json`).
#[derive(Debug, Serialize)]
struct JsonFrame<'a> {
    server_version: &'a str,
    device: &'a crate::protocol::DeviceSummary,
    rates: Rates,
    stats: &'a StatsReply,
    models: &'a [ModelInfo],
    clients: &'a [ClientInfo],
    devices: Vec<JsonDevice<'a>>,
}

/// One device in a JSON frame: its entry and its rates over the interval.
#[derive(Debug, Serialize)]
struct JsonDevice<'a> {
    #[serde(flatten)]
    entry: &'a DeviceEntry,
    rates: Option<Rates>,
}

/// Each device of `cur` with its rates since `prev` (None for a device that does not serve).
fn device_rates<'a>(prev: &Sample, cur: &'a Sample) -> Vec<(&'a DeviceEntry, Option<Rates>)> {
    cur.devices
        .iter()
        .map(|d| {
            let before = prev.devices.iter().find(|p| p.index == d.index);
            let rates = match (before.and_then(|p| p.stats.as_ref()), d.stats.as_ref()) {
                (Some(a), Some(b)) => Some(Rates::of(prev.at, a, cur.at, b)),
                _ => None,
            };
            (d, rates)
        })
        .collect()
}

fn take(c: &mut Client) -> Result<Sample, ClientError> {
    let stats = c.stats()?;
    let models = c.list_models()?;
    let clients = c.list_clients()?;
    let devices = if c.has_feature(features::DEVICES) { c.list_devices()? } else { Vec::new() };
    Ok(Sample { at: Instant::now(), stats, models, clients, devices })
}

fn policy_text(p: Option<&Policy>) -> String {
    let t = |t: &Threshold| match t {
        Threshold::Bytes(b) => bytes(*b),
        Threshold::Fraction(f) => format!("{:.0}%", f * 100.0),
    };
    match p {
        None => "-".into(),
        Some(Policy::None) => "none".into(),
        Some(Policy::Component) => "component".into(),
        Some(Policy::Sequential { lookahead }) => format!("sequential ({lookahead})"),
        Some(Policy::Balanced { threshold }) => format!("balanced ({})", t(threshold)),
        Some(Policy::Lru { threshold }) => format!("lru ({})", t(threshold)),
        Some(Policy::Auto) => "auto".into(),
        Some(Policy::Preset { preset }) => {
            crate::engine::policy::Preset::from(*preset).name().into()
        }
    }
}

fn rate_bytes(b: f64) -> String {
    format!("{}/s", bytes(b as u64))
}

/// Columns two spaces apart, numbers right-aligned.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    // Right-aligned: columns of numbers (a `-` for none counts as one), with one at least.
    let mut right = vec![true; headers.len()];
    let mut digits = vec![false; headers.len()];
    for row in rows {
        for (i, c) in row.iter().enumerate().take(headers.len()) {
            widths[i] = widths[i].max(c.chars().count());
            let number = c.starts_with(|ch: char| ch.is_ascii_digit());
            digits[i] |= number;
            right[i] &= number || c == "-";
        }
    }
    for (r, d) in right.iter_mut().zip(&digits) {
        *r &= *d;
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate().take(headers.len()) {
            if i > 0 {
                l.push_str("  ");
            }
            let pad = " ".repeat(widths[i].saturating_sub(c.chars().count()));
            if right[i] {
                l.push_str(&pad);
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&pad);
            }
        }
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut t = line(headers.to_vec());
    for row in rows {
        t.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    t
}

/// One frame as text.
pub fn render(w: &Welcome, socket: &str, me: u64, prev: &Sample, cur: &Sample) -> String {
    let r = Rates::between(prev, cur);
    let s = &cur.stats;
    let pct = |a: u64, b: u64| if b > 0 { 100.0 * a as f64 / b as f64 } else { 0.0 };
    let mut t = format!(
        "ferryd {} on {} — {} ({}), rates over {:.1} s\n",
        w.server_version, socket, w.device.name, w.device.backend, r.seconds
    );
    t.push_str(&format!(
        "device   {} of {} in use ({:.0}%), peak {}, LoRA cache {}\n",
        bytes(s.device_bytes),
        bytes(s.budget),
        pct(s.device_bytes, s.budget),
        bytes(s.peak_device_bytes),
        bytes(s.lora_cache_bytes)
    ));
    t.push_str(&format!(
        "rates    streamed {}  acquires {:.1}/s  hit rate {}  loads {:.1}/s  evictions {:.1}/s  stalled {:.1} ms/s\n",
        rate_bytes(r.bytes_streamed_per_s),
        r.acquires_per_s,
        r.hit_rate.map_or_else(|| "-".into(), |h| format!("{:.1}%", h * 100.0)),
        r.loads_per_s,
        r.evictions_per_s,
        r.stall_per_s * 1e3
    ));
    t.push_str(&format!(
        "totals   streamed {}  acquires {}  hits {} ({:.1}%)  loads {}  evictions {}  stalled {:.3} s\n\n",
        bytes(s.bytes_streamed),
        s.acquires,
        s.hits,
        pct(s.hits, s.acquires),
        s.loads,
        s.evictions,
        s.stall_ns as f64 / 1e9
    ));
    // With several devices, a line each (one device is the totals above).
    if cur.devices.len() > 1 {
        let rows: Vec<Vec<String>> = device_rates(prev, cur)
            .into_iter()
            .map(|(d, r)| match (&d.stats, r, &d.error) {
                (Some(s), Some(r), _) => vec![
                    d.index.to_string(),
                    d.uuid.clone(),
                    format!("{} / {}", bytes(s.device_bytes), bytes(s.budget)),
                    rate_bytes(r.bytes_streamed_per_s),
                    format!("{:.1}/s", r.acquires_per_s),
                    format!("{:.1} ms/s", r.stall_per_s * 1e3),
                    d.waiting.to_string(),
                    d.models.to_string(),
                    d.name.clone(),
                ],
                (_, _, error) => {
                    let mut row = vec![d.index.to_string(), d.uuid.clone()];
                    row.extend(["-", "-", "-", "-", "-", "-"].map(String::from));
                    row.push(match error {
                        Some(e) => format!("unavailable: {e}"),
                        None => "-".into(),
                    });
                    row
                }
            })
            .collect();
        t.push_str(&table(
            &[
                "DEV", "UUID", "IN USE", "STREAMED", "ACQUIRES", "STALLED", "WAITING", "MODELS",
                "STATE",
            ],
            &rows,
        ));
        t.push('\n');
    }
    if cur.models.is_empty() {
        t.push_str("no models open\n");
    } else {
        let rows: Vec<Vec<String>> = cur
            .models
            .iter()
            .map(|m| {
                vec![
                    m.model.to_string(),
                    format!(
                        "{}/{} ({:.0}%)",
                        m.resident_layers,
                        m.layers,
                        pct(u64::from(m.resident_layers), u64::from(m.layers))
                    ),
                    bytes(m.total_bytes),
                    policy_text(m.policy.as_ref()),
                    m.clients.to_string(),
                    m.path.clone(),
                ]
            })
            .collect();
        t.push_str(&table(&["MODEL", "RESIDENT", "SIZE", "POLICY", "CLIENTS", "PATH"], &rows));
    }
    t.push('\n');
    let rows: Vec<Vec<String>> = cur
        .clients
        .iter()
        .map(|c| {
            vec![
                if c.id == me { format!("{}*", c.id) } else { c.id.to_string() },
                c.pid.to_string(),
                c.models.to_string(),
                c.leases.to_string(),
                c.name.clone(),
            ]
        })
        .collect();
    t.push_str(&table(&["CLIENT", "PID", "MODELS", "LEASES", "NAME"], &rows));
    t
}

/// Runs `ferryctl top`.
pub fn run(a: TopArgs) -> Result<(), String> {
    if !(a.interval > 0.0 && a.interval <= 3600.0) {
        return Err(format!("--interval {}: must be in (0, 3600] seconds", a.interval));
    }
    let socket = a.socket.clone().unwrap_or_else(crate::server::default_socket_path);
    let name = format!("ferryctl top {}", crate::VERSION);
    let mut c = Client::connect_with_timeout(&socket, &name, Some(Duration::from_secs(30)))
        .map_err(|e| match e {
            ClientError::Io(e) => format!("ferryd is not answering on {}: {e}", socket.display()),
            e => format!("ferryd at {}: {e}", socket.display()),
        })?;
    let err = |e: ClientError| format!("ferryd at {}: {e}", socket.display());
    let w = c.welcome().clone();
    let me = w.client_id;
    let interval = Duration::from_secs_f64(a.interval);
    let frames = if a.once { Some(1) } else { a.count };
    let mut prev = take(&mut c).map_err(err)?;
    let mut shown = 0u64;
    let stdout = std::io::stdout();
    loop {
        std::thread::sleep(interval);
        let cur = take(&mut c).map_err(err)?;
        let text = if a.json {
            let frame = JsonFrame {
                server_version: &w.server_version,
                device: &w.device,
                rates: Rates::between(&prev, &cur),
                stats: &cur.stats,
                models: &cur.models,
                clients: &cur.clients,
                devices: device_rates(&prev, &cur)
                    .into_iter()
                    .map(|(entry, rates)| JsonDevice { entry, rates })
                    .collect(),
            };
            serde_json::to_string(&frame).map_err(|e| e.to_string())? + "\n"
        } else {
            let body = render(&w, &socket.display().to_string(), me, &prev, &cur);
            // Redraw in place (home, clear) unless printing a single frame.
            if frames == Some(1) { body } else { format!("\x1b[H\x1b[2J{body}") }
        };
        let mut lock = stdout.lock();
        if lock.write_all(text.as_bytes()).and_then(|()| lock.flush()).is_err() {
            break; // stdout closed (a pager quit): stop quietly
        }
        drop(lock);
        shown += 1;
        if frames.is_some_and(|n| shown >= n) {
            break;
        }
        prev = cur;
    }
    let _ = c.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DeviceSummary;

    fn stats(acquires: u64, hits: u64, streamed: u64, stall_ns: u64) -> StatsReply {
        StatsReply {
            acquires,
            hits,
            misses: acquires - hits,
            loads: acquires - hits,
            evictions: 1,
            bytes_streamed: streamed,
            stall_ns,
            device_bytes: 3 << 20,
            peak_device_bytes: 4 << 20,
            budget: 16 << 20,
            lora_cache_bytes: 0,
        }
    }

    #[test]
    fn a_frame_shows_rates_residency_and_clients() {
        let t0 = Instant::now();
        let device = |index: u32, s: Option<StatsReply>, error: Option<&str>| DeviceEntry {
            index,
            label: format!("host:{index}"),
            uuid: format!("HOST-{index:04}"),
            name: "host memory".into(),
            total_memory: 64 << 20,
            numa_node: None,
            error: error.map(String::from),
            stats: s,
            models: 1,
            waiting: index,
        };
        let a = Sample {
            at: t0,
            stats: stats(10, 5, 0, 0),
            models: vec![],
            clients: vec![],
            devices: vec![
                device(0, Some(stats(0, 0, 0, 0)), None),
                device(1, Some(stats(10, 5, 0, 0)), None),
                device(2, None, Some("NUMA node 99 does not exist")),
            ],
        };
        let b = Sample {
            devices: vec![
                device(0, Some(stats(0, 0, 0, 0)), None),
                device(1, Some(stats(30, 20, 4 << 20, 500_000_000)), None),
                device(2, None, Some("NUMA node 99 does not exist")),
            ],
            at: t0 + Duration::from_secs(2),
            stats: stats(30, 20, 4 << 20, 500_000_000),
            models: vec![ModelInfo {
                model: 7,
                path: "/m/x.safetensors".into(),
                source: "single_file".into(),
                total_bytes: 8 << 20,
                layers: 4,
                resident_layers: 1,
                policy: Some(Policy::Sequential { lookahead: 1 }),
                clients: 2,
            }],
            clients: vec![ClientInfo {
                id: 3,
                pid: 42,
                uid: 0,
                gid: 0,
                name: "runner".into(),
                models: 1,
                leases: 2,
            }],
        };
        let r = Rates::between(&a, &b);
        assert_eq!(r.bytes_streamed_per_s, (2 << 20) as f64);
        assert_eq!(r.acquires_per_s, 10.0);
        assert_eq!(r.hit_rate, Some(0.75));
        assert_eq!(r.stall_per_s, 0.25);
        let w = Welcome {
            version: 1,
            features: 0,
            client_id: 3,
            server_version: "0.1.0".into(),
            max_body_len: 0,
            max_fds: 0,
            device: DeviceSummary {
                backend: "host".into(),
                name: "host memory".into(),
                uuid: String::new(),
                total_memory: 0,
                budget: 16 << 20,
            },
        };
        let text = render(&w, "/s.sock", 3, &a, &b);
        for want in [
            "ferryd 0.1.0 on /s.sock",
            "3.0 MiB of 16.0 MiB in use (19%)",
            "streamed 2.0 MiB/s",
            "acquires 10.0/s",
            "hit rate 75.0%",
            "stalled 250.0 ms/s",
            "1/4 (25%)",
            "sequential (1)",
            "/m/x.safetensors",
            "3*",
            "runner",
            "unavailable: NUMA node 99 does not exist",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // Device 1's own rates, on its own line.
        let line = text.lines().find(|l| l.contains("HOST-0001")).unwrap_or_default();
        for want in ["3.0 MiB / 16.0 MiB", "2.0 MiB/s", "10.0/s", "250.0 ms/s"] {
            assert!(line.contains(want), "missing {want:?} in {line:?}");
        }
    }
}
