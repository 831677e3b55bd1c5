"""``sftint explain`` (argv as given) under torchrun with a short process-group timeout and a rank 0 that takes longer
than it to write each prompt's results; launched by tests/test_cli_explain_many.py.

``--pg-timeout S`` (first two arguments) sets the timeout of every collective (torch's default: 30 min for gloo, 10 min
for NCCL); ``SLOW_WRITE`` seconds are spent before each prompt's folder is written."""
from __future__ import annotations

import datetime
import functools
import os
import sys
import time

import torch

import sftint_fast.cli as cli


def main() -> int:
    if sys.argv[1] != "--pg-timeout":
        raise SystemExit("usage: explain_slow_writer.py --pg-timeout S explain ...")
    timeout = datetime.timedelta(seconds=float(sys.argv[2]))
    torch.distributed.init_process_group = functools.partial(torch.distributed.init_process_group, timeout=timeout)
    write = cli._explain_one

    def slow_write(*args, **kwargs):
        time.sleep(float(os.environ.get("SLOW_WRITE", "0")))
        return write(*args, **kwargs)

    cli._explain_one = slow_write
    return cli.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
