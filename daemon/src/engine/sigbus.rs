//! Surviving a mapped weight file that another process truncates.
//!
//! Weight files are mapped read-only (`memmap2`, see [`crate::store`]). If another process
//! truncates a file while it is mapped, touching a page that now lies past the end of the file
//! raises `SIGBUS`, whose default action kills the whole daemon. This module turns such a fault,
//! *inside a range the engine has declared*, into a flag the engine checks after its copy.
//!
//! # Design
//!
//! - **Registry.** A fixed array of [`CAPACITY`] slots, each a small seqlock (`seq`, `start`,
//!   `end`, `faulted_seq`), all atomics: the signal handler reads it without locks or
//!   allocation. [`guard`] claims a free slot (compare-and-swap of its sequence number) and
//!   publishes `start..end`; dropping the [`Guard`] clears the slot. A full registry is an
//!   error ([`SigbusError::RegistryFull`]), never a silent unguarded read.
//! - **Handler.** Installed once per process (on the first [`guard`]) with
//!   `SA_SIGINFO | SA_ONSTACK`, *without* `SA_NODEFER`: `SIGBUS` stays blocked while the handler
//!   runs, so a fault inside the handler itself makes the kernel kill the process instead of
//!   recursing. The previous disposition is kept. The handler only does async-signal-safe
//!   things (atomics, `mmap`, `sigaction`, `raise`) and preserves `errno`. For a kernel-generated
//!   `SIGBUS` (`BUS_ADRERR`, `BUS_OBJERR`, `BUS_MCEERR_AR`) whose `si_addr` lies in a registered
//!   range it
//!   1. marks every live guard overlapping the replaced span as faulted,
//!   2. records the span in the *poison* table (see below),
//!   3. maps private anonymous read-only zero pages (`MAP_FIXED`) over the span from the
//!      faulting page to the end of the last page of the (largest) matching range, and returns:
//!      the faulting instruction re-executes and reads zeros. Replacing the rest of the range
//!      at once keeps a large truncated tensor to a few signals instead of one per page; it
//!      destroys no data, since every byte after a page past end-of-file is past it too.
//!
//!   Any other `SIGBUS` (outside every range, `BUS_ADRALN`, or sent with `kill`) is a real bug
//!   elsewhere and is passed on: to the previous handler if there was one (Rust's runtime
//!   installs one, which resets the disposition to the default), otherwise the default
//!   disposition is restored and the fault re-raises, so the process dies with an ordinary
//!   `SIGBUS`, core dump included.
//! - **Poison table.** Up to [`POISON_CAPACITY`] replaced spans. A page, once replaced, never
//!   faults again, so a guard registered *after* the fault would otherwise read zeros silently;
//!   [`Guard::faulted`] therefore also reports a guard that overlaps a poisoned span. The spans
//!   describe addresses, which the kernel reuses once the mapping is gone, so a span is forgotten
//!   when the last guard overlapping it is dropped (and by [`forget_poisoned`]): otherwise a
//!   later, healthy mapping at the same address would be reported as faulted. Hence: keep a
//!   guard over a faulted mapping for as long as the mapping lives, or never read it again. If
//!   the table is full, further spans are not recorded ([`poison_overflowed`] says so); guards
//!   live at the time of the fault are still marked.
//!
//! # Contract for callers
//!
//! - Guard the bytes, copy them (e.g. with [`copy_guarded`] into a host staging buffer), *then*
//!   check [`Guard::faulted`]. The copy must run on the CPU in this process; a device DMA engine
//!   reading the mapping directly cannot be rescued by a signal handler.
//! - A guarded range must lie within one file mapping (a tensor's bytes, or a whole file's).
//!   Guarding a whole file's bytes while copying its tensors makes one fault replace the rest of
//!   that file's mapping, so a truncated file costs a single signal.
//! - Once a guard has faulted, the mapping holds zeros (from the faulting page on) for good: the
//!   model must be treated as failed and dropped, never read again. Dropping the `Mmap` unmaps
//!   the whole range, the replacement pages included.
//! - Only pages wholly past the new end of file fault. Bytes past it on the file's last
//!   remaining page read as zeros *without* a fault (the kernel zero-fills that page's tail), so
//!   a guard over just those bytes never reports anything. Guard whole files (as the engine
//!   does): a truncation that removes a whole page then faults on the first read past it. A
//!   truncation within the last page, or one followed by re-extension, is only visible to a
//!   length check on the file (`fstat`).
//! - The handler is process-wide. If some other code later replaces the `SIGBUS` handler without
//!   chaining to ours, guarded faults kill the process again, as they would without this module.
//!
//! Everything here is Linux-specific (`si_addr`, `MAP_FIXED` semantics, `__errno_location`).

use std::ops::Range;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering, fence};

use libc::{c_int, c_void, siginfo_t};

/// How many guards can be live at once.
pub const CAPACITY: usize = 4096;

/// How many replaced spans are remembered (see the module docs, "Poison table").
pub const POISON_CAPACITY: usize = 1024;

// `si_code` values of a kernel-generated SIGBUS (asm-generic/siginfo.h), not all in `libc`.
// `BUS_ADRALN` (1, misaligned access) is deliberately absent: zeros would not cure it.
/// Non-existent physical address: a page past the end of a mapped file.
const BUS_ADRERR: c_int = 2;
/// Object-specific hardware error.
const BUS_OBJERR: c_int = 3;
/// Hardware memory error consumed by the machine (e.g. a bad page-cache page).
const BUS_MCEERR_AR: c_int = 4;

/// Why a range could not be guarded or a guarded copy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigbusError {
    #[error("all {capacity} SIGBUS guard slots are in use")]
    RegistryFull { capacity: usize },
    #[error("could not install the SIGBUS handler: {0}")]
    Install(std::io::Error),
    #[error("range of {len} bytes at {start:#x} wraps around the address space")]
    InvalidRange { start: usize, len: usize },
    #[error("source {start:#x}+{len} is not inside the guarded range {guarded:#x?}")]
    NotGuarded { start: usize, len: usize, guarded: Range<usize> },
    #[error("source is {src} bytes but destination is {dst}")]
    LengthMismatch { src: usize, dst: usize },
    #[error(
        "the mapped file behind {range:#x?} was truncated (or its pages failed) while being read"
    )]
    Truncated { range: Range<usize> },
}

/// One seqlock-protected address range. `seq` is even when stable and odd while its one writer
/// updates `start`/`end`; a slot is free when `start == end`. Only the writer that moved `seq`
/// from even to odd (by compare-and-swap) writes the range.
struct Slot {
    seq: AtomicUsize,
    start: AtomicUsize,
    end: AtomicUsize,
    /// For guards: the largest `seq` at which the handler saw this slot fault (0: never). A
    /// guard registered at sequence `s` has faulted iff this equals `s`; `fetch_max` keeps a
    /// handler that raced with a re-registration from marking the newer guard.
    faulted_seq: AtomicUsize,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faulted_seq: AtomicUsize::new(0),
        }
    }

    /// A consistent snapshot `(seq, start, end)`, or `None` while being written. Async-signal-
    /// safe: loads only.
    fn read(&self) -> Option<(usize, usize, usize)> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let start = self.start.load(Ordering::Relaxed);
        let end = self.end.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let s2 = self.seq.load(Ordering::Relaxed);
        (s1 == s2).then_some((s1, start, end))
    }

    /// Claims the slot if it is free; returns the locked (odd) sequence number.
    fn try_claim_free(&self) -> Option<usize> {
        let (seq, start, end) = self.read()?;
        if start != end {
            return None;
        }
        self.try_lock(seq)
    }

    /// Takes the writer role if the slot is still at sequence `seq`.
    fn try_lock(&self, seq: usize) -> Option<usize> {
        self.seq.compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed).ok()?;
        fence(Ordering::Release);
        Some(seq + 1)
    }

    /// Writes the range and releases the writer role; returns the new (even) sequence number.
    fn write_unlock(&self, locked: usize, start: usize, end: usize) -> usize {
        self.start.store(start, Ordering::Relaxed);
        self.end.store(end, Ordering::Relaxed);
        self.seq.store(locked + 1, Ordering::Release);
        locked + 1
    }
}

static GUARDS: [Slot; CAPACITY] = [const { Slot::new() }; CAPACITY];
/// One past the highest guard slot ever claimed: the handler scans no further.
static GUARDS_HIGH: AtomicUsize = AtomicUsize::new(0);
/// Where the next claim starts looking, so claims do not all probe slot 0 first.
static GUARDS_NEXT: AtomicUsize = AtomicUsize::new(0);

static POISON: [Slot; POISON_CAPACITY] = [const { Slot::new() }; POISON_CAPACITY];
static POISON_HIGH: AtomicUsize = AtomicUsize::new(0);
/// Live poisoned spans; `Guard::faulted` skips the poison scan while it is 0.
static POISON_LIVE: AtomicUsize = AtomicUsize::new(0);
static POISON_OVERFLOW: AtomicBool = AtomicBool::new(false);

/// Guarded faults handled since start.
static FAULTS: AtomicU64 = AtomicU64::new(0);

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
/// The disposition found when installing: handler address (`sa_sigaction`) and `sa_flags`.
static PREV_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_FLAGS: AtomicI32 = AtomicI32::new(0);

/// A registered range. Unregisters on drop. `Send` and `Sync`: it holds addresses, not
/// pointers, and the registry is all atomics.
#[derive(Debug)]
#[must_use = "the range is unguarded again as soon as the Guard is dropped"]
pub struct Guard {
    start: usize,
    end: usize,
    /// `(slot index, sequence number it was registered at)`; `None` for an empty range.
    slot: Option<(usize, usize)>,
}

/// Registers `ptr..ptr + len` so that a SIGBUS inside it is survived (see the module docs).
/// Installs the process-wide handler on first use. An empty range is accepted and never faults.
pub fn guard(ptr: *const u8, len: usize) -> Result<Guard, SigbusError> {
    let start = ptr as usize;
    let end = start.checked_add(len).ok_or(SigbusError::InvalidRange { start, len })?;
    if len == 0 {
        return Ok(Guard { start, end, slot: None });
    }
    install()?;
    let first = GUARDS_NEXT.fetch_add(1, Ordering::Relaxed);
    for i in 0..CAPACITY {
        let index = (first + i) % CAPACITY;
        let slot = &GUARDS[index];
        let Some(locked) = slot.try_claim_free() else { continue };
        // Publish the high-water mark before the range, so the handler cannot miss the slot.
        GUARDS_HIGH.fetch_max(index + 1, Ordering::AcqRel);
        let seq = slot.write_unlock(locked, start, end);
        return Ok(Guard { start, end, slot: Some((index, seq)) });
    }
    Err(SigbusError::RegistryFull { capacity: CAPACITY })
}

/// [`guard`] over a slice.
pub fn guard_slice(bytes: &[u8]) -> Result<Guard, SigbusError> {
    guard(bytes.as_ptr(), bytes.len())
}

impl Guard {
    /// Whether a SIGBUS hit this range while the guard was live, or the range overlaps pages
    /// already replaced by an earlier fault. Once true, bytes read from the range may be zeros.
    pub fn faulted(&self) -> bool {
        let Some((index, seq)) = self.slot else { return false };
        GUARDS[index].faulted_seq.load(Ordering::Acquire) == seq
            || overlaps_poison(self.start, self.end)
    }

    /// `Err(Truncated)` if [`Guard::faulted`].
    pub fn check(&self) -> Result<(), SigbusError> {
        if self.faulted() { Err(SigbusError::Truncated { range: self.range() }) } else { Ok(()) }
    }

    /// The guarded addresses.
    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }

    /// Whether `bytes` lies inside the guarded range.
    pub fn covers(&self, bytes: &[u8]) -> bool {
        let start = bytes.as_ptr() as usize;
        start >= self.start && start.checked_add(bytes.len()).is_some_and(|end| end <= self.end)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some((index, seq)) = self.slot else { return };
        let slot = &GUARDS[index];
        // Only this guard writes its slot while it is live: claimers skip non-empty slots and
        // the handler only reads it, so the lock succeeds.
        if let Some(locked) = slot.try_lock(seq) {
            slot.write_unlock(locked, 0, 0);
        }
        forget_unguarded_poison(self.start, self.end);
    }
}

/// Forgets the poisoned spans overlapping `start..end` that no live guard overlaps any more.
fn forget_unguarded_poison(start: usize, end: usize) {
    if POISON_LIVE.load(Ordering::Acquire) == 0 {
        return;
    }
    let high = POISON_HIGH.load(Ordering::Acquire).min(POISON_CAPACITY);
    for slot in &POISON[..high] {
        let Some((seq, s, e)) = slot.read() else { continue };
        if s < e
            && s < end
            && start < e
            && !find_guards(s, e, |_, _, _| {})
            && let Some(locked) = slot.try_lock(seq)
        {
            slot.write_unlock(locked, 0, 0);
            POISON_LIVE.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Copies `src` (which must lie inside `guard`'s range) into `dst`, then checks the guard.
/// `Err(Truncated)` means `dst` may hold zeros for part of `src`: the model has failed.
pub fn copy_guarded(guard: &Guard, src: &[u8], dst: &mut [u8]) -> Result<(), SigbusError> {
    if !guard.covers(src) {
        return Err(SigbusError::NotGuarded {
            start: src.as_ptr() as usize,
            len: src.len(),
            guarded: guard.range(),
        });
    }
    if src.len() != dst.len() {
        return Err(SigbusError::LengthMismatch { src: src.len(), dst: dst.len() });
    }
    // SAFETY: both slices are valid for `src.len()` bytes and cannot overlap (`dst` is a unique
    // borrow). If the source's file is truncated, the read faults and the handler (installed by
    // `guard`, whose range covers `src`) maps zero pages over the missing ones before the copy
    // instruction re-executes, so the copy completes, reading zeros from there on.
    unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
    guard.check()
}

/// Whether `addr` lies inside some live guard.
pub fn is_guarded(addr: *const u8) -> bool {
    find_guards(addr as usize, (addr as usize).saturating_add(1), |_, _, _| {})
}

/// Whether any recorded replaced span overlaps `ptr..ptr + len`.
pub fn is_poisoned(ptr: *const u8, len: usize) -> bool {
    let start = ptr as usize;
    overlaps_poison(start, start.saturating_add(len))
}

/// Forgets the replaced spans overlapping `ptr..ptr + len`, guarded or not; returns how many.
/// Dropping the last guard over a span already does this; call it for a mapping about to be
/// unmapped while guards over it are still live.
pub fn forget_poisoned(ptr: *const u8, len: usize) -> usize {
    let start = ptr as usize;
    let end = start.saturating_add(len);
    let high = POISON_HIGH.load(Ordering::Acquire).min(POISON_CAPACITY);
    let mut forgotten = 0;
    for slot in &POISON[..high] {
        // A slot being written by a handler right now is skipped: its span is fresh poison.
        let Some((seq, s, e)) = slot.read() else { continue };
        if s < e
            && s < end
            && start < e
            && let Some(locked) = slot.try_lock(seq)
        {
            slot.write_unlock(locked, 0, 0);
            POISON_LIVE.fetch_sub(1, Ordering::AcqRel);
            forgotten += 1;
        }
    }
    forgotten
}

/// Whether a replaced span could not be recorded because the poison table was full.
pub fn poison_overflowed() -> bool {
    POISON_OVERFLOW.load(Ordering::Acquire)
}

/// How many guarded faults the handler has survived since the process started.
pub fn faults_handled() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

fn overlaps_poison(start: usize, end: usize) -> bool {
    if POISON_LIVE.load(Ordering::Acquire) == 0 {
        return false;
    }
    let high = POISON_HIGH.load(Ordering::Acquire).min(POISON_CAPACITY);
    POISON[..high]
        .iter()
        .any(|slot| slot.read().is_some_and(|(_, s, e)| s < e && s < end && start < e))
}

/// Calls `f(slot, seq, end)` for every live guard overlapping `start..end`; returns whether
/// there was one. Async-signal-safe.
fn find_guards(start: usize, end: usize, mut f: impl FnMut(&Slot, usize, usize)) -> bool {
    let high = GUARDS_HIGH.load(Ordering::Acquire).min(CAPACITY);
    let mut found = false;
    for slot in &GUARDS[..high] {
        if let Some((seq, s, e)) = slot.read()
            && s < e
            && s < end
            && start < e
        {
            found = true;
            f(slot, seq, e);
        }
    }
    found
}

/// Installs the handler once; later calls return the first outcome.
fn install() -> Result<(), SigbusError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).unwrap_or(0);
        if !page.is_power_of_two() {
            return Err(libc::EINVAL);
        }
        PAGE_SIZE.store(page, Ordering::Release);

        // SAFETY: an all-zero `sigaction` is a valid value (no handler, empty mask, no flags).
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: querying only (null new action); `old` is a valid out-pointer.
        if unsafe { libc::sigaction(libc::SIGBUS, ptr::null(), &mut old) } != 0 {
            return Err(last_errno());
        }
        // Recorded before installing, so the handler never chains to a stale value; recorded
        // again below from the authoritative swap.
        PREV_HANDLER.store(old.sa_sigaction, Ordering::Release);
        PREV_FLAGS.store(old.sa_flags, Ordering::Release);

        // SAFETY: as above, all-zero is a valid `sigaction`.
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = on_sigbus as extern "C" fn(c_int, *mut siginfo_t, *mut c_void) as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `new.sa_mask` is a valid sigset to initialise.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        // SAFETY: `new` is fully initialised and its handler has the SA_SIGINFO signature;
        // `old` is a valid out-pointer.
        if unsafe { libc::sigaction(libc::SIGBUS, &new, &mut old) } != 0 {
            return Err(last_errno());
        }
        if old.sa_sigaction != new.sa_sigaction {
            PREV_HANDLER.store(old.sa_sigaction, Ordering::Release);
            PREV_FLAGS.store(old.sa_flags, Ordering::Release);
        }
        Ok(())
    });
    outcome.map_err(|errno| SigbusError::Install(std::io::Error::from_raw_os_error(errno)))
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction` and `raise` only.
extern "C" fn on_sigbus(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: `errno` points to this thread's errno (above).
    let saved = unsafe { *errno };
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler (checked for null).
    if !unsafe { rescue(info) } {
        // SAFETY: `sig`, `info` and `ctx` are this handler's own arguments, passed on unchanged.
        unsafe { pass_on(sig, info, ctx) };
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// Handles a guarded fault; `false` if the fault is not ours.
///
/// # Safety
///
/// `info` is null or points to the siginfo of the SIGBUS being handled.
unsafe fn rescue(info: *const siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: non-null, and valid per the contract.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if !matches!(code, BUS_ADRERR | BUS_OBJERR | BUS_MCEERR_AR) {
        // Sent by a process (code <= 0), or an alignment fault that zeros would not cure.
        return false;
    }
    let page = PAGE_SIZE.load(Ordering::Acquire);
    if page == 0 {
        return false;
    }
    let mut range_end = 0;
    if !find_guards(addr, addr.saturating_add(1), |_, _, end| range_end = range_end.max(end)) {
        return false;
    }
    let map_start = addr & !(page - 1);
    let Some(map_end) = range_end.checked_add(page - 1).map(|e| e & !(page - 1)) else {
        return false;
    };

    // Mark first, replace second: whoever reads the zeros finds the fault already recorded.
    find_guards(map_start, map_end, |slot, seq, _| {
        slot.faulted_seq.fetch_max(seq, Ordering::AcqRel);
    });
    record_poison(map_start, map_end);
    FAULTS.fetch_add(1, Ordering::AcqRel);

    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
    for len in [map_end - map_start, page] {
        // SAFETY: `map_start..map_start + len` lies in a guarded range's pages, which belong to
        // a file mapping whose pages are gone (that is why it faulted); MAP_FIXED replaces them
        // with zero-filled read-only private pages, which the owner's munmap later removes with
        // the rest of the mapping. No Rust reference is invalidated: the contents were already
        // unreadable. `mmap` is a plain system call wrapper, safe in a signal handler.
        let mapped =
            unsafe { libc::mmap(map_start as *mut c_void, len, libc::PROT_READ, flags, -1, 0) };
        if mapped != libc::MAP_FAILED {
            return true;
        }
    }
    // Could not replace the page: re-executing would fault forever, so let the fault kill us.
    false
}

/// Records a replaced span in the poison table (or sets the overflow flag). Async-signal-safe.
fn record_poison(start: usize, end: usize) {
    for (index, slot) in POISON.iter().enumerate() {
        let Some(locked) = slot.try_claim_free() else { continue };
        POISON_HIGH.fetch_max(index + 1, Ordering::AcqRel);
        POISON_LIVE.fetch_add(1, Ordering::AcqRel);
        slot.write_unlock(locked, start, end);
        return;
    }
    POISON_OVERFLOW.store(true, Ordering::Release);
}

/// Passes a SIGBUS that is not ours to the previous disposition.
///
/// # Safety
///
/// Called from the SIGBUS handler with its own arguments.
unsafe fn pass_on(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let prev = PREV_HANDLER.load(Ordering::Acquire);
    let flags = PREV_FLAGS.load(Ordering::Acquire);
    let sent = info.is_null() || {
        // SAFETY: non-null siginfo from the kernel.
        unsafe { (*info).si_code <= 0 }
    };
    if prev == libc::SIG_IGN && sent {
        return; // a SIGBUS sent by `kill` was ignored before us; keep ignoring it
    }
    if prev == libc::SIG_DFL || prev == libc::SIG_IGN {
        // SAFETY: all-zero is a valid `sigaction`; with SIG_DFL it restores the default action.
        let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
        default.sa_sigaction = libc::SIG_DFL;
        // SAFETY: `default` is a valid action; sigaction is async-signal-safe.
        unsafe { libc::sigaction(libc::SIGBUS, &default, ptr::null_mut()) };
        if sent {
            // A fault re-raises by re-executing; a sent signal must be raised again. SIGBUS is
            // blocked while we run, so it is delivered (and kills) when the handler returns.
            // SAFETY: raise is async-signal-safe.
            unsafe { libc::raise(libc::SIGBUS) };
        }
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so its handler has this
        // signature; it receives the arguments the kernel gave us.
        let handler: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute(prev) };
        handler(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
        let handler: extern "C" fn(c_int) = unsafe { std::mem::transmute(prev) };
        handler(sig);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::sync::Mutex;

    use memmap2::Mmap;

    use super::*;

    /// The registry is process-wide: these tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn page() -> usize {
        // SAFETY: sysconf has no preconditions.
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size")
    }

    /// A temp file of `len` non-zero bytes, mapped read-only.
    fn mapped_file(len: usize) -> (tempfile::NamedTempFile, File, Mmap, Vec<u8>) {
        let mut tmp = tempfile::NamedTempFile::new().expect("tempfile");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        tmp.write_all(&data).expect("write");
        tmp.flush().expect("flush");
        let file = OpenOptions::new().write(true).open(tmp.path()).expect("reopen");
        // SAFETY: test-only mapping of a private temp file; truncation is what is under test.
        let map = unsafe { Mmap::map(tmp.as_file()) }.expect("map");
        (tmp, file, map, data)
    }

    /// Every byte of `bytes`, read with volatile loads (so the reads really happen).
    fn read_all(bytes: &[u8]) -> Vec<u8> {
        let p = bytes.as_ptr();
        // SAFETY: `p + i` is within `bytes` for every `i < len`.
        (0..bytes.len()).map(|i| unsafe { ptr::read_volatile(p.add(i)) }).collect()
    }

    #[test]
    fn truncation_to_zero_is_survived_and_reads_zeros() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (_tmp, file, map, data) = mapped_file(16 * page() + 123);
        let g = guard_slice(&map).expect("guard");
        assert_eq!(read_all(&map), data);
        assert!(!g.faulted());

        let before = faults_handled();
        file.set_len(0).expect("truncate");
        let after = read_all(&map);
        assert!(g.faulted());
        assert!(g.check().is_err());
        assert!(faults_handled() > before);
        assert!(after.iter().all(|&b| b == 0), "bytes read after truncation are zeros");

        // A guard registered after the pages were replaced still reports the fault...
        let late = guard_slice(&map[page()..2 * page()]).expect("guard");
        assert!(late.faulted());
        // ...as long as some guard over the replaced pages lives; then the span is forgotten,
        // since the addresses may be reused by another mapping.
        drop(g);
        assert!(late.faulted());
        assert!(is_poisoned(map.as_ptr(), map.len()));
        drop(late);
        assert!(!is_poisoned(map.as_ptr(), map.len()));
    }

    #[test]
    fn partial_truncation_keeps_the_head_and_zeros_the_tail() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let p = page();
        let (_tmp, file, map, data) = mapped_file(8 * p);
        let whole = guard_slice(&map).expect("guard");
        let head = guard_slice(&map[..p]).expect("guard");
        let tail = guard_slice(&map[5 * p..6 * p]).expect("guard");
        // Cut mid-page: the rest of page 2 reads zeros without faulting (kernel zero-fill).
        file.set_len((2 * p + p / 2) as u64).expect("truncate");

        let mut copy = vec![0xAA; map.len()];
        copy_guarded(&whole, &map, &mut copy).expect_err("truncated");
        assert_eq!(&copy[..2 * p + p / 2], &data[..2 * p + p / 2]);
        assert!(copy[2 * p + p / 2..].iter().all(|&b| b == 0));
        assert!(whole.faulted());
        assert!(tail.faulted(), "overlapping guards are marked too");
        assert!(!head.faulted(), "pages before the cut are intact");
        assert_eq!(read_all(&map[..p]), data[..p]);
        assert!(is_poisoned(map[3 * p..].as_ptr(), 1));
        assert_eq!(forget_poisoned(map.as_ptr(), map.len()), 1);
        assert!(tail.faulted(), "its own flag, set at fault time, outlives the poison record");
    }

    #[test]
    fn dropped_guards_are_unregistered() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let buf = vec![7u8; 4096];
        let g = guard_slice(&buf).expect("guard");
        assert!(is_guarded(buf.as_ptr()));
        assert!(is_guarded(&buf[4095]));
        assert_eq!(g.range(), buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len());
        assert!(!g.faulted());
        drop(g);
        assert!(!is_guarded(buf.as_ptr()));
        assert!(!is_guarded(&buf[4095]));

        // Slots are reused: many register/drop cycles never fill the registry.
        for _ in 0..3 * CAPACITY {
            let g = guard_slice(&buf[1..2]).expect("guard");
            assert!(is_guarded(&buf[1]));
            drop(g);
        }
        assert!(!is_guarded(&buf[1]));
        assert!(guard_slice(&[]).is_ok_and(|g| !g.faulted()));
    }

    #[test]
    fn guarded_copy_checks_its_arguments() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let buf = [3u8; 64];
        let g = guard_slice(&buf[8..32]).expect("guard");
        let mut dst = [0u8; 8];
        copy_guarded(&g, &buf[8..16], &mut dst).expect("copy");
        assert_eq!(dst, [3u8; 8]);
        assert!(matches!(
            copy_guarded(&g, &buf[0..8], &mut dst),
            Err(SigbusError::NotGuarded { .. })
        ));
        assert!(matches!(
            copy_guarded(&g, &buf[8..12], &mut dst),
            Err(SigbusError::LengthMismatch { src: 4, dst: 8 })
        ));
        assert!(matches!(guard(usize::MAX as *const u8, 2), Err(SigbusError::InvalidRange { .. })));
    }

    #[test]
    fn concurrent_faults_and_registrations() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let buf = [1u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let guards: Vec<Guard> =
                        (0..64).map(|i| guard_slice(&buf[i..=i]).expect("guard")).collect();
                    assert!(guards.iter().all(|g| !g.faulted()));
                }
            });
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        for _ in 0..20 {
                            let (_tmp, file, map, _) = mapped_file(32 * page());
                            let g = guard_slice(&map).expect("guard");
                            file.set_len(0).expect("truncate");
                            assert!(read_all(&map).iter().all(|&b| b == 0));
                            assert!(g.faulted());
                        }
                    })
                })
                .collect();
            for r in readers {
                r.join().expect("reader");
            }
            stop.store(true, Ordering::Relaxed);
        });
    }

    /// A SIGBUS outside every guard is a real bug: the process must still die of it.
    #[test]
    fn unguarded_fault_still_kills() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (_tmp, file, map, _) = mapped_file(4 * page());
        let _installed = guard_slice(&[0u8; 1]).expect("guard"); // installs the handler
        file.set_len(0).expect("truncate");
        let addr = map.as_ptr();
        // SAFETY: the child only makes async-signal-safe calls (setrlimit, a volatile read,
        // _exit) before it dies or exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: plain system calls; `addr` is mapped in the child (inherited mapping).
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                ptr::read_volatile(addr);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "child survived an unguarded SIGBUS: {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
    }
}
