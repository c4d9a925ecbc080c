"""mlxgate's composition root and command line.

The one package that knows every other one: it builds the backends, the
router, the gRPC service and the HTTP front from a ``Config``
(``stack.py``, ``factory.py``) and parses the command line (``main.py``).
Nothing imports it (docs/architecture.md, "Layers").
"""

import os as _os

# gRPC's fork handlers (on by default in grpc core) restart its poller in a
# child between fork and exec; with a channel active, that child can abort on
# "epoll_wait: Bad file descriptor" before it execs (grpc/grpc#43055, open in
# 1.80-1.85).  mlxgate forks only to exec (mlx_lm's converter for `create
# --quantize`, `serve --workers`, the CLI's tests), so it needs no fork
# support: off, unless the user set the variable.  Set before grpc is imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
