"""Per-task routing (issue 13, pipeline/routing.py). Claims checked: the rule leaves the
preferred path only when the other one's dev win exceeds the margin in standard errors (both
ways, for either preference, and at the expected rate when both paths are equally good); a
private epoch picked on dev is picked again on the choosing half when cross-fitting; a private
head learns a learnable task, picking its epoch on a holdout or on dev; a private ensemble
answers with its members' mean logits, each member an MLP, and its members learn apart,
deterministically for a seed; old runs' heads (and one-MLP stored configs) load; a tiny run
records each task's path with its evidence in run.json and the stage table; the exported graph
answers a private task through its private head (onnxruntime equals PyTorch's private logits,
not the shared ones) and metadata.json carries the choice; the recorded accuracies are those of
the saved model on dev (frozen and fine-tuned encoders); config errors name the field."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_task_rows, ort_logits, tiny_config_dict

from pipeline.cli import main
from pipeline.config import ConfigError, PrivateHeadConfig, parse_config
from pipeline.routing import choose, correct, crossfit_accuracy, decide, fit_private_head

TASKS = ["sentiment", "topic"]


def _correctness(n: int, both: int, private_only: int, shared_only: int):
    """bool [n] x 2: `both` items both paths get right, then the discordant ones."""
    shared = np.zeros(n, bool)
    private = np.zeros(n, bool)
    shared[:both] = private[:both] = True
    private[both : both + private_only] = True
    shared[both + private_only : both + private_only + shared_only] = True
    return shared, private


# ----------------------------------------------------------------------------------- the rule
def test_a_clear_win_of_the_other_path_is_taken_a_small_one_is_not():
    # 1000 items, private alone right on 60, shared alone on 20: +4 points, SE ~0.9.
    s, p = _correctness(1000, 800, 60, 20)
    d = decide(s, p, margin_se=2.0, prefer="shared")
    assert d.path == "private" and d.prefer == "shared"
    assert d.difference == pytest.approx(4.0)
    assert (d.private_only_right, d.shared_only_right) == (60, 20)
    assert d.z is not None and d.z > 4 and d.p_value < 1e-4
    # The mirror image: preferring private, a clear shared win moves the task to shared.
    mirror = decide(p, s, margin_se=2.0, prefer="private")
    assert mirror.path == "shared" and mirror.difference == pytest.approx(-4.0)
    assert mirror.p_value == pytest.approx(d.p_value)
    # 200 items, 3 vs 1 discordant: +1 point with SE ~1.0: within noise at 1 SE, taken at 0.
    s, p = _correctness(200, 150, 3, 1)
    small = decide(s, p, margin_se=1.0, prefer="shared")
    assert small.difference == pytest.approx(1.0)
    assert small.standard_error == pytest.approx(
        100 * np.std([1] * 3 + [-1] + [0] * 196, ddof=1) / math.sqrt(200)
    )
    assert small.path == "shared"
    assert decide(s, p, margin_se=0.0, prefer="shared").path == "private"
    assert decide(p, s, margin_se=1.0, prefer="private").path == "private"
    assert decide(p, s, margin_se=0.0, prefer="private").path == "shared"


def test_a_worse_or_identical_other_path_is_never_taken():
    s, p = _correctness(500, 400, 5, 40)
    assert decide(s, p, margin_se=0.0, prefer="shared").path == "shared"
    assert decide(p, s, margin_se=0.0, prefer="private").path == "private"
    for prefer in ("shared", "private"):
        same = decide(s, s.copy(), margin_se=0.0, prefer=prefer)
        assert same.path == prefer and same.standard_error == 0 and same.p_value == 1.0
    assert choose(0.5, 0.0, 3.0, "shared") == "private"  # all discordant items favour private
    assert choose(-0.5, 0.0, 0.0, "shared") == "shared"
    assert choose(-0.5, 0.0, 3.0, "private") == "shared"  # all discordant items favour shared
    assert choose(0.5, 0.0, 0.0, "private") == "private"


def test_p_value_is_the_one_sided_normal_tail_of_the_other_paths_lead():
    s, p = _correctness(400, 300, 14, 6)
    d = decide(s, p, margin_se=1.0, prefer="shared")
    assert d.z == pytest.approx(d.difference / d.standard_error)
    assert d.p_value == pytest.approx(0.5 * math.erfc(d.z / math.sqrt(2)))
    kept = decide(s, p, margin_se=1.0, prefer="private")  # the lead is shared's: negative
    assert kept.p_value == pytest.approx(0.5 * math.erfc(-d.z / math.sqrt(2)))
    assert kept.path == "private" and kept.p_value > 0.9


@pytest.mark.parametrize("prefer", ["shared", "private"])
def test_equally_good_paths_leave_the_preferred_one_at_the_rate_the_margin_implies(prefer):
    """Independent paths with the same 85% accuracy: with margin 1 SE the other path is taken
    about 16% of the time (one-sided normal tail), with 2 SE about 2%; with 0 about half."""
    rng = np.random.default_rng(0)
    picks = {0.0: 0, 1.0: 0, 2.0: 0}
    trials = 400
    for _ in range(trials):
        s, p = rng.random(500) < 0.85, rng.random(500) < 0.85
        for margin in picks:
            d = decide(s, p, margin, crossfit_repeats=0, prefer=prefer)
            picks[margin] += d.path != prefer
    assert 0.40 < picks[0.0] / trials < 0.60
    assert 0.10 < picks[1.0] / trials < 0.23
    assert picks[2.0] / trials < 0.06


def test_crossfit_accuracy_is_not_optimistic_where_the_dev_choice_is():
    """Equal paths: picking the better dev number gains on dev by construction; the cross-fitted
    estimate scores the choice on unseen halves and stays near the true 85%."""
    rng = np.random.default_rng(1)
    in_sample, crossfit = [], []
    for _ in range(60):
        s, p = rng.random(300) < 0.85, rng.random(300) < 0.85
        in_sample.append(100 * max(s.mean(), p.mean()))
        crossfit.append(crossfit_accuracy(s, p, margin_se=0.0, repeats=10))
    assert np.mean(in_sample) > 85.8
    assert abs(np.mean(crossfit) - 85.0) < 0.5
    # A real private win survives cross-fitting.
    s, p = _correctness(1000, 800, 80, 10)
    assert crossfit_accuracy(s, p, margin_se=2.0, prefer="shared") == pytest.approx(
        100 * p.mean(), abs=0.3
    )


def test_a_private_epoch_picked_on_dev_is_picked_again_on_the_choosing_half():
    """Twenty epochs of a private path that is 85% right on every epoch, each epoch's errors
    independent: the epoch with the best dev score looks better than 85% on dev (selection),
    and the decision reports it; the cross-fitted estimate, which picks the epoch on one half
    and scores the other, does not."""
    rng = np.random.default_rng(2)
    in_sample, crossfit, private_alone = [], [], []
    for _ in range(40):
        shared = rng.random(400) < 0.80
        per_epoch = rng.random((20, 400)) < 0.85
        d = decide(shared, per_epoch, margin_se=1.0, crossfit_repeats=10, prefer="private")
        best = int(np.argmax(per_epoch.sum(axis=1)))
        assert d.private_epoch == best + 1
        assert d.private_accuracy == pytest.approx(100 * per_epoch[best].mean())
        in_sample.append(d.private_accuracy)
        crossfit.append(d.crossfit_accuracy)
        private_alone.append(d.private_crossfit_accuracy)
    assert np.mean(in_sample) > 86.5
    assert abs(np.mean(crossfit) - 85.0) < 0.5
    assert abs(np.mean(private_alone) - 85.0) < 0.5
    # Without epochs to pick from, the private path's cross-fitted accuracy is its own.
    assert decide(shared, per_epoch[0], margin_se=1.0).private_crossfit_accuracy == pytest.approx(
        100 * per_epoch[0].mean()
    )
    with pytest.raises(ValueError, match="same"):
        decide(shared, per_epoch[:, :10], margin_se=1.0)


def test_private_head_learns_a_separable_task_and_picks_its_epoch_on_held_out_rows():
    from pipeline.model import private_head

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xd = torch.randn(100, 16, generator=gen)
    yd = (xd[:, 0] + 0.5 * xd[:, 1] > 0).long()
    torch.manual_seed(0)  # the head's initial weights: this test does not depend on others
    head = private_head(16, 2, [8], dropout=0.0)
    cfg = PrivateHeadConfig(epochs=30, patience=5, lr=1e-2, select="holdout")
    fit, kept = fit_private_head(head, x, y, cfg, seed=0, dev=(xd, yd))
    assert fit["holdout_accuracy"] > 90 and 1 <= fit["best_epoch"] <= 30
    # Only the kept epoch goes to the decision: the head's own dev logits.
    with torch.no_grad():
        assert kept.shape == (1, 100, 2)
        np.testing.assert_allclose(kept[0], head(xd).numpy(), rtol=1e-6)
    # Deterministic for a seed: the same initial weights give the same fit.
    h_a, h_b = private_head(16, 2, [8], 0.0), private_head(16, 2, [8], 0.0)
    h_b.load_state_dict(h_a.state_dict())
    fit_private_head(h_a, x, y, cfg, seed=3)
    fit_private_head(h_b, x, y, cfg, seed=3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(h_a.state_dict().values(), h_b.state_dict().values(), strict=True)
    )


def test_private_head_picked_on_dev_keeps_the_epoch_with_most_dev_items_right():
    from pipeline.model import private_head

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=gen)
    y = (x[:, 0] - x[:, 2] > 0).long()
    xd = torch.randn(80, 16, generator=gen)
    yd = (xd[:, 0] - xd[:, 2] > 0).long()
    torch.manual_seed(0)
    head = private_head(16, 2, [32, 16], dropout=0.1)
    cfg = PrivateHeadConfig(epochs=8, lr=1e-2)  # select=dev, the default
    fit, logits = fit_private_head(head, x, y, cfg, seed=0, dev=(xd, yd))
    assert logits.shape == (8, 80, 2)
    per_epoch = correct(logits, yd.numpy())
    best = int(np.argmax(per_epoch.sum(axis=1)))
    assert fit["best_epoch"] == best + 1
    assert fit["dev_accuracy"] == pytest.approx(100 * per_epoch[best].mean())
    with torch.no_grad():
        assert np.array_equal((head(xd).argmax(-1) == yd).numpy(), per_epoch[best])
    assert fit["dev_accuracy"] > 90
    with pytest.raises(ValueError, match="dev"):
        fit_private_head(private_head(16, 2, [8], 0.0), x, y, cfg, seed=0)


def test_private_ensemble_answers_with_the_mean_of_its_members_each_an_mlp():
    """Member k of a PrivateEnsemble computes what a one-MLP private head with member k's
    weights computes, and the ensemble answers with the mean of the members' logits."""
    from pipeline.model import PrivateEnsemble, private_head

    torch.manual_seed(0)
    ens = private_head(16, 3, [8, 4], dropout=0.3, members=3).eval()
    assert isinstance(ens, PrivateEnsemble) and ens.members == 3
    x = torch.randn(5, 16)
    with torch.no_grad():
        members = ens.member_logits(x)
        assert members.shape == (3, 5, 3)
        for k in range(3):
            mlp = private_head(16, 3, [8, 4], dropout=0.3).eval()
            linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
            for lin, w, b in zip(linears, ens.weights, ens.biases, strict=True):
                lin.weight.copy_(w[k].T)
                lin.bias.copy_(b[k, 0])
            torch.testing.assert_close(members[k], mlp(x))
        torch.testing.assert_close(ens(x), members.mean(0))
        # Each member on its own rows: [K, B, d] in, member k reads x[k].
        own = ens.member_logits(torch.stack([x, 2 * x, -x]))
        torch.testing.assert_close(own[1], ens.member_logits(2 * x)[1])
    with pytest.raises(ValueError, match="at least 2"):
        PrivateEnsemble(16, 3, [8], 0.1, members=1)


@pytest.mark.parametrize("hidden", [[], [8], [8, 4], [8, 6, 4]])
def test_private_ensemble_forward_is_the_mean_of_member_logits_for_every_layout(hidden):
    """forward() computes the mean without member_logits' broadcast (first and last layers as
    single 2-D matmuls): the same numbers, for a linear head and for 1-3 hidden layers."""
    from pipeline.model import private_head

    torch.manual_seed(1)
    ens = private_head(16, 3, hidden, dropout=0.3, members=4).eval()
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), ens.member_logits(x).mean(0))
        assert ens(x[:1]).shape == (1, 3)


def test_private_ensemble_members_learn_apart_and_the_fit_is_deterministic():
    """Trained together, the members start and stay different (their own initialization and
    batch order), the mean learns the task, and a seed gives the same fit twice."""
    from pipeline.model import private_head

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(400, 16, generator=gen)
    y = (x[:, 0] - x[:, 3] > 0).long()
    xd = torch.randn(80, 16, generator=gen)
    yd = (xd[:, 0] - xd[:, 3] > 0).long()
    cfg = PrivateHeadConfig(epochs=8, lr=1e-2, hidden_sizes=[16], members=4)
    torch.manual_seed(0)
    head = private_head(16, 2, cfg.hidden_sizes, cfg.dropout, cfg.members)
    twin = private_head(16, 2, cfg.hidden_sizes, cfg.dropout, cfg.members)
    twin.load_state_dict(head.state_dict())
    fit, logits = fit_private_head(head, x, y, cfg, seed=0, dev=(xd, yd))
    assert logits.shape == (8, 80, 2) and fit["dev_accuracy"] > 90
    with torch.no_grad():
        # What the decision read at the kept epoch is the ensemble's mean answer.
        np.testing.assert_allclose(logits[fit["best_epoch"] - 1], head(xd).numpy(), rtol=1e-5)
        w = head.weights[0]
        assert min(float((w[i] - w[j]).abs().max()) for i in range(4) for j in range(i)) > 0.05
        member_acc = (head.member_logits(xd).argmax(-1) == yd).float().mean(1)
        assert (member_acc > 0.8).all()
    fit_private_head(twin, x, y, cfg, seed=0, dev=(xd, yd))
    assert all(
        torch.equal(a, b)
        for a, b in zip(head.state_dict().values(), twin.state_dict().values(), strict=True)
    )


def test_label_smoothing_keeps_a_private_head_from_certainty_on_what_it_learned():
    """Trained long on a separable task, a head without smoothing drives its training loss to
    zero and its typical answer to probability 1; with smoothing 0.2 over 2 classes the loss
    is lowest at 0.9, so the head stays below that (why it is on: docs/results.md)."""
    from pipeline.model import private_head

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    top = {}
    for smoothing in (0.0, 0.2):
        torch.manual_seed(0)
        head = private_head(8, 2, [32], dropout=0.0)
        cfg = PrivateHeadConfig(epochs=60, lr=3e-2, weight_decay=0.0, label_smoothing=smoothing)
        _, logits = fit_private_head(head, x, y, cfg, seed=0, dev=(x, y))
        last = torch.from_numpy(logits[-1])  # the last epoch's, whichever epoch was kept
        top[smoothing] = float(last.softmax(-1).max(-1).values.median())
    assert top[0.0] > 0.99
    assert 0.8 < top[0.2] < 0.91


def test_private_head_layout_of_old_runs_still_loads():
    """Runs before `hidden_sizes` stored `hidden_size`: the same one-layer head (same parameter
    names) and its holdout pick; a linear head stays linear."""
    from pipeline.model import main_tower, private_head

    old = PrivateHeadConfig.model_validate({"hidden_size": 256, "dropout": 0.1})
    assert old.hidden_sizes == [256] and old.select == "holdout"
    assert PrivateHeadConfig.model_validate({"hidden_size": 0}).hidden_sizes == []
    assert PrivateHeadConfig().hidden_sizes == [512, 256] and PrivateHeadConfig().select == "dev"
    # They trained without label smoothing, and their records say so.
    assert old.label_smoothing == 0.0 and PrivateHeadConfig().label_smoothing == 0.1
    for width in (256, 0):
        old_head = main_tower(384, 3, width, 0.1)  # what private_head built before
        new_head = private_head(384, 3, [width] if width else [], 0.1)
        new_head.load_state_dict(old_head.state_dict())  # strict: same names and shapes
    # Runs before `members` trained one MLP per task; new configs train an ensemble.
    from pipeline.runs import stored_config

    assert PrivateHeadConfig().members == 5
    stored = {"name": "x", "routing": {"enabled": True, "private": {"hidden_sizes": [8]}}}
    assert stored_config(stored)["routing"]["private"]["members"] == 1
    assert "members" not in stored["routing"]["private"]  # the record is not changed
    newer = {"routing": {"private": {"hidden_sizes": [8], "members": 3}}}
    assert stored_config(newer)["routing"]["private"]["members"] == 3
    assert stored_config({"routing": None}) == {"routing": None}


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("routing", "field"),
    [
        ({"margin_se": -1}, "routing.margin_se"),
        ({"private": {"holdout_fraction": 0.7}}, "routing.private.holdout_fraction"),
        ({"private": {"hidden": 8}}, "routing.private.hidden"),
        ({"enabeld": True}, "routing.enabeld"),
        ({"prefer": "both"}, "routing.prefer"),
        ({"private": {"select": "test"}}, "routing.private.select"),
        ({"private": {"hidden_sizes": [0]}}, "routing.private.hidden_sizes"),
        ({"private": {"label_smoothing": 1.0}}, "routing.private.label_smoothing"),
        ({"private": {"members": 0}}, "routing.private.members"),
        ({"private": {"hidden_size": 8, "hidden_sizes": [8]}}, "routing.private"),
    ],
)
def test_config_errors_name_the_field(tmp_path, routing, field):
    raw = tiny_config_dict(tmp_path, tmp_path, tmp_path / "runs", tmp_path / "cache")
    raw["routing"] = routing
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "tiny.yaml")
    assert field in str(info.value)


# --------------------------------------------------------------------- a tiny run, end to end
def _export_topic_private(src: Path, tmp_path: Path):  # noqa: ANN202
    """A copy of the run with `topic` routed private and `sentiment` shared (as if the evidence
    said so), exported: (run dir, its run.json, the export result); parity checked."""
    import shutil

    from pipeline.export import export_run

    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir, symlinks=True)
    rec = json.loads((run_dir / "run.json").read_text())
    rec["routing"]["topic"]["path"] = "private"
    rec["routing"]["sentiment"]["path"] = "shared"
    (run_dir / "run.json").write_text(json.dumps(rec))
    result = export_run(run_dir, register=False, output_dir=tmp_path / "artifact")
    assert result.metadata.parity.passed
    return run_dir, rec, result


def _suite_with(run_dir: Path, tmp_path: Path) -> Path:
    """A suite directory holding `run_dir` as its seed-0 routed run and single-task results
    of 50% for every task."""
    import shutil

    suite = tmp_path / "suite"
    shutil.copytree(run_dir, suite / "runs" / "routed-s0", symlinks=True)
    (suite / "results").mkdir()
    for task in TASKS:
        (suite / "results" / f"single-{task}-s0.json").write_text(json.dumps({"dev": {task: 50.0}}))
    return suite


def _train(tmp: Path, data: Path, encoder: Path, **overrides) -> tuple[Path, str]:
    raw = tiny_config_dict(data, encoder, tmp / "runs", tmp / "cache")
    raw["routing"] = {"margin_se": 1.0, "private": {"hidden_sizes": [8], "epochs": 10}}
    for key, value in overrides.items():
        section, name = key.split("__")
        raw[section][name] = value
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path)]) == 0
    text = out.getvalue()
    return Path(text.split("run directory: ")[-1].strip()), text


@pytest.fixture(scope="module")
def noisy_data_dir(tmp_path_factory) -> Path:
    """The tiny tasks with a few dev rows mislabelled, so neither path is perfect on dev."""
    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("noisy-data")
    for name, kind, seed in (("sentiment", "sentiment", 1), ("topic", "topic", 2)):
        write_jsonl(root / name / "train.jsonl", make_task_rows(kind, 96, seed))
        dev = make_task_rows(kind, 40, seed + 100)
        labels = sorted({r["label"] for r in dev})
        for r in dev[:6]:  # a wrong label: no path can answer these
            r["label"] = labels[(labels.index(r["label"]) + 1) % len(labels)]
        write_jsonl(root / name / "dev.jsonl", dev)
    return root


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, noisy_data_dir, tiny_encoder_dir) -> tuple[Path, str]:
    return _train(tmp_path_factory.mktemp("routed-run"), noisy_data_dir, tiny_encoder_dir)


def _dev_accuracy(run_dir: Path, data: Path, task: str, path: str) -> float:
    """Dev accuracy of one path of the saved model, from texts through its encoder."""
    from pipeline.features import load_tokenizer
    from pipeline.runs import load_run

    run = load_run(run_dir)
    rows = [json.loads(line) for line in (data / task / "dev.jsonl").read_text().splitlines()]
    tok = load_tokenizer(run.record.encoder.path)
    enc = tok(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        x = run.model.encoder(enc["input_ids"], enc["attention_mask"])
        pred = run.model.heads(x, task, path=path)[0].argmax(-1).numpy()
    labels = run.record.tasks[task].labels
    return 100.0 * float(
        np.mean([labels[k] == r["label"] for k, r in zip(pred, rows, strict=True)])
    )


def test_run_records_each_task_route_with_its_evidence(routed_run, noisy_data_dir):
    run_dir, printed = routed_run
    rec = json.loads((run_dir / "run.json").read_text())
    assert set(rec["routing"]) == set(TASKS)
    for task in TASKS:
        route = rec["routing"][task]
        assert route["path"] in ("shared", "private") and route["n"] == 40
        assert route["difference"] == pytest.approx(
            route["private_accuracy"] - route["shared_accuracy"]
        )
        expected = choose(
            route["difference"], route["standard_error"], route["margin_se"], route["prefer"]
        )
        assert route["prefer"] == "private"  # the default
        assert route["path"] == expected
        assert rec["stages"][task]["route"]["path"] == route["path"]
        # The record's numbers are the saved model's, on dev texts through its encoder.
        for path in ("shared", "private"):
            assert _dev_accuracy(run_dir, noisy_data_dir, task, path) == pytest.approx(
                route[f"{path}_accuracy"], abs=1e-6
            )
        chosen = route[f"{route['path']}_accuracy"]
        assert rec["dev"][task]["accuracy"] == pytest.approx(chosen)
    # The stage table printed at the end shows the path and the evidence.
    assert "route: private vs shared" in printed
    for task in TASKS:
        line = next(x for x in printed.splitlines() if x.startswith(task))
        assert rec["routing"][task]["path"] in line and "±" in line


def test_export_answers_a_private_task_through_its_private_head(
    routed_run, tmp_path, noisy_data_dir
):
    """Route `topic` privately (as if its evidence said so), export, and compare onnxruntime
    with PyTorch's private-path logits: equal, and unlike the shared path's."""

    from pipeline.features import load_tokenizer
    from pipeline.runs import load_run

    src, _ = routed_run
    run_dir, rec, result = _export_topic_private(src, tmp_path)
    routes = {t.name: t.route for t in result.metadata.tasks}
    assert routes["topic"].path == "private" and routes["sentiment"].path == "shared"
    assert routes["topic"].private_accuracy == pytest.approx(
        rec["routing"]["topic"]["private_accuracy"]
    )

    texts = [r["text"] for r in make_task_rows("topic", 7, 5)]
    onnx = ort_logits(result.artifact_dir, texts, TASKS)
    run = load_run(run_dir)
    enc = load_tokenizer(run.record.encoder.path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        x = run.model.encoder(enc["input_ids"], enc["attention_mask"])
        private = run.model.heads(x, "topic", path="private")[0].numpy()
        shared = run.model.heads(x, "topic", path="shared")[0].numpy()
        sentiment = run.model.heads(x, "sentiment", path="shared")[0].numpy()
    np.testing.assert_allclose(onnx["topic"], private, atol=1e-4)
    assert np.abs(onnx["topic"] - shared).max() > 1e-2
    np.testing.assert_allclose(onnx["sentiment"], sentiment, atol=1e-4)

    # /tasks: the service's answer carries each task's path and its evidence.
    from serving.runtime import Runtime
    from serving.schemas import TasksResponse
    from serving.service import with_routes

    runtime = Runtime(result.artifact_dir, version="tiny:v1", threads=1)
    info = with_routes({**runtime.describe(), "fallback": None}, runtime.metadata)
    body = TasksResponse.model_validate(info).model_dump()
    assert body["tasks"]["topic"]["route"]["path"] == "private"
    assert body["tasks"]["sentiment"]["route"]["path"] == "shared"
    route = rec["routing"]["topic"]
    for key in ("shared_accuracy", "private_accuracy", "difference", "standard_error", "p_value"):
        assert body["tasks"]["topic"]["route"][key] == pytest.approx(route[key])
    assert body["tasks"]["topic"]["route"]["prefer"] == route["prefer"] == "private"


def test_reroute_refits_the_routing_stage_of_a_stored_run(routed_run, tmp_path, capsys):
    """scripts/reroute.py on a suite directory holding one routed run: the shared path it
    scores is the stored run's (same model, same features, same standardization), the private
    path is refitted with the members asked for, and routed − single-task is printed against
    the suite's single-task results."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "reroute", Path(__file__).parents[1] / "scripts" / "reroute.py"
    )
    reroute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reroute)

    src, _ = routed_run
    suite = _suite_with(src, tmp_path)
    record = json.loads((src / "run.json").read_text())

    out = reroute.reroute(suite / "runs" / "routed-s0", members=2)
    for task in TASKS:
        assert out[task]["shared"] == pytest.approx(record["routing"][task]["shared_accuracy"])
        assert out[task]["stored_private"] == record["routing"][task]["private_accuracy"]
        assert out[task]["routed"] == pytest.approx(
            out[task]["private" if out[task]["path"] == "private" else "shared"]
        )
    assert reroute.main([str(suite), "--members", "2"]) == 0
    printed = capsys.readouterr().out
    for task in TASKS:
        assert f"| {task} | 50.00 ± 0.00 |" in printed
    assert "worst task" in printed
    assert reroute.main([str(tmp_path / "empty")]) == 2


def test_routing_off_trains_and_loads_without_private_heads(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    from pipeline.runs import load_run
    from pipeline.train.checkpoint import load_tensors

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    raw["routing"] = {"enabled": False}
    raw["alignment"]["enabled"] = False
    path = tmp_path / "off.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path)]) == 0
    run_dir = Path(out.getvalue().split("run directory: ")[-1].strip())
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["routing"] is None and all(s["route"] is None for s in rec["stages"].values())
    assert not any(
        k.startswith("heads.private.")
        for k in load_tensors(run_dir / "model" / "model.safetensors")
    )
    assert len(load_run(run_dir).model.heads.private) == 0


@pytest.fixture(scope="module")
def finetuned_routed_run(tmp_path_factory, noisy_data_dir, tiny_encoder_dir) -> Path:
    run_dir, _ = _train(
        tmp_path_factory.mktemp("finetuned-routed"),
        noisy_data_dir,
        tiny_encoder_dir,
        encoder__trainable_layers=1,
        train__epochs=3,
    )
    return run_dir


def test_finetuned_run_routes_on_the_final_encoder_features(finetuned_routed_run, noisy_data_dir):
    """With the top layer fine-tuned, the private heads read the final encoder's features: the
    recorded accuracies are reproduced by the saved (fine-tuned) encoder."""
    run_dir = finetuned_routed_run
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["encoder"]["trainable_layers"] == 1
    for task in TASKS:
        route = rec["routing"][task]
        for path in ("shared", "private"):
            assert _dev_accuracy(run_dir, noisy_data_dir, task, path) == pytest.approx(
                route[f"{path}_accuracy"], abs=1e-6
            )


def test_private_layers_diagnostic_scores_the_stored_paths_and_trains_a_copy(
    finetuned_routed_run, capsys
):
    """scripts/private_layers.py on a fine-tuned routed run: the shared and private paths it
    compares against are the run's recorded ones (same cached states, same model), and the
    private copy of the top block is trained for the epochs asked, with either head, and
    scored per epoch."""
    from conftest import load_repo_script

    script = load_repo_script("scripts/private_layers.py")
    rec = json.loads((finetuned_routed_run / "run.json").read_text())
    for init, head in (("joint", "private"), ("pretrained", "single")):
        out = script.measure(finetuned_routed_run, None, 1, init, epochs=2, head_kind=head)
        assert set(out) == set(TASKS)
        for task, r in out.items():
            route = rec["routing"][task]
            assert r["shared"] == pytest.approx(route["shared_accuracy"], abs=1e-6)
            assert r["stored_private"] == pytest.approx(route["private_accuracy"], abs=1e-6)
            assert r["own_epoch"] in (1, 2) and 0.0 <= r["own"] <= 100.0
            assert r["path"] in ("shared", "private")
            assert r["routed"] == pytest.approx(r["own" if r["path"] == "private" else "shared"])
    assert script.main([str(finetuned_routed_run), "--tasks", TASKS[0], "--epochs", "1"]) == 0
    assert f"{TASKS[0]}: shared" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layers"):
        script.measure(finetuned_routed_run, None, 2, "joint", epochs=1)


# ------------------------------------------------- private heads on pooled lower blocks too
@pytest.fixture(scope="module")
def pooled_layers_run(tmp_path_factory, noisy_data_dir, tiny_encoder_dir) -> Path:
    """The tiny 2-block encoder with its top block fine-tuned; the private heads also read the
    pooled output of block 1 (the cached states)."""
    run_dir, _ = _train(
        tmp_path_factory.mktemp("pooled-layers"),
        noisy_data_dir,
        tiny_encoder_dir,
        encoder__trainable_layers=1,
        train__epochs=2,
        routing__private={"hidden_sizes": [8], "epochs": 10, "layers": [1]},
    )
    return run_dir


def test_private_heads_also_read_pooled_lower_blocks_and_the_shared_path_does_not(
    pooled_layers_run, noisy_data_dir
):
    """routing.private.layers: the encoder returns [final | block 1] pooled, the private heads
    read both, the shared path the final columns only; the accuracies training recorded (from
    the cached states, Encoder.forward_from) are reproduced by the whole forward pass (what is
    exported)."""
    from pipeline.features import load_tokenizer
    from pipeline.runs import load_run

    run = load_run(pooled_layers_run)
    encoder, heads = run.model.encoder, run.model.heads
    d = encoder.dim
    assert encoder.pooled_layers == (1,) and encoder.out_dim == 2 * d
    assert heads.feature_mean.shape == (2 * d,) and heads.shared_dim == d
    for t in TASKS:
        assert heads.alignment[t].shape == (d, d)
        head = heads.private[t]  # a PrivateEnsemble: weights[0] is [K, in, h]
        assert head.weights[0].shape[1] == 2 * d
    rec = json.loads((pooled_layers_run / "run.json").read_text())
    for t in TASKS:
        for path in ("shared", "private"):
            assert _dev_accuracy(pooled_layers_run, noisy_data_dir, t, path) == pytest.approx(
                rec["routing"][t][f"{path}_accuracy"], abs=1e-6
            )
    texts = [r["text"] for r in make_task_rows("topic", 9, 7)]
    enc = load_tokenizer(run.record.encoder.path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        x = encoder(enc["input_ids"], enc["attention_mask"])  # [B, 2d]
        lower = encoder.lower_states(enc["input_ids"], enc["attention_mask"], 1)
        np.testing.assert_allclose(
            encoder.forward_from(lower, enc["attention_mask"], 1).numpy(), x.numpy(), atol=1e-5
        )
        blank = x.clone()
        blank[:, d:] = heads.feature_mean[d:]  # block 1's columns at their mean: 0 standardized
        for t in TASKS:
            shared = heads(x, t, path="shared")[0]
            np.testing.assert_array_equal(heads(blank, t, path="shared")[0].numpy(), shared)
            private = heads(x, t, path="private")[0]
            assert (heads(blank, t, path="private")[0] - private).abs().max() > 1e-4


def test_pooled_lower_blocks_export_serve_and_split(pooled_layers_run, tmp_path):
    """The exported graph computes the wider features in its one encoder pass: onnxruntime
    equals PyTorch for a private and a shared task, and the serving cut (encoder part, heads
    part) composes to the whole graph."""

    import onnxruntime as ort

    from pipeline.features import load_tokenizer
    from pipeline.runs import load_run
    from serving.graph import split_heads

    run_dir, _, result = _export_topic_private(pooled_layers_run, tmp_path)

    texts = [r["text"] for r in make_task_rows("topic", 7, 5)]
    onnx = ort_logits(result.artifact_dir, texts, TASKS)
    run = load_run(run_dir)
    enc = load_tokenizer(run.record.encoder.path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        x = run.model.encoder(enc["input_ids"], enc["attention_mask"])
        for t in TASKS:
            np.testing.assert_allclose(onnx[t], run.model.heads(x, t)[0].numpy(), atol=1e-4)

    parts = split_heads(result.artifact_dir / "model.onnx")
    assert parts is not None
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    middle = ort.InferenceSession(parts.encoder).run(parts.boundary, feeds)
    assert sum(m.shape[-1] for m in middle) >= 2 * run.model.encoder.dim
    heads_part = ort.InferenceSession(parts.heads)
    out = heads_part.run(None, dict(zip(parts.boundary, middle, strict=True)))
    for t, got in zip(TASKS, out, strict=True):
        np.testing.assert_allclose(got, onnx[t], atol=1e-4)


def test_add_task_to_a_run_with_pooled_lower_blocks(pooled_layers_run, noisy_data_dir):
    """add-task on such a parent: the new task trains on the parent's wider features (its
    shared path reads the final columns), and the parent's tasks answer exactly as before."""
    from pipeline.features import load_tokenizer
    from pipeline.incremental import add_tasks, new_task_config
    from pipeline.runs import load_run

    child = add_tasks(
        pooled_layers_run,
        [
            new_task_config(
                "again",
                train=noisy_data_dir / "topic" / "train.jsonl",
                dev=noisy_data_dir / "topic" / "dev.jsonl",
            )
        ],
        epochs=3,
    )
    run, parent = load_run(child.run_dir), load_run(pooled_layers_run)
    assert run.model.encoder.pooled_layers == (1,)
    texts = [r["text"] for r in make_task_rows("topic", 5, 3)]
    enc = load_tokenizer(run.record.encoder.path)(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        new = dict(zip(run.model.heads.tasks, run.model(ids, mask), strict=True))
        old = dict(zip(parent.model.heads.tasks, parent.model(ids, mask), strict=True))
    for t in TASKS:
        assert torch.equal(new[t], old[t])
    assert new["again"].shape == (5, len(run.labels["again"]))


def test_reroute_refits_private_heads_on_pooled_lower_blocks(
    finetuned_routed_run, pooled_layers_run, tmp_path, capsys
):
    """scripts/reroute.py --private-layers: on a run trained without them, the shared path is
    the stored one and the refitted private heads read [final | block 1]; the standardization
    it builds is the one training builds (checked on a run trained with the option)."""

    from conftest import load_repo_script

    from pipeline.data import load_tasks
    from pipeline.runs import load_run
    from pipeline.token_cache import TokenStateCache

    reroute = load_repo_script("scripts/reroute.py")
    suite = _suite_with(finetuned_routed_run, tmp_path)
    record = json.loads((finetuned_routed_run / "run.json").read_text())
    out = reroute.reroute(suite / "runs" / "routed-s0", members=1, layers=[1])
    for task in TASKS:
        assert out[task]["shared"] == pytest.approx(record["routing"][task]["shared_accuracy"])
    assert reroute.main([str(suite), "--members", "1", "--private-layers", "1"]) == 0
    assert "worst task" in capsys.readouterr().out
    assert reroute.main([str(suite), "--private-layers", "x"]) == 2
    assert reroute.main([str(finetuned_routed_run), "--members", "1", "--private-layers", "1"]) == 0
    assert "| sentiment |" in capsys.readouterr().out
    assert reroute.main([str(finetuned_routed_run), "--members", "1", "--tasks", "topic"]) == 0
    printed = capsys.readouterr().out
    assert "| topic |" in printed and "| sentiment |" not in printed
    assert reroute.main([str(suite), "--tasks", "topic"]) == 2
    with pytest.raises(SystemExit, match="routing.private.layers"):
        reroute.reroute(suite / "runs" / "routed-s0", members=1, layers=[2])

    run = load_run(pooled_layers_run)
    stored = run.model.heads.feature_mean.clone(), run.model.heads.feature_std.clone()
    tasks = load_tasks(run.config, labels=run.labels)
    enc = run.record.encoder
    cache = TokenStateCache(
        run.config.resolved_cache_dir(),
        enc.path,
        enc.cached_layers,
        enc.max_length,
        encoder=run.model.encoder,
    )
    heads = reroute.widen_heads(run, tasks, cache, [1])
    torch.testing.assert_close(heads.feature_mean, stored[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(heads.feature_std, stored[1], atol=1e-3, rtol=1e-3)


def test_pooled_layers_need_a_fine_tuned_encoder_and_blocks_it_has(tmp_path, tiny_encoder_dir):
    """A frozen run reads cached final features, so the config refuses the option there; the
    encoder refuses blocks it does not have below its last, and blocks under the cached ones."""
    from pipeline.model import load_encoder

    raw = tiny_config_dict(tmp_path, tmp_path, tmp_path / "runs", tmp_path / "cache")
    raw["routing"] = {"private": {"layers": [1]}}
    raw["encoder"]["trainable_layers"] = 0
    with pytest.raises(ConfigError, match=r"routing\.private\.layers.*fine-tuned encoder"):
        parse_config(raw, "tiny.yaml")
    raw["routing"] = {"enabled": False, "private": {"layers": [1]}}
    assert parse_config(raw, "tiny.yaml").pooled_layers == []  # no private heads: no effect
    raw["encoder"]["trainable_layers"] = 1
    raw["routing"] = {"private": {"layers": [1, 1]}}
    with pytest.raises(ConfigError, match=r"routing\.private\.layers"):
        parse_config(raw, "tiny.yaml")

    encoder = load_encoder(tiny_encoder_dir)
    for bad in ([2], [0]):
        with pytest.raises(ValueError, match="routing.private.layers"):
            encoder.set_pooled_layers(bad)
    encoder.set_pooled_layers([1])
    states = torch.zeros(2, 3, encoder.dim)
    mask = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="below the cached"):
        encoder.forward_from(states, mask, 2)
    assert encoder.forward_from(states, mask, 1).shape == (2, 2 * encoder.dim)


# ------------------------------------------------------------------------- the transfer suite
def _routed_result(dev: dict[str, float], routes: dict[str, tuple[str, float, float, float]]):
    """A run summary as the suite stores it: route = (path, shared, private, crossfit)."""
    stages = {
        t: {
            "route": {
                "path": path,
                "shared_accuracy": shared,
                "private_accuracy": private,
                "crossfit_accuracy": crossfit,
            }
        }
        for t, (path, shared, private, crossfit) in routes.items()
    }
    return {"status": "ok", "dev": dev, "stages": stages}


def test_transfer_suite_plans_only_the_asked_variants_and_scores_routing_targets():
    from pipeline.experiments.common import PLAIN
    from pipeline.experiments.options import ExperimentOptions
    from pipeline.experiments.transfer import analyze, plan, routing_section

    base = parse_config(
        tiny_config_dict(Path("."), Path("."), Path("runs"), Path("cache")), "tiny.yaml"
    )
    opts = ExperimentOptions(variants=("routed",))
    specs = plan(base, [0, 1], opts)
    assert sorted({s.variant for s in specs}) == ["routed", "single"]
    assert all(s.overrides == PLAIN for s in specs if s.variant == "single")
    assert PLAIN["routing.enabled"] is False  # every other variant keeps the shared path
    assert next(s for s in specs if s.variant == "routed").overrides == {"routing.enabled": True}
    with pytest.raises(ValueError, match="--variants: unknown"):
        plan(base, [0], ExperimentOptions(variants=("rooted",)))

    # sentiment: shared better than single, routed keeps shared. topic: shared 2 below
    # single, routed takes private on seed 0 only.
    results = {
        "single-sentiment-s0": {"status": "ok", "dev": {"sentiment": 80.0}},
        "single-sentiment-s1": {"status": "ok", "dev": {"sentiment": 82.0}},
        "single-topic-s0": {
            "status": "ok",
            "dev": {"topic": 90.0},
            "stages": {"topic": {"selection_crossfit": 89.0}},
        },
        "single-topic-s1": {
            "status": "ok",
            "dev": {"topic": 90.0},
            "stages": {"topic": {"selection_crossfit": 89.5}},
        },
        "routed-s0": _routed_result(
            {"sentiment": 85.0, "topic": 89.5},
            {"sentiment": ("shared", 85.0, 80.0, 84.0), "topic": ("private", 88.0, 89.5, 89.0)},
        ),
        "routed-s1": _routed_result(
            {"sentiment": 85.0, "topic": 88.0},
            {"sentiment": ("shared", 85.0, 81.0, 85.0), "topic": ("shared", 88.0, 89.0, 88.0)},
        ),
    }
    routing = analyze(specs, results, opts)["routing"]
    topic = routing["tasks"]["topic"]
    assert topic["private_chosen"] == 1
    assert topic["routed"]["mean"] == pytest.approx(88.75)
    assert topic["routed_minus_best"] == pytest.approx(-1.25)  # best: single 90
    # The single-task runs' own selection cross-fitted, read from their records (sentiment's
    # records have none: no column for it).
    assert topic["single_crossfit"]["mean"] == pytest.approx(89.25)
    assert "single_crossfit" not in routing["tasks"]["sentiment"]
    assert routing["tasks"]["sentiment"]["routed_minus_best"] == pytest.approx(0.0)
    target = routing["targets"]["routed"]
    assert target["mean_minus_best"] == pytest.approx(-0.625)
    assert target["worst_minus_single"] == pytest.approx(-1.25)
    assert target["met"] is False
    # The worst task, named, with the standard error of its mean gap over the seeds, paired by
    # seed (topic: -0.5 and -2.0 -> std 1.06, SE 0.75): whether these seeds can resolve it.
    assert target["worst_task"] == "topic"
    assert target["worst_se"] == pytest.approx(1.5 / math.sqrt(2) / math.sqrt(2))
    assert topic["routed_minus_single_paired"]["mean"] == pytest.approx(-1.25)
    text = "\n".join(routing_section(routing, ["sentiment", "topic"], planned=2))
    assert (
        "worst task topic -1.25 against its single-task model, standard error 0.75 over 2 "
        "seeds paired by seed (target ≥ −0.5): **not met**"
    ) in text
    assert routing["targets"]["crossfit"]["mean_minus_best"] == pytest.approx((-0.5 - 1.5) / 2)
