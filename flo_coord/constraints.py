"""Declared constraints: the named ``Annotated`` types of config and request fields, and the one
path that enforces them.

msgspec checks ``msgspec.Meta`` constraints when it decodes or converts, but not when a Struct
is constructed in Python. So every checked Struct derives from ``Checked``: its single
``__post_init__`` reads the new instance back through ``msgspec.convert(...,
from_attributes=True)`` into a hook-free twin of the class (built once per class), which
enforces every declared constraint, normalises values (an int given for a float field becomes
a float, a str given for an enum field its member) and copies them back. A Struct decoded by
msgspec is checked by the same path, so the two ways in can never disagree. Cross-field rules
that no single field type can declare live in the class's ``_finish`` hook.

A failed constraint becomes the class's typed error (``ConfigError`` for configuration,
``ValidationError`` for requests) whose message names the field, shows the value and says
what is allowed (the ``description`` of the field's ``Meta``), e.g.
``FailoverConfig.max_retries -1 is not an integer >= 0``.

What ``Meta`` cannot say stays code, each in one place: UTF-8 byte sizes and lone surrogates
(``flo_coord.store.validation.text``), case-insensitive enum names (``ServingBackend.parse``).
"""

from __future__ import annotations

import functools
import re
import types
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union, get_args, get_origin

import msgspec

from flo_coord import defaults
from flo_coord.errors import ConfigError, ValidationError

# ------------------------------------------------------------------- named constraints

#: Largest duration accepted anywhere (lease, age, retention, timeouts): ten years, in seconds.
MAX_SECONDS = defaults.MAX_SECONDS
#: Largest value of an input limit (Redis strings top out at 512 MiB).
MAX_LIMIT = 512 << 20

#: A duration in seconds from 1 ms to ten years: timeouts, leases, retention, pauses.
PositiveSeconds = Annotated[
    float, msgspec.Meta(ge=0.001, le=MAX_SECONDS, description=f"a number of seconds from 0.001 to {MAX_SECONDS:.0f}")
]
#: A duration in seconds from 0 ("do not wait") to ten years.
Seconds = Annotated[
    float, msgspec.Meta(ge=0, le=MAX_SECONDS, description=f"a number of seconds from 0 to {MAX_SECONDS:.0f}")
]
#: A count that may be zero (retries, token thresholds, offsets).
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, description="an integer >= 0")]
#: A count of at least one (breaker threshold, tier, pool size, max_tokens, epoch).
PositiveInt = Annotated[int, msgspec.Meta(ge=1, description="an integer >= 1")]
#: One input limit (``Limits``): 1 to 512 MiB.
LimitValue = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT, description=f"an integer from 1 to {MAX_LIMIT}")]
#: A client-chosen append sequence number: exact in a Lua number (a double), so below 2**53.
Seq = Annotated[int, msgspec.Meta(ge=1, lt=2**53, description="an integer from 1 to 2**53 - 1")]
#: Token counts of one answer (OpenAI's ``usage``: prompt_tokens, completion_tokens, ...):
#: at most ``USAGE_FIELDS`` names of 1 to 64 characters, each count from 0 to 2**53 - 1.
USAGE_FIELDS = 32
USAGE_NAME_LENGTH = 64
TOKEN_COUNT_LIMIT = 2**53  # exclusive: JSON readers without big integers keep every count exact
TokenCount = Annotated[int, msgspec.Meta(ge=0, lt=TOKEN_COUNT_LIMIT, description="an integer from 0 to 2**53 - 1")]
UsageName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=USAGE_NAME_LENGTH, description="a name of 1 to 64 characters")
]
Usage = Annotated[
    dict[UsageName, TokenCount],
    msgspec.Meta(
        max_length=USAGE_FIELDS,
        description=(
            f"a dict of at most {USAGE_FIELDS} token counts "
            "(a name of 1 to 64 characters -> an integer from 0 to 2**53 - 1)"
        ),
    ),
]
#: How many entries one listing returns.
PageSize = Annotated[int, msgspec.Meta(ge=1, le=100_000, description="an integer from 1 to 100000")]
#: A TCP port (0: any free port).
Port = Annotated[int, msgspec.Meta(ge=0, le=65535, description="a port from 0 to 65535")]
#: A relative weight of a deployment in its tier (finite).
Weight = Annotated[float, msgspec.Meta(gt=0, le=1e9, description="a number > 0 (at most 1e9)")]
#: Text with at least one non-space character (a model name, an environment variable name).
NonBlank = Annotated[str, msgspec.Meta(pattern=r"\S", description="a non-empty string")]
#: A model group name: printable, not blank, at most 256 characters.
GroupName = Annotated[
    str,
    msgspec.Meta(
        max_length=256,
        pattern=r"^(?=.*\S)[^\x00-\x1f\x7f-\x9f]+$",
        description="a non-empty string of at most 256 characters without control characters",
    ),
]

#: What a deployment name may be: it keys breakers, capability memory, in-flight counts and
#: the comma-separated failed set in Redis, so no commas, spaces or control characters.
DEPLOYMENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$"
DeploymentName = Annotated[
    str,
    msgspec.Meta(
        pattern=DEPLOYMENT_NAME_PATTERN,
        description="a valid deployment name (letters, digits and . _ : / @ + -, at most 64 characters, "
        "no commas or spaces)",
    ),
]
#: Characters of request and worker ids: no '{' or '}' (they form the Redis Cluster hash tag),
#: no whitespace or control characters (ids appear in logs and keys).
ID_CHARACTERS = "A-Za-z0-9_.:@/+=-"
#: Characters of a namespace (the prefix of every key).
NAMESPACE_CHARACTERS = "A-Za-z0-9_.-"


@functools.lru_cache(maxsize=64)
def identifier(max_length: int, characters: str = ID_CHARACTERS) -> Any:
    """The type of an id of 1..``max_length`` characters from the regex class ``characters``.

    Built per limit (``Limits`` are configurable) and cached, so a hot path pays one lookup.
    """
    return Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=max_length,
            pattern=f"^[{characters}]+$",
            description=f"1 to {max_length} characters of {characters}",
        ),
    ]


#: A namespace of the default length limit (``[redis] namespace``).
Namespace = identifier(defaults.MAX_NAMESPACE_LENGTH, NAMESPACE_CHARACTERS)

# ------------------------------------------------------------------ the checking path


def describe(tp: Any) -> str | None:
    """The ``description`` of the ``Meta`` of an ``Annotated`` type (its outermost), else None."""
    for meta in getattr(tp, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.description:
            return meta.description
    return None


def shown(value: Any) -> str:
    """``repr(value)`` cut to 80 characters (a hostile value may be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_value(kind: str, value: Any, tp: Any, error: type[ValidationError] = ValidationError) -> Any:
    """``value`` converted to the declared type ``tp`` (an int for a float becomes a float).

    ``kind`` names it in the message. Raises ``error`` (ValidationError by default) with
    the type's description when the value does not fit.
    """
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        wanted = describe(tp)
        if wanted is None:  # a type without a description (a Struct): say what it is in our words
            raise error(explain(exc, tp, value, kind)) from None
        # which item broke it (a dict's value has no name in msgspec's path: say nothing then)
        where = f" ({detail})" if " - at `$" in detail and not detail.endswith("$[...]`") else ""
        raise error(f"{kind} {shown(value)} is not {wanted}{where}") from None
    except UnicodeEncodeError:  # msgspec matches patterns on UTF-8: a lone surrogate cannot be
        raise error(f"{kind} is not valid Unicode text (lone surrogate)") from None
    except RecursionError:
        raise error(f"{kind} is nested too deeply") from None


def _struct_in(tp: Any) -> Any:
    """The Struct class inside ``tp`` (through Annotated, Optional and unions), else None."""
    tp = get_args(tp)[0] if get_origin(tp) is Annotated else tp
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for member in get_args(tp):
            found = _struct_in(member)
            if found is not None:
                return found
    return None


def _item_type(tp: Any) -> Any:
    tp = get_args(tp)[0] if get_origin(tp) is Annotated else tp
    args = get_args(tp)
    return args[0] if get_origin(tp) in (list, tuple, set, frozenset) and args else None


_STEP = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]")


def explain(exc: msgspec.ValidationError, root: Any, value: Any, label: str | None = None) -> str:
    """A msgspec error about ``value`` (decoded as ``root``) in our words: the field's dotted
    path, its value and its declared description when the value broke a constraint, else
    msgspec's own reason at that path. ``label`` names the root (default: its class name)."""
    reason, _, where = str(exc).partition(" - at `")
    path = where.rstrip("`")[1:]  # "$.a[0].b" -> ".a[0].b"
    tp: Any = root
    current: Any = value
    for name, index in _STEP.findall(path):
        if name:
            struct = _struct_in(tp)
            hints = {f.name: f.type for f in msgspec.structs.fields(struct)} if struct is not None else {}
            tp = hints.get(name)
            current = current.get(name) if isinstance(current, dict) else getattr(current, name, None)
        else:
            tp = _item_type(tp)
            try:
                current = current[int(index)]
            except (TypeError, IndexError, KeyError):
                current = None
        if tp is None:
            break
    root_name: str = label or getattr(root, "__name__", None) or "value"
    where = f"{root_name}{path[1:] if root_name.endswith(' ') and path.startswith('.') else path}" or root_name
    wanted = describe(tp) if tp is not None else None
    if wanted is None and reason.startswith("Expected `object`") and _struct_in(tp) is not None:
        name = _struct_in(tp).__name__
        wanted = f"{'an' if name[0] in 'AEIOU' else 'a'} {name} (or a dict of its fields)"
    if wanted is not None and reason.startswith("Expected"):
        return f"{where} {shown(current)} is not {wanted}"
    unknown = _UNKNOWN_FIELD.fullmatch(reason)
    struct = _struct_in(tp) if tp is not None else None
    if unknown is not None and struct is not None:
        return f"{where}: unknown field {unknown[1]!r} (its fields: {', '.join(struct.__struct_fields__)})"
    return f"{where}: {reason}"


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.*)`")


def convert(
    data: Any, tp: Any, error: type[ValidationError] = ConfigError, *, strict: bool = True, label: str | None = None
) -> Any:
    """``data`` (plain builtins: parsed JSON or TOML) as a ``tp``, every constraint enforced.

    ``strict=False`` lets strings stand for numbers and bools (environment variables).
    Raises ``error`` (ConfigError by default) with ``explain``'s message, whose root is
    called ``label`` (default: the class name of ``tp``).
    """
    try:
        return msgspec.convert(data, tp, strict=strict)
    except msgspec.ValidationError as exc:
        raise error(explain(exc, tp, data, label)) from None
    except UnicodeEncodeError:
        raise error(f"{label or getattr(tp, '__name__', 'value')}: a text is not valid Unicode") from None
    except RecursionError:
        raise error(f"{label or getattr(tp, '__name__', 'value')}: nested too deeply") from None


@functools.cache
def _twin(cls: type) -> Any:
    """The fields of ``cls`` in a Struct without hooks, so checking an instance never recurses."""
    return msgspec.defstruct(cls.__name__, [(f.name, f.type) for f in msgspec.structs.fields(cls)])


class _CheckedMeta(msgspec.StructMeta):
    """Turns the TypeError of a constructor call that does not fit the fields (an unknown
    keyword, a missing required field, too many positional arguments) into the class's
    typed error, naming the class and its fields; msgspec raises it in C before any hook runs."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (a metaclass: its instances are classes)
        try:
            return super().__call__(*args, **kwargs)
        except TypeError as exc:
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
                raise  # raised in a hook (a bug), not by the argument binding: keep it as it is
            reason = str(exc)
            reason = reason[:1].lower() + reason[1:]
            fields = ", ".join(cls.__struct_fields__) or "none"  # type: ignore[attr-defined]
            raise cls._error(f"{cls.__name__}: {reason} (its fields: {fields})") from None  # type: ignore[attr-defined]


class Checked(msgspec.Struct, metaclass=_CheckedMeta):
    """Base of every Struct whose field types declare constraints (configs, requests):
    ``class X(Checked, kw_only=True, ...)`` (it has no fields and no options, so frozen and
    mutable Structs share it).

    Construction (in Python or by msgspec) runs ``check`` and then ``_finish``, the hook for
    rules across fields. ``_error`` is the error class raised (ConfigError unless a subclass
    says otherwise), also for a constructor call that does not fit the fields (an unknown
    keyword argument, a missing required one).
    """

    _error: ClassVar[type[ValidationError]] = ConfigError

    def __post_init__(self) -> None:
        check(self)
        self._finish()

    def _finish(self) -> None:
        """Rules across fields (a subclass's); runs after every field passed its own constraints."""


if TYPE_CHECKING:
    # msgspec lets a frozen Struct derive from a mutable one without fields; mypy applies the
    # dataclass rule (frozen only from frozen) regardless, so to it this is a frozen Struct of its own.
    class FrozenChecked(msgspec.Struct, frozen=True):
        _error: ClassVar[type[ValidationError]]

        def _finish(self) -> None: ...

else:

    class FrozenChecked(Checked, frozen=True):
        """``Checked`` for frozen (hashable, immutable) Structs: ``class X(FrozenChecked, frozen=True)``."""


def check(obj: Any) -> None:
    """Enforce the declared constraints of ``obj``'s fields and store their normalised values.

    Raises ``type(obj)._error`` naming the first field that breaks its constraint.
    """
    cls: Any = type(obj)
    try:
        clean = msgspec.convert(obj, _twin(cls), from_attributes=True)
    except msgspec.ValidationError as exc:
        raise cls._error(explain(exc, cls, obj)) from None
    except UnicodeEncodeError:
        raise cls._error(f"{cls.__name__}: text is not valid Unicode (lone surrogate)") from None
    except RecursionError:
        raise cls._error(f"{cls.__name__}: a value is nested too deeply") from None
    for name in cls.__struct_fields__:
        value = getattr(clean, name)
        if value is not getattr(obj, name):
            msgspec.structs.force_setattr(obj, name, value)


__all__ = [
    "DEPLOYMENT_NAME_PATTERN",
    "MAX_LIMIT",
    "MAX_SECONDS",
    "Checked",
    "DeploymentName",
    "FrozenChecked",
    "GroupName",
    "LimitValue",
    "Namespace",
    "NonBlank",
    "NonNegativeInt",
    "PageSize",
    "Port",
    "PositiveInt",
    "PositiveSeconds",
    "Seconds",
    "Seq",
    "Weight",
    "check",
    "check_value",
    "convert",
    "describe",
    "explain",
    "identifier",
]
