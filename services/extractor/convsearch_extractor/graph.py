"""A model's layers: every graph node's name, op, output shape, the parameters of the model cut
there, and the 8 featured layers (first conv, last conv, 6 spread evenly between), or those a
model without conv layers names itself.

Names are exactly those of `torchvision.models.feature_extraction.get_graph_node_names` (eval
mode), so any of them can be handed to `create_feature_extractor`. Shapes come from a pass on
the meta device, which allocates nothing.
"""

import dataclasses

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models import feature_extraction
from torchvision.ops.misc import ConvNormActivation

FEATURED_COUNT = 8


@dataclasses.dataclass(frozen=True)
class Layer:
    """One requestable graph node. `output_shape` excludes the batch dimension; empty when the
    node does not produce a tensor (e.g. a `size` call)."""

    name: str
    op: str
    output_shape: tuple[int, ...]
    parameter_count: int
    featured_index: int = -1

    @property
    def featured(self) -> bool:
        return self.featured_index >= 0

    @property
    def is_tensor(self) -> bool:
        return bool(self.output_shape)


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """All layers of one model in graph order, plus its featured layer names in order."""

    layers: dict[str, Layer]
    featured: tuple[str, ...]
    parameter_count: int

    def ordered(self, include_all: bool) -> list[Layer]:
        """Featured layers first, then (if asked) every other node in graph order."""
        first = [self.layers[name] for name in self.featured]
        if not include_all:
            return first
        return first + [layer for layer in self.layers.values() if not layer.featured]


def tracer_kwargs(leaf_modules: tuple[type, ...]) -> dict:
    """The tracer arguments used both to name nodes and to build feature extractors."""
    return {"leaf_modules": list(leaf_modules)} if leaf_modules else {}


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _own_parameters(node: fx.Node, modules: dict[str, nn.Module], params: dict[str, int]) -> set[str]:
    if node.op == "call_module":
        return {f"{node.target}.{name}" for name, _ in modules[node.target].named_parameters()}
    if node.op == "get_attr" and node.target in params:
        return {node.target}
    return set()


def _featured_positions(count: int) -> list[int]:
    if count <= FEATURED_COUNT:
        return list(range(count))
    return sorted({round(i * (count - 1) / (FEATURED_COUNT - 1)) for i in range(FEATURED_COUNT)})


def describe(model: nn.Module, input_size: int, leaf_modules: tuple[type, ...] = (),
             featured: tuple[str, ...] = ()) -> ModelGraph:
    """Traces `model` (best built on the meta device) and describes every node at `input_size`.

    The featured layers are `featured` when given (a model without conv layers names its own),
    else the first conv, the last and 6 spread evenly between.
    """
    model = model.eval()
    # The same tracer configuration get_graph_node_names uses, so the names match it exactly.
    tracer = feature_extraction.NodePathTracer(
        **feature_extraction._set_default_tracer_kwargs(tracer_kwargs(leaf_modules)))
    graph = tracer.trace(model)
    module = fx.GraphModule(tracer.root, graph)
    first = next(model.parameters(), None)  # a model without parameters is traced on the meta device
    device = first.device if first is not None else torch.device("meta")
    ShapeProp(module).propagate(torch.empty(1, 3, input_size, input_size, device=device))

    modules = dict(model.named_modules())
    params = {name: p.numel() for name, p in model.named_parameters()}
    upstream: dict[fx.Node, frozenset[str]] = {}
    layers: dict[str, Layer] = {}
    convs: list[str] = []
    for node in graph.nodes:
        deps = set(_own_parameters(node, modules, params))
        for parent in node.all_input_nodes:
            deps |= upstream[parent]
        upstream[node] = frozenset(deps)
        if node.op in ("placeholder", "output") or node not in tracer.node_to_qualname:
            continue
        name = tracer.node_to_qualname[node]
        meta = node.meta.get("tensor_meta")
        shape = tuple(int(d) for d in meta.shape[1:]) if hasattr(meta, "shape") else ()
        layers[name] = Layer(name, _op_name(node, modules), shape, sum(params[p] for p in deps))
        # torchvision traces Conv2d+BN+activation blocks as one leaf module: a conv layer too.
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, ConvNormActivation)):
            convs.append(name)
    if featured:
        unknown = [name for name in featured if not layers.get(name, Layer(name, "", (), 0)).is_tensor]
        if unknown:
            raise ValueError(f"featured layers {unknown} are not tensor nodes of the graph")
    else:
        featured = tuple(convs[i] for i in _featured_positions(len(convs)))
    for index, name in enumerate(featured):
        layers[name] = dataclasses.replace(layers[name], featured_index=index)
    return ModelGraph(layers, featured, sum(params.values()))
