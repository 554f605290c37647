"""Print, as JSON, every message, field, enum value and RPC of the KServe v2 / Triton protos as a Python process sees
them: ours (`convproto.inference`, run with our interpreter) or Triton's (`tritonclient.grpc`, run with the
.venv-triton interpreter). tests/test_kserve_interop.py compares the two, so a renumbered or retyped field fails CI.

    python3 scripts/proto_descriptors.py ours
    .venv-triton/bin/python scripts/proto_descriptors.py tritonclient
"""
import json
import sys


def describe(modules):
    """{full name: {field: [number, type, repeated, message type, enum type, oneof]}} plus enums and services."""
    out = {}

    def message(m):
        out[m.full_name] = {
            f.name: [f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED,
                     f.message_type.full_name if f.message_type else None,
                     f.enum_type.full_name if f.enum_type else None,
                     f.containing_oneof.name if f.containing_oneof else None]
            for f in m.fields}
        for nested in m.nested_types:
            message(nested)
        for enum in m.enum_types:
            out[enum.full_name] = {v.name: v.number for v in enum.values}

    for module in modules:
        d = module.DESCRIPTOR
        for m in d.message_types_by_name.values():
            message(m)
        for enum in d.enum_types_by_name.values():
            out[enum.full_name] = {v.name: v.number for v in enum.values}
        for service in d.services_by_name.values():
            out[service.full_name] = {m.name: [m.input_type.full_name, m.output_type.full_name]
                                      for m in service.methods}
    return out


def main(which):
    if which == "ours":
        import os
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree
        from convproto.inference import grpc_service_pb2, model_config_pb2
    else:
        from tritonclient.grpc import model_config_pb2, service_pb2 as grpc_service_pb2
    print(json.dumps(describe([grpc_service_pb2, model_config_pb2]), sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ours")
