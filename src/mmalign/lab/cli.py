"""The lab's commands: ``mmalign world``, ``mmalign world pairs``, ``mmalign demo`` and ``mmalign study``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmalign.errors import ConfigError


def add_world(p: argparse.ArgumentParser) -> None:
    from mmalign.config import add_config_flags
    from mmalign.lab.world.config import WorldConfig

    p.description = "Every scalar WorldConfig knob is a flag (docs/world.md); the same flags give the same bytes."
    p.add_argument("--out", help="output directory")
    p.add_argument("--train", type=int, help=f"training scenes (default: {WorldConfig.n_train})")
    p.add_argument("--eval", type=int, help=f"held-out evaluation scenes (default: {WorldConfig.n_eval})")
    p.set_defaults(func=cmd_world, config_fields=add_config_flags(p, WorldConfig, skip=("n_train", "n_eval")))
    wsub = p.add_subparsers(dest="world_command")
    pairs = wsub.add_parser("pairs", help="oracle preference pairs from a world (ground truth vs inserted errors)")
    pairs.add_argument("--world", required=True, help="world directory written by `mmalign world`")
    pairs.add_argument("--out", required=True, help="output JSONL of preference pairs")
    pairs.add_argument("--per-scene", type=int, default=1)
    pairs.add_argument(
        "--kinds",
        default="partner,attribute",
        help="comma list of: partner, attribute, existence, removed, removed_existence (counterfactual images), "
        "prior_tail, partner_swap, omission, truncated",
    )
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--max-scenes", type=int, default=None, help="only the first N training scenes (default: all)")
    pairs.set_defaults(func=cmd_world_pairs)


def cmd_world_pairs(args: argparse.Namespace) -> int:
    from mmalign.lab.world.pairs import write_world_pairs

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
    from mmalign.config import given
    from mmalign.lab.world import write_world
    from mmalign.lab.world.config import WorldConfig

    if not args.out:
        raise ConfigError("mmalign world: --out is required")
    counts = {"n_train": args.train, "n_eval": args.eval}
    try:
        cfg = WorldConfig(**given(args, args.config_fields), **{k: v for k, v in counts.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"mmalign world: {exc}") from None
    summary = write_world(cfg, args.out)
    print(
        f"wrote world to {summary.root}: {summary.n_train} train / {summary.n_eval} eval scenes, "
        f"{summary.n_sft} SFT rows, POPE {summary.n_pope}"
    )
    return 0


def add_demo(p: argparse.ArgumentParser) -> None:
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


def add_study(p: argparse.ArgumentParser) -> None:
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
    from mmalign.lab.demo import parse_seeds
    from mmalign.lab.study import run_study, run_study_seeds

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
    from mmalign.lab.demo import parse_seeds, run_demo, run_demo_seeds

    common = {"quick": args.quick, "processes": args.processes, "overrides": args.overrides}
    if args.seeds:
        report = run_demo_seeds(Path(args.out), parse_seeds(args.seeds), **common)
    else:
        report = run_demo(Path(args.out), seed=args.seed, **common)
    print(f"report: {report}")
    return 0


def default_world_texts() -> list[str]:
    """The texts of a default synthetic world: the vocabulary of a tiny model built without data files."""
    import tempfile

    from mmalign.data.corpus import texts_from
    from mmalign.lab.world import make_world

    with tempfile.TemporaryDirectory() as tmp:
        make_world(tmp, n_train=1000, n_eval=100, progress=False)
        return texts_from(Path(tmp))
