"""bench/gpu_path.py, the script that runs the GPU path on a lent GPU: here it runs its CPU
fallback end to end on the tiny encoder and data, so a broken check is found before a GPU is."""

from __future__ import annotations

import json

import yaml
from conftest import load_repo_script, tiny_config_dict


def load_script():
    return load_repo_script("bench/gpu_path.py")


def test_gpu_path_runs_every_check_on_the_cpu(tmp_path, tiny_data_dir, tiny_encoder_dir, capsys):
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    cfg["encoder"]["trainable_layers"] = 1  # the fine-tuning path: cached states of layer 1
    cfg["train"]["epochs"] = 2
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    argv = ["--encoder", str(tiny_encoder_dir), "--data-root", str(tiny_data_dir)]
    argv += ["--config", str(config), "--out", str(out)]
    assert load_script().main(argv) == 0
    assert "no CUDA device" in capsys.readouterr().out

    got = json.loads((out / "gpu_path.json").read_text())
    assert got["selection"]["precision_auto"] == "fp32"  # no CUDA: auto is fp32
    assert got["selection"]["chosen_auto"] == ["CPUExecutionProvider"]
    parity = got["parity"]
    assert parity["finite"] and parity["device_fp32_vs_fp64"] < 1e-5
    assert 1e-6 < parity["device_bf16_autocast_vs_fp64"] < 5e-2  # bf16 rounding shows
    step = got["train_step"]  # CPU against CPU: the same function, bit for bit
    assert step["same_grad_set"] and step["grad_tensors"] > 0 and step["grad_rel_err"] == 0.0
    assert got["throughput"]["fp32_batch128"]["texts_per_s"] > 0
    training = got["training"]
    assert [e[0] for e in training["epochs"]] == ["joint", "joint", "align", "align", "final"]
    assert set(training["dev_accuracy"]) == {"sentiment", "topic"}
    assert set(training["routes"]) == {"sentiment", "topic"}
    # The selected checkpoint, reloaded on a fresh CPU module, answers as the trained one did.
    assert training["cpu_fp32_dev_accuracy"] == training["dev_accuracy"]
