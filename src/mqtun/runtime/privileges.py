"""Dropping root after the queues are open.

Opening queues on a device whose owner/group is not the caller's needs CAP_NET_ADMIN; once
a queue fd is open, reading and writing it needs no privilege at all. So a program that
handles untrusted packets should open everything it needs as root and then become an
ordinary user: a bug in a packet handler then cannot reconfigure the host's network.

The drop is all-or-nothing and irreversible: supplementary groups, then the gid, then the
uid (real, effective and saved), and a final check that root cannot be regained.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd

from mqtun.errors import InvalidArgumentError, MqtunError, PermissionDeniedError

__all__ = ["drop_privileges", "resolve_user"]


def resolve_user(user: str | int, group: str | int | None = None) -> tuple[int, int]:
    """(uid, gid) for a user name or number and an optional group name or number; the
    group defaults to the user's primary group."""
    try:
        if isinstance(user, int) or str(user).isdigit():
            uid = int(user)
            try:
                default_gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                default_gid = None
        else:
            pw = pwd.getpwnam(str(user))
            uid, default_gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        raise InvalidArgumentError(f"no such user: {user!r}") from None
    if group is None:
        if default_gid is None:
            raise InvalidArgumentError(
                f"uid {uid} has no passwd entry: give its group explicitly (--group)")
        return uid, default_gid
    if isinstance(group, int) or str(group).isdigit():
        return uid, int(group)
    try:
        return uid, grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise InvalidArgumentError(f"no such group: {group!r}") from None


def drop_privileges(user: str | int, group: str | int | None = None) -> tuple[int, int]:
    """Become `user` (and `group`) for good, keeping every open fd; return (uid, gid).

    Call it after every queue is open and every module the program needs is imported (the
    new user may not be able to read the Python installation). Raises PermissionDeniedError
    if this process may not change its ids, InvalidArgumentError for an unknown user.
    """
    uid, gid = resolve_user(user, group)
    try:
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except PermissionError as exc:
        raise PermissionDeniedError(
            exc.errno or errno.EPERM,
            f"cannot become uid {uid} gid {gid}: changing user needs root (CAP_SETUID and "
            f"CAP_SETGID) [{errno.errorcode.get(exc.errno or errno.EPERM, '')}]",
            op="drop_privileges",
        ) from None
    except OSError as exc:
        raise MqtunError(exc.errno or errno.EINVAL,
                         f"cannot become uid {uid} gid {gid}: {exc.strerror}",
                         op="drop_privileges") from None
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would mean the drop did not happen
            raise MqtunError(errno.EPERM, "privileges could not be dropped: root came back",
                             op="drop_privileges")
    return uid, gid
