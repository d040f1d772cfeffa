"""Safe YAML reading that keeps where every key and value came from.

PyYAML's SafeLoader already refuses Python tags; on top of it we refuse duplicate keys (PyYAML silently keeps the
last one, which hides typos in hand-written recipes) and non-string keys, and we keep each node's line and column
so that schema errors can point at the exact spot.
"""

from __future__ import annotations

import yaml

from peftctl.errors import Location, Problem

Path_ = tuple  # a path into the document: ("training", "learning_rate") or ("method", "targets", 0)


class Marks:
    """Line/column of every key and value, by path into the document."""

    def __init__(self, source: str):
        self.source = source
        self.keys: dict[Path_, Location] = {}
        self.values: dict[Path_, Location] = {}

    def of_key(self, path: Path_) -> Location:
        """The position of a key, or of its nearest ancestor when the key is absent."""
        return self._nearest(self.keys, path)

    def of_value(self, path: Path_) -> Location:
        return self._nearest(self.values, path)

    def _nearest(self, table: dict[Path_, Location], path: Path_) -> Location:
        path = tuple(path)
        while path:
            if path in table:
                return table[path]
            if path in self.keys:
                return self.keys[path]
            path = path[:-1]
        return table.get((), self.values.get((), Location(self.source)))


def _location(source: str, mark) -> Location:
    return Location(source, mark.line + 1, mark.column + 1)


def decode(data: bytes, source: str) -> str:
    """UTF-8 text of a recipe; a bad byte is reported with its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        column = e.start - (before.rfind(b"\n") + 1) + 1
        raise _single(Location(source, line, column), "",
                      f"the file is not valid UTF-8 (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


MAX_DEPTH = 50  # a recipe is a handful of levels deep; PyYAML's composer recurses once per level
MAX_NODES = 20_000  # values after alias expansion: nine nested aliases of nine would make 387 million


def check_shape(text: str, source: str) -> None:
    """Refuse a document nested too deep before PyYAML's recursive composer sees it (the event parser is
    iterative, so this pass costs no stack)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: fast
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _single(_location(source, event.start_mark), "",
                                  f"nested more than {MAX_DEPTH} levels deep; a recipe needs a few")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.MarkedYAMLError as e:
        if "nesting depth" in str(e.problem):  # libyaml's own limit, met while scanning ahead
            mark = e.problem_mark or e.context_mark
            raise _single(_location(source, mark) if mark else Location(source), "",
                          f"nested more than {MAX_DEPTH} levels deep; a recipe needs a few") from None
    except yaml.YAMLError:
        pass  # load_yaml reports other syntax errors with their position, in its own words


def load_yaml(text: str, source: str) -> tuple[object, Marks]:
    """Parse one YAML document into plain Python values and the marks of every node."""
    marks = Marks(source)
    check_shape(text, source)
    loader = yaml.SafeLoader(text)
    loader.peftctl_nodes = 0
    try:
        node = loader.get_single_node()
        if node is None:
            return None, marks
        value = _build(node, (), marks, loader, source)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _location(source, mark) if mark else Location(source)
        problem = (e.problem or str(e)).strip()
        if "could not determine a constructor" in problem:
            problem = f"YAML tag not allowed: {problem.split('tag', 1)[-1].strip()} (recipes are plain data)"
        elif e.context:
            problem = f"{e.context}; {problem}"
        raise _single(where, "", f"YAML syntax: {problem}") from None
    except yaml.YAMLError as e:
        raise _single(Location(source), "", f"YAML syntax: {e}") from None
    finally:
        loader.dispose()
    return value, marks


PLAIN_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}


def _build(node, path: Path_, marks: Marks, loader: yaml.SafeLoader, source: str):
    loader.peftctl_nodes += 1
    if loader.peftctl_nodes > MAX_NODES or len(path) > MAX_DEPTH:
        # An alias is the same node reached again: a few nested aliases expand exponentially (a "billion laughs").
        raise _single(_location(source, node.start_mark), ".".join(map(str, path[:6])),
                      f"the document expands to more than {MAX_NODES:,d} values or {MAX_DEPTH} levels (through "
                      "aliases); write the recipe out plainly")
    marks.values[path] = _location(source, node.start_mark)
    expected_tag = PLAIN_TAGS.get(type(node))
    if expected_tag and node.tag != expected_tag:
        # Scalars with foreign tags are refused by SafeLoader itself; mappings and sequences we walk ourselves.
        raise _single(marks.values[path], ".".join(map(str, path)),
                      f"YAML tag not allowed: {node.tag} (recipes are plain data)")
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<` merge keys before we look for duplicates
        result: dict = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            where = _location(source, key_node.start_mark)
            if not isinstance(key, str):
                raise _single(where, ".".join(map(str, path)), f"keys must be names, not {key!r}")
            if key in result:
                first = marks.keys[path + (key,)]
                raise _single(where, ".".join(map(str, path + (key,))),
                              f"duplicate key (first at line {first.line}); keep one")
            marks.keys[path + (key,)] = where
            result[key] = _build(value_node, path + (key,), marks, loader, source)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), marks, loader, source) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _single(where: Location, key: str, message: str):
    from peftctl.errors import RecipeError

    return RecipeError([Problem(where, key, message)])
