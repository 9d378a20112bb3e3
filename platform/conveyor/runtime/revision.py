"""The commit a process runs, for ``GET /version``: from the environment of a deployed image, or the git checkout.

A deployed image names its commit in ``CONVEYOR_GIT_SHA`` (or ``SOURCE_COMMIT``,
which several platforms set). From a git checkout the commit is read from
the repository's files, without running git: ``HEAD``, then the branch's
ref file or ``packed-refs``; linked worktrees (a ``.git`` file) and detached
heads are understood.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

ENVIRONMENT = ("CONVEYOR_GIT_SHA", "SOURCE_COMMIT")
"""Variables naming the commit, first set wins; they win over the checkout."""

_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


def commit(directory: str | Path, environ: Mapping[str, str] | None = None) -> str | None:
    """The commit of a deployed image (its environment) or of the git checkout holding ``directory``.

    Args:
        directory: a directory of the application (``CONVEYOR_APP_DIR``); the
            checkout is searched from it upwards.
        environ: the environment (``os.environ`` by default).

    Returns:
        The commit's hash, or ``None`` when neither names one (an unreadable
        repository is treated as none: the version is informative only).
    """
    environ = os.environ if environ is None else environ
    for name in ENVIRONMENT:
        if value := environ.get(name, "").strip():
            return value
    try:
        git_dir = _git_dir(Path(directory).resolve())
        return None if git_dir is None else _head(git_dir)
    except (OSError, UnicodeDecodeError):
        return None


def _git_dir(start: Path) -> Path | None:
    """The git directory of the checkout holding ``start``: ``.git``, or where a ``.git`` file points."""
    for folder in (start, *start.parents):
        dot_git = folder / ".git"
        if dot_git.is_dir():
            return dot_git
        if dot_git.is_file():  # a linked worktree or a submodule: "gitdir: <path>"
            text = dot_git.read_text().strip()
            if text.startswith("gitdir:"):
                return (folder / text.removeprefix("gitdir:").strip()).resolve()
            return None
    return None


def _head(git_dir: Path) -> str | None:
    head = (git_dir / "HEAD").read_text().strip()
    if _SHA.fullmatch(head):  # detached
        return head
    if not head.startswith("ref:"):
        return None
    ref = head.removeprefix("ref:").strip()
    common = git_dir
    if (git_dir / "commondir").is_file():  # a linked worktree keeps its branches in the main repository
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    for root in dict.fromkeys((git_dir, common)):
        loose = root / ref
        if loose.is_file():
            value = loose.read_text().strip()
            return value if _SHA.fullmatch(value) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.fullmatch(sha):
                return sha
    return None
