"""Training and serving alerts of infra/prometheus/alerts.yml, unit-tested with `promtool test
rules` on synthetic series (promtool must be installed, as for test_infra.py). The rules run
with their annotations left out (their templates are checked by `promtool check rules` in
test_infra.py): these tests are about when each expression fires, and for which labels.

Scenarios from the session 24 review (docs/review-s24.md): retraining alerts that one config's
success hid for another, a first refusal no alert saw, and 503s of the connection limit that
no serving alert counted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from test_infra import PROM_RULES, promtool

JOB = "polytask_retrain"


def run_rule_tests(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    rules = yaml.safe_load(PROM_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "test.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    return subprocess.run(
        [promtool(), "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    proc = run_rule_tests(tmp_path, tests)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{sel}}}", "values": values}


def expect(alert: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": dict(lab)} for lab in labels],
    }


SUCCESS = "polytask_retrain_last_success_timestamp_seconds"
FAILURE = "polytask_retrain_last_failure_timestamp_seconds"
WARNING = {"severity": "warning", "job": JOB}


def test_retraining_alerts_are_per_config(tmp_path):
    # A sample a minute (Prometheus looks back 5 minutes for one) for 2 days. Config a last
    # succeeded at minute 0 and has failed every minute since; b succeeds every minute; c was
    # added at hour 10 and has only ever failed.
    check(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series(SUCCESS, "0x3000", job=JOB, config="a"),
                    series(FAILURE, "0+60x3000", job=JOB, config="a"),
                    series(SUCCESS, "0+60x3000", job=JOB, config="b"),
                    series(FAILURE, "_x599 36000+60x2400", job=JOB, config="c"),
                ],
                "alert_rule_test": [
                    # a is stale once 26 h (plus the rule's 10 m) passed; b never is.
                    expect("PolytaskRetrainingStale", "20h"),
                    expect("PolytaskRetrainingStale", "48h", {**WARNING, "config": "a"}),
                    # The latest run of a failed, and c never succeeded; b is fine.
                    expect(
                        "PolytaskRetrainingFailed",
                        "12h",
                        {**WARNING, "config": "a"},
                        {**WARNING, "config": "c"},
                    ),
                    # Something succeeded, so the "nothing ever pushed" alert stays quiet.
                    expect("PolytaskRetrainingNeverSucceeded", "48h"),
                ],
            }
        ],
    )


def test_a_success_after_a_failure_resolves_the_failed_alert(tmp_path):
    check(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    # success at 0 h, failure at 3 h, success again at 6 h
                    series(SUCCESS, "0x359 21600x300", job=JOB, config="a"),
                    series(FAILURE, "_x179 10800x480", job=JOB, config="a"),
                ],
                "alert_rule_test": [
                    expect("PolytaskRetrainingFailed", "2h"),
                    expect("PolytaskRetrainingFailed", "4h", {**WARNING, "config": "a"}),
                    expect("PolytaskRetrainingFailed", "8h"),
                ],
            }
        ],
    )


def test_the_first_refusal_on_a_new_pushgateway_fires(tmp_path):
    # The first push creates both series, `refused` at 1: increase() sees no rise.
    refused = {"job": JOB, "config": "a", "decision": "refused"}
    check(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series("polytask_promotion_decisions_total", "_x10 1x500", **refused),
                    series(
                        "polytask_promotion_decisions_total",
                        "_x10 0x500",
                        job=JOB,
                        config="a",
                        decision="promoted",
                    ),
                ],
                "alert_rule_test": [
                    expect("PolytaskChallengerRefused", "5m"),
                    expect("PolytaskChallengerRefused", "30m", {"severity": "info", **refused}),
                    expect("PolytaskChallengerRefused", "7h"),  # 6 h later, nothing new
                ],
            }
        ],
    )


def test_a_later_refusal_still_fires_by_its_increase(tmp_path):
    refused = {"job": JOB, "config": "a", "decision": "refused"}
    check(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [
                    series("polytask_promotion_decisions_total", "1x500 2x500", **refused)
                ],
                "alert_rule_test": [
                    expect("PolytaskChallengerRefused", "400m"),
                    expect("PolytaskChallengerRefused", "560m", {"severity": "info", **refused}),
                ],
            }
        ],
    )


SERVE = {"job": "polytask-serve"}
REQUESTS = "bentoml_service_request_total"
REJECTED = "polytask_rejected_requests_total"
CRITICAL = {"severity": "critical"}


def _serving(tmp_path: Path, too_many: str | None, at: str, firing: bool) -> None:
    inputs = [
        series(REQUESTS, "0+60x60", endpoint="/predict", http_response_code="200", **SERVE),
        series(REJECTED, "0+1x60", reason="invalid_text", **SERVE),
    ]
    if too_many is not None:
        inputs.append(series(REJECTED, too_many, reason="too_many_connections", **SERVE))
    alerts = [CRITICAL] if firing else []
    check(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    expect("PolytaskServingUnavailable", at, *alerts),
                    expect("PolytaskServingErrorRate", at, *alerts),
                ],
            }
        ],
    )


def test_connection_limit_503s_count_in_the_serving_alerts(tmp_path):
    # 60 requests a minute reach BentoML; 120 more a minute are refused at the limit: two
    # thirds of the clients get 503, which BentoML's counter never sees.
    _serving(tmp_path, "0+120x60", "30m", firing=True)


def test_serving_alerts_stay_quiet_without_503s(tmp_path):
    _serving(tmp_path, None, "30m", firing=False)  # no too_many_connections series at all
    _serving(tmp_path, "0x60", "30m", firing=False)  # the series exists, at 0


def test_the_rule_tests_can_fail(tmp_path):
    """Not vacuous: claiming config b is stale fails promtool."""
    proc = run_rule_tests(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": [series(SUCCESS, "0+60x3000", job=JOB, config="b")],
                "alert_rule_test": [
                    expect("PolytaskRetrainingStale", "48h", {**WARNING, "config": "b"})
                ],
            }
        ],
    )
    assert proc.returncode != 0 and "PolytaskRetrainingStale" in proc.stdout + proc.stderr
