"""Sweep LoRA's rank r, alpha, rsLoRA and the learning rate on the bundled model; write the results.

    python benchmarks/sweep_r_alpha.py --threads 1  # the full sweep (about 6 minutes on one quiet CPU core)
    python benchmarks/sweep_r_alpha.py --quick     # a few tiny runs (seconds), printed, nothing written

Writes `data/results/sweep_r_alpha.json` (chapter 04 plots it; `lora_lab.widgets` explores it):

- `runs`: one entry per training run. Group "grid": r in {1, 2, 4, 8, 16, 32, 64} x four scaling rules
  (alpha = r, alpha = 2r, alpha = 16, rsLoRA alpha = 16) at the main learning rate, plus the two
  alpha = 16 rules at more learning rates. Group "alpha_vs_lr": r = 8 under AdamW and SGD with alpha x2,
  lr x2, lr x4. Each run has a subsampled loss curve, final loss (mean of the last 10% of steps),
  validation accuracy (execution accuracy for `sql`, `--eval-limit` items), steps to reach
  `--target-loss` (5-step moving average), trainable parameters and the size of the learned update
  dW = scaling * B @ A (`update_norm`, `direction_norm`, `a_drift`; see `lora_lab.widgets.update_stats`)
  after step 1, after step `--early-step` and at the end.
- `experiments.rank_scaling`: at fixed alpha = 16, dW's size vs r under alpha/r and alpha/sqrt(r).
- `experiments.alpha_vs_lr`: dW's size relative to the base run, and the cosine between the dWs of
  "alpha x2" and "lr x2" / "lr x4", under AdamW and under SGD.
- `findings`: the sentences the chapter states, with the measured numbers in them.
- `meta`: the command, versions, date, seed and settings.

Every run uses the same seed, so the same batches in the same order and, for the same r, the same
initial A. Two settings with the same r and the same scaling train identically (r = 16, alpha = 16 is
both "alpha = r" and "alpha = 16"), so each is trained once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

R_VALUES = (1, 2, 4, 8, 16, 32, 64)
FIXED_ALPHA = 16


def grid_specs(r_values, main_lr: float, extra_lrs, extra_lr_ranks) -> list[dict]:
    """The (r, alpha, rsLoRA, lr) settings of the grid, without duplicates."""
    specs = []
    for r in r_values:
        for alpha, rs in ((r, False), (2 * r, False), (FIXED_ALPHA, False), (FIXED_ALPHA, True)):
            specs.append({"r": r, "lora_alpha": alpha, "use_rslora": rs, "lr": main_lr})
    for lr in extra_lrs:
        for r in extra_lr_ranks:
            for rs in (False, True):
                specs.append({"r": r, "lora_alpha": FIXED_ALPHA, "use_rslora": rs, "lr": lr})
    unique = {}
    for s in specs:
        unique.setdefault((s["r"], s["lora_alpha"], s["use_rslora"], s["lr"]), s)
    return list(unique.values())


def alpha_vs_lr_specs(r: int, alpha: float, adam_lr: float, sgd_lr: float) -> list[dict]:
    specs = []
    for opt, lr in (("adamw", adam_lr), ("sgd", sgd_lr)):
        for name, a, lr_x in (
            ("base", alpha, 1),
            ("alpha x2", 2 * alpha, 1),
            ("lr x2", alpha, 2),
            ("lr x4", alpha, 4),
        ):
            specs.append({"variant": name, "r": r, "lora_alpha": a, "use_rslora": False, "lr": lr * lr_x,
                          "optimizer": opt})  # fmt: skip
    return specs


def _scaling(spec: dict) -> float:
    return spec["lora_alpha"] / math.sqrt(spec["r"]) if spec["use_rslora"] else spec["lora_alpha"] / spec["r"]


def steps_to_target(losses_full: list[float], target: float, window: int = 5) -> int | None:
    """First step whose trailing `window`-step mean loss is at or below `target` (None: never)."""
    total = 0.0
    for i, v in enumerate(losses_full):
        total += v
        if i >= window:
            total -= losses_full[i - window]
        if i + 1 >= window and total / window <= target:
            return i + 1
    return None


def _cosine(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def run_sweep(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    from lora_lab.data import load_task
    from lora_lab.evaluate import task_accuracy
    from lora_lab.models import load_base
    from lora_lab.train import encode_example
    from lora_lab.widgets import alpha_rules, train_point

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.model)
    base[0].eval()
    encoded = [encode_example(base[1], ex, args.seq_len) for ex in load_task(args.task, "train")]
    common = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, encoded=encoded, base=base,
                  measure_at=(1, args.early_step), progress=False, target_modules=args.target_modules,
                  log_every=1)  # fmt: skip

    grid = grid_specs(args.r_values, args.lr, args.extra_lrs, args.extra_lr_ranks)
    avl = alpha_vs_lr_specs(8 if 8 in args.r_values else args.r_values[0], FIXED_ALPHA, args.lr, args.sgd_lr)
    avl = avl if not args.skip_alpha_vs_lr else []
    total = len(grid) + len(avl)
    bar = tqdm(total=total, desc="sweep r/alpha", unit="run")
    cache: dict[tuple, dict] = {}  # (r, scaling, lr, optimizer) -> run: equal settings train once
    full_losses: dict[tuple, list[float]] = {}
    runs = []

    def train_spec(spec: dict, optimizer: str, evaluate: bool, snapshots: bool) -> dict:
        key = (spec["r"], round(_scaling(spec), 9), spec["lr"], optimizer)
        if key in cache and not snapshots:
            return cache[key]
        run = train_point(spec["r"], spec["lora_alpha"], spec["use_rslora"], spec["lr"], optimizer=optimizer,
                          keep_model=True, keep_snapshots=snapshots, **common)  # fmt: skip
        model = run.pop("model")
        full = run["losses"]  # log_every=1: every step
        full_losses[key] = full
        run["steps_to_target"] = steps_to_target(full, args.target_loss)
        keep = [s for s in range(1, len(full) + 1) if s % args.log_every == 0 or s == 1 or s == len(full)]
        run["loss_steps"], run["losses"] = keep, [full[s - 1] for s in keep]
        run["accuracy"] = None
        if evaluate and args.eval_limit and not run["diverged"]:
            model.eval()
            run["accuracy"] = round(task_accuracy(model, base[1], args.task, split=args.eval_split,
                                                  limit=args.eval_limit), 4)  # fmt: skip
        del model
        cache[key] = run
        return run

    for spec in grid:
        bar.set_postfix_str(
            f"r={spec['r']} a={spec['lora_alpha']} {'rs ' if spec['use_rslora'] else ''}lr={spec['lr']:g}"
        )
        run = dict(train_spec(spec, "adamw", evaluate=True, snapshots=False))
        run.update(spec)  # the label fields of THIS setting (a cached twin may have other ones)
        run["scaling"] = _scaling(spec)
        run["alpha_rules"] = alpha_rules(spec["r"], spec["lora_alpha"], spec["use_rslora"], (FIXED_ALPHA,))
        run["label"] = (
            f"r={spec['r']} a={spec['lora_alpha']:g}{' rsLoRA' if spec['use_rslora'] else ''} lr={spec['lr']:g}"
        )
        run["group"] = "grid"
        runs.append(run)
        bar.update(1)

    snaps = {}
    for spec in avl:
        bar.set_postfix_str(f"{spec['optimizer']} {spec['variant']}")
        run = train_spec(spec, spec["optimizer"], evaluate=False, snapshots=True)
        snaps[(spec["optimizer"], spec["variant"])] = run.pop("snapshots")
        run = dict(run, group="alpha_vs_lr", variant=spec["variant"])
        run["label"] = f"{spec['optimizer']} {spec['variant']} (a={spec['lora_alpha']:g}, lr={spec['lr']:g})"
        runs.append(run)
        bar.update(1)
    bar.close()

    experiments = {"rank_scaling": rank_scaling(runs, args), "alpha_vs_lr": alpha_vs_lr(runs, snaps, args)}
    results = {
        "meta": {
            "command": "python benchmarks/sweep_r_alpha.py " + " ".join(args.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "model": args.model or "bundled tiny-base",
            "task": args.task,
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "optimizer": "AdamW (weight_decay 0), no clipping, constant lr",
            "target_modules": args.target_modules,
            "target_loss": args.target_loss,
            "log_every": args.log_every,
            "early_step": args.early_step,
            "eval": f"{args.task} {args.eval_split} split, first {args.eval_limit} items",
            "quick": args.quick,
            "seconds": None,
        },
        "runs": runs,
        "experiments": experiments,
    }
    results["findings"] = findings(results)
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    return results


def rank_scaling(runs: list[dict], args) -> dict:
    """dW size vs r at alpha = 16, alpha/r against alpha/sqrt(r), at the early step and at the end."""
    out = {"alpha": FIXED_ALPHA, "lr": args.lr, "early_step": args.early_step, "rows": []}
    for r in args.r_values:
        row = {"r": r}
        for rs, name in ((False, "alpha/r"), (True, "rsLoRA")):
            run = next((x for x in runs if x["group"] == "grid" and x["r"] == r and x["lora_alpha"] == FIXED_ALPHA
                        and x["use_rslora"] == rs and x["lr"] == args.lr), None)  # fmt: skip
            if run is None:
                continue
            early = run["measured"].get(str(args.early_step), {})
            row[name] = {
                "scaling": round(run["scaling"], 5),
                "update_norm_early": early.get("update_norm"),
                "direction_norm_early": early.get("direction_norm"),
                "update_norm_end": run["update_norm"],
                "direction_norm_end": run["direction_norm"],
                "final_loss": run["final_loss"],
                "accuracy": run["accuracy"],
            }
        out["rows"].append(row)
    return out


def alpha_vs_lr(runs: list[dict], snaps: dict, args) -> dict:
    """alpha x2 against lr x2 / lr x4, under AdamW and SGD: dW norm ratios and cosines vs the base run."""
    out = {"early_step": args.early_step, "steps": args.steps, "optimizers": {}}
    for opt in ("adamw", "sgd"):
        group = {x["variant"]: x for x in runs if x["group"] == "alpha_vs_lr" and x["optimizer"] == opt}
        if "base" not in group:
            continue
        base = group["base"]
        res = {"base": {"lr": base["lr"], "lora_alpha": base["lora_alpha"]}, "variants": {}}
        for name, run in group.items():
            early, base_early = (
                run["measured"].get(str(args.early_step), {}),
                base["measured"].get(str(args.early_step), {}),
            )
            res["variants"][name] = {
                "lr": run["lr"],
                "lora_alpha": run["lora_alpha"],
                "norm_ratio_step1": round(
                    run["measured"]["1"]["update_norm"] / base["measured"]["1"]["update_norm"], 4
                ),
                "norm_ratio_early": round(early["update_norm"] / base_early["update_norm"], 4)
                if base_early
                else None,
                "norm_ratio_end": round(run["update_norm"] / base["update_norm"], 4),
                "a_drift_end": run["a_drift"],
                "final_loss": run["final_loss"],
                "steps_to_target": run["steps_to_target"],
            }
        s = {name: snaps.get((opt, name)) for name in group}
        for other in ("lr x2", "lr x4"):
            if s.get("alpha x2") and s.get(other):
                res[f"cosine alpha x2 vs {other}"] = {
                    step: round(_cosine(s["alpha x2"][step], s[other][step]), 4)
                    for step in sorted(s["alpha x2"]) if step in s[other]
                }  # fmt: skip
        out["optimizers"][opt] = res
    return out


def findings(results: dict) -> list[str]:
    """The chapter's claims, each with the measured numbers (written from the results, never by hand)."""
    out = []
    rows = results["experiments"]["rank_scaling"]["rows"]
    k = results["experiments"]["rank_scaling"]["early_step"]
    lo, hi = rows[0], rows[-1]
    if "alpha/r" in lo and "alpha/r" in hi and lo["alpha/r"]["update_norm_early"]:
        out.append(
            f"At alpha={FIXED_ALPHA} with alpha/r, after {k} steps ||dW|| is {lo['alpha/r']['update_norm_early']:.3g} at "
            f"r={lo['r']} and {hi['alpha/r']['update_norm_early']:.3g} at r={hi['r']} "
            f"(one rank direction: {lo['alpha/r']['direction_norm_early']:.3g} -> {hi['alpha/r']['direction_norm_early']:.3g})."
        )
    if "rsLoRA" in lo and "rsLoRA" in hi and lo["rsLoRA"]["update_norm_early"]:
        out.append(
            f"With rsLoRA (alpha/sqrt(r)) ||dW|| after {k} steps is {lo['rsLoRA']['update_norm_early']:.3g} at r={lo['r']} "
            f"and {hi['rsLoRA']['update_norm_early']:.3g} at r={hi['r']}."
        )
    for opt, res in results["experiments"]["alpha_vs_lr"]["optimizers"].items():
        v = res["variants"]
        if all(n in v for n in ("alpha x2", "lr x2", "lr x4")):
            out.append(
                f"{opt}: after 1 step ||dW|| relative to the base run is x{v['alpha x2']['norm_ratio_step1']} for "
                f"alpha x2, x{v['lr x2']['norm_ratio_step1']} for lr x2, x{v['lr x4']['norm_ratio_step1']} for lr x4; "
                f"after {k} steps x{v['alpha x2']['norm_ratio_early']} for "
                f"alpha x2, x{v['lr x2']['norm_ratio_early']} for lr x2, x{v['lr x4']['norm_ratio_early']} for lr x4; "
                f"final loss {v['base']['final_loss']} (base), {v['alpha x2']['final_loss']} (alpha x2), "
                f"{v['lr x2']['final_loss']} (lr x2), {v['lr x4']['final_loss']} (lr x4)."
            )
    grid = [x for x in results["runs"] if x["group"] == "grid" and x["accuracy"] is not None]
    if grid:
        best = max(grid, key=lambda x: (x["accuracy"], -x["final_loss"]))
        out.append(
            f"Best grid run by accuracy: {best['label']} with {best['accuracy']:.0%} and final loss {best['final_loss']}."
        )
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="a few tiny runs (seconds); writes nothing unless --out"
    )
    ap.add_argument("--out", default=None, help="output JSON (default data/results/sweep_r_alpha.json)")
    ap.add_argument("--model", default=None, help="base model (default: the bundled tiny model)")
    ap.add_argument("--task", default="sql")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3, help="main AdamW learning rate")
    ap.add_argument("--extra-lrs", type=float, nargs="*", default=[1e-3, 1e-2])
    ap.add_argument("--extra-lr-ranks", type=int, nargs="*", default=[4, 32])
    ap.add_argument("--sgd-lr", type=float, default=0.03)
    ap.add_argument("--r-values", type=int, nargs="*", default=list(R_VALUES))
    ap.add_argument("--target-modules", nargs="*", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ap.add_argument("--target-loss", type=float, default=1.5)
    ap.add_argument("--early-step", type=int, default=10)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--eval-split", default="validation")
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-alpha-vs-lr", action="store_true")
    ap.add_argument("--rescore", default=None, metavar="FILE",
                    help="only recompute steps_to_target in FILE for --target-loss, from its logged curves")  # fmt: skip
    return ap


QUICK = ["--steps", "6", "--batch-size", "4", "--r-values", "2", "8", "--extra-lrs", "--eval-limit", "0",
         "--early-step", "3", "--log-every", "1", "--skip-alpha-vs-lr"]  # fmt: skip


def rescore(path: str, target: float, window: int = 3) -> dict:
    """Recompute `steps_to_target` of a written results file for a new target, from the logged curves.

    The logged curve keeps every `--log-every`-th step, so this is the first logged step whose mean over
    the last `window` logged points is at or below `target` (coarser than the in-run measure). The file
    is rewritten with the new target and a note saying how the numbers were made.
    """
    results = json.loads(Path(path).read_text())
    for run in results["runs"]:
        losses, steps = run["losses"], run["loss_steps"]
        hit = steps_to_target(losses, target, window=window)
        run["steps_to_target"] = steps[hit - 1] if hit else None
    for opt in results["experiments"]["alpha_vs_lr"]["optimizers"].values():
        for name, v in opt["variants"].items():
            run = next(x for x in results["runs"] if x["group"] == "alpha_vs_lr" and x["lr"] == v["lr"]
                       and x["lora_alpha"] == v["lora_alpha"] and x.get("variant") == name)  # fmt: skip
            v["steps_to_target"] = run["steps_to_target"]
    meta = results["meta"]
    meta["target_loss"] = target
    meta["steps_to_target_note"] = (
        f"recomputed from the logged curves (loss_steps), as the first logged step whose mean over the last "
        f"{window} logged points is <= {target}, by "
        f"`python benchmarks/sweep_r_alpha.py --rescore {Path(path).name} --target-loss {target}`"
    )
    Path(path).write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    args = ap.parse_args(argv)
    if args.rescore:
        results = rescore(args.rescore, args.target_loss)
        hit = [x for x in results["runs"] if x["steps_to_target"]]
        print(
            f"rescored {args.rescore}: {len(hit)} of {len(results['runs'])} runs reach loss {args.target_loss}"
        )
        return results
    if args.quick:  # the quick settings, overridden by anything given explicitly
        args = ap.parse_args(QUICK + argv)
    args.argv = argv
    if args.early_step >= args.steps:
        ap.error(f"--early-step ({args.early_step}) must be below --steps ({args.steps})")
    results = run_sweep(args)
    out = args.out or (None if args.quick else str(REPO / "data" / "results" / "sweep_r_alpha.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    for line in results["findings"]:
        print("-", line)
    print(f"{len(results['runs'])} runs in {results['meta']['seconds']} s")
    return results


if __name__ == "__main__":
    main()
