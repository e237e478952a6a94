"""`kubectl exec`, `attach`, `cp` and `port-forward`, end to end, as an ordinary user.

The kubelet API's front (`hpk-kubelet-api`) serves the streams; each exec and attach reaches
the container through `srun --jobid=<the pod's job> --overlap` on the job's node, and each
port-forward reaches the pod's address through the pod network hub's relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import shlex
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hpk.testbed.images import ensure_test_images
from hpk.toolchain import Toolchain
from tests.e2e.conftest import UserInstall
from tests.e2e.kube import eventually
from tests.e2e.user_cluster import UserCluster, user_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

NAMESPACE = "streams"
# busybox httpd answering with the pod's name on :8080.
SERVE = (
    'mkdir -p /tmp/www && echo "hello from $HOSTNAME" >/tmp/www/index.html && '
    "exec httpd -f -p 8080 -h /tmp/www"
)


@pytest.fixture(scope="module")
def cluster(user_install: UserInstall) -> Iterator[UserCluster]:
    with user_cluster(user_install, folder=".hpk-streams", namespace=NAMESPACE) as running:
        yield running
        running.kubectl("delete", "pods", "--all", "-n", NAMESPACE, "--timeout=120s")


def container(name: str, script: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **fields}


def pod(name: str, *containers: dict[str, Any], node: str = "n1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": name},
            "annotations": {"slurm.hpk.io/flags": f"--nodelist={node}"},
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": list(containers),
            **spec,
        },
    }


def running(cluster: UserCluster, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        found = cluster.pod(name)
        statuses = found["status"].get("containerStatuses") or []
        up = statuses and all(status.get("state", {}).get("running") for status in statuses)
        return found if found["status"].get("phase") == "Running" and up else None

    return dict(eventually(f"{name} running", ready, timeout=180))


def kubectl(
    cluster: UserCluster, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    kubectl = str(Toolchain.load().binary("kubectl"))
    return cluster.run(kubectl, "-n", NAMESPACE, *args, stdin=stdin)


def steps(job_id: str) -> list[str]:
    """The job's steps as sacct lists them (JobID.JobName)."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,JobName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line]


@pytest.fixture(scope="module")
def shell(cluster: UserCluster) -> dict[str, Any]:
    """A pod with a volume, a variable, a web server beside a main container on one localhost."""
    cluster.create(
        pod(
            "shell",
            container(
                "main",
                "echo from-the-volume >/data/file; exec sleep 3600",
                env=[{"name": "GREETING", "value": "hello there"}],
                volumeMounts=[{"name": "data", "mountPath": "/data"}],
                workingDir="/data",
            ),
            container("web", SERVE),
            volumes=[{"name": "data", "emptyDir": {}}],
        )
    )
    return running(cluster, "shell")


def test_exec_prints_and_exits_with_the_commands_code(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    done = kubectl(cluster, "exec", "shell", "--", "sh", "-c", "echo $((6*7)); exit 3")
    assert done.stdout == "42\n", done.stderr
    assert done.returncode == 3, done.stderr
    # It ran in a step of the pod's own job, on its node.
    job_id = shell["metadata"]["annotations"]["slurm.hpk.io/job-id"]
    assert any(line.endswith("|exec") for line in steps(job_id)), steps(job_id)


def test_exec_runs_in_the_containers_environment_files_and_network(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    script = "echo $GREETING; pwd; cat /data/file; hostname; wget -q -O - http://127.0.0.1:8080/"
    done = kubectl(cluster, "exec", "shell", "-c", "main", "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "hello there",
        "/data",
        "from-the-volume",
        "shell",
        "hello from shell",
    ]
    # The container's own processes: its PID namespace, not the node's.
    ps = kubectl(cluster, "exec", "shell", "-c", "web", "--", "ps", "-o", "comm")
    assert "httpd" in ps.stdout and "sleep" not in ps.stdout, ps.stdout


def test_exec_passes_input_and_a_terminal_of_the_clients_size(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    done = kubectl(
        cluster,
        "exec",
        "-i",
        "shell",
        "--",
        "sh",
        "-c",
        "tr a-z A-Z; echo end",
        stdin="quiet words\n",
    )
    assert done.stdout == "QUIET WORDS\nend\n", done.stderr
    # A terminal: `script` gives kubectl one, of 37 rows and 111 columns (and, fed by a pipe
    # that stays open, types nothing).
    kubectl_path = Toolchain.load().binary("kubectl")
    check = "stty size; [ -t 0 ] && [ -t 1 ] && echo on-a-terminal; echo $TERM"
    exec_it = f"{kubectl_path} -n {NAMESPACE} exec -it shell -c main -- sh -c"
    inner = f"stty rows 37 cols 111; {exec_it} {shlex.quote(check)}"
    done = cluster.run("sh", "-c", f"sleep 5 | script -q -e -c {shlex.quote(inner)} /dev/null")
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    assert lines[:3] == ["37 111", "on-a-terminal", "xterm"], done.stdout + done.stderr


def test_exec_follows_the_terminal_when_it_is_resized(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    """kubectl on a terminal of ours: resized while the shell runs, the shell sees it."""
    kubectl_path = str(Toolchain.load().binary("kubectl"))
    env = cluster.install.env(HPK_HOME=str(cluster.home), KUBECONFIG=str(cluster.kubeconfig))
    argv = ["runuser", "-u", cluster.install.user.pw_name, "--", "env", "-i"]
    argv += [f"{key}={value}" for key, value in env.items()]
    argv += [kubectl_path, "-n", NAMESPACE, "exec", "-it", "shell", "-c", "main", "--", "sh"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: kubectl on the terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.execvp(argv[0], argv)  # noqa: S606 (no shell)
    seen = b""

    def read_until(text: bytes, timeout: float = 60) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            if time.monotonic() > deadline:
                return False
            readable, _, _ = select.select([terminal], [], [], 1)
            if readable:
                seen += os.read(terminal, 4096)
        return True

    try:
        os.write(terminal, b"echo size=$(stty size)\n")
        assert read_until(b"size=24 80"), seen
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        # The new size travels as a message of its own: asked until it has arrived.
        for _ in range(10):
            os.write(terminal, b"echo size=$(stty size)\n")
            if read_until(b"size=50 132", timeout=3):
                break
        assert b"size=50 132" in seen, seen
        os.write(terminal, b"exit 4\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 4
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(terminal)


def test_exec_refuses_what_it_cannot_reach_with_a_clear_message(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    done = kubectl(cluster, "exec", "shell", "-c", "nosuch", "--", "true")
    assert done.returncode != 0
    assert "container nosuch is not valid for pod shell" in done.stderr, done.stderr
    done = kubectl(cluster, "exec", "shell", "--", "no-such-program")
    assert done.returncode in (126, 127), (done.returncode, done.stderr)


def test_cp_copies_both_ways(cluster: UserCluster, shell: dict[str, Any], tmp_path: Path) -> None:
    home = Path(cluster.install.user.pw_dir)
    local = home / "cp-source.txt"
    cluster.run("sh", "-c", f"seq 1 20000 > {local}")
    done = kubectl(cluster, "cp", str(local), "shell:/data/copied.txt", "-c", "main")
    assert done.returncode == 0, done.stderr
    back = home / "cp-back.txt"
    done = kubectl(cluster, "cp", "shell:/data/copied.txt", str(back), "-c", "main")
    assert done.returncode == 0, done.stderr
    assert back.read_text() == local.read_text()
    inside = kubectl(cluster, "exec", "shell", "--", "wc", "-l", "/data/copied.txt")
    assert inside.stdout.split()[0] == "20000", inside.stdout


@contextmanager
def port_forward(cluster: UserCluster, target: str, ports: str) -> Iterator[int]:
    """`kubectl port-forward` as the user, on a local port it picks; that port."""
    kubectl_path = str(Toolchain.load().binary("kubectl"))
    env = cluster.install.env(HPK_HOME=str(cluster.home), KUBECONFIG=str(cluster.kubeconfig))
    argv = ["runuser", "-u", cluster.install.user.pw_name, "--", "env", "-i"]
    argv += [f"{key}={value}" for key, value in env.items()]
    argv += [kubectl_path, "-n", NAMESPACE, "port-forward", target, f":{ports}"]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            line = process.stdout.readline()  # Forwarding from 127.0.0.1:PORT -> 8080
            said = "" if process.poll() is None else process.stderr.read()
            assert "Forwarding from 127.0.0.1:" in line, line + said
            yield int(line.split("127.0.0.1:")[1].split()[0])
        finally:
            process.terminate()
            process.wait(timeout=10)


def http_get(port: int, path: str = "/") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while data := connection.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_port_forward_reaches_a_pod_and_a_service_with_several_connections(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    with port_forward(cluster, "pod/shell", "8080") as port:
        answers: list[str] = []

        def get() -> None:
            answers.append(http_get(port))

        threads = [threading.Thread(target=get) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(answers) == 5 and all("hello from shell" in a for a in answers), answers
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "shell"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    cluster.create(service)
    with port_forward(cluster, "svc/web", "80") as port:
        assert "hello from shell" in http_get(port)


def test_port_forward_carries_a_long_lived_stream(cluster: UserCluster) -> None:
    # An echo server: every line sent comes back, for as long as the connection lasts.
    cluster.create(pod("echo", container("main", "exec nc -ll -p 7000 -e cat")))
    running(cluster, "echo")
    with (
        port_forward(cluster, "pod/echo", "7000") as port,
        socket.create_connection(("127.0.0.1", port), timeout=20) as connection,
    ):
        reader = connection.makefile("rb")
        for number in range(12):
            connection.sendall(f"line {number}\n".encode())
            assert reader.readline() == f"line {number}\n".encode()
            time.sleep(1)


def test_attach_follows_output_and_feeds_a_stdin_container(cluster: UserCluster) -> None:
    reader = container(
        "main",
        'while read -r line; do echo "got $line"; done; echo bye',
        stdin=True,
        stdinOnce=True,
    )
    cluster.create(pod("listener", reader))
    found = running(cluster, "listener")
    done = kubectl(cluster, "attach", "-i", "listener", stdin="one\ntwo\n")
    assert "got one\ngot two\n" in done.stdout, (done.stdout, done.stderr)
    # stdinOnce: the input closed with the first attach, so the loop ended.
    ended = cluster.ended("listener")
    assert ended["status"]["phase"] == "Succeeded", ended["status"]
    assert cluster.logs("listener").splitlines() == ["got one", "got two", "bye"]
    job_id = found["metadata"]["annotations"]["slurm.hpk.io/job-id"]
    assert any(line.endswith("|attach") for line in steps(job_id)), steps(job_id)


def test_a_tty_container_answers_on_its_terminal(cluster: UserCluster) -> None:
    cluster.create(pod("console", container("main", "exec sh -i", stdin=True, tty=True)))
    running(cluster, "console")
    kubectl_path = Toolchain.load().binary("kubectl")
    inner = f"{kubectl_path} -n {NAMESPACE} attach -i -t console"
    # `script` gives kubectl a terminal; what the pipe types reaches the container's shell.
    typed = "sleep 3; echo 'echo TERM=$TERM; [ -t 0 ] && echo on-a-terminal; exit 5'; sleep 5"
    done = cluster.run("sh", "-c", f"({typed}) | script -q -e -c {shlex.quote(inner)} /dev/null")
    out = done.stdout.replace("\r", "")
    assert "TERM=xterm\non-a-terminal\n" in out, (out, done.stderr)
    ended = cluster.ended("console")
    terminated = ended["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 5, terminated


def test_the_api_refuses_other_identities(cluster: UserCluster, shell: dict[str, Any]) -> None:
    """The front keeps the kubelet API's rule: the API server and system:masters only."""
    node = shell["spec"]["nodeName"]
    found = json.loads(cluster.kubectl("get", "node", node, "-o", "json"))
    address = next(a["address"] for a in found["status"]["addresses"] if a["type"] == "InternalIP")
    port = found["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    # Without a client certificate the TLS handshake fails.
    done = subprocess.run(
        [
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"https://{address}:{port}/exec/streams/shell/main?command=id&output=1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout in ("000", ""), shlex.join(done.args) + done.stdout


def test_jupyterlab_in_a_pod_answers_through_port_forward(cluster: UserCluster) -> None:
    """The interactive case: a notebook server on a compute node, reached from the login node."""
    reference = "hpk.test/jupyterlab:4.6.6"
    imported = cluster.run(
        "hpk", "images", "import", reference, str(ensure_test_images()[reference])
    )
    assert imported.returncode == 0, imported.stderr
    notebook = {
        "name": "lab",
        "image": reference,
        "args": ["--ip=0.0.0.0", "--port=8888", "--no-browser", "--IdentityProvider.token=s3cret"],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
        "readinessProbe": {"tcpSocket": {"port": 8888}, "periodSeconds": 2},
    }
    cluster.create(pod("jupyter", notebook, node="n2"))
    eventually(
        "jupyter ready",
        lambda: all(
            s.get("ready")
            for s in cluster.pod("jupyter")["status"].get("containerStatuses") or [{}]
        ),
        timeout=240,
    )
    with port_forward(cluster, "pod/jupyter", "8888") as port:
        answer = http_get(port, "/api?token=s3cret")
    status_line, _, body = answer.partition("\r\n\r\n")
    assert status_line.startswith("HTTP/1.1 200"), answer[:500]
    assert json.loads(body)["version"], body


def test_the_python_client_execs_over_websocket(
    cluster: UserCluster, shell: dict[str, Any]
) -> None:
    """The official Python client speaks WebSocket (v4.channel.k8s.io) to the API server."""
    from kubernetes import client, config  # noqa: PLC0415 (only this test needs it)
    from kubernetes.stream import stream  # noqa: PLC0415

    # The client and its socket are closed here. After the server's close frame the
    # WebSocket counts as closed, and its close() then leaves the socket open.
    with config.new_client_from_config(str(cluster.kubeconfig)) as api_client:
        connection = stream(
            client.CoreV1Api(api_client).connect_get_namespaced_pod_exec,
            "shell",
            NAMESPACE,
            container="main",
            command=["sh", "-c", "echo $GREETING; cat /data/file"],
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        try:
            connection.run_forever(timeout=60)
            code = connection.returncode  # read from the error channel, before read_all
            answer = connection.read_all()
        finally:
            connection.close()
            connection.sock.shutdown()
    assert code == 0, answer
    assert answer == "hello there\nfrom-the-volume\n"
