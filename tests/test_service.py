"""examples/inference_service.py and examples/load_test.py, run briefly as real processes."""
import http.client
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cbn
import cbn.mindspore as ms

REPO = Path(cbn.__file__).resolve().parent.parent
SERVICE = REPO / "examples" / "inference_service.py"
LOAD_TEST = REPO / "examples" / "load_test.py"
# The examples import the cbn these tests import, installed or not.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                os.environ.get("PYTHONPATH")])))
MAX_BYTES = 200_000


def example(path):
    """The example program at ``path`` as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_layer(layer, seed):
    rng = np.random.default_rng(seed)
    c = layer.num_features
    names = (("gamma", "beta", "moving_mean", "moving_variance") if hasattr(layer, "gamma")
             else ("weight", "bias", "running_mean", "running_var"))
    for name, low, high in zip(names, (0.5, -1, -1, 0.5), (2, 1, 1, 2)):
        getattr(layer, name)[...] = rng.uniform(low, high, c)
    return layer


def start(checkpoint, *args):
    process = subprocess.Popen([sys.executable, str(SERVICE), "--checkpoint", str(checkpoint),
                                "--port", "0", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV)
    line = process.stdout.readline()  # the service prints it once bound, or exits
    if not line.startswith("listening on http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"the service did not start: {line!r} {process.communicate(timeout=10)}")
    return process, int(line.split(":")[2].split("/")[0])


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - the test fails below
        process.kill()
        process.wait()
    return process.returncode


@pytest.fixture
def service(tmp_path):
    """(port, the layer it serves, in eval mode): a BatchNorm2d saved in training mode."""
    layer = random_layer(cbn.BatchNorm2d(3), seed=1)
    cbn.save(tmp_path / "bn.npz", layer)
    process, port = start(tmp_path / "bn.npz", "--max-bytes", str(MAX_BYTES),
                          "--kernel-threads", "2")
    yield port, layer.eval()
    assert process.poll() is None, "the service died"
    assert stop(process) == 0


def post(port, body, path="/normalize", method="POST", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request(method, path, body, headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def request_body(x, **extra):
    return json.dumps(dict({"shape": list(x.shape), "data": x.ravel().tolist()}, **extra))


def assert_serves(port, layer, rng, dtype=np.float32, shape=(2, 3, 4, 5)):
    x = rng.standard_normal(shape).astype(dtype)
    status, answer = post(port, request_body(x, dtype=np.dtype(dtype).name))
    assert status == 200, answer
    assert answer["shape"] == list(shape) and answer["dtype"] == np.dtype(dtype).name
    got = np.array(answer["data"], np.float64).astype(dtype).reshape(shape)
    np.testing.assert_array_equal(got, layer(x))  # bit for bit: same code, same statistics


BAD_REQUESTS = [
    ("malformed JSON", b'{"shape": [1, 3, 1, 1], "data": [1, 2,', 400, "malformed JSON"),
    ("not an object", b"[1, 2, 3]", 400, "expected a JSON object"),
    ("unknown field", json.dumps({"shape": [1, 3, 1, 1], "data": [1, 2, 3], "x": 1}), 400,
     "expected a JSON object"),
    ("wrong channel count", json.dumps({"shape": [1, 4, 1, 1], "data": [1, 2, 3, 4]}), 400,
     "expected 3 channels"),
    ("wrong rank", json.dumps({"shape": [1, 3, 2], "data": [0] * 6}), 400, "4D"),
    ("wrong dtype", json.dumps({"shape": [1, 3, 1, 1], "data": [1, 2, 3], "dtype": "int32"}),
     400, "dtype must be"),
    ("strings", json.dumps({"shape": [1, 3, 1, 1], "data": ["1", "2", "3"]}), 400,
     "only numbers"),
    ("booleans", json.dumps({"shape": [1, 3, 1, 1], "data": [True, 2, 3]}), 400, "only numbers"),
    ("nested", json.dumps({"shape": [1, 3, 1, 1], "data": [[1, 2, 3]]}), 400, "flat list"),
    ("NaN", b'{"shape": [1, 3, 1, 1], "data": [NaN, 2, 3]}', 400, "NaN"),
    ("beyond float32", json.dumps({"shape": [1, 3, 1, 1], "data": [1e39, 2, 3]}), 400,
     "do not fit in float32"),
    ("huge integer", json.dumps({"shape": [1, 3, 1, 1], "data": [10 ** 400, 2, 3]}), 400,
     "too large"),
    ("size mismatch", json.dumps({"shape": [2, 3, 1, 1], "data": [1, 2, 3]}), 400,
     "the 6 values"),
    ("bad shape", json.dumps({"shape": [1, -3, 1, 1], "data": []}), 400, "non-negative"),
    ("too many values", json.dumps({"shape": [10 ** 6, 3, 1, 1], "data": []}), 413,
     "more than the"),
    ("too large", b"[" + b"0," * MAX_BYTES + b"0]", 413, "larger than the"),
    ("deep nesting", b"[" * 50_000 + b"]" * 50_000, 400, "malformed JSON"),
    ("not UTF-8", b'{"shape": [1, 3, 1, 1], "data": [1, 2, 3\xff]}', 400, "malformed JSON"),
]


def test_the_service_answers_exactly_and_survives_bad_requests(service, rng):
    port, layer = service
    assert_serves(port, layer, rng)
    for name, body, status, message in BAD_REQUESTS:
        got_status, answer = post(port, body)
        assert (got_status, name) == (status, name), answer
        assert message in answer["error"], (name, answer)
        assert_serves(port, layer, rng)  # still serving, still right
    assert_serves(port, layer, rng, dtype=np.float64)
    assert_serves(port, layer, rng, shape=(0, 3, 2, 2))


def test_paths_methods_and_headers(service, rng):
    port, layer = service
    status, answer = post(port, None, path="/health", method="GET")
    assert status == 200 and answer["num_features"] == 3 and "BatchNorm2d" in answer["layer"]
    assert post(port, b"{}", path="/other")[0] == 404
    assert post(port, None, method="GET")[0] == 405
    assert post(port, None, method="DELETE")[0] == 405
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(b"POST /normalize HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = raw.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length header is required" in reply
    assert_serves(port, layer, rng)


def test_one_connection_carries_many_requests(service, rng):
    port, layer = service
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    x = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    for body in [request_body(x), b"{bad", request_body(x)]:
        connection.request("POST", "/normalize", body)
        response = connection.getresponse()
        response.read()
        assert response.status == (400 if body == b"{bad" else 200)
    assert connection.sock is not None  # kept alive across the refused request
    connection.close()


@pytest.mark.parametrize("obj,message", [
    (cbn.BatchNorm2d(3, track_running_stats=False), "no running statistics"),
    (ms.BatchNorm2d(3, use_batch_statistics=True), "always normalises with batch statistics"),
    ({"a": cbn.BatchNorm2d(3)}, "not a single cbn layer"),
])
def test_the_service_refuses_a_checkpoint_it_cannot_serve(obj, message, tmp_path, capsys):
    cbn.save(tmp_path / "bn.npz", obj)
    with pytest.raises(SystemExit) as exit_status:
        example(SERVICE).main(["--checkpoint", str(tmp_path / "bn.npz")])
    assert exit_status.value.code == 2
    assert message in capsys.readouterr().err


def run_load_test(*args):
    return subprocess.run([sys.executable, str(LOAD_TEST), *args], capture_output=True,
                          text=True, env=ENV, timeout=120)


def test_the_load_test_starts_the_service_and_checks_every_answer():
    result = run_load_test("--threads", "4", "--requests", "120", "--time-limit", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "120 answered" in out and "requests/s" in out, out
    assert "p50" in out and "p99" in out, out
    assert "108 valid answers checked bit for bit" in out and "12 invalid" in out, out
    assert out.rstrip().endswith("OK"), out


def test_the_load_test_against_a_running_mindspore_nhwc_service(tmp_path):
    # Saved while training: the service must still use the moving statistics.
    layer = random_layer(ms.BatchNorm2d(5, data_format="NHWC"), seed=2).set_train()
    cbn.save(tmp_path / "ms.npz", layer)
    process, port = start(tmp_path / "ms.npz")
    try:
        result = run_load_test("--url", f"http://127.0.0.1:{port}", "--checkpoint",
                               str(tmp_path / "ms.npz"), "--threads", "3", "--requests", "60")
    finally:
        assert stop(process) == 0
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(running service)" in result.stdout and "data_format=NHWC" in result.stdout


def test_the_load_test_fails_on_wrong_answers(tmp_path):
    served = random_layer(cbn.BatchNorm2d(4), seed=3)
    expected = random_layer(cbn.BatchNorm2d(4), seed=3)
    expected.running_var *= np.float32(1.0001)  # the client expects slightly different statistics
    cbn.save(tmp_path / "served.npz", served.eval())
    cbn.save(tmp_path / "expected.npz", expected.eval())
    process, port = start(tmp_path / "served.npz")
    try:
        result = run_load_test("--url", f"http://127.0.0.1:{port}", "--checkpoint",
                               str(tmp_path / "expected.npz"), "--threads", "2",
                               "--requests", "20")
    finally:
        stop(process)
    assert result.returncode == 1, result.stdout
    assert "differs from the direct call" in result.stdout and "FAILED" in result.stdout


def test_the_load_test_checks_status_shape_dtype_and_every_bit():
    check = example(LOAD_TEST).check
    expected = np.array([[1.5, -2.25]], np.float32)
    right = json.dumps({"shape": [1, 2], "dtype": "float32", "data": [1.5, -2.25]})
    assert check("valid", 200, right, 200, expected) is None
    assert check("bad", 400, '{"error": "no"}', 400, None) is None
    wrong = [
        (500, '{"error": "internal error"}', 400, None, "status 500, expected 400"),
        (200, '{"error": "no"}', 400, None, "status 200, expected 400"),
        (400, '{"message": "no"}', 400, None, "no error message"),
        (200, "<html>", 200, expected, "not JSON"),
        (200, right.replace("float32", "float64"), 200, expected, "got shape [1, 2] float64"),
        (200, right.replace("[1, 2]", "[2, 1]"), 200, expected, "got shape [2, 1]"),
        (200, right.replace("1.5", "1.5000001"), 200, expected, "differs from the direct call"),
    ]
    for status, payload, expected_status, expected_output, message in wrong:
        assert message in check("x", status, payload, expected_status, expected_output)


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.com:80",
                                 "https://127.0.0.1:443", "http://127.0.0.1"])
def test_the_load_test_only_talks_to_loopback(url, tmp_path, capsys, monkeypatch):
    load_test = example(LOAD_TEST)
    monkeypatch.setattr(load_test, "run_load", lambda *args: pytest.fail("it sent requests"))
    cbn.save(tmp_path / "bn.npz", cbn.BatchNorm2d(3).eval())
    with pytest.raises(SystemExit) as exit_status:
        load_test.main(["--url", url, "--checkpoint", str(tmp_path / "bn.npz")])
    assert exit_status.value.code == 2
    assert "loopback only" in capsys.readouterr().err
