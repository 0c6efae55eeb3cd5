//! `deploy/k8s/` and the `Dockerfile`, checked without a cluster or a Docker engine.
//!
//! - Every manifest under deploy/k8s is parsed (YAML → JSON, as the API server sees it) and
//!   validated against the official Kubernetes JSON schema of its kind, strict (unknown fields
//!   are errors), from schemas committed under tests/fixtures/k8s/schemas (no network). A
//!   misspelt field, in a committed broken manifest and in mutations of the real DaemonSet, is
//!   rejected, so the validator is known to bite.
//! - YAML that Kubernetes' YAML 1.1 parser reads differently from a YAML 1.2 one (`yes`,
//!   `off`, `0644`) is refused, so what is validated here is what the cluster gets.
//! - The pieces agree: the ConfigMap's ferryd.toml parses with ferry's own parser; the socket,
//!   model roots, config path, uid and gid are the same in the ConfigMap, the DaemonSet, the
//!   example client and the Dockerfile; the probes are real `ferryctl` commands that succeed
//!   against a live ferryd started from that ConfigMap (and fail once it stops).
//! - The Dockerfile builds what the README's first command builds (plus ferryctl).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use ferry::config::FerrydConfig;
use ferry_tests::cargo_bin;
use serde_json::{Map, Value, json};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;
use yaml_rust2::{Yaml, YamlLoader};

/// The Kubernetes version the manifests are validated against (see the schemas' README).
const SCHEMAS: &str = "tests/fixtures/k8s/schemas/v1.30.0-local-strict";
/// How the kind schemas refer to the shared definitions (their `$ref`s are relative to it).
const DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// YAML → JSON

/// Plain scalars that YAML 1.1 (Kubernetes' parser, go-yaml v2 behind sigs.k8s.io/yaml) reads
/// as booleans and YAML 1.2 (yaml-rust2, this test) as strings.
const YAML11_BOOLEANS: &[&str] = &[
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

/// A plain scalar Kubernetes would read differently from this test, or `None`.
fn yaml11_disagreement(plain: &str) -> Option<&'static str> {
    if YAML11_BOOLEANS.contains(&plain) {
        return Some("YAML 1.1 reads it as a boolean: quote it");
    }
    // `0644` is octal (420) to YAML 1.1, decimal 644 to YAML 1.2.
    let digits = plain.strip_prefix(['+', '-']).unwrap_or(plain);
    if digits.len() > 1 && digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Some(
            "YAML 1.1 reads a leading 0 as octal, YAML 1.2 as decimal: write it in decimal",
        );
    }
    None
}

/// The documents of a YAML stream as JSON (empty documents skipped, as kubectl does). Refuses
/// duplicate keys, non-string keys, aliases and scalars the two YAML versions disagree on.
fn yaml_documents(text: &str, name: &str) -> Result<Vec<Value>, String> {
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| format!("{name}: {e}"))?;
        match event {
            Event::StreamEnd => break,
            Event::Scalar(value, TScalarStyle::Plain, _, None) => {
                if let Some(why) = yaml11_disagreement(&value) {
                    return Err(format!("{name}:{}: `{value}`: {why}", mark.line()));
                }
            }
            Event::Alias(_) => {
                return Err(format!(
                    "{name}:{}: an alias: write the value out, so each object reads on its own",
                    mark.line()
                ));
            }
            _ => {}
        }
    }
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("{name}: {e}"))?;
    docs.into_iter()
        .enumerate()
        .filter(|(_, d)| !matches!(d, Yaml::Null))
        .map(|(i, d)| to_json(d, &format!("{name}[{i}]")))
        .collect()
}

fn to_json(y: Yaml, at: &str) -> Result<Value, String> {
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(i) => Value::from(i),
        Yaml::Real(_) => y
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{at}: {y:?} is not a finite number"))?,
        Yaml::String(s) => Value::String(s),
        Yaml::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| to_json(item, &format!("{at}/{i}")))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Hash(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let Yaml::String(k) = k else {
                    return Err(format!("{at}: a key that is not a string: {k:?}"));
                };
                let v = to_json(v, &format!("{at}/{k}"))?;
                map.insert(k, v);
            }
            Value::Object(map)
        }
        Yaml::Alias(_) | Yaml::BadValue => {
            return Err(format!("{at}: unsupported YAML node {y:?}"));
        }
    })
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every `.yaml`/`.yml` file under `dir`, sorted, as (path relative to the repo, documents).
fn manifests(dir: &str) -> Vec<(String, Vec<Value>)> {
    let mut paths = files_under(&repo(dir));
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    assert!(!paths.is_empty(), "no manifests under {dir}");
    let root = repo("");
    paths
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).expect("under the repo").display().to_string();
            let text = std::fs::read_to_string(&p).expect("read manifest");
            let docs = yaml_documents(&text, &rel).unwrap_or_else(|e| panic!("{e}"));
            (rel, docs)
        })
        .collect()
}

fn is_kustomization(doc: &Value) -> bool {
    doc["kind"] == "Kustomization"
}

/// The Kubernetes objects under deploy/k8s (the kustomization file left out).
fn objects() -> Vec<(String, Value)> {
    manifests("deploy/k8s")
        .into_iter()
        .flat_map(|(file, docs)| docs.into_iter().map(move |d| (file.clone(), d)))
        .filter(|(_, d)| !is_kustomization(d))
        .collect()
}

fn object(kind: &str, name: &str) -> Value {
    let found: Vec<Value> = objects()
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name} under deploy/k8s");
    found.into_iter().next().expect("one")
}

// ---------------------------------------------------------------------------------------------
// Schemas

/// The committed schemas: the shared definitions, registered under their `$id` (nothing can be
/// fetched: a `$ref` to anything else fails to build), and one file per kind, read as needed.
struct Schemas {
    registry: jsonschema::Registry<'static>,
}

impl Schemas {
    fn load() -> Schemas {
        let defs: Value =
            serde_json::from_str(&read(&format!("{SCHEMAS}/_definitions.json"))).expect("json");
        let registry = jsonschema::Registry::new()
            .add(DEFINITIONS_URI, defs)
            .expect("definitions resource")
            .prepare()
            .expect("prepared registry");
        Schemas { registry }
    }

    /// `kind-group-version` as kubernetes-validate names its files (core kinds have no group;
    /// a group is its first DNS label: `rbac.authorization.k8s.io/v1` → `rbac`).
    fn stem(doc: &Value) -> Result<String, String> {
        let api_version = doc["apiVersion"].as_str().ok_or("no apiVersion")?;
        let kind = doc["kind"].as_str().ok_or("no kind")?;
        Ok(match api_version.split_once('/') {
            Some((group, version)) => {
                let group = group.split('.').next().unwrap_or(group);
                format!("{}-{group}-{version}", kind.to_lowercase())
            }
            None => format!("{}-{api_version}", kind.to_lowercase()),
        })
    }

    /// The schema errors of `doc`, each with the JSON path it points at.
    fn errors(&self, doc: &Value) -> Result<Vec<String>, String> {
        let stem = Schemas::stem(doc)?;
        let path = repo(&format!("{SCHEMAS}/{stem}.json"));
        let text = std::fs::read_to_string(&path).map_err(|_| {
            format!(
                "no schema for {stem} ({}): add it to KINDS in tests/fixtures/k8s/update_schemas.py and rerun it",
                path.display()
            )
        })?;
        let schema: Value = serde_json::from_str(&text).map_err(|e| format!("{stem}: {e}"))?;
        let validator = jsonschema::options()
            .with_registry(&self.registry)
            .build(&schema)
            .map_err(|e| format!("{stem}: {e}"))?;
        Ok(validator.iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect())
    }
}

#[test]
fn every_manifest_matches_the_kubernetes_schema_of_its_kind() {
    let schemas = Schemas::load();
    let mut checked = BTreeMap::new();
    let mut failures = Vec::new();
    for (file, doc) in objects() {
        let label = format!("{file}: {} {}", doc["kind"], doc["metadata"]["name"]);
        match schemas.errors(&doc) {
            Ok(errors) if errors.is_empty() => {
                *checked.entry(Schemas::stem(&doc).expect("stem")).or_insert(0) += 1;
            }
            Ok(errors) => failures.extend(errors.into_iter().map(|e| format!("{label}: {e}"))),
            Err(e) => failures.push(format!("{label}: {e}")),
        }
    }
    assert!(failures.is_empty(), "manifests that do not validate:\n{}", failures.join("\n"));
    // Every kind the deployment is made of was really checked.
    let kinds: BTreeSet<&str> = checked.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["configmap-v1", "daemonset-apps-v1", "namespace-v1", "pod-v1"]),
        "{checked:?}"
    );
}

#[test]
fn a_manifest_with_a_misspelt_field_is_rejected() {
    let schemas = Schemas::load();
    let rel = "tests/fixtures/k8s/broken/daemonset-typo.yaml";
    let docs = yaml_documents(&read(rel), rel).expect("valid YAML");
    assert_eq!(docs.len(), 1);
    let errors = schemas.errors(&docs[0]).expect("schema found");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("'readinesProbe' was unexpected")
            && errors[0].ends_with("at /spec/template/spec/containers/0"),
        "{errors:#?}"
    );
}

#[test]
fn mistakes_in_the_real_daemonset_are_rejected() {
    let schemas = Schemas::load();
    let good = object("DaemonSet", "ferryd");
    assert_eq!(schemas.errors(&good), Ok(vec![]));

    type Mutation = (&'static str, fn(&mut Value), &'static str);
    let mutations: [Mutation; 5] = [
        (
            "volumeMounts misspelt",
            |d| {
                let c =
                    d["spec"]["template"]["spec"]["containers"][0].as_object_mut().expect("obj");
                let mounts = c.remove("volumeMounts").expect("mounts");
                c.insert("volumeMount".into(), mounts);
            },
            "'volumeMount' was unexpected",
        ),
        (
            "an unquoted boolean label value",
            |d| {
                d["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.present"] =
                    json!(true)
            },
            "/spec/template/spec/nodeSelector/nvidia.com~1gpu.present",
        ),
        (
            "a probe's command as a string",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["command"] =
                    json!("ferryctl status")
            },
            "/spec/template/spec/containers/0/livenessProbe/exec/command",
        ),
        (
            "a wrong apiVersion",
            |d| d["apiVersion"] = json!("extensions/v1beta1"),
            "no schema for daemonset-extensions-v1beta1",
        ),
        (
            "no selector",
            |d| {
                d["spec"].as_object_mut().expect("spec").remove("selector");
            },
            "\"selector\" is a required property",
        ),
    ];
    for (what, mutate, expected) in mutations {
        let mut doc = good.clone();
        mutate(&mut doc);
        let outcome = match schemas.errors(&doc) {
            Ok(errors) => errors.join("\n"),
            Err(e) => e,
        };
        assert!(outcome.contains(expected), "{what}: expected {expected:?} in:\n{outcome}");
    }
}

#[test]
fn yaml_that_kubernetes_would_read_differently_is_refused() {
    let cases = [
        ("a: 1\nb: yes\n", "`yes`: YAML 1.1 reads it as a boolean"),
        ("env:\n  - name: X\n    value: off\n", "`off`: YAML 1.1 reads it as a boolean"),
        ("defaultMode: 0644\n", "`0644`: YAML 1.1 reads a leading 0 as octal"),
        ("a: 1\nb: 2\na: 3\n", "duplicated key"),
        ("a: &x 1\nb: *x\n", "an alias"),
        ("1: a\n", "a key that is not a string"),
    ];
    for (text, expected) in cases {
        let err = yaml_documents(text, "t.yaml").expect_err(text);
        assert!(err.contains(expected), "{text:?}: {err}");
    }
    // Quoted, the same values are plain strings; numbers and booleans of both versions agree.
    let docs = yaml_documents("a: \"yes\"\nb: '0644'\nc: 420\nd: true\ne: 0\n---\n", "t.yaml")
        .expect("valid");
    assert_eq!(docs, [json!({"a": "yes", "b": "0644", "c": 420, "d": true, "e": 0})]);
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_examples() {
    let all = manifests("deploy/k8s");
    let kustomizations: Vec<&Value> =
        all.iter().flat_map(|(_, docs)| docs).filter(|d| is_kustomization(d)).collect();
    assert_eq!(kustomizations.len(), 1);
    let k = kustomizations[0];
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| format!("deploy/k8s/{}", r.as_str().expect("a path")))
        .collect();
    let expected: BTreeSet<String> = all
        .iter()
        .filter(|(file, docs)| {
            !file.starts_with("deploy/k8s/examples/") && !docs.iter().any(is_kustomization)
        })
        .map(|(file, _)| file.clone())
        .collect();
    assert_eq!(listed, expected);
    // Everything it deploys lives in its own Namespace, which it creates.
    let namespace = object("Namespace", "ferry");
    for (file, doc) in objects() {
        if expected.contains(&file) && doc["kind"] != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], namespace["metadata"]["name"], "{file}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Consistency

fn pod_spec(doc: &Value) -> &Value {
    if doc["kind"] == "Pod" { &doc["spec"] } else { &doc["spec"]["template"]["spec"] }
}

fn container<'a>(doc: &'a Value, name: &str) -> &'a Value {
    pod_spec(doc)["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array().expect("an array").iter().map(|s| s.as_str().expect("a string")).collect()
}

/// The volume mounted at `mount_path` in `container` of `doc`: (the volume, the mount).
fn volume_at<'a>(doc: &'a Value, container: &'a Value, mount_path: &str) -> (&'a Value, &'a Value) {
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("nothing mounted at {mount_path} in {}", container["name"]));
    let volume = pod_spec(doc)["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    (volume, mount)
}

/// The ConfigMap's ferryd.toml, through ferry's own parser.
fn configmap_config() -> (Value, String, FerrydConfig) {
    let cm = object("ConfigMap", "ferryd-config");
    let text = cm["data"]["ferryd.toml"].as_str().expect("data.ferryd.toml").to_string();
    let config = FerrydConfig::parse(&text, Path::new("deploy/k8s/configmap.yaml:ferryd.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    (cm, text, config)
}

/// A `ferryctl` command in the manifests (a probe or a container's command).
#[derive(Debug)]
struct FerryctlRun {
    /// Where it is, for messages.
    what: String,
    argv: Vec<String>,
    /// The uid and gid it runs as: the container's securityContext, else the pod's.
    uid: u32,
    gid: u32,
}

fn ferryctl_commands() -> Vec<FerryctlRun> {
    let mut out = Vec::new();
    for (file, doc) in objects() {
        if !matches!(doc["kind"].as_str(), Some("Pod" | "DaemonSet")) {
            continue;
        }
        let spec = pod_spec(&doc);
        for c in spec["containers"].as_array().expect("containers") {
            let id = |key: &str| {
                let v = c["securityContext"].get(key).unwrap_or(&spec["securityContext"][key]);
                let id = v.as_u64().unwrap_or_else(|| panic!("{file}: {} has no {key}", c["name"]));
                u32::try_from(id).expect("an id")
            };
            let mut found = vec![("command".to_string(), &c["command"])];
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                found.push((probe.to_string(), &c[probe]["exec"]["command"]));
            }
            for (what, argv) in found {
                if argv.get(0).is_some_and(|a| a == "ferryctl") {
                    out.push(FerryctlRun {
                        what: format!("{file}: {} {what}", c["name"]),
                        argv: strings(argv).into_iter().map(String::from).collect(),
                        uid: id("runAsUser"),
                        gid: id("runAsGroup"),
                    });
                }
            }
        }
    }
    out
}

fn socket_arg(argv: &[String]) -> Option<&str> {
    argv.iter().position(|a| a == "--socket").and_then(|i| argv.get(i + 1)).map(String::as_str)
}

#[test]
fn the_configmap_the_daemonset_and_the_client_agree() {
    let (cm, _, config) = configmap_config();
    let ds = object("DaemonSet", "ferryd");
    let client = object("Pod", "ferry-client-example");
    let ferryd = container(&ds, "ferryd");

    // The config file ferryd is told to read is the ConfigMap's key, where the DaemonSet mounts it.
    let command = strings(&ferryd["command"]);
    assert_eq!(command[..2], ["ferryd", "--config"]);
    let config_path = Path::new(command[2]);
    let dir = config_path.parent().expect("a directory").to_str().expect("utf-8");
    let (volume, mount) = volume_at(&ds, ferryd, dir);
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
    assert_eq!(mount["readOnly"], true);
    let key = config_path.file_name().expect("a file").to_str().expect("utf-8");
    assert!(cm["data"][key].is_string(), "the ConfigMap has no key {key}");

    // The socket: the config's path, in the shared hostPath directory, which the client mounts
    // (the same host directory at the same path) and names in FERRY_SOCKET.
    let socket = config.socket.clone().expect("the ConfigMap sets the socket");
    let socket_dir = socket.parent().expect("a directory").to_str().expect("utf-8");
    let (ds_volume, ds_mount) = volume_at(&ds, ferryd, socket_dir);
    assert_eq!(ds_volume["hostPath"]["type"], "DirectoryOrCreate");
    assert_ne!(ds_mount["readOnly"], true, "ferryd creates its socket there");
    let client_container = container(&client, "client");
    let (client_volume, client_mount) = volume_at(&client, client_container, socket_dir);
    assert_eq!(client_volume["hostPath"]["path"], ds_volume["hostPath"]["path"]);
    // A directory, not the socket file: a restarted ferryd's new socket must show up.
    assert_eq!(client_volume["hostPath"]["type"], "Directory");
    assert_eq!(client_mount["readOnly"], true);
    let env = client_container["env"].as_array().expect("env");
    let ferry_socket = env.iter().find(|e| e["name"] == "FERRY_SOCKET").expect("FERRY_SOCKET");
    assert_eq!(ferry_socket["value"].as_str().map(Path::new), Some(socket.as_path()));
    // ... and every ferryctl command (probes, the client's) names that socket.
    let commands = ferryctl_commands();
    assert_eq!(commands.len(), 4, "{commands:?}");
    for run in &commands {
        assert_eq!(socket_arg(&run.argv).map(Path::new), Some(socket.as_path()), "{}", run.what);
    }

    // Model roots: read-only hostPaths mounted at the very path the config names, so a path a
    // client sends means the same file to ferryd.
    assert!(!config.model_roots.is_empty());
    for root in &config.model_roots {
        let (volume, mount) = volume_at(&ds, ferryd, root.to_str().expect("utf-8"));
        assert_eq!(volume["hostPath"]["path"].as_str().map(Path::new), Some(root.as_path()));
        assert_eq!(volume["hostPath"]["type"], "Directory");
        assert_eq!(mount["readOnly"], true);
    }

    // Who may connect: ferryd's own group (its probes) and the client's primary group.
    let ferryd_gid = ferryd["securityContext"]["runAsGroup"].as_u64().expect("runAsGroup");
    let client_gid = client["spec"]["securityContext"]["runAsGroup"].as_u64().expect("gid");
    assert!(config.allow_uids.is_empty(), "{:?}", config.allow_uids);
    for gid in [ferryd_gid, client_gid] {
        assert!(config.allow_gids.iter().any(|&g| u64::from(g) == gid), "gid {gid} not allowed");
    }
    // The init container hands the socket directory to exactly that user and group.
    let uid = ferryd["securityContext"]["runAsUser"].as_u64().expect("runAsUser");
    let init = &pod_spec(&ds)["initContainers"][0];
    let script = strings(&init["command"]).join(" ");
    assert!(script.contains(&format!("chown {uid}:{ferryd_gid} {socket_dir}")), "{script}");
    assert!(script.contains(&format!("chmod 0750 {socket_dir}")), "{script}");
    assert_eq!(volume_at(&ds, init, socket_dir).0["name"], ds_volume["name"]);

    // GPU nodes, and ferryd's device is CUDA there (no silent fallback to host memory).
    for doc in [&ds, &client] {
        assert_eq!(pod_spec(doc)["nodeSelector"]["nvidia.com/gpu.present"], "true");
    }
    assert_eq!(config.device, Some(ferry::device::DeviceChoice::Cuda));
}

#[test]
fn ferryd_runs_without_privileges() {
    let ds = object("DaemonSet", "ferryd");
    let spec = pod_spec(&ds);
    let ferryd = container(&ds, "ferryd");
    let sc = &ferryd["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_ne!(sc["runAsUser"], 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(spec[host], true, "{host}");
    }
    assert_eq!(spec["automountServiceAccountToken"], false);
    // It holds no GPU of the device plugin's: it shares the ones the runtimes requested.
    assert!(ferryd["resources"]["limits"].get("nvidia.com/gpu").is_none());
    assert!(ferryd["resources"]["limits"]["memory"].is_string());
    // The init container is root with CHOWN and FOWNER, nothing else.
    let inits = spec["initContainers"].as_array().expect("initContainers");
    assert_eq!(inits.len(), 1);
    let isc = &inits[0]["securityContext"];
    assert_eq!(isc["capabilities"], json!({"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}));
    assert_eq!(isc["allowPrivilegeEscalation"], false);
    assert_eq!(isc["readOnlyRootFilesystem"], true);
    // The example client: no privileges either.
    let client = object("Pod", "ferry-client-example");
    assert_eq!(client["spec"]["securityContext"]["runAsNonRoot"], true);
    let csc = &container(&client, "client")["securityContext"];
    assert_eq!(csc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(csc["allowPrivilegeEscalation"], false);
}

/// Kills ferryd if the test fails before stopping it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Daemon {
    /// Starts `ferryd` with the ConfigMap's file, overriding by flags (which win over the file)
    /// what this machine lacks: the host backend instead of CUDA, and a socket and model root
    /// under `dir`; plus `extra` flags. Waits for the socket.
    fn start(
        ferryd: &Path,
        dir: &Path,
        socket: &Path,
        extra: &[String],
        id: Option<(u32, u32)>,
    ) -> Daemon {
        let (_, text, _) = configmap_config();
        let config = dir.join("ferryd.toml");
        std::fs::write(&config, text).expect("write config");
        let models = dir.join("models");
        std::fs::create_dir(&models).expect("models dir");
        let mut cmd = Command::new(ferryd);
        cmd.arg("--config")
            .arg(&config)
            .args(["--device", "host", "--host-memory", "16777216", "--budget", "8388608"])
            .arg("--socket")
            .arg(socket)
            .arg("--model-root")
            .arg(&models)
            .args(extra)
            .stderr(std::process::Stdio::null());
        if let Some((uid, gid)) = id {
            cmd.uid(uid).gid(gid);
        }
        let mut daemon = Daemon(cmd.spawn().expect("spawn ferryd"));
        let start = Instant::now();
        while !socket.exists() {
            assert!(daemon.0.try_wait().expect("wait").is_none(), "ferryd exited early");
            assert!(start.elapsed() < Duration::from_secs(30), "ferryd did not bind its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// SIGTERM; ferryd drains and exits 0.
    fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own live child.
        assert_eq!(unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
        assert!(self.0.wait().expect("wait").success(), "ferryd exits 0 on SIGTERM");
    }
}

/// Runs a manifest's ferryctl command with `ferryctl`, its socket replaced by `socket`.
fn run_ferryctl(ferryctl: &Path, argv: &[String], socket: &Path, id: Option<(u32, u32)>) -> Output {
    let mut argv = argv.to_vec();
    let i = argv.iter().position(|a| a == "--socket").expect("--socket");
    argv[i + 1] = socket.display().to_string();
    let mut cmd = Command::new(ferryctl);
    cmd.args(&argv[1..]);
    if let Some((uid, gid)) = id {
        cmd.uid(uid).gid(gid);
    }
    cmd.output().expect("run ferryctl")
}

fn assert_status_ok(out: &Output, run: &FerryctlRun) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ferryd "),
        "{}: {:?}: {:?}\n{stdout}{}",
        run.what,
        run.argv,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_probes_pass_against_ferryd_started_from_the_configmap_and_fail_once_it_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ferryd.sock");
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() }.to_string();
    let allow_me = ["--allow-uid".to_string(), me];
    let daemon = Daemon::start(&cargo_bin("ferryd"), dir.path(), &socket, &allow_me, None);
    let ferryctl = cargo_bin("ferryctl");
    let commands = ferryctl_commands();
    for run in &commands {
        assert_status_ok(&run_ferryctl(&ferryctl, &run.argv, &socket, None), run);
    }
    daemon.stop();
    for run in &commands {
        let out = run_ferryctl(&ferryctl, &run.argv, &socket, None);
        // 1: nothing answers (2 would be a usage error: the probe itself would be wrong).
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", run.what);
        assert!(stderr.contains("not answering"), "{}: {stderr}", run.what);
    }
}

/// The permission scheme end to end, with the manifests' own uids and gids: the init
/// container's script prepares a root-owned 0755 directory (as the kubelet makes it), ferryd
/// runs as the DaemonSet's user with the ConfigMap's allow list, and each ferryctl command runs
/// as its container's user: all pass, and a user outside ferryd's group is turned away.
/// Switching users needs root (CI runs as root); elsewhere this test says so and passes.
#[test]
fn as_the_manifests_users_only_ferryd_and_its_group_reach_the_socket() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching to the manifests' uids needs root");
        return;
    }
    let (_, _, config) = configmap_config();
    let ds = object("DaemonSet", "ferryd");
    let ferryd_sc = &container(&ds, "ferryd")["securityContext"];
    let ferryd_id = (
        ferryd_sc["runAsUser"].as_u64().expect("uid") as u32,
        ferryd_sc["runAsGroup"].as_u64().expect("gid") as u32,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The binaries where every uid can run them (the build tree may not be).
    let bin = |name: &str| {
        let to = root.join(name);
        std::fs::copy(cargo_bin(name), &to).expect("copy binary");
        to
    };
    let (ferryd, ferryctl) = (bin("ferryd"), bin("ferryctl"));

    // The init container's script, on a directory as the kubelet creates it.
    let pod_dir = config.socket.as_deref().and_then(Path::parent).expect("socket dir");
    let socket_dir = root.join("run-ferry");
    std::fs::create_dir(&socket_dir).expect("mkdir");
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (from, to) = (pod_dir.to_str().expect("utf-8"), socket_dir.to_str().expect("utf-8"));
    let init: Vec<String> = strings(&pod_spec(&ds)["initContainers"][0]["command"])
        .into_iter()
        .map(|arg| arg.replace(from, to))
        .collect();
    let status = Command::new(&init[0]).args(&init[1..]).status().expect("run init script");
    assert!(status.success(), "{init:?}");
    let meta = std::fs::metadata(&socket_dir).expect("stat");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (ferryd_id.0, ferryd_id.1, 0o750));

    let socket = socket_dir.join("ferryd.sock");
    let daemon = Daemon::start(&ferryd, root, &socket, &[], Some(ferryd_id));
    let meta = std::fs::metadata(&socket).expect("stat socket");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (ferryd_id.0, ferryd_id.1, 0o660));
    let commands = ferryctl_commands();
    for run in &commands {
        let out = run_ferryctl(&ferryctl, &run.argv, &socket, Some((run.uid, run.gid)));
        assert_status_ok(&out, run);
    }
    // Someone else on the node, outside ferryd's group: the directory keeps them out.
    let stranger = (ferryd_id.0 + 1, ferryd_id.1 + 1);
    assert!(!config.allow_gids.contains(&stranger.1));
    let out = run_ferryctl(&ferryctl, &commands[0].argv, &socket, Some(stranger));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    daemon.stop();
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile

/// A Dockerfile's instructions: (keyword in upper case, arguments), continuation lines joined
/// and comment lines dropped (also inside a continuation, as Docker does).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((keyword.to_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends inside a continuation");
    out
}

/// What a `cargo build`/`cargo run` command builds.
#[derive(Debug, Default, PartialEq)]
struct CargoBuild {
    profile: String,
    bins: BTreeSet<String>,
    packages: BTreeSet<String>,
    features: BTreeSet<String>,
    all_features: bool,
    no_default_features: bool,
    target: Option<String>,
    /// Flags this parser does not know: they make two builds differ until someone looks.
    unknown: Vec<String>,
}

fn cargo_build(argv: &[String]) -> CargoBuild {
    assert_eq!(argv.first().map(String::as_str), Some("cargo"), "{argv:?}");
    let sub = argv.get(1).map(String::as_str);
    assert!(matches!(sub, Some("build" | "run")), "not a build: {argv:?}");
    let mut b = CargoBuild { profile: "dev".into(), ..CargoBuild::default() };
    let mut args = argv[2..].iter().map(String::as_str).take_while(|a| *a != "--");
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg, None),
        };
        let mut value = || inline.clone().or_else(|| args.next().map(String::from));
        match flag {
            "--release" | "-r" => b.profile = "release".into(),
            "--profile" => b.profile = value().expect("--profile NAME"),
            "--bin" => {
                b.bins.insert(value().expect("--bin NAME"));
            }
            "-p" | "--package" => {
                b.packages.insert(value().expect("--package NAME"));
            }
            "-F" | "--features" => b.features.extend(
                value()
                    .expect("--features LIST")
                    .split([',', ' '])
                    .filter(|f| !f.is_empty())
                    .map(String::from),
            ),
            "--all-features" => b.all_features = true,
            "--no-default-features" => b.no_default_features = true,
            "--target" => b.target = value(),
            // These change how dependencies are resolved or how much is printed, not what is
            // built: --locked only insists on Cargo.lock as it is.
            "--locked" | "--frozen" | "--offline" | "-q" | "--quiet" | "-v" | "--verbose" => {}
            other => b.unknown.push(other.to_string()),
        }
    }
    b
}

/// The README's first command (the first line of its first `sh` block).
fn readme_first_command() -> Vec<String> {
    let readme = read("README.md");
    let block = readme.split("```sh\n").nth(1).expect("a ```sh block in the README");
    let line = block.lines().map(str::trim).find(|l| !l.is_empty()).expect("a command");
    let words = shlex::split(line).expect("shell words");
    words.into_iter().take_while(|w| !w.starts_with('#')).collect()
}

/// The `cargo build` in the Dockerfile's RUN instructions, and that RUN's whole text.
fn dockerfile_cargo_build() -> (Vec<String>, String) {
    let runs: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(k, a)| k == "RUN" && a.contains("cargo "))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(runs.len(), 1, "one RUN with cargo: {runs:?}");
    let words = shlex::split(&runs[0]).expect("shell words");
    // RUN's own flags (--mount=...) come first.
    let words: Vec<String> = words.into_iter().skip_while(|w| w.starts_with("--")).collect();
    let mut commands = words.split(|w| w == "&&");
    let cargo = commands.find(|c| c.first().is_some_and(|w| w == "cargo")).expect("cargo").to_vec();
    (cargo, runs[0].clone())
}

#[test]
fn the_dockerfile_builds_what_the_readme_builds() {
    let readme = readme_first_command();
    assert_eq!(readme[..2], ["cargo", "run"], "the README's first command: {readme:?}");
    let (docker, run) = dockerfile_cargo_build();
    assert_eq!(docker[..2], ["cargo", "build"]);

    let mut expected = cargo_build(&readme);
    assert!(expected.unknown.is_empty(), "{readme:?}");
    assert_eq!(expected.bins, BTreeSet::from(["ferryd".to_string()]), "{readme:?}");
    expected.bins.insert("ferryctl".into());
    assert_eq!(cargo_build(&docker), expected, "Dockerfile: {docker:?}, README: {readme:?}");
    assert!(docker.iter().any(|w| w == "--locked"), "the image builds Cargo.lock's versions");

    // Each binary is taken from that profile's output into the runtime image, and is one of
    // the ferry crate's.
    let stages: Vec<(String, String)> = dockerfile();
    let final_from = stages.iter().rposition(|(k, _)| k == "FROM").expect("FROM");
    let copies: Vec<&String> = stages[final_from..]
        .iter()
        .filter(|(k, a)| k == "COPY" && a.starts_with("--from=build "))
        .map(|(_, a)| a)
        .collect();
    for bin in &expected.bins {
        assert!(repo(&format!("daemon/src/bin/{bin}.rs")).exists(), "no binary {bin}");
        assert!(run.contains(&format!("target/{}/{bin}", expected.profile)), "{run}");
        assert!(copies.iter().any(|c| c.contains(&format!("/out/{bin} "))), "{copies:?}");
    }
}

#[test]
fn the_image_and_the_daemonset_agree() {
    let instructions = dockerfile();
    let last = |keyword: &str| {
        instructions
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("no {keyword}"))
    };
    let ds = object("DaemonSet", "ferryd");
    let ferryd = container(&ds, "ferryd");

    // The same command, so the image run by hand and in the cluster reads the same path.
    let entrypoint: Vec<String> = serde_json::from_str(&last("ENTRYPOINT")).expect("exec form");
    assert_eq!(json!(entrypoint), ferryd["command"]);
    // The image's own config file is the shipped example, which parses.
    let config = entrypoint.last().expect("config path");
    assert!(instructions.contains(&("COPY".into(), format!("deploy/ferryd.toml {config}"))));
    FerrydConfig::load(&repo("deploy/ferryd.toml"), true).unwrap_or_else(|e| panic!("{e}"));

    // The image's user is the one the DaemonSet runs ferryd as.
    let sc = &ferryd["securityContext"];
    assert_eq!(last("USER"), format!("{}:{}", sc["runAsUser"], sc["runAsGroup"]));

    // Every container runs this version's image.
    let image = format!("ferry:{}", env!("CARGO_PKG_VERSION"));
    for (file, doc) in objects() {
        if !matches!(doc["kind"].as_str(), Some("Pod" | "DaemonSet")) {
            continue;
        }
        let spec = pod_spec(&doc);
        let all = [&spec["containers"], &spec["initContainers"]];
        for c in all.iter().filter_map(|cs| cs.as_array()).flatten() {
            assert_eq!(c["image"], image.as_str(), "{file}: {}", c["name"]);
        }
    }

    // The builder's toolchain is at least the workspace's declared minimum.
    let arg = instructions
        .iter()
        .find_map(|(k, a)| (k == "ARG").then(|| a.strip_prefix("RUST_VERSION=")).flatten())
        .expect("ARG RUST_VERSION=");
    let version =
        |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().expect("number")).collect() };
    assert!(version(arg) >= version(env!("CARGO_PKG_RUST_VERSION")), "{arg}");
}

/// Whether a `.dockerignore` pattern matches `path` (both split at `/`): `*` and `?` within one
/// component, `**` for any number of components, as Docker's matcher does. (No `[...]` classes
/// or `!` exceptions: the file uses neither, and the test refuses them.)
fn ignore_matches(pattern: &[&str], path: &[&str]) -> bool {
    fn component(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => component(&p[1..], s) || (!s.is_empty() && component(p, &s[1..])),
            (Some(b'?'), Some(_)) => component(&p[1..], &s[1..]),
            (Some(a), Some(b)) => a == b && component(&p[1..], &s[1..]),
            _ => false,
        }
    }
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            ignore_matches(&pattern[1..], path)
                || (!path.is_empty() && ignore_matches(pattern, &path[1..]))
        }
        (Some(p), Some(s)) => {
            component(p.as_bytes(), s.as_bytes()) && ignore_matches(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

#[test]
fn the_docker_build_context_leaves_out_build_output_but_keeps_the_sources() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    assert!(patterns.iter().all(|p| !p.starts_with('!') && !p.contains('[')), "{patterns:?}");
    // A path is left out when a pattern matches it or one of its parent directories.
    let ignored = |path: &str| {
        let parts: Vec<&str> = path.split('/').collect();
        patterns.iter().find(|p| {
            let p: Vec<&str> = p.split('/').collect();
            (1..=parts.len()).any(|n| ignore_matches(&p, &parts[..n]))
        })
    };
    for left_out in ["target/release/ferryd", ".git/HEAD", "clients/python/ferry/__pycache__/x.pyc"]
    {
        assert!(ignored(left_out).is_some(), "{left_out} is in the build context");
    }
    // Nothing the build reads is left out: the workspace's manifests and every member's files
    // (the root package's test-support library and benches too, which cargo needs to load the
    // workspace), and the configuration the image copies.
    let mut needed: Vec<String> =
        ["Cargo.toml", "Cargo.lock", "rustfmt.toml", "deploy/ferryd.toml"].map(String::from).into();
    for dir in ["daemon", "ffi", "tests/support", "benches", "include"] {
        let root = repo("");
        needed.extend(
            files_under(&repo(dir))
                .iter()
                .map(|p| p.strip_prefix(&root).expect("under the repo").display().to_string()),
        );
    }
    assert!(needed.len() > 20, "{needed:?}");
    for path in &needed {
        assert_eq!(ignored(path), None, "{path} is left out of the build context");
    }
}
