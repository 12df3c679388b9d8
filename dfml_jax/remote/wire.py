"""The Open Inference Protocol (KServe v2 / Triton HTTP) wire format, without any HTTP.

Endpoint URLs (:func:`parse_endpoint`), inference requests and answers in the binary tensor data
extension or plain JSON (:func:`encode_infer_request`, :func:`decode_infer_response`), and the
protocol's constants. Used by the client (:mod:`dfml_jax.remote.client`) and the server
(:mod:`dfml_jax.serve`).

Example (a request and the answer a server would send for it):
  >>> import numpy as np
  >>> body, headers = encode_infer_request(np.zeros((2, 3)), "input", output_name="scores")
  >>> headers["Content-Type"], len(body) - int(headers["Inference-Header-Content-Length"])
  ('application/octet-stream', 24)
  >>> answer = b'{"outputs":[{"name":"scores","shape":[2],"datatype":"INT64","data":[1,2]}]}'
  >>> decode_infer_response(answer, {}, "scores")
  array([1, 2])
  >>> parse_endpoint("http://host:8000/v2/models/resnet/versions/1")
  ('http://host:8000', 'resnet')
"""
from __future__ import annotations

import json
import urllib.parse
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = [
    "SERVER_OUTPUTS",
    "CONFIG_PARAMETER",
    "OIP_DTYPES",
    "parse_endpoint",
    "encode_infer_request",
    "decode_infer_response",
]

#: What a server can answer: scores as logits, probabilities or top-k probabilities, or labels.
SERVER_OUTPUTS = ("logits", "probs", "topk", "label")
#: Key of the public teacher record in a ``dfml_jax.serve`` model configuration's ``parameters``.
CONFIG_PARAMETER = "dfml_jax"
#: OIP tensor datatypes and their little-endian NumPy dtypes.
OIP_DTYPES = {"FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
              "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
              "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
              "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "BOOL": np.dtype("?")}
_HEADER_LENGTH = "Inference-Header-Content-Length"
_RETRY_STATUS = (429, 500, 502, 503, 504)


def parse_endpoint(url: str, model: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """Split an OIP endpoint into its base URL and model name.

    Args:
      url: ``http://host:port`` (with ``model``), or ``http://host:port/v2/models/NAME`` (optionally
        ``/versions/V``, ignored), or ``http://host:port/prefix`` for a server behind a path
        prefix.
      model: the model name; overrides one in the URL.

    Returns:
      ``(base_url, model)``; ``model`` is None when neither names it.

    Raises:
      ValueError: not an ``http(s)://host[:port]`` URL.
    """
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"an OIP endpoint must look like http://HOST:PORT or "
                         f"http://HOST:PORT/v2/models/NAME, got {url!r}")
    path = parsed.path.rstrip("/")
    named = None
    if "/v2/models/" in path:
        path, rest = path.split("/v2/models/", 1)
        named = rest.split("/")[0] or None
    elif path.endswith("/v2"):
        path = path[:-3]
    base = f"{parsed.scheme}://{parsed.netloc}{path}"
    return base, (model or named)


def encode_infer_request(x: np.ndarray, input_name: str, *, output_name: Optional[str] = None,
                         binary: bool = True, request_id: str = "") -> Tuple[bytes, Dict[str, str]]:
    """Encode one OIP v2 inference request for a float32 batch.

    Args:
      x: the batch (cast to float32, sent as ``FP32``).
      input_name: the model's input name (from its metadata).
      output_name: the output to ask for (None: all outputs).
      binary: use the binary tensor data extension (raw bytes after a JSON header) and ask for
        binary answers; False: JSON ``data`` lists both ways.
      request_id: the request ``id`` (echoed by the server).

    Returns:
      ``(body, headers)``: the request body and its ``Content-Type`` (and, for binary,
      ``Inference-Header-Content-Length``) headers.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=OIP_DTYPES["FP32"]))
    tensor = {"name": input_name, "shape": [int(s) for s in x.shape], "datatype": "FP32"}
    head: Dict = {"id": request_id} if request_id else {}
    if binary:
        raw = x.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head["inputs"] = [tensor]
        head["parameters"] = {"binary_data_output": True}
        if output_name:
            head["outputs"] = [{"name": output_name, "parameters": {"binary_data": True}}]
        js = json.dumps(head, separators=(",", ":")).encode()
        return js + raw, {"Content-Type": "application/octet-stream",
                          _HEADER_LENGTH: str(len(js))}
    tensor["data"] = x.ravel().tolist()
    head["inputs"] = [tensor]
    if output_name:
        head["outputs"] = [{"name": output_name, "parameters": {"binary_data": False}}]
    return json.dumps(head, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def decode_infer_response(body: bytes, headers: Mapping[str, str],
                          output_name: Optional[str] = None) -> np.ndarray:
    """Decode one output tensor of an OIP v2 inference response (binary extension or JSON).

    Args:
      body: the response body.
      headers: the response headers (``Inference-Header-Content-Length`` compared
        case-insensitively; absent: the whole body is JSON).
      output_name: the output to return (None: the only output).

    Returns:
      The tensor as a NumPy array of its datatype (a writable copy).

    Raises:
      ValueError: bad JSON header, missing output, unknown datatype, or data whose length does not
        match the tensor's shape (e.g. a truncated body), with the numbers in the message.
    """
    h = {k.lower(): v for k, v in headers.items()}
    hl = h.get(_HEADER_LENGTH.lower())
    try:
        json_len = len(body) if hl is None else int(hl)
    except ValueError:
        raise ValueError(f"{_HEADER_LENGTH} {hl!r} is not an integer")
    if not 0 <= json_len <= len(body):
        raise ValueError(f"{_HEADER_LENGTH} is {json_len} but the body has only {len(body)} bytes "
                         "(truncated body)")
    try:
        head = json.loads(body[:json_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"the response header is not JSON ({e}); truncated or not an OIP answer")
    outputs = head.get("outputs") if isinstance(head, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise ValueError(f"the response has no 'outputs' list (got keys "
                         f"{sorted(head) if isinstance(head, dict) else type(head).__name__})")
    offset, chosen, chosen_off = json_len, None, None
    for out in outputs:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if output_name is None or out.get("name") == output_name:
            if chosen is None:
                chosen, chosen_off = out, offset
        if size is not None:
            offset += int(size)
    if chosen is None:
        raise ValueError(f"the response has no output named {output_name!r} (outputs: "
                         f"{[o.get('name') for o in outputs]})")
    if output_name is None and len(outputs) > 1:
        raise ValueError(f"the response has {len(outputs)} outputs "
                         f"{[o.get('name') for o in outputs]}; name the one to use")
    dt_name = chosen.get("datatype")
    if dt_name not in OIP_DTYPES:
        raise ValueError(f"output datatype {dt_name!r} is not a numeric OIP datatype "
                         f"({sorted(OIP_DTYPES)})")
    try:
        shape = tuple(int(s) for s in chosen.get("shape"))
    except (TypeError, ValueError):
        raise ValueError(f"output shape {chosen.get('shape')!r} is not a list of integers")
    if any(s < 0 for s in shape):
        raise ValueError(f"output shape {shape} has a negative dimension")
    dt = OIP_DTYPES[dt_name]
    count = int(np.prod(shape, dtype=np.int64))
    size = (chosen.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        size = int(size)
        raw = body[chosen_off:chosen_off + size]
        if size != count * dt.itemsize or len(raw) != size:
            raise ValueError(f"output '{chosen.get('name')}' has {len(raw)} binary bytes "
                             f"(announced {size}) but shape {shape} and datatype {dt_name} need "
                             f"{count * dt.itemsize} (truncated or corrupted body)")
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    data = chosen.get("data")
    if data is None:
        raise ValueError(f"output '{chosen.get('name')}' has neither 'data' nor binary data")
    try:
        arr = np.asarray(data, dtype=dt).ravel()
    except (TypeError, ValueError) as e:
        raise ValueError(f"output '{chosen.get('name')}' data is not {dt_name} numbers ({e})")
    if arr.size != count:
        raise ValueError(f"output '{chosen.get('name')}' has {arr.size} values but shape {shape} "
                         f"needs {count}")
    return arr.reshape(shape)


def _error_text(data: bytes) -> str:
    try:
        msg = json.loads(data.decode("utf-8"))
        if isinstance(msg, dict):
            return str(msg.get("error", msg.get("detail", msg)))
        return str(msg)
    except Exception:
        return data[:200].decode("utf-8", "replace")

