"""Remote teachers as black-box APIs and pools: :func:`from_http` and its experiment wiring.

:func:`from_http` wraps an :class:`~dfml_jax.remote.client.OIPClient` in a
:class:`~dfml_jax.api.BlackBoxAPI` (ledger, output modes, the jit/vmap path);
:func:`remote_api_factory` builds such APIs for experiment runners (``--api-url``) and
:func:`load_remote_pool` a :class:`~dfml_jax.api.APIPool` of remote teachers (``--pool-urls``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from dfml_jax.api import APIPool, BlackBoxAPI
from dfml_jax.remote.client import OIPClient
from dfml_jax.remote.wire import parse_endpoint

__all__ = ["http_api_kwargs", "from_http", "remote_api_factory", "load_remote_pool"]


def http_api_kwargs(client: OIPClient, input_shape: Optional[Sequence[int]],
                    num_classes: Optional[int], output: Optional[str]) -> dict:
    """Check a client's model against what the caller expects; the ``from_host`` arguments.

    Args:
      client: the client (its model description is fetched).
      input_shape, num_classes: what the caller expects (None: take the server's).
      output: the output mode the API should reveal (None: the server's; ``"probs"`` for a
        top-k server).

    Returns:
      ``{"input_shape", "num_classes", "output", "scores", "name"}`` for
      :meth:`~dfml_jax.api.BlackBoxAPI.from_host`.

    Raises:
      ValueError: the server's model does not match, or cannot reveal ``output``.
    """
    info = client.info()
    s_shape = tuple(int(s) for s in info["input_shape"])
    s_k = int(info["num_classes"])
    shape = s_shape if input_shape is None else tuple(int(s) for s in input_shape)
    k = s_k if num_classes is None else int(num_classes)
    if shape != s_shape or k != s_k:
        raise ValueError(
            f"the server at {client.url} serves '{info.get('name')}' with input_shape {s_shape} "
            f"and {s_k} classes, but the API was built with input_shape={shape}, "
            f"num_classes={k}. Fix the arguments (GET {client.url}/v2/models/{client.model} shows "
            "the server's; pass None to adopt them).")
    server_out = info["output"]
    output = output or ("topk" if server_out == "topk" else server_out)
    allowed = {"logits": ("logits", "probs", "label", "topk"),
               "probs": ("probs", "logits", "label", "topk"),
               "topk": ("topk", "label"),
               "label": ("label",)}[server_out]
    if output not in allowed:
        raise ValueError(f"the server at {client.url} answers {server_out!r}; an API on it can "
                         f"reveal one of {allowed}, not {output!r}. Restart the server with "
                         f"--output logits/probs or ask for less.")
    scores = "logits" if server_out == "logits" else "probs"
    return {"input_shape": shape, "num_classes": k, "output": output, "scores": scores,
            "name": client.name}


def from_http(url: str, input_shape: Optional[Sequence[int]] = None,
              num_classes: Optional[int] = None, *, model: Optional[str] = None,
              output: Optional[str] = None, k: Optional[int] = None,
              decimals: Optional[int] = None, budget: Optional[int] = None,
              name: Optional[str] = None, api_key: Optional[str] = None,
              timeout: float = 10.0, max_retries: int = 4, backoff: float = 0.05,
              max_backoff: float = 2.0, concurrency: int = 4,
              max_batch: Optional[int] = None, cache_dir: Optional[str] = None,
              binary: bool = True, server_output: Optional[str] = None) -> BlackBoxAPI:
    """A model served over the Open Inference Protocol (Triton, KServe, MLServer, or
    ``python -m dfml_jax.serve``) as a black-box API.

    The client (:class:`OIPClient`, kept as ``api.remote``) reads the model's
    metadata, splits a query into requests of at most the server's batch limit, sends them
    concurrently (binary tensor data extension, JSON fallback), retries timeouts, 429 and 5xx
    with capped exponential backoff, and never returns a partial batch; the ledger charges a
    query once all of it is answered. Chunks the server answered for a query that failed are
    cached and delivered without re-buying when the query is retried (see
    :mod:`dfml_jax.remote`). Under ``jit``/``vmap`` it is the host-callback path of
    :meth:`BlackBoxAPI.from_host`. Errors are :class:`dfml_jax.remote.RemoteAPIError` subclasses
    (``BlackBoxError`` s): wrong key, oversize request, malformed answer, unavailable.

    Args:
      url: the server's base URL (``"http://127.0.0.1:8000"``) or a model URL
        (``"http://127.0.0.1:8000/v2/models/NAME"``).
      input_shape: shape of one sample; None: from the model metadata (checked against it).
      num_classes: number of classes; None: from the model metadata (checked against it).
      model: the model name (None: from the URL, else the server's only model).
      output: what the API reveals (None: what the server answers). A ``"label"`` server
        can only back ``"label"``; a scores server any mode.
      k, decimals, budget, name: as in :meth:`BlackBoxAPI.from_host` (``name`` defaults to
        ``model@host:port``).
      api_key: sent as ``Authorization: Bearer KEY``, if the server requires one.
      timeout: seconds for connecting and for each read of a request.
      max_retries: retries per request (timeouts, connection errors, 429/5xx).
      backoff, max_backoff: retry delay scale and cap, in seconds (doubling, jittered).
      concurrency: most requests (and connections) in flight for one query.
      max_batch: samples per request (None: the server's ``max_batch_size``, else 64).
      cache_dir: keep the pending cache of answered-but-undelivered chunks on disk, so a
        resumed process re-buys nothing (None: in memory).
      binary: use the binary tensor data extension (False: JSON tensors).
      server_output: what the model answers, for a server whose configuration does not say
        (``"logits"``, ``"probs"``, ``"topk"`` or ``"label"``).

    Returns:
      A :class:`BlackBoxAPI` with the client as ``api.remote`` (``.stats()`` reads the
      server's bill, ``.close()`` closes its connections).

    Raises:
      ValueError: the server's model does not match ``input_shape``/``num_classes`` or
        cannot reveal ``output``.
      dfml_jax.remote.RemoteAPIError: the server cannot be reached or rejects the key.
    """
    client = OIPClient(url, model=model, name=name, input_shape=input_shape,
                       num_classes=num_classes, server_output=server_output, api_key=api_key,
                       timeout=timeout, max_retries=max_retries, backoff=backoff,
                       max_backoff=max_backoff,
                       concurrency=concurrency, max_batch=max_batch, cache_dir=cache_dir,
                       binary=binary)
    kw = http_api_kwargs(client, input_shape, num_classes, output)
    if output is None and kw["output"] == "topk" and k is None:
        k = client.info().get("k")
    api = BlackBoxAPI.from_host(client, kw["input_shape"], kw["num_classes"], output=kw["output"],
                                k=k, scores=kw["scores"], decimals=decimals, budget=budget,
                                name=name or kw["name"])
    api.remote = client
    return api


def remote_api_factory(url: str, *, model: Optional[str] = None, api_key: Optional[str] = None,
                       cache_dir: Optional[str] = None, **client_options):
    """A factory of APIs on one remote teacher, for experiment runners (``--api-url``).

    Args:
      url: the endpoint (``http://host:port/v2/models/NAME``, or a base URL with ``model``).
      model: the model name, if not in the URL.
      api_key: the server's key, if any.
      cache_dir: on-disk pending cache shared by the APIs (put it in the run directory so that a
        resumed run re-buys nothing).
      **client_options: ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``concurrency``, ``max_batch``, ``binary`` (see :class:`OIPClient`).

    Returns:
      ``factory(*, output, budget, name, input_shape, num_classes) -> BlackBoxAPI``, with a
      ``description`` attribute for reports.
    """
    def factory(*, output, budget, name, input_shape, num_classes):
        return from_http(url, input_shape, num_classes, model=model, output=output,
                         budget=budget, name=name, api_key=api_key, cache_dir=cache_dir,
                         **client_options)

    base, m = parse_endpoint(url, model)
    factory.description = f"remote teacher at {base}" + (f" (model {m})" if m else "")
    return factory


def load_remote_pool(urls: Sequence[str], *, output: str = "logits", k: Optional[int] = None,
                     budget: Optional[int] = None, decimals: Optional[int] = None,
                     api_key: Optional[str] = None, cache_dir: Optional[str] = None,
                     **client_options):
    """A pool of remote teachers, one OIP endpoint each (e.g. ``python -m dfml_jax.serve --pool``).

    The public metadata a pool algorithm needs (absolute classes, normalisation, input shape,
    dataset, architecture) comes from each model's configuration (``GET
    /v2/models/NAME/config``, parameter ``dfml_jax``); white-box access does not exist.

    Args:
      urls: one endpoint per teacher, in pool order: ``http://host:port/v2/models/NAME`` (or a
        base URL of a server with a single model).
      output, k, budget, decimals: as in :func:`dfml_jax.teachers.load_pool` (per API).
      api_key: the servers' key, if any.
      cache_dir: on-disk pending cache shared by the APIs.
      **client_options: ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
        ``concurrency``, ``max_batch``, ``binary`` (see :class:`OIPClient`).

    Returns:
      A :class:`dfml_jax.api.APIPool` (``scenario`` ``"remote"``, ``directory`` the first URL).

    Raises:
      ValueError: no URLs, or a model that does not publish its teacher's classes and
        normalisation (not a pool teacher).
    """
    urls = list(urls)
    if not urls:
        raise ValueError("load_remote_pool needs at least one URL")
    apis, records = [], []
    for u in urls:
        api = from_http(u, None, None, output=output, k=k, budget=budget,
                        decimals=decimals, api_key=api_key, cache_dir=cache_dir,
                        **client_options)
        info = api.remote.info()
        missing = [f for f in ("classes", "mean", "std") if info.get(f) is None]
        if missing:
            api.remote.close()
            raise ValueError(f"the model at {u} ('{info.get('name')}') does not publish "
                             f"{missing} in its configuration; serve a pool teacher (python -m "
                             "dfml_jax.serve --pool DIR --api I) to use it in a pool.")
        rec = {f: v for f, v in info.items() if f not in ("input_name", "output_name",
                                                          "output_dtype")}
        rec.update(url=api.remote.url, model=api.remote.model, name=api.name,
                   input_shape=list(api.input_shape), num_classes=api.num_classes)
        rec.setdefault("dataset", "remote")
        rec.setdefault("arch", "remote")
        apis.append(api)
        records.append(rec)
    spaces = {r.get("input_space", "normalized") for r in records}
    if len(spaces) != 1:
        raise ValueError(f"the servers mix input spaces {sorted(spaces)}; start them all with the "
                         "same --input-space.")
    return APIPool(apis=tuple(apis), records=tuple(records),
                   classes=tuple(tuple(int(c) for c in r["classes"]) for r in records),
                   scenario="remote", input_space=spaces.pop(), directory=urls[0])
