"""``hf:ORG/REPO[:QUANT][@REV]`` and ollama's ``hf.co/ORG/REPO[:QUANT]``: a repository's GGUF model picked by its
quantization tag, against the loopback hub stand-in (tests/hub_server.py) with the real huggingface-hub client."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from edge_ensemble import sources
from edge_ensemble.errors import ModelSourceError
from edge_ensemble.sources import HubRepoRef, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub
from test_sources import files_in, gguf_bytes, hub, isolated_env, one_line  # noqa: F401 (fixtures)

REPO = "org/Tiny-GGUF"
CACHE = ("hf", "hub", "models--org--Tiny-GGUF")


def publish(hub: FakeHub, names: list[str], revision: str = "main", repo: str = REPO) -> dict[str, bytes]:
    """Each name as its own small, valid, distinguishable GGUF file (seeded by its position)."""
    data = {name: gguf_bytes(40, seed=i + 1) for i, name in enumerate(names)}
    for name, content in data.items():
        hub.add_file(repo, name, content, revision=revision)
    return data


def gets(hub: FakeHub) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in hub.paths_seen("GET") if "/resolve/" in p]


# ---- parsing (no network) ------------------------------------------------------------------------------------


def test_repo_references_parse_with_tag_revision_and_ollama_host() -> None:
    cases = {
        "hf:org/repo": HubRepoRef("org/repo"),
        "hf:org/repo:Q8_0": HubRepoRef("org/repo", "Q8_0"),
        "hf.co/org/repo:q4_k_m": HubRepoRef("org/repo", "q4_k_m"),
        "huggingface.co/org/repo": HubRepoRef("org/repo"),
        "hf:org/repo:Q8_0@v1.0": HubRepoRef("org/repo", "Q8_0", "v1.0"),
        "hf:org/repo@v1.0:Q8_0": HubRepoRef("org/repo", "Q8_0", "v1.0"),  # a git ref cannot hold ':'
        "hf:org/repo@refs/pr/1": HubRepoRef("org/repo", None, "refs/pr/1"),
        "hf.co/org/repo:latest": HubRepoRef("org/repo"),  # ollama's default tag
    }
    for text, ref in cases.items():
        assert sources.parse_hub_ref(text) == ref, text
    assert str(HubRepoRef("org/repo", "Q8_0", "v1")) == "hf:org/repo:Q8_0@v1"
    # the file form is unchanged, and hf.co/ takes it too
    assert sources.parse_hub_ref("hf:a/b/sub/c.gguf@x") == sources.HubRef("a/b", "sub/c.gguf", "x")
    assert sources.parse_hub_ref("hf.co/a/b/c.gguf") == sources.HubRef("a/b", "c.gguf")
    for bad in ("hf:a/b:", "hf:a:Q4", "hf:a/b:Q4@", "hf:a/b:Q4:Q5", "hf:a//c", "hf:../b", "hf:a/b c", "hf:a/b/c:Q4@v:Q5"):
        with pytest.raises(ModelSourceError) as exc:
            sources.parse_spec(bad)
        assert "expected hf:<org>/<repo>[:<quant>][@<revision>] or hf:<org>/<repo>/<file>.gguf" in one_line(exc)
    spec = sources.parse_spec("hf.co/org/Qwen2.5-0.5B-Instruct-GGUF:Q8_0")
    assert (spec.kind, spec.display_name, spec.ref) == ("hub", "Qwen2.5-0.5B-Instruct-Q8_0",
                                                          HubRepoRef("org/Qwen2.5-0.5B-Instruct-GGUF", "Q8_0"))


def test_a_local_file_named_like_ollamas_spelling_stays_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf.co" / "org").mkdir(parents=True)
    (tmp_path / "hf.co" / "org" / "m.gguf").write_bytes(gguf_bytes())
    assert sources.parse_spec("hf.co/org/m.gguf").kind == "path"


def test_choice_rules_without_network() -> None:
    def pick(files: list[str], quant: str | None = None) -> str:
        return sources.choose_gguf(HubRepoRef("o/r", quant), files).parts[0]

    repo = ["README.md", "m-Q2_K.gguf", "m-Q4_K_M.gguf", "m.Q8_0.gguf", "mmproj-m-F16.gguf", "m-UD-Q4_K_XL.gguf"]
    assert pick(repo) == "m-Q4_K_M.gguf"
    assert pick(repo, "q8_0") == "m.Q8_0.gguf"
    assert pick(repo, "Q4_K_XL") == pick(repo, "UD-Q4_K_XL") == "m-UD-Q4_K_XL.gguf"
    assert pick(repo, "Q4") == "m-Q4_K_M.gguf"  # a leading part of a tag: Q4_K_M among the Q4_*
    assert pick(repo, "Q2") == "m-Q2_K.gguf"
    assert pick(["x.gguf", "mmproj-F16.gguf"]) == "x.gguf"  # one model; mmproj is never the model
    assert pick(["b-Q8_0.gguf", "a-F16.gguf"]) == "a-F16.gguf"  # no Q4_K_M: the first in name order
    assert pick(["Q8_0/m-Q8_0.gguf", "m-F16.gguf"], "Q8_0") == "Q8_0/m-Q8_0.gguf"
    with pytest.raises(ModelSourceError) as exc:
        pick(["7b-Q4_K_M.gguf", "13b-Q4_K_M.gguf"])
    assert one_line(exc) == ("hf:o/r: 2 GGUF files in o/r at revision main have tag Q4_K_M (13b-Q4_K_M.gguf, "
                             "7b-Q4_K_M.gguf); name one with hf:o/r/<file>")
    with pytest.raises(ModelSourceError, match="no GGUF model file in o/r at revision main"):
        pick(["model.safetensors", "mmproj-F16.gguf"])


# ---- against the loopback hub --------------------------------------------------------------------------------


def test_tag_picks_its_file_case_insensitively(tmp_path: Path, hub: FakeHub) -> None:
    data = publish(hub, ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "tiny.F16.gguf", "README.md"])
    for spec, name in (("hf:org/Tiny-GGUF:Q8_0", "tiny-Q8_0.gguf"), ("hf:org/Tiny-GGUF:q8_0", "tiny-Q8_0.gguf"),
                       ("hf:org/Tiny-GGUF:f16", "tiny.F16.gguf")):
        path = resolve_model(spec, progress=False)
        assert path.name == name and path.read_bytes() == data[name], spec
        assert Path(*path.parts[-4:-2]) == Path("models--org--Tiny-GGUF", "snapshots")
    assert sorted(gets(hub)) == ["tiny-Q8_0.gguf", "tiny.F16.gguf"]  # only what was asked for, each once
    assert "/api/models/org/Tiny-GGUF" in hub.paths_seen("GET")


def test_ollama_spelling_resolves_the_same(hub: FakeHub) -> None:
    data = publish(hub, ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"])
    assert resolve_model("hf.co/org/Tiny-GGUF:Q8_0", progress=False).read_bytes() == data["tiny-Q8_0.gguf"]
    assert resolve_model("hf.co/org/Tiny-GGUF", progress=False).read_bytes() == data["tiny-Q4_K_M.gguf"]


def test_no_tag_one_file_several_with_q4_k_m_several_without(hub: FakeHub) -> None:
    one = publish(hub, ["solo-q5_k_m.gguf", "mmproj-solo-f16.gguf"], repo="org/one")
    assert resolve_model("hf:org/one", progress=False).read_bytes() == one["solo-q5_k_m.gguf"]
    several = publish(hub, ["m-Q2_K.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf"], repo="org/several")
    assert resolve_model("hf:org/several", progress=False).read_bytes() == several["m-Q4_K_M.gguf"]
    without = publish(hub, ["m-Q8_0.gguf", "m-F16.gguf", "m-Q5_K_M.gguf"], repo="org/without")
    assert resolve_model("hf:org/without", progress=False).read_bytes() == without["m-F16.gguf"]


def test_absent_tag_is_one_line_listing_the_tags(tmp_path: Path, hub: FakeHub) -> None:
    publish(hub, ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "tiny.F16.gguf", "mmproj-tiny-F16.gguf"])
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q3_K_S", progress=False)
    assert one_line(exc) == ("hf:org/Tiny-GGUF:Q3_K_S: no GGUF file with tag Q3_K_S in org/Tiny-GGUF at revision main"
                             " (tags: Q4_K_M, Q8_0, F16); pick one, e.g. hf:org/Tiny-GGUF:Q4_K_M")
    assert exc.value.exit_code == 1
    assert gets(hub) == [] and files_in(tmp_path.joinpath(*CACHE) / "snapshots") == []


def test_split_model_is_one_model_every_part_fetched(tmp_path: Path, hub: FakeHub) -> None:
    parts = [f"Q8_0/tiny-Q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    data = publish(hub, ["tiny-Q4_K_M.gguf", *parts])
    first = resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False)
    assert first.name == "tiny-Q8_0-00001-of-00003.gguf"
    for part in parts:  # all parts beside the first, as llama.cpp looks for them
        assert (first.parent / Path(part).name).read_bytes() == data[part]
    assert sorted(gets(hub)) == sorted(Path(p).name for p in parts)
    # a split model whose parts are not all in the repository is refused before any download
    publish(hub, ["big-Q4_K_M-00001-of-00002.gguf"], repo="org/broken")
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/broken", progress=False)
    assert "split model big-Q4_K_M has 1 of its 2 parts in org/broken" in one_line(exc)


def test_a_failed_part_leaves_no_part_in_the_cache(tmp_path: Path, hub: FakeHub) -> None:
    parts = [f"tiny-Q8_0-{i:05d}-of-00002.gguf" for i in (1, 2)]
    publish(hub, parts)
    hub.cut_files = {parts[1]}
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False)
    assert "nothing was kept, run again to retry" in one_line(exc)
    cache = tmp_path.joinpath(*CACHE)
    assert [f for f in files_in(cache) if f.startswith(("blobs/", "snapshots/"))] == []
    hub.cut_files = set()
    assert resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False).name == parts[0]


def test_revision_with_a_tag(hub: FakeHub) -> None:
    publish(hub, ["tiny-Q8_0.gguf"])
    v1 = publish(hub, ["tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"], revision="v1")
    for spec in ("hf:org/Tiny-GGUF:Q4_K_M@v1", "hf:org/Tiny-GGUF@v1:Q4_K_M", "hf:org/Tiny-GGUF@v1"):
        assert resolve_model(spec, progress=False).read_bytes() == v1["tiny-Q4_K_M.gguf"], spec
    assert "/api/models/org/Tiny-GGUF/revision/v1" in hub.paths_seen("GET")
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q4_K_M", progress=False)  # main has no Q4_K_M
    assert "no GGUF file with tag Q4_K_M in org/Tiny-GGUF at revision main (tags: Q8_0)" in one_line(exc)
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q8_0@v9", progress=False)
    assert one_line(exc) == "hf:org/Tiny-GGUF:Q8_0@v9: revision 'v9' not found in org/Tiny-GGUF"
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/nope:Q8_0", progress=False)
    assert one_line(exc).startswith("hf:org/nope:Q8_0: repository 'org/nope' not found at http://127.0.0.1:")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_without_downloads_the_choice_is_made_in_the_cache(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    data = publish(hub, ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"])
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q8_0", download=False)
    assert one_line(exc).startswith("hf:org/Tiny-GGUF:Q8_0 is not in the hub cache (")
    assert str(exc.value).endswith(" and downloads are off")
    path = resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False)
    assert path.read_bytes() == data["tiny-Q8_0.gguf"]
    n = len(hub.requests)
    assert resolve_model("hf.co/org/Tiny-GGUF:q8_0", download=False) == path
    assert len(hub.requests) == n
    # the remembered listing makes the same choice as online: no tag is Q4_K_M, which is not cached
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF", download=False)
    assert "is not in the hub cache" in one_line(exc) and "(cached: Q8_0) and downloads are off" in str(exc.value)
    with pytest.raises(ModelSourceError) as exc:  # a tag the repository lacks says so, offline too
        resolve_model("hf:org/Tiny-GGUF:Q6_K", download=False)
    assert "no GGUF file with tag Q6_K in org/Tiny-GGUF at revision main (tags: Q4_K_M, Q8_0)" in one_line(exc)
    # a hub that cannot be reached falls back to the cache; a server that is not a hub is reported
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False) == path
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q4_K_M", progress=False)
    assert "(cached: Q8_0) and cannot reach the hub at http://127.0.0.1:" in one_line(exc)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.not_a_hub = True
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False)
    assert one_line(exc).startswith(f"hf:org/Tiny-GGUF:Q8_0: the hub at {hub.url} did not answer with a repository")


def test_offline_mode_uses_the_cache(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    publish(hub, ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"])
    path = resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(hub.requests)
    assert resolve_model("hf:org/Tiny-GGUF:Q8_0", progress=False) == path
    with pytest.raises(ModelSourceError) as exc:
        resolve_model("hf:org/Tiny-GGUF", progress=False)
    assert "(cached: Q8_0) and HF_HUB_OFFLINE is set" in one_line(exc)
    # without a remembered listing (another tool filled the cache) the choice is among the cached files
    shutil.rmtree(tmp_path / "cache" / "hub-listings")
    assert resolve_model("hf:org/Tiny-GGUF", progress=False) == path
    assert len(hub.requests) == n
