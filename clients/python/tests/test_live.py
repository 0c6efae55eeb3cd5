"""The client against a real ferryd. Runs when FERRY_SOCKET, FERRY_MODEL and FERRY_EXPECTED
are set (tests/python_client.rs sets them):

* FERRY_SOCKET: ferryd's socket;
* FERRY_MODEL: a model under ferryd's model root;
* FERRY_EXPECTED: a JSON file ``{"tensors": {"<tensor name in the file>": "<hex bytes>"}}``
  with every tensor of the model;
* FERRY_SHUTDOWN_MARKER (only for ``LiveShutdown``): a file this test creates once it is
  connected; whoever runs it then stops ferryd, and the test expects ConnectionLost.

``FakeServer`` needs no ferryd: a socket server in a thread that completes the handshake and
then goes away.
"""

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import unittest

import _util  # puts the package on sys.path
import ferry
from ferry import errors, messages, wire

SOCKET = os.environ.get("FERRY_SOCKET")
MODEL = os.environ.get("FERRY_MODEL")
EXPECTED = os.environ.get("FERRY_EXPECTED")
LIVE = bool(SOCKET and MODEL and EXPECTED)
assert _util.PACKAGE_ROOT


def expected_tensors():
    return _util.expected_tensors(EXPECTED)


find_expected = _util.find_expected


@unittest.skipUnless(LIVE, "set FERRY_SOCKET, FERRY_MODEL and FERRY_EXPECTED to run")
class Live(unittest.TestCase):
    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=30)
        self.addCleanup(self.client.close)

    def test_handshake(self):
        c = self.client
        self.assertEqual(c.version, 1)
        self.assertEqual(c.welcome.version, 1)
        want = messages.OPEN_PATH | messages.HOST_ARENA
        self.assertEqual(c.features & want, want, f"features {c.features:#x}")
        self.assertEqual(c.features & ~messages.KNOWN_FEATURES, 0)
        self.assertEqual(c.device.backend, "host")
        self.assertEqual(c.welcome.max_body_len, wire.MAX_BODY_LEN)
        me = [x for x in c.list_clients() if x.id == c.client_id]
        self.assertEqual(len(me), 1)
        self.assertEqual(me[0].name, "ferry-python 0.1")
        self.assertEqual(me[0].pid, os.getpid())

    def test_a_host_ferryd_grants_no_cuda_events(self):
        """cuda=True asks for CUDA_IPC and CUDA_EVENTS; a host ferryd grants neither, so
        acquire_event is Unsupported (not fatal) and nothing stays leased."""
        with ferry.Client(SOCKET, timeout=30, cuda=True) as c:
            self.assertEqual(c.features & (messages.CUDA_IPC | messages.CUDA_EVENTS), 0)
            model = c.open_model(MODEL)
            comp = model.components[0]
            with self.assertRaises(ferry.Unsupported) as cm:
                c.acquire_event(model.model, comp.name, 0)
            self.assertIn("acquire_event needs a feature that was not agreed", str(cm.exception))
            self.assertFalse(c.closed)
            me = [x for x in c.list_clients() if x.id == c.client_id]
            self.assertEqual(me[0].leases, 0)
            with c.acquire(model.model, comp.name, 0) as lease:
                with self.assertRaises(ferry.MemoryKindError):
                    lease.wait_on_stream(0)

    def test_every_layer_reads_the_exact_bytes(self):
        c = self.client
        expected = expected_tensors()
        model = c.open_model(MODEL)
        self.assertGreater(len(model.components), 0)
        seen = set()
        acquired = 0
        for comp in model.components:
            for i, layer in enumerate(comp.layers):
                if i + 1 < len(comp.layers):
                    c.prefetch(model.model, comp.name, i + 1)
                with c.acquire(model.model, comp.name, i) as lease:
                    acquired += 1
                    self.assertTrue(lease.ready)
                    self.assertEqual(lease.layer, layer.name)
                    self.assertEqual(len(lease.tensors), layer.tensors)
                    self.assertEqual(sum(t.len for t in lease.tensors), layer.bytes)
                    for t in lease.tensors:
                        key = find_expected(expected, comp.name, t.name)
                        self.assertNotIn(key, seen)
                        seen.add(key)
                        self.assertEqual(t.len, len(expected[key]))
                        self.assertEqual(bytes(lease.view(t)), expected[key], key)
                    mine = [x for x in c.list_clients() if x.id == c.client_id][0]
                    self.assertEqual(mine.leases, 1)
                self.assertTrue(lease.released)
        self.assertEqual(seen, set(expected), "every tensor of the model was read")
        mine = [x for x in c.list_clients() if x.id == c.client_id][0]
        self.assertEqual(mine.leases, 0, "the context manager released every lease")
        self.assertGreaterEqual(c.stats().acquires, acquired)
        infos = [m for m in c.list_models() if m.model == model.model]
        self.assertEqual(len(infos), 1)
        self.assertEqual(infos[0].path, MODEL)
        arena = c.map_arena()
        self.assertIs(arena, c.map_arena(), "mapped once")
        self.assertEqual(arena.backend, "host")
        with self.assertRaises(TypeError):  # read-only mapping
            arena.view[0:1] = b"x"

    def test_numpy_view_when_available(self):
        try:
            import numpy as np
        except ImportError:
            return
        c = self.client
        model = c.open_model(MODEL)
        comp = model.components[0]
        with c.acquire(model.model, comp.name, 0) as lease:
            t = lease.tensors[0]
            a = lease.array(t)
            self.assertEqual(a.nbytes, t.len)
            self.assertEqual(a.tobytes(), bytes(lease.view(t)))
            self.assertIsInstance(a, np.ndarray)

    def test_errors_are_typed_and_the_connection_survives(self):
        c = self.client
        model = c.open_model(MODEL)
        comp = model.components[0]
        with self.assertRaises(ferry.UnknownModel) as cm:
            c.acquire(987654, comp.name, 0)
        self.assertEqual(cm.exception.code, 205)
        self.assertTrue(cm.exception.message)
        with self.assertRaises(ferry.UnknownComponent):
            c.acquire(model.model, "no-such-component", 0)
        with self.assertRaises(ferry.UnknownLayer):
            c.acquire(model.model, comp.name, len(comp.layers) + 10)
        with self.assertRaises(ferry.UnknownLease):
            c.wait_ready(123456)
        outside = tempfile.mkdtemp(prefix="ferry-outside-")
        self.addCleanup(shutil.rmtree, outside)
        elsewhere = os.path.join(outside, "m.safetensors")
        shard = MODEL if MODEL.endswith(".safetensors") else None
        if shard is None:  # a sharded index: copy one of its shards
            d = os.path.dirname(MODEL)
            shard = os.path.join(d, sorted(f for f in os.listdir(d)
                                           if f.endswith(".safetensors"))[0])
        shutil.copy(shard, elsewhere)
        with self.assertRaises(ferry.NotPermitted) as cm:
            c.open_model(elsewhere)
        self.assertEqual(cm.exception.code, 202)
        with self.assertRaises(ferry.NotFound):  # under the root, but missing
            c.open_model(os.path.join(os.path.dirname(MODEL), "missing.safetensors"))
        self.assertFalse(c.closed)
        self.assertIsInstance(c.stats(), messages.StatsReply)

    def test_lease_context_manager_releases_on_error(self):
        c = self.client
        model = c.open_model(MODEL)
        comp = model.components[-1]
        with self.assertRaises(RuntimeError):
            with c.acquire(model.model, comp.name, 0) as lease:
                raise RuntimeError("boom")
        self.assertTrue(lease.released)
        with self.assertRaises(ferry.UnknownLease):
            c.release(model.model, lease.id)
        lease2 = c.acquire(model.model, comp.name, 0)
        with self.assertRaises(ferry.Busy):  # a layer of the model is leased
            c.set_residency(model.model, "sequential", lookahead=1)
        lease2.release()
        with self.assertRaises(ferry.UnknownLease):
            lease2.view(lease2.tensors[0])
        c.set_residency(model.model, "sequential", lookahead=1)
        c.set_residency(model.model, "none")
        with self.assertRaises(errors.BadRequest):
            c.set_residency(model.model, "balanced", threshold=1.5)

    def test_offload_and_onload(self):
        """The model goes off the device (its reservation too) and comes back with exact bytes;
        a held lease makes the offload ``Busy`` and changes nothing."""
        c = self.client
        expected = expected_tensors()
        model = c.open_model(MODEL)
        c.set_residency(model.model, "none")
        total = sum(l.bytes for comp in model.components for l in comp.layers)
        layers = sum(len(comp.layers) for comp in model.components)

        def resident():
            return [m for m in c.list_models() if m.model == model.model][0].resident_layers

        def read_all():
            for comp in model.components:
                for i in range(len(comp.layers)):
                    with c.acquire(model.model, comp.name, i) as lease:
                        lease.wait_ready()
                        for t in lease.tensors:
                            name = find_expected(expected, comp.name, t.name)
                            self.assertEqual(bytes(lease.view(t)), expected[name], name)

        read_all()
        self.assertEqual(resident(), layers)
        comp = model.components[0]
        with c.acquire(model.model, comp.name, 0):
            with self.assertRaises(ferry.Busy) as cm:
                c.offload(model.model)
            self.assertEqual(cm.exception.code, 211)
            with self.assertRaises(ferry.Busy):
                c.offload(model.model, comp.name)
        self.assertEqual(resident(), layers, "nothing changed")

        freed = c.offload(model.model)
        self.assertGreaterEqual(freed, total)  # the reservation, layers rounded up to alignment
        self.assertEqual(resident(), 0)
        self.assertEqual(c.offload(model.model), 0, "already off")
        c.onload(model.model)
        read_all()
        self.assertEqual(resident(), layers)

        freed = c.offload(model.model, comp.name)
        # Device bytes: each layer's rounded up to the arena's 256-byte alignment.
        self.assertEqual(freed, sum((l.bytes + 255) // 256 * 256 for l in comp.layers))
        c.onload(model.model, comp.name)
        read_all()
        with self.assertRaises(ferry.UnknownComponent):
            c.offload(model.model, "no-such-component")
        with self.assertRaises(ferry.UnknownComponent):
            c.onload(model.model, "no-such-component")
        with self.assertRaises(ferry.UnknownModel):
            c.offload(987654)
        stats = c.stats()
        self.assertLessEqual(stats.peak_device_bytes, stats.budget)

    def test_auto_and_presets_are_reported_back(self):
        c = self.client
        model = c.open_model(MODEL)
        cases = [
            ("auto", messages.PolicyAuto()),
            ("LowVRAM", messages.PolicyPreset(messages.Preset.LowVram)),
            ("medvram", messages.PolicyPreset(messages.Preset.MedVram)),
            ("MODEL", messages.PolicyPreset(messages.Preset.Model)),
            ("sequential", messages.Sequential(1)),
        ]
        for name, want in cases:
            with self.subTest(policy=name):
                c.set_residency(model.model, name)
                infos = [m for m in c.list_models() if m.model == model.model]
                self.assertEqual(len(infos), 1)
                self.assertEqual(infos[0].policy, want)
                # Every layer is still served under it.
                comp = model.components[0]
                for i in range(len(comp.layers)):
                    with c.acquire(model.model, comp.name, i) as lease:
                        self.assertEqual(len(lease.tensors), comp.layers[i].tensors)
        # An unknown name: ValueError, and nothing goes to the server.
        sent = []
        real_send = c._send

        def recording_send(msg, fds=()):
            sent.append(msg)
            return real_send(msg, fds)

        c._send = recording_send
        try:
            with self.assertRaises(ValueError) as cm:
                c.set_residency(model.model, "ultravram")
            self.assertIn("'ultravram'", str(cm.exception))
            self.assertEqual(sent, [])
            infos = [m for m in c.list_models() if m.model == model.model]
            self.assertEqual(infos[0].policy, messages.Sequential(1), "unchanged")
            self.assertEqual([type(m) for m in sent], [messages.ListModels])
        finally:
            del c._send

    def test_closed_client_raises_connection_lost(self):
        c = ferry.Client(SOCKET, timeout=30)
        c.close()
        with self.assertRaises(ferry.ConnectionLost):
            c.stats()
        c.close()  # idempotent


# ---- LoRA views (backup and fuse) against weights computed here --------------------------


def _f32(x):
    return struct.pack("<f", x)


def _f16(x):
    return struct.pack("<e", x)


def _bf16(x):
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if bits & 0xFFFF:
        raise ValueError(f"{x} is not exact in bf16")  # the values below are chosen to be
    return struct.pack("<H", bits >> 16)


_ENCODE = {"F32": _f32, "F16": _f16, "BF16": _bf16}


def _matrix(rows, cols, seed, scale):
    """Deterministic small multiples of ``scale`` in [-4*scale, 4*scale]."""
    return [[((seed * 7 + r * 5 + c * 3) % 9 - 4) * scale for c in range(cols)]
            for r in range(rows)]


def _encode(dtype, m):
    return b"".join(_ENCODE[dtype](x) for row in m for x in row)


def _matmul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))]
            for i in range(len(a))]


def _plus(w, d, s):
    return [[x + s * y for x, y in zip(rw, rd)] for rw, rd in zip(w, d)]


@unittest.skipUnless(LIVE, "set FERRY_SOCKET, FERRY_MODEL and FERRY_EXPECTED to run")
class LiveLora(unittest.TestCase):
    """A base model and two LoRA files (kohya with alpha, PEFT without) written here, applied
    as a stack through ferryd; every value is a small multiple of a power of two, so the fused
    weights are exact in every dtype and the comparison is byte for byte."""

    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=30)
        self.addCleanup(self.client.close)
        # beside FERRY_MODEL, so under ferryd's model root
        self.dir = tempfile.mkdtemp(prefix="lora-", dir=os.path.dirname(MODEL))
        self.addCleanup(shutil.rmtree, self.dir)
        w = {
            "blocks.0.fc.weight": ("F32", _matrix(4, 3, 1, 0.25)),
            "blocks.0.fc.bias": ("F32", [[0.5, -0.25, 1.0, 0.0]]),
            "blocks.1.fc.weight": ("F16", _matrix(4, 4, 2, 0.25)),
            "blocks.2.fc.weight": ("BF16", _matrix(3, 4, 3, 0.25)),
            "blocks.3.fc.weight": ("F32", _matrix(2, 2, 4, 0.25)),
        }
        self.base = os.path.join(self.dir, "base.safetensors")
        _util.write_safetensors(self.base, [
            (k, dt, [len(m[0])] if k.endswith("bias") else [len(m), len(m[0])],
             _encode(dt, m)) for k, (dt, m) in w.items()])
        self.original = {k: _encode(dt, m) for k, (dt, m) in w.items()}
        # kohya: factors in F32, alpha 1 with rank 2 (alpha/rank = 0.5)
        k0u, k0d = _matrix(4, 2, 5, 0.5), _matrix(2, 3, 6, 0.5)
        k1u, k1d = _matrix(4, 2, 7, 0.5), _matrix(2, 4, 8, 0.5)
        self.kohya = os.path.join(self.dir, "kohya.safetensors")
        _util.write_safetensors(self.kohya, [
            ("lora_unet_blocks_0_fc.lora_up.weight", "F32", [4, 2], _encode("F32", k0u)),
            ("lora_unet_blocks_0_fc.lora_down.weight", "F32", [2, 3], _encode("F32", k0d)),
            ("lora_unet_blocks_0_fc.alpha", "F32", [], _f32(1.0)),
            ("lora_unet_blocks_1_fc.lora_up.weight", "F32", [4, 2], _encode("F32", k1u)),
            ("lora_unet_blocks_1_fc.lora_down.weight", "F32", [2, 4], _encode("F32", k1d)),
            ("lora_unet_blocks_1_fc.alpha", "F32", [], _f32(1.0)),
        ])
        # PEFT: factors in F16, no alpha (scale = strength)
        p1a, p1b = _matrix(2, 4, 9, 0.5), _matrix(4, 2, 10, 0.5)
        p2a, p2b = _matrix(1, 4, 11, 0.5), _matrix(3, 1, 12, 0.5)
        self.peft = os.path.join(self.dir, "peft.safetensors")
        _util.write_safetensors(self.peft, [
            ("base_model.model.blocks.1.fc.lora_A.weight", "F16", [2, 4], _encode("F16", p1a)),
            ("base_model.model.blocks.1.fc.lora_B.weight", "F16", [4, 2], _encode("F16", p1b)),
            ("base_model.model.blocks.2.fc.lora_A.weight", "F16", [1, 4], _encode("F16", p2a)),
            ("base_model.model.blocks.2.fc.lora_B.weight", "F16", [3, 1], _encode("F16", p2b)),
        ])
        sk, sp = 0.5, 1.5  # strengths
        fused = dict(self.original)
        m0 = _plus(w["blocks.0.fc.weight"][1], _matmul(k0u, k0d), sk * 0.5)
        m1 = _plus(w["blocks.1.fc.weight"][1], _matmul(k1u, k1d), sk * 0.5)
        m1 = _plus(m1, _matmul(p1b, p1a), sp)
        m2 = _plus(w["blocks.2.fc.weight"][1], _matmul(p2b, p2a), sp)
        fused["blocks.0.fc.weight"] = _encode("F32", m0)
        fused["blocks.1.fc.weight"] = _encode("F16", m1)
        fused["blocks.2.fc.weight"] = _encode("BF16", m2)
        self.fused = fused
        self.stack = [(self.kohya, sk), (self.peft, sp)]

    def read_all(self, model_id, opened):
        got = {}
        comp = opened.components[0]
        for i in range(len(comp.layers)):
            with self.client.acquire(model_id, comp.name, i) as lease:
                for t in lease.tensors:
                    got[t.name] = bytes(lease.view(t))
        return got

    def test_stack_backup_and_fuse_then_removed(self):
        c = self.client
        model = c.open_model(self.base)
        self.addCleanup(c.close_model, model.model)
        self.assertEqual([x.name for x in model.components[0].layers],
                         ["blocks.0", "blocks.1", "blocks.2", "blocks.3"])
        self.assertEqual(self.read_all(model.model, model), self.original)
        for mode in ("backup", "fuse"):
            with self.subTest(mode=mode):
                view = c.apply_lora(model.model, self.stack, mode)
                reply = c.last_view
                self.assertNotEqual(view, model.model)
                self.assertEqual(reply.merged, 3)
                self.assertEqual([(r.unmatched, r.unrecognised) for r in reply.loras],
                                 [([], []), ([], [])])
                got = self.read_all(view, model)
                for name in self.original:
                    self.assertEqual(got[name], self.fused[name], name)
                self.assertNotEqual(self.fused["blocks.1.fc.weight"],
                                    self.original["blocks.1.fc.weight"])
                # The base is unchanged while the view exists, and after it is removed.
                self.assertEqual(self.read_all(model.model, model), self.original)
                with c.acquire(view, "model", 1):
                    with self.assertRaises(ferry.Busy):  # its layer is leased
                        c.remove_lora(view)
                c.remove_lora(view)
                self.assertEqual(self.read_all(model.model, model), self.original)
                with self.assertRaises(ferry.RequestError):
                    c.acquire(view, "model", 0)
        with self.assertRaises(errors.UnknownView):
            c.remove_lora(view)
        bad = os.path.join(self.dir, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(b"not a safetensors file")
        with self.assertRaises(errors.BadLora):
            c.apply_lora(model.model, [(bad, 1.0)])
        self.assertFalse(c.closed)


@unittest.skipUnless(LIVE, "set FERRY_SOCKET, FERRY_MODEL and FERRY_EXPECTED to run")
class LiveDevices(unittest.TestCase):
    """Against a ferryd with two simulated host devices (``--host-devices 2``; device 0 is the
    default): models on device 1 by index and by UUID, read through device 1's arena."""

    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=30)
        self.addCleanup(self.client.close)

    def sent_kinds(self, c):
        """Records the message classes ``c`` sends from now on."""
        sent = []
        real_send = c._send

        def recording_send(msg, fds=()):
            sent.append(type(msg))
            return real_send(msg, fds)

        c._send = recording_send
        self.addCleanup(delattr, c, "_send")
        return sent

    def read_every_layer(self, model, expected):
        """Every tensor's bytes read through its lease's view, checked against the file's."""
        c = self.client
        seen = set()
        for comp in model.components:
            for i in range(len(comp.layers)):
                with c.acquire(model.model, comp.name, i) as lease:
                    self.assertEqual(lease.device, model.device)
                    for t in lease.tensors:
                        key = find_expected(expected, comp.name, t.name)
                        seen.add(key)
                        self.assertEqual(bytes(lease.view(t)), expected[key], key)
        self.assertEqual(seen, set(expected), "every tensor of the model was read")

    def test_devices_are_listed(self):
        c = self.client
        self.assertTrue(c.features & messages.DEVICES, f"features {c.features:#x}")
        devs = c.devices()
        self.assertEqual([d.index for d in devs], [0, 1])
        self.assertEqual([d.uuid for d in devs], ["HOST-0000", "HOST-0001"])
        self.assertEqual([d.label for d in devs], ["host:0", "host:1"])
        for d in devs:
            self.assertIsInstance(d, ferry.DeviceEntry)
            self.assertIsNone(d.error)
            self.assertIsNotNone(d.stats)
            self.assertGreater(d.total_memory, 0)
            self.assertLessEqual(d.stats.peak_device_bytes, d.stats.budget)

    def test_open_on_device_1_by_index_and_by_uuid_reads_the_files_bytes(self):
        c = self.client
        expected = expected_tensors()
        by_index = c.open_model(MODEL, device=1)
        self.addCleanup(c.close_model, by_index.model)
        self.assertEqual(by_index.model >> 48, 1)
        self.assertEqual(by_index.device, 1)
        by_uuid = c.open_model(MODEL, device="HOST-0001")
        self.assertEqual(by_uuid.model >> 48, 1)
        self.assertEqual(by_uuid.model, by_index.model, "the same files on the same device")
        default = c.open_model(MODEL)
        self.assertEqual(default.device, 0)
        self.assertNotEqual(default.model, by_index.model, "two devices, two models")
        self.assertEqual([x.name for x in default.components],
                         [x.name for x in by_index.components])

        sent = self.sent_kinds(c)
        self.read_every_layer(by_index, expected)
        self.assertEqual(sent.count(messages.MapArenaOn), 1, "device 1's arena, mapped once")
        self.assertNotIn(messages.MapArena, sent)
        comp = by_index.components[0]
        with c.acquire(by_index.model, comp.name, 0) as lease:
            one = lease.arena()
            self.assertEqual(one.device, messages.DeviceIndex(1))
            self.assertIs(one, c.map_arena(1))
        # The default device's model reads through the plain map_arena, as with one device.
        del sent[:]
        self.read_every_layer(default, expected)
        self.assertEqual(sent.count(messages.MapArena), 1)
        self.assertNotIn(messages.MapArenaOn, sent)
        self.assertIsNot(c.map_arena(), one)

        infos = {m.model: m for m in c.list_models()}
        self.assertIn(by_index.model, infos)
        self.assertIn(default.model, infos)
        devs = c.devices()
        self.assertGreaterEqual(devs[1].models, 1)
        self.assertGreater(devs[1].stats.acquires, 0)
        self.assertLessEqual(devs[1].stats.peak_device_bytes, devs[1].stats.budget)

    def test_open_model_fd_on_a_device(self):
        c = self.client
        d = tempfile.mkdtemp(prefix="ferry-fd-")
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "one.safetensors")
        data = bytes(range(256)) * 4
        _util.write_safetensors(path, [("blocks.0.w", "U8", [len(data)], data)])
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        ids = set()
        for device in ("HOST-0001", 1):
            with self.subTest(device=device):
                model = c.open_model_fd(fd, "one", device=device)
                ids.add(model.model)
                self.assertEqual(model.device, 1)
                comp = model.components[0]
                with c.acquire(model.model, comp.name, 0) as lease:
                    self.assertEqual(bytes(lease.view("blocks.0.w")), data)
        self.assertEqual(len(ids), 1, "the same file on the same device is one model")
        model = c.open_model_fd(fd, "one")
        self.assertEqual(model.device, 0)
        with c.acquire(model.model, model.components[0].name, 0) as lease:
            self.assertEqual(bytes(lease.view("blocks.0.w")), data)
        for ident in ids | {model.model}:
            c.close_model(ident)

    def test_unknown_devices_are_typed_errors(self):
        c = self.client
        for device in (5, "HOST-0005", "GPU-00000000-0000-0000-0000-000000000000"):
            with self.subTest(device=device):
                with self.assertRaises(ferry.UnknownDevice) as cm:
                    c.open_model(MODEL, device=device)
                self.assertEqual(cm.exception.code, 220)
                self.assertTrue(cm.exception.message)
        with self.assertRaises(ferry.UnknownDevice):
            c.map_arena(5)
        fd = os.open(MODEL, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        with self.assertRaises(ferry.UnknownDevice):
            c.open_model_fd(fd, "m", device=7)
        # Bad selectors never reach the server.
        sent = self.sent_kinds(c)
        for bad, exc in ((-1, ValueError), (True, TypeError), ("", ValueError)):
            with self.assertRaises(exc):
                c.open_model(MODEL, device=bad)
        self.assertEqual(sent, [])
        self.assertFalse(c.closed)
        self.assertEqual(len(c.devices()), 2)

    def test_without_the_devices_feature(self):
        """A client that does not ask for DEVICES: the device requests are Unsupported, and a
        lease reads through the plain map_arena."""
        c = ferry.Client(SOCKET, timeout=30,
                         features=messages.KNOWN_FEATURES & ~messages.DEVICES)
        self.addCleanup(c.close)
        self.assertFalse(c.features & messages.DEVICES)
        with self.assertRaises(ferry.Unsupported):
            c.devices()
        with self.assertRaises(ferry.Unsupported):
            c.open_model(MODEL, device=1)
        with self.assertRaises(ferry.Unsupported):
            c.map_arena(1)
        model = c.open_model(MODEL)
        self.assertEqual(model.device, 0)
        comp = model.components[0]
        with c.acquire(model.model, comp.name, 0) as lease:
            self.assertIs(lease.arena(), c.map_arena())
            expected = expected_tensors()
            for t in lease.tensors:
                key = find_expected(expected, comp.name, t.name)
                self.assertEqual(bytes(lease.view(t)), expected[key], key)


if os.environ.get("FERRY_SHUTDOWN_MARKER"):

    class LiveShutdown(unittest.TestCase):
        def test_server_shutdown_is_connection_lost(self):
            c = ferry.Client(SOCKET, timeout=30)
            self.addCleanup(c.close)
            model = c.open_model(MODEL)
            comp = model.components[0]
            lease = c.acquire(model.model, comp.name, 0)
            with open(os.environ["FERRY_SHUTDOWN_MARKER"], "w") as f:
                f.write("connected\n")
            deadline = time.monotonic() + 30
            with self.assertRaises(ferry.ConnectionLost):
                while time.monotonic() < deadline:
                    c.stats()
                    time.sleep(0.02)
            self.assertTrue(c.closed)
            with self.assertRaises(ferry.ConnectionLost):
                c.stats()
            with self.assertRaises(ferry.ConnectionLost):
                lease.release()


class FakeServer(unittest.TestCase):
    """A server that answers the handshake and then misbehaves or leaves."""

    def serve(self, after_hello, hello=None):
        path, listener = _util.fake_listener(self)

        def run():
            conn, _ = listener.accept()
            with conn:
                head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
                got = wire.decode(messages.Hello, _recv_all(conn, head.body_len))
                if hello is not None:
                    hello["features"] = got.features
                welcome = messages.Welcome(
                    1, messages.OPEN_PATH, 7, "fake", wire.MAX_BODY_LEN, 16,
                    messages.DeviceSummary("host", "fake", "fake-0", 1 << 20, 1 << 20))
                conn.sendall(_frame(welcome, head.request_id))
                after_hello(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.addCleanup(t.join, 10)
        return path

    def test_cuda_arena_without_a_usable_driver_closes_its_descriptor(self):
        """A client that asked for CUDA_IPC itself gets cuda_arena from a CUDA ferryd; with no
        usable CUDA driver here (or no GPU with that UUID), mapping it is CudaUnavailable
        naming the device, the descriptor is closed and the connection still usable. A
        cuda_arena whose descriptors disagree with its handle is a protocol error.
        (test_cuda.py maps such replies through a stand-in driver.)"""
        os.environ["FERRY_LIBCUDA"] = "/nonexistent/libcuda.so.1"
        self.addCleanup(os.environ.pop, "FERRY_LIBCUDA", None)
        hello = {}
        r, w = os.pipe()
        os.close(w)

        def after(conn):
            # map_arena -> cuda_arena (PosixFd) with one descriptor
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            _recv_all(conn, head.body_len)
            reply = messages.CudaArena(1 << 20, "GPU-1", messages.CudaPosixFd(2 << 20))
            body = wire.encode(reply)
            data = wire.pack_header(reply.KIND, head.request_id, len(body), flags=wire.FLAG_FDS)
            socket.send_fds(conn, [data + body], [r])
            # stats -> stats_reply
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            conn.sendall(_frame(messages.StatsReply(*[0] * 11), head.request_id))
            # map_arena_on -> cuda_arena (PosixFd) without its descriptor
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            _recv_all(conn, head.body_len)
            conn.sendall(_frame(reply, head.request_id))
            try:
                _recv_all(conn, 1)
            except (EOFError, OSError):
                pass

        path = self.serve(after, hello)
        c = ferry.Client(path, timeout=10, features=messages.KNOWN_FEATURES)
        self.addCleanup(os.close, r)
        self.assertEqual(hello["features"], messages.KNOWN_FEATURES)
        before = set(os.listdir("/proc/self/fd"))
        with self.assertRaises(ferry.CudaUnavailable) as cm:
            c.map_arena()
        self.assertIn("GPU-1", str(cm.exception))
        self.assertIn("/nonexistent/libcuda.so.1", str(cm.exception))
        self.assertIsNone(cm.exception.code)
        self.assertEqual(set(os.listdir("/proc/self/fd")), before, "the descriptor was closed")
        self.assertFalse(c.closed)
        self.assertIsInstance(c.stats(), messages.StatsReply)
        with self.assertRaises(errors.BadFds):
            c.map_arena(1)
        self.assertTrue(c.closed)

    def test_default_features_leave_out_cuda_ipc(self):
        hello = {}
        c = ferry.Client(self.serve(lambda conn: None, hello), timeout=10)
        self.addCleanup(c.close)
        self.assertEqual(hello["features"], messages.DEFAULT_FEATURES)
        self.assertEqual(messages.DEFAULT_FEATURES,
                         messages.KNOWN_FEATURES & ~messages.CUDA_IPC & ~messages.CUDA_EVENTS)
        self.assertTrue(messages.DEFAULT_FEATURES & messages.DEVICES)

    def test_server_gone_is_connection_lost(self):
        c = ferry.Client(self.serve(lambda conn: None), timeout=10)
        self.assertEqual(c.client_id, 7)
        with self.assertRaises(ferry.ConnectionLost):
            c.stats()
        with self.assertRaises(ferry.ConnectionLost):
            c.list_models()

    def test_shutting_down_error_then_close(self):
        def after(conn):
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            _recv_all(conn, head.body_len)
            conn.sendall(_frame(messages.Error(300, "ferryd is stopping"), 0))

        c = ferry.Client(self.serve(after), timeout=10)
        with self.assertRaises(ferry.ShuttingDown) as cm:
            c.stats()
        self.assertIsInstance(cm.exception, ferry.ConnectionLost)
        with self.assertRaises(ferry.ConnectionLost):
            c.stats()

    def test_replies_are_matched_by_request_id(self):
        def after(conn):
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            _recv_all(conn, head.body_len)
            # An answer to a later request id first (kept aside), then the real one.
            conn.sendall(_frame(messages.Ready(9), head.request_id + 1))
            conn.sendall(_frame(messages.Ack(), head.request_id))
            for _ in range(2):  # wait_ready (already answered), then release
                head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
                _recv_all(conn, head.body_len)
            conn.sendall(_frame(messages.Error(208, "no lease 9"), head.request_id))
            head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
            conn.sendall(b"garbage" * 10)

        c = ferry.Client(self.serve(after), timeout=10)
        c.prefetch(1, "unet", 0)
        c.wait_ready(9)  # the stashed reply answers it
        with self.assertRaises(ferry.UnknownLease):
            c.release(1, 9)
        with self.assertRaises(ferry.ProtocolError):
            c.stats()
        with self.assertRaises(ferry.ConnectionLost):
            c.stats()


_recv_all = _util.recv_all


_frame = _util.frame


if __name__ == "__main__":
    unittest.main()
