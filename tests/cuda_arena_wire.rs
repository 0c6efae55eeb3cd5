//! The `cuda_arena` reply as a client receives it (no GPU needed): a fake CUDA daemon answers
//! `map_arena` with each well-formed and malformed shape, and `Client::arena_handle` accepts
//! exactly the well-formed ones, checking the descriptor against the handle kind. (Importing
//! the handle into a CUDA context is tested on a GPU, in `tests/cuda_backend.rs`.)

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use ferry::client::{ArenaHandle, Client, ClientError};
use ferry::protocol::socket::{recv_frame, send_frame};
use ferry::protocol::*;
use ferry_tests::ferryd::{FAKE_GPU_UUID, fake_welcome};

const UUID: &str = FAKE_GPU_UUID;

/// What the fake daemon answers the n-th `map_arena` with: the message and whether a
/// descriptor travels with it.
fn answers() -> Vec<(CudaArena, bool)> {
    let arena = |handle| CudaArena { len: 1 << 30, device_uuid: UUID.into(), handle };
    vec![
        (arena(CudaHandle::PosixFd { alloc_len: 1 << 30 }), true),
        (arena(CudaHandle::Ipc { handle: vec![7; 64] }), false),
        // Malformed: a VMM handle without its descriptor, an IPC handle with one, a short IPC
        // handle, an allocation smaller than the arena.
        (arena(CudaHandle::PosixFd { alloc_len: 1 << 30 }), false),
        (arena(CudaHandle::Ipc { handle: vec![7; 64] }), true),
        (arena(CudaHandle::Ipc { handle: vec![7; 63] }), false),
        (arena(CudaHandle::PosixFd { alloc_len: 1 << 20 }), true),
    ]
}

/// Serves one connection: the handshake as a CUDA daemon granting `CUDA_IPC`, then the
/// `case`-th answer to `map_arena`.
fn serve(stream: UnixStream, case: usize) {
    let mut version = None;
    while let Ok(r) = recv_frame(&stream, version) {
        let id = r.header.request_id;
        match r.message {
            Message::Hello(h) => {
                version = Some(PROTOCOL_VERSION);
                let granted = features::CUDA_IPC | features::DEVICES | features::CUDA_EVENTS;
                let w = fake_welcome("cuda", h.features & granted);
                let _ = send_frame(&stream, PROTOCOL_VERSION, id, &w.into(), &[]);
            }
            Message::AcquireEvent(a) => {
                // Layer n answers with an n-byte event handle (0: ready; 64: well formed).
                let leased = Leased {
                    lease: 7,
                    layer: "blocks.0".into(),
                    ready: a.layer == 0,
                    tensors: vec![],
                };
                let msg = LeasedEvent { leased, ready_event: vec![9; a.layer as usize] };
                let _ = send_frame(&stream, PROTOCOL_VERSION, id, &msg.into(), &[]);
            }
            Message::MapArena(_) | Message::MapArenaOn(_) => {
                let (msg, with_fd) = answers().swap_remove(case);
                let file = tempfile::tempfile().expect("stand-in descriptor");
                let fds = if with_fd { vec![file.as_fd()] } else { vec![] };
                let _ = send_frame(&stream, PROTOCOL_VERSION, id, &msg.into(), &fds);
            }
            _ => return,
        }
    }
}

fn ask(dir: &Path, case: usize) -> Result<ArenaHandle, ClientError> {
    let socket = dir.join(format!("fake-{case}.sock"));
    let listener = UnixListener::bind(&socket).expect("bind");
    let server = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            serve(stream, case);
        }
    });
    let mut c = Client::connect(&socket, "cuda arena test").expect("connect");
    assert!(c.has_feature(features::CUDA_IPC));
    let r = c.arena_handle(if case.is_multiple_of(2) { None } else { Some(DeviceSel::Index(0)) });
    drop(c);
    server.join().expect("fake daemon");
    r
}

#[test]
fn well_formed_cuda_arenas_are_accepted_with_their_descriptor() {
    let dir = tempfile::tempdir().expect("tempdir");
    match ask(dir.path(), 0).expect("posix fd") {
        ArenaHandle::Cuda { arena, fd } => {
            assert_eq!(arena.handle, CudaHandle::PosixFd { alloc_len: 1 << 30 });
            assert_eq!(arena.device_uuid, UUID);
            assert!(fd.is_some());
        }
        other => panic!("{other:?}"),
    }
    match ask(dir.path(), 1).expect("ipc") {
        ArenaHandle::Cuda { arena, fd } => {
            assert_eq!(arena.handle, CudaHandle::Ipc { handle: vec![7; 64] });
            assert!(fd.is_none());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_cuda_arenas_are_protocol_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expect = [
        (2, "cuda_arena"),
        (3, "cuda_arena"),
        (4, "an IPC handle has 64 bytes, this one 63"),
        (5, "allocation of 1048576 bytes is smaller than the arena (1073741824)"),
    ];
    for (case, text) in expect {
        match ask(dir.path(), case) {
            Err(e @ ClientError::Protocol(_)) => {
                assert!(e.to_string().contains(text), "case {case}: {e}");
            }
            other => panic!("case {case}: expected a protocol error, got {other:?}"),
        }
    }
}

#[test]
fn ready_event_handles_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("events.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let server = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            serve(stream, 0);
        }
    });
    let mut c = Client::connect(&socket, "events test").expect("connect");
    assert!(c.has_feature(features::CUDA_EVENTS));
    let ready = c.acquire_event(1, "model", 0).expect("ready layer");
    assert!(ready.leased.ready && ready.ready_event.is_empty());
    let pending = c.acquire_event(1, "model", 64).expect("pending layer");
    assert_eq!(pending.ready_event, vec![9; 64]);
    match c.acquire_event(1, "model", 63) {
        Err(e @ ClientError::Protocol(_)) => {
            assert!(e.to_string().contains("has 64 bytes, this one 63"), "{e}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    drop(c);
    server.join().expect("fake daemon");
}
