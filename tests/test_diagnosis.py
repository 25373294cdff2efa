"""lm.diagnose on real short trainings with engineered pathologies (tests/pathologies.py),
the healthy runs giving no warning or error; the rules on synthetic series (windows,
persistence, skips, thresholds); live findings said once and kept in the run; the
``lmd4ml diagnose`` command; bad input."""

import json
import warnings

import numpy as np
import optax
import pathologies
import pytest
from test_cli import ROOT, run_cli

import lmd4ml as lm
from lmd4ml.describing import json_safe
from lmd4ml.diagnosis import (
    SAID_BY_THE_LOOP,
    Finding,
    Optimizer,
    Recorded,
    Thresholds,
    format_finding,
    optimizer_facts,
    persistent,
    windows,
)
from lmd4ml.telemetry.store import RunStoreError

# What each pathology must give (code, severity); other codes may come with it (a diverging
# run's gradient spikes too).
EXPECTED = {
    "lr_too_large": {("lr_too_large", "error"), ("edge_of_stability", "warning")},
    "lr_too_small": {("lr_too_small", "warning")},
    "noise": {("noise_dominated", "warning")},
    "vanishing": {("vanishing_gradients", "warning")},
    "exploding": {("exploding_gradients", "warning")},
    "stalled": {("stalled", "error")},
    "nan_batch": {("nonfinite", "error")},
}
HEALTHY = ("healthy_sgd", "healthy_adam", "healthy_least_squares")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every case trained once into one runs directory, diagnosed live: (runs directory,
    histories by name, the live diagnosis's warnings by name)."""
    runs = tmp_path_factory.mktemp("runs")
    histories, said = {}, {}
    for name in pathologies.CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            histories[name] = pathologies.train(name, runs)
        said[name] = [str(w.message) for w in caught if "lmd4ml diagnosis" in str(w.message)]
    return runs, histories, said


def codes(findings) -> set[tuple[str, str]]:
    return {(f.code, f.severity) for f in findings}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pathology_gives_its_code(trained, name):
    _, histories, _ = trained
    findings = lm.diagnose(histories[name])
    assert EXPECTED[name] <= codes(findings), [format_finding(f) for f in findings]
    for f in findings:
        assert f.severity in ("info", "warning", "error")
        assert 0 <= f.first_step <= f.last_step < len(histories[name]["step"])
        assert f.message.endswith(".") and len(f.message) > 40


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_runs_give_no_warning_or_error(trained, name):
    _, histories, said = trained
    findings = lm.diagnose(histories[name])
    assert [format_finding(f) for f in findings if f.severity != "info"] == []
    assert said[name] == []
    # The rules applied: only the curvature rule is skipped where no curvature was tracked.
    assert set(findings.skipped) <= {"edge_of_stability"}


def test_evidence_and_steps_of_the_findings(trained):
    _, histories, _ = trained
    (nonfinite,) = [f for f in lm.diagnose(histories["nan_batch"]) if f.code == "nonfinite"]
    assert (nonfinite.first_step, nonfinite.last_step) == (25, 39)  # the NaN batch on
    assert nonfinite.evidence["first_nonfinite"] == 25
    small = next(f for f in lm.diagnose(histories["lr_too_small"]) if f.code == "lr_too_small")
    assert -1 < small.evidence["alpha_median"] <= -0.99
    assert small.evidence["loss_change"] < 0.05
    eos = next(f for f in lm.diagnose(histories["lr_too_large"]) if f.code == "edge_of_stability")
    # η = 3/λ_max of the full-batch Hessian: η·λ_max of the batches is about 3, limit 2.
    assert eos.evidence["limit"] == 2.0
    assert 2.5 < eos.evidence["sharpness_times_lr"] < 4
    noise = next(f for f in lm.diagnose(histories["noise"]) if f.code == "noise_dominated")
    assert 0.9 <= noise.evidence["norm_test_median"] < 1.5
    assert noise.evidence["suggested_batch_size"] > pathologies.BATCH
    vanishing = next(
        f for f in lm.diagnose(histories["vanishing"]) if f.code == "vanishing_gradients"
    )
    assert "0/0" in vanishing.evidence["layers"]  # the first layer's weights
    assert "8/0" not in vanishing.evidence["layers"]  # not the output layer's


def test_stalled_run_skips_the_step_length_rule(trained):
    """α = −1 exactly at every step (zero steps): lr_too_small is skipped, not reported."""
    _, histories, _ = trained
    findings = lm.diagnose(histories["stalled"])
    assert "lr_too_small" not in {f.code for f in findings}
    assert "exactly -1 at 100%" in findings.skipped["lr_too_small"]


def test_history_run_and_directory_agree(trained):
    runs, histories, _ = trained
    for name in ("nan_batch", "vanishing", "lr_too_large"):
        from_history = [f.as_dict() for f in lm.diagnose(histories[name])]
        run = lm.load_run(runs / name)
        assert [f.as_dict() for f in lm.diagnose(run)] == from_history
        assert [f.as_dict() for f in lm.diagnose(str(runs / name))] == from_history


def test_live_findings_said_once_and_stored(trained):
    runs, histories, said = trained
    for name, expected in EXPECTED.items():
        run = lm.load_run(runs / name)
        stored = run.metadata["findings"]
        assert stored == [f.as_dict() for f in lm.diagnose(run)]
        for code, severity in expected:
            lines = [m for m in said[name] if f"{severity:<8} {code} " in m]
            # NaN is said by the loop itself (warn_if_nonfinite), not again
            assert len(lines) == (code not in SAID_BY_THE_LOOP), (name, code, said[name])
    # What the rules read besides the instruments is recorded.
    meta = lm.load_run(runs / "lr_too_large").metadata
    assert meta["batch_size"] == pathologies.BATCH
    assert meta["optimizer_kind"] == "sgd"
    assert lm.load_run(runs / "healthy_adam").metadata["optimizer_kind"] == "adaptive"
    assert histories["healthy_adam"].metadata["batch_size"] == pathologies.BATCH


def test_diagnose_off_and_silenced(tmp_path):
    """diagnose=False records no findings; silence drops a code, live and after."""
    off = pathologies.train("stalled", tmp_path, diagnose=False)
    assert "findings" not in lm.load_run(tmp_path / "stalled").metadata
    assert lm.diagnose(off, silence=["stalled"]).skipped["stalled"] == "silenced"
    assert "stalled" not in {f.code for f in lm.diagnose(off, silence=["stalled"])}


def test_cli(trained):
    runs, _, _ = trained
    code, out, err = run_cli("diagnose", str(runs / "stalled"))
    assert code == 1
    assert out.startswith("error    stalled  steps ")
    assert "skipped lr_too_small" in err
    code, out, _ = run_cli("diagnose", str(runs / "healthy_sgd"))
    assert (code, out.strip()) == (0, f"{runs / 'healthy_sgd'}: no findings")
    code, out, _ = run_cli("diagnose", "--json", str(runs / "exploding"))
    report = json.loads(out)
    assert code == 0  # a warning is no error
    assert report["findings"] == lm.load_run(runs / "exploding").metadata["findings"]
    assert "edge_of_stability" in report["skipped"]
    code, _, err = run_cli("diagnose", str(runs / "no-such-run"))
    assert code == 2 and "is not a directory" in err
    (runs / "broken").mkdir()
    (runs / "broken" / "run.sqlite").write_bytes(b"not a database" * 20)
    code, _, err = run_cli("diagnose", str(runs / "broken"))
    assert code == 1 and "not an SQLite database" in err


def test_recorder_records_what_the_rules_need(tmp_path):
    tx = optax.sgd(0.0)
    monitored = lm.monitor(tx, [lm.Loss(), lm.UpdateSize(), lm.Distance()])
    x, y = pathologies.digits()
    params = pathologies.mlp([64, 10])
    state = monitored.init(params)
    loss_fn = pathologies.loss_for(lambda a: a)
    with (
        warnings.catch_warnings(record=True) as caught,
        lm.Recorder(tmp_path, "loop", batch_size=32, optimizer=tx) as recorder,
    ):
        warnings.simplefilter("always")
        for batch in pathologies.batches(x, y, 40):
            _, state = monitored.update(params, state, params, loss_fn=loss_fn, batch=batch)
            recorder.log(state)
    run = lm.load_run(tmp_path / "loop")
    assert (run.metadata["batch_size"], run.metadata["optimizer_kind"]) == (32, "sgd")
    assert [f["code"] for f in run.metadata["findings"]] == ["stalled"]
    assert sum("lmd4ml diagnosis: error    stalled" in str(w.message) for w in caught) == 1


# ------------------------------------------------------------------------------------------
# The rules on synthetic series.


def recorded(**series) -> Recorded:
    """Series by key, each tracked at steps 0, 1, ...; metadata from ``meta``."""
    meta = series.pop("meta", {})
    return Recorded({k: (np.arange(len(v)), v) for k, v in series.items()}, meta)


SGD_META = {"optimizer": json_safe(optax.sgd(0.1, momentum=0.9)), "batch_size": 16}


@pytest.mark.parametrize(
    ("level", "severity"), [(1.9, None), (3.6, "info"), (3.9, "info"), (4.5, "warning")]
)
def test_edge_of_stability_limit_with_momentum(level, severity):
    """η·λ_max against 2 + 2β = 3.8 for heavy ball β = 0.9: 0.9 of it is the edge (info),
    1.1 of it beyond (warning)."""
    rng = np.random.default_rng(0)
    lam = level / 0.1 * (1 + 0.01 * rng.standard_normal(40))
    findings = lm.diagnose(recorded(hess_max_ev=lam, meta=SGD_META))
    assert [f.severity for f in findings if f.code == "edge_of_stability"] == (
        [severity] if severity else []
    )


def test_edge_of_stability_reads_the_recorded_learning_rate():
    meta = {"optimizer": json_safe(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))}
    lam = np.full(60, 30.0)
    rates = np.r_[np.full(30, 0.01), np.full(30, 0.1)]  # η·λ: 0.3, then 3
    (finding,) = lm.diagnose(recorded(hess_max_ev=lam, **{"hyper/learning_rate": rates}, meta=meta))
    assert (finding.code, finding.severity, finding.first_step) == (
        "edge_of_stability",
        "warning",
        30,
    )
    adam = {"optimizer": json_safe(optax.adam(0.1))}
    assert (
        "adaptive" in lm.diagnose(recorded(hess_max_ev=lam, meta=adam)).skipped["edge_of_stability"]
    )
    assert (
        "learning rate"
        in lm.diagnose(
            recorded(
                hess_max_ev=lam,
                meta={"optimizer": json_safe(optax.sgd(optax.constant_schedule(0.1)))},
            )
        ).skipped["edge_of_stability"]
    )


def test_one_outlier_window_is_no_finding():
    """Persistence: α above 1 in two windows of ten is noise, in three a finding."""
    alpha = np.full(60, 0.3)
    alpha[20:40] = 1.5
    loss = np.linspace(2.0, 1.0, 60)
    assert lm.diagnose(recorded(alpha=alpha, loss=loss)) == []
    alpha[20:50] = 1.5
    (f,) = lm.diagnose(recorded(alpha=alpha, loss=loss))
    assert (f.code, f.severity, f.first_step, f.last_step) == ("lr_too_large", "warning", 20, 49)
    assert f.evidence["alpha_median_max"] == 1.5
    # a single step far above: the window's median does not move
    alpha = np.full(60, 0.3)
    alpha[::10] = 50.0
    assert lm.diagnose(recorded(alpha=alpha, loss=loss)) == []


def test_loss_rising_with_large_updates():
    loss = np.r_[np.linspace(2.0, 1.0, 20), np.linspace(1.0, 3.0, 40)]
    (f,) = lm.diagnose(recorded(loss=loss, update_size=np.full(60, 0.5)))
    assert (f.code, f.severity) == ("lr_too_large", "warning")
    assert f.evidence["loss_to"] > f.evidence["loss_from"]
    # shrinking updates (a decaying schedule) are not blamed
    assert lm.diagnose(recorded(loss=loss, update_size=np.geomspace(1, 1e-3, 60))) == []


def test_concave_alpha_is_told_from_short_steps():
    """α exactly −1 (concave fits) are left out; the rest decide."""
    alpha = np.where(np.arange(60) % 2 == 0, -1.0, -0.5)
    flat = np.full(60, 2.3)
    assert lm.diagnose(recorded(alpha=alpha, loss=flat)) == []
    alpha = np.where(np.arange(60) % 2 == 0, -1.0, -0.9995)
    (f,) = lm.diagnose(recorded(alpha=alpha, loss=flat))
    assert f.code == "lr_too_small" and f.evidence["alpha_median"] == -0.9995
    # a falling loss is no symptom, however short α says the steps are
    assert lm.diagnose(recorded(alpha=alpha, loss=np.linspace(2.3, 1.0, 60))) == []


def test_pure_noise_norm_test():
    """Pure noise: each step's norm test scatters about 1 (here an F-like draw); the rule
    fires on its median with the loss flat, and not with the loss falling."""
    rng = np.random.default_rng(3)
    norm_test = rng.chisquare(20, 80) / 20
    flat = 2.3 + 0.01 * rng.standard_normal(80)
    meta = {"batch_size": 8}
    (f,) = lm.diagnose(recorded(norm_test=norm_test, loss=flat, meta=meta))
    assert f.code == "noise_dominated" and f.evidence["suggested_batch_size"] >= 8 * 0.9 / 0.5
    assert lm.diagnose(recorded(norm_test=norm_test, loss=np.linspace(2.3, 1, 80))) == []
    # B_simple far above B
    b_simple = np.full(40, 500.0)
    (f,) = lm.diagnose(recorded(noise_scale=b_simple, meta=meta))
    assert (f.code, f.evidence["suggested_batch_size"]) == ("noise_dominated", 500)
    assert "batch size" in lm.diagnose(recorded(noise_scale=b_simple)).skipped["noise_dominated"]


def test_histogram_rules():
    counts = np.zeros((40, 10), np.int64)
    counts[:, 4:6] = 1000
    counts[:, 0] = 1
    (f,) = lm.diagnose(recorded(grad_hist_1d=counts))
    assert f.code == "vanishing_gradients" and f.evidence["central_mass"] > 0.99
    counts[:, [0, -1]] = 5000
    (f,) = lm.diagnose(recorded(grad_hist_1d=counts, grad_norm=np.ones(40)))
    assert f.code == "exploding_gradients" and f.evidence["edge_mass"] == pytest.approx(10 / 12)


def test_spike_in_the_gradient_norm():
    grad_norm = np.r_[np.ones(30), np.full(10, 500.0)]
    (f,) = lm.diagnose(recorded(grad_norm=grad_norm))
    assert (f.code, f.first_step, f.last_step) == ("exploding_gradients", 30, 39)


def test_too_few_steps_skip_rules():
    findings = lm.diagnose(recorded(loss=np.linspace(2, 1, 25), alpha=np.full(25, 3.0)))
    assert findings == []
    assert findings.skipped["lr_too_large"].startswith("too few steps of loss: 25 usable values")
    assert lm.diagnose(recorded(loss=np.linspace(2, 1, 25)), window=5) == []


def test_thresholds_and_silence_are_arguments():
    alpha, loss = np.full(40, 0.8), np.linspace(2, 1, 40)
    assert lm.diagnose(recorded(alpha=alpha, loss=loss)) == []
    (f,) = lm.diagnose(recorded(alpha=alpha, loss=loss), alpha_high=0.5)
    assert f.code == "lr_too_large"
    assert lm.diagnose(recorded(alpha=alpha, loss=loss), thresholds=Thresholds(alpha_high=0.5))
    assert (
        lm.diagnose(recorded(alpha=alpha, loss=loss), alpha_high=0.5, silence=["lr_too_large"])
        == []
    )


def test_windows_and_persistence():
    w = windows(np.arange(35), np.r_[np.arange(34.0), np.nan], Thresholds())
    # the last values form the last window; NaN left out
    assert w.first.tolist() == [4, 14, 24] and w.last.tolist() == [13, 23, 33]
    assert w.median.tolist() == [8.5, 18.5, 28.5]
    assert persistent(np.array([1, 1, 0, 1, 1], bool), 3) is None
    assert persistent(np.ones(4, bool), 3) == (0, 3)


def test_optimizer_facts():
    assert optimizer_facts(json_safe(optax.sgd(0.1))) == Optimizer("sgd", 0.1)
    nesterov = optimizer_facts(json_safe(optax.sgd(0.1, momentum=0.5, nesterov=True)))
    assert nesterov.stability_limit() == pytest.approx(3 / 2)
    assert optimizer_facts(json_safe(optax.adamw(1e-3))).kind == "adaptive"
    assert optimizer_facts(json_safe(optax.inject_hyperparams(optax.rmsprop)(0.1))).kind == (
        "adaptive"
    )
    clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    assert optimizer_facts(json_safe(clipped)).kind == "unknown"
    for junk in (None, "optax.sgd", {"function": 3}, [1, 2], {"function": "optax.chain"}):
        assert optimizer_facts(junk) == Optimizer()


def test_bad_input(tmp_path):
    with pytest.raises(RunStoreError, match="not an lmd4ml run"):
        lm.diagnose(tmp_path / "missing")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "run.sqlite").write_bytes(b"SQLite format 3\0" + b"\xff" * 300)
    with pytest.raises(RunStoreError):
        lm.diagnose(tmp_path / "damaged")
    with pytest.raises(ValueError, match="history is empty"):
        lm.diagnose(lm.History({"step": np.zeros(0, np.int64)}, {}))
    with pytest.raises(TypeError, match=r"source must be lm\.train's history"):
        lm.diagnose({"loss": [1.0]})
    with pytest.raises(ValueError, match="unknown codes \\['stall'\\]"):
        lm.diagnose(recorded(loss=np.ones(3)), silence=["stall"])
    with pytest.raises(TypeError, match="silence must be a list of codes"):
        lm.diagnose(recorded(loss=np.ones(3)), silence="stalled")
    with pytest.raises(TypeError, match="unknown thresholds \\['windw'\\]"):
        lm.diagnose(recorded(loss=np.ones(3)), windw=5)
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        lm.diagnose(recorded(loss=np.ones(3)), window=0)
    with pytest.raises(ValueError, match="alpha_high must be a finite number"):
        Thresholds(alpha_high=float("nan"))
    with pytest.raises(TypeError, match="diagnose must be True, False or a mapping"):
        lm.Recorder(tmp_path, diagnose="yes")
    with pytest.raises(TypeError, match="optimizer must be an optax optimizer"):
        lm.Recorder(tmp_path, optimizer="sgd")


def test_odd_values_and_metadata_do_not_stop_the_other_rules():
    """A store's metadata and fields are anyone's: odd ones skip a rule, never crash."""
    odd = recorded(
        hess_max_ev=np.ones(40),
        update_size=np.zeros(40),
        grad_hist_1d=np.ones((40, 1)),  # one bin: no central pair
        meta={"optimizer": {"function": "optax.chain", "update_fns": 7}, "config": [1]},
    )
    findings = lm.diagnose(odd)
    assert [f.code for f in findings] == ["stalled"]
    assert findings.skipped["edge_of_stability"].startswith("failed on this run's values")


def test_finding_as_dict_is_json():
    f = Finding("nonfinite", "error", 3, 4, "NaN.", {"x": np.float64("nan"), "l": ["a"]})
    as_json = json.loads(json.dumps(f.as_dict()))
    assert as_json["evidence"] == {"x": "nan", "l": ["a"]}
    assert as_json["docs"] == "instruments/loss.md"
    # every code's page exists
    for code in lm.diagnosis.RULES:
        page = Finding(code, "info", 0, 0, ".").docs
        assert (ROOT / "docs" / page).is_file(), page
