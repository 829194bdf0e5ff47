"""The aligned multi-task model: shapes, identity alignment at start, standardization, small
self-auxiliary towers, masked mean pooling and partial fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, parse_config
from pipeline.model import (
    AuxTower,
    Encoder,
    MultiTaskHeads,
    MultiTaskModel,
    build_heads,
    load_encoder,
    main_tower,
    transformer_layers,
)

DIM = 32
NUM_CLASSES = {"sentiment": 2, "topic": 3}


def _heads(**kwargs: object) -> MultiTaskHeads:
    torch.manual_seed(0)
    return MultiTaskHeads(DIM, NUM_CLASSES, capacity=16, **kwargs).eval()


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_encoder_dir))


@pytest.mark.parametrize("batch", [1, 5])
def test_forward_all_returns_one_logits_tensor_per_task(batch):
    heads = _heads(hidden_sizes=[24], tower_hidden=8)
    outputs = heads.forward_all(torch.randn(batch, DIM))
    assert [tuple(o.shape) for o in outputs] == [(batch, 2), (batch, 3)]


@pytest.mark.parametrize("batch", [1, 5])
def test_forward_with_aux(batch):
    heads = _heads()
    logits, aux = heads(torch.randn(batch, DIM), "topic", with_aux=True)
    assert logits.shape == aux.shape == (batch, 3)
    assert heads(torch.randn(batch, DIM), "topic")[1] is None
    assert _heads(aux_kind=None)(torch.randn(batch, DIM), "topic", with_aux=True)[1] is None


def test_alignment_is_exactly_identity_at_init():
    heads = _heads()
    assert list(heads.alignment) == ["sentiment", "topic"]
    for r in heads.alignment.values():
        assert r.shape == (DIM, DIM)
        assert torch.equal(r.detach(), torch.eye(DIM))


def test_aligned_model_equals_unaligned_computation_at_init():
    heads = _heads(hidden_sizes=[24])
    x = torch.randn(6, DIM)
    for task in heads.tasks:
        unaligned = heads.towers[task](heads.shared(x))
        torch.testing.assert_close(heads(x, task)[0], unaligned, rtol=0, atol=0)
    # Not vacuous: a non-identity R_i does change the output.
    with torch.no_grad():
        heads.alignment["topic"].mul_(2.0)
    assert not torch.allclose(heads(x, "topic")[0], heads.towers["topic"](heads.shared(x)))


def test_feature_standardization_is_applied():
    heads = _heads()
    x = torch.randn(4, DIM) * 3 + 5
    mean, std = x.mean(0), x.std(0)
    heads.set_feature_stats(mean, std)
    z = heads.align(x, "sentiment")
    torch.testing.assert_close(z, (x - mean) / std)
    torch.testing.assert_close(
        heads(x, "sentiment")[0], heads.towers["sentiment"](heads.shared((x - mean) / std))
    )
    # Statistics are buffers (saved and exported with the model), not trained parameters.
    assert {"feature_mean", "feature_std"} <= set(heads.state_dict())
    assert "feature_mean" not in dict(heads.named_parameters())


def test_zero_std_is_floored():
    heads = _heads()
    heads.set_feature_stats(torch.zeros(DIM), torch.zeros(DIM))
    assert torch.isfinite(heads.align(torch.randn(3, DIM), "topic")).all()
    assert heads.feature_std.min().item() == pytest.approx(1e-6)


@pytest.mark.parametrize("kind", ["linear", "bottleneck", "pool"])
@pytest.mark.parametrize("batch", [1, 5])
def test_aux_tower_kinds_shape(kind, batch):
    tower = AuxTower(capacity=100, num_classes=3, kind=kind)
    assert tower(torch.randn(batch, 100)).shape == (batch, 3)


@pytest.mark.parametrize("kind", ["linear", "bottleneck", "pool"])
def test_aux_towers_are_far_smaller_than_a_hidden_main_tower(kind):
    aux = AuxTower(capacity=100, num_classes=3, kind=kind, bottleneck_size=8, pool_size=4)
    main = main_tower(capacity=100, num_classes=3, hidden_size=256, dropout=0.1)
    assert _n_params(aux) * 20 < _n_params(main)
    # The bottleneck really squeezes through 8 units, the pool through 100 / 4.
    if kind == "bottleneck":
        assert _n_params(aux) == 100 * 8 + 8 + 8 * 3 + 3
    if kind == "pool":
        assert _n_params(aux) == 25 * 3 + 3


def test_aux_temperature_divides_logits():
    torch.manual_seed(0)
    cold = AuxTower(16, 3, "linear", temperature=20.0)
    plain = AuxTower(16, 3, "linear")
    plain.load_state_dict(cold.state_dict())
    h = torch.randn(4, 16)
    torch.testing.assert_close(cold(h), plain(h) / 20.0)


def test_unknown_aux_kind_raises():
    with pytest.raises(ValueError, match="unknown aux tower kind 'mlp'"):
        AuxTower(16, 3, "mlp")


def test_build_heads_from_config_sections():
    config = parse_config(
        {
            "tasks": [{"name": "sentiment"}, {"name": "topic"}],
            "shared": {"capacity": 12, "hidden_sizes": [20], "activation": "tanh"},
            "towers": {"hidden_size": 6},
            "aux": {"kind": "bottleneck", "bottleneck_size": 4},
        }
    )
    heads = build_heads(DIM, NUM_CLASSES, config.shared, config.towers, config.aux).eval()
    assert heads.shared.capacity == 12
    assert heads.shared(torch.randn(2, DIM)).shape == (2, 12)
    assert isinstance(heads.shared.net[1], nn.Tanh)
    assert heads.towers["topic"][0].out_features == 6
    assert heads.aux["topic"].net[0].out_features == 4
    no_aux = config.aux.model_copy(update={"enabled": False})
    heads = build_heads(DIM, NUM_CLASSES, config.shared, config.towers, no_aux)
    assert len(heads.aux) == 0


@pytest.mark.parametrize("name", ["type", "train", "eval"])
def test_every_valid_task_name_builds_a_model_or_is_rejected_by_config(name):
    raw = {"tasks": [{"name": name}, {"name": "other"}]}
    try:
        config = parse_config(raw)
    except ConfigError as err:
        assert any("tasks[0].name" in e and name in e for e in err.errors)
        return
    heads = MultiTaskHeads(DIM, {t: 2 for t in config.task_names}, capacity=8).eval()
    assert [o.shape for o in heads.forward_all(torch.randn(3, DIM))] == [(3, 2), (3, 2)]


def _encode(tokenizer, texts: list[str], **kwargs: object) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, return_tensors="pt", **kwargs)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_mean_pooling_ignores_padding(tiny_encoder_dir, tokenizer):
    encoder = load_encoder(tiny_encoder_dir).eval()
    text = "the good film was great"
    with torch.no_grad():
        bare = encoder(**_encode(tokenizer, [text]))
        padded_inputs = _encode(tokenizer, [text], padding="max_length", max_length=24)
        padded = encoder(**padded_inputs)
        # In a batch with a longer text, the short one is padded too.
        batch = encoder(
            **_encode(
                tokenizer, [text, "the pizza and the bread and the soup were nice"], padding=True
            )
        )
    assert bare.shape == (1, DIM)
    assert padded_inputs["attention_mask"].sum() < 24  # padding was really added
    torch.testing.assert_close(padded, bare, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch[:1], bare, rtol=1e-5, atol=1e-5)
    # Not vacuous: an unmasked mean over the padded states differs.
    with torch.no_grad():
        states = encoder.transformer(**padded_inputs)[0]
    assert not torch.allclose(states.mean(dim=1), bare, atol=1e-3)


def test_cls_pooling_takes_first_token(tiny_encoder_dir, tokenizer):
    encoder = load_encoder(tiny_encoder_dir, pooling="cls").eval()
    inputs = _encode(tokenizer, ["good film", "bad food"], padding=True)
    with torch.no_grad():
        pooled = encoder(**inputs)
        states = encoder.transformer(**inputs)[0]
    torch.testing.assert_close(pooled, states[:, 0])


@pytest.mark.parametrize("batch", [1, 5])
def test_multitask_model_end_to_end_shapes(tiny_encoder_dir, tokenizer, batch):
    model = MultiTaskModel(load_encoder(tiny_encoder_dir), _heads()).eval()
    inputs = _encode(tokenizer, ["good film"] * batch, padding="max_length", max_length=12)
    with torch.no_grad():
        outputs = model(**inputs)
    assert [tuple(o.shape) for o in outputs] == [(batch, 2), (batch, 3)]


def _trainable(encoder: Encoder) -> set[str]:
    return {name for name, p in encoder.transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("n", [0, 1, 2])
def test_trainable_layers_unfreezes_only_the_top_layers(tiny_encoder_dir, n):
    encoder = load_encoder(tiny_encoder_dir, trainable_layers=n)
    layers = transformer_layers(encoder.transformer)
    assert len(layers) == 2
    expected = {
        f"encoder.layer.{i}.{name}"
        for i in range(2 - n, 2)
        for name, _ in layers[i].named_parameters()
    }
    assert _trainable(encoder) == expected
    n_trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert n_trainable == sum(_n_params(layer) for layer in list(layers)[2 - n :])
    assert encoder.trainable_layers == n


def test_set_trainable_layers_can_refreeze(tiny_encoder_dir):
    encoder = load_encoder(tiny_encoder_dir, trainable_layers=2)
    encoder.set_trainable_layers(0)
    assert _trainable(encoder) == set()


def test_more_trainable_layers_than_exist_raises(tiny_encoder_dir):
    with pytest.raises(
        ValueError, match=r"encoder.trainable_layers: 3 but the encoder has 2 layers"
    ):
        load_encoder(tiny_encoder_dir, trainable_layers=3)


def test_transformer_layers_of_unknown_model_raises():
    with pytest.raises(ValueError, match="cannot find the transformer layers of Linear"):
        transformer_layers(nn.Linear(2, 2))
