"""``mmalign <command>``: the command-line interface.

Every training recipe takes the same common flags (``--model --data --out --steps --batch-size --seed --config``)
plus ``key=value`` overrides; flags and overrides win over the YAML file. Errors in the user's input (data, config,
model directory) end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmalign.errors import ConfigError, DataError, ModelError
from mmalign.runtime.launch import LaunchError

log = logging.getLogger("mmalign")


def _add_world(sub: Any) -> None:
    p = sub.add_parser("world", help="write the synthetic scene world (images, captions, SFT, POPE, CHAIR)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--train", type=int, default=2000, help="training scenes")
    p.add_argument("--eval", type=int, default=200, help="held-out evaluation scenes")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--pair-prob", type=float, default=0.9, help="co-occurrence probability of planted pairs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world)
    wsub = p.add_subparsers(dest="world_command")
    pairs = wsub.add_parser("pairs", help="oracle preference pairs from a world (ground truth vs inserted errors)")
    pairs.add_argument("--world", required=True, help="world directory written by `mmalign world`")
    pairs.add_argument("--out", required=True, help="output JSONL of preference pairs")
    pairs.add_argument("--per-scene", type=int, default=1)
    pairs.add_argument(
        "--kinds",
        default="partner,attribute",
        help="comma list of: partner, attribute, existence, removed, removed_existence (counterfactual images)",
    )
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--max-scenes", type=int, default=None, help="only the first N training scenes (default: all)")
    pairs.set_defaults(func=cmd_world_pairs)


def cmd_world_pairs(args: argparse.Namespace) -> int:
    from mmalign.world.pairs import write_world_pairs

    n = write_world_pairs(
        Path(args.world),
        Path(args.out),
        seed=args.seed,
        per_scene=args.per_scene,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
        max_scenes=args.max_scenes,
    )
    print(f"wrote {n} preference pairs to {args.out}")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from mmalign.world import make_world

    if not args.out:
        raise ConfigError("mmalign world: --out is required")
    summary = make_world(
        args.out,
        n_train=args.train,
        n_eval=args.eval,
        seed=args.seed,
        image_size=args.image_size,
        pair_prob=args.pair_prob,
    )
    print(
        f"wrote world to {summary.root}: {summary.n_train} train / {summary.n_eval} eval scenes, "
        f"{summary.n_sft} SFT rows, POPE {summary.n_pope}"
    )
    return 0


def _add_model(sub: Any) -> None:
    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    init = msub.add_parser("init", help="build a small random-init model of a real VLM architecture")
    init.add_argument("--family", default="llava", help="llava | qwen2-vl | idefics3")
    init.add_argument("--out", required=True)
    init.add_argument("--image-size", type=int, default=48, help="model input size (images are resized to it)")
    init.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="vision patch size (default: one image token per cell of the world's 3x3 grid)",
    )
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
    init.add_argument("--size", default=None, help="JSON of TinySize fields, e.g. '{\"text_layers\": 2}'")
    init.set_defaults(func=cmd_model_init)


def cmd_model_init(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from mmalign.models.build import build_tiny, save_model
    from mmalign.models.families import TinySize, get_family
    from mmalign.models.vocab import corpus_images, corpus_texts

    per_side = get_family(args.family).patches_per_side
    size = TinySize(image_size=args.image_size, patch_size=args.patch_size or max(1, args.image_size // per_side))
    if args.size:
        try:
            size = replace(size, **json.loads(args.size))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--size: {exc}") from None
    texts = corpus_texts(args.vocab_from)
    images = [] if args.no_calibrate else corpus_images(args.vocab_from)
    model, processor = build_tiny(args.family, texts, size=size, seed=args.seed, calibration_images=images)
    out = save_model(model, processor, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {args.family} ({n / 1e6:.2f}M parameters, vocabulary {len(processor.tokenizer)}) in {out}")
    return 0


def _common_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (a local Hugging Face checkpoint)")
    p.add_argument("--data", help="data file (JSONL, Parquet) or saved HF dataset directory")
    p.add_argument("--out", help="run directory")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    p.add_argument("--on-bad-record", choices=["fail", "skip"])
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for sections)")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="training recipes")
    tsub = p.add_subparsers(dest="recipe", required=True)
    for name, text in (
        ("pretrain", "projector alignment on captions"),
        ("sft", "instruction tuning"),
        ("contrastive", "CLIP-style warm-up of a random-init vision path on image-caption pairs"),
        ("vision", "supervised pretraining of a random-init vision tower on a world's per-cell labels (--data WORLD)"),
        ("dpo", "offline preference optimisation (--loss dpo|cdpo|robust|ipo|hinge|dpo_norm|simpo|mdpo|mm_dpo|...)"),
        ("online-dpo", "online / hybrid DPO: pairs sampled from the current policy and ranked by a judge, or BDHS"),
    ):
        r = tsub.add_parser(name, help=text)
        _common_train_flags(r)
        if name in ("dpo", "online-dpo"):
            r.add_argument("--loss", help="loss name from mmalign.losses.LOSSES (default dpo)")
        r.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from mmalign.config import load_config
    from mmalign.runtime.launch import recipe

    cls, run = recipe(args.recipe)
    flags = {
        "model": args.model,
        "data": args.data,
        "out": args.out,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "resume": args.resume,
        "on_bad_record": args.on_bad_record,
        "loss": getattr(args, "loss", None),
    }
    cfg = load_config(cls, args.config, flags, args.overrides)
    for key in ("model", "data", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"--{key} is required (or set {key}: in the config file)")
    final = run(cfg)
    print(f"saved {final}")
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="hallucination benchmarks")
    esub = p.add_subparsers(dest="eval_command", required=True)
    pope = esub.add_parser("pope", help="POPE: yes/no object existence questions")
    pope.add_argument("--model", required=True)
    pope.add_argument("--data", required=True, help="POPE question file or world directory")
    pope.add_argument("--split", default="all", choices=["random", "popular", "adversarial", "all"])
    pope.add_argument(
        "--method",
        default="generate",
        choices=["generate", "logits"],
        help="greedy generation (official) or the one-forward Yes/No logit fast path",
    )
    pope.add_argument("--suffix", default="", help="text appended to each question (LLaVA-1.5: see docs)")
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
    chair.add_argument("--out", required=True)
    chair.set_defaults(func=cmd_eval_chair)

    sc = esub.add_parser("score-chair", help="score captions against object annotations")
    sc.add_argument("--captions", required=True)
    sc.add_argument("--annotations", required=True, help="JSONL objects per image or COCO instances_*.json")
    sc.add_argument("--coco-captions", default=None, help="COCO captions_*.json (their objects join the truth)")
    sc.add_argument("--vocab", default=None, help="synonyms JSON (default COCO)")
    sc.add_argument("--out", required=True)
    sc.set_defaults(func=cmd_score_chair)


def _write_json(path: str | Path, obj: Any) -> None:
    from mmalign.runtime.checkpoint import atomic_write_text

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(obj, indent=2) + "\n")


def cmd_eval_pope(args: argparse.Namespace) -> int:
    from mmalign.eval.pope import evaluate_pope, load_pope_sets, summary_table
    from mmalign.models.load import load_model

    sets = load_pope_sets(args.data, args.split)
    loaded = load_model(args.model)
    out = Path(args.out)
    results = evaluate_pope(
        loaded.model,
        loaded.processor,
        sets,
        method=args.method,
        suffix=args.suffix,
        batch_size=args.batch_size,
        answers_out=out.with_suffix(".answers.jsonl"),
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
    from mmalign.models.load import load_model

    loaded = load_model(args.model)
    out = Path(args.out)
    result = evaluate_chair(
        loaded.model,
        loaded.processor,
        args.data,
        vocab=args.vocab,
        annotations=args.annotations,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        captions_out=out.with_suffix(".captions.jsonl"),
    )
    _write_json(out, result)
    print(chair_markdown_table(result))
    return 0


def cmd_score_chair(args: argparse.Namespace) -> int:
    from mmalign.eval.chair_score import ChairVocab, chair_markdown_table, score_chair_files

    vocab = ChairVocab.from_file(args.vocab) if args.vocab else None
    result = score_chair_files(args.captions, args.annotations, args.coco_captions, vocab)
    _write_json(args.out, result)
    print(chair_markdown_table(result))
    return 0


def _add_pairs(sub: Any) -> None:
    p = sub.add_parser("pairs", help="build preference pairs without annotators")
    psub = p.add_subparsers(dest="pairs_command", required=True)
    b = psub.add_parser("bdhs", help="BDHS: rejected replies written by the model with the image hidden")
    b.add_argument("--model", required=True, help="local checkpoint directory (the policy, e.g. after SFT)")
    b.add_argument("--data", required=True, help="samples whose final assistant turn is the ground-truth answer")
    b.add_argument("--out", required=True, help="output JSONL of pairs (an existing file is continued)")
    b.add_argument("--rho", type=float, default=0.99, help="probability of hiding each image token")
    b.add_argument("--epsilon", type=float, default=0.97, help="accept when cosine similarity is below this")
    b.add_argument("--iterations", type=int, default=5, help="most rounds per example; the last is unguided")
    b.add_argument("--guidance", choices=["reference", "none"], default="reference")
    b.add_argument("--corruption", choices=["mask", "noise", "remove"], default="mask", help="how to hide the image")
    b.add_argument("--noise-steps", type=int, default=500, help="diffusion steps for --corruption noise")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy continuations")
    b.add_argument("--max-new-tokens", type=int, default=48, help="per continued sentence")
    b.add_argument("--embedder", help="sentence-transformers model directory (default: all-MiniLM-L6-v2, offline)")
    b.add_argument("--batch-size", type=int, default=16, help="examples generated together")
    b.add_argument("--max-samples", type=int)
    b.add_argument("--on-bad-record", choices=["fail", "skip"], default="fail")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_pairs_bdhs)


def cmd_pairs_bdhs(args: argparse.Namespace) -> int:
    from mmalign.generation.bdhs import BdhsConfig
    from mmalign.generation.bdhs_run import run_bdhs
    from mmalign.generation.embed import SentenceEmbedder
    from mmalign.models.load import load_model

    try:
        cfg = BdhsConfig(
            rho=args.rho,
            epsilon=args.epsilon,
            iterations=args.iterations,
            guidance=args.guidance,
            corruption=args.corruption,
            noise_steps=args.noise_steps,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    except ValueError as e:
        raise ConfigError(f"mmalign pairs bdhs: {e}") from None
    loaded = load_model(args.model)
    result = run_bdhs(
        loaded.model,
        loaded.processor,
        args.data,
        args.out,
        cfg,
        embedder=SentenceEmbedder(args.embedder),
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        on_bad_record=args.on_bad_record,
    )
    rates = ", ".join(f"{i + 1}: {r:.0%}" for i, r in enumerate(result.accepted_by_iteration))
    print(
        f"wrote {result.pairs} pairs to {result.out} ({result.generated} new, {result.pairs_per_s:.2f} pairs/s); "
        f"accepted after iterations {rates}"
    )
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="the main job: world → pretrain → SFT → POPE/CHAIR → report")
    p.add_argument("--quick", action="store_true", help="the 2-minute profile")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        help="several full draws, e.g. 0,1,2: each seed in OUT/seed-S, then OUT/summary.json and OUT/report.md with "
        "means, 95%% intervals and paired changes (finished seeds are kept when started again)",
    )
    p.add_argument(
        "--processes",
        type=int,
        help="preference runs side by side (default: 2 on a CPU with 2+ cores, 1 with --quick or on a GPU)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="change fields of the profile, e.g. caption_order=grouped partner_question_prob=0.5 n_eval=400",
    )
    p.set_defaults(func=cmd_demo)


def _add_study(sub: Any) -> None:
    p = sub.add_parser("study", help="the alignment study's grid on the world (BDHS, online, mixed, mDPO vs oracle)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--demo", help="a finished `mmalign demo` directory to start from (default: run the demo first)")
    p.add_argument("--quick", action="store_true", help="the quick profile (smoke test)")
    p.add_argument("--prompts", type=int, help="training scenes every run sees (default 800; quick 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        help="several draws, e.g. 0,1,2 (with --demo: a `mmalign demo --seeds` directory holding seed-S); writes "
        "OUT/seed-S, OUT/summary.json and OUT/study.md with means, 95%% intervals and paired changes",
    )
    p.add_argument("--processes", type=int, help="rows run side by side (default: 2 on 2+ CPU cores, 1 with --quick)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="demo profile changes when the study runs the demo"
    )
    p.set_defaults(func=cmd_study)


def cmd_study(args: argparse.Namespace) -> int:
    from mmalign.demo import parse_seeds
    from mmalign.study import run_study, run_study_seeds

    common = {
        "demo_dir": Path(args.demo) if args.demo else None,
        "quick": args.quick,
        "prompts": args.prompts,
        "processes": args.processes,
        "overrides": args.overrides,
    }
    if args.seeds:
        report = run_study_seeds(Path(args.out), parse_seeds(args.seeds), **common)
    else:
        report = run_study(Path(args.out), seed=args.seed, **common)
    print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmalign.demo import parse_seeds, run_demo, run_demo_seeds

    common = {"quick": args.quick, "processes": args.processes, "overrides": args.overrides}
    if args.seeds:
        report = run_demo_seeds(Path(args.out), parse_seeds(args.seeds), **common)
    else:
        report = run_demo(Path(args.out), seed=args.seed, **common)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_world, _add_model, _add_train, _add_eval, _add_pairs, _add_demo, _add_study):
        add(sub)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
