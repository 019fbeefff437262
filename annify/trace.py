"""Leaf-aware torch.fx tracing of timm models, and the tap points where heads can go.

The recipe follows timm's own FX support (``timm/layers/_fx.py``) and torchvision's
``feature_extraction``: modules and functions that timm registers as "notrace" stay leaves,
``forward()`` keyword defaults are passed as concrete arguments (hiera's ``mask=None``), and the
model is put through ``train(); eval()`` first to clear trace-time caches (LeViT, EfficientFormer).

Python branches on ``self.training`` are frozen at trace time, so a model is traced twice, in eval
and in train mode; the train graph is kept only where it differs (stochastic depth, for example).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import operator
import re
from dataclasses import dataclass, field

import torch
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.feature_extraction import NodePathTracer

from annify.errors import TraceError

__all__ = ["TapPoint", "TraceError", "Traced", "find_blocks", "overwritten", "tap_points", "trace"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Traced:
    """A model traced in eval mode (and in train mode where the graphs differ).

    Attributes:
        model: the traced module (the tracer may attach ``_tensor_constant*`` attributes to it).
        eval_graph: the graph traced in eval mode.
        train_graph: the graph traced in train mode, or None where it equals the eval graph.
        eval_names: FX node name -> qualified name (``layer1.0.act3``) for the eval graph.
        train_names: the same for the train graph.
        input_size: (C, H, W) the shapes were propagated with.
    """

    model: nn.Module
    eval_graph: fx.Graph
    train_graph: fx.Graph | None
    eval_names: dict[str, str]
    train_names: dict[str, str]
    input_size: tuple[int, int, int]
    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)

    def node(self, qualname: str, train: bool = False) -> fx.Node:
        """The node of the eval (or train) graph with this qualified name."""
        graph = self.train_graph if train and self.train_graph is not None else self.eval_graph
        names = self.train_names if train and self.train_graph is not None else self.eval_names
        for n in graph.nodes:
            if names.get(n.name) == qualname:
                return n
        raise KeyError(qualname)

    @property
    def qualnames(self) -> list[str]:
        """Qualified names of the eval graph's computing nodes, in execution order."""
        return [
            self.eval_names[n.name] for n in self.eval_graph.nodes if n.op not in ("placeholder", "output")
        ]


@dataclass
class TapPoint:
    """A place in the graph where a head can read features.

    Block outputs carry their 1-based block ``index`` (what ``--every`` counts). Finer trunk points
    (``index`` None) are nodes every path from the input to the output passes through. ``on_trunk``
    says whether automatic placement (``--heads``, ``--flops-period``) may use the point: False for
    a block output inside one branch of a larger block (an HRNet branch), where the cut also carries
    tensors from the other branches that the head never sees.
    """

    index: int | None  # 1-based block index; None for a trunk point between block outputs
    node: str  # qualified name of the node whose value the head reads
    module: str  # module path of the block (of the node's module for a trunk point)
    layout: str  # NCHW, NHWC, NLC or NC
    channels: int
    spatial: tuple[int, ...]  # (H, W) or (L,) or ()
    shape: tuple[int, ...]
    on_trunk: bool = True

    @property
    def kind(self) -> str:
        """``block`` (a block output), ``trunk`` (a finer point) or ``in-branch`` (a block output in a branch)."""
        if self.index is None:
            return "trunk"
        return "block" if self.on_trunk else "in-branch"


class _Tracer(NodePathTracer):
    """torchvision's ``NodePathTracer`` with its node naming compiled once per node.

    torchvision matches each new node's name against every earlier one with ``re.match(pattern, ...)``,
    looking the pattern up in ``re``'s cache on every comparison: for a model of N nodes, N²/2 lookups,
    most of the time tracing took on large models. The same patterns, matched against the same names in
    the same order, give the same names (specs store them).
    """

    def _get_node_qualname(self, module_qualname: str, node: fx.Node) -> str:
        node_qualname = module_qualname
        if node.op != "call_module":
            if len(node_qualname) > 0:
                node_qualname += "."
            node_qualname += str(node)
        if re.match(r".+_[0-9]+$", node_qualname) is not None:
            node_qualname = node_qualname.rsplit("_", 1)[0]
        pattern = re.compile(rf"{node_qualname}(_[0-9]+)?$")  # unescaped, as torchvision has it
        for existing_qualname in reversed(self.node_to_qualname.values()):
            if pattern.match(existing_qualname) is not None:
                postfix = existing_qualname.replace(node_qualname, "")
                next_index = int(postfix[1:]) + 1 if len(postfix) else 1
                node_qualname += f"_{next_index}"
                break
        return node_qualname


def _tracer() -> NodePathTracer:
    from timm.layers import get_notrace_functions, get_notrace_modules

    return _Tracer(
        leaf_modules=list(get_notrace_modules()),
        autowrap_functions=list(get_notrace_functions()),
        autowrap_modules=(math, torchvision.ops),
        param_shapes_constant=True,
    )


def _concrete_args(model: nn.Module) -> dict | None:
    params = list(inspect.signature(model.forward).parameters.items())
    concrete = {k: p.default for i, (k, p) in enumerate(params) if i and p.default is not p.empty}
    return concrete or None


def _trace_mode(model: nn.Module, training: bool) -> tuple[fx.Graph, dict[str, str]]:
    model.train(training)
    tracer = _tracer()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model))
    except Exception as e:  # torch.fx raises many types; all mean "cannot trace"
        raise TraceError(_explain_trace_failure(model, e)) from e
    # get_attr targets resolve on the model; keep the tracer's constants there.
    names = {n.name: tracer.node_to_qualname.get(n, n.name) for n in graph.nodes}
    return graph, names


def _explain_trace_failure(model: nn.Module, err: Exception) -> str:
    """Name the innermost module whose forward raised, and how to mark it as a leaf."""
    tb = err.__traceback__
    culprit = None
    by_code = {}
    for name, mod in model.named_modules():
        fwd = getattr(type(mod), "forward", None)
        if fwd is not None and hasattr(fwd, "__code__"):
            by_code.setdefault(fwd.__code__, (name, type(mod)))
    while tb is not None:
        hit = by_code.get(tb.tb_frame.f_code)
        if hit is not None:
            culprit = hit
        tb = tb.tb_next
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if culprit is None:
        return f"torch.fx cannot trace {type(model).__name__}: {first}"
    name, cls = culprit
    return (
        f"torch.fx cannot trace module '{name or '<root>'}' ({cls.__module__}.{cls.__name__}): {first}. "
        f"Mark it as a leaf: timm.layers.register_notrace_module({cls.__name__})"
    )


def _graph_signature(graph: fx.Graph, names: dict[str, str]) -> list[tuple]:
    # the tracer numbers its tensor constants on across traces (eval `_tensor_constant0` is train
    # `_tensor_constant17`): compare them by position, not by number
    def plain(s: str | None) -> str | None:
        return re.sub(r"^_tensor_constant\d+$", "_tensor_constant", s) if s else s

    # constant arguments count: torchvision's stochastic_depth(x, p, mode, training) is one leaf call
    # in both modes, differing only in its `training` argument
    def args(n: fx.Node) -> str:
        return repr(fx.map_arg((n.args, n.kwargs), lambda a: plain(names.get(a.name))))

    return [(n.op, plain(names.get(n.name)), plain(str(n.target)), args(n)) for n in graph.nodes]


def trace(model: nn.Module, input_size: tuple[int, int, int], train_graph: bool = True) -> Traced:
    """Trace ``model`` in eval mode (and train mode where that graph differs) and propagate shapes.

    Args:
        model: any module torch.fx can trace; timm's notrace registrations are honoured.
        input_size: (C, H, W) for shape propagation.
        train_graph: also trace in train mode (keep False for inference-only uses).
    """
    was_training = model.training
    model.train()
    model.eval()  # clears trace-time caches keyed on device strings (levit, efficientformer)
    eval_graph, eval_names = _trace_mode(model, training=False)
    t_graph, t_names = None, {}
    if train_graph:
        t_graph, t_names = _trace_mode(model, training=True)
        if _graph_signature(t_graph, t_names) == _graph_signature(eval_graph, eval_names):
            t_graph, t_names = None, {}
    model.train(was_training)
    traced = Traced(model, eval_graph, t_graph, eval_names, t_names, tuple(input_size))
    traced.shapes = _propagate_shapes(traced)
    return traced


# The largest image (C·H·W values) traced: a network's activations are many times its input, twice
# over (a batch of 2), and fvcore counts it again.
MAX_INPUT_VALUES = 3 * 2048 * 2048


def _propagate_shapes(traced: Traced) -> dict[str, tuple[int, ...] | None]:
    model = traced.model
    was_training = model.training
    model.eval()
    gm = fx.GraphModule(model, traced.eval_graph)
    values = math.prod(traced.input_size)
    if values > MAX_INPUT_VALUES:  # every activation grows with it: refused before anything is allocated
        raise TraceError(
            f"input size {'×'.join(map(str, traced.input_size))} is {values:,} values an image, more than the "
            f"{MAX_INPUT_VALUES:,} annify traces at (3×2048×2048 fits); give a smaller --input-size"
        )
    try:  # ShapeProp prints a failing node's traceback itself: keep it for the error, off the screen
        example = torch.zeros(2, *traced.input_size)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(example)
    except Exception as e:  # any op may refuse the shape; say which node, in one line
        cause = e.__cause__ or e
        node = re.search(r"node=%?(\w+)", str(e))
        where = f" at node '{traced.eval_names.get(node.group(1), node.group(1))}'" if node else ""
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0].rstrip(".")
        size = "×".join(map(str, traced.input_size))
        raise TraceError(
            f"{type(model).__name__} does not run at {size}{where}: {reason}. Hint: pass the size the model "
            "was built for (--input-size), or build it for yours (e.g. img_size for ViTs)"
        ) from e
    finally:
        model.train(was_training)
    shapes = {}
    for n in traced.eval_graph.nodes:
        meta = n.meta.get("tensor_meta")
        shapes[traced.eval_names[n.name]] = tuple(meta.shape) if hasattr(meta, "shape") else None
    return shapes


def find_blocks(model: nn.Module) -> list[str]:
    """Module paths of the model's repeated units, in registration order.

    A block is a child of an innermost container (Sequential, ModuleList, ModuleDict) holding at least
    two children of the same class from outside ``torch.nn``: ResNet bottlenecks, dense layers,
    transformer blocks. Sibling containers holding a single such unit (EfficientNet's one-block
    stages) count too. Where that finds fewer units than the stages timm lists in the model's
    ``feature_info`` (one block per stage, blocks held as named attributes, as in regnet, dla,
    inception, nasnet), those stages are the blocks instead.
    """

    def own_class(m: nn.Module) -> bool:
        return not type(m).__module__.startswith("torch.nn")

    def qualifies(c: nn.Module) -> bool:
        if not isinstance(c, _CONTAINERS):
            return False
        children = list(c.children())
        kinds = [type(m) for m in children if own_class(m) and not isinstance(m, _CONTAINERS)]
        top = max((kinds.count(k) for k in set(kinds)), default=0)
        return top >= 2 and 2 * top > len(children)

    modules = dict(model.named_modules())
    chosen = [name for name, mod in modules.items() if qualifies(mod)]
    # innermost only: swin's `layers` holds stages whose `blocks` qualify on their own
    chosen = [c for c in chosen if not any(o != c and o.startswith(f"{c}.") for o in chosen)]
    blocks: list[str] = []
    for name in chosen:
        blocks.extend(f"{name}.{n}".lstrip(".") for n, _ in modules[name].named_children())
    # sibling stages holding a single unit (efficientnet_b0's first and last stage)
    parents = {c.rpartition(".")[0] for c in chosen if "." in c}
    for parent in parents:
        for cn, c in modules[parent].named_children():
            path = f"{parent}.{cn}"
            units = list(c.named_children())
            if isinstance(c, _CONTAINERS) and path not in chosen and len(units) == 1:
                un, u = units[0]
                if own_class(u) and not isinstance(u, _CONTAINERS):
                    blocks.append(f"{path}.{un}")
    stages = [b for b in _feature_modules(model) if b in modules]
    if len(blocks) < len(stages):  # few repeated units (one per stage, named attributes): timm's stages
        blocks = stages
    return blocks


def _feature_modules(model: nn.Module) -> list[str]:
    """Module paths of timm's ``feature_info`` entries (the stage outputs), where the model has them."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        return [f["module"] for f in info if isinstance(f, dict) and f.get("module")]
    return []


def _block_output(graph: fx.Graph, names: dict[str, str], path: str) -> fx.Node | None:
    inside = [
        n for n in graph.nodes if names.get(n.name) == path or names.get(n.name, "").startswith(path + ".")
    ]
    members = set(inside)
    outs = [n for n in inside if any(u not in members for u in n.users)]
    return outs[-1] if outs else None


def _dense_cat(node: fx.Node) -> fx.Node:
    """For a block output consumed first by a ``torch.cat`` of features already computed, that cat.

    Inside a DenseNet block the next layer (or the block's end) concatenates every feature map
    produced so far; the paper's DenseANN heads read that concatenation.
    """
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    users = sorted(node.users, key=order.get)
    if not users:
        return node
    first = users[0]
    if first.op == "call_function" and first.target is torch.cat:
        inputs = first.args[0] if first.args else first.kwargs.get("tensors", ())
        if isinstance(inputs, (list, tuple)) and all(order[a] <= order[node] for a in inputs):
            return first
    return node


def _channels_of(node: fx.Node, model: nn.Module) -> int | None:
    """Channel count of the nearest module producing ``node`` (walking back through first args)."""
    seen = 0
    n = node
    while n is not None and seen < 64:
        seen += 1
        if n.op == "call_module":
            try:
                m = model.get_submodule(n.target)
            except AttributeError:
                m = None
            for attr in ("out_channels", "num_features", "out_features", "embed_dim", "dim"):
                v = getattr(m, attr, None)
                if isinstance(v, int):
                    return v
            shape = getattr(m, "normalized_shape", None)
            if shape:
                return int(shape[-1])
        args = [a for a in n.args if isinstance(a, fx.Node)]
        if n.op == "call_function" and n.target is torch.cat:
            return None  # a concatenation: the sum of inputs; let the shape decide
        n = args[0] if args else None
    return None


def layout_of(shape: tuple[int, ...], channels: int | None) -> str:
    """NCHW, NHWC, NLC or NC for a feature tensor of ``shape`` (batch first)."""
    if len(shape) == 2:
        return "NC"
    if len(shape) == 3:
        return "NLC"
    if len(shape) != 4:
        raise ValueError(f"cannot read a head from a {len(shape)}-D tensor {tuple(shape)}")
    if channels is not None and shape[1] == channels and shape[3] != channels:
        return "NCHW"
    if channels is not None and shape[3] == channels and shape[1] != channels:
        return "NHWC"
    if shape[2] == shape[3] and shape[1] != shape[2]:
        return "NCHW"
    if shape[1] == shape[2] and shape[3] != shape[1]:
        return "NHWC"
    return "NCHW"


def describe_node(traced: Traced, qualname: str) -> tuple[str, int, tuple[int, ...], tuple[int, ...]]:
    """(layout, channels, spatial, shape) of the value at ``qualname``; ValueError if not a tensor."""
    shape = traced.shapes.get(qualname)
    if shape is None:
        raise ValueError(f"node '{qualname}' does not produce a single tensor")
    node = traced.node(qualname)
    layout = layout_of(shape, _channels_of(node, traced.model))
    if layout == "NCHW":
        return layout, shape[1], tuple(shape[2:]), shape
    if layout == "NHWC":
        return layout, shape[3], tuple(shape[1:3]), shape
    if layout == "NLC":
        return layout, shape[2], (shape[1],), shape
    return layout, shape[1], (), shape


def tap_points(traced: Traced, trunk: bool = False) -> list[TapPoint]:
    """Candidate tap points in execution order: the output of every block (1-based ``index``).

    With ``trunk``, also every finer point on the trunk: each node that dominates the output (every
    path from the input to the output passes through it) whose value is a feature map or token
    sequence a head can read, up to but not including the last such node (the features the
    classifier reads). These never lie inside one branch of a block: a ResNet unit's conv path is
    bypassed by its shortcut, so it is no such point. They reach past the last block where
    ``find_blocks`` stops early (mobilevit's attention stages).
    """
    graph, names = traced.eval_graph, traced.eval_names
    order = {n: i for i, n in enumerate(graph.nodes)}
    data = _data_nodes(graph)
    found = []
    paths = find_blocks(traced.model)
    block_of = _blocks_of(graph, names, paths)
    for path in paths:
        out = _block_output(graph, names, path)
        if out is None:
            continue
        out = _dense_cat(out)
        try:
            layout, ch, spatial, shape = describe_node(traced, names[out.name])
        except ValueError:
            continue  # a block passing tuples on: not a place for a head
        found.append((order[out], path, out, layout, ch, spatial, shape))
    found.sort(key=lambda t: t[0])
    taps, seen = [], set()
    for _, path, out, layout, ch, spatial, shape in found:
        q = names[out.name]
        if q in seen:
            continue
        seen.add(q)
        whole = _outside_branches(out, path, block_of, data, order)
        taps.append(TapPoint(len(taps) + 1, q, path, layout, ch, spatial, tuple(shape[1:]), whole))
    if not trunk:
        return taps
    # finer points: dominators a head can read, up to the features the classifier reads (the last one)
    in_train = set(traced.train_names.values()) if traced.train_graph is not None else None
    readable = []
    for node in _dominators(graph, data, order):
        # a value the next op overwrites in place (x + shortcut, then ReLU(inplace=True)) would need a
        # copy for its head: the overwriting op's own output is a point at the same cost
        q = names[node.name]
        if overwritten(node, traced.model) or (in_train is not None and q not in in_train):
            continue
        described = _head_readable(traced, node, q)
        if described is not None:
            readable.append((node, q, described))
    for node, q, (layout, ch, spatial, shape) in readable[:-1]:
        if q not in seen:
            module = node.target if node.op == "call_module" else q.rpartition(".")[0]
            taps.append(TapPoint(None, q, module, layout, ch, spatial, tuple(shape[1:])))
    position = {names[n.name]: order[n] for n in graph.nodes}
    return sorted(taps, key=lambda t: position[t.node])


def _data_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value holds tensors computed from the input (the first placeholder).

    Sizes read off a tensor, constants and parameters are left out: they are carried across a cut
    for free and no head reads them, so they do not make a path that bypasses a node.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    data = set(placeholders[:1])
    for n in graph.nodes:
        computed = n.op in ("call_module", "call_function", "call_method") and "tensor_meta" in n.meta
        if computed and any(a in data for a in n.all_input_nodes):
            data.add(n)
    return data


def _dominators(graph: fx.Graph, data: set[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """The nodes every input-to-output path of ``data`` nodes passes through, in execution order.

    Immediate dominators in one pass over the topologically ordered graph (Cooper, Harvey and
    Kennedy's intersection, walking up the dominator tree by execution order).
    """
    idom: dict[fx.Node, fx.Node] = {}

    def meet(a: fx.Node, b: fx.Node) -> fx.Node:
        while a is not b:
            while order[a] > order[b]:
                a = idom[a]
            while order[b] > order[a]:
                b = idom[b]
        return a

    def dominator_of(n: fx.Node) -> fx.Node | None:
        preds = [p for p in n.all_input_nodes if p in data]
        if not preds:
            return None
        d = preds[0]
        for p in preds[1:]:
            d = meet(d, p)
        return d

    source = next(iter(sorted(data, key=order.get)), None)
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if source is None or output is None:
        return []
    for n in graph.nodes:
        if n in data and n is not source:
            idom[n] = dominator_of(n)
    chain, d = [], dominator_of(output)
    while d is not None and d is not source:
        chain.append(d)
        d = idom[d]
    return chain[::-1]


def _blocks_of(graph: fx.Graph, names: dict[str, str], paths: list[str]) -> dict[fx.Node, str]:
    """The block (module path) each node of ``graph`` belongs to, for the nodes inside one."""
    found = {}
    for n in graph.nodes:
        q = names.get(n.name, "")
        inside = [p for p in paths if q == p or q.startswith(f"{p}.")]
        if inside:
            found[n] = max(inside, key=len)
    return found


def _outside_branches(
    node: fx.Node, path: str, block_of: dict[fx.Node, str], data: set[fx.Node], order: dict[fx.Node, int]
) -> bool:
    """Whether the output ``node`` of block ``path`` lies outside every branch.

    It does where each tensor crossing the cut after it is the output itself, one it was made from
    (inside a DenseNet block the tap is the concatenation of every feature map still needed), or a
    stream that blocks pass on to later blocks beside it (TNT's blocks carry a pixel stream next to
    the patch tokens). It does not where the tensor is a sibling branch's (HRNet, CrossViT) or a
    shortcut that the model adds outside the block (``x + unit(x)``), nor where the block goes on
    after its output.
    """
    own = {node, *node.all_input_nodes}
    at = order[node]
    for v in data:
        later = [u for u in v.users if order[u] > at]
        if v in own or order[v] > at or not later:
            continue
        if v not in block_of or any(block_of.get(u, path) == path for u in later):
            return False
    return True


_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}  # fmt: skip


def overwritten(node: fx.Node, model: nn.Module) -> bool:
    """Whether a later op writes into ``node``'s value in place.

    Recognised: modules with ``inplace=True`` (``nn.ReLU(inplace=True)``), functions called with
    ``inplace=True``, methods and functions whose name ends in one underscore (``x.relu_()``), and
    augmented assignments (``x += y``), each with the value as its first argument.
    """
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op == "call_module":
            try:
                if getattr(model.get_submodule(user.target), "inplace", False) is True:
                    return True
            except AttributeError:
                continue
        elif user.op == "call_method":
            if user.target.endswith("_") and not user.target.endswith("__"):
                return True
        elif user.op == "call_function":
            name = getattr(user.target, "__name__", "")
            if user.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")):
                return True
            try:
                bound = inspect.signature(user.target).bind(*user.args, **user.kwargs)
            except (TypeError, ValueError):  # builtins without a signature
                bound = None
            if user.kwargs.get("inplace") is True or (bound and bound.arguments.get("inplace") is True):
                return True
    return False


def _head_readable(traced: Traced, node: fx.Node, q: str):
    """(layout, channels, spatial, shape) where the node's value has a layout a head reads, else None.

    Batch first (the shapes were propagated at batch 2) and, where the producing module's channel
    count is known, the channels where the layout puts them (a ViT's patch embedding before its
    transpose, B×C×L, is no token sequence).
    """
    try:
        layout, ch, spatial, shape = describe_node(traced, q)
    except ValueError:
        return None
    if shape[0] != 2 or len(shape) < 3:
        return None
    known = _channels_of(node, traced.model)
    if known is not None and ch != known:
        return None
    return layout, ch, spatial, shape
