"""The graph cut where the task heads begin (serving/graph.py, issue 11 "Run 16"): its two parts
compute what the whole graph does; the data-parallel path runs the encoder part per bucket and
the heads once per call with the same answers; POLYTASK_ORT_SPLIT=0, a graph without heads and
a cut that computes something else all fall back to the whole graph. On the tiny random BERT
of conftest; no timing."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from conftest import tiny_texts

from serving.runtime import SPLIT_ENV, ort_split


def _texts() -> list[str]:
    return tiny_texts(40, seed=1)


def _feeds(runtime, texts):
    from serving.runtime import pad_batch

    ids, mask = pad_batch([e.ids for e in runtime.tokenizer.encode_batch(texts)], runtime.pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def test_split_env_var():
    assert ort_split({}) is True
    assert ort_split({SPLIT_ENV: "0"}) is False
    with pytest.raises(ValueError, match=SPLIT_ENV):
        ort_split({SPLIT_ENV: "no"})


def test_the_two_parts_compute_the_whole_graph(tiny_artifact):
    import onnx
    import onnxruntime as ort

    from serving.graph import head_nodes, split_heads
    from serving.runtime import Runtime

    parts = split_heads(tiny_artifact / "model.onnx")
    assert parts is not None and len(parts.boundary) == 1
    encoder = onnx.load_from_string(parts.encoder)
    heads = onnx.load_from_string(parts.heads)
    whole = onnx.load(str(tiny_artifact / "model.onnx"))
    # Every node of the whole graph is in exactly one part (Constant nodes may be in both),
    # every heads.* weight in the heads part only.
    names = lambda g: {n.name for n in g.graph.node if n.op_type != "Constant"}  # noqa: E731
    assert names(encoder) | names(heads) == names(whole)
    assert not names(encoder) & names(heads)
    assert names(heads) == {n for n in head_nodes(whole) if n in names(whole)}
    assert all(not i.name.startswith("heads.") for i in encoder.graph.initializer)
    assert [i.name for i in heads.graph.input] == parts.boundary

    runtime = Runtime(tiny_artifact, threads=1)
    feeds = _feeds(runtime, _texts())
    outputs = [o.name for o in whole.graph.output]
    options = ort.SessionOptions()
    enc = ort.InferenceSession(parts.encoder, options, providers=["CPUExecutionProvider"])
    hd = ort.InferenceSession(parts.heads, options, providers=["CPUExecutionProvider"])
    middle = enc.run(parts.boundary, feeds)
    assert middle[0].shape[0] == len(_texts())  # one row per text: [B, d] pooled features
    split = hd.run(outputs, dict(zip(parts.boundary, middle, strict=True)))
    for a, b in zip(split, runtime.session.run(outputs, feeds), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_graph_without_heads_is_not_cut(tmp_path, tiny_artifact):
    import onnx

    from serving.graph import split_heads

    whole = onnx.load(str(tiny_artifact / "model.onnx"))
    for init in whole.graph.initializer:  # no weight named as a head's: nothing to cut at
        init.name = init.name.replace("heads.", "other.")
    for node in whole.graph.node:
        node.input[:] = [i.replace("heads.", "other.") for i in node.input]
    onnx.save(whole, str(tmp_path / "model.onnx"))
    assert split_heads(tmp_path / "model.onnx") is None


class _Spy:
    def __init__(self, session) -> None:
        self.session = session
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def run(self, outputs, feeds):
        with self.lock:
            self.calls.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_parallel_path_runs_the_heads_once_per_call(tiny_artifact, monkeypatch):
    import serving.runtime as rt

    runtime = rt.Runtime(tiny_artifact, threads=2, parallel=True)
    assert runtime.heads_session is not None
    assert runtime._bucket_outputs != [runtime.outputs[t] for t in runtime.labels]
    encoder, heads = _Spy(runtime.single_session), _Spy(runtime.heads_session)
    runtime.single_session, runtime.heads_session = encoder, heads
    texts = _texts()
    want = runtime.run(texts, parallel=False)
    got = runtime.run(texts)
    assert len(encoder.calls) == got.runs >= 2  # buckets on the encoder part
    assert heads.calls == [len(texts)]  # the heads once, on every text of the call
    for task in want.logits:
        np.testing.assert_allclose(got.logits[task], want.logits[task], atol=1e-5)
        np.testing.assert_allclose(got.probabilities[task], want.probabilities[task], atol=1e-5)

    # Long calls: the heads in chunks of HEADS_CHUNK rows, answers unchanged.
    monkeypatch.setattr(rt, "HEADS_CHUNK", 7)
    heads.calls.clear()
    chunked = runtime.run(texts)
    assert heads.calls == [7] * 5 + [5]
    for task in want.logits:
        np.testing.assert_allclose(chunked.logits[task], want.logits[task], atol=1e-5)


def test_split_off_by_env_and_the_whole_graph_per_bucket(tiny_artifact, monkeypatch):
    from serving.runtime import Runtime

    monkeypatch.setenv(SPLIT_ENV, "0")
    whole = Runtime(tiny_artifact, threads=2, parallel=True)
    assert whole.heads_session is None and whole.workers == 2
    assert whole._bucket_outputs == [whole.outputs[t] for t in whole.labels]
    monkeypatch.delenv(SPLIT_ENV)
    split = Runtime(tiny_artifact, threads=2, parallel=True)
    texts = _texts()
    a, b = whole.run(texts), split.run(texts)
    for task in a.logits:
        np.testing.assert_allclose(a.logits[task], b.logits[task], atol=1e-5)
    # No data parallelism, no second session and no cut.
    assert Runtime(tiny_artifact, threads=1).heads_session is None


def test_a_cut_that_computes_something_else_is_refused(tiny_artifact, monkeypatch, caplog):
    """If the parts disagree with the whole graph on the probe texts, the runtime says so and
    runs the whole graph per bucket: a wrong cut costs speed, never answers."""
    import onnx

    import serving.graph as graph
    from serving.runtime import Runtime

    real = graph.split_heads

    def wrong(path):
        parts = real(path)
        heads = onnx.load_from_string(parts.heads)
        for init in heads.graph.initializer:
            if init.name.startswith("heads."):
                values = onnx.numpy_helper.to_array(init) * 3.0 + 1.0
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        return graph.SplitGraph(parts.encoder, heads.SerializeToString(), parts.boundary)

    monkeypatch.setattr(graph, "split_heads", wrong)
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        runtime = Runtime(tiny_artifact, threads=2, parallel=True)
    assert runtime.heads_session is None
    assert "parts differ" in caplog.text
    want = runtime.run(_texts(), parallel=False)
    got = runtime.run(_texts())
    for task in want.logits:
        np.testing.assert_allclose(got.logits[task], want.logits[task], atol=1e-5)


def test_heads_in_situ_bench_runs_on_an_artifact(tiny_artifact, tiny_data_dir, capsys):
    """bench/heads_in_situ.py end to end on the tiny artifact (a smoke test: its figures are
    read by people, not asserted)."""
    from conftest import load_repo_script

    bench = load_repo_script("bench/heads_in_situ.py")
    argv = [
        str(tiny_artifact),
        "--rounds",
        "1",
        "--seconds",
        "0.2",
        "--data-dir",
        str(tiny_data_dir),
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "heads read ['" in out and "split/whole" in out
    assert "rt split: busy" in out and "rt whole: busy" in out


def test_a_cut_whose_boundary_type_is_wrong_does_not_load_and_runs_whole(
    tiny_artifact, monkeypatch, caplog
):
    """The boundary is declared float32 without shape inference; onnxruntime refuses a part
    whose declared type differs from what its node computes, and the runtime runs the whole
    graph rather than fail to load the model."""
    import onnx

    import serving.graph as graph
    from serving.runtime import Runtime

    real = graph.split_heads

    def as_double(path):
        parts = real(path)
        encoder = onnx.load_from_string(parts.encoder)
        for out in encoder.graph.output:
            out.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        return graph.SplitGraph(encoder.SerializeToString(), parts.heads, parts.boundary)

    monkeypatch.setattr(graph, "split_heads", as_double)
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        runtime = Runtime(tiny_artifact, threads=2, parallel=True)
    assert runtime.heads_session is None and runtime.single_session is not None
    assert "a part does not load" in caplog.text
    assert runtime.run(_texts()).logits  # answers, from the whole graph per bucket
