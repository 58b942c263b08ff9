"""``margin-regs reproduce``: the verdict rule on synthetic results, the estimator and
the runner against independent computations, and every experiment in --quick mode."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import margin_regs as mr
from margin_regs.experiments import data, training
from margin_regs.experiments.recipes import RECIPES, StepContext
from margin_regs.experiments.reproduce import (
    BUDGETS,
    PROTOCOLS,
    execute,
    main,
    protocols,
)
from margin_regs.experiments.reproduce.runner import (
    CONV_MODELS,
    Cell,
    downsample,
    train_cell,
)
from margin_regs.experiments.reproduce.verdicts import (
    INCONCLUSIVE,
    NEGLIGIBLE,
    NOT_REPRODUCED,
    NOT_TESTABLE,
    REPRODUCED,
    Claim,
    judge,
    mean_interval,
    verdict,
)
from margin_regs.experiments.stats import Interval

CELLS = ("n=256", "n=1024")


def _results(better: list[list[float]], worse: list[list[float]]) -> dict:
    return {
        cell: {"a": {"test_acc": b}, "b": {"test_acc": w}}
        for cell, b, w in zip(CELLS, better, worse, strict=True)
    }


def _scipy_interval(d: np.ndarray) -> tuple[float, float]:
    half = scipy.stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return d.mean() - half, d.mean() + half


CLAIM = Claim("A > B", "Table X", "a", "b", CELLS)


def test_known_ordering_is_reproduced():
    base = np.array([0.90, 0.92, 0.91])
    up = np.array([0.02, 0.025, 0.015])
    results = _results([base + up, base + up + 0.011], [base, base + 0.001])
    j = judge(CLAIM, results)
    assert j.verdict == REPRODUCED
    assert all(v == REPRODUCED for v, _ in j.cells.values())
    assert j.difference.mean == pytest.approx(0.025)
    assert (j.difference.low, j.difference.high) == pytest.approx(
        _scipy_interval(up + 0.005), rel=1e-4
    )


def test_reversed_ordering_is_not_reproduced():
    base = np.array([0.90, 0.92, 0.91])
    results = _results(
        [base, base], [base + np.array([0.02, 0.03, 0.025]), base + 0.02]
    )
    j = judge(CLAIM, results)
    assert j.verdict == NOT_REPRODUCED
    d = np.mean([[-0.02, -0.03, -0.025], [-0.02, -0.02, -0.02]], axis=0)
    low, high = _scipy_interval(d)
    assert (j.difference.low, j.difference.high) == pytest.approx((low, high), rel=1e-4)


def test_overlapping_intervals_are_inconclusive():
    results = _results(
        [[0.91, 0.90, 0.93], [0.95, 0.94, 0.96]],
        [[0.90, 0.92, 0.91], [0.96, 0.93, 0.95]],
    )
    j = judge(CLAIM, results)
    low, high = _scipy_interval(np.array([0.0, -0.005, 0.015]))
    assert (j.difference.low, j.difference.high) == pytest.approx((low, high), rel=1e-4)
    assert low < 0 < high and j.verdict == INCONCLUSIVE


def test_smaller_is_better_metric_flips_the_sign():
    claim = Claim("gap: A < B", "Table 1", "a", "b", CELLS[:1], "gap", False)
    results = {
        CELLS[0]: {"a": {"gap": [0.05, 0.06, 0.04]}, "b": {"gap": [0.08, 0.09, 0.08]}}
    }
    assert judge(claim, results).verdict == REPRODUCED
    results[CELLS[0]]["a"]["gap"] = [0.10, 0.12, 0.11]
    assert judge(claim, results).verdict == NOT_REPRODUCED


def test_an_undefined_measurement_gives_no_verdict():
    # A diverged run's spectrum is recorded as NaN: its cell, and the pooled claim,
    # stay inconclusive however clear the other cells are.
    base = np.array([0.90, 0.92, 0.91])
    results = _results(
        [base + np.array([0.05, 0.04, 0.06]), [np.nan, 0.5, 0.5]], [base, base]
    )
    j = judge(CLAIM, results)
    assert j.cells["n=256"][0] == REPRODUCED
    assert j.cells["n=1024"][0] == INCONCLUSIVE and j.verdict == INCONCLUSIVE


def test_at_least_claim_uses_the_tolerance():
    tie = Interval(-0.001, -0.004, 0.002, 3)
    worse = Interval(-0.02, -0.03, -0.01, 3)
    slightly_worse = Interval(-0.002, -0.003, -0.001, 3)
    assert verdict(tie, "at_least", 0.005) == REPRODUCED
    assert verdict(slightly_worse, "at_least", 0.005) == REPRODUCED
    assert verdict(worse, "at_least", 0.005) == NOT_REPRODUCED
    assert verdict(tie, "greater") == INCONCLUSIVE
    assert verdict(Interval(0.01, None, None, 1)) == INCONCLUSIVE
    with pytest.raises(ValueError, match="kind"):
        verdict(tie, "less")
    with pytest.raises(ValueError, match="tolerance"):
        verdict(tie, "at_least", -1.0)


def test_judge_names_missing_results():
    with pytest.raises(KeyError, match="n=1024"):
        judge(CLAIM, {"n=256": {"a": {"test_acc": [1.0]}, "b": {"test_acc": [0.0]}}})


def test_a_small_consistent_effect_is_negligible():
    # +0.1 points on every seed (interval above 0, but below the 0.2-point minimum).
    d = np.array([0.0010, 0.0012, 0.0008, 0.0011, 0.0009])
    base = np.array([0.90, 0.91, 0.92, 0.93, 0.94])
    results = {c: {"a": {"test_acc": base + d}, "b": {"test_acc": base}} for c in CELLS}
    j = judge(CLAIM, results)
    low, _ = _scipy_interval(d)
    assert low > 0 and j.verdict == NEGLIGIBLE
    # An interval inside ±0.2 points that contains 0 is negligible, not inconclusive.
    assert verdict(Interval(0.0, -0.001, 0.001, 5)) == NEGLIGIBLE
    assert verdict(Interval(0.0, -0.001, 0.003, 5)) == INCONCLUSIVE
    # The minimum effect is the claim's: 0.05 units of σ here.
    assert verdict(Interval(0.1, 0.06, 0.14, 5), min_effect=0.05) == REPRODUCED
    assert verdict(Interval(0.03, 0.02, 0.04, 5), min_effect=0.05) == NEGLIGIBLE


def test_a_zero_spread_difference_is_flagged_not_decided():
    base = np.array([0.90, 0.91, 0.92])
    results = {CELLS[0]: {"a": {"test_acc": base + 0.02}, "b": {"test_acc": base}}}
    j = judge(Claim("A > B", "T", "a", "b", CELLS[:1]), results)
    assert j.verdict == INCONCLUSIVE
    assert any("zero spread" in f for f in j.flags)


def test_untestable_cells_are_left_out_of_the_pooled_verdict():
    base = np.array([0.90, 0.92, 0.91])
    up = base + np.array([0.02, 0.03, 0.025])
    results = _results([up, base - 0.05], [base, base])
    j = judge(CLAIM, results, {"n=1024": "baseline at 90% training accuracy"})
    assert j.cells["n=1024"][0] == NOT_TESTABLE
    assert j.verdict == REPRODUCED
    assert j.difference.mean == pytest.approx(0.025)
    assert any("90% training accuracy" in f for f in j.flags)
    everything = judge(CLAIM, results, {c: "why" for c in CELLS})
    assert everything.verdict == NOT_TESTABLE


def _yoshida_results(small: float, large: float) -> dict:
    """Synthetic Yoshida results: vanilla's test accuracy per regime (5 seeds)."""
    seeds = np.linspace(-0.004, 0.004, 5)
    out = {}
    for cell, acc in (("small batch", small), ("large batch", large)):
        out[cell] = {
            m: {"test_acc": (acc + seeds + (0.01 if m == "spectral" else 0)).tolist(),
                "train_acc": [0.99] * 5, "train_loss": [0.05] * 5,
                "train_acc_curve": [[0.9, 0.99]] * 5,
                "test_acc_curve": [[acc - 0.05, acc]] * 5}
            for m in ("vanilla", "decay", "adversarial", "spectral")
        }  # fmt: skip
    return out


@pytest.mark.parametrize("drop, testable", [(0.005, False), (0.02, True)])
def test_yoshida_claims_need_the_large_batch_gap(drop, testable):
    protocol = PROTOCOLS["yoshida-gap"]("quick")
    results = protocol.derive(_yoshida_results(0.95, 0.95 - drop))
    convergence = execute._convergence(protocol, results)
    (pre,) = execute._preconditions(protocol, results)
    assert pre["measured"] == pytest.approx(drop) and pre["met"] == testable
    for claim in protocol.claims:
        why = execute.untestable_cells(claim.cells, convergence, [pre])
        j = judge(claim, results, why)
        if testable:
            assert j.verdict != NOT_TESTABLE
        else:
            assert j.verdict == NOT_TESTABLE
            assert f"{100 * drop:+.2f} points" in why[claim.cells[0]]


def test_an_unconverged_baseline_makes_its_setting_untestable():
    protocol = PROTOCOLS["sokolic-fig2"]("quick")
    (setting,) = protocol.settings
    acc = {"train_acc": [0.985, 0.975], "train_loss": [0.1, 0.2]}
    results = {setting.name: {"none": acc}}
    convergence = execute._convergence(protocol, results)
    c = convergence[setting.name]
    assert c["train_acc"] == pytest.approx(0.98) and not c["in_regime"]
    assert c["train_loss"] == pytest.approx(0.15)
    why = execute.untestable_cells((setting.name,), convergence, [])
    assert "98.00% training accuracy < 99%" in why[setting.name]


def _steps(setting, cell) -> int:
    return (setting.train_size // min(cell.config.batch_size, setting.train_size)
            ) * cell.config.epochs  # fmt: skip


def test_budget_tiers():
    for name, build in PROTOCOLS.items():
        quick, cpu, paper = (build(b) for b in BUDGETS)
        assert all(_steps(s, c) <= 16 for s in quick.settings for c in s.cells)
        assert all(s.train_size <= 256 for s in quick.settings)
        conv = any(c.config.model in CONV_MODELS for s in cpu.settings
                   for c in s.cells)  # fmt: skip
        assert cpu.seeds >= (3 if conv else 5), name
        assert paper.seeds >= cpu.seeds
        for s in cpu.settings:
            for c in s.cells:
                assert sum(e for e, _ in c.phases) == c.config.epochs
    fig2 = PROTOCOLS["sokolic-fig2"]("cpu")
    assert [s.name for s in fig2.settings] == ["L=1", "L=2", "L=3"]
    assert all(s.train_size >= 1000 for s in fig2.settings)
    for cell in fig2.settings[0].cells:
        assert cell.phases == ((30, 0.01), (30, 1e-3), (30, 1e-4), (20, 1e-5))
    grids = {c.method: c.coeffs for c in fig2.settings[0].cells}
    assert grids["wd"] == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    assert grids["lm"] == (0.01, 0.1, 1.0, 2.0)
    table1 = PROTOCOLS["sokolic-table1"]("cpu")
    assert {s.name for s in table1.settings} == {
        f"{d}L n={n}" for d in (2, 3) for n in (256, 512, 1024)
    }
    for s in table1.settings:
        assert {c.method for c in s.cells} == {
            f"{loss}/{r}" for loss in ("hinge", "cce") for r in ("none", "wd", "lm")
        }
        assert all(c.config.epochs == 100 and c.config.batch_size == 32
                   for c in s.cells)  # fmt: skip
    zhao = PROTOCOLS["zhao-fig2"]("cpu")
    steps = [_steps(s, c) for s in zhao.settings for c in s.cells]
    assert min(steps) >= 1000  # n = 60 trains as many steps as n = 3600 (72 epochs)
    ludwig = PROTOCOLS["ludwig-table2"]("cpu")
    assert all(c.config.epochs >= 20 for c in ludwig.settings[0].cells)
    yoshida = PROTOCOLS["yoshida-gap"]("cpu")
    small, large = yoshida.settings
    assert large.cells[0].config.batch_size == large.train_size == 3600
    assert small.cells[0].config.batch_size == 64
    assert PROTOCOLS["sokolic-fig2"]("paper").settings[0].train_size == 5000
    paper_table1 = PROTOCOLS["sokolic-table1"]("paper").settings[0].cells
    assert {c.method: c.coeffs for c in paper_table1}["cce/lm"] == (
        1e-3, 1e-2, 1e-1, 1.0, 10.0)  # fmt: skip


def test_estimates_fit_the_budgets():
    cpu = sum(execute.estimate_seconds(build("cpu")) for build in PROTOCOLS.values())
    quick = sum(
        execute.estimate_seconds(build("quick")) for build in PROTOCOLS.values()
    )
    assert 20 * 60 < cpu <= 60 * 60 and quick < 5 * 60


def test_paper_budget_runs_at_tiny_sizes(tmp_path):
    # The paper budget's protocol (its grids and seeds), shrunk to 64 digits and 1
    # epoch: the same code path a GPU run takes.
    protocol = protocols.shrink(PROTOCOLS["ludwig-table2"]("paper"), 64, 1, 2)
    result = execute.run_protocol(protocol, log=False)
    (cell,) = result["results"].values()
    assert cell["ed"]["grid"] == list(PROTOCOLS["ludwig-table2"]("paper")
                                      .settings[0].cells[1].coeffs)  # fmt: skip
    assert result["budget"] == "paper" and len(cell["ed"]["test_acc"]) == 2
    with pytest.raises(ValueError, match="--mnist"):
        execute.run_protocol(PROTOCOLS["sokolic-fig2"]("paper"), log=False)


def test_phases_set_the_rate_of_every_step():
    from margin_regs.experiments.reproduce import runner

    phases = ((3, 0.01), (2, 1e-3), (1, 1e-5))
    config = training.TrainConfig(model="mlp1", epochs=6, batch_size=16,
                                  learning_rate=0.01)  # fmt: skip
    trainer = runner._PhasedTrainer(RECIPES["vanilla"], None, config, 10, 64, phases)
    expected = [0.01] * 12 + [1e-3] * 8 + [1e-5] * 4  # 4 steps an epoch
    got = [float(trainer.schedule(i)) for i in range(24)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="sum"):
        Cell("x", RECIPES["vanilla"], (0.0,), config, ((2, 0.1),))


def test_mean_interval_matches_scipy():
    values = np.array([0.91, 0.93, 0.96, 0.90])
    mean, half = mean_interval(values)
    _, high = _scipy_interval(values)
    assert mean == pytest.approx(values.mean()) and half == pytest.approx(
        high - mean, rel=1e-4
    )
    assert mean_interval([0.5]) == (0.5, None)


def test_all_class_estimator_is_unbiased():
    # E over one uniform class per sample of C · penalty = the sum over all classes.
    w = jax.random.normal(jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    params = {"classifier": {"kernel": w}}

    def apply(p, b):
        return jnp.tanh(b) @ p["classifier"]["kernel"]

    def estimate(key):
        ctx = StepContext(params, x, jnp.zeros(5, jnp.int32), key, apply, 4, None)
        return protocols._lm_all_classes(ctx, 1.0)

    draws = jax.vmap(estimate)(jax.random.split(jax.random.key(2), 4000))
    exact = mr.jacobian_margin_penalty(
        lambda b: apply(params, b), x, classes="all", classifier=w
    )
    stderr = float(jnp.std(draws)) / np.sqrt(draws.size)
    assert abs(float(jnp.mean(draws)) - float(exact)) < 4 * stderr


def test_downsample_is_a_mean_over_blocks():
    x = np.random.default_rng(0).random((2, 4, 6, 1)).astype(np.float32)
    ds = data.Dataset("t", x, np.zeros(2, np.int32), x, np.zeros(2, np.int32), 1)
    pooled = downsample(ds, 2).x_train
    expected = np.array(
        [[[x[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 0].mean() for j in range(3)]
          for i in range(2)] for n in range(2)]
    )  # fmt: skip
    np.testing.assert_allclose(pooled[..., 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="divide"):
        downsample(data.Dataset("t", x[:, :3], x[:1, 0, 0, 0].astype(np.int32),
                                x[:, :3], x[:1, 0, 0, 0].astype(np.int32), 1), 2)  # fmt: skip


def test_vmapped_cell_equals_runs_one_by_one():
    full = data.load_digits()
    splits = [data.prepare(full, train_size=64, seed=s) for s in (0, 1)]
    config = training.TrainConfig(epochs=2, batch_size=16)
    cell = Cell("spectral", RECIPES["spectral"], (0.01, 0.1), config)
    result = train_cell(cell, splits)
    for c, coeff in enumerate((0.01, 0.1)):
        for s, ds in enumerate(splits):
            run = training.run("spectral", ds, seed=s, config=config, coeff=coeff)
            assert result.acc["test_acc"][c, s] == pytest.approx(
                run.final["test_acc"], abs=1.5 / len(ds.x_test)
            )
            sigma = run.final["sigma_max"]["classifier/kernel"]
            assert result.classifier["sigma_max"][c, s] == pytest.approx(
                sigma, rel=1e-4
            )
    assert result.selected == int(np.argmax(result.acc["val_acc"].mean(axis=1)))


def test_stepwise_conv_cell_equals_the_scanned_epochs():
    full = data.load_digits()
    splits = [data.prepare(full, train_size=32, seed=s) for s in (0, 1)]
    config = training.TrainConfig(model="cnn", epochs=2, batch_size=16)
    cell = Cell("wd", RECIPES["weight_decay"], (0.0, 1e-3), config)
    result = train_cell(cell, splits)
    for c, coeff in enumerate((0.0, 1e-3)):
        for s, ds in enumerate(splits):
            run = training.run("weight_decay", ds, seed=s, config=config, coeff=coeff)
            sigma = run.final["sigma_max"]["classifier/kernel"]
            assert result.classifier["sigma_max"][c, s] == pytest.approx(
                sigma, rel=1e-4
            )
            assert result.acc["val_acc"][c, s] == pytest.approx(
                run.final["val_acc"], abs=1.5 / len(ds.x_val)
            )


def _independent_verdict(j: dict, results: dict, untestable: set[str]) -> str:
    """The verdict rule written out again from the JSON's raw per-seed numbers."""
    sign = 1.0 if j["metric"] not in ("gap", "acc_drop", "stable_rank",
                                      "sigma_max") else -1.0  # fmt: skip
    cells = [c for c in j["cells"] if c not in untestable]
    if not cells:
        return NOT_TESTABLE
    d = np.mean(
        [sign * (np.array(results[c][j["better"]][j["metric"]], float)
                 - np.array(results[c][j["worse"]][j["metric"]], float))
         for c in cells], axis=0)  # fmt: skip
    if d.size < 2 or not np.all(np.isfinite(d)) or np.ptp(d) == 0:
        return INCONCLUSIVE
    lo, hi = _scipy_interval(d)
    eps = j["min_effect"]
    if j["kind"] == "at_least":
        return REPRODUCED if lo > -j["tolerance"] else (
            NOT_REPRODUCED if hi < 0 else INCONCLUSIVE)  # fmt: skip
    if (-eps < lo and hi < eps) or ((lo > 0 or hi < 0) and abs(d.mean()) < eps):
        return NEGLIGIBLE
    return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else INCONCLUSIVE


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_quick_experiment(name, tmp_path, capsys):
    assert main([name, "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    protocol = PROTOCOLS[name]("quick")
    assert "estimated" in printed and "scaled from the paper" in printed
    assert "verdicts mean nothing" in printed and result["budget"] == "quick"
    for (cell, _, metric), value in protocol.paper.items():
        if metric == "test_acc" and cell in result["results"]:
            assert f"{100 * value:.2f}" in printed
    # Convergence, recomputed from the per-seed training accuracies.
    untestable = set()
    for setting in protocol.settings:
        train = result["results"][setting.name][setting.baseline]["train_acc"]
        assert len(train) == protocol.seeds
        assert all(np.isfinite(result["results"][setting.name][setting.baseline]
                               ["train_loss"]))  # fmt: skip
        in_regime = np.mean(train) >= protocol.min_train_acc
        assert result["convergence"][setting.name]["in_regime"] == in_regime
        if not in_regime:
            untestable.add(setting.name)
    for p in result["preconditions"]:
        untestable |= set() if p["met"] else set(result["results"])
    if untestable:  # a derived cell is untestable with any of its settings
        untestable |= {c for c in result["results"] if c not in
                       {s.name for s in protocol.settings}}  # fmt: skip
    for j in result["judgements"]:
        expected = _independent_verdict(j, result["results"], untestable)
        assert j["verdict"] == expected, j["text"]
        assert j["verdict"].upper() in printed
    for methods in result["results"].values():
        for m in methods.values():
            for acc in m.get("test_acc", []) + m.get("train_acc", []):
                assert 0.0 <= acc <= 1.0


def test_cli_dispatches_reproduce_and_rejects_unknown_names(capsys):
    from margin_regs.experiments import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "sokolic-table2"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sokolic-table2'" in capsys.readouterr().err
