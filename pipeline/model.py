"""The aligned multi-task model (DESIGN section 2), top to bottom.

    texts -> tokenizer -> Encoder E (shared, one pass for all tasks) -> x [B, d]
    for each task i:  z_i = x R_i            alignment, d x d, identity at start (Algorithm 1)
                      h_i = B(z_i)           shared module, output width r = capacity
                      logits_i = A_i(h_i)    main tower
                      aux_i = a_i(h_i)       self-auxiliary tower (training only, not exported)
    or, for a task routed private (issue 13; the choice is pipeline/routing.py's):
                      logits_i = P_i(standardize(x))   a small head of its own, no R_i, no B
    or, for a task routed to its own path (routing.own, fine-tuned encoders only):
                      x_i = pool(T_i(states entering the top k blocks))   its own top blocks
                      logits_i = O_i(standardize(x_i))                    and its own head

R_i sits on the pooled encoder output rather than on token embeddings so that serving runs the
heavy encoder once for every task; the per-task path (R_i -> B -> A_i) is a few small matmuls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from pipeline.routing import Route

if TYPE_CHECKING:
    from pipeline.config import AuxConfig, PrivateHeadConfig, SharedConfig, TowerConfig

Activation = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
TrainableLayers = int | Literal["all"]


class Encoder(nn.Module):
    """E: a Hugging Face transformer followed by pooling.

    Masked mean pooling is the default because all-MiniLM-L6-v2 was trained with it: the
    sentence embedding is the average of the token states, padding excluded.

    Besides the whole forward pass (what is exported and served), the encoder runs in two
    halves for partial fine-tuning: `lower_states` (embeddings and the bottom layers, frozen,
    whose output is cached once per text) and `forward_from` (the top layers and pooling, which
    train). `check_layerwise` verifies that the halves compose to the whole forward pass.

    `pooled_layers` (routing's `private.layers`, issue 13): the pooled states after these
    blocks are appended to the final pooled features, [B, d] -> [B, d * (1 + len)], final
    first, so the shared path reads the first d columns as before and only a task's private
    head reads the rest. The blocks run anyway; only their pooling is added.

    `own_blocks` (routing's `own`, issue 13): task -> its own copy of the top k blocks. They
    read the token states entering block n - k (the same pass's), and each copy's pooled
    output is appended after the columns above, in `own_blocks` order: [B, d] per own task.
    Each costs k blocks per call; the blocks below them still run once.
    """

    def __init__(
        self, transformer: nn.Module, pooling: str = "mean", trainable_layers: TrainableLayers = 0
    ):
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.dim: int = transformer.config.hidden_size
        self.pooled_layers: tuple[int, ...] = ()
        self.own_blocks = nn.ModuleDict()
        self.set_trainable_layers(trainable_layers)

    @property
    def out_dim(self) -> int:
        """Width of what `forward` returns: d, times 1 + len(pooled_layers) + len(own_blocks)."""
        return self.dim * (1 + len(self.pooled_layers) + len(self.own_blocks))

    @property
    def own_start(self) -> int | None:
        """The first block the own copies replace (n - k), or None without any."""
        if not self.own_blocks:
            return None
        return self.n_layers - len(next(iter(self.own_blocks.values())))

    def add_own_blocks(self, task: str, blocks: nn.ModuleList) -> None:
        """Give `task` its own copy of the top len(blocks) blocks (appended to the features'
        columns after the ones before it). The blocks are used as given (not copied); their
        attention modules are pointed at this encoder's config, so a switch of attention
        implementation (export's eager attention) reaches them too."""
        k = len(blocks)
        if not 1 <= k <= self.n_layers:
            raise ValueError(f"an own path copies 1 to {self.n_layers} blocks, got {k}")
        if self.own_blocks and k != self.n_layers - (self.own_start or 0):
            raise ValueError(
                f"own paths must all copy the same blocks: {task} has {k}, others "
                f"{self.n_layers - (self.own_start or 0)}"
            )
        if task in self.own_blocks:
            raise ValueError(f"task {task!r} already has its own blocks")
        config = self.transformer.config
        for module in blocks.modules():
            if hasattr(module, "config") and type(module.config) is type(config):
                module.config = config
        self.own_blocks[task] = blocks

    def pretrained_top_blocks(self, k: int) -> nn.ModuleList:
        """A copy of this encoder's top k blocks (what an own path starts from when this
        encoder holds the pretrained weights)."""
        import copy

        return copy.deepcopy(transformer_layers(self.transformer)[self.n_layers - k :])

    def set_pooled_layers(self, layers: Sequence[int]) -> None:
        """Also return the pooled states after these blocks (1-based, below the last)."""
        n = self.n_layers
        bad = [x for x in layers if not 1 <= x < n]
        if bad:
            raise ValueError(
                f"routing.private.layers: {bad} are not blocks below the last of this "
                f"{n}-block encoder (1 to {n - 1})"
            )
        self.pooled_layers = tuple(sorted(set(layers)))

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(transformer_layers(self.transformer))

    def set_trainable_layers(self, n: TrainableLayers) -> None:
        """Freeze everything except the top `n` transformer layers (embeddings stay frozen);
        'all' also trains the embeddings: the whole encoder but its unused pooler."""
        self.transformer.requires_grad_(False)
        if n == "all":
            transformer_layers(self.transformer).requires_grad_(True)
            embeddings = getattr(self.transformer, "embeddings", None)
            if embeddings is not None:
                embeddings.requires_grad_(True)
        elif n > 0:
            layers = transformer_layers(self.transformer)
            for layer in layers[-n:]:
                layer.requires_grad_(True)
        self.trainable_layers = n

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states float [B, L, d] -> pooled features float [B, d] (padding excluded)."""
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # [B, L, 1]
        summed = (states * mask).sum(dim=1)  # [B, d]
        return summed / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence features.

        Args:
            input_ids: int64 [B, L].
            attention_mask: int64 [B, L], 1 for tokens, 0 for padding.

        Returns:
            float [B, out_dim]: [B, d] without `pooled_layers`.
        """
        if not self.pooled_layers and not self.own_blocks:
            states = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
            return self.pool(states, attention_mask)  # [B, L, d] -> [B, d]
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )  # hidden_states[i]: after block i, [B, L, d]; [0] the embeddings
        return torch.cat(
            [self.pool(out[0], attention_mask)]
            + [self.pool(out.hidden_states[i], attention_mask) for i in self.pooled_layers]
            + self._own_features(out.hidden_states[self.own_start or 0], attention_mask),
            dim=-1,
        )

    def _own_features(self, entering: torch.Tensor, attention_mask: torch.Tensor) -> list:
        """Each own copy's pooled output [B, d] from the states entering its first block."""
        return [
            self.pool(self.run_blocks(entering, attention_mask, blocks), attention_mask)
            for blocks in self.own_blocks.values()
        ]

    def run_layers(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Transformer blocks `start:stop` on token states [B, L, d] -> [B, L, d]."""
        return self.run_blocks(
            hidden, attention_mask, transformer_layers(self.transformer)[start:stop]
        )

    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, blocks: Sequence[nn.Module]
    ) -> torch.Tensor:
        """`blocks` (this encoder's or an own copy) on token states [B, L, d] -> [B, L, d]."""
        from transformers.masking_utils import create_bidirectional_mask  # deferred: slow import

        mask = create_bidirectional_mask(
            config=self.transformer.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in blocks:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def lower_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_lower: int
    ) -> torch.Tensor:
        """The token states after the bottom `n_lower` blocks, float [B, L, d]."""
        hidden = self.transformer.embeddings(input_ids=input_ids)  # [B, L, d]
        return self.run_layers(hidden, attention_mask, 0, n_lower)

    def forward_from(
        self, states: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Pooled features [B, out_dim] from the token states [B, L, d] entering block `start`.
        Each of `pooled_layers` must be `start` (the states given) or above."""
        if self.own_blocks:
            own_start = self.own_start or 0
            if own_start < start:
                raise ValueError(
                    f"the own paths' blocks start at block {own_start}, below the states "
                    f"given (entering block {start})"
                )
            # The blocks between `start` and the copies run twice when the copies are fewer
            # than the blocks above the states given (never in the shipped layout, where they
            # are the same blocks); taps below the copies stay right either way.
            entering = self.run_layers(states, attention_mask, start, own_start)
            own = self._own_features(entering, attention_mask)
            return torch.cat(
                [self._forward_from_shared(states, attention_mask, start), *own], dim=-1
            )
        return self._forward_from_shared(states, attention_mask, start)

    def _forward_from_shared(
        self, states: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> torch.Tensor:
        """forward_from's columns before the own paths': [B, d * (1 + len(pooled_layers))]."""
        if not self.pooled_layers:
            return self.pool(self.run_layers(states, attention_mask, start), attention_mask)
        if self.pooled_layers[0] < start:
            raise ValueError(
                f"routing.private.layers: block {self.pooled_layers[0]} lies below the cached "
                f"bottom blocks' output (block {start}); choose blocks from {start} up"
            )
        taps, at = [], start
        for layer in self.pooled_layers:
            states = self.run_layers(states, attention_mask, at, layer)
            taps.append(self.pool(states, attention_mask))
            at = layer
        top = self.run_layers(states, attention_mask, at)
        return torch.cat([self.pool(top, attention_mask), *taps], dim=-1)

    @torch.no_grad()
    def check_layerwise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
        """Largest difference between the whole forward pass and the two halves composed
        (split after the first block); raises if this encoder's blocks cannot run alone."""
        was_training = self.training
        self.eval()
        try:
            whole = self.forward(input_ids, attention_mask)
            halves = self.forward_from(
                self.lower_states(input_ids, attention_mask, 1), attention_mask, 1
            )
        finally:
            self.train(was_training)
        diff = float((whole - halves).abs().max())
        if not diff <= 1e-4 * max(1.0, float(whole.abs().max())):
            raise ValueError(
                f"{type(self.transformer).__name__}: running its layers one by one differs from "
                f"its forward pass (max difference {diff:.3g}), so its bottom layers cannot be "
                "cached; use encoder.trainable_layers: all with this model"
            )
        return diff


def transformer_layers(transformer: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of common Hugging Face encoders (BERT, RoBERTa, DistilBERT,
    MPNet, DeBERTa, ...)."""
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers", "layer"):
        node: object = transformer
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise ValueError(
        f"cannot find the transformer layers of {type(transformer).__name__} to unfreeze; "
        "use encoder.trainable_layers: 0 with this model"
    )


def load_encoder(
    path: str | Path, pooling: str = "mean", trainable_layers: TrainableLayers = 0
) -> Encoder:
    """An Encoder from a local Hugging Face model directory (or hub id, if allowed upstream)."""
    from transformers import AutoModel  # deferred: transformers takes seconds to import

    transformer = AutoModel.from_pretrained(str(path))
    if isinstance(trainable_layers, int) and trainable_layers > 0:
        n_layers = len(transformer_layers(transformer))
        if trainable_layers > n_layers:
            raise ValueError(
                f"encoder.trainable_layers: {trainable_layers} but the encoder has {n_layers} "
                "layers"
            )
    return Encoder(transformer, pooling=pooling, trainable_layers=trainable_layers)


def cached_layers(trainable_layers: TrainableLayers, n_layers: int) -> int:
    """How many bottom blocks run once with their output cached: n_layers - N when
    0 < N < n_layers, else 0 (a frozen encoder caches pooled features instead; N = n_layers and
    'all' train from token ids)."""
    if trainable_layers == "all" or trainable_layers == 0 or trainable_layers >= n_layers:
        return 0
    return n_layers - trainable_layers


class SharedModule(nn.Module):
    """B: an MLP from d to r (the capacity), with g applied after every layer."""

    def __init__(
        self,
        in_dim: int,
        capacity: int,
        hidden_sizes: Sequence[int] = (),
        dropout: float = 0.1,
        activation: str = "relu",
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for size in [*hidden_sizes, capacity]:
            layers += [nn.Linear(width, size), Activation[activation](), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers)
        self.capacity = capacity

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, r]."""
        return self.net(z)


def main_tower(capacity: int, num_classes: int, hidden_size: int, dropout: float) -> nn.Module:
    """A_i: linear, or one hidden layer when `hidden_size` > 0. [B, r] -> [B, C]."""
    if hidden_size == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(capacity, num_classes))
    return nn.Sequential(
        nn.Linear(capacity, hidden_size),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_size, num_classes),
    )


class AuxTower(nn.Module):
    """a_i: an under-parameterized self-auxiliary tower (paper 2), near-linear by design.

    kind: 'linear' (one layer), 'bottleneck' (linear through a few units, no non-linearity) or
    'pool' (average pooling of h by `pool_size`, then linear). Logits are divided by
    `temperature`, as in some of the paper's released runs.
    """

    def __init__(
        self,
        capacity: int,
        num_classes: int,
        kind: str = "linear",
        bottleneck_size: int = 8,
        pool_size: int = 4,
        temperature: float = 1.0,
    ):
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(capacity, num_classes)
        elif kind == "bottleneck":
            self.net = nn.Sequential(
                nn.Linear(capacity, bottleneck_size), nn.Linear(bottleneck_size, num_classes)
            )
        elif kind == "pool":
            pooled = max(capacity // pool_size, 1)
            self.net = nn.Sequential(nn.AdaptiveAvgPool1d(pooled), nn.Linear(pooled, num_classes))
        else:
            raise ValueError(f"unknown aux tower kind {kind!r}")
        self.temperature = temperature

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, r] -> [B, C]."""
        return self.net(h) / self.temperature


class PrivateEnsemble(nn.Module):
    """K private MLPs of one layout trained side by side (each from its own initialization,
    batch order and dropout); the task's answer is the mean of their logits. [B, d] -> [B, C].

    Why: on senteval6 one private MLP's best-epoch dev accuracy moves by about a point with its
    seed, and the mean of five is steadier and higher (docs/results.md, *Routing*, "Session 10").
    The members' weights are stacked, `weights[j]` [K, in_j, out_j] and `biases[j]` [K, 1, out_j],
    so training runs all members in one batched matmul per layer (`member_logits`). `forward`,
    what evaluation and the exported graph run, computes the same mean with the first layer of
    all members as one [d, K*h1] matmul and the last layer plus the mean as one [K*h, C] matmul.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_sizes: Sequence[int],
        dropout: float,
        members: int,
    ):
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}")
        self.members = members
        widths = [in_dim, *hidden_sizes, num_classes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            # nn.Linear's default initialization, drawn per member.
            bound = 1.0 / fan_in**0.5
            self.weights.append(nn.Parameter(torch.empty(members, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, fan_out)))
            nn.init.uniform_(self.weights[-1], -bound, bound)
            nn.init.uniform_(self.biases[-1], -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.linear = not hidden_sizes

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits: x [B, d] (the same rows for all) or [K, B, d] (each member's
        own rows) -> [K, B, C]."""
        h = self.dropout(x) if self.linear else x
        last = len(self.weights) - 1
        for j, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.matmul(h, w) + b
            if j < last:
                h = self.dropout(torch.relu(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, C], the members' mean logits, computed without `member_logits`'
        broadcast over the shared input: the first layer of all members is one [d, K*h1]
        matmul, and the last layer and the mean are one [K*h, C] matmul (the weights' reshapes
        fold into constants in the exported graph). The same function; at 8-64 rows
        onnxruntime ran four such heads 1.2-1.4x faster than the broadcast form, and the whole
        served model 2% faster (docs/results.md, 'Run 15')."""
        k = self.members
        w, b = list(self.weights), list(self.biases)
        h = self.dropout(x) if self.linear else x
        if len(w) == 1:  # a linear head: the mean of K linear maps is one linear map
            return h @ w[0].mean(0) + b[0].mean(0)
        # Static widths from the parameters; -1 only for the batch, so the exported graph's
        # output keeps its class dimension.
        _, d, h1 = w[0].shape
        _, last, c = w[-1].shape
        h = h @ w[0].transpose(0, 1).reshape(d, k * h1) + b[0].transpose(0, 1).reshape(1, k * h1)
        h = self.dropout(torch.relu(h)).reshape(-1, k, h1).transpose(0, 1)  # [K, B, h1]
        for wj, bj in zip(w[1:-1], b[1:-1], strict=True):  # middle layers: per member
            h = self.dropout(torch.relu(torch.matmul(h, wj) + bj))
        h = h.transpose(0, 1).reshape(-1, k * last)  # [B, K*h]
        return h @ (w[-1].reshape(k * last, c) / k) + b[-1].mean(0)


def private_head(
    in_dim: int,
    num_classes: int,
    hidden_sizes: Sequence[int],
    dropout: float,
    members: int = 1,
) -> nn.Module:
    """P_i, a task's private path: an MLP on the standardized encoder features, each hidden
    layer Linear + ReLU + Dropout, then a linear output. [B, d] -> [B, C]. It shares nothing
    with the other tasks, so it cannot suffer their interference (nor gain from them). With
    one hidden layer it is the layout (and the parameter names) of a one-layer main tower.
    With `members` > 1, a PrivateEnsemble of that many such MLPs."""
    if members > 1:
        return PrivateEnsemble(in_dim, num_classes, hidden_sizes, dropout, members)
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    if not layers:  # a linear head: the layout of a linear main tower
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class MultiTaskHeads(nn.Module):
    """Everything after the encoder: R_i, B, A_i and a_i for every task, and the private
    heads P_i when routing is on. `routes` says which path answers each task (all shared
    until the routing stage chooses; a plain attribute: run.json records it, not the weights).

    `own` (routing.own): task -> the head of its own path, reading that task's own columns of
    the features (after the `in_dim` ones, d = `shared_dim` each, in `own` order, the order of
    the encoder's `own_blocks`), standardized with the final features' statistics (the own
    copy starts from the pretrained blocks, whose output those statistics describe).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: Mapping[str, int],
        capacity: int = 100,
        hidden_sizes: Sequence[int] = (),
        shared_dropout: float = 0.1,
        activation: str = "relu",
        tower_hidden: int = 0,
        tower_dropout: float = 0.1,
        aux_kind: str | None = "linear",
        aux_bottleneck: int = 8,
        aux_pool: int = 4,
        aux_temperature: float = 1.0,
        private_hidden: Sequence[int] | None = None,
        private_dropout: float = 0.1,
        private_members: int = 1,
        shared_dim: int | None = None,
    ):
        super().__init__()
        # The shared path reads the first `shared_dim` feature columns (the final pooled
        # features); the private heads read all `in_dim` (with the encoder's `pooled_layers`).
        shared_dim = in_dim if shared_dim is None else shared_dim
        if not 0 < shared_dim <= in_dim:
            raise ValueError(f"shared_dim {shared_dim} must be in 1..in_dim ({in_dim})")
        self.shared_dim = shared_dim
        self.tasks = list(num_classes)
        self.routes: dict[str, Route] = {t: "shared" for t in self.tasks}
        # A fixed standardization of the pooled features (training-set statistics, set by
        # set_feature_stats). Pooled transformer features have a large shared mean and small
        # per-dimension spread; centring and scaling them lets one learning rate fit all.
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        # Identity init: before stage 2 the model is exactly the unaligned MTL model.
        self.alignment = nn.ParameterDict(
            {t: nn.Parameter(torch.eye(shared_dim)) for t in self.tasks}
        )
        self.shared = SharedModule(shared_dim, capacity, hidden_sizes, shared_dropout, activation)
        self.towers = nn.ModuleDict(
            {
                t: main_tower(capacity, c, tower_hidden, tower_dropout)
                for t, c in num_classes.items()
            }
        )
        self.aux = nn.ModuleDict(
            {}
            if aux_kind is None
            else {
                t: AuxTower(capacity, c, aux_kind, aux_bottleneck, aux_pool, aux_temperature)
                for t, c in num_classes.items()
            }
        )
        self.private = nn.ModuleDict(
            {}
            if private_hidden is None
            else {
                t: private_head(in_dim, c, private_hidden, private_dropout, private_members)
                for t, c in num_classes.items()
            }
        )
        self.own = nn.ModuleDict()

    def add_own_head(self, task: str, head: nn.Module) -> None:
        """The head of `task`'s own path, [B, shared_dim] -> [B, C]; its columns come after
        those of the own heads added before it."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}")
        if task in self.own:
            raise ValueError(f"task {task!r} already has an own head")
        self.own[task] = head

    def own_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """`task`'s own path's standardized features: [B, in_dim + k*d] -> [B, d]."""
        d = self.shared_dim
        start = int(self.feature_mean.shape[0]) + d * list(self.own).index(task)
        return (x[..., start : start + d] - self.feature_mean[:d]) / self.feature_std[:d]

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardize inputs with these [d] statistics (std is floored to avoid blow-ups)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-6))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std with the training-set statistics. [B, >= in_dim] -> [B, in_dim]
        (the own paths' columns, if any, are not read)."""
        width = int(self.feature_mean.shape[0])
        if x.shape[-1] != width:
            x = x[..., :width]
        return (x - self.feature_mean) / self.feature_std

    def align(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """z_i = standardize(x)[:, :shared_dim] R_i. [B, in_dim] -> [B, shared_dim]."""
        z = self.standardize(x)
        if self.shared_dim < z.shape[-1]:
            z = z[..., : self.shared_dim]
        return z @ self.alignment[task]

    def forward(
        self, x: torch.Tensor, task: str, with_aux: bool = False, path: Route | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One task's logits from pooled features.

        Args:
            x: float [B, in_dim] encoder features (the shared path reads [:, :shared_dim]).
            task: Task name.
            with_aux: Also return the self-auxiliary logits (shared path only).
            path: "shared", "private" or "own"; default the task's route.

        Returns:
            main logits [B, C] and aux logits [B, C] (None unless `with_aux` and aux towers exist
            and the path is shared).
        """
        route = path or self.routes[task]
        if route == "private":
            return self.private[task](self.standardize(x)), None
        if route == "own":
            return self.own[task](self.own_features(x, task)), None
        h = self.shared(self.align(x, task))  # [B, r]
        logits = self.towers[task](h)
        aux = self.aux[task](h) if with_aux and task in self.aux else None
        return logits, aux

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every task's main logits, in task order: ([B, C_1], ..., [B, C_k])."""
        return tuple(self.forward(x, t)[0] for t in self.tasks)


class MultiTaskModel(nn.Module):
    """E + heads: what is exported and served (no self-auxiliary towers are used)."""

    def __init__(self, encoder: Encoder, heads: MultiTaskHeads):
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """int64 [B, L] x 2 -> one logits tensor [B, C_i] per task, in task order."""
        return self.heads.forward_all(self.encoder(input_ids, attention_mask))


def build_heads(
    in_dim: int,
    num_classes: Mapping[str, int],
    shared: SharedConfig,
    towers: TowerConfig,
    aux: AuxConfig,
    private: PrivateHeadConfig | None = None,
) -> MultiTaskHeads:
    """MultiTaskHeads from the config sections; with `private`, also the private heads.

    `in_dim` is the encoder's hidden size d: the heads read d * (1 + len(private.layers))
    columns, the shared path the first d (Encoder.pooled_layers)."""
    taps = len(private.layers) if private is not None else 0
    return MultiTaskHeads(
        in_dim * (1 + taps),
        num_classes,
        capacity=shared.capacity,
        hidden_sizes=list(shared.hidden_sizes),
        shared_dropout=shared.dropout,
        activation=shared.activation,
        tower_hidden=towers.hidden_size,
        tower_dropout=towers.dropout,
        aux_kind=aux.kind if aux.enabled else None,
        aux_bottleneck=aux.bottleneck_size,
        aux_pool=aux.pool_size,
        aux_temperature=aux.temperature,
        private_hidden=list(private.hidden_sizes) if private is not None else None,
        private_dropout=private.dropout if private is not None else 0.1,
        private_members=private.members if private is not None else 1,
        shared_dim=in_dim,
    )
