"""ferry.cuda and the client's CUDA path, without a GPU (tests/python_client.rs runs this suite
everywhere; test_cuda_gpu.py is the one that needs a GPU).

* Without a driver: ``CudaUnavailable`` saying why, and every check of a ``cuda_arena`` reply
  that needs no driver, made before one is loaded (``$FERRY_LIBCUDA`` points at a missing file,
  so a check that came too late would show up as ``CudaUnavailable``).
* Through a stand-in driver: ``fake_libcuda.c`` (compiled here with ``cc``) has the CUDA 12
  driver API's signatures and logs every call, so the ctypes binding is checked for real:
  argument and struct layouts (``CUmemAccessDesc`` by pointer, the 64-byte IPC handle by value),
  the call order of both import paths, the primary context made current around every call and
  restored, everything undone when a call fails, and the descriptor closed on every path.
* Interprocess ready events through the stand-in: each handle opened once (by value, in the
  arena's context) and cached by its bytes, ``cuStreamWaitEvent`` / ``cuEventSynchronize`` on
  it, bad handles refused before the driver, the events destroyed before the arena is unmapped.
* A fake ferryd answering ``cuda_arena``: a ``cuda=True`` client maps it once per GPU, serves
  ``Lease.device_ptr`` from it, refuses ``view`` on device memory, and stays usable when
  mapping fails; its ``acquire_event`` leases make a stream wait on ferryd's event instead of
  sending ``wait_ready``.
"""

import ctypes
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import types
import unittest

import _util  # puts the package on sys.path
import ferry
from ferry import cuda, messages, wire

assert _util.PACKAGE_ROOT
HERE = os.path.dirname(os.path.abspath(__file__))
MISSING = "/nonexistent/libcuda.so.1"
# The stand-in's devices: device d's UUID bytes are 0x10 * d + i.
UUID0 = "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
UUID1 = "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"
MIB2 = 2 << 20
VA = 0x7F0000000000
IPC_VA = 0x7E0000000000


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def a_descriptor():
    """A new descriptor (of a temporary file) and its inode."""
    with tempfile.TemporaryFile() as f:
        fd = os.dup(f.fileno())
    return fd, os.fstat(fd).st_ino


def is_closed(fd):
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def pattern(offset, n):
    """The stand-in's device memory: byte (i * 7 + 3) & 0xff at offset i."""
    return bytes(((offset + i) * 7 + 3) & 0xFF for i in range(n))


class UseLibrary:
    """Sets $FERRY_LIBCUDA for one test."""

    def use(self, path):
        old = os.environ.get("FERRY_LIBCUDA")
        os.environ["FERRY_LIBCUDA"] = path
        if old is None:
            self.addCleanup(os.environ.pop, "FERRY_LIBCUDA", None)
        else:
            self.addCleanup(os.environ.__setitem__, "FERRY_LIBCUDA", old)


class Binding(unittest.TestCase):
    def test_struct_layouts_are_cuda_12s(self):
        """As cuda.h (and cudarc's generated bindings) lay them out."""
        self.assertEqual(ctypes.sizeof(cuda.CUuuid), 16)
        self.assertEqual(ctypes.sizeof(cuda.CUipcMemHandle), 64)
        self.assertEqual(ctypes.sizeof(cuda.CUipcEventHandle), 64)
        self.assertEqual(ctypes.sizeof(cuda.CUevent), ctypes.sizeof(ctypes.c_void_p))
        self.assertEqual(ctypes.sizeof(cuda.CUstream), ctypes.sizeof(ctypes.c_void_p))
        self.assertEqual(ctypes.sizeof(cuda.CUmemLocation), 8)
        self.assertEqual(cuda.CUmemLocation.id.offset, 4)
        self.assertEqual(ctypes.sizeof(cuda.CUmemAccessDesc), 12)
        self.assertEqual(cuda.CUmemAccessDesc.flags.offset, 8)
        self.assertEqual(ctypes.sizeof(cuda.CUdeviceptr), 8)
        self.assertEqual(ctypes.sizeof(cuda.CUmemGenericAllocationHandle), 8)

    def test_uuids_are_formatted_and_compared_like_ferryd(self):
        self.assertEqual(cuda.format_uuid(bytes(range(0x10, 0x20))), UUID1)
        self.assertEqual(cuda.format_uuid(bytes.fromhex("00112233445566778899aabbccddeeff")),
                         "GPU-00112233-4455-6677-8899-aabbccddeeff")
        with self.assertRaises(ValueError):
            cuda.format_uuid(b"\0" * 15)
        n = cuda.normalize_uuid
        self.assertEqual(n(UUID1.upper()), n(UUID1))
        self.assertEqual(n(UUID1[4:]), n(UUID1), "torch prints UUIDs without GPU-")
        self.assertEqual(n(" " + UUID1 + "\n"), UUID1.lower())
        self.assertNotEqual(n(UUID0), n(UUID1))
        self.assertEqual(n("MIG-abc"), "mig-abc")

    def test_client_asks_for_cuda_ipc_only_when_told(self):
        self.assertEqual(messages.DEFAULT_FEATURES & messages.CUDA_IPC, 0)
        self.assertEqual(messages.DEFAULT_FEATURES & messages.CUDA_EVENTS, 0)
        self.assertEqual(messages.CUDA_EVENTS, 1 << 6)
        with self.assertRaises(TypeError):
            ferry.Client("/nonexistent.sock", cuda="yes")


class NoDriver(UseLibrary, unittest.TestCase):
    """No usable libcuda: typed errors saying why; replies checked before any driver call."""

    def setUp(self):
        self.use(MISSING)

    def test_a_missing_library_is_cuda_unavailable_naming_it(self):
        for call in (lambda: cuda.driver(MISSING), cuda.driver):
            with self.assertRaises(ferry.CudaUnavailable) as cm:
                call()
            e = cm.exception
            self.assertIsInstance(e, ferry.CudaError)
            self.assertIsInstance(e, ferry.FerryError)
            self.assertIsNone(e.code, "not a server error")
            self.assertTrue(str(e).startswith(
                f"cannot load the CUDA driver library {MISSING} ("), str(e))
            self.assertIn("NVIDIA driver", str(e))

    def test_the_default_library_loads_or_says_why(self):
        """libcuda.so.1 is absent on machines without the NVIDIA driver (CI): then the error
        names it; where it loads, cuInit has worked or said why."""
        os.environ.pop("FERRY_LIBCUDA")
        try:
            drv = cuda.driver()
        except ferry.CudaUnavailable as e:
            msg = str(e)
            self.assertTrue(msg.startswith("cannot load the CUDA driver library libcuda.so.1")
                            or msg.startswith("cuInit failed: "), msg)
        else:
            self.assertEqual(drv.path, cuda.LIBCUDA)

    def test_a_valid_reply_needs_the_driver_and_closes_its_descriptor(self):
        for handle, with_fd in ((messages.CudaPosixFd(MIB2), True),
                                (messages.CudaIpc([7] * 64), False)):
            fd = a_descriptor()[0] if with_fd else None
            with self.assertRaises(ferry.CudaUnavailable) as cm:
                ferry.ImportedArena.import_(messages.CudaArena(MIB2, UUID0, handle), fd)
            self.assertTrue(str(cm.exception).startswith(
                f"mapping the CUDA arena of {UUID0} ({MIB2} bytes): cannot load the CUDA "
                f"driver library {MISSING}"), str(cm.exception))
            if fd is not None:
                self.assertTrue(is_closed(fd), "the descriptor was closed")

    def check_bad(self, arena, fd, message):
        with self.assertRaises(ferry.BadCudaArena) as cm:
            ferry.ImportedArena.import_(arena, fd)
        self.assertEqual(str(cm.exception), message)
        self.assertIsNone(cm.exception.code)
        if fd is not None:
            self.assertTrue(is_closed(fd), "the descriptor was closed")

    def test_replies_that_cannot_work_are_refused_before_any_driver_call(self):
        A = messages.CudaArena
        self.check_bad(A(MIB2 + 1, UUID0, messages.CudaPosixFd(MIB2)), a_descriptor()[0],
                       f"a shared allocation of {MIB2} bytes cannot hold an arena of "
                       f"{MIB2 + 1} bytes")
        self.check_bad(A(0, UUID0, messages.CudaPosixFd(0)), a_descriptor()[0],
                       "a shared allocation of 0 bytes cannot hold an arena of 0 bytes")
        self.check_bad(A(MIB2, UUID0, messages.CudaPosixFd(MIB2)), None,
                       "a PosixFd cuda_arena came without its file descriptor")
        self.check_bad(A(MIB2, UUID0, messages.CudaIpc([1] * 63)), None,
                       "a CUDA IPC handle has 64 bytes, this one 63")
        self.check_bad(A(MIB2, UUID0, messages.CudaIpc([1] * 65)), None,
                       "a CUDA IPC handle has 64 bytes, this one 65")
        self.check_bad(A(MIB2, UUID0, messages.CudaIpc([256] + [1] * 63)), None,
                       "a CUDA IPC handle holds bytes (0..=255)")
        self.check_bad(A(MIB2, UUID0, messages.CudaIpc([1] * 64)), a_descriptor()[0],
                       "an Ipc cuda_arena came with a file descriptor")
        self.check_bad(A(MIB2, "", messages.CudaIpc([1] * 64)), None,
                       "the cuda_arena reply names no device (empty UUID)")
        fd = a_descriptor()[0]
        with self.assertRaises(TypeError):
            ferry.ImportedArena.import_(messages.ArenaFd(MIB2, "host"), fd)
        self.assertTrue(is_closed(fd))
        # An allocation exactly the arena's size passes these checks (and goes on to the
        # driver, missing here).
        fd = a_descriptor()[0]
        with self.assertRaises(ferry.CudaUnavailable):
            ferry.ImportedArena.import_(A(MIB2, UUID0, messages.CudaPosixFd(MIB2)), fd)
        self.assertTrue(is_closed(fd))


def compile_fake(out_dir, *defines):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise unittest.SkipTest("no C compiler (cc) to build the stand-in libcuda")
    name = "libfakecuda" + "".join(d.lower() for d in defines) + ".so"
    out = os.path.join(out_dir, name)
    cmd = [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o", out,
           os.path.join(HERE, "fake_libcuda.c")] + ["-D" + d for d in defines]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"building the stand-in libcuda failed: {cmd}\n{done.stderr}")
    return out


def load_fake(path):
    """The stand-in's test controls (dlopen of the same path: the library ferry loads)."""
    lib = ctypes.CDLL(path)
    lib.fake_log.restype = ctypes.c_char_p
    lib.fake_state.restype = ctypes.c_char_p
    lib.fake_fail.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.fake_set_uuid.argtypes = [ctypes.c_int, ctypes.c_char_p]
    return lib


CLEAN = "depth=0 retains=0 imported=0 reserved=0 mapped=0 ipc=0 events=0"


class FakeDriverBase(UseLibrary, unittest.TestCase):
    #: Build flags of the stand-in (``-D<flag>``): a driver missing some entry points.
    FAKE_FLAGS = ()

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="ferry-fake-cuda-")
        try:
            cls.path = compile_fake(cls.dir, *cls.FAKE_FLAGS)
        except BaseException:
            shutil.rmtree(cls.dir)
            raise
        cls.lib = load_fake(cls.path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def setUp(self):
        self.use(self.path)
        self.lib.fake_reset(2, 0)

    def calls(self):
        """The calls logged since the last reset, minus cuInit (made once per process)."""
        return [c for c in self.lib.fake_log().decode().splitlines() if c != "cuInit(0)"]

    def state(self):
        return self.lib.fake_state().decode()

    def reset_log(self):
        self.lib.fake_clear_log()


PUSH1, POP = "cuCtxPushCurrent_v2(0x1001)", "cuCtxPopCurrent_v2"


class FakeDriver(FakeDriverBase):
    """The import paths through the stand-in driver, call by call."""

    def import_vmm(self, length=3 << 20, alloc=4 << 20, uuid=UUID1):
        fd, ino = a_descriptor()
        arena = ferry.ImportedArena.import_(
            messages.CudaArena(length, uuid, messages.CudaPosixFd(alloc)), fd)
        self.assertTrue(is_closed(fd), "the descriptor is closed once mapped")
        return arena, ino

    def test_vmm_import_maps_grants_read_only_access_and_unmaps_on_close(self):
        arena, ino = self.import_vmm(uuid=UUID1.upper())
        self.assertEqual(self.calls(), [
            "cuDevicePrimaryCtxRetain(1)",
            PUSH1,
            f"cuMemImportFromShareableHandle(ino={ino}, type=1, dev=1)",
            f"cuMemAddressReserve({4 << 20}, 0, 0, 0)",
            f"cuMemMap({VA:#x}, {4 << 20}, 0, 0xab00, 0)",
            f"cuMemSetAccess({VA:#x}, {4 << 20}, {{type=1, id=1, flags=1}}, 1)",
            "cuMemRelease(0xab00)",
            POP,
        ])
        self.assertEqual(self.state(), "depth=0 retains=1 imported=0 reserved=4194304 "
                                        "mapped=4194304 ipc=0 events=0")
        self.assertEqual((arena.base, arena.len, arena.size), (VA, 3 << 20, 4 << 20))
        self.assertEqual((arena.device_index, arena.kind, arena.backend), (1, "vmm", "cuda"))
        self.assertTrue(arena.read_only)
        self.assertEqual(arena.uuid, UUID1.upper(), "as ferryd named it")
        self.assertEqual(arena.ptr(4096, 8), VA + 4096)
        self.assertEqual(arena.ptr(3 << 20, 0), VA + (3 << 20))
        for offset, length in ((-1, 1), ((3 << 20) - 1, 2), (0, -1)):
            with self.assertRaises(ValueError):
                arena.ptr(offset, length)
        self.reset_log()
        self.assertEqual(arena.read(4093, 11), pattern(4093, 11))
        self.assertEqual(arena.read(0, 0), b"")
        with self.assertRaises(ValueError):
            arena.read((3 << 20) - 4, 5)
        self.assertEqual(self.calls(), [PUSH1, f"cuMemcpyDtoH_v2({VA + 4093:#x}, 11)", POP])
        self.reset_log()
        with arena:
            pass  # the context manager closes
        arena.close()  # idempotent
        self.assertTrue(arena.closed)
        self.assertEqual(self.calls(), [
            PUSH1, "cuCtxSynchronize(dev=1)", f"cuMemUnmap({VA:#x}, {4 << 20})",
            f"cuMemAddressFree({VA:#x}, {4 << 20})", POP, "cuDevicePrimaryCtxRelease_v2(1)",
        ])
        self.assertEqual(self.state(), CLEAN)
        with self.assertRaises(ValueError):
            arena.ptr(0, 1)

    def test_read_only_access_refused_falls_back_to_read_write(self):
        self.lib.fake_refuse_read_only(1)
        arena, _ = self.import_vmm()
        access = [c for c in self.calls() if c.startswith("cuMemSetAccess")]
        self.assertEqual([a.split("{")[1].split("}")[0] for a in access],
                         ["type=1, id=1, flags=1", "type=1, id=1, flags=3"])
        self.assertFalse(arena.read_only)
        self.assertEqual(self.lib.fake_access_flags(), 3)
        arena.close()
        self.assertEqual(self.state(), CLEAN)

    def test_a_failing_call_is_undone_and_named(self):
        for call, refuse_read_only, done in (
                ("cuDevicePrimaryCtxRetain", 0, []),
                ("cuMemImportFromShareableHandle", 0, []),
                ("cuMemAddressReserve", 0, ["cuMemRelease"]),
                ("cuMemMap", 0, ["cuMemAddressFree", "cuMemRelease"]),
                # the read-only attempt is refused, then the read-write one fails
                ("cuMemSetAccess", 1, ["cuMemUnmap", "cuMemAddressFree", "cuMemRelease"])):
            with self.subTest(call=call):
                self.lib.fake_reset(2, 0)
                self.lib.fake_refuse_read_only(refuse_read_only)
                self.lib.fake_fail(call.encode(), 2)
                fd, _ = a_descriptor()
                with self.assertRaises(ferry.CudaError) as cm:
                    ferry.ImportedArena.import_(
                        messages.CudaArena(MIB2, UUID0, messages.CudaPosixFd(MIB2)), fd)
                e = cm.exception
                self.assertNotIsInstance(e, ferry.CudaUnavailable)
                # The stand-in has no name for 2: the number stands in.
                self.assertEqual((e.call, e.result, e.result_name), (call, 2, "CUresult 2"))
                self.assertEqual(str(e), f"mapping the CUDA arena of {UUID0} ({MIB2} bytes): "
                                         f"{call} failed: CUresult 2 (2)")
                self.assertTrue(is_closed(fd))
                self.assertEqual(self.state(), CLEAN, call)
                undo = [c.split("(")[0] for c in self.calls()
                        if c.startswith(("cuMemRelease", "cuMemUnmap", "cuMemAddressFree"))]
                self.assertEqual(undo, done, self.calls())

    def test_error_names_come_from_the_driver(self):
        self.lib.fake_fail(b"cuMemMap", 801)
        fd, _ = a_descriptor()
        with self.assertRaises(ferry.CudaError) as cm:
            ferry.ImportedArena.import_(
                messages.CudaArena(MIB2, UUID0, messages.CudaPosixFd(MIB2)), fd)
        self.assertEqual(cm.exception.result_name, "CUDA_ERROR_NOT_SUPPORTED")
        self.assertTrue(str(cm.exception).endswith(
            "cuMemMap failed: CUDA_ERROR_NOT_SUPPORTED (801)"), str(cm.exception))
        self.assertEqual(self.state(), CLEAN)

    def test_ipc_handle_is_passed_by_value_and_closed(self):
        handle = bytes(range(64))[::-1]
        arena = ferry.ImportedArena.import_(
            messages.CudaArena(MIB2, UUID0.upper(), messages.CudaIpc(list(handle))))
        self.assertEqual(self.calls(), [
            "cuDevicePrimaryCtxRetain(0)", "cuCtxPushCurrent_v2(0x1000)",
            f"cuIpcOpenMemHandle_v2({handle.hex()}, 1, dev=0)", POP,
        ])
        self.assertEqual((arena.base, arena.len, arena.kind, arena.device_index),
                         (IPC_VA, MIB2, "ipc", 0))
        self.assertFalse(arena.read_only)
        self.assertEqual(arena.read(MIB2 - 3, 3), pattern(MIB2 - 3, 3))
        self.reset_log()
        arena.close()
        self.assertEqual(self.calls(), [
            "cuCtxPushCurrent_v2(0x1000)", "cuCtxSynchronize(dev=0)",
            f"cuIpcCloseMemHandle({IPC_VA:#x})", POP, "cuDevicePrimaryCtxRelease_v2(0)",
        ])
        self.assertEqual(self.state(), CLEAN)

    def test_an_ipc_handle_the_driver_refuses_releases_the_context(self):
        self.lib.fake_fail(b"cuIpcOpenMemHandle_v2", 400)
        with self.assertRaises(ferry.CudaError) as cm:
            ferry.ImportedArena.import_(
                messages.CudaArena(MIB2, UUID0, messages.CudaIpc([3] * 64)))
        self.assertEqual(cm.exception.call, "cuIpcOpenMemHandle_v2")
        self.assertIn("needs this process in ferryd's IPC namespace", str(cm.exception))
        self.assertIn("CUDA_ERROR_INVALID_HANDLE (400)", str(cm.exception))
        self.assertEqual(self.state(), CLEAN)

    def test_an_unknown_uuid_names_the_visible_devices(self):
        fd, _ = a_descriptor()
        missing = "GPU-ffffffff-0000-0000-0000-000000000000"
        with self.assertRaises(ferry.CudaUnavailable) as cm:
            ferry.ImportedArena.import_(
                messages.CudaArena(MIB2, missing, messages.CudaPosixFd(MIB2)), fd)
        self.assertEqual(str(cm.exception),
                         f"mapping the CUDA arena of {missing} ({MIB2} bytes): no visible CUDA "
                         f"device has UUID {missing} (visible: {UUID0}, {UUID1}); ferryd's GPU "
                         "must be visible to this process (check CUDA_VISIBLE_DEVICES)")
        self.assertTrue(is_closed(fd))
        self.assertEqual(self.calls(), [], "nothing retained or mapped")
        self.lib.fake_reset(0, 0)
        with self.assertRaises(ferry.CudaUnavailable) as cm:
            ferry.ImportedArena.import_(
                messages.CudaArena(MIB2, UUID0, messages.CudaIpc([0] * 64)))
        self.assertIn("(visible: none)", str(cm.exception))

    def test_a_gpu_without_posix_descriptor_handles_is_cuda_unavailable(self):
        self.lib.fake_posix_supported(0)
        fd, _ = a_descriptor()
        with self.assertRaises(ferry.CudaUnavailable) as cm:
            ferry.ImportedArena.import_(
                messages.CudaArena(MIB2, UUID0, messages.CudaPosixFd(MIB2)), fd)
        self.assertIn("CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED is 0",
                      str(cm.exception))
        self.assertTrue(is_closed(fd))
        self.assertEqual(self.state(), CLEAN)

    def test_the_callers_context_is_left_current(self):
        theirs = ctypes.c_void_p(0x5000)
        self.assertEqual(self.lib.cuCtxPushCurrent_v2(theirs), 0)
        arena, _ = self.import_vmm()
        arena.close()
        self.assertTrue(self.state().startswith("depth=1 "), self.state())
        top = ctypes.c_void_p()
        self.assertEqual(self.lib.cuCtxPopCurrent_v2(ctypes.byref(top)), 0)
        self.assertEqual(top.value, 0x5000)
        self.assertEqual(self.state(), CLEAN)

    def test_a_failure_while_closing_is_raised_after_every_step(self):
        arena, _ = self.import_vmm()
        self.reset_log()
        self.lib.fake_fail(b"cuCtxSynchronize", 2)
        with self.assertRaises(ferry.CudaError) as cm:
            arena.close()
        self.assertEqual(cm.exception.call, "cuCtxSynchronize")
        self.assertIn(f"closing the arena of {UUID1}", str(cm.exception))
        # Unmapped and released all the same.
        self.assertEqual(self.state(), CLEAN)
        arena.close()  # closed: nothing more
        self.assertEqual(len([c for c in self.calls() if c.startswith("cuMemUnmap")]), 1)

    def test_an_arena_dropped_without_close_is_unmapped(self):
        arena, _ = self.import_vmm()
        del arena
        import gc

        gc.collect()
        self.assertEqual(self.state(), CLEAN)

    def test_cuinit_failures_are_cuda_unavailable_and_retried(self):
        copy = os.path.join(self.dir, "libfakecuda-noinit.so")
        shutil.copy(self.path, copy)
        lib = load_fake(copy)
        lib.fake_reset(1, 100)  # CUDA_ERROR_NO_DEVICE
        for _ in range(2):  # not remembered: tried again
            with self.assertRaises(ferry.CudaUnavailable) as cm:
                cuda.driver(copy)
            self.assertEqual(str(cm.exception), "cuInit failed: CUDA_ERROR_NO_DEVICE (100): no "
                                                "CUDA-capable device is detected")
            self.assertEqual((cm.exception.call, cm.exception.result), ("cuInit", 100))
        lib.fake_reset(1, 0)
        self.assertIs(cuda.driver(copy), cuda.driver(copy), "loaded once")

# Two handles as ferryd's ring would give them (64 bytes each).
EV_A = bytes(range(64, 128))
EV_B = bytes(range(255, 191, -1))


class Events(FakeDriverBase):
    """ImportedArena.stream_wait / wait_host through the stand-in driver, call by call."""

    def import_ipc(self):
        arena = ferry.ImportedArena.import_(
            messages.CudaArena(MIB2, UUID1, messages.CudaIpc([5] * 64)))
        self.reset_log()
        return arena

    def test_a_handle_is_opened_once_by_value_and_waited_on(self):
        arena = self.import_ipc()
        arena.stream_wait(0x5000, EV_A)
        self.assertEqual(self.calls(), [
            PUSH1, f"cuIpcOpenEventHandle({EV_A.hex()}, dev=1)",
            "cuStreamWaitEvent(0x5000, ev#0, 0, dev=1)", POP,
        ], "the 64 bytes reached the driver by value, in the arena's context")
        self.assertEqual(arena.opened_events, 1)
        # The same bytes (in another object, another type) again: nothing is opened.
        self.reset_log()
        arena.stream_wait(0x6000, bytearray(EV_A))
        arena.stream_wait(0, memoryview(EV_A))  # 0: the legacy default stream
        self.assertEqual(self.calls(), [
            PUSH1, "cuStreamWaitEvent(0x6000, ev#0, 0, dev=1)", POP,
            PUSH1, "cuStreamWaitEvent(0, ev#0, 0, dev=1)", POP,
        ])
        # Another handle is another event; a host wait uses the cache too.
        self.reset_log()
        arena.stream_wait(0x5000, EV_B)
        arena.wait_host(EV_A)
        arena.wait_host(EV_B)
        self.assertEqual(self.calls(), [
            PUSH1, f"cuIpcOpenEventHandle({EV_B.hex()}, dev=1)",
            "cuStreamWaitEvent(0x5000, ev#1, 0, dev=1)", POP,
            PUSH1, "cuEventSynchronize(ev#0, dev=1)", POP,
            PUSH1, "cuEventSynchronize(ev#1, dev=1)", POP,
        ])
        self.assertEqual(arena.opened_events, 2)
        self.assertTrue(self.state().endswith(" ipc=1 events=2"), self.state())
        # Closing: after the context's work, the events go first, then the mapping.
        self.reset_log()
        arena.close()
        self.assertEqual(self.calls(), [
            PUSH1, "cuCtxSynchronize(dev=1)", "cuEventDestroy_v2(ev#0, dev=1)",
            "cuEventDestroy_v2(ev#1, dev=1)", f"cuIpcCloseMemHandle({IPC_VA:#x})", POP,
            "cuDevicePrimaryCtxRelease_v2(1)",
        ])
        self.assertEqual(self.state(), CLEAN)
        self.assertEqual(arena.opened_events, 0)
        # Closed: refused before any driver call.
        self.reset_log()
        for wait in (lambda: arena.stream_wait(0x5000, EV_A), lambda: arena.wait_host(EV_A)):
            with self.assertRaises(ValueError) as cm:
                wait()
            self.assertEqual(str(cm.exception), "the imported arena is closed")
        self.assertEqual(self.calls(), [])

    def test_a_vmm_arena_destroys_its_events_before_unmapping(self):
        fd, _ = a_descriptor()
        arena = ferry.ImportedArena.import_(
            messages.CudaArena(MIB2, UUID0, messages.CudaPosixFd(MIB2)), fd)
        arena.stream_wait(0x5000, EV_A)
        self.reset_log()
        arena.close()
        self.assertEqual(self.calls(), [
            "cuCtxPushCurrent_v2(0x1000)", "cuCtxSynchronize(dev=0)",
            "cuEventDestroy_v2(ev#0, dev=0)", f"cuMemUnmap({VA:#x}, {MIB2})",
            f"cuMemAddressFree({VA:#x}, {MIB2})", POP, "cuDevicePrimaryCtxRelease_v2(0)",
        ])
        self.assertEqual(self.state(), CLEAN)

    def test_bad_handles_and_streams_are_refused_before_the_driver(self):
        arena = self.import_ipc()
        for bad in (b"", EV_A[:63], EV_A + b"\0", bytes(128)):
            for wait in (lambda h: arena.stream_wait(0x5000, h), arena.wait_host):
                with self.subTest(length=len(bad)):
                    with self.assertRaises(ferry.BadCudaEvent) as cm:
                        wait(bad)
                    self.assertEqual(str(cm.exception),
                                     "a CUDA interprocess event handle has 64 bytes, this one "
                                     f"{len(bad)}")
                    self.assertIsNone(cm.exception.code)
                    self.assertIsInstance(cm.exception, ferry.FerryError)
        for bad in (EV_A.hex(), list(EV_A), 64, None):
            with self.assertRaises(TypeError) as cm:
                arena.stream_wait(0x5000, bad)
            self.assertIn("an interprocess event handle is bytes", str(cm.exception))
        for stream, exc in ((True, TypeError), (1.0, TypeError), (None, TypeError),
                            ("0x5000", TypeError), (-1, ValueError), (1 << 64, ValueError)):
            with self.subTest(stream=stream):
                with self.assertRaises(exc):
                    arena.stream_wait(stream, EV_A)
        self.assertEqual(self.calls(), [], "no driver call")
        self.assertEqual(arena.opened_events, 0)
        arena.close()
        self.assertEqual(self.state(), CLEAN)

    def test_a_handle_the_driver_refuses_is_named_and_not_kept(self):
        arena = self.import_ipc()
        self.lib.fake_fail(b"cuIpcOpenEventHandle", 400)
        with self.assertRaises(ferry.CudaError) as cm:
            arena.stream_wait(0x5000, EV_A)
        e = cm.exception
        self.assertEqual((e.call, e.result, e.result_name),
                         ("cuIpcOpenEventHandle", 400, "CUDA_ERROR_INVALID_HANDLE"))
        self.assertEqual(str(e), "cuIpcOpenEventHandle failed (an interprocess event of "
                                 "ferryd): CUDA_ERROR_INVALID_HANDLE (400)")
        self.assertEqual(arena.opened_events, 0)
        self.assertTrue(self.state().startswith("depth=0 "), "the context was popped")
        self.assertNotIn("cuStreamWaitEvent", "".join(self.calls()))
        # Tried again next time (a failure is not cached).
        self.reset_log()
        arena.stream_wait(0x5000, EV_A)
        self.assertEqual(self.calls()[1], f"cuIpcOpenEventHandle({EV_A.hex()}, dev=1)")
        # A failing wait is named; the opened event stays cached and is destroyed on close.
        self.lib.fake_fail(b"cuStreamWaitEvent", 1)
        with self.assertRaises(ferry.CudaError) as cm:
            arena.stream_wait(0x7000, EV_A)
        self.assertEqual(cm.exception.call, "cuStreamWaitEvent")
        self.assertIn("stream 0x7000 on ferryd's ready event", str(cm.exception))
        self.lib.fake_fail(b"cuEventSynchronize", 1)
        with self.assertRaises(ferry.CudaError) as cm:
            arena.wait_host(EV_A)
        self.assertEqual(cm.exception.call, "cuEventSynchronize")
        self.assertEqual(arena.opened_events, 1)
        arena.close()
        self.assertEqual(self.state(), CLEAN)

    def test_a_failed_destroy_is_raised_after_every_step(self):
        arena = self.import_ipc()
        arena.stream_wait(0x5000, EV_A)
        arena.stream_wait(0x5000, EV_B)
        self.reset_log()
        self.lib.fake_fail(b"cuEventDestroy_v2", 400)
        with self.assertRaises(ferry.CudaError) as cm:
            arena.close()
        self.assertEqual(cm.exception.call, "cuEventDestroy_v2")
        self.assertIn(f"closing the arena of {UUID1}", str(cm.exception))
        self.assertEqual([c.split("(")[0] for c in self.calls()], [
            "cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuEventDestroy_v2", "  -> fails 400",
            "cuEventDestroy_v2", "cuIpcCloseMemHandle", "cuCtxPopCurrent_v2",
            "cuDevicePrimaryCtxRelease_v2",
        ])
        # The second event and the mapping went all the same; the stand-in kept the first.
        self.assertEqual(self.state(), "depth=0 retains=0 imported=0 reserved=0 mapped=0 ipc=0 "
                                       "events=1")

    def test_close_waits_for_a_wait_in_another_thread(self):
        """close() never destroys an event or unmaps while another thread's wait uses them."""
        arena = self.import_ipc()
        entered, go = threading.Event(), threading.Event()
        real_open = arena._open_event

        def slow_open(raw):
            entered.set()
            go.wait(10)
            return real_open(raw)

        arena._open_event = slow_open
        waiter = threading.Thread(target=arena.wait_host, args=(EV_A,))
        waiter.start()
        self.assertTrue(entered.wait(10))
        closer = threading.Thread(target=arena.close)
        closer.start()
        closer.join(0.2)
        self.assertTrue(closer.is_alive(), "close waits for the wait")
        self.assertNotIn("cuCtxSynchronize(dev=1)", self.calls())
        go.set()
        waiter.join(10)
        closer.join(10)
        self.assertEqual([c.split("(")[0] for c in self.calls()][-6:], [
            "cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuEventDestroy_v2",
            "cuIpcCloseMemHandle", "cuCtxPopCurrent_v2", "cuDevicePrimaryCtxRelease_v2",
        ])
        self.assertEqual(self.state(), CLEAN)


class DriverWithoutEvents(FakeDriverBase):
    """A driver lacking the event functions: CudaUnavailable naming them, before any call."""

    FAKE_FLAGS = ("NO_EVENTS",)

    def test_waiting_needs_the_event_functions(self):
        self.assertFalse(hasattr(self.lib, "cuIpcOpenEventHandle"))
        arena = ferry.ImportedArena.import_(
            messages.CudaArena(MIB2, UUID0, messages.CudaIpc([9] * 64)))
        self.reset_log()
        with self.assertRaises(ferry.CudaUnavailable) as cm:
            arena.stream_wait(0x5000, EV_A)
        self.assertIn("lacks cuIpcOpenEventHandle, cuStreamWaitEvent, cuEventSynchronize, "
                      "cuEventDestroy_v2, needed for waiting on ferryd's interprocess events",
                      str(cm.exception))
        self.assertEqual(self.calls(), [])
        arena.close()
        self.assertEqual(self.state(), CLEAN)


class LegacyUuidDriver(FakeDriverBase):
    """A driver without cuDeviceGetUuid_v2 (before CUDA 11.4): cuDeviceGetUuid finds the GPU."""

    FAKE_FLAGS = ("NO_UUID_V2",)

    def test_the_legacy_uuid_call_finds_the_device(self):
        self.assertFalse(hasattr(self.lib, "cuDeviceGetUuid_v2"))
        arena = ferry.ImportedArena.import_(
            messages.CudaArena(MIB2, UUID1, messages.CudaIpc([9] * 64)))
        self.assertEqual(arena.device_index, 1)
        arena.close()
        self.assertEqual(self.state(), CLEAN)


# ---- a fake CUDA ferryd ----------------------------------------------------------------------


_recv_all = _util.recv_all


def _send(conn, msg, request_id, fds=()):
    body = wire.encode(msg)
    data = wire.pack_header(msg.KIND, request_id, len(body),
                            flags=wire.FLAG_FDS if fds else 0) + body
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.sendall(data)


def fake_cuda_ferryd(test, script, hello, on_eof=None):
    """A server on the CUDA backend granting what the client asked for (of CUDA_IPC,
    CUDA_EVENTS, DEVICES, OPEN_PATH); then, for each request, ``script(name, message)``
    returns ``(reply, fds)`` (``None``: close the connection). ``on_eof()`` is called when the
    client closes the connection (the moment ferryd would release its leases)."""
    path, listener = _util.fake_listener(test)
    received = []

    def run():
        conn, _ = listener.accept()
        with conn:
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            got = wire.decode(messages.Hello, _recv_all(conn, head.body_len))
            hello["features"] = got.features
            offered = (messages.CUDA_IPC | messages.CUDA_EVENTS | messages.DEVICES
                       | messages.OPEN_PATH)
            _send(conn, messages.Welcome(
                1, got.features & offered, 7, "fake", wire.MAX_BODY_LEN, 16,
                messages.DeviceSummary("cuda", "Fake GPU", UUID1, 1 << 30, 1 << 29)),
                head.request_id)
            try:
                while True:
                    head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
                    cls = messages.BY_KIND[head.kind]
                    msg = wire.decode(cls, _recv_all(conn, head.body_len))
                    received.append(cls.NAME)
                    out = script(cls.NAME, msg)
                    if out is None:
                        return
                    reply, fds = out
                    _send(conn, reply, head.request_id, fds)
            except EOFError:
                if on_eof is not None:
                    on_eof()
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    test.addCleanup(t.join, 10)
    return path, received


TENSORS = [messages.TensorDesc("w", "F32", [4, 2], 4096, 32),
           messages.TensorDesc("b", "F32", [2], (3 << 20) - 8, 8),
           messages.TensorDesc("past", "U8", [9], (3 << 20) - 8, 9)]


class FakeFerrydWithDriver(FakeDriverBase):
    """A cuda=True client of a CUDA ferryd, mapping through the stand-in driver."""

    def test_cuda_client_maps_once_per_gpu_and_serves_device_pointers(self):
        hello = {}
        descriptors = []

        def script(name, msg):
            if name in ("map_arena", "map_arena_on"):
                fd, ino = a_descriptor()
                descriptors.append((fd, ino))
                return messages.CudaArena(3 << 20, UUID1, messages.CudaPosixFd(4 << 20)), [fd]
            if name == "acquire":
                return messages.Leased(5, "blocks.0", False, TENSORS), []
            if name == "wait_ready":
                return messages.Ready(msg.lease), []
            if name == "goodbye":
                at_goodbye.extend(self.calls())  # what the driver had done by then
            if name in ("release", "goodbye"):
                return messages.Ack(), []
            if name == "stats":
                return messages.StatsReply(*[0] * 11), []
            return messages.Error(201, f"fake: {name}"), []

        at_goodbye = []
        path, received = fake_cuda_ferryd(self, script, hello)
        c = ferry.Client(path, timeout=10, cuda=True)
        self.assertEqual(hello["features"],
                         messages.DEFAULT_FEATURES | messages.CUDA_IPC | messages.CUDA_EVENTS)
        self.assertTrue(c.features & messages.CUDA_IPC)
        before = open_fds()
        arena = c.map_arena()
        self.assertIsInstance(arena, ferry.ImportedArena)
        (fd, ino), = descriptors
        os.close(fd)  # this "server's" own copy
        self.assertEqual(open_fds(), before, "the received descriptor was closed")
        self.assertIn(f"cuMemImportFromShareableHandle(ino={ino}, type=1, dev=1)",
                      self.calls(), "the descriptor that came with the frame was imported")
        self.assertIs(c.map_arena(), arena, "mapped once")
        # The same GPU by UUID: ferryd sends a new descriptor, which is closed unused.
        self.assertIs(c.map_arena(UUID1), arena)
        os.close(descriptors[1][0])
        self.assertEqual(open_fds(), before)
        self.assertEqual(arena.device, None)

        lease = c.acquire(1, "unet", 0)
        self.assertFalse(lease.ready)
        with self.assertRaises(ferry.MemoryKindError) as cm:
            lease.view("w")
        self.assertIn("use Lease.device_ptr", str(cm.exception))
        with self.assertRaises(ferry.MemoryKindError):
            lease.array("w")
        self.assertEqual(received.count("wait_ready"), 0, "view sends nothing on CUDA")
        # Device 0 by index (the lease's model is on it): asked for, and the same GPU again.
        self.assertEqual(lease.device_ptr("w"), VA + 4096)
        os.close(descriptors[2][0])
        self.assertEqual(open_fds(), before)
        self.assertEqual(len([x for x in self.calls() if x.startswith("cuMemImport")]), 1)
        self.assertTrue(lease.ready)
        self.assertEqual(lease.device_ptr(TENSORS[1]), VA + (3 << 20) - 8, "the arena's end")
        with self.assertRaises(ferry.ProtocolError) as cm:
            lease.device_ptr("past")
        self.assertIn("past the arena's end", str(cm.exception))
        self.assertEqual(received.count("wait_ready"), 1, "waited once")
        self.assertEqual(lease.arena().read(4096, 4), pattern(4096, 4))
        lease.release()
        with self.assertRaises(ferry.UnknownLease):
            lease.device_ptr("w")
        self.assertIsInstance(c.stats(), messages.StatsReply)
        self.reset_log()
        c.close()
        self.assertTrue(arena.closed, "closing the client unmaps its arenas")
        # The GPU work is finished before goodbye (ferryd then releases every lease), and the
        # arena unmapped after it.
        self.assertEqual(at_goodbye, [PUSH1, "cuCtxSynchronize(dev=1)", POP])
        self.assertEqual([x.split("(")[0] for x in self.calls()],
                         ["cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuCtxPopCurrent_v2",
                          "cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuMemUnmap",
                          "cuMemAddressFree", "cuCtxPopCurrent_v2",
                          "cuDevicePrimaryCtxRelease_v2"])
        self.assertEqual(self.state(), CLEAN)
        self.assertEqual(received, ["map_arena", "map_arena_on", "acquire", "map_arena_on",
                                    "wait_ready", "release", "stats", "goodbye"])

    def test_acquire_event_leases_wait_on_the_stream_instead_of_wait_ready(self):
        """A cuda=True client gets CUDA_EVENTS; acquire_event's lease makes a stream wait on
        ferryd's event (opened once for every lease that names it) and never sends
        wait_ready; the events are destroyed before the arena is unmapped on close."""
        hello = {}
        ready_layer = messages.Leased(7, "blocks.1", True, TENSORS)

        def script(name, msg):
            if name in ("map_arena", "map_arena_on"):
                return messages.CudaArena(3 << 20, UUID1, messages.CudaIpc([5] * 64)), []
            if name == "acquire_event":
                if msg.layer == 1:  # on the device already: no event
                    return messages.LeasedEvent(ready_layer, b""), []
                lease = 5 + 10 * msg.layer
                return messages.LeasedEvent(messages.Leased(lease, "blocks.0", False, TENSORS),
                                            EV_A), []
            if name == "acquire":
                return messages.Leased(6, "blocks.0", False, TENSORS), []
            if name == "wait_ready":
                return messages.Ready(msg.lease), []
            if name in ("release", "goodbye"):
                return messages.Ack(), []
            return messages.Error(201, f"fake: {name}"), []

        path, received = fake_cuda_ferryd(self, script, hello)
        c = ferry.Client(path, timeout=10, cuda=True)
        self.assertTrue(hello["features"] & messages.CUDA_EVENTS, "cuda=True asks for events")
        self.assertTrue(c.features & messages.CUDA_EVENTS)
        lease = c.acquire_event(1, "unet", 0)
        self.assertEqual((lease.id, lease.ready, lease.ready_event), (5, False, EV_A))
        with lease:  # no host wait on entry
            self.assertEqual(received, ["acquire_event"])
            self.assertIs(lease.wait_on_stream(0x5000), lease)
            self.assertEqual(lease.device_ptr("w", stream=0x5000), IPC_VA + 4096)
            self.assertEqual(lease.device_ptr("b", stream=0x6000), IPC_VA + (3 << 20) - 8)
            self.assertFalse(lease.ready, "nothing waited on the host")
        waits = [x for x in self.calls() if x.startswith(("cuIpc", "cuStream", "cuEvent"))]
        self.assertEqual(waits, [
            f"cuIpcOpenMemHandle_v2({'05' * 64}, 1, dev=1)",
            f"cuIpcOpenEventHandle({EV_A.hex()}, dev=1)",
            "cuStreamWaitEvent(0x5000, ev#0, 0, dev=1)",  # once for stream 0x5000
            "cuStreamWaitEvent(0x6000, ev#0, 0, dev=1)",
            # the release: both streams that waited are finished first
            "cuStreamSynchronize(0x5000, dev=1)", "cuStreamSynchronize(0x6000, dev=1)",
        ])
        # Another lease with the same handle (ferryd's ring came round): nothing is opened.
        self.reset_log()
        again = c.acquire_event(1, "unet", 2)
        again.wait_on_stream(0x5000)
        self.assertEqual([x for x in self.calls() if x.startswith(("cuIpc", "cuStream"))],
                         ["cuStreamWaitEvent(0x5000, ev#0, 0, dev=1)"])
        again.release()
        # A layer already on the device: no event, nothing to wait for.
        self.reset_log()
        ready = c.acquire_event(1, "unet", 1)
        self.assertEqual((ready.ready, ready.ready_event), (True, b""))
        self.assertEqual(ready.device_ptr("w", stream=0x5000), IPC_VA + 4096)
        self.assertEqual(self.calls(), [])
        ready.release()
        # A plain acquire's lease has no event: ordering a stream falls back to wait_ready.
        plain = c.acquire(1, "unet", 0)
        self.assertIsNone(plain.ready_event)
        plain.wait_on_stream(0x5000)
        self.assertTrue(plain.ready)
        plain.release()
        self.assertEqual(c.arena_for(1).opened_events, 1)
        self.reset_log()
        c.close()
        self.assertEqual([x.split("(")[0] for x in self.calls()], [
            "cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuCtxPopCurrent_v2",  # before goodbye
            "cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuEventDestroy_v2",
            "cuIpcCloseMemHandle", "cuCtxPopCurrent_v2", "cuDevicePrimaryCtxRelease_v2",
        ])
        self.assertEqual(self.state(), CLEAN)
        self.assertEqual(received, [
            "acquire_event", "map_arena_on", "release", "acquire_event", "release",
            "acquire_event", "release", "acquire", "wait_ready", "release", "goodbye",
        ])

    def test_a_bad_event_handle_releases_the_lease_and_keeps_the_connection(self):
        def script(name, msg):
            if name == "acquire_event":
                return messages.LeasedEvent(messages.Leased(9, "blocks.0", False, TENSORS),
                                            EV_A[:10]), []
            if name == "stats":
                return messages.StatsReply(*[0] * 11), []
            return messages.Ack(), []

        path, received = fake_cuda_ferryd(self, script, {})
        c = ferry.Client(path, timeout=10, cuda=True)
        self.addCleanup(c.close)
        with self.assertRaises(ferry.BadCudaEvent) as cm:
            c.acquire_event(1, "unet", 0)
        self.assertEqual(str(cm.exception), "leased_event for layer 'blocks.0': a CUDA "
                                            "interprocess event handle has 64 bytes, this one 10")
        self.assertFalse(c.closed)
        self.assertIsInstance(c.stats(), messages.StatsReply)
        self.assertEqual(received, ["acquire_event", "release", "stats"])
        self.assertEqual(self.calls(), [], "no driver call")

    def test_a_lease_orders_a_stream_only_on_cuda_and_while_held(self):
        def script(name, msg):
            if name == "acquire_event":
                return messages.LeasedEvent(messages.Leased(9, "blocks.0", False, TENSORS),
                                            EV_A), []
            return messages.Ack(), []

        path, received = fake_cuda_ferryd(self, script, {})
        c = ferry.Client(path, timeout=10, cuda=True)
        self.addCleanup(c.close)
        lease = c.acquire_event(1, "unet", 0)
        with self.assertRaises(TypeError):
            lease.wait_on_stream(None)
        with self.assertRaises(ValueError):
            lease.device_ptr("w", stream=-1)
        lease.release()
        with self.assertRaises(ferry.UnknownLease):
            lease.wait_on_stream(0x5000)
        self.assertEqual(received, ["acquire_event", "release"])
        self.assertEqual(self.calls(), [])

    def test_a_failed_import_keeps_the_connection_and_closes_the_descriptor(self):
        descriptors = []

        def script(name, msg):
            if name == "map_arena":
                fd, _ = a_descriptor()
                descriptors.append(fd)
                return messages.CudaArena(
                    MIB2, "GPU-99999999-0000-0000-0000-000000000000",
                    messages.CudaPosixFd(MIB2)), [fd]
            if name == "stats":
                return messages.StatsReply(*[0] * 11), []
            return messages.Ack(), []

        path, _ = fake_cuda_ferryd(self, script, {})
        c = ferry.Client(path, timeout=10, cuda=True)
        self.addCleanup(c.close)
        before = open_fds()
        with self.assertRaises(ferry.CudaUnavailable) as cm:
            c.map_arena()
        self.assertIn("no visible CUDA device has UUID GPU-99999999", str(cm.exception))
        os.close(descriptors[0])
        self.assertEqual(open_fds(), before - {str(descriptors[0])})
        self.assertFalse(c.closed)
        self.assertIsInstance(c.stats(), messages.StatsReply)
        self.assertEqual(self.state(), CLEAN)


class EventFallbackAndTeardown(FakeDriverBase):
    """Events across IPC namespaces (the fallback to wait_ready, remembered per arena), the
    events=False opt-out, streams synchronised before a release, and the GPU settled before
    the connection ends: the fake ferryd records the stand-in's log when each frame arrives,
    so the order between driver calls and frames is checked, not assumed."""

    def ferryd(self, hello=None, at=None, **client_kwargs):
        """A fake CUDA ferryd (an Ipc arena; acquire_event: a layer not ready, with EV_A) and a
        client of it. ``at``: frame name -> the driver calls logged when it arrived (the last
        one of that name), and "eof" -> those logged when the connection ended."""
        at = {} if at is None else at
        ids = iter(range(10, 100))

        def script(name, msg):
            at[name] = self.calls()
            if name in ("map_arena", "map_arena_on"):
                return messages.CudaArena(3 << 20, UUID1, messages.CudaIpc([5] * 64)), []
            if name == "acquire_event":
                return messages.LeasedEvent(
                    messages.Leased(next(ids), "blocks.0", False, TENSORS), EV_A), []
            if name == "acquire":
                return messages.Leased(next(ids), "blocks.0", False, TENSORS), []
            if name == "wait_ready":
                return messages.Ready(msg.lease), []
            # release, goodbye; and stats, a reply of the wrong kind: the client drops the
            # connection
            return messages.Ack(), []

        path, received = fake_cuda_ferryd(self, script, {} if hello is None else hello,
                                          on_eof=lambda: at.__setitem__("eof", self.calls()))
        c = ferry.Client(path, timeout=10, **client_kwargs)
        self.addCleanup(c.close)
        return c, received, at

    def test_an_event_that_cannot_be_opened_falls_back_to_wait_ready_for_good(self):
        """cuIpcOpenEventHandle refused (another IPC namespace): the lease is waited for with
        wait_ready, one warning is logged, and later leases on the arena go straight to
        wait_ready without opening anything."""
        c, received, _ = self.ferryd(cuda=True)
        self.assertTrue(c.features & messages.CUDA_EVENTS)
        self.lib.fake_fail(b"cuIpcOpenEventHandle", 400)  # once: the driver would work later
        with self.assertLogs("ferry", "WARNING") as logs:
            lease = c.acquire_event(1, "unet", 0)
            self.assertIs(lease.wait_on_stream(0x5000), lease)
            self.assertTrue(lease.ready, "waited for on the host")
            arena = lease.arena()
            self.assertTrue(arena.events_broken)
            self.assertEqual(arena.opened_events, 0)
            self.assertEqual(lease.device_ptr("w", stream=0x6000), IPC_VA + 4096)
            lease.release()
            self.assertEqual(received, ["acquire_event", "map_arena_on", "wait_ready",
                                        "release"])
            self.reset_log()
            # The next leases: no driver call at all, a wait_ready each.
            for layer in (1, 2):
                with c.acquire_event(1, "unet", layer) as again:
                    again.wait_on_stream(0x5000)
                    self.assertEqual(again.device_ptr("b", stream=0x5000),
                                     IPC_VA + (3 << 20) - 8)
                    self.assertTrue(again.ready)
            self.assertEqual(self.calls(), [], "nothing opened, waited on or synchronised")
            self.assertEqual(received[4:], ["acquire_event", "wait_ready", "release"] * 2)
        self.assertEqual(len(logs.records), 1, "warned once")
        (record,) = logs.records
        self.assertEqual((record.name, record.levelname), ("ferry.cuda", "WARNING"))
        msg = record.getMessage()
        self.assertIn("cuIpcOpenEventHandle failed (an interprocess event of ferryd): "
                      "CUDA_ERROR_INVALID_HANDLE (400)", msg)
        self.assertIn(f"leases on the arena of {UUID1} wait on the host (wait_ready)", msg)
        self.assertIn("events=False", msg)

    def test_a_wait_the_driver_refuses_falls_back_too(self):
        """cuStreamWaitEvent failing (the event opened): the same fallback; the opened event
        is still destroyed when the client closes."""
        c, received, _ = self.ferryd(cuda=True)
        self.lib.fake_fail(b"cuStreamWaitEvent", 1)
        with self.assertLogs("ferry.cuda", "WARNING") as logs:
            with c.acquire_event(1, "unet", 0) as lease:
                self.assertEqual(lease.device_ptr("w", stream=0x5000), IPC_VA + 4096)
                self.assertTrue(lease.ready)
        self.assertEqual(len(logs.records), 1)
        self.assertIn("cuStreamWaitEvent failed", logs.records[0].getMessage())
        arena = c.arena_for(1)
        self.assertTrue(arena.events_broken)
        self.assertEqual(arena.opened_events, 1)
        self.assertNotIn("cuStreamSynchronize", "".join(self.calls()),
                         "no stream waited: nothing to synchronise at the release")
        self.assertEqual(received, ["acquire_event", "map_arena_on", "wait_ready", "release"])
        c.close()
        self.assertEqual(self.state(), CLEAN)

    def test_another_arena_keeps_its_events(self):
        """events_broken belongs to one mapping: a client with a fresh one tries again."""
        c, _, _ = self.ferryd(cuda=True)
        self.lib.fake_fail(b"cuIpcOpenEventHandle", 400)
        with self.assertLogs("ferry.cuda", "WARNING"):
            c.acquire_event(1, "unet", 0).wait_on_stream(0x5000)
        c.close()
        other, received, _ = self.ferryd(cuda=True)
        lease = other.acquire_event(1, "unet", 0)
        lease.wait_on_stream(0x5000)
        self.assertFalse(lease.ready)
        self.assertFalse(lease.arena().events_broken)
        self.assertEqual(received, ["acquire_event", "map_arena_on"])

    def test_events_false_does_not_ask_for_cuda_events(self):
        for kwargs in ({"cuda": True, "events": False},
                       {"cuda": True, "events": False,
                        "features": messages.DEFAULT_FEATURES | messages.CUDA_EVENTS}):
            with self.subTest(**{k: v for k, v in kwargs.items() if k != "features"},
                              features="features" in kwargs):
                hello = {}
                c, _, _ = self.ferryd(hello, **kwargs)
                self.assertEqual(hello["features"],
                                 messages.DEFAULT_FEATURES | messages.CUDA_IPC)
                self.assertEqual(c.features & messages.CUDA_EVENTS, 0)
                self.assertTrue(c.features & messages.CUDA_IPC)
        hello = {}
        self.ferryd(hello, cuda=True)
        self.assertEqual(hello["features"], messages.DEFAULT_FEATURES | messages.CUDA_IPC
                         | messages.CUDA_EVENTS, "events=True is the default")
        with self.assertRaises(TypeError):
            ferry.Client("/nonexistent.sock", cuda=True, events="no")

    def test_release_synchronises_the_streams_that_waited_first(self):
        at = {}
        c, received, _ = self.ferryd(at=at, cuda=True)
        lease = c.acquire_event(1, "unet", 0)
        lease.wait_on_stream(0x6000)
        lease.wait_on_stream(0x5000)
        self.reset_log()
        lease.release()
        self.assertEqual(at["release"], [
            PUSH1, "cuStreamSynchronize(0x5000, dev=1)", POP,
            PUSH1, "cuStreamSynchronize(0x6000, dev=1)", POP,
        ], "both streams finished before ferryd got the release")
        lease.release()  # released: nothing more
        # What the caller said it synchronised is not synchronised again.
        lease = c.acquire_event(1, "unet", 1)
        lease.wait_on_stream(0x5000)
        lease.wait_on_stream(0x6000)
        lease.mark_synchronized(0x5000)
        self.reset_log()
        c.release(1, lease)  # the client's release of a Lease does the same
        self.assertTrue(lease.released)
        self.assertEqual(at["release"], [PUSH1, "cuStreamSynchronize(0x6000, dev=1)", POP])
        lease = c.acquire_event(1, "unet", 2)
        lease.wait_on_stream(0x5000)
        lease.mark_synchronized()  # every stream (a device-wide synchronise)
        lease.wait_on_stream(0x5000)  # used on 0x5000 again: to be finished again
        self.reset_log()
        lease.release()
        self.assertEqual(at["release"], [PUSH1, "cuStreamSynchronize(0x5000, dev=1)", POP])
        lease = c.acquire_event(1, "unet", 3)
        lease.wait_on_stream(0x5000)
        lease.mark_synchronized()
        self.reset_log()
        lease.release()
        self.assertEqual(at["release"], [])
        # A failing synchronisation keeps the lease: the GPU may still be reading.
        lease = c.acquire_event(1, "unet", 4)
        lease.wait_on_stream(0x5000)
        self.lib.fake_fail(b"cuStreamSynchronize", 1)
        sent = len(received)
        with self.assertRaises(ferry.CudaError) as cm:
            lease.release()
        self.assertEqual(cm.exception.call, "cuStreamSynchronize")
        self.assertFalse(lease.released)
        self.assertEqual(len(received), sent, "no release sent")
        lease.release()  # tried again: the stream is synchronised, then released
        self.assertTrue(lease.released)
        self.assertEqual(received[-1], "release")
        with self.assertRaises(TypeError):
            lease.mark_synchronized("0x5000")

    def test_close_settles_the_gpu_before_goodbye(self):
        """close(): cuCtxSynchronize in every mapped arena's context before ferryd gets
        goodbye (it then releases every lease, which are still held here), then the events
        are destroyed and the memory unmapped."""
        at = {}
        c, received, _ = self.ferryd(at=at, cuda=True)
        held = c.acquire_event(1, "unet", 0)
        held.wait_on_stream(0x5000)
        self.assertIs(c.map_arena(UUID1), c.arena_for(1), "cached twice, settled once")
        self.reset_log()
        c.close()
        self.assertEqual(at["goodbye"], [PUSH1, "cuCtxSynchronize(dev=1)", POP])
        self.assertEqual(self.calls(), [
            PUSH1, "cuCtxSynchronize(dev=1)", POP,
            PUSH1, "cuCtxSynchronize(dev=1)", "cuEventDestroy_v2(ev#0, dev=1)",
            f"cuIpcCloseMemHandle({IPC_VA:#x})", POP, "cuDevicePrimaryCtxRelease_v2(1)",
        ])
        self.assertEqual(received[-1], "goodbye")
        self.assertEqual(self.state(), CLEAN)

    def test_a_failed_settle_still_says_goodbye_and_is_raised(self):
        at = {}
        c, received, _ = self.ferryd(at=at, cuda=True)
        c.acquire_event(1, "unet", 0).wait_on_stream(0x5000)
        self.lib.fake_fail(b"cuCtxSynchronize", 1)
        with self.assertRaises(ferry.CudaError) as cm:
            c.close()
        self.assertEqual(cm.exception.call, "cuCtxSynchronize")
        self.assertIn("the context of " + UUID1, str(cm.exception))
        self.assertEqual(received[-1], "goodbye")
        self.assertEqual(self.state(), CLEAN, "unmapped all the same")

    def test_dropping_the_connection_settles_the_gpu_first(self):
        """A reply of the wrong kind: the client closes the connection (and so ferryd releases
        its leases) only after the GPU work is finished."""
        at = {}
        c, received, _ = self.ferryd(at=at, cuda=True)
        c.acquire_event(1, "unet", 0).wait_on_stream(0x5000)
        self.reset_log()
        with self.assertRaises(ferry.errors.UnexpectedMessage):
            c.stats()
        self.assertTrue(c.closed)
        for _ in range(100):  # the fake's thread sees the end of the stream on its own time
            if "eof" in at:
                break
            threading.Event().wait(0.05)
        self.assertEqual(at["eof"], [PUSH1, "cuCtxSynchronize(dev=1)", POP])
        c.close()
        self.assertNotIn("goodbye", received)
        self.assertEqual(self.state(), CLEAN)

    def test_a_connection_ferryd_ended_is_not_settled(self):
        """ferryd closed the connection (its leases are released already): nothing waits on
        the GPU, which may wait on events of a ferryd that is gone; close() unmaps."""
        path, _ = fake_cuda_ferryd(self, lambda name, msg: (
            (messages.CudaArena(3 << 20, UUID1, messages.CudaIpc([5] * 64)), [])
            if name == "map_arena" else None), {})
        c = ferry.Client(path, timeout=10, cuda=True)
        c.map_arena()
        self.reset_log()
        with self.assertRaises(ferry.ConnectionLost):
            c.stats()
        self.assertEqual(self.calls(), [])
        c.close()
        self.assertEqual([x.split("(")[0] for x in self.calls()], [
            "cuCtxPushCurrent_v2", "cuCtxSynchronize", "cuIpcCloseMemHandle",
            "cuCtxPopCurrent_v2", "cuDevicePrimaryCtxRelease_v2",
        ], "only the arena's own close")


class FakeFerrydWithoutDriver(UseLibrary, unittest.TestCase):
    def test_without_cuda_true_ferryd_is_not_asked_and_leases_say_so(self):
        """A default client does not ask for CUDA_IPC; its leases on a CUDA ferryd refuse
        view (device memory) before sending anything."""
        self.use(MISSING)
        hello = {}

        def script(name, msg):
            if name == "acquire":
                return messages.Leased(5, "blocks.0", True, TENSORS), []
            if name in ("map_arena", "map_arena_on"):
                return messages.Error(201, "map_arena on a CUDA device needs CUDA_IPC"), []
            return messages.Ack(), []

        path, received = fake_cuda_ferryd(self, script, hello)
        c = ferry.Client(path, timeout=10)
        self.addCleanup(c.close)
        self.assertEqual(hello["features"] & messages.CUDA_IPC, 0)
        lease = c.acquire(1, "unet", 0)
        with self.assertRaises(ferry.MemoryKindError):
            lease.view(lease.tensors[0])
        with self.assertRaises(ferry.Unsupported):
            lease.device_ptr("w")
        self.assertEqual(received, ["acquire", "map_arena_on"])


class DevicePointers(unittest.TestCase):
    """Lease.device_ptr's arithmetic and checks, with stub client and arena objects."""

    def lease(self, backend="cuda", ready=False, base=0x10000, length=1 << 20):
        waits = []
        arena = types.SimpleNamespace(base=base, len=length, backend=backend)
        client = types.SimpleNamespace(
            device=types.SimpleNamespace(backend=backend),
            arena_for=lambda model: arena,
            wait_ready=waits.append,
            release=lambda model, lease: None)
        tensors = [messages.TensorDesc("a", "F16", [3], 0, 6),
                   messages.TensorDesc("b", "F32", [], 100, 4),
                   messages.TensorDesc("end", "U8", [16], length - 16, 16),
                   messages.TensorDesc("over", "U8", [17], length - 16, 17)]
        leased = messages.Leased(42, "blocks.3", ready, tensors)
        return ferry.Lease(client, 1 << 48, "unet", 3, leased), waits

    def test_base_plus_offset_within_the_arena(self):
        lease, waits = self.lease()
        self.assertEqual(lease.device_ptr("a"), 0x10000)
        self.assertEqual(waits, [42], "waited for the layer first")
        self.assertEqual(lease.device_ptr("b"), 0x10000 + 100)
        self.assertEqual(lease.device_ptr(lease.tensors[2]), 0x10000 + (1 << 20) - 16)
        self.assertEqual(waits, [42], "once")
        with self.assertRaises(ferry.ProtocolError) as cm:
            lease.device_ptr("over")
        self.assertEqual(str(cm.exception), f"tensor over (bytes {(1 << 20) - 16}.."
                                            f"{(1 << 20) + 1}) lies past the arena's end "
                                            f"({1 << 20} bytes)")
        with self.assertRaises(KeyError):
            lease.device_ptr("missing")

    def test_a_tensor_out_of_bounds_is_refused_before_waiting(self):
        lease, waits = self.lease()
        with self.assertRaises(ferry.ProtocolError):
            lease.device_ptr("over")
        self.assertEqual(waits, [])

    def test_ready_leases_do_not_wait(self):
        lease, waits = self.lease(ready=True)
        self.assertEqual(lease.device_ptr("b"), 0x10000 + 100)
        self.assertEqual(waits, [])

    def test_released_and_host_leases_are_refused(self):
        lease, _ = self.lease()
        lease.release()
        with self.assertRaises(ferry.UnknownLease):
            lease.device_ptr("a")
        lease, waits = self.lease(backend="host")
        with self.assertRaises(ferry.MemoryKindError) as cm:
            lease.device_ptr("a")
        self.assertIn("use Lease.view", str(cm.exception))
        self.assertEqual(waits, [])

    def test_a_host_lease_has_no_stream_to_order(self):
        lease, waits = self.lease(backend="host")
        with self.assertRaises(ferry.MemoryKindError) as cm:
            lease.wait_on_stream(0x5000)
        self.assertEqual(str(cm.exception), "layer blocks.3 is in a host arena (ferryd runs on "
                                            "the host backend): there is no stream to order; "
                                            "use Lease.wait_ready")
        self.assertEqual(waits, [])

    def test_view_and_array_refuse_device_memory(self):
        lease, waits = self.lease()
        for read in (lease.view, lease.array):
            with self.assertRaises(ferry.MemoryKindError) as cm:
                read("a")
            self.assertEqual(str(cm.exception),
                             "tensor a is in GPU memory (ferryd runs on CUDA), which the host "
                             "cannot read: use Lease.device_ptr (or ferry.torch) instead of "
                             "view/array")
        self.assertEqual(waits, [])


if __name__ == "__main__":
    unittest.main()
