"""An HTTP JSON service that batch-normalises features with a layer saved by ``cbn.save``.

usage: python examples/inference_service.py --checkpoint bn.ckpt [--port 0]
           [--max-bytes 4194304] [--max-connections 64] [--max-requests 16]
           [--workers 2] [--request-timeout 10] [--keep-alive 5] [--kernel-threads 1]

Needs the ``examples`` extra (``pip install 'cbn[examples]'``: Starlette and
uvicorn).  It loads one cbn layer (either flavour), puts it in inference mode
(running statistics; refused if it can only normalise with batch statistics),
and serves on 127.0.0.1 only -- it never listens on another address::

    POST /normalize  {"shape": [N, C, ...], "data": [N*C*... numbers, row-major],
                      "dtype": "float32"}            ("dtype" optional: the layer's)
                 ->  200 {"shape": [...], "dtype": "float32", "data": [...]}
    GET  /health     200 {"status": "ok", "layer": "...", "num_features": C}

Every refusal is a JSON ``{"error": "..."}`` and the service keeps serving:

    400  malformed HTTP (h11's verdict, e.g. conflicting Content-Length), more than
         one Content-Length value (repeated, even if equal), Transfer-Encoding
         together with Content-Length, malformed JSON, a wrong shape or channel
         count, a dtype other than float32/float64, non-numbers, values that do
         not fit the dtype
    404  another path;  405  another method;  411  a body without Content-Length
    408  the request (request line, headers and body) did not arrive whole within
         --request-timeout seconds of its first byte (or of the connection opening)
    413  a body larger than --max-bytes;  431  headers larger than 16 KiB
    503  more than --max-connections connections open, or more than --max-requests
         requests in progress (``Retry-After: 1``)

A refusal that leaves the request unread closes the connection; other answers
keep it alive for --keep-alive idle seconds.  A client that disconnects before
its answer costs one log line on stderr, never a traceback.  Once bound it
prints ``listening on http://127.0.0.1:PORT/`` (with ``--port 0`` the system
picks the port); SIGINT or SIGTERM stops it (exit status 0).

Memory is bounded by the caps: at most --max-requests bodies of --max-bytes are
held at once, and at most --workers requests are parsed, normalised and
serialised at once (each costs up to ~25x its body in Python objects); see
docs/service.md for the numbers measured.  The event loop only moves bytes:
JSON parsing, the kernels and the answer's JSON run on --workers threads, each
call inside ``cbn.threads(--kernel-threads)`` so that workers x kernel threads
do not oversubscribe the cores.  One eval-mode layer serves every worker: it
only reads its parameters and statistics, and its kernels release the GIL.
"""
import argparse
import asyncio
import dataclasses
import json
import logging
import math
import re
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import numpy as np

import cbn

try:
    import h11
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as exc:  # pragma: no cover - the message is the point
    sys.exit(f"inference_service needs Starlette and uvicorn: pip install 'cbn[examples]' "
             f"({exc})")

HOST = "127.0.0.1"  # loopback only, by design
DTYPES = ("float32", "float64")
MAX_HEADER_BYTES = 16 << 10
log = logging.getLogger("cbn.service")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client, or all of them together, may hold of the service."""

    max_bytes: int = 4 << 20        # one request body
    max_connections: int = 64       # open at once (idle keep-alive ones included)
    max_requests: int = 16          # in progress at once: from headers read to answer sent
    request_timeout: float = 10.0   # seconds for a request to arrive whole
    keep_alive: float = 5.0         # seconds an idle connection stays open


class RequestError(Exception):
    """A request the service refuses: the HTTP status, and whether to close the connection."""

    def __init__(self, status, message, close=False, headers=None):
        super().__init__(message)
        self.status = status
        self.close = close
        self.headers = headers or {}


class ClientGone(Exception):
    """The client disconnected before its request arrived (the connection logged it)."""


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


def normalize(layer, body, kernel_threads, max_elements):
    """The JSON answer to a POST /normalize body (runs on a worker thread)."""
    features = parse_features(body, np.dtype(layer.dtype).name, max_elements)
    try:
        with cbn.threads(kernel_threads):
            output = layer(features)
    except (TypeError, ValueError) as exc:  # wrong rank or channel count
        raise RequestError(400, str(exc)) from None
    if not np.isfinite(output).all():
        raise RequestError(422, f"the result does not fit in {output.dtype}")
    return json.dumps({"shape": list(output.shape), "dtype": output.dtype.name,
                       "data": output.ravel().tolist()}).encode()


# ---------------------------------------------------------------- the connection (HTTP/1.1)

def head_facts(head):
    """What h11 does not tell of a raw request head: {"head_bytes", "content_length_values"}.

    h11 merges repeated equal Content-Length fields (and lists) into one, and accepts a
    head of any size that arrives in one read; ``head`` holds at most MAX_HEADER_BYTES
    and four more, so a head without its end in there is too large.
    """
    end = re.search(rb"\n\r?\n", head)  # h11 ends a head the same way
    if end is None:
        return {"head_bytes": len(head), "content_length_values": 0}
    lines = re.split(rb"\r?\n", head[:end.start()])[1:]
    return {"head_bytes": end.end(), "content_length_values": sum(
        len(value.split(b",")) for name, _, value in (line.partition(b":") for line in lines)
        if name.strip().lower() == b"content-length")}


def raw_response(status, message, retry_after=None):
    """A complete JSON error response that closes the connection, as bytes."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _RecordingH11(h11.Connection):
    """h11's server side, keeping the protocol error it last raised (uvicorn drops it)."""

    error = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise


class LimitedConnection(H11Protocol):
    """uvicorn's h11 protocol with the connection-level limits and facts for the app.

    - at most ``limits.max_connections`` open: one more is answered 503 and closed;
    - a request's head must arrive within ``limits.request_timeout`` of its first byte
      (or of the connection opening): else 408 and closed -- the app enforces the rest of
      that same deadline on the body (``scope["extensions"]["cbn"]["deadline"]``);
    - h11's protocol errors are answered in JSON with h11's reason (4xx), not plain text;
    - facts of the raw head go to the app (``head_facts``): h11 merges equal duplicate
      Content-Length fields before anyone sees them, and takes a large head in one read;
    - a client that disconnects mid-request costs one log line.
    Idle keep-alive connections are closed by uvicorn after ``timeout_keep_alive``.
    """

    limits = Limits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = _RecordingH11(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._timer = None           # the head's deadline
        self._started = None         # loop time the current request began; None when idle
        self._awaiting_head = True   # its request line and headers are not parsed yet
        self._head = bytearray()     # its raw bytes so far (at most one head and a read)
        self._answered = False       # closed by us with an answer: not a client disconnect

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"too many connections: {self.limits.max_connections} are "
                              f"open, the most allowed", retry_after=1)
        else:
            self._begin_request()

    def _begin_request(self):
        self._started = self.loop.time()
        self._awaiting_head = True
        self._head.clear()
        self._cancel_timer()
        self._timer = self.loop.call_later(self.limits.request_timeout, self._head_late)

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self):
        self._timer = None
        if self._awaiting_head and not self.transport.is_closing():
            self._refuse(408, f"the request did not arrive within "
                              f"{self.limits.request_timeout:g} s")

    def data_received(self, data):
        if self._answered:
            return  # refused and closing: never parse what follows
        if self._started is None:  # the first byte after an idle keep-alive pause
            self._begin_request()
        if self._awaiting_head and len(self._head) <= MAX_HEADER_BYTES:
            self._head += data[:MAX_HEADER_BYTES + 4 - len(self._head)]
        super().data_received(data)

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and not self._answered:  # a new request's head arrived
            self._cancel_timer()
            self._awaiting_head = False
            if self._started is None:  # pipelined: its head came with the previous request
                self._started = self.loop.time()
            self.cycle.scope.setdefault("extensions", {})["cbn"] = dict(
                head_facts(self._head), deadline=self._started + self.limits.request_timeout)
            self._head.clear()

    def on_response_complete(self):
        self._cancel_timer()
        self._started = None  # idle: uvicorn's keep-alive timeout applies until the next byte
        self._awaiting_head = True
        self._head.clear()
        super().on_response_complete()

    def send_400_response(self, msg):
        error = self.conn.error
        hint = getattr(error, "error_status_hint", 400)
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self._answered = True  # an answer is half sent: only closing is left
            log.info("%s: malformed data during the answer: closed", self._peer())
            self.transport.close()
            return
        self._refuse(hint if 400 <= hint < 500 else 400,
                     f"malformed HTTP request: {error or msg}")

    def _refuse(self, status, message, retry_after=None):
        self._answered = True
        self._cancel_timer()
        log.info("%s: %d %s", self._peer(), status, message)
        self.transport.write(raw_response(status, message, retry_after))
        self.transport.close()

    def shutdown(self):
        self._answered = True  # the server closing us is not the client disconnecting
        super().shutdown()

    def connection_lost(self, exc):
        self._cancel_timer()
        if not self._answered:
            cycle = self.cycle
            if self._awaiting_head:
                if self._head:
                    log.info("%s disconnected while sending its request head", self._peer())
            elif cycle is not None and not cycle.response_complete:
                stage = "its request body" if cycle.more_body else "its answer was sent"
                log.info("%s disconnected %s %s (%s %s)", self._peer(),
                         "while sending" if cycle.more_body else "before",
                         stage, cycle.scope["method"], cycle.scope["path"])
        super().connection_lost(exc)

    def _peer(self):
        return "%s:%d" % self.client if self.client else "client"


def connection_class(limits):
    """LimitedConnection with these limits (uvicorn makes one protocol per connection)."""
    return type("LimitedConnection", (LimitedConnection,), {"limits": limits})


# ---------------------------------------------------------------- the application (ASGI)

async def send_json(send, status, payload, close=False, headers=None):
    body = json.dumps(payload).encode()
    fields = [(b"content-type", b"application/json"),
              (b"content-length", str(len(body)).encode())]
    fields += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    if close:
        fields.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: the request-level limits, applied before any route runs.

    It counts the requests in progress (503 beyond ``max_requests``), checks the body's
    framing (one Content-Length, no Transfer-Encoding) and size (413), and reads the
    whole body before the deadline the connection started (408): the routes get a
    complete body or never run.
    """

    def __init__(self, app, limits):
        self.app = app
        self.limits = limits
        self.in_progress = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_progress >= self.limits.max_requests:
            log.info("%s %s: 503 %d requests in progress", _client(scope), scope["path"],
                     self.in_progress)
            return await send_json(send, 503, {"error": f"busy: {self.in_progress} requests "
                                               f"in progress, the most allowed"},
                                   close=True, headers={"Retry-After": 1})
        self.in_progress += 1
        try:
            try:
                body = await self._body(scope, receive)
            except RequestError as exc:
                log.info("%s %s: %d %s", _client(scope), scope["path"], exc.status, exc)
                return await send_json(send, exc.status, {"error": str(exc)}, exc.close)
            except ClientGone:
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_progress -= 1

    async def _body(self, scope, receive):
        facts = scope.get("extensions", {}).get("cbn", {})
        loop = asyncio.get_running_loop()
        deadline = facts.get("deadline", loop.time() + self.limits.request_timeout)
        headers = dict(scope["headers"])  # h11 has lower-cased the names
        if facts.get("head_bytes", 0) > MAX_HEADER_BYTES:
            raise RequestError(431, f"the request head is larger than the "
                                    f"{MAX_HEADER_BYTES} bytes allowed", True)
        if facts.get("content_length_values", 1) > 1:
            raise RequestError(400, f"{facts['content_length_values']} Content-Length values "
                                    f"(a repeated header or a list): send exactly one", True)
        if b"transfer-encoding" in headers:
            if b"content-length" in headers:
                raise RequestError(400, "both Transfer-Encoding and Content-Length", True)
            raise RequestError(411, "a Content-Length header is required (no chunked "
                                    "bodies)", True)
        length = headers.get(b"content-length")
        if length is None:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                raise RequestError(411, "a Content-Length header is required", True)
            return b""
        length = int(length)  # h11 checked it is digits
        if length > self.limits.max_bytes:
            raise RequestError(413, f"request body of {length} bytes is larger than the "
                                    f"{self.limits.max_bytes} allowed", True)
        body = bytearray()
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body did not arrive within "
                                        f"{self.limits.request_timeout:g} s ({len(body)} of "
                                        f"{length} bytes came)", True) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            body += message.get("body", b"")
            if not message.get("more_body", False):
                return bytes(body)


def _replay(body, receive):
    """A receive() that hands over the body already read, then waits as the server's does."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed


def _client(scope):
    client = scope.get("client")
    return "%s:%d" % tuple(client) if client else "client"


def make_app(layer, limits, workers=2, kernel_threads=1):
    """(the ASGI app serving ``layer`` within ``limits``, its worker pool)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cbn-worker")
    max_elements = limits.max_bytes // 2  # each value takes two bytes of JSON at least

    async def post_normalize(request):
        answer = await asyncio.get_running_loop().run_in_executor(
            pool, normalize, layer, await request.body(), kernel_threads, max_elements)
        return Response(answer, media_type="application/json")

    async def get_health(request):
        return JSONResponse({"status": "ok", "layer": repr(layer),
                             "num_features": layer.num_features})

    async def refused(request, exc):
        return JSONResponse({"error": str(exc)}, exc.status)

    async def http_error(request, exc):  # the router's 404 and 405
        if exc.status_code == 404:
            message = f"no such path {request.url.path!r}: POST /normalize or GET /health"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = exc.detail
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    async def bug(request, exc):  # a bug answers 500 (uvicorn logs it); the service goes on
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500,
                            headers={"Connection": "close"})

    app = Starlette(routes=[Route("/normalize", post_normalize, methods=["POST"]),
                            Route("/health", get_health, methods=["GET"])],
                    exception_handlers={RequestError: refused, HTTPException: http_error,
                                        Exception: bug})
    return RequestGuard(app, limits), pool


class _DropUvicornInvalidRequest(logging.Filter):
    """uvicorn says "Invalid HTTP request received." first; LimitedConnection says why."""

    def filter(self, record):
        return record.getMessage() != "Invalid HTTP request received."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a file written by cbn.save")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    defaults = Limits()
    parser.add_argument("--max-bytes", type=int, default=defaults.max_bytes,
                        help="largest request body accepted (default 4 MiB)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="connections open at once (default 64)")
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests,
                        help="requests in progress at once (default 16)")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads that parse and normalise (default 2)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                        help="seconds for a request to arrive whole (default 10)")
    parser.add_argument("--keep-alive", type=float, default=defaults.keep_alive,
                        help="seconds an idle connection stays open (default 5)")
    parser.add_argument("--kernel-threads", type=int, default=1,
                        help="OpenMP threads per request (default 1)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if min(args.max_bytes, args.max_connections, args.max_requests, args.workers,
           args.kernel_threads) < 1 or min(args.request_timeout, args.keep_alive) <= 0:
        parser.error("every limit, --workers and --kernel-threads must be positive")
    try:
        layer = inference_layer(args.checkpoint)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"inference_service: cannot serve {args.checkpoint}: {exc}\n")

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    uvicorn_log.addFilter(_DropUvicornInvalidRequest())

    limits = Limits(args.max_bytes, args.max_connections, args.max_requests,
                    args.request_timeout, args.keep_alive)
    app, pool = make_app(layer, limits, args.workers, args.kernel_threads)
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it an answer's body waits ~40 ms behind its head (Nagle vs delayed ACK)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, args.port))
    listener.listen(128)  # connections made from now on wait for the server to start
    config = uvicorn.Config(
        app, http=connection_class(limits), ws="none", loop="asyncio", lifespan="off",
        log_config=None, access_log=args.verbose, backlog=128, server_header=False,
        timeout_keep_alive=args.keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # in-progress requests finish within their deadline plus their compute
        timeout_graceful_shutdown=args.request_timeout + 10)
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM once shut down: leave through SystemExit(0) then
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"listening on http://{HOST}:{listener.getsockname()[1]}/ serving {layer!r}",
          flush=True)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
