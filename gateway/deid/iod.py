"""Attribute Types (1, 1C, 2, 2C, 3) per IOD, from highdicom's tables of PS3.3.

Table E.1-1 uses compound action codes (X/Z, Z/D, X/D, X/Z/D, X/Z/U*) whose
choice depends on whether the attribute is Type 1, 2 or 3 in the IOD of the
instance being de-identified. highdicom ships the IOD-to-module and
module-to-attribute tables of the standard; this module indexes them by
(enclosing sequence path, keyword).

highdicom's own loader keeps the whole module-attribute table in memory
(about 100,000 entries, over 100 MB of Python objects, for the life of the
process). The engine needs the Types of far fewer attributes: those the
table names, dates, person names and content text. So the table is read
here line by line, keeping only those, in about 3 MB. If the file's layout
ever changes so that the line reader finds nothing, the whole table is
loaded with ``json`` instead: slower and larger, never wrong.

The tables are read from highdicom's package directory without importing
highdicom: its Python code costs about 20 MB of memory the tables do not
need. The receiving process needs no more than :func:`pixel_data_sop_classes`,
which the main process computes and hands it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
from collections.abc import Iterable
from functools import cache
from pathlib import Path as FilePath
from typing import Any

from pydicom._dicom_dict import DicomDictionary
from pydicom.datadict import keyword_for_tag

from gateway.deid.standard import TagPattern, confidentiality_table

#: Path of enclosing sequence keywords, outermost first.
Path = tuple[str, ...]
#: (path, keyword) -> Type, for one module.
ModuleTypes = dict[tuple[Path, str], str]

_STRICTNESS = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}
_PIXEL_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
_TABLE_FILE = "module_attribute_map.json"
_lock = threading.Lock()


@cache
def _standard_dir() -> FilePath:
    """highdicom's directory of tables of the standard, found without importing it."""
    spec = importlib.util.find_spec("highdicom")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("highdicom is not installed")
    return FilePath(next(iter(spec.submodule_search_locations))) / "_standard"


@cache
def _sop_class_iods() -> dict[str, str]:
    """SOP Class UID -> IOD name (highdicom's ``sop_class_iod_map.json``)."""
    table: dict[str, str] = json.loads((_standard_dir() / "sop_class_iod_map.json").read_bytes())
    return table


@cache
def _iod_modules() -> dict[str, list[dict[str, Any]]]:
    """IOD name -> its modules (highdicom's ``iod_module_map.json``)."""
    table: dict[str, list[dict[str, Any]]] = json.loads(
        (_standard_dir() / "iod_module_map.json").read_bytes()
    )
    return table


def _needed_keywords() -> frozenset[str]:
    """The attributes whose Type the engine may ask for."""
    table = {
        keyword_for_tag(row.tag) for row in confidentiality_table().rows if row.pattern is TagPattern.EXACT
    }
    by_vr = {entry[4] for entry in DicomDictionary.values() if entry[0] in ("DA", "DT", "PN")}
    return frozenset((table | by_vr | {"TextValue"} | _PIXEL_KEYWORDS) - {""})


_MODULE = re.compile(rb'^  "([^"]+)": \[')
_STRING = re.compile(rb'"([^"]*)"')


def _read_lines(lines: Iterable[bytes], needed: frozenset[str]) -> dict[str, ModuleTypes]:
    """Parse highdicom's pretty-printed table one line at a time."""
    modules: dict[str, ModuleTypes] = {}
    paths: dict[Path, Path] = {}
    current: ModuleTypes | None = None
    keyword = kind = ""
    path: list[str] | None = None
    for line in lines:
        text = line.strip()
        if (match := _MODULE.match(line)) is not None:
            current = modules.setdefault(match.group(1).decode(), {})
        elif text.startswith(b'"keyword"'):
            keyword = _STRING.findall(text)[1].decode()
        elif text.startswith(b'"type"'):
            kind = sys.intern(_STRING.findall(text)[1].decode())
        elif text.startswith(b'"path": [') and current is not None:
            if text.startswith(b'"path": []'):
                if keyword in needed:
                    current[((), keyword)] = kind
            else:
                path = []
        elif path is not None:
            if text.startswith(b"]"):
                if keyword in needed and current is not None:
                    key = tuple(path)
                    current[(paths.setdefault(key, key), keyword)] = kind
                path = None
            else:
                path.append(sys.intern(_STRING.findall(text)[0].decode()))
    return modules


@cache
def _module_types() -> dict[str, ModuleTypes]:
    needed = _needed_keywords()
    source = _standard_dir() / _TABLE_FILE
    with source.open("rb") as handle:
        modules = _read_lines(handle, needed)
    if not any(modules.values()):
        with source.open("rb") as handle:
            parsed = json.load(handle)
        modules = {
            name: {(tuple(a["path"]), a["keyword"]): a["type"] for a in attributes if a["keyword"] in needed}
            for name, attributes in parsed.items()
        }
    return modules


@cache
def _iod_types(iod_name: str) -> dict[tuple[Path, str], str]:
    modules = _module_types()
    types: dict[tuple[Path, str], str] = {}
    for module in _iod_modules()[iod_name]:
        for key, new in modules.get(module["key"], {}).items():
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
    iod_name = _sop_class_iods().get(sop_class_uid)
    if iod_name is None:
        return None
    with _lock:  # the first call per IOD builds its index: once, not once per thread
        types = _iod_types(iod_name)
    return types.get((path, keyword))


@cache
def pixel_data_sop_classes() -> frozenset[str]:
    """The SOP Classes whose IOD holds pixel data (outside icon images)."""
    with _lock:
        modules = _module_types()
    with_pixels = {
        name
        for name, types in modules.items()
        if any(keyword in _PIXEL_KEYWORDS and "IconImageSequence" not in path for path, keyword in types)
    }
    iods = {
        iod for iod, iod_modules in _iod_modules().items()
        if any(module["key"] in with_pixels for module in iod_modules)
    }  # fmt: skip
    return frozenset(uid for uid, iod in _sop_class_iods().items() if iod in iods)


def iod_has_pixel_data(sop_class_uid: str) -> bool:
    """Whether the IOD of a SOP Class holds pixel data (outside icon images);
    ``False`` for a SOP Class the tables do not know."""
    return sop_class_uid in pixel_data_sop_classes()


def required_level(attribute_type_code: str | None) -> int | None:
    """Collapse a Type code to 1, 2 or 3 (conditional Types count as their base)."""
    if attribute_type_code is None:
        return None
    return int(attribute_type_code[0])
