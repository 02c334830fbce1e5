"""The committed generated code is what `make proto` makes from proto/atp/policy.proto."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

from atp_extproc.policy.gen.atp import policy_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO = "atp/policy.proto"
GENERATED = ROOT / "atp_extproc" / "policy" / "gen"


def test_generated_code_is_fresh(tmp_path):
    # The same command as the Makefile's proto target, into a temporary directory.
    include = resources.files(grpc_tools) / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
                        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                        str(ROOT / "proto" / PROTO)])
    assert code == 0
    for name in ("policy_pb2.py", "policy_pb2.pyi"):
        fresh = (tmp_path / "atp" / name).read_bytes()
        committed = (GENERATED / "atp" / name).read_bytes()
        assert fresh == committed, (
            f"atp_extproc/policy/gen/atp/{name} is stale (or was made by another "
            "grpcio-tools version): run `make proto` and commit the result")


def test_descriptor_is_registered_under_its_proto_path():
    assert policy_pb2.DESCRIPTOR.name == PROTO
    assert policy_pb2.DESCRIPTOR.package == "atp.policy.v1"
    names = set(policy_pb2.DESCRIPTOR.message_types_by_name)
    assert {"Subject", "Request", "Resource", "Context", "Tool", "Attributes"} <= names
