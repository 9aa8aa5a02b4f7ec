"""`jobs hosts list | add HOST | rotate HOST | revoke HOST`: the fleet's host keys, from the operator's side.

Shell (part of the `jobs` CLI). A new or rotated key is printed once, with the
enroll commands that install it on the host; the coordinator never shows it
again. Keys go to stdout only, never to a log or an error.
"""

from __future__ import annotations

import time

from cis490fleet import errors

EXIT_OK = 0


def add_parser(add) -> None:
    p = add("hosts", "the hosts the fleet knows and their keys: list, add HOST, rotate HOST, revoke HOST")
    p.add_argument("action", choices=("list", "add", "rotate", "revoke"), help="what to do")
    p.add_argument("host", nargs="?", help="the host id (for add, rotate and revoke)")


def run(ops) -> int:
    """``ops`` is the `jobs` invocation (``ops.Ops``): its client, output and arguments."""
    args, out, client = ops.args, ops.out, ops.client
    if args.action == "list":
        if args.host:
            raise errors.BadRequest("jobs hosts list takes no host id; to see one host, read the list")
        result = client.hosts()
        if args.json:
            out.json(result)
            return EXIT_OK
        from cis490fleet.ops import when

        now = time.time()
        rows = [[h.get("host"), "revoked" if h.get("revoked") else ("key" if h.get("created") else "no key"),
                 "yes" if h.get("in_manifest") else "no", when(h.get("created"), now) if h.get("created") else "-",
                 h.get("created_by") or "-", h.get("revoked_by") or "-"] for h in result.get("hosts", [])]
        if not rows:
            out.line("no hosts yet: add one with `jobs hosts add HOST`")
        else:
            out.table(["HOST", "KEY", "IN MANIFEST", "SINCE", "BY", "REVOKED BY"], rows)
        return EXIT_OK
    if not args.host:
        raise errors.BadRequest(f"jobs hosts {args.action} needs the host id: jobs hosts {args.action} HOST")
    if args.action == "revoke":
        result = client.hosts_revoke(args.host)
        out.json(result) if args.json else out.line(f"{args.host}: key revoked; its requests are refused from now on")
        return EXIT_OK
    result = client.hosts_add(args.host) if args.action == "add" else client.hosts_rotate(args.host)
    if args.json:
        out.json(result)
        return EXIT_OK
    verb = "added" if args.action == "add" else "rotated (the old key no longer works)"
    out.line(f"{args.host}: {verb}. Its key, shown this once:")
    out.line()
    out.line(f"  {result['key']}")
    out.line()
    enroll = result.get("enroll") or {}
    if enroll:
        out.line("Install the worker with it, as root on Linux:")
        out.line(f"  {enroll.get('linux', '')}")
        out.line("or as administrator in PowerShell on Windows:")
        out.line(f"  {enroll.get('windows', '')}")
    else:
        out.line("Put it in a file only the worker can read (chmod 600) and start the worker with")
        out.line(f"  work --host-id {args.host} --host-key-file FILE")
    return EXIT_OK
