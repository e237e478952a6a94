"""The rules for hpk's folders in node-local scratch (hpk/scratch.py), on real folders in
tmp_path; another owner is simulated by the uid the checks are told to expect."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hpk.scratch import (
    UnsafeScratch,
    base_problem,
    check_private_folder,
    make_private_folder,
    private_folder_problem,
    tree_digest,
)

pytestmark = pytest.mark.timeout(30)

ME = os.geteuid()
SOMEONE_ELSE = ME + 4242


def folder(path: Path, mode: int) -> Path:
    path.mkdir()
    path.chmod(mode)
    return path


# --- private folders ------------------------------------------------------------------------


def test_own_0700_folder_is_private(tmp_path: Path) -> None:
    assert private_folder_problem(folder(tmp_path / "mine", 0o700), owner=ME) is None


def test_folder_of_another_owner_is_named_with_both_uids(tmp_path: Path) -> None:
    problem = private_folder_problem(folder(tmp_path / "mine", 0o700), owner=SOMEONE_ELSE)
    assert problem == f"is owned by uid {ME}, not by uid {SOMEONE_ELSE}"


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o755, 0o777, 0o710])
def test_any_group_or_other_bit_is_refused(tmp_path: Path, mode: int) -> None:
    problem = private_folder_problem(folder(tmp_path / "open", mode), owner=ME)
    assert problem is not None and problem.startswith(f"has mode {mode:04o}")


def test_symlink_to_a_private_folder_is_refused_not_followed(tmp_path: Path) -> None:
    target = folder(tmp_path / "target", 0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert private_folder_problem(link, owner=ME) == "is a symbolic link, not a folder"


def test_file_and_missing_path_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert private_folder_problem(tmp_path / "file", owner=ME) == "is not a folder"
    assert private_folder_problem(tmp_path / "none", owner=ME) == "does not exist"


# --- base folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o1777, 0o1733])
def test_base_where_others_cannot_replace_folders_is_fit(tmp_path: Path, mode: int) -> None:
    assert base_problem(folder(tmp_path / "base", mode), owner=ME) is None


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_base_writable_by_others_without_sticky_bit_is_unfit(tmp_path: Path, mode: int) -> None:
    problem = base_problem(folder(tmp_path / "base", mode), owner=ME)
    assert problem is not None and "without the sticky bit" in problem


def test_base_of_another_user_is_unfit_unless_it_is_roots(tmp_path: Path) -> None:
    base = folder(tmp_path / "base", 0o755)
    problem = base_problem(base, owner=SOMEONE_ELSE)
    if ME == 0:
        assert problem is None  # root's folders are trusted: /tmp is root's
    else:
        assert problem == f"is owned by uid {ME}, neither root nor uid {SOMEONE_ELSE}"


def test_check_names_the_unfit_base_before_the_folder(tmp_path: Path) -> None:
    base = folder(tmp_path / "base", 0o777)
    inside = folder(base / "inside", 0o700)
    with pytest.raises(UnsafeScratch, match="without the sticky bit") as raised:
        check_private_folder(inside, owner=ME)
    assert raised.value.path == base


# --- making folders -------------------------------------------------------------------------


def test_made_folder_is_fresh_private_and_unpredictable(tmp_path: Path) -> None:
    base = folder(tmp_path / "base", 0o1777)
    old = os.umask(0)  # the umask must not matter: open it wide
    try:
        first = make_private_folder(base, prefix="hpk-7-")
        second = make_private_folder(base, prefix="hpk-7-")
    finally:
        os.umask(old)
    assert first != second
    assert first.parent == base and first.name.startswith("hpk-7-") and first.name != "hpk-7-"
    for made in (first, second):
        assert private_folder_problem(made, owner=ME) is None
        assert list(made.iterdir()) == []


def test_nothing_is_made_in_an_unfit_base(tmp_path: Path) -> None:
    base = folder(tmp_path / "base", 0o777)
    with pytest.raises(UnsafeScratch, match=f"{base}: has mode 0777"):
        make_private_folder(base, prefix="hpk-7-")
    assert list(base.iterdir()) == []


def test_folder_not_owned_as_expected_is_refused_and_removed(tmp_path: Path) -> None:
    base = folder(tmp_path / "base", 0o1777)
    with pytest.raises(UnsafeScratch, match=f"owned by uid {ME}, n"):
        make_private_folder(base, prefix="hpk-7-", owner=SOMEONE_ELSE)
    assert list(base.iterdir()) == []


# --- digests --------------------------------------------------------------------------------


def tree(root: Path) -> Path:
    (root / "usr/local/bin").mkdir(parents=True)
    program = root / "usr/local/bin/kube-apiserver"
    program.write_bytes(b"\x7fELF real")
    program.chmod(0o755)
    (root / "bin").mkdir()
    (root / "bin/sh").symlink_to("busybox")
    (root / "bin/busybox").write_bytes(b"busybox")
    return root


def test_same_tree_gives_the_same_digest_wherever_it_is(tmp_path: Path) -> None:
    assert tree_digest(tree(tmp_path / "a")) == tree_digest(tree(tmp_path / "b"))


def test_digest_follows_content_mode_links_and_names(tmp_path: Path) -> None:
    root = tree(tmp_path / "root")
    seen = {tree_digest(root)}
    program = root / "usr/local/bin/kube-apiserver"

    def relink() -> None:
        (root / "bin/sh").unlink()
        (root / "bin/sh").symlink_to("/tmp/x")

    changes: list[Callable[[], object]] = [
        lambda: program.write_bytes(b"#!/bin/sh\necho planted\n"),
        lambda: program.chmod(0o4755),
        relink,
        lambda: (root / "bin/busybox").rename(root / "bin/busybox2"),
        (root / "usr/extra").mkdir,
        lambda: (root / "usr/extra").chmod(0o777),
    ]
    for change in changes:
        change()
        digest = tree_digest(root)
        assert digest not in seen
        seen.add(digest)


def test_digest_never_reads_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("one")
    root = tree(tmp_path / "root")
    (root / "link").symlink_to(outside)
    before = tree_digest(root)
    outside.write_text("two")
    assert tree_digest(root) == before


def test_symlinked_root_is_hashed_as_a_link(tmp_path: Path) -> None:
    # The root itself is lstat'ed: a link hashes as a link, not as the tree it points to.
    root = tree(tmp_path / "root")
    link = tmp_path / "link"
    link.symlink_to(root)
    assert tree_digest(link) != tree_digest(root)
