"""Run the command line on malformed input, the way a new user would, and classify what happens.

Each case runs ``python -m mmalign ...`` in a fresh process (a time limit each) on a small world and a tiny model
built in a temporary directory, and is classified: ``error`` (exit status 2 or 1 with a one-line ``error:`` message),
``accepted`` (exit 0, the documented behaviour), ``TRACEBACK`` or ``HANG``. Some cases also check what was left on
disk. Prints one table and the counts.

Usage: ``python benchmarks/bad_input_probe.py [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

TIME_LIMIT_S = 240


@dataclass
class Outcome:
    case: str
    kind: str
    code: int | None
    message: str
    seconds: float


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int | None, str, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mmalign", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT_S,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return None, "", time.monotonic() - start
    return proc.returncode, proc.stderr, time.monotonic() - start


def classify(case: str, code: int | None, err: str, seconds: float) -> Outcome:
    if code is None:
        return Outcome(case, "HANG", code, f"no answer in {TIME_LIMIT_S} s", seconds)
    if "Traceback (most recent call last)" in err:
        return Outcome(case, "TRACEBACK", code, err.strip().splitlines()[-1][:110], seconds)
    lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    if code == 0:
        return Outcome(case, "accepted", code, "exit 0", seconds)
    if len(lines) == 1 and code in (1, 2):
        return Outcome(case, "error", code, lines[0][:150], seconds)
    return Outcome(case, "UNCLEAR", code, err.strip()[-150:], seconds)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def setup(root: Path) -> dict[str, Path]:
    """A small world, a tiny model, and the bad files the cases use."""
    world, model = root / "world", root / "model"
    code, err, _ = run(["world", "--out", str(world), "--train", "24", "--eval", "6"], root)
    assert code == 0, err
    code, err, _ = run(["world", "pairs", "--world", str(world), "--out", str(world / "pairs.jsonl")], root)
    assert code == 0, err
    code, err, _ = run(["model", "init", "--family", "llava", "--out", str(model), "--vocab-from", str(world),
                        "--vision-layers", "1", "--text-layers", "1"], root)  # fmt: skip
    assert code == 0, err
    bad = root / "bad"
    (bad / "imgs").mkdir(parents=True)
    (bad / "imgs" / "text.png").write_text("not an image")
    (bad / "imgs" / "empty.png").write_bytes(b"")
    Image.new("L", (12000, 12000)).save(bad / "imgs" / "bomb.png")
    os.mkfifo(bad / "imgs" / "fifo.png")
    Image.new("RGB", (8, 8)).save(root / "outside.png")
    (bad / "imgs" / "link.png").symlink_to(root / "outside.png")
    Image.new("RGB", (8, 8)).save(bad / "imgs" / "ok.png")
    return {"world": world, "model": model, "bad": bad}


def pope_file(bad: Path, name: str, image: str, text: str = "Is there a star in the image?") -> Path:
    row = {"question_id": 1, "image": image, "text": text, "label": "yes"}
    return write_jsonl(bad / f"pope_{name}.jsonl", [row])


def sft_rows(world: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in (world / "sft.jsonl").read_text().splitlines()[:n]]


def cases(p: dict[str, Path], root: Path) -> list[tuple[str, Callable[[], Outcome]]]:
    world, model, bad = p["world"], p["model"], p["bad"]
    m = str(model)
    out = lambda name: str(root / "runs" / name)  # noqa: E731
    fast = ["--steps", "2", "--batch-size", "2", "progress=false"]
    pairs = world / "pairs.jsonl"

    def cli(case: str, args: list[str], env: dict[str, str] | None = None) -> Outcome:
        return classify(case, *run(args, root, env))

    def pope(case: str, image: str, text: str = "Is there a star in the image?") -> Callable[[], Outcome]:
        f = pope_file(bad, case.split()[-1], image, text)
        return lambda: cli(case, ["eval", "pope", "--model", m, "--data", str(f), "--out", out("pope.json")])

    def sft_with(case: str, rows: list[dict], *extra: str) -> Callable[[], Outcome]:
        f = write_jsonl(world / f"sft_{len(rows)}_{abs(hash(case)) % 1000}.jsonl", rows)
        return lambda: cli(case, ["train", "sft", "--model", m, "--data", str(f), "--out", out(case[:12]), *fast,
                                  *extra])  # fmt: skip

    rows = sft_rows(world, 4)
    empty_reply = [dict(r) for r in rows]
    empty_reply[1] = {**rows[1], "messages": [*rows[1]["messages"][:-1], {"role": "assistant", "content": ""}]}
    no_reply = [{**r, "messages": r["messages"][:-1]} for r in rows]
    long_rows = [dict(r) for r in rows]
    long_rows[2] = {**rows[2], "messages": [{"role": "user", "content": [{"type": "image"},
                    {"type": "text", "text": "is there a star " * 400}]}, rows[2]["messages"][-1]]}  # fmt: skip
    bomb_rows = [{**rows[0], "images": [str(bad / "imgs" / "bomb.png")]}]
    binary = root / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    yaml_judge = root / "judge.yaml"
    (root / "evil.py").write_text("open('PWNED', 'w').write('x')\ndef fn(prompt, reply):\n    return 1.0\n")
    yaml_judge.write_text(f"judge: {root / 'evil.py'}:fn\n")
    margins_free = world / "no_margins.jsonl"
    margins_free.write_text("".join(line + "\n" for line in pairs.read_text().splitlines()[:8]))
    ann = write_jsonl(bad / "ann.jsonl", [{"image_id": 1, "objects": "dog"}])
    caps = write_jsonl(bad / "caps.jsonl", [{"image_id": 1, "caption": "A dog."}])
    answers = write_jsonl(bad / "answers.jsonl", [{"question_id": 1, "text": "Yes\nNo"}])
    labels = pope_file(bad, "labels", "imgs/ok.png")
    other_kind = write_jsonl(root / "other_kind.jsonl", [{"id": "x", "hello": 1}])
    dup = sft_rows(world, 3)
    dup = [{**r, "id": "same"} for r in dup]
    dup_file = write_jsonl(world / "dup_ids.jsonl", dup)

    def resume_foreign() -> Outcome:
        first = ["train", "sft", "--model", m, "--data", str(world / "sft.jsonl"), "--out", out("foreign"), *fast]
        code, err, _ = run(first, root)
        assert code == 0, err
        return cli("resume, other settings", [*first, "lr=0.5", "resume=true"])

    def two_at_once() -> Outcome:
        args = ["train", "sft", "--model", m, "--data", str(world / "sft.jsonl"), "--out", out("twice"),
                "--steps", "100000", "--batch-size", "2", "progress=false"]  # fmt: skip
        first = subprocess.Popen([sys.executable, "-m", "mmalign", *args], cwd=root, stderr=subprocess.DEVNULL)
        metrics = Path(out("twice")) / "metrics.jsonl"
        end = time.monotonic() + 120
        while not metrics.exists() and time.monotonic() < end:  # the first run is training
            time.sleep(0.2)
        result = cli("two runs into one --out", args)
        first.kill()
        first.wait()
        return result

    def torn_metrics() -> Outcome:
        args = ["train", "sft", "--model", m, "--data", str(world / "sft.jsonl"), "--out", out("torn"),
                "--steps", "4", "--batch-size", "2", "progress=false", "save_every=2", "log_every=1"]  # fmt: skip
        code, err, _ = run(args, root)
        assert code == 0, err
        metrics = Path(out("torn")) / "metrics.jsonl"
        metrics.write_text(metrics.read_text() + '{"step": 5, "lo')
        return cli("torn metrics.jsonl + --resume", [*args, "resume=true"])

    def damaged_cache() -> Outcome:
        cache = root / "cache"
        env = {"MMALIGN_CACHE_DIR": str(cache)}
        args = ["train", "dpo", "--model", m, "--data", str(pairs), "--out", out("cache1"), *fast]
        code, err, _ = run(args, root, env)
        assert code == 0, err
        for f in (cache / "reference_logps").glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:40])
        args[args.index(out("cache1"))] = out("cache2")
        return cli("truncated reference cache", args, env)

    def bdhs_other_kind() -> Outcome:
        return cli("pairs bdhs --out FILE of another kind", ["pairs", "bdhs", "--model", m, "--data",
                   str(world / "sft.jsonl"), "--out", str(other_kind), "--max-samples", "2"])  # fmt: skip

    def pope_parse() -> Outcome:
        result = cli("pope parse", ["eval", "score-pope", "--answers", str(answers), "--labels", str(labels), "--out",
                                    out("s.json")])  # fmt: skip
        if result.code == 0:
            accuracy = json.loads(Path(out("s.json")).read_text())["accuracy"]
            result.message = f"parsed as {'yes' if accuracy == 1 else 'no'} (label yes)"
        return result

    def judge_in_yaml() -> Outcome:
        result = cli("judge: FILE.py in a YAML config", ["train", "online-dpo", "--config", str(yaml_judge), "--model",
                     m, "--data", str(world / "sft.jsonl"), "--out", out("yamljudge"), "--steps", "1"])  # fmt: skip
        if (root / "PWNED").exists():
            result.kind, result.message = "RAN CODE", "the YAML file's Python ran"
        return result

    return [
        ("eval pope: not an image", pope("eval pope: not an image", "imgs/text.png")),
        ("eval pope: empty image file", pope("eval pope: empty", "imgs/empty.png")),
        ("eval pope: 12000x12000 image", pope("eval pope: bomb", "imgs/bomb.png")),
        ("eval pope: FIFO", pope("eval pope: fifo", "imgs/fifo.png")),
        ("eval pope: ../ path", pope("eval pope: escape", "bad/../../../../etc/passwd")),
        ("eval pope: symlink out of the root", pope("eval pope: link", "imgs/link.png")),
        ("eval pope: 1M-character question", pope("eval pope: long", "imgs/ok.png", "a" * 1_000_000)),
        ("--config binary file", lambda: cli("--config binary", ["train", "sft", "--config", str(binary)])),
        (
            "--loss bogus",
            lambda: cli(
                "--loss bogus",
                ["train", "dpo", "--model", m, "--data", str(pairs), "--out", out("bogus"), "--loss", "bogus"],
            ),
        ),
        (
            "ipo_tau=-1",
            lambda: cli(
                "ipo_tau=-1", ["train", "dpo", "--model", m, "--data", str(pairs), "--out", out("tau"), "ipo_tau=-1"]
            ),
        ),
        (
            "--loss mm_dpo, pairs without margins",
            lambda: cli(
                "mm_dpo",
                [
                    "train",
                    "dpo",
                    "--model",
                    m,
                    "--data",
                    str(margins_free),
                    "--out",
                    out("mm"),
                    "--loss",
                    "mm_dpo",
                    *fast,
                ],
            ),
        ),
        ("model init --family gpt5", lambda: cli("gpt5", ["model", "init", "--family", "gpt5", "--out", out("g")])),
        (
            "model init --text-layers -1",
            lambda: cli("layers", ["model", "init", "--out", out("l"), "--text-layers", "-1"]),
        ),
        ("world --train -3", lambda: cli("world -3", ["world", "--out", out("w"), "--train", "-3"])),
        (
            "world --image-size 100000",
            lambda: cli("world big", ["world", "--out", out("w2"), "--image-size", "100000"]),
        ),
        (
            "chair annotations of the wrong type",
            lambda: cli(
                "chair",
                ["eval", "score-chair", "--captions", str(caps), "--annotations", str(ann), "--out", out("c.json")],
            ),
        ),
        ("SFT: empty assistant turn", sft_with("SFT: empty assistant turn", empty_reply)),
        ("SFT: no assistant turn", sft_with("SFT: no assistant turn", no_reply)),
        ("SFT: sample over max_length", sft_with("SFT: over max_length", long_rows, "max_length=300")),
        (
            "SFT: over max_length, truncate_prompt",
            sft_with("SFT: truncate", long_rows, "max_length=300", "truncation=truncate_prompt"),
        ),
        ("SFT: 12000x12000 image", sft_with("SFT: bomb image", bomb_rows, "--allow-outside-root")),
        ("SFT: lr=.inf", sft_with("SFT: lr inf", sft_rows(world, 4), "lr=.inf")),
        (
            "DPO: beta=.inf",
            lambda: cli(
                "beta", ["train", "dpo", "--model", m, "--data", str(pairs), "--out", out("beta"), "beta=.inf", *fast]
            ),
        ),
        ("resume with other settings", resume_foreign),
        ("two runs into one --out at once", two_at_once),
        ("torn metrics.jsonl + --resume", torn_metrics),
        ("truncated reference cache", damaged_cache),
        (
            "pairs bdhs: input ids repeat",
            lambda: cli(
                "bdhs dup", ["pairs", "bdhs", "--model", m, "--data", str(dup_file), "--out", out("dup.jsonl")]
            ),
        ),
        ("pairs bdhs --out FILE of another kind", bdhs_other_kind),
        ("judge: FILE.py in a YAML config", judge_in_yaml),
        ("score-pope: answer 'Yes\\nNo' (official: yes)", pope_parse),
        (
            "eval pope: --allow-outside-root reads a linked image",
            lambda: cli(
                "allowed",
                [
                    "eval",
                    "pope",
                    "--model",
                    m,
                    "--data",
                    str(pope_file(bad, "allowed", "imgs/link.png")),
                    "--out",
                    out("allowed.json"),
                    "--allow-outside-root",
                ],
            ),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmalign_probe_"))
    root.mkdir(parents=True, exist_ok=True)
    p = setup(root)
    results = []
    for name, fn in cases(p, root):
        outcome = fn()
        outcome.case = name
        results.append(outcome)
        print(f"{outcome.kind:9s} {name}", file=sys.stderr, flush=True)
    print("| case | outcome | exit | message | s |\n|---|---|---:|---|---:|")
    for r in results:
        message = r.message.replace("|", "\\|").replace(str(root), "…")
        print(f"| {r.case} | {r.kind} | {r.code} | {message} | {r.seconds:.1f} |")
    counts = Counter(r.kind for r in results)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" ({len(results)} cases)")


if __name__ == "__main__":
    main()
