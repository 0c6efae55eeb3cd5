//! The CUDA backend against a real GPU: copies through pinned staging and registered mappings,
//! events, client waits, allocation failure, a printed H2D bandwidth figure, arenas and
//! interprocess ready events shared with a child process.
//!
//! Without libcuda (or without a visible GPU) every GPU test prints why it skips and passes, so
//! the suite stays green on machines without a GPU. The host backend's answers about
//! interprocess events are tested everywhere.

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

// ---------------------------------------------------------------------------------------------
// LoRA on the device: cuBLAS GEMMs accumulating into weights in the arena, the engine's backup
// mode using them, and fuse mode's pinned cache.

/// Little-endian bytes of `vals` in a 16/32-bit float dtype.
fn float_bytes(dtype: ferry::Dtype, vals: &[f32]) -> Vec<u8> {
    vals.iter()
        .flat_map(|&x| match dtype {
            ferry::Dtype::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
            ferry::Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
            _ => x.to_le_bytes().to_vec(),
        })
        .collect()
}

/// Elements of two 16-bit float byte strings, as ordered integers (adjacent values differ by 1).
fn ordinals16(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(2)
        .map(|c| {
            let b = i32::from(u16::from_le_bytes([c[0], c[1]]));
            if b & 0x8000 != 0 { -(b & 0x7fff) } else { b }
        })
        .collect()
}

/// `got` equals `want` within `ulps` units in the last place (16-bit) or `rel` (f32).
fn close(dtype: ferry::Dtype, got: &[u8], want: &[u8], ulps: i32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if dtype == ferry::Dtype::F32 {
        for (i, (g, w)) in got.chunks_exact(4).zip(want.chunks_exact(4)).enumerate() {
            let (g, w) = (
                f32::from_le_bytes(g.try_into().expect("4")),
                f32::from_le_bytes(w.try_into().expect("4")),
            );
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "{what}[{i}]: {g} vs {w}");
        }
        return;
    }
    let worst =
        ordinals16(got).iter().zip(ordinals16(want)).map(|(g, w)| (g - w).abs()).max().unwrap_or(0);
    assert!(worst <= ulps, "{what}: {worst} ulps from the CPU merge (allowed {ulps})");
}

#[test]
fn cublas_gemms_accumulate_lora_deltas_into_the_arena() {
    use ferry::device::{GemmAccumulate, GemmType};
    use ferry::lora::math::{Delta, Factor, Patch};
    with_gpu(|device| {
        if !device.device_gemm() {
            println!("skipping: libcublas could not be loaded");
            return;
        }
        let (rows, cols, rank) = (96usize, 80usize, 8usize);
        let weight: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.37).sin()).collect();
        let up: Vec<f32> = (0..rows / 3 * rank).map(|i| ((i as f32) * 0.11).cos() * 0.2).collect();
        let down: Vec<f32> = (0..rank * cols).map(|i| ((i as f32) * 0.07).sin() * 0.2).collect();
        let arena = device.alloc_arena(4 * MIB as u64).expect("arena");
        for (dtype, t) in [
            (ferry::Dtype::F16, GemmType::F16),
            (ferry::Dtype::BF16, GemmType::BF16),
            (ferry::Dtype::F32, GemmType::F32),
        ] {
            let (w, u, d) =
                (float_bytes(dtype, &weight), float_bytes(dtype, &up), float_bytes(dtype, &down));
            // The weight, copied like a layer; the delta on its middle third of rows.
            let buf = {
                let mut b = device.alloc_staging(w.len()).expect("staging");
                assert!(b.write_at(0, &w));
                b
            };
            copy(device, &buf, 0, arena.base, w.len());
            let mut factors = device.alloc_device_buffer(4096 + d.len() as u64).expect("buffer");
            factors.write(0, &u).expect("upload up");
            factors.write(4096, &d).expect("upload down");
            let size = t.size();
            let g = GemmAccumulate {
                m: (rows / 3) as u64,
                n: cols as u64,
                k: rank as u64,
                alpha: 0.75,
                a: factors.addr,
                b: factors.addr + 4096,
                c: arena.base + (rows / 3 * cols) as u64 * size,
                ab: t,
                c_type: t,
            };
            // SAFETY: A and B lie in `factors`, C in the arena, both alive until the wait
            // below; nothing else writes the weight meanwhile.
            unsafe { device.gemm_accumulate(&g) }.expect("cublasGemmEx");
            wait(&device.record().expect("record"));
            let got = read(device, arena.base, w.len());

            let shape = [rows as u64, cols as u64];
            let (us, ds) = ([(rows / 3) as u64, rank as u64], [rank as u64, cols as u64]);
            let delta = Delta {
                up: Factor { dtype, shape: &us, bytes: &u },
                down: Factor { dtype, shape: &ds, bytes: &d },
                mid: None,
                scale: 0.75,
            };
            let rows_of = ferry::lora::Rows { start: (rows / 3) as u64, len: (rows / 3) as u64 };
            let want = ferry::lora::math::merge_patches(
                "w",
                Factor { dtype, shape: &shape, bytes: &w },
                &[Patch { delta, rows: Some(rows_of) }],
            )
            .expect("CPU merge");
            // One adapter: both are the f32 sum rounded once; only the order of the sums
            // differs, so at most one ulp apart.
            close(dtype, &got, &want, 1, &format!("{dtype} device merge"));
            let third = rows / 3 * cols * size as usize;
            assert_eq!(&got[..third], &w[..third], "{dtype}: rows above the slice untouched");
            assert_eq!(&got[2 * third..], &w[2 * third..], "{dtype}: rows below untouched");
        }
        // Operands outside device memory are refused, not run.
        let g = GemmAccumulate {
            m: 4,
            n: 4,
            k: 2,
            alpha: 1.0,
            a: 16,
            b: 16,
            c: arena.base,
            ab: GemmType::F32,
            c_type: GemmType::F32,
        };
        // SAFETY: the operands are invalid on purpose; the backend's range check refuses them
        // before anything is enqueued.
        let err = unsafe { device.gemm_accumulate(&g) }.expect_err("out of range");
        assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
    });
}

/// A CUDA engine (skips like `with_gpu`).
fn cuda_engine() -> Option<ferry::engine::Engine> {
    if !ferry::device::cuda_driver_present() {
        println!("skipping: no CUDA driver");
        return None;
    }
    match ferry::engine::Engine::new(ferry::engine::EngineConfig {
        device: DeviceChoice::Cuda,
        budget: Some(64 << 20),
        staging_slots: 2,
        staging_slot_bytes: 1 << 20,
        ..ferry::engine::EngineConfig::default()
    }) {
        Ok(e) => Some(e),
        Err(ferry::engine::EngineError::Device(
            DeviceError::NoSuchDevice { count: 0, .. } | DeviceError::NoCudaDriver,
        )) => {
            println!("skipping: no usable GPU");
            None
        }
        Err(e) => panic!("CUDA engine: {e}"),
    }
}

#[test]
fn engine_lora_modes_on_the_gpu_match_the_cpu_merge() {
    use ferry::engine::lora_view::LoraMode;
    let _one_at_a_time = GPU.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(e) = cuda_engine() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.safetensors");
    let lora = dir.path().join("lora.safetensors");
    let t = |name: &str, dtype: ferry::Dtype, shape: &[usize], f: &dyn Fn(usize) -> f32| {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(f).collect();
        ferry_tests::Tensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data: float_bytes(dtype, &vals),
        }
    };
    let mut weights = Vec::new();
    let mut factors = Vec::new();
    for (b, dtype) in [ferry::Dtype::F16, ferry::Dtype::BF16, ferry::Dtype::F32].iter().enumerate()
    {
        weights.push(t(&format!("blocks.{b}.proj.weight"), *dtype, &[256, 192], &|i| {
            ((i + b) as f32 * 0.013).sin()
        }));
        // Factors in the weight's dtype (f32 factors for the f32 weight): the device path.
        factors.push(t(&format!("blocks.{b}.proj.lora_A.weight"), *dtype, &[16, 192], &|i| {
            ((i * 3) as f32 * 0.01).cos() * 0.1
        }));
        factors.push(t(&format!("blocks.{b}.proj.lora_B.weight"), *dtype, &[256, 16], &|i| {
            ((i * 5) as f32 * 0.01).sin() * 0.1
        }));
    }
    ferry_tests::write_file(&base, &weights).expect("base");
    ferry_tests::write_file(&lora, &factors).expect("lora");
    let model = ferry::Model::open(&base).expect("open");
    let out = dir.path().join("fused.safetensors");
    let l = ferry::lora::format::load(&lora).expect("lora");
    ferry::lora::export::export_fused(&model, &[(l, 0.8)], &out).expect("export");
    let fused = ferry::Model::open(&out).expect("fused");

    let id = e.open_model(&base).expect("open");
    let layer = |b: usize| {
        let lease = e.acquire(id, "model", b).expect("acquire");
        lease.wait_ready().expect("ready");
        let bytes = e.read_tensor(&lease, &lease.tensors()[0]).expect("read");
        e.release(lease, ClientDone::Now).expect("release");
        bytes
    };
    let dtypes = [ferry::Dtype::F16, ferry::Dtype::BF16, ferry::Dtype::F32];
    for mode in [LoraMode::Backup, LoraMode::Fuse] {
        e.set_loras(id, &[(lora.clone(), 0.8)], mode).expect("set_loras");
        for (b, dtype) in dtypes.iter().enumerate() {
            let want = fused
                .tensor_bytes(fused.find("model", &format!("blocks.{b}.proj.weight")).expect("t"))
                .expect("bytes");
            let got = layer(b);
            if mode == LoraMode::Fuse {
                // The CPU merge, streamed from the pinned cache: the export's bytes exactly.
                assert_eq!(got, want, "fuse {dtype}");
            } else {
                // cuBLAS: one adapter, within one ulp of the CPU merge.
                close(*dtype, &got, want, 1, &format!("backup {dtype}"));
            }
        }
        if mode == LoraMode::Fuse {
            let cached = e.stats().lora_cache_bytes;
            let raw: u64 = weights.iter().map(|w| w.data.len() as u64).sum();
            assert!(cached >= raw && cached % 4096 == 0, "pinned footprint {cached} for {raw}");
        }
        // Removal: the file's bytes exactly.
        e.set_loras(id, &[], mode).expect("remove");
        for b in 0..3 {
            let want = model.tensor_bytes(b).expect("bytes");
            assert_eq!(layer(b), want, "{mode:?}: removal restores layer {b}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sharing the arena with other processes: a VMM arena exported as a file descriptor (legacy IPC
// handles on devices without VMM), imported with `ImportedArena` in this process and in a
// child process, and read back at each tensor's arena offset.

/// A small LLM-shaped model written to `dir` and opened by `e`: its id and the store's view.
fn shared_model(
    e: &ferry::engine::Engine,
    dir: &std::path::Path,
) -> (ferry::engine::ModelId, std::sync::Arc<ferry::Model>) {
    let path = dir.join("llm.safetensors");
    ferry_tests::write_file(&path, &ferry_tests::llm_like(4, 2, 96 << 10)).expect("model");
    let id = e.open_model(&path).expect("open");
    let model = e.model(id).expect("model");
    (id, model)
}

/// The file's bytes of every tensor of a lease, in the lease's order.
fn file_bytes(model: &ferry::Model, lease: &ferry::engine::Lease) -> Vec<Vec<u8>> {
    lease
        .tensors()
        .iter()
        .map(|t| {
            let id = model.find("model", &t.name).expect("tensor in the file");
            model.tensor_bytes(id).expect("bytes").to_vec()
        })
        .collect()
}

fn sha256_hex(parts: &[Vec<u8>]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_vmm_arena_maps_a_second_time_in_this_process() {
    use ferry::device::ArenaShare;
    use ferry::device::cuda_import::{ImportKind, ImportedArena};
    let _one_at_a_time = GPU.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(e) = cuda_engine() else { return };
    let Device::Cuda(cuda) = e.device() else { panic!("a CUDA engine on another backend") };
    let arena = e.arena().expect("arena");
    let uuid = e.device_info().uuid.clone();
    let share = arena.share().expect("share");
    if !cuda.vmm_arenas() {
        // Legacy IPC handles cannot be opened by the process that exported them: the child
        // process test covers them.
        assert!(matches!(share, ArenaShare::CudaIpc { .. }), "{share:?}");
        println!("skipping: no VMM / POSIX-fd handles on this device (legacy IPC arenas)");
        return;
    }
    let ArenaShare::CudaFd { fd, alloc_len } = share else {
        panic!("a VMM arena shared as {share:?}")
    };
    let granularity = cuda.vmm_granularity().expect("VMM granularity");
    assert!(alloc_len >= arena.len && alloc_len % granularity == 0, "{alloc_len} ({granularity})");
    assert!(alloc_len - arena.len < granularity, "rounded up by less than one granule");

    // A share the driver is never asked about: too small, and a UUID this machine lacks.
    let small = arena.share().expect("share");
    assert!(matches!(
        ImportedArena::import(&uuid, small, alloc_len + 1),
        Err(DeviceError::ShareTooSmall { .. })
    ));
    let nowhere = "GPU-00000000-0000-0000-0000-000000000000";
    match ImportedArena::import(nowhere, arena.share().expect("share"), arena.len) {
        Err(DeviceError::UnknownUuid { uuid: u, visible }) => {
            assert_eq!(u, nowhere);
            assert!(visible.contains(&uuid), "{visible:?} lacks {uuid}");
        }
        other => panic!("expected UnknownUuid, got {other:?}"),
    }

    let imported = ImportedArena::import(&uuid, ArenaShare::CudaFd { fd, alloc_len }, arena.len)
        .expect("import the arena");
    assert_eq!(imported.len(), arena.len);
    assert_ne!(imported.base(), arena.base, "a second mapping of the same memory");
    assert!(matches!(imported.kind(), ImportKind::Vmm { .. }));
    println!("imported read-only: {}", imported.read_only());

    let dir = tempfile::tempdir().expect("tempdir");
    let (id, model) = shared_model(&e, dir.path());
    let layers = model.component("model").expect("component").layers.len();
    for layer in 0..layers {
        let lease = e.acquire(id, "model", layer).expect("acquire");
        lease.wait_ready().expect("ready");
        for (t, want) in lease.tensors().iter().zip(file_bytes(&model, &lease)) {
            let mut got = vec![0u8; t.len as usize];
            imported.read(t.arena_offset, &mut got).expect("read through the import");
            assert!(got == want, "layer {layer} tensor {}", t.name);
            assert_eq!(t.addr - arena.base, t.arena_offset);
        }
        e.release(lease, ClientDone::Now).expect("release");
    }
    let mut two = [0u8; 2];
    assert!(matches!(imported.read(arena.len - 1, &mut two), Err(DeviceError::OutOfRange { .. })));
    assert!(matches!(imported.read(u64::MAX, &mut two), Err(DeviceError::OutOfRange { .. })));
    imported.read(arena.len - 2, &mut two).expect("the arena's last bytes");

    // Unmapping the import leaves the engine's own mapping working.
    drop(imported);
    let lease = e.acquire(id, "model", 0).expect("acquire");
    lease.wait_ready().expect("ready");
    let want = file_bytes(&model, &lease);
    assert!(e.read_tensor(&lease, &lease.tensors()[0]).expect("read") == want[0]);
    e.release(lease, ClientDone::Now).expect("release");
}

/// Set in the child process of `a_child_process_maps_the_arena_and_reads_a_layer`: the
/// `offset:len,…` ranges it reads.
const IMPORT_CHILD: &str = "FERRY_TEST_IMPORT_CHILD";
/// Set too when the device has interprocess events: the layer's ready event handle, in hex.
const IMPORT_EVENT: &str = "FERRY_TEST_IMPORT_EVENT";
/// The line the child prints: `<marker> <kind> events=<opened> <sha256 of the ranges>`.
const CHILD_MARK: &str = "import-child:";

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex64(hex: &str) -> [u8; 64] {
    assert_eq!(hex.len(), 128, "a 64-byte handle in hex: {hex}");
    let mut out = [0u8; 64];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

/// An interprocess event handle, or `None` (printed) when the device has none.
fn ipc_or_none(r: Result<[u8; 64], DeviceError>) -> Option<[u8; 64]> {
    match r {
        Ok(h) => Some(h),
        Err(DeviceError::Unsupported(what)) => {
            println!("no interprocess events here (this device cannot {what})");
            None
        }
        Err(e) => panic!("recording an interprocess event: {e}"),
    }
}

/// Not a test on its own: the child process of
/// `a_child_process_maps_the_arena_and_reads_a_layer` (this test binary, re-run with
/// [`IMPORT_CHILD`] set and a socket as its stdin). Does nothing otherwise.
#[test]
fn zz_import_child() {
    use ferry::device::ArenaShare;
    use ferry::device::cuda_import::ImportedArena;
    use ferry::protocol::{CudaHandle, Message, socket::recv_frame};
    use std::os::fd::AsFd;
    let Ok(ranges) = std::env::var(IMPORT_CHILD) else { return };
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().expect("stdin");
    let socket = std::os::unix::net::UnixStream::from(stdin);
    let received = recv_frame(&socket, None).expect("the arena frame");
    let Message::CudaArena(arena) = received.message else {
        panic!("expected cuda_arena, got {:?}", received.message)
    };
    let share = match arena.handle {
        CudaHandle::PosixFd { alloc_len } => {
            let fd = received.fds.into_iter().next().expect("the arena's descriptor");
            ArenaShare::CudaFd { fd, alloc_len }
        }
        CudaHandle::Ipc { handle } => {
            ArenaShare::CudaIpc { handle: handle.try_into().expect("a 64-byte IPC handle") }
        }
    };
    let imported =
        ImportedArena::import(&arena.device_uuid, share, arena.len).expect("import the arena");
    if let Ok(hex) = std::env::var(IMPORT_EVENT) {
        let handle = from_hex64(&hex);
        // A client stream of its own, in the primary context the arena is mapped in.
        let ctx = cudarc::driver::CudaContext::new(imported.ordinal()).expect("primary context");
        let stream = ctx.new_stream().expect("a client stream");
        // SAFETY: `stream` is a live stream of the arena's device, alive across the call.
        unsafe { imported.stream_wait(stream.cu_stream() as usize as u64, &handle) }
            .expect("stream_wait on a new stream");
        stream.synchronize().expect("the client stream gets past the wait");
        // 0 is the legacy default stream, valid in every context; the synchronous reads below
        // run on it, so they are ordered after this wait on the device as well.
        // SAFETY: 0 (the legacy default stream) is valid in every context.
        unsafe { imported.stream_wait(0, &handle) }.expect("stream_wait on the default stream");
        imported.wait_host(&handle).expect("wait_host");
    }
    let parts: Vec<Vec<u8>> = ranges
        .split(',')
        .map(|r| {
            let (offset, len) = r.split_once(':').expect("offset:len");
            let mut buf = vec![0u8; len.parse().expect("len")];
            imported.read(offset.parse().expect("offset"), &mut buf).expect("read");
            buf
        })
        .collect();
    println!(
        "{CHILD_MARK} {:?} events={} {}",
        imported.kind(),
        imported.opened_events(),
        sha256_hex(&parts)
    );
}

#[test]
fn a_child_process_maps_the_arena_and_reads_a_layer() {
    use ferry::device::ArenaShare;
    use ferry::protocol::{CudaArena, CudaHandle, Message, PROTOCOL_VERSION, socket::send_frame};
    use std::os::fd::{AsFd, OwnedFd};
    use std::process::{Command, Stdio};
    let _one_at_a_time = GPU.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(e) = cuda_engine() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (id, model) = shared_model(&e, dir.path());
    // A middle layer, leased (so its bytes stay put). The child waits for it through its
    // interprocess ready event, asked for before anything here waited; a layer that was on the
    // device already has none, and then any later recording of the ring serves as well.
    let lease = e.acquire(id, "model", 2).expect("acquire");
    let event = match e.ready_ipc_event(&lease) {
        Ok(Some(h)) => Some(h),
        Ok(None) => ipc_or_none(e.device().record_ipc()),
        Err(ferry::engine::EngineError::Device(d)) => ipc_or_none(Err(d)),
        Err(err) => panic!("ready_ipc_event: {err}"),
    };
    lease.wait_ready().expect("ready");
    let want = sha256_hex(&file_bytes(&model, &lease));
    let ranges: Vec<String> =
        lease.tensors().iter().map(|t| format!("{}:{}", t.arena_offset, t.len)).collect();

    let arena = e.arena().expect("arena");
    let (handle, fd) = match arena.share().expect("share") {
        ArenaShare::CudaFd { fd, alloc_len } => (CudaHandle::PosixFd { alloc_len }, Some(fd)),
        ArenaShare::CudaIpc { handle } => (CudaHandle::Ipc { handle: handle.to_vec() }, None),
        other => panic!("a CUDA arena shared as {other:?}"),
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let exe = std::env::current_exe().expect("this test binary");
    let mut child = Command::new(exe);
    child
        .args(["--exact", "zz_import_child", "--nocapture", "--test-threads", "1"])
        .env(IMPORT_CHILD, ranges.join(","));
    if let Some(h) = &event {
        child.env(IMPORT_EVENT, to_hex(h));
    }
    let child = child
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    // What ferryd's map_arena sends, descriptor and all.
    let msg = Message::CudaArena(CudaArena {
        len: arena.len,
        device_uuid: e.device_info().uuid.clone(),
        handle,
    });
    let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
    send_frame(&ours, PROTOCOL_VERSION, 1, &msg, &fds).expect("send the arena");
    drop(fd);
    let out = child.wait_with_output().expect("the child's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(CHILD_MARK))
        .unwrap_or_else(|| panic!("the child printed no checksum:\n{stdout}"));
    println!("child: {line}");
    let got = line.split_whitespace().last().expect("checksum");
    assert_eq!(got, want, "the child read other bytes than the file's");
    // Three waits on one handle opened it once.
    let opened = if event.is_some() { "events=1" } else { "events=0" };
    assert!(line.split_whitespace().any(|w| w == opened), "{opened} expected: {line}");
    e.release(lease, ClientDone::Now).expect("release");
}

// ---------------------------------------------------------------------------------------------
// Interprocess ready events: the device's ring, and the engine's `ready_ipc_event` (the child
// process above opens and waits on one). On the host backend they are refused clearly.

#[test]
fn interprocess_events_come_from_a_ring() {
    use ferry::device::cuda::IPC_RING;
    with_gpu(|device| {
        let Some(first) = ipc_or_none(device.record_ipc()) else { return };
        let mut order = vec![first];
        for _ in 1..IPC_RING {
            order.push(device.record_ipc().expect("record_ipc"));
        }
        assert!(order.iter().all(|h| h.iter().any(|&b| b != 0)), "a handle is not all zeros");
        let distinct: std::collections::HashSet<_> = order.iter().collect();
        assert_eq!(distinct.len(), IPC_RING, "every slot of the ring is its own event");
        // Full circle: the same events again, in the same order, re-recorded.
        for (i, h) in order.iter().enumerate().take(3) {
            assert_eq!(&device.record_ipc().expect("record_ipc"), h, "slot {i} after wrapping");
        }
        // Recorded after copies too: a host-side event recorded later covers them all.
        let arena = device.alloc_arena(MIB as u64).expect("arena");
        let buf = staging(device, MIB, 21);
        copy(device, &buf, 0, arena.base, MIB);
        device.record_ipc().expect("record_ipc after a copy");
        wait(&device.record().expect("record"));
        assert!(read(device, arena.base, MIB) == pattern(21, MIB));
    });
}

/// A host engine with a small model of `layers` decoder layers of 4 × 1 MiB (the staging
/// ring's slots are 256 KiB, so each layer takes several rounds through it).
fn host_engine_with_model(
    dir: &std::path::Path,
    layers: usize,
) -> (ferry::engine::Engine, ferry::engine::ModelId) {
    let e =
        ferry_tests::host_engine(64 << 20, false, std::time::Duration::from_secs(30), 256 << 10);
    let path = dir.join("llm.safetensors");
    if !path.exists() {
        ferry_tests::write_file(&path, &ferry_tests::llm_like(layers, 4, MIB)).expect("model");
    }
    let id = e.open_model(&path).expect("open");
    (e, id)
}

#[test]
fn host_devices_refuse_to_export_interprocess_events() {
    let config = DeviceConfig { host_memory: 16 << 20, ..DeviceConfig::default() };
    let device = Device::open(DeviceChoice::Host, &config).expect("host device");
    let err = device.record_ipc().expect_err("no interprocess events on host");
    assert_eq!(err, DeviceError::Unsupported("export interprocess events"));
    assert_eq!(err.to_string(), "this device cannot export interprocess events");
}

#[test]
fn host_engines_answer_ready_ipc_event_with_none_or_unsupported() {
    use ferry::engine::EngineError;
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, id) = host_engine_with_model(dir.path(), 6);
    let layers = e.model(id).expect("model").component("model").expect("component").layers.len();

    // A layer on the device already: nothing to wait for, whatever the backend.
    let lease = e.acquire(id, "model", 0).expect("acquire");
    lease.wait_ready().expect("ready");
    assert_eq!(e.ready_ipc_event(&lease).expect("a ready layer"), None);
    e.release(lease, ClientDone::Now).expect("release");

    // Layers asked for at once, last first (against prefetching): each is either ready by the
    // time it is asked about (None) or not, and then the host device has no event to give.
    let (mut ready, mut pending) = (0, 0);
    for layer in (1..layers).rev() {
        let lease = e.acquire(id, "model", layer).expect("acquire");
        match e.ready_ipc_event(&lease) {
            Ok(None) => {
                ready += 1;
                assert!(lease.is_ready().expect("is_ready"), "None for a layer not ready");
            }
            Err(EngineError::Device(DeviceError::Unsupported(what))) => {
                assert_eq!(what, "export interprocess events");
                pending += 1;
            }
            other => panic!("layer {layer}: {other:?}"),
        }
        lease.wait_ready().expect("ready");
        e.release(lease, ClientDone::Now).expect("release");
    }
    println!("{ready} layer(s) ready when asked, {pending} still copying (Unsupported)");
}

#[test]
fn ready_ipc_event_refuses_a_lease_of_another_engine() {
    use ferry::engine::EngineError;
    let dir = tempfile::tempdir().expect("tempdir");
    let (e, _id) = host_engine_with_model(dir.path(), 2);
    let (other, other_id) = host_engine_with_model(dir.path(), 2);
    let lease = other.acquire(other_id, "model", 1).expect("acquire");
    lease.wait_ready().expect("ready");
    match e.ready_ipc_event(&lease) {
        Err(EngineError::UnknownLease { lease: l }) => assert_eq!(l, lease.id()),
        got => panic!("expected UnknownLease, got {got:?}"),
    }
    assert_eq!(other.ready_ipc_event(&lease).expect("its own engine"), None);
    other.release(lease, ClientDone::Now).expect("release");
}
