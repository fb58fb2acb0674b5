"""`imgcls-predict --sort-into DIR`: copy each predicted image into DIR/<its answer's folder>/, never outside DIR
and never over a file.

Class names come from model files that may come from anyone, so the copy runs in two steps. First every target
is checked, before anything is written: each answer becomes one safe folder name (`classnames.folder_names`:
separators replaced, Windows-reserved names and trailing dots rendered safe, names that would share a folder on
a case- or normalisation-insensitive file system refused, names too long for a file system refused), and
DIR/<folder> must be absent or a real folder inside DIR (not a file, not a link). Then each class folder is
opened once, relative to DIR's descriptor and with O_NOFOLLOW, and each copy is created relative to that folder's
descriptor with O_CREAT | O_EXCL: a link planted after the check is never followed and no file is overwritten
(a name already taken gets the first free `<stem>_1<suffix>`, `_2`, ...).

    sort_into([{"path": "in/x.png", "prediction": "cat"}], Path("sorted"))   # -> 1; sorted/cat/x.png
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from imgcls.data.classnames import folder_names
from imgcls.errors import ClassNameError, SortError

DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _refuse(dest: Path, why: str) -> SortError:
    return SortError(f"--sort-into {dest}: {why}; nothing was copied")


def check_targets(rows: list[dict], dest: Path, folders: dict[str, str]) -> None:
    """Every target checked before anything is written (SortError naming the first that cannot be used)."""
    if dest.exists() and not dest.is_dir():
        raise _refuse(dest, f"{dest} is a file, not a folder")
    root = dest.resolve()
    for folder in sorted(set(folders.values())):
        path = dest / folder
        if path.is_symlink() and path.resolve().is_relative_to(root):
            raise _refuse(dest, f"{path} is a symbolic link; images are copied only into real folders inside {dest}")
        if path.exists() and not path.is_dir() and not path.is_symlink():
            raise _refuse(dest, f"{path} is a file, not a folder; move it away or sort into another folder")
    for row in rows:
        target = dest / folders[row["prediction"]] / Path(row["path"]).name
        if not target.resolve().is_relative_to(root):
            raise _refuse(dest, f"{target} would be outside {dest}")


def open_folders(dest: Path, names: list[str]) -> dict[str, int]:
    """name -> descriptor of DIR/name, made where missing, opened without following links. On failure the
    folders made here are removed again and SortError says which one could not be opened."""
    dest.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(dest, DIR_FLAGS)
    fds: dict[str, int] = {}
    made: list[str] = []
    try:
        for name in names:
            try:
                os.mkdir(name, dir_fd=dir_fd)
                made.append(name)
            except FileExistsError:
                pass
            try:
                fds[name] = os.open(name, DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
            except OSError as e:
                link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
                why = "it is a symbolic link, made after the check" if link else e.strerror
                raise _refuse(dest, f"{dest / name} cannot be opened as a folder inside {dest} ({why})") from None
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        for name in made:
            os.rmdir(name, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
    return fds


def copy_into(source: str, folder_fd: int, name: str) -> str:
    """Copy `source` (bytes, mode, times) to a new file in the folder: `name`, else `<stem>_1<suffix>`, ...;
    created exclusively and never through a link. Returns the name used."""
    stem, suffix = os.path.splitext(name)
    n = 0
    while True:
        candidate = name if n == 0 else f"{stem}_{n}{suffix}"
        try:
            fd = os.open(candidate, NEW_FILE_FLAGS, 0o600, dir_fd=folder_fd)
            break
        except FileExistsError:
            n += 1
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
            st = os.fstat(src.fileno())
            os.fchmod(out.fileno(), stat.S_IMODE(st.st_mode))
            os.utime(out.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.unlink(candidate, dir_fd=folder_fd)  # no empty or partial copy left behind
        raise
    return candidate


def sort_into(rows: list[dict], dest: Path) -> int:
    """Copy each predicted image to dest/<answer's folder>/ (the uncertain answer included). Returns the count."""
    dest = Path(dest)
    try:
        folders = folder_names(sorted({row["prediction"] for row in rows}))
    except ClassNameError as e:
        raise _refuse(dest, str(e)) from None
    check_targets(rows, dest, folders)
    fds = open_folders(dest, sorted(set(folders.values())))
    try:
        for row in rows:
            copy_into(row["path"], fds[folders[row["prediction"]]], Path(row["path"]).name)
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(rows)
