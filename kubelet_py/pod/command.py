"""What a container runs: the image's ENTRYPOINT and CMD against the container's `command`
and `args`, as Docker and Kubernetes combine them, and the sizes of argv and environment
that Linux's execve still takes.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hpk.images import ImageConfig
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.pod.fields import check_text, expect_list


def container_argv(
    *, command: Sequence[str], args: Sequence[str], config: ImageConfig
) -> tuple[str, list[str]]:
    """The Apptainer action and the words after the SIF file, as Docker and Kubernetes run a
    container: `command` replaces the image's ENTRYPOINT and `args` its CMD.

    - `command` (with or without `args`): exec command + args (the image's CMD is dropped);
    - only `args`: exec ENTRYPOINT + args;
    - neither: exec ENTRYPOINT + CMD.

    A native SIF (no OCI metadata) has no ENTRYPOINT to hand `args` to: without `command`,
    its runscript runs with `args` as its arguments. An empty exec word list (an OCI image
    with neither, and no command) is the caller's to refuse.
    """
    if command:
        return "exec", [*command, *args]
    if not config.oci:
        return "run", list(args)
    if args:
        return "exec", [*config.entrypoint, *args]
    return "exec", [*config.entrypoint, *config.cmd]


def written_words(container: Mapping[str, object], key: str, where: str) -> list[str]:
    """The container's `command` or `args` (`key`) as the pod gives them, before `$(VAR)`
    expansion: strings a process can receive unchanged."""
    words = expect_list(container.get(key), f"{where}.{key}")
    for index, word in enumerate(words):
        if not isinstance(word, str):
            raise InvalidPodSpec(f"{where}.{key}[{index}]", "must be a string")
        check_text(word, f"{where}.{key}[{index}]", controls=True)
    return [str(word) for word in words]


MAX_ARG_STRLEN = 131072
"""Linux's limit on one argument or `NAME=value` string that execve passes, NUL included. A
longer word makes bash fail to start the container's launcher (exit 126, no markers)."""
EXEC_BUDGET = 1024 * 1024
"""What a container's argv and environment may take together, in bytes (each string with its
NUL). Linux's ARG_MAX is a quarter of the stack limit, 2 MiB with the usual 8 MiB; half of
that is left to the job's own environment from Slurm and to Apptainer's options and
variables, which pass through the same execve calls."""


def check_exec_size(
    where: str,
    *,
    command: Sequence[str],
    arguments: Sequence[str],
    argv: Sequence[str],
    env: Mapping[str, str],
) -> None:
    """Refuse a container whose words (after `$(VAR)` expansion) or variables no execve takes,
    naming the word's field: `command[i]`, `args[i]`, or `image` for its ENTRYPOINT and CMD."""
    leading = len(argv) - len(arguments)  # `command`, or the image's words
    fields = [
        f"{where}.command[{index}]" if command else f"{where}.image" for index in range(leading)
    ] + [f"{where}.args[{index}]" for index in range(len(arguments))]
    sizes = [len(word.encode()) + 1 for word in argv]
    for at, size in zip(fields, sizes, strict=True):
        if size > MAX_ARG_STRLEN:
            what = "a word of its ENTRYPOINT or CMD" if at.endswith(".image") else "the word"
            raise InvalidPodSpec(
                at,
                f"{what} is {size - 1} bytes long after $(VAR) expansion; Linux passes no "
                f"argument longer than {MAX_ARG_STRLEN - 1} bytes to a program",
            )
    for name, value in env.items():
        size = len(name.encode()) + len(value.encode()) + 2
        sizes.append(size)
        if size > MAX_ARG_STRLEN:
            raise InvalidPodSpec(
                f"{where}.env",
                f"variable {name} is {size - 2 - len(name.encode())} bytes long; Linux passes "
                f"no {name}=value string longer than {MAX_ARG_STRLEN - 1} bytes to a program",
            )
    if sum(sizes) > EXEC_BUDGET:
        raise InvalidPodSpec(
            where,
            f"its arguments and environment take {sum(sizes)} bytes, more than the "
            f"{EXEC_BUDGET} hpk allows (Linux starts no program whose arguments and "
            "environment exceed ARG_MAX, and the job's own environment needs room too); "
            "pass large data in a file, such as a configMap volume",
        )
