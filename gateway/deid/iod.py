"""Attribute Types (1, 1C, 2, 2C, 3) per IOD, from highdicom's tables of PS3.3.

Table E.1-1 uses compound action codes (X/Z, Z/D, X/D, X/Z/D, X/Z/U*) whose
choice depends on whether the attribute is Type 1, 2 or 3 in the IOD of the
instance being de-identified. highdicom ships the IOD-to-module and
module-to-attribute tables of the standard; this module indexes them by
(enclosing sequence path, keyword).
"""

from __future__ import annotations

from functools import cache

from highdicom._standard_utils import (
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)

#: Path of enclosing sequence keywords, outermost first.
Path = tuple[str, ...]

_STRICTNESS = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}


@cache
def _iod_types(iod_name: str) -> dict[tuple[Path, str], str]:
    modules = get_module_attribute_map()
    types: dict[tuple[Path, str], str] = {}
    for module in get_iod_module_map()[iod_name]:
        for attribute in modules.get(module["key"], ()):
            key = (tuple(attribute["path"]), attribute["keyword"])
            new = attribute["type"]
            old = types.get(key)
            # Several modules can define one attribute; the strictest Type wins
            # because the attribute must then satisfy every module.
            if old is None or _STRICTNESS.get(new, 9) < _STRICTNESS.get(old, 9):
                types[key] = new
    return types


def attribute_type(sop_class_uid: str, path: Path, keyword: str) -> str | None:
    """Return the Type of ``keyword`` at ``path`` in the IOD of a SOP Class.

    ``None`` means the Type is unknown: the SOP Class has no IOD in the
    tables, or the IOD does not define the attribute at that path.
    """
    iod_name = get_sop_class_iod_map().get(sop_class_uid)
    if iod_name is None:
        return None
    return _iod_types(iod_name).get((path, keyword))


def required_level(attribute_type_code: str | None) -> int | None:
    """Collapse a Type code to 1, 2 or 3 (conditional Types count as their base)."""
    if attribute_type_code is None:
        return None
    return int(attribute_type_code[0])
