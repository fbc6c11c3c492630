"""inferq.runtime: the actor base, ONNX sessions, etcd coordination, the model repository."""

import os

# Read by gRPC when it is first imported, so it is set as the package loads:
# inferq processes fork children (workers, test processes) while etcd's gRPC
# threads run, and gRPC's fork handlers can then hang. No child needs gRPC
# state: each execs at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
