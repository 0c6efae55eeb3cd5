"""The golden vectors of tests/fixtures/protocol/: every frame decodes to the values listed in
index.json, and encoding those values gives the same bytes."""

import json
import os
import re
import struct
import unittest

import _util  # noqa: F401  (puts the package on sys.path)
import ferry
from ferry import errors, messages, wire

FIXTURES = os.path.join(_util.repo_root(), "tests", "fixtures", "protocol")


def load_index():
    with open(os.path.join(FIXTURES, "index.json"), encoding="utf-8") as f:
        return json.load(f)


class GoldenVectors(unittest.TestCase):
    def setUp(self):
        self.index = load_index()
        self.vectors = self.index["vectors"]

    def test_index_constants(self):
        self.assertEqual(self.index["protocol_version"], wire.PROTOCOL_VERSION)
        self.assertEqual(self.index["header_len"], wire.HEADER_LEN)
        self.assertEqual(self.index["max_body_len"], wire.MAX_BODY_LEN)
        self.assertEqual(self.index["max_fds"], wire.MAX_FDS)

    def test_one_vector_per_kind(self):
        main = [v for v in self.vectors if v["variant"] is None]
        kinds = sorted(v["kind"] for v in main)
        self.assertEqual(kinds, sorted(messages.BY_KIND), "every message kind has a vector")
        files = [v["file"] for v in self.vectors]
        self.assertEqual(len(files), len(set(files)), "file names are unique")
        for v in self.vectors:
            cls = messages.BY_KIND[v["kind"]]
            self.assertEqual(cls.NAME, v["kind_name"])
            suffix = "" if v["variant"] is None else "." + v["variant"]
            self.assertEqual(v["file"], v["kind_name"] + suffix + ".bin")
            want_fds = {"none": [0], "one": [1], "at_most_one": [0, 1],
                        "some": list(range(17))}[cls.FDS]
            self.assertIn(v["fds"], want_fds, v["file"])

    def test_decode_and_reencode_every_vector(self):
        for v in self.vectors:
            with self.subTest(file=v["file"]):
                with open(os.path.join(FIXTURES, v["file"]), "rb") as f:
                    frame = f.read()
                header = wire.unpack_header(frame[:wire.HEADER_LEN])
                self.assertEqual(header.version, v["version"])
                self.assertEqual(header.kind, v["kind"])
                self.assertEqual(header.flags, v["flags"])
                self.assertEqual(header.request_id, v["request_id"])
                self.assertEqual(header.body_len, v["body_len"])
                self.assertEqual(len(frame), wire.HEADER_LEN + header.body_len)
                cls = messages.BY_KIND[header.kind]
                body = frame[wire.HEADER_LEN:]
                msg = wire.decode(cls, body)
                self.assertEqual(wire.to_json(cls, msg), v["fields"])
                if cls.FDS == "at_most_one":
                    self.assertEqual(msg.fds_expected, v["fds"], v["file"])
                # Encode the listed values (not the decoded object) and compare the bytes.
                again = wire.from_json(cls, v["fields"])
                self.assertEqual(again, msg)
                self.assertEqual(wire.encode(again), body)
                head = wire.pack_header(cls.KIND, v["request_id"], len(body), v["version"],
                                        v["flags"])
                self.assertEqual(head + wire.encode(again), frame)

    def test_every_policy_variant_has_a_vector(self):
        """Each Policy variant is decoded from some vector (set_residency.* and models.*)."""
        seen = set()
        for v in self.vectors:
            fields = v["fields"]
            policies = [fields.get("policy")] + [m["policy"] for m in fields.get("models", [])]
            for p in policies:
                if p is not None:
                    seen.add(p if isinstance(p, str) else next(iter(p)))
        self.assertEqual(seen, {cls.VARIANT for cls in messages.Policy.VARIANTS})

    def test_auto_and_presets_by_hand(self):
        """The new variants' bytes, written out here rather than by either encoder: model 1,
        no component, then the Policy index (Auto 5, Preset 6) and the Preset index."""
        cases = {
            "auto": (messages.PolicyAuto(), "05000000"),
            "lowvram": (messages.PolicyPreset(messages.Preset.LowVram), "0600000000000000"),
            "medvram": (messages.PolicyPreset(messages.Preset.MedVram), "0600000001000000"),
            "model": (messages.PolicyPreset(messages.Preset.Model), "0600000002000000"),
        }
        for name, (policy, tail) in cases.items():
            with self.subTest(name=name):
                body = wire.encode(messages.SetResidency(1, None, policy))
                self.assertEqual(body.hex(), "0100000000000000" + "00" + tail)
                with open(os.path.join(FIXTURES, f"set_residency.{name}.bin"), "rb") as f:
                    self.assertEqual(f.read()[wire.HEADER_LEN:], body)
                self.assertEqual(wire.decode(messages.SetResidency, body).policy, policy)
                self.assertEqual(ferry.make_policy(name), policy)

    def test_offload_by_hand(self):
        """offload / onload: model u64, then Option<String>; offloaded: bytes u64."""
        whole = wire.encode(messages.Offload(1, None))
        self.assertEqual(whole.hex(), "0100000000000000" + "00")
        one = wire.encode(messages.Onload(1, "vae"))
        self.assertEqual(one.hex(), "0100000000000000" + "01" + "0300000000000000" + b"vae".hex())
        self.assertEqual(wire.encode(messages.Offloaded(5)).hex(), "0500000000000000")
        for cls in (messages.Offload, messages.Onload, messages.Offloaded):
            self.assertIs(messages.BY_NAME[cls.NAME], cls)
        with open(os.path.join(FIXTURES, "offload.bin"), "rb") as f:
            self.assertEqual(f.read()[wire.HEADER_LEN:], whole)

    def test_devices_by_hand(self):
        """DeviceSel: u32 variant index (Index 0, Uuid 1), then a u32 or a string."""
        on = wire.encode(messages.OpenModelOn("/m", messages.DeviceIndex(1)))
        self.assertEqual(on.hex(), "0200000000000000" + b"/m".hex() + "00000000" + "01000000")
        fd_on = wire.encode(messages.OpenModelFdOn("", messages.DeviceUuid("HOST-0001")))
        self.assertEqual(fd_on.hex(), "0000000000000000" + "01000000" + "0900000000000000"
                         + b"HOST-0001".hex())
        arena_on = wire.encode(messages.MapArenaOn(messages.DeviceUuid("HOST-0001")))
        self.assertEqual(arena_on.hex(), "01000000" + "0900000000000000" + b"HOST-0001".hex())
        with open(os.path.join(FIXTURES, "map_arena_on.bin"), "rb") as f:
            self.assertEqual(f.read()[wire.HEADER_LEN:], arena_on)
        self.assertEqual(wire.encode(messages.ListDevices()), b"")
        self.assertEqual(messages.OpenModelFdOn.FDS, "one")
        self.assertEqual(messages.MapArenaOn.FDS, "none")
        # No DeviceSel variant 2.
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.MapArenaOn, struct.pack("<I", 2))
        # A DeviceEntry: both options absent, then numa_node and error present.
        entry = messages.DeviceEntry(3, "host:3", "HOST-0003", "host memory", 1 << 20, None,
                                     None, None, 2, 5)
        body = wire.encode(messages.Devices([entry]))
        self.assertEqual(body.hex(), (
            "0100000000000000" "03000000"
            "0600000000000000" + b"host:3".hex() + "0900000000000000" + b"HOST-0003".hex()
            + "0b00000000000000" + b"host memory".hex() + "0000100000000000"
            "00" "00" "00" "02000000" "05000000"))
        self.assertEqual(wire.decode(messages.Devices, body).devices, [entry])
        failed = messages.DeviceEntry(1, "cuda:1", "", "", 0, 7, "gone", None, 0)
        self.assertEqual(wire.decode(messages.Devices, wire.encode(messages.Devices([failed]))),
                         messages.Devices([failed]))

    def test_events_by_hand(self):
        """acquire_event: the fields of acquire; leased_event: a whole leased body (nested, no
        tag), then ready_event as a Vec<u8> (u64 length, the bytes)."""
        body = wire.encode(messages.AcquireEvent(1, "unet", 3))
        self.assertEqual(body, wire.encode(messages.Acquire(1, "unet", 3)))
        with open(os.path.join(FIXTURES, "acquire_event.bin"), "rb") as f:
            self.assertEqual(f.read()[wire.HEADER_LEN:], body)
        leased = messages.Leased(43, "down_blocks.0.", False, [messages.TensorDesc(
            "down_blocks.0.conv.bias", "F16", [320], 0x20000, 640)])
        handle = bytes(range(64, 128))
        body = wire.encode(messages.LeasedEvent(leased, handle))
        self.assertEqual(body, wire.encode(leased) + struct.pack("<Q", 64) + handle)
        with open(os.path.join(FIXTURES, "leased_event.bin"), "rb") as f:
            self.assertEqual(f.read()[wire.HEADER_LEN:], body)
        got = wire.decode(messages.LeasedEvent, body)
        self.assertEqual((got.leased, got.ready_event), (leased, handle))
        self.assertIsInstance(got.ready_event, bytes)
        ready = messages.Leased(44, "l", True, [])
        empty = wire.encode(messages.LeasedEvent(ready, b""))
        self.assertEqual(empty, wire.encode(ready) + b"\0" * 8)
        self.assertEqual(wire.decode(messages.LeasedEvent, empty).ready_event, b"")
        with self.assertRaises(errors.BadBody):  # a handle shorter than its length says
            wire.decode(messages.LeasedEvent, body[:-1])
        with self.assertRaises(errors.TrailingBytes):
            wire.decode(messages.LeasedEvent, body + b"\0")
        with self.assertRaises(TypeError):  # bytes(64) would be 64 zero bytes
            wire.encode(messages.LeasedEvent(ready, 64))
        self.assertEqual(messages.AcquireEvent.FDS, "none")
        self.assertEqual(messages.LeasedEvent.FDS, "none")
        self.assertEqual((messages.AcquireEvent.KIND, messages.LeasedEvent.KIND),
                         (0x0024, 0x8024))

    def test_golden_devices_reply(self):
        with open(os.path.join(FIXTURES, "devices.bin"), "rb") as f:
            frame = f.read()
        devs = wire.decode(messages.Devices, frame[wire.HEADER_LEN:]).devices
        self.assertEqual([d.index for d in devs], [0, 1])
        self.assertEqual(devs[0].numa_node, 1)
        self.assertIsNone(devs[0].error)
        self.assertEqual(devs[0].stats.budget, 64424509440)
        self.assertIsNone(devs[1].stats)
        self.assertIsNone(devs[1].numa_node)
        self.assertIn("out of memory", devs[1].error)
        self.assertEqual([d.waiting for d in devs], [2, 0])

    def test_device_selectors_and_ids(self):
        of = messages.DeviceSel.of
        self.assertEqual(of(1), messages.DeviceIndex(1))
        self.assertEqual(of(0), messages.DeviceIndex(0))
        self.assertEqual(of("HOST-0001"), messages.DeviceUuid("HOST-0001"))
        sel = messages.DeviceUuid("GPU-x")
        self.assertIs(of(sel), sel)
        for bad, exc in ((True, TypeError), (1.0, TypeError), (None, TypeError),
                         (-1, ValueError), (1 << 32, ValueError), ("", ValueError)):
            with self.subTest(device=bad):
                with self.assertRaises(exc) as cm:
                    of(bad)
                self.assertIn(repr(bad) if exc is TypeError else "device", str(cm.exception))
        self.assertEqual(messages.device_of((1 << 48) | 5), 1)
        self.assertEqual(messages.device_of(5), 0)
        self.assertEqual(messages.device_of((0xFFFF << 48) | 1), 0xFFFF)
        self.assertEqual(messages.ModelOpened((2 << 48) | 9, []).device, 2)
        self.assertEqual(wire.to_json(messages.DeviceSel, of(1)), {"Index": 1})
        self.assertEqual(wire.from_json(messages.DeviceSel, {"Uuid": "HOST-0000"}),
                         messages.DeviceUuid("HOST-0000"))

    def test_feature_bits_and_error_codes_mirror_the_rust_definitions(self):
        """Every feature bit of daemon/src/protocol/mod.rs and every code of codes.rs, by name
        and number, read from the Rust source itself."""
        proto = os.path.join(_util.repo_root(), "daemon", "src", "protocol")
        with open(os.path.join(proto, "mod.rs"), encoding="utf-8") as f:
            rust_bits = {name: 1 << int(bit) for name, bit in
                         re.findall(r"pub const (\w+): u64 = 1 << (\d+);", f.read())}
        self.assertIn("DEVICES", rust_bits)
        py_bits = {name: getattr(messages, name) for name in rust_bits}
        self.assertEqual(py_bits, rust_bits)
        self.assertEqual(messages.KNOWN_FEATURES, sum(rust_bits.values()))
        with open(os.path.join(proto, "codes.rs"), encoding="utf-8") as f:
            rust_codes = {int(code): name for code, name in
                          re.findall(r"^\s*\w+ = (\d+), \"(\w+)\";", f.read(), re.M)}
        self.assertEqual(rust_codes[220], "unknown_device")
        self.assertEqual({c: cls.name for c, cls in errors.BY_CODE.items()}, rust_codes)

    def test_worked_example_acquire(self):
        body = wire.encode(messages.Acquire(model=1, component="unet", layer=3))
        frame = wire.pack_header(messages.Acquire.KIND, 7, len(body)) + body
        self.assertEqual(frame.hex(), (
            "4652525901002000000000001800000007000000000000000100000000000000"
            "0400000000000000756e657403000000"))


class BodyErrors(unittest.TestCase):
    """The decoder treats every byte as untrusted (section 4)."""

    def test_trailing_bytes(self):
        body = wire.encode(messages.Ready(lease=5)) + b"\0"
        with self.assertRaises(errors.TrailingBytes):
            wire.decode(messages.Ready, body)

    def test_short_body(self):
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.Ready, b"\1\0\0")

    def test_bad_bool_option_enum_utf8_and_lengths(self):
        leased = wire.encode(messages.Leased(1, "l", True, []))
        bad_bool = leased[:17] + b"\x02" + leased[18:]
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.Leased, bad_bool)
        sr = bytearray(wire.encode(messages.SetResidency(1, None, messages.PolicyNone())))
        sr[8] = 2  # option tag
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.SetResidency, bytes(sr))
        sr[8] = 0
        sr[9:13] = struct.pack("<I", 7)  # no Policy variant 7
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.SetResidency, bytes(sr))
        preset = wire.encode(messages.SetResidency(
            1, None, messages.PolicyPreset(messages.Preset.Model)))
        with self.assertRaises(errors.BadBody):  # no Preset variant 3
            wire.decode(messages.SetResidency, preset[:-4] + struct.pack("<I", 3))
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.OpenModel, struct.pack("<Q", 2) + b"\xff\xfe")
        with self.assertRaises(errors.BadBody):  # a length far past the body
            wire.decode(messages.OpenModel, struct.pack("<Q", 1 << 60))
        with self.assertRaises(errors.BadBody):
            wire.decode(messages.Models, struct.pack("<Q", 1 << 40))

    def test_header_checks(self):
        good = wire.pack_header(messages.Stats.KIND, 1, 0)
        with self.assertRaises(errors.BadMagic):
            wire.unpack_header(b"FRRX" + good[4:])
        with self.assertRaises(errors.UnsupportedVersion):
            wire.unpack_header(good[:4] + b"\0\0" + good[6:])
        with self.assertRaises(errors.ReservedFlags):
            wire.unpack_header(good[:8] + struct.pack("<I", 2) + good[12:])
        with self.assertRaises(errors.FrameTooLarge):
            wire.unpack_header(good[:12] + struct.pack("<I", wire.MAX_BODY_LEN + 1) + good[16:])

    def test_error_mapping(self):
        e = errors.from_code(205, "no model 9")
        self.assertIsInstance(e, errors.UnknownModel)
        self.assertIsInstance(e, errors.RequestError)
        self.assertEqual((e.code, e.message), (205, "no model 9"))
        self.assertIsInstance(errors.from_code(199, "x"), errors.ProtocolError)
        self.assertIsInstance(errors.from_code(250, "x"), errors.RequestError)
        self.assertIsInstance(errors.from_code(300, "x"), errors.ConnectionLost)
        self.assertIsInstance(errors.from_code(106, "x"), errors.BadBody)
        e = errors.from_code(220, "no device 5")
        self.assertIsInstance(e, errors.UnknownDevice)
        self.assertIsInstance(e, errors.RequestError)
        self.assertIs(ferry.UnknownDevice, errors.UnknownDevice)
        e = errors.from_code(221, "device 1 failed to open: out of memory")
        self.assertIsInstance(e, ferry.DeviceUnavailable)
        self.assertEqual(str(e), "[221 device_unavailable] device 1 failed to open: out of memory")
        self.assertFalse(errors.is_fatal(220) or errors.is_fatal(221))
        self.assertEqual(len({c for c in errors.BY_CODE}), 34)


class PolicyNames(unittest.TestCase):
    """make_policy (behind Client.set_residency): names, case, parameters, errors."""

    def test_names_any_case(self):
        mp = ferry.make_policy
        self.assertEqual(mp("auto"), messages.PolicyAuto())
        self.assertEqual(mp(" AUTO "), messages.PolicyAuto())
        self.assertEqual(mp("LowVRAM"), messages.PolicyPreset(messages.Preset.LowVram))
        self.assertEqual(mp("MedVram"), messages.PolicyPreset(messages.Preset.MedVram))
        self.assertEqual(mp("MODEL"), messages.PolicyPreset(messages.Preset.Model))
        self.assertEqual(mp("Sequential", lookahead=3), messages.Sequential(3))
        self.assertEqual(mp("balanced", threshold=0.5),
                         messages.Balanced(messages.Fraction(0.5)))
        self.assertEqual(mp("none"), messages.PolicyNone())
        # Parameters that do not apply are ignored, as for none and component.
        self.assertEqual(mp("lowvram", lookahead=5, threshold=0.5),
                         messages.PolicyPreset(messages.Preset.LowVram))
        self.assertEqual(mp("auto", threshold=1 << 20), messages.PolicyAuto())
        p = messages.PolicyPreset(messages.Preset.Model)
        self.assertIs(mp(p), p)

    def test_unknown_names_are_value_errors_naming_the_choices(self):
        for bad in ("", "fast", "low-vram", "med vram", "sequential:2"):
            with self.subTest(name=bad):
                with self.assertRaises(ValueError) as cm:
                    ferry.make_policy(bad)
                msg = str(cm.exception)
                self.assertIn(repr(bad), msg)
                for name in ("auto", "lowvram", "medvram", "model", "sequential"):
                    self.assertIn(name, msg)
        with self.assertRaises(TypeError):
            ferry.make_policy(5)

    def test_json_forms(self):
        self.assertEqual(wire.to_json(messages.Policy, messages.PolicyAuto()), "Auto")
        j = wire.to_json(messages.Policy, messages.PolicyPreset(messages.Preset.MedVram))
        self.assertEqual(j, {"Preset": {"preset": "MedVram"}})
        self.assertEqual(wire.from_json(messages.Policy, j),
                         messages.PolicyPreset(messages.Preset.MedVram))


class TorchImport(unittest.TestCase):
    """ferry.torch: ImportError saying what to install without torch; the integration with it
    (tested in test_torch.py)."""

    def test_torch_integration_imports_only_with_torch(self):
        import importlib

        try:
            importlib.import_module("torch")
        except ImportError:
            with self.assertRaises(ImportError) as cm:
                importlib.import_module("ferry.torch")
            self.assertIn("pip install torch", str(cm.exception))
            return
        ft = importlib.import_module("ferry.torch")
        self.assertTrue(callable(ft.attach))
        self.assertTrue(issubclass(ft.CudaSharingUnavailable, ft.FerryTorchError))


if __name__ == "__main__":
    unittest.main()
