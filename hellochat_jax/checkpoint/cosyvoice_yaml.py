"""Reads CosyVoice 2's hyperpyyaml (`cosyvoice2.yaml`) as plain data, safely.

The release file builds its PyTorch objects with tags: ``!new:pkg.Class`` (construct),
``!name:pkg.func`` (a callable with bound kwargs), ``!apply:pkg.func`` (call at load time) and
``!ref <key>`` (reference, possibly in arithmetic such as ``<a> * <b>``). hyperpyyaml imports
and runs those; we never do. Each tagged node becomes a ``Tagged(kind, target, value)`` record,
references are resolved to the referenced data, and arithmetic in references is evaluated by
a tiny AST walker that accepts numbers and + - * / // only.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import re
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass
class Tagged:
    """A `!new:` / `!name:` / `!apply:` node, kept as data: what it would build, and with what."""

    kind: str  # "new" | "name" | "apply"
    target: str  # dotted path, e.g. "cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
    value: Any  # the node's mapping (kwargs), list (args) or scalar

    @property
    def cls(self) -> str:
        return self.target.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        return self.value.get(key, default) if isinstance(self.value, dict) else default

    def __getitem__(self, key: str) -> Any:
        if not isinstance(self.value, dict) or key not in self.value:
            raise KeyError(f"{self.target}: no argument {key!r}")
        return self.value[key]


@dataclasses.dataclass
class _Ref:
    expr: str


class _SafeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(kind):
    def construct(loader: yaml.Loader, suffix: str, node: yaml.Node):
        if isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return Tagged(kind, suffix, value)

    return construct


for _kind in ("new", "name", "apply"):
    _SafeLoader.add_multi_constructor(f"!{_kind}:", _construct_tagged(_kind))
_SafeLoader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))
# Other hyperpyyaml tags (e.g. !copy, !tuple, !include) are refused rather than guessed.

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.USub: operator.neg}


def _eval_arith(expr: str) -> Any:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression in !ref: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _lookup(root: dict, key: str) -> Any:
    node: Any = root
    for part in key.split("."):
        if isinstance(node, Tagged):
            node = node.value
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"!ref <{key}>: no such key")
        node = node[part]
    return node


def _resolve(node: Any, root: dict, depth: int = 0) -> Any:
    if depth > 50:
        raise ValueError("cyclic !ref in yaml")
    if isinstance(node, _Ref):
        refs = re.findall(r"<([^<>]+)>", node.expr)
        if len(refs) == 1 and node.expr.strip() == f"<{refs[0]}>":
            return _resolve(_lookup(root, refs[0]), root, depth + 1)
        values = {r: _resolve(_lookup(root, r), root, depth + 1) for r in refs}
        expr = re.sub(r"<([^<>]+)>", lambda m: repr(values[m.group(1)]), node.expr)
        return _eval_arith(expr)
    if isinstance(node, Tagged):
        return Tagged(node.kind, node.target, _resolve(node.value, root, depth))
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth) for v in node]
    return node


def load_cosyvoice_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parses cosyvoice2.yaml into plain dicts and `Tagged` records; nothing is imported or run."""
    text = Path(path).read_text()
    try:
        raw = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - _SafeLoader derives from SafeLoader
    except yaml.constructor.ConstructorError as e:
        raise ValueError(f"{path}: unsupported yaml tag ({e.problem})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    raw.update(overrides or {})
    return _resolve(raw, raw)


def dump_cosyvoice_yaml(data: dict[str, Any]) -> str:
    """Writes parsed data back as hyperpyyaml (references are written resolved)."""

    class _Dumper(yaml.SafeDumper):
        pass

    def rep_tagged(dumper, t: Tagged):
        tag = f"!{t.kind}:{t.target}"
        if isinstance(t.value, dict):
            return dumper.represent_mapping(tag, t.value)
        if isinstance(t.value, list):
            return dumper.represent_sequence(tag, t.value)
        return dumper.represent_scalar(tag, "" if t.value is None else str(t.value))

    _Dumper.add_representer(Tagged, rep_tagged)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
