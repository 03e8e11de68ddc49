"""The constraint-cost study (MATH §1.7): tasks and splits, the text task's need for context, equal-parameter
matching, the LR choice on validation, the report's structure, and resume / interruption of a tiny real study.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from energy._cli import Interrupted
from unfold import cost_study
from unfold.constraint_cost import format_sweep, format_table, main
from unfold.cost_models import STANDARD, build_model, certifiable, heads_for, match_width, model_names
from unfold.cost_study import StudyConfig, load_cache, run_study
from unfold.cost_tasks import NEGATIVE_WORDS, NEGATORS, POSITIVE_WORDS, make_task, negation_sentiment
from unfold.data import FIXED_VOCABULARY
from unfold.families import FAMILIES
from unfold.presets import parameter_count

TINY = dict(tasks=("digits",), models=(STANDARD, "yang2022", "yang2022_ln"), sizes=(4,), depth=1, heads=2,
            lrs=(1e-3, 1e-2), seeds=(0, 1), sweep_seeds=1, steps=2, certify_inputs=16)


# ------------------------------------------------------------------------------------------------------------ tasks


def test_negation_sentiment_label_is_polarity_xor_negation() -> None:
    sentences, labels = negation_sentiment(300, seed=3)
    assert all(len(s) == 12 and set(s) <= set(FIXED_VOCABULARY) for s in sentences)
    for s, y in zip(sentences, labels.tolist(), strict=True):
        opinions = [w for w in s if w in POSITIVE_WORDS or w in NEGATIVE_WORDS]
        negated = any(w in NEGATORS for w in s)
        assert len(opinions) == 1
        assert y == int((opinions[0] in POSITIVE_WORDS) != negated)
    assert 0.4 < labels.double().mean() < 0.6
    again, labels2 = negation_sentiment(300, seed=3)
    assert again == sentences and torch.equal(labels, labels2)


def test_text_task_needs_context_bag_of_words_is_at_chance() -> None:
    index = {w: i for i, w in enumerate(FIXED_VOCABULARY)}

    def counts(sentences: list[list[str]]) -> torch.Tensor:
        X = torch.zeros(len(sentences), len(index), dtype=torch.float64)
        for i, s in enumerate(sentences):
            for w in s:
                X[i, index[w]] += 1
        return X

    Str, ytr = negation_sentiment(2000, seed=0)
    Ste, yte = negation_sentiment(1000, seed=1)
    bow = LogisticRegression(max_iter=2000).fit(counts(Str).numpy(), ytr.numpy())
    assert bow.score(counts(Ste).numpy(), yte.numpy()) < 0.56  # linear bag of words: chance (0.5 ± noise)


@pytest.mark.parametrize("name", ["digits", "addition", "text"])
def test_tasks_have_three_disjoint_splits(name: str) -> None:
    task = make_task(name, seed=1, batch_size=8)
    X, y = next(iter(task.train_batches))
    Xv = torch.cat([b[0] for b in task.val_batches()])
    Xt = torch.cat([b[0] for b in task.test_batches()])
    assert X.shape[0] == 8 and X.shape[-1] == Xv.shape[-1] == Xt.shape[-1] == task.d_in
    n = X.shape[1]
    assert torch.equal(X[0, :, -n:], torch.eye(n))  # one-hot positions appended
    flat_v, flat_t = Xv.flatten(1), Xt.flatten(1)
    shared = (torch.cdist(flat_v, flat_t) == 0).any(1).double().mean()
    assert shared < 0.05  # (digits has a few duplicate images; the rest never share inputs)
    if name == "digits":
        assert Xv.shape[0] + Xt.shape[0] < 1797 and Xv.shape[0] > 150


# ------------------------------------------------------------------------------------------------ equal parameters


@pytest.mark.parametrize("name", [m for m in model_names() if m != STANDARD])
def test_match_width_is_closest_and_within_tolerance(name: str) -> None:
    task = make_task("digits", seed=0)
    target = parameter_count(build_model(STANDARD, d_in=task.d_in, n_outputs=10, d=16, depth=4, heads=2))
    m = match_width(name, target, d_in=task.d_in, n_outputs=10, depth=4, heads=2)
    assert abs(m["relative_gap"]) <= 0.03 and m["target"] == target and m["d"] % m["heads"] == 0
    built = build_model(name, d_in=task.d_in, n_outputs=10, d=m["d"], depth=4, heads=m["heads"])
    assert parameter_count(built) == m["parameters"]
    assert m["heads"] in (heads_for(name, 2), 1)
    for other in (m["d"] - m["heads"], m["d"] + m["heads"]):  # the neighbouring widths are farther away
        n = parameter_count(build_model(name, d_in=task.d_in, n_outputs=10, d=other, depth=4, heads=m["heads"]))
        assert abs(n - target) >= abs(m["parameters"] - target)


def test_match_width_bad_target_and_unreachable() -> None:
    with pytest.raises(Exception, match="positive integer"):
        match_width("yang2022", 0, d_in=8, n_outputs=2, depth=1, heads=1)
    with pytest.raises(Exception, match="lower the target"):
        match_width("yang2022", 10**9, d_in=8, n_outputs=2, depth=1, heads=1, max_width=64)
    with pytest.raises(Exception, match="valid models"):
        build_model("transformer", d_in=8, n_outputs=2, d=8, depth=1, heads=1)


def test_certifiable_follows_the_families() -> None:
    assert not certifiable(STANDARD)
    for name, spec in FAMILIES.items():
        assert certifiable(name) == spec.certifiable


# ------------------------------------------------------------------------------------------------ the study itself


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list[str]]:
    cache = tmp_path_factory.mktemp("study") / "runs.json"
    lines: list[str] = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test (conftest); a module fixture is set up before the function fixtures
    try:
        return run_study(StudyConfig(**TINY), cache=cache, log=lines.append), cache, lines
    finally:
        torch.set_num_threads(before)


def test_report_structure_and_equal_parameters(tiny: tuple[dict, Path, list[str]]) -> None:
    report, cache, lines = tiny
    assert report["trained_now"] == len(report["runs"]) == 3 * (2 + 1)  # 3 models × (2 LRs on seed 0 + 1 seed)
    assert len(lines) == 9 and lines[-1].startswith("[constraint_cost] [9/9]")
    plan = report["sizes"]["digits"][0]
    assert plan["models"][STANDARD]["parameters"] == plan["target"]
    for name, m in plan["models"].items():
        e = report["results"]["digits"]["4"][name]
        assert e["parameters"] == m["parameters"] and e["d"] == m["d"]
        assert set(e["test_accuracy"]) == {"mean", "std", "values"} and len(e["test_accuracy"]["values"]) == 2
        assert e["cpu_s"]["mean"] > 0 and e["wall_s"]["mean"] > 0
        assert ("certificate" in e) == certifiable(name)
    assert report["settings"]["families"]["yang2022"]["certifiable"] is True
    assert len(json.loads(cache.read_text())["runs"]) == 9
    assert "| digits | 4 | yang2022 |" in format_table(report) and "val @ lr 0.001" in format_sweep(report)
    json.dumps(report)  # serialisable as it is


def test_best_lr_is_chosen_on_validation_of_the_sweep_seed(tiny: tuple[dict, Path, list[str]]) -> None:
    report, _, _ = tiny
    for model in TINY["models"]:
        runs = [r for r in report["runs"] if r["model"] == model]
        sweep = {r["lr"]: r["val"] for r in runs if r["seed"] == 0}
        best = max(sorted(sweep), key=lambda lr: (sweep[lr], -lr))
        e = report["results"]["digits"]["4"][model]
        assert e["best_lr"] == best
        final = [r for r in runs if r["lr"] == best]
        assert sorted(r["seed"] for r in final) == [0, 1]  # seed 1 ran at the chosen LR only
        assert e["test_accuracy"]["mean"] == pytest.approx(statistics.fmean(r["test"] for r in final))
        assert report["sweep"]["digits"]["4"][model][repr(best)]["val"]["values"] == [r["val"] for r in final]


def test_certificates_of_certified_models(tiny: tuple[dict, Path, list[str]]) -> None:
    report, _, _ = tiny
    best = report["best_certified"]["digits"]
    assert best["model"] == "yang2022" and len(best["certificates"]) == 2
    for cert in best["certificates"]:
        assert cert["n_inputs"] == 16 and cert["guaranteed_share"] == 1.0 and cert["violations"] == 0
        assert len(cert["energy_per_layer"]) == len(cert["energy_per_layer_std"]) == 2  # depth 1: E(Y⁰), E(Y¹)
        assert cert["steps"]  # the full certificate (per-step statements) of the best model
    std = report["results"]["digits"]["4"][STANDARD]["test_accuracy"]["mean"]
    assert best["gap_points"] == pytest.approx(100 * (std - best["test_accuracy"]["mean"]))
    assert all("steps" not in r.get("certificate", {}) for r in report["runs"])  # compact per-run copies


def test_rerun_skips_cached_runs_and_other_settings_retrain(tiny: tuple[dict, Path, list[str]],
                                                            tmp_path: Path) -> None:
    report, cache, _ = tiny
    again = run_study(StudyConfig(**TINY), cache=cache, log=lambda s: None)
    assert again["trained_now"] == 0 and again["results"] == report["results"]
    copy = tmp_path / "runs.json"
    stored = load_cache(cache)
    stored.pop(next(iter(stored)))
    copy.write_text(json.dumps({"version": 1, "runs": stored}))
    assert run_study(StudyConfig(**TINY), cache=copy, log=lambda s: None)["trained_now"] == 1
    more = run_study(StudyConfig(**{**TINY, "steps": 3, "models": (STANDARD,)}), cache=copy, log=lambda s: None)
    assert more["trained_now"] == 3  # another budget: another key
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Exception, match="delete it"):
        run_study(StudyConfig(**TINY), cache=tmp_path / "bad.json")


def test_a_changed_family_invalidates_only_its_own_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StudyConfig(**TINY)
    task = make_task("digits", seed=0)
    keys = {m: cost_study.run_key(cfg, task, m, 4, 1, 1e-3, 0) for m in ("yang2022", "untied")}
    assert keys == {m: cost_study.run_key(cfg, task, m, 4, 1, 1e-3, 0) for m in keys}  # stable
    real = cost_study.build_model

    def changed(name: str, **kw: object) -> torch.nn.Module:  # e.g. a new initialisation of one family
        net = real(name, **kw)  # type: ignore[arg-type]
        if name == "yang2022":
            with torch.no_grad():
                net.head.bias.add_(1e-3)
        return net

    monkeypatch.setattr(cost_study, "build_model", changed)
    assert cost_study.run_key(cfg, task, "yang2022", 4, 1, 1e-3, 0) != keys["yang2022"]
    assert cost_study.run_key(cfg, task, "untied", 4, 1, 1e-3, 0) == keys["untied"]


def test_interruption_names_finished_runs_and_resumes(tmp_path: Path) -> None:
    cache = tmp_path / "runs.json"
    seen: list[str] = []

    def stop_after_four(line: str) -> None:
        seen.append(line)
        if len(seen) == 4:
            raise KeyboardInterrupt

    cfg = StudyConfig(**{**TINY, "models": (STANDARD, "yang2022")})
    with pytest.raises(Interrupted, match=r"4 of 6 runs finished \(4 trained in this call\), cached in"):
        run_study(cfg, cache=cache, log=stop_after_four)
    assert len(load_cache(cache)) == 4
    assert run_study(cfg, cache=cache, log=lambda s: None)["trained_now"] == 2


def test_diverged_run_is_recorded_and_ranks_last(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cost_study.train

    def train(model, loss_fn, batches, *, lr, **kw):  # type: ignore[no-untyped-def]
        if lr == 1e-2:
            raise FloatingPointError("the training loss became nan")
        return real(model, loss_fn, batches, lr=lr, **kw)

    monkeypatch.setattr(cost_study, "train", train)
    report = run_study(StudyConfig(**{**TINY, "models": (STANDARD,)}), log=lambda s: None)
    runs = {r["lr"]: r for r in report["runs"] if r["seed"] == 0}
    assert runs[1e-2]["diverged"] and runs[1e-2]["test"] is None
    assert report["results"]["digits"]["4"][STANDARD]["best_lr"] == 1e-3
    assert report["sweep"]["digits"]["4"][STANDARD][repr(1e-2)]["diverged"] == 1


def test_refused_builds_are_retried_for_counts_and_recorded_for_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from energy._validation import ConstraintError
    from unfold import cost_models

    real, calls = cost_models.build_model, []

    def flaky(name: str, **kw: object) -> torch.nn.Module:  # refuses its first build, as a float32 check may
        calls.append(name)
        if len(calls) == 1:
            raise ConstraintError("could not factor `M`")
        return real(name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cost_models, "build_model", flaky)
    assert cost_models._count("yang2022", 8, 2, 6, 1, 1) == parameter_count(
        real("yang2022", d_in=8, n_outputs=2, d=6, depth=1, heads=1))

    def refuse_untied(name: str, **kw: object) -> torch.nn.Module:
        if name == "untied":
            raise ConstraintError("could not factor `M`")
        return real(name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cost_study, "build_model", refuse_untied)
    cfg = StudyConfig(**{**TINY, "models": (STANDARD, "untied"), "lrs": (1e-3,)})
    plans = {"digits": [{"size": 4, "target": 1, "models": {
        STANDARD: {"d": 4, "heads": 2, "parameters": 1, "relative_gap": 0.0},
        "untied": {"d": 4, "heads": 1, "parameters": 1, "relative_gap": 0.0}}}]}
    monkeypatch.setattr(cost_study, "plan_sizes", lambda cfg, task: plans["digits"])
    report = run_study(cfg, log=lambda s: None)
    failed = [r for r in report["runs"] if r["model"] == "untied"]
    assert len(failed) == 2 and all(r["diverged"] and "build refused" in r["error"] for r in failed)
    assert report["results"]["digits"]["4"]["untied"]["test_accuracy"]["mean"] is None
    assert report["results"]["digits"]["4"][STANDARD]["test_accuracy"]["mean"] is not None


def test_config_validation_names_the_setting() -> None:
    for bad, match in ((dict(tasks=("mnist",)), "tasks"), (dict(models=("gpt",)), "valid models"),
                       (dict(sizes=(5,)), "divisible"), (dict(lrs=(0.0,)), "lrs"), (dict(steps=0), "steps"),
                       (dict(seeds=(0, 0)), "repeat")):
        with pytest.raises(Exception, match=match):
            StudyConfig(**{**TINY, **bad}).validate()


# ------------------------------------------------------------------------------------------------------- the CLI


def test_cli_writes_report_and_cache_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "cc.json"
    argv = ["--tasks", "digits", "--models", "standard,yang2022", "--d", "4", "--depth", "1", "--steps", "1",
            "--seeds", "2", "--lr", "3e-3", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["steps"] == 1 and report["trained_now"] == 4
    assert (tmp_path / "r" / "cc.runs.json").exists()
    assert main(argv) == 0
    assert json.loads(out.read_text())["trained_now"] == 0
    assert "0 runs trained now" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [(["--models", "gpt"], "--models"), (["--d", "5"], "--d"),
                                        (["--lr", "0"], "--lr"), (["--lr", "x"], "--lr"),
                                        (["--sweep-seeds", "0"], "--sweep-seeds")])
def test_cli_usage_errors(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1
