"""Model groups: the model name a client asks for, mapped to deployments, with fallbacks.

A model group (``[[models]]`` in the TOML file) lists deployments (BackendSpec names) in
tiers: the Coordinator picks among the healthy deployments of the first tier by weight
and by how many calls each has in flight across the fleet, fails over through the rest of
the list, then through the group's ``fallbacks`` (other groups, each with its own
fallbacks). A context-too-long failure goes to ``context_window_fallbacks`` instead, when
the group has any. ``privacy`` (PrivacyTier, batuta's) excludes every deployment whose
provider the tier does not allow: at config load for the group's own deployments (a
ConfigError), and at every failover for every candidate, fallback groups' included.

In-flight counts live in Redis (the store's ``InFlightStore``, ``manager.inflight``): one
sorted set per deployment, member ``<worker>/<request>`` scored by a deadline on the Redis server clock. A call adds its
member when its deployment is picked (the pick itself, one script) and removes it when
the call ends; the worker renews its members' deadlines every few seconds, so the members
of a worker that died drop out after ``ttl`` seconds. All those sets share one hash slot,
so the pick over several deployments is one script.

Without any ``[[models]]``, the Router serves a default (``default_groups``): one implicit
group per distinct ``model`` of the deployments, so a client (the gateway's ``model``
field, ``submit --model``) asks for a model by the name its deployments serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

import msgspec

from flo_coord.constraints import Checked, GroupName, PositiveInt, Weight
from flo_coord.errors import ConfigError, UnknownModelError
from flo_coord.execution.backends import BackendSpec
from flo_coord.models import PrivacyTier, ServingBackend

#: One tier: (deployment name, weight) pairs the Coordinator picks among.
Tier = list[tuple[str, float]]


class GroupDeployment(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """One deployment of a model group: its ``name``, relative ``weight`` (> 0, at most 1e9) and
    ``tier`` (an integer >= 1; 1 is tried first, a higher tier only once every deployment of the
    lower ones failed). ConfigError when a value is invalid."""

    name: str
    weight: Weight = 1.0
    tier: PositiveInt = 1


def _entry(entry: str | GroupDeployment) -> GroupDeployment:
    """A deployment entry (a bare name is weight 1, tier 1) as a GroupDeployment."""
    return GroupDeployment(name=entry) if isinstance(entry, str) else entry


class ModelGroup(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """A client-facing model name and the deployments that serve it (``[[models]]``).

    ``name``: printable, not blank, at most 256 characters.
    ``deployments``: at least one; deployment names (weight 1, tier 1) or GroupDeployment
    tables (or dicts with name/weight/tier), each deployment at most once.
    ``fallbacks`` / ``context_window_fallbacks``: other model groups' names.
    ``privacy``: "Sovereign" (local providers only), "Private" (local plus AzureOpenAI,
    AwsBedrock, GoogleVertex, AwsLambda) or "Standard" (any); case-insensitive.
    Raises ConfigError when a field is invalid.
    """

    name: GroupName
    deployments: Annotated[
        list[str | GroupDeployment],
        msgspec.Meta(min_length=1, description="a list of at least one deployment (a name or name/weight/tier)"),
    ]
    fallbacks: list[str] = msgspec.field(default_factory=list)
    context_window_fallbacks: list[str] = msgspec.field(default_factory=list)
    privacy: str = "Standard"

    def _finish(self) -> None:
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"model group {self.name}: a deployment is listed twice in {names}")
        folded = {t.value.casefold(): t for t in PrivacyTier}
        tier = folded.get(self.privacy.casefold())
        if tier is None:
            raise ConfigError(f"model group {self.name}: privacy must be one of {', '.join(folded.values())}")
        self.privacy = tier

    @property
    def entries(self) -> list[GroupDeployment]:
        """The deployments as GroupDeployment (a bare name is weight 1, tier 1), in list order."""
        return [_entry(e) for e in self.deployments]

    @property
    def tier(self) -> PrivacyTier:
        return PrivacyTier(self.privacy)

    def tiers(self) -> list[Tier]:
        """The deployments grouped by tier, lowest tier first, list order kept inside a tier."""
        levels = sorted({e.tier for e in self.entries})
        return [[(e.name, float(e.weight)) for e in self.entries if e.tier == level] for level in levels]


class Router:
    """The model groups of one configuration, checked against its deployments.

    ``groups``: the ModelGroups; ``providers``: deployment name -> its ServingBackend.
    Raises ConfigError for a duplicate group, an unknown deployment or fallback group, or
    a deployment the group's privacy tier does not allow.
    """

    def __init__(self, groups: Iterable[ModelGroup], providers: Mapping[str, ServingBackend]) -> None:
        self.groups: dict[str, ModelGroup] = {}
        self.providers = dict(providers)
        self.implicit = False  # True: the default groups, one per deployment model (``configured``)
        for group in groups:
            if group.name in self.groups:
                raise ConfigError(f"model group {group.name!r} is defined twice")
            self.groups[group.name] = group
        for group in self.groups.values():
            self._check(group)

    @classmethod
    def configured(
        cls, groups: Iterable[ModelGroup], specs: Iterable[BackendSpec], fallback_order: Sequence[ServingBackend | str]
    ) -> Router:
        """The Router of a configuration: its ``[[models]]`` groups, or, when it has none, the
        implicit ``default_groups`` of its deployments (``implicit`` is then True).
        Raises ConfigError as the constructor does."""
        specs = list(specs)
        groups = list(groups)
        router = cls(groups or default_groups(specs, fallback_order), {s.name: s.backend for s in specs})
        router.implicit = not groups
        return router

    def _check(self, group: ModelGroup) -> None:
        for entry in group.entries:
            provider = self.providers.get(entry.name)
            if provider is None:
                raise ConfigError(f"model group {group.name}: no deployment named {entry.name!r}")
            if not group.tier.allows(provider):
                raise ConfigError(
                    f"model group {group.name}: privacy {group.tier.value} does not allow deployment "
                    f"{entry.name} (provider {provider.value}, {'local' if provider.is_local() else 'remote'})"
                )
        for name in [*group.fallbacks, *group.context_window_fallbacks]:
            if name not in self.groups:
                raise ConfigError(f"model group {group.name}: fallback {name!r} is not a model group")

    def __contains__(self, model: object) -> bool:
        return model in self.groups

    def group(self, model: str) -> ModelGroup:
        """The group called ``model``; UnknownModelError (a ValidationError) when there is none."""
        group = self.groups.get(model) if isinstance(model, str) else None
        if group is None:
            known = ", ".join(sorted(self.groups)) or "none configured"
            raise UnknownModelError(f"unknown model {model!r}; model groups: {known}")
        return group

    def route(self, model: str, *, context_exceeded: bool = False) -> tuple[list[Tier], list[str]]:
        """(tiers to try in order, deployments the group's privacy tier excluded).

        The group's tiers, then each fallback group's (depth first, each group once);
        after a context-too-long failure, the context_window_fallbacks' instead (when set).
        """
        group = self.group(model)
        start = group.context_window_fallbacks if context_exceeded and group.context_window_fallbacks else [model]
        tiers: list[Tier] = []
        excluded: list[str] = []
        seen_groups: set[str] = set()
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen_groups:
                return
            seen_groups.add(name)
            for tier in self.groups[name].tiers():
                allowed = []
                for deployment, weight in tier:
                    if deployment in seen:
                        continue
                    seen.add(deployment)
                    if group.tier.allows(self.providers[deployment]):
                        allowed.append((deployment, weight))
                    else:
                        excluded.append(deployment)
                if allowed:
                    tiers.append(allowed)
            for fallback in self.groups[name].fallbacks:
                visit(fallback)

        for name in start:
            visit(name)
        return tiers, excluded


def default_groups(specs: Iterable[BackendSpec], fallback_order: Sequence[ServingBackend | str]) -> list[ModelGroup]:
    """The implicit model groups used when none are configured: one per distinct ``model``.

    ``specs``: the deployments, in configuration order; ``fallback_order``: ``failover.
    fallback_order`` (ServingBackends or deployment names). Group ``M`` has the deployments
    serving ``M`` in tier 1 (balanced), then, one tier per ``fallback_order`` entry, the other
    deployments named so or of that provider (the order a request without a group fails
    over in). A model name that cannot be a group name (too long, control characters) gets
    no group. Returns the groups in order of each model's first deployment.
    """
    specs = list(specs)
    fallback: list[list[str]] = []
    for entry in fallback_order:
        value = entry.value if isinstance(entry, ServingBackend) else str(entry)
        fallback.append([s.name for s in specs if value in (s.name, s.backend.value)])
    groups: list[ModelGroup] = []
    for model in dict.fromkeys(s.model for s in specs):
        own = [s.name for s in specs if s.model == model]
        entries = [GroupDeployment(name=n) for n in own]
        seen = set(own)
        for tier, names in enumerate(fallback, start=2):
            entries += [GroupDeployment(name=n, tier=tier) for n in names if n not in seen]
            seen.update(names)
        try:
            groups.append(ModelGroup(name=model, deployments=list(entries)))
        except ConfigError:
            continue
    return groups


def check_unique(specs: Sequence[BackendSpec]) -> None:
    """ConfigError naming both entries when two deployments share a name."""
    first: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.name in first:
            other = specs[first[spec.name]]
            raise ConfigError(
                f"backend name {spec.name!r} is used twice: entry {first[spec.name] + 1} "
                f"({other.backend.value} at {other.safe_url}, model {other.model!r}) and entry {index + 1} "
                f"({spec.backend.value} at {spec.safe_url}, model {spec.model!r}); give each deployment its own name"
            )
        first[spec.name] = index
