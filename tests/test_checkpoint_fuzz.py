"""Checkpoint fuzzing (slow): every truncation, byte flips, size bombs, races, kill -9.

Each test prints its counts (``pytest -s -m slow tests/test_checkpoint_fuzz.py``).
"""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors.numpy

import cbn
import cbn.mindspore as ms
from cbn.checkpoint import CheckpointError
from test_checkpoint import (SUBPROCESS_ENV, description, forged, peak_allocation, randomised,
                             rewrite, size_bombs, temporaries)

pytestmark = pytest.mark.slow


def report(line):
    print(f"\ncheckpoint fuzz: {line}", flush=True)


def samples(tmp_path, rng):
    """(name, path, what loading it must give) for one file of each kind."""
    made = {
        "layer": randomised(ms.BatchNorm2d(3), rng),
        "layers": {"a": randomised(cbn.BatchNorm2d(2), rng),
                   "b": randomised(ms.BatchNorm1d(2), rng),
                   "c": randomised(cbn.SyncBatchNorm(2, momentum=None).eval(), rng)},
        "state": {"w": np.arange(3, dtype=np.float32), "n": np.int64(7),
                  "flags": np.array([True, False])},
    }
    out = []
    for name, obj in made.items():
        path = tmp_path / f"{name}.st"
        cbn.save(path, obj)
        out.append((name, path, obj))
    plain = tmp_path / "plain.st"  # as safetensors.torch.save_file writes a state dict
    safetensors.numpy.save_file({"bn.weight": np.ones(3, np.float32),
                                 "bn.num_batches_tracked": np.array(4, np.int64)}, plain,
                                metadata={"format": "pt"})
    out.append(("plain", plain, cbn.load(plain)))
    return out


def same(loaded, expected):
    if isinstance(expected, dict) and all(isinstance(v, np.ndarray) or np.isscalar(v)
                                          for v in expected.values()):
        return isinstance(loaded, dict) and list(loaded) == list(expected) and all(
            loaded[k].dtype == np.asarray(v).dtype and loaded[k].shape == np.shape(v)
            and loaded[k].tobytes() == np.asarray(v).tobytes() for k, v in expected.items())
    if isinstance(expected, dict):
        return isinstance(loaded, dict) and list(loaded) == list(expected) and all(
            same(loaded[k], v) for k, v in expected.items())
    return type(loaded) is type(expected) and description(loaded) == description(expected)


def test_every_truncation_is_refused(tmp_path, rng):
    total = 0
    for name, path, _ in samples(tmp_path, rng):
        data = path.read_bytes()
        cut = tmp_path / "cut.st"
        for length in range(len(data)):
            cut.write_bytes(data[:length])
            with pytest.raises(CheckpointError, match=str(cut)):
                cbn.load(cut)
            total += 1
    report(f"truncations: {total} tried, {total} refused with CheckpointError")


def test_every_byte_flip_is_refused_or_harmless(tmp_path, rng):
    """Every byte, three masks: a CheckpointError or the identical layer (cbn files carry a
    digest).  A plain safetensors file has none: a flip in its names or data changes them."""
    masks = [0x01, 0x20, 0xFF]
    counts = {"flips": 0, "refused": 0, "identical": 0, "plain file changed": 0}
    for name, path, expected in samples(tmp_path, rng):
        data = path.read_bytes()
        data_start = 8 + int.from_bytes(data[:8], "little")  # where the arrays' bytes begin
        bad = tmp_path / "bad.st"
        for position in range(len(data)):
            for mask in masks:
                bad.write_bytes(data[:position] + bytes([data[position] ^ mask])
                                + data[position + 1:])
                counts["flips"] += 1
                try:
                    loaded = cbn.load(bad)
                except CheckpointError:
                    counts["refused"] += 1
                    continue
                if same(loaded, expected):
                    counts["identical"] += 1
                else:
                    # safetensors has no checksum: a flip in a plain file's names or data
                    # loads, changed, but still as arrays of the sizes the header declares.
                    assert name == "plain" and isinstance(loaded, dict), (name, position, mask)
                    assert sum(a.nbytes for a in loaded.values()) == len(data) - data_start
                    counts["plain file changed"] += 1
    report("byte flips: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert counts["refused"] > 0.9 * counts["flips"]


def test_size_bombs_and_forged_channel_counts(tmp_path):
    bombs = list(size_bombs(tmp_path))
    cbn.save(tmp_path / "ok.st", cbn.BatchNorm2d(3))
    raw = (tmp_path / "ok.st").read_bytes()
    for bit in range(64):  # every power of two as the header length
        bombs.append((f"header length 2**{bit}", (1 << bit).to_bytes(8, "little") + raw[8:]))
    for make in [lambda: cbn.BatchNorm1d(3), lambda: ms.BatchNorm3d(3),
                 lambda: cbn.SyncBatchNorm(3), lambda: ms.SyncBatchNorm(3)]:
        for c in [3 * 10 ** 8, 10 ** 13, 2 ** 62, 2 ** 80]:
            for keep in [(), ("weight",), ("gamma",)]:
                path, document = forged(tmp_path, make, keep)
                document["layers"][0]["config"]["num_features"] = c
                rewrite(path, lambda d: (d.clear(), d.update(document)), resign=True)
                bombs.append((f"num_features={c} keeping {keep}", path.read_bytes()))
    worst, largest = 0, 0
    for name, content in bombs:
        path = tmp_path / "bomb.st"
        path.write_bytes(content)
        error, peak = peak_allocation(lambda: cbn.load(path))
        assert isinstance(error, CheckpointError), (name, error)
        worst, largest = max(worst, peak), max(largest, len(content))
        assert peak < 16 * len(content) + (1 << 20), (name, peak)
    report(f"bombs: {len(bombs)} forged files of at most {largest} bytes, {len(bombs)} refused "
           f"with CheckpointError; peak Python allocation at most {worst / 1024:.0f} KiB")


def test_a_header_of_many_empty_tensors_costs_a_bounded_multiple_of_its_size(tmp_path):
    """The one cost that grows with the file: Python objects for each header entry."""
    path = tmp_path / "many.st"
    safetensors.numpy.save_file({f"t{i}": np.zeros(0, np.float32) for i in range(30000)}, path)
    arrays, peak = peak_allocation(lambda: cbn.load(path))
    size = path.stat().st_size
    assert len(arrays) == 30000
    report(f"30000 empty tensors: file {size / 1e6:.1f} MB, peak Python allocation "
           f"{peak / 1e6:.1f} MB ({peak / size:.1f} x)")
    assert peak < 30 * size


RSS_SCRIPT = """
import sys, cbn

def peak_rss_kib():  # VmHWM: this process's own peak (ru_maxrss survives exec on Linux)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
cbn.load(sys.argv[2])  # warm up: imports, a valid file
before = peak_rss_kib()
try:
    cbn.load(sys.argv[1])
except cbn.checkpoint.CheckpointError as exc:
    outcome = "CheckpointError"
else:
    outcome = "loaded"
after = peak_rss_kib()
print(outcome, before, after)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's VmHWM")
def test_forged_files_do_not_raise_the_peak_rss(tmp_path):
    rows = []
    for make, c in [(lambda: cbn.BatchNorm2d(3), 3 * 10 ** 8),
                    (lambda: cbn.BatchNorm2d(3), 10 ** 13),
                    (lambda: ms.BatchNorm2d(3), 3 * 10 ** 8)]:
        path, document = forged(tmp_path, make)
        document["layers"][0]["config"]["num_features"] = c
        rewrite(path, lambda d: (d.clear(), d.update(document)), resign=True)
        bomb = tmp_path / f"bomb-{len(rows)}.st"
        os.replace(path, bomb)
        cbn.save(tmp_path / "ok.st", make())
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bomb),
                                 str(tmp_path / "ok.st")], env=SUBPROCESS_ENV, timeout=120,
                                capture_output=True, text=True)
        outcome, before, after = result.stdout.split()
        rows.append(f"{type(make()).__module__}.{type(make()).__name__} num_features={c}: "
                    f"{bomb.stat().st_size} bytes, {outcome}, peak RSS {int(before) / 1024:.1f}"
                    f" -> {int(after) / 1024:.1f} MB")
        assert outcome == "CheckpointError" and int(after) - int(before) < 10 * 1024, rows[-1]
    report("RSS on forged files:\n  " + "\n  ".join(rows))


# --- races ---------------------------------------------------------------------------------

def versions():
    small = randomised(cbn.BatchNorm1d(2), np.random.default_rng(1))
    big = {f"l{i}": randomised(ms.BatchNorm2d(256), np.random.default_rng(i)) for i in range(8)}
    return small, big


def check_version(loaded, small, big):
    assert same(loaded, small) or same(loaded, big)


def test_loaders_racing_savers_in_threads_never_see_an_error(tmp_path):
    path = tmp_path / "bn.st"
    small, big = versions()
    cbn.save(path, small)
    stop, loads, saves, errors = threading.Event(), [0], [0], []

    def save_loop():
        while not stop.is_set():
            cbn.save(path, big if saves[0] % 2 else small)
            saves[0] += 1

    def load_loop():
        while not stop.is_set():
            try:
                check_version(cbn.load(path), small, big)
            except Exception as exc:  # noqa: BLE001 - collected and reported
                errors.append(repr(exc))
            loads[0] += 1
    threads = [threading.Thread(target=save_loop), threading.Thread(target=save_loop)] + [
        threading.Thread(target=load_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(60)
    report(f"races (threads): {saves[0]} saves, {loads[0]} loads, {len(errors)} errors")
    assert not errors, errors[:3]
    assert temporaries(tmp_path) == []


SAVER = """
import sys, time, numpy as np, cbn, cbn.mindspore as ms
sys.path.insert(0, sys.argv[3])
from test_checkpoint_fuzz import versions
small, big = versions()
deadline, count = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < deadline:
    cbn.save(sys.argv[1], big if count % 2 else small)
    count += 1
print(count)
"""


def test_loaders_racing_saver_processes_never_see_an_error(tmp_path):
    path = tmp_path / "bn.st"
    small, big = versions()
    cbn.save(path, small)
    tests = os.path.dirname(__file__)
    savers = [subprocess.Popen([sys.executable, "-c", SAVER, str(path), "5", tests],
                               env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    loads, errors = 0, []
    try:
        while any(saver.poll() is None for saver in savers):
            try:
                check_version(cbn.load(path), small, big)
            except Exception as exc:  # noqa: BLE001 - collected and reported
                errors.append(repr(exc))
            loads += 1
        saves = sum(int(saver.communicate(timeout=60)[0]) for saver in savers)
    finally:
        for saver in savers:
            saver.kill()
            saver.wait(timeout=30)
    report(f"races (processes): {saves} saves in 2 processes, {loads} loads, "
           f"{len(errors)} errors")
    assert not errors, errors[:3]
    assert saves > 10 and loads > 10


KILLED_SAVER = """
import sys, numpy as np, cbn
layers = {f"l{i}": cbn.BatchNorm2d(400000) for i in range(4)}
count = 0
while True:
    for layer in layers.values():
        layer.running_mean[...] = count
    cbn.save(sys.argv[1], layers)
    count += 1
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL")
def test_kill_9_during_saves_leaves_a_valid_file_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "bn.st"
    generator = random.Random(0)
    kills, torn = 0, 0
    for attempt in range(12):
        saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(path)],
                                 env=SUBPROCESS_ENV)
        try:
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if attempt % 2:  # at a random moment
                time.sleep(generator.uniform(0.05, 0.6))
            else:  # while the temporary is being written
                while not temporaries(tmp_path) and time.monotonic() < deadline:
                    time.sleep(0.001)
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait(timeout=30)
        kills += 1
        loaded = cbn.load(path)  # the old or the new file, complete
        values = {float(layer.running_mean[0]) for layer in loaded.values()}
        assert len(values) == 1 and all(
            (layer.running_mean == layer.running_mean[0]).all() for layer in loaded.values())
        torn += len(temporaries(tmp_path))
        cbn.save(path, loaded)  # removes the dead saver's temporaries
        assert temporaries(tmp_path) == []
    report(f"kill -9: {kills} savers killed mid-loop, every file loaded whole, "
           f"{torn} torn temporaries left behind and removed by the next save")
    assert kills == 12 and torn > 0
