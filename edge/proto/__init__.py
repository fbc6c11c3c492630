"""The KServe v2 / Triton gRPC protocol: ``grpc_service.proto`` and ``model_config.proto``.

The .proto files are Triton's (triton-inference-server/common, ``protobuf/``, commit
83adf7cf88a2f343005974dff3728be746de2d66, BSD-3-Clause, their headers kept). The ``*_pb2.py``
and ``*_pb2_grpc.py`` beside them are generated once and committed, because grpcio-tools is a
build-time tool we do not want in any install: ``make grpc-stubs`` regenerates them with
grpcio-tools 1.66.2, the generator aetcd's own stubs come from, so they ask for no newer
protobuf (>= 5.27.2) or grpcio (>= 1.66.2) than aetcd already does. Do not edit them by hand.

The descriptors are byte-identical to the ones tritonclient ships, so both can be imported in
one process (the test suite does): protobuf accepts the same file twice only when it is equal.
"""
