"""A pod's resources as Slurm sees them: Kubernetes quantities, the pod's effective request,
and the sbatch options that follow from them.

Kubernetes schedules a pod by its effective request: per resource, the larger of the largest
init container's request (init containers run one at a time) and the sum of the main
containers' requests (they run together). A container's request falls back to its limit, as
the API server's defaulting does. hpk asks Slurm for exactly that, rounded up to what Slurm
counts in: whole CPUs for `--cpus-per-task`, MiB for `--mem`, whole GPUs for `--gres=gpu:N`,
and whole minutes of `activeDeadlineSeconds` for `--time`.

Quantities are parsed here, exactly (with fractions), rather than with the Kubernetes client,
so that this layer stays pure and a bad quantity fails the pod with the field that holds it.

Pure: stdlib only, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.flags import SbatchOption

CPU = "cpu"
MEMORY = "memory"
GPU = "nvidia.com/gpu"
SUPPORTED = (CPU, MEMORY, GPU)
"""The resources hpk turns into Slurm options; a pod asking for any other one is refused."""

_MIB = 1 << 20
_MAX_EXPONENT = 30  # far above any real request; keeps "1e999999999" from taking forever
_MAX_LENGTH = 64

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>.*)")
_EXPONENT = re.compile(r"[eE](?P<exponent>[+-]?[0-9]+)")


def parse_quantity(value: object, *, field: str) -> Fraction:
    """A Kubernetes quantity (`500m`, `1.5`, `2Gi`, `1e3`, `128974848`) as an exact number.

    Raises InvalidPodSpec naming `field` when the value is not a quantity.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidPodSpec(field, f"{value!r} is not a quantity")
    text = str(value)
    if len(text) > _MAX_LENGTH:
        raise InvalidPodSpec(field, f"quantity {text[:_MAX_LENGTH]!r}... is too long")
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise InvalidPodSpec(
            field, f"{text!r} is not a quantity (a number with an optional suffix like m or Gi)"
        )
    try:
        number = Fraction(Decimal(match["number"]))
    except InvalidOperation as error:  # the pattern admits only numbers; kept for safety
        raise InvalidPodSpec(field, f"{text!r} is not a quantity") from error
    return number * _multiplier(match["suffix"], text=text, field=field)


def _multiplier(suffix: str, *, text: str, field: str) -> Fraction:
    if suffix in _BINARY:
        return Fraction(_BINARY[suffix])
    if suffix in _DECIMAL:
        return _DECIMAL[suffix]
    exponent = _EXPONENT.fullmatch(suffix)
    if exponent:
        power = int(exponent["exponent"])
        if abs(power) > _MAX_EXPONENT:
            raise InvalidPodSpec(field, f"quantity {text!r} has an exponent out of range")
        return Fraction(10) ** power
    known = ", ".join(sorted(_BINARY) + sorted(key for key in _DECIMAL if key))
    raise InvalidPodSpec(
        field, f"{text!r} has an unknown suffix {suffix!r}; known: {known}, or e<exponent>"
    )


@dataclass(frozen=True)
class PodResources:
    """What a pod needs at once, in Kubernetes units; zero when nothing asks for it."""

    cpu: Fraction = Fraction(0)
    """CPU cores."""
    memory: Fraction = Fraction(0)
    """Memory in bytes."""
    gpus: int = 0
    """Whole NVIDIA GPUs."""

    @property
    def cpus(self) -> int:
        """Whole CPUs for `--cpus-per-task`, rounded up."""
        return math.ceil(self.cpu)

    @property
    def memory_mib(self) -> int:
        """MiB for `--mem`, rounded up."""
        return math.ceil(self.memory / _MIB)

    def combine(self, other: PodResources) -> PodResources:
        """Both at once: the sum."""
        return PodResources(
            self.cpu + other.cpu, self.memory + other.memory, self.gpus + other.gpus
        )

    def cover(self, other: PodResources) -> PodResources:
        """Either one after the other: the larger of each resource."""
        return PodResources(
            max(self.cpu, other.cpu), max(self.memory, other.memory), max(self.gpus, other.gpus)
        )


def container_resources(container: Mapping[str, object], *, field: str) -> PodResources:
    """One container's request per resource, falling back to its limit.

    `field` is the container's path (`spec.containers[0]`), for error messages.
    """
    resources = container.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise InvalidPodSpec(f"{field}.resources", "must be an object")
    unknown = sorted(set(resources) - {"requests", "limits"})
    if unknown:
        raise InvalidPodSpec(
            f"{field}.resources.{unknown[0]}", "is not supported yet (only requests and limits)"
        )
    found: dict[str, Fraction] = {}
    for kind in ("limits", "requests"):  # requests last: they win
        entries = resources.get(kind) or {}
        if not isinstance(entries, Mapping):
            raise InvalidPodSpec(f"{field}.resources.{kind}", "must be an object")
        for name, value in entries.items():
            where = f"{field}.resources.{kind}[{name}]"
            if name not in SUPPORTED:
                raise InvalidPodSpec(
                    where, f"resource {name!r} is not supported; hpk knows {', '.join(SUPPORTED)}"
                )
            amount = parse_quantity(value, field=where)
            if amount < 0:
                raise InvalidPodSpec(where, f"{value!r} is negative")
            if name == GPU and amount.denominator != 1:
                raise InvalidPodSpec(where, f"{value!r} is not a whole number of GPUs")
            found[name] = amount
    return PodResources(
        cpu=found.get(CPU, Fraction(0)),
        memory=found.get(MEMORY, Fraction(0)),
        gpus=int(found.get(GPU, 0)),
    )


def effective_resources(spec: Mapping[str, object]) -> PodResources:
    """The pod's effective request: max(largest init container, sum of main containers)."""
    main = PodResources()
    for index, container in enumerate(_containers(spec, "containers")):
        main = main.combine(container_resources(container, field=f"spec.containers[{index}]"))
    init = PodResources()
    for index, container in enumerate(_containers(spec, "initContainers")):
        init = init.cover(container_resources(container, field=f"spec.initContainers[{index}]"))
    return main.cover(init)


def deadline_minutes(spec: Mapping[str, object]) -> int | None:
    """`activeDeadlineSeconds` in whole minutes, rounded up, for `--time`; None when unset."""
    seconds = spec.get("activeDeadlineSeconds")
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
        raise InvalidPodSpec("spec.activeDeadlineSeconds", f"{seconds!r} is not a positive integer")
    return math.ceil(seconds / 60)


def resource_options(spec: Mapping[str, object]) -> list[SbatchOption]:
    """The sbatch options the pod's resources and deadline ask for, in a fixed order."""
    wanted = effective_resources(spec)
    options: list[SbatchOption] = []
    if wanted.cpus:
        options.append(SbatchOption("cpus-per-task", str(wanted.cpus)))
    if wanted.memory_mib:
        # Slurm's M is MiB; --mem=0 would mean "all of the node's memory", so 0 is never sent.
        options.append(SbatchOption("mem", f"{wanted.memory_mib}M"))
    if wanted.gpus:
        options.append(SbatchOption("gres", f"gpu:{wanted.gpus}"))
    minutes = deadline_minutes(spec)
    if minutes is not None:
        options.append(SbatchOption("time", str(minutes)))
    return options


def _containers(spec: Mapping[str, object], key: str) -> Sequence[Mapping[str, object]]:
    containers = spec.get(key) or []
    if not isinstance(containers, list) or not all(isinstance(c, Mapping) for c in containers):
        raise InvalidPodSpec(f"spec.{key}", "must be a list of objects")
    return containers
