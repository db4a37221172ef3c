"""YAML from users, read so that a small file cannot take the machine's memory or run code.

``yaml.safe_load`` already builds only plain data (no Python tags), and an alias (``*name``) shares
the anchored object instead of copying it, so loading is cheap. The danger comes after: nested
aliases make a 400-byte file describe billions of values, and anything that walks the result (a
validation, an error message, ``yaml.safe_dump`` of the resolved config) expands them. So every
YAML input the package reads (config files, ``KEY=VALUE`` flags, run directories' ``config.yaml``)
goes through :func:`load_yaml`, which refuses, with one line, inputs larger than :data:`MAX_BYTES`
and results that would expand to more than :data:`MAX_VALUES` values (or refer to themselves).
The size is counted over the shared structure, once per distinct object, so the check itself costs
time proportional to the file, not to its expansion.
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError, short_text

#: The largest YAML input read (a configuration file is a few kilobytes).
MAX_BYTES = 1 << 20
#: The most values (mapping keys and values, list items, scalars) a YAML input may expand to.
MAX_VALUES = 100_000


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text`` (named ``source`` in errors) as plain YAML data, with the limits above.

    Raises:
        ConfigError: the text is too large, not valid YAML, holds a Python tag, refers to itself,
            or expands (through aliases) to more than :data:`MAX_VALUES` values.
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source} is {len(text):,} characters long; YAML inputs are limited to {MAX_BYTES:,}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {short_text(' '.join(str(exc).split()), 200)}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be read") from None
    values = expanded_size(data)
    if values is None:
        raise ConfigError(f"{source} refers to itself through an alias: it has no finite value")
    if values > MAX_VALUES:
        raise ConfigError(f"{source} expands to {values:,} values through its aliases (more than "
                          f"{MAX_VALUES:,}); write the values out instead of nesting aliases")
    return data


def expanded_size(data: Any) -> Any:
    """How many values ``data`` holds once every shared (aliased) object is counted at each place it
    appears; ``None`` if it contains itself. Iterative, one visit per distinct object."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        key = id(node)
        if children_done:
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            sizes[key] = 1 + sum(sizes.get(id(v), 1) for v in items)
            active.discard(key)
            continue
        if key in sizes:
            continue
        if key in active:
            return None
        active.add(key)
        stack.append((node, True))
        for child in (node.values() if isinstance(node, dict) else node):
            if isinstance(child, (dict, list)):
                if id(child) in active:
                    return None
                stack.append((child, False))
    return sizes.get(id(data), 1)


__all__ = ["load_yaml", "expanded_size", "MAX_BYTES", "MAX_VALUES"]
