"""YAML as the sweep configs read it: safe, bounded, and with only ``true``/``false`` as booleans.

Two differences from ``yaml.safe_load``:

* YAML 1.1 reads ``on``/``off``/``yes``/``no`` as booleans, so ``mode: off`` became ``False``.
  Here only ``true``/``false`` (any case YAML 1.2 allows) are booleans; ``off`` stays the string
  ``"off"``.
* Aliases (``*name``) share one node, so a few hundred bytes of nested aliases expand to billions
  of nodes once copied or walked (an "alias bomb"). The document's expanded size is counted on
  the node graph before anything is built, and a document over :data:`MAX_NODES` is refused.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from chronovisor.eval.errors import ConfigError

#: The most nodes a document may hold once its aliases are expanded (a large sweep config has ~10³).
MAX_NODES = 100_000

_BOOL_TAG = "tag:yaml.org,2002:bool"
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (see the module docstring)."""

    @classmethod
    def _plain_resolvers(cls) -> None:
        cls.yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }
        cls.add_implicit_resolver(_BOOL_TAG, _YAML12_BOOL, list("tTfF"))


_Loader._plain_resolvers()


def load_yaml(text: str, where: str) -> Any:
    """Parse one YAML document (None for an empty one).

    Args:
        text: the YAML text.
        where: what the text is (a file name, ``--set KEY``), for the error message.

    Raises:
        ConfigError: not valid YAML, or more than :data:`MAX_NODES` nodes once aliases expand.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_NODES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_NODES:,} values through its aliases "
                              f"(*name); write the values out or use fewer nested aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({_describe(error)})") from None
    finally:
        loader.dispose()


def _describe(error: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, on one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem is None or mark is None:
        return " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes in ``node`` with every alias expanded (memoised per node; capped just above MAX_NODES)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:  # a recursive alias: infinite once expanded
        return MAX_NODES + 1
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_NODES:
            break
    open_nodes.discard(key)
    sizes[key] = min(total, MAX_NODES + 1)
    return sizes[key]
