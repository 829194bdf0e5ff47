"""An artifact's graph cut where the task heads begin: the encoder part and the heads part.

Why: on the data-parallel path a session.run computes one length bucket, about 9 dev texts at
saturation, and every run of the whole graph also reads all task heads' weights. Five-member
private paths hold ~29 MB of them, which the encoder has pushed out of the core's caches by
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
    input, or a graph output the encoder part computes.

    The boundary tensors are declared float32 (the pooled features of fp32 and int8 graphs
    alike): onnxruntime checks that against its own type inference when it builds a session
    of either part, and the runtime checks the parts' answers (`Runtime._cut_holds`), so a
    graph this does not fit runs whole. No shape inference: on the ~90 MB protobuf it held
    another copy of every weight in memory, for a type the session check gives anyway.

    Memory: the heads part is built from copies of the few weights it reads; the encoder part
    is the loaded graph edited in place, so loading holds about two copies of the encoder's
    weights at once (the protobuf and its serialized bytes), not four.
    """
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(path))
    graph = proto.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return None
    heads = head_nodes(proto)
    if not heads:
        return None
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
    # Batch and feature dimensions free (pooled features: [B, d]).
    boundary_info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in boundary]

    # The heads part: copies of its nodes, the constants and weights they read.
    used_constants = [constants[r] for r in sorted(head_reads) if r in constants]
    heads_graph = helper.make_graph(
        used_constants + head_list,
        f"{graph.name}-heads",
        boundary_info,
        list(graph.output),
        initializer=[t for t in graph.initializer if t.name in head_reads],
    )
    heads_model = helper.make_model(
        heads_graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version
    )
    heads_model.functions.extend(proto.functions)
    heads_bytes = heads_model.SerializeToString()
    del heads_model, heads_graph, used_constants, head_list

    # The encoder part: the loaded graph minus the heads, in place. It keeps every graph
    # input (the runtime feeds them all).
    encoder_reads = {i for n in encoder_list for i in n.input if i}
    del encoder_list
    for i in reversed(range(len(graph.node))):
        node = graph.node[i]
        if node.name in heads or (
            node.op_type == "Constant" and node.output[0] not in encoder_reads
        ):
            del graph.node[i]
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in encoder_reads:
            del graph.initializer[i]
    del graph.output[:]
    graph.output.extend(boundary_info)
    del graph.value_info[:]  # shapes of tensors the part may no longer compute
    graph.name = f"{graph.name}-encoder"
    return SplitGraph(encoder=proto.SerializeToString(), heads=heads_bytes, boundary=boundary)
