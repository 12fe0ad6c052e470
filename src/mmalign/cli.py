"""``mmalign <command>``: the command-line interface.

Every training recipe's flags are generated from its typed configuration (``mmalign.config.add_config_flags``), with
``--config FILE.yaml`` and ``key=value`` overrides; flags and overrides win over the YAML file. Errors in the user's
input (data, config, model directory) end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mmalign.data.media import ALLOW_OUTSIDE_ENV
from mmalign.errors import ConfigError, DataError, MediaError, ModelError, TrainingError
from mmalign.lab import cli as lab_cli
from mmalign.runtime.launch import LaunchError
from mmalign.runtime.locks import release_all

log = logging.getLogger("mmalign")


def _add_model(p: argparse.ArgumentParser) -> None:
    from mmalign.config import add_config_flags
    from mmalign.models.families import DEFAULT_FAMILY, FAMILIES, TinySize

    msub = p.add_subparsers(dest="model_command", required=True)
    init = msub.add_parser("init", help="build a small random-init model of a real VLM architecture")
    init.add_argument("--family", default=DEFAULT_FAMILY, choices=sorted(FAMILIES), help="the architecture")
    init.add_argument("--out", required=True)
    init.add_argument("--image-size", type=int, default=48, help="model input size (images are resized to it)")
    init.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="vision patch size (default: one image token per cell of the world's 3x3 grid)",
    )
    size_fields = add_config_flags(init, TinySize, skip=("image_size", "patch_size"))
    init.add_argument(
        "--no-calibrate",
        action="store_true",
        help="keep the plain random projector init (default: standardise it on the data's images)",
    )
    init.add_argument(
        "--vocab-from",
        nargs="*",
        default=None,
        help="data files or world directories whose text makes the vocabulary",
    )
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_model_init, size_fields=size_fields)


def cmd_model_init(args: argparse.Namespace) -> int:
    from mmalign.config import given
    from mmalign.data.corpus import corpus_images, corpus_texts
    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize, get_family

    per_side = get_family(args.family).patches_per_side
    patch = args.patch_size or max(1, args.image_size // per_side)
    try:
        size = TinySize(image_size=args.image_size, patch_size=patch, **given(args, args.size_fields))
    except ValueError as exc:
        raise ConfigError(f"mmalign model init: {exc}") from None
    texts = corpus_texts(args.vocab_from) if args.vocab_from else lab_cli.default_world_texts()
    images = [] if args.no_calibrate else corpus_images(args.vocab_from)
    model, processor = build_tiny(args.family, texts, size=size, seed=args.seed, calibration_images=images)
    out = save_model(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {args.family} ({n / 1e6:.2f}M parameters, vocabulary {len(processor.tokenizer)}) in {out}")
    return 0


def _add_train(p: argparse.ArgumentParser) -> None:
    from mmalign.config import add_config_flags
    from mmalign.lab.recipes import recipes

    tsub = p.add_subparsers(dest="recipe", required=True)
    for name, found in recipes().items():
        r = tsub.add_parser(name, help=found.help, description=f"{found.help}. Flags and key=value overrides win "
                            "over --config; every flag is also a key of the YAML file.")  # fmt: skip
        r.add_argument("--config", help="YAML config file")
        r.set_defaults(func=cmd_train, config_fields=add_config_flags(r, found.config))
        r.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for sections: freeze.llm=false)")


def cmd_train(args: argparse.Namespace) -> int:
    from mmalign.config import given, load_config
    from mmalign.lab.recipes import recipe

    found = recipe(args.recipe)
    cfg = load_config(found.config, args.config, given(args, args.config_fields), args.overrides)
    for key in ("model", "data", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"--{key} is required (or set {key}: in the config file)")
    final = found.train(cfg)
    print(f"saved {final}")
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    esub = p.add_subparsers(dest="eval_command", required=True)
    pope = esub.add_parser("pope", help="POPE: yes/no object existence questions")
    pope.add_argument("--model", required=True)
    pope.add_argument("--data", required=True, help="POPE question file or world directory")
    pope.add_argument("--image-root", help="directory the question file's image names are in (default: the file's)")
    pope.add_argument("--split", default="all", choices=["random", "popular", "adversarial", "all"])
    pope.add_argument(
        "--method",
        default="generate",
        choices=["generate", "logits"],
        help="greedy generation (official) or the one-forward Yes/No logit fast path",
    )
    pope.add_argument("--suffix", default="", help="text appended to each question (LLaVA-1.5: see docs)")
    pope.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="what generates (--method generate)")
    pope.add_argument("--batch-size", type=int, default=32)
    pope.add_argument("--out", required=True, help="result JSON")
    pope.set_defaults(func=cmd_eval_pope)

    score = esub.add_parser("score-pope", help="score a POPE answer file against a label file")
    score.add_argument("--answers", required=True)
    score.add_argument("--labels", required=True)
    score.add_argument("--out", required=True)
    score.set_defaults(func=cmd_score_pope)

    chair = esub.add_parser("chair", help="CHAIR: caption hallucination")
    chair.add_argument("--model", required=True)
    chair.add_argument("--data", required=True, help="prompts file (Sample rows) or world directory")
    chair.add_argument("--annotations", default=None, help="ground-truth objects (JSONL or COCO instances)")
    chair.add_argument("--vocab", default=None, help="synonyms JSON (default: world vocab beside data, else COCO)")
    chair.add_argument("--max-new-tokens", type=int, default=64)
    chair.add_argument("--batch-size", type=int, default=16)
    chair.add_argument("--limit", type=int, default=None)
    chair.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="what writes the captions")
    chair.add_argument("--out", required=True)
    chair.set_defaults(func=cmd_eval_chair)

    sc = esub.add_parser("score-chair", help="score captions against object annotations")
    sc.add_argument("--captions", required=True)
    sc.add_argument("--annotations", required=True, help="JSONL objects per image or COCO instances_*.json")
    sc.add_argument("--coco-captions", default=None, help="COCO captions_*.json (their objects join the truth)")
    sc.add_argument("--vocab", default=None, help="synonyms JSON (default COCO)")
    sc.add_argument("--out", required=True)
    sc.set_defaults(func=cmd_score_chair)

    rm = esub.add_parser("rm", help="reward-model accuracy on held-out pairs, overall and per pair kind")
    rm.add_argument("--model", required=True, help="a reward model directory (`mmalign train rm`)")
    rm.add_argument("--data", required=True, help="preference pairs (any format `mmalign train dpo` reads)")
    rm.add_argument("--batch-size", type=int, default=16)
    rm.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    rm.add_argument("--out", required=True, help="result JSON")
    rm.set_defaults(func=cmd_eval_rm)
    from mmalign.eval.bench_cli import add_bench_commands

    add_bench_commands(esub)


def _write_json(path: str | Path, obj: Any) -> None:
    from mmalign.runtime.checkpoint import atomic_write_json  # torch comes with it: imported when a result is written

    atomic_write_json(path, obj)


def cmd_eval_pope(args: argparse.Namespace) -> int:
    from mmalign.eval.pope import evaluate_pope, load_pope_sets, summary_table
    from mmalign.generation.engines import check_engine
    from mmalign.models.load import load_model

    check_engine(args.engine)
    if args.engine != "hf" and args.method == "logits":
        raise ConfigError("--method logits reads the Hugging Face model's logits: use --method generate with vLLM")
    sets = load_pope_sets(args.data, args.split, args.image_root)
    loaded = load_model(args.model) if args.engine == "hf" else None  # vLLM loads its own copy
    out = Path(args.out)
    results = evaluate_pope(
        loaded.model if loaded else None,
        loaded.processor if loaded else None,
        sets,
        method=args.method,
        suffix=args.suffix,
        batch_size=args.batch_size,
        answers_out=out.with_suffix(".answers.jsonl"),
        engine=args.engine,
        model_dir=args.model,
    )
    _write_json(out, results if len(results) > 1 else next(iter(results.values())))
    print(summary_table(results))
    return 0


def cmd_score_pope(args: argparse.Namespace) -> int:
    from mmalign.eval.pope_score import pope_markdown_table, score_pope_files

    result = score_pope_files(args.answers, args.labels)
    _write_json(args.out, result)
    table = {"all": result, **result.get("by_category", {})}
    print(pope_markdown_table(table))
    return 0


def cmd_eval_chair(args: argparse.Namespace) -> int:
    from mmalign.eval.chair import evaluate_chair
    from mmalign.eval.chair_score import chair_markdown_table
    from mmalign.generation.engines import check_engine
    from mmalign.models.load import load_model

    check_engine(args.engine)
    loaded = load_model(args.model) if args.engine == "hf" else None  # vLLM loads its own copy
    out = Path(args.out)
    result = evaluate_chair(
        loaded.model if loaded else None,
        loaded.processor if loaded else None,
        args.data,
        vocab=args.vocab,
        annotations=args.annotations,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        captions_out=out.with_suffix(".captions.jsonl"),
        engine=args.engine,
        model_dir=args.model,
    )
    _write_json(out, result)
    print(chair_markdown_table(result))
    return 0


def cmd_eval_rm(args: argparse.Namespace) -> int:
    from mmalign.eval.reward import evaluate_reward_model, reward_markdown_table

    result = evaluate_reward_model(args.model, args.data, batch_size=args.batch_size, limit=args.limit)
    _write_json(args.out, result)
    print(reward_markdown_table(result))
    return 0


def cmd_score_chair(args: argparse.Namespace) -> int:
    from mmalign.eval.chair_score import ChairVocab, chair_markdown_table, score_chair_files

    vocab = ChairVocab.from_file(args.vocab) if args.vocab else None
    result = score_chair_files(args.captions, args.annotations, args.coco_captions, vocab)
    _write_json(args.out, result)
    print(chair_markdown_table(result))
    return 0


def _add_pairs(p: argparse.ArgumentParser) -> None:
    from mmalign.config import add_config_flags
    from mmalign.generation.bdhs import BdhsConfig

    psub = p.add_subparsers(dest="pairs_command", required=True)
    b = psub.add_parser("bdhs", help="BDHS: rejected replies written by the model with the image hidden")
    b.add_argument("--model", required=True, help="local checkpoint directory (the policy, e.g. after SFT)")
    b.add_argument("--data", required=True, help="samples whose final assistant turn is the ground-truth answer")
    b.add_argument("--out", required=True, help="output JSONL of pairs (an existing file is continued)")
    b.add_argument("--embedder", help="sentence-transformers model directory (default: all-MiniLM-L6-v2, offline)")
    b.add_argument("--batch-size", type=int, default=16, help="examples generated together")
    b.add_argument("--max-samples", type=int)
    b.add_argument("--on-bad-record", choices=["fail", "skip"], default="fail")
    b.add_argument(
        "--engine",
        choices=["hf", "vllm"],
        default="hf",
        help="what writes the rejected replies: hf, or vllm for corruption=noise|remove (pip install 'mmalign[vllm]')",
    )
    b.set_defaults(func=cmd_pairs_bdhs, config_fields=add_config_flags(b, BdhsConfig))


def cmd_pairs_bdhs(args: argparse.Namespace) -> int:
    from mmalign.config import given
    from mmalign.generation.bdhs import BdhsConfig
    from mmalign.generation.bdhs_run import run_bdhs
    from mmalign.generation.embed import SentenceEmbedder
    from mmalign.models.load import load_model

    try:
        cfg = BdhsConfig(**given(args, args.config_fields))
    except ValueError as e:
        raise ConfigError(f"mmalign pairs bdhs: {e}") from None
    loaded = load_model(args.model) if args.engine == "hf" else None
    result = run_bdhs(
        loaded.model if loaded else None,
        loaded.processor if loaded else None,
        args.data,
        args.out,
        cfg,
        embedder=SentenceEmbedder(args.embedder),
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        on_bad_record=args.on_bad_record,
        engine=args.engine,
        model_dir=args.model,
    )
    rates = ", ".join(f"{i + 1}: {r:.0%}" for i, r in enumerate(result.accepted_by_iteration))
    print(
        f"wrote {result.pairs} pairs to {result.out} ({result.generated} new, {result.pairs_per_s:.2f} pairs/s); "
        f"accepted after iterations {rates}"
    )
    return 0


# Command → (help, the function that adds its arguments). Only the command being run gets its arguments, so that
# ``mmalign eval score-pope`` does not import every recipe (and torch) to build the ``train`` flags.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "world": ("write the synthetic scene world (images, captions, SFT, POPE, CHAIR)", lab_cli.add_world),
    "model": ("model utilities", _add_model),
    "train": ("training recipes", _add_train),
    "eval": ("hallucination benchmarks", _add_eval),
    "pairs": ("build preference pairs without annotators", _add_pairs),
    "demo": ("the main job: world → pretrain → SFT → POPE/CHAIR → report", lab_cli.add_demo),
    "study": ("the alignment study's grid on the world (BDHS, online, mixed, mDPO vs oracle)", lab_cli.add_study),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (default: ``sys.argv[1:]``): every command listed, the one asked for complete."""
    words = list(sys.argv[1:] if argv is None else argv)
    wanted = next((w for w in words if not w.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text)
        if name == wanted:
            add(command)
            for leaf in _leaves(command):
                leaf.add_argument(
                    "--allow-outside-root",
                    action="store_true",
                    help="read media files outside their data set's directory (refused by default, symlinks included)",
                )
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers under ``parser`` that run something: those without sub-commands, or whose sub-command is
    optional (``mmalign world`` runs alone and has ``world pairs``)."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    runs = [parser] if not found or not all(a.required for a in found) else []
    return runs + [leaf for a in found for child in dict.fromkeys(a.choices.values()) for leaf in _leaves(child)]


def _fail(exc: BaseException, code: int, verbose: bool) -> int:
    """Print an error as one line (with its traceback under ``-v``) and return the exit status."""
    if verbose:
        traceback.print_exception(exc)
    text = exc.strerror + f": {exc.filename}" if isinstance(exc, OSError) and exc.strerror and exc.filename else exc
    print(f"error: {text}", file=sys.stderr)
    return code


def main(argv: Iterable[str] | None = None) -> int:
    words = list(argv) if argv is not None else sys.argv[1:]
    parser = build_parser(words)
    args, extra = parser.parse_known_args(words)
    # ``key=value`` overrides may come between or after flags (``... beta=0.2 --steps 5 lr=1e-4``): argparse takes
    # the positional run before the first flag only, so the later ones are gathered here.
    if extra and hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    before = os.environ.get(ALLOW_OUTSIDE_ENV)
    if getattr(args, "allow_outside_root", False):
        os.environ[ALLOW_OUTSIDE_ENV] = "1"  # an environment variable: launched worker processes inherit it
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, ModelError, MediaError, OSError) as exc:
        return _fail(exc, 2, args.verbose)
    except (LaunchError, TrainingError) as exc:
        return _fail(exc, 1, args.verbose)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        # A command ends here however it ends: its run directories are free again, and the setting goes back
        # (``main`` may run several commands in one process: the demo, a notebook, the tests).
        release_all()
        if before is None:
            os.environ.pop(ALLOW_OUTSIDE_ENV, None)
        else:
            os.environ[ALLOW_OUTSIDE_ENV] = before


if __name__ == "__main__":
    sys.exit(main())
