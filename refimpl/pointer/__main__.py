"""``python -m refimpl.pointer train|evaluate``: train a checkpoint or re-run its evaluation."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from refimpl.pointer.attention import SYMMETRIES
from refimpl.pointer.data import VALIDATION_SEED, tsp_instances
from refimpl.pointer.checkpoints import ASSETS, load, save
from refimpl.pointer.held_karp import MAX_HELD_KARP_N, held_karp_lengths
from refimpl.pointer.lkh import lkh_lengths
from refimpl.pointer.metrics import evaluate
from refimpl.pointer.reinforce import RLConfig, train_rl
from refimpl.pointer.supervised import TrainConfig, train


def add_config_flags(parser: argparse.ArgumentParser, config) -> None:
    """One --flag per field of a config dataclass, typed like its default."""
    for field, default in asdict(config).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            parser.add_argument(flag, type=int if field in ("n_max",) else type(default), default=default)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m refimpl.pointer")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a checkpoint, evaluate it, write .pt and .json")
    add_config_flags(t, TrainConfig())
    t.add_argument("--name", required=True)
    t.add_argument("--no-save", action="store_true", help="write only the JSON record")
    r = sub.add_parser("rl", help="train the attention model without labels (POMO or rollout "
                                  "baseline), evaluate it, write .pt and .json")
    add_config_flags(r, RLConfig())
    r.add_argument("--name", required=True)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--test-instances", type=int, default=200)
    e = sub.add_parser("evaluate", help="re-run the test evaluation of a committed checkpoint")
    e.add_argument("--name", required=True)
    for a in (t, e):
        a.add_argument("--threads", type=int, default=1)
        a.add_argument("--test-instances", type=int, default=1000)
        a.add_argument("--beam", type=int, default=[1], nargs="+")
        a.add_argument("--test-n", type=int, default=None, nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "rl":
        return main_rl(args, argv)
    if args.command == "evaluate":
        model = load("", "", path=ASSETS / f"{args.name}.pt")
        record = json.loads((ASSETS / f"{args.name}.json").read_text())
        cfg = TrainConfig(**record["train"])
    else:
        cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
        model, record = train(cfg)
        record["command"] = "python -m refimpl.pointer " + " ".join(argv or sys.argv[1:])
    record["test"] = []
    data = {"input_order": cfg.input_order} if cfg.task == "hull" else {}
    for n in args.test_n or [cfg.n_max or cfg.n]:
        optimal = None
        for beam in args.beam:
            r = evaluate(cfg.task, model, n, args.test_instances, beam_size=beam,
                         optimal=optimal, **data)
            if cfg.task == "tsp" and n > MAX_HELD_KARP_N:
                optimal = torch.full((args.test_instances,), r["mean_optimal"])  # computed once
            print(json.dumps(r))
            record["test"].append(r)
    if args.command == "evaluate":
        (ASSETS / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    elif args.no_save:
        ASSETS.mkdir(parents=True, exist_ok=True)
        (ASSETS / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    else:
        save(model, record, args.name)


def reference_lengths(points: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Optimal lengths by Held-Karp up to n = 20 (about 3 s an instance there), else LKH's."""
    n = points.shape[1]
    if n <= 20:
        return held_karp_lengths(points), "held_karp"
    return lkh_lengths(points), "lkh"


def rl_test_results(model, n: int, num_instances: int, optimal: torch.Tensor,
                    reference: str) -> list[dict]:
    """Greedy test scores from 1 start, from all n and from all n on the 8 symmetric views."""
    results = []
    for starts, symmetries in ((1, 1), (n, 1), (n, SYMMETRIES)):
        r = evaluate("tsp", model, n, num_instances, optimal=optimal, starts=starts,
                     symmetries=symmetries)
        r["reference"] = reference
        print(json.dumps(r))
        results.append(r)
    return results


def main_rl(args, argv) -> None:
    """Train the attention model and save it; then score the saved checkpoint (half-precision
    weights, as ``load`` returns them) on fresh test instances."""
    cfg = RLConfig(**{k: getattr(args, k) for k in asdict(RLConfig())})
    validation = tsp_instances(cfg.n, cfg.eval_instances, VALIDATION_SEED)
    model, record = train_rl(cfg, reference=lkh_lengths(validation))
    record["validation_reference"] = "lkh"
    record["command"] = "python -m refimpl.pointer " + " ".join(argv or sys.argv[1:])
    path = save(model, record, args.name)
    optimal, reference = reference_lengths(tsp_instances(cfg.n, args.test_instances))
    record["test"] = rl_test_results(load("", "", path=path), cfg.n, args.test_instances, optimal,
                                     reference)
    save(model, record, args.name)


if __name__ == "__main__":
    main()
