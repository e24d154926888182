"""`kc serve`: the HTTP prediction server (FastAPI on uvicorn).

    POST /v1/classify   an image as a multipart upload (field `image`) or JSON {"image_base64": ...}; parameters
                        top_k, threshold, vertical (repeatable) in the query string or the JSON body
    GET  /v1/labels     the label table (ids, names, verticals, hierarchy paths, in output order)
    GET  /healthz       liveness and what model is loaded
    GET  /metrics       request counts, latency and batch-size histograms (Prometheus text format)
    GET  /openapi.json  the schema (FastAPI), /docs its browsable form

Requests are micro-batched: each decoded image joins a queue; one worker takes up to `max_batch` images, waiting at
most `max_wait_ms` for more after the first (and only while other admitted requests are still on their way, so a
lone request never waits), and runs them as one batch in a thread, so throughput under concurrency approaches the
model's batched throughput. Admission control: at most `max_pending` requests are admitted at once (reading,
decoding, queued or running); more get 503 with Retry-After at once instead of waiting. Memory is bounded by the
limits, not by the clients (`ServerLimits.memory_bound`): an image's decode memory is read from its header and
reserved from a shared budget (`max_decode_bytes`) before it is decoded, waiting up to `decode_wait_s` (then 503)
while other images hold it; images are decoded small where the format allows and reduced early (`decode_rgb`), in
`decode_threads` threads of their own (images of up to 256 x 256 pixels on the event loop, faster than a hop), and
the heap is trimmed after a large one so that memory returns after a burst. Bodies over
`max_upload_bytes` get 413 (checked from Content-Length and while reading), images over `max_pixels` 413 (checked
from the image header, before decoding), a wrong content type 415, a body that is not an image or is truncated 400,
bad parameters 422; every error is JSON {"error": ..., "detail": ...}. The model path comes from the command line
only, never from a request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import io
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from kc.data.images import ImageTooLarge, decode_bytes, decode_rgb
from kc.errors import KCError
from kc.serve.labels import LabelPicker, label_table
from kc.serve.runtime import LoadedModel

INLINE_DECODE_PIXELS = 256 * 256
TRIM_AFTER_BYTES = 32 * 2**20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ServerLimits:
    """What bounds the server's work and memory. Request bodies hold at most max_pending x max_upload_bytes;
    images being decoded, max_decode_bytes (`DecodeBudget`); the batches, max_batch model inputs."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_pending: int = 64
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_top_k: int = 1000
    max_decode_bytes: int = 512 * 2**20
    decode_threads: int = 2
    decode_wait_s: float = 10.0

    def memory_bound(self) -> str:
        bodies, decoding = self.max_pending * self.max_upload_bytes / 2**20, self.max_decode_bytes / 2**20
        return f"request bodies at most {bodies:.0f} MB, images being decoded at most {decoding:.0f} MB"


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


class DecodeBudget:
    """The image memory that decoding may hold at once (`max_decode_mb`), shared by all requests: a request
    reserves its image's share (from the header, before decoding) and waits for it, within `wait_s`, while others
    hold it. So many large images at once queue here, instead of being decoded side by side."""

    def __init__(self, total_bytes: int, wait_s: float):
        self.total, self.free, self.wait_s = total_bytes, total_bytes, wait_s
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        if nbytes > self.total:
            raise ApiError(
                413,
                "too_many_pixels",
                f"decoding this image needs about {nbytes / 2**20:.0f} MB, more than the server's decode budget "
                f"of {self.total / 2**20:.0f} MB (kc serve --max-decode-mb)",
            )
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.free >= nbytes), self.wait_s)
            except TimeoutError:
                raise ApiError(
                    503,
                    "busy_decoding",
                    "the server is decoding other large images; retry shortly",
                    {"Retry-After": "1"},
                ) from None
            self.free -= nbytes
        try:
            yield
        finally:
            async with self.changed:
                self.free += nbytes
                self.changed.notify_all()


class MicroBatcher:
    """Collects single images into batches for one model worker."""

    def __init__(self, model: LoadedModel, max_batch: int, max_wait_s: float, in_flight: Callable[[], int]):
        self.model, self.max_batch, self.max_wait_s = model, max_batch, max_wait_s
        self.in_flight = in_flight  # requests admitted and not yet answered
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self.batch_sizes: Counter[int] = Counter()

    async def submit(self, image: np.ndarray) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                # Wait only for images that are on their way (admitted requests still reading or decoding):
                # a lone request runs at once instead of paying max_wait for company that is not coming.
                if remaining <= 0 or self.in_flight() <= len(batch):
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            self.batch_sizes[len(batch)] += 1
            try:
                scores = await run_in_threadpool(self.model.scores, np.stack([image for image, _ in batch]))
            except Exception as exc:  # the model failing fails this batch's requests, not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row in zip(batch, scores, strict=True):
                if not future.done():
                    future.set_result(row)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (an app per registry: tests run several)."""

    def __init__(self, batch_sizes: Counter[int], pending: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = PromCounter(
            "kc_requests", "HTTP requests by path and status.", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kc_request_seconds", "Request latency.", ["path"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        Gauge("kc_pending_requests", "Requests admitted now.", registry=self.registry).set_function(pending)
        self.registry.register(_BatchSizes(batch_sizes))

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _BatchSizes(Collector):
    """kc_batches_total{size}: the model batches run, by size, read from the batcher's own tally."""

    def __init__(self, sizes: Counter[int]):
        self.sizes = sizes

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("kc_batches", "Model batches by size.", labels=["size"])
        for size, n in sorted(self.sizes.items()):
            family.add_metric([str(size)], n)
        yield family


class MetricsMiddleware:
    """Counts every HTTP request by route and status, with its latency (a plain ASGI middleware: cheap)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router records the matched route
            self.metrics.observe(path, status, time.perf_counter() - start)


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the body has {int(declared):,} bytes; the limit is {limit:,}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "too_large", f"the body exceeds the limit of {limit:,} bytes")
    except ClientDisconnect:  # the client went away mid-body: no one to answer, and not a server error
        raise ApiError(
            499, "client_closed_request", "the client closed the connection before sending the body"
        ) from None
    return bytes(body)


def _multipart_image(body: bytes, content_type: str) -> tuple[bytes, dict[str, Any]]:
    """The `image` file field and the other fields of a multipart/form-data body."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "multipart body without a boundary")
    parts: dict[str, bytes] = {}
    current: dict[str, Any] = {}

    def on_part_begin() -> None:
        current.clear()
        current.update({"headers": {}, "data": bytearray(), "field": b"", "value": b""})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current["value"] += data[start:end]

    def on_header_end() -> None:
        current["headers"][current["field"].decode("latin-1").lower()] = current["value"].decode("latin-1")
        current["field"], current["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"] += data[start:end]

    def on_part_end() -> None:
        _, disposition = parse_options_header(current["headers"].get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        parts[name] = bytes(current["data"])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own error types
        raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from None
    if "image" not in parts:
        raise ApiError(400, "bad_request", "multipart body without an 'image' field; upload the file as 'image'")
    image = parts.pop("image")
    return image, {k: v.decode("utf-8", "replace") for k, v in parts.items()}


def _parameters(query: Any, fields: dict[str, Any], limits: ServerLimits) -> tuple[int, float, list[str] | None]:
    """top_k, threshold and verticals from the body's fields, else the query string; 422 when invalid."""

    def get(name: str) -> Any:
        return fields[name] if name in fields else query.get(name)

    try:
        top_k = int(get("top_k") if get("top_k") is not None else 5)
        threshold = float(get("threshold") if get("threshold") is not None else 0.0)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_parameter", "top_k must be an integer and threshold a number") from None
    if not 1 <= top_k <= limits.max_top_k:
        raise ApiError(422, "invalid_parameter", f"top_k must lie in [1, {limits.max_top_k}], got {top_k}")
    if not 0.0 <= threshold <= 1.0:
        raise ApiError(422, "invalid_parameter", f"threshold must lie in [0, 1], got {threshold}")
    verticals = fields.get("vertical", fields.get("verticals")) or query.getlist("vertical") or None
    if isinstance(verticals, str):
        verticals = [verticals]
    return top_k, threshold, verticals


def _image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(pixels, decode bytes) of an image from its header alone, or the error a request gets for it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = img.width * img.height
            if pixels > max_pixels:
                raise ApiError(
                    413, "too_many_pixels", f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels:,}"
                )
            return pixels, decode_bytes(img.width, img.height, img.mode)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked as it opens the header
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, "not_an_image", "the data is not an image in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, "unreadable_image", f"the image is truncated or corrupt: {exc}") from None


def _decode(data: bytes, model: LoadedModel, max_pixels: int, return_memory: bool = False) -> np.ndarray:
    try:
        image = decode_rgb(io.BytesIO(data), max_pixels=max_pixels, target=model.preprocess.size)
    except (ImageTooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, "not_an_image", "the data is not an image in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, "unreadable_image", f"the image is truncated or corrupt: {exc}") from None
    finally:
        if return_memory:
            _trim_heap()
    return model.preprocess(image).numpy()


def _trim_heap() -> None:
    """Give the pages a large decode freed back to the system (glibc keeps them otherwise), so the server's
    resident memory falls back after a burst of large images."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def create_app(model: LoadedModel, limits: ServerLimits | None = None, class_thresholds: dict | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    picker = LabelPicker(model.taxonomy, class_thresholds)
    labels = label_table(model.taxonomy)
    state = {"pending": 0}
    batcher = MicroBatcher(model, limits.max_batch, limits.max_wait_ms / 1000, lambda: state["pending"])
    metrics = Metrics(batcher.batch_sizes, lambda: state["pending"])
    budget = DecodeBudget(limits.max_decode_bytes, limits.decode_wait_s)
    # A few decoding threads of their own (not the shared pool of 40): fewer heaps, and decodes beyond them queue.
    decoders = ThreadPoolExecutor(limits.decode_threads, thread_name_prefix="kc-decode")

    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="kc prediction server",
        description="One classifier over a large label vocabulary (knowledge concentration).",
        version="1",
        lifespan=lifespan,
    )

    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(KCError)
    async def kc_error(request: Request, exc: KCError) -> JSONResponse:
        return _error(422, "invalid_parameter", str(exc))

    classify_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            "top_k": {"type": "integer", "default": 5},
                            "threshold": {"type": "number", "default": 0.0},
                            "vertical": {"type": "string"},
                        },
                        "required": ["image"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "image_base64": {"type": "string"},
                            "top_k": {"type": "integer", "default": 5},
                            "threshold": {"type": "number", "default": 0.0},
                            "verticals": {"type": "array", "items": {"type": "string"}},
                        },
                        "required": ["image_base64"],
                    }
                },
            },
        }
    }

    @app.post("/v1/classify", openapi_extra=classify_body)
    async def classify(request: Request) -> dict[str, Any]:
        """Top-k labels of one image: multipart field `image`, or JSON `image_base64`."""
        if state["pending"] >= limits.max_pending:
            raise ApiError(
                503, "overloaded", f"{state['pending']} requests in progress; retry shortly", {"Retry-After": "1"}
            )
        state["pending"] += 1
        try:
            content_type = request.headers.get("content-type", "")
            kind = content_type.split(";")[0].strip().lower()
            if kind not in ("multipart/form-data", "application/json"):
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"content type '{kind or 'none'}': send multipart/form-data (field 'image') or application/json "
                    "(key 'image_base64')",
                )
            body = await _read_body(request, limits.max_upload_bytes)
            if kind == "application/json":
                try:
                    fields = json.loads(body)
                    data = base64.b64decode(fields.pop("image_base64"), validate=True)
                except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
                    raise ApiError(
                        400, "bad_request", "expected a JSON object with 'image_base64' (base64 of the file)"
                    ) from None
            else:
                data, fields = _multipart_image(body, content_type)
            top_k, threshold, verticals = _parameters(request.query_params, fields, limits)
            picker.vertical_mask(verticals)  # an unknown vertical: 422 before any work
            pixels, nbytes = _image_header(data, limits.max_pixels)
            async with budget.hold(nbytes):
                if pixels <= INLINE_DECODE_PIXELS:  # small images decode faster than a hop to a thread
                    image = _decode(data, model, limits.max_pixels)
                else:
                    loop = asyncio.get_running_loop()
                    big = nbytes >= TRIM_AFTER_BYTES
                    image = await loop.run_in_executor(decoders, _decode, data, model, limits.max_pixels, big)
            scores = await batcher.submit(image)
            return {"labels": picker.pick(scores, top_k, threshold, verticals)}
        finally:
            state["pending"] -= 1

    @app.get("/v1/labels")
    async def get_labels() -> dict[str, Any]:
        """Every class in output order, with its vertical and hierarchy path."""
        verticals = [{"id": v.id, "name": v.name} for v in model.taxonomy.verticals]
        return {"classes": labels, "verticals": verticals}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model.description, "classes": model.taxonomy.num_classes}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> str:
        return metrics.render()

    return app


def serve(model: LoadedModel, host: str, port: int, limits: ServerLimits, class_thresholds: dict | None) -> None:
    import uvicorn

    uvicorn.run(create_app(model, limits, class_thresholds), host=host, port=port, log_level="warning")
