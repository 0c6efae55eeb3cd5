//! How much RAM this process may use, container limits included.
//!
//! `/proc/meminfo` describes the machine; a container's (or a systemd slice's) memory limit is
//! a cgroup setting, and exceeding it gets the process OOM-killed however much the machine has.
//! So the usable amount is the smaller of the two:
//!
//! - **cgroup v2**: the process's cgroup is the `0::<path>` line of `/proc/self/cgroup`; its
//!   directory lies under the cgroup2 mount (from `/proc/self/mountinfo`, default
//!   `/sys/fs/cgroup`), with the mount's root stripped from the path. The effective limit is the
//!   smallest `memory.max` from that directory up to the mount point (`max` = no limit).
//! - **cgroup v1** (also hybrid systems, where the memory controller stays on v1): the same walk
//!   over the `memory` hierarchy (`N:...memory...:<path>`, default mount
//!   `/sys/fs/cgroup/memory`) reading `memory.limit_in_bytes`, where values of 2^62 and above
//!   mean no limit (the kernel reports "unlimited" as a page-rounded `LONG_MAX`).
//!
//! Nothing here panics or fails; every unreadable source falls back:
//!
//! - `MemTotal` unreadable: `sysconf(_SC_PHYS_PAGES) * page size`; failing that, `u64::MAX`.
//! - `MemAvailable` missing (kernels before 3.14): `MemFree + Buffers + Cached`; meminfo
//!   unreadable: `sysconf(_SC_AVPHYS_PAGES) * page size`; failing that, the limit itself.
//! - No cgroup found or readable (not Linux, no cgroupfs mounted, the process's cgroup
//!   directory not visible): no cgroup limit. A level whose file is missing (the root cgroup
//!   has no `memory.max`) or unparsable adds no limit; the other levels still count.
//!
//! Available memory within a cgroup is `limit - (usage - inactive_file)` at each limited level,
//! the smallest of them: usage (`memory.current`, `memory.usage_in_bytes`) counts page cache,
//! and the inactive part of it (typically the clean file pages of weights read earlier) is
//! reclaimed before the cgroup OOMs. Without `memory.stat`, the plain usage is subtracted.

use std::fs;
use std::path::{Path, PathBuf};

/// The memory limits seen by this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimits {
    /// The machine's RAM (`MemTotal`).
    pub total: u64,
    /// The smallest cgroup memory limit on the path to the root, if any level has one.
    pub cgroup_limit: Option<u64>,
    /// What this process may use: `min(total, cgroup_limit)`.
    pub effective: u64,
}

/// Detects the limits now (reads procfs and cgroupfs; a few small file reads).
pub fn detect() -> MemoryLimits {
    detect_at(Path::new("/")).0
}

/// The RAM this process may use: `min(MemTotal, cgroup limit)`.
pub fn ram_limit() -> u64 {
    detect().effective
}

/// The RAM this process could still get now: `MemAvailable`, capped by the headroom left under
/// every cgroup limit and by [`ram_limit`].
pub fn ram_available() -> u64 {
    let (limits, headroom) = detect_at(Path::new("/"));
    let meminfo = read(Path::new("/proc/meminfo")).map(|s| parse_meminfo(&s)).unwrap_or_default();
    let machine = meminfo
        .available
        .or_else(|| {
            Some(
                meminfo
                    .free?
                    .saturating_add(meminfo.buffers.unwrap_or(0))
                    .saturating_add(meminfo.cached.unwrap_or(0)),
            )
        })
        .or_else(|| sysconf_bytes(libc::_SC_AVPHYS_PAGES))
        .unwrap_or(limits.effective);
    machine.min(limits.effective).min(headroom.unwrap_or(u64::MAX))
}

/// The fields of `/proc/meminfo` used here, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: Option<u64>,
    pub available: Option<u64>,
    pub free: Option<u64>,
    pub buffers: Option<u64>,
    pub cached: Option<u64>,
}

/// Parses `/proc/meminfo` (`Key:   1234 kB` lines; values in KiB, converted to bytes). Unknown
/// or malformed lines are skipped.
pub fn parse_meminfo(contents: &str) -> MemInfo {
    let mut info = MemInfo::default();
    for line in contents.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let mut words = rest.split_whitespace();
        let Some(value) = words.next().and_then(|v| v.parse::<u64>().ok()) else { continue };
        let bytes = match words.next() {
            Some("kB") => value.saturating_mul(1024),
            None => value,
            Some(_) => continue,
        };
        let field = match key.trim() {
            "MemTotal" => &mut info.total,
            "MemAvailable" => &mut info.available,
            "MemFree" => &mut info.free,
            "Buffers" => &mut info.buffers,
            "Cached" => &mut info.cached,
            _ => continue,
        };
        *field = Some(bytes);
    }
    info
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLine<'a> {
    pub id: u32,
    /// Comma-separated controllers; empty for the cgroup v2 line (`0::/path`).
    pub controllers: &'a str,
    pub path: &'a str,
}

impl CgroupLine<'_> {
    /// The unified (cgroup v2) hierarchy's line.
    pub fn is_v2(&self) -> bool {
        self.id == 0 && self.controllers.is_empty()
    }

    /// Whether this v1 hierarchy carries the memory controller.
    pub fn has_memory(&self) -> bool {
        self.controllers.split(',').any(|c| c == "memory")
    }
}

/// Parses one line of `/proc/self/cgroup`. The path may itself contain `:`.
pub fn parse_cgroup_line(line: &str) -> Option<CgroupLine<'_>> {
    let mut parts = line.trim_end_matches('\n').splitn(3, ':');
    let id = parts.next()?.parse().ok()?;
    let controllers = parts.next()?;
    let path = parts.next()?;
    path.starts_with('/').then_some(CgroupLine { id, controllers, path })
}

/// A cgroup memory limit file's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupLimit {
    Unlimited,
    Bytes(u64),
}

impl CgroupLimit {
    fn bytes(self) -> Option<u64> {
        match self {
            CgroupLimit::Unlimited => None,
            CgroupLimit::Bytes(b) => Some(b),
        }
    }
}

/// v1 reports "no limit" as `LONG_MAX` rounded down to a page; anything this large is no limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// Parses `memory.max` (v2: a number or `max`) or `memory.limit_in_bytes` (v1: a number, huge
/// meaning unlimited; `-1` as some writers echo it). `None` if unparsable.
pub fn parse_memory_max(contents: &str) -> Option<CgroupLimit> {
    let value = contents.trim();
    if value == "max" || value == "-1" {
        return Some(CgroupLimit::Unlimited);
    }
    let bytes: u64 = value.parse().ok()?;
    Some(if bytes >= V1_UNLIMITED { CgroupLimit::Unlimited } else { CgroupLimit::Bytes(bytes) })
}

/// A `key value` field of `memory.stat`.
pub fn parse_memory_stat(contents: &str, key: &str) -> Option<u64> {
    contents.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key { v.trim().parse().ok() } else { None }
    })
}

/// A cgroup filesystem mount from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// The cgroup the mount shows at its top (field 4, usually `/`).
    pub root: String,
    /// Where it is mounted (field 5).
    pub mount_point: PathBuf,
}

/// Finds the cgroup2 mount (`v2`), or the v1 mount carrying the memory controller, in
/// `/proc/self/mountinfo`: `id parent major:minor root mount-point options [optional...] -
/// fstype source super-options`. Octal escapes (`\040` for a space) in paths are decoded.
pub fn parse_mountinfo(contents: &str, v2: bool) -> Option<CgroupMount> {
    contents.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let mut after = after.split(' ');
        let fstype = after.next()?;
        let _source = after.next()?;
        let super_options = after.next().unwrap_or("");
        let wanted = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && super_options.split(',').any(|o| o == "memory")
        };
        if !wanted || fields.len() < 5 {
            return None;
        }
        Some(CgroupMount {
            root: unescape_octal(fields[3]),
            mount_point: PathBuf::from(unescape_octal(fields[4])),
        })
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes.get(i + 1..i + 4)
            && code.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = code.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` under a mount showing cgroup `mount_root` at `mount_point`;
/// `None` if the cgroup is not below the mount's root (then only the mount point is visible).
pub fn cgroup_dir(mount_point: &Path, mount_root: &str, path: &str) -> Option<PathBuf> {
    let root = mount_root.trim_end_matches('/');
    let rel = path.strip_prefix(root)?;
    if !(rel.is_empty() || rel.starts_with('/')) {
        return None; // `/a/bc` is not below `/a/b`
    }
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() { mount_point.to_path_buf() } else { mount_point.join(rel) })
}

/// The files that differ between the two cgroup versions.
struct Files {
    limit: &'static str,
    usage: &'static str,
    inactive_file: &'static str,
}

const V2: Files =
    Files { limit: "memory.max", usage: "memory.current", inactive_file: "inactive_file" };
const V1: Files = Files {
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    inactive_file: "total_inactive_file",
};

/// Limits under filesystem root `root` (`/` outside tests), plus the smallest headroom left
/// under a cgroup limit.
fn detect_at(root: &Path) -> (MemoryLimits, Option<u64>) {
    let total = read(&under(root, "/proc/meminfo"))
        .and_then(|s| parse_meminfo(&s).total)
        .or_else(|| sysconf_bytes(libc::_SC_PHYS_PAGES))
        .unwrap_or(u64::MAX);
    let (cgroup_limit, headroom) = cgroup_limits(root).unwrap_or((None, None));
    let effective = cgroup_limit.map_or(total, |l| l.min(total));
    (MemoryLimits { total, cgroup_limit, effective }, headroom)
}

/// `(smallest limit, smallest headroom)` along the process's memory cgroup path, or `None`
/// without a readable cgroup.
fn cgroup_limits(root: &Path) -> Option<(Option<u64>, Option<u64>)> {
    let cgroups = read(&under(root, "/proc/self/cgroup"))?;
    let mountinfo = read(&under(root, "/proc/self/mountinfo")).unwrap_or_default();
    let lines: Vec<CgroupLine<'_>> = cgroups.lines().filter_map(parse_cgroup_line).collect();
    // A v1 memory hierarchy wins: on hybrid systems the v2 tree has no memory controller.
    let (line, v2) = match lines.iter().find(|l| l.has_memory()) {
        Some(l) => (l, false),
        None => (lines.iter().find(|l| l.is_v2())?, true),
    };
    let (files, default_mount) =
        if v2 { (&V2, "/sys/fs/cgroup") } else { (&V1, "/sys/fs/cgroup/memory") };
    let mount = parse_mountinfo(&mountinfo, v2)
        .unwrap_or(CgroupMount { root: "/".into(), mount_point: PathBuf::from(default_mount) });
    let top = under(root, &mount.mount_point.to_string_lossy());
    let leaf = cgroup_dir(&top, &mount.root, line.path).filter(|d| d.is_dir());
    let mut dir = leaf.unwrap_or_else(|| top.clone());

    let (mut limit, mut headroom) = (None::<u64>, None::<u64>);
    loop {
        let level = read(&dir.join(files.limit)).and_then(|s| parse_memory_max(&s));
        if let Some(l) = level.and_then(CgroupLimit::bytes) {
            limit = Some(limit.map_or(l, |m| m.min(l)));
            if let Some(usage) = read(&dir.join(files.usage)).and_then(|s| s.trim().parse().ok()) {
                let usage: u64 = usage;
                let inactive = read(&dir.join("memory.stat"))
                    .and_then(|s| parse_memory_stat(&s, files.inactive_file))
                    .unwrap_or(0);
                let left = l.saturating_sub(usage.saturating_sub(inactive));
                headroom = Some(headroom.map_or(left, |h| h.min(left)));
            }
        }
        if dir == top || !dir.starts_with(&top) {
            break;
        }
        match dir.parent() {
            Some(parent) => dir = parent.to_path_buf(),
            None => break,
        }
    }
    Some((limit, headroom))
}

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn sysconf_bytes(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(name), libc::sysconf(libc::_SC_PAGESIZE)) };
    let pages = u64::try_from(pages).ok().filter(|&p| p > 0)?;
    pages.checked_mul(u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       65536000 kB\n\
MemFree:         1000000 kB\n\
MemAvailable:   32000000 kB\n\
Buffers:           20000 kB\n\
Cached:          3000000 kB\n\
SwapCached:            0 kB\n\
HugePages_Total:       0\n\
Hugepagesize:       2048 kB\n";

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let m = parse_meminfo(MEMINFO);
        assert_eq!(m.total, Some(65_536_000 * 1024));
        assert_eq!(m.available, Some(32_000_000 * 1024));
        assert_eq!(m.free, Some(1_000_000 * 1024));
        assert_eq!(m.buffers, Some(20_000 * 1024));
        assert_eq!(m.cached, Some(3_000_000 * 1024));
        assert_eq!(parse_meminfo(""), MemInfo::default());
        assert_eq!(parse_meminfo("MemTotal: lots kB\ngarbage\n").total, None);
    }

    #[test]
    fn cgroup_lines() {
        let v2 = parse_cgroup_line("0::/user.slice/user-1000.slice/session-2.scope").unwrap();
        assert!(v2.is_v2());
        assert_eq!(v2.path, "/user.slice/user-1000.slice/session-2.scope");
        let v1 = parse_cgroup_line("4:memory:/docker/0123abcd").unwrap();
        assert!(!v1.is_v2() && v1.has_memory());
        assert_eq!((v1.id, v1.path), (4, "/docker/0123abcd"));
        let cpu = parse_cgroup_line("3:cpu,cpuacct:/").unwrap();
        assert!(!cpu.has_memory());
        assert!(parse_cgroup_line("11:memory,blkio:/a").unwrap().has_memory());
        assert_eq!(parse_cgroup_line("0::/with:colon").unwrap().path, "/with:colon");
        assert_eq!(parse_cgroup_line("0::/\n").unwrap().path, "/");
        assert!(parse_cgroup_line("").is_none());
        assert!(parse_cgroup_line("x::/").is_none());
        assert!(parse_cgroup_line("0::").is_none());
    }

    #[test]
    fn memory_max_values() {
        assert_eq!(parse_memory_max("max\n"), Some(CgroupLimit::Unlimited));
        assert_eq!(parse_memory_max("8589934592\n"), Some(CgroupLimit::Bytes(8 << 30)));
        assert_eq!(parse_memory_max("9223372036854771712\n"), Some(CgroupLimit::Unlimited));
        assert_eq!(parse_memory_max("-1"), Some(CgroupLimit::Unlimited));
        assert_eq!(parse_memory_max("0"), Some(CgroupLimit::Bytes(0)));
        assert_eq!(parse_memory_max(""), None);
        assert_eq!(parse_memory_max("12G"), None);
    }

    #[test]
    fn memory_stat_fields() {
        let stat = "anon 1000\nfile 5000\ninactive_file 4000\nactive_file 1000\n";
        assert_eq!(parse_memory_stat(stat, "inactive_file"), Some(4000));
        assert_eq!(parse_memory_stat(stat, "file"), Some(5000));
        assert_eq!(parse_memory_stat(stat, "total_inactive_file"), None);
    }

    #[test]
    fn mountinfo_cgroup_mounts() {
        let info = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:31 /docker/ab /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:32 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct
";
        let v2 = parse_mountinfo(info, true).unwrap();
        assert_eq!(
            (v2.root.as_str(), v2.mount_point.as_path()),
            ("/", Path::new("/sys/fs/cgroup"))
        );
        let v1 = parse_mountinfo(info, false).unwrap();
        assert_eq!(v1.root, "/docker/ab");
        assert_eq!(v1.mount_point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(
            parse_mountinfo("1 0 0:1 / /my\\040cg rw - cgroup2 none rw", true).unwrap().mount_point,
            Path::new("/my cg")
        );
        assert!(parse_mountinfo("22 1 0:21 / /proc rw - proc proc rw", true).is_none());
    }

    #[test]
    fn cgroup_dirs() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(cgroup_dir(m, "/", "/a/b"), Some(m.join("a/b")));
        assert_eq!(cgroup_dir(m, "/", "/"), Some(m.to_path_buf()));
        assert_eq!(cgroup_dir(m, "/docker/x", "/docker/x"), Some(m.to_path_buf()));
        assert_eq!(cgroup_dir(m, "/docker/x", "/docker/x/sub"), Some(m.join("sub")));
        assert_eq!(cgroup_dir(m, "/docker/x", "/docker/xy"), None);
        assert_eq!(cgroup_dir(m, "/docker/x", "/other"), None);
    }

    fn write(root: &Path, path: &str, contents: &str) {
        let p = under(root, path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, contents).unwrap();
    }

    #[test]
    fn v2_limit_is_the_smallest_along_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "/proc/meminfo", MEMINFO);
        write(root, "/proc/self/cgroup", "0::/kubepods/pod1/ctr\n");
        write(
            root,
            "/proc/self/mountinfo",
            "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        );
        write(root, "/sys/fs/cgroup/kubepods/memory.max", "max\n");
        write(root, "/sys/fs/cgroup/kubepods/pod1/memory.max", "4294967296\n");
        write(root, "/sys/fs/cgroup/kubepods/pod1/memory.current", "3221225472\n");
        write(
            root,
            "/sys/fs/cgroup/kubepods/pod1/memory.stat",
            "anon 1\ninactive_file 1073741824\n",
        );
        write(root, "/sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "8589934592\n");
        write(root, "/sys/fs/cgroup/kubepods/pod1/ctr/memory.current", "100\n");

        let (limits, headroom) = detect_at(root);
        assert_eq!(limits.total, 65_536_000 * 1024);
        assert_eq!(limits.cgroup_limit, Some(4 << 30));
        assert_eq!(limits.effective, 4 << 30);
        // 4 GiB - (3 GiB used - 1 GiB inactive file) at the pod; the container has more left.
        assert_eq!(headroom, Some(2 << 30));
    }

    #[test]
    fn v1_limit_and_fallbacks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "/proc/meminfo", "MemTotal: 1048576 kB\n");
        write(root, "/proc/self/cgroup", "0::/\n5:memory:/docker/abc\n");
        // No mountinfo: default v1 mount; a limit above MemTotal leaves MemTotal effective.
        write(root, "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "4294967296\n");
        write(root, "/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
        let (limits, _) = detect_at(root);
        assert_eq!(limits.cgroup_limit, Some(4 << 30));
        assert_eq!(limits.effective, 1 << 30);

        // The process's cgroup directory not visible: the mount point itself is read.
        write(root, "/proc/self/cgroup", "5:memory:/elsewhere\n");
        write(root, "/sys/fs/cgroup/memory/memory.limit_in_bytes", "536870912\n");
        assert_eq!(detect_at(root).0.cgroup_limit, Some(512 << 20));

        // Nothing readable at all: no cgroup limit, and a total from sysconf (or u64::MAX).
        let empty = tempfile::tempdir().unwrap();
        let (limits, headroom) = detect_at(empty.path());
        assert_eq!(limits.cgroup_limit, None);
        assert_eq!(limits.effective, limits.total);
        assert!(limits.total > 0);
        assert_eq!(headroom, None);
    }

    #[test]
    fn this_process() {
        let limits = detect();
        assert!(limits.total > 0);
        assert!(limits.effective <= limits.total);
        assert!(limits.cgroup_limit.is_none_or(|l| limits.effective <= l));
        assert_eq!(ram_limit(), limits.effective);
        assert!(ram_available() <= limits.effective);
    }
}
