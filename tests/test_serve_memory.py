"""The server's memory is bounded by its limits, not by its clients: large images queue for a shared decode budget
(measured from their headers, before decoding), are decoded reduced, and beyond what the budget can ever hold are
refused."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import kc.serve.app as server_app
from kc.data.images import Preprocess, decode_bytes, decode_rgb
from kc.serve.app import ServerLimits, create_app
from kc.serve.runtime import LoadedModel
from kc.taxonomy import ClassInfo, Taxonomy, Vertical


def png(width, height, colour=(200, 30, 60)):
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")  # a flat colour: a few KB for many pixels
    return out.getvalue()


@pytest.fixture
def model():
    taxonomy = Taxonomy([Vertical("v", "v")], [ClassInfo(f"c{i}", f"c{i}", "v") for i in range(3)])
    return LoadedModel(
        lambda x: np.zeros((len(x), 3), np.float32),
        taxonomy,
        Preprocess(16, (0.5,) * 3, (0.25,) * 3),
        "sigmoid",
        "t",
        1,
    )


def decodes_in_flight(monkeypatch):
    """Wrap the decoder to record the most large images decoded at once."""
    count, lock, record = [0], threading.Lock(), {"most": 0, "done": 0}
    original = server_app._decode

    def counted(*args, **kwargs):
        with lock:
            count[0] += 1
            record["most"] = max(record["most"], count[0])
        try:
            result = original(*args, **kwargs)
            threading.Event().wait(0.05)  # long enough for the others to pile up if nothing held them back
            return result
        finally:
            with lock:
                count[0] -= 1
                record["done"] += 1

    monkeypatch.setattr(server_app, "_decode", counted)
    return record


def post_many(client, body, n):
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.post("/v1/classify", files={"image": body}), range(n)))


def test_large_images_wait_for_the_decode_budget_instead_of_decoding_side_by_side(model, monkeypatch):
    big = png(1500, 1500)  # 2.25M pixels, about 16 MB to decode, a 7 KB upload
    need = decode_bytes(1500, 1500, "RGB")
    record = decodes_in_flight(monkeypatch)
    limits = ServerLimits(max_decode_bytes=int(1.5 * need), decode_threads=4, decode_wait_s=30)
    with TestClient(create_app(model, limits)) as client:
        answers = post_many(client, big, 8)
    assert [a.status_code for a in answers] == [200] * 8  # every one served, in turn
    assert record["done"] == 8 and record["most"] == 1  # the budget held one at a time, though 4 threads were free


def test_past_its_wait_a_request_gets_503_and_an_image_that_can_never_fit_413(model, monkeypatch):
    big = png(1500, 1500)
    need = decode_bytes(1500, 1500, "RGB")
    decodes_in_flight(monkeypatch)
    limits = ServerLimits(max_decode_bytes=int(1.5 * need), decode_threads=4, decode_wait_s=0.01)
    with TestClient(create_app(model, limits)) as client:
        statuses = [a.status_code for a in post_many(client, big, 8)]
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}
        busy = next(a for a in post_many(client, big, 8) if a.status_code == 503)
        assert busy.json()["error"] == "busy_decoding" and busy.headers["retry-after"] == "1"
        huge = client.post("/v1/classify", files={"image": png(2000, 2000)})
        assert huge.status_code == 413 and "decode budget" in huge.json()["detail"]
        assert client.post("/v1/classify", files={"image": png(20, 20)}).status_code == 200


def test_a_large_image_is_reduced_early_and_resizes_to_nearly_the_same_pixels():
    y, x = np.mgrid[0:1800, 0:2400] / 2400
    smooth = np.stack([255 * x, 300 * y, 127 + 127 * np.sin(6 * x + 4 * y)], -1).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(smooth).save(data, format="PNG")
    preprocess = Preprocess(16, (0.5,) * 3, (0.25,) * 3)
    reduced = decode_rgb(io.BytesIO(data.getvalue()), target=16)
    full = decode_rgb(io.BytesIO(data.getvalue()))
    assert full.size == (2400, 1800) and reduced.size == (43, 32)  # the whole image, shorter side 2 x 16
    levels = ((preprocess(reduced) - preprocess(full)).abs() * 0.25 * 255).max().item()
    assert levels <= 2  # of 255
    assert decode_rgb(io.BytesIO(png(40, 30)), target=16).size == (40, 30)  # small images are left as they are


def png_header_only(width, height):
    """A PNG that declares width x height pixels and holds none: what a client can send in a few bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_declaring_more_pixels_than_anything_allows_is_413_from_its_header(model):
    with TestClient(create_app(model, ServerLimits(max_pixels=10**12))) as client:
        answer = client.post("/v1/classify", files={"image": png_header_only(30_000, 30_000)})  # 900M pixels
    assert answer.status_code == 413 and answer.json()["error"] == "too_many_pixels"
