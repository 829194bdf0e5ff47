"""The drift rules of infra/prometheus/alerts.yml (group polytask-drift), unit-tested with
`promtool test rules` on synthetic series (promtool must be installed, as for test_infra.py).

Scenario, one sample a minute: task `sst2` (dev mix 50/50, dev mean confidence 0.9) answers
20 texts a minute, half of each label at 0.9 confidence, for an hour; then every answer is
`positive`, at 0.6 confidence, and a quarter of the texts are truncated. Task `trec` keeps its
dev-like traffic throughout; task `quiet` is fully skewed but answers 1 text a minute (under
the 200-answer minimum per hour). Claims: nothing fires during the dev-like hour; the label mix
distance of dev-like traffic is exactly 0; after the skew, the three sst2 alerts fire (after
their `for`), and never for trec or quiet.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from test_infra import PROM_RULES, alert_rules, promtool

DRIFT_ALERTS = ("PolytaskLabelMixDrift", "PolytaskConfidenceDrop", "PolytaskTruncationRise")


def gauge(name: str, value: float, **labels: str) -> dict[str, str]:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{sel}}}", "values": f"{value}x200"}


def counter(name: str, first: float, then: float, **labels: str) -> dict[str, str]:
    """A counter rising by `first` a minute for 60 minutes, then by `then` a minute."""
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {
        "series": f"{name}{{{sel}}}",
        "values": f"0+{first}x60 {60 * first + then}+{then}x140",
    }


def series() -> list[dict[str, str]]:
    out = []
    for label in ("positive", "negative"):
        out.append(gauge("polytask_dev_label_share", 0.5, task="sst2", label=label))
        out.append(gauge("polytask_dev_label_share", 0.5, task="quiet", label=label))
    for label in ("HUM", "LOC"):
        out.append(gauge("polytask_dev_label_share", 0.5, task="trec", label=label))
    for task in ("sst2", "trec", "quiet"):
        out.append(gauge("polytask_dev_confidence_mean", 0.9, task=task))
        out.append(gauge("polytask_dev_truncated_share", 0.0, task=task))
    # sst2: 10 + 10 a minute, then 20 positive, 0 negative
    out.append(counter("polytask_predictions_total", 10, 20, task="sst2", label="positive"))
    out.append(counter("polytask_predictions_total", 10, 0, task="sst2", label="negative"))
    out.append(counter("polytask_prediction_confidence_count", 20, 20, task="sst2"))
    out.append(counter("polytask_prediction_confidence_sum", 18, 12, task="sst2"))
    out.append(counter("polytask_truncated_texts_total", 0, 5, task="sst2"))
    # trec: dev-like all along
    for label in ("HUM", "LOC"):
        out.append(counter("polytask_predictions_total", 10, 10, task="trec", label=label))
    out.append(counter("polytask_prediction_confidence_count", 20, 20, task="trec"))
    out.append(counter("polytask_prediction_confidence_sum", 18, 18, task="trec"))
    out.append(counter("polytask_truncated_texts_total", 0, 0, task="trec"))
    # quiet: fully skewed from the start, 1 text a minute, low confidence
    out.append(counter("polytask_predictions_total", 1, 1, task="quiet", label="positive"))
    out.append(counter("polytask_predictions_total", 0, 0, task="quiet", label="negative"))
    out.append(counter("polytask_prediction_confidence_count", 1, 1, task="quiet"))
    out.append(counter("polytask_prediction_confidence_sum", 0.5, 0.5, task="quiet"))
    out.append(counter("polytask_truncated_texts_total", 1, 1, task="quiet"))
    return out


def expected(alert: str, task: str) -> dict:
    rule = alert_rules()[alert]
    annotations = {k: v.replace("{{ $labels.task }}", task) for k, v in rule["annotations"].items()}
    assert "$" not in "".join(annotations.values()), annotations
    return {
        "exp_labels": {"task": task, "severity": rule["labels"]["severity"]},
        "exp_annotations": annotations,
    }


def run_promtool(tmp_path: Path, test: dict) -> None:
    path = tmp_path / "drift_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(PROM_RULES)], **test}))
    proc = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_drift_alerts_fire_on_a_skewed_task_only(tmp_path):
    rules = alert_rules()
    for name in DRIFT_ALERTS:
        assert rules[name]["for"] == "15m", name
        assert "task:polytask_predictions:increase1h >= 200" in rules[name]["expr"], name
    # minute -> alerts firing (after the skew at minute 60: TVD > 0.2 from ~minute 85, mean
    # confidence 0.1 below dev's from ~80, truncation 5 points above dev's from ~75; each
    # then needs 15 minutes).
    checks = [
        {"eval_time": f"{minute}m", "alertname": name, "exp_alerts": alerts}
        for minute in (30, 59, 75)
        for name in DRIFT_ALERTS
        for alerts in [[]]
    ]
    checks += [
        {"eval_time": "130m", "alertname": name, "exp_alerts": [expected(name, "sst2")]}
        for name in DRIFT_ALERTS
    ]
    exprs = [
        # dev-like hour: the recent mix equals dev's exactly
        {
            "eval_time": "59m",
            "expr": 'task:polytask_label_mix_tvd:1h{task=~"sst2|trec"}',
            "exp_samples": [
                {"labels": 'task:polytask_label_mix_tvd:1h{task="sst2"}', "value": 0},
                {"labels": 'task:polytask_label_mix_tvd:1h{task="trec"}', "value": 0},
            ],
        },
        # an hour after the skew: all positive against 50/50, a label never answered counts
        {
            "eval_time": "130m",
            "expr": 'task:polytask_label_mix_tvd:1h{task="sst2"}',
            "exp_samples": [
                {"labels": 'task:polytask_label_mix_tvd:1h{task="sst2"}', "value": 0.5}
            ],
        },
        {
            "eval_time": "130m",
            "expr": 'task:polytask_prediction_confidence:mean1h{task=~"sst2|trec"}',
            "exp_samples": [
                {"labels": 'task:polytask_prediction_confidence:mean1h{task="sst2"}', "value": 0.6},
                {"labels": 'task:polytask_prediction_confidence:mean1h{task="trec"}', "value": 0.9},
            ],
        },
        {
            "eval_time": "130m",
            "expr": 'task:polytask_truncated_texts:ratio1h{task="sst2"}',
            "exp_samples": [
                {"labels": 'task:polytask_truncated_texts:ratio1h{task="sst2"}', "value": 0.25}
            ],
        },
    ]
    run_promtool(
        tmp_path,
        {
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": series(),
                    "alert_rule_test": checks,
                    "promql_expr_test": exprs,
                }
            ],
        },
    )


def test_the_rule_test_can_fail(tmp_path):
    """The scenario is not vacuous: claiming the skewed task stays quiet fails promtool."""
    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series(),
                "alert_rule_test": [
                    {"eval_time": "130m", "alertname": "PolytaskLabelMixDrift", "exp_alerts": []}
                ],
            }
        ],
    }
    path = tmp_path / "drift_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(PROM_RULES)], **test}))
    proc = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "PolytaskLabelMixDrift" in proc.stdout + proc.stderr


def test_a_loaded_model_exports_its_dev_reference_and_zero_counters():
    """What the rules read: `set_dev_reference` (called by the Encoder on every load or swap)
    exports the artifact's dev mix, confidence and truncation as gauges and creates every
    label's counter at 0; a label the next model lacks reads a share of 0."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from serving.artifact import DevReference, TaskInfo
    from serving.metrics import get_metrics

    def task(name: str, labels: list[str], shares: list[float]) -> TaskInfo:
        ref = DevReference(
            label_share=dict(zip(labels, shares, strict=True)),
            confidence_mean=0.8,
            confidence_quantiles={"0.1": 0.55, "0.5": 0.85, "0.9": 0.99},
            truncated_share=0.02,
            n=100,
        )
        return TaskInfo(name=name, labels=labels, output=f"logits_{name}", dev_reference=ref)

    def samples() -> dict[tuple[str, frozenset], float]:
        text = generate_latest(REGISTRY).decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.labels.get("task", "").startswith("drifty")
        }

    metrics = get_metrics()
    old = [task("drifty", ["neg", "pos", "meh"], [0.3, 0.6, 0.1])]
    metrics.set_dev_reference(old)
    got = samples()
    share = "polytask_dev_label_share"
    assert got[(share, frozenset({("task", "drifty"), ("label", "pos")}))] == 0.6
    assert got[("polytask_dev_confidence_mean", frozenset({("task", "drifty")}))] == 0.8
    quantile = frozenset({("task", "drifty"), ("quantile", "0.9")})
    assert got[("polytask_dev_confidence_quantile", quantile)] == 0.99
    assert got[("polytask_dev_truncated_share", frozenset({("task", "drifty")}))] == 0.02
    for label in ("neg", "pos", "meh"):  # counters exist before any answer
        key = ("polytask_predictions_total", frozenset({("task", "drifty"), ("label", label)}))
        assert got[key] == 0
    assert got[("polytask_truncated_texts_total", frozenset({("task", "drifty")}))] == 0
    # a swap to a model without "meh": its dev share reads 0, the others the new values
    metrics.set_dev_reference([task("drifty", ["neg", "pos"], [0.5, 0.5])], previous=old)
    got = samples()
    assert got[(share, frozenset({("task", "drifty"), ("label", "meh")}))] == 0
    assert got[(share, frozenset({("task", "drifty"), ("label", "pos")}))] == 0.5
