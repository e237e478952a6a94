"""HOME in a container comes from the image's own /etc/passwd, never from the host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hpk.image_users import home_of, parse_passwd, sandbox_homes, sif_homes
from hpk.images import ImageConfig, image_config, sif_config
from tests.unit.fakes import sif_bytes

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "argo:x:8737:8737::/tmp:/sbin/nologin\n"
    "broken line\n"
    "relative:x:12:12::home/rel:/bin/sh\n"
    "again:x:8737:1::/elsewhere:/bin/sh\n"
)


def test_parse_passwd_takes_the_first_absolute_home_of_each_uid() -> None:
    assert parse_passwd(PASSWD) == {0: "/root", 8737: "/tmp"}


def test_a_user_the_image_does_not_list_gets_slash() -> None:
    homes = tuple(parse_passwd(PASSWD).items())
    assert home_of(homes, 8737) == "/tmp"
    assert home_of(homes, 1001) == "/"
    assert home_of((), 0) == "/"
    assert home_of(None, 0) == "/root"  # a record older than the homes: root's usual home
    assert home_of(None, 1001) == "/"


def test_sandbox_homes_reads_the_folder_and_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    assert sandbox_homes(tmp_path) == {0: "/root", 8737: "/tmp"}
    host = tmp_path / "host-passwd"
    host.write_text("me:x:1001:1001::/home/me:/bin/sh\n")
    (tmp_path / "etc" / "passwd").unlink()
    (tmp_path / "etc" / "passwd").symlink_to(host)
    assert sandbox_homes(tmp_path) == {}
    assert sandbox_homes(tmp_path / "missing") == {}


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="needs squashfs-tools")
def test_sif_homes_reads_passwd_out_of_the_squashfs_partition(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    squash = tmp_path / "root.squashfs"
    subprocess.run(
        ["mksquashfs", str(root), str(squash), "-quiet", "-noappend"], check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    sif = tmp_path / "users.sif"
    sif.write_bytes(sif_bytes({"Cmd": ["sh"]}, rootfs=squash.read_bytes()))
    assert sif_homes(sif) == {0: "/root", 8737: "/tmp"}
    config = sif_config(sif)
    assert config.home(8737) == "/tmp"
    assert config.home(4242) == "/"
    assert config.cmd == ("sh",)


def test_a_sif_without_a_root_partition_lists_nobody(tmp_path: Path) -> None:
    sif = tmp_path / "bare.sif"
    sif.write_bytes(sif_bytes({"Cmd": ["sh"]}))
    assert sif_homes(sif) == {}
    assert sif_config(sif).home(0) == "/"


def test_a_record_without_homes_reads_them_from_the_sif(tmp_path: Path) -> None:
    sif = tmp_path / "old.sif"
    sif.write_bytes(sif_bytes({"Cmd": ["sh"]}))
    (tmp_path / ".old.sif.config.json").write_text(
        '{"oci": true, "entrypoint": [], "cmd": ["sh"], "workingDir": ""}'
    )
    assert image_config(sif).homes == ()
    recorded = ImageConfig.from_json({"oci": True, "homes": {"0": "/root", "7": "/h"}})
    assert recorded.homes == ((0, "/root"), (7, "/h"))
    assert ImageConfig.from_json(recorded.to_json()) == recorded
    with pytest.raises(ValueError, match="homes"):
        ImageConfig.from_json({"oci": True, "homes": {"root": "/root"}})
