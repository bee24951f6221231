"""`latentd keys create NAME`: make an API key, print it ONCE, store only its SHA-256 hash in the
keys file (LATENTD_KEYS_FILE, or --file); `--allow-moderation-low` lets the key ask
`moderation: "low"` (flagged images come back unredacted, marked nsfw); `--max-priority` caps the
request priority the key may send (default high: every priority); `--quota` sets its quotas
(app/quota.py: images and compute-seconds per UTC day, concurrent jobs). `latentd keys list` shows the
names, their permissions and a cap below high."""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="keys_command", required=True)
    c = sub.add_parser("create", help="create a key; prints it once")
    c.add_argument("name", help="the key's name: the owner id of its jobs")
    c.add_argument("--file", help="keys file (default: LATENTD_KEYS_FILE)")
    c.add_argument("--allow-moderation-low", action="store_true",
                   help='the key may send moderation "low": its flagged images come back '
                        "unredacted (with nsfw: true) instead of black")
    c.add_argument("--max-priority", choices=("high", "normal", "low"), default="high",
                   help="the highest request priority the key may send (default: high); a request "
                        "above it gets 403 naming priority")
    c.add_argument("--quota", metavar="Q=N,...",
                   help="per-key quotas, any of images=N (images per UTC day), compute_s=N "
                        "(compute-seconds per UTC day), concurrent=N (jobs queued or running at "
                        "once), e.g. images=1000,compute_s=3600,concurrent=4")
    ls = sub.add_parser("list", help="list key names (hashes are never shown)")
    ls.add_argument("--file", help="keys file (default: LATENTD_KEYS_FILE)")


def run(args) -> int:
    import os

    from latentd.app import auth
    from latentd.config.settings import get_settings

    path = os.path.expanduser(args.file) if args.file else auth.keys_path(get_settings())
    try:
        if args.keys_command == "list":
            perms = auth.read_permissions(path)
            caps = auth.read_max_priority(path)
            quotas = auth.read_quotas(path)
            for name in sorted(auth.read_keys_file(path)):
                cap = [f"max_priority={caps[name]}"] if name in caps else []
                quota = [f"quota={','.join(f'{k}={v}' for k, v in quotas[name].items())}"] \
                    if name in quotas else []
                print(" ".join([name, *sorted(perms.get(name, ())), *cap, *quota]))
            return 0
        from latentd.app.quota import parse_quota

        quota = parse_quota(args.quota) if getattr(args, "quota", None) is not None else None
        key = auth.add_key(path, args.name,
                           ("moderation_low",) if args.allow_moderation_low else (),
                           max_priority=getattr(args, "max_priority", "high"), quota=quota)
    except ValueError as e:
        print(f"latentd keys: {e}", file=sys.stderr)
        return 2
    print(key)
    print(f"Created key {args.name!r}; only its SHA-256 hash is stored, in {path}. "
          "Save the key now: it is not shown again.", file=sys.stderr)
    return 0
