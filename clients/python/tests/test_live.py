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

import json
import os
import shutil
import socket
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
    with open(EXPECTED, encoding="utf-8") as f:
        return {k: bytes.fromhex(v) for k, v in json.load(f)["tensors"].items()}


def find_expected(expected, component, name):
    """The file's tensor a leased tensor is (lease names are within the component)."""
    for candidate in (name, f"{component}.{name}"):
        if candidate in expected:
            return candidate
    hits = [k for k in expected if k.endswith("." + name)]
    if len(hits) != 1:
        raise AssertionError(f"tensor {name!r} of {component!r} matches {hits}")
    return hits[0]


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

    def test_closed_client_raises_connection_lost(self):
        c = ferry.Client(SOCKET, timeout=30)
        c.close()
        with self.assertRaises(ferry.ConnectionLost):
            c.stats()
        c.close()  # idempotent


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

    def serve(self, after_hello):
        d = tempfile.mkdtemp(prefix="ferry-fake-")
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self.addCleanup(listener.close)

        def run():
            conn, _ = listener.accept()
            with conn:
                head = wire.unpack_header(_recv_all(conn, wire.HEADER_LEN))
                _recv_all(conn, head.body_len)
                welcome = messages.Welcome(
                    1, messages.OPEN_PATH, 7, "fake", wire.MAX_BODY_LEN, 16,
                    messages.DeviceSummary("host", "fake", "fake-0", 1 << 20, 1 << 20))
                conn.sendall(_frame(welcome, head.request_id))
                after_hello(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.addCleanup(t.join, 10)
        return path

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


def _recv_all(conn, n):
    buf = b""
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf


def _frame(msg, request_id):
    body = wire.encode(msg)
    return wire.pack_header(msg.KIND, request_id, len(body)) + body


if __name__ == "__main__":
    unittest.main()
