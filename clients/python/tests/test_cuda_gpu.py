"""The CUDA path against a real ferryd on a GPU. Runs only with FERRY_TEST_CUDA=1 (so that it
never runs by accident) and a ferryd started with ``--device cuda``;
``FERRY_TEST_CUDA=1 cargo test --test python_client python_cuda`` starts one and sets:

* FERRY_SOCKET: the CUDA ferryd's socket;
* FERRY_MODEL: a model under its model root, FERRY_EXPECTED: its bytes (as test_live.py);
* FERRY_MODEL_ROOT: a writable folder under the model root (for the torch tests' files).

``LiveCuda`` needs no torch: the arena mapped with ferry.cuda, bytes copied back with
``cuMemcpyDtoH``, after ``wait_ready`` or after waiting on ferryd's interprocess ready events
(``acquire_event``). ``LiveCudaTorch`` needs torch with CUDA (and numpy): every tensor through
``ferry.torch``'s CUDA source, and small modules whose outputs with ferry equal those with their
own weights on the same GPU (the current stream waiting on ferryd's events, and without them).

ferryd offers ``CUDA_EVENTS`` only when its config sets ``cuda_events = true`` (off by
default): the event tests check whichever path the ferryd under test offers, and say on stderr
when events were not exercised.
"""

import os
import shutil
import sys
import tempfile
import unittest

import _util  # puts the package on sys.path
import ferry
from ferry import messages

SOCKET = os.environ.get("FERRY_SOCKET")
MODEL = os.environ.get("FERRY_MODEL")
EXPECTED = os.environ.get("FERRY_EXPECTED")
ROOT = os.environ.get("FERRY_MODEL_ROOT")
GATED = os.environ.get("FERRY_TEST_CUDA") == "1"
LIVE = GATED and bool(SOCKET and MODEL and EXPECTED)
assert _util.PACKAGE_ROOT

try:
    import torch

    import ferry.torch as ft
    from test_torch import POLICIES, Net, fresh, raw, seeded

    HAVE_TORCH_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    HAVE_TORCH_CUDA = False


def expected_tensors():
    return _util.expected_tensors(EXPECTED)


find_expected = _util.find_expected


def leases_of(client):
    return [c for c in client.list_clients() if c.id == client.client_id][0].leases


@unittest.skipUnless(LIVE, "set FERRY_TEST_CUDA=1 with a CUDA ferryd (FERRY_SOCKET, "
                           "FERRY_MODEL, FERRY_EXPECTED) to run")
class LiveCuda(unittest.TestCase):
    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=60, cuda=True)
        self.addCleanup(self.client.close)

    def test_the_arena_is_mapped_once_on_ferryds_gpu(self):
        c = self.client
        self.assertEqual(c.device.backend, "cuda")
        self.assertTrue(c.features & messages.CUDA_IPC)
        arena = c.map_arena()
        self.assertIsInstance(arena, ferry.ImportedArena)
        self.assertIs(c.map_arena(), arena)
        self.assertIs(c.map_arena(c.device.uuid), arena, "the same GPU by UUID")
        self.assertEqual(ferry.cuda.normalize_uuid(arena.uuid),
                         ferry.cuda.normalize_uuid(c.device.uuid))
        self.assertIn(arena.kind, ("vmm", "ipc"))
        self.assertGreater(arena.len, 0)
        self.assertNotEqual(arena.base, 0)
        print(f"\n  {arena!r}: read_only={arena.read_only} size={arena.size}",
              file=sys.stderr)

    def test_every_tensor_read_through_the_mapping_equals_the_file(self):
        c = self.client
        expected = expected_tensors()
        model = c.open_model(MODEL)
        arena = c.map_arena()
        seen = set()
        for comp in model.components:
            for i in range(len(comp.layers)):
                with c.acquire(model.model, comp.name, i) as lease:
                    for t in lease.tensors:
                        key = find_expected(expected, comp.name, t.name)
                        seen.add(key)
                        self.assertEqual(lease.device_ptr(t), arena.base + t.arena_offset)
                        self.assertEqual(arena.read(t.arena_offset, t.len), expected[key], key)
                        with self.assertRaises(ferry.MemoryKindError):
                            lease.view(t)
        self.assertEqual(seen, set(expected))
        self.assertEqual(leases_of(c), 0)

    def test_ready_events_order_the_reads(self):
        """acquire_event on every layer: the legacy default stream (0) waits on ferryd's event,
        then cuMemcpyDtoH (issued on that stream) reads the file's bytes; and a host wait on
        the event (cuEventSynchronize) before a read gives them too. No wait_ready is sent.
        A ferryd without cuda_events answers acquire_event with Unsupported."""
        c = self.client
        if not c.features & messages.CUDA_EVENTS:
            model = c.open_model(MODEL)
            with self.assertRaises(ferry.Unsupported):
                c.acquire_event(model.model, model.components[0].name, 0)
            print("\n  ready events NOT exercised: ferryd does not offer CUDA_EVENTS "
                  "(cuda_events = false in its config)", file=sys.stderr)
            return
        without = ferry.Client(SOCKET, timeout=60, cuda=True, events=False)
        self.addCleanup(without.close)
        self.assertEqual(without.features & messages.CUDA_EVENTS, 0, "events=False")
        expected = expected_tensors()
        sent = []
        plain_wait = c.wait_ready
        c.wait_ready = lambda lease: (sent.append(lease), plain_wait(lease))[1]
        self.addCleanup(vars(c).pop, "wait_ready", None)
        model = c.open_model(MODEL)
        c.set_residency(model.model, "sequential", lookahead=0)
        arena = c.map_arena()
        seen, with_event = set(), 0
        for rnd in range(2):
            for comp in model.components:
                for i in range(len(comp.layers)):
                    with c.acquire_event(model.model, comp.name, i) as lease:
                        self.assertIn(len(lease.ready_event), (0, 64))
                        self.assertEqual(lease.ready, not lease.ready_event)
                        with_event += bool(lease.ready_event)
                        if rnd == 0:
                            lease.wait_on_stream(0)
                        elif lease.ready_event:
                            arena.wait_host(lease.ready_event)
                        for t in lease.tensors:
                            key = find_expected(expected, comp.name, t.name)
                            seen.add(key)
                            self.assertEqual(arena.read(t.arena_offset, t.len), expected[key],
                                             key)
        self.assertEqual(seen, set(expected))
        self.assertEqual(sent, [], "no wait_ready round trip")
        self.assertEqual(leases_of(c), 0)
        print(f"\n  {with_event} acquires with an event, {arena.opened_events} events opened",
              file=sys.stderr)
        self.assertGreater(with_event, 0, "sequential with lookahead 0 streams some layers")
        self.assertGreater(arena.opened_events, 0)
        self.assertFalse(arena.events_broken, "one IPC namespace: events work")

    def test_two_clients_map_the_same_arena(self):
        expected = expected_tensors()
        other = ferry.Client(SOCKET, timeout=60, cuda=True)
        model = self.client.open_model(MODEL)
        comp = model.components[0]
        a, b = self.client.map_arena(), other.map_arena()
        self.assertIsNot(a, b)
        other.close()  # unmaps b; a stays valid
        self.assertTrue(b.closed)
        with self.client.acquire(model.model, comp.name, 0) as lease:
            t = lease.tensors[0]
            lease.wait_ready()
            self.assertEqual(a.read(t.arena_offset, t.len),
                             expected[find_expected(expected, comp.name, t.name)])

    def test_without_cuda_true_map_arena_is_unsupported(self):
        with ferry.Client(SOCKET, timeout=60) as plain:
            self.assertEqual(plain.features & messages.CUDA_IPC, 0)
            with self.assertRaises(ferry.Unsupported):
                plain.map_arena()
            self.assertIsInstance(plain.stats(), messages.StatsReply)


@unittest.skipUnless(LIVE and HAVE_TORCH_CUDA and ROOT,
                     "set FERRY_TEST_CUDA=1 with a CUDA ferryd, torch with CUDA and "
                     "FERRY_MODEL_ROOT to run")
class LiveCudaTorch(unittest.TestCase):
    def setUp(self):
        self.client = ferry.Client(SOCKET, timeout=60, cuda=True)
        self.addCleanup(self.client.close)
        self.dir = tempfile.mkdtemp(prefix="torch-cuda-", dir=ROOT)
        self.addCleanup(shutil.rmtree, self.dir)
        self.device = torch.device("cuda", ft._torch_index(self.client.device.uuid))

    def save(self, module, name="net"):
        path = os.path.join(self.dir, name + ".safetensors")
        state = module.state_dict()
        _util.write_safetensors(path, [(k, SAFETENSORS[v.dtype], list(v.shape), raw(v))
                                       for k, v in state.items()])
        return path

    def test_every_tensor_through_torch_equals_the_file(self):
        c = self.client
        expected = expected_tensors()
        model = c.open_model(MODEL)
        src = ft.tensor_source(c, model.model)
        self.assertEqual(src.device, self.device)
        seen = set()
        for comp in model.components:
            for i in range(len(comp.layers)):
                lease = c.acquire(model.model, comp.name, i)
                try:
                    for d in lease.tensors:
                        t = src.tensor(lease, d, ft.torch_dtype(d.dtype), d.shape)
                        self.assertEqual(t.device, self.device)
                        self.assertEqual(t.data_ptr(), src.base + d.arena_offset, "in place")
                        self.assertTrue(src.owns(t))
                        key = find_expected(expected, comp.name, d.name)
                        seen.add(key)
                        self.assertEqual(raw(t), expected[key], key)
                    src.before_release()
                finally:
                    lease.release()
        self.assertEqual(seen, set(expected))

    def test_every_dtype_torch_knows(self):
        """A file with one tensor per dtype (written here), each read through torch on the GPU
        byte for byte."""
        tensors = []
        for i, name in enumerate(sorted(_util._ITEMSIZE)):
            size = _util._ITEMSIZE[name]
            data = bytes((j * 31 + i * 7 + 1) & 0xFF for j in range(6 * size))
            if name == "BOOL":
                data = bytes(b & 1 for b in data)
            tensors.append((f"t.{name.lower()}", name, [2, 3], data))
        path = os.path.join(self.dir, "dtypes.safetensors")
        _util.write_safetensors(path, tensors)
        want = {n: (dt, data) for n, dt, _, data in tensors}
        model = self.client.open_model(path)
        self.addCleanup(self.client.close_model, model.model)
        src = ft.tensor_source(self.client, model.model)
        seen = set()
        for comp in model.components:
            for i in range(len(comp.layers)):
                with self.client.acquire(model.model, comp.name, i) as lease:
                    for d in lease.tensors:
                        try:
                            dtype = ft.torch_dtype(d.dtype)
                        except ft.FerryTorchError:
                            continue  # this torch lacks the dtype
                        key = find_expected(want, comp.name, d.name)
                        t = src.tensor(lease, d, dtype, d.shape)
                        self.assertEqual((t.dtype, list(t.shape)), (dtype, [2, 3]))
                        self.assertEqual(raw(t), want[key][1], key)
                        seen.add(want[key][0])
                    src.before_release()
        self.assertGreaterEqual(len(seen), 12, seen)

    def test_module_output_equals_without_ferry(self):
        for dtype in (torch.float32, torch.bfloat16):
            net = seeded(Net, 11, dtype).to(self.device)
            x = torch.randn(5, 6, device=self.device, dtype=dtype)
            with torch.no_grad():
                want = net(x)
            path = self.save(net, f"net-{str(dtype)[6:]}")
            for (policy, kw), sync in zip(POLICIES, ("stream", "device") * 3):
                with self.subTest(dtype=dtype, policy=policy, sync=sync):
                    mod = fresh(Net, dtype)
                    with ft.attach(mod, path, self.client, policy=policy, cuda_sync=sync,
                                   placeholder="cuda", **kw) as att:
                        self.assertIsInstance(att.session._source, ft._CudaArena)
                        for _ in range(2):
                            with torch.no_grad():
                                got = mod(x)
                            self.assertEqual(got.device, self.device)
                            self.assertTrue(torch.equal(got, want), f"{got}\n{want}")
                            self.assertEqual(leases_of(self.client), 0)
                        for p in mod.parameters():
                            self.assertEqual(p.device, self.device, "cuda placeholders")
                            self.assertEqual(p.untyped_storage().nbytes(),
                                             p.element_size(), "one element")

    def test_module_output_with_ready_events_equals_without_ferry(self):
        """The default CUDA path of a cuda=True client of a ferryd with cuda_events: each layer
        acquired with acquire_event, the current stream waiting on ferryd's event (never
        wait_ready), exact outputs; the same without CUDA_EVENTS (wait_ready) for comparison.
        (Without cuda_events in ferryd's config both clients take the wait_ready path.)"""
        granted = bool(self.client.features & messages.CUDA_EVENTS)
        if not granted:
            print("\n  ready events NOT exercised: ferryd does not offer CUDA_EVENTS",
                  file=sys.stderr)
        net = seeded(Net, 15).to(self.device)
        x = torch.randn(5, 6, device=self.device)
        with torch.no_grad():
            want = net(x)
        path = self.save(net, "net-events")
        plain = ferry.Client(SOCKET, timeout=60,
                             features=messages.DEFAULT_FEATURES | messages.CUDA_IPC)
        self.addCleanup(plain.close)
        self.assertFalse(plain.features & messages.CUDA_EVENTS)
        for client, events in ((self.client, granted), (plain, False)):
            with self.subTest(events=events):
                counts = {"acquire_event": 0, "wait_ready": 0}
                for name in counts:
                    real = getattr(client, name)

                    def counting(*args, _real=real, _name=name):
                        counts[_name] += 1
                        return _real(*args)

                    setattr(client, name, counting)
                    self.addCleanup(vars(client).pop, name, None)
                mod = fresh(Net)
                # Net holds two layers at once (test_torch.POLICIES): lookahead 1.
                with ft.attach(mod, path, client, policy="sequential", lookahead=1,
                               placeholder="cuda") as att:
                    self.assertEqual(att.session._source.events, events)
                    for _ in range(3):
                        with torch.no_grad():
                            got = mod(x)
                        self.assertTrue(torch.equal(got, want), f"{got}\n{want}")
                        self.assertEqual(leases_of(client), 0)
                if events:
                    self.assertGreater(counts["acquire_event"], 0)
                    self.assertEqual(counts["wait_ready"], 0, "the GPU waited, not the host")
                else:
                    self.assertEqual(counts["acquire_event"], 0)
                    self.assertGreater(counts["wait_ready"], 0)

    def test_a_session_given_a_path_asks_for_cuda_itself(self):
        net = seeded(Net, 12).to(self.device)
        x = torch.randn(2, 6, device=self.device)
        with torch.no_grad():
            want = net(x)
        path = self.save(net)
        mod = fresh(Net)
        with ft.attach(mod, path, SOCKET, policy="sequential") as att:
            self.assertTrue(att.session.client.features & messages.CUDA_IPC)
            granted = bool(self.client.features & messages.CUDA_EVENTS)  # the same ferryd
            self.assertEqual(bool(att.session.client.features & messages.CUDA_EVENTS), granted)
            self.assertEqual(att.session._source.events, granted)
            with torch.no_grad():
                self.assertTrue(torch.equal(mod(x), want))


if torch is not None:
    SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


if __name__ == "__main__":
    unittest.main()
