"""Watch a network run: which submodule was called, with what shape in and out, and what it returned.

The U of `003 · 1. 网络结构：U-Net` (down levels, middle, up levels with skips) is easiest to see as
a table of the shape every block hands on. PyTorch's forward hooks give that without touching the
model: a hook runs when a submodule is entered and when it returns; we note the shapes and remove
every hook afterwards, even if the call raised.

    rows = trace_shapes(unet, x, t, context, depth=1)    # one ShapeRow per block the UNet calls
    print(shape_table(rows))
    with torch.device("meta"):                            # SD v1.5's shapes, no weights, no memory
        big = UNet(UNetConfig.sd15())
    trace_shapes(big, torch.empty(1, 4, 64, 64, device="meta"), 999, torch.empty(1, 77, 768, device="meta"))

`capture` keeps the tensors themselves (a few named submodules' inputs and output), and
`parameter_counts` sums the weights under each part; both work on the meta device too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ShapeRow:
    name: str  # dotted path, as in the state dict: "down_blocks.0.resnets.0"
    kind: str  # class name: "ResnetBlock"
    depth: int  # 1: called by the traced module's own forward; 2: by one of those; …
    input: tuple[int, ...] | None  # shape of the first tensor argument (None: no tensor argument)
    output: tuple[int, ...] | None  # shape of the output (its first tensor if it is a tuple or list)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _shape(value: Any) -> tuple[int, ...] | None:
    tensor = _first_tensor(value)
    return None if tensor is None else tuple(tensor.shape)


@torch.no_grad()
def trace_shapes(module: nn.Module, *inputs, depth: int | None = None, **kwargs) -> list[ShapeRow]:
    """Call `module(*inputs, **kwargs)` once and return one row per submodule call, in the order the
    calls began (a block before its parts). `depth` counts calls, not dots in the name: 1 keeps what
    `module.forward` calls itself (for the UNet: every ResNet block, transformer and resampler of
    the U, and the mid block as one row), 2 also what those call, and so on; None keeps all. A
    container that is never called (a ModuleList, a UNet level the UNet loops over) has no row."""
    rows: list[dict] = []
    running: list[int | None] = []  # the row of each call now in progress, innermost last (None: not kept)
    handles = []

    def before(name: str, kind: str):
        def hook(m: nn.Module, args: tuple) -> None:
            call_depth = len(running) + 1
            if depth is None or call_depth <= depth:
                running.append(len(rows))
                rows.append({"name": name, "kind": kind, "depth": call_depth, "input": _shape(args), "output": None})
            else:
                running.append(None)
        return hook

    def after(m: nn.Module, args: tuple, output: Any) -> None:
        row = running.pop()
        if row is not None:
            rows[row]["output"] = _shape(output)

    try:
        for name, sub in module.named_modules():
            if name:  # not `module` itself
                handles.append(sub.register_forward_pre_hook(before(name, type(sub).__name__)))
                handles.append(sub.register_forward_hook(after))
        module(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [ShapeRow(**row) for row in rows]


def _format_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(str(n) for n in shape) + ")"


def shape_table(rows: list[ShapeRow], indent: bool = True) -> str:
    """The rows as aligned text: name (indented by depth), class, input shape → output shape."""
    names = [("  " * (r.depth - 1) if indent else "") + r.name for r in rows]
    inputs = [_format_shape(r.input) for r in rows]
    w_name = max([len(n) for n in names] + [len("module")])
    w_kind = max([len(r.kind) for r in rows] + [len("class")])
    w_in = max([len(s) for s in inputs] + [len("input")])
    lines = [f"{'module':<{w_name}}  {'class':<{w_kind}}  {'input':>{w_in}}    output"]
    for name, row, shape_in in zip(names, rows, inputs):
        lines.append(f"{name:<{w_name}}  {row.kind:<{w_kind}}  {shape_in:>{w_in}} -> {_format_shape(row.output)}")
    return "\n".join(lines)


@dataclass
class Captured:
    args: tuple  # the positional arguments the submodule was called with
    output: Any  # what it returned


@torch.no_grad()
def capture(module: nn.Module, names: list[str], *inputs, **kwargs) -> dict[str, Captured]:
    """Call `module(*inputs, **kwargs)` once and keep, for each submodule named in `names`, its
    arguments and output (its last call, if it ran more than once). Unknown names raise."""
    submodules = dict(module.named_modules())
    unknown = [n for n in names if n not in submodules]
    if unknown:
        raise KeyError(f"no submodule named {', '.join(unknown)}")
    seen: dict[str, Captured] = {}
    handles = []

    def keep(name: str):
        def hook(m: nn.Module, args: tuple, output: Any) -> None:
            seen[name] = Captured(args, output)
        return hook

    try:
        for name in names:
            handles.append(submodules[name].register_forward_hook(keep(name)))
        module(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise RuntimeError(f"these submodules were not called: {', '.join(missing)}")
    return seen


def parameter_counts(module: nn.Module, depth: int = 1) -> dict[str, int]:
    """Number of parameters under each submodule at most `depth` names deep ("down_blocks.0" is 2),
    in the module's order; the values sum to the module's total."""
    counts: dict[str, int] = {}
    for name, parameter in module.named_parameters():
        owner = name.split(".")[:-1]  # the path of the module that holds the tensor
        part = ".".join(owner[:depth]) or name  # a tensor held by `module` itself counts under its own name
        counts[part] = counts.get(part, 0) + parameter.numel()
    return counts
