"""The command line: one entry point that dispatches to each shell's ``main(argv) -> int``.

Logging is configured here and nowhere else. An expected failure (FleetError)
is one line on stderr and an exit code; a traceback only with ``--debug``.
Subcommand modules are imported lazily so ``jobs`` and ``manifest check`` start
fast and never import what they do not use (torch above all). For the same
reason ``logging`` is configured only once the command's module has imported it:
``manifest check`` never logs, and importing logging costs it about 7 ms.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from cis490fleet import __version__
from cis490fleet.errors import (  # noqa: F401 (the exit codes are part of this module's interface)
    EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAUTHORISED, EXIT_UNREACHABLE, EXIT_USAGE, FleetError,
    exit_code,
)

COMMANDS = {
    "serve": ("cis490fleet.coordinator", "run the coordinator: manifest, queue, artifact store, HTTP API, dashboard"),
    "work": ("cis490fleet.worker", "run the worker daemon on a training host"),
    "jobs": ("cis490fleet.ops", "operator CLI: status list show failures cancel requeue reload workers logs fetch watch peers"),
    "enroll": ("cis490fleet.enroll", "install this file as a service on this host (systemd / Scheduled Task)"),
    "train": ("cis490fleet.trainer", "the built-in example trainer (needs torch)"),
    "manifest": ("cis490fleet.manifest_cmd", "check a training manifest, list its job ids"),
    "capability": ("cis490fleet.capability", "print this host's detected capability as JSON"),
}

USAGE = "usage: cis490fleet [--version] [--debug] COMMAND [ARGS...]\n\ncommands:\n" + "".join(
    f"  {name:<11} {help_}\n" for name, (_, help_) in COMMANDS.items()
) + "\nRun 'cis490fleet COMMAND --help' for a command's options."


def full_usage() -> str:
    """USAGE with the ``jobs`` line listing that command's subcommands as its parser has them, so the two never
    drift apart (only --help pays for importing the parser)."""
    from cis490fleet import ops

    names = " ".join(ops.build_parser().subcommands)
    old = f"  {'jobs':<11} {COMMANDS['jobs'][1]}\n"
    return USAGE.replace(old, f"  {'jobs':<11} operator CLI: {names}\n")


def version_string() -> str:
    try:
        from cis490fleet import _build  # written by build_zipapp.py
        return f"cis490fleet {__version__} ({_build.GIT_COMMIT})"
    except ImportError:
        return f"cis490fleet {__version__}"


def setup_logging(debug: bool = False, level: str | None = None) -> None:
    import logging

    level = level or os.environ.get("CIS490_LOG_LEVEL") or ("DEBUG" if debug else "INFO")
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def restore_ctrl_c() -> None:
    """Let Ctrl-C (SIGINT) stop the command even when it was started with SIGINT ignored.

    A shell without job control starts background commands that way, and Python
    keeps an inherited SIG_IGN: `jobs watch` started from a script could then
    not be interrupted, only killed.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        restore_ctrl_c()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0].startswith("-"):
        flag = argv.pop(0)
        if flag == "--version":
            print(version_string())
            return EXIT_OK
        if flag == "--debug":
            debug = True
        elif flag in ("-h", "--help"):
            print(full_usage())
            return EXIT_OK
        else:
            print(f"cis490fleet: unknown option {flag}\n{USAGE}", file=sys.stderr)
            return EXIT_USAGE
    if not argv:
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cis490fleet: unknown command {name!r}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    try:
        module = importlib.import_module(COMMANDS[name][0])
        if "logging" in sys.modules:
            setup_logging(debug)
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except FleetError as err:
        if debug:
            raise
        print(f"cis490fleet {name}: {err}", file=sys.stderr)
        return exit_code(err)
