"""``margin-regs``: end to end on a tiny setting, and its errors."""

import contextlib
import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import margin_regs
from margin_regs.experiments import cli, data, recipes, training
from margin_regs.experiments.grid import train_grid

TINY = ["--train-size", "64", "--epochs", "2", "--batch-size", "16", "--no-progress"]


def _compare(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(argv)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    argv = ["compare", *TINY, "--seeds", "2", "--regularizers", "vanilla,spectral"]
    argv += ["--coeff", "spectral=0.01,0.5", "--out", str(out)]
    code, stdout = _compare(argv)
    return code, stdout, out


def _table(stdout):
    return {line.split()[0]: line for line in stdout.splitlines() if line.split()}


def test_compare_prints_one_table(two_seeds):
    code, stdout, out = two_seeds
    assert code == 0
    rows = _table(stdout)
    assert "test acc %" in rows["regularizer"] and "Δ vs vanilla" in rows["regularizer"]
    with open(out / "results.json") as f:
        per_run = json.load(f)["regularizers"]["vanilla"]["seconds_per_run_epoch"]
    assert rows["vanilla"].split()[-1] == f"{1000 * per_run:.2f}"
    with open(out / "results.json") as f:
        selected = json.load(f)["regularizers"]["spectral"]["selected_coeff"]
    assert rows["spectral"].split()[1] == f"{selected:g}"


def test_results_json_has_every_field_and_consistent_summary(two_seeds):
    _, _, out = two_seeds
    with open(out / "results.json") as f:
        results = json.load(f)
    assert {"config", "machine", "regularizers", "summary", "runs"} <= set(results)
    assert results["partial"] is False
    assert results["config"]["seeds"] == 2 and results["config"]["epochs"] == 2
    assert results["machine"]["margin_regs_version"] == margin_regs.__version__
    assert "git_commit" in results["machine"]
    spectral = results["regularizers"]["spectral"]
    assert spectral["grid"] == [0.01, 0.5]
    assert spectral["reference"].startswith("Yoshida")
    val = np.array(spectral["val_acc"])
    assert val.shape == (2, 2) and np.array(spectral["test_acc"]).shape == (2, 2)
    # Selected on the mean validation accuracy over seeds.
    assert spectral["selected_coeff"] == spectral["grid"][int(np.argmax(val.mean(1)))]
    runs = results["runs"]
    assert [(r["regularizer"], r["seed"]) for r in runs] == [
        ("vanilla", 0),
        ("vanilla", 1),
        ("spectral", 0),
        ("spectral", 1),
    ]
    for run in runs:
        for key in ("train_loss", "train_acc", "val_acc", "test_loss", "test_acc"):
            assert len(run["history"][key]) == 2, key
        assert set(run["singular_values"]) == set(run["final"]["sigma_max"])
        assert run["early_stopping"]["enabled"] is False
        assert len(run["input_margins"]) == results["config"]["test_size"]
    summary = results["summary"]
    accs = {
        n: [r["final"]["test_acc"] for r in runs if r["regularizer"] == n]
        for n in ("vanilla", "spectral")
    }
    for name in ("vanilla", "spectral"):
        assert summary[name]["test_acc_mean"] == pytest.approx(np.mean(accs[name]))
        assert summary[name]["test_acc_std"] == pytest.approx(np.std(accs[name]))
    diff = np.subtract(accs["spectral"], accs["vanilla"])
    half = 12.7062 * np.std(diff, ddof=1) / np.sqrt(2)  # t_{0.975, 1}
    d = summary["spectral"]["diff"]
    assert d["mean"] == pytest.approx(diff.mean())
    assert (d["low"], d["high"]) == pytest.approx(
        (diff.mean() - half, diff.mean() + half)
    )
    assert summary["vanilla"]["relative_time"] == 1.0


def _per_seed(runs, name, *path):
    """``run[path[0]][path[1]]...`` of each seed of regularizer ``name``."""
    out = []
    for run in (r for r in runs if r["regularizer"] == name):
        for key in path:
            run = run[key]
        out.append(run)
    return np.array(out, float)


def test_compare_plots_the_results_numbers(two_seeds, tmp_path, monkeypatch):
    import matplotlib.image
    import matplotlib.pyplot as plt

    from margin_regs.experiments import plots

    _, _, out = two_seeds
    # 100 dpi: accuracy curves 12×4.2 in (vanilla, then the differences), margins
    # 12×4.
    sizes = {"accuracy_curves": (420, 1200), "margins": (400, 1200)}
    for name in ("singular_spectra", "margins", "accuracy_curves", "coefficients"):
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.ndim == 3 and image.std() > 0, name  # something was drawn
        assert image.shape[:2] == sizes.get(name, image.shape[:2]), name
    # Redraw from the JSON, keeping the figures, and read back what was plotted.
    with open(out / "results.json") as f:
        payload = json.load(f)
    figures = {}
    monkeypatch.setattr(
        plots, "_save", lambda fig, _, name: figures.setdefault(name, fig)
    )
    plots.plots(payload, str(tmp_path))
    runs, names = payload["runs"], ("vanilla", "spectral")
    # Vanilla's test and train curves, then spectral's paired difference to it.
    left, right = figures["accuracy_curves.png"].axes[:2]
    for line, key in zip(left.lines, ("test_acc", "train_acc"), strict=True):
        want = 100 * _per_seed(runs, "vanilla", "history", key).mean(0)
        np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)
    diff = _per_seed(runs, "spectral", "history", "test_acc") - _per_seed(
        runs, "vanilla", "history", "test_acc"
    )
    np.testing.assert_allclose(right.lines[0].get_ydata(), 100 * diff.mean(0))
    for ax in figures["singular_spectra.png"].axes:
        for line, name in zip(ax.lines, names, strict=True):
            want = _per_seed(runs, name, "singular_values", ax.get_title()).mean(0)
            np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)
    # The output margins' empirical CDFs (then the line at 0).
    margins = figures["margins.png"].axes[1].lines
    for line, name in zip(margins, names, strict=False):
        pooled = _per_seed(runs, name, "output_margins").ravel()
        pooled = np.sort(pooled[np.isfinite(pooled)])  # None (no margin) is NaN
        np.testing.assert_array_equal(line.get_xdata(), pooled)
        np.testing.assert_allclose(
            line.get_ydata(), np.arange(1, pooled.size + 1) / pooled.size
        )
    spectral = payload["regularizers"]["spectral"]
    line = figures["coefficients.png"].axes[0].lines[0]  # the errorbar's data line
    np.testing.assert_allclose(line.get_xdata(), spectral["grid"])
    np.testing.assert_allclose(line.get_ydata(), 100 * np.mean(spectral["val_acc"], 1))
    for fig in figures.values():
        plt.close(fig)


def test_report_reprints_the_table_from_the_json(two_seeds, tmp_path):
    _, stdout, out = two_seeds
    code, again = _compare(
        ["report", str(out / "results.json"), "--out", str(tmp_path)]
    )
    assert code == 0
    table = lambda text: text.split("\nwrote ")[0]  # noqa: E731
    assert table(again) == table(stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}.png"
        for n in ("singular_spectra", "margins", "accuracy_curves", "coefficients")
    )


def test_one_seed_prints_no_spread(tmp_path):
    argv = ["compare", *TINY, "--seeds", "1", "--regularizers", "vanilla,spectral"]
    code, stdout = _compare([*argv, "--coeff", "spectral=0.5", "--out", str(tmp_path)])
    assert code == 0
    rows = _table(stdout)
    assert "±" not in rows["vanilla"] and "±" not in rows["spectral"]
    assert "[" not in rows["spectral"]  # a difference, but no interval


def test_ctrl_c_writes_the_finished_regularizers_as_partial(
    tmp_path, monkeypatch, capsys
):
    from margin_regs.experiments import grid

    real = grid.train_grid

    def interrupted(name, *args, **kwargs):
        if name == "spectral":
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    monkeypatch.setattr(grid, "train_grid", interrupted)
    argv = ["compare", *TINY, "--seeds", "2", "--regularizers", "vanilla,spectral"]
    code = cli.main([*argv, "--out", str(tmp_path)])
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["partial"] is True
    assert list(results["regularizers"]) == ["vanilla"]
    assert {r["regularizer"] for r in results["runs"]} == {"vanilla"}


def test_a_non_empty_out_needs_overwrite(two_seeds, capsys):
    _, _, out = two_seeds
    before = (out / "results.json").stat().st_mtime_ns
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", *TINY, "--out", str(out)])
    assert info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").stat().st_mtime_ns == before


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.full((20, 3), np.nan), "y": np.arange(20) % 2}, "NaN or infinite"),
        ({"x": np.zeros((20, 3)), "y": np.zeros(20, int)}, "at least two"),
        ({"x": np.zeros((20, 3)), "y": np.arange(20) % 2 - 1}, "non-negative integer"),
        ({"x": np.zeros((20, 3)), "y": (np.arange(20) % 2) + 0.5}, "integer"),
    ],
    ids=["nan", "one-class", "negative-label", "fractional-label"],
)
def test_bad_data_is_refused_before_training(arrays, message, tmp_path, capsys):
    path = _npz(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", *TINY, "--dataset", path, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "bad.npz" in err[0]
    assert not out.exists()


def test_a_file_that_is_not_a_zip_is_refused(tmp_path, capsys):
    path = tmp_path / "fake.npz"
    np.save(tmp_path / "plain.npy", np.zeros(3))
    path.write_bytes((tmp_path / "plain.npy").read_bytes())
    with pytest.raises(SystemExit) as info:
        cli.main(
            ["compare", *TINY, "--dataset", str(path), "--out", str(tmp_path / "o")]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an .npz" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--regularizers", "vanilla,nope"], "unknown 'nope'"),
        (["compare", "--regularizers", "vanilla,vanilla"], "repeated"),
        (["compare", "--epochs", "0"], "expected a positive integer, got 0"),
        (["compare", "--lr", "-1"], "expected a positive number"),
        (["compare", "--model", "vgg"], "invalid choice: 'vgg'"),
        (["compare", "--coeff", "spectral"], "expected NAME=VALUE"),
        (
            ["compare", "--coeff", "spectral=0.1", "--coeff", "spectral=0.2"],
            "given twice",
        ),
        (["compare", "--coeff", "spectral=0.1,x"], "expected NAME=VALUE"),
        (
            ["compare", "--coeff", "jacobian=1", "--regularizers", "vanilla"],
            "not among",
        ),
        (["compare", "--coeff", "vanilla=1"], "has no hyperparameter"),
        (["compare", "--coeff", "spectral=-1"], "must be a finite number ≥ 0"),
        (["compare", "--coeff", "dropout=1", "--regularizers", "dropout"], "in [0, 1)"),
        (
            [
                "compare",
                "--coeff",
                "early_stopping=2.5",
                "--regularizers",
                "early_stopping",
            ],
            "patience must be a whole number",
        ),
        (
            ["compare", "--coeff", "bagging=inf", "--regularizers", "bagging"],
            "must be a finite number ≥ 0",
        ),
        (["compare", "--dataset", "/no/such/place"], "no such file or folder"),
        (["compare", "--train-size", "100000"], "--train-size: train_size=100000"),
        (["report", "/no/such/results.json"], "not a margin-regs results.json"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_report_refuses_a_json_that_is_not_a_comparison(tmp_path, capsys):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"summary": {}}))
    with pytest.raises(SystemExit) as info:
        cli.main(["report", str(path)])
    assert info.value.code == 2
    assert "not a margin-regs results.json ('config')" in capsys.readouterr().err


def test_help_documents_every_option_and_regularizer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--model", "--train-size", "--epochs", "--batch-size"):
        assert option in text
    for option in ("--seeds", "--regularizers", "--coeff", "--patience", "--out"):
        assert option in text
    assert "--overwrite" in text and "mnist5k" in text and "uint8" in text
    for name, recipe in recipes.RECIPES.items():
        assert f"  {name}" in text
        assert recipe.reference.split()[0] in text
        if recipe.coeff is not None:  # the default grid, around the paper's value
            assert ",".join(f"{c:g}" for c in recipe.grid) in text
            assert 3 <= len(recipe.grid) <= 5


def test_bench_is_handed_to_the_harness(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--help"])
    assert info.value.code == 0
    assert "--quick" in capsys.readouterr().out


# A child interpreter in which the experiments extra's modules cannot be imported.
WITHOUT_EXTRAS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import margin_regs
from margin_regs.experiments import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _without_extras(*argv):
    blocked = (*cli.EXTRA_MODULES, "pandas")
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS.format(blocked=blocked), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_core_install_names_the_extra_and_prints_the_version():
    result = _without_extras("compare", "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "margin-regs compare needs the experiments extra (missing: "
        + ", ".join(cli.EXTRA_MODULES)
        + "): pip install 'margin_regs[experiments]'"
    ]
    assert "Traceback" not in result.stderr
    version = _without_extras("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"margin-regs {margin_regs.__version__}"


def test_the_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "margin_regs.experiments.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"margin-regs {margin_regs.__version__}"


CONV_TINY = ["--model", "cnn", "--seeds", "1", "--regularizers", "vanilla,spectral"]


@pytest.fixture(scope="module")
def conv_operator(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    argv = ["compare", *TINY, *CONV_TINY, "--coeff", "spectral=0.01"]
    code, stdout = _compare([*argv, "--conv-operator", "--out", str(out)])
    with open(out / "results.json") as f:
        return code, stdout, json.load(f)


def test_conv_operator_flag_reports_operator_norms(conv_operator):
    code, stdout, results = conv_operator
    assert code == 0
    assert results["config"]["conv"] == "operator"
    assert {s["sigma_definition"] for s in results["summary"].values()} == {"operator"}
    assert "σ_max (conv op)" in _table(stdout)["regularizer"]
    assert "σ: conv operator norm" in stdout


def _dense_operator(kernel, input_shape):
    """The SAME, stride-1 convolution's matrix: the conv of every basis input."""
    n = int(np.prod(input_shape))
    basis = np.eye(n, dtype=np.float32).reshape(n, *input_shape)
    out = jax.lax.conv_general_dilated(
        basis, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return np.asarray(out, np.float64).reshape(n, -1)


def test_conv_operator_sigma_is_the_dense_operators(conv_operator):
    # The comparison's own settings: train_grid reuses its compiled programs.
    config = training.TrainConfig(model="cnn", epochs=2, batch_size=16, conv="operator")
    splits = [data.prepare(data.load("digits"), train_size=64, seed=0)]
    grid = train_grid("spectral", recipes.RECIPES["spectral"], [0.01], splits, config)
    run = grid.run_results(0, splits, config)[0]
    assert run.final["sigma_definition"] == "operator"
    for name, input_shape in (("conv_0", (8, 8, 1)), ("conv_1", (4, 4, 32))):
        kernel = np.asarray(run.params[name]["kernel"])
        dense = np.linalg.svd(_dense_operator(kernel, input_shape), compute_uv=False)
        reshaped = np.linalg.svd(
            kernel.astype(np.float64).reshape(-1, kernel.shape[-1]), compute_uv=False
        )
        reported = run.final["sigma_max"][f"{name}/kernel"]
        np.testing.assert_allclose(reported, dense[0], rtol=1e-4)
        assert abs(reported - reshaped[0]) > 0.05 * reshaped[0]
        np.testing.assert_allclose(
            run.singular_values[f"{name}/kernel"][:5], dense[:5], rtol=1e-3
        )


def test_conv_operator_needs_a_model_with_convolutions(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--model", "mlp", "--conv-operator"])
    assert info.value.code == 2
    assert "--conv-operator: model 'mlp' has no convolutions" in capsys.readouterr().err
