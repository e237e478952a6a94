"""The token manager with a fake TokenRequest API (the one seam) and a fake clock: what it asks
the API server for, the files it writes, when it issues again and when it stops; and the
provider writing a pod's token before submission and keeping it fresh."""

from __future__ import annotations

import datetime as dt
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kubelet_py.adapters.apiserver import ApiUnavailable, NotFound
from kubelet_py.errors import MissingReference
from kubelet_py.loops.tokens import TokenManager, TokenSettings, token_request, write_atomically
from kubelet_py.main import parse_args, service_endpoint
from kubelet_py.pod.projected import TokenSource
from kubelet_py.provider import JOB_ID_ANNOTATION
from tests.unit.fakes import ACCESS_MOUNT, ACCESS_VOLUME, OBJECTS, Bed

START = 1_800_000_000.0
UID = "0b6c5c1e-0000-4000-8000-000000000001"


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class FakeTokenApi:
    """The TokenApi seam: answers TokenRequests with numbered tokens, or fails as told."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.requests: list[tuple[str, str, Mapping[str, Any]]] = []
        self.failure: Exception | None = None

    def request_token(
        self, *, namespace: str, service_account: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        self.requests.append((namespace, service_account, body))
        expiry = self.clock.now + body["spec"]["expirationSeconds"]
        stamp = dt.datetime.fromtimestamp(expiry, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "status": {"token": f"token-{len(self.requests)}", "expirationTimestamp": stamp},
            "spec": body["spec"],
        }


def source(path: str = "token", *, expiration_s: int = 600, audience: str = "") -> TokenSource:
    return TokenSource(
        volume="tok", path=path, audience=audience, expiration_s=expiration_s, mode=0o600
    )


def make_pod(name: str = "web", uid: str = UID) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "uid": uid},
        "spec": {"serviceAccountName": "builder"},
    }


class Tokens:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.clock = FakeClock()
        self.api = FakeTokenApi(self.clock)
        self.running = True
        self.manager = TokenManager(
            self.api,
            settings=TokenSettings(**settings),
            clock=self.clock,
            alive=lambda _key, _uid: self.running,
        )
        self.folder = root / "pod"
        (self.folder / "volumes" / "tok").mkdir(parents=True, mode=0o700)

    def file(self, path: str = "token") -> Path:
        return self.folder / "volumes" / "tok" / path

    def start(self, *sources: TokenSource) -> None:
        """Issue the pod's tokens, write them as the provider does, and track them."""
        issued = self.manager.issue(make_pod(), sources or (source(),))
        for each, token in issued.items():
            write_atomically(self.file(each.path), token.token, each.mode)
        self.manager.track(make_pod(), self.folder, issued)


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens(tmp_path, idle_s=10_000.0)


def test_the_request_binds_the_token_to_the_pod(tokens: Tokens) -> None:
    issued = tokens.manager.issue(make_pod(), [source(audience="vault", expiration_s=900)])
    namespace, account, body = tokens.api.requests[0]
    assert (namespace, account) == ("team", "builder")
    assert body == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["vault"],
            "expirationSeconds": 900,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": UID},
        },
    }
    token = next(iter(issued.values()))
    assert (token.token, token.issued_at, token.expires_at) == (b"token-1", START, START + 900)
    assert (
        token_request(name="p", uid="u", audience="", expiration_s=600)["spec"]["audiences"] == []
    )


def test_sources_of_one_audience_and_lifetime_share_one_request(tokens: Tokens) -> None:
    issued = tokens.manager.issue(
        make_pod(), [source("a"), source("b"), source("c", audience="other")]
    )
    assert len(tokens.api.requests) == 2
    assert issued[source("a")] == issued[source("b")] != issued[source("c", audience="other")]


def test_a_pod_without_service_account_uses_default(tokens: Tokens) -> None:
    pod = make_pod()
    del pod["spec"]["serviceAccountName"]
    tokens.manager.issue(pod, [source()])
    assert tokens.api.requests[0][1] == "default"


def test_a_missing_service_account_keeps_the_pod_waiting(tokens: Tokens) -> None:
    tokens.api.failure = NotFound(404, 'serviceaccounts "builder" not found')
    with pytest.raises(MissingReference) as raised:
        tokens.manager.issue(make_pod(), [source()])
    assert str(raised.value) == 'spec.serviceAccountName: ServiceAccount "team/builder" not found'


def test_a_token_is_issued_again_when_80_percent_of_its_life_has_passed(tokens: Tokens) -> None:
    tokens.start()
    first = tokens.file().stat()
    assert tokens.manager.refresh_due() == 480.0
    tokens.clock.now = START + 479
    assert tokens.manager.refresh_due() == 1.0
    assert len(tokens.api.requests) == 1
    tokens.clock.now = START + 480
    assert tokens.manager.refresh_due() == 480.0  # the new token's own 80%
    assert len(tokens.api.requests) == 2
    assert tokens.file().read_bytes() == b"token-2"
    after = tokens.file().stat()
    assert after.st_ino != first.st_ino  # a new file renamed over the old one
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert sorted(os.listdir(tokens.file().parent)) == ["token"]  # no temporary left


def test_the_refresh_fraction_is_a_setting(tmp_path: Path) -> None:
    tokens = Tokens(tmp_path, refresh_fraction=0.02)
    tokens.start()
    assert tokens.manager.refresh_due() == pytest.approx(12.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        TokenSettings(refresh_fraction=1.0)


def test_a_long_lived_token_is_issued_again_after_a_day(tokens: Tokens) -> None:
    tokens.start(source(expiration_s=7 * 24 * 3600))
    tokens.clock.now = START + 24 * 3600
    tokens.manager.refresh_due()
    assert len(tokens.api.requests) == 2


def test_refreshing_stops_when_the_pod_no_longer_runs(tokens: Tokens) -> None:
    tokens.start()
    tokens.running = False
    tokens.clock.now = START + 500
    tokens.manager.refresh_due()
    assert len(tokens.api.requests) == 1
    assert tokens.manager.tracked() == []
    assert tokens.file().read_bytes() == b"token-1"


def test_refreshing_stops_when_the_provider_forgets_the_pod(tokens: Tokens) -> None:
    tokens.start()
    tokens.manager.forget("team/web", "another-uid")  # another pod of that name: kept
    assert tokens.manager.tracked() == ["team/web"]
    tokens.manager.forget("team/web", UID)
    tokens.clock.now = START + 500
    assert tokens.manager.refresh_due() == 10_000.0  # nothing due: the longest sleep
    assert len(tokens.api.requests) == 1


def test_refreshing_stops_when_the_api_server_no_longer_knows_the_pod(tokens: Tokens) -> None:
    tokens.start()
    tokens.api.failure = NotFound(404, 'pods "web" not found')
    tokens.clock.now = START + 500
    tokens.manager.refresh_due()
    assert tokens.manager.tracked() == []


def test_a_failed_refresh_is_tried_again_soon(tokens: Tokens) -> None:
    tokens.start()
    tokens.api.failure = ApiUnavailable("connection refused")
    tokens.clock.now = START + 500
    assert tokens.manager.refresh_due() == 10.0
    assert tokens.file().read_bytes() == b"token-1"
    tokens.api.failure = None
    tokens.clock.now = START + 510
    tokens.manager.refresh_due()
    assert tokens.file().read_bytes() == b"token-2"


def test_a_pod_folder_that_is_gone_stops_the_refresh(tokens: Tokens) -> None:
    tokens.start()
    tokens.file().unlink()
    tokens.file().parent.rmdir()
    tokens.clock.now = START + 500
    tokens.manager.refresh_due()
    assert tokens.manager.tracked() == []


def test_an_adopted_pods_tokens_are_due_by_the_files_age(tokens: Tokens) -> None:
    tokens.file().write_bytes(b"old")
    os.utime(tokens.file(), (START - 100, START - 100))
    tokens.manager.adopt(make_pod(), tokens.folder, [source(), source("missing")])
    tokens.manager.refresh_due()  # the missing file is issued at once
    assert tokens.file("missing").read_bytes() == b"token-1"
    assert tokens.file().read_bytes() == b"old"
    tokens.clock.now = START + 380
    tokens.manager.refresh_due()
    assert tokens.file().read_bytes() == b"token-2"


def test_the_thread_wakes_for_a_new_pod_and_stops(tokens: Tokens) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=tokens.manager.run, args=(stop,))
    thread.start()
    tokens.manager.adopt(make_pod(), tokens.folder, [source()])  # no file: due at once
    for _ in range(200):
        if tokens.api.requests:
            break
        threading.Event().wait(0.01)
    stop.set()
    tokens.manager.wake()
    thread.join(5)
    assert not thread.is_alive()
    assert tokens.file().read_bytes() == b"token-1"


class FakeEvents:
    """The EventSink seam: the Events recorded, as (pod name, reason, message)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    def record(self, pod: Mapping[str, Any], *, kind: str, reason: str, message: str) -> None:
        assert kind == "Warning"
        self.recorded.append((pod["metadata"]["name"], reason, message))


def two_pods(tmp_path: Path, events: FakeEvents) -> tuple[TokenManager, FakeClock, Path, Path]:
    """A manager keeping the tokens of pods `bad` and `good` fresh; their token files."""
    clock = FakeClock()
    manager = TokenManager(FakeTokenApi(clock), clock=clock, events=events)
    files = []
    for name in ("bad", "good"):
        folder = tmp_path / name
        (folder / "volumes" / "tok").mkdir(parents=True)
        pod = make_pod(name, uid=f"uid-{name}")
        issued = manager.issue(pod, [source()])
        write_atomically(folder / "volumes" / "tok" / "token", b"first", 0o600)
        manager.track(pod, folder, issued)
        files.append(folder / "volumes" / "tok" / "token")
    return manager, clock, files[0], files[1]


def test_a_token_file_replaced_by_a_folder_spoils_only_its_own_pods_refresh(
    tmp_path: Path,
) -> None:
    events = FakeEvents()
    manager, clock, bad, good = two_pods(tmp_path, events)
    bad.unlink()
    bad.mkdir()
    clock.now = START + 500
    manager.refresh_due()
    assert good.read_bytes().startswith(b"token-"), "the other pod's token was not refreshed"
    assert bad.is_dir()
    assert manager.tracked() == ["team/bad", "team/good"]
    assert events.recorded == [
        ("bad", "TokenRefreshFailed", "cannot write token tok/token: Is a directory")
    ]
    refreshed = good.read_bytes()
    clock.now = START + 1000  # tried again after retry_s, and the good pod's second refresh
    manager.refresh_due()
    assert good.read_bytes() not in (b"first", refreshed)
    assert len(events.recorded) == 1, "a repeated failure is reported once"
    bad.rmdir()  # the pod mended its folder: the refresh works, a new failure is reported
    clock.now = START + 1020
    manager.refresh_due()
    assert bad.read_bytes().startswith(b"token-")
    bad.unlink()
    bad.mkdir()
    clock.now = START + 2000
    manager.refresh_due()
    assert len(events.recorded) == 2


def test_a_token_is_never_written_through_a_link(tmp_path: Path) -> None:
    events = FakeEvents()
    manager, clock, bad, good = two_pods(tmp_path, events)
    key = tmp_path / "ca.key"
    key.write_text("KEY")
    (bad.parent.parent / "elsewhere").mkdir()
    bad.parent.rename(bad.parent.parent / "elsewhere" / "tok")
    bad.parent.symlink_to(key.parent)  # volumes/tok -> the folder of the key
    clock.now = START + 500
    manager.refresh_due()
    assert key.read_text() == "KEY"
    assert not (key.parent / "token").exists()
    assert good.read_bytes().startswith(b"token-")
    assert [reason for _, reason, _ in events.recorded] == ["TokenRefreshFailed"]
    assert "symbolic link" in events.recorded[0][2]


def test_an_unexpected_error_for_one_pod_spares_the_others(tmp_path: Path) -> None:
    events = FakeEvents()
    manager, clock, _bad, good = two_pods(tmp_path, events)

    def alive(key: str, _uid: str) -> bool:
        if key == "team/bad":
            raise RuntimeError("surprise")
        return True

    manager.alive = alive
    clock.now = START + 500
    manager.refresh_due()
    assert good.read_bytes().startswith(b"token-")
    assert events.recorded == [("bad", "TokenRefreshFailed", "RuntimeError: surprise")]


# -- the provider -------------------------------------------------------------------------


def test_the_provider_writes_the_token_before_submitting_and_keeps_it_fresh(
    tmp_path: Path,
) -> None:
    bed = Bed(tmp_path)
    clock = FakeClock()
    api = FakeTokenApi(clock)
    manager = TokenManager(api, clock=clock, alive=bed.provider.runs)
    bed.provider.tokens = manager
    bed.provider.lookup = lambda kind, _namespace, name: OBJECTS.get((kind, name))
    pod: dict[str, Any] = {
        "metadata": {"name": "web", "namespace": "default", "uid": UID},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "default",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["true"],
                    "volumeMounts": [ACCESS_MOUNT],
                }
            ],
            "volumes": [ACCESS_VOLUME],
        },
    }
    job_id = bed.provider.create_pod(pod)
    volume = bed.folder() / "volumes" / "kube-api-access-x1y2z"
    assert (volume / "token").read_bytes() == b"token-1"
    assert stat.S_IMODE((volume / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700
    assert (volume / "namespace").read_bytes() == b"default"
    assert (volume / "ca.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    script = (bed.folder() / "job.sh").read_text()
    assert "token-1" not in script
    assert api.requests[0][2]["spec"]["boundObjectRef"]["uid"] == UID
    assert manager.tracked() == ["default/web"]
    assert bed.provider.runs("default/web", UID)
    bed.watcher.registered[job_id] = "default/web"
    clock.now = START + 0.8 * 3607
    manager.refresh_due()
    assert (volume / "token").read_bytes() == b"token-2"
    bed.provider.forget(pod)
    assert manager.tracked() == []


def test_a_restarted_kubelet_keeps_an_adopted_pods_tokens_fresh(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    clock = FakeClock()
    api = FakeTokenApi(clock)
    manager = TokenManager(api, clock=clock)
    bed.provider.tokens = manager
    pod: dict[str, Any] = {
        "metadata": {
            "name": "web",
            "namespace": "default",
            "uid": UID,
            "annotations": {JOB_ID_ANNOTATION: "41"},
        },
        "spec": {"volumes": [ACCESS_VOLUME]},
    }
    bed.listed("41", UID)  # Slurm shows the job as this pod's: it is adopted
    assert bed.provider.create_pod(pod) == "41"
    assert bed.slurm.submitted == []
    assert manager.tracked() == ["default/web"]
    assert api.requests == []  # the file is missing here: issued on the thread's next round
    (bed.folder() / "volumes" / "kube-api-access-x1y2z").mkdir(parents=True)
    manager.refresh_due()
    assert len(api.requests) == 1


# -- the kubelet's flags --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "node_ip", "endpoint"),
    [
        ("https://127.0.0.1:6443", "10.0.0.5", ("10.0.0.5", 6443)),
        ("https://localhost:6443", "10.0.0.5", ("10.0.0.5", 6443)),
        ("https://[::1]:6443", "fd00::5", ("fd00::5", 6443)),
        ("https://login.example.org:7443", "10.0.0.5", ("login.example.org", 7443)),
        ("https://10.0.0.9", None, ("10.0.0.9", 443)),
        ("https://127.0.0.1:6443", None, ("127.0.0.1", 6443)),
    ],
)
def test_pods_reach_the_api_server_at_the_node_ip_for_a_loopback_url(
    url: str, node_ip: str | None, endpoint: tuple[str, int]
) -> None:
    assert service_endpoint(url, node_ip=node_ip) == endpoint


def test_token_and_api_server_flags() -> None:
    settings = parse_args(
        ["--kubeconfig=k", "--token-refresh-fraction=0.5", "--pod-api-server=https://h:1"]
    )
    assert settings.tokens.refresh_fraction == 0.5
    assert settings.pod_api_server == "https://h:1"
    assert parse_args(["--kubeconfig=k"]).tokens.refresh_fraction == 0.8
    for bad in ("--token-refresh-fraction=1.5", "--pod-api-server=http://h:1"):
        with pytest.raises(SystemExit):
            parse_args(["--kubeconfig=k", bad])
