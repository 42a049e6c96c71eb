"""Load test for examples/inference_service.py: valid load alongside slow and abusive clients.

usage: python examples/load_test.py [--threads 8] [--requests 400] [--slow-clients 10]
           [--request-timeout 2] [--time-limit 60] [--max-connections N] [--max-requests N]
           [--url http://127.0.0.1:PORT --checkpoint bn.ckpt [--pid PID]]

Without --url it saves a random inference-mode ``cbn.BatchNorm2d`` to a
temporary directory, starts the service on 127.0.0.1 (``--port 0``, with
--request-timeout and caps with room for every client of the test), and stops
it at the end; with --url it tests a running service, whose checkpoint it must
be given (and --request-timeout, --max-connections, --max-requests and
--max-bytes where they are not the service's defaults: it refuses to run when
those caps leave no room for its own clients).  Only loopback URLs are
accepted: every client here talks to the loopback interface and nowhere else.

Valid load: --threads client threads, each on one HTTP/1.1 connection, send
--requests requests in all; every answer is checked against a direct call of
the same layer in this process, bit for bit; every --invalid-every'th request
is deliberately invalid (malformed JSON, a wrong channel count, a wrong dtype,
...) and must get a 4xx JSON error.  A 503 (the service busy) is retried, at
most --retries times, and counted.

Slow and abusive clients, --slow-clients of each kind, at the same time: a
slowloris trickling its headers, stalled bodies (408 expected), oversize bodies
(413), repeated and conflicting Content-Length (400), malformed request lines
(400), an oversized head (431), clients that disconnect mid-body or before
their answer (nothing expected but one line each in the service's log), and a
burst of --max-connections + 16 idle connections (503 beyond the cap).  Each
row says what came back and how long it took.

Everything is bounded: counts as given, every socket has a timeout, and the
test stops by itself after --time-limit seconds.  It prints throughput,
latency percentiles, the service's memory (RSS before, after and at its peak,
from /proc; a running service needs --pid), the service log's disconnect lines
and tracebacks (when it started the service), and exits with status 1 if any
answer or outcome was wrong.
"""
import argparse
import http.client
import ipaddress
import itertools
import json
import os
import queue
import re
import select
import socket
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


def run_load(host, port, requests, threads, time_limit, retries=50, request_timeout=30.0,
             ready=None):
    """Send every request from ``threads`` threads, retrying 503s.

    Returns (latencies of the answers kept, problems, seconds, answered, retried).
    Each thread opens its connection first, then waits on ``ready`` (an Event) if given.
    """
    pending = queue.SimpleQueue()
    for index in range(len(requests)):
        pending.put(index)
    latencies, errors, retried, lock = [], [], [0], threading.Lock()
    deadline = time.monotonic() + time_limit
    connected = threading.Barrier(threads + 1)

    def client():
        connection = http.client.HTTPConnection(host, port, timeout=request_timeout)
        try:
            try:
                connection.connect()
            except OSError:
                pass  # connects again on the first request
            connected.wait()
            if ready is not None:
                ready.wait()
            while time.monotonic() < deadline:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
                name, body, expected_status, expected = requests[index]
                for attempt in range(retries + 1):
                    start = time.perf_counter()
                    try:
                        connection.request("POST", "/normalize", body,
                                           {"Content-Type": "application/json"})
                        response = connection.getresponse()
                        payload = response.read()
                        status = response.status
                    except (OSError, http.client.HTTPException) as exc:
                        connection.close()  # the next request opens a new connection
                        # a connection refused at the cap may be closed before we write
                        status = "refused" if isinstance(exc, (BrokenPipeError,
                                                               ConnectionResetError)) else None
                        problem = f"{name}: request failed: {type(exc).__name__}: {exc}"
                    else:
                        problem = None
                    elapsed = time.perf_counter() - start
                    if status in (503, "refused") and attempt < retries \
                            and time.monotonic() < deadline:
                        connection.close()  # the service closed it (busy, or too many)
                        with lock:
                            retried[0] += 1
                        time.sleep(0.02 * (attempt + 1))
                        continue
                    if problem is None:
                        problem = check(name, status, payload, expected_status, expected)
                    with lock:
                        latencies.append(elapsed)
                        if problem:
                            errors.append(problem)
                    break
        finally:
            connection.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    connected.wait()
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()) + request_timeout)
    seconds = time.perf_counter() - started
    with lock:
        return list(latencies), list(errors), seconds, len(latencies), retried[0]


# ---------------------------------------------------------------- slow and abusive clients

def read_answer(sock, deadline):
    """What the service sent on ``sock`` before closing it: '408', ..., 'closed', 'timeout'.

    A status is reported only with a JSON {"error": ...} body; reading stops at the
    end of the body or when the service closes the connection.
    """
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            if match and len(body) >= int(match.group(1)):
                break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return "timeout"
        except OSError:  # reset: what came before it still counts
            chunk = b""
        if not chunk:
            break
        data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    if not match:
        return "closed" if not data else "not HTTP"
    try:
        error = json.loads(data.partition(b"\r\n\r\n")[2]).get("error")
    except (ValueError, AttributeError):
        error = None
    return match.group(1).decode() if isinstance(error, str) else \
        f"{match.group(1).decode()} without a JSON error"


def _request_head(length, extra=b"", target=b"/normalize"):
    return (b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: " + str(length).encode() + b"\r\n" + extra +
            b"\r\n")


def _send_until_answered(sock, chunks, pace, deadline):
    """Send ``chunks`` one by one, ``pace`` seconds apart, until the service answers."""
    for chunk in chunks:
        if time.monotonic() > deadline:
            return
        if select.select([sock], [], [], pace)[0]:
            return  # it answered (or closed): stop sending
        try:
            sock.sendall(chunk)
        except OSError:
            return


def abusive_clients(valid_body, max_bytes, request_timeout):
    """[(kind, expected outcomes, behaviour(sock, deadline) -> outcome)] for one client each."""
    half = valid_body[: len(valid_body) // 2]
    big = json.dumps({"shape": [16, 16, 8, 8], "data": [0.25] * 16 ** 2 * 8 ** 2}).encode()

    def slowloris(sock, deadline):
        sock.sendall(b"POST /normalize HTTP/1.1\r\n")
        _send_until_answered(sock, (bytes([b]) for b in itertools.cycle(b"X-Slow: a\r\n")),
                             0.2, deadline)
        return read_answer(sock, deadline)

    def stalled_body(sock, deadline):
        sock.sendall(_request_head(len(valid_body)) + half)
        return read_answer(sock, deadline)

    def oversize(sock, deadline):
        sock.sendall(_request_head(max_bytes + 1))
        piece = b"0" * 65536
        _send_until_answered(sock, itertools.repeat(piece, max_bytes // len(piece) + 1), 0,
                             deadline)
        return read_answer(sock, deadline)

    def send_and_read(data):
        def behaviour(sock, deadline):
            sock.sendall(data)
            return read_answer(sock, deadline)
        return behaviour

    def send_and_leave(data):
        def behaviour(sock, deadline):
            sock.sendall(data)
            return "disconnected"
        return behaviour

    n = str(len(valid_body)).encode()
    return [
        ("slowloris (a head byte per 0.2 s)", {"408"}, slowloris),
        ("stalled body (half sent)", {"408"}, stalled_body),
        (f"oversize body (> {max_bytes} B)", {"413"}, oversize),
        ("repeated Content-Length", {"400"},
         send_and_read(_request_head(len(valid_body), b"Content-Length: " + n + b"\r\n") +
                       valid_body)),
        ("conflicting Content-Length", {"400"},
         send_and_read(_request_head(len(valid_body), b"Content-Length: 3\r\n") + valid_body)),
        ("Content-Length list", {"400"},
         send_and_read(_request_head(len(valid_body)).replace(b"Length: " + n, b"Length: " + n +
                                                              b", " + n) + valid_body)),
        ("chunked and Content-Length", {"400"},
         send_and_read(_request_head(5, b"Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n")),
        ("malformed request line", {"400"}, send_and_read(b"POST /normalize HTTP/9\r\n\r\n")),
        ("malformed header", {"400"},
         send_and_read(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n")),
        ("oversized head (20 KiB)", {"431"},
         send_and_read(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20480 +
                       b"\r\n\r\n")),
        ("disconnect mid-body", {"disconnected"},
         send_and_leave(_request_head(len(valid_body)) + half)),
        ("disconnect before the answer", {"disconnected"},
         send_and_leave(_request_head(len(big)) + big)),
    ]


def run_abuse(host, port, kinds, count, flood, request_timeout, start, results):
    """Run ``count`` clients of every kind and a ``flood`` of idle connections; fill results.

    Each kind's clients connect before ``start`` is set, so the flood (which connects
    after it) does not take their places.  results[kind] = [(outcome, seconds)].
    """
    deadline_after = request_timeout + 10
    lock = threading.Lock()
    connected = threading.Barrier(len(kinds) * count + 1)

    def one(kind, behaviour):
        t0 = time.monotonic()
        try:
            sock = socket.create_connection((host, port), timeout=deadline_after)
        except OSError as exc:
            outcome, sock = f"connect failed: {type(exc).__name__}", None
        connected.wait()
        start.wait()
        if sock is not None:
            t0 = time.monotonic()
            try:
                outcome = behaviour(sock, t0 + deadline_after)
            except OSError as exc:
                outcome = f"{type(exc).__name__}"
            finally:
                sock.close()
        with lock:
            results.setdefault(kind, []).append((outcome, time.monotonic() - t0))

    def burst():
        start.wait()
        socks, t0 = [], time.monotonic()
        for _ in range(flood):
            try:
                socks.append(socket.create_connection((host, port), timeout=deadline_after))
            except OSError:
                pass
        outcomes = []
        for sock in socks:  # silent: each gets 503 at once, or 408 at the deadline
            outcomes.append((read_answer(sock, t0 + deadline_after), time.monotonic() - t0))
            sock.close()
        outcomes += [("connect failed", 0.0)] * (flood - len(socks))
        with lock:
            results[f"{flood} idle connections at once"] = outcomes

    threads = [threading.Thread(target=one, args=(kind, behaviour), daemon=True)
               for kind, _, behaviour in kinds for _ in range(count)]
    if flood:
        threads.append(threading.Thread(target=burst, daemon=True))
    for thread in threads:
        thread.start()
    connected.wait()
    return threads


def summarize(outcomes):
    counts = {}
    for outcome, _ in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} x {outcome}" for outcome, n in sorted(counts.items()))


# ---------------------------------------------------------------- the service process

def memory_mb(pid):
    """{'rss': MB now, 'peak': MB at most so far} of process ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {"rss": int(fields["VmRSS"].split()[0]) / 1024,
                "peak": int(fields["VmHWM"].split()[0]) / 1024}
    except (OSError, KeyError, ValueError):
        return None


def start_service(checkpoint, *options, log=None, timeout=30.0):
    """(process, port) of the service started on 127.0.0.1 with a free port."""
    process = subprocess.Popen([sys.executable, SERVICE, "--checkpoint", checkpoint,
                                "--port", "0", *options], stdout=subprocess.PIPE,
                               stderr=log, text=True)
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
        process.wait(timeout=30)
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
    path = os.path.join(directory, "bn.ckpt")
    cbn.save(path, layer.eval())
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--requests", type=int, default=400, help="requests in all (default 400)")
    parser.add_argument("--invalid-every", type=int, default=10,
                        help="every Nth request is invalid and must get a 4xx (0: none)")
    parser.add_argument("--slow-clients", type=int, default=10,
                        help="slow or abusive clients of each kind (default 10; 0: none)")
    parser.add_argument("--retries", type=int, default=50,
                        help="times a valid request answered 503 is sent again (default 50)")
    parser.add_argument("--time-limit", type=float, default=60.0,
                        help="seconds before the test stops and fails (default 60)")
    parser.add_argument("--request-timeout", type=float, default=2.0,
                        help="the service's --request-timeout (default 2 when started here)")
    parser.add_argument("--max-connections", type=int,
                        help="the service's --max-connections (default when started here: "
                             "room for every client of the test but the burst; else 64)")
    parser.add_argument("--max-requests", type=int,
                        help="the service's --max-requests (default when started here: room "
                             "for every client of the test; else 16)")
    parser.add_argument("--max-bytes", type=int, default=4 << 20,
                        help="the service's --max-bytes (default 4 MiB)")
    parser.add_argument("--url", help="a running service, http://127.0.0.1:PORT")
    parser.add_argument("--checkpoint", help="the running service's checkpoint (with --url)")
    parser.add_argument("--pid", type=int, help="the running service's process id (memory)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.requests < 1 or args.time_limit <= 0 or args.invalid_every < 0 \
            or args.slow_clients < 0 or args.retries < 0 or args.request_timeout <= 0:
        parser.error("--threads, --requests, --time-limit and --request-timeout must be "
                     "positive; --invalid-every, --slow-clients and --retries not negative")
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
        valid_body = next(body for name, body, _, _ in requests if name == "valid") \
            if any(name == "valid" for name, _, _, _ in requests) else _body(
                input_shape(layer, 1))
        kinds = abusive_clients(valid_body, args.max_bytes, args.request_timeout) \
            if args.slow_clients else []
        needed = args.threads + len(kinds) * args.slow_clients + 16
        if args.max_connections is None:
            args.max_connections = 64 if args.url else needed + 16
        if args.max_requests is None:
            args.max_requests = 16 if args.url else needed
        if args.max_connections < needed or args.max_requests < needed - 16:
            parser.error(f"--max-connections {args.max_connections} or --max-requests "
                         f"{args.max_requests} leaves no room for this test's {needed - 16} "
                         f"clients: give the service more, or lower --slow-clients or "
                         f"--threads")
        flood = args.max_connections + 16 if args.slow_clients else 0
        process, pid, log_path = None, args.pid, os.path.join(directory, "service.log")
        if not args.url:
            with open(log_path, "w") as log:
                process, port = start_service(
                    checkpoint, "--request-timeout", f"{args.request_timeout:g}",
                    "--max-connections", str(args.max_connections), "--max-requests",
                    str(args.max_requests), "--max-bytes",
                    str(args.max_bytes), log=log)
            host, pid = "127.0.0.1", process.pid
        try:
            before = memory_mb(pid) if pid else None
            start, abuse = threading.Event(), {}
            abusers = run_abuse(host, port, kinds, args.slow_clients, flood,
                                args.request_timeout, start, abuse)
            load = {}
            loader = threading.Thread(target=lambda: load.update(result=run_load(
                host, port, requests, args.threads, args.time_limit, args.retries,
                ready=start)), daemon=True)
            loader.start()
            time.sleep(0.2)  # the load's connections are open: let everyone go
            start.set()
            loader.join(args.time_limit + 35)
            for thread in abusers:
                thread.join(max(0.1, args.request_timeout + 12))
            time.sleep(0.5)  # the service logs the last disconnects
            after = memory_mb(pid) if pid else None
        finally:
            if process is not None:
                stop_service(process)
        service_log = open(log_path).read() if process is not None else None

    latencies, errors, seconds, sent, retried = load.get("result", ([], ["the load did not "
                                                                         "finish"], 0, 0, 0))
    invalid = sum(1 for _, _, status, _ in requests if status != 200)
    valid = len(requests) - invalid
    where = "service started by this test" if process is not None else "running service"
    print(f"cbn load test: {args.threads} threads, {args.requests} requests -> "
          f"http://{host}:{port}/normalize ({where})")
    print(f"layer: {layer!r}")
    print(f"service limits: request timeout {args.request_timeout:g} s, "
          f"{args.max_connections} connections, {args.max_requests} requests in progress, "
          f"{args.max_bytes}-byte bodies")
    print(f"requests: {sent} answered in {seconds:.2f} s = {sent / max(seconds, 1e-9):.1f} "
          f"requests/s ({valid} valid, {invalid} deliberately invalid), {retried} retried "
          f"after a 503 or a refused connection")
    if latencies:
        p50, p90, p99 = np.percentile(np.array(latencies) * 1e3, [50, 90, 99])
        print(f"latency: p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms")
    if sent < len(requests):
        errors.append(f"only {sent} of {len(requests)} requests answered within "
                      f"--time-limit {args.time_limit:g} s")
    if kinds or flood:
        print(f"slow and abusive clients, alongside the load:")
        print(f"  {'client':<36} {'count':>5}  {'expected':<14} {'got':<34} seconds p50/max")
        rows = [(kind, expected) for kind, expected, _ in kinds]
        if flood:
            rows.append((f"{flood} idle connections at once", {"503", "408"}))
        for kind, expected in rows:
            outcomes = abuse.get(kind, [])
            times = [t for _, t in outcomes] or [0.0]
            print(f"  {kind:<36} {len(outcomes):>5}  {'/'.join(sorted(expected)):<14} "
                  f"{summarize(outcomes):<34} {np.median(times):.2f}/{max(times):.2f}")
            wrong = [outcome for outcome, _ in outcomes if outcome not in expected]
            expected_count = flood if kind.endswith("at once") else args.slow_clients
            if wrong or len(outcomes) != expected_count:
                errors.append(f"{kind}: got {summarize(outcomes) or 'nothing'}, expected "
                              f"{expected_count} x {'/'.join(sorted(expected))}")
            if kind.endswith("at once"):
                refused = sum(outcome == "503" for outcome, _ in outcomes)
                if refused < 16:
                    errors.append(f"{kind}: only {refused} got 503; at least 16 are beyond "
                                  f"--max-connections {args.max_connections}")
    if before and after:
        print(f"memory (service RSS): before {before['rss']:.1f} MB, after {after['rss']:.1f} "
              f"MB, peak {after['peak']:.1f} MB")
    else:
        print("memory: not measured (a running service: give --pid)")
    if service_log is not None:
        tracebacks = service_log.count("Traceback")
        body_gone = service_log.count("disconnected while sending its request body")
        answer_gone = service_log.count("disconnected before its answer was sent")
        head_gone = service_log.count("disconnected while sending its request head")
        print(f"service log: {service_log.count(chr(10))} lines, {tracebacks} tracebacks; "
              f"disconnects logged: {body_gone} mid-body, {answer_gone} before the answer, "
              f"{head_gone} mid-head")
        if tracebacks:
            errors.append(f"the service printed {tracebacks} tracebacks:\n{service_log[-2000:]}")
        if kinds and body_gone != args.slow_clients:
            errors.append(f"{args.slow_clients} clients disconnected mid-body, the service "
                          f"logged {body_gone}")
        if kinds and answer_gone > args.slow_clients:
            errors.append(f"{args.slow_clients} clients left before their answer, the service "
                          f"logged {answer_gone}")
    failed = bool(errors)
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
