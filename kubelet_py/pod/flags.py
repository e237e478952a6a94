"""The `slurm.hpk.io/flags` annotation: a pod's own sbatch options, read as shell words.

A pod may ask Slurm for more than its resources say (`--nodes=2 --ntasks=8 -p gpu`). The
annotation is split with `shlex` the way a shell would split it, but no shell ever sees it:
the options reach sbatch as argv words. Each option must be on an allow-list of options that
only shape the allocation; anything that would break hpk's contract with the job (where its
output goes, its name and comment, its working folder, whose job it is) or that is unknown is
refused with a message that names the flag. Words that look like an attempt to run shell
commands are refused too, even though they would be harmless here, because the user who wrote
them expects something that will not happen.

The annotation comes from whoever wrote the pod (a chart, a workflow), not from the user who
runs hpk, and sbatch runs on the kubelet's host as that user. So no option may make sbatch
read a file there: `--nodelist` and `--exclude` take a value holding `/` as the name of a
host file, and accept only Slurm host lists here (`n1`, `n[1-4,7]`, `rack1-n[01-10]`);
`--nodefile`, `--chdir`, `--output`, `--error`, `--input`, `--export-file`, `--bbf` and the
options naming another user (`--uid`, `--gid`, `--get-user-env`) are refused outright. Mail
(`--mail-type`, `--mail-user`) reaches people outside the cluster, or floods the user's own
mailbox from every pod of a chart, so both are refused unless the kubelet is started with
`--allow-mail-flags`.

Pure: stdlib only, no I/O.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from kubelet_py.errors import InvalidPodSpec

ANNOTATION = "slurm.hpk.io/flags"
FIELD = f"metadata.annotations[{ANNOTATION}]"


class Arg(Enum):
    """Whether an option takes a value, getopt style."""

    REQUIRED = "required"
    NONE = "none"
    OPTIONAL = "optional"  # only as `--name=value`


@dataclass(frozen=True)
class _Spec:
    arg: Arg
    short: str | None = None
    operators: bool = False
    """Whether the value may hold `|` and `&`, which are Slurm syntax here (`--constraint`)."""
    hostlist: bool = False
    """Whether the value must be a Slurm host list: sbatch reads a value holding `/` as the
    name of a file of host names, on the kubelet's host."""


#: sbatch options a pod may pass: they shape the allocation and nothing else.
ALLOWED: dict[str, _Spec] = {
    "account": _Spec(Arg.REQUIRED, "A"),
    "acctg-freq": _Spec(Arg.REQUIRED),
    "begin": _Spec(Arg.REQUIRED, "b"),
    "constraint": _Spec(Arg.REQUIRED, "C", operators=True),
    "contiguous": _Spec(Arg.NONE),
    "core-spec": _Spec(Arg.REQUIRED, "S"),
    "cores-per-socket": _Spec(Arg.REQUIRED),
    "cpu-freq": _Spec(Arg.REQUIRED),
    "cpus-per-gpu": _Spec(Arg.REQUIRED),
    "cpus-per-task": _Spec(Arg.REQUIRED, "c"),
    "deadline": _Spec(Arg.REQUIRED),
    "distribution": _Spec(Arg.REQUIRED, "m"),
    "exclude": _Spec(Arg.REQUIRED, "x", hostlist=True),
    "exclusive": _Spec(Arg.OPTIONAL),
    "extra-node-info": _Spec(Arg.REQUIRED, "B"),
    "gpu-bind": _Spec(Arg.REQUIRED),
    "gpu-freq": _Spec(Arg.REQUIRED),
    "gpus": _Spec(Arg.REQUIRED, "G"),
    "gpus-per-node": _Spec(Arg.REQUIRED),
    "gpus-per-socket": _Spec(Arg.REQUIRED),
    "gpus-per-task": _Spec(Arg.REQUIRED),
    "gres": _Spec(Arg.REQUIRED),
    "gres-flags": _Spec(Arg.REQUIRED),
    "hint": _Spec(Arg.REQUIRED),
    "hold": _Spec(Arg.NONE, "H"),
    "licenses": _Spec(Arg.REQUIRED, "L", operators=True),
    "mail-type": _Spec(Arg.REQUIRED),
    "mail-user": _Spec(Arg.REQUIRED),
    "mem": _Spec(Arg.REQUIRED),
    "mem-bind": _Spec(Arg.REQUIRED),
    "mem-per-cpu": _Spec(Arg.REQUIRED),
    "mem-per-gpu": _Spec(Arg.REQUIRED),
    "mincpus": _Spec(Arg.REQUIRED),
    "nice": _Spec(Arg.OPTIONAL),
    "no-kill": _Spec(Arg.OPTIONAL, "k"),
    "no-requeue": _Spec(Arg.NONE),
    "nodelist": _Spec(Arg.REQUIRED, "w", hostlist=True),
    "nodes": _Spec(Arg.REQUIRED, "N"),
    "ntasks": _Spec(Arg.REQUIRED, "n"),
    "ntasks-per-core": _Spec(Arg.REQUIRED),
    "ntasks-per-gpu": _Spec(Arg.REQUIRED),
    "ntasks-per-node": _Spec(Arg.REQUIRED),
    "ntasks-per-socket": _Spec(Arg.REQUIRED),
    "overcommit": _Spec(Arg.NONE, "O"),
    "oversubscribe": _Spec(Arg.NONE, "s"),
    "partition": _Spec(Arg.REQUIRED, "p"),
    "prefer": _Spec(Arg.REQUIRED, operators=True),
    "qos": _Spec(Arg.REQUIRED, "q"),
    "reservation": _Spec(Arg.REQUIRED),
    "signal": _Spec(Arg.REQUIRED),
    "sockets-per-node": _Spec(Arg.REQUIRED),
    "spread-job": _Spec(Arg.NONE),
    "switches": _Spec(Arg.REQUIRED),
    "thread-spec": _Spec(Arg.REQUIRED),
    "threads-per-core": _Spec(Arg.REQUIRED),
    "time": _Spec(Arg.REQUIRED, "t"),
    "time-min": _Spec(Arg.REQUIRED),
    "tmp": _Spec(Arg.REQUIRED),
    "use-min-nodes": _Spec(Arg.NONE),
    "wckey": _Spec(Arg.REQUIRED),
}

_OUTPUT = "hpk sends the job's output to the pod folder"
_ENVIRONMENT = "the job's environment is hpk's; set the containers' env in the pod spec"

#: sbatch options a pod may not pass, with the reason the user reads.
REFUSED: dict[str, str] = {
    "array": "one pod is one Slurm job",
    "batch": "hpk decides where the job script runs",
    "bb": "burst buffer specifications read files on the submitting host",
    "bbf": "burst buffer specifications read files on the submitting host",
    "chdir": "the job runs in the pod folder",
    "clusters": "the kubelet follows jobs on its own cluster only",
    "comment": "hpk keeps the pod's UID in the job's comment",
    "container": "hpk runs the pod's containers with Apptainer",
    "container-id": "hpk runs the pod's containers with Apptainer",
    "dependency": "pods are not ordered through Slurm job dependencies",
    "error": _OUTPUT,
    "export": _ENVIRONMENT,
    "export-file": _ENVIRONMENT,
    "get-user-env": _ENVIRONMENT,
    "gid": "the job runs as the kubelet's user",
    "help": "sbatch would print its help instead of submitting the job",
    "immediate": "a pod waits in Slurm's queue like any job",
    "input": "the pod's containers read no input",
    "job-name": "hpk names the job hpk/<namespace>/<pod name>",
    "kill-on-invalid-dep": "pods are not ordered through Slurm job dependencies",
    "nodefile": "sbatch would read the node list from a file on the kubelet's host; "
    "write the nodes with --nodelist",
    "open-mode": _OUTPUT,
    "output": _OUTPUT,
    "parsable": "hpk reads sbatch's answer itself",
    "propagate": "the kubelet's own resource limits are not the pod's",
    "requeue": "a requeued job would run the pod's containers a second time",
    "test-only": "the pod must really be submitted",
    "uid": "the job runs as the kubelet's user",
    "usage": "sbatch would print its usage instead of submitting the job",
    "version": "sbatch would print its version instead of submitting the job",
    "wait": "sbatch must return as soon as the job is queued",
    "wrap": "hpk submits the pod's own job script",
}

_SHORT: dict[str, str] = {spec.short: name for name, spec in ALLOWED.items() if spec.short}
_SHORT_REFUSED: dict[str, str] = {
    "a": "array",
    "D": "chdir",
    "d": "dependency",
    "e": "error",
    "F": "nodefile",
    "h": "help",
    "I": "immediate",
    "i": "input",
    "J": "job-name",
    "M": "clusters",
    "o": "output",
    "V": "version",
    "W": "wait",
}

#: Options that make Slurm send mail: allowed only when the kubelet's settings allow them.
MAIL_OPTIONS = frozenset({"mail-type", "mail-user"})
MAIL_SETTING = "--allow-mail-flags"
"""The kubelet's command-line flag that lets pods ask for mail."""

# A Slurm host list: host names, each with bracketed numeric ranges anywhere (`n[1-4,7]`,
# `rack[1-2]-n[01-10]`), separated by commas. No `/`, so sbatch never reads it as a file.
_RANGE = r"[0-9]+(?:-[0-9]+)?"
_BRACKET = rf"\[{_RANGE}(?:,{_RANGE})*\]"
_HOST = rf"(?:[A-Za-z0-9]|{_BRACKET})(?:[A-Za-z0-9_.-]|{_BRACKET})*"
_HOSTLIST = re.compile(rf"{_HOST}(?:,{_HOST})*")

#: Substrings that mean the author expected a shell; none is ever needed in an sbatch option.
_SHELL_SYNTAX = (";", "`", "$", "&&", "||", ">", "<", "\\")
#: Slurm's own operators; allowed only in the values of options marked `operators`.
_OPERATORS = ("|", "&")


class InvalidSbatchFlags(InvalidPodSpec):
    """The flags annotation holds an option hpk refuses, or is not readable as shell words."""

    reason = "InvalidSbatchFlags"

    def __init__(self, problem: str, *, flag: str | None = None) -> None:
        super().__init__(FIELD, problem)
        self.flag = flag


@dataclass(frozen=True)
class SbatchOption:
    """One validated sbatch option, by its long name."""

    name: str
    """The long name without dashes: `partition` for `-p` and `--partition`."""
    value: str | None = None
    """Its value; None for options given without one."""

    def argv(self) -> str:
        """The option as one argv word, `--name=value` or `--name`."""
        return f"--{self.name}" if self.value is None else f"--{self.name}={self.value}"


def parse_flags(text: str, *, allow_mail: bool = False) -> list[SbatchOption]:
    """Split and validate the annotation's text; the options in the order written.

    `allow_mail` is the kubelet's setting that lets pods pass MAIL_OPTIONS. Raises
    InvalidSbatchFlags naming the first flag or word that is refused.
    """
    try:
        words = shlex.split(text, comments=False, posix=True)
    except ValueError as error:
        raise InvalidSbatchFlags(
            f"cannot read the flags as shell words ({error}): {text!r}"
        ) from error
    options: list[SbatchOption] = []
    position = 0
    while position < len(words):
        option, position = _next_option(words, position, allow_mail=allow_mail)
        options.append(option)
    return options


def flags_argv(options: Sequence[SbatchOption]) -> list[str]:
    """The options as sbatch argv words."""
    return [option.argv() for option in options]


#: Options hpk derives from the pod, and the pod's own options that take their place: Slurm
#: refuses --mem beside --mem-per-cpu, and --cpus-per-task beside --cpus-per-gpu.
OVERRIDDEN_BY: dict[str, frozenset[str]] = {
    "partition": frozenset({"partition"}),
    "cpus-per-task": frozenset({"cpus-per-task", "cpus-per-gpu"}),
    "mem": frozenset({"mem", "mem-per-cpu", "mem-per-gpu"}),
    "gres": frozenset({"gres", "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task"}),
    "time": frozenset({"time"}),
}


def merge_options(
    derived: Sequence[SbatchOption], requested: Sequence[SbatchOption]
) -> list[SbatchOption]:
    """The derived options the pod's own do not replace, then the pod's own: theirs win."""
    named = {option.name for option in requested}
    kept = [
        option
        for option in derived
        if not (OVERRIDDEN_BY.get(option.name, frozenset({option.name})) & named)
    ]
    return [*kept, *requested]


def _next_option(words: list[str], position: int, *, allow_mail: bool) -> tuple[SbatchOption, int]:
    word = words[position]
    _check_characters(word, flag=_flag_of(word))
    if word.startswith("--") and len(word) > 2:
        name, has_value, value = word[2:].partition("=")
        spec = _allowed(name, flag=f"--{name}")
        _check_mail(name, allow_mail, flag=f"--{name}")
        given = value if has_value else None
        return _with_value(name, spec, given, words, position, flag=f"--{name}")
    if word.startswith("-") and len(word) > 1 and word != "--":
        letter, rest = word[1], word[2:]
        name = _short_name(letter)
        _check_mail(name, allow_mail, flag=f"-{letter}")
        spec = ALLOWED[name]
        if spec.arg is not Arg.REQUIRED:
            if rest:
                raise InvalidSbatchFlags(
                    f"-{letter} takes no value here; write short options one per word, or "
                    f"--{name}=VALUE",
                    flag=f"-{letter}",
                )
            return SbatchOption(name), position + 1
        if rest.startswith("="):
            raise InvalidSbatchFlags(
                f"-{letter}{rest}: a short option takes its value without '=' "
                f"(-{letter} VALUE or --{name}=VALUE)",
                flag=f"-{letter}",
            )
        return _with_value(name, spec, rest or None, words, position, flag=f"-{letter}")
    raise InvalidSbatchFlags(
        f"{word!r} is not an sbatch option; sbatch would take a bare word as the job script",
        flag=word,
    )


def _with_value(
    name: str,
    spec: _Spec,
    given: str | None,
    words: list[str],
    position: int,
    *,
    flag: str,
) -> tuple[SbatchOption, int]:
    if spec.arg is Arg.NONE:
        if given is not None:
            raise InvalidSbatchFlags(f"{flag} takes no value", flag=flag)
        return SbatchOption(name), position + 1
    if spec.arg is Arg.OPTIONAL:
        if given == "":
            raise InvalidSbatchFlags(f"{flag}= has an empty value", flag=flag)
        return SbatchOption(name, given), position + 1
    consumed = 1
    if given is None:
        following = words[position + 1] if position + 1 < len(words) else None
        if following is None or (following.startswith("-") and len(following) > 1):
            raise InvalidSbatchFlags(f"{flag} needs a value", flag=flag)
        _check_characters(following, flag=flag)
        given = following
        consumed = 2
    if given == "":
        raise InvalidSbatchFlags(f"{flag} has an empty value", flag=flag)
    if not spec.operators:
        for operator in _OPERATORS:
            if operator in given:
                raise InvalidSbatchFlags(
                    f"{flag} value {given!r} holds {operator!r}, which looks like shell syntax;"
                    " the flags are passed to sbatch as words, never through a shell",
                    flag=flag,
                )
    if spec.hostlist and not _HOSTLIST.fullmatch(given):
        why = (
            "; sbatch would read a value holding '/' as a file on the kubelet's host"
            if "/" in given
            else ""
        )
        raise InvalidSbatchFlags(
            f"{flag} value {given!r} is not a Slurm host list (such as n1,n[2-4,7]){why}",
            flag=flag,
        )
    return SbatchOption(name, given), position + consumed


def _check_mail(name: str, allow_mail: bool, *, flag: str) -> None:
    if name in MAIL_OPTIONS and not allow_mail:
        raise InvalidSbatchFlags(
            f"{flag} is not allowed: this kubelet sends no mail for pods (it was started "
            f"without {MAIL_SETTING})",
            flag=flag,
        )


def _allowed(name: str, *, flag: str) -> _Spec:
    if name in REFUSED:
        raise InvalidSbatchFlags(f"{flag} is not allowed: {REFUSED[name]}", flag=flag)
    spec = ALLOWED.get(name)
    if spec is None:
        raise InvalidSbatchFlags(
            f"{flag} is not an sbatch option hpk passes on (write long options in full); "
            f"allowed: {', '.join('--' + known for known in sorted(ALLOWED))}",
            flag=flag,
        )
    return spec


def _short_name(letter: str) -> str:
    if letter in _SHORT_REFUSED:
        name = _SHORT_REFUSED[letter]
        raise InvalidSbatchFlags(
            f"-{letter} (--{name}) is not allowed: {REFUSED[name]}", flag=f"-{letter}"
        )
    if letter not in _SHORT:
        known = " ".join(f"-{short}" for short in sorted(_SHORT, key=str.lower))
        raise InvalidSbatchFlags(
            f"-{letter} is not an sbatch option hpk passes on; allowed short options: {known}",
            flag=f"-{letter}",
        )
    return _SHORT[letter]


def _flag_of(word: str) -> str:
    """The option a word starts with (`--mem` of `--mem=1G`, `-p` of `-pgpu`), or the word."""
    if word.startswith("--"):
        return word.partition("=")[0]
    if word.startswith("-") and len(word) > 1:
        return word[:2]
    return word


def _check_characters(word: str, *, flag: str) -> None:
    for syntax in _SHELL_SYNTAX:
        if syntax in word:
            raise InvalidSbatchFlags(
                f"{word!r} holds {syntax!r}, which looks like an attempt to use a shell; the "
                "flags are passed to sbatch as words, never through a shell",
                flag=flag,
            )
    if any(ord(character) < 32 or ord(character) == 127 for character in word):
        raise InvalidSbatchFlags(f"{word!r} holds a control character", flag=flag)
