"""TensorBoard event files without TensorFlow, and clu's metric writers on top of them.

clu (0.0.12, its latest release) writes TensorBoard summaries with ``tf.summary``:
``clu.metric_writers`` imports tensorflow as it loads, and ``clu.periodic_actions`` imports
``clu.metric_writers``. :func:`metric_writers` returns ``clu.metric_writers`` with its
``summary_writer`` module served from here instead: a :class:`SummaryWriter` on
tensorboard's own event-file format (``tensorboard.compat.proto`` and its record writer,
no TensorFlow), so the rest of clu (``create_default_writer``, ``LoggingWriter``,
``MultiWriter``, ``periodic_actions``) works unchanged on a machine without TensorFlow,
and nothing imports TensorFlow where it is installed.

    writers = tb_writer.metric_writers()      # before anything imports clu.metric_writers
    writer = writers.create_default_writer(workdir, asynchronous=False)

The files are the ones ``tf.summary`` writes (``events.out.tfevents.<time>.<host>.<pid>``
records of ``Event`` protos): scalars, images, texts, histograms and hparams show in
TensorBoard as usual. Local paths are written with ``open``; ``scheme://`` paths (gs://,
s3://) through :mod:`ssm_jax.core.storage` (etils.epath): an object cannot be appended to,
so each flush stores the whole event file again (one PUT; tf.io.gfile does the same on
GCS), and a run killed mid-way keeps what it had flushed. :func:`read_scalars` reads
scalars back (tools, tests).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import itertools
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ssm_jax.core import storage

log = logging.getLogger("ssm_jax")

_SHIMMED = "clu.metric_writers.summary_writer"
_uid = itertools.count()


class _ObjectFile:
    """A file on object storage written as a whole: :meth:`flush` stores everything
    written so far as one object (event files hold scalars and a few images: small)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._data = bytearray()
        self._stored = -1
        self.closed = False

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def flush(self) -> None:
        if len(self._data) != self._stored:
            storage.atomic_write(self.path, bytes(self._data))
            self._stored = len(self._data)

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def _open(path: str, mode: str):
    if storage.is_remote(path):
        return _ObjectFile(path) if mode == "wb" else storage.open_read(path, mode)
    return open(path, mode)


class EventFileWriter:
    """Appends ``Event`` records to a new ``events.out.tfevents.*`` file in ``logdir``."""

    def __init__(self, logdir: str) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        logdir = os.fspath(logdir)
        storage.makedirs(logdir)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_uid)}")
        self.path = storage.join(logdir, name)
        self._event_pb2 = event_pb2
        self._file = _open(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._lock = threading.Lock()
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_event(self, event) -> None:
        with self._lock:
            self._records.write(event.SerializeToString())

    def add_summary(self, step: int, values: list) -> None:
        from tensorboard.compat.proto import summary_pb2

        self.add_event(self._event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        with self._lock:
            self._records.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._records.flush()
                self._file.close()


def _png(image: np.ndarray) -> tuple[bytes, int, int, int]:
    """[H, W, C] float in [0, 1] or uint8 -> (PNG bytes, height, width, channels)."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if c == 1 else a).save(buf, format="PNG")
    return buf.getvalue(), h, w, c


def _make_summary_writer_class(interface):
    """clu's ``SummaryWriter`` API on :class:`EventFileWriter` (built once clu's interface
    module is loaded, as clu's own ``summary_writer`` is)."""
    from tensorboard.compat.proto import summary_pb2

    class SummaryWriter(interface.MetricWriter):
        """MetricWriter that writes TensorBoard event files, without TensorFlow."""

        def __init__(self, logdir: str):
            super().__init__()
            self._events = EventFileWriter(logdir)

        def write_summaries(self, step: int, values: Mapping[str, Any],
                            metadata: Mapping[str, Any] | None = None):
            from tensorboard.util import tensor_util

            out = []
            for key, value in values.items():
                md = metadata.get(key) if metadata is not None else None
                v = summary_pb2.Summary.Value(tag=key,
                                              tensor=tensor_util.make_tensor_proto(value))
                if md is not None:
                    v.metadata.CopyFrom(md)
                out.append(v)
            self._events.add_summary(step, out)

        def write_scalars(self, step: int, scalars: Mapping[str, Any]):
            self._events.add_summary(step, [
                summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v)))
                for k, v in scalars.items()])

        def write_images(self, step: int, images: Mapping[str, Any]):
            out = []
            for key, value in images.items():
                value = np.asarray(value)
                batch = value[None] if value.ndim == 3 else value
                for i, im in enumerate(batch):
                    png, h, w, c = _png(im)
                    tag = key if len(batch) == 1 else f"{key}/image/{i}"
                    out.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
                        height=h, width=w, colorspace=c, encoded_image_string=png)))
            self._events.add_summary(step, out)

        def write_videos(self, step: int, videos: Mapping[str, Any]):
            log.warning("SummaryWriter does not write videos (%s)", ", ".join(videos))

        def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
            log.warning("SummaryWriter does not write audio (%s)", ", ".join(audios))

        def write_texts(self, step: int, texts: Mapping[str, str]):
            from tensorboard.plugins.text import metadata as text_metadata
            from tensorboard.util import tensor_util

            md = text_metadata.create_summary_metadata(display_name=None, description=None)
            self._events.add_summary(step, [
                summary_pb2.Summary.Value(
                    tag=k, metadata=md,
                    tensor=tensor_util.make_tensor_proto(np.array(str(v).encode())))
                for k, v in texts.items()])

        def write_histograms(self, step: int, arrays: Mapping[str, Any],
                             num_buckets: Mapping[str, int] | None = None):
            out = []
            for key, value in arrays.items():
                a = np.asarray(value, np.float64).ravel()
                bins = (num_buckets or {}).get(key) or 30
                counts, edges = np.histogram(a, bins=bins) if a.size else ([], [0.0])
                out.append(summary_pb2.Summary.Value(tag=key, histo=summary_pb2.HistogramProto(
                    min=float(a.min()) if a.size else 0.0,
                    max=float(a.max()) if a.size else 0.0, num=float(a.size),
                    sum=float(a.sum()), sum_squares=float(np.sum(a * a)),
                    bucket_limit=[float(e) for e in edges[1:]],
                    bucket=[float(c) for c in counts])))
            self._events.add_summary(step, out)

        def write_hparams(self, hparams: Mapping[str, Any]):
            from tensorboard.plugins.hparams import summary_v2

            flat = {}

            def visit(prefix: str, d: Mapping[str, Any]) -> None:
                for k, v in d.items():
                    if isinstance(v, Mapping):
                        visit(f"{prefix}{k}.", v)
                    else:
                        flat[f"{prefix}{k}"] = (v if isinstance(v, (bool, int, float, str))
                                                else str(v))

            visit("", hparams)
            self._events.add_event(self._events._event_pb2.Event(
                wall_time=time.time(), summary=summary_v2.hparams_pb(flat)))

        def flush(self):
            self._events.flush()

        def close(self):
            self._events.close()

    return SummaryWriter


class _ShimLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # clu.metric_writers/__init__ imports its interface before summary_writer.
        from clu.metric_writers import interface

        module.SummaryWriter = _make_summary_writer_class(interface)


class _ShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == _SHIMMED:
            return importlib.util.spec_from_loader(name, _ShimLoader())
        return None


_finder = _ShimFinder()


def metric_writers():
    """``clu.metric_writers``, imported with the TensorFlow-free :class:`SummaryWriter`.

    If something imported ``clu.metric_writers`` before (with clu's tf.summary writer),
    that module is returned as it is.
    """
    if "clu.metric_writers" not in sys.modules and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    from clu import metric_writers as mw

    return mw


def create_writer(logdir: str, just_logging: bool = False):
    """clu's default writer (logging + TensorBoard events in ``logdir``), synchronous."""
    return metric_writers().create_default_writer(logdir, just_logging=just_logging,
                                                  asynchronous=False)


def read_events(path: str):
    """Yields the ``Event`` protos of one event file (checks the record CRCs)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with _open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                raise ValueError(f"corrupt record header in {path}")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return  # a record still being written
            if struct.unpack("<I", footer)[0] != masked_crc32c(data):
                raise ValueError(f"corrupt record in {path}")
            yield event_pb2.Event.FromString(data)


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file directly in ``logdir``."""
    out: dict[str, list[tuple[int, float]]] = {}
    names = sorted(n for n in storage.listdir(logdir) if n.startswith("events.out.tfevents."))
    for name in names:
        for ev in read_events(storage.join(logdir, name)):
            for v in ev.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
