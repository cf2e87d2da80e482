"""Deterministic node names from the exporter's module scopes: `/model/layers.3/attn/Softmax_0`.

torch.onnx names nodes after aten ops with global counters (`node_Softmax_186`), which change whenever anything
upstream changes. Every node it emits carries `pkg.torch.onnx.name_scopes`, the module path it came from, e.g.
`['', 'lm', 'lm.layers.3', 'lm.layers.3.self_attn', 'scaled_dot_product_attention']` (module scopes, then the
aten op). This pass renames each node `/{path}/{Op}_{k}`: `path` is the deepest module scope with our names
(`lm` -> `model`, `self_attn` -> `attn`, `head` -> `lm_head`, numeric parts joined: `layers.3`), `k` counts
nodes of that op type in that scope in graph order. Nodes without scopes go under `/graph`. Nodes that already
have an AnchorRT name (added by a mitigation pass: they start with `/` and carry no torch scopes) are kept, so
running the pass twice changes nothing.

`layer_of(node)` reads the decoder layer index back, from the name or the scopes.
"""

from __future__ import annotations

import ast
import re
from collections import Counter

import onnx_ir as ir
from anchorrt.graph_passes.base import GraphPass

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
RENAME = {"lm": "model", "self_attn": "attn", "head": "lm_head"}
_HOOK_SCOPES = {"", "_empty_nn_module_stack_from_metadata_hook"}
_LAYER_IN_NAME = re.compile(r"/layers\.(\d+)/")
_LAYER_IN_SCOPE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def module_scopes(node: ir.Node) -> list[str]:
    """The module scopes of a node (the aten op name that ends the list is dropped)."""
    raw = node.metadata_props.get(SCOPES_KEY)
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    if not isinstance(scopes, list) or not scopes:
        return []
    return [s for s in scopes[:-1] if isinstance(s, str) and s not in _HOOK_SCOPES]


def scope_path(scope: str) -> str:
    """`lm.layers.3.self_attn.q_proj` -> `model/layers.3/attn/q_proj`."""
    parts: list[str] = []
    for piece in scope.split("."):
        if piece.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{piece}"
        else:
            parts.append(RENAME.get(piece, piece))
    return "/".join(parts)


def layer_of(node: ir.Node) -> int | None:
    """Decoder layer index of a node: from an AnchorRT name, else from its torch module scopes."""
    if node.name:
        m = _LAYER_IN_NAME.search(node.name + "/")
        if m:
            return int(m.group(1))
    for scope in reversed(module_scopes(node)):
        m = _LAYER_IN_SCOPE.search(scope)
        if m:
            return int(m.group(1))
    return None


class AssignNodeNames(GraphPass):
    """Rename every node of the main graph (and its subgraphs) `/{module path}/{Op}_{k}`; count = nodes renamed."""

    name = "assign_node_names"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counters: Counter[tuple[str, str]] = Counter()
        taken = {n.name for n in model.graph.all_nodes() if n.name and n.name.startswith("/")
                 and SCOPES_KEY not in n.metadata_props}
        renamed = 0
        for node in model.graph.all_nodes():
            if node.name in taken and SCOPES_KEY not in node.metadata_props:
                continue  # already ours
            scopes = module_scopes(node)
            path = scope_path(scopes[-1]) if scopes else "graph"
            key = (path, node.op_type)
            name = f"/{path}/{node.op_type}_{counters[key]}"
            counters[key] += 1
            while name in taken:  # cannot happen with exporter graphs; keeps names unique whatever the input
                name = f"/{path}/{node.op_type}_{counters[key]}"
                counters[key] += 1
            taken.add(name)
            if node.name != name:
                node.name = name
                renamed += 1
        self.count = renamed
        return ir.passes.PassResult(model, modified=renamed > 0)
