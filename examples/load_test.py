"""Load test for examples/inference_service.py: N client threads, a bounded number of requests.

usage: python examples/load_test.py [--threads 8] [--requests 400] [--time-limit 60]
                                    [--url http://127.0.0.1:PORT --checkpoint bn.npz]

Without --url it saves a random inference-mode ``cbn.BatchNorm2d`` to a
temporary directory, starts the service on 127.0.0.1 (``--port 0``), and
stops it at the end; with --url it tests a running service, whose checkpoint
it must be given.  Only loopback URLs are accepted.

Each thread keeps one HTTP/1.1 connection and sends requests until
--requests have been sent in all, or --time-limit seconds have passed.  Every
answer is checked against a direct call of the same layer in this process,
bit for bit; every --invalid-every'th request is deliberately invalid
(malformed JSON, a wrong channel count, a wrong dtype, ...) and must get a
4xx, after which the service must go on answering.  Prints throughput and
p50/p99 latency, and exits with status 1 if anything was wrong.
"""
import argparse
import http.client
import ipaddress
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

import numpy as np

import cbn

SERVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inference_service.py")

# Deliberately invalid requests: (what, body builder for a valid shape, status expected).
INVALID = [
    ("malformed JSON", lambda shape, axis: b'{"shape": [1, 2], "data": [1.0, ', 400),
    ("wrong channel count", lambda shape, axis: _body(_with(shape, axis, shape[axis] + 1)), 400),
    ("wrong dtype", lambda shape, axis: _body(shape, dtype="int32"), 400),
    ("not numbers", lambda shape, axis: _body(shape, fill="x"), 400),
    ("size does not match shape", lambda shape, axis: json.dumps(
        {"shape": shape, "data": [0.5] * (_prod(shape) - 1)}).encode(), 400),
    ("too many values", lambda shape, axis: json.dumps(
        {"shape": _with(shape, 0, 10 ** 9), "data": []}).encode(), 413),
]


def _with(shape, axis, size):
    shape = list(shape)
    shape[axis] = size
    return shape


def _prod(values):
    return int(np.prod(values))


def _body(shape, data=None, dtype=None, fill=0.5):
    """A request body; ``data`` defaults to ``fill`` repeated for every value of ``shape``."""
    request = {"shape": list(shape), "data": [fill] * _prod(shape) if data is None else data}
    if dtype is not None:
        request["dtype"] = dtype
    return json.dumps(request).encode()


def loopback_address(url):
    """(host, port) of a loopback http:// URL, or ValueError."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback or parts.port is None:
        raise ValueError(f"--url must be http://127.0.0.1:PORT (loopback only), got {url!r}")
    return host, parts.port


def input_shape(layer, batch):
    """A small input shape the layer accepts (channels last for MindSpore NHWC)."""
    spatial = {"BatchNorm1d": (6,), "BatchNorm2d": (4, 4), "BatchNorm3d": (2, 3, 3),
               "SyncBatchNorm": (6,)}[type(layer).__name__]
    if getattr(layer, "data_format", "NCHW") == "NHWC":
        return [batch, *spatial, layer.num_features]
    return [batch, layer.num_features, *spatial]


def make_requests(layer, count, invalid_every, seed=0):
    """[(name, body, expected status, expected output or None)], made before the clock starts."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(layer.dtype)
    requests = []
    for i in range(count):
        shape = input_shape(layer, int(rng.integers(1, 5)))
        if invalid_every and (i + 1) % invalid_every == 0:
            name, build, status = INVALID[(i // invalid_every) % len(INVALID)]
            channel_axis = -1 if getattr(layer, "data_format", "NCHW") == "NHWC" else 1
            requests.append((name, build(shape, channel_axis), status, None))
            continue
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        requests.append(("valid", _body(shape, x.ravel().tolist()), 200, layer(x)))
    return requests


def check(name, status, payload, expected_status, expected):
    """None if the answer is right, else what is wrong with it."""
    try:
        answer = json.loads(payload)
    except ValueError:
        return f"{name}: status {status}, body is not JSON: {payload[:100]!r}"
    if status != expected_status:
        return f"{name}: status {status}, expected {expected_status}: {answer}"[:300]
    if expected is None:
        return None if isinstance(answer.get("error"), str) else f"{name}: no error message"
    if answer.get("shape") != list(expected.shape) or answer.get("dtype") != expected.dtype.name:
        return (f"{name}: got shape {answer.get('shape')} {answer.get('dtype')}, expected "
                f"{list(expected.shape)} {expected.dtype.name}")
    got = np.array(answer["data"], dtype=np.float64).astype(expected.dtype).reshape(expected.shape)
    if not np.array_equal(got, expected):
        return (f"{name}: differs from the direct call by up to "
                f"{np.max(np.abs(got.astype(np.float64) - expected)):.3g}")
    return None


def run_load(host, port, requests, threads, time_limit, request_timeout=30.0):
    """Send every request from ``threads`` threads; returns (latencies, errors, seconds, sent)."""
    pending = queue.SimpleQueue()
    for index in range(len(requests)):
        pending.put(index)
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + time_limit

    def client():
        connection = http.client.HTTPConnection(host, port, timeout=request_timeout)
        try:
            while time.monotonic() < deadline:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                name, body, expected_status, expected = requests[index]
                start = time.perf_counter()
                try:
                    connection.request("POST", "/normalize", body,
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()  # the next request opens a new connection
                    problem = f"{name}: request failed: {type(exc).__name__}: {exc}"
                else:
                    problem = check(name, response.status, payload, expected_status, expected)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)
        finally:
            connection.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()) + request_timeout)
    seconds = time.perf_counter() - started
    with lock:
        return list(latencies), list(errors), seconds, len(latencies)


def start_service(checkpoint, timeout=30.0):
    """(process, port) of the service started on 127.0.0.1 with a free port."""
    process = subprocess.Popen([sys.executable, SERVICE, "--checkpoint", checkpoint,
                                "--port", "0"], stdout=subprocess.PIPE, text=True)
    lines = queue.SimpleQueue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        stop_service(process)
        raise RuntimeError(f"the service did not start (exit status {process.returncode}); "
                           f"it printed {line!r}")
    return process, int(match.group(1))


def stop_service(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def random_checkpoint(directory, channels=16, seed=1):
    """A BatchNorm2d with random parameters and statistics, in eval mode, saved with cbn.save."""
    rng = np.random.default_rng(seed)
    layer = cbn.BatchNorm2d(channels)
    layer.weight[...] = rng.uniform(0.5, 2.0, channels)
    layer.bias[...] = rng.uniform(-1, 1, channels)
    layer.running_mean[...] = rng.uniform(-1, 1, channels)
    layer.running_var[...] = rng.uniform(0.5, 2.0, channels)
    path = os.path.join(directory, "bn.npz")
    cbn.save(path, layer.eval())
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--requests", type=int, default=400, help="requests in all (default 400)")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="seconds before the test stops and fails (default 60)")
    parser.add_argument("--invalid-every", type=int, default=10,
                        help="every Nth request is invalid and must get a 4xx (0: none)")
    parser.add_argument("--url", help="a running service, http://127.0.0.1:PORT")
    parser.add_argument("--checkpoint", help="the running service's checkpoint (with --url)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.requests < 1 or args.time_limit <= 0 or args.invalid_every < 0:
        parser.error("--threads, --requests and --time-limit must be positive")
    if args.url and not args.checkpoint:
        parser.error("--url needs --checkpoint: the answers are checked against that layer")
    if args.url:
        try:
            host, port = loopback_address(args.url)
        except ValueError as exc:
            parser.error(str(exc))

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = args.checkpoint or random_checkpoint(directory)
        layer = cbn.load(checkpoint)
        layer = layer.set_train(False) if hasattr(layer, "set_train") else layer.eval()
        requests = make_requests(layer, args.requests, args.invalid_every)
        process = None
        if not args.url:
            process, port = start_service(checkpoint)
            host = "127.0.0.1"
        try:
            latencies, errors, seconds, sent = run_load(host, port, requests, args.threads,
                                                        args.time_limit)
        finally:
            if process is not None:
                stop_service(process)

    invalid = sum(1 for _, _, status, _ in requests if status != 200)
    valid = len(requests) - invalid
    where = "service started by this test" if process is not None else "running service"
    print(f"cbn load test: {args.threads} threads, {args.requests} requests -> "
          f"http://{host}:{port}/normalize ({where})")
    print(f"layer: {layer!r}")
    print(f"requests: {sent} answered in {seconds:.2f} s = {sent / seconds:.1f} requests/s "
          f"({valid} valid, {invalid} deliberately invalid)")
    if latencies:
        p50, p99 = np.percentile(np.array(latencies) * 1e3, [50, 99])
        print(f"latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
    failed = bool(errors) or sent < len(requests)
    if sent < len(requests):
        errors.append(f"only {sent} of {len(requests)} requests answered within "
                      f"--time-limit {args.time_limit:g} s")
    for problem in errors[:10]:
        print(f"  WRONG: {problem}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more")
    print(f"answers: {'all correct' if not failed else f'{len(errors)} WRONG'}: {valid} valid "
          f"answers checked bit for bit against a direct call, {invalid} invalid requests "
          f"expected a 4xx")
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
