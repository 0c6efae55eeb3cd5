//! NUMA placement: which CPUs and which memory a device's I/O threads and staging buffers use.
//!
//! **Why.** On a multi-socket box every GPU hangs off one socket's PCIe root. A host-to-device
//! copy from memory on the other socket crosses the inter-socket link first, and that costs far
//! more than it sounds: a P100 measured 12.2 GB/s pinned H2D from its local node and 3.8 GB/s
//! NUMA-remote (`/work/shared/notes/cuda.md` §3.1). So each device's copy threads should run on
//! the node nearest the device, and its pinned staging buffers should be allocated there.
//!
//! **What this module does.**
//! - [`Topology`] reads the machine's nodes and their CPUs from
//!   `/sys/devices/system/node/node*/cpulist`.
//! - [`pci_numa_node`] reads a device's node from `/sys/bus/pci/devices/<bdf>/numa_node`, taking
//!   the PCI bus id as CUDA and NVML print it (`00000000:3B:00.0`).
//! - [`Placement::resolve`] decides once per device: the node the operator forced in the config,
//!   or else the node sysfs reports for the device's bus id.
//! - [`bind_current_thread`] pins the calling thread to the node's CPUs (`sched_setaffinity`)
//!   and sets its memory policy to prefer that node (`set_mempolicy(MPOL_PREFERRED)`). Pages
//!   this thread touches first then come from that node, so the engine allocates (and first
//!   touches) a device's staging buffers on a bound thread.
//!
//! **Fallback.** Everything degrades to "no placement" rather than failing: no
//! `/sys/devices/system/node` (containers may hide it), a device sysfs reports `-1` for
//! (single-socket boxes, most VMs), no bus id, or a malformed one all give
//! [`Placement::Unknown`] with a reason for the log, and threads then run wherever the
//! scheduler puts them. When `set_mempolicy` is refused (`ENOSYS`, or `EPERM` from a container's
//! seccomp profile, which allows it only with `CAP_SYS_NICE`), the CPU affinity is kept and a
//! warning is logged once: with the thread on the node's CPUs, the kernel's default local
//! allocation already puts first-touched pages there in most cases. Only an operator's explicit
//! request for a node that does not exist is an error ([`NumaError::NoSuchNode`]).

use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// CPU ids at or above this are rejected by [`parse_cpulist`]: the kernel's own limit
/// (`NR_CPUS`) is 8192 at most today, and the bound keeps a garbage list such as `0-4000000000`
/// from allocating gigabytes.
const MAX_CPU: usize = 1 << 16;

/// Node ids at or above this are refused by [`bind_current_thread`] (the kernel's
/// `MAX_NUMNODES` is 1024 at most); the bound keeps the nodemask small for any `Node` a caller
/// builds by hand.
const MAX_NODE: u32 = 1 << 12;

/// One NUMA node: its id and the CPUs it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: u32,
    /// Sorted, without duplicates when read from sysfs. Empty for a memory-only node.
    pub cpus: Vec<usize>,
}

/// The machine's NUMA nodes (from sysfs), sorted by id. Empty when unknown (no
/// `/sys/devices/system/node`, a container hiding it...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<Node>,
}

impl Topology {
    /// The running machine's topology (from `/sys`).
    pub fn detect() -> Topology {
        Topology::from_sysfs(Path::new("/sys"))
    }

    /// Reads `{sys}/devices/system/node/node*/cpulist`. A node whose directory name or cpulist
    /// cannot be read or parsed is skipped (logged at debug): a partial topology still places
    /// the devices on the nodes it does know.
    pub fn from_sysfs(sys: &Path) -> Topology {
        let dir = sys.join("devices/system/node");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!("numa: no topology at {}: {e}", dir.display());
                return Topology::default();
            }
        };
        let mut nodes = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::debug!("numa: reading {}: {e}", dir.display());
                    continue;
                }
            };
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(parse_node_dir_name) else {
                // has_cpu, online, possible, power, ...: not node directories.
                continue;
            };
            let path = entry.path().join("cpulist");
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    tracing::debug!("numa: skipping node {id}: {}: {e}", path.display());
                    continue;
                }
            };
            match parse_cpulist(&text) {
                Ok(cpus) => nodes.push(Node { id, cpus }),
                Err(e) => tracing::debug!("numa: skipping node {id}: {}: {e}", path.display()),
            }
        }
        nodes.sort_by_key(|n| n.id);
        Topology { nodes }
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this id, if the machine has it.
    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Whether sysfs reported at least one node.
    pub fn is_known(&self) -> bool {
        !self.nodes.is_empty()
    }
}

/// `node12` -> 12. Only plain decimal digits after the prefix (no sign, no spaces).
fn parse_node_dir_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("node")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NumaError {
    /// The configuration asked for a node this machine does not have.
    #[error("NUMA node {node} does not exist ({})", describe_available(available))]
    NoSuchNode { node: u32, available: Vec<u32> },
    /// A CPU list (sysfs `cpulist` format) that could not be parsed.
    #[error("bad CPU list {text:?}: {reason}")]
    CpuList { text: String, reason: String },
    /// A system call failed.
    #[error("{what} failed: {reason}")]
    Os { what: &'static str, reason: String },
}

fn describe_available(available: &[u32]) -> String {
    match available {
        [] => "this machine reports no NUMA nodes".to_string(),
        [one] => format!("this machine has node {one}"),
        many => {
            let ids: Vec<String> = many.iter().map(u32::to_string).collect();
            format!("this machine has nodes {}", ids.join(", "))
        }
    }
}

/// Parses the kernel's CPU list format: `"0-3,8-11,16"` -> `[0,1,2,3,8,9,10,11,16]`; an empty
/// string (or only whitespace, e.g. the `"\n"` of a memory-only node) -> `[]`. The result is
/// sorted without duplicates. Rejects anything else with [`NumaError::CpuList`]: empty items,
/// non-numbers (signs and spaces inside an item included), ranges that run backwards, and CPU
/// ids of 65536 and above. The kernel's stride syntax (`0-31:2/4`) is not accepted: sysfs never
/// prints it.
pub fn parse_cpulist(s: &str) -> Result<Vec<usize>, NumaError> {
    let text = s.trim();
    let bad = |reason: String| NumaError::CpuList { text: text.to_string(), reason };
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Ok(cpus);
    }
    for item in text.split(',') {
        if item.is_empty() {
            return Err(bad("empty item".to_string()));
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (parse_cpu(a).map_err(&bad)?, parse_cpu(b).map_err(&bad)?),
            None => {
                let cpu = parse_cpu(item).map_err(&bad)?;
                (cpu, cpu)
            }
        };
        if last < first {
            return Err(bad(format!("range {item} runs backwards")));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// One CPU id of a list; the error is the reason for [`NumaError::CpuList`].
fn parse_cpu(s: &str) -> Result<usize, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a CPU number"));
    }
    match s.parse::<usize>() {
        Ok(cpu) if cpu < MAX_CPU => Ok(cpu),
        // All digits, so a parse failure is an overflow: just as far beyond the limit.
        _ => Err(format!("CPU {s} is beyond the limit of {MAX_CPU}")),
    }
}

/// Compresses a CPU list back into the kernel's range form: `[0,1,2,3,8]` -> `"0-3,8"`.
fn format_cpulist(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        let mut last = first;
        while i + 1 < sorted.len() && sorted[i + 1] == last + 1 {
            i += 1;
            last = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if first == last {
            out.push_str(&first.to_string());
        } else {
            out.push_str(&format!("{first}-{last}"));
        }
        i += 1;
    }
    out
}

/// A PCI bus id in sysfs form (`0000:3b:00.0`), or `None` when `bus_id` is not a well-formed
/// `domain:bus:device.function` address. Accepts what CUDA and NVML print: a 4- or 8-hex-digit
/// domain, either case, surrounding whitespace (NVML pads its fixed-size buffer). The check runs
/// before any path is built, so nothing like `/` or `..` can reach the filesystem.
fn normalize_bus_id(bus_id: &str) -> Option<String> {
    fn hex(s: &str, min_len: usize, max_len: usize) -> Option<u32> {
        if s.len() < min_len || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    }
    let s = bus_id.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let mut parts = s.split(':');
    let (domain, bus, devfn) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (device, function) = devfn.split_once('.')?;
    let domain = hex(domain, 1, 8)?;
    let bus = hex(bus, 1, 2)?;
    let device = hex(device, 1, 2)?;
    let function = hex(function, 1, 1)?;
    // A PCI device number is 5 bits and a function number 3 bits.
    if device > 0x1f || function > 7 {
        return None;
    }
    // The kernel prints the domain with %04x: wider domains (Intel VMD's 10000) keep all digits.
    Some(format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}"))
}

/// The node of a PCI device, or why there is none (a short sentence for logs).
fn pci_numa_node_reason(sys: &Path, bus_id: &str) -> Result<u32, String> {
    let Some(bdf) = normalize_bus_id(bus_id) else {
        return Err(format!("PCI bus id {bus_id:?} is not a domain:bus:device.function address"));
    };
    let path = sys.join("bus/pci/devices").join(&bdf).join("numa_node");
    let text = fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the NUMA node of {bdf} from {}: {e}", path.display()))?;
    match text.trim().parse::<i64>() {
        Ok(node) if node < 0 => Err(format!("sysfs reports no NUMA affinity for {bdf}")),
        Ok(node) => u32::try_from(node)
            .map_err(|_| format!("sysfs reports NUMA node {node} for {bdf}, out of range")),
        Err(_) => Err(format!("sysfs reports an unreadable NUMA node {:?} for {bdf}", text.trim())),
    }
}

/// The NUMA node of a PCI device from sysfs (`{sys}/bus/pci/devices/{bdf}/numa_node`), `None`
/// when the file is missing, unreadable or says -1 (no affinity, e.g. single-socket boxes and
/// VMs). Accepts bus ids as CUDA/NVML print them (`00000000:3B:00.0`) and normalises them to
/// sysfs form (`0000:3b:00.0`); anything that is not a well-formed address is `None`, without
/// touching the filesystem.
pub fn pci_numa_node(sys: &Path, bus_id: &str) -> Option<u32> {
    match pci_numa_node_reason(sys, bus_id) {
        Ok(node) => Some(node),
        Err(reason) => {
            tracing::debug!("numa: {reason}");
            None
        }
    }
}

/// Set once the "set_mempolicy refused" warning has been logged: it would otherwise repeat for
/// every bound thread, and it says the same thing each time.
static MEMPOLICY_WARNED: AtomicBool = AtomicBool::new(false);

/// Binds the calling thread to a node: CPU affinity to the node's CPUs and memory policy
/// `MPOL_PREFERRED` for the node. Pages this thread touches first afterwards come from that
/// node while it has free memory, which is how the engine places staging buffers: allocate and
/// touch them on a bound thread.
///
/// - CPUs at or above `CPU_SETSIZE` (1024) cannot be expressed in a `cpu_set_t` and are left out
///   (logged at debug); a node with no expressible CPUs (a memory-only node) gets no affinity
///   change, only the memory policy.
/// - `set_mempolicy` refused with `ENOSYS` or `EPERM` (seccomp in containers): the affinity is
///   kept, a warning is logged once, and this returns `Ok`.
/// - Any other failure is [`NumaError::Os`]. The affinity is set first, so after a
///   `set_mempolicy` error the thread is already pinned to the node's CPUs.
pub fn bind_current_thread(node: &Node) -> Result<(), NumaError> {
    set_affinity(node)?;
    set_preferred_node(node.id)
}

fn set_affinity(node: &Node) -> Result<(), NumaError> {
    let setsize = libc::CPU_SETSIZE as usize;
    // SAFETY: cpu_set_t is a plain array of integers; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for &cpu in &node.cpus {
        if cpu >= setsize {
            tracing::debug!("numa: CPU {cpu} of node {} is beyond CPU_SETSIZE; left out", node.id);
            continue;
        }
        // SAFETY: `cpu < CPU_SETSIZE`, so the bit lies inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        any = true;
    }
    if !any {
        tracing::debug!("numa: node {} has no CPUs to bind to; memory policy only", node.id);
        return Ok(());
    }
    // SAFETY: `set` is a valid, initialised cpu_set_t and the size passed is its size; pid 0
    // means the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(NumaError::Os {
            what: "sched_setaffinity",
            reason: format!(
                "binding to the CPUs of NUMA node {} ({}): {err}",
                node.id,
                format_cpulist(&node.cpus)
            ),
        });
    }
    Ok(())
}

fn set_preferred_node(id: u32) -> Result<(), NumaError> {
    if id >= MAX_NODE {
        return Err(NumaError::Os {
            what: "set_mempolicy",
            reason: format!("NUMA node {id} is beyond the kernel's limit of {MAX_NODE} nodes"),
        });
    }
    let bits = libc::c_ulong::BITS as usize;
    let mut mask: Vec<libc::c_ulong> = vec![0; id as usize / bits + 1];
    mask[id as usize / bits] |= 1 << (id as usize % bits);
    // The kernel reads `maxnode - 1` bits (set_mempolicy(2), BUGS / the kernel's get_nodes), so
    // pass one more than the mask holds.
    let maxnode = (mask.len() * bits + 1) as libc::c_ulong;
    // SAFETY: set_mempolicy(mode, nodemask, maxnode) only reads `(maxnode - 1)` bits from
    // `nodemask`, which points to `mask.len()` c_ulongs holding exactly that many bits; `mask`
    // outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            libc::MPOL_PREFERRED as libc::c_long,
            mask.as_ptr(),
            maxnode,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) => {
            if !MEMPOLICY_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "numa: set_mempolicy refused ({err}); threads keep their NUMA CPU affinity, \
                     memory placement relies on first touch"
                );
            }
            Ok(())
        }
        _ => Err(NumaError::Os {
            what: "set_mempolicy",
            reason: format!(
                "preferring NUMA node {id}: {err} (EINVAL: the node has no memory or is outside \
                 this process's cpuset)"
            ),
        }),
    }
}

/// Where a device's threads and buffers go, decided once per device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Bind to this node.
    Node(Node),
    /// No placement: threads run wherever the scheduler puts them. `reason` is a short sentence
    /// for the log.
    Unknown { reason: String },
}

impl Placement {
    /// Decides the placement of a device.
    ///
    /// `requested` is the operator's choice from the config: `Some(n)` forces node `n`, which
    /// must exist ([`NumaError::NoSuchNode`] otherwise, also when the topology is unknown:
    /// a forced placement that cannot be honoured should fail loudly, not silently float).
    /// `None` is automatic: the node sysfs reports for `pci_bus_id`, looked up in `topology`;
    /// [`Placement::Unknown`] when the topology is unknown, there is no bus id, the bus id is
    /// malformed, sysfs has no node for it (or says -1), or the node is not in the topology.
    pub fn resolve(
        topology: &Topology,
        sys: &Path,
        pci_bus_id: Option<&str>,
        requested: Option<u32>,
    ) -> Result<Placement, NumaError> {
        if let Some(id) = requested {
            return match topology.node(id) {
                Some(node) => Ok(Placement::Node(node.clone())),
                None => Err(NumaError::NoSuchNode {
                    node: id,
                    available: topology.nodes().iter().map(|n| n.id).collect(),
                }),
            };
        }
        let unknown = |reason: String| Ok(Placement::Unknown { reason });
        if !topology.is_known() {
            return unknown("this machine reports no NUMA nodes".to_string());
        }
        let Some(bus_id) = pci_bus_id else {
            return unknown("the device has no PCI bus id".to_string());
        };
        let id = match pci_numa_node_reason(sys, bus_id) {
            Ok(id) => id,
            Err(reason) => return unknown(reason),
        };
        match topology.node(id) {
            Some(node) => Ok(Placement::Node(node.clone())),
            None => unknown(format!(
                "sysfs places PCI device {} on NUMA node {id}, which this machine does not list",
                normalize_bus_id(bus_id).unwrap_or_default()
            )),
        }
    }

    /// Binds the calling thread to the node (see [`bind_current_thread`]); a no-op on
    /// [`Placement::Unknown`].
    pub fn bind_current_thread(&self) -> Result<(), NumaError> {
        match self {
            Placement::Node(node) => bind_current_thread(node),
            Placement::Unknown { .. } => Ok(()),
        }
    }

    /// The node id, if placed.
    pub fn node_id(&self) -> Option<u32> {
        match self {
            Placement::Node(node) => Some(node.id),
            Placement::Unknown { .. } => None,
        }
    }
}

impl fmt::Display for Placement {
    /// `node 1 (cpus 16-31)`, `node 2 (no cpus)`, `unknown (sysfs reports ...)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Node(node) if node.cpus.is_empty() => {
                write!(f, "node {} (no cpus)", node.id)
            }
            Placement::Node(node) => {
                write!(f, "node {} (cpus {})", node.id, format_cpulist(&node.cpus))
            }
            Placement::Unknown { reason } => write!(f, "unknown ({reason})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn cpulist_err(text: &str, reason: &str) -> NumaError {
        NumaError::CpuList { text: text.to_string(), reason: reason.to_string() }
    }

    #[test]
    fn cpulist_parses_kernel_forms() {
        assert_eq!(parse_cpulist("0-3,8-11,16").unwrap(), vec![0, 1, 2, 3, 8, 9, 10, 11, 16]);
        assert_eq!(parse_cpulist("0-1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpulist("7").unwrap(), vec![7]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist("\n").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpulist("0-2,5\n").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpulist("4-4").unwrap(), vec![4]);
        // Overlaps and disorder (never printed by the kernel) are merged, not rejected.
        assert_eq!(parse_cpulist("3,0-2,1").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpulist("65535").unwrap(), vec![65535]);
    }

    #[test]
    fn cpulist_rejects_garbage_with_exact_errors() {
        assert_eq!(
            parse_cpulist("0-3,x").unwrap_err(),
            cpulist_err("0-3,x", "\"x\" is not a CPU number")
        );
        assert_eq!(parse_cpulist("0,,2").unwrap_err(), cpulist_err("0,,2", "empty item"));
        assert_eq!(parse_cpulist("0,").unwrap_err(), cpulist_err("0,", "empty item"));
        assert_eq!(
            parse_cpulist("5-3").unwrap_err(),
            cpulist_err("5-3", "range 5-3 runs backwards")
        );
        assert_eq!(parse_cpulist("0-").unwrap_err(), cpulist_err("0-", "\"\" is not a CPU number"));
        assert_eq!(parse_cpulist("-1").unwrap_err(), cpulist_err("-1", "\"\" is not a CPU number"));
        assert_eq!(
            parse_cpulist("+1").unwrap_err(),
            cpulist_err("+1", "\"+1\" is not a CPU number")
        );
        assert_eq!(
            parse_cpulist("1-2-3").unwrap_err(),
            cpulist_err("1-2-3", "\"2-3\" is not a CPU number")
        );
        assert_eq!(
            parse_cpulist("0-31:2/4").unwrap_err(),
            cpulist_err("0-31:2/4", "\"31:2/4\" is not a CPU number")
        );
        assert_eq!(
            parse_cpulist("0-65536").unwrap_err(),
            cpulist_err("0-65536", "CPU 65536 is beyond the limit of 65536")
        );
        assert_eq!(
            parse_cpulist("0-4000000000").unwrap_err(),
            cpulist_err("0-4000000000", "CPU 4000000000 is beyond the limit of 65536")
        );
        assert_eq!(
            parse_cpulist("99999999999999999999999").unwrap_err(),
            cpulist_err(
                "99999999999999999999999",
                "CPU 99999999999999999999999 is beyond the limit of 65536"
            )
        );
        assert_eq!(
            parse_cpulist("5-3").unwrap_err().to_string(),
            "bad CPU list \"5-3\": range 5-3 runs backwards"
        );
    }

    #[test]
    fn cpulist_formats_back_into_ranges() {
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 9, 10, 11, 16]), "0-3,8-11,16");
        assert_eq!(format_cpulist(&[5]), "5");
        assert_eq!(format_cpulist(&[]), "");
        assert_eq!(format_cpulist(&[3, 1, 2, 2, 7]), "1-3,7");
        for list in ["0-3,8-11,16", "0", "1,3,5-6", "0-65535"] {
            assert_eq!(format_cpulist(&parse_cpulist(list).unwrap()), list);
        }
    }

    /// A fake `/sys`: nodes (`(dir name, cpulist contents)`) and PCI devices
    /// (`(sysfs bdf, numa_node contents)`).
    fn fake_sys(nodes: &[(&str, &str)], pci: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let node_dir = dir.path().join("devices/system/node");
        fs::create_dir_all(&node_dir).unwrap();
        // The non-node entries a real node directory has.
        for file in ["has_cpu", "online", "possible"] {
            fs::write(node_dir.join(file), "0-1\n").unwrap();
        }
        for (name, cpulist) in nodes {
            fs::create_dir_all(node_dir.join(name)).unwrap();
            fs::write(node_dir.join(name).join("cpulist"), cpulist).unwrap();
        }
        for (bdf, numa_node) in pci {
            let dev = dir.path().join("bus/pci/devices").join(bdf);
            fs::create_dir_all(&dev).unwrap();
            fs::write(dev.join("numa_node"), numa_node).unwrap();
        }
        dir
    }

    fn node(id: u32, cpus: std::ops::RangeInclusive<usize>) -> Node {
        Node { id, cpus: cpus.collect() }
    }

    #[test]
    fn topology_reads_nodes_and_skips_garbage() {
        let sys = fake_sys(
            &[
                ("node1", "16-31\n"),
                ("node0", "0-15\n"),
                ("node2", "zz\n"),    // garbage cpulist: skipped
                ("node3", "\n"),      // memory-only node: kept, no CPUs
                ("nodex", "40-41\n"), // not a node directory name
            ],
            &[],
        );
        // A node directory without a cpulist is skipped too.
        fs::create_dir_all(sys.path().join("devices/system/node/node4")).unwrap();
        let topo = Topology::from_sysfs(sys.path());
        assert!(topo.is_known());
        assert_eq!(
            topo.nodes(),
            &[node(0, 0..=15), node(1, 16..=31), Node { id: 3, cpus: vec![] }]
        );
        assert_eq!(topo.node(1), Some(&node(1, 16..=31)));
        assert_eq!(topo.node(2), None);
        assert_eq!(topo.node(4), None);
    }

    #[test]
    fn topology_missing_dir_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let topo = Topology::from_sysfs(dir.path());
        assert!(!topo.is_known());
        assert_eq!(topo, Topology::default());
        assert!(topo.nodes().is_empty());
        let missing = dir.path().join("no/such/sys");
        assert!(!Topology::from_sysfs(&missing).is_known());
    }

    #[test]
    fn bus_ids_normalise_to_sysfs_form() {
        assert_eq!(normalize_bus_id("00000000:3B:00.0").as_deref(), Some("0000:3b:00.0"));
        assert_eq!(normalize_bus_id("0000:3B:00.0").as_deref(), Some("0000:3b:00.0"));
        assert_eq!(normalize_bus_id("0000:3b:1f.7").as_deref(), Some("0000:3b:1f.7"));
        assert_eq!(normalize_bus_id(" 00000001:AF:00.1\0\0").as_deref(), Some("0001:af:00.1"));
        assert_eq!(normalize_bus_id("00010000:01:00.0").as_deref(), Some("10000:01:00.0"));
        for bad in [
            "",
            "../../etc",
            "0000:3b:00",
            "zz:00:00.0",
            "0000:3b:00.0/../../..",
            "0000:3b:00.8",
            "0000:3b:20.0",
            "0000:13b:00.0",
            "000000000:3b:00.0",
            "0000:3b:00.0:0",
            "0000::00.0",
            "0000:3b:.0",
            "0000:3b:00.",
            "0000:+b:00.0",
        ] {
            assert_eq!(normalize_bus_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pci_numa_node_reads_sysfs() {
        let sys = fake_sys(
            &[],
            &[("0000:3b:00.0", "1\n"), ("0000:5e:00.0", "-1\n"), ("0000:60:00.0", "what\n")],
        );
        assert_eq!(pci_numa_node(sys.path(), "00000000:3B:00.0"), Some(1));
        assert_eq!(pci_numa_node(sys.path(), "0000:3b:00.0"), Some(1));
        assert_eq!(pci_numa_node(sys.path(), "00000000:5E:00.0"), None);
        assert_eq!(pci_numa_node(sys.path(), "00000000:60:00.0"), None);
        assert_eq!(pci_numa_node(sys.path(), "00000000:AF:00.0"), None);
    }

    #[test]
    fn pci_numa_node_rejects_malformed_ids_before_the_filesystem() {
        let root = tempfile::tempdir().unwrap();
        let sys: PathBuf = root.path().join("sys");
        fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
        // Where "../../etc" and friends would land if they were joined onto the devices dir:
        // each holds a readable numa_node, so only the parser can make these None.
        for escaped in ["sys/bus/etc", "sys/bus/pci/devices/0000:3b:00", "sys/bus/pci/zz:.."] {
            let dir = root.path().join(escaped);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("numa_node"), "0\n").unwrap();
        }
        for bad in ["../../etc", "0000:3b:00", "zz:..", "..", "/", "0000:3b:00.0/.."] {
            assert_eq!(pci_numa_node(&sys, bad), None, "{bad:?}");
        }
    }

    fn two_node_sys() -> (tempfile::TempDir, Topology) {
        let sys = fake_sys(
            &[("node0", "0-15\n"), ("node1", "16-31\n")],
            &[
                ("0000:3b:00.0", "0\n"),
                ("0000:af:00.0", "1\n"),
                ("0000:5e:00.0", "-1\n"),
                ("0000:d8:00.0", "7\n"),
            ],
        );
        let topo = Topology::from_sysfs(sys.path());
        (sys, topo)
    }

    #[test]
    fn resolve_auto_uses_the_device_node() {
        let (sys, topo) = two_node_sys();
        let p = Placement::resolve(&topo, sys.path(), Some("00000000:AF:00.0"), None).unwrap();
        assert_eq!(p, Placement::Node(node(1, 16..=31)));
        assert_eq!(p.node_id(), Some(1));
        assert_eq!(p.to_string(), "node 1 (cpus 16-31)");
        let p = Placement::resolve(&topo, sys.path(), Some("0000:3b:00.0"), None).unwrap();
        assert_eq!(p.to_string(), "node 0 (cpus 0-15)");
    }

    #[test]
    fn resolve_auto_without_affinity_is_unknown() {
        let (sys, topo) = two_node_sys();
        let p = Placement::resolve(&topo, sys.path(), Some("00000000:5E:00.0"), None).unwrap();
        assert_eq!(
            p,
            Placement::Unknown {
                reason: "sysfs reports no NUMA affinity for 0000:5e:00.0".to_string()
            }
        );
        assert_eq!(p.node_id(), None);
        assert_eq!(p.to_string(), "unknown (sysfs reports no NUMA affinity for 0000:5e:00.0)");
        // Binding an unknown placement does nothing and succeeds.
        p.bind_current_thread().unwrap();

        let p = Placement::resolve(&topo, sys.path(), None, None).unwrap();
        assert_eq!(p, Placement::Unknown { reason: "the device has no PCI bus id".to_string() });
        let p = Placement::resolve(&topo, sys.path(), Some("../../etc"), None).unwrap();
        assert_eq!(
            p,
            Placement::Unknown {
                reason: "PCI bus id \"../../etc\" is not a domain:bus:device.function address"
                    .to_string()
            }
        );
        let p = Placement::resolve(&topo, sys.path(), Some("0000:d8:00.0"), None).unwrap();
        assert_eq!(
            p,
            Placement::Unknown {
                reason: "sysfs places PCI device 0000:d8:00.0 on NUMA node 7, which this \
                         machine does not list"
                    .to_string()
            }
        );
        let p = Placement::resolve(&topo, sys.path(), Some("0000:01:00.0"), None).unwrap();
        match p {
            Placement::Unknown { reason } => assert!(
                reason.starts_with("cannot read the NUMA node of 0000:01:00.0 from "),
                "{reason}"
            ),
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    #[test]
    fn resolve_forced_node() {
        let (sys, topo) = two_node_sys();
        // Forcing overrides what sysfs says about the device.
        let p = Placement::resolve(&topo, sys.path(), Some("0000:3b:00.0"), Some(1)).unwrap();
        assert_eq!(p, Placement::Node(node(1, 16..=31)));
        let p = Placement::resolve(&topo, sys.path(), None, Some(0)).unwrap();
        assert_eq!(p, Placement::Node(node(0, 0..=15)));
    }

    #[test]
    fn resolve_forced_missing_node_is_an_error() {
        let (sys, topo) = two_node_sys();
        let err =
            Placement::resolve(&topo, sys.path(), Some("0000:3b:00.0"), Some(99)).unwrap_err();
        assert_eq!(err, NumaError::NoSuchNode { node: 99, available: vec![0, 1] });
        assert_eq!(err.to_string(), "NUMA node 99 does not exist (this machine has nodes 0, 1)");

        let one = fake_sys(&[("node0", "0-1\n")], &[]);
        let topo = Topology::from_sysfs(one.path());
        let err = Placement::resolve(&topo, one.path(), None, Some(1)).unwrap_err();
        assert_eq!(err.to_string(), "NUMA node 1 does not exist (this machine has node 0)");

        let err = Placement::resolve(&Topology::default(), sys.path(), None, Some(0)).unwrap_err();
        assert_eq!(err, NumaError::NoSuchNode { node: 0, available: vec![] });
        assert_eq!(
            err.to_string(),
            "NUMA node 0 does not exist (this machine reports no NUMA nodes)"
        );
    }

    #[test]
    fn resolve_unknown_topology_is_unknown() {
        let (sys, _) = two_node_sys();
        let p = Placement::resolve(&Topology::default(), sys.path(), Some("0000:3b:00.0"), None)
            .unwrap();
        assert_eq!(
            p,
            Placement::Unknown { reason: "this machine reports no NUMA nodes".to_string() }
        );
        assert_eq!(p.to_string(), "unknown (this machine reports no NUMA nodes)");
    }

    #[test]
    fn placement_display_compresses_cpus() {
        let p = Placement::Node(Node { id: 2, cpus: vec![0, 1, 2, 3, 8, 9, 10, 11, 16] });
        assert_eq!(p.to_string(), "node 2 (cpus 0-3,8-11,16)");
        let p = Placement::Node(Node { id: 3, cpus: vec![] });
        assert_eq!(p.to_string(), "node 3 (no cpus)");
    }

    /// The calling thread's CPU affinity.
    fn current_affinity() -> Vec<usize> {
        // SAFETY: all zeroes is the empty cpu_set_t.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu < CPU_SETSIZE`, inside `set`.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    }

    #[test]
    fn bind_current_thread_sets_affinity_on_this_machine() {
        let topo = Topology::detect();
        let Some(node0) = topo.node(0).cloned() else {
            eprintln!("skipping: this machine reports no NUMA node 0");
            return;
        };
        // A spawned thread: the binding must not leak into the test harness's threads.
        let (before, after) = std::thread::spawn(move || {
            let before = current_affinity();
            bind_current_thread(&node0).unwrap();
            (before, current_affinity())
        })
        .join()
        .unwrap();
        // The kernel intersects the requested mask with the CPUs this process may use (its
        // cpuset); where that is the whole node, as on a plain box, this is node 0's CPUs.
        let node0 = topo.node(0).unwrap();
        let expected: Vec<usize> =
            node0.cpus.iter().copied().filter(|c| before.contains(c)).collect();
        assert!(!expected.is_empty(), "node 0 {node0:?}, allowed {before:?}");
        assert_eq!(after, expected);
        // Through Placement too.
        let placement = Placement::Node(node0.clone());
        let after = std::thread::spawn(move || {
            placement.bind_current_thread().unwrap();
            current_affinity()
        })
        .join()
        .unwrap();
        assert_eq!(after, expected);
    }

    /// The calling thread's memory policy: (mode, first word of the nodemask).
    fn current_mempolicy() -> (libc::c_int, libc::c_ulong) {
        let mut mode: libc::c_int = -1;
        let mut mask: [libc::c_ulong; 16] = [0; 16];
        let maxnode = (mask.len() * libc::c_ulong::BITS as usize) as libc::c_ulong;
        // SAFETY: get_mempolicy(mode, nodemask, maxnode, addr, flags) writes one c_int to `mode`
        // and at most `maxnode` bits to `mask`, which holds exactly that many; addr and flags
        // are 0 (the thread's policy).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &mut mode as *mut libc::c_int,
                mask.as_mut_ptr(),
                maxnode,
                0usize,
                0usize,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        (mode, mask[0])
    }

    #[test]
    fn bind_current_thread_prefers_the_node_unless_refused() {
        let topo = Topology::detect();
        let Some(node0) = topo.node(0).cloned() else {
            eprintln!("skipping: this machine reports no NUMA node 0");
            return;
        };
        let (before, after) = std::thread::spawn(move || {
            let before = current_mempolicy();
            bind_current_thread(&node0).unwrap();
            (before, current_mempolicy())
        })
        .join()
        .unwrap();
        if after == before && before.0 != libc::MPOL_PREFERRED {
            // Refused (seccomp / no CAP_SYS_NICE): bind still returned Ok, which is the point.
            eprintln!("set_mempolicy refused here; policy stayed {before:?}");
            return;
        }
        assert_eq!(after, (libc::MPOL_PREFERRED, 1));
    }

    #[test]
    fn bind_rejects_absurd_node_ids() {
        let err = std::thread::spawn(|| set_preferred_node(MAX_NODE)).join().unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "set_mempolicy failed: NUMA node 4096 is beyond the kernel's limit of 4096 nodes"
        );
    }
}
