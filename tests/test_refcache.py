"""The on-disk reference log-prob cache: checksummed, recomputed when damaged, merged under a lock when shared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmalign.runtime.refcache import cached_reference_logps


def _score(calls: list[list[int]]):
    def score(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(list(batch))
        ids = torch.tensor(batch, dtype=torch.float32)
        return -ids, -2 * ids

    return score


def test_cache_scores_each_pair_once(tmp_path: Path) -> None:
    path, calls = tmp_path / "c.safetensors", []
    chosen, rejected = cached_reference_logps(path, list(range(6)), [0, 1, 2], _score(calls), batch_size=2)
    assert calls == [[0, 1], [2]]
    assert chosen[:3].tolist() == [0.0, -1.0, -2.0] and rejected[:3].tolist() == [0.0, -2.0, -4.0]
    assert torch.isnan(chosen[3:]).all()
    chosen, _ = cached_reference_logps(path, list(range(6)), [1, 2, 3, 4], _score(calls), batch_size=4)
    assert calls[2:] == [[3, 4]] and chosen[:5].tolist() == [0.0, -1.0, -2.0, -3.0, -4.0]


def test_damaged_or_edited_cache_is_scored_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, calls = tmp_path / "c.safetensors", []
    cached_reference_logps(path, list(range(4)), range(4), _score(calls), batch_size=4)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # torn
    chosen, _ = cached_reference_logps(path, list(range(4)), range(4), _score(calls), batch_size=4)
    assert calls == [[0, 1, 2, 3]] * 2 and chosen.tolist() == [0.0, -1.0, -2.0, -3.0]
    assert "unreadable reference cache" in caplog.text
    # Edited by hand (a valid file whose values no longer match the checksum): not trusted either.
    stored = load_file(str(path))
    stored["chosen"][1] = 42.0
    save_file(stored, str(path), metadata={"sha256": "0" * 64})
    chosen, _ = cached_reference_logps(path, list(range(4)), range(4), _score(calls), batch_size=4)
    assert len(calls) == 3 and chosen[1].item() == -1.0
    assert "fails its checksum" in caplog.text
    # After a rescore the file is whole again and reused.
    cached_reference_logps(path, list(range(4)), range(4), _score(calls), batch_size=4)
    assert len(calls) == 3


RUN = """
import sys, time, torch
from pathlib import Path
from mmalign.runtime.refcache import cached_reference_logps
lo, hi = int(sys.argv[2]), int(sys.argv[3])
def score(batch):
    time.sleep(0.2)  # both processes score at once, then write
    ids = torch.tensor(batch, dtype=torch.float32)
    return -ids, -2 * ids
cached_reference_logps(Path(sys.argv[1]), list(range(20)), range(lo, hi), score, batch_size=5)
"""


def test_two_runs_sharing_a_cache_at_once_merge_their_scores(tmp_path: Path) -> None:
    path = tmp_path / "shared.safetensors"
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(path), lo, hi]) for lo, hi in (("0", "10"), ("10", "20"))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    calls: list[list[int]] = []
    chosen, rejected = cached_reference_logps(path, list(range(20)), range(20), _score(calls), batch_size=20)
    assert calls == []  # every pair of both runs is in the file
    assert chosen.tolist() == [-float(i) for i in range(20)] and rejected.tolist() == [-2.0 * i for i in range(20)]
