"""Which samples the teacher sees together.

A sample's cached features must be a function of the sample alone, so that a resumed, a 1-process and
an N-process dump give the same cache bit for bit. Two rules give that:
- each image is padded only to its own size-divisible shape, so batches hold images of one padded
  shape (padding content reaches into the valid region's features through the receptive field);
- batches never cross a shard boundary, and shards are the unit of ownership and of resume, so the
  same samples are batched together whatever the number of processes or interruptions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


def shard_batches(
    samples: Sequence[int],
    shapes: dict[int, tuple[int, int]],
    shard_samples: int,
    batch_size: int,
) -> list[list[int]]:
    """Split `samples` into batches of equal padded shape that never cross a shard boundary.

    `shapes[i]` is sample i's padded shape (cache_contract.geometry.padded_shape). Order inside a shard
    follows the sample index, so the result depends only on the set of samples, not on the caller.
    """
    by_shard: OrderedDict[int, list[int]] = OrderedDict()
    for index in sorted(samples):
        by_shard.setdefault(index // shard_samples, []).append(index)
    batches: list[list[int]] = []
    for shard_members in by_shard.values():
        groups: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        for index in shard_members:
            groups.setdefault(shapes[index], []).append(index)
        for members in groups.values():
            batches.extend(_chunks(members, batch_size))
    return batches


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]
