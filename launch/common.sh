#!/usr/bin/env bash
# Shared by the launch scripts (sourced, not run): defaults for the process count and a free port.

# Processes per node: every GPU, else 2 CPU ranks.
default_nproc() {
  python -c "import torch; print(torch.cuda.device_count() or 2)"
}

# A TCP port the OS reports free on this host.
free_port() {
  python -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
}
