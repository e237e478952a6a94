"""The hpk-local provisioner: its StorageClass, a folder and a volume per claim, and their
removal once the claim is gone. The API server is a fake behind StorageApi; the folders are
real."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kubelet_py.adapters.apiserver import ApiUnavailable, WatchEvent
from kubelet_py.loops.provisioner import (
    DEFAULT_CLASS,
    PROVISIONED_BY,
    Provisioner,
    ProvisionerSettings,
)

JSON = dict[str, Any]


class FakeStorageApi:
    def __init__(self) -> None:
        self.classes: dict[str, JSON] = {}
        self.volumes: dict[str, JSON] = {}
        self.deleted: list[tuple[str, str]] = []
        self.events: list[tuple[str, str, str, str]] = []
        self.unavailable = False

    def get_storage_class(self, name: str) -> JSON | None:
        return self.classes.get(name)

    def create_storage_class(self, body: Mapping[str, Any]) -> None:
        self.classes.setdefault(body["metadata"]["name"], dict(body))

    def create_volume(self, body: Mapping[str, Any]) -> bool:
        if self.unavailable:
            raise ApiUnavailable("POST /api/v1/persistentvolumes: connection refused")
        name = body["metadata"]["name"]
        if name in self.volumes:
            return False
        self.volumes[name] = dict(body)
        return True

    def delete_volume(self, name: str, uid: str) -> None:
        self.deleted.append((name, uid))
        self.volumes.pop(name, None)

    def claim_event(
        self, claim: Mapping[str, Any], *, kind: str, reason: str, message: str
    ) -> None:
        self.events.append((claim["metadata"]["name"], kind, reason, message))


def claim(name: str = "data", **spec: Any) -> JSON:
    values: JSON = {
        "storageClassName": "hpk-local",
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
    }
    values.update(spec)
    return {
        "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}"},
        "spec": values,
        "status": {"phase": "Pending"},
    }


@pytest.fixture
def api() -> FakeStorageApi:
    return FakeStorageApi()


@pytest.fixture
def provisioner(api: FakeStorageApi, tmp_path: Path) -> Provisioner:
    return Provisioner(api=api, settings=ProvisionerSettings(root=tmp_path / "volumes"))


def test_storage_class_is_created_once_as_the_default(
    api: FakeStorageApi, provisioner: Provisioner
) -> None:
    provisioner.ensure_class()
    made = api.classes["hpk-local"]
    assert made["metadata"]["annotations"] == {DEFAULT_CLASS: "true"}
    assert (made["provisioner"], made["volumeBindingMode"]) == ("hpk.io/local", "Immediate")
    assert made["reclaimPolicy"] == "Delete"
    # A class the user changed (no longer the default) stays as they keep it.
    made["metadata"]["annotations"][DEFAULT_CLASS] = "false"
    provisioner.ensure_class()
    assert api.classes["hpk-local"]["metadata"]["annotations"][DEFAULT_CLASS] == "false"


def test_pending_claim_gets_a_folder_and_a_volume_bound_to_it(
    api: FakeStorageApi, provisioner: Provisioner, tmp_path: Path
) -> None:
    the_claim = claim(accessModes=["ReadWriteMany"], resources={"requests": {"storage": "5Gi"}})
    assert provisioner.claim_changed(the_claim) == "pvc-uid-data"
    folder = tmp_path / "volumes" / "pvc-uid-data_team-a_data"
    assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
    volume = api.volumes["pvc-uid-data"]
    assert volume["metadata"]["annotations"] == {PROVISIONED_BY: "hpk.io/local"}
    assert volume["spec"] == {
        "capacity": {"storage": "5Gi"},
        "accessModes": ["ReadWriteMany"],
        "persistentVolumeReclaimPolicy": "Delete",
        "storageClassName": "hpk-local",
        "volumeMode": "Filesystem",
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": "team-a",
            "name": "data",
            "uid": "uid-data",
        },
        "hostPath": {"path": str(folder), "type": "Directory"},
    }
    assert api.events[-1][:3] == ("data", "Normal", "ProvisioningSucceeded")
    # Seen again (a resync, a MODIFIED event): nothing new.
    assert provisioner.claim_changed(the_claim) is None
    assert len(api.volumes) == 1


@pytest.mark.parametrize(
    "the_claim",
    [
        claim(storageClassName="other"),
        claim(storageClassName=None),
        claim(volumeName="pv-x"),
        {**claim(), "status": {"phase": "Bound"}},
        {**claim(), "metadata": {**claim()["metadata"], "deletionTimestamp": "2025-01-01T00:00Z"}},
    ],
    ids=["other class", "no class", "bound", "phase Bound", "being deleted"],
)
def test_claims_that_are_not_ours_or_not_pending_are_left(
    api: FakeStorageApi, provisioner: Provisioner, the_claim: JSON
) -> None:
    assert provisioner.claim_changed(the_claim) is None
    assert api.volumes == {} and api.events == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"volumeMode": "Block"}, "volumeMode Block"),
        ({"selector": {"matchLabels": {"a": "b"}}}, "selector"),
        ({"dataSource": {"kind": "PersistentVolumeClaim", "name": "x"}}, "dataSource"),
        ({"resources": {}}, "resources.requests.storage"),
    ],
)
def test_claims_it_cannot_provision_get_a_warning(
    api: FakeStorageApi, provisioner: Provisioner, spec: JSON, message: str
) -> None:
    assert provisioner.claim_changed(claim(**spec)) is None
    assert api.volumes == {}
    assert api.events[0][1:3] == ("Warning", "ProvisioningFailed")
    assert message in api.events[0][3]


def released(volume: JSON) -> JSON:
    return {
        **volume,
        "metadata": {**volume["metadata"], "uid": "pv-uid"},
        "status": {"phase": "Released"},
    }


def test_released_volume_loses_its_folder_and_object(
    api: FakeStorageApi, provisioner: Provisioner, tmp_path: Path
) -> None:
    provisioner.claim_changed(claim())
    folder = tmp_path / "volumes" / "pvc-uid-data_team-a_data"
    (folder / "sub").mkdir()
    (folder / "sub" / "file").write_text("data")
    volume = api.volumes["pvc-uid-data"]
    assert provisioner.volume_changed({**volume, "status": {"phase": "Bound"}}) is False
    assert folder.exists()
    assert provisioner.volume_changed(released(volume)) is True
    assert not folder.exists()
    assert api.deleted == [("pvc-uid-data", "pv-uid")]


@pytest.mark.parametrize(
    "change",
    [
        {"annotations": {PROVISIONED_BY: "someone.else/x"}},
        {"reclaimPolicy": "Retain"},
        {"path": "/etc"},
        {"path": "elsewhere"},
    ],
)
def test_volumes_not_ours_to_delete_are_left(
    api: FakeStorageApi, provisioner: Provisioner, tmp_path: Path, change: JSON
) -> None:
    provisioner.claim_changed(claim())
    volume = released(api.volumes["pvc-uid-data"])
    if "annotations" in change:
        volume["metadata"] = {**volume["metadata"], "annotations": change["annotations"]}
    if "reclaimPolicy" in change:
        volume["spec"] = {**volume["spec"], "persistentVolumeReclaimPolicy": "Retain"}
    if "path" in change:
        path = change["path"] if change["path"].startswith("/") else str(tmp_path / "elsewhere")
        volume["spec"] = {**volume["spec"], "hostPath": {"path": path}}
    assert provisioner.volume_changed(volume) is False
    assert api.deleted == []
    assert (tmp_path / "volumes" / "pvc-uid-data_team-a_data").exists()


def test_follow_handles_events_and_survives_an_unavailable_api(
    api: FakeStorageApi, provisioner: Provisioner
) -> None:
    api.unavailable = True
    provisioner.follow([WatchEvent("ADDED", claim("a"))], claims=True)
    assert api.volumes == {}
    api.unavailable = False
    provisioner.follow(
        [WatchEvent("DELETED", claim("gone")), WatchEvent("MODIFIED", claim("a"))], claims=True
    )
    assert list(api.volumes) == ["pvc-uid-a"]
    # The periodic pass catches what failed.
    provisioner.resync([claim("b")], [])
    assert sorted(api.volumes) == ["pvc-uid-a", "pvc-uid-b"]


@pytest.mark.parametrize("root", ["/a:b", "/a,b", "/tmp/x "])
def test_volumes_folder_apptainer_cannot_bind_is_refused(root: str) -> None:
    with pytest.raises(ValueError, match="Apptainer's --bind"):
        ProvisionerSettings(root=Path(root))


def test_a_claim_whose_folder_cannot_be_made_is_reported_once_and_spares_the_others(
    api: FakeStorageApi, provisioner: Provisioner, tmp_path: Path
) -> None:
    (tmp_path / "volumes").mkdir()
    # A file where the claim's folder belongs: mkdir fails for this claim alone.
    (tmp_path / "volumes" / "pvc-uid-bad_team-a_bad").write_text("")
    provisioner.resync([claim("bad"), claim("good")], [])
    provisioner.resync([claim("bad")], [])
    assert list(api.volumes) == ["pvc-uid-good"]
    warnings = [event for event in api.events if event[1] == "Warning"]
    assert len(warnings) == 1, "a repeated failure is reported once"
    assert warnings[0][:3] == ("bad", "Warning", "ProvisioningFailed")
    assert warnings[0][3].startswith("FileExistsError: ")


def test_an_unexpected_error_for_one_claim_spares_the_others(
    api: FakeStorageApi, provisioner: Provisioner
) -> None:
    odd = claim("odd")
    odd["spec"]["resources"] = {"requests": {"storage": "1Gi"}, "limits": None}
    odd["spec"]["accessModes"] = 7  # list(7) raises TypeError
    provisioner.resync([odd, claim("good")], [])
    assert list(api.volumes) == ["pvc-uid-good"]
    assert [event[:3] for event in api.events if event[1] == "Warning"] == [
        ("odd", "Warning", "ProvisioningFailed")
    ]
