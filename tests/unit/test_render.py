"""Rendering a pod into its job: golden job scripts, sbatch's arguments, the env files, and
every pod field hpk refuses.

Regenerate the golden scripts with HPK_UPDATE_GOLDEN=1 and read the diff before committing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from hpk.images import ImageConfig
from kubelet_py.errors import InvalidPodSpec
from kubelet_py.job.podfolder import HANDSHAKE_FIFO, HANDSHAKE_HOOK
from kubelet_py.job.termination import HOOK_PATH, READY_PATH
from kubelet_py.pod.flags import InvalidSbatchFlags
from kubelet_py.pod.inputs import PodInputs, VolumeFile
from kubelet_py.pod.render import (
    ImageNotResolved,
    RenderedPod,
    RenderSettings,
    render_pod,
)
from kubelet_py.pod.security import JobUser
from tests.unit.fakes import BUSYBOX, IMAGES, READ_BACK, Pod, busybox, launches, pod, settings

GOLDEN = Path(__file__).parent / "golden"
FLAGS_FIELD = "metadata.annotations[slurm.hpk.io/flags]"
WEIRD_DIR = PurePosixPath('/var/tmp/it\'s a "pod"; folder/default/weird')

ECHO = pod("echo", busybox("main", command=["echo", "hello"]))

INIT_AND_TWO = pod(
    "init-and-two",
    busybox(
        "writer",
        command=["sh", "-c", "cat /work/order; echo ready > /work/ready"],
        volumeMounts=[{"name": "work", "mountPath": "/work"}],
    ),
    busybox(
        "reader",
        command=["sh", "-c", "while [ ! -e /work/ready ]; do sleep 0.1; done"],
        volumeMounts=[{"name": "work", "mountPath": "/work", "readOnly": True}],
    ),
    initContainers=[
        busybox(
            "first",
            command=["sh", "-c", "echo first > /work/order"],
            volumeMounts=[{"name": "work", "mountPath": "/work"}],
        ),
        busybox(
            "second",
            command=["sh", "-c", "echo second >> /work/order"],
            volumeMounts=[{"name": "work", "mountPath": "/work", "subPath": "."}],
        ),
    ],
    volumes=[{"name": "work", "emptyDir": {}}],
)

COMMAND_ARGS = pod(
    "command-args",
    busybox("command-only", command=["echo", "one", "two"]),
    busybox("command-and-args", command=["echo"], args=["one", "two"], workingDir="/tmp"),
    busybox("args-only", args=["-c", "echo from the runscript"]),
    busybox("neither"),
    busybox("empty-lists", command=[], args=[]),
)

TRICKY = {
    "QUOTES": 'it\'s "quoted"',
    "NEWLINES": "line one\nline two\n",
    "DOLLAR": "$HOME ${PATH} $(not-a-ref $$",
    "BACKTICKS": "`id` $(id)",
    "JSON": '{"a": [1, "two"], "b": {"c": null}}',
    "UNICODE": "héllo wörld ✓ 日本",
    "EMPTY": "",
}
ENV = pod(
    "env",
    {
        "name": "main",
        "image": "python:3.11",
        "command": ["python3", "-c", "import os; print(os.environ['JSON'])"],
        "env": [
            *({"name": name, "value": value} for name, value in TRICKY.items()),
            {"name": "BASE", "value": "/data"},
            {"name": "DERIVED", "value": "$(BASE)/in and $$(BASE) and $(LATER) and $(UNKNOWN)"},
            {"name": "LATER", "value": "later"},
            {"name": "NO_VALUE"},
        ],
    },
)

RESOURCES = pod(
    "resources",
    busybox("a", command=["true"], resources={"requests": {"cpu": "500m", "memory": "100Mi"}}),
    busybox(
        "b",
        command=["true"],
        resources={"limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}},
    ),
    initContainers=[busybox("init", command=["true"], resources={"requests": {"cpu": "4"}})],
    activeDeadlineSeconds=125,
)

FLAGS = pod(
    "flags",
    busybox("main", command=["true"], resources={"requests": {"cpu": "2", "memory": "1Gi"}}),
    annotations={"slurm.hpk.io/flags": "-p gpu --mem-per-cpu=2G --gpus-per-node=1 -t 10"},
    activeDeadlineSeconds=60,
)

CONFIG = pod(
    "config",
    busybox(
        "main",
        command=["sh", "/config/run.sh", "$(NODE)"],
        envFrom=[{"configMapRef": {"name": "app"}, "prefix": "APP_"}],
        env=[
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "pw"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "MEMORY_MIB",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
        ],
        resources={"limits": {"memory": "256Mi"}},
        volumeMounts=[
            {"name": "config", "mountPath": "/config"},
            {"name": "creds", "mountPath": "/creds/pw", "subPath": "pw"},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
    ),
    nodeName="hpk-batch",
    volumes=[
        {
            "name": "config",
            "configMap": {"name": "app", "items": [{"key": "run", "path": "run.sh"}]},
        },
        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        {"name": "scratch", "emptyDir": {}},
    ],
)
CONFIG_INPUTS = PodInputs(
    env_values={"spec.containers[0].env[0]": "s3cret"},
    env_from={"spec.containers[0].envFrom[0]": {"color": "blue"}},
    volumes={
        "config": (VolumeFile(path="run.sh", data=b"echo hi", mode=0o644),),
        "creds": (VolumeFile(path="pw", data=b"s3cret", mode=0o400),),
    },
    secret_volumes=frozenset({"creds"}),
)

RESTARTS = pod(
    "restarts",
    busybox("main", command=["sh", "-c", "echo work"]),
    initContainers=[
        busybox("setup", command=["true"]),
        busybox("proxy", command=["sleep", "3600"], restartPolicy="Always"),
        busybox("after-proxy", command=["true"]),
    ],
    restartPolicy="OnFailure",
    terminationGracePeriodSeconds=5,
)

# Both hooks, each handler: a server whose postStart execs in its image and whose preStop asks
# it to drain (a named port), a worker whose preStop sleeps, and a sidecar whose postStart
# waits for its own port. The server's hook holds the worker back until it has passed.
HOOKS = pod(
    "hooked",
    busybox(
        "server",
        command=["httpd", "-f", "-p", "8080", "-h", "/work"],
        ports=[{"name": "http", "containerPort": 8080}],
        volumeMounts=[{"name": "work", "mountPath": "/work"}],
        lifecycle={
            "postStart": {"exec": {"command": ["sh", "-c", "echo up > /work/index.html"]}},
            "preStop": {
                "httpGet": {
                    "port": "http",
                    "path": "/drain",
                    "httpHeaders": [{"name": "X-Reason", "value": "pod deleted"}],
                }
            },
        },
    ),
    busybox(
        "worker",
        command=["sh", "-c", "wget -q -O - http://127.0.0.1:8080/; exec sleep 3600"],
        lifecycle={"preStop": {"sleep": {"seconds": 5}}},
    ),
    initContainers=[
        busybox(
            "proxy",
            command=["sleep", "3600"],
            restartPolicy="Always",
            lifecycle={"postStart": {"httpGet": {"port": 15000, "scheme": "HTTPS"}}},
        ),
    ],
    terminationGracePeriodSeconds=20,
    volumes=[{"name": "work", "emptyDir": {}}],
)

GOLDEN_CASES: dict[str, tuple[Pod, RenderSettings]] = {
    "echo": (ECHO, settings("echo")),
    "init-and-two": (INIT_AND_TWO, settings("init-and-two")),
    "command-args": (COMMAND_ARGS, settings("command-args")),
    "env": (ENV, settings("env")),
    "resources": (RESOURCES, settings("resources")),
    "flags": (FLAGS, settings("flags")),
    "weird-path": (ECHO, settings(pod_dir=WEIRD_DIR)),
    "restarts": (RESTARTS, settings("restarts")),
    "hooks": (HOOKS, settings("hooked")),
    "config": (CONFIG, settings("config", node_addresses={"n1": "10.1.0.1", "n2": "10.1.0.2"})),
}
GOLDEN_INPUTS = {"config": CONFIG_INPUTS}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_job_script_matches_golden_file(case: str) -> None:
    the_pod, the_settings = GOLDEN_CASES[case]
    script = render_pod(the_pod, the_settings, inputs=GOLDEN_INPUTS.get(case)).script
    golden = GOLDEN / f"pod-{case}.sh"
    if os.environ.get("HPK_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_job_script_is_valid_bash(case: str) -> None:
    the_pod, the_settings = GOLDEN_CASES[case]
    script = render_pod(the_pod, the_settings, inputs=GOLDEN_INPUTS.get(case)).script
    result = subprocess.run(
        ["bash", "-n"], input=script, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_docker_semantics_of_command_and_args() -> None:
    argv = launches(render_pod(COMMAND_ARGS, settings()))
    sif = str(IMAGES[BUSYBOX])

    def after_image(words: list[str]) -> tuple[str, list[str]]:
        return words[2], words[words.index(sif) + 1 :]

    assert after_image(argv["command-only"]) == ("exec", ["echo", "one", "two"])
    assert after_image(argv["command-and-args"]) == ("exec", ["echo", "one", "two"])
    assert after_image(argv["args-only"]) == ("run", ["-c", "echo from the runscript"])
    assert after_image(argv["neither"]) == ("run", [])
    assert after_image(argv["empty-lists"]) == ("run", [])


def test_apptainer_options_for_each_container() -> None:
    argv = launches(render_pod(COMMAND_ARGS, settings()))
    words = argv["command-and-args"]
    # --quiet: Apptainer's own INFO and WARNING lines stay out of the container's log.
    assert words[:4] == ["$apptainer", "--quiet", "exec", "${run_options[@]}"]
    options = words[4 : words.index("/home/alice/.hpk/images/docker.io/library/busybox/latest.sif")]
    assert options[:6] == [
        "--cleanenv", "--no-eval",
        # Contained: no host home, current folder, /tmp or site bind paths.
        "--contain", "--no-mount", "bind-paths,hostfs,cwd",
        # Writes to the image's own file system succeed, private to the run.
        "--writable-tmpfs",
    ]  # fmt: skip
    # HOME from the image's users (a record without them: `/` for a non-root user), and the
    # host's home is not mounted there.
    assert options[6:9] == ["--no-home", "--home", "/:/"]
    # --pid: each container has its own PIDs, as in Kubernetes.
    assert options[9:12] == ["--pid", "--pwd", "/tmp"]
    # Its own /tmp and /var/tmp, and the termination handshake (kubelet_py.job.termination).
    assert options[12:14] == ["--workdir", "$scratch/command-and-args"]
    assert [options[14], options[16]] == ["--bind", "--bind"]
    assert options[15].endswith(f"/{HANDSHAKE_FIFO}:{READY_PATH}")
    assert options[17].endswith(f"/{HANDSHAKE_HOOK}:{HOOK_PATH}:ro")
    assert argv["neither"][argv["neither"].index("--pwd") + 1] == "/"


def test_home_is_the_images_home_of_the_containers_user() -> None:
    image = "docker.io/library/busybox:latest"
    homes = ((0, "/root"), (1000, "/home/app"), (8737, "/tmp"))
    config = ImageConfig(oci=True, entrypoint=("sh",), homes=homes)

    def home(context: dict[str, Any], user: JobUser) -> str:
        pod = copy.deepcopy(COMMAND_ARGS)
        pod["spec"]["containers"] = [
            {"name": "c", "image": "busybox", "command": ["id"], "securityContext": context}
        ]
        job = settings(image_configs={image: config}, job_user=user)
        words = launches(render_pod(pod, job))["c"]
        return words[words.index("--home") + 1]

    assert home({}, JobUser(1000, 1000)) == "/:/home/app"
    assert home({}, JobUser(1001, 1001)) == "/:/"  # the image does not list the job's user
    assert home({"runAsUser": 0}, JobUser(1001, 1001)) == "/:/root"  # --fakeroot
    assert home({"runAsUser": 8737}, JobUser(0, 0)) == "/:/tmp"  # --security as root


def test_termination_message_path_and_policy_are_checked() -> None:
    def launch(**fields: object) -> str:
        pod = copy.deepcopy(COMMAND_ARGS)
        pod["spec"]["containers"] = [
            {"name": "c", "image": "busybox", "command": ["true"], **fields}
        ]
        return render_pod(pod, settings()).script

    assert '--termination /dev/termination-log "$containers"/c --' in launch()
    script = launch(terminationMessagePath="/var/run/msg", terminationMessagePolicy="File")
    assert '--termination /var/run/msg "$containers"/c --' in script
    for bad in ("relative", "/a/../b", "/dir/", "/a\nb"):
        with pytest.raises(InvalidPodSpec, match="terminationMessagePath"):
            launch(terminationMessagePath=bad)
    with pytest.raises(InvalidPodSpec, match="terminationMessagePolicy"):
        launch(terminationMessagePolicy="Always")


def test_read_only_root_file_system_has_no_writable_layer() -> None:
    pod = copy.deepcopy(COMMAND_ARGS)
    pod["spec"]["containers"][0]["securityContext"] = {"readOnlyRootFilesystem": True}
    argv = launches(render_pod(pod, settings()))
    name = pod["spec"]["containers"][0]["name"]
    assert "--writable-tmpfs" not in argv[name]
    assert all("--writable-tmpfs" in words for key, words in argv.items() if key != name)


@pytest.mark.parametrize("key", ["hostPID", "shareProcessNamespace"])
def test_a_pod_that_shares_pids_keeps_the_nodes(key: str) -> None:
    pod = copy.deepcopy(COMMAND_ARGS)
    pod["spec"][key] = True
    argv = launches(render_pod(pod, settings()))
    assert all("--pid" not in words for words in argv.values())


def test_volumes_are_bound_from_the_pod_folder() -> None:
    rendered = render_pod(INIT_AND_TWO, settings("init-and-two"))
    argv = launches(rendered)
    folder = "/home/alice/.hpk/pods/default/init-and-two/volumes/work"
    assert f"{folder}:/work" in argv["writer"]
    assert f"{folder}:/work:ro" in argv["reader"]
    assert 'mkdir -p -- "$containers" volumes/work || exit 125' in rendered.script


def test_init_containers_run_in_order_before_the_main_ones() -> None:
    script = render_pod(INIT_AND_TWO, settings()).script
    order = [script.index(f'"$containers"/{name} --') for name in ("first", "second", "writer")]
    assert order == sorted(order)
    first_wait = script.index('wait "$!" || exit "$?"', order[0])
    assert order[0] < first_wait < order[1]


def test_a_sub_path_folder_is_made_just_before_its_container_starts() -> None:
    # Argo's init container puts an input artifact where the main container's subPath
    # points, and refuses a folder already there: the folder must not exist before then.
    the_pod = pod(
        "artifacts",
        busybox("main", volumeMounts=[{"name": "in", "mountPath": "/in", "subPath": "a/b"}]),
        initContainers=[busybox("init", volumeMounts=[{"name": "in", "mountPath": "/all"}])],
        volumes=[{"name": "in", "emptyDir": {}}],
    )
    script = render_pod(the_pod, settings()).script
    made = script.index("mkdir -p -- volumes/in/a/b || exit 125")
    assert 'mkdir -p -- "$containers" volumes/in || exit 125' in script
    assert script.index('"$containers"/init --') < made < script.index('"$containers"/main --')


def test_env_values_go_to_the_env_file_not_the_script() -> None:
    rendered = render_pod(ENV, settings("env"))
    assert set(rendered.files) == {"env/main"}
    for value in [*TRICKY.values(), "later"]:
        if value:
            assert value not in rendered.script
    assert "--env-file env/main" in rendered.script


def test_env_file_holds_literal_values_with_kubernetes_expansion() -> None:
    content = render_pod(ENV, settings("env")).files["env/main"]
    # Read the file back as a shell would (Apptainer evaluates it as shell, with no commands).
    result = subprocess.run(
        ["bash", "-c", READ_BACK, "_", *TRICKY, "BASE", "DERIVED", "LATER", "NO_VALUE"],
        input=content,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "BASE": "from-the-host", "LANG": "C.UTF-8"},
    )
    values = result.stdout.split("\0")[:-1]
    expected = [
        # Kubernetes reads $$ as an escaped $, also without a reference after it.
        *(value.replace("$$", "$") for value in TRICKY.values()),
        "/data",
        "/data/in and $(BASE) and $(LATER) and $(UNKNOWN)",
        "later",
        "",
    ]
    assert values == expected


def test_config_values_stay_out_of_the_script() -> None:
    rendered = render_pod(CONFIG, GOLDEN_CASES["config"][1], inputs=CONFIG_INPUTS)
    assert "s3cret" not in rendered.script and "blue" not in rendered.script
    assert rendered.files["env/main"].splitlines()[1:] == [
        "APP_color=blue",
        "PASSWORD=s3cret",
        "NODE=hpk-batch",
        "MEMORY_MIB=256",
    ]
    argv = launches(rendered)["main"]
    assert argv[-3:] == ["sh", "/config/run.sh", "hpk-batch"]


def test_command_and_args_are_expanded_with_the_whole_env() -> None:
    the_pod = pod(
        "x",
        busybox(
            "main",
            command=["echo", "$(GREETING)", "$$(GREETING)"],
            args=["$(LATE)", "$(MISSING)"],
            env=[{"name": "GREETING", "value": "hi"}, {"name": "LATE", "value": "late"}],
        ),
    )
    argv = launches(render_pod(the_pod, settings()))["main"]
    assert argv[-5:] == ["echo", "hi", "$(GREETING)", "late", "$(MISSING)"]


def test_sbatch_arguments_for_a_plain_pod() -> None:
    assert render_pod(ECHO, settings("echo")).sbatch_args == (
        "--job-name=hpk/default/echo",
        "--comment=hpk-uid=5f0c8a9e-1d2b-4c3d-8e4f-123456789abc",
        "--chdir=/home/alice/.hpk/pods/default/echo",
        "--output=/home/alice/.hpk/pods/default/echo/slurm.out",
        "--error=/home/alice/.hpk/pods/default/echo/slurm.out",
        "--parsable",
        "--no-requeue",
        "--partition=batch",
        "/home/alice/.hpk/pods/default/echo/job.sh",
    )


def test_sbatch_arguments_from_resources_and_deadline() -> None:
    args = render_pod(RESOURCES, settings("resources")).sbatch_args
    # cpu: max(init 4, 0.5 + 1) = 4; memory: 100Mi + 1Gi; gpu from b's limit; 125 s -> 3 min.
    assert args[7:-1] == (
        "--partition=batch",
        "--cpus-per-task=4",
        "--mem=1124M",
        "--gres=gpu:1",
        "--time=3",
    )
    argv = launches(render_pod(RESOURCES, settings("resources")))
    assert "--nv" in argv["b"]
    assert "--nv" not in argv["a"] and "--nv" not in argv["init"]


def test_annotation_flags_replace_derived_ones() -> None:
    rendered = render_pod(FLAGS, settings("flags"))
    assert rendered.sbatch_args[7:-1] == (
        "--cpus-per-task=2",
        "--partition=gpu",
        "--mem-per-cpu=2G",
        "--gpus-per-node=1",
        "--time=10",
    )
    assert "--nv" in launches(rendered)["main"]  # the flags ask for a GPU


def test_no_partition_setting_leaves_it_to_slurm() -> None:
    args = render_pod(ECHO, settings(partition=None)).sbatch_args
    assert not [arg for arg in args if arg.startswith("--partition")]


def test_weird_pod_folder_reaches_sbatch_as_single_words() -> None:
    args = render_pod(ECHO, settings(pod_dir=WEIRD_DIR)).sbatch_args
    assert f"--chdir={WEIRD_DIR}" in args
    assert f"--output={WEIRD_DIR}/slurm.out" in args
    assert args[-1] == f"{WEIRD_DIR}/job.sh"


def test_weird_pod_folder_is_one_word_in_the_script() -> None:
    script = render_pod(ECHO, settings(pod_dir=WEIRD_DIR)).script
    result = subprocess.run(
        [
            "bash",
            "-c",
            script.split("\n\n")[1].split("\ncontainers=")[0] + '\necho "$pod_dir"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == f"{WEIRD_DIR}\n"


def test_percent_in_the_pod_folder_is_not_a_slurm_pattern() -> None:
    args = render_pod(ECHO, settings(pod_dir=PurePosixPath("/p/100%j"))).sbatch_args
    assert "--output=/p/100%%j/slurm.out" in args
    assert "--chdir=/p/100%j" in args


def test_unknown_settings_are_refused_with_the_valid_ones() -> None:
    with pytest.raises(TypeError) as caught:
        settings(pod_folder="/x")
    assert "unknown render settings ['pod_folder']" in str(caught.value)
    valid = "'pod_dir', 'apptainer', 'images', 'image_configs', 'python', 'partition'"
    assert valid in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pod_dir": PurePosixPath("relative/dir")}, "absolute path"),
        ({"pod_dir": PurePosixPath("/a:b")}, "reads ':'"),
        ({"pod_dir": PurePosixPath("/a,b")}, "reads ','"),
        ({"pod_dir": PurePosixPath("/a\\b")}, "reads"),
        ({"pod_dir": PurePosixPath("/a\nb")}, "absolute path"),
        ({"apptainer": PurePosixPath("apptainer")}, "absolute path"),
        ({"images": {"busybox": PurePosixPath("busybox.sif")}}, "absolute path"),
        ({"partition": "gpu;x"}, "not a partition name"),
    ],
)
def test_bad_settings(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings(**overrides)


def test_image_references_match_in_any_form() -> None:
    short = settings(images={"busybox": "/sif/bb.sif", "python:3.11": "/sif/py.sif"})
    assert launches(render_pod(ECHO, short))["main"][-3:] == ["/sif/bb.sif", "echo", "hello"]


def test_an_image_without_a_sif_file_is_the_callers_error() -> None:
    with pytest.raises(ImageNotResolved, match=re.escape(BUSYBOX)) as caught:
        render_pod(ECHO, settings(images={}))
    assert caught.value.reference == BUSYBOX


def test_a_pod_as_the_api_server_returns_it_renders() -> None:
    """Every field the API server's defaulting and admission add is accounted for."""
    served = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "served",
            "namespace": "default",
            "uid": "0b4a5f5e-8d7c-4b51-9d2e-1f0e5c3a7b99",
            "resourceVersion": "1234",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": "x"},
            "annotations": {},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["echo", "hi"],
                    "imagePullPolicy": "Always",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": True,
            "nodeName": "hpk-batch",
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Never",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {
                    "effect": "NoExecute",
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "tolerationSeconds": 300,
                }
            ],
        },
        "status": {"phase": "Pending", "qosClass": "BestEffort"},
    }
    assert launches(render_pod(served, settings()))["main"][-2:] == ["echo", "hi"]


def with_changes(base: Pod, path: str, value: object) -> Pod:
    """A copy of `base` with the field at `path` (keys and list indexes, joined by /) set."""
    changed = copy.deepcopy(base)
    *parents, last = path.split("/")
    target: Any = changed
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return changed


def refused(the_pod: Pod) -> InvalidPodSpec:
    with pytest.raises(InvalidPodSpec) as caught:
        render_pod(the_pod, settings())
    return caught.value


BASE = pod("x", busybox("main", command=["true"]), initContainers=[busybox("first")])


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("spec/restartPolicy", "Sometimes", "spec.restartPolicy", "none of"),
        (
            "spec/initContainers/0/restartPolicy",
            "Never",
            "spec.initContainers[0].restartPolicy",
            "only set Always",
        ),
        (
            "spec/initContainers/0/restartPolicy",
            "OnFailure",
            "spec.initContainers[0].restartPolicy",
            "only set Always",
        ),
        ("spec/ephemeralContainers", [{"name": "x"}], "spec.ephemeralContainers", "not supported"),
        (
            "spec/securityContext",
            {"sysctls": [{"name": "net.core.somaxconn", "value": "1024"}]},
            "spec.securityContext.sysctls",
            "cannot set sysctls",
        ),
        ("spec/dnsPolicy", "Cluster", "spec.dnsPolicy", "not supported yet"),
        ("spec/os", {"name": "windows"}, "spec.os.name", "Linux"),
        ("spec/containers", [], "spec.containers", "at least one container"),
        ("spec/containers", {}, "spec.containers", "must be a list"),
        ("spec/activeDeadlineSeconds", 0, "spec.activeDeadlineSeconds", "positive"),
        ("metadata/uid", None, "metadata.uid", "not a valid name"),
        ("metadata/namespace", "Default", "metadata.namespace", "not a valid name"),
        ("metadata/annotations", {"slurm.hpk.io/flags": 3}, FLAGS_FIELD, "string"),
    ],
)
def test_pod_fields_hpk_cannot_honour_fail_the_pod(
    path: str, value: object, field: str, message: str
) -> None:
    error = refused(with_changes(BASE, path, value))
    assert (error.field, message in error.problem) == (field, True), error


@pytest.mark.parametrize(
    ("key", "value", "field", "message"),
    [
        ("envFrom", [{"configMapRef": {}}], "envFrom[0].configMapRef.name", "non-empty"),
        ("envFrom", [{"prefix": "A_"}], "envFrom[0]", "exactly one"),
        (
            "envFrom",
            [{"configMapRef": {"name": "c"}, "secretRef": {"name": "s"}}],
            "envFrom[0]",
            "one",
        ),
        ("env", [{"name": "A", "valueFrom": {}}], "env[0].valueFrom", "exactly one source"),
        (
            "env",
            [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}],
            "env[0].valueFrom.secretKeyRef.key",
            "non-empty",
        ),
        (
            "env",
            [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}],
            "env[0].valueFrom.fieldRef.fieldPath",
            "status.podIP",
        ),
        (
            "env",
            [{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}}],
            "env[0].valueFrom.resourceFieldRef.resource",
            "requests.memory",
        ),
        (
            "env",
            [
                {
                    "name": "A",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "0"}},
                }
            ],
            "env[0].valueFrom.resourceFieldRef.divisor",
            "positive",
        ),
        ("env", [{"name": "my.var", "value": "x"}], "env[0].name", "letters"),
        ("env", [{"name": "HOME", "value": "/x"}], "env[0].name", "HOME"),
        ("env", [{"name": "A", "value": 3}], "env[0].value", "string"),
        ("env", [{"name": "A", "value": "a\0b"}], "env[0].value", "NUL"),
        ("env", [{"name": "A", "value": "\ud800"}], "env[0].value", "Unicode"),
        ("args", ["ok", 5], "args[1]", "string"),
        ("command", "echo hi", "command", "must be a list"),
        ("livenessProbe", {"exec": {"command": []}}, "livenessProbe.exec.command", "non-empty"),
        ("startupProbe", {"grpc": {"port": 1}}, "startupProbe.grpc", "grpc probes"),
        ("readinessProbe", {}, "readinessProbe", "exactly one"),
        (
            "livenessProbe",
            {"tcpSocket": {"port": 80}, "successThreshold": 2},
            "livenessProbe.successThreshold",
            "must be 1",
        ),
        ("readinessProbe", {"httpGet": {"port": "web"}}, "readinessProbe.httpGet.port", "names"),
        ("readinessProbe", {"tcpSocket": {"port": 0}}, "readinessProbe.tcpSocket.port", "1-65535"),
        (
            "livenessProbe",
            {"httpGet": {"port": 80, "scheme": "FTP"}},
            "livenessProbe.httpGet.scheme",
            "neither",
        ),
        (
            "livenessProbe",
            {"tcpSocket": {"port": 80}, "periodSeconds": 0},
            "livenessProbe.periodSeconds",
            "at least 1",
        ),
        (
            "readinessProbe",
            {"tcpSocket": {"port": 80}, "terminationGracePeriodSeconds": 5},
            "readinessProbe.terminationGracePeriodSeconds",
            "only liveness",
        ),
        ("lifecycle", {"stopSignal": "SIGUSR1"}, "lifecycle.stopSignal", "yet"),
        ("restartPolicy", "Always", "restartPolicy", "only init containers"),
        ("restartPolicy", "Never", "restartPolicy", "only init containers"),
        ("stdin", "yes", "stdin", "true or false"),
        ("tty", 1, "tty", "true or false"),
        ("securityContext", {"runAsUser": -1}, "securityContext.runAsUser", "user or group"),
        ("securityContext", {"privileged": True}, "securityContext.privileged", "never"),
        (
            "securityContext",
            {"runAsNonRoot": True, "runAsUser": 0},
            "securityContext.runAsUser",
            "runAsNonRoot",
        ),
        ("securityContext", {"procMount": "Unmasked"}, "securityContext.procMount", "Default"),
        ("workingDir", "relative", "workingDir", "absolute"),
        ("image", "", "image", "must name an image"),
        ("image", "Bad/Image", "image", "lowercase"),
        ("name", "Main", "name", "not a valid name"),
        ("resources", {"requests": {"cpu": "x"}}, "resources.requests[cpu]", "quantity"),
    ],
)
def test_container_fields_hpk_cannot_honour_fail_the_pod(
    key: str, value: object, field: str, message: str
) -> None:
    error = refused(with_changes(BASE, f"spec/containers/0/{key}", value))
    assert (error.field, message in error.problem) == (f"spec.containers[0].{field}", True), error


def test_container_names_are_unique_across_init_and_main() -> None:
    error = refused(with_changes(BASE, "spec/containers/0/name", "first"))
    assert (error.field, error.problem) == ("spec", "two containers are named 'first'")


VOLUME_POD = pod(
    "v",
    busybox("main", volumeMounts=[{"name": "data", "mountPath": "/data"}]),
    volumes=[{"name": "data", "emptyDir": {}}],
)


@pytest.mark.parametrize(
    ("volume", "field", "message"),
    [
        ({"name": "data", "hostPath": {"path": "rel"}}, "hostPath.path", "absolute"),
        ({"name": "data", "projected": {"sources": [], "x": 1}}, "projected.x", "yet"),
        ({"name": "data", "downwardAPI": {"items": [], "x": 1}}, "downwardAPI.x", "yet"),
        ({"name": "data", "persistentVolumeClaim": {}}, "persistentVolumeClaim.claimName", "empty"),
        ({"name": "data"}, "(none)", "only emptyDir"),
        (
            {"name": "data", "configMap": {"name": "c"}, "emptyDir": {}},
            "emptyDir",
            "only emptyDir",
        ),
        ({"name": "data", "secret": {"secretName": "s", "x": 1}}, "secret.x", "yet"),
        ({"name": "data", "emptyDir": {"medium": "HugePages"}}, "emptyDir.medium", "supported"),
        ({"name": "data", "emptyDir": {"sizeLimit": "lots"}}, "emptyDir.sizeLimit", "quantity"),
    ],
)
def test_volumes_hpk_cannot_honour_fail_the_pod(
    volume: dict[str, object], field: str, message: str
) -> None:
    error = refused(with_changes(VOLUME_POD, "spec/volumes/0", volume))
    assert (error.field, message in error.problem) == (f"spec.volumes[0].{field}", True), error


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("name", "other", "not a volume"),
        ("mountPath", "data", "absolute"),
        ("mountPath", "/a:b", "separators"),
        ("mountPath", "/a,b", "separators"),
        ("mountPath", "/data ", "spaces"),
        ("subPath", "../up", "inside the volume"),
        ("subPath", "/abs", "inside the volume"),
        ("subPathExpr", "$(X)", "yet"),
        ("mountPropagation", "Bidirectional", "yet"),
    ],
)
def test_mounts_hpk_cannot_honour_fail_the_pod(key: str, value: object, message: str) -> None:
    error = refused(with_changes(VOLUME_POD, f"spec/containers/0/volumeMounts/0/{key}", value))
    field = f"spec.containers[0].volumeMounts[0].{key}"
    assert (error.field, message in error.problem) == (field, True), error


def test_bad_flags_annotation_fails_the_pod() -> None:
    bad = pod("x", busybox("main"), annotations={"slurm.hpk.io/flags": "--uid=0"})
    with pytest.raises(InvalidSbatchFlags, match="--uid is not allowed"):
        render_pod(bad, settings())


def test_a_node_list_naming_a_host_file_fails_the_pod() -> None:
    bad = pod("x", busybox("main"), annotations={"slurm.hpk.io/flags": "--nodelist=/etc/passwd"})
    with pytest.raises(InvalidSbatchFlags, match="as a file on the kubelet's host") as caught:
        render_pod(bad, settings())
    assert caught.value.field == FLAGS_FIELD
    assert caught.value.reason == "InvalidSbatchFlags"


def test_mail_flags_pass_only_with_the_setting() -> None:
    mail = pod("x", busybox("main"), annotations={"slurm.hpk.io/flags": "--mail-user=a@b.org"})
    with pytest.raises(InvalidSbatchFlags, match="--mail-user is not allowed"):
        render_pod(mail, settings())
    args = render_pod(mail, settings(allow_mail_flags=True)).sbatch_args
    assert "--mail-user=a@b.org" in args


def test_rendering_does_not_change_the_pod() -> None:
    before = copy.deepcopy(INIT_AND_TWO)
    render_pod(INIT_AND_TWO, settings())
    assert before == INIT_AND_TWO


def test_files_are_a_read_only_view() -> None:
    files: Mapping[str, str] = render_pod(ENV, settings()).files
    with pytest.raises(TypeError):
        files["env/other"] = "x"  # type: ignore[index]


def launch_words(rendered: RenderedPod) -> dict[str, list[str]]:
    """Each container's launcher options (the words between `kubelet_py.job.launch` and its
    folder), from the job script; without `--termination PATH` and `--attach`, which every one
    has."""
    found = {}
    for line in rendered.script.splitlines():
        if "-m kubelet_py.job.launch" in line:
            words = shlex.split(line.replace('"$containers"/', "").rstrip(" \\"))
            *options, folder, _dash = words[words.index("kubelet_py.job.launch") + 1 :]
            at = options.index("--termination")
            kept = options[2:at] + options[at + 2 :]  # after --image SIF
            found[folder] = [word for word in kept if word != "--attach"]
    return found


@pytest.mark.parametrize(
    ("policy", "init", "main"),
    [
        ("Never", [], []),
        ("OnFailure", ["--restart", "OnFailure"], ["--restart", "OnFailure"]),
        ("Always", ["--restart", "OnFailure"], ["--restart", "Always"]),
        (None, ["--restart", "OnFailure"], ["--restart", "Always"]),  # Always is the default
    ],
)
def test_the_pod_restart_policy_reaches_every_launcher(
    policy: str | None, init: list[str], main: list[str]
) -> None:
    the_pod = copy.deepcopy(BASE)
    if policy is None:
        del the_pod["spec"]["restartPolicy"]
    else:
        the_pod["spec"]["restartPolicy"] = policy
    # An init container is retried until it succeeds, unless the pod says Never.
    assert launch_words(render_pod(the_pod, settings())) == {"first": init, "main": main}


def test_a_sidecar_restarts_always_and_gets_the_grace_period() -> None:
    found = launch_words(render_pod(RESTARTS, settings()))
    assert found["proxy"] == ["--restart", "Always", "--grace", "5"]
    assert found["setup"] == ["--restart", "OnFailure"]
    without_grace = with_changes(RESTARTS, "spec/restartPolicy", "Never")
    del without_grace["spec"]["terminationGracePeriodSeconds"]
    found = launch_words(render_pod(without_grace, settings()))
    assert found["proxy"] == ["--restart", "Always", "--grace", "30"]
    assert found["setup"] == [] and found["main"] == []


@pytest.mark.parametrize("grace", [-1, "30", True, 1.5])
def test_a_sidecar_needs_a_grace_period_in_seconds(grace: object) -> None:
    error = refused(with_changes(RESTARTS, "spec/terminationGracePeriodSeconds", grace))
    assert error.field == "spec.terminationGracePeriodSeconds"


# The job script run for real by bash, with the real launcher, and an "apptainer" that runs
# the words after the SIF file: the order in which sidecars and containers start and stop.
FAKE_APPTAINER = """#!/bin/bash
while [[ $# -gt 0 && $1 != *.sif ]]; do shift; done
shift
exec "$@"
"""


def run_job(tmp_path: Path, the_pod: Pod) -> tuple[subprocess.CompletedProcess[str], Path]:
    job = start_job(tmp_path, the_pod)
    try:
        stdout, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    result = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    return result, tmp_path / "pod" / "containers"


def start_job(tmp_path: Path, the_pod: Pod) -> subprocess.Popen[str]:
    """The pod's job script running under bash, with an `apptainer` that runs the command
    after the image on the host."""
    apptainer = tmp_path / "apptainer"
    apptainer.write_text(FAKE_APPTAINER)
    apptainer.chmod(0o755)
    sif = tmp_path / "busybox.sif"
    sif.write_bytes(b"")
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    rendered = render_pod(
        the_pod,
        settings(
            pod_dir=PurePosixPath(pod_dir),
            apptainer=PurePosixPath(apptainer),
            python=PurePosixPath(sys.executable),
            images={"busybox": PurePosixPath(sif)},
        ),
    )
    (pod_dir / "job.sh").write_text(rendered.script)
    for path, text in rendered.files.items():
        (pod_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (pod_dir / path).write_text(text)
    return subprocess.Popen(
        ["bash", str(pod_dir / "job.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def marker_time(containers: Path, name: str, marker: str) -> str:
    return (containers / name / marker).read_text().split()[-1]


def shell(name: str, script: str, **fields: Any) -> Pod:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def test_a_sidecar_starts_before_the_next_container_and_stops_after_the_last(
    tmp_path: Path,
) -> None:
    the_pod = pod(
        "sidecar",
        shell("main", "sleep 0.5; echo main"),
        initContainers=[
            shell(
                "proxy",
                "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done",
                restartPolicy="Always",
            ),
            shell("after", "true"),
        ],
    )
    result, containers = run_job(tmp_path, the_pod)
    assert result.returncode == 0, result.stderr
    assert marker_time(containers, "proxy", "started") < marker_time(containers, "after", "started")
    assert marker_time(containers, "main", "exit") < marker_time(containers, "proxy", "exit")
    assert (containers / "proxy" / "exit").read_text().startswith("0 ")
    log = (containers / "proxy" / "log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in log] == ["up", "bye"]


def test_a_sidecar_that_ignores_term_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    the_pod = pod(
        "stubborn",
        shell("main", "exit 3"),
        initContainers=[
            shell("proxy", "trap '' TERM; while :; do sleep 0.05; done", restartPolicy="Always")
        ],
        terminationGracePeriodSeconds=1,
    )
    result, containers = run_job(tmp_path, the_pod)
    assert result.returncode == 3, result.stderr  # main's code, not the sidecar's
    assert (containers / "proxy" / "exit").read_text().startswith("137 ")


def exec_hook(script: str) -> dict[str, Any]:
    return {"exec": {"command": ["sh", "-c", script]}}


def test_a_post_start_hook_holds_the_next_container_back_until_it_has_passed(
    tmp_path: Path,
) -> None:
    hooked = tmp_path / "hooked"
    the_pod = pod(
        "held",
        shell(
            "first",
            "sleep 1",
            lifecycle={
                "postStart": {"exec": {"command": ["sh", "-c", f"sleep 0.5; touch {hooked}"]}}
            },
        ),
        shell("second", f"test -e {hooked}"),
    )
    result, containers = run_job(tmp_path, the_pod)
    assert result.returncode == 0, "the second container started before the first's hook passed"
    assert marker_time(containers, "first", "started") < marker_time(
        containers, "second", "started"
    )


def test_term_to_the_job_script_runs_the_pre_stop_hook_before_the_container_gets_it(
    tmp_path: Path,
) -> None:
    drained = tmp_path / "drained"
    the_pod = pod(
        "deleted",
        shell(
            "main",
            f"trap 'test -e {drained} && exit 0; exit 1' TERM; while :; do sleep 0.05; done",
            lifecycle={
                "preStop": {"exec": {"command": ["sh", "-c", f"sleep 0.5; touch {drained}"]}}
            },
        ),
        terminationGracePeriodSeconds=10,
    )
    job = start_job(tmp_path, the_pod)
    started = tmp_path / "pod" / "containers" / "main" / "started"
    deadline = time.monotonic() + 20
    while not started.exists():
        assert time.monotonic() < deadline and job.poll() is None, "the container did not start"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what `scancel --batch --signal=TERM` does
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 143, stderr
    main = tmp_path / "pod" / "containers" / "main"
    assert (main / "exit").read_text().startswith("0 "), "TERM came before the hook had ended"


def test_probes_go_to_a_probes_file_with_defaults_and_named_ports_resolved() -> None:
    main = busybox(
        "main",
        command=["httpd"],
        ports=[{"name": "metrics", "containerPort": 6060}],
        livenessProbe={
            "httpGet": {
                "port": "metrics",
                "path": "/healthz",
                "httpHeaders": [{"name": "A", "value": "b"}],
            },
            "terminationGracePeriodSeconds": 5,
        },
        readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 2},
    )
    rendered = render_pod(pod("probed", main, terminationGracePeriodSeconds=12), settings("probed"))
    probes = json.loads(rendered.files["probes/main"])
    assert probes == {
        "grace": 12,
        "liveness": {
            "kind": "httpGet",
            "host": "127.0.0.1",
            "port": 6060,
            "path": "/healthz",
            "scheme": "HTTP",
            "headers": [["A", "b"]],
            "initialDelaySeconds": 0,
            "periodSeconds": 10,
            "timeoutSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 3,
            "grace": 5,
        },
        "readiness": {
            "kind": "tcpSocket",
            "host": "127.0.0.1",
            "port": 8080,
            "initialDelaySeconds": 0,
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "successThreshold": 1,
            "failureThreshold": 3,
        },
    }
    assert "--probes /home/alice/.hpk/pods/default/probed/probes/main " in rendered.script
    plain = render_pod(pod("plain", busybox("main", command=["true"])), settings("plain"))
    assert "--probes" not in plain.script and not any(f.startswith("probes/") for f in plain.files)


def test_probes_on_an_init_container_are_refused_unless_it_is_a_sidecar() -> None:
    probe = {"tcpSocket": {"port": 80}}
    error = refused(with_changes(BASE, "spec/initContainers/0/readinessProbe", probe))
    assert error.field == "spec.initContainers[0].readinessProbe", error
    sidecar = with_changes(BASE, "spec/initContainers/0/restartPolicy", "Always")
    rendered = render_pod(
        with_changes(sidecar, "spec/initContainers/0/startupProbe", probe), settings()
    )
    assert "probes/first" in rendered.files


def test_an_exec_probe_keeps_its_command() -> None:
    main = busybox("main", command=["true"], readinessProbe={"exec": {"command": ["cat", "/ok"]}})
    rendered = render_pod(pod("x", main), settings())
    probe = json.loads(rendered.files["probes/main"])["readiness"]
    assert (probe["kind"], probe["command"]) == ("exec", ["cat", "/ok"])


def test_a_containers_input_fields_reach_its_launcher_and_a_terminal_has_term() -> None:
    the_pod = pod(
        "console",
        busybox("shell", command=["sh"], stdin=True, stdinOnce=True, tty=True),
        busybox("quiet", command=["sleep", "1"]),
    )
    rendered = render_pod(the_pod, settings())
    found = launch_words(rendered)
    assert found["shell"] == ["--stdin", "--stdin-once", "--tty"]
    assert found["quiet"] == []
    assert "TERM=xterm" in rendered.files["env/shell"]
    assert "TERM" not in rendered.files.get("env/quiet", "")
    # Every container the job script starts can be attached to.
    launcher_lines = [line for line in rendered.script.splitlines() if "job.launch" in line]
    assert len(launcher_lines) == 2 and all("--attach" in line for line in launcher_lines)


def test_an_srun_started_container_has_no_input() -> None:
    the_pod = pod("mpi", busybox("main", command=["hostname"], tty=True))
    the_pod["metadata"]["annotations"] = {"slurm.hpk.io/launcher": "srun"}
    error = refused(the_pod)
    assert error.field == "spec.containers[0].tty"
    assert "every task" in str(error)
