"""ferry.torch: torch modules served by a real ferryd (host backend, CPU tensors).

Needs PyTorch; every test is skipped without it (tests/python_client.rs runs this suite only
when ``import torch`` works). The live tests also need:

* FERRY_SOCKET: ferryd's socket (host backend);
* FERRY_MODEL_ROOT: a writable folder under one of ferryd's model roots, where the tests write
  the weights of their modules as safetensors files.

Each live test computes a module's output with its own weights, writes those weights out,
builds the same module on the meta device (no weights at all), attaches it to ferry and checks
that the output is exactly the same.
"""

import ctypes
import json
import os
import shutil
import tempfile
import threading
import types
import unittest
from unittest import mock

import _util  # puts the package on sys.path
import ferry
import test_cuda  # the stand-in libcuda and the fake CUDA ferryd (a module: no tests of its own)
from ferry import messages, wire

try:
    import torch
    from torch import nn

    import ferry.torch as ft
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

SOCKET = os.environ.get("FERRY_SOCKET")
ROOT = os.environ.get("FERRY_MODEL_ROOT")
HAVE_TORCH = torch is not None
LIVE = HAVE_TORCH and bool(SOCKET and ROOT)
assert _util.PACKAGE_ROOT

# Net holds its root's layer (``scale``) for the whole forward and one block inside it, so it
# needs a window of two layers: sequential with lookahead 0 is tried on ConvNet instead.
POLICIES = [("none", {}), ("component", {}), ("sequential", {"lookahead": 1}),
            ("balanced", {"threshold": 2048}), ("lru", {"threshold": 4096})]

if HAVE_TORCH:
    SAFETENSORS_DTYPES = {
        torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
        torch.int8: "I8", torch.bool: "BOOL",
    }

    def raw(t):
        """A tensor's bytes (without numpy)."""
        t = t.detach().contiguous().cpu()
        return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())

    def write_state(path, state, prefix=""):
        _util.write_safetensors(path, [(prefix + k, SAFETENSORS_DTYPES[v.dtype],
                                        list(v.shape), raw(v)) for k, v in state.items()])

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.fc = nn.Linear(d, d)

        def forward(self, x):
            return x + torch.relu(self.fc(self.norm(x)))

    class Net(nn.Module):
        """Layers in ferry: embed, blocks.0 … blocks.2, head, and scale (a bare parameter,
        served around the root's forward)."""

        def __init__(self, d_in=6, d=8, n=3, d_out=3):
            super().__init__()
            self.embed = nn.Linear(d_in, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(n))
            self.head = nn.Linear(d, d_out)
            self.scale = nn.Parameter(torch.randn(d_out))

        def forward(self, x):
            x = self.embed(x)
            for b in self.blocks:
                x = b(x)
            return self.head(x) * self.scale

    class ConvNet(nn.Module):
        """A conv net with BatchNorm buffers (running stats, an I64 counter of shape [])."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5), nn.ReLU())
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ConvNet()

        def forward(self, x):
            return self.net(x)

    class Tied(nn.Module):
        """An embedding and an output projection sharing one weight; a recursive root."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight
            self.gain = nn.Parameter(torch.randn(8))

        def forward(self, idx, depth=2):
            h = self.emb(idx) * self.gain
            if depth:  # the root (holding `gain`) inside its own forward
                h = h + self(idx, depth - 1)[..., :8]
            return self.out(h)

    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(16, 4))

        def forward(self, n):
            return self.table[:n]  # a view of the weight itself

    class PosNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = Pos()

        def forward(self, n):
            return self.pos(n)

    class Stage(nn.Module):
        """A block whose tensors all sit in a ModuleList (whose forward is never called)."""

        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv1d(3, 3, 1) for _ in range(2))

        def forward(self, x):
            for c in self.convs:
                x = torch.tanh(c(x))
            return x

    class Staged(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(Stage() for _ in range(2))
            # computed at construction, not in the file (like CLIP's position_ids)
            self.register_buffer("offset", torch.arange(3.0).view(1, 3, 1), persistent=False)

        def forward(self, x):
            for s in self.stages:
                x = s(x)
            return x + self.offset

    def fresh(cls, dtype=None):
        """The module built on the meta device (no memory for weights)."""
        with torch.device("meta"):
            mod = cls()
        if dtype is not None:
            mod = mod.to(dtype)
        return mod.eval()

    def seeded(cls, seed, dtype=None):
        torch.manual_seed(seed)
        mod = cls()
        if dtype is not None:
            mod = mod.to(dtype)
        mod.eval()
        # BatchNorm buffers with values of their own (not the 0/1 defaults)
        for m in mod.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
        return mod


def served_names(att):
    return [n for layer in att.layers for n in layer.served]


@unittest.skipUnless(HAVE_TORCH, "needs torch")
class Offline(unittest.TestCase):
    """Without a ferryd."""

    def test_dtypes(self):
        self.assertEqual(ft.torch_dtype("F32"), torch.float32)
        self.assertEqual(ft.torch_dtype("F16"), torch.float16)
        self.assertEqual(ft.torch_dtype("BF16"), torch.bfloat16)
        self.assertEqual(ft.torch_dtype("I64"), torch.int64)
        self.assertEqual(ft.torch_dtype("BOOL"), torch.bool)
        self.assertEqual(ft.torch_dtype("F8_E4M3"), torch.float8_e4m3fn)
        self.assertEqual(ft.torch_dtype("U8"), torch.uint8)
        for packed in ("F4", "F6_E2M3", "NOPE"):
            with self.assertRaises(ft.FerryTorchError) as cm:
                ft.torch_dtype(packed)
            self.assertIn(packed, str(cm.exception))

    def test_name_mapping(self):
        f = ft.name_mapper(prefix="model.", strip="backbone.")
        self.assertEqual(f("backbone.layers.0.weight"), "model.layers.0.weight")
        self.assertIsNone(f("other.weight"))
        self.assertEqual(ft.name_mapper()("a.b"), "a.b")
        g = ft.name_mapper(rename=lambda n: n.upper())
        self.assertEqual(g("a.b"), "A.B")
        with self.assertRaises(ValueError):
            ft.name_mapper(prefix="x.", rename=str)
        self.assertEqual(ft._common_module(["a.b.c", "a.b", "a.b.d.e"]), "a.b")
        self.assertEqual(ft._common_module(["a.b", "c"]), "")
        self.assertEqual(ft._common_module(["blocks.1.fc", "blocks.1.norm"]), "blocks.1")

    def test_cuda_backend_without_cuda_ipc_fails_clearly_before_anything_changes(self):
        received = []
        path = _fake_ferryd(self, "cuda", received)
        net = seeded(Net, 1)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        client = ferry.Client(path, timeout=10)
        self.addCleanup(client.close)
        with self.assertRaises(ft.CudaSharingUnavailable) as cm:
            ft.attach(net, "/models/net.safetensors", client)
        self.assertEqual(str(cm.exception), (
            f"ferryd CUDA sharing not available: ferryd at {path} runs on the CUDA backend "
            "(Fake GPU), but this connection has no CUDA_IPC feature: make the client with "
            "ferry.Client(path, cuda=True) (a session given a socket path does)"))
        self.assertIsInstance(cm.exception, ft.FerryTorchError)
        with self.assertRaises(ft.CudaSharingUnavailable):
            ft.tensor_source(client)
        client.close()
        # Nothing but the handshake and goodbye reached the server; the module is untouched.
        self.assertEqual(received, ["goodbye"])
        for k, v in net.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)

    def test_cuda_backend_that_this_process_cannot_map_fails_before_anything_is_opened(self):
        """A session given a socket path asks for CUDA_IPC itself; without torch CUDA (or,
        where torch has it, without the driver library) it fails before opening anything."""
        os.environ["FERRY_LIBCUDA"] = "/nonexistent/libcuda.so.1"
        self.addCleanup(os.environ.pop, "FERRY_LIBCUDA", None)
        received, hello = [], {}
        path = _fake_ferryd(self, "cuda", received, grant=messages.CUDA_IPC, hello=hello)
        with self.assertRaises(ft.CudaSharingUnavailable) as cm:
            ft.Session("/models/net.safetensors", path)
        self.assertTrue(hello["features"] & messages.CUDA_IPC)
        msg = str(cm.exception)
        self.assertTrue(msg.startswith("ferryd CUDA sharing not available: "), msg)
        if torch.cuda.is_available():
            self.assertIn("cannot load the CUDA driver library /nonexistent/libcuda.so.1", msg)
        else:
            self.assertIn("torch.cuda.is_available() is False", msg)
        self.assertEqual(received, ["goodbye"])
        with self.assertRaises(ValueError):
            ft.Session("/models/net.safetensors", path, cuda_sync="never")

    def test_device_bytes_as_cuda_array_interface(self):
        """What torch.as_tensor is given on CUDA: version 3, bytes, writable as the interface
        goes, no stream to wait on (the lease waited), and the arena kept alive."""
        owner = object()
        b = ft._DeviceBytes(0x7F0000001000, 96, owner)
        self.assertEqual(b.__cuda_array_interface__, {
            "version": 3, "shape": (96,), "typestr": "|u1", "data": (0x7F0000001000, False),
            "strides": None, "stream": None})
        self.assertIs(b.owner, owner)

    def test_bytes_are_viewed_in_every_dtype_without_a_copy(self):
        """The CUDA source's last step, on CPU bytes: the same values as the host path's
        frombuffer, over the same memory."""
        torch.manual_seed(3)
        for name in ft._TORCH_DTYPES:
            try:
                dtype = ft.torch_dtype(name)
            except ft.FerryTorchError:
                continue  # this torch lacks it
            with self.subTest(dtype=name):
                itemsize = torch.empty((), dtype=dtype).element_size()
                for shape in ([2, 3], [], [4, 0, 2], [5]):
                    n = 1
                    for d in shape:
                        n *= d
                    data = bytes(torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8)
                                 .tolist())
                    raw_bytes = torch.tensor(list(data), dtype=torch.uint8)
                    got = ft._typed(raw_bytes, dtype, shape)
                    self.assertEqual((got.dtype, list(got.shape)), (dtype, shape))
                    self.assertEqual(got.data_ptr(), raw_bytes.data_ptr(), "no copy")
                    self.assertEqual(raw(got), data)
                    if n:
                        want = torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
                        self.assertEqual((want.dtype, list(want.shape)), (dtype, shape))
                        self.assertEqual(raw(want), raw(got))

    def test_torch_device_uuids_in_either_form(self):
        """torch gives a _CUuuid: raw bytes, and a str without GPU-; either matches ferryd's
        GPU-... UUID."""
        raw16 = bytes(range(0x10, 0x20))
        uuid = "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"
        NS = types.SimpleNamespace
        self.assertEqual(ft._torch_uuid(NS(uuid=NS(bytes=list(raw16)))), uuid)
        self.assertEqual(ft._torch_uuid(NS(uuid=NS(bytes=raw16))), uuid)

        class StrOnly:
            def __str__(self):
                return uuid[4:]

        got = ft._torch_uuid(NS(uuid=StrOnly()))
        self.assertEqual(got, uuid[4:])
        self.assertEqual(ferry.cuda.normalize_uuid(got), ferry.cuda.normalize_uuid(uuid.upper()))
        self.assertIsNone(ft._torch_uuid(NS()))


@unittest.skipUnless(HAVE_TORCH, "needs torch")
class CudaEventsOffline(unittest.TestCase):
    """ferry.torch's CUDA source through a fake CUDA ferryd and the stand-in libcuda of
    test_cuda.py, without a GPU: torch's CUDA calls (devices, the current stream, its
    synchronisation) are stood in for, and the one step that needs a GPU (a CUDA tensor over
    the mapping, ``_CudaArena._wrap``) is replaced by a CPU copy of the bytes the stand-in's
    memory holds there (``ImportedArena.read``). What is checked for real: which request leases
    a layer, that the current stream waits on ferryd's event (the driver calls) instead of a
    ``wait_ready`` (the frames ferryd sees), and that it is synchronised before each release."""

    W = messages.TensorDesc("fc.weight", "F32", [4, 2], 4096, 32)
    B = messages.TensorDesc("fc.bias", "F32", [4], 8192, 16)

    def setUp(self):
        d = tempfile.mkdtemp(prefix="ferry-fake-cuda-")
        self.addCleanup(shutil.rmtree, d)
        self.lib = test_cuda.load_fake(test_cuda.compile_fake(d))
        self.lib.fake_reset(2, 0)
        lib_path = os.path.join(d, "libfakecuda.so")
        patcher = mock.patch.dict(os.environ, {"FERRY_LIBCUDA": lib_path})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.events = []  # ("wait", stream) / "synchronize" / "device_sync" / "release"
        self.streams_asked = []
        stream = types.SimpleNamespace(cuda_stream=0x5000,
                                       synchronize=lambda: self.events.append("synchronize"))

        def current_stream(device=None):
            self.streams_asked.append(device)
            return stream

        def props(i):
            return types.SimpleNamespace(
                uuid=types.SimpleNamespace(bytes=bytes(0x10 * i + j for j in range(16))))

        def wrap(src, ptr, desc, dtype, shape):
            data = src.arena.read(ptr - src.arena.base, desc.len)
            return torch.frombuffer(bytearray(data), dtype=dtype).view(list(shape))

        for target, value in (
                (ft._CudaArena, {"check": staticmethod(lambda client: None), "_wrap": wrap}),
                (torch.cuda, {"device_count": lambda: 2, "get_device_properties": props,
                              "current_stream": current_stream,
                              "synchronize": lambda d=None: self.events.append("device_sync")})):
            for name, v in value.items():
                p = mock.patch.object(target, name, v)
                p.start()
                self.addCleanup(p.stop)

    def ferryd(self, client_kwargs):
        ids = iter(range(100, 200))

        def script(name, msg):
            if name == "open_model":
                return messages.ModelOpened(1, [messages.ComponentSummary(
                    "net", [messages.LayerSummary("fc", 48, 2)])]), []
            if name == "map_arena":
                return messages.CudaArena(3 << 20, test_cuda.UUID1,
                                          messages.CudaIpc([5] * 64)), []
            leased = messages.Leased(next(ids), "fc", False, [self.W, self.B])
            if name == "acquire":
                return leased, []
            if name == "acquire_event":
                return messages.LeasedEvent(leased, test_cuda.EV_A), []
            if name == "wait_ready":
                return messages.Ready(msg.lease), []
            return messages.Ack(), []

        path, received = test_cuda.fake_cuda_ferryd(self, script, {})
        client = ferry.Client(path, timeout=10, **client_kwargs)
        self.addCleanup(client.close)
        release = client.release

        def recording_release(model, lease):
            self.events.append("release")
            return release(model, lease)

        client.release = recording_release
        return client, received

    def forward_twice(self, client, **kwargs):
        """Two forwards of a Linear served from the fake ferryd; each time the weight and bias
        seen inside the forward are the stand-in's bytes at their offsets."""

        class Fc(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 4)

            def forward(self, x):
                return self.fc(x)

        mod = fresh(Fc)
        seen = []
        with ft.attach(mod, "/models/fc.safetensors", client, **kwargs) as att:
            # Registered after ferry's pre-hook, so it runs once the layer is served.
            mod.fc.register_forward_pre_hook(
                lambda m, args: seen.append((raw(m.weight), raw(m.bias), m.weight.clone(),
                                             m.bias.clone())))
            self.assertIsInstance(att.session._source, ft._CudaArena)
            self.assertEqual(att.session._source.device, torch.device("cuda", 1))
            x = torch.arange(6.0).view(3, 2)
            self.lib.fake_clear_log()
            self.events.clear()
            for _ in range(2):
                with torch.no_grad():
                    y = mod(x)
                w, b = seen[-1][2:]
                torch.testing.assert_close(y, nn.functional.linear(x, w, b), rtol=0, atol=0,
                                           equal_nan=True)
        for wb, bb, _, _ in seen:
            self.assertEqual(wb, test_cuda.pattern(4096, 32))
            self.assertEqual(bb, test_cuda.pattern(8192, 16))
        self.assertEqual(len(seen), 2)
        self.assertTrue(all(p.is_meta for p in mod.parameters()), "placeholders again")
        return [c for c in self.lib.fake_log().decode().splitlines()
                if c.startswith(("cuIpcOpenEvent", "cuStreamWait", "cuEventSync",
                                 "cuStreamSynchronize"))]

    def test_the_current_stream_waits_on_ferryds_event_instead_of_wait_ready(self):
        client, received = self.ferryd({"cuda": True})
        self.assertTrue(client.features & messages.CUDA_EVENTS)
        waits = self.forward_twice(client)
        self.assertEqual(waits, [
            f"cuIpcOpenEventHandle({test_cuda.EV_A.hex()}, dev=1)",
            "cuStreamWaitEvent(0x5000, ev#0, 0, dev=1)",
            "cuStreamWaitEvent(0x5000, ev#0, 0, dev=1)",  # the second lease: opened once
        ], "no cuStreamSynchronize: torch synchronised the stream and told the lease")
        self.assertEqual(self.events, ["synchronize", "release"] * 2,
                         "the stream is synchronised before each release")
        self.assertEqual(set(self.streams_asked), {torch.device("cuda", 1)})
        self.assertEqual(received, [
            "open_model", "map_arena", "set_residency", "acquire", "release",  # attach
            "acquire_event", "release", "acquire_event", "release",  # two forwards
            "close_model",
        ])
        self.assertNotIn("wait_ready", received)

    def test_events_this_process_cannot_use_fall_back_to_plain_acquires(self):
        """ferryd's event cannot be opened here (another IPC namespace): the first layer is
        waited for with wait_ready, one warning is logged, and later layers are leased with a
        plain acquire (and waited for on the host), never trying the driver again."""
        client, received = self.ferryd({"cuda": True})
        self.lib.fake_fail(b"cuIpcOpenEventHandle", 400)
        with self.assertLogs("ferry.cuda", "WARNING") as logs:
            waits = self.forward_twice(client)
        self.assertEqual(len(logs.records), 1)
        self.assertIn("cuIpcOpenEventHandle failed", logs.records[0].getMessage())
        self.assertEqual(waits, [f"cuIpcOpenEventHandle({test_cuda.EV_A.hex()}, dev=1)"],
                         "tried once")
        self.assertEqual(received[5:], [
            "acquire_event", "wait_ready", "release",  # the failed event, then the host wait
            "acquire", "wait_ready", "release",  # events off for this arena
            "close_model",
        ])
        self.assertEqual(self.events, ["synchronize", "release"] * 2)
        self.assertTrue(client.map_arena().events_broken)

    def test_without_events_or_with_device_sync_the_host_waits(self):
        for kwargs, sync in (({"features": messages.DEFAULT_FEATURES | messages.CUDA_IPC},
                              "stream"),
                             ({"cuda": True, "events": False}, "stream"),
                             ({"cuda": True}, "device")):
            with self.subTest(client=kwargs, cuda_sync=sync):
                client, received = self.ferryd(kwargs)
                self.assertEqual(bool(client.features & messages.CUDA_EVENTS),
                                 kwargs.get("events", "cuda" in kwargs))
                waits = self.forward_twice(client, cuda_sync=sync)
                self.assertEqual(waits, [], "no event")
                settle = "synchronize" if sync == "stream" else "device_sync"
                self.assertEqual(self.events, [settle, "release"] * 2)
                self.assertEqual(received[5:], ["acquire", "wait_ready", "release"] * 2
                                 + ["close_model"])
                self.lib.fake_clear_log()
                client.close()
                self.assertEqual(self.lib.fake_log().decode().splitlines()[:3], [
                    "cuCtxPushCurrent_v2(0x1001)", "cuCtxSynchronize(dev=1)",
                    "cuCtxPopCurrent_v2"], "settled before goodbye, then unmapped")
                self.assertTrue(self.lib.fake_state().decode().startswith("depth=0 retains=0"))


def _fake_ferryd(test, backend, received, grant=0, hello=None):
    """A server that completes the handshake with the given backend (granting OPEN_PATH, LORA
    and ``grant``) and records requests (and in ``hello`` the features asked for)."""
    path, listener = _util.fake_listener(test)

    recv = _util.recv_all
    frame = _util.frame

    def run():
        conn, _ = listener.accept()
        with conn:
            head = wire.unpack_header(recv(conn, wire.HEADER_LEN))
            got = wire.decode(messages.Hello, recv(conn, head.body_len))
            if hello is not None:
                hello["features"] = got.features
            conn.sendall(frame(messages.Welcome(
                1, messages.OPEN_PATH | messages.LORA | grant, 3, "fake", wire.MAX_BODY_LEN, 16,
                messages.DeviceSummary(backend, "Fake GPU", "GPU-0", 1 << 30, 1 << 29)),
                head.request_id))
            try:
                while True:
                    head = wire.unpack_header(recv(conn, wire.HEADER_LEN))
                    recv(conn, head.body_len)
                    received.append(messages.BY_KIND[head.kind].NAME)
                    conn.sendall(frame(messages.Ack(), head.request_id))
            except (EOFError, OSError):
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    test.addCleanup(t.join, 10)
    return path


@unittest.skipUnless(LIVE, "needs torch, FERRY_SOCKET and FERRY_MODEL_ROOT")
class Live(unittest.TestCase):
    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=60)
        self.addCleanup(self.client.close)
        self.dir = tempfile.mkdtemp(prefix="torch-", dir=ROOT)
        self.addCleanup(shutil.rmtree, self.dir)

    def save(self, module, name="net", prefix="", extra=()):
        path = os.path.join(self.dir, name + ".safetensors")
        state = module.state_dict()
        tensors = [(prefix + k, SAFETENSORS_DTYPES[v.dtype], list(v.shape), raw(v))
                   for k, v in state.items()]
        _util.write_safetensors(path, tensors + list(extra))
        return path

    def my_leases(self):
        return [c for c in self.client.list_clients() if c.id == self.client.client_id][0].leases

    def assert_placeholders(self, module, names, device="meta"):
        params = dict(module.named_parameters(remove_duplicate=False))
        params.update(dict(module.named_buffers(remove_duplicate=False)))
        for n in names:
            self.assertEqual(params[n].device.type, device, n)

    def test_output_equals_without_ferry_in_every_policy(self):
        net = seeded(Net, 1)
        x = torch.randn(5, 6)
        with torch.no_grad():
            want = net(x)
        path = self.save(net)
        for policy, kw in POLICIES:
            with self.subTest(policy=policy, **kw):
                mod = fresh(Net)
                with ft.attach(mod, path, self.client, policy=policy, **kw) as att:
                    self.assertEqual(
                        [layer.name for layer in att.layers],
                        [c.name for c in att.session.opened.components[0].layers])
                    self.assertEqual(sorted(att.hooked),
                                     ["", "blocks.0", "blocks.1", "blocks.2", "embed", "head"])
                    self.assertEqual(sorted(served_names(att)), sorted(net.state_dict()))
                    self.assertEqual(att.unserved, [])
                    for _ in range(2):
                        with torch.no_grad():
                            got = mod(x)
                        self.assertTrue(torch.equal(got, want), f"{got}\n{want}")
                        self.assertEqual(self.my_leases(), 0)
                        self.assert_placeholders(mod, net.state_dict())
                    with torch.inference_mode():
                        self.assertTrue(torch.equal(mod(x), want))
                infos = [i for i in self.client.list_models() if i.path == path]
                self.assertEqual(infos, [], "the session closed the model")

    def test_device_choice(self):
        """``device=`` (index or UUID) opens the model on that ferryd device (the suite's
        ferryd has two): the weights are zero-copy views of that device's arena and the output
        is exact; an already opened model keeps its device."""
        net = seeded(Net, 4)
        x = torch.randn(3, 6)
        with torch.no_grad():
            want = net(x)
        path = self.save(net)
        for device in (1, "HOST-0001", None):
            with self.subTest(device=device):
                mod = fresh(Net)
                with ft.attach(mod, path, self.client, device=device) as att:
                    session = att.session
                    index = 0 if device is None else 1
                    self.assertEqual(session.opened.device, index)
                    self.assertEqual(session.model >> 48, index)
                    src = session._source
                    if device is None:
                        self.assertIs(src.arena, self.client.map_arena())
                    else:
                        self.assertIs(src.arena, self.client.map_arena(1))
                    seen = {}
                    mod.blocks[0].register_forward_pre_hook(
                        lambda m, a: seen.update(own=src.owns(m.fc.weight)))
                    with torch.no_grad():
                        self.assertTrue(torch.equal(mod(x), want))
                    self.assertTrue(seen["own"], "a view of the model's device's arena")
                    self.assertEqual(self.my_leases(), 0)
        opened = self.client.open_model(path, device=1)
        self.addCleanup(self.client.close_model, opened.model)
        mod = fresh(Net)
        with ft.attach(mod, opened, self.client, device=1) as att:
            self.assertIs(att.session._source.arena, self.client.map_arena(1))
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))
        with self.assertRaises(ft.FerryTorchError) as cm:
            ft.attach(fresh(Net), opened, self.client, device=0)
        self.assertIn("already open on device 1", str(cm.exception))
        with self.assertRaises(ferry.UnknownDevice):
            ft.attach(fresh(Net), path, self.client, device=9)
        infos = [i for i in self.client.list_models() if i.path == path]
        self.assertEqual([i.model for i in infos], [opened.model],
                         "sessions closed the models they opened")

    def test_half_precision(self):
        for dtype in (torch.bfloat16, torch.float16):
            with self.subTest(dtype=dtype):
                net = seeded(Net, 2, dtype)
                x = torch.randn(4, 6, dtype=dtype)
                with torch.no_grad():
                    want = net(x)
                path = self.save(net, name=str(dtype).split(".")[-1])
                mod = fresh(Net, dtype)
                seen = []
                with ft.attach(mod, path, self.client) as att:
                    self.assertEqual({s.desc.dtype for layer in att.layers
                                      for s in layer.served.values()},
                                     {SAFETENSORS_DTYPES[dtype]})
                    mod.blocks[1].register_forward_pre_hook(
                        lambda m, a: seen.append(m.fc.weight.dtype))
                    with torch.no_grad():
                        got = mod(x)
                self.assertEqual(got.dtype, dtype)
                self.assertTrue(torch.equal(got, want))
                self.assertEqual(seen, [dtype])

    def test_parameters_are_zero_copy_views_of_the_arena(self):
        net = seeded(Net, 3)
        path = self.save(net)
        mod = fresh(Net)
        with ft.attach(mod, path, self.client, policy="none") as att:
            src = att.session._source
            seen = {}

            def look(m, args):
                w = m.fc.weight
                seen["ptr"] = w.data_ptr()
                seen["values"] = w.clone()
                seen["requires_grad"] = w.requires_grad
                seen["param"] = isinstance(w, nn.Parameter)
                seen["in_arena"] = src.owns(w)

            mod.blocks[1].register_forward_pre_hook(look)
            with torch.no_grad():
                mod(torch.randn(2, 6))
            self.assertTrue(seen["in_arena"])
            self.assertTrue(src.base <= seen["ptr"] < src.end)
            self.assertTrue(torch.equal(seen["values"], net.blocks[1].fc.weight))
            self.assertFalse(seen["requires_grad"])
            self.assertTrue(seen["param"])
            self.assertTrue(mod.blocks[1].fc.weight.is_meta, "replaced after the forward")
            # The arena holds the file's bytes exactly at that address.
            lease = self.client.acquire(att.session.serving, "model",
                                        att.layers[[l.name for l in att.layers]
                                                   .index("blocks.1")].index)
            with lease:
                t = lease.tensor("blocks.1.fc.weight")
                self.assertEqual(bytes(lease.view(t)), raw(net.blocks[1].fc.weight))
                self.assertEqual(src.base + t.arena_offset, seen["ptr"])

    def test_buffers_prefix_and_strip(self):
        net = seeded(ConvNet, 4)
        x = torch.randn(2, 3, 7, 7)
        with torch.no_grad():
            want = net(x)
        # ferry's names carry a prefix the module lacks, and the file has a foreign tensor.
        foreign = ("other.weight", "F32", [2], raw(torch.ones(2)))
        path = self.save(net, prefix="backbone.", extra=[foreign])
        mod = fresh(ConvNet)
        with ft.attach(mod, path, self.client, strip="backbone.", policy="sequential",
                       lookahead=0) as att:
            self.assertEqual(att.foreign, ["other.weight"])
            self.assertIn("backbone.features.1.num_batches_tracked", served_names(att))
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))
            self.assert_placeholders(mod, net.state_dict())
            # BatchNorm in training mode would write into ferry's memory: refused, released.
            mod.train()
            with self.assertRaises(ft.FerryTorchError) as cm:
                with torch.no_grad():
                    mod(x)
            self.assertIn("eval()", str(cm.exception))
            self.assertEqual(self.my_leases(), 0)
            mod.eval()
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))
        # The module's names carry a prefix the file lacks.
        path = self.save(net, name="plain")
        wrapped = fresh(Wrapper)
        with ft.attach(wrapped, path, self.client, prefix="net.",
                       placeholder="cpu") as att:
            with torch.no_grad():
                self.assertTrue(torch.equal(wrapped(x), want))
            w = wrapped.net.features[0].weight
            self.assertEqual(w.device.type, "cpu")
            self.assertEqual(list(w.shape), [4, 3, 3, 3])
            self.assertEqual(w.stride(), (0, 0, 0, 0), "one element, no copy of the weight")
            self.assertFalse(att.session._source.owns(w))

    def test_layers_in_containers_and_buffers_the_file_lacks(self):
        net = seeded(Staged, 12)
        x = torch.randn(2, 3, 4)
        with torch.no_grad():
            want = net(x)
        path = self.save(net)
        # Built on the meta device, the module's `offset` is meta too: refused, untouched.
        with torch.device("meta"):
            meta = Staged().eval()
        with self.assertRaises(ft.FerryTorchError) as cm:
            ft.attach(meta, path, self.client)
        self.assertIn("['offset']", str(cm.exception))
        self.assertIn("empty_weights", str(cm.exception))
        self.assertEqual(self.my_leases(), 0)
        register = nn.Module.register_parameter
        with ft.empty_weights():
            mod = Staged().eval()
        self.assertIs(nn.Module.register_parameter, register, "restored")
        self.assertTrue(mod.stages[0].convs[0].weight.is_meta)
        self.assertFalse(mod.offset.is_meta)
        self.assertIsInstance(mod.stages[0].convs[0].weight, nn.Parameter)
        with ft.attach(mod, path, self.client) as att:
            self.assertEqual(sorted(att.hooked), ["stages.0", "stages.1"])
            self.assertEqual(att.unserved, ["offset"])
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))
        plain = nn.Linear(2, 2)  # outside the context: real parameters again
        self.assertFalse(plain.weight.is_meta)

    def test_tied_weights_and_reentry(self):
        net = seeded(Tied, 5)
        idx = torch.tensor([[1, 2, 3], [4, 5, 9]])
        with torch.no_grad():
            want = net(idx)
        state = net.state_dict()
        del state["out.weight"]  # safetensors holds a shared tensor once
        path = os.path.join(self.dir, "tied.safetensors")
        write_state(path, state)
        mod = fresh(Tied)
        calls = []
        acquire = self.client.acquire

        def counting(model, component, layer):
            lease = acquire(model, component, layer)
            calls.append(lease.layer)
            return lease

        self.client.acquire = counting
        self.addCleanup(setattr, self.client, "acquire", acquire)
        with ft.attach(mod, path, self.client, policy="none") as att:
            self.assertEqual(sorted(att.hooked), ["", "emb", "out"])
            self.assertIs(mod.emb.weight, mod.out.weight)
            calls.clear()
            with torch.no_grad():
                got = mod(idx)
            self.assertTrue(torch.equal(got, want))
            # gain: acquired once for the three nested root calls; emb/out once per call.
            self.assertEqual(calls.count("gain"), 1)
            self.assertEqual(calls.count("emb"), 6)
            self.assertTrue(mod.out.weight.is_meta and mod.emb.weight.is_meta)
            self.assertEqual(self.my_leases(), 0)

    def test_an_output_aliasing_a_weight_is_cloned(self):
        net = seeded(PosNet, 6)
        path = self.save(net)
        mod = fresh(PosNet)
        with ft.attach(mod, path, self.client) as att:
            with torch.no_grad():
                got = mod(5)
            self.assertFalse(att.session._source.owns(got))
            self.assertTrue(torch.equal(got, net.pos.table[:5]))
            self.assertEqual(self.my_leases(), 0)

    def test_misfits_are_typed_errors_and_leave_the_module_alone(self):
        net = seeded(Net, 7)
        path = self.save(net)
        other = seeded(lambda: Net(d=10), 7)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with self.assertRaises(ft.FerryTorchError) as cm:
            ft.attach(other, path, self.client)
        self.assertIn("blocks.0.fc.weight -> blocks.0.fc.weight: ferry's shape [8, 8], the "
                      "module's [10, 10]", str(cm.exception))
        for k, v in other.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)
        with self.assertRaises(ft.FerryTorchError) as cm:
            ft.attach(fresh(Net, torch.bfloat16), path, self.client)
        self.assertIn("ferry's dtype F32 (torch.float32), the module's torch.bfloat16",
                      str(cm.exception))
        mod = fresh(Net)
        del mod.head  # the file's head.* tensors have no parameter now
        with self.assertRaises(ft.FerryTorchError) as cm:
            ft.attach(mod, path, self.client)
        self.assertIn("head.weight -> head.weight: no such parameter or buffer",
                      str(cm.exception))
        mod.extra = nn.Linear(2, 2)  # not in the file: keeps its own weights
        with ft.attach(mod, path, self.client, strict=False) as att:
            self.assertEqual(sorted(att.missing), ["head.bias", "head.weight"])
            self.assertEqual(sorted(att.unserved), ["extra.bias", "extra.weight"])
            self.assertFalse(mod.extra.weight.is_meta)
        with self.assertRaises(ft.FerryTorchError) as cm:
            ft.attach(fresh(Net), path, self.client, component="unet")
        self.assertIn("no component 'unet'", str(cm.exception))
        self.assertEqual(self.my_leases(), 0)
        self.assertEqual([i for i in self.client.list_models() if i.path == path], [])

    def attach_settling(self, mod, path, events, fail=False):
        """``attach`` whose source also has ``before_release`` (as the CUDA source has: it
        synchronises the GPU), recording ``settle`` with the leases then held, and every
        ``release`` the session sends."""
        att = ft.attach(mod, path, self.client, policy="sequential")
        test, inner = self, att.session._source

        class Settling:
            def tensor(self, *args):
                return inner.tensor(*args)

            def owns(self, t):
                return inner.owns(t)

            def before_release(self):
                events.append(("settle", test.my_leases()))
                if fail:
                    raise RuntimeError("an illegal memory access was encountered")

        att.session._source = Settling()
        release = self.client.release

        def recording_release(model, lease):
            events.append(("release", None))
            return release(model, lease)

        self.client.release = recording_release
        self.addCleanup(vars(self.client).pop, "release", None)
        return att

    def test_the_gpu_is_settled_before_every_release(self):
        """The ordering rule of a CUDA ferryd, checked with a source that records it: the
        source's before_release runs after the forward, while its layers are still leased, and
        before any of them is released."""
        net = seeded(Net, 13)
        x = torch.randn(4, 6)
        with torch.no_grad():
            want = net(x)
        path = self.save(net)
        events = []
        mod = fresh(Net)
        with self.attach_settling(mod, path, events):
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))
        # Collapsed runs: settle, release, settle, release, ... (one settle per group).
        runs = [e[0] for i, e in enumerate(events) if i == 0 or events[i - 1][0] != e[0]]
        self.assertEqual(runs, ["settle", "release"] * (len(runs) // 2), events)
        self.assertEqual(sum(1 for e in events if e[0] == "release"), 6, "six layers")
        self.assertTrue(all(held > 0 for kind, held in events if kind == "settle"), events)
        self.assertEqual(self.my_leases(), 0)

    def test_a_failed_settle_keeps_the_leases(self):
        """If synchronising fails (a broken CUDA context), nothing is released: the GPU may
        still be reading; ferryd gets the leases back when the client disconnects."""
        net = seeded(Net, 14)
        path = self.save(net)
        events = []
        mod = fresh(Net)
        with self.attach_settling(mod, path, events, fail=True) as att:
            with self.assertRaises(ft.FerryTorchError) as cm:
                with torch.no_grad():
                    mod(torch.randn(2, 6))
            self.assertIn("synchronising the GPU before releasing layers ['embed'] failed "
                          "(an illegal memory access was encountered); their leases stay held "
                          "until this client disconnects", str(cm.exception))
            # embed's, then the root's (scale, held around the whole forward): both kept.
            self.assertEqual([e[0] for e in events], ["settle", "settle"])
            self.assertEqual(self.my_leases(), 2)
            self.assertEqual([layer.depth for layer in att.layers], [0] * len(att.layers))
            self.assert_placeholders(mod, net.state_dict())
        self.assertEqual(self.my_leases(), 2, "held until the client goes")

    def test_cuda_placeholders_need_a_cuda_ferryd(self):
        net = seeded(Net, 9)
        path = self.save(net)
        mod = fresh(Net)
        with ft.Session(path, self.client) as session:
            with self.assertRaises(ft.FerryTorchError) as cm:
                session.attach(mod, placeholder="cuda")
            self.assertIn("placeholder='cuda' is for a CUDA ferryd", str(cm.exception))
            with self.assertRaises(ValueError):
                session.attach(mod, placeholder="gpu")
            self.assertTrue(all(p.is_meta for p in mod.parameters()), "left alone")
        self.assertEqual(self.my_leases(), 0)

    def test_a_failing_forward_releases_its_layers(self):
        net = seeded(Net, 8)
        x = torch.randn(3, 6)
        with torch.no_grad():
            want = net(x)
        path = self.save(net)
        mod = fresh(Net)
        with ft.attach(mod, path, self.client) as att:
            def boom(m, args):
                raise RuntimeError("boom")

            h = mod.blocks[1].fc.register_forward_pre_hook(boom)
            with self.assertRaises(RuntimeError):
                with torch.no_grad():
                    mod(x)
            self.assertEqual(self.my_leases(), 0)
            self.assertEqual([layer.depth for layer in att.layers], [0] * len(att.layers))
            self.assert_placeholders(mod, net.state_dict())
            h.remove()
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))
            # An acquire the server refuses (the model is gone) is a typed error, released.
            att.session.client.close_model(att.session.model)
            with self.assertRaises(ferry.UnknownModel):
                with torch.no_grad():
                    mod(x)
            self.assertEqual(self.my_leases(), 0)
            att.session._owns_model = False

    def test_lora_stack(self):
        # Values exactly representable, so that the fused weights are exact in f32.
        net = Net()
        with torch.no_grad():
            g = torch.Generator().manual_seed(9)
            for p in net.parameters():
                p.copy_(torch.randint(-8, 9, p.shape, generator=g).float() / 4)
        x = torch.randint(-4, 5, (3, 6), generator=g).float() / 2
        with torch.no_grad():
            want_base = net(x)
        path = self.save(net)
        up = torch.randint(-2, 3, (8, 2), generator=g).float() / 2
        down = torch.randint(-2, 3, (2, 8), generator=g).float() / 2
        up_h = torch.randint(-2, 3, (3, 1), generator=g).float() / 2
        down_h = torch.randint(-2, 3, (1, 8), generator=g).float() / 2
        lora = os.path.join(self.dir, "lora.safetensors")
        _util.write_safetensors(lora, [
            ("lora_unet_blocks_1_fc.lora_up.weight", "F32", [8, 2], raw(up)),
            ("lora_unet_blocks_1_fc.lora_down.weight", "F32", [2, 8], raw(down)),
            ("lora_unet_blocks_1_fc.alpha", "F32", [], raw(torch.tensor(1.0))),
            ("lora_unet_head.lora_up.weight", "F32", [3, 1], raw(up_h)),
            ("lora_unet_head.lora_down.weight", "F32", [1, 8], raw(down_h)),
        ])
        strength = 0.5
        fused = seeded(Net, 0)
        fused.load_state_dict(net.state_dict())
        with torch.no_grad():
            fused.blocks[1].fc.weight += strength * (1.0 / 2) * (up @ down)  # alpha/rank
            fused.head.weight += strength * (up_h @ down_h)  # no alpha: alpha = rank
            want = fused(x)
        self.assertFalse(torch.equal(want, want_base))
        for mode in ("backup", "fuse"):
            with self.subTest(mode=mode):
                mod = fresh(Net)
                with ft.attach(mod, path, self.client, loras=[(lora, strength)],
                               lora_mode=mode) as att:
                    s = att.session
                    self.assertIsNotNone(s.view)
                    self.assertEqual(s.lora_report.merged, 2)
                    self.assertEqual(s.lora_report.loras[0].unmatched, [])
                    with torch.no_grad():
                        self.assertTrue(torch.equal(mod(x), want))
                    s.set_loras([])  # back to the model itself
                    self.assertIsNone(s.view)
                    with torch.no_grad():
                        self.assertTrue(torch.equal(mod(x), want_base))
                    s.set_loras([(lora, strength)], mode)
                    with torch.no_grad():
                        self.assertTrue(torch.equal(mod(x), want))
                self.assertEqual(self.my_leases(), 0)

    def test_pipeline_components(self):
        # A diffusers-style folder: one ferry model, one component per sub-folder.
        unet, te = seeded(Net, 10), seeded(ConvNet, 11)
        x = torch.randn(2, 3, 5, 5)
        with torch.no_grad():
            cond = te(x)
            want = unet(torch.cat([cond, cond, cond], dim=1))
        folder = os.path.join(self.dir, "pipe")
        for sub in ("unet", "text_encoder", "scheduler"):
            os.makedirs(os.path.join(folder, sub))
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump({"_class_name": "TinyPipeline", "unet": ["diffusers", "Net"],
                       "text_encoder": ["transformers", "ConvNet"],
                       "scheduler": ["diffusers", "DDIMScheduler"]}, f)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
            f.write("{}")
        write_state(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"),
                    unet.state_dict())
        write_state(os.path.join(folder, "text_encoder", "model.safetensors"), te.state_dict())

        def run(pipe):
            c = pipe.text_encoder(x)
            return pipe.unet(torch.cat([c, c, c], dim=1))

        for policy, kw in POLICIES:
            with self.subTest(policy=policy, **kw):
                pipe = types.SimpleNamespace(unet=fresh(Net), text_encoder=fresh(ConvNet),
                                             scheduler=object())
                with ft.attach_pipeline(pipe, folder, self.client, policy=policy,
                                        **kw) as session:
                    self.assertEqual(sorted(a.component for a in session.attachments),
                                     ["text_encoder", "unet"])
                    self.assertEqual(next(pipe.unet.parameters()).device.type, "cpu")
                    for _ in range(2):
                        with torch.no_grad():
                            self.assertTrue(torch.equal(run(pipe), want))
                    self.assertEqual(self.my_leases(), 0)
        pipe = types.SimpleNamespace(unet=fresh(Net))
        with ft.attach_pipeline(pipe, folder, self.client, policy="sequential",
                                component_policies={"text_encoder": "none"}) as session:
            self.assertEqual([a.component for a in session.attachments], ["unet"])
        with self.assertRaises(ft.FerryTorchError):
            ft.attach_pipeline(pipe, folder, self.client, components=["vae"])


if __name__ == "__main__":
    unittest.main()
