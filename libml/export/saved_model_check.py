"""Checks a SavedModel folder BEFORE TensorFlow loads it, so that `predict` never runs a foreign graph.

`tf.saved_model.load` runs the graph a folder holds: a crafted one can read or write files
(WriteFile, SaveV2 to any path), start processes (PyFunc needs Python, but custom kernels do
not), or loop forever. `check(folder, shape)` reads `saved_model.pb` as data (a protocol buffer
parse runs nothing) and accepts only what libml/export/saving.py writes:

- one meta graph whose `serving_default` signature takes `images` uint8 [N, H, W, C] (the
  shape of meta.json when given) and returns `probabilities` float32 [N, nclass], `class`
  int64 [N] and `confidence` float32 [N]; an init op that is a bare NoOp;
- every function the loader or the signature can call uses only the arithmetic ops of the
  exported network (COMPUTE_OPS: no file, network, process or string op); the checkpoint
  save/restore functions named by the saver (which TensorFlow's loader never calls; it
  restores the variables itself) may use the saver's ops (SAVER_OPS) and call nothing;
- the object graph holds only objects, functions and variables: no resources, assets or
  saveables with functions of their own, which the loader would run.

Anything else is a UserError naming the first thing that differs. What this cannot promise:
the arithmetic itself is whatever the file holds, so a foreign model of the right shape
predicts whatever it was built to predict.
"""
import os
from typing import Dict, Iterable, Optional, Sequence, Set

from libml.base.errors import UserError

COMPUTE_OPS = frozenset("""
    Abs AddN AddV2 ArgMax ArgMin AvgPool BatchMatMulV2 BiasAdd Cast ClipByValue ConcatV2 Const
    Conv2D DepthwiseConv2dNative Elu Equal Erf Exp ExpandDims Fill Floor FusedBatchNormV3
    GatherV2 Greater GreaterEqual Identity IdentityN LeakyRelu Less LessEqual Log LogSoftmax
    LogicalAnd LogicalNot LogicalOr MatMul Max MaxPool Maximum Mean Min Minimum Mul Neg NoOp
    OnesLike Pack Pad Pow Prod RealDiv Reciprocal Relu Relu6 Reshape Rsqrt Select SelectV2
    Selu Shape Sigmoid Sign Slice Softmax Softplus Split SplitV Sqrt Square SquaredDifference
    Squeeze StatefulPartitionedCall PartitionedCall StopGradient StridedSlice Sub Sum Tanh
    Tile Transpose Unpack ZerosLike ReadVariableOp
""".split())
SAVER_OPS = frozenset("""
    Const DisableCopyOnRead Identity MergeV2Checkpoints NoOp Pack ReadVariableOp SaveV2 Select
    ShardedFilename StaticRegexFullMatch StringJoin AssignVariableOp RestoreV2
""".split())
GRAPH_OPS = frozenset("""
    VarHandleOp ReadVariableOp VarIsInitializedOp AssignVariableOp Placeholder
    StatefulPartitionedCall NoOp Const
""".split())
OBJECT_KINDS = frozenset(("user_object", "function", "bare_concrete_function", "variable",
                          "constant"))
OUTPUTS = {"probabilities": "DT_FLOAT", "class": "DT_INT64", "confidence": "DT_FLOAT"}
_CALLS = ("StatefulPartitionedCall", "PartitionedCall")


def _refuse(folder: str, problem: str):
    raise UserError(f"{folder} is not a SavedModel written by this project's export ({problem}); "
                    f"it was not loaded, nothing in it ran: pass the export folder with its "
                    f"model.keras, or re-export the run with --export_only")


def _called(function) -> Set[str]:
    """Names of the functions a FunctionDef's nodes call."""
    return {name for node in function.node_def for name in _called_by_node(node)}


def _called_by_node(node) -> Set[str]:
    """Names of the functions a node calls (any function-valued attribute)."""
    names = set()
    for value in node.attr.values():
        if value.func.name:
            names.add(value.func.name)
        names.update(f.name for f in value.list.func)
    return names


def _closure(roots: Iterable[str], library: Dict) -> Set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in library:
            todo.extend(_called(library[name]))
    return seen


def _shape(tensor_info) -> Sequence[int]:
    shape = tensor_info.tensor_shape
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def check(folder: str, shape: Optional[Sequence[int]] = None, nclass: Optional[int] = None):
    """(image shape (H, W, C), nclass) of a SavedModel that passes the checks above; UserError
    otherwise. `shape` / `nclass` (from meta.json) must match the signature when given."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2
    path = os.path.join(folder, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001 (DecodeError and OSError)
        _refuse(folder, f"unreadable saved_model.pb: {type(e).__name__}")
    if len(proto.meta_graphs) != 1:
        _refuse(folder, f"{len(proto.meta_graphs)} meta graphs, the export writes 1")
    graph = proto.meta_graphs[0]
    signatures = graph.signature_def
    if set(signatures) - {"serving_default", "__saved_model_init_op"} or "serving_default" not in signatures:
        _refuse(folder, f"signatures {sorted(signatures)}, the export writes serving_default")
    serving = signatures["serving_default"]
    dtype = lambda info: types_pb2.DataType.Name(info.dtype)   # noqa: E731
    images = serving.inputs.get("images")
    if list(serving.inputs) != ["images"] or dtype(images) != "DT_UINT8" or len(_shape(images) or []) != 4:
        _refuse(folder, "serving_default does not take images uint8 [N, H, W, C] alone")
    image_shape = tuple(_shape(images)[1:])
    if shape is not None and tuple(shape) != image_shape:
        _refuse(folder, f"its images are {image_shape}, meta.json says {tuple(shape)}")
    if {k: dtype(v) for k, v in serving.outputs.items()} != OUTPUTS:
        _refuse(folder, f"serving_default returns {sorted(serving.outputs)}, the export returns "
                        f"{sorted(OUTPUTS)}")
    probs_shape = _shape(serving.outputs["probabilities"]) or [None, None]
    model_nclass = probs_shape[-1] if len(probs_shape) == 2 else None
    if not model_nclass or model_nclass < 1 or (nclass is not None and model_nclass != nclass):
        _refuse(folder, f"it gives {model_nclass} probabilities per image, meta.json says {nclass}")
    init = signatures.get("__saved_model_init_op")
    nodes = {n.name: n for n in graph.graph_def.node}
    if init is not None:
        node = nodes.get(init.outputs["__saved_model_init_op"].name.split(":")[0])
        if node is None or node.op != "NoOp" or node.input:
            _refuse(folder, "its init op does work")
    for node in graph.graph_def.node:
        if node.op not in GRAPH_OPS:
            _refuse(folder, f"graph op {node.op}")
    library = {f.signature.name: f for f in graph.graph_def.library.function}
    saver_nodes = {graph.saver_def.save_tensor_name.split(":")[0], graph.saver_def.restore_op_name}
    saver_functions = {fn for name in saver_nodes if name in nodes for fn in _called_by_node(nodes[name])}
    roots = set(graph.object_graph_def.concrete_functions)
    roots |= {fn for n in graph.graph_def.node if n.name not in saver_nodes for fn in _called_by_node(n)}
    for obj in graph.object_graph_def.nodes:
        kind = obj.WhichOneof("kind")
        if kind not in OBJECT_KINDS or len(obj.saveable_objects):
            _refuse(folder, f"object of kind {kind}" + (" with saveables" if len(obj.saveable_objects) else ""))
    reachable = _closure(roots, library)
    if reachable & saver_functions:
        _refuse(folder, "the signature calls the checkpoint saver")
    for name, function in library.items():
        allowed = SAVER_OPS if name in saver_functions and name not in reachable else COMPUTE_OPS
        bad = sorted({n.op for n in function.node_def} - allowed)
        if bad:
            _refuse(folder, f"op {bad[0]} in function {name}")
        if name in saver_functions and _called(function):
            _refuse(folder, f"saver function {name} calls other functions")
    return image_shape, int(model_nclass)

