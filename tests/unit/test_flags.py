"""The `slurm.hpk.io/flags` annotation: what passes to sbatch, in which form, and what fails the
pod with which message."""

from __future__ import annotations

import pytest

from kubelet_py.errors import InvalidPodSpec
from kubelet_py.main import parse_args
from kubelet_py.pod.flags import (
    ALLOWED,
    MAIL_OPTIONS,
    REFUSED,
    InvalidSbatchFlags,
    SbatchOption,
    flags_argv,
    merge_options,
    parse_flags,
)


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("", []),
        ("   ", []),
        ("--nodes=2 --ntasks=8 -p gpu", ["--nodes=2", "--ntasks=8", "--partition=gpu"]),
        ("-pgpu -N2 -n 8 -c4", ["--partition=gpu", "--nodes=2", "--ntasks=8", "--cpus-per-task=4"]),
        ("--partition gpu --time 1:00:00", ["--partition=gpu", "--time=1:00:00"]),
        ("-t 30 -A proj -q high", ["--time=30", "--account=proj", "--qos=high"]),
        ("--mem=4G --mem-per-cpu=1G", ["--mem=4G", "--mem-per-cpu=1G"]),
        ("--gres=gpu:2 --gpus-per-node=1", ["--gres=gpu:2", "--gpus-per-node=1"]),
        ("--exclusive", ["--exclusive"]),
        ("--exclusive=user", ["--exclusive=user"]),
        ("--constraint='intel&(ib|eth)'", ["--constraint=intel&(ib|eth)"]),
        ('-C "[rack1|rack2]"', ["--constraint=[rack1|rack2]"]),
        ("--licenses=matlab:1|ansys:1", ["--licenses=matlab:1|ansys:1"]),
        (
            "-w n[1-2] -x n3 --reservation=maint",
            ["--nodelist=n[1-2]", "--exclude=n3", "--reservation=maint"],
        ),
        ("--begin=now+1hour --deadline=2030-01-01", ["--begin=now+1hour", "--deadline=2030-01-01"]),
        (
            "--hint=nomultithread --distribution=block:cyclic",
            ["--hint=nomultithread", "--distribution=block:cyclic"],
        ),
        ("--nice=-5 -H --no-requeue", ["--nice=-5", "--hold", "--no-requeue"]),
        ("-s -O", ["--oversubscribe", "--overcommit"]),
        ("--ntasks-per-node=4 --mincpus=2", ["--ntasks-per-node=4", "--mincpus=2"]),
    ],
)
def test_allowed_flags_become_long_argv_words(text: str, argv: list[str]) -> None:
    assert flags_argv(parse_flags(text)) == argv


@pytest.mark.parametrize(
    ("text", "flag", "message"),
    [
        ("; rm -rf ~", ";", "attempt to use a shell"),
        ("-p gpu; rm -rf ~", "-p", "';'"),
        ("-p gpu && reboot", "&&", "attempt to use a shell"),
        ("-p gpu | cat", "|", "not an sbatch option"),
        ("--partition=$(whoami)", "--partition", "'$'"),
        ("--partition=`id`", "--partition", "'`'"),
        ("--account=${HOME}", "--account", "'$'"),
        ("--mem=1G > /tmp/x", ">", "attempt to use a shell"),
        ("--partition='gpu", None, "cannot read the flags as shell words"),
        ('--partition="gpu', None, "No closing quotation"),
        ("gpu", "gpu", "sbatch would take a bare word as the job script"),
        ("-p gpu extra", "extra", "bare word"),
        ("--uid=0", "--uid", "--uid is not allowed: the job runs as the kubelet's user"),
        ("--gid 0", "--gid", "not allowed"),
        ("--output=/etc/x", "--output", "--output is not allowed: hpk sends the job's output"),
        ("-o /etc/x", "-o", "-o (--output) is not allowed"),
        ("-e err.txt", "-e", "--error"),
        ("-i /etc/shadow", "-i", "--input"),
        ("--open-mode=append", "--open-mode", "not allowed"),
        ("--parsable", "--parsable", "hpk reads sbatch's answer itself"),
        ("--wrap='rm -rf ~'", "--wrap", "not allowed"),
        ("--chdir=/", "--chdir", "the job runs in the pod folder"),
        ("-D /", "-D", "--chdir"),
        ("--export=ALL", "--export", "not allowed"),
        ("--get-user-env", "--get-user-env", "not allowed"),
        ("--job-name=x", "--job-name", "hpk names the job"),
        ("-J x", "-J", "--job-name"),
        ("--array=1-10", "--array", "one pod is one Slurm job"),
        ("-a 1-3", "-a", "--array"),
        ("--dependency=afterok:1", "--dependency", "not allowed"),
        ("--comment=hi", "--comment", "pod's UID"),
        ("--wait", "--wait", "not allowed"),
        ("--test-only", "--test-only", "not allowed"),
        ("--kill-on-invalid-dep=yes", "--kill-on-invalid-dep", "not allowed"),
        ("--propagate=ALL", "--propagate", "not allowed"),
        ("--requeue", "--requeue", "a second time"),
        ("-M other", "-M", "--clusters"),
        ("--help", "--help", "help"),
        ("--frobnicate=1", "--frobnicate", "not an sbatch option hpk passes on"),
        ("--part=gpu", "--part", "write long options in full"),
        ("-Z", "-Z", "allowed short options"),
        ("--partition", "--partition", "--partition needs a value"),
        ("-p", "-p", "-p needs a value"),
        ("--partition --nodes=2", "--partition", "needs a value"),
        ("--partition=", "--partition", "empty value"),
        ("--exclusive=", "--exclusive", "empty value"),
        ("--hold=yes", "--hold", "takes no value"),
        ("-Hs", "-H", "one per word"),
        ("-p=gpu", "-p", "without '='"),
        ("--partition=gpu|cpu", "--partition", "holds '|'"),
        ("--account='a&b'", "--account", "holds '&'"),
        ("--partition='gpu\nx'", "--partition", "control character"),
        ("--nodefile=/etc/hosts", "--nodefile", "file on the kubelet's host"),
        ("-F hosts.txt", "-F", "--nodefile"),
        ("--export-file=/etc/passwd", "--export-file", "not allowed"),
        ("--bbf=/etc/passwd", "--bbf", "read files on the submitting host"),
    ],
)
def test_refused_flags_name_the_flag(text: str, flag: str | None, message: str) -> None:
    with pytest.raises(InvalidSbatchFlags) as caught:
        parse_flags(text)
    assert caught.value.flag == flag
    assert message in str(caught.value)
    assert str(caught.value).startswith("metadata.annotations[slurm.hpk.io/flags]: ")
    assert isinstance(caught.value, InvalidPodSpec)


def test_an_unknown_flag_lists_the_allowed_ones() -> None:
    with pytest.raises(InvalidSbatchFlags, match=r"allowed: --account, --acctg-freq, "):
        parse_flags("--frobnicate")


def test_allowed_and_refused_lists_do_not_overlap() -> None:
    assert not set(ALLOWED) & set(REFUSED)


@pytest.mark.parametrize(
    ("derived", "requested", "kept"),
    [
        (["partition=batch", "mem=100M"], ["partition=gpu"], ["mem=100M", "partition=gpu"]),
        (
            ["mem=100M", "cpus-per-task=2"],
            ["mem-per-cpu=1G"],
            ["cpus-per-task=2", "mem-per-cpu=1G"],
        ),
        (["mem=100M"], ["mem-per-gpu=1G"], ["mem-per-gpu=1G"]),
        (["cpus-per-task=2"], ["cpus-per-gpu=4"], ["cpus-per-gpu=4"]),
        (["gres=gpu:1", "time=5"], ["gpus=2"], ["time=5", "gpus=2"]),
        (["gres=gpu:1"], ["gres=gpu:a100:1"], ["gres=gpu:a100:1"]),
        (["time=5"], ["time=10"], ["time=10"]),
        (["time=5", "mem=1M"], ["nodes=2"], ["time=5", "mem=1M", "nodes=2"]),
    ],
)
def test_the_pods_own_flags_replace_derived_ones(
    derived: list[str], requested: list[str], kept: list[str]
) -> None:
    def options(words: list[str]) -> list[SbatchOption]:
        return [SbatchOption(*word.split("=", 1)) for word in words]

    merged = merge_options(options(derived), options(requested))
    assert [f"{o.name}={o.value}" for o in merged] == kept


# Every spelling sbatch accepts for a value, short and long.
_SPELLINGS = ("-{short} {value}", "-{short}{value}", "--{long}={value}", "--{long} {value}")


@pytest.mark.parametrize(("short", "long"), [("w", "nodelist"), ("x", "exclude")])
@pytest.mark.parametrize("spelling", _SPELLINGS)
@pytest.mark.parametrize(
    "value", ["n1", "n[1-4,7]", "gpu-01,gpu-02", "rack1-n[01-10]", "rack[1-2]-n[1-3],login.x_1"]
)
def test_node_lists_pass_as_host_lists(short: str, long: str, spelling: str, value: str) -> None:
    text = spelling.format(short=short, long=long, value=value)
    assert flags_argv(parse_flags(text)) == [f"--{long}={value}"]


@pytest.mark.parametrize(("short", "long"), [("w", "nodelist"), ("x", "exclude")])
@pytest.mark.parametrize("spelling", _SPELLINGS)
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/etc/passwd", "sbatch would read a value holding '/' as a file on the kubelet's host"),
        ("./hosts", "as a file"),
        ("hosts/n1", "as a file"),
        ("~/.hpk/pki/ca.key", "as a file"),
        ("n1,,n2", "is not a Slurm host list"),
        ("n1,", "is not a Slurm host list"),
        ("n[1-", "is not a Slurm host list"),
        ("n[a-b]", "is not a Slurm host list"),
        ("n1:n2", "is not a Slurm host list"),
        ("n1=n2", "is not a Slurm host list"),
        (".n1", "is not a Slurm host list"),
    ],
)
def test_node_lists_that_are_no_host_lists_are_refused(
    short: str, long: str, spelling: str, value: str, message: str
) -> None:
    text = spelling.format(short=short, long=long, value=value)
    with pytest.raises(InvalidSbatchFlags) as caught:
        parse_flags(text)
    flag = f"-{short}" if spelling.startswith("-{short}") else f"--{long}"
    assert caught.value.flag == flag
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"metadata.annotations[slurm.hpk.io/flags]: {flag} value")


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        ("--mail-user=a@b.org", "--mail-user"),
        ("--mail-user a@b.org", "--mail-user"),
        ("--mail-type=END,FAIL", "--mail-type"),
        ("-p gpu --mail-type ALL", "--mail-type"),
    ],
)
def test_mail_is_refused_unless_the_kubelet_allows_it(text: str, flag: str) -> None:
    with pytest.raises(InvalidSbatchFlags) as caught:
        parse_flags(text)
    assert caught.value.flag == flag
    assert f"{flag} is not allowed" in str(caught.value)
    assert "--allow-mail-flags" in str(caught.value)


def test_mail_passes_when_the_kubelet_allows_it() -> None:
    text = "--mail-type=END,FAIL --mail-user a@b.org"
    assert flags_argv(parse_flags(text, allow_mail=True)) == [
        "--mail-type=END,FAIL",
        "--mail-user=a@b.org",
    ]


def test_mail_options_are_allowed_options() -> None:
    # The setting lifts the refusal of these names only: they must be known sbatch options.
    assert set(ALLOWED) >= MAIL_OPTIONS


def test_the_kubelet_flag_allows_mail() -> None:
    assert parse_args(["--kubeconfig=k", "--allow-mail-flags"]).allow_mail_flags is True
    assert parse_args(["--kubeconfig=k"]).allow_mail_flags is False
