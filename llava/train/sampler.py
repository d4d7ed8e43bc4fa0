"""The order rows are trained in: one global, seed-determined list of global batches per epoch.

Every process computes the same list (it depends only on the seed, the epoch, the row
lengths and the global batch size), and `Strategy.shard` gives each process its part of a
global batch. So the rows of an optimizer step do not depend on how many processes share
it, and a resumed run finds its place again from the step number alone.

Every global batch is full: the last one of an epoch (or of a modality) is topped up with
rows from the start of the same epoch's order, as torch's DistributedSampler pads. That
keeps the number of forward passes equal on every process (a process with fewer would
hang the others in a collective) and the loss normalisation the same on every step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llava.errors import DataError, InputError

__all__ = ["epoch_batches", "steps_per_epoch", "micro_batches"]


def _randperm(n: int, seed: int, epoch: int, salt: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + salt)
    return torch.randperm(n, generator=g).tolist()


def _chunks(order: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of `size`; the last one topped up by cycling through `order`."""
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    if batches and len(batches[-1]) < size:
        last = batches[-1]
        k = 0
        while len(last) < size:
            last.append(order[k % len(order)])
            k += 1
    return batches


def _by_length(batch: list[int], lengths: Sequence[int]) -> list[int]:
    """Longest first (stable), so strided shards get similar lengths and micro-batches pad little."""
    return sorted(batch, key=lambda i: -abs(lengths[i]))


def _length_sorted(batches: list[list[int]], lengths: Sequence[int], window: int) -> list[list[int]]:
    """The same rows as `batches` (all full), sorted longest first across each run of `window` batches
    and cut again: with a window of 1 each batch keeps its own rows (the original's grouping)."""
    out = []
    for i in range(0, len(batches), window):
        rows = _by_length([r for b in batches[i:i + window] for r in b], lengths)
        size = len(batches[i])
        out += [rows[j:j + size] for j in range(0, len(rows), size)]
    return out


def epoch_batches(n_rows: int, global_batch: int, seed: int, epoch: int,
                  modality_lengths: Sequence[int] | None = None, length_window: int = 1) -> list[list[int]]:
    """The global batches of one epoch, as lists of row indices.

    Without `modality_lengths`: a seeded permutation cut into global batches.
    With them (the original's `--group_by_modality_length`; negative = text-only row):
    image rows and text rows are permuted separately and cut into global batches of their
    own, each sorted by length, and the batches of both kinds are shuffled together. Every
    step is then single-modality (the original merged its two leftover batches into one
    mixed batch; here each modality's last batch is topped up from its own rows instead).

    `length_window` > 1 sorts by length across that many consecutive batches before cutting
    them again (transformers' `group_by_length` mega-batches, 50 there), so each batch holds rows
    of similar length. Why: the original's grouping only helps a batch split over several
    processes; in one process a batch of random rows pads a third of its tokens on the tiny
    recipe's chats, and 16 batches cut that to a twelfth.
    """
    _check(n_rows, global_batch, modality_lengths)
    if length_window < 1:
        raise InputError(f"length window must be at least 1 batch, got {length_window}")
    if modality_lengths is None:
        return _chunks(_randperm(n_rows, seed, epoch), global_batch)
    image_rows = [i for i in range(n_rows) if modality_lengths[i] > 0]
    text_rows = [i for i in range(n_rows) if modality_lengths[i] <= 0]
    batches: list[list[int]] = []
    for salt, rows in ((1, image_rows), (2, text_rows)):
        if rows:
            order = [rows[j] for j in _randperm(len(rows), seed, epoch, salt)]
            batches += _length_sorted(_chunks(order, global_batch), modality_lengths, length_window)
    return [batches[j] for j in _randperm(len(batches), seed, epoch, salt=3)]


def _check(n_rows: int, global_batch: int, modality_lengths: Sequence[int] | None) -> None:
    """No rows would make zero steps an epoch (and a division by zero in the epoch count): refuse it here."""
    if n_rows <= 0:
        raise DataError("the dataset has no rows")
    if global_batch <= 0:
        raise InputError(f"global batch size must be positive, got {global_batch}")
    if modality_lengths is not None and len(modality_lengths) != n_rows:
        raise InputError(f"{len(modality_lengths)} lengths for {n_rows} rows")


def steps_per_epoch(n_rows: int, global_batch: int, modality_lengths: Sequence[int] | None = None) -> int:
    """Number of global batches per epoch (no random numbers drawn)."""
    _check(n_rows, global_batch, modality_lengths)
    if modality_lengths is None:
        return -(-n_rows // global_batch)
    n_image = sum(1 for v in modality_lengths if v > 0)
    return -(-n_image // global_batch) + -(-(n_rows - n_image) // global_batch)


def micro_batches(rows: list[int], micro_batch_size: int) -> list[list[int]]:
    """This process's rows of one step, cut into forward passes of at most `micro_batch_size`."""
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
