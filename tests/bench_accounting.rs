//! The offload table's accounting (`ferryctl bench --synthetic ...`), checked against figures
//! derived independently of the engine:
//!
//! - the model's layer table is rebuilt from the files themselves, read with the `safetensors`
//!   crate (every tensor's bytes, grouped by component folder and layer-name prefix);
//! - bytes moved per pass must be what each policy promises for that table: nothing for
//!   `none`, exactly the model minus the resident set for `balanced`, whole components for
//!   `component`, at most the model for `sequential`; and they must equal the bytes of the
//!   layers the timeline shows being loaded during the timed passes;
//! - the device peak never exceeds the budget;
//! - the timeline is valid trace-event JSON with the client, I/O and copy tracks, and spans on
//!   each track nest (a span that starts inside another ends inside it);
//! - `ferryctl bench --json` parses, `--trace` and `--plot` write their files, `--markdown`
//!   is a table.
//!
//! Models are tiny (widths divided by 48–64) so the whole file runs in seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry::bench::offload::{self, OffloadConfig};
use ferry::bench::synthetic::Arch;
use ferry::device::DeviceChoice;
use ferry_tests::cargo_bin;

/// Component → (tensor name → bytes), read with the `safetensors` crate.
type Table = BTreeMap<String, BTreeMap<String, u64>>;

/// Every `.safetensors` file under `root`, by component folder ("model" for files at the root).
fn read_table(root: &Path) -> Table {
    let mut table = Table::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let component = if dir == root {
                "model".to_string()
            } else {
                dir.file_name().expect("name").to_string_lossy().into_owned()
            };
            let bytes = std::fs::read(&path).expect("read");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
            let entry = table.entry(component).or_default();
            for (name, view) in st.tensors() {
                entry.insert(name, view.data().len() as u64);
            }
        }
    }
    table
}

/// Bytes of `component/layer`: the tensors named `layer` or `layer.…` in that component.
fn layer_bytes(table: &Table, layer: &str) -> u64 {
    let (comp, prefix) = layer.split_once('/').expect("component/layer");
    let tensors = table.get(comp).unwrap_or_else(|| panic!("no component {comp}"));
    let with_dot = format!("{prefix}.");
    let bytes: u64 = tensors
        .iter()
        .filter(|(n, _)| n.as_str() == prefix || n.starts_with(&with_dot))
        .map(|(_, b)| *b)
        .sum();
    assert!(bytes > 0, "layer {layer} has no tensors in the files");
    bytes
}

fn total(table: &Table) -> u64 {
    table.values().flat_map(|t| t.values()).sum()
}

/// Every subset sum of the components' bytes.
fn component_subset_sums(table: &Table) -> BTreeSet<u64> {
    let sizes: Vec<u64> = table.values().map(|t| t.values().sum()).collect();
    (0u32..1 << sizes.len())
        .map(|mask| {
            sizes.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, s)| s).sum()
        })
        .collect()
}

/// Checks the trace-event JSON: metadata names the expected tracks, every complete event has
/// a non-negative duration, and on each track spans nest. Returns the track names.
fn check_trace_json(v: &serde_json::Value) -> BTreeMap<u64, String> {
    let events = v["traceEvents"].as_array().expect("traceEvents array");
    let mut names = BTreeMap::new();
    let mut spans: BTreeMap<u64, Vec<(f64, f64, String)>> = BTreeMap::new();
    for e in events {
        let tid = e["tid"].as_u64().expect("tid");
        assert!(e["pid"].as_u64().is_some(), "pid: {e}");
        match e["ph"].as_str().expect("ph") {
            "M" => {
                if e["name"] == "thread_name" {
                    names.insert(tid, e["args"]["name"].as_str().expect("name").to_string());
                }
            }
            "X" => {
                let ts = e["ts"].as_f64().expect("ts");
                let dur = e["dur"].as_f64().expect("dur");
                assert!(ts >= 0.0 && dur >= 0.0, "begin <= end: {e}");
                let name = e["name"].as_str().expect("name").to_string();
                spans.entry(tid).or_default().push((ts, ts + dur, name));
            }
            "i" => assert!(e["ts"].as_f64().is_some(), "instant ts: {e}"),
            other => panic!("unexpected phase {other}: {e}"),
        }
    }
    for (tid, list) in &mut spans {
        assert!(names.contains_key(tid), "track {tid} has no thread_name");
        // Outer spans first: by start, longer first on ties.
        list.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut stack: Vec<(f64, f64, String)> = Vec::new();
        const EPS: f64 = 1e-3; // µs printed from integer nanoseconds
        for s in list.iter() {
            while stack.last().is_some_and(|top| top.1 <= s.0 + EPS) {
                stack.pop();
            }
            if let Some(top) = stack.last() {
                assert!(
                    s.1 <= top.1 + EPS,
                    "on track {} span {:?} [{}, {}] starts inside {:?} [{}, {}] but ends after it",
                    names[tid],
                    s.2,
                    s.0,
                    s.1,
                    top.2,
                    top.0,
                    top.1
                );
            }
            stack.push(s.clone());
        }
    }
    names
}

#[test]
fn offload_table_moves_what_each_policy_promises() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = OffloadConfig::synthetic(Arch::Sdxl, 48, dir.path().to_path_buf());
    cfg.device = DeviceChoice::Host;
    cfg.passes = 2;
    cfg.compute_ratio = 0.5;
    // An acquire that finds no room waits this long for a release before retrying.
    cfg.acquire_timeout = Duration::from_millis(50);
    let (report, trace) = offload::run(&cfg).expect("bench");
    let trace = trace.expect("the recorder was free");
    let root = Path::new(&report.path);
    let table = read_table(root);
    let model = total(&table);

    // The report describes the files.
    assert_eq!(report.model_bytes, model);
    assert_eq!(report.components.len(), 4);
    for c in &report.components {
        assert_eq!(c.bytes, table[&c.name].values().sum::<u64>(), "{}", c.name);
    }
    let policies: Vec<(&str, &str)> =
        report.rows.iter().map(|r| (r.policy.as_str(), r.lora.as_str())).collect();
    let mut want = Vec::new();
    for p in ["none", "component", "sequential", "balanced"] {
        for m in ["none", "backup", "fuse"] {
            want.push((p, m));
        }
    }
    assert_eq!(policies, want);

    let subsets = component_subset_sums(&table);
    for row in &report.rows {
        let what = format!("{} / LoRA {}", row.policy, row.lora);
        assert_eq!(row.error, None, "{what}");
        assert!(row.peak_device_bytes <= row.budget_bytes, "{what}: device peak over the budget");
        assert!(row.passes_per_s > 0.0, "{what}");
        match row.policy.as_str() {
            "none" => {
                assert_eq!(row.budget_bytes, report.device_bytes, "{what}");
                assert_eq!(row.first_pass_bytes, model, "{what}: everything loads once");
                assert_eq!(row.bytes_per_pass, 0, "{what}: nothing moves after");
                assert_eq!(row.hit_rate, 1.0, "{what}");
            }
            "balanced" => {
                let kept: u64 = row.kept_layers.iter().map(|l| layer_bytes(&table, l)).sum();
                assert!(kept > 0 && kept < model, "{what}: a resident set, not the whole model");
                assert!(kept <= row.budget_bytes, "{what}");
                // At least the minimum; exactly it once the engine stops reloading layers
                // within a pass (see `balanced_moves_exactly_the_minimum`).
                assert!(row.bytes_per_pass >= model - kept, "{what}: below model − resident set");
            }
            "component" => {
                assert!(
                    subsets.contains(&row.bytes_per_pass),
                    "{what}: {} is not a sum of whole components {subsets:?}",
                    row.bytes_per_pass
                );
                assert!(row.bytes_per_pass >= model.saturating_sub(row.budget_bytes), "{what}");
            }
            "sequential" => {
                assert!(row.bytes_per_pass >= model.saturating_sub(row.budget_bytes), "{what}");
            }
            other => panic!("unexpected policy {other}"),
        }
        if row.lora != "none" {
            assert!(row.lora_overhead_first_s.is_some(), "{what}");
            let adapted = report.lora.as_ref().map(|l| l.adapted_tensors);
            assert_eq!(row.lora_merged_tensors, adapted, "{what}: every target adapted");
            assert_eq!(row.lora_unmatched, Some(0), "{what}");
        }
    }
    let fuse_cache = report.rows.iter().find(|r| r.policy == "none" && r.lora == "fuse");
    assert!(fuse_cache.is_some_and(|r| r.lora_cache_bytes > 0), "fuse caches merged layers");

    // The timeline: the loads in each row's timed passes add up to its bytes per pass.
    let client = trace
        .threads
        .iter()
        .find(|(_, n)| n.as_str() == "client (compute)")
        .map(|(t, _)| *t)
        .expect("client track");
    let on_client: Vec<&ferry::trace::Event> =
        trace.events.iter().filter(|e| e.tid == client).collect();
    for row in &report.rows {
        let label = format!("{} / LoRA {}", row.policy, row.lora);
        let span = on_client.iter().find(|e| e.name == label).expect("row span");
        let passes: Vec<&&ferry::trace::Event> = on_client
            .iter()
            .filter(|e| {
                e.name.starts_with("pass ")
                    && e.name != "pass 0"
                    && e.ts_ns >= span.ts_ns
                    && e.end_ns() <= span.end_ns()
            })
            .collect();
        assert_eq!(passes.len(), report.passes, "{label}");
        let (from, to) = (passes[0].ts_ns, passes[passes.len() - 1].end_ns());
        let loaded: u64 = on_client
            .iter()
            .filter(|e| e.cat == "engine" && e.name.starts_with("load ") && e.ts_ns >= from)
            .filter(|e| e.ts_ns <= to)
            .map(|e| {
                let layer = e.args.iter().find(|(k, _)| *k == "layer").expect("layer arg");
                match &layer.1 {
                    ferry::trace::Arg::Str(s) => layer_bytes(&table, s),
                    ferry::trace::Arg::U64(_) => panic!("layer arg is a name"),
                }
            })
            .sum();
        assert_eq!(
            loaded,
            row.bytes_per_pass * report.passes as u64,
            "{label}: layers loaded in the timed passes (from the files) vs the engine's counter"
        );
    }

    // As JSON: valid, tracks for the client, the I/O thread (LoRA rows stage through it) and
    // the copy thread, spans nested.
    let text = serde_json::to_string(&trace.to_json("bench test")).expect("serialize");
    let v: serde_json::Value = serde_json::from_str(&text).expect("trace JSON parses");
    let tracks: BTreeSet<String> = check_trace_json(&v).into_values().collect();
    for want in ["client (compute)", "ferry-io-0", "ferry-copy-0"] {
        assert!(tracks.contains(want), "track {want} missing from {tracks:?}");
    }
    let names: BTreeSet<&str> = v["traceEvents"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for want in ["acquire", "wait ready", "copy", "pass 1"] {
        assert!(names.contains(want), "no {want:?} event");
    }
    assert!(names.iter().any(|n| n.starts_with("evict ")), "evictions are instants");
}

#[test]
fn ferryctl_bench_writes_json_trace_plot_and_markdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (trace, plot) = (dir.path().join("t.json"), dir.path().join("p.png"));
    let common = [
        "bench",
        "--synthetic",
        "llm-7b",
        "--scale",
        "64",
        "--passes",
        "1",
        "--device",
        "host",
        "--no-lora",
        "--acquire-timeout",
        "0.05",
    ];
    let out = Command::new(cargo_bin("ferryctl"))
        .args(common)
        .arg("--dir")
        .arg(dir.path())
        .args(["--json", "--trace"])
        .arg(&trace)
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("run ferryctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json parses");
    assert_eq!(report["synthetic"], "llm-7b");
    assert_eq!(report["backend"], "host");
    assert_eq!(report["layers"], 35);
    let rows = report["rows"].as_array().expect("rows");
    let policies: Vec<&str> = rows.iter().filter_map(|r| r["policy"].as_str()).collect();
    assert_eq!(policies, ["none", "component", "sequential", "balanced"]);
    // One component: `component` cannot keep it whole in 80% of the model, and says so.
    let component = &rows[1];
    assert!(component["error"].as_str().is_some_and(|e| e.contains("component")), "{component}");
    for r in [&rows[0], &rows[2], &rows[3]] {
        assert!(r["error"].is_null(), "{r}");
        assert!(r["passes_per_s"].as_f64().is_some_and(|p| p > 0.0), "{r}");
        assert!(r["peak_device_bytes"].as_u64() <= r["budget_bytes"].as_u64(), "{r}");
    }
    assert!(
        report["model_bytes"].as_u64()
            == Some(ferry::bench::synthetic::total_bytes(Arch::Llm7b, 64)),
        "{}",
        report["model_bytes"]
    );

    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("trace written")).expect("trace JSON");
    let tracks: BTreeSet<String> = check_trace_json(&v).into_values().collect();
    assert!(tracks.contains("client (compute)") && tracks.contains("ferry-copy-0"), "{tracks:?}");

    let png = std::fs::read(&plot).expect("plot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().expect("4")), 1400);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().expect("4")), 620);

    let md = Command::new(cargo_bin("ferryctl"))
        .args(common)
        .arg("--dir")
        .arg(dir.path())
        .arg("--markdown")
        .output()
        .expect("run ferryctl");
    assert!(md.status.success(), "{}", String::from_utf8_lossy(&md.stderr));
    let md = String::from_utf8(md.stdout).expect("utf-8");
    assert!(md.starts_with("- ferry bench: llm-7b (synthetic, scale 64)"), "{md}");
    assert!(md.contains("| policy | LoRA | budget |"), "{md}");
    assert_eq!(md.lines().filter(|l| l.starts_with("| balanced |")).count(), 1, "{md}");

    // A timeline or plot needs a model.
    let bad = Command::new(cargo_bin("ferryctl"))
        .args(["bench", "--trace"])
        .arg(&trace)
        .output()
        .expect("run ferryctl");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--trace needs a model"));
}

/// Loads per layer in each timed pass of a row, from the timeline.
fn loads_per_pass(trace: &ferry::trace::Trace, row: &str) -> Vec<BTreeMap<String, u32>> {
    let client = trace
        .threads
        .iter()
        .find(|(_, n)| n.as_str() == "client (compute)")
        .map(|(t, _)| *t)
        .expect("client track");
    let on_client: Vec<&ferry::trace::Event> =
        trace.events.iter().filter(|e| e.tid == client).collect();
    let span = on_client.iter().find(|e| e.name == row).expect("row span");
    on_client
        .iter()
        .filter(|e| e.name.starts_with("pass ") && e.name != "pass 0")
        .filter(|e| e.ts_ns >= span.ts_ns && e.end_ns() <= span.end_ns())
        .map(|pass| {
            let mut loads = BTreeMap::new();
            for e in &on_client {
                if e.name.starts_with("load ") && e.ts_ns >= pass.ts_ns && e.ts_ns <= pass.end_ns()
                {
                    *loads.entry(e.name.to_string()).or_insert(0) += 1;
                }
            }
            loads
        })
        .collect()
}

/// `balanced` promises the minimum, model − resident set, every pass, and no policy should
/// copy a layer twice in one pass.
///
/// A regression test for an engine bug found by the timeline: an acquire's own prefetch could
/// evict the layer being acquired to open a hole (`Scope::place` → `hole_victims`), and the
/// acquire then waited for a release that never came before loading it again. Only the load
/// a client waits for may make hole evictions now.
#[test]
fn balanced_moves_exactly_the_minimum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = OffloadConfig::synthetic(Arch::Sdxl, 48, dir.path().to_path_buf());
    cfg.device = DeviceChoice::Host;
    cfg.passes = 2;
    cfg.loras = false;
    cfg.compute_ratio = 0.5;
    cfg.acquire_timeout = Duration::from_millis(50);
    let (report, trace) = offload::run(&cfg).expect("bench");
    let trace = trace.expect("the recorder was free");
    let table = read_table(Path::new(&report.path));
    let model = total(&table);
    for row in &report.rows {
        let label = format!("{} / LoRA {}", row.policy, row.lora);
        for (i, loads) in loads_per_pass(&trace, &label).iter().enumerate() {
            let twice: Vec<_> = loads.iter().filter(|(_, n)| **n > 1).collect();
            assert!(twice.is_empty(), "{label}, pass {}: loaded more than once: {twice:?}", i + 1);
        }
        if row.policy == "balanced" {
            let kept: u64 = row.kept_layers.iter().map(|l| layer_bytes(&table, l)).sum();
            assert_eq!(row.bytes_per_pass, model - kept, "{label}: model − resident set");
        }
        if row.policy == "sequential" {
            assert!(row.bytes_per_pass <= model, "{label}");
        }
    }
}
