"""De-identification profiles: YAML data on top of PS3.15 Table E.1-1.

A profile names the options of the table it applies, settings (UID root,
date shift range, patient lookup, pixel policies) and rules. A rule says
which attribute, which action, and why. A profile may ``extends:`` another;
its settings and rules override the parent's. Errors name the file and line.

Attribute references in rules:

- a keyword: ``PatientID``;
- a tag: ``(0010,0020)`` or ``00100020``;
- a private element: ``(0009,xx10)`` together with ``creator: ACME 1.0``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.uid import UID

from gateway.deid.standard import ACTION_CODES, OPTION_COLUMNS

#: Actions beyond Table E.1-1's codes that a rule may name.
EXTRA_ACTIONS: frozenset[str] = frozenset(
    {"replace", "hash", "date_shift", "pseudonym", "slide_pseudonym", "specimen_pseudonym"}
)
ACTIONS: frozenset[str] = ACTION_CODES | EXTRA_ACTIONS

OVERVIEW_POLICIES = ("drop", "redact", "replace", "keep")
BURNED_IN_POLICIES = ("drop", "quarantine")
UNKNOWN_POLICIES = ("remove", "quarantine", "keep")

_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_PRIVATE_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?[xX]{2}([0-9A-Fa-f]{2})\)?$")


class ProfileError(ValueError):
    """A profile file is invalid; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One profile rule: an action for an attribute, with its reason."""

    action: str
    why: str
    source: str  # "file:line"
    value: str | None = None


#: A public attribute (tag) or a private one (creator, group, element low byte).
RuleKey = int | tuple[str, int, int]


@dataclass(frozen=True)
class PixelPolicy:
    """What happens to images whose pixels may show identity."""

    overview: str = "drop"
    overview_keep_acknowledged: bool = False
    thumbnail: str = "pass"
    burned_in: str = "quarantine"
    ocr: bool = True
    drop_sop_classes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Profile:
    """A loaded, validated profile (the whole ``extends`` chain merged)."""

    name: str
    description: str
    sources: tuple[str, ...]
    content_hash: str
    options: frozenset[str]
    rules: Mapping[RuleKey, Rule]
    keep_private_creators: frozenset[str]
    uid_root: str = "2.25"
    date_shift_days: tuple[int, int] = (-3650, -365)
    patient_lookup: Path | None = None
    patient_lookup_required: bool = False
    clean_patterns: tuple[re.Pattern[str], ...] = ()
    clean_vocabulary: frozenset[str] = frozenset()
    pixels: PixelPolicy = field(default_factory=PixelPolicy)
    unknown_attributes: str = "remove"
    unknown_standard_attributes: str = "keep"

    @property
    def dates_mode(self) -> str:
        """``full``, ``modified`` or ``remove`` (the Basic Profile's actions)."""
        if "retain_long_full_dates" in self.options:
            return "full"
        if "retain_long_modified_dates" in self.options:
            return "modified"
        return "remove"


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = {str(k): v for k, v in loader.construct_mapping(node, deep=True).items()}
    mapping["__line__"] = node.start_mark.line + 1
    mapping["__lines__"] = {
        key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)
    }
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def builtin_profiles() -> dict[str, Path]:
    """Profiles shipped in ``profiles/``, by name."""
    folder = resources.files("gateway.profiles")
    return {
        entry.name.removesuffix(".yaml"): Path(str(entry))
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def _resolve(name_or_path: str, relative_to: Path | None) -> Path:
    builtin = builtin_profiles()
    if name_or_path in builtin:
        return builtin[name_or_path]
    path = Path(name_or_path)
    if not path.is_absolute() and relative_to is not None:
        path = relative_to.parent / path
    if not path.is_file():
        known = ", ".join(sorted(builtin))
        raise ProfileError(f"profile {name_or_path!r} not found (built-in profiles: {known})")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: a profile must be a mapping")
    return data


def _strip_lines(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k not in _META}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a built-in profile by name or a profile file by path."""
    path = _resolve(str(name_or_path), None)
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    while True:
        resolved = path.resolve()
        if resolved in seen:
            raise ProfileError(f"{path}: 'extends' forms a cycle")
        seen.add(resolved)
        data = _read(path)
        chain.append((path, data))
        parent = data.get("extends")
        if parent is None:
            break
        if not isinstance(parent, str):
            raise ProfileError(f"{path}:{data['__lines__']['extends']}: 'extends' must be a profile name")
        path = _resolve(parent, path)
    return _build(list(reversed(chain)))


_META = frozenset({"__line__", "__lines__"})
_TOP_KEYS = _META | {"name", "description", "extends", "options", "rules", "settings", "private"}


def _build(chain: list[tuple[Path, dict[str, Any]]]) -> Profile:
    """Merge a chain of profile files, base first."""
    options: set[str] = set()
    rules: dict[RuleKey, Rule] = {}
    creators: set[str] = set()
    settings: dict[str, Any] = {}
    name = description = ""
    for path, data in chain:
        where = str(path)
        for top in data:
            if top not in _TOP_KEYS:
                raise ProfileError(f"{where}:{data['__lines__'][top]}: unknown key {top!r}")
        name = str(data.get("name", path.stem))
        description = str(data.get("description", description))
        for option in _list(data, "options", where):
            if option not in OPTION_COLUMNS:
                raise ProfileError(
                    f"{where}:{data['__lines__']['options']}: unknown option {option!r} "
                    f"(known: {', '.join(OPTION_COLUMNS)})"
                )
            options.add(option)
        private = data.get("private") or {}
        if not isinstance(private, dict):
            raise ProfileError(f"{where}:{data['__lines__']['private']}: 'private' must be a mapping")
        creators.update(str(c).strip() for c in _list(private, "keep_creators", where))
        for entry in _list(data, "rules", where):
            key, rule = _parse_rule(entry, where)
            rules[key] = rule
        block = data.get("settings") or {}
        if not isinstance(block, dict):
            raise ProfileError(f"{where}:{data['__lines__']['settings']}: 'settings' must be a mapping")
        for setting, value in block.items():
            if setting not in _META:
                settings[setting] = (value, f"{where}:{block['__lines__'][setting]}")
    if {"retain_long_full_dates", "retain_long_modified_dates"} <= options:
        raise ProfileError(
            f"{chain[-1][0]}: the Full Dates and Modified Dates options cannot be used together"
        )
    canonical = json.dumps([_strip_lines(data) for _, data in chain], sort_keys=True, default=str).encode(
        "utf-8"
    )
    return Profile(
        name=name,
        description=description,
        sources=tuple(str(p) for p, _ in chain),
        content_hash=hashlib.sha256(canonical).hexdigest(),
        options=frozenset(options),
        rules=rules,
        keep_private_creators=frozenset(creators),
        **_settings(settings),
    )


def _list(data: dict[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ProfileError(f"{where}:{data.get('__lines__', {}).get(key, 1)}: {key!r} must be a list")
    return value


def _parse_rule(entry: Any, where: str) -> tuple[RuleKey, Rule]:
    if not isinstance(entry, dict):
        raise ProfileError(f"{where}: each rule must be a mapping with attribute, action, why")
    line = entry["__line__"]
    at = f"{where}:{line}"
    unknown = set(entry) - {"attribute", "creator", "action", "why", "value"} - _META
    if unknown:
        raise ProfileError(f"{at}: unknown rule key(s) {', '.join(sorted(unknown))}")
    attribute = entry.get("attribute")
    action = entry.get("action")
    why = entry.get("why")
    if not isinstance(attribute, str) or not attribute:
        raise ProfileError(f"{at}: a rule needs 'attribute'")
    if action not in ACTIONS:
        raise ProfileError(f"{at}: unknown action {action!r} (known: {', '.join(sorted(ACTIONS))})")
    if not isinstance(why, str) or not why.strip():
        raise ProfileError(f"{at}: a rule needs 'why', the reason for its action")
    value = entry.get("value")
    if action == "replace" and value is None:
        raise ProfileError(f"{at}: action 'replace' needs 'value'")
    key = _parse_attribute(attribute, entry.get("creator"), at)
    if action == "replace" and isinstance(key, int):
        _check_value(key, str(value), at)
    return key, Rule(str(action), why.strip(), at, None if value is None else str(value))


def _parse_attribute(text: str, creator: Any, at: str) -> RuleKey:
    if creator is not None:
        match = _PRIVATE_TAG.match(text)
        if match is None or int(match.group(1), 16) % 2 == 0:
            raise ProfileError(f"{at}: a private attribute is written (gggg,xxee) with an odd group gggg")
        return (str(creator).strip(), int(match.group(1), 16), int(match.group(2), 16))
    match = _TAG.match(text)
    if match is not None:
        tag = int(match.group(1) + match.group(2), 16)
        if (tag >> 16) % 2 == 1:
            raise ProfileError(f"{at}: private tag {text}: name its 'creator' and write (gggg,xxee)")
        return tag
    tag_number = tag_for_keyword(text)
    if tag_number is None:
        raise ProfileError(f"{at}: unknown attribute keyword {text!r}")
    return int(tag_number)


def _check_value(tag: int, value: str, at: str) -> None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return
    if vr == "SQ":
        raise ProfileError(f"{at}: {keyword_for_tag(tag)} is a sequence; 'replace' takes text")


def _settings(raw: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {
        "uid_root", "date_shift_days", "patient_lookup", "patient_lookup_required",
        "clean_patterns", "clean_vocabulary", "overview", "thumbnail", "drop_sop_classes",
        "overview_keep_acknowledged", "burned_in", "ocr",
        "unknown_attributes", "unknown_standard_attributes",
    }  # fmt: skip
    for key, (_, at) in raw.items():
        if key not in known:
            raise ProfileError(f"{at}: unknown setting {key!r} (known: {', '.join(sorted(known))})")

    def get(key: str) -> tuple[Any, str] | None:
        return raw.get(key)

    if (item := get("uid_root")) is not None:
        root, at = item
        if not isinstance(root, str) or not re.fullmatch(r"[1-9]\d*(\.(0|[1-9]\d*))*", root):
            raise ProfileError(f"{at}: uid_root must be a valid UID root such as 2.25")
        out["uid_root"] = root
    if (item := get("date_shift_days")) is not None:
        span, at = item
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)):
            raise ProfileError(f"{at}: date_shift_days must be [min_days, max_days]")
        if span[0] > span[1] or span == [0, 0]:
            raise ProfileError(f"{at}: date_shift_days must be a range other than [0, 0]")
        out["date_shift_days"] = (span[0], span[1])
    if (item := get("patient_lookup")) is not None:
        out["patient_lookup"] = Path(str(item[0]))
    if (item := get("patient_lookup_required")) is not None:
        out["patient_lookup_required"] = _bool(item)
    if (item := get("clean_patterns")) is not None:
        out["clean_patterns"] = _patterns(item)
    if (item := get("clean_vocabulary")) is not None:
        words, at = item
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ProfileError(f"{at}: clean_vocabulary must be a list of words")
        out["clean_vocabulary"] = frozenset(w.strip().lower() for w in words)
    pixels: dict[str, Any] = {}
    if (item := get("overview")) is not None:
        pixels["overview"] = _choice(item, OVERVIEW_POLICIES)
    if (item := get("overview_keep_acknowledged")) is not None:
        pixels["overview_keep_acknowledged"] = _bool(item)
    if (item := get("thumbnail")) is not None:
        pixels["thumbnail"] = _choice(item, ("pass", "drop"))
    if (item := get("drop_sop_classes")) is not None:
        pixels["drop_sop_classes"] = _sop_classes(item)
    if (item := get("burned_in")) is not None:
        pixels["burned_in"] = _choice(item, BURNED_IN_POLICIES)
    if (item := get("ocr")) is not None:
        pixels["ocr"] = _bool(item)
    policy = PixelPolicy(**pixels)
    if policy.overview == "keep" and not policy.overview_keep_acknowledged:
        at = raw["overview"][1]
        raise ProfileError(
            f"{at}: overview: keep forwards the slide label in the overview's pixels; "
            "set overview_keep_acknowledged: true to confirm"
        )
    out["pixels"] = policy
    if (item := get("unknown_attributes")) is not None:
        out["unknown_attributes"] = _choice(item, UNKNOWN_POLICIES)
    if (item := get("unknown_standard_attributes")) is not None:
        out["unknown_standard_attributes"] = _choice(item, UNKNOWN_POLICIES)
    return out


def _sop_classes(item: tuple[Any, str]) -> frozenset[str]:
    """SOP Classes by UID or by keyword (``SecondaryCaptureImageStorage``)."""
    value, at = item
    if not isinstance(value, list):
        raise ProfileError(f"{at}: drop_sop_classes must be a list of SOP Class UIDs or keywords")
    out: set[str] = set()
    for entry in value:
        text = str(entry).strip()
        uid = text if re.fullmatch(r"[0-9.]+", text) else _UID_BY_KEYWORD.get(text)
        if uid is None or not UID(uid).is_valid:
            raise ProfileError(f"{at}: {text!r} is not a SOP Class UID or keyword")
        out.add(uid)
    return frozenset(out)


_UID_BY_KEYWORD = {keyword: uid for uid, (*_, keyword) in UID_dictionary.items()}


def _bool(item: tuple[Any, str]) -> bool:
    value, at = item
    if not isinstance(value, bool):
        raise ProfileError(f"{at}: expected true or false, got {value!r}")
    return value


def _choice(item: tuple[Any, str], choices: tuple[str, ...]) -> str:
    value, at = item
    if value not in choices:
        raise ProfileError(f"{at}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def _patterns(item: tuple[Any, str]) -> tuple[re.Pattern[str], ...]:
    value, at = item
    if not isinstance(value, list):
        raise ProfileError(f"{at}: clean_patterns must be a list of {{pattern, why}}")
    out: list[re.Pattern[str]] = []
    for entry in value:
        if not isinstance(entry, dict) or "pattern" not in entry or "why" not in entry:
            raise ProfileError(f"{at}: each clean pattern needs 'pattern' and 'why'")
        try:
            out.append(re.compile(str(entry["pattern"]), re.IGNORECASE))
        except re.error as exc:
            raise ProfileError(f"{at.split(':')[0]}:{entry['__line__']}: bad pattern: {exc}") from None
    return tuple(out)
