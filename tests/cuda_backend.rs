//! The CUDA backend against a real GPU: copies through pinned staging and registered mappings,
//! events, client waits, allocation failure, and a printed H2D bandwidth figure.
//!
//! Without libcuda (or without a visible GPU) every test prints why it skips and passes, so
//! the suite stays green on machines without a GPU.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use ferry::device::{
    Backend, ClientDone, Device, DeviceChoice, DeviceConfig, DeviceError, Event, HostBuffer,
    RawCudaEvent,
};
use ferry_tests::pattern;

const MIB: usize = 1 << 20;

/// GPU tests run one at a time: they share the device, and the bandwidth figure must not be
/// disturbed by other copies.
static GPU: Mutex<()> = Mutex::new(());

/// Runs `f` with the CUDA device, or prints why not and returns.
fn with_gpu(f: impl FnOnce(&Device)) {
    let _one_at_a_time = GPU.lock().unwrap_or_else(PoisonError::into_inner);
    if !ferry::device::cuda_driver_present() {
        println!("skipping: no CUDA driver");
        return;
    }
    match Device::open(DeviceChoice::Cuda, &DeviceConfig::default()) {
        Ok(device) => f(&device),
        Err(DeviceError::NoSuchDevice { count: 0, .. }) => {
            println!("skipping: a CUDA driver is installed but no GPU is visible");
        }
        Err(DeviceError::NoCudaDriver) => println!("skipping: no CUDA driver (stub library)"),
        Err(e) => panic!("opening the CUDA device failed: {e}"),
    }
}

/// A staging buffer of `len` bytes filled with `pattern(seed)`.
fn staging(device: &Device, len: usize, seed: u64) -> HostBuffer {
    let mut buf = device.alloc_staging(len).expect("pinned staging buffer");
    assert_eq!(buf.len(), len);
    assert!(buf.write_at(0, &pattern(seed, len)));
    buf
}

/// Enqueues a copy of `buf[from..from + len]` to device address `dst`.
fn copy(device: &Device, buf: &HostBuffer, from: usize, dst: u64, len: usize) {
    assert!(from + len <= buf.len());
    // SAFETY: the source is this device's staging buffer, which every test keeps alive and
    // unchanged until it has waited on an event recorded after the copy; every `dst` range the
    // tests use lies inside an arena that outlives the copy.
    unsafe { device.copy_h2d_async(buf.as_ptr().add(from), dst, len) }.expect("enqueue H2D copy");
}

fn read(device: &Device, src: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    device.read_back(src, &mut out).expect("read back");
    out
}

fn wait(event: &Event) {
    event.wait().expect("event wait");
    assert!(event.is_done().expect("event query"), "an event is done after waiting on it");
}

#[test]
fn device_info_is_sane() {
    with_gpu(|device| {
        let info = device.info();
        println!("{info:?}");
        assert_eq!(info.backend, Backend::Cuda);
        assert!(!info.name.is_empty());
        assert!(info.total_memory > 0);
        assert!(info.free_memory <= info.total_memory);
        assert!(info.uuid.starts_with("GPU-"), "uuid {}", info.uuid);
        assert_eq!(info.uuid.len(), "GPU-".len() + 36, "uuid {}", info.uuid);
        if let Some((generation, width)) = info.pcie {
            assert!((1..=7).contains(&generation) && (1..=32).contains(&width), "{:?}", info.pcie);
        }
    });
}

#[test]
fn staged_copies_land_byte_exact() {
    with_gpu(|device| {
        let arena = device.alloc_arena(64 * MIB as u64).expect("64 MiB arena");
        assert_eq!(arena.len, 64 * MIB as u64);
        let buf = staging(device, 8 * MIB, 1);
        let expected = pattern(1, 8 * MIB);

        // 1 MiB chunks to scattered, unaligned destinations, plus odd sizes.
        let mut pieces: Vec<(usize, u64, usize)> =
            (0..8).map(|i| (i * MIB, (i * 3 * MIB + i * 7) as u64, MIB)).collect();
        pieces.push((12_345, 40 * MIB as u64 + 1, 4097));
        pieces.push((8 * MIB - 1, 41 * MIB as u64 + 3, 1));
        for &(from, off, len) in &pieces {
            copy(device, &buf, from, arena.base + off, len);
        }
        let event = device.record().expect("record");
        assert!(event.cuda_event().is_some_and(|raw| raw != 0));
        wait(&event);
        for &(from, off, len) in &pieces {
            assert!(read(device, arena.base + off, len) == expected[from..from + len], "{off}");
        }

        // The buffer may be refilled once the event is done; a second round must not disturb
        // the first one's bytes.
        let mut buf = buf;
        assert!(buf.write_at(0, &pattern(2, 8 * MIB)));
        copy(device, &buf, 0, arena.base + 48 * MIB as u64, 8 * MIB);
        let second = device.record().expect("record");
        wait(&second);
        assert!(read(device, arena.base + 48 * MIB as u64, 8 * MIB) == pattern(2, 8 * MIB));
        let (from, off, len) = pieces[3];
        assert!(read(device, arena.base + off, len) == expected[from..from + len]);
        // Everything earlier is covered by the later event too.
        assert!(event.is_done().expect("query"));
    });
}

#[test]
fn read_back_refuses_ranges_outside_every_arena() {
    with_gpu(|device| {
        let arena = device.alloc_arena(MIB as u64).expect("arena");
        let mut two = [0u8; 2];
        let end = arena.base + arena.len;
        assert!(matches!(device.read_back(end - 1, &mut two), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(device.read_back(0, &mut two), Err(DeviceError::OutOfRange { .. })));
        assert!(device.read_back(end - 2, &mut two).is_ok());
        let base = arena.base;
        drop(arena);
        assert!(matches!(device.read_back(base, &mut two), Err(DeviceError::OutOfRange { .. })));
    });
}

#[test]
fn events_and_client_waits() {
    with_gpu(|device| {
        let arena = device.alloc_arena(16 * MIB as u64).expect("arena");
        let buf = staging(device, 4 * MIB, 5);

        // An event with nothing enqueued completes.
        wait(&device.record().expect("record"));

        copy(device, &buf, 0, arena.base, 4 * MIB);
        let first = device.record().expect("record");
        let raw = first.cuda_event().expect("a CUDA event");
        // Device-side waits: our own event, the same as a raw client CUevent, and the trivial
        // forms; none of them blocks the host.
        device.wait_client(&ClientDone::Event(first.clone())).expect("wait on our event");
        // SAFETY: `raw` is the CUevent behind `first`, alive (held by `first`) in this
        // process's context until the call returns.
        let raw = unsafe { RawCudaEvent::from_raw(raw) };
        device.wait_client(&ClientDone::CudaEvent(raw)).expect("wait on a raw CUevent");
        device.wait_client(&ClientDone::Now).expect("Now");
        device.wait_client(&ClientDone::Event(Event::done())).expect("done event");
        // SAFETY: a null handle breaks the contract on purpose; the backend must refuse it
        // rather than hand it to the driver.
        let null = unsafe { RawCudaEvent::from_raw(0) };
        assert!(device.wait_client(&ClientDone::CudaEvent(null)).is_err(), "a null CUevent");

        copy(device, &buf, 0, arena.base + 8 * MIB as u64, 4 * MIB);
        let second = device.record().expect("record");
        wait(&second);
        assert!(first.is_done().expect("query"));
        assert!(read(device, arena.base + 8 * MIB as u64, 4 * MIB) == pattern(5, 4 * MIB));

        // Many record/drop cycles (the event pool recycles them) stay correct.
        for i in 0..300u64 {
            let off = (i % 16) * MIB as u64;
            copy(device, &buf, (i as usize % 4) * MIB, arena.base + off, MIB);
            let e = device.record().expect("record");
            if i % 50 == 0 {
                wait(&e);
            }
        }
        wait(&device.record().expect("record"));
        assert!(read(device, arena.base + 15 * MIB as u64, MIB) == pattern(5, 4 * MIB)[3 * MIB..]);
    });
}

#[test]
fn copies_from_many_threads() {
    with_gpu(|device| {
        let arena = device.alloc_arena(32 * MIB as u64).expect("arena");
        let bufs: Vec<HostBuffer> = (0..4).map(|i| staging(device, 8 * MIB, 10 + i)).collect();
        std::thread::scope(|s| {
            for (i, buf) in bufs.iter().enumerate() {
                let dst = arena.base + (i * 8 * MIB) as u64;
                s.spawn(move || {
                    for c in 0..8 {
                        copy(device, buf, c * MIB, dst + (c * MIB) as u64, MIB);
                    }
                });
            }
        });
        // Recorded after every thread enqueued: covers all their copies.
        wait(&device.record().expect("record"));
        for i in 0..4 {
            let got = read(device, arena.base + (i * 8 * MIB) as u64, 8 * MIB);
            assert!(got == pattern(10 + i as u64, 8 * MIB), "thread {i}");
        }
    });
}

#[test]
fn registered_mapping_copies_in_place() {
    with_gpu(|device| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("weights.bin");
        let len = 8 * MIB + 12_345;
        std::fs::write(&path, pattern(3, len)).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: the file is private to this test and nothing modifies or truncates it while
        // it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap");
        let on_disk = std::fs::read(&path).expect("read");
        let arena = device.alloc_arena(16 * MIB as u64).expect("arena");

        let registration =
            device.register_mapping(map.as_ptr(), map.len()).expect("register_mapping");
        if !device.info().mapped_reads {
            assert!(registration.is_none(), "no registration without mapped_reads");
        }
        match &registration {
            Some(_) => {
                // Whole file to an unaligned destination, and a piece from an unaligned source.
                // SAFETY: the source lies in a mapping registered with the device, alive and
                // unchanged until the event below completes; destinations lie in the arena.
                unsafe {
                    device.copy_h2d_async(map.as_ptr(), arena.base + 17, len).expect("copy");
                    device
                        .copy_h2d_async(map.as_ptr().add(4099), arena.base + 12 * MIB as u64, MIB)
                        .expect("copy");
                }
                wait(&device.record().expect("record"));
                assert!(read(device, arena.base + 17, len) == on_disk);
                assert!(
                    read(device, arena.base + 12 * MIB as u64, MIB) == on_disk[4099..4099 + MIB]
                );
                println!("registered mapping: direct copies from the page cache");
            }
            None => {
                println!("registration unavailable: the staging ring fallback is in use");
                let mut buf = device.alloc_staging(len).expect("staging");
                assert!(buf.write_at(0, &map));
                copy(device, &buf, 0, arena.base + 17, len);
                wait(&device.record().expect("record"));
                assert!(read(device, arena.base + 17, len) == on_disk);
            }
        }
        // Unregister before unmapping.
        drop(registration);
        drop(map);
    });
}

#[test]
fn impossible_allocations_fail_cleanly_and_the_device_still_works() {
    with_gpu(|device| {
        match device.alloc_arena(u64::MAX / 2) {
            Err(DeviceError::OutOfMemory { bytes, .. }) => assert_eq!(bytes, u64::MAX / 2),
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        assert!(matches!(device.alloc_arena(0), Err(DeviceError::OutOfMemory { .. })));
        let empty = device.alloc_staging(0).expect("an empty staging buffer");
        assert!(empty.is_empty());

        let arena = device.alloc_arena(2 * MIB as u64).expect("arena after a failure");
        let buf = staging(device, MIB, 7);
        copy(device, &buf, 0, arena.base + MIB as u64, MIB);
        wait(&device.record().expect("record"));
        assert!(read(device, arena.base + MIB as u64, MIB) == pattern(7, MIB));
    });
}

#[test]
fn h2d_bandwidth_from_pinned_staging() {
    with_gpu(|device| {
        const CHUNK: usize = 8 * MIB;
        const TOTAL: usize = 1 << 30;
        let arena = device.alloc_arena(TOTAL as u64).expect("1 GiB arena");
        let buf = staging(device, CHUNK, 9);
        // Warm-up (first-touch costs in the driver, copy engine clocks).
        for i in 0..16 {
            copy(device, &buf, 0, arena.base + (i * CHUNK) as u64, CHUNK);
        }
        wait(&device.record().expect("record"));

        let start = Instant::now();
        for i in 0..TOTAL / CHUNK {
            copy(device, &buf, 0, arena.base + (i * CHUNK) as u64, CHUNK);
        }
        wait(&device.record().expect("record"));
        let secs = start.elapsed().as_secs_f64();
        println!(
            "H2D from pinned staging: {:.1} GB/s (1 GiB in 8 MiB chunks, {:.1} ms; {}, PCIe {:?})",
            TOTAL as f64 / secs / 1e9,
            secs * 1e3,
            device.info().name,
            device.info().pcie,
        );
        let last = arena.base + (TOTAL - CHUNK) as u64;
        assert!(read(device, last, CHUNK) == pattern(9, CHUNK));
    });
}
