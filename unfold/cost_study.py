r"""The constraint-cost study (MATH §1.7): every model at equal parameter counts, one budget, a learning-rate sweep.

:func:`run_study` trains, for every task, target size, model, learning rate and seed, one model with the same
optimiser (Adam), number of steps and batch size, and records validation and test accuracy, the training time (wall
and CPU, of the training loop alone) and, for every family whose steps carry a guarantee, the descent certificate
(:func:`unfold.families.descent_certificate`) on test inputs.

* **Sizes.** A size is a width of the standard encoder; its parameter count is the target, and every family gets the
  width (and head count) of :func:`unfold.cost_models.match_width` whose count is closest to it.
* **Learning rates.** Every model is trained with every learning rate of ``lrs`` on the first ``sweep_seeds`` seeds;
  the best learning rate maximises the mean *validation* accuracy (never the test set; a learning rate with a
  diverged run ranks last); the remaining seeds run at that learning rate only. The test accuracy of the best
  learning rate is reported as mean ± std over all seeds.
* **Resume.** With ``cache=PATH`` every finished run is written to that JSON file (atomically, after each run); a
  later call skips the runs found there. A run's key holds everything that determines it (task, model, width, heads,
  depth, learning rate, seed, steps, batch size, optimiser, certificate inputs, study version), a fingerprint of what
  the model does (initial parameters, outputs and gradients on probe inputs) and one of the source of the data,
  training and certificate modules, so a cache written with other settings or by other code is never mistaken for
  this one, while a change to one family does not invalidate the runs of the others. Ctrl-C raises
  :class:`energy._cli.Interrupted` naming the finished runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from energy._cli import Interrupted
from energy._io import atomic_write_text
from energy._validation import ConstraintError, EnergyInputError, check_positive_int
from unfold.cost_models import STANDARD, build_model, certifiable, certificate, heads_for, match_width, model_names
from unfold.cost_tasks import TASKS, Task, make_task
from unfold.families import FAMILIES
from unfold.presets import parameter_count
from unfold.train import evaluate, train

__all__ = ["StudyConfig", "STUDY_VERSION", "run_study", "plan_sizes", "aggregate", "run_key", "load_cache",
           "code_fingerprint", "model_fingerprint"]

#: bump when a run's procedure changes, so that cached runs of the old procedure are not reused
STUDY_VERSION = 1


@dataclass(frozen=True)
class StudyConfig:
    """The settings of a study (see the module docstring).

    Attributes:
        tasks: tasks of :data:`unfold.cost_tasks.TASKS`.
        models: ``"standard"`` and family names (``None``: all of :func:`unfold.cost_models.model_names`).
        sizes: widths of the standard encoder; each gives a target parameter count.
        depth: layers of every model.
        heads: heads of the standard encoder and of every multi-head family.
        lrs: learning rates of the sweep (the same for every model).
        seeds: seeds (data split / order, initialisation).
        sweep_seeds: how many of the first seeds run every learning rate (the rest run the best one).
        steps: optimiser steps per run.
        batch_size: training batch size.
        optimizer: ``"adam"`` or ``"sgd"``.
        certify_inputs: number of test inputs of each certificate.
        match_tolerance: relative parameter gap above which one head is also tried (:func:`match_width`).
    """

    tasks: tuple[str, ...] = ("digits", "addition", "text")
    models: tuple[str, ...] | None = None
    sizes: tuple[int, ...] = (16, 32)
    depth: int = 4
    heads: int = 2
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: int = 1
    steps: int = 250
    batch_size: int = 64
    optimizer: str = "adam"
    certify_inputs: int = 256
    match_tolerance: float = 0.03

    def model_list(self) -> list[str]:
        """The models of the study, in order."""
        return list(self.models) if self.models is not None else model_names()

    def validate(self) -> StudyConfig:
        """Raise :class:`EnergyInputError` naming the setting and the fix; return ``self``."""
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise EnergyInputError(f"`tasks` must be a non-empty tuple of {', '.join(TASKS)}; got {self.tasks!r}.")
        valid = model_names()
        bad = [m for m in self.model_list() if m not in valid]
        if bad or not self.model_list():
            raise EnergyInputError(f"`models`: unknown {bad or 'empty list'}; valid models: {', '.join(valid)}.")
        for name in ("depth", "heads", "steps", "batch_size", "certify_inputs", "sweep_seeds"):
            check_positive_int(getattr(self, name), name)
        if not self.sizes or not self.seeds or not self.lrs:
            raise EnergyInputError("`sizes`, `seeds` and `lrs` must each hold at least one value.")
        for s in self.sizes:
            check_positive_int(s, "sizes[i]")
            if s % self.heads:
                raise EnergyInputError(f"size {s} is not divisible by heads = {self.heads} (the standard encoder's "
                                       "width must be); choose sizes that are multiples of the head count.")
        if any(not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise EnergyInputError(f"`lrs` must be positive finite numbers, got {self.lrs!r}.")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.lrs)) != len(self.lrs):
            raise EnergyInputError("`seeds` and `lrs` must not repeat a value.")
        if self.optimizer not in ("adam", "sgd"):
            raise EnergyInputError(f"`optimizer` must be 'adam' or 'sgd', got {self.optimizer!r}.")
        return self


#: the modules whose source determines every run's result beyond the model itself (data, training loop) ...
_CODE = ("unfold.train", "unfold.cost_tasks", "unfold.data.addition", "unfold.data.sequences",
         "unfold.data.offline_text")
#: ... and those that also determine the record of a certified run (the certificate)
_CERTIFICATE_CODE = ("unfold.certificate", "unfold.cost_models")


@functools.cache
def code_fingerprint(certified: bool = False) -> str:
    """12 hex digits of the SHA-256 of the source of the modules in ``_CODE`` (and ``_CERTIFICATE_CODE`` when
    ``certified``): a run cached by other code is redone; a change to the certificate redoes only certified runs.
    """
    h = hashlib.sha256()
    for name in _CODE + (_CERTIFICATE_CODE if certified else ()):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return h.hexdigest()[:12]


def model_fingerprint(task: Task, model: str, d: int, depth: int, heads: int, seed: int) -> str:
    """12 hex digits of the SHA-256 of what the model *does*: its initial parameters (seeded as in the run), its
    outputs on 8 probe inputs, and the gradients of their squared sum, bit for bit. A change of the code of a family
    (its initialisation, forward or backward, e.g. a parametrisation's gradient) changes it; a change elsewhere does
    not. Bits depend on the machine and the thread count (the command line fixes ``--threads``), so another machine
    retrains rather than reusing runs that may differ.
    """
    torch.manual_seed(seed)
    try:
        net = build_model(model, d_in=task.d_in, n_outputs=task.n_outputs, d=d, depth=depth, heads=heads)
    except ConstraintError:  # the run records the failure; its key must still be stable
        return "build-refused"
    out = net(task.X_probe[:8])
    out.square().sum().backward()
    h = hashlib.sha256()
    for name, p in sorted(net.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().double().numpy().tobytes())
        if p.grad is not None:
            h.update(p.grad.double().numpy().tobytes())
    h.update(out.detach().double().numpy().tobytes())
    return h.hexdigest()[:12]


def run_key(cfg: StudyConfig, task: Task, model: str, d: int, heads: int, lr: float, seed: int) -> str:
    """The cache key of one run: every setting that determines its result, the model's behaviour
    (:func:`model_fingerprint`) and the code fingerprint of data, training and certificate (:func:`code_fingerprint`).
    """
    return (f"{task.name}/{model}/d{d}/h{heads}/L{cfg.depth}/lr{lr!r}/seed{seed}/steps{cfg.steps}/b{cfg.batch_size}/"
            f"{cfg.optimizer}/cert{cfg.certify_inputs}/v{STUDY_VERSION}/code-{code_fingerprint(certifiable(model))}/"
            f"model-{model_fingerprint(task, model, d, cfg.depth, heads, seed)}")


def load_cache(path: Path) -> dict[str, Any]:
    """The runs stored in a cache file (``{}`` if it does not exist); a corrupt file is an error with the fix."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EnergyInputError(f"cache {path}: not readable JSON ({exc}); delete it to start the study "
                               "afresh.") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise EnergyInputError(f"cache {path}: not a study cache (no 'runs' object); delete it or pass another path.")
    return dict(data["runs"])


def _save_cache(path: Path, runs: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps({"version": STUDY_VERSION, "runs": runs}, indent=1))


def plan_sizes(cfg: StudyConfig, task: Task) -> list[dict[str, Any]]:
    """Per size: the target (the standard encoder's count) and every model's matched width, heads and count."""
    plans = []
    for size in cfg.sizes:
        std = build_model(STANDARD, d_in=task.d_in, n_outputs=task.n_outputs, d=size, depth=cfg.depth,
                          heads=cfg.heads)
        target = parameter_count(std)
        models: dict[str, Any] = {}
        for name in cfg.model_list():
            if name == STANDARD:
                models[name] = {"d": size, "heads": cfg.heads, "parameters": target, "target": target,
                                "relative_gap": 0.0}
            else:
                models[name] = match_width(name, target, d_in=task.d_in, n_outputs=task.n_outputs, depth=cfg.depth,
                                           heads=cfg.heads, tolerance=cfg.match_tolerance)
        plans.append({"size": size, "target": target, "models": models})
    return plans


def _test_inputs(task: Task, n: int) -> Tensor:
    xs, have = [], 0
    for X, _ in task.test_batches():
        xs.append(X)
        have += X.shape[0]
        if have >= n:
            break
    return torch.cat(xs)[:n]


def _one_run(cfg: StudyConfig, task: Task, model: str, d: int, heads: int, lr: float, seed: int) -> dict[str, Any]:
    """Train one model and measure it (the record stored in the cache)."""
    rec: dict[str, Any] = {"task": task.name, "model": model, "d": d, "heads": heads, "lr": lr, "seed": seed,
                           "diverged": False}
    torch.manual_seed(seed)
    try:
        net = build_model(model, d_in=task.d_in, n_outputs=task.n_outputs, d=d, depth=cfg.depth, heads=heads)
    except ConstraintError as exc:  # a constraint check refused the initial weights: recorded like a divergence
        rec.update(diverged=True, final_loss=None, error=f"build refused: {exc}", wall_s=0.0, cpu_s=0.0, val=None,
                   test=None, extra={}, certificate=None, parameters=None)
        return rec
    rec["parameters"] = parameter_count(net)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = train(net, task.loss_fn, task.train_batches, steps=cfg.steps, lr=lr, optimizer=cfg.optimizer,  # type: ignore[arg-type]
                    seed=seed, progress=False)
        rec["final_loss"] = res.final_loss
    except FloatingPointError as exc:  # the loss became NaN/inf: recorded, ranks last in the sweep
        rec.update(diverged=True, final_loss=None, error=str(exc))
    rec["wall_s"], rec["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    if rec["diverged"]:
        rec.update(val=None, test=None, extra={}, certificate=None)
        return rec
    rec["val"] = evaluate(net, task.val_batches(), task.metric)
    rec["test"] = evaluate(net, task.test_batches(), task.metric)
    rec["extra"] = {k: evaluate(net, task.test_batches(), m) for k, m in task.extra_metrics.items()}
    rec["certificate"] = (certificate(net.eval(), _test_inputs(task, cfg.certify_inputs))
                          if certifiable(model) else None)
    return rec


def _mean_std(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def _best_lr(cfg: StudyConfig, recs: dict[float, list[dict[str, Any]]]) -> float:
    """The learning rate with the highest mean validation accuracy over the sweep seeds (diverged ranks last)."""
    sweep = set(cfg.seeds[: cfg.sweep_seeds])

    def score(lr: float) -> tuple[int, float, float]:
        rs = [r for r in recs[lr] if r["seed"] in sweep]
        ok = all(not r["diverged"] for r in rs) and bool(rs)
        return (int(ok), statistics.fmean(r["val"] for r in rs) if ok else -1.0, -lr)

    return max(recs, key=score)


def aggregate(cfg: StudyConfig, plans: dict[str, list[dict[str, Any]]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The LR sweep table, the results at the best LR (mean ± std over seeds), and the best certified model."""
    sweep: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for task, task_plans in plans.items():
        sweep[task], results[task] = {}, {}
        for plan in task_plans:
            size = str(plan["size"])
            sweep[task][size], results[task][size] = {}, {}
            for model, m in plan["models"].items():
                mine = [r for r in runs if r["task"] == task and r["model"] == model and r["d"] == m["d"]
                        and r["heads"] == m["heads"]]
                by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in cfg.lrs}
                by_lr = {lr: rs for lr, rs in by_lr.items() if rs}
                if not by_lr:
                    continue
                sweep[task][size][model] = {
                    repr(lr): {"val": _mean_std([r["val"] for r in rs if not r["diverged"]]),
                               "test": _mean_std([r["test"] for r in rs if not r["diverged"]]),
                               "seeds": [r["seed"] for r in rs], "diverged": sum(r["diverged"] for r in rs)}
                    for lr, rs in by_lr.items()}
                best = _best_lr(cfg, by_lr)
                rs = [r for r in by_lr[best] if not r["diverged"]]
                certs = [r["certificate"] for r in rs if r.get("certificate")]
                entry: dict[str, Any] = {
                    "best_lr": best, "d": m["d"], "heads": m["heads"], "parameters": m["parameters"],
                    "relative_gap": m["relative_gap"], "seeds": [r["seed"] for r in by_lr[best]],
                    "diverged": sum(r["diverged"] for r in by_lr[best]),
                    "test_accuracy": _mean_std([r["test"] for r in rs]),
                    "val_accuracy": _mean_std([r["val"] for r in rs]),
                    "wall_s": _mean_std([r["wall_s"] for r in by_lr[best]]),
                    "cpu_s": _mean_std([r["cpu_s"] for r in by_lr[best]]),
                    **{k: _mean_std([r["extra"][k] for r in rs]) for k in (rs[0]["extra"] if rs else {})},
                    "certifiable": certifiable(model),
                }
                if certs:
                    entry["certificate"] = {
                        "guaranteed_share": min(c["guaranteed_share"] for c in certs),
                        "violations": sum(c["violations"] for c in certs),
                        "max_rel_violation": max(c["max_rel_violation"] for c in certs),
                        "certified": all(c["certified"] for c in certs),
                        "monotone_share": _mean_std([c["monotone_share"] for c in certs]),
                        "energy_per_layer": [c["energy_per_layer"] for c in certs],
                    }
                results[task][size][model] = entry
    return {"sweep": sweep, "results": results, "best_certified": _best_certified(results, runs)}


def _best_certified(results: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: the certified model (every step guaranteed, no violation) with the best mean test accuracy at its
    best LR, over all sizes, with its full certificates (one per seed) and the standard encoder at that size.
    """
    out: dict[str, Any] = {}
    for task, per_size in results.items():
        cands = [(e["test_accuracy"]["mean"], size, model) for size, models in per_size.items()
                 for model, e in models.items()
                 if e.get("certificate", {}).get("certified") and e["test_accuracy"]["mean"] is not None]
        if not cands:
            continue
        acc, size, model = max(cands)
        e = per_size[size][model]
        std = per_size[size].get(STANDARD)
        certs = [r["certificate"] for r in runs if r["task"] == task and r["model"] == model and r["d"] == e["d"]
                 and r["heads"] == e["heads"] and r["lr"] == e["best_lr"] and r.get("certificate")]
        entry = {"model": model, "size": int(size), "d": e["d"], "heads": e["heads"], "parameters": e["parameters"],
                 "best_lr": e["best_lr"], "test_accuracy": e["test_accuracy"], "cpu_s": e["cpu_s"],
                 "wall_s": e["wall_s"], "certificates": certs}
        if std is not None and std["test_accuracy"]["mean"] is not None:
            entry["standard"] = {"parameters": std["parameters"], "test_accuracy": std["test_accuracy"],
                                 "cpu_s": std["cpu_s"], "wall_s": std["wall_s"]}
            entry["gap_points"] = 100 * (std["test_accuracy"]["mean"] - acc)
            entry["cpu_time_ratio"] = e["cpu_s"]["mean"] / std["cpu_s"]["mean"]
            entry["wall_time_ratio"] = e["wall_s"]["mean"] / std["wall_s"]["mean"]
        out[task] = entry
    return out


def _planned_runs(cfg: StudyConfig, plans: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, int, int]]:
    return [(task, model, m["d"], m["heads"]) for task, task_plans in plans.items() for plan in task_plans
            for model, m in plan["models"].items()]


def run_study(cfg: StudyConfig, *, cache: str | Path | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; return the report (settings, size plans, all runs, sweep, results, best).

    Args:
        cfg: the settings.
        cache: JSON file of finished runs (read first, rewritten atomically after every run); ``None``: no cache.
        log: receives one progress line per run (default: print to stdout, flushed).

    Raises:
        Interrupted: on Ctrl-C, naming how many runs finished and where they are cached.
    """
    cfg.validate()
    say = log or (lambda s: print(s, flush=True))
    t_start, c_start = time.perf_counter(), time.process_time()
    path = None if cache is None else Path(cache)
    stored = load_cache(path) if path is not None else {}
    tasks: dict[tuple[str, int], Task] = {}

    def task_for(name: str, seed: int) -> Task:
        if (name, seed) not in tasks:
            tasks[(name, seed)] = make_task(name, seed=seed, batch_size=cfg.batch_size)
        return tasks[(name, seed)]

    plans = {t: plan_sizes(cfg, task_for(t, cfg.seeds[0])) for t in cfg.tasks}
    combos = _planned_runs(cfg, plans)
    sweep_seeds, rest = cfg.seeds[: cfg.sweep_seeds], cfg.seeds[cfg.sweep_seeds:]
    n_total = len(combos) * (len(cfg.lrs) * len(sweep_seeds) + len(rest))
    runs: list[dict[str, Any]] = []
    done_now = 0
    timed: list[float] = []

    def do(task: str, model: str, d: int, heads: int, lr: float, seed: int) -> dict[str, Any]:
        nonlocal done_now
        key = run_key(cfg, task_for(task, seed), model, d, heads, lr, seed)
        if key in stored:
            rec = stored[key]
            tag = "cached"
        else:
            t = time.perf_counter()
            rec = _one_run(cfg, task_for(task, seed), model, d, heads, lr, seed)
            timed.append(time.perf_counter() - t)
            stored[key] = rec
            if path is not None:
                _save_cache(path, stored)
            done_now += 1
            tag = f"{rec['cpu_s']:.1f} s cpu"
        runs.append(rec)
        left = n_total - len(runs)
        eta = f", ~{left * statistics.fmean(timed) / 60:.1f} min left" if timed else ""
        acc = "diverged" if rec["diverged"] else f"val {rec['val']:.3f} test {rec['test']:.3f}"
        say(f"[constraint_cost] [{len(runs)}/{n_total}] {task} {model} d={d} h={heads} lr={lr:g} seed {seed}: "
            f"{acc} ({tag}{eta})")
        return rec

    try:
        for task, model, d, heads in combos:
            by_lr = {lr: [do(task, model, d, heads, lr, s) for s in sweep_seeds] for lr in cfg.lrs}
            if rest:
                best = _best_lr(cfg, by_lr)
                for s in rest:
                    do(task, model, d, heads, best, s)
    except KeyboardInterrupt:
        where = (f"cached in {path}; rerun the same command to resume (finished runs are skipped)" if path
                 is not None else "nothing was cached (no cache file given); rerun to start again")
        raise Interrupted(f"{len(runs)} of {n_total} runs finished ({done_now} trained in this call), "
                          f"{where}") from None

    report: dict[str, Any] = {
        "settings": {**asdict(cfg), "models": cfg.model_list(),
                     "study_version": STUDY_VERSION, "code_fingerprint": code_fingerprint(True),
                     "standard": "unfold.standard.standard_encoder (nn.TransformerEncoderLayer, d_ff = 4d, post-LN)",
                     "families": {n: {"description": FAMILIES[n].description, "guarantee": FAMILIES[n].guarantee,
                                      "certifiable": FAMILIES[n].certifiable}
                                  for n in cfg.model_list() if n != STANDARD},
                     "heads_per_model": {n: heads_for(n, cfg.heads) for n in cfg.model_list()}},
        "tasks": {t: task_for(t, cfg.seeds[0]).description for t in cfg.tasks},
        "sizes": plans,
        **aggregate(cfg, plans, runs),
        "runs": [{k: v for k, v in r.items() if k != "certificate"}
                 | ({"certificate": _compact(r["certificate"])} if r.get("certificate") else {}) for r in runs],
        "trained_now": done_now,
        "training_wall_s_total": sum(r["wall_s"] for r in runs),
        "training_cpu_s_total": sum(r["cpu_s"] for r in runs),
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - c_start,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    return report


def _compact(cert: dict[str, Any]) -> dict[str, Any]:
    """A certificate without its per-step statements (those are kept for the best certified model)."""
    return {k: v for k, v in cert.items() if k != "steps"}
