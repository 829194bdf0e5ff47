"""An artifact's graph cut where the task heads begin: the encoder part and the heads part.

Why: on the data-parallel path a session.run computes one length bucket, about 9 dev texts at
saturation, and every run of the whole graph also reads all task heads' weights. Five-member
private paths hold ~26 MB of them, which the encoder has pushed out of the core's caches by
then, so the heads cost several times what they cost alone (docs/results.md, issue 11, "Run
16"). Cut in two, the encoder part runs per bucket and the heads part once per call, on all of
the call's texts at once. Same nodes, same weights: the function is the graph's.

The cut is found by position, as export's int8 variants find the heads (`head_nodes`): every
node downstream of one that reads a `heads.*` weight. The heads part reads only what the
encoder part hands it (the pooled features), never a graph input; a graph where that does not
hold, or with control flow, is not cut (`split_heads` returns None and the runtime runs it
whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEAD_WEIGHT_PREFIX = "heads."


def head_nodes(proto: Any) -> set[str]:
    """Names of the nodes that compute the task heads: every node downstream of one that
    reads a `heads.*` initializer (the standardization of the pooled features comes first).
    By position, not by weight name: the exporter folds some head weights into constants of
    its own naming (a private ensemble's `[K*h, C]` last layer, `div_3`), which a name test
    would take for encoder weights."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name for i in proto.graph.initializer if i.name.startswith(HEAD_WEIGHT_PREFIX)}
    todo = [n for n in proto.graph.node if any(i in inits for i in n.input)]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for out in node.output:
            todo.extend(consumers.get(out, []))
    return seen


@dataclass(frozen=True)
class SplitGraph:
    """The two parts of a graph, serialized (what `onnxruntime.InferenceSession` takes).

    encoder: graph inputs -> `boundary` tensors, e.g. the pooled features [B, d].
    heads: `boundary` tensors -> the graph's outputs (every task's logits [B, C_t]).
    """

    encoder: bytes
    heads: bytes
    boundary: list[str]


def split_heads(path: str | Path) -> SplitGraph | None:
    """`path`'s graph cut where the task heads begin, or None where it cannot be cut cleanly:
    no `heads.*` weights, a node with a subgraph (control flow), a head node that reads a graph
    input, a graph output the encoder part computes, or a boundary tensor whose type shape
    inference cannot tell."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path))
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in proto.graph.node
        for a in n.attribute
    ):
        return None
    heads = head_nodes(proto)
    if not heads:
        return None
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    head_list = [n for n in graph.node if n.name in heads]
    # Constant nodes have no inputs, so none is downstream of a head weight: each goes to the
    # part(s) that read it.
    constants = {out: n for n in graph.node if n.op_type == "Constant" for out in n.output}
    encoder_list = [n for n in graph.node if n.name not in heads and n.op_type != "Constant"]
    produced = {out for n in encoder_list for out in n.output}
    head_reads = {name for n in head_list for name in n.input if name}
    if head_reads & inputs:
        return None
    if any(o.name not in {out for n in head_list for out in n.output} for o in graph.output):
        return None
    boundary = sorted(head_reads & produced)
    if not boundary:
        return None

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    boundary_info = []
    for name in boundary:
        info = types.get(name)
        if info is None or not info.type.tensor_type.elem_type:
            return None
        # Batch dimension free; the rest as inferred (pooled features: [B, d]).
        boundary_info.append(
            helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None)
        )
    del inferred

    def part(nodes: list[Any], part_inputs: list[Any], part_outputs: list[Any], name: str) -> bytes:
        reads = {i for n in nodes for i in n.input if i}
        used_constants = [constants[r] for r in sorted(reads) if r in constants]
        initializers = [t for t in graph.initializer if t.name in reads]
        g = helper.make_graph(
            used_constants + nodes, name, part_inputs, part_outputs, initializer=initializers
        )
        model = helper.make_model(
            g, opset_imports=list(proto.opset_import), ir_version=proto.ir_version
        )
        model.functions.extend(proto.functions)
        return model.SerializeToString()

    return SplitGraph(  # the encoder part keeps every graph input: the runtime feeds them all
        encoder=part(encoder_list, list(graph.input), boundary_info, f"{graph.name}-encoder"),
        heads=part(head_list, boundary_info, list(graph.output), f"{graph.name}-heads"),
        boundary=boundary,
    )
