"""Generate the Python code and .pyi stubs for proto/ into tokenflow_grpc/v1/.

protoc writes absolute imports that follow the proto package
(``from tokenflow.v1 import tokenflow_pb2``); this script rewrites them to the
Python package that ships the code (``tokenflow_grpc.v1``).

Usage: python tools/gen_proto.py [OUTPUT_DIR]   (default: tokenflow_grpc/v1)
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import google.api
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["tokenflow/v1/tokenflow.proto"]
GENERATED_PACKAGE = "tokenflow_grpc.v1"

# google/api/*.proto ship inside the googleapis-common-protos wheel, and
# google/protobuf/*.proto inside grpcio-tools.
GOOGLEAPIS_ROOT = pathlib.Path(next(iter(google.api.__path__))).parent.parent
WELL_KNOWN_ROOT = pathlib.Path(next(iter(grpc_tools.__path__))) / "_proto"
# mypy-protobuf installs its protoc plugins next to this interpreter.
SCRIPTS_DIR = pathlib.Path(sys.executable).parent


def generate(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc and write the rewritten modules into output_dir."""
    with tempfile.TemporaryDirectory() as scratch:
        arguments = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{GOOGLEAPIS_ROOT}",
            f"-I{WELL_KNOWN_ROOT}",
            f"--plugin=protoc-gen-mypy={SCRIPTS_DIR / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={SCRIPTS_DIR / 'protoc-gen-mypy_grpc'}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--mypy_out={scratch}",
            f"--mypy_grpc_out={scratch}",
            *PROTO_FILES,
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit(f"protoc failed: {' '.join(arguments)}")

        written = []
        output_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted(pathlib.Path(scratch, "tokenflow", "v1").iterdir()):
            text = source.read_text()
            text = text.replace("from tokenflow.v1 import", f"from {GENERATED_PACKAGE} import")
            text = text.replace("import tokenflow.v1.", f"import {GENERATED_PACKAGE}.")
            text = text.replace("tokenflow.v1.tokenflow_pb2", f"{GENERATED_PACKAGE}.tokenflow_pb2")
            target = output_dir / source.name
            target.write_text(text)
            written.append(target)
        return written


def main() -> None:
    output_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tokenflow_grpc" / "v1"
    for path in generate(output_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
