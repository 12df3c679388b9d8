"""Remote black-box APIs over the Open Inference Protocol (dfml_jax.serve + from_http):
answers, counting, retries under seeded failures, the pending-answer cache across a server crash,
clear errors for wrong keys, oversize requests, malformed answers and timeouts; the official
Triton client on the project's server, and the project's client on a plain KServe ModelServer.

Servers run on 127.0.0.1 with ephemeral ports (threads; subprocesses for the CLI and the plain
KServe server) and are always stopped by fixture finalizers. Teachers are small NumPy linear maps
(no compile on the server).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
import textwrap
import urllib.error
import urllib.request

import httpx

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfml_jax.api import BlackBoxAPI, surface_api_errors
from dfml_jax.remote import (from_http, RemoteAuthError, RemoteProtocolError, RemoteRequestTooLarge,
                             RemoteUnavailable, decode_infer_response, encode_infer_request,
                             parse_endpoint)
from dfml_jax.serve import TeacherServer, make_linear_teacher, stop_server_process

SHAPE = (4, 4, 1)
K = 5
TEACHER = make_linear_teacher(SHAPE, K, seed=3)
FAST = dict(backoff=0.002, max_backoff=0.02, timeout=5.0)


def batch(n, seed=0):
    return np.random.default_rng(seed).random((n,) + SHAPE, dtype=np.float32)


@pytest.fixture
def serve(request):
    """Factory: start a TeacherServer in a thread; every server and client is closed at the end."""
    started, clients = [], []

    def make(fn=TEACHER, shape=SHAPE, num_classes=K, **kw):
        srv = TeacherServer(fn, shape, num_classes, **kw).start()
        started.append(srv)
        return srv

    def track(api):
        clients.append(api.remote)
        return api

    def finish():
        for c in clients:
            c.close()
        for s in started:
            s.stop()

    request.addfinalizer(finish)
    make.track = track
    return make


def remote(serve, srv, **kw):
    return serve.track(from_http(srv.url, SHAPE, K, model=srv.name,
                                             **{**FAST, **kw}))


def _response(a, binary=True, name="output", dtype="FP32"):
    """An OIP infer response carrying ``a`` (what a server sends)."""
    out = {"name": name, "shape": list(a.shape), "datatype": dtype}
    if not binary:
        out["data"] = a.ravel().tolist()
        return json.dumps({"outputs": [out]}).encode(), {}
    raw = a.tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    js = json.dumps({"model_name": "m", "outputs": [out]}).encode()
    return js + raw, {"Inference-Header-Content-Length": str(len(js))}


# ----------------------------------------------------------------------------- wire format
def test_wire_format_roundtrip_and_length_check():
    x = batch(3)
    body, headers = encode_infer_request(x, "images", output_name="scores", request_id="r1")
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["id"] == "r1" and head["inputs"][0]["shape"] == [3, 4, 4, 1]
    assert head["inputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    assert head["outputs"] == [{"name": "scores", "parameters": {"binary_data": True}}]
    assert np.array_equal(np.frombuffer(body[n:], np.float32).reshape(x.shape), x)
    jbody, jheaders = encode_infer_request(x, "images", binary=False)
    assert jheaders["Content-Type"] == "application/json"
    assert np.allclose(json.loads(jbody)["inputs"][0]["data"], x.ravel())
    for a, dt in ((batch(2).reshape(2, 16), "FP32"), (np.arange(6, dtype=np.int32), "INT32")):
        for binary in (True, False):
            b = decode_infer_response(*_response(a, binary, dtype=dt), "output")
            assert b.dtype == a.dtype and np.array_equal(a, b)
    rbody, rheaders = _response(batch(2).reshape(2, 16))
    with pytest.raises(ValueError, match="truncated"):
        decode_infer_response(rbody[:-4], rheaders)
    with pytest.raises(ValueError, match="datatype 'BYTES'"):
        decode_infer_response(*_response(batch(2), dtype="BYTES"))
    with pytest.raises(ValueError, match="no output named 'probs'"):
        decode_infer_response(rbody, rheaders, "probs")
    assert parse_endpoint("http://h:1/v2/models/m/versions/2") == ("http://h:1", "m")
    assert parse_endpoint("http://h:1/", "m") == ("http://h:1", "m")
    with pytest.raises(ValueError, match="OIP endpoint"):
        parse_endpoint("h:1")


# ----------------------------------------------------------------------------- answers, counting
@pytest.mark.parametrize("server_out,api_out,k,binary", [
    ("logits", "logits", None, True), ("logits", "topk", 2, True), ("probs", "probs", None, False),
    ("label", "label", None, True), ("topk", "topk", 2, True)])
def test_answers_match_local_api_and_chunks_are_counted(serve, server_out, api_out, k, binary):
    srv = serve(output=server_out, max_batch=8, k=2 if server_out == "topk" else None)
    api = remote(serve, srv, output=api_out, k=k, concurrency=3, binary=binary)
    local = BlackBoxAPI.from_host(TEACHER, SHAPE, K, output=api_out, k=k)
    x = batch(37)
    out = api(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(local(x)), rtol=1e-5, atol=1e-6)
    assert out.dtype == local(x).dtype
    st = srv.stats()
    assert api.queries == 37 == st["answered_samples"]
    assert st["answered_requests"] == 5                       # 8+8+8+8+5
    assert api.host_calls == 1                                 # one ledger charge per query
    assert api.remote.stats()["answered_samples"] == 37       # the bill, read over OIP


def test_jit_vmap_scan_count_matches_server(serve):
    srv = serve(output="probs", max_batch=16)
    api = remote(serve, srv)
    x = jnp.asarray(batch(24).reshape(3, 8, *SHAPE))
    jax.jit(jax.vmap(api))(x).block_until_ready()             # ONE host call, 24 samples

    def body(c, xi):
        return c + api(xi).sum(), None

    jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs)[0])(x).block_until_ready()  # 3 calls of 8
    assert api.queries == 48 == srv.stats()["answered_samples"]
    assert api.host_calls == 4


def test_info_json_clients_and_output_rules(serve):
    srv = serve(output="label", max_batch=4, api_key="k1", metadata={"classes": [3, 1, 4, 1, 5]})
    with urllib.request.urlopen(srv.url + "/v2/health/ready", timeout=5) as r:  # open without key
        assert r.status == 200
    body = {"inputs": [{"name": "input", "shape": [3, 4, 4, 1], "datatype": "FP32",
                        "data": batch(3).ravel().tolist()}]}
    req = urllib.request.Request(srv.model_url + "/infer", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-API-Key": "k1"})
    with urllib.request.urlopen(req, timeout=5) as r:
        out = json.load(r)["outputs"][0]
    assert out["datatype"] == "INT32" and out["data"] == TEACHER(batch(3)).argmax(1).tolist()
    api = remote(serve, srv, api_key="k1")                     # adopts the server's mode
    assert api.output == "label" and api.remote.info()["classes"] == [3, 1, 4, 1, 5]
    with pytest.raises(ValueError, match="reveal"):
        from_http(srv.model_url, SHAPE, K, output="probs", api_key="k1", **FAST)
    with pytest.raises(ValueError, match="input_shape"):
        from_http(srv.model_url, (8, 8, 1), K, api_key="k1", **FAST)
    auto = serve.track(from_http(srv.url, api_key="k1", **FAST))  # the only model
    assert (auto.input_shape, auto.num_classes) == (SHAPE, K)
    req = urllib.request.Request(srv.url + "/metrics", headers={"Authorization": "Bearer k1"})
    with urllib.request.urlopen(req, timeout=5) as r:          # Prometheus: the bill
        assert f'dfml_answered_samples_total{{model="{srv.name}"}}' in r.read().decode()


# ----------------------------------------------------------------------------- faults
def _expected_failures(seed, rate, successes):
    """Draws of the server's seeded RNG until `successes` requests got through."""
    rng, ok, failed = np.random.default_rng(seed), 0, 0
    while ok < successes:
        if rng.random() < rate:
            failed += 1
        else:
            ok += 1
    return failed


def test_seeded_5xx_failures_are_retried_invisibly(serve):
    srv = serve(output="logits", max_batch=8, fail_rate=0.3, seed=11)
    api = remote(serve, srv, concurrency=4)
    local = BlackBoxAPI.from_host(TEACHER, SHAPE, K)
    for i in range(4):
        x = batch(40, seed=i)
        np.testing.assert_allclose(np.asarray(api(x)), np.asarray(local(x)), rtol=1e-5)
    st = srv.stats()
    assert api.queries == 160 == st["answered_samples"]        # the ledger equals the bill
    assert st["answered_requests"] == 20
    assert st["injected_failures"] == _expected_failures(11, 0.3, 20) > 0
    assert api.remote.counters["retries"] == st["injected_failures"]


def test_wrong_or_missing_api_key_is_a_clear_error(serve):
    srv = serve(api_key="secret")
    for key in (None, "wrong"):
        with pytest.raises(RemoteAuthError, match="rejected the API key"):
            from_http(srv.model_url, SHAPE, K, api_key=key, **FAST)
    api = remote(serve, srv, api_key="secret")
    api.remote.api_key = "revoked"                            # key rejected in the middle of a run
    step = jax.jit(lambda x: api(x).sum())
    with pytest.raises(RemoteAuthError, match="--api-key"), surface_api_errors():
        step(jnp.asarray(batch(4))).block_until_ready()
    assert api.queries == 0 and srv.stats()["answered_samples"] == 0
    assert srv.stats()["rejected_auth"] == 3


def test_oversize_request_names_the_server_limit(serve):
    srv = serve(max_batch=8)
    api = remote(serve, srv, max_batch=64)                    # client ignores the server's limit
    with pytest.raises(RemoteRequestTooLarge, match="max_batch=8") as e:
        api(batch(20))
    assert e.value.max_batch == 8 and e.value.status == 413
    assert api.queries == 0 and srv.stats()["answered_samples"] == 0
    assert srv.stats()["rejected_oversize"] == 1              # not retried
    ok = remote(serve, srv)                                    # default: the server's limit
    assert ok(batch(20)).shape == (20, K) and ok.queries == 20


@pytest.mark.parametrize("corrupt,match", [("nan", "NaN"), ("shape", "shape"),
                                           ("truncate", "truncated")])
def test_malformed_answers_fail_clearly_and_charge_nothing(serve, corrupt, match):
    srv = serve(output="probs", corrupt=corrupt, max_batch=8)
    api = remote(serve, srv, max_retries=2, concurrency=1)
    with pytest.raises(RemoteProtocolError, match=match) as e:
        api(batch(6))
    assert api.name in str(e.value) and api.queries == 0


def test_label_server_with_impossible_labels(serve):
    srv = serve(output="label", corrupt="nan")
    api = remote(serve, srv)
    with pytest.raises(RemoteProtocolError, match=r"labels outside \[0, 5\)"):
        api(batch(3))


def test_bad_input_and_unknown_endpoint(serve):
    srv = serve()
    body, headers = encode_infer_request(batch(2).reshape(2, 16), "input")
    req = urllib.request.Request(srv.model_url + "/infer", data=body, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400 and "takes FP32 (n, 4, 4, 1)" in e.value.read().decode()
    for path in ("/v2/nothing", "/v2/models/other/infer", "/v2/repository/models/teacher/unload"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(srv.url + path, data=body,
                                                          headers=headers), timeout=5)
        assert e.value.code == 404, path
    with pytest.raises(Exception, match="404.*model name 'other'"):
        from_http(srv.url, SHAPE, K, model="other", **FAST)
    assert srv.stats()["bad_requests"] == 1 and srv.stats()["answered_samples"] == 0


def test_timeouts_give_a_clear_error_after_bounded_retries(serve):
    srv = serve(latency_ms=400)
    api = remote(serve, srv, timeout=0.05, max_retries=1, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(RemoteUnavailable, match=r"timed out.*2 attempts|2 attempts.*timed out"):
        api(batch(3))
    assert time.perf_counter() - t0 < 2.0 and api.queries == 0


def test_answer_lost_to_a_timeout_is_billed_again_and_counted(serve):
    """OIP has no idempotency: an answer lost to a client timeout is billed by the server, and
    the retry is billed again; the ledger charges the samples once and the client counts the
    ambiguous retry."""
    import threading

    calls = {"n": 0}

    def slow_first(x):                    # the first answer arrives after the client gave up
        calls["n"] += 1
        if calls["n"] == 1:
            threading.Event().wait(0.6)
        return TEACHER(x)

    srv = serve(slow_first)
    api = remote(serve, srv, timeout=0.4, max_retries=3, backoff=0.001, max_backoff=0.002)
    out = api(batch(5))
    st, c = srv.stats(), api.remote.counters
    assert out.shape == (5, K) and api.queries == 5                 # delivered and charged once
    assert st["answered_samples"] == 10 and st["answered_requests"] == 2   # billed twice
    assert c["ambiguous_retries"] == 1 and c["ambiguous_samples"] == 5
    assert api.queries + c["ambiguous_samples"] == st["answered_samples"]


def test_server_killed_mid_query_then_retry_rebuys_nothing(serve, tmp_path):
    holder = {}

    def dying_teacher(x):                 # answers two requests, then the server crashes
        holder["n"] = holder.get("n", 0) + 1
        if holder["n"] == 3:
            holder["srv"].stop()
            raise RuntimeError("killed")
        return TEACHER(x)

    srv1 = serve(dying_teacher, max_batch=8, output="logits")
    holder["srv"] = srv1
    api1 = remote(serve, srv1, concurrency=1, max_retries=2, cache_dir=str(tmp_path))
    x = batch(40)
    with pytest.raises(RemoteUnavailable, match="16 of the query's 40 samples") as e:
        api1(x)
    assert e.value.pending_samples == 16 and api1.remote.pending_samples == 16
    billed1 = srv1.stats()["answered_samples"]
    assert billed1 == 16 and api1.queries == 0                 # billed, not delivered: uncharged
    assert len(os.listdir(tmp_path)) == 2                      # the two answered chunks, on disk
    srv2 = serve(max_batch=8, output="logits")                 # back, on another port
    api2 = remote(serve, srv2, cache_dir=str(tmp_path))        # e.g. a resumed process
    np.testing.assert_allclose(np.asarray(api2(x)), TEACHER(x), rtol=1e-5)
    assert srv2.stats()["answered_samples"] == 24              # only what was missing
    assert api2.queries == 40 == billed1 + srv2.stats()["answered_samples"]
    assert os.listdir(tmp_path) == []                          # delivered: cache emptied
    api2(x)                                                    # a new query is a new purchase
    assert srv2.stats()["answered_samples"] == 64 and api2.queries == 80


def test_unreachable_server(serve):
    srv = serve()
    url = srv.url
    srv.stop()
    with pytest.raises(RemoteUnavailable, match="could not connect.*health/ready"):
        from_http(url, SHAPE, K, model="teacher", max_retries=1,
                              **{**FAST, "timeout": 1.0})


# ----------------------------------------------------------------------------- plain KServe
PLAIN_KSERVE = textwrap.dedent("""
    # A plain KServe ModelServer (no dfml_jax code): a linear model answering logits, with 10% of
    # the requests failing with HTTP 503 (seeded).
    import random, sys
    import numpy as np
    from fastapi import HTTPException
    import kserve.model_server as ms
    from kserve import Model, ModelServer
    from kserve.protocol.infer_type import InferOutput, InferResponse

    class Loopback(ms.RESTServer):          # KServe binds 0.0.0.0; keep the test on loopback
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.config.host = "127.0.0.1"

    ms.RESTServer = Loopback
    W = np.random.default_rng(7).normal(size=(16, 5)).astype(np.float32)

    class Linear(Model):
        def __init__(self):
            super().__init__("linear")
            self.rng, self.ready = random.Random(2), True

        def get_input_types(self):
            return [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4, 4, 1]}]

        def get_output_types(self):
            return [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]

        async def predict(self, payload, headers=None):
            if self.rng.random() < 0.1:
                raise HTTPException(status_code=503, detail="overloaded, retry")
            x = payload.inputs[0].as_numpy()
            y = x.reshape(len(x), -1) @ W
            out = InferOutput("logits", list(y.shape), "FP32", y)
            return InferResponse(payload.id, self.name, [out],
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs)

    ModelServer(http_port=int(sys.argv[1]), enable_grpc=False, workers=1).start([Linear()])
""")


@pytest.fixture
def plain_kserve(tmp_path):
    """A plain KServe ModelServer in a subprocess; yields its base URL."""
    import socket

    script = tmp_path / "plain_kserve.py"
    script.write_text(PLAIN_KSERVE)
    with socket.socket() as s:             # a free loopback port for the server to take
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the KServe server did not start"
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        stop_server_process(proc)


def test_stop_server_process_kills_a_server_that_ignores_sigterm():
    """The shared teardown: SIGTERM, then SIGKILL after the timeout; an exited process is fine."""
    ignore = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.time()
    assert stop_server_process(proc, timeout=0.5) == -signal.SIGKILL
    assert time.time() - t0 < 10
    assert stop_server_process(proc) == -signal.SIGKILL          # already stopped: no error
    proc.stdout.close()


def test_client_on_a_plain_kserve_server_failing_10pct(plain_kserve):
    """The project's client on a KServe ModelServer written here: 1,000 samples answered under
    10% HTTP 503s, the ledger exactly 1,000, the answers those of the model."""
    w = np.random.default_rng(7).normal(size=(16, 5)).astype(np.float32)
    api = from_http(plain_kserve + "/v2/models/linear", output="logits", max_batch=50,
                                concurrency=4, max_retries=8, backoff=0.005, max_backoff=0.05,
                                timeout=10.0)
    try:
        assert (api.input_shape, api.num_classes) == (SHAPE, K)     # from the model metadata
        assert api.remote.info()["input_name"] == "pixels"
        x = np.random.default_rng(11).random((1000,) + SHAPE, dtype=np.float32)
        out = np.concatenate([np.asarray(api(x[i:i + 250])) for i in range(0, 1000, 250)])
        np.testing.assert_allclose(out, x.reshape(1000, -1) @ w, rtol=1e-5, atol=1e-5)
        c = api.remote.counters
        assert api.queries == 1000 and c["answered_samples"] == 1000
        rng, failed, ok = random.Random(2), 0, 0            # the server's 503s: retried
        while ok < 20:
            failed, ok = (failed + 1, ok) if rng.random() < 0.1 else (failed, ok + 1)
        assert c["retries"] == failed == 4
        assert c["ambiguous_retries"] == 0                  # a 503 is not an answer: billed once
    finally:
        api.remote.close()


# ----------------------------------------------------------------------------- CLI on a pool
@pytest.fixture
def tiny_pool(tmp_path):
    """A 2-teacher MLP pool with random weights (written with write_pool, no training)."""
    from dfml_jax.models import create_model, functional, stack_trees
    from dfml_jax.teachers import TrainedGroup, write_pool

    shape = (6, 6, 1)
    fm = functional(create_model("mlp", num_classes=5, input_shape=shape, hidden=(8,),
                                 rngs_or_key=0))
    inits = [fm.init(jax.random.key(s)) for s in (1, 2)]
    recs = [{"name": f"toy/mlp/{m}", "member": m, "arch": "mlp", "dataset": "toy",
             "classes": [m, m + 1, m + 2, m + 3, m + 4], "class_names": list("abcde"),
             "global_classes": [m, m + 1, m + 2, m + 3, m + 4], "heldout_acc": 0.2,
             "train_acc": 0.2, "final_train_loss": 1.6, "seed": m, "num_train": 0,
             "num_heldout": 0, "input_shape": list(shape), "num_classes": 5, "mean": [0.5],
             "std": [0.5]} for m in range(2)]
    group = TrainedGroup("toy", "mlp", {"num_classes": 5, "input_shape": list(shape),
                                        "hidden": [8]}, (0.5,), (0.5,), {},
                         stack_trees([p for p, _ in inits]), stack_trees([s for _, s in inits]),
                         recs, 0, 10)
    d = str(tmp_path / "pool")
    write_pool(d, [group], scenario="SS")
    return d, shape


def test_cli_serves_a_pool_teacher_read_by_the_triton_client(tiny_pool, tmp_path):
    """python -m dfml_jax.serve on a pool teacher; NVIDIA's tritonclient.http reads it (ready,
    metadata, config, infer with binary data, statistics), then the project's client."""
    import tritonclient.http as triton

    from dfml_jax.teachers import load_pool

    d, shape = tiny_pool
    port_file = str(tmp_path / "port")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfml_jax.serve", "--pool", d, "--api", "1", "--port", "0",
         "--output", "logits", "--max-batch", "4", "--port-file", port_file],
        env={**os.environ, "DFML_API_KEY": "pool-key", "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = None
    try:
        deadline = time.time() + 90
        while not os.path.exists(port_file):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not start"
            time.sleep(0.1)
        with open(port_file) as f:
            port = int(f.read())
        x = np.random.default_rng(0).normal(size=(7,) + shape).astype(np.float32)
        want = np.asarray(load_pool(d, output="logits")[1](x))
        auth = {"Authorization": "Bearer pool-key"}
        tc = triton.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=10,
                                          network_timeout=30)
        try:
            assert tc.is_server_live() and tc.is_server_ready()
            assert tc.is_model_ready("toy-mlp-1", headers=auth)
            meta = tc.get_model_metadata("toy-mlp-1", headers=auth)
            assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6, 6, 1]}]
            assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 5]}]
            assert tc.get_model_config("toy-mlp-1", headers=auth)["max_batch_size"] == 4
            inp = triton.InferInput("input", [3, *shape], "FP32")
            inp.set_data_from_numpy(x[:3], binary_data=True)
            res = tc.infer("toy-mlp-1", [inp], headers=auth,
                           outputs=[triton.InferRequestedOutput("output", binary_data=True)])
            assert res.get_output("output")["parameters"]["binary_data_size"] == 3 * 5 * 4
            np.testing.assert_allclose(res.as_numpy("output"), want[:3], rtol=1e-4, atol=1e-5)
            st = tc.get_inference_statistics("toy-mlp-1", headers=auth)["model_stats"][0]
            assert st["inference_count"] == 3 and st["execution_count"] == 1
            with pytest.raises(triton.InferenceServerException, match="401|API key"):
                tc.get_model_metadata("toy-mlp-1")
        finally:
            tc.close()
        api = from_http(f"http://127.0.0.1:{port}/v2/models/toy-mlp-1", shape, 5,
                                    api_key="pool-key", **FAST)
        info = api.remote.info()
        assert info["teacher"] == "toy/mlp/1" and info["classes"] == [1, 2, 3, 4, 5]
        assert info["mean"] == [0.5] and info["max_batch"] == 4
        np.testing.assert_allclose(np.asarray(api(x)), want, rtol=1e-4, atol=1e-5)
        assert api.remote.stats()["answered_samples"] == 10 and api.queries == 7
    finally:
        if api is not None:
            api.remote.close()
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0 and '"answered_samples": 10' in out, out


def test_pool_of_urls_for_pool_algorithms(tiny_pool, serve, tmp_path):
    from dfml_jax.bidf_mkd.experiment import BiDfExperimentConfig, _pool
    from dfml_jax.api import group_apis
    from dfml_jax.experiment import RunDir
    from dfml_jax.teachers import load_pool
    from dfml_jax.remote import load_remote_pool

    d, shape = tiny_pool
    servers = [TeacherServer.from_pool(d, i, output="logits", max_batch=8).start() for i in (0, 1)]
    pool = None
    try:
        pool = load_remote_pool([s.model_url for s in servers], output="probs", **FAST)
        local = load_pool(d, output="probs")
        assert pool.classes == local.classes and pool.mean == local.mean == (0.5,)
        assert pool.image_size == 6 and pool.records[1]["name"].startswith("toy-mlp-1@")
        assert pool.records[1]["teacher"] == "toy/mlp/1"
        groups, locate = group_apis(pool.apis)          # one host group: traced index dispatch
        assert len(groups) == 1
        x = jnp.asarray(np.random.default_rng(1).normal(size=(3,) + shape), jnp.float32)
        step = jax.jit(lambda i, x: groups[0](i, x))
        np.testing.assert_allclose(np.asarray(step(1, x)), np.asarray(local[1](x)), rtol=1e-4,
                                   atol=1e-6)
        assert [a.queries for a in pool.apis] == [0, 3] == [s.stats()["answered_samples"]
                                                            for s in servers]
        cfg, urls = BiDfExperimentConfig(), [s.model_url for s in servers]
        run = RunDir(str(tmp_path / "bidf"))
        with pytest.raises(ValueError, match="white-box"):
            _pool(cfg, run, True, urls)
        remote_pool, wb = _pool(cfg, run, False, urls)
        assert wb is None and len(remote_pool) == 2 and remote_pool.scenario == "remote"
        for a in remote_pool.apis:
            a.remote.close()
    finally:
        for a in (pool.apis if pool is not None else ()):
            a.remote.close()
        for s in servers:
            s.stop()


# ----------------------------------------------------------------------------- IDEAL, remotely
DSHAPE, DK = (8, 8, 1), 10
DTEACHER = make_linear_teacher(DSHAPE, DK, seed=0)
FAIL_SEED = 2          # the server's seeded failure sequence (10% rate)


# The student and IDEAL settings are those of `experiments/distill.py --config smoke` with the
# overrides below, so that the script test reuses the compiled IDEAL steps of the other tests.
SCRIPT_SETS = ["teacher_arch=mlp", 'teacher_kw={"hidden": [8]}', "teacher_epochs=1",
               "reference_epochs=1", "student_arch=mlp", 'student_kw={"hidden": [8]}',
               "budgets=[40]", "ideal_budgets=[40]", "dfme_budgets=[40]", "ideal.batch_size=20",
               "ideal.g_steps=1"]


def _script_config():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    from configs.distill_configs import get_config

    from dfml_jax.experiment import apply_overrides

    return apply_overrides(get_config("smoke"), SCRIPT_SETS)


@pytest.fixture(scope="module")
def ideal_setup():
    from dfml_jax.distill.experiment import build, ideal_config
    from dfml_jax.models import get_default_conv_impl, set_default_conv_impl

    cfg = _script_config()
    before = get_default_conv_impl()
    set_default_conv_impl(cfg.conv_impl)     # what the script sets (restored afterwards)
    student = build(cfg.student_arch, cfg.student_kw, {"num_classes": DK, "input_shape": DSHAPE},
                    cfg.seed)
    yield student, ideal_config(cfg, "generator")
    set_default_conv_impl(before)


def _ideal_remote(srv, budget=80, **kw):
    return from_http(srv.model_url, DSHAPE, DK, output="label", budget=budget,
                                 **{**FAST, "concurrency": 2, **kw})


@pytest.fixture(scope="module")
def ideal_reference(ideal_setup):
    """IDEAL for 4 rounds of 20 labels against a healthy remote teacher (no failures)."""
    from dfml_jax.distill import run_pool_distillation

    student, cfg = ideal_setup
    with TeacherServer(DTEACHER, DSHAPE, DK, output="label", max_batch=8) as srv:
        api = _ideal_remote(srv)
        res = run_pool_distillation(api, student, cfg, seed=0)
        api.remote.close()
        billed = srv.stats()["answered_samples"]
    return res, api.queries, billed


def test_ideal_under_10pct_failures_same_queries_and_ledger_equals_bill(ideal_setup,
                                                                         ideal_reference, serve):
    from dfml_jax.distill import run_pool_distillation

    student, cfg = ideal_setup
    ref, ref_queries, ref_billed = ideal_reference
    assert ref.stopped == "budget" and ref_queries == ref_billed == 80
    srv = serve(DTEACHER, DSHAPE, DK, output="label", max_batch=8, fail_rate=0.1, seed=FAIL_SEED)
    api = serve.track(_ideal_remote(srv))
    res = run_pool_distillation(api, student, cfg, seed=0)
    st = srv.stats()
    assert res.stopped == "budget" and res.queries == ref.queries == 80     # same query count
    assert api.queries == st["answered_samples"] == 80                      # ledger == bill
    assert st["answered_requests"] == 12                                    # 4 rounds x (8+8+4)
    assert st["injected_failures"] == _expected_failures(FAIL_SEED, 0.1, 12) > 0
    jax.tree.map(np.testing.assert_array_equal, res.params, ref.params)     # same labels bought


def test_ideal_server_killed_mid_run_then_resumes_without_rebuying(ideal_setup, ideal_reference,
                                                                   serve, tmp_path):
    from dfml_jax.checkpoint import RunCheckpointer
    from dfml_jax.distill import run_pool_distillation

    student, cfg = ideal_setup
    ref = ideal_reference[0]
    wd, cache = str(tmp_path / "run"), str(tmp_path / "pending")
    calls = {"n": 0}

    def dying_teacher(x):       # round 2 = requests 7, 8, 9: the server dies on request 8
        calls["n"] += 1
        if calls["n"] == 8:
            srv1.stop()
            raise RuntimeError("killed")
        return DTEACHER(x)

    srv1 = serve(dying_teacher, DSHAPE, DK, output="label", max_batch=8)
    api1 = serve.track(_ideal_remote(srv1, concurrency=1, max_retries=2, cache_dir=cache))
    with pytest.raises(RemoteUnavailable, match="failed after 3 attempts") as e:
        run_pool_distillation(api1, student, cfg, seed=0, workdir=wd)
    assert e.value.pending_samples == 8                      # round 2's first chunk, kept
    billed1 = srv1.stats()["answered_samples"]
    assert billed1 == 48 and api1.queries == 40              # rounds 0-1 charged, round 2 not
    # The checkpoint is intact and holds nothing of the failed round.
    with RunCheckpointer(os.path.join(wd, "checkpoints")) as ck:
        step = ck.latest_step
        _, _, meta = ck.restore_latest({"student": init_student_like(student, cfg)})
    assert step == 1 and meta["ledger"]["answered"] == 40 and len(meta["pool_rounds"]) == 2
    assert sorted(os.listdir(os.path.join(wd, "pool"))) == ["round_000000.npz", "round_000001.npz"]
    assert not os.path.exists(os.path.join(wd, "result.json"))
    # The server is back (another port); a new process would build a new API on the same cache.
    srv2 = serve(DTEACHER, DSHAPE, DK, output="label", max_batch=8)
    api2 = serve.track(_ideal_remote(srv2, cache_dir=cache))
    res = run_pool_distillation(api2, student, cfg, seed=0, workdir=wd)
    billed2 = srv2.stats()["answered_samples"]
    assert res.stopped == "budget" and api2.queries == res.queries == 80
    assert billed2 == 32 and billed1 + billed2 == 80         # nothing bought twice
    jax.tree.map(np.testing.assert_array_equal, res.params, ref.params)


FAULTS = {"nan": (dict(corrupt="nan"), RemoteProtocolError, "labels outside"),
          "shape": (dict(corrupt="shape"), RemoteProtocolError, "shape"),
          "truncate": (dict(corrupt="truncate"), RemoteProtocolError, "truncated"),
          "key": (dict(api_key="rotated"), RemoteAuthError, "rejected the API key"),
          "oversize": (dict(max_batch=4), RemoteRequestTooLarge, "max_batch=4")}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_ideal_step_failing_on_a_fault_writes_nothing(ideal_setup, serve, tmp_path, fault):
    from dfml_jax.distill import run_pool_distillation

    student, cfg = ideal_setup
    change, err, match = FAULTS[fault]
    calls = {"n": 0}

    def teacher(x):             # the server turns faulty in round 2 (requests 7-9)
        calls["n"] += 1
        if calls["n"] == 7:
            for k, v in change.items():
                setattr(srv, k, v)
        return DTEACHER(x)

    srv = serve(teacher, DSHAPE, DK, output="label", max_batch=8)
    api = serve.track(_ideal_remote(srv, concurrency=1, max_retries=1))
    wd = str(tmp_path / "run")
    with pytest.raises(err, match=match) as e:
        run_pool_distillation(api, student, cfg, seed=0, workdir=wd)
    assert api.name in str(e.value) and api.queries == 40
    from dfml_jax.checkpoint import RunCheckpointer

    with RunCheckpointer(os.path.join(wd, "checkpoints")) as ck:
        assert ck.latest_step == 1                      # round 2 wrote nothing
    assert sorted(os.listdir(os.path.join(wd, "pool"))) == ["round_000000.npz", "round_000001.npz"]


def init_student_like(student, cfg):
    from dfml_jax.distill.common import init_student, torch_sgd

    tx = torch_sgd(cfg.lr_s, cfg.momentum_s, cfg.weight_decay_s)
    return init_student(student, tx, jax.random.key(0))


@pytest.mark.slow
def test_distill_script_with_api_url(ideal_setup, serve, tmp_path):
    """experiments/distill.py --api-url: IDEAL from a remote teacher with 10% failures."""
    import distill             # experiments/ is on sys.path (_script_config)

    srv = serve(DTEACHER, DSHAPE, DK, output="probs", max_batch=16, fail_rate=0.1, seed=FAIL_SEED)
    wd = str(tmp_path / "run")
    argv = ["--config", "smoke", "--method", "ideal", "--workdir", wd, "--no-progress",
            "--api-url", srv.model_url, "--api-timeout", "5"]
    argv += [a for s in SCRIPT_SETS for a in ("--set", s)]
    distill.main(argv)
    out = json.load(open(os.path.join(wd, "results.json")))
    measured = out["teacher"]["measure_queries"]
    assert out["runs"]["ideal"]["queries"] == 40
    assert srv.stats()["answered_samples"] == 40 + measured  # the bill: budget + measurement
    assert srv.stats()["injected_failures"] > 0
    assert "remote teacher at" in open(os.path.join(wd, "results.md")).read()
    with pytest.raises(SystemExit, match="remote teacher"):   # no mixing local and remote runs
        distill.main([a for a in argv if a not in ("--api-url", srv.model_url)])
    # serve --distill-run: the teacher this run trained locally, as a server would load it
    from dfml_jax.serve import distill_teacher

    fn, shape, k, meta = distill_teacher(wd)
    assert (shape, k, meta["name"]) == (DSHAPE, DK, "digits/mlp/teacher")
    assert fn(np.random.default_rng(1).random((3,) + DSHAPE, dtype=np.float32)).shape == (3, DK)


def test_bench_remote_prints_json_lines(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "bench"))
    import bench_remote

    bench_remote.main(["--batches", "4", "--concurrency", "2", "--latencies", "5",
                       "--seconds", "0.05", "--shape", "4,4,1", "--classes", "3"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    http = [r for r in rows if r["kind"] == "http"]
    assert rows[0]["kind"] == "meta" and len(http) == 1
    assert http[0]["qps"] > 0 and http[0]["server_answered"] == http[0]["ledger"]


# ----------------------------------------------------------------------------- BiDf-MKD, remotely
@pytest.mark.slow
def test_bidf_mkd_smoke_run_against_served_teachers(serve):
    """A BiDf-MKD run on a pool of two served teachers (load_remote_pool over OIP, 10% of the
    requests failing with 503): every visit's queries are answered, and each server's bill equals
    its API's ledger."""
    from dfml_jax.bidf_mkd.inversion import InversionConfig
    from dfml_jax.bidf_mkd.train import BiDfMKDConfig, TeacherPool, train_bidf_mkd
    from dfml_jax.models import create_model, functional
    from dfml_jax.remote import load_remote_pool

    s, k = 8, 5
    classes = [[0, 2, 4, 6, 7], [1, 2, 3, 5, 6]]
    servers = [serve(make_linear_teacher((s, s, 1), k, seed=20 + i), (s, s, 1), k,
                     output="logits", max_batch=16, name=f"t{i}", fail_rate=0.1, seed=i,
                     metadata={"classes": classes[i], "mean": [0.5], "std": [0.5]})
               for i in range(2)]
    remote_pool = load_remote_pool([v.model_url for v in servers], output="logits", **FAST)
    for a in remote_pool.apis:
        serve.track(a)
    assert remote_pool.classes == tuple(tuple(c) for c in classes)
    meta = functional(create_model("mlp", num_classes=k, input_shape=(s, s, 1), rngs_or_key=0,
                                   hidden=(16,)))
    gen = functional(create_model("dcgan", nz=8, ngf=4, img_size=s, nc=1, rngs_or_key=0))
    cfg = BiDfMKDConfig(shots=1, query=2, meta_iterations=2, meta_batch=2,
                        inversion=InversionConfig(iterations=2, per_class=3, num_directions=2,
                                                  smoothing=0.01, pad=1), nz=8, ngf=4,
                        memory_slots=2,
                        plateau_patience=2, boundary_start=2, eval_every=2, val_tasks=2,
                        replay_inner_steps=1, kd_inner_steps=1)
    x = jax.random.uniform(jax.random.key(0), (2, k * 3, s, s, 1))
    y = jnp.tile(jnp.repeat(jnp.arange(k), 3)[None], (2, 1))
    pool = TeacherPool(remote_pool.apis, remote_pool.classes, remote_pool.mean, remote_pool.std,
                       remote_pool.image_size, None)
    res = train_bidf_mkd(cfg, pool=pool, val_tasks=(x[:, :k], y[:, :k], x[:, k:], y[:, k:]),
                         progress=False, meta_apply=meta.apply_batchstats,
                         meta_init_params=meta.params, gen_init=lambda key: gen.init(key)[0],
                         gen_apply=gen.apply_batchstats)
    bills = [v.stats()["answered_samples"] for v in servers]
    assert res.visits >= 1 and [a.queries for a in remote_pool.apis] == bills
    assert sum(bills) == res.api_queries > 0
    assert sum(v.stats()["injected_failures"] for v in servers) > 0
    assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(res.final_params))


def test_grpc_service_of_the_server(serve):
    """--grpc-port: KServe's OIP v2 gRPC servicer answers the same model (raw tensor contents),
    behind the same key, and bills the same counter."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    srv = serve(output="logits", max_batch=8, api_key="g1", grpc_port=0)
    auth = [("authorization", "Bearer g1")]
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=srv.name), metadata=auth,
                                  timeout=10)
        assert list(meta.inputs[0].shape) == [-1, 4, 4, 1] and meta.outputs[0].name == "output"
        x = batch(3)
        tensor = pb.ModelInferRequest.InferInputTensor
        req = pb.ModelInferRequest(model_name=srv.name, raw_input_contents=[x.tobytes()],
                                   inputs=[tensor(name="input", datatype="FP32",
                                                  shape=list(x.shape))])
        res = stub.ModelInfer(req, metadata=auth, timeout=10)
        out = np.frombuffer(res.raw_output_contents[0], np.float32).reshape(3, K)
        np.testing.assert_allclose(out, TEACHER(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, metadata=[("authorization", "Bearer no")], timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        big = pb.ModelInferRequest(model_name=srv.name, raw_input_contents=[batch(9).tobytes()],
                                   inputs=[tensor(name="input", datatype="FP32",
                                                  shape=[9, 4, 4, 1])])
        with pytest.raises(grpc.RpcError, match="max_batch=8") as e:
            stub.ModelInfer(big, metadata=auth, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert srv.stats()["answered_samples"] == 3 and srv.stats()["rejected_auth"] == 1
