"""The error tree: every expected failure is a FleetError carrying what a caller needs.

Pure core: no I/O. The HTTP layer maps each class to a status code and a short
code in one table (``http_api.ERROR_TABLE``); the CLI prints ``str(err)`` as one
line and maps the class to an exit code. Messages name what is wrong and how to
fix it.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every expected failure. ``code`` is the short wire code."""

    code = "error"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class ManifestError(FleetError):
    """The manifest is invalid; ``problems`` lists every error found, one line each."""

    code = "bad_manifest"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class BadRequest(FleetError):
    """The request is malformed; the detail names the field and what was expected."""

    code = "bad_request"


class NotFound(FleetError):
    code = "not_found"


class AmbiguousId(FleetError):
    """An id prefix, or a job name, matches more than one job."""

    code = "ambiguous_id"

    def __init__(self, prefix: str, matches: list[str], detail: str | None = None):
        self.prefix = prefix
        self.matches = list(matches)
        shown = ", ".join(m[:12] for m in self.matches[:5])
        super().__init__(detail or f"id prefix {prefix!r} matches {len(self.matches)} jobs ({shown}...); "
                         "give more characters")


class StaleLease(FleetError):
    """The caller no longer holds the job: its lease expired, or the job went to another host."""

    code = "stale_lease"

    def __init__(self, job_id: str, holder: str | None, detail: str | None = None):
        self.job_id = job_id
        self.holder = holder
        super().__init__(
            detail
            or f"job {job_id[:12]} is not held by this caller (current holder: {holder or 'none'}); "
            "stop working on it, another attempt owns it now"
        )


class InvalidTransition(FleetError):
    """The job's status does not allow this operation (e.g. requeue of a running job)."""

    code = "conflict"

    def __init__(self, job_id: str, status: str, action: str, hint: str | None = None):
        self.job_id = job_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} job {job_id[:12]}: it is {status}" + (f"; {hint}" if hint else ""))


class Unauthorized(FleetError):
    """No operator token was sent, or the host identity is missing."""

    code = "unauthorized"


class StaleSignature(Unauthorized):
    """A host's signature was made before this coordinator's memory of received requests begins (it started,
    or became the leader, since): it cannot tell the request from a replay, so the sender signs again at or
    after ``not_before`` (sent as ``x-fleet-not-before``; the cis490fleet client waits and does)."""

    code = "stale_signature"

    def __init__(self, detail: str, not_before: int = 0):
        self.not_before = not_before
        super().__init__(detail)


class Forbidden(FleetError):
    """The token is wrong, operator actions are disabled, or the TLS identity does not match."""

    code = "forbidden"


class TooLarge(FleetError):
    code = "too_large"


class IntegrityError(FleetError):
    """An upload's sha256 or length does not match what was declared."""

    code = "integrity"


class NotLeader(FleetError):
    """This peer is not the leader; ``leader_url`` says where to go, when known."""

    code = "not_leader"

    def __init__(self, leader_url: str | None, detail: str | None = None):
        self.leader_url = leader_url
        super().__init__(detail or f"this peer is not the leader; the leader is {leader_url or 'unknown (election in progress)'}")


class Unavailable(FleetError):
    """The coordinator cannot answer now (no leader, shutting down, unreachable)."""

    code = "unavailable"


class ApplyFailed(FleetError):
    """A queue command passed validation yet could not be applied. It changed nothing, and every replica
    that applies the same command gets the same error, so the replicas stay alike and carry on."""

    code = "apply_failed"


class DiskFull(FleetError):
    """The coordinator's disk (or quota) has no room for a write; nothing already stored was touched."""

    code = "disk_full"


# errno of "no space left on device" and "disk quota exceeded"; SQLITE_FULL, the primary result code.
_DISK_FULL_ERRNOS = (28, 122)
_SQLITE_FULL = 13


def disk_full(err: BaseException, where: str) -> DiskFull | None:
    """The DiskFull an OS or SQLite error means (``where`` names the folder), or None for any other error."""
    errno = getattr(err, "errno", None)
    sqlite_code = getattr(err, "sqlite_errorcode", None)
    if errno not in _DISK_FULL_ERRNOS and (sqlite_code is None or sqlite_code & 0xFF != _SQLITE_FULL) \
            and "database or disk is full" not in str(err):
        return None
    return DiskFull(f"the disk is full ({where}): nothing already stored was lost, but nothing "
                    "new can be written there; free space on it, then retry")


class ConfigError(FleetError):
    """A command-line flag, environment variable or config file is wrong."""

    code = "bad_config"


# One table for the wire: error class -> HTTP status. The short code is the class's ``code``.
# The server maps raised errors through it; the client maps a response's code back to the class.
HTTP_STATUS: dict[type[FleetError], int] = {
    ManifestError: 400,
    BadRequest: 400,
    IntegrityError: 400,
    StaleSignature: 401,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    AmbiguousId: 400,
    StaleLease: 409,
    InvalidTransition: 409,
    TooLarge: 413,
    DiskFull: 507,
    NotLeader: 503,
    Unavailable: 503,
    ConfigError: 500,
    ApplyFailed: 500,
    FleetError: 500,
}


def http_status(err: FleetError) -> int:
    for cls in type(err).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_from_wire(status: int, code: str, detail: str) -> FleetError:
    """Rebuild the FleetError a server sent, so callers catch the same classes on both sides."""
    for cls in HTTP_STATUS:
        if cls.code == code and cls not in (FleetError,):
            err = cls.__new__(cls)
            FleetError.__init__(err, detail)
            return err
    if status in (502, 503, 504):
        return Unavailable(detail)
    if status == 404:
        return NotFound(detail)
    return FleetError(detail)


# Exit codes of every command line (cli, jobs, serve, work, enroll), documented in the README.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAUTHORISED = 4
EXIT_UNREACHABLE = 5


def exit_code(err: BaseException) -> int:
    """The exit code a command line returns for ``err``."""
    if isinstance(err, (NotFound, AmbiguousId)):
        return EXIT_NOT_FOUND
    if isinstance(err, (Unauthorized, Forbidden)):
        return EXIT_UNAUTHORISED
    if isinstance(err, Unavailable):
        return EXIT_UNREACHABLE
    if isinstance(err, (ConfigError, BadRequest)):
        return EXIT_USAGE
    return EXIT_FAILED
