"""`latentd` command line: a thin dispatcher; each subcommand lives in its own module and is
imported only when used, so `latentd serve` never imports torch."""
from __future__ import annotations

import importlib
import sys

# subcommand -> module with `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "generate": "latentd.cmd_generate",     # engine: text -> PNG
    "train-shapes": "latentd.cmd_train",    # train the bundled model
    "train-lora": "latentd.cmd_train_lora", # train the bundled star adapter
    "train-lcm": "latentd.cmd_train_lcm",   # distil the bundled few-step LCM adapter
    "serve": "latentd.cmd_serve",           # API server
    "worker": "latentd.cmd_worker",         # GPU/CPU worker
    "workers": "latentd.cmd_workers",       # list live workers and their metrics addresses
    "keys": "latentd.cmd_keys",             # API key management
    "dev": "latentd.cmd_dev",               # redis + API + worker in one command
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="latentd", description="Self-hosted text-to-image service")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the chosen subcommand (keeps `serve` free of torch).
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, mod in COMMANDS.items():
        p = sub.add_parser(name)
        if name == chosen:
            module = importlib.import_module(mod)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
