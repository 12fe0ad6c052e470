"""Pack the samples of a padded batch into fewer, fuller rows.

A batch of instruction data mixes three-token yes/no answers with long captions: padded to its longest sample, a
world batch is about half padding, and on a CPU every padded token costs as much as a real one. Packing places
the samples' tokens end to end in rows (first-fit, longest first) with position ids that restart at 0 for every
sample; with no 2-D attention mask, ``transformers`` turns restarting position ids into a block-diagonal causal
mask (``masking_utils.find_packed_sequence_indices``), so no sample attends to another and each sample's
log-likelihood is the one it has alone, up to floating-point rounding. Unlike grouping batches by length, the
batches themselves are unchanged: the same samples, the same loss.

Supported for inputs of the form ``input_ids``/``attention_mask``/``labels`` plus one ``pixel_values`` entry per
image in sample order (``Family.packable``). Models with multimodal rotary positions or per-image grids need
their own position ids, so :func:`pack_batch` refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmalign.logprobs import IGNORE_INDEX

PACKABLE_KEYS = frozenset({"input_ids", "attention_mask", "labels", "pixel_values"})


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's total length at most ``capacity``.

    Longer samples are placed first (ties in index order); a row keeps its samples in placement order. A sample
    longer than ``capacity`` gets a row of its own.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_batch(
    enc: dict[str, torch.Tensor], images_per_sample: Sequence[int], pad_id: int, row_length: int
) -> dict[str, torch.Tensor]:
    """Pack a right-padded encoded batch.

    Args:
        enc: ``encode_sft`` output (right padding).
        images_per_sample: images of each sample, in batch order (their rows of ``pixel_values``).
        pad_id: token id for the padding that remains at the end of rows.
        row_length: capacity of a row; rows are at least as long as the longest sample.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` [R, T], ``sample_index`` [R, T] (the batch index of each token's
        sample, -1 on padding) and ``pixel_values`` reordered to the packed order; no ``attention_mask``. Run the
        forward with ``use_cache=False``: with a cache ``transformers`` does not look for packed sequences and the
        samples of a row would attend to each other.

    Raises:
        ValueError: inputs that cannot be packed (other model inputs, left padding).
    """
    extra = set(enc) - PACKABLE_KEYS
    if extra:
        raise ValueError(f"cannot pack inputs with {sorted(extra)} (only one pixel row per image can be packed)")
    mask = enc["attention_mask"].bool()
    lengths = mask.sum(-1).tolist()
    if any(not bool(mask[i, :n].all()) for i, n in enumerate(lengths)):
        raise ValueError("packing needs right-padded rows")
    capacity = max(row_length, max(lengths))
    rows = pack_rows(lengths, capacity)
    fill = [sum(lengths[i] for i in row) for row in rows]
    width = max(fill)
    # Every sample's tokens, in batch order, go to consecutive cells of the flattened [R, width] output starting at
    # the cell where its row places it: one scatter per tensor instead of a copy per sample.
    order = [i for row in rows for i in row]
    start = [0] * len(lengths)
    for r, row in enumerate(rows):
        at = r * width
        for i in row:
            start[i] = at
            at += lengths[i]
    counts = torch.tensor(lengths)
    first = torch.cumsum(counts, 0) - counts  # each sample's first token among all real tokens
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    starts_t = torch.tensor(start)
    cells = torch.repeat_interleave(starts_t, counts) + offset
    ids = torch.full((len(rows), width), pad_id, dtype=enc["input_ids"].dtype)
    labels = torch.full_like(ids, IGNORE_INDEX)
    owner = torch.full_like(ids, -1)
    ids.view(-1)[cells] = enc["input_ids"][mask]
    labels.view(-1)[cells] = enc["labels"][mask]
    # A padded row never scores its first token; neither may the previous sample's last token here.
    labels.view(-1)[starts_t] = IGNORE_INDEX
    owner.view(-1)[cells] = torch.repeat_interleave(torch.arange(len(lengths)), counts).to(owner.dtype)
    # Positions restart at 0 for every sample; padding continues as its own run of positions, so it is a separate
    # (ignored) block of the mask.
    column = torch.arange(width).expand(len(rows), width)
    positions = (column - torch.tensor(fill)[:, None]).to(ids.dtype)
    positions.view(-1)[cells] = offset.to(ids.dtype)
    out = {"input_ids": ids, "labels": labels, "position_ids": positions, "sample_index": owner}
    if "pixel_values" in enc:
        starts = [0]
        for n in images_per_sample:
            starts.append(starts[-1] + n)
        if starts[-1] != len(enc["pixel_values"]):
            raise ValueError(f"{starts[-1]} images expected, pixel_values has {len(enc['pixel_values'])}")
        index = [k for i in order for k in range(starts[i], starts[i + 1])]
        out["pixel_values"] = enc["pixel_values"][index]
    return out


def per_sample_sums(
    token_values: torch.Tensor, token_mask: torch.Tensor, sample_index: torch.Tensor, n_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token values [R, T-1] (next-token positions) into their samples: (sums [N], counts [N]).

    Position ``t`` scores the token at ``t + 1``, so it belongs to that token's sample; a sample's first token
    is never a target, so no value crosses from one sample into the next.
    """
    owner = sample_index[:, 1:][token_mask]
    sums = torch.zeros(n_samples, dtype=token_values.dtype, device=token_values.device)
    sums = sums.index_add(0, owner, token_values[token_mask])
    counts = torch.bincount(owner, minlength=n_samples)
    return sums, counts
