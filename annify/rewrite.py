"""Cut a traced graph into segments at the tap points and run it as an anytime network.

The graph is cut after each tap node. A segment is a piece of the original graph turned back into
Python by torch.fx's code generator and bound to the converted module, so it reads the very same
submodules and parameters: nothing is copied, and a timm state dict loads without renaming. Every
tensor still needed after a cut is carried across it (inside a DenseNet block that is every feature
map produced so far, not one tensor), so running the segments one after another executes exactly
the original sequence of operations and the final output is bit-identical to the plain model's.

Segments after the first take their carried values as one list that they empty before computing
(``Segment.boxed``, the calling convention torch's own compilers use): the generated code then holds
the only references and frees each value right after its last use, as eager code frees a block's
input once the block is done, instead of keeping a segment's whole input alive until the segment
returns. ``AnytimeNet.run_segment`` takes that path when handed a list; ``forward``, ``stream`` and the
runtimes hand their state over that way. Memory in use then follows eager code's; with glibc's default
allocator that measured 1-3 % faster for every output of resnet50 ``--every 2`` (BENCHMARKS.md §22a).

One rewrite is applied on the way: torch.fx records timm's ``x += shortcut`` as an out-of-place
``add`` (a Proxy has no ``__iadd__``), so every residual sum would allocate a fresh full-size tensor
that eager timm does not; ``residual_adds`` finds the adds that may write into their left operand
again, and those become ``add_into`` calls (the same values, bit for bit).
"""

from __future__ import annotations

import linecache
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from annify.errors import InferenceError
from annify.trace import Traced, overwritten

if TYPE_CHECKING:
    from annify.spec import Spec

__all__ = ["AnytimeNet", "Segment", "add_into", "cut", "fresh_module", "make_segment", "residual_adds"]

# Producers whose output is a fresh tensor (never a view of an input) that their own backward does not
# save: writing into it later changes nothing autograd needs. Exact types only: a subclass may do more
# (timm's BatchNormAct2d ends in an activation, and ReLU's backward reads its output).
_FRESH_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
_FRESH_FUNCTIONS = (operator.add, operator.mul, torch.add, torch.mul)  # backward reads the inputs only
_FRESH_METHODS = ("add", "mul")
_ADDS = (operator.add, torch.add)


def add_into(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, written into ``a`` where the sum has ``a``'s shape and dtype (else a new tensor).

    The check runs at every call, so broadcasting or type promotion (a bf16 ``a`` under autocast
    plus a float32 ``b``) still gets exactly what ``a + b`` gives.
    """
    if torch.compiler.is_compiling():  # a compiler fuses the add itself (and result_type breaks its graph)
        return a + b
    if not isinstance(a, torch.Tensor) or torch.result_type(a, b) != a.dtype:
        return a + b
    if (
        isinstance(b, torch.Tensor)
        and b.shape != a.shape
        and torch.broadcast_shapes(a.shape, b.shape) != a.shape
    ):
        return a + b
    return a.add_(b)


def residual_adds(graph: fx.Graph, model: nn.Module, keep: set[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    """The ``a + b`` nodes of ``graph`` that may write their sum into ``a`` (see ``add_into``).

    Maps each to the nodes whose value it overwrites (``a``, and what ``a`` passes through).

    ``a`` must be read by this add alone (so no later op, segment, head or graph output sees it
    changed), not be in ``keep`` (the tap values, which heads and runtimes read), and come from a
    producer whose output is fresh and not saved for its own backward (``_FRESH_MODULES``, ...), so
    the in-place write is safe under autograd in training too. An ``nn.Identity`` (timm's drop_path
    in eval, or at rate 0) passes its input through, so it is looked through, under the same rules.
    """

    def fresh(n: fx.Node) -> set[fx.Node] | None:
        """The nodes sharing ``n``'s value if it is fresh and read once, else None."""
        if n in keep or len(n.users) != 1:
            return None
        if n.op == "call_function":
            return {n} if n.target in _FRESH_FUNCTIONS else None
        if n.op == "call_method":
            return {n} if n.target in _FRESH_METHODS else None
        if n.op != "call_module":
            return None
        try:
            m = model.get_submodule(n.target)
        except AttributeError:
            return None
        if type(m) is nn.Identity:
            inner = fresh(n.args[0]) if len(n.args) == 1 and isinstance(n.args[0], fx.Node) else None
            return None if inner is None else {n, *inner}
        return {n} if fresh_module(m) else None

    found = {}
    for n in graph.nodes:
        is_add = (n.op == "call_function" and n.target in _ADDS) or (
            n.op == "call_method" and n.target == "add"
        )
        if is_add and len(n.args) == 2 and not n.kwargs and isinstance(n.args[0], fx.Node):
            chain = fresh(n.args[0])
            if chain is not None:
                found[n] = chain
    return found


def fresh_module(m: nn.Module) -> bool:
    """Whether ``m``'s output is always a new tensor that its own backward does not save (``_FRESH_MODULES``,
    exact types, or a timm norm layer without activation): a later op may write into it (``add_into``,
    and ``annify.freeze``'s in-place ReLU)."""
    return type(m) in _FRESH_MODULES or _plain_norm_act(m)


def _plain_norm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d (and kin) with no activation and no dropout: a plain norm layer."""
    return (
        type(m).__module__ == "timm.layers.norm_act"
        and type(getattr(m, "act", None)) is nn.Identity
        and type(getattr(m, "drop", None)) is nn.Identity
    )


@dataclass
class Segment:
    """One piece of the graph: runs from the carried tensors to the next tap.

    ``boxed`` is the same code taking the carried values in one list that it empties before it
    computes (torch's compilers call graphs the same way, "boxed"): the segment then holds the only
    references, and torch.fx's code frees each value right after its last use instead of when the
    caller lets go of it. ``AnytimeNet.run_segment`` uses it when handed a list.
    """

    fn: Callable  # fn(module, *carried) -> tuple of tensors leaving the segment
    tap: int | None  # position of the tap value in the returned tuple (None for the last segment)
    carry: int  # how many of the returned values are carried to the next segment
    graph: fx.Graph
    boxed: Callable | None = None  # boxed(module, carried: list) -> as fn; None for the graph's input


class _BoxedInputs(fx.graph.CodeGen):
    """torch.fx code that takes its inputs as one list and empties it (``def forward(self, values)``)."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **kw) -> str:
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        lines = [f"def {self._func_name}(self, values){maybe_return_annotation}:"]
        if names:
            lines.append(f"    {', '.join(names)}, = values")
            lines.append("    values.clear()")
        return "\n".join(lines)


def _boxed(graph: fx.Graph, tag: str) -> tuple[Callable, Callable]:
    """(fn, boxed) for a graph whose placeholders are all carried values (no defaults, no varargs)."""
    g = fx.Graph()
    g.output(g.graph_copy(graph, {}))
    g.set_codegen(_BoxedInputs())
    boxed = _compile(g, tag)

    def fn(module, *values):
        return boxed(module, list(values))

    return fn, boxed


def make_segment(graph: fx.Graph, first: bool, tap: int | None, carry: int, tag: str) -> Segment:
    """The segment running ``graph`` (its code generated and compiled here). The first segment takes the
    graph's own inputs, which may have defaults, so its signature stays; the others also get ``boxed``."""
    if first:
        return Segment(_compile(graph, tag), tap, carry, graph)
    fn, boxed = _boxed(graph, tag)
    return Segment(fn, tap, carry, graph, boxed)


def _compile(graph: fx.Graph, tag: str) -> Callable:
    code = graph.python_code(root_module="self")
    filename = f"<annify {tag}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    return namespace["forward"]


def cut(
    graph: fx.Graph,
    names: dict[str, str],
    taps: list[str],
    tag: str = "segment",
    model: nn.Module | None = None,
) -> list[Segment]:
    """Cut ``graph`` after each of the ``taps`` (qualified names, in execution order).

    Returns ``len(taps) + 1`` segments. Segment 0 takes the graph's inputs; segment j > 0 takes the
    values carried out of segment j-1. ``get_attr`` nodes are free, so each segment reads the ones it
    needs itself instead of carrying them. With ``model`` (the module whose submodules the graph
    calls), the ``residual_adds`` become ``add_into`` calls.
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    by_name = {names.get(n.name): n for n in nodes}
    missing = [t for t in taps if t not in by_name]
    if missing:
        raise KeyError(missing[0])
    cuts = [index[by_name[t]] for t in taps]
    if cuts != sorted(cuts) or len(set(cuts)) != len(cuts):
        raise ValueError("tap points must be distinct and in execution order")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    bounds = [-1, *cuts, index[output] - 1]
    into = residual_adds(graph, model, {by_name[t] for t in taps}) if model is not None else {}

    # segment id of each computing node
    seg_of: dict[fx.Node, int] = {}
    for s in range(len(bounds) - 1):
        for n in nodes[bounds[s] + 1 : bounds[s + 1] + 1]:
            if n.op not in ("placeholder", "get_attr", "output"):
                seg_of[n] = s

    def consumers(n: fx.Node) -> set[int]:
        return {len(bounds) - 1 if u.op == "output" else seg_of.get(u, -1) for u in n.users}

    segments, carried = [], list(placeholders)
    for s in range(len(bounds) - 1):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in carried:  # the graph's own placeholders keep their defaults (concrete args)
            env[n] = g.node_copy(n) if n.op == "placeholder" else g.placeholder(n.name)

        def arg(n: fx.Node, g=g, env=env) -> fx.Node:
            if n not in env and n.op == "get_attr":
                env[n] = g.node_copy(n, arg)
            return env[n]

        own = [n for n in nodes[bounds[s] + 1 : bounds[s + 1] + 1] if n in seg_of]
        own_set = set(own)
        for n in own:
            env[n] = g.node_copy(n, arg)
            if n in into and into[n] <= own_set:  # never write into a value carried in
                env[n].op, env[n].target = "call_function", add_into
        last = s == len(bounds) - 2
        if last:
            g.output(fx.map_arg(output.args[0], arg))
            segments.append(make_segment(g, s == 0, None, 0, f"{tag} {s}"))
            break
        alive = [n for n in [*carried, *own] if any(c > s for c in consumers(n))]
        tap_node = nodes[bounds[s + 1]]
        outs = list(alive)
        tap_pos = outs.index(tap_node) if tap_node in outs else len(outs)
        values = [env[n] for n in outs] + ([env[tap_node]] if tap_pos == len(outs) else [])
        g.output(tuple(values))
        segments.append(make_segment(g, s == 0, tap_pos, len(outs), f"{tag} {s}"))
        carried = alive
    return segments


def _adopt(net: nn.Module, model: nn.Module, graphs: list[fx.Graph]) -> None:
    """Make ``net`` hold the model's own children, parameters and buffers under their own names.

    Constants that the tracer attached to the model (``_tensor_constant*``) become non-persistent
    buffers, so they move with ``.to()`` but add no state-dict keys.
    """
    for name, child in model.named_children():
        net.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        net.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        net.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
    for g in graphs:
        for n in g.nodes:
            if n.op != "get_attr" or "." in n.target or hasattr(net, n.target):
                continue
            value = getattr(model, n.target)
            if isinstance(value, torch.Tensor):
                net.register_buffer(n.target, value, persistent=False)
            else:
                setattr(net, n.target, value)


class AnytimeNet(nn.Module):
    """A network with prediction heads inside it: ``net(x)`` returns every output, in order.

    The last output is the model's own classifier and equals the original model's output exactly.
    Parameters keep the original model's names; the added heads live under ``heads.`` (under
    ``exit_heads.`` where the model owns a ``heads`` child of its own, as efficientvim does). Reach
    them through ``net.exits`` and ``net.exits_prefix``.

    Args:
        traced: the traced model.
        taps: qualified names of the nodes the heads read, in execution order.
        heads: one module per tap.
    """

    def __init__(self, traced: Traced, taps: list[str], heads: list[nn.Module]):
        super().__init__()
        if len(taps) != len(heads):
            raise ValueError(f"{len(taps)} taps but {len(heads)} heads")
        graphs = [g for g in (traced.eval_graph, traced.train_graph) if g is not None]
        _adopt(self, traced.model, graphs)
        # the generated code reads the model's own children by name, so never shadow one
        self.exits_name = "exit_heads" if hasattr(self, "heads") else "heads"
        self.add_module(self.exits_name, nn.ModuleList(heads))
        self.taps = list(taps)
        self.input_size = traced.input_size
        # the spec describing this network with each output's costs, once they are known (describe())
        self.spec: Spec | None = None
        # plain lists: the segments are code over this module, not submodules (no extra state-dict keys)
        self._eval_segments = cut(traced.eval_graph, traced.eval_names, taps, "eval segment", self)
        self._train_segments = (
            cut(traced.train_graph, traced.train_names, taps, "train segment", self)
            if traced.train_graph is not None
            else None
        )
        # a tap value that a later op overwrites in place (ReLU(inplace=True) after a residual add):
        # its head reads a copy, or backward would find the value it saved already changed
        modes = [False, True] if traced.train_graph is not None else [False]
        self._copy_tap = [any(overwritten(traced.node(q, m), traced.model) for m in modes) for q in taps]
        # set by annify.freeze on its copy: the heads as plain functions (see ``frozen``)
        self._frozen_heads: list[Callable] | None = None
        self.train(traced.model.training)

    @property
    def frozen(self) -> bool:
        """Whether this is an ``annify.freeze`` copy: for inference only, its weights held as constants."""
        return self._frozen_heads is not None

    def train(self, mode: bool = True) -> AnytimeNet:
        if mode and self.frozen:
            raise InferenceError(
                "this network is frozen for inference (annify.freeze): train the network it was frozen "
                "from, then freeze it again"
            )
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        if self.frozen:  # its code holds the tensors it was frozen with: they would not follow
            raise InferenceError(
                "a frozen network cannot be moved or converted: do it before freezing, "
                "annify.freeze(net.to(...))"
            )
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.frozen:
            raise InferenceError(
                "a frozen network holds the weights it was frozen with: load them into the network "
                "it was frozen from, then freeze it again"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self, spec: Spec) -> AnytimeNet:
        """Record ``spec`` as this network's description (name, source, input size, per-output costs).

        ``annify.build``/``convert``/``load`` call it; ``annify.cost.exit_flops`` and the exporters
        read the costs from it. A spec whose outputs are not this network's is refused.
        """
        if spec.taps != self.taps:
            raise ValueError(f"the spec's heads read {spec.taps}, but this network's read {self.taps}")
        self.spec = spec
        return self

    @property
    def exits(self) -> nn.ModuleList:
        """The added heads, one per tap, in order."""
        return getattr(self, self.exits_name)

    @property
    def exits_prefix(self) -> str:
        """State-dict prefix of the added heads: ``heads.`` (``exit_heads.`` if the model owns ``heads``)."""
        return f"{self.exits_name}."

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the added heads: exactly the original model's keys and tensors."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.exits_prefix)}

    @property
    def num_outputs(self) -> int:
        """Number of outputs: one per head plus the model's own classifier."""
        return len(self.exits) + 1

    @property
    def segments(self) -> list[Segment]:
        """The segments for the current mode (train graph where it differs from eval)."""
        if self.training and self._train_segments is not None:
            return self._train_segments
        return self._eval_segments

    def run_segment(self, j: int, state: tuple | list, head: bool = True) -> tuple[tuple, object]:
        """Run segment ``j`` on the carried ``state``; return (next state, output j).

        With ``head=False`` output j is the tap's feature tensor instead of the head's logits (an
        ensemble runtime skips heads whose predictions it never uses). For the last segment the
        output is the model's own output and the next state is empty.

        A ``state`` given as a list is handed over: the segment empties it before computing, so each
        carried value is freed right after its last use inside the segment, as eager code frees a
        block's input, instead of staying alive until the segment returns (fewer large blocks alive:
        BENCHMARKS.md §22a). Keep no other reference to the values to get that. A tuple is left as it is.
        """
        seg = self.segments[j]
        if type(state) is list and seg.boxed is not None:
            values = seg.boxed(self, state)
        else:
            values = seg.fn(self, *state)
            if type(state) is list:
                state.clear()
        if seg.tap is None:
            return (), values
        feature = values[seg.tap]
        if not head:
            return tuple(values[: seg.carry]), feature
        fn = self.exits[j] if self._frozen_heads is None else self._frozen_heads[j]
        return tuple(values[: seg.carry]), fn(feature.clone() if self._copy_tap[j] else feature)

    def run_segments(self, x: torch.Tensor, heads: Sequence[bool]) -> Iterator[object]:
        """Run segments 0, 1, ... lazily, one per item of ``heads``, yielding ``run_segment``'s output j
        (the head's logits, or with ``heads[j]`` false the tap's features).

        Each segment is handed its state as a list (see ``run_segment``): no reference stays behind
        here, so every carried value is freed right after its last use.
        """
        state: list = [x]
        for j, head in enumerate(heads):
            carried, out = self.run_segment(j, state, head=head)
            state = list(carried)
            del carried  # held while the caller runs, it would keep the next segment's input alive
            yield out

    def stream(self, x: torch.Tensor, k: int | None = None) -> Iterator[object]:
        """Yield the outputs one at a time, computing each segment only when the next one is asked for."""
        return self.run_segments(x, [True] * (self.num_outputs if k is None else k))

    def forward_until(self, x: torch.Tensor, k: int) -> list:
        """Compute only what the first ``k`` outputs need and return those ``k`` outputs."""
        if not 1 <= k <= self.num_outputs:
            raise ValueError(f"k must be between 1 and {self.num_outputs}, got {k}")
        return list(self.stream(x, k))

    def forward(self, x: torch.Tensor) -> list:
        return list(self.stream(x))
