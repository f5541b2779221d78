"""One registry per kind of method; a new method is one file with one registration.

A registry maps a name (what a config writes) to the method's constructor and, for kinds
configured by a section with options (losses, augmenters), to that section's pydantic model,
which lives in the method's own file next to the code that reads it::

    class ToyAugmenter(Section):          # the options of retrain.augmenter: {name: toy, ...}
        name: Literal["toy"]
        scale: float = 1.0

    @AUGMENTERS.register("toy", config=ToyAugmenter)
    class Toy(FeatureAugmenter):
        ...

The config (``tailaug.config``) derives its choices from the registries: a section-valued
option validates its mapping with the model registered under the mapping's ``name``; a
name-valued option (``model.arch``, ``*.sampler.kind``, ``retrain.method``) accepts the
registered names. The built-in methods register themselves when their package's modules
are first imported; a registry imports every module of its package (this project's own
code, never a module named by a config) the first time it is asked for its entries.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer, WrapValidator, model_validator

from .errors import ConfigError
from .strict_scalars import check_scalars


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too, no
    inf/nan, and booleans and numbers are kept apart (:mod:`tailaug.strict_scalars`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: Any) -> Any:
        return check_scalars(cls, data)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    obj: Any  # the constructor (a class or a function)
    config: type[Section] | None = None  # the options model of section-valued kinds
    label: str = ""  # how result tables name the method
    check: Callable[[Any], None] | None = None  # raises ValueError when the whole config cannot work
    reads: tuple[str, ...] = ()  # the options of its section that change its result (stage keys)


class Registry:
    """Names of one kind of method -> :class:`Entry`.

    ``option`` is the config path that selects a member (for messages); ``package`` the
    module or package whose modules hold the built-in members.
    """

    def __init__(self, kind: str, option: str, package: str):
        self.kind, self.option, self.package = kind, option, package
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    # ------------------------------------------------------------------ registration

    def register(self, name: str, *, config: type[Section] | None = None, label: str = "",
                 check: Callable[[Any], None] | None = None, reads: tuple[str, ...] = ()) -> Callable:
        """Decorator: register the decorated class or function under ``name``.

        ``check(config)``, if given, is called when a config choosing this member is validated
        and raises ValueError when the rest of the config rules the member out. ``reads`` names
        the options of the member's config section that its result depends on (what its
        stage key hashes), where the section is shared by several members.
        """

        def add(obj):
            old = self._entries.get(name)
            if old is not None and old.obj is not obj:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({old.obj!r})")
            if config is not None and _tag(config) != name:
                raise ValueError(f"the config model of {self.kind} {name!r} needs a field name: Literal[{name!r}]")
            self._entries[name] = Entry(name, obj, config, label or name, check, tuple(reads))
            return obj

        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # ------------------------------------------------------------------ look-up

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def get(self, name: str) -> Entry:
        self._load()
        entry = self._entries.get(name)
        if entry is None:
            raise ConfigError(self.unknown(name))
        return entry

    def unknown(self, name: Any) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown {self.kind} {name!r} ({self.option}); {hint}available: {', '.join(names)}"

    # ------------------------------------------------------------------ config types

    def _validate_section(self, value: Any, handler) -> Section:
        return self._section_model(value)

    def _optional_section(self, value: Any, handler) -> Section | None:
        return None if value is None else self._section_model(value)

    def _section_model(self, value: Any) -> Section:
        if isinstance(value, Section):
            value = value.model_dump()
        if not isinstance(value, dict):
            raise ValueError(f"a {self.kind} is a mapping with a name, e.g. {{name: {self.names()[0]}}}")
        name = value.get("name")
        if name not in self:
            if name is None:
                raise ValueError(f"a {self.kind} needs a name; available: {', '.join(self.names())}")
            raise ValueError(self.unknown(name))
        return self.get(name).config.model_validate(value)

    def section(self, optional: bool = False) -> Any:
        """The annotation of a section-valued option: validated by the registered model of its name
        (``optional``: or None, the option off)."""
        return Annotated[
            Any,
            WrapValidator(self._optional_section if optional else self._validate_section),
            PlainSerializer(lambda m: None if m is None else m.model_dump(mode="json")),
            self,  # lets the config's error messages find the model at a path
        ]

    def _check_name(self, name: str) -> str:
        if name not in self:
            raise ValueError(self.unknown(name))
        return name

    def name(self) -> Any:
        """The annotation of a name-valued option: one of the registered names."""
        return Annotated[str, AfterValidator(self._check_name)]


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("name")
    args = getattr(field.annotation, "__args__", ()) if field is not None else ()
    return args[0] if args else None


LOSSES = Registry("loss", "train.loss", "tailaug.losses")
AUGMENTERS = Registry("augmenter", "retrain.augmenter", "tailaug.augment")
BACKBONES = Registry("backbone", "model.arch", "tailaug.models")
SAMPLERS = Registry("sampler", "sampler.kind", "tailaug.data")
CLASSIFIERS = Registry("classifier", "retrain.method", "tailaug.classifiers")
# training-time modules placed after a backbone stage and removed at inference (models/stage_modules.py)
STAGE_MODULES = Registry("stage module", "train.stage_module", "tailaug.models")
