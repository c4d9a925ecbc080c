"""The committed stubs must be what `make proto` generates from the .proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto/mlxgate/v1/inference.proto"),
        ],
        check=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "mlxgate/v1" / name).read_text()
        committed = (ROOT / "mlxgate/v1" / name).read_text()
        assert fresh == committed, f"mlxgate/v1/{name} is stale: run `make proto`"


def test_stubs_import_without_path_tricks() -> None:
    code = "from mlxgate.v1 import inference_pb2, inference_pb2_grpc; print(inference_pb2_grpc.InferenceServiceStub)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "InferenceServiceStub" in out.stdout
