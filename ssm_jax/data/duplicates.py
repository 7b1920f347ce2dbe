"""Test images that are byte-identical copies of training images (a leak: the model is
scored on images it trained on, and the test figures come out too good).

Cheap on big folders: file sizes first (one ``stat`` each), then content hashes only of the
files whose size a file of the other split shares; nothing is decoded. Copies that were
re-encoded or resized are not found (that would need decoding every image).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from ssm_jax.core import storage

log = logging.getLogger("ssm_jax")


def _size(path: str) -> int:
    if storage.is_remote(path):
        return int(storage.as_path(path).stat().length)
    return os.path.getsize(path)


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def training_copies_in_test(root: str | os.PathLike, layout: str = "auto") -> list[tuple[str, str]]:
    """(test image, training image) for each test image of the folder ``root`` (any layout
    of :mod:`ssm_jax.data.layouts`) whose file is byte-identical to a training image's."""
    from ssm_jax.data import folder

    train = folder.train_paths(root, layout)
    test = [e[0] for e in folder.test_entries(root, layout)[0]]
    # Threads: on a bucket each stat and read waits on the network.
    with ThreadPoolExecutor(8) as pool:
        train_sizes = dict(zip(train, pool.map(_size, train)))
        test_sizes = dict(zip(test, pool.map(_size, test)))
    by_size = defaultdict(list)
    for p, n in train_sizes.items():
        by_size[n].append(p)
    test = [p for p in test if test_sizes[p] in by_size]
    train = sorted({q for p in test for q in by_size[test_sizes[p]]})
    with ThreadPoolExecutor(8) as pool:
        digests = dict(zip(test + train, pool.map(_digest, test + train)))
    first = {}
    for q in train:  # the first training file of each content, in sorted order
        first.setdefault(digests[q], q)
    return [(p, first[digests[p]]) for p in test if digests[p] in first]


def warn_if_test_copies_training(root: str | os.PathLike, layout: str = "auto") -> int:
    """Logs one warning line when test images of ``root`` are copies of training images;
    the number of such test images."""
    pairs = training_copies_in_test(root, layout)
    if pairs:
        shown = ", ".join(f"{storage.relpath(t, root)} = {storage.relpath(q, root)}"
                          for t, q in pairs[:4])
        more = f" and {len(pairs) - 4} more" if len(pairs) > 4 else ""
        log.warning("data: %d test image(s) of %s are byte-identical to training images "
                    "(%s%s): the test metrics score images the model trained on",
                    len(pairs), root, shown, more)
    return len(pairs)
