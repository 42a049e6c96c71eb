"""A small HTTP JSON service that batch-normalises features with a layer saved by ``cbn.save``.

usage: python examples/inference_service.py --checkpoint bn.npz [--port 0]
                                            [--max-bytes 4194304] [--kernel-threads 1]

It loads one cbn layer (either flavour), puts it in inference mode (running
statistics; refused if it can only normalise with batch statistics), and
serves on 127.0.0.1 only -- it never listens on another address::

    POST /normalize  {"shape": [N, C, ...], "data": [N*C*... numbers, row-major],
                      "dtype": "float32"}            ("dtype" optional: the layer's)
                 ->  200 {"shape": [...], "dtype": "float32", "data": [...]}
    GET  /health     200 {"status": "ok", "layer": "...", "num_features": C}

An invalid request gets a JSON ``{"error": "..."}`` with a 4xx status and the
service keeps serving: 400 for malformed JSON, a wrong shape or channel count,
a dtype other than float32/float64, non-numbers or values that do not fit the
dtype; 404 for another path, 405 for another method, 411 without a
Content-Length, 413 for a body larger than --max-bytes.  Once bound it prints
``listening on http://127.0.0.1:PORT/`` (with ``--port 0`` the system picks the
port); SIGINT or SIGTERM stops it.

One layer serves every connection's thread at once: in eval mode a cbn layer
only reads its parameters and statistics, and its kernels release the GIL.
Each request's kernels run on --kernel-threads OpenMP threads (``cbn.threads``):
the server already runs one thread per connection, and threads x OpenMP
threads should not exceed the cores.
"""
import argparse
import json
import math
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import cbn

HOST = "127.0.0.1"  # loopback only, by design
DTYPES = ("float32", "float64")


class RequestError(Exception):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def inference_layer(path):
    """The layer saved at ``path``, in inference mode."""
    layer = cbn.load(path)
    if not hasattr(layer, "num_features"):
        raise ValueError(f"{path} holds {type(layer).__name__}, not a single cbn layer")
    if hasattr(layer, "moving_mean"):  # MindSpore flavour
        if layer.use_batch_statistics:
            raise ValueError(f"{layer!r} always normalises with batch statistics "
                             f"(use_batch_statistics=True): not an inference layer")
        return layer.set_train(False)
    if not layer.track_running_stats:
        raise ValueError(f"{layer!r} has no running statistics: not an inference layer")
    return layer.eval()


def parse_features(body, dtype, max_elements):
    """The array a request body describes, or RequestError(400) saying what is wrong."""
    def no_constants(name):
        raise ValueError(f"{name} is not a number JSON allows")
    try:
        request = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(request, dict) or not {"shape", "data"} <= set(request) \
            or not set(request) <= {"shape", "data", "dtype"}:
        raise RequestError(400, 'expected a JSON object {"shape": [...], "data": [...]} '
                                'with an optional "dtype"')
    shape, data = request["shape"], request["data"]
    dtype = request.get("dtype", dtype)
    if dtype not in DTYPES:
        raise RequestError(400, f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if not isinstance(shape, list) or not 2 <= len(shape) <= 5 or not all(
            type(n) is int and n >= 0 for n in shape):
        raise RequestError(400, f"shape must be a list of 2 to 5 non-negative integers, "
                                f"got {shape!r}"[:300])
    count = math.prod(shape)
    if count > max_elements:
        raise RequestError(413, f"shape {shape} has {count} values, more than the "
                                f"{max_elements} allowed")
    if not isinstance(data, list) or len(data) != count:
        got = f"{len(data)} values" if isinstance(data, list) else type(data).__name__
        raise RequestError(400, f"data must be a flat list of the {count} values of shape "
                                f"{shape}, got {got}")
    if not all(type(v) is float or type(v) is int for v in data):
        raise RequestError(400, "data must hold only numbers (no strings, booleans, nulls "
                                "or nested lists)")
    try:
        values = np.array(data, dtype=np.float64)
    except OverflowError:
        raise RequestError(400, "data holds an integer too large for a float") from None
    with np.errstate(over="ignore"):
        features = values.astype(dtype).reshape(shape)
    if not np.isfinite(features).all():
        raise RequestError(400, f"data holds values that do not fit in {dtype}")
    return features


class Handler(BaseHTTPRequestHandler):
    """POST /normalize and GET /health; the layer and limits live on the server."""

    protocol_version = "HTTP/1.1"       # keep-alive: a client reuses its connection
    server_version = "cbn-inference/1"
    timeout = 30                        # seconds a connection may stall before it is dropped
    disable_nagle_algorithm = True      # else headers and body, written apart, wait for an ACK

    def do_GET(self):
        if self.path == "/health":
            layer = self.server.layer
            self._answer(200, {"status": "ok", "layer": repr(layer),
                               "num_features": layer.num_features})
        elif self.path == "/normalize":
            self._answer(405, {"error": "use POST for /normalize"}, {"Allow": "POST"})
        else:
            self._answer(404, {"error": f"no such path {self.path!r}: POST /normalize or "
                                        f"GET /health"})

    def do_POST(self):
        try:
            if self.path != "/normalize":
                self.close_connection = True  # the body stays unread
                raise RequestError(404, f"no such path {self.path!r}: POST /normalize")
            features = parse_features(self._body(), self.server.dtype,
                                      self.server.max_bytes // 2)
            try:
                with cbn.threads(self.server.kernel_threads):
                    output = self.server.layer(features)
            except (TypeError, ValueError) as exc:  # wrong rank or channel count
                raise RequestError(400, str(exc)) from None
            if not np.isfinite(output).all():
                raise RequestError(422, f"the result does not fit in {output.dtype}")
        except RequestError as exc:
            self._answer(exc.status, {"error": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - a bug answers 500; the service goes on
            self.close_connection = True
            self._answer(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            raise
        self._answer(200, {"shape": list(output.shape), "dtype": output.dtype.name,
                           "data": output.ravel().tolist()})

    def do_PUT(self):
        self.close_connection = True  # the body stays unread
        self._answer(405, {"error": f"method {self.command} not allowed"},
                     {"Allow": "GET, POST"})

    do_DELETE = do_PATCH = do_PUT

    def _body(self):
        """The request body, within the size limit (the connection closes on refusal)."""
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length[:40]!r}")
        length = int(length)
        if length > self.server.max_bytes:
            # The body is left unread, so this connection cannot carry another request.
            self.close_connection = True
            raise RequestError(413, f"request body of {length} bytes is larger than the "
                                    f"{self.server.max_bytes} allowed")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise RequestError(400, f"request body ended after {len(body)} of {length} bytes")
        return body

    def _answer(self, status, payload, headers=None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True      # a stalled client never blocks shutdown
    request_queue_size = 128   # many clients connecting at once wait instead of retrying

    def __init__(self, layer, port=0, max_bytes=4 << 20, kernel_threads=1, verbose=False):
        self.layer = layer
        self.dtype = np.dtype(layer.dtype).name
        self.max_bytes = max_bytes
        self.kernel_threads = kernel_threads
        self.verbose = verbose
        super().__init__((HOST, port), Handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a file written by cbn.save")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--max-bytes", type=int, default=4 << 20,
                        help="largest request body accepted (default 4 MiB)")
    parser.add_argument("--kernel-threads", type=int, default=1,
                        help="OpenMP threads per request (default 1)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if args.max_bytes < 1 or args.kernel_threads < 1:
        parser.error("--max-bytes and --kernel-threads must be positive")
    try:
        layer = inference_layer(args.checkpoint)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"inference_service: cannot serve {args.checkpoint}: {exc}\n")
    server = InferenceServer(layer, args.port, args.max_bytes, args.kernel_threads,
                             args.verbose)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"listening on http://{HOST}:{server.server_address[1]}/ serving {layer!r}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
