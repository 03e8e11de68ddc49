"""Bad command lines: ``python -m energy``, ``python -m unfold train|trace``, ``python -m paper_figs``,
``python -m benchmarks``, ``python -m unfold.constraint_cost``.

Most run in-process through the command's ``main(argv)`` (fast); a few as real subprocesses, so that the
``__main__`` entry itself is covered. Expected: exit 2 (usage) or 1 (runtime), one error line on stderr that names
the flag and the fix, no traceback. Every case is sized so that, were the bad value accepted, the command would still
finish in a second or two (``--steps 1 --d 4 --depth 1``), so a silent acceptance is measured, not waited for.
"""

from __future__ import annotations

import functools

import benchmarks.__main__ as bench_main
import energy.hessian.__main__ as hessian_main
import paper_figs.__main__ as figs_main
import unfold.__main__ as unfold_main
from energy import verify
from energy.hessian import analyze as hessian_analyze
from energy.hessian import verify as hessian_verify
from unfold import constraint_cost

from . import _files as F
from ._case import Case, run_main, run_module

FIX = (r"(?i)\b(use|pass|give|must|expected|should|one of|valid|choose|instead|omit|exist|at least|rerun|"
       r"--no-resume|invalid choice|required|positive|writable|directory)\b")
TINY = ["--d", "4", "--depth", "1", "--seed", "0"]
TRAIN = ["train", *TINY, "--steps", "1", "--quiet", "--task", "synthetic"]
TRACE = ["trace", "--n", "2", "--task", "synthetic"]
CC = ["--tasks", "synthetic", "--seeds", "1", "--steps", "1", "--d", "4", "--depth", "1", "--models", "standard",
      "--lr", "3e-3"]
FIG = "yang2022-apollonius"


def _root_skip() -> str | None:
    return "running as root: no directory is unwritable" if F.is_root() else None


@functools.cache
def model_file() -> str:
    """A tiny model trained for one step on ``digits`` (10 classes, inputs of width 8) and saved by the CLI."""
    path = F.tmp() / "digits_model.pt"
    res = run_main(unfold_main.main, ["train", "--task", "digits", *TINY, "--steps", "1", "--quiet",
                                      "--save", str(path)])
    assert res.code == 0, res.err
    return str(path)


def cli(id: str, main, argv, match, codes=(2,), **kw) -> Case:
    """A case running ``main(argv())`` in-process (``argv`` is a callable so that files are made lazily)."""
    return Case(id, lambda: run_main(main, list(argv() if callable(argv) else argv)), tuple(match), cli=True,
                codes=codes, **kw)


def sub(id: str, module: str, argv, match, codes=(2,), **kw) -> Case:
    """A case running ``python -m module argv()`` as a subprocess."""
    return Case(id, lambda: run_module(module, list(argv() if callable(argv) else argv)), tuple(match), cli=True,
                codes=codes, **kw)


V, U, P, B, C = verify.main, unfold_main.main, figs_main.main, bench_main.main, constraint_cost.main
RUNTIME = (1, 2)
HV = hessian_verify.main
HA = hessian_analyze.main
ANALYZE = ["--model", "gpt2-tiny", "--batch", "1", "--seq-len", "3"]

CASES: list[Case] = [
    # --- python -m energy / energy-verify ----------------------------------------------------------------------------
    sub("energy:no-command", "energy", [], (r"verify", r"usage|python -m energy")),
    sub("energy:unknown-command", "energy", ["verfy"], (r"verfy|verify", r"usage|valid|one of")),
    cli("energy verify:--trials=0", V, ["--trials", "0"], (r"--trials|`trials`", FIX)),
    cli("energy verify:--trials=-1", V, ["--trials", "-1"], (r"--trials|`trials`", FIX)),
    cli("energy verify:--trials=abc", V, ["--trials", "abc"], (r"--trials", r"invalid int")),
    cli("energy verify:--seed=1.5", V, ["--seed", "1.5"], (r"--seed", r"invalid int")),
    cli("energy verify:--case=nope", V, ["--case", "nope", "--trials", "1"], (r"nope", r"(?i)valid|one of|known")),
    cli("energy verify:unknown-flag", V, ["--trails", "3"], (r"--trails", r"unrecognized")),
    # --- python -m unfold -------------------------------------------------------------------------------------------
    cli("unfold:no-command", U, [], (r"train|trace|command", r"required|invalid choice")),
    cli("unfold:unknown-command", U, ["fit"], (r"fit", r"invalid choice")),
    cli("unfold train:--d=0", U, [*TRAIN, "--d", "0"], (r"--d\b", FIX)),
    cli("unfold train:--depth=-1", U, [*TRAIN, "--depth", "-1"], (r"--depth", FIX)),
    cli("unfold train:--steps=0", U, [*TRAIN, "--steps", "0"], (r"--steps", FIX)),
    cli("unfold train:--steps=1.5", U, [*TRAIN, "--steps", "1.5"], (r"--steps", r"invalid int")),
    cli("unfold train:--lr=nan", U, [*TRAIN, "--lr", "nan"], (r"--lr|`lr`", FIX)),
    cli("unfold train:--lr=-1", U, [*TRAIN, "--lr", "-1"], (r"--lr", FIX)),
    cli("unfold train:--lr=inf", U, [*TRAIN, "--lr", "inf"], (r"--lr|`lr`", FIX)),
    cli("unfold train:--batch-size=0", U, [*TRAIN, "--batch-size", "0"], (r"--batch-size", FIX)),
    cli("unfold train:--optimizer=adamw", U, [*TRAIN, "--optimizer", "adamw"], (r"--optimizer", r"invalid choice")),
    cli("unfold train:--task=imagenet", U, [*TRAIN, "--task", "imagenet"], (r"--task", r"invalid choice")),
    cli("unfold train:--preset=gpt", U, [*TRAIN, "--preset", "gpt"], (r"--preset", r"invalid choice")),
    cli("unfold train:--heads=3-not-dividing", U, [*TRAIN, "--heads", "3"], (r"--heads|heads", r"divi|--d")),
    cli("unfold train:--heads=0", U, [*TRAIN, "--heads", "0"], (r"--heads", FIX)),
    cli("unfold train:--norm-eps=-1", U, [*TRAIN, "--normalization", "layernorm", "--norm-eps", "-1"],
        (r"--norm-eps|eps", FIX)),
    cli("unfold train:--normalization=batchnorm", U, [*TRAIN, "--normalization", "batchnorm"],
        (r"--normalization", r"invalid choice")),
    cli("unfold train:--checkpoint-every=0", U, [*TRAIN, "--checkpoint-every", "0"], (r"--checkpoint-every", FIX)),
    cli("unfold train:--checkpoint=<directory>", U, lambda: [*TRAIN, "--checkpoint", str(F.directory())],
        (r"a_directory|--checkpoint", FIX), codes=RUNTIME),
    cli("unfold train:--checkpoint=<0-byte>", U, lambda: [*TRAIN, "--checkpoint", str(F.empty())],
        (r"empty\.pt", r"--no-resume|delete|remove"), codes=RUNTIME),
    cli("unfold train:--checkpoint=<corrupt>", U, lambda: [*TRAIN, "--checkpoint", str(F.corrupt())],
        (r"corrupt\.pt", r"--no-resume|delete|remove"), codes=RUNTIME),
    cli("unfold train:--checkpoint=<a model file>", U, lambda: [*TRAIN, "--checkpoint", model_file()],
        (r"digits_model\.pt", r"--no-resume|delete|remove|model"), codes=RUNTIME),
    cli("unfold train:--save=<file>/m.pt", U, lambda: [*TRAIN, "--save", str(F.under_a_file("m.pt"))],
        (r"--save|plain_file", r"(?i)directory|writ"), codes=RUNTIME),
    cli("unfold train:--save=<unwritable>/m.pt", U, lambda: [*TRAIN, "--save", str(F.unwritable_dir() / "m.pt")],
        (r"--save|read_only", r"(?i)writ|permission"), codes=RUNTIME, skip=_root_skip),
    cli("unfold train:--save=<directory>", U, lambda: [*TRAIN, "--save", str(F.directory())],
        (r"--save|a_directory", r"(?i)directory|file"), codes=RUNTIME),
    cli("unfold trace:--model=<missing>", U, lambda: [*TRACE, "--model", str(F.missing())],
        (r"no_such_file", r"(?i)exist|no such|train --save"), codes=RUNTIME),
    cli("unfold trace:--model=<directory>", U, lambda: [*TRACE, "--model", str(F.directory())],
        (r"a_directory", r"(?i)directory|file"), codes=RUNTIME),
    cli("unfold trace:--model=<0-byte>", U, lambda: [*TRACE, "--model", str(F.empty())],
        (r"empty\.pt", r"(?i)empty|trunca|train --save|re-?save"), codes=RUNTIME),
    cli("unfold trace:--model=<corrupt>", U, lambda: [*TRACE, "--model", str(F.corrupt())],
        (r"corrupt\.pt", r"(?i)corrupt|not a|train --save|re-?save"), codes=RUNTIME),
    cli("unfold trace:--model=<json>", U, lambda: [*TRACE, "--model", str(F.json_file())],
        (r"wrong_format\.pt", r"(?i)not a|train --save|re-?save|model file"), codes=RUNTIME),
    cli("unfold trace:--model + contradicting --d", U, lambda: ["trace", "--model", model_file(), "--task", "digits",
                                                                "--n", "2", "--d", "64"],
        (r"--d\b", r"(?i)contradict|saved|omit|model")),
    cli("unfold trace:--model + contradicting --depth", U, lambda: ["trace", "--model", model_file(), "--task",
                                                                    "digits", "--n", "2", "--depth", "9"],
        (r"--depth", r"(?i)contradict|saved|omit|model")),
    cli("unfold trace:--model + other --task (10 vs 4 classes)", U,
        lambda: ["trace", "--model", model_file(), "--task", "synthetic", "--n", "2"],
        (r"--task|synthetic|digits", r"(?i)classes|trained on")),
    cli("unfold trace:--n=0", U, [*TRACE, *TINY, "--n", "0"], (r"--n\b", FIX)),
    cli("unfold trace:--heads=0", U, [*TRACE, *TINY, "--heads", "0"], (r"--heads", FIX)),
    cli("unfold trace:--plot=<file>/x.png", U, lambda: [*TRACE, *TINY, "--plot", str(F.under_a_file("x.png"))],
        (r"--plot|plain_file", r"(?i)directory|writ"), codes=RUNTIME),
    cli("unfold trace:--plot=<unwritable>/x.png", U, lambda: [*TRACE, *TINY, "--plot",
                                                              str(F.unwritable_dir() / "x.png")],
        (r"--plot|read_only", r"(?i)writ|permission"), codes=RUNTIME, skip=_root_skip),
    cli("unfold trace:--plot=x.pdff", U, lambda: [*TRACE, *TINY, "--plot", str(F.tmp() / "x.pdff")],
        (r"--plot|pdff", r"(?i)format|png|suffix|extension"), codes=RUNTIME),
    cli("unfold trace:--json=<file>/x.json", U, lambda: [*TRACE, *TINY, "--json", str(F.under_a_file("x.json"))],
        (r"--json|plain_file", r"(?i)directory|writ"), codes=RUNTIME),
    sub("unfold trace (subprocess):--model=<0-byte>", "unfold", lambda: [*TRACE, "--model", str(F.empty())],
        (r"empty\.pt", r"(?i)empty|trunca|train --save|re-?save"), codes=RUNTIME),
    # --- python -m paper_figs -----------------------------------------------------------------------------------------
    cli("paper_figs:unknown-figure", P, ["nope", "--tiny"], (r"nope", r"(?i)--list|valid|known")),
    cli("paper_figs:--threads=0", P, [FIG, "--tiny", "--threads", "0"], (r"--threads", FIX)),
    cli("paper_figs:--seed=x", P, [FIG, "--seed", "x"], (r"--seed", r"invalid int")),
    cli("paper_figs:--quick+--paper", P, [FIG, "--quick", "--paper"], (r"--paper|--quick", r"not allowed")),
    cli("paper_figs:--fast", P, [FIG, "--fast"], (r"--fast", r"unrecognized")),
    cli("paper_figs:--glove=<missing>", P, lambda: [FIG, "--tiny", "--glove", str(F.missing())],
        (r"--glove", FIX)),
    cli("paper_figs:--out=<file>/sub", P, lambda: [FIG, "--tiny", "--out", str(F.under_a_file("sub"))],
        (r"--out|plain_file", r"(?i)directory|writ"), codes=RUNTIME),
    cli("paper_figs:--out=<unwritable>", P, lambda: [FIG, "--tiny", "--out", str(F.unwritable_dir())],
        (r"--out|read_only", r"(?i)writ|permission"), codes=RUNTIME, skip=_root_skip),
    sub("paper_figs (subprocess):unknown-figure", "paper_figs", ["nope", "--tiny"], (r"nope",
                                                                                     r"(?i)--list|valid|known")),
    # --- python -m benchmarks --------------------------------------------------------------------------------------
    cli("benchmarks:--only=<no match>", B, ["--only", "zzz-no-such-bench"], (r"--only", r"registered|valid|one of")),
    cli("benchmarks:unknown-flag", B, ["--quik"], (r"--quik", r"unrecognized")),
    cli("benchmarks:--json-without-value", B, ["--json"], (r"--json", r"expected one argument")),
    # --- python -m unfold.constraint_cost -----------------------------------------------------------------------------
    cli("constraint_cost:--tasks=imagenet", C, [*CC, "--tasks", "imagenet"], (r"imagenet", r"valid")),
    cli("constraint_cost:--tasks=<empty>", C, [*CC, "--tasks", ","], (r"--tasks", FIX)),
    cli("constraint_cost:--seeds=0", C, [*CC, "--seeds", "0"], (r"--seeds", FIX)),
    cli("constraint_cost:--d=0", C, [*CC, "--d", "0"], (r"--d\b", FIX)),
    cli("constraint_cost:--heads=0", C, [*CC, "--heads", "0"], (r"--heads", FIX)),
    cli("constraint_cost:--lr=nan", C, [*CC, "--lr", "nan"], (r"--lr", FIX)),
    cli("constraint_cost:--batch-size=0", C, [*CC, "--batch-size", "0"], (r"--batch-size", FIX)),
    cli("constraint_cost:--threads=0", C, [*CC, "--threads", "0"], (r"--threads", FIX)),
    cli("constraint_cost:--json=<file>/x.json", C, lambda: [*CC, "--json", str(F.under_a_file("x.json"))],
        (r"--json|plain_file", r"(?i)directory|writ"), codes=RUNTIME),
    sub("constraint_cost (subprocess):--seeds=0", "unfold.constraint_cost", [*CC, "--seeds", "0"],
        (r"--seeds", FIX)),
    # --- python -m energy.hessian ----------------------------------------------------------------------------------
    sub("energy.hessian:no-command", "energy.hessian", [], (r"COMMAND", r"verify")),
    cli("energy.hessian:unknown-command", hessian_main.main, ["verfy"], (r"verfy", r"invalid choice", r"verify")),
    cli("energy.hessian verify:--trials=0", HV, ["--trials", "0"], (r"--trials", FIX)),
    cli("energy.hessian verify:--trials=abc", HV, ["--trials", "abc"], (r"--trials", r"invalid int")),
    cli("energy.hessian verify:--seed=1.5", HV, ["--seed", "1.5"], (r"--seed", r"invalid int")),
    cli("energy.hessian verify:--case=nope", HV, ["--case", "nope", "--trials", "1"], (r"nope", r"(?i)valid|one of")),
    cli("energy.hessian verify:unknown-flag", HV, ["--trails", "3"], (r"--trails", r"unrecognized")),
    cli("energy.hessian verify:--json=<file>/x.json", HV, lambda: ["--json", str(F.under_a_file("x.json"))],
        (r"--json", r"(?i)directory|writ")),
    cli("energy.hessian verify:--json=<dir>", HV, lambda: ["--json", str(F.directory())],
        (r"--json", r"(?i)is a directory", FIX)),
    cli("energy.hessian verify:--json-without-value", HV, ["--json"], (r"--json", r"expected one argument")),
    # --- python -m energy.hessian analyze ----------------------------------------------------------------------------
    cli("energy.hessian analyze:no-model", HA, [], (r"--model", r"required")),
    cli("energy.hessian analyze:--model=nope", HA, lambda: ["--model", "no-such-model-or-dir", "--json",
                                                            str(F.tmp() / "a.json")],
        (r"no-such-model-or-dir", r"(?i)preset|config\.json|directory")),
    cli("energy.hessian analyze:--blocks=no-match", HA, lambda: [*ANALYZE, "--json", str(F.tmp() / "a.json"),
                                                                "--blocks", "zzz*"], (r"zzz", r"(?i)match")),
    cli("energy.hessian analyze:--what=bad", HA, [*ANALYZE, "--what", "norms,colour"], (r"colour", FIX)),
    cli("energy.hessian analyze:--parts=bad", HA, [*ANALYZE, "--parts", "H,G2"], (r"G2", FIX)),
    cli("energy.hessian analyze:--batch=0", HA, [*ANALYZE, "--batch", "0"], (r"--batch", FIX)),
    cli("energy.hessian analyze:--json=<dir>", HA, lambda: [*ANALYZE, "--json", str(F.directory())],
        (r"--json", r"(?i)is a directory", FIX)),
    cli("energy.hessian analyze:--data=missing", HA, lambda: [*ANALYZE, "--json", str(F.tmp() / "a.json"), "--data",
                                                             "/no/such/ids.pt"], (r"--data", FIX)),
    cli("energy.hessian analyze:--timeout=0", HA, [*ANALYZE, "--timeout", "0"], (r"--timeout", FIX)),
]
