"""YAML with positions: plain Python values plus a map from each value's path to its file:line:col.

PyYAML's composer already knows where every node starts; we keep that while building plain dicts and lists so that
a schema error found later (by pydantic, or by our own semantic checks) can point at the exact spot in the file.
Duplicate mapping keys are an error here, because YAML's "last one wins" silently drops half of a rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["Located", "Position", "YamlLoadError", "load_yaml"]

PathKey = tuple[str | int, ...]

# libyaml's parser when PyYAML was built with it (the wheels are): same nodes and marks, an order of magnitude faster
# on large policy sets. The pure-Python parser is the fallback.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class YamlLoadError(ValueError):
    def __init__(self, position: Position, message: str) -> None:
        super().__init__(f"{position}: {message}")
        self.position = position
        self.message = message


@dataclass(slots=True)
class Located:
    """A parsed document and where each of its values (and each mapping key) came from."""

    value: Any
    file: str
    positions: dict[PathKey, Position] = field(default_factory=dict)
    key_positions: dict[PathKey, Position] = field(default_factory=dict)

    def at(self, path: PathKey) -> Position:
        """The position of `path`, or of its nearest ancestor that has one (so every error has a location)."""
        p = tuple(path)
        while p:
            if p in self.positions:
                return self.positions[p]
            p = p[:-1]
        return self.positions.get((), Position(self.file, 1, 1))

    def key_at(self, path: PathKey) -> Position:
        """Where the key of `path` is written: the right place to complain about an unknown key."""
        return self.key_positions.get(tuple(path)) or self.at(path)


def _pos(file: str, node: yaml.Node) -> Position:
    return Position(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _build(node: yaml.Node, path: PathKey, doc: Located, scalars: yaml.constructor.SafeConstructor) -> Any:
    doc.positions[path] = _pos(doc.file, node)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlLoadError(_pos(doc.file, key_node), "mapping keys must be plain strings")
            key = str(key_node.value)
            if key in out:
                raise YamlLoadError(
                    _pos(doc.file, key_node), f"duplicate key {key!r} (YAML would silently keep the last)"
                )
            doc.key_positions[(*path, key)] = _pos(doc.file, key_node)
            out[key] = _build(value_node, (*path, key), doc, scalars)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), doc, scalars) for i, item in enumerate(node.value)]
    # Scalars: let PyYAML's safe constructor resolve the tag (int, bool, null, str) exactly as yaml.safe_load would.
    return scalars.construct_object(node, deep=True)


def load_yaml(text: str, file: str) -> Located:
    doc = Located(value=None, file=file)
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = Position(file, mark.line + 1, mark.column + 1) if mark else Position(file, 1, 1)
        raise YamlLoadError(pos, f"YAML syntax: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise YamlLoadError(Position(file, 1, 1), f"YAML syntax: {e}") from e
    if root is None:
        doc.value = None
        return doc
    doc.value = _build(root, (), doc, yaml.constructor.SafeConstructor())
    return doc
