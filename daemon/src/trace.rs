//! A timeline recorder: what each thread did when, written as Chrome trace / Perfetto JSON.
//!
//! The engine, the copy pipeline and the host backend call the hooks here ([`span`],
//! [`span_bytes`], [`layer_span`], [`instant_with`], [`complete`]) at the points a timeline
//! should show: a layer's copy job on an I/O thread, each copy on a host copy thread, LoRA
//! merges, loads and evictions. Nothing is recorded unless a [`Recorder`] is running: every hook
//! first reads one relaxed atomic flag and returns at once when it is off, before formatting
//! anything (names and arguments are built by closures that only run when recording).
//!
//! The recorder is process-wide (one at a time, [`Recorder::start`] refuses a second one),
//! because the copy threads it watches belong to a device, not to a caller that could hand
//! them a handle. Each thread is one track, named after the thread (`ferry-io-0`,
//! `ferry-copy-0`) or by [`set_thread_name`] (`ferryctl bench` calls its own thread
//! `client (compute)`).
//!
//! Output ([`Trace::to_json`]): `{"traceEvents": [...]}` with `"X"` complete events (`ts`,
//! `dur` in microseconds), `"i"` instant events (thread-scoped), and `"M"` metadata naming the
//! process and each thread, loadable in <https://ui.perfetto.dev> and `chrome://tracing`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use serde::Serialize;

/// Whether a recorder is running (read by every hook before anything else).
static ON: AtomicBool = AtomicBool::new(false);
/// The running recorder's buffer.
static CURRENT: RwLock<Option<Arc<Shared>>> = RwLock::new(None);
/// Track ids, one per thread, for the life of the process.
static NEXT_TID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's track id (0: not assigned yet) and its name override.
    static TRACK: RefCell<(u64, Option<String>)> = const { RefCell::new((0, None)) };
}

/// Events kept by default before further ones are counted as dropped (about 100 bytes each).
pub const DEFAULT_LIMIT: usize = 2_000_000;

/// An argument value attached to an event.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Arg {
    U64(u64),
    Str(Cow<'static, str>),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::U64(v)
    }
}

impl From<usize> for Arg {
    fn from(v: usize) -> Arg {
        Arg::U64(v as u64)
    }
}

impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Str(Cow::Owned(v))
    }
}

impl From<&'static str> for Arg {
    fn from(v: &'static str) -> Arg {
        Arg::Str(Cow::Borrowed(v))
    }
}

impl Arg {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Arg::U64(v) => Some(*v),
            Arg::Str(_) => None,
        }
    }
}

/// Named arguments of an event.
pub type Args = Vec<(&'static str, Arg)>;

/// What an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// A span: `ts` to `ts + dur`.
    Complete,
    /// A point in time.
    Instant,
}

/// One recorded event, times in nanoseconds since the recorder started.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub phase: Phase,
    pub cat: &'static str,
    pub name: Cow<'static, str>,
    pub ts_ns: u64,
    pub dur_ns: u64,
    pub tid: u64,
    pub args: Args,
}

impl Event {
    pub fn end_ns(&self) -> u64 {
        self.ts_ns.saturating_add(self.dur_ns)
    }

    /// A `u64` argument by name.
    pub fn arg_u64(&self, key: &str) -> Option<u64> {
        self.args.iter().find(|(k, _)| *k == key).and_then(|(_, v)| v.as_u64())
    }
}

#[derive(Debug)]
struct Shared {
    start: Instant,
    limit: usize,
    events: Mutex<Vec<Event>>,
    /// Track id → name, for the threads seen so far.
    threads: Mutex<BTreeMap<u64, String>>,
    dropped: AtomicU64,
}

impl Shared {
    fn since(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    fn push(&self, mut e: Event) {
        e.tid = self.track();
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() >= self.limit {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        events.push(e);
    }

    /// This thread's track id, registering its name on first sight.
    fn track(&self) -> u64 {
        let (tid, name) = TRACK.with(|t| {
            let mut t = t.borrow_mut();
            if t.0 == 0 {
                t.0 = NEXT_TID.fetch_add(1, Ordering::Relaxed);
            }
            (t.0, t.1.clone())
        });
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.entry(tid).or_insert_with(|| {
            name.unwrap_or_else(|| {
                std::thread::current()
                    .name()
                    .map_or_else(|| format!("thread {tid}"), str::to_string)
            })
        });
        tid
    }
}

/// The running recorder, if any (cloned out so the lock is not held while recording).
fn current() -> Option<Arc<Shared>> {
    if !ON.load(Ordering::Relaxed) {
        return None;
    }
    CURRENT.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Whether a recorder is running. Hooks check this first; it is one relaxed atomic load.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Names this thread's track (it keeps the name for later recorders too).
pub fn set_thread_name(name: &str) {
    TRACK.with(|t| t.borrow_mut().1 = Some(name.to_string()));
    if let Some(s) = current() {
        let tid = s.track();
        s.threads.lock().unwrap_or_else(PoisonError::into_inner).insert(tid, name.to_string());
    }
}

/// An open span: recorded as a complete event when dropped (or [`Span::end`]ed).
#[derive(Debug)]
#[must_use = "a span records when it is dropped; bind it to a variable (`let _s = ...`)"]
pub struct Span {
    open: Option<OpenSpan>,
}

#[derive(Debug)]
struct OpenSpan {
    start: Instant,
    cat: &'static str,
    name: Cow<'static, str>,
    args: Args,
}

impl Span {
    /// A span that records nothing.
    pub const fn off() -> Span {
        Span { open: None }
    }

    /// Adds an argument (nothing happens when not recording).
    pub fn arg(&mut self, key: &'static str, value: impl Into<Arg>) {
        if let Some(o) = &mut self.open {
            o.args.push((key, value.into()));
        }
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(o) = self.open.take() {
            record_complete(o.cat, o.name, o.start, o.args);
        }
    }
}

fn record_complete(cat: &'static str, name: Cow<'static, str>, start: Instant, args: Args) {
    let end = Instant::now();
    if let Some(s) = current() {
        let ts_ns = s.since(start);
        let dur_ns = s.since(end).saturating_sub(ts_ns);
        s.push(Event { phase: Phase::Complete, cat, name, ts_ns, dur_ns, tid: 0, args });
    }
}

/// A span named `name` in category `cat`, from now until it is dropped.
#[inline]
pub fn span(cat: &'static str, name: &'static str) -> Span {
    if !enabled() {
        return Span::off();
    }
    Span {
        open: Some(OpenSpan {
            start: Instant::now(),
            cat,
            name: Cow::Borrowed(name),
            args: vec![],
        }),
    }
}

/// A span with a `bytes` argument.
#[inline]
pub fn span_bytes(cat: &'static str, name: &'static str, bytes: u64) -> Span {
    let mut s = span(cat, name);
    s.arg("bytes", bytes);
    s
}

/// A span whose name and arguments are built only when recording.
#[inline]
pub fn span_with(cat: &'static str, make: impl FnOnce() -> (Cow<'static, str>, Args)) -> Span {
    if !enabled() {
        return Span::off();
    }
    let start = Instant::now();
    let (name, args) = make();
    Span { open: Some(OpenSpan { start, cat, name, args }) }
}

/// A span for copying one layer: named `component/layer` after the layer of the first of
/// `pieces` (tensor id, bytes), with the layer's byte total.
#[inline]
pub fn layer_span(
    cat: &'static str,
    model: &crate::store::Model,
    pieces: impl Iterator<Item = (usize, u64)>,
) -> Span {
    span_with(cat, || {
        let mut first = None;
        let mut bytes = 0u64;
        let mut count = 0u64;
        for (t, len) in pieces {
            first.get_or_insert(t);
            bytes = bytes.saturating_add(len);
            count += 1;
        }
        let name = first.and_then(|t| layer_name(model, t)).unwrap_or_else(|| "layer".into());
        (Cow::Owned(name), vec![("bytes", Arg::U64(bytes)), ("tensors", Arg::U64(count))])
    })
}

/// `component/layer` of a tensor.
pub fn layer_name(model: &crate::store::Model, tensor: usize) -> Option<String> {
    let info = model.tensor(tensor)?;
    let c = model.components().get(info.component)?;
    Some(format!("{}/{}", c.name, c.layers.get(info.layer)?.name))
}

/// An instant's name and arguments for a layer event (`load`, `evict`): named
/// `{what} component/layer`, with the `layer` as `component/layer` and its `bytes`.
pub fn layer_event(
    what: &'static str,
    model: &crate::store::Model,
    at: Option<(usize, usize)>,
) -> (Cow<'static, str>, Args) {
    let found = at.and_then(|(c, l)| {
        let comp = model.components().get(c)?;
        let layer = comp.layers.get(l)?;
        Some((format!("{}/{}", comp.name, layer.name), layer.bytes))
    });
    let (layer, bytes) = found.unwrap_or_else(|| ("?".into(), 0));
    let args = vec![("layer", Arg::from(layer.clone())), ("bytes", Arg::U64(bytes))];
    (Cow::Owned(format!("{what} {layer}")), args)
}

/// Records a [`layer_event`] instant in category `engine` (nothing when not recording).
#[inline]
pub fn layer_instant(what: &'static str, model: &crate::store::Model, at: Option<(usize, usize)>) {
    instant_with("engine", || layer_event(what, model, at));
}

/// A complete event from `start` until now (for waits measured by their caller).
#[inline]
pub fn complete(cat: &'static str, name: &'static str, start: Instant) {
    if enabled() {
        record_complete(cat, Cow::Borrowed(name), start, vec![]);
    }
}

/// An instant event whose name and arguments are built only when recording.
#[inline]
pub fn instant_with(cat: &'static str, make: impl FnOnce() -> (Cow<'static, str>, Args)) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    if let Some(s) = current() {
        let (name, args) = make();
        let ts_ns = s.since(now);
        s.push(Event { phase: Phase::Instant, cat, name, ts_ns, dur_ns: 0, tid: 0, args });
    }
}

/// Why recording could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("another timeline recording is already running in this process")]
    Busy,
    #[error("writing the trace to {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// A running recording (module docs). Dropping it stops recording and discards the events.
#[derive(Debug)]
pub struct Recorder {
    shared: Arc<Shared>,
}

impl Recorder {
    /// Starts recording, keeping at most `limit` events (later ones are counted, not kept).
    pub fn start(limit: usize) -> Result<Recorder, TraceError> {
        let mut cur = CURRENT.write().unwrap_or_else(PoisonError::into_inner);
        if cur.is_some() {
            return Err(TraceError::Busy);
        }
        // Reserved, not touched: the buffer's resident size then grows with the events
        // written, never by a doubling at some arbitrary moment of the recording. Without
        // the reservation (strict overcommit), it simply grows as usual.
        let mut events = Vec::new();
        let _ = events.try_reserve_exact(limit.min(DEFAULT_LIMIT));
        let shared = Arc::new(Shared {
            start: Instant::now(),
            limit,
            events: Mutex::new(events),
            threads: Mutex::new(BTreeMap::new()),
            dropped: AtomicU64::new(0),
        });
        *cur = Some(Arc::clone(&shared));
        ON.store(true, Ordering::Relaxed);
        Ok(Recorder { shared })
    }

    /// Nanoseconds since the recording started.
    pub fn now_ns(&self) -> u64 {
        self.shared.since(Instant::now())
    }

    /// A copy of the events recorded so far whose spans end at or after `from_ns`.
    pub fn events_since(&self, from_ns: u64) -> Vec<Event> {
        let events = self.shared.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.iter().filter(|e| e.end_ns() >= from_ns).cloned().collect()
    }

    /// The name of a track.
    pub fn thread_name(&self, tid: u64) -> Option<String> {
        self.shared.threads.lock().unwrap_or_else(PoisonError::into_inner).get(&tid).cloned()
    }

    /// Stops recording and returns what was recorded.
    pub fn finish(self) -> Trace {
        self.stop();
        let events =
            std::mem::take(&mut *self.shared.events.lock().unwrap_or_else(PoisonError::into_inner));
        let threads = std::mem::take(
            &mut *self.shared.threads.lock().unwrap_or_else(PoisonError::into_inner),
        );
        Trace { events, threads, dropped: self.shared.dropped.load(Ordering::Relaxed) }
    }

    fn stop(&self) {
        let mut cur = CURRENT.write().unwrap_or_else(PoisonError::into_inner);
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.shared)) {
            ON.store(false, Ordering::Relaxed);
            *cur = None;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A finished recording.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub events: Vec<Event>,
    /// Track id → thread name.
    pub threads: BTreeMap<u64, String>,
    /// Events past the limit, not kept.
    pub dropped: u64,
}

/// Track order in viewers: the client first, then I/O threads, then copy threads.
fn sort_index(name: &str) -> u64 {
    if name.starts_with("client") {
        0
    } else if name.starts_with("ferry-io") {
        1
    } else if name.starts_with("ferry-copy") {
        2
    } else {
        3
    }
}

impl Trace {
    /// The trace in the trace event format (`{"traceEvents": [...]}`), times in microseconds.
    pub fn to_json(&self, process_name: &str) -> serde_json::Value {
        use serde_json::{Value, json};
        let pid = std::process::id();
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut out: Vec<Value> =
            Vec::with_capacity(self.events.len() + 2 * self.threads.len() + 1);
        out.push(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
            "args": {"name": process_name}}));
        for (tid, name) in &self.threads {
            out.push(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                "args": {"name": name}}));
            out.push(json!({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                "args": {"sort_index": sort_index(name) * 1000 + tid}}));
        }
        for e in &self.events {
            let args: serde_json::Map<String, Value> = e
                .args
                .iter()
                .map(|(k, v)| ((*k).to_string(), serde_json::to_value(v).unwrap_or(Value::Null)))
                .collect();
            let mut v = json!({
                "name": e.name,
                "cat": e.cat,
                "pid": pid,
                "tid": e.tid,
                "ts": us(e.ts_ns),
                "args": args,
            });
            match e.phase {
                Phase::Complete => {
                    v["ph"] = "X".into();
                    v["dur"] = us(e.dur_ns).into();
                }
                Phase::Instant => {
                    v["ph"] = "i".into();
                    v["s"] = "t".into();
                }
            }
            out.push(v);
        }
        let mut root = json!({ "traceEvents": out, "displayTimeUnit": "ms" });
        if self.dropped > 0 {
            root["otherData"] = json!({ "dropped_events": self.dropped });
        }
        root
    }

    /// Writes [`Trace::to_json`] to `path`.
    pub fn write(&self, path: &Path, process_name: &str) -> Result<(), TraceError> {
        let err = |source| TraceError::Write { path: path.display().to_string(), source };
        let f = std::fs::File::create(path).map_err(err)?;
        let mut w = std::io::BufWriter::new(f);
        serde_json::to_writer(&mut w, &self.to_json(process_name))
            .map_err(|e| err(std::io::Error::other(e)))?;
        std::io::Write::flush(&mut w).map_err(err)
    }
}

/// Total time covered by at least one of `spans` (start, end), in nanoseconds: the busy time of
/// the tracks they come from, overlaps counted once.
pub fn union_ns(spans: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    let mut v: Vec<(u64, u64)> = spans.into_iter().filter(|(a, b)| b > a).collect();
    v.sort_unstable();
    let mut total = 0u64;
    let mut cur: Option<(u64, u64)> = None;
    for (a, b) in v {
        match &mut cur {
            Some((_, e)) if a <= *e => *e = (*e).max(b),
            _ => {
                if let Some((s, e)) = cur {
                    total += e - s;
                }
                cur = Some((a, b));
            }
        }
    }
    if let Some((s, e)) = cur {
        total += e - s;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder is process-wide: the tests that start one take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn records_nested_spans_instants_and_thread_names() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(!enabled());
        {
            let _off = span("x", "not recorded");
        }
        let rec = Recorder::start(100).expect("start");
        assert!(matches!(Recorder::start(1), Err(TraceError::Busy)));
        set_thread_name("client (test)");
        {
            let _outer = span("client", "outer");
            let mut inner = span_bytes("client", "inner", 42);
            inner.arg("extra", "yes");
            drop(inner);
            instant_with("engine", || ("evict".into(), vec![("layer", Arg::U64(3))]));
        }
        std::thread::Builder::new()
            .name("ferry-copy-9".into())
            .spawn(|| {
                let _s = span_bytes("copy", "copy", 7);
            })
            .expect("spawn")
            .join()
            .expect("join");
        let mut trace = rec.finish();
        assert!(!enabled());
        // Other tests of this crate may stream meanwhile: keep this test's two threads only.
        let mine = |t: &Trace, name: &str| {
            t.threads.iter().find(|(_, n)| n.as_str() == name).map(|(tid, _)| *tid)
        };
        let (me, copier) = (mine(&trace, "client (test)"), mine(&trace, "ferry-copy-9"));
        trace.events.retain(|e| Some(e.tid) == me || Some(e.tid) == copier);
        let names: Vec<&str> = trace.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["inner", "evict", "outer", "copy"]);
        let outer = &trace.events[2];
        let inner = &trace.events[0];
        assert!(outer.ts_ns <= inner.ts_ns && inner.end_ns() <= outer.end_ns());
        assert_eq!(inner.arg_u64("bytes"), Some(42));
        assert_eq!(Some(outer.tid), me);
        assert_eq!(Some(trace.events[3].tid), copier);

        let v = trace.to_json("test");
        let events = v["traceEvents"].as_array().expect("array");
        assert!(events.iter().any(|e| e["ph"] == "M" && e["args"]["name"] == "ferry-copy-9"));
        assert!(events.iter().any(|e| e["ph"] == "i" && e["name"] == "evict"));
        assert!(
            events
                .iter()
                .any(|e| e["ph"] == "X" && e["name"] == "inner" && e["args"]["bytes"] == 42)
        );
    }

    #[test]
    fn limit_counts_what_it_drops() {
        let _g = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let rec = Recorder::start(2).expect("start");
        for _ in 0..5 {
            let _s = span("x", "y");
        }
        let t = rec.finish();
        // At least these three were dropped (other tests' copies may add to both counts).
        assert_eq!(t.events.len(), 2);
        assert!(t.dropped >= 3, "{}", t.dropped);
        assert!(t.to_json("p")["otherData"]["dropped_events"].as_u64() >= Some(3));
    }

    #[test]
    fn union_counts_overlaps_once() {
        assert_eq!(union_ns([(0, 10), (5, 15), (20, 30), (30, 30), (25, 26)]), 25);
        assert_eq!(union_ns([]), 0);
    }
}
